//! The worker: consume, open sessions, publish, and only then acknowledge.
//!
//! Ordering rule (at-least-once): a delivery is acked only after its outcome is safe at the
//! broker, i.e. after the publisher confirm of `session.created`, or of `session.failed` and the
//! dead-letter copy. Until then it stays unacked and a crash makes the broker redeliver it.
//! [`settle`] is the one place where an [`Outcome`] becomes broker actions.

use std::{panic::AssertUnwindSafe, sync::Arc, time::Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::{
    BasicProperties, Channel, Connection,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
};
use time::OffsetDateTime;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, error, info, info_span, warn};

use crate::{
    broker::{
        Link, PublishError, Publisher, Topology, TopologyError, declare, link, topology::long,
    },
    bunq::{
        ApiContext, BunqClient, CallError,
        context::{ContextError, NewKeyPair},
    },
    config::Settings,
    events::{self, Decoded, ProvisionReady, SCHEMA_VERSION, SessionCreated, SessionFailed},
    outcome::{Delayed, Failure, FailureReason, Outcome},
    pacing::Pacer,
    retry::RetryPolicy,
    session::{FlowError, SessionFlow},
};

/// Value of the `app_id` property on everything the worker publishes.
pub const APP_ID: &str = "bunq-session-worker";

/// Namespace of the deterministic output `message_id`s (UUID v5, RFC 9562 §5.5).
const MESSAGE_ID_NAMESPACE: uuid::Uuid = uuid::uuid!("5f0c2a8e-3b1d-4e7a-9c6f-1d2e3f4a5b6c");

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The broker is unreachable, refused the login or did not answer in time.
    #[error("cannot connect to the broker at {url}: {detail}")]
    Connect {
        /// `AMQP_URL` without its password.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// A declaration failed (see [`TopologyError`]).
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// The API context could not be loaded or saved.
    #[error(transparent)]
    Context(#[from] ContextError),
    /// `POST /installation` failed.
    #[error("creating the bunq installation failed: {0}")]
    Installation(#[from] CallError),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// Another broker failure during start-up.
    #[error("broker error during start-up: {0}")]
    Broker(#[from] lapin::Error),
}

/// Why a running worker stopped without being asked to.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Declaring the topology and subscribing kept failing on a live connection.
    #[error("cannot subscribe after {attempts} attempts in a row: {last}")]
    Subscribe {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
}

/// Everything a delivery's task needs; shared by all tasks.
struct Shared {
    settings: Settings,
    topology: Topology,
    flow: SessionFlow,
    publisher: Publisher,
    shutdown: CancellationToken,
    known: KnownOutcomes,
    in_flight: InFlight,
}

/// After this many failed attempts in a row to declare the topology and subscribe on a live
/// connection, the worker exits non-zero rather than stay alive but deaf.
pub const MAX_SUBSCRIBE_FAILURES: u32 = 5;

/// A worker with its API context ready and a first connection to the broker.
pub struct Worker {
    shared: Arc<Shared>,
    link: Arc<Link>,
    first_connection: Option<Arc<Connection>>,
    consumer_tag: String,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("consumer_tag", &self.consumer_tag)
            .finish_non_exhaustive()
    }
}

/// The worker's broker state, for health checks and tests.
#[derive(Clone, Debug)]
pub struct WorkerStatus {
    link: Arc<Link>,
}

impl WorkerStatus {
    /// Whether the broker currently blocks this worker's publishing (`connection.blocked`, a
    /// memory or disk alarm).
    pub fn publishing_blocked(&self) -> bool {
        self.link.is_blocked()
    }

    /// Whether the worker has an open connection.
    pub async fn connected(&self) -> bool {
        self.link.current().await.is_some()
    }
}

/// Why a consumer stopped delivering.
enum ConsumerEnd {
    Shutdown,
    Failed(lapin::Error),
    CancelledByBroker,
}

impl Worker {
    /// Connects to the broker, declares the topology and loads (or creates) the API context.
    ///
    /// The API context comes from, in order: the `BUNQ_CLIENT_PRIVATE_KEY` /
    /// `BUNQ_INSTALLATION_TOKEN` / `BUNQ_SERVER_PUBLIC_KEY` settings; `BUNQ_CONTEXT_FILE`; a new
    /// RSA-2048 key and `POST /installation` (retried under the retry policy), saved to
    /// `BUNQ_CONTEXT_FILE` with mode 0600.
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
        let link = Arc::new(
            Link::new(
                &settings.amqp_url,
                consumer_tag.clone(),
                settings.amqp_heartbeat_s,
            )
            .map_err(|detail| StartError::Connect {
                url: settings.amqp_url_redacted(),
                detail,
            })?,
        );
        let connection = link.connect().await.map_err(|detail| StartError::Connect {
            url: settings.amqp_url_redacted(),
            detail,
        })?;
        let topology_channel = connection.create_channel().await?;
        declare(&topology_channel, &Topology::from(&settings)).await?;
        let _ = topology_channel.close(200, "declared".into()).await;

        let client = BunqClient::new(
            settings.bunq_api_url.clone(),
            settings.bunq_user_agent.clone(),
            settings.http_timeout,
            settings.bunq_verify_response_signature,
        )?;
        let policy = RetryPolicy {
            initial_delay: settings.retry_initial_delay,
            max_delay: settings.retry_max_delay,
            max_attempts: settings.retry_max_attempts,
            max_elapsed: settings.retry_max_elapsed,
        };
        let ctx = load_context(&settings, &client, &policy).await?;
        info!(
            installation_key_sha256 = ctx.public_key_sha256(),
            "bunq API context ready"
        );

        let flow = SessionFlow {
            client,
            ctx: Arc::new(ctx),
            policy,
            register_device: settings.bunq_register_device,
            device_description: settings.bunq_device_description.clone(),
            permitted_ips: settings
                .bunq_permitted_ips
                .iter()
                .map(|s| s.trim().to_owned())
                .collect(),
            pacer: Arc::new(Pacer::new(settings.bunq_session_rate_limit)),
            // Without a broker consumer timeout a paced delivery may wait for the credential's
            // expiry; a year stands for "no limit" without overflowing clocks.
            max_hold: if settings.consumer_timeout.is_zero() {
                std::time::Duration::from_secs(365 * 86_400)
            } else {
                settings.consumer_timeout / 2
            },
        };
        for w in settings.warnings() {
            warn!("{w}");
        }
        Ok(Self {
            shared: Arc::new(Shared {
                publisher: Publisher::new(link.clone(), settings.publish_confirm_timeout),
                topology: Topology::from(&settings),
                settings,
                flow,
                shutdown: CancellationToken::new(),
                known: KnownOutcomes::default(),
                in_flight: InFlight::default(),
            }),
            link,
            first_connection: Some(connection),
            consumer_tag,
        })
    }

    /// A handle on the worker's broker state, usable while it runs.
    pub fn status(&self) -> WorkerStatus {
        WorkerStatus {
            link: self.link.clone(),
        }
    }

    /// The consumer tag, also the AMQP connection name (`connection_name` client property,
    /// shown by `rabbitmqctl list_connections client_properties`).
    pub fn consumer_tag(&self) -> &str {
        &self.consumer_tag
    }

    /// Declares the topology, opens a consumer channel with the prefetch and subscribes.
    async fn subscribe(
        &self,
        connection: &Connection,
    ) -> Result<(Channel, lapin::Consumer), String> {
        let s = &self.shared.settings;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        declare(&channel, &self.shared.topology)
            .await
            .map_err(|e| e.to_string())?;
        channel
            .basic_qos(s.effective_prefetch().0, BasicQosOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let consumer = channel
            .basic_consume(
                s.input_queue.as_str().into(),
                self.consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("cannot consume from queue '{}': {e}", s.input_queue))?;
        Ok((channel, consumer))
    }

    /// Consumes until `shutdown` fires, surviving the broker.
    ///
    /// - Connection lost (network cut, broker restart, closed by an operator, missed
    ///   heartbeats): reconnects with backoff ([`Link::reconnect`]), declares the topology again
    ///   and re-subscribes. Deliveries of the dead channel are never acked on the new one: the
    ///   broker redelivers them.
    /// - Consumer cancelled by the broker (queue deleted, `basic.cancel`) or channel closed:
    ///   declares the topology again and re-subscribes.
    /// - Shutdown: cancels the consumer (`basic.cancel`), gives in-flight deliveries
    ///   `SHUTDOWN_TIMEOUT_S` to finish (a delivery waiting to retry bunq is nacked with requeue
    ///   at once), then closes the channels and the connection. Unfinished deliveries stay
    ///   unacked and the broker redelivers them.
    ///
    /// # Errors
    /// [`RunError::Subscribe`] when declaring and subscribing fails
    /// [`MAX_SUBSCRIBE_FAILURES`] times in a row on a live connection: the process should exit
    /// non-zero and be restarted rather than stay alive but deaf.
    pub async fn run_until_stopped(mut self, shutdown: CancellationToken) -> Result<(), RunError> {
        let s = &self.shared.settings;
        let tracker = TaskTracker::new();
        let mut reuse = self.first_connection.take();
        let mut failures = 0u32;
        let mut consumer_channel: Option<Channel> = None;
        let result = 'outer: loop {
            let connection = match reuse.take().filter(|c| c.status().connected()) {
                Some(c) => c,
                None => match self.link.reconnect(&shutdown).await {
                    Some(c) => c,
                    None => break Ok(()),
                },
            };
            let subscribed = tokio::select! {
                r = tokio::time::timeout(link::CONNECT_TIMEOUT, self.subscribe(&connection)) => {
                    r.unwrap_or_else(|_| Err(format!(
                        "declaring and subscribing took longer than {} s",
                        link::CONNECT_TIMEOUT.as_secs()
                    )))
                }
                _ = shutdown.cancelled() => break Ok(()),
            };
            let (channel, mut consumer) = match subscribed {
                Ok(pair) => pair,
                Err(e) => {
                    failures += 1;
                    error!(attempt = failures, error = %e, "cannot subscribe to the input queue");
                    if failures >= MAX_SUBSCRIBE_FAILURES {
                        break Err(RunError::Subscribe {
                            attempts: failures,
                            last: e,
                        });
                    }
                    // 200 ms, 400 ms, 800 ms, 1.6 s: about 3 s before giving up.
                    let delay = (link::RECONNECT_MIN_DELAY * 2u32.pow(failures))
                        .min(link::RECONNECT_MAX_DELAY);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => break Ok(()),
                    }
                    reuse = Some(connection);
                    continue;
                }
            };
            failures = 0;
            info!(
                queue = %s.input_queue,
                prefetch = s.effective_prefetch().0,
                consumer_tag = %self.consumer_tag,
                amqp_url = %self.link.redacted_url(),
                "consuming"
            );
            let end = loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break ConsumerEnd::Shutdown,
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) => {
                            let shared = self.shared.clone();
                            tracker.spawn(async move { handle(shared, delivery).await });
                        }
                        Some(Err(e)) => break ConsumerEnd::Failed(e),
                        None => break ConsumerEnd::CancelledByBroker,
                    },
                }
            };
            match end {
                ConsumerEnd::Shutdown => {
                    consumer_channel = Some(channel);
                    break 'outer Ok(());
                }
                ConsumerEnd::Failed(e) => {
                    warn!(error = %e, "the consumer failed; reconnecting (unacked deliveries will be redelivered)");
                }
                ConsumerEnd::CancelledByBroker => {
                    warn!(queue = %s.input_queue, "the broker cancelled the consumer (queue deleted?); declaring the topology again and re-subscribing");
                }
            }
            let _ = tokio::time::timeout(
                link::CHANNEL_OP_TIMEOUT,
                channel.close(200, "re-subscribing".into()),
            )
            .await;
            reuse = Some(connection);
        };
        info!("stopping: cancelling the consumer and draining in-flight deliveries");
        // Every step is bounded: a stalled connection must not hold the process past
        // SHUTDOWN_TIMEOUT_S, plus at most 3 × CHANNEL_OP_TIMEOUT (2 s) to close.
        let deadline = tokio::time::Instant::now() + s.shutdown_timeout;
        if let Some(channel) = &consumer_channel {
            let cancel = channel.basic_cancel(
                self.consumer_tag.as_str().into(),
                BasicCancelOptions::default(),
            );
            let _ = tokio::time::timeout_at(deadline, cancel).await;
        }
        // Work waiting to retry bunq gives up now; calls under way and publishes finish.
        self.shared.shutdown.cancel();
        tracker.close();
        if tokio::time::timeout_at(deadline, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                unfinished = tracker.len(),
                "shutdown timeout reached; unfinished deliveries stay unacked and will be redelivered"
            );
        }
        if let Some(channel) = consumer_channel {
            let _ = tokio::time::timeout(
                link::CHANNEL_OP_TIMEOUT,
                channel.close(200, "shutdown".into()),
            )
            .await;
        }
        self.shared.publisher.close().await;
        self.link.close().await;
        info!("stopped");
        result
    }
}

