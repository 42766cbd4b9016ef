//! What operators scrape and probe: Prometheus metrics, `/healthz` and `/readyz`, served on
//! `METRICS_ADDR` with axum.
//!
//! Metrics (none carries a secret or an unbounded label: no ids, no tokens):
//! - `bunq_session_worker_deliveries_total{outcome, reason}`: `outcome` from the README's
//!   vocabulary, `reason` the failure code of a dead letter, else empty;
//! - `bunq_session_worker_bunq_requests_total{endpoint, status}`: `status` the HTTP status, or
//!   `error` when no answer came;
//! - `bunq_session_worker_bunq_request_duration_seconds{endpoint}` and
//!   `bunq_session_worker_delivery_duration_seconds` (histograms, s);
//! - `bunq_session_worker_in_flight`, `bunq_session_worker_broker_connected`,
//!   `bunq_session_worker_publishing_blocked` (gauges, read at scrape time);
//! - `bunq_session_worker_rate_limit_wait_seconds_total` (time spent waiting for
//!   session-server slots and 429 windows, s) and
//!   `bunq_session_worker_publish_failures_total{exchange}`;
//! - `bunq_session_worker_outcome_memory_evictions_total`: outcomes the full in-process memory
//!   forgot before their 15 min ([`crate::ledger::KnownOutcomes`]);
//! - `bunq_session_worker_foreign_seals_total`: inputs whose bookkeeping seal this replica could
//!   not verify ([`crate::broker::bookkeeping`]);
//! - `bunq_session_worker_build_info{version}` (always 1).
//!
//! Probes: `/healthz` answers 200 while the worker's loops run. `/readyz` answers 200 only when
//! connected, consuming, not blocked by flow control, not paused by the breaker, and with a Redis
//! that takes writes when `REDIS_URL` is set (a write probe: a read-only replica answers PING);
//! otherwise 503 with `{"ready": false, "reason": "…"}`.
//! Kubernetes probe semantics: <https://kubernetes.io/docs/concepts/configuration/liveness-readiness-startup-probes/>.

use std::{net::SocketAddr, sync::OnceLock};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// What `/healthz` and the gauges read, taken at each request: nothing in it waits on Redis, so
/// liveness answers at once even while the fleet's Redis does not.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Whether the worker's loops run.
    pub running: bool,
    /// Deliveries being handled.
    pub in_flight: usize,
    /// Whether the broker connection is open.
    pub connected: bool,
    /// Whether the broker blocks publishing.
    pub publishing_blocked: bool,
}

/// Something the probes can look at: the worker's status (see `WorkerStatus`).
pub trait Probe: Send + Sync + 'static {
    /// The current state.
    fn snapshot(&self) -> std::pin::Pin<Box<dyn Future<Output = Snapshot> + Send + '_>>;

    /// Why the worker is not ready to take work, if it is not (for `/readyz`; may ask Redis,
    /// within a bound).
    fn not_ready(&self) -> std::pin::Pin<Box<dyn Future<Output = Option<String>> + Send + '_>>;
}

/// Histogram buckets, s: from 5 ms (a fast bunq answer) to 5 min (a delivery paced for long).
const BUCKETS_S: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The process's Prometheus recorder, installed on first use (once per process: several
/// workers in one process, as in tests, share it).
///
/// # Panics
/// Never in practice: installing fails only when another recorder was installed first, and this
/// is the only place that installs one; the buckets are a fixed, valid list.
pub fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(BUCKETS_S)
                .expect("a fixed, non-empty bucket list")
                .install_recorder()
                .expect("the only metrics recorder of the process");
            metrics::gauge!("bunq_session_worker_build_info", "version" => env!("CARGO_PKG_VERSION"))
                .set(1.0);
            handle
        })
        .clone()
}

/// Why `METRICS_ADDR` could not be served.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on METRICS_ADDR {addr}{}", hint(source))]
pub struct ServeError {
    /// The address.
    pub addr: SocketAddr,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

/// What to do when the port is taken: most often a second worker on one host.
fn hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (the port is in use: another worker on this host? give each its own METRICS_ADDR, e.g. METRICS_ADDR=127.0.0.1:9465, or 127.0.0.1:0 for any free port)"
        }
        _ => "",
    }
}

