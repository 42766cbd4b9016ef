//! Test harness: a real RabbitMQ (from `AMQP_URL`), a wiremock fake of bunq that checks headers
//! and signatures and signs its answers, and a worker with its own `test-<uuid>` names.

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bunq_session_worker::{
    Settings, Worker,
    config::{DelayTiers, ListenAddr},
    worker::{RunError, StartError},
};
use clap::Parser;
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind,
    message::Delivery,
    options::*,
    types::{AMQPValue, FieldTable},
};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wiremock::{Mock, MockServer, Request, matchers};

#[path = "../support/fake_bunq.rs"]
mod fake_bunq;
pub use fake_bunq::*;

/// How long a test waits for an expected event before failing.
pub const WAIT: Duration = Duration::from_secs(20);

/// `x-expires` of the queues a test declares itself (observer queues): the broker deletes them
/// this long after their last consumer is gone, even when the test died before `cleanup`.
pub const OBSERVER_QUEUE_EXPIRES_MS: i32 = 60_000;

/// How long the drop guard of a test that did not reach `cleanup` may spend deleting its broker
/// objects (connecting included), so a dead broker cannot hang the test.
const LEFTOVER_DELETE_TIMEOUT: Duration = Duration::from_secs(10);

/// The RabbitMQ image started when `AMQP_URL` is unset and a Docker engine exists (pinned: the
/// testcontainers module's default tag is end-of-life).
pub const RABBITMQ_IMAGE: (&str, &str) = ("rabbitmq", "4.1.4-management");

static BROKER_URL: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();

/// The broker under test: `AMQP_URL`; else, where a Docker engine answers, a RabbitMQ container
/// started once by testcontainers and reused by later runs; else localhost.
pub async fn amqp_url() -> String {
    BROKER_URL
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("AMQP_URL") {
                return url;
            }
            let docker = std::env::var_os("DOCKER_HOST").is_some()
                || std::path::Path::new("/var/run/docker.sock").exists();
            if !docker {
                return "amqp://guest:guest@127.0.0.1:5672/%2f".into();
            }
            use testcontainers::{
                GenericImage, ImageExt, ReuseDirective, core::WaitFor, runners::AsyncRunner,
            };
            let container = GenericImage::new(RABBITMQ_IMAGE.0, RABBITMQ_IMAGE.1)
                .with_wait_for(WaitFor::message_on_stdout("Server startup complete"))
                .with_container_name("bunq-session-worker-test-rabbitmq")
                .with_reuse(ReuseDirective::Always)
                .start()
                .await
                .expect("AMQP_URL is unset and a Docker engine exists, but RabbitMQ did not start in it");
            let host = container.get_host().await.unwrap();
            let port = container.get_host_port_ipv4(5672).await.unwrap();
            format!("amqp://guest:guest@{host}:{port}/%2f")
        })
        .await
        .clone()
}

/// Connects to the broker or fails the test with a message that says what to do.
pub async fn connect() -> Connection {
    let url = amqp_url().await;
    match tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!(
            "cannot connect to RabbitMQ at AMQP_URL ({url}): {e}. Start it (e.g. `rabbitmq-server -detached`) or set AMQP_URL."
        ),
        Err(_) => panic!("connecting to RabbitMQ at AMQP_URL ({url}) timed out"),
    }
}

/// Polls `cond` until it holds or `WAIT` passes.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub const SESSION_TOKEN_API_KEY: &str =
    "f981bd6d26b8328b89e85a774c404bb02e72d18062dab92bb59c9e59a1c5958f";

pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// Names of one test's broker objects.
#[derive(Clone, Debug)]
pub struct Names {
    pub input_exchange: String,
    pub input_queue: String,
    pub output_exchange: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub output_queue: String,
}

impl Names {
    pub fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let id = &id[..12];
        Self {
            input_exchange: format!("test-{id}.provisioning"),
            input_queue: format!("test-{id}.provision-ready"),
            output_exchange: format!("test-{id}.sessions"),
            dead_letter_exchange: format!("test-{id}.dead-letter"),
            dead_letter_queue: format!("test-{id}.provision-ready.dead-letter"),
            output_queue: format!("test-{id}.sessions-observer"),
        }
    }
}