/// What this process already knows about an input, by its [`input_identity`].
///
/// AMQP does not confirm acks, so after a connection loss the broker may redeliver an input
/// whose session was already published, and the same credential may arrive twice (webhook and
/// poller): a single-use credential must not go to bunq again. A failure whose dead letter could
/// not be published yet is kept so the retry does not call bunq again; a confirmed failure is
/// forgotten, so an operator can replay its dead letter. Bounded: entries live [`KnownOutcomes::TTL`], at most
/// [`KnownOutcomes::CAPACITY`] are kept; memory only.
#[derive(Default)]
struct KnownOutcomes {
    entries: std::sync::Mutex<std::collections::HashMap<Key, (Instant, Known)>>,
}

/// A remembered outcome.
#[derive(Clone)]
enum Known {
    /// Its `session.created` was confirmed: just ack a repeat.
    Settled,
    /// bunq refused it permanently but the dead letter was not confirmed yet: settle this again.
    Failed(Box<Failure>),
}

impl KnownOutcomes {
    const TTL: std::time::Duration = std::time::Duration::from_secs(900);
    const CAPACITY: usize = 10_000;

    fn forget(&self, key: &Key) {
        let mut m = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(key);
    }

    /// The input's identity mixed with its delayed-retry round: a copy back from a delay queue
    /// is the same input but a new round, to be processed, not recognised.
    fn key(identity: &Key, delivery: &Delivery) -> Key {
        let round = int_header(&delivery.properties, DELAYED_RETRIES_HEADER);
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        ctx.update(identity);
        ctx.update(&round.to_be_bytes());
        let mut k = [0u8; 32];
        k.copy_from_slice(ctx.finish().as_ref());
        k
    }

