//! The AMQP connection, re-established with backoff whenever it is lost.
//!
//! lapin 4 offers `enable_auto_recover()`; the worker supervises reconnection itself instead so
//! that every new connection re-declares the topology, re-applies the prefetch and re-subscribes
//! in one place ([`crate::broker::consumer`]), and so the schedule is explicit
//! ([`RetryPolicy::RECONNECT`]: 100 ms, doubling, at most 2 s between attempts), which brings
//! the worker back within ~2 s of the broker returning.
//! Heartbeats (AMQP 0-9-1 §4.2.7) are negotiated at `AMQP_HEARTBEAT_S` so a half-open
//! connection is noticed within about twice that time.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use futures_util::StreamExt;
use lapin::{Connection, ConnectionProperties, Event, uri::AMQPUri};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::retry::{RetryPolicy, Stopped, retry};

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// `AMQP_URL` does not parse (start-up validation normally catches this first).
    #[error("AMQP_URL does not parse: {0}")]
    BadUrl(String),
    /// The broker is unreachable or refused the login.
    #[error("the broker refused or could not be reached")]
    Amqp(#[source] lapin::Error),
    /// TCP was accepted but the AMQP handshake did not complete in time.
    #[error(
        "no answer within {0} s (the broker accepted TCP but did not complete the AMQP handshake)"
    )]
    Timeout(u64),
}

/// The brokers of an `AMQP_URL`: one URL, or several separated by commas (the nodes of a
/// cluster, as Spring's `addresses` takes them), each trimmed; empty entries are skipped.
pub fn amqp_urls(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|u| !u.is_empty())
}

/// Replaces the password of a `scheme://user:password@host/...` URL with `***`, for logs.
pub fn redact_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}://{}:***{}",
            &url[..scheme_end],
            &authority[..colon],
            &rest[at..]
        ),
        _ => url.to_owned(),
    }
}
/// Longest wait for one connection attempt (TCP, TLS and the AMQP handshake): a broker that
/// accepts TCP but never answers must not hang the worker.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for closing a channel or the connection, for an ack or a nack, and for pausing
/// or resuming the consumer: a hung broker must not hold a stop, and a call lapin leaves
/// unanswered when the connection dies under it must not hold a delivery.
pub const CHANNEL_OP_TIMEOUT: Duration = Duration::from_secs(2);

