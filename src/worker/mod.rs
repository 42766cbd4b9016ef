//! The worker: start-up wiring and the handle a caller runs until stopped.
//!
//! [`Worker::build`] connects, declares the topology and loads the API context;
//! [`Worker::run_until_stopped`] consumes through [`crate::broker::Consumer`], each delivery
//! going through `delivery::handle`: read once ([`crate::broker::Inbound`]), decided
//! ([`crate::decide`]), planned ([`crate::plan`]), settled ([`crate::settle`]).

mod bootstrap;
mod delivery;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use lapin::Connection;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    breaker::Breaker,
    broker::{
        ConnectError, Consumer, Link, Publisher, Stops, SubscribeFailed, TopologyError, declare,
    },
    bunq::{BunqClient, CallError, context::ContextError},
    config::Settings,
    decide::Decider,
    fleet::{Fleet, Records},
    ledger::Book,
    pacing::{Budget, Pace, Pacer},
    session::SessionFlow,
    settle::Settler,
};

pub use crate::plan::{
    Settled,
    properties::{APP_ID, PRODUCER_HEADERS_DROPPED_HEADER},
};

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The broker is unreachable, refused the login or did not answer in time.
    #[error("cannot connect to the broker at {url}")]
    Connect {
        /// `AMQP_URL` without its password.
        url: String,
        /// What went wrong.
        #[source]
        source: ConnectError,
    },
    /// A declaration failed (see [`TopologyError`]).
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// The API context could not be loaded or saved.
    #[error(transparent)]
    Context(#[from] ContextError),
    /// `POST /installation` failed.
    #[error("creating the bunq installation failed")]
    Installation(#[source] CallError),
    /// The HTTP client could not be built (e.g. no CA certificates for TLS).
    #[error("cannot build the HTTP client")]
    Http(#[source] reqwest::Error),
    /// Another broker failure during start-up.
    #[error("broker error during start-up")]
    Broker(#[from] lapin::Error),
    /// Shutdown was asked for during start-up.
    #[error("start-up interrupted by a shutdown signal")]
    Interrupted,
    /// `REDIS_URL` is not a Redis URL.
    #[error(transparent)]
    Redis(crate::fleet::BadUrl),
    /// A setting that can only be checked at start-up (the consumer's key file).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Redis (`REDIS_URL`) did not answer at start-up, so the fleet's seal key is unknown.
    #[error(
        "Redis (REDIS_URL, or the primary of REDIS_SENTINELS) did not answer within {0} s at start-up (the log says why): the replicas' shared seal key for bookkeeping headers is kept there"
    )]
    RedisAtStart(u64),
    /// `METRICS_ADDR` could not be served (the port is taken?).
    #[error(transparent)]
    Metrics(#[from] crate::observe::ServeError),
    /// The context file's installation was made with another `BUNQ_API_URL`.
    #[error(
        "BUNQ_CONTEXT_FILE {file} holds an installation made for {stored}, but BUNQ_API_URL is {configured}: bunq would refuse every call. Point BUNQ_CONTEXT_FILE at that environment's context (or a new path, to create an installation), or set BUNQ_API_URL back"
    )]
    ContextForOtherApi {
        /// The context file.
        file: String,
        /// The URL recorded in it.
        stored: String,
        /// `BUNQ_API_URL`.
        configured: String,
    },
}

impl StartError {
    /// The process exit status for this error: 2 for a configuration that cannot work
    /// ([`StartError::ContextForOtherApi`]), else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::ContextForOtherApi { .. }
            | StartError::Redis(_)
            | StartError::Config(_) => 2,
            _ => 1,
        }
    }
}

/// Why a running worker stopped without being asked to.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Declaring the topology and subscribing kept failing on a live connection.
    #[error(transparent)]
    Subscribe(#[from] SubscribeFailed),
}

/// After this many failed attempts in a row to declare the topology and subscribe on a live
/// connection, the worker exits non-zero rather than stay alive but deaf.
pub const MAX_SUBSCRIBE_FAILURES: u32 = crate::retry::RetryPolicy::SUBSCRIBE.max_attempts;