    fn remember(&self, key: Key, known: Known) {
        let mut m = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, (at, _)| at.elapsed() < Self::TTL);
        if m.len() < Self::CAPACITY || m.contains_key(&key) {
            m.insert(key, (Instant::now(), known));
        }
    }

    fn recall(&self, key: &Key) -> Option<Known> {
        let m = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        m.get(key)
            .filter(|(at, _)| at.elapsed() < Self::TTL)
            .map(|(_, k)| k.clone())
    }
}

/// SHA-256 digest: an input's identity, or a key derived from it.
pub type Key = [u8; 32];

/// Per-input async locks, removed when nobody holds or waits for them.
#[derive(Default)]
struct InFlight {
    locks: std::sync::Mutex<std::collections::HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds an input's lock; releasing it drops the map entry when it is the last user.
struct InFlightGuard<'a> {
    owner: &'a InFlight,
    key: Key,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl InFlight {
    async fn lock(&self, key: Key) -> InFlightGuard<'_> {
        let m = {
            let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key).or_default().clone()
        };
        InFlightGuard {
            owner: self,
            key,
            guard: Some(m.lock_owned().await),
        }
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.owner.locks.lock().unwrap_or_else(|p| p.into_inner());
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

async fn load_context(
    settings: &Settings,
    client: &BunqClient,
    policy: &RetryPolicy,
) -> Result<ApiContext, StartError> {
    if let (Some(key), Some(token), Some(server)) = (
        &settings.bunq_client_private_key,
        &settings.bunq_installation_token,
        &settings.bunq_server_public_key,
    ) {
        return Ok(ApiContext::from_parts(key, token.clone(), server)?);
    }
    let path = &settings.bunq_context_file;
    if let Some(ctx) = ApiContext::load(path)? {
        info!(path = %path.display(), "loaded the bunq API context");
        return Ok(ctx);
    }
    info!(path = %path.display(), "no API context yet: creating a bunq installation");
    let key = NewKeyPair::generate()?;
    let mut schedule = policy.schedule();
    let answer = loop {
        match client.installation(&key.public_key_pem).await {
            Ok(a) => break a,
            Err(e) if matches!(e.class, crate::bunq::RetryClass::Permanent(_)) => {
                return Err(e.into());
            }
            Err(e) => match schedule.next() {
                Some(d) => {
                    warn!(error = %e, "installation failed; retrying");
                    tokio::time::sleep(RetryPolicy::jitter(d)).await;
                }
                None => return Err(e.into()),
            },
        }
    };
    let (token, server_key) = answer.value;
    let ctx = key.into_context(token, &server_key)?;
    ctx.save(path)?;
    info!(path = %path.display(), bunq_response_id = answer.response_id.as_deref().unwrap_or(""), "created and saved the bunq API context");
    Ok(ctx)
}

async fn handle(shared: Arc<Shared>, delivery: Delivery) {
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.as_str().chars().take(100).collect::<String>())
        .unwrap_or_default();
    let span = info_span!(
        "delivery",
        delivery_tag = delivery.delivery_tag,
        message_id = %events::log_safe(&message_id),
        redelivered = delivery.redelivered,
        provision_id = tracing::field::Empty,
    );
    async move {
        let started = Instant::now();
        // One copy of an input at a time in this process: a copy redelivered while the first is
        // still at bunq (its channel died) waits for it, then finds its outcome below.
        // Decoded once: for the identity here and for processing below.
        let decoded = events::decode(&delivery.data, shared.settings.max_message_bytes);
        let identity = identity_of(&delivery.data, &decoded);
        let key = KnownOutcomes::key(&identity, &delivery);
        let _guard = shared.in_flight.lock(key).await;
        let label = match shared.known.recall(&key) {
            Some(Known::Settled) => {
                // Its session is already safe at the broker: no second bunq call, no second
                // event.
                info!("this credential's session.created was already confirmed (a redelivery or a repeat); acking");
                ack(&delivery).await;
                "already_settled"
            }
            Some(Known::Failed(failure)) => {
                info!("this input already failed; settling that failure again without calling bunq");
                settle(&shared, delivery, &identity, key, Outcome::Failed(failure)).await
            }
            None => {
                let outcome = process_guarded(&shared, &delivery, decoded).await;
                settle(&shared, delivery, &identity, key, outcome).await
            }
        };
        let latency_ms = started.elapsed().as_millis() as u64;
        metrics::counter!("bunq_session_worker_deliveries_total", "outcome" => label).increment(1);
        metrics::histogram!("bunq_session_worker_delivery_seconds")
            .record(started.elapsed().as_secs_f64());
        info!(outcome = label, latency_ms, "delivery handled");
    }
    .instrument(span)
    .await
}