#[derive(Clone)]
struct Served {
    probe: std::sync::Arc<dyn Probe>,
    metrics: PrometheusHandle,
}

/// Binds `addr` and serves `/metrics`, `/healthz` and `/readyz` until `shutdown` fires; returns
/// the address bound (port 0 picks a free one, which is logged).
///
/// # Errors
/// [`ServeError`] when the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    probe: std::sync::Arc<dyn Probe>,
    shutdown: CancellationToken,
) -> Result<SocketAddr, ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServeError { addr, source })?;
    let served = Served {
        probe,
        metrics: recorder(),
    };
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(served);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!(error = %crate::telemetry::Chain(&e), "the metrics and probe server failed");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    Ok(bound)
}

async fn metrics(State(p): State<Served>) -> impl IntoResponse {
    let s = p.probe.snapshot().await;
    metrics::gauge!("bunq_session_worker_in_flight").set(s.in_flight as f64);
    metrics::gauge!("bunq_session_worker_broker_connected").set(f64::from(u8::from(s.connected)));
    metrics::gauge!("bunq_session_worker_publishing_blocked")
        .set(f64::from(u8::from(s.publishing_blocked)));
    (
        [("content-type", "text/plain; version=0.0.4")],
        p.metrics.render(),
    )
}

async fn healthz(State(p): State<Served>) -> impl IntoResponse {
    if p.probe.snapshot().await.running {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "stopped\n")
    }
}

async fn readyz(State(p): State<Served>) -> impl IntoResponse {
    let reason = p.probe.not_ready().await;
    let body = serde_json::json!({"ready": reason.is_none(), "reason": reason});
    let status = if reason.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker whose readiness never answers (a Redis that hangs).
    struct Hanging;

    impl Probe for Hanging {
        fn snapshot(&self) -> std::pin::Pin<Box<dyn Future<Output = Snapshot> + Send + '_>> {
            Box::pin(async {
                Snapshot {
                    running: true,
                    ..Snapshot::default()
                }
            })
        }

        fn not_ready(&self) -> std::pin::Pin<Box<dyn Future<Output = Option<String>> + Send + '_>> {
            Box::pin(std::future::pending())
        }
    }

    /// Liveness and metrics never wait on what readiness asks (Redis): a hanging readiness
    /// check must not get every replica restarted by its liveness probe.
    #[tokio::test]
    async fn liveness_and_metrics_do_not_wait_on_readiness() {
        let stop = CancellationToken::new();
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            std::sync::Arc::new(Hanging),
            stop.clone(),
        )
        .await
        .unwrap();
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .unwrap();
        for path in ["healthz", "metrics"] {
            let r = http.get(format!("http://{addr}/{path}")).send().await;
            assert_eq!(r.map(|r| r.status().as_u16()).ok(), Some(200), "/{path}");
        }
        let ready = http
            .get(format!("http://{addr}/readyz"))
            .timeout(std::time::Duration::from_millis(300))
            .send()
            .await;
        assert!(ready.is_err(), "the fake's readiness hangs");
        stop.cancel();
    }

    #[test]
    fn a_taken_port_suggests_another_metrics_addr() {
        let e = ServeError {
            addr: "0.0.0.0:9464".parse().unwrap(),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        let text = e.to_string();
        assert!(
            text.starts_with("cannot listen on METRICS_ADDR 0.0.0.0:9464"),
            "{text}"
        );
        assert!(text.contains("another worker on this host"), "{text}");
        assert!(text.contains("METRICS_ADDR=127.0.0.1:9465"), "{text}");
        let other = ServeError {
            addr: "0.0.0.0:9464".parse().unwrap(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        assert_eq!(
            other.to_string(),
            "cannot listen on METRICS_ADDR 0.0.0.0:9464"
        );
    }
}