/// A call on a channel that failed or went unanswered.
#[derive(Debug, thiserror::Error)]
pub enum ChannelFault {
    /// lapin's error.
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    /// No answer within [`CHANNEL_OP_TIMEOUT`]: the name of the AMQP method.
    #[error("{0} not answered within {ms} ms", ms = CHANNEL_OP_TIMEOUT.as_millis())]
    Unanswered(&'static str),
}

/// `op` (the AMQP method `what`) within [`CHANNEL_OP_TIMEOUT`]. lapin 4 can leave a call
/// unanswered for ever when the connection dies while it is sent (its internal RPC drops the
/// promise of a channel it already counts as closed; amqp-rs/lapin#409 is the same kind for
/// publishes), and a call that never ends holds whatever waits on it: an ack holds the input's
/// in-process lock, so every redelivered copy would wait behind it.
///
/// # Errors
/// [`ChannelFault::Amqp`] when lapin fails the call, [`ChannelFault::Unanswered`] on timeout.
pub async fn bounded<T>(
    what: &'static str,
    op: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, ChannelFault> {
    tokio::time::timeout(CHANNEL_OP_TIMEOUT, op)
        .await
        .map_err(|_| ChannelFault::Unanswered(what))?
        .map_err(ChannelFault::Amqp)
}

/// The AMQP frame size the worker asks for, in bytes, unless `AMQP_URL` sets `frame_max`
/// (AMQP 0-9-1 §4.2.3; the broker's `frame_max` wins when it is lower): RabbitMQ's default.
///
/// Not smaller: a message's properties (its headers) travel in one frame that cannot be split,
/// so a producer's headers of more than the worker's frame size would break the worker's
/// connection on every delivery of that message. Asked for, not left to the broker: lapin then
/// allocates its read and write buffers (32 frames each, 8 MiB) at this size from the start,
/// and untouched pages of them cost no memory; left to the broker, lapin grows them after the
/// handshake by filling them, and a worker holds 8 MiB more from its first second.
pub const FRAME_MAX: u32 = 128 * 1024;

/// One broker of `AMQP_URL`.
struct Node {
    uri: AMQPUri,
    /// The URL without its password, for logs.
    redacted: String,
    /// `host:port`, for the metric's label.
    address: String,
}

/// The worker's connection to the broker, shared by the consumer loop and the publisher.
pub struct Link {
    nodes: Vec<Node>,
    /// The node of the last connection (the first until one is made).
    node: std::sync::atomic::AtomicUsize,
    name: String,
    current: Mutex<Option<Arc<Connection>>>,
    blocked: Arc<AtomicBool>,
    /// The frame size of the last connection, bytes (what was asked for until one is made).
    frame_max: AtomicU32,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("url", &self.redacted_url())
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Prepares a link to the brokers of `url` (one, or several comma-separated:
    /// [`amqp_urls`]) with connection name `name` (shown by `rabbitmqctl
    /// list_connections client_properties` and the management UI) and the heartbeat timeout
    /// `heartbeat_s` unless a URL sets one, asking for frames of [`FRAME_MAX`] bytes unless it
    /// sets `frame_max`.
    ///
    /// # Errors
    /// [`ConnectError::BadUrl`] when a URL does not parse or none is given (start-up validation
    /// normally catches this first).
    pub fn new(url: &SecretString, name: String, heartbeat_s: u16) -> Result<Self, ConnectError> {
        let mut nodes = Vec::new();
        for url in amqp_urls(url.expose_secret()) {
            let mut uri: AMQPUri = url
                .parse()
                .map_err(|e: String| ConnectError::BadUrl(redact_url_password(&e)))?;
            if uri.query.heartbeat.is_none() {
                uri.query.heartbeat = Some(heartbeat_s);
            }
            uri.query.frame_max.get_or_insert(FRAME_MAX);
            nodes.push(Node {
                address: format!("{}:{}", uri.authority.host, uri.authority.port),
                uri,
                redacted: redact_url_password(url),
            });
        }
        let frame_max = nodes
            .first()
            .ok_or_else(|| ConnectError::BadUrl("no broker given".into()))?
            .uri
            .query
            .frame_max
            .unwrap_or(FRAME_MAX);
        Ok(Self {
            nodes,
            node: std::sync::atomic::AtomicUsize::new(0),
            name,
            current: Mutex::new(None),
            blocked: Arc::new(AtomicBool::new(false)),
            frame_max: AtomicU32::new(frame_max),
        })
    }

    /// The frame size negotiated with the broker on the last connection, bytes (AMQP 0-9-1
    /// §4.2.3): a message's properties must fit in one frame. 0 means no limit.
    pub fn frame_max(&self) -> u32 {
        self.frame_max.load(Ordering::Relaxed)
    }

    /// The connection name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL of the broker of the last connection (the first until one is made), without
    /// its password.
    pub fn redacted_url(&self) -> &str {
        &self.nodes[self.node.load(Ordering::Relaxed) % self.nodes.len()].redacted
    }

    /// Whether the broker has blocked publishing on this connection (a memory or disk alarm,
    /// `connection.blocked`).
    pub fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::Relaxed)
    }

    /// The current connection if it is open.
    pub async fn current(&self) -> Option<Arc<Connection>> {
        let guard = self.current.lock().await;
        guard.as_ref().filter(|c| c.status().connected()).cloned()
    }

    /// Opens a new connection, each broker tried within [`CONNECT_TIMEOUT`] (closing nothing:
    /// the old one is already dead or is dropped). With several brokers, tries them in turn:
    /// the first time from the first, afterwards from the one after the last connection's (the
    /// node just lost), so a dead node is not tried first again.
    ///
    /// # Errors
    /// [`ConnectError`] of the last broker tried when none can be reached, all refuse the login
    /// or none answers in time.
    pub async fn connect(&self) -> Result<Arc<Connection>, ConnectError> {
        let n = self.nodes.len();
        let start = match self.current.lock().await.is_some() {
            true => self.node.load(Ordering::Relaxed) + 1,
            false => self.node.load(Ordering::Relaxed),
        };
        let mut last = None;
        for k in 0..n {
            let i = (start + k) % n;
            match self.connect_to(i).await {
                Ok(conn) => return Ok(conn),
                Err(e) => {
                    if n > 1 {
                        warn!(node = %self.nodes[i].redacted, error = %crate::telemetry::Chain(&e), "cannot reach this broker node; trying the next");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(ConnectError::BadUrl("no broker given".into())))
    }

    async fn connect_to(&self, i: usize) -> Result<Arc<Connection>, ConnectError> {
        let node = &self.nodes[i];
        let props = ConnectionProperties::default().with_connection_name(self.name.clone().into());
        let conn = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect_uri(node.uri.clone(), props),
        )
        .await
        {
            Ok(Ok(c)) => Arc::new(c),
            Ok(Err(e)) => return Err(ConnectError::Amqp(e)),
            Err(_) => return Err(ConnectError::Timeout(CONNECT_TIMEOUT.as_secs())),
        };
        self.node.store(i, Ordering::Relaxed);
        // Which node the worker is on: 1 for it, 0 for the others (labels: the configured
        // nodes' host:port, a bounded set).
        for (j, other) in self.nodes.iter().enumerate() {
            metrics::gauge!("bunq_session_worker_broker_node", "node" => other.address.clone())
                .set(if j == i { 1.0 } else { 0.0 });
        }
        if self.nodes.len() > 1 {
            info!(node = %node.redacted, "connected to the broker node");
        }
        self.blocked.store(false, Ordering::Relaxed);
        self.frame_max
            .store(conn.configuration().frame_max(), Ordering::Relaxed);
        let blocked = self.blocked.clone();
        let mut events = conn.events_listener();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                match event {
                    Event::ConnectionBlocked(reason) => {
                        blocked.store(true, Ordering::Relaxed);
                        warn!(%reason, "the broker blocked publishing (connection.blocked); publishes wait until it unblocks");
                    }
                    Event::ConnectionUnblocked => {
                        blocked.store(false, Ordering::Relaxed);
                        info!("the broker unblocked publishing");
                    }
                    _ => {}
                }
            }
        });
        *self.current.lock().await = Some(conn.clone());
        Ok(conn)
    }