/// [`process`], with a panic turned into a dead letter: a bug must not strand a delivery unacked
/// with its prefetch slot held.
async fn process_guarded(
    shared: &Shared,
    delivery: &Delivery,
    decoded: Result<Decoded, events::InputError>,
) -> Outcome {
    match AssertUnwindSafe(process(shared, delivery, decoded))
        .catch_unwind()
        .await
    {
        Ok(outcome) => outcome,
        Err(_) => {
            error!("internal error while handling the delivery; dead-lettering it");
            Outcome::Failed(Box::new(Failure {
                reason: FailureReason::UnexpectedResponse,
                detail: "internal error in the worker while handling this delivery (a bug: please report it with the worker's logs)".into(),
                attempts: 0,
                event: None,
            }))
        }
    }
}

/// Decodes and, for a ready credential, opens the session. Makes no broker call.
async fn process(
    shared: &Shared,
    delivery: &Delivery,
    decoded: Result<Decoded, events::InputError>,
) -> Outcome {
    let ready = match decoded {
        Err(e) => {
            return Outcome::Failed(Box::new(Failure {
                reason: e.reason(),
                detail: e.to_string(),
                attempts: 0,
                event: None,
            }));
        }
        Ok(Decoded::NotReady(n)) => {
            if let Some(id) = &n.provision_id {
                tracing::Span::current().record("provision_id", events::log_safe(&id.to_string()));
            }
            info!(why = %n.why, "provision not ready; skipping");
            return Outcome::Skipped(n);
        }
        Ok(Decoded::Ready(r)) => r,
    };
    tracing::Span::current().record(
        "provision_id",
        events::log_safe(&ready.provision_id.to_string()),
    );
    match shared.flow.open(&ready, &shared.shutdown).await {
        Ok(opened) => {
            let s = opened.session;
            let created_at = s
                .token_created
                .as_deref()
                .and_then(events::parse_time)
                .unwrap_or_else(OffsetDateTime::now_utc);
            let timeout = s.session_timeout_seconds;
            Outcome::Created(Box::new(SessionCreated {
                schema_version: SCHEMA_VERSION,
                provision_id: ready.provision_id.clone(),
                external_uuid: ready.external_uuid.clone(),
                credential_id: ready.credential_id,
                session_id: s.session_id,
                session_token: s.token,
                user_id: s.user_id,
                user_api_key_id: s.user_api_key_id,
                user_type: s.user_type,
                session_timeout_seconds: timeout,
                // bunq's numbers are input too: an absurd timeout or date must not overflow.
                expires_at: created_at
                    .checked_add(time::Duration::seconds(
                        i64::try_from(timeout).unwrap_or(i64::MAX),
                    ))
                    .unwrap_or(time::PrimitiveDateTime::MAX.assume_utc()),
                created_at,
                installation_key_sha256: shared.flow.ctx.public_key_sha256().to_owned(),
            }))
        }
        Err(FlowError::Cancelled) => Outcome::Abandoned,
        Err(FlowError::Failed(mut f)) => {
            let props = &delivery.properties;
            let retries_so_far = int_header(props, DELAYED_RETRIES_HEADER);
            f.attempts = f.attempts.saturating_add(int_header(props, CALLS_HEADER));
            if let Some(first) = str_header(props, FIRST_ATTEMPT_HEADER)
                .as_deref()
                .and_then(events::parse_time)
            {
                f.first_attempt_at = f.first_attempt_at.min(first);
            }
            if f.reason == FailureReason::RetriesExhausted
                && let Some(delay) = shared
                    .settings
                    .delayed_retry_delays
                    .0
                    .get(retries_so_far as usize)
                    .copied()
            {
                let back_at = OffsetDateTime::now_utc()
                    + time::Duration::try_from(delay).unwrap_or(time::Duration::MAX);
                match ready.expiry_time {
                    Some(expiry) if back_at >= expiry => {
                        f.reason = FailureReason::CredentialExpired;
                        f.detail = format!(
                            "{}; no delayed retry: the credential expires at {} before it would come back",
                            f.detail,
                            events::rfc3339(expiry)
                        );
                    }
                    _ => {
                        return Outcome::Delayed(Box::new(Delayed {
                            queue: shared.topology.delay_queue_name(delay),
                            delay,
                            retries: retries_so_far + 1,
                            calls: f.attempts,
                            detail: f.detail,
                            first_attempt_at: f.first_attempt_at,
                        }));
                    }
                }
            }
            Outcome::Failed(Box::new(Failure {
                reason: f.reason,
                detail: f.detail.clone(),
                attempts: f.attempts,
                event: Some(failed_event(&ready, f)),
            }))
        }
    }
}

