//! A bunq emulator: the three calls of bunq's session flow, for trying the worker (the demo,
//! compose) without bunq credentials. Not for production.
//!
//! It behaves as bunq's public API does for what the worker and bunq's own SDKs send
//! (<https://doc.bunq.com/basics/authentication>, swagger.json `paths./installation`,
//! `/device-server`, `/session-server`):
//! - `POST /v1/installation` registers a client public key and answers `Id`, `Token` (the
//!   installation token) and `ServerPublicKey`.
//! - `POST /v1/device-server` and `POST /v1/session-server` need the headers bunq needs
//!   (`User-Agent`, `X-Bunq-Client-Request-Id` new per request, `X-Bunq-Geolocation`,
//!   `X-Bunq-Language`, `X-Bunq-Region`), a known installation token in
//!   `X-Bunq-Client-Authentication` and an `X-Bunq-Client-Signature` over the body made with
//!   that installation's key. `Content-Type` is not required (bunq's Python SDK sends none).
//! - Every answer is signed (`X-Bunq-Server-Signature` over the body) and carries
//!   `X-Bunq-Client-Response-Id`; every refusal has bunq's status and body
//!   `{"Error":[{"error_description": …, "error_description_translated": …}]}`.
//! - A credential (`secret`) opens one session: a second session-server call with it gets
//!   400 "User credentials are incorrect. Incorrect API key or IP address.", as bunq answers a
//!   spent one-time credential.
//! - session-server is rate-limited when `--session-rate-limit` is set, with bunq's 429 message
//!   "Too many requests. You can do a maximum of N calls per W second to this endpoint.".
//!
//! Faults are injected by the credential's prefix: `reject…` (400 credentials incorrect),
//! `forbidden…` (403), `flaky…` (one 503 on session-server, then a session), `slow…`
//! (session-server answers after 2 s), `ratelimited…` (one 429 naming a 1 s window), `lost…`
//! (the first session-server call opens the session, then its answer takes 5 s: past a
//! client's timeout, the answer is lost and the session exists).

mod api;

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The `emulator` subcommand's settings (defined with the rest of the command line in
/// [`crate::config`]).
pub use crate::config::{CredentialUse, EmulatorSettings};
pub use api::Emulator;

/// Why the emulator could not run.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The server key could not be made.
    #[error("cannot generate the emulator's RSA-2048 server key")]
    Key,
    /// Serving failed.
    #[error("the emulator's HTTP server failed")]
    Serve(#[source] std::io::Error),
}

/// A running emulator.
#[derive(Debug)]
pub struct Running {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its base URL, `http://<addr>/v1`, for `BUNQ_API_URL`.
    pub base_url: String,
    /// Its state (for counting calls in tests and the demo).
    pub emulator: Arc<Emulator>,
    task: tokio::task::JoinHandle<Result<(), EmulatorError>>,
}

impl Running {
    /// Waits until the server stops (after `shutdown` fires).
    ///
    /// # Errors
    /// [`EmulatorError::Serve`] when the server failed.
    pub async fn wait(self) -> Result<(), EmulatorError> {
        self.task.await.unwrap_or(Ok(()))
    }
}

/// Binds `settings.listen` and serves until `shutdown` fires.
///
/// # Errors
/// [`EmulatorError::Bind`] when the address is taken or not local; [`EmulatorError::Key`] when
/// the server key cannot be generated.
pub async fn start(
    settings: &EmulatorSettings,
    shutdown: CancellationToken,
) -> Result<Running, EmulatorError> {
    let listener =
        TcpListener::bind(settings.listen)
            .await
            .map_err(|source| EmulatorError::Bind {
                addr: settings.listen,
                source,
            })?;
    let addr = listener
        .local_addr()
        .map_err(|source| EmulatorError::Bind {
            addr: settings.listen,
            source,
        })?;
    let emulator = Arc::new(Emulator::new(
        settings.session_rate_limit,
        settings.credentials,
    )?);
    let router = api::router(emulator.clone());
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(EmulatorError::Serve)
    });
    Ok(Running {
        addr,
        base_url: format!("http://{addr}/v1"),
        emulator,
        task,
    })
}

#[cfg(test)]
mod tests;