/// The settings of one test's worker: the defaults, then this test's names, the fake bunq at
/// `bunq_url`, its own context file, the broker, and fast retries without delayed retry.
fn test_settings(names: &Names, bunq_url: &str, context_file: &Path, amqp_url: &str) -> Settings {
    let mut s = Settings::try_parse_from(["bunq-session-worker"]).expect("the defaults parse");
    s.broker.amqp_url = SecretString::from(amqp_url.to_owned());
    s.bunq.api_url = format!("{bunq_url}/v1")
        .parse()
        .expect("the fake bunq's URL");
    s.bunq.context_file = context_file.to_path_buf();
    let t = &mut s.topology;
    t.input_exchange = names.input_exchange.clone();
    t.input_queue = names.input_queue.clone();
    t.output_exchange = names.output_exchange.clone();
    t.dead_letter_exchange = names.dead_letter_exchange.clone();
    t.dead_letter_queue = names.dead_letter_queue.clone();
    // Tests of the in-process outcome; the delayed-retry tests turn it on.
    t.delayed_retry_delays = DelayTiers::default();
    s.retry.initial_delay = Duration::from_millis(10);
    s.retry.max_delay = Duration::from_millis(50);
    s.bunq.http_timeout = Duration::from_millis(2000);
    // Every worker serves its probes and metrics on a free port of its own.
    s.metrics_addr = ListenAddr(Some("127.0.0.1:0".parse().expect("a literal address")));
    s
}

/// Arguments of a queue a test declares for itself: it expires when unused, so it goes away
/// even when the test dies before `cleanup`.
pub fn observer_queue_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-expires".into(),
        AMQPValue::LongInt(OBSERVER_QUEUE_EXPIRES_MS),
    );
    args
}

/// One test's world.
///
/// `cleanup` deletes the test's broker objects and files; a `TestApp` dropped without it (the
/// test panicked) deletes them from its drop guard, best effort and bounded in time.
pub struct TestApp {
    pub names: Names,
    pub bunq: MockServer,
    pub state: Arc<BunqState>,
    pub conn: Connection,
    pub channel: Channel,
    pub dir: PathBuf,
    pub context_file: PathBuf,
    /// The broker's own URL (the worker's `settings.broker.amqp_url` may point at a proxy).
    pub amqp_url: String,
    /// The worker's settings: change fields before `start_worker`, e.g.
    /// `app.settings.retry.max_attempts = 1`.
    pub settings: Settings,
    outputs: Option<Consumer>,
    dead_letters: Option<Consumer>,
    worker: Option<(CancellationToken, JoinHandle<Result<(), RunError>>)>,
    pub status: Option<bunq_session_worker::worker::WorkerStatus>,
    /// More queues the test declared itself (delay queues follow from the settings), deleted
    /// by `cleanup` and the drop guard.
    pub extra_queues: Vec<String>,
    /// Set by `cleanup`: the drop guard has nothing left to do.
    cleaned_up: bool,
}