fn failed_event(ready: &ProvisionReady, f: crate::session::FlowFailure) -> SessionFailed {
    SessionFailed {
        schema_version: SCHEMA_VERSION,
        provision_id: ready.provision_id.clone(),
        external_uuid: ready.external_uuid.clone(),
        credential_id: ready.credential_id,
        reason: f.reason,
        http_status: f.http_status,
        error_description: f.error_description,
        attempts: f.attempts,
        first_attempt_at: f.first_attempt_at,
        last_attempt_at: f.last_attempt_at,
    }
}

/// What identifies an input, 32 bytes: for a ready credential, the SHA-256 of its
/// `token_value` (the same single-use credential forwarded by a webhook receiver and by a poller,
/// in differently shaped JSON, is one input); otherwise the SHA-256 of the body.
pub fn input_identity(body: &[u8], max_bytes: usize) -> Key {
    identity_of(body, &events::decode(body, max_bytes))
}

/// [`input_identity`] of a body already decoded.
fn identity_of(body: &[u8], decoded: &Result<Decoded, events::InputError>) -> Key {
    use secrecy::ExposeSecret;
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    match decoded {
        Ok(Decoded::Ready(r)) => {
            ctx.update(b"credential\0");
            ctx.update(r.token_value.expose_secret().trim().as_bytes());
        }
        _ => {
            ctx.update(b"body\0");
            ctx.update(body);
        }
    }
    let mut k = [0u8; 32];
    k.copy_from_slice(ctx.finish().as_ref());
    k
}

