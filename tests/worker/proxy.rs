//! A TCP proxy for fault injection, in front of the broker or the fake bunq: it forwards bytes
//! both ways and, on demand, cuts every connection and refuses new ones, freezes the open ones
//! (half-open), accepts connections and never answers (a black hole), or resets the connection
//! that carries the client's next bytes (an HTTP request).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    /// New connections are dropped at once (`cut`).
    refusing: AtomicBool,
    /// New connections are accepted and never answered (`black_hole`).
    black_hole: AtomicBool,
    /// The connection that carries the client's next bytes is reset (`reset_next_request`).
    reset_next: AtomicBool,
    resets: AtomicUsize,
    /// TCP connections accepted so far, whatever became of them.
    accepted: AtomicUsize,
    /// Cancelled by `cut`: ends every connection accepted before it.
    generation: Mutex<CancellationToken>,
    /// Cancelled by `stall`: freezes every connection accepted before it.
    stall: Mutex<CancellationToken>,
    /// Cancelled when the proxy is dropped: stops accepting and ends every connection.
    stop: CancellationToken,
}

impl TcpProxy {
    /// Listens on a free local port and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: impl Into<String>) -> Self {
        let upstream = upstream.into();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            refusing: AtomicBool::new(false),
            black_hole: AtomicBool::new(false),
            reset_next: AtomicBool::new(false),
            resets: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            generation: Mutex::new(stop.child_token()),
            stall: Mutex::new(CancellationToken::new()),
            stop,
        });
        let sh = shared.clone();
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => return,
                    },
                    _ = sh.stop.cancelled() => return,
                };
                sh.accepted.fetch_add(1, Ordering::SeqCst);
                if sh.refusing.load(Ordering::SeqCst) {
                    continue; // refused: dropped at once
                }
                let ended = sh.generation.lock().unwrap().clone();
                if sh.black_hole.load(Ordering::SeqCst) {
                    // Accepted, then nothing ever comes back.
                    tokio::spawn(async move {
                        ended.cancelled().await;
                        drop(client);
                    });
                    continue;
                }
                let frozen = sh.stall.lock().unwrap().clone();
                tokio::spawn(serve(client, upstream.clone(), ended, frozen, sh.clone()));
            }
        });
        Self { addr, shared }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every proxied connection and refuses new ones (a network cut or a broker restart).
    pub fn cut(&self) {
        self.shared.refusing.store(true, Ordering::SeqCst);
        let mut g = self.shared.generation.lock().unwrap();
        g.cancel();
        *g = self.shared.stop.child_token();
    }

    /// Freezes every proxied connection without closing it (a half-open connection); new
    /// connections work.
    pub fn stall(&self) {
        let mut st = self.shared.stall.lock().unwrap();
        st.cancel();
        *st = CancellationToken::new();
    }

    /// Accepts connections again, and forwards them.
    pub fn restore(&self) {
        self.shared.refusing.store(false, Ordering::SeqCst);
        self.shared.black_hole.store(false, Ordering::SeqCst);
    }

    /// From now on accepts connections but never answers (a broker hung in its start-up, a
    /// firewall that swallows packets).
    pub fn black_hole(&self) {
        self.shared.black_hole.store(true, Ordering::SeqCst);
    }

    /// Resets (TCP RST) the connection on which the client next sends something, instead of
    /// forwarding it: the client sees "connection reset" after sending its request.
    pub fn reset_next_request(&self) {
        self.shared.reset_next.store(true, Ordering::SeqCst);
    }

    /// TCP connections accepted so far (also those refused, black-holed or reset afterwards):
    /// a client has reached the proxy.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections reset so far by `reset_next_request`.
    pub fn resets(&self) -> usize {
        self.shared.resets.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

async fn serve(
    mut client: TcpStream,
    upstream: String,
    ended: CancellationToken,
    frozen: CancellationToken,
    shared: Arc<Shared>,
) {
    let Ok(mut server) = TcpStream::connect(&upstream).await else {
        return;
    };
    tokio::select! {
        reset = forward(&mut client, &mut server, &shared) => {
            if reset {
                // Dropping a socket with linger 0 sends RST.
                let _ = client.set_zero_linger();
            }
        }
        _ = ended.cancelled() => {}
        _ = frozen.cancelled() => {
            // Half-open: both sockets stay open, nothing moves.
            ended.cancelled().await;
        }
    }
}

/// Copies bytes both ways until either side closes or fails. True when it stopped to reset the
/// client's connection.
async fn forward(client: &mut TcpStream, server: &mut TcpStream, shared: &Shared) -> bool {
    let (mut client_rx, mut client_tx) = client.split();
    let (mut server_rx, mut server_tx) = server.split();
    let upstream = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            if shared.reset_next.swap(false, Ordering::SeqCst) {
                shared.resets.fetch_add(1, Ordering::SeqCst);
                return true;
            }
            if server_tx.write_all(&buf[..n]).await.is_err() {
                return false;
            }
        }
    };
    let downstream = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match server_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            if client_tx.write_all(&buf[..n]).await.is_err() {
                return false;
            }
        }
    };
    tokio::select! {
        reset = upstream => reset,
        reset = downstream => reset,
    }
}

/// The broker's `host:port` in an AMQP URL (5672 when the URL names none).
pub fn amqp_host_port(url: &str) -> String {
    let rest = &url[amqp_authority_start(url)..];
    let hp = rest.split('/').next().unwrap();
    if hp.contains(':') {
        hp.to_owned()
    } else {
        format!("{hp}:5672")
    }
}

/// `url` with its host:port replaced by `addr`.
pub fn amqp_url_via(url: &str, addr: SocketAddr) -> String {
    let at = amqp_authority_start(url);
    let rest = &url[at..];
    let path = rest.find('/').map(|i| &rest[i..]).unwrap_or("");
    format!("{}{addr}{path}", &url[..at])
}

/// Where the host starts: after the user info, else after the scheme.
fn amqp_authority_start(url: &str) -> usize {
    url.rfind('@')
        .map(|i| i + 1)
        .unwrap_or_else(|| url.find("://").unwrap() + 3)
}