    /// Connects under [`RetryPolicy::RECONNECT`] until it succeeds or `shutdown` fires (then
    /// `None`). A connect attempt may take [`CONNECT_TIMEOUT`]; a stop does not wait for it.
    pub async fn reconnect(&self, shutdown: &CancellationToken) -> Option<Arc<Connection>> {
        let connected = retry(
            RetryPolicy::RECONNECT,
            shutdown,
            |_| self.connect(),
            |_| false,
            |e, attempt, _| {
                warn!(attempt, error = %crate::telemetry::Chain(e), url = %self.redacted_url(), "cannot reach the broker; retrying")
            },
        )
        .await;
        match connected {
            Ok(c) => {
                info!("connected to the broker");
                Some(c)
            }
            Err(Stopped::Cancelled | Stopped::Permanent(_) | Stopped::Spent(..)) => None,
        }
    }

    /// Closes the current connection, if any, waiting at most [`CHANNEL_OP_TIMEOUT`].
    pub async fn close(&self) {
        let current = self.current.lock().await.take();
        if let Some(c) = current.filter(|c| c.status().connected()) {
            let _ = tokio::time::timeout(CHANNEL_OP_TIMEOUT, c.close(200, "shutdown".into())).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_call_lapin_never_answers_ends_after_the_channel_timeout() {
        let started = tokio::time::Instant::now();
        let never = bounded("basic.ack", std::future::pending::<lapin::Result<bool>>()).await;
        assert!(matches!(never, Err(ChannelFault::Unanswered("basic.ack"))));
        assert_eq!(started.elapsed(), CHANNEL_OP_TIMEOUT);
        assert!(matches!(
            bounded("basic.ack", async { Ok(false) }).await,
            Ok(false)
        ));
    }

    #[test]
    fn the_url_keeps_its_own_heartbeat_and_frame_max_and_gets_ours_otherwise() {
        let plain = Link::new(
            &SecretString::from("amqp://guest:guest@localhost:5672/%2f"),
            "t".into(),
            30,
        )
        .unwrap();
        assert_eq!(plain.nodes[0].uri.query.heartbeat, Some(30));
        assert_eq!(plain.nodes[0].uri.query.frame_max, Some(FRAME_MAX));
        let own = Link::new(
            &SecretString::from("amqp://localhost/%2f?heartbeat=5&frame_max=65536"),
            "t".into(),
            30,
        )
        .unwrap();
        assert_eq!(own.nodes[0].uri.query.heartbeat, Some(5));
        assert_eq!(own.nodes[0].uri.query.frame_max, Some(65_536));
        assert_eq!(own.frame_max(), 65_536);
    }

    #[test]
    fn several_brokers_are_read_in_order_each_with_its_own_settings() {
        let link = Link::new(
            &SecretString::from(
                "amqp://u:secret@rabbit-1:5672/%2f, amqp://u:secret@rabbit-2:5673/%2f?heartbeat=7,,",
            ),
            "t".into(),
            30,
        )
        .unwrap();
        let seen: Vec<(&str, Option<u16>)> = link
            .nodes
            .iter()
            .map(|n| (n.address.as_str(), n.uri.query.heartbeat))
            .collect();
        assert_eq!(
            seen,
            [("rabbit-1:5672", Some(30)), ("rabbit-2:5673", Some(7))]
        );
        assert_eq!(link.redacted_url(), "amqp://u:***@rabbit-1:5672/%2f");
        assert!(!format!("{link:?}").contains("secret"));
        assert!(Link::new(&SecretString::from(" , "), "t".into(), 30).is_err());
    }
}