/// A deterministic `message_id`: UUID v5 (RFC 9562 §5.5) of the event type and the input's
/// [`input_identity`]. The same input, or the same credential in another shape, always gives the
/// same id, so consumers can drop duplicates caused by redelivery.
pub fn output_message_id(event_type: &str, identity: &Key) -> String {
    let mut name = Vec::with_capacity(event_type.len() + 1 + 32);
    name.extend_from_slice(event_type.as_bytes());
    name.push(b':');
    name.extend_from_slice(identity);
    uuid::Uuid::new_v5(&MESSAGE_ID_NAMESPACE, &name).to_string()
}

fn output_properties(
    delivery: &Delivery,
    identity: &Key,
    event_type: &str,
    provision_id: &str,
) -> BasicProperties {
    let input = &delivery.properties;
    let correlation_id = input
        .correlation_id()
        .clone()
        .or_else(|| input.message_id().clone())
        .unwrap_or_else(|| ShortString::from(provision_id.to_owned()));
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_type(event_type.into())
        .with_message_id(output_message_id(event_type, identity).into())
        .with_correlation_id(correlation_id)
        .with_timestamp(OffsetDateTime::now_utc().unix_timestamp().max(0) as u64)
        .with_app_id(APP_ID.into());
    if let Some(tp) = input
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("traceparent"))
    {
        let mut headers = FieldTable::default();
        headers.insert("traceparent".into(), tp.clone());
        props = props.with_headers(headers);
    }
    props
}

/// Properties for a copy of the input that the worker publishes itself (dead letter, delayed
/// retry): the input's, with `headers` set, minus what would make the copy vanish or be
/// refused. RabbitMQ's own dead-lettering drops `expiration` likewise
/// (<https://www.rabbitmq.com/docs/dlx>); a `user_id` that is not the worker's own login makes
/// the broker refuse the publish (<https://www.rabbitmq.com/docs/validated-user-id>), so it is
/// kept as the header `x-original-user-id`.
fn copy_properties(input: &BasicProperties, mut headers: FieldTable) -> BasicProperties {
    if let Some(user) = input.user_id() {
        headers.insert("x-original-user-id".into(), long(user.as_str()));
    }
    let mut props = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    macro_rules! keep {
        ($($get:ident => $with:ident),*) => {
            $(if let Some(v) = input.$get().clone() { props = props.$with(v); })*
        };
    }
    keep!(content_type => with_content_type, content_encoding => with_content_encoding,
          priority => with_priority, correlation_id => with_correlation_id,
          reply_to => with_reply_to, message_id => with_message_id, timestamp => with_timestamp,
          kind => with_type, app_id => with_app_id, cluster_id => with_cluster_id);
    props
}

/// The dead-letter copy's properties: the input's plus the `x-error-*` headers.
fn dead_letter_properties(delivery: &Delivery, failure: &Failure) -> BasicProperties {
    let (exchange, routing_key) = original_route(delivery);
    let mut headers = producer_headers(&delivery.properties);
    headers.insert("x-error-reason".into(), long(failure.reason.as_str()));
    headers.insert("x-error-detail".into(), long(&failure.detail));
    headers.insert(
        "x-attempts".into(),
        AMQPValue::LongLongInt(i64::from(failure.attempts)),
    );
    headers.insert("x-original-exchange".into(), long(&exchange));
    headers.insert("x-original-routing-key".into(), long(&routing_key));
    headers.insert(
        "x-failed-at".into(),
        long(&events::rfc3339(OffsetDateTime::now_utc())),
    );
    copy_properties(&delivery.properties, headers)
}

/// Header with the exchange an input was first published to, kept across delayed retries.
pub const ORIGINAL_EXCHANGE_HEADER: &str = "x-bunq-original-exchange";
/// Header with the routing key an input was first published with, kept across delayed retries.
pub const ORIGINAL_ROUTING_KEY_HEADER: &str = "x-bunq-original-routing-key";
/// Header with the first bunq call's time (RFC 3339), kept across delayed retries.
pub const FIRST_ATTEMPT_HEADER: &str = "x-bunq-first-attempt-at";