/// A delivery the worker finished with, for observers (the demo, tests).
#[derive(Clone, Debug)]
pub struct Handled {
    /// The input's `message_id`, escaped and shortened for logs.
    pub message_id: String,
    /// What was done.
    pub outcome: Settled,
}

/// Everything a delivery's task needs; shared by all tasks.
struct Shared {
    /// Told of every delivery handled; nobody need listen.
    handled: tokio::sync::broadcast::Sender<Handled>,
    /// `MAX_MESSAGE_BYTES`, and the key of the worker's sealed bookkeeping headers.
    max_message_bytes: usize,
    seal: Arc<crate::broker::Seal>,
    decider: Decider,
    settler: Settler,
    /// What the probes read.
    gauges: Arc<Gauges>,
}

/// A worker with its API context ready and a first connection to the broker.
pub struct Worker {
    shared: Arc<Shared>,
    consumer: Consumer,
    first_connection: Option<Arc<Connection>>,
    /// Stops the probe server when the worker stops (or is dropped).
    probes: Option<tokio_util::sync::DropGuard>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("consumer_tag", &self.consumer.consumer_tag)
            .finish_non_exhaustive()
    }
}

/// The worker's broker state, for health checks and tests.
#[derive(Clone, Debug)]
pub struct WorkerStatus {
    link: Arc<Link>,
    breaker: Arc<Breaker>,
    fleet: Option<Fleet>,
    gauges: Arc<Gauges>,
    consuming: Arc<AtomicBool>,
}

/// Counters the probes read.
#[derive(Debug, Default)]
struct Gauges {
    /// Deliveries being handled now.
    in_flight: AtomicUsize,
    /// Whether `run_until_stopped` runs.
    running: AtomicBool,
    /// Where `/metrics` is served, once bound.
    metrics_addr: std::sync::Mutex<Option<SocketAddr>>,
}

impl WorkerStatus {
    /// Whether the broker currently blocks this worker's publishing (`connection.blocked`, a
    /// memory or disk alarm).
    pub fn publishing_blocked(&self) -> bool {
        self.link.is_blocked()
    }

    /// Why the breaker stopped the worker taking work, while it does (see [`crate::breaker`]).
    pub fn breaker_open(&self) -> Option<crate::breaker::Open> {
        self.breaker.open()
    }