impl TestApp {
    /// Broker connection, names, fake bunq with installation mounted, and an observer queue
    /// bound to the output exchange with `output_binding` (None: no binding).
    pub async fn new_with_binding(output_binding: Option<&str>) -> Self {
        // `RUST_LOG=info cargo test -- --nocapture` shows the worker's logs.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let names = Names::new();
        let bunq = MockServer::start().await;
        let state = BunqState::new();
        Mock::given(matchers::method("POST"))
            .and(matchers::path("/v1/installation"))
            .respond_with(Installation(state.clone()))
            .mount(&bunq)
            .await;
        let conn = connect().await;
        let channel = conn.create_channel().await.unwrap();
        channel
            .exchange_declare(
                names.output_exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_declare(
                names.output_queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                observer_queue_args(),
            )
            .await
            .unwrap();
        if let Some(b) = output_binding {
            channel
                .queue_bind(
                    names.output_queue.as_str().into(),
                    names.output_exchange.as_str().into(),
                    b.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
        let dir = std::env::temp_dir().join(format!("bsw-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let context_file = dir.join("bunq-context.json");
        let amqp_url = amqp_url().await;
        let settings = test_settings(&names, &bunq.uri(), &context_file, &amqp_url);
        Self {
            names,
            bunq,
            state,
            conn,
            channel,
            dir,
            context_file,
            amqp_url,
            settings,
            outputs: None,
            dead_letters: None,
            worker: None,
            status: None,
            extra_queues: Vec::new(),
            cleaned_up: false,
        }
    }

    pub async fn new() -> Self {
        Self::new_with_binding(Some("session.#")).await
    }

    /// The binary's flags for this test, rendered from `settings`: the broker, the fake bunq,
    /// the context file, the names and the fast retries. Only those: pass what else a test
    /// changes to the binary as environment variables (`Running::start(&app.args(), env)`).
    ///
    /// # Panics
    /// When these flags would not give the binary `settings` (a test changed another typed
    /// field and then started the binary, which would silently not see it).
    pub fn args(&self) -> Vec<String> {
        let s = &self.settings;
        let t = &s.topology;
        let ms = |d: Duration| d.as_millis().to_string();
        let delays = if t.delayed_retry_delays.0.is_empty() {
            "off".to_owned()
        } else {
            t.delayed_retry_delays
                .0
                .iter()
                .map(|d| d.as_secs().to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let args: Vec<String> = [
            ("--amqp-url", s.broker.amqp_url.expose_secret().to_owned()),
            ("--bunq-api-url", s.bunq.api_url.to_string()),
            (
                "--bunq-context-file",
                s.bunq.context_file.to_str().unwrap().to_owned(),
            ),
            ("--input-exchange", t.input_exchange.clone()),
            ("--input-queue", t.input_queue.clone()),
            ("--output-exchange", t.output_exchange.clone()),
            ("--dead-letter-exchange", t.dead_letter_exchange.clone()),
            ("--dead-letter-queue", t.dead_letter_queue.clone()),
            ("--retry-initial-delay-ms", ms(s.retry.initial_delay)),
            ("--retry-max-delay-ms", ms(s.retry.max_delay)),
            ("--http-timeout-ms", ms(s.bunq.http_timeout)),
            ("--delayed-retry-delays-s", delays),
            (
                "--metrics-addr",
                s.metrics_addr
                    .0
                    .map_or_else(|| "off".to_owned(), |a| a.to_string()),
            ),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_owned(), value])
        .collect();
        let rendered = Settings::try_parse_from(
            std::iter::once("bunq-session-worker".to_owned()).chain(args.iter().cloned()),
        )
        .expect("the rendered flags parse");
        assert_eq!(
            format!("{rendered:?}"),
            format!("{s:?}"),
            "the binary's flags do not carry every setting this test changed: pass the others as environment variables"
        );
        args
    }

    /// Validates `settings` and builds a worker from a copy of them.
    pub async fn build_worker(&self) -> Result<Worker, StartError> {
        self.settings.validate().unwrap();
        Worker::build(self.settings.clone()).await
    }

    /// Builds and runs a worker in this process.
    pub async fn start_worker(&mut self) {
        let worker = self.build_worker().await.expect("worker starts");
        self.status = Some(worker.status());
        let token = CancellationToken::new();
        let handle = tokio::spawn(worker.run_until_stopped(token.clone()));
        self.worker = Some((token, handle));
    }

    /// Cancels the worker and returns its result.
    pub async fn stop_worker(&mut self) -> Result<(), RunError> {
        let (token, handle) = self.worker.take().expect("a worker is running");
        token.cancel();
        tokio::time::timeout(WAIT, handle)
            .await
            .expect("worker stops in time")
            .expect("worker task does not panic")
    }

    pub fn worker_is_running(&self) -> bool {
        self.worker.as_ref().is_some_and(|(_, h)| !h.is_finished())
    }

    /// Mounts session-server (and device-server) answering `body` for requests whose `secret`
    /// is `token` (any token when None).
    pub async fn mount(&self, path: &str, token: Option<&str>, resp: Signed, times: Option<u64>) {
        let mut m = Mock::given(matchers::method("POST"))
            .and(matchers::path(format!("/v1/{path}")))
            .and(ValidBunqRequest(self.state.clone()));
        if let Some(t) = token {
            m = m.and(matchers::body_partial_json(json!({ "secret": t })));
        }
        let mut m = m.respond_with(resp);
        if let Some(n) = times {
            m = m.up_to_n_times(n);
        }
        m.mount(&self.bunq).await;
    }

    pub fn answer(&self, status: u16, body: &str) -> Signed {
        Signed {
            state: self.state.clone(),
            status,
            body: body.as_bytes().to_vec(),
            content_type: "application/json",
            sign: (200..300).contains(&status),
            bad_signature: false,
            delay: None,
        }
    }

    /// device-server answering 200 for any token.
    pub async fn mount_device_server_ok(&self) {
        self.mount(
            "device-server",
            None,
            self.answer(200, r#"{"Response":[{"Id":{"id":77}}]}"#),
            None,
        )
        .await;
    }

    /// device-server 200 and session-server answering with the UserApiKey fixture for any token.
    pub async fn mount_happy_path(&self) {
        self.mount_device_server_ok().await;
        self.mount(
            "session-server",
            None,
            self.answer(200, &fixture("session-server.user-api-key.json")),
            None,
        )
        .await;
    }

    pub async fn publish(&self, body: &[u8], props: BasicProperties) {
        self.publish_to("provision.ready", body, props).await
    }

    pub async fn publish_to(&self, routing_key: &str, body: &[u8], props: BasicProperties) {
        let c = self
            .channel
            .basic_publish(
                self.names.input_exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(c.take_message().is_none(), "input publish was unroutable");
    }

    pub async fn publish_json(&self, v: &Value) {
        self.publish(v.to_string().as_bytes(), BasicProperties::default())
            .await
    }

    async fn next_from(consumer: &mut Consumer, what: &str) -> Delivery {
        let d = tokio::time::timeout(WAIT, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("consumer open")
            .expect("delivery");
        d.ack(BasicAckOptions::default()).await.unwrap();
        d
    }

    async fn consumer(&self, queue: &str) -> Consumer {
        let ch = self.conn.create_channel().await.unwrap();
        ch.basic_consume(
            queue.into(),
            format!("observer-{}", uuid::Uuid::new_v4()).as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap()
    }

    /// The next message on the output exchange (session.created or session.failed).
    pub async fn next_output(&mut self) -> Delivery {
        if self.outputs.is_none() {
            self.outputs = Some(self.consumer(&self.names.output_queue.clone()).await);
        }
        Self::next_from(self.outputs.as_mut().unwrap(), "an output event").await
    }

    /// The next message on the output exchange if one comes within `within` (for a bounded look
    /// that nothing more is published).
    pub async fn next_output_within(&mut self, within: Duration) -> Option<Delivery> {
        if self.outputs.is_none() {
            self.outputs = Some(self.consumer(&self.names.output_queue.clone()).await);
        }
        let d = tokio::time::timeout(within, self.outputs.as_mut().unwrap().next())
            .await
            .ok()??
            .ok()?;
        d.ack(BasicAckOptions::default()).await.unwrap();
        Some(d)
    }

    /// The next message in the dead-letter queue.
    pub async fn next_dead_letter(&mut self) -> Delivery {
        if self.dead_letters.is_none() {
            self.dead_letters = Some(self.consumer(&self.names.dead_letter_queue.clone()).await);
        }
        Self::next_from(self.dead_letters.as_mut().unwrap(), "a dead letter").await
    }

    /// Declares `queue` as a durable classic queue with these extra string arguments: an
    /// operator's queue that conflicts with what the worker declares.
    pub async fn declare_classic_queue(&self, queue: &str, extra: &[(&str, &str)]) {
        let mut args = FieldTable::default();
        for (k, v) in [("x-queue-type", "classic")].iter().chain(extra) {
            args.insert(
                (*k).into(),
                AMQPValue::LongString(v.as_bytes().to_vec().into()),
            );
        }
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .unwrap();
    }

    /// Waits until the fake bunq has received a session-server call.
    pub async fn wait_for_session_server_call(&self) {
        eventually("session-server called", || async {
            !self.requests("session-server").await.is_empty()
        })
        .await;
    }

    /// A passive `queue.declare` on a channel of its own: the queue's state, or None when it
    /// does not exist (a failed passive declare closes its channel).
    async fn inspect_queue(&self, queue: &str) -> Option<lapin::Queue> {
        let ch = self.conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .ok();
        let _ = ch.close(200, "".into()).await;
        q
    }

    /// Consumers on a queue (0 when it does not exist).
    pub async fn consumer_count(&self, queue: &str) -> u32 {
        self.inspect_queue(queue)
            .await
            .map_or(0, |q| q.consumer_count())
    }

    /// Whether a queue exists.
    pub async fn queue_exists(&self, queue: &str) -> bool {
        self.inspect_queue(queue).await.is_some()
    }

    /// Ready-message count of a queue (unacked messages are not counted).
    pub async fn ready_count(&self, queue: &str) -> u32 {
        self.inspect_queue(queue)
            .await
            .unwrap_or_else(|| panic!("queue {queue} exists"))
            .message_count()
    }

    /// Requests the fake bunq received on `path` (e.g. "session-server").
    pub async fn requests(&self, path: &str) -> Vec<Request> {
        self.bunq
            .received_requests()
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.url.path() == format!("/v1/{path}"))
            .collect()
    }

    /// This test's queues: the worker's input, dead-letter and delay queues, the observer
    /// queue and `extra_queues`.
    fn queues(&self) -> Vec<String> {
        let n = &self.names;
        let topology = self.settings.topology.topology();
        let mut queues = vec![
            n.input_queue.clone(),
            n.dead_letter_queue.clone(),
            n.output_queue.clone(),
        ];
        queues.extend(
            topology
                .delay_tiers
                .iter()
                .map(|d| topology.delay_queue_name(*d)),
        );
        queues.extend(self.extra_queues.iter().cloned());
        queues.sort();
        queues.dedup();
        queues
    }

    /// This test's exchanges: input, output and dead-letter.
    fn exchanges(&self) -> Vec<String> {
        let n = &self.names;
        vec![
            n.input_exchange.clone(),
            n.output_exchange.clone(),
            n.dead_letter_exchange.clone(),
        ]
    }

    /// Deletes this test's broker objects and files.
    pub async fn cleanup(mut self) {
        if self.worker.is_some() {
            let _ = self.stop_worker().await;
        }
        delete_broker_objects(&self.conn, &self.queues(), &self.exchanges()).await;
        let _ = self.conn.close(200, "".into()).await;
        let _ = std::fs::remove_dir_all(&self.dir);
        self.cleaned_up = true;
    }
}

/// The drop guard: a test that did not reach `cleanup` (it panicked) still leaves no queue,
/// exchange or file behind. The deletion runs on a thread of its own with its own runtime and
/// connection (the test's runtime may be unwinding), bounded by `LEFTOVER_DELETE_TIMEOUT`.
impl Drop for TestApp {
    fn drop(&mut self) {
        if self.cleaned_up {
            return;
        }
        if let Some((token, _)) = &self.worker {
            token.cancel();
        }
        let (url, queues, exchanges, dir) = (
            self.amqp_url.clone(),
            self.queues(),
            self.exchanges(),
            self.dir.clone(),
        );
        let deleter = std::thread::spawn(move || {
            let _ = std::fs::remove_dir_all(&dir);
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let deleted = rt.block_on(async {
                tokio::time::timeout(LEFTOVER_DELETE_TIMEOUT, async {
                    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
                    delete_broker_objects(&conn, &queues, &exchanges).await;
                    let _ = conn.close(200, "".into()).await;
                    Ok::<_, lapin::Error>(())
                })
                .await
            });
            match deleted {
                Ok(Ok(())) => eprintln!(
                    "test ended without cleanup: deleted its queues {queues:?} and exchanges {exchanges:?}"
                ),
                Ok(Err(e)) => {
                    eprintln!("test ended without cleanup; deleting its broker objects failed: {e}")
                }
                Err(_) => eprintln!(
                    "test ended without cleanup; deleting its broker objects timed out after {LEFTOVER_DELETE_TIMEOUT:?}"
                ),
            }
            rt.shutdown_timeout(Duration::from_secs(1));
        });
        let _ = deleter.join();
    }
}

/// Deletes `queues` and `exchanges`, ignoring what is already gone; a failure closes its channel,
/// so the next deletion gets a new one.
async fn delete_broker_objects(conn: &Connection, queues: &[String], exchanges: &[String]) {
    let mut ch: Option<Channel> = None;
    for q in queues {
        let Some(c) = channel_of(conn, &mut ch).await else {
            return;
        };
        if c.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .is_err()
        {
            ch = None;
        }
    }
    for e in exchanges {
        let Some(c) = channel_of(conn, &mut ch).await else {
            return;
        };
        if c.exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .is_err()
        {
            ch = None;
        }
    }
}

/// The open channel in `slot`, or a new one.
async fn channel_of<'a>(conn: &Connection, slot: &'a mut Option<Channel>) -> Option<&'a Channel> {
    if slot.is_none() {
        *slot = Some(conn.create_channel().await.ok()?);
    }
    slot.as_ref()
}

/// An error as the binary prints it: the message and its causes.
pub fn chain(e: &dyn std::error::Error) -> String {
    bunq_session_worker::telemetry::Chain(e).to_string()
}

/// A header of a delivery as text (long or short string), or an integer's decimal form.
pub fn header(d: &Delivery, name: &str) -> Option<String> {
    let v = d.properties.headers().as_ref()?.inner().get(name)?.clone();
    Some(match v {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).unwrap(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::LongLongInt(i) => i.to_string(),
        AMQPValue::LongInt(i) => i.to_string(),
        other => format!("{other:?}"),
    })
}

pub fn body_json(d: &Delivery) -> Value {
    serde_json::from_slice(&d.data).expect("output body is JSON")
}

/// A slim event with a fresh token, expiring in an hour.
pub fn slim(provision_id: i64, token: &str) -> Value {
    let expiry = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    json!({
        "provision_id": provision_id,
        "token_value": token,
        "credential_id": provision_id + 1000,
        "external_uuid": format!("ext-{provision_id}"),
        "expiry_time": expiry.format(&time::format_description::well_known::Rfc3339).unwrap(),
    })
}

pub fn type_of(d: &Delivery) -> String {
    d.properties
        .kind()
        .as_ref()
        .map(|k| k.to_string())
        .unwrap_or_default()
}