/// A string header (long or short string).
fn str_header(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Where the producer published the input: its own exchange and routing key, or, for a copy
/// back from a delay queue, those recorded when it was parked.
fn original_route(delivery: &Delivery) -> (String, String) {
    let p = &delivery.properties;
    (
        str_header(p, ORIGINAL_EXCHANGE_HEADER).unwrap_or_else(|| delivery.exchange.to_string()),
        str_header(p, ORIGINAL_ROUTING_KEY_HEADER)
            .unwrap_or_else(|| delivery.routing_key.to_string()),
    )
}

/// The input's headers as its producer set them: without the worker's own bookkeeping
/// (`x-bunq-*`) and without the broker's dead-lettering history (`x-death`, `x-first-death-*`,
/// `x-last-death-*`) from a delay queue, so a dead letter tells its own story and can be
/// replayed as a fresh input.
fn producer_headers(props: &BasicProperties) -> FieldTable {
    let mut out = FieldTable::default();
    if let Some(h) = props.headers() {
        for (k, v) in h.inner() {
            let k_str = k.as_str();
            if k_str.starts_with("x-bunq-")
                || k_str == "x-death"
                || k_str.starts_with("x-first-death-")
                || k_str.starts_with("x-last-death-")
            {
                continue;
            }
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// Header counting the delayed retries an input has been through.
pub const DELAYED_RETRIES_HEADER: &str = "x-bunq-delayed-retries";
/// Header carrying the bunq calls made for an input before its latest delayed retry.
pub const CALLS_HEADER: &str = "x-bunq-calls";

/// An integer header of the delivery (any AMQP integer type, or a decimal string), else 0.
fn int_header(props: &BasicProperties, name: &str) -> u32 {
    let Some(v) = props.headers().as_ref().and_then(|h| h.inner().get(name)) else {
        return 0;
    };
    let n: Option<i64> = match v {
        AMQPValue::ShortShortInt(i) => Some((*i).into()),
        AMQPValue::ShortShortUInt(i) => Some((*i).into()),
        AMQPValue::ShortInt(i) => Some((*i).into()),
        AMQPValue::ShortUInt(i) => Some((*i).into()),
        AMQPValue::LongInt(i) => Some((*i).into()),
        AMQPValue::LongUInt(i) => Some((*i).into()),
        AMQPValue::LongLongInt(i) => Some(*i),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes())
            .ok()
            .and_then(|s| s.trim().parse().ok()),
        _ => None,
    };
    n.and_then(|n| u32::try_from(n).ok()).unwrap_or(0)
}

/// How long [`publish_confirmed`] keeps trying.
#[derive(Clone, Copy, Debug)]
enum Patience {
    /// Until confirmed; only the shutdown timeout ends it. For `session.created`: giving up
    /// would lose a session whose single-use credential is spent.
    UntilConfirmed,
    /// Until `RETRY_MAX_ELAPSED_S` has passed; then the caller falls back.
    Budget,
}

/// Publishes until the broker confirms, or until `patience` runs out (returns `false`).
///
/// Each failure is logged; waits follow the retry policy's schedule, then stay at its cap. When
/// the broker says an exchange does not exist (404, e.g. deleted by an operator) or returns the
/// message as unroutable, the topology is declared again before the next try.
async fn publish_confirmed(
    shared: &Shared,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
    patience: Patience,
) -> bool {
    let policy = &shared.flow.policy;
    let started = Instant::now();
    let mut schedule = policy.schedule();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let err = match shared
            .publisher
            .publish(exchange, routing_key, body, props.clone())
            .await
        {
            Ok(()) => return true,
            Err(e) => e,
        };
        let hint = match &err {
            PublishError::Returned { .. } => " (bind a queue to it)",
            _ => "",
        };
        error!(exchange, routing_key, attempt, error = %err, "publish not confirmed{hint}; the delivery stays unacked");
        metrics::counter!("bunq_session_worker_publish_failures_total", "exchange" => exchange.to_owned())
            .increment(1);
        // A missing exchange (404) or a copy routed nowhere (the worker's own dead-letter or
        // delay queue deleted): declaring the topology again repairs what is the worker's.
        if (err.is_not_found() || matches!(err, PublishError::Returned { .. }))
            && let Err(e) = shared.publisher.redeclare(&shared.topology).await
        {
            error!(error = %e, "declaring the topology again failed");
        }
        let delay = RetryPolicy::jitter(schedule.next().unwrap_or(policy.max_delay))
            .max(policy.initial_delay);
        if matches!(patience, Patience::Budget)
            && started.elapsed().saturating_add(delay) > policy.max_elapsed
        {
            return false;
        }
        tokio::time::sleep(delay).await;
    }
}

async fn nack_requeue(delivery: &Delivery) {
    let requeue = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    match delivery.acker.nack(requeue).await {
        Ok(true) => {}
        Ok(false) => {
            warn!("nack impossible: the delivery's channel is gone; the broker redelivers it")
        }
        Err(e) => warn!(error = %e, "nack failed; the broker redelivers when the channel closes"),
    }
}

/// Acks a delivery whose outcome is confirmed.
async fn ack(delivery: &Delivery) {
    // lapin answers Ok(false) when the delivery's channel is gone: that is not an ack.
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        Ok(false) => error!(
            "ack impossible after a confirmed outcome: the delivery's channel is gone; the broker will redeliver it and it will be acked without a second bunq call"
        ),
        Err(e) => {
            error!(error = %e, "ack failed after a confirmed outcome; the broker will redeliver it and it will be acked without a second bunq call")
        }
    }
}

/// Turns an outcome into broker actions: publish and wait for confirms, then ack (or nack with
/// requeue). Never acks before the outcome is confirmed at the broker. Returns what it did, for
/// the log line and the metric: `created`, `skipped`, `dead_lettered`, `delayed`, `requeued`
/// or `abandoned`.
///
/// - created: `session.created` until confirmed, then ack;
/// - skipped: ack;
/// - failed: the dead-letter copy within the retry budget (else the failure is remembered and
///   the delivery requeued: nothing is lost, and bunq is not called again for it); then
///   `session.failed` within the budget (if it cannot be routed the dead letter still records
///   the failure, and an error is logged); then ack;
/// - delayed: the copy in the delay queue within the budget (else requeued), then ack;
/// - abandoned: nack with requeue.
async fn settle(
    shared: &Shared,
    delivery: Delivery,
    identity: &Key,
    key: Key,
    outcome: Outcome,
) -> &'static str {
    let s = &shared.settings;
    let label = match outcome {
        Outcome::Created(event) => {
            let body = serde_json::to_vec(&*event).expect("SessionCreated always serialises");
            let props = output_properties(
                &delivery,
                identity,
                "session.created",
                &event.provision_id.to_string(),
            );
            publish_confirmed(
                shared,
                &s.output_exchange,
                "session.created",
                &body,
                props,
                Patience::UntilConfirmed,
            )
            .await;
            info!(
                session_id = event.session_id,
                user_id = event.user_id,
                "session.created confirmed"
            );
            // Remembered before the ack: AMQP does not confirm acks, so even a sent ack may be
            // lost with the connection and the input come back.
            shared.known.remember(key, Known::Settled);
            "created"
        }
        Outcome::Skipped(_) => "skipped",
        Outcome::Failed(failure) => {
            let props = dead_letter_properties(&delivery, &failure);
            let kept = publish_confirmed(
                shared,
                &s.dead_letter_exchange,
                delivery.routing_key.as_str(),
                &delivery.data,
                props,
                Patience::Budget,
            )
            .await;
            if !kept {
                error!(reason = %failure.reason, "the dead-letter copy was not confirmed within RETRY_MAX_ELAPSED_S; requeueing the delivery");
                shared.known.remember(key, Known::Failed(failure));
                nack_requeue(&delivery).await;
                return "requeued";
            }
            shared.known.forget(&key);
            warn!(reason = %failure.reason, detail = %failure.detail, attempts = failure.attempts, "dead-lettered");
            if let Some(event) = &failure.event {
                let body = serde_json::to_vec(event).expect("SessionFailed always serialises");
                let props = output_properties(
                    &delivery,
                    identity,
                    "session.failed",
                    &event.provision_id.to_string(),
                );
                let sent = publish_confirmed(
                    shared,
                    &s.output_exchange,
                    "session.failed",
                    &body,
                    props,
                    Patience::Budget,
                )
                .await;
                if !sent {
                    error!(reason = %failure.reason, "session.failed was not confirmed within RETRY_MAX_ELAPSED_S; the dead letter records the failure");
                }
            }
            "dead_lettered"
        }
        Outcome::Delayed(d) => {
            let (exchange, routing_key) = original_route(&delivery);
            let mut headers = producer_headers(&delivery.properties);
            headers.insert(
                DELAYED_RETRIES_HEADER.into(),
                AMQPValue::LongLongInt(d.retries.into()),
            );
            headers.insert(CALLS_HEADER.into(), AMQPValue::LongLongInt(d.calls.into()));
            headers.insert(ORIGINAL_EXCHANGE_HEADER.into(), long(&exchange));
            headers.insert(ORIGINAL_ROUTING_KEY_HEADER.into(), long(&routing_key));
            headers.insert(
                FIRST_ATTEMPT_HEADER.into(),
                long(&events::rfc3339(d.first_attempt_at)),
            );
            let props = copy_properties(&delivery.properties, headers);
            // Through the default exchange straight into the tier's delay queue; its TTL
            // dead-letters the copy back to the input queue.
            let parked = publish_confirmed(
                shared,
                "",
                &d.queue,
                &delivery.data,
                props,
                Patience::Budget,
            )
            .await;
            if !parked {
                error!(queue = %d.queue, "the delayed-retry copy was not confirmed within RETRY_MAX_ELAPSED_S; requeueing the delivery");
                nack_requeue(&delivery).await;
                return "requeued";
            }
            warn!(
                queue = %d.queue,
                delay_s = d.delay.as_secs(),
                delayed_retry = d.retries,
                calls = d.calls,
                detail = %d.detail,
                "retries spent; parked for a delayed retry"
            );
            "delayed"
        }
        Outcome::Abandoned => {
            nack_requeue(&delivery).await;
            return "abandoned";
        }
    };
    ack(&delivery).await;
    label
}