    /// Deliveries being handled now.
    pub fn in_flight(&self) -> usize {
        self.gauges.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the worker's loops run (`run_until_stopped` has started and not ended).
    pub fn running(&self) -> bool {
        self.gauges.running.load(Ordering::Relaxed)
    }

    /// Whether the worker is subscribed to the input queue (not between connections, not paused
    /// by the breaker).
    pub fn consuming(&self) -> bool {
        self.consuming.load(Ordering::Relaxed)
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served (`METRICS_ADDR`, with the port
    /// bound when it was 0), once serving.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        *self
            .gauges
            .metrics_addr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the fleet's Redis takes writes (`true` without `REDIS_URL`).
    pub async fn shared_state_reachable(&self) -> bool {
        self.shared_state_refusal().await.is_none()
    }

    /// Why the fleet's Redis cannot take the worker's writes, if it cannot.
    pub async fn shared_state_refusal(&self) -> Option<String> {
        match &self.fleet {
            Some(f) => f.cannot_write().await,
            None => None,
        }
    }

    /// Whether the worker has an open connection.
    pub async fn connected(&self) -> bool {
        self.link.current().await.is_some()
    }

    /// Why the worker is not ready to take work, if it is not: not running, not connected,
    /// paused by the breaker, not consuming, blocked by flow control, or Redis unreachable.
    pub async fn not_ready(&self) -> Option<String> {
        if !self.running() {
            return Some("the worker is not running".into());
        }
        if !self.connected().await {
            return Some("not connected to the broker".into());
        }
        if let Some(open) = self.breaker_open() {
            return Some(format!(
                "paused by the breaker: bunq refuses the worker's set-up ({})",
                open.reason
            ));
        }
        if !self.consuming() {
            return Some("not consuming the input queue".into());
        }
        if self.publishing_blocked() {
            return Some("the broker blocks publishing (memory or disk alarm)".into());
        }
        if let Some(why) = self.shared_state_refusal().await {
            return Some(why);
        }
        None
    }
}

impl crate::observe::Probe for WorkerStatus {
    fn snapshot(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = crate::observe::Snapshot> + Send + '_>> {
        Box::pin(async move {
            crate::observe::Snapshot {
                running: self.running(),
                in_flight: self.in_flight(),
                connected: self.connected().await,
                publishing_blocked: self.publishing_blocked(),
            }
        })
    }

    fn not_ready(&self) -> std::pin::Pin<Box<dyn Future<Output = Option<String>> + Send + '_>> {
        Box::pin(WorkerStatus::not_ready(self))
    }
}

impl Worker {
    /// Connects to the broker, declares the topology and loads (or creates) the API context
    /// (see [`bootstrap::load_context`]).
    ///
    /// # Errors
    /// [`StartError`] naming what failed: at start-up an unreachable broker is an error (the
    /// orchestrator retries), unlike later, when the worker reconnects by itself. A topology
    /// conflict names the object and argument.
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        let consumer_tag = format!(
            "{APP_ID}-{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let connect_error = |source| StartError::Connect {
            url: settings.broker.amqp_url_redacted(),
            source,
        };
        let link = Arc::new(
            Link::new(
                &settings.broker.amqp_url,
                consumer_tag.clone(),
                settings.broker.heartbeat_s,
            )
            .map_err(connect_error)?,
        );
        let connection = link.connect().await.map_err(connect_error)?;
        let topology = settings.topology.topology();
        declare(&connection, &topology).await?;

        let bunq = &settings.bunq;
        let client = BunqClient::new(
            bunq.api_url.clone(),
            bunq.user_agent.clone(),
            bunq.http_timeout,
            bunq.verify_response_signature,
        )
        .map_err(StartError::Http)?;
        let fleet = match settings.redis.location() {
            Some(location) => Some(
                Fleet::new(
                    &location,
                    &settings.redis.key_prefix,
                    &settings.redis.rate_limit_scope,
                )
                .map_err(StartError::Redis)?,
            ),
            None => None,
        };
        let policy = settings.retry.policy();
        let never = CancellationToken::new();
        let ctx = bootstrap::load_context(bunq, &client, policy.clone(), &never).await?;
        info!(
            installation_key_sha256 = ctx.public_key_sha256(),
            "bunq API context ready"
        );
        let flow = SessionFlow {
            client,
            ctx: Arc::new(ctx),
            policy,
            register_device: bunq.register_device,
            device_description: bunq.device_description.clone(),
            permitted_ips: bunq
                .permitted_ips
                .iter()
                .map(|s| s.trim().to_owned())
                .collect(),
            pacer: Arc::new(Budget {
                local: Pacer::new(Pace::new(bunq.session_rate_limit, &bunq.api_url)),
                shared: fleet.clone(),
            }),
            // Without a broker consumer timeout a paced delivery may wait for the credential's
            // expiry; a year stands for "no limit" without overflowing clocks.
            max_hold: if settings.broker.consumer_timeout.is_zero() {
                Duration::from_secs(365 * 86_400)
            } else {
                settings.broker.consumer_timeout / 2
            },
        };
        for w in settings.warnings() {
            warn!("{w}");
        }
        let hard_stop = CancellationToken::new();
        let breaker = Arc::new(Breaker::new(settings.breaker_threshold));
        let ctx_staging_key = flow.ctx.staging_key();
        let consumer_key = settings.token.consumer_key()?;
        if let Some(key) = &consumer_key {
            info!(
                alg = key.alg(),
                kid = key.kid(),
                "session tokens are sealed for their consumer (SESSION_TOKEN_ENCRYPTION_KEY)"
            );
        }
        // Replicas must read each other's seals: with Redis they share a key kept there (made
        // by the first replica), so they need not share an installation; one replica alone
        // derives its key from its installation.
        let seal = Arc::new(crate::broker::Seal::new(&match &fleet {
            Some(f) => bootstrap::fleet_seal_key(f).await?,
            None => flow.ctx.bookkeeping_key().to_vec(),
        }));
        let settler = Settler {
            publisher: Publisher::new(link.clone(), settings.broker.publish_confirm_timeout),
            topology: topology.clone(),
            publish_budget: settings.retry.max_elapsed,
            hard_stop,
        };
        let decider = Decider {
            flow,
            breaker: breaker.clone(),
            records: match &fleet {
                Some(f) => Records::Shared(f.clone()),
                None => Records::Memory(Arc::new(Book::default())),
            },
            claim_lease: settings.redis.claim_lease,
            staging: crate::staging::Staging::new(&ctx_staging_key),
            consumer_key,
            delivery_limit: topology.delivery_limit,
            delay_tiers: topology.delay_tiers.clone(),
            stop_work: CancellationToken::new(),
        };
        let mut worker = Self {
            consumer: Consumer {
                link,
                topology,
                prefetch: settings.effective_prefetch().0,
                consumer_tag,
                drain_timeout: settings.shutdown_timeout,
                pause: Some(breaker.paused()),
                consuming: Arc::default(),
            },
            probes: None,
            shared: Arc::new(Shared {
                handled: tokio::sync::broadcast::channel(1024).0,
                max_message_bytes: settings.max_message_bytes,
                seal,
                decider,
                settler,
                gauges: Arc::default(),
            }),
            first_connection: Some(connection),
        };
        if let Some(addr) = settings.metrics_addr.0 {
            let stop = CancellationToken::new();
            let probe: Arc<dyn crate::observe::Probe> = Arc::new(worker.status());
            let bound = crate::observe::serve(addr, probe, stop.clone()).await?;
            *worker
                .shared
                .gauges
                .metrics_addr
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(bound);
            worker.probes = Some(stop.drop_guard());
        }
        Ok(worker)
    }

    /// A handle on the worker's broker state, usable while it runs.
    pub fn status(&self) -> WorkerStatus {
        WorkerStatus {
            link: self.consumer.link.clone(),
            breaker: self.shared.decider.breaker.clone(),
            fleet: match &self.shared.decider.records {
                Records::Shared(f) => Some(f.clone()),
                Records::Memory(_) => None,
            },
            gauges: self.shared.gauges.clone(),
            consuming: self.consumer.consuming.clone(),
        }
    }

    /// Reports every delivery handled from now on (a lagging receiver loses the oldest).
    pub fn handled(&self) -> tokio::sync::broadcast::Receiver<Handled> {
        self.shared.handled.subscribe()
    }

    /// The consumer tag, also the AMQP connection name (`connection_name` client property,
    /// shown by `rabbitmqctl list_connections client_properties`).
    pub fn consumer_tag(&self) -> &str {
        &self.consumer.consumer_tag
    }

    /// Consumes until `shutdown` fires, surviving the broker (see
    /// [`crate::broker::consumer`]), then drains in-flight deliveries within
    /// `SHUTDOWN_TIMEOUT_S`, aborts what is left (the broker redelivers it) and closes the
    /// connection.
    ///
    /// # Errors
    /// [`RunError::Subscribe`] when declaring and subscribing fails
    /// [`MAX_SUBSCRIBE_FAILURES`] times in a row on a live connection: the process should exit
    /// non-zero and be restarted rather than stay alive but deaf.
    pub async fn run_until_stopped(mut self, shutdown: CancellationToken) -> Result<(), RunError> {
        self.shared.gauges.running.store(true, Ordering::Relaxed);
        let stops = Stops {
            shutdown,
            stop_work: self.shared.decider.stop_work.clone(),
            hard_stop: self.shared.settler.hard_stop.clone(),
        };
        let shared = self.shared.clone();
        let result = self
            .consumer
            .run(self.first_connection.take(), &stops, move |d, live| {
                delivery::handle(shared.clone(), d, live)
            })
            .await;
        self.shared.settler.publisher.close().await;
        self.consumer.link.close().await;
        self.shared.gauges.running.store(false, Ordering::Relaxed);
        drop(self.probes.take());
        info!("stopped");
        Ok(result?)
    }
}
