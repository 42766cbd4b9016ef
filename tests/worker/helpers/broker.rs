//! The broker under test: where it is, connecting to it, the queues a test declares and reads,
//! and deleting a test's queues and exchanges afterwards.

use std::time::Duration;

use lapin::{
    Channel, Connection, ConnectionProperties, ExchangeKind,
    options::*,
    types::{AMQPValue, FieldTable},
};

use super::{Names, TestApp};

/// `x-expires` of the queues a test declares itself (observer queues): the broker deletes them
/// this long after their last consumer is gone, even when the test died before `cleanup`.
pub const OBSERVER_QUEUE_EXPIRES_MS: i32 = 60_000;

/// How long the drop guard of a test that did not reach `cleanup` may spend deleting its broker
/// objects (connecting included), so a dead broker cannot hang the test.
const LEFTOVER_DELETE_TIMEOUT: Duration = Duration::from_secs(10);

/// The RabbitMQ image started when `AMQP_URL` is unset and a container engine answers, unless
/// `TEST_RABBITMQ_IMAGE` names another (pinned: the testcontainers module's default tag is
/// end-of-life).
pub const RABBITMQ_IMAGE: (&str, &str) = ("rabbitmq", "4.1.4-management");

/// The tests' broker container: one, started by the first test binary that needs it and reused
/// by the others and by later runs (`.ci/containers stop` removes it).
pub const BROKER_CONTAINER: &str = "bunq-session-worker-test-rabbitmq";

/// How long a reused broker container may take to accept connections: reuse starts a stopped
/// container without waiting for its broker.
const REUSED_BROKER_READY: Duration = Duration::from_secs(60);

/// Where the broker under test is.
struct Broker {
    url: String,
    /// In [`BROKER_CONTAINER`], started through the container engine.
    in_container: bool,
}

static BROKER: tokio::sync::OnceCell<Broker> = tokio::sync::OnceCell::const_new();

/// The broker under test: `AMQP_URL`; else, where a container engine is configured
/// (`DOCKER_HOST`, or Docker's socket), a RabbitMQ container started once by testcontainers
/// and reused by later runs; else localhost.
pub async fn amqp_url() -> String {
    broker().await.url.clone()
}

async fn broker() -> &'static Broker {
    BROKER
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("AMQP_URL") {
                return Broker {
                    url,
                    in_container: false,
                };
            }
            let docker = std::env::var_os("DOCKER_HOST").is_some()
                || std::path::Path::new("/var/run/docker.sock").exists();
            if !docker {
                return Broker {
                    url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
                    in_container: false,
                };
            }
            let url = start_broker_container().await;
            wait_until_accepting(&url).await;
            Broker {
                url,
                in_container: true,
            }
        })
        .await
}

/// The image of the tests' broker: `TEST_RABBITMQ_IMAGE` (`name:tag`, as `.ci/containers`
/// sets it for the image it builds from Debian's rabbitmq-server) or [`RABBITMQ_IMAGE`].
fn rabbitmq_image() -> (String, String) {
    match std::env::var("TEST_RABBITMQ_IMAGE") {
        Ok(image) => match image.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => (name.into(), tag.into()),
            _ => (image, "latest".into()),
        },
        Err(_) => (RABBITMQ_IMAGE.0.into(), RABBITMQ_IMAGE.1.into()),
    }
}

/// Whether the container engine runs on this machine (a Unix socket), so that a port published
/// on its loopback is ours to reach.
fn engine_is_local() -> bool {
    std::env::var("DOCKER_HOST").map_or(true, |h| h.starts_with("unix://"))
}

/// Starts (or finds, reused) [`BROKER_CONTAINER`] and returns its URL.
async fn start_broker_container() -> String {
    use std::collections::HashMap;
    use testcontainers::{
        GenericImage, ImageExt, ReuseDirective,
        bollard::models::PortBinding,
        core::{IntoContainerPort, WaitFor},
        runners::AsyncRunner,
    };
    let (name, tag) = rabbitmq_image();
    let local = engine_is_local();
    let container = GenericImage::new(name.as_str(), tag.as_str())
        .with_exposed_port(5672.tcp())
        .with_wait_for(WaitFor::message_on_stdout("Server startup complete"))
        .with_startup_timeout(Duration::from_secs(120))
        .with_container_name(BROKER_CONTAINER)
        .with_reuse(ReuseDirective::Always)
        // An explicit binding, to loopback where the engine is on this machine: podman (4.3)
        // reports a publish-all port without its host IP, which testcontainers cannot map.
        .with_host_config_modifier(move |hc| {
            hc.publish_all_ports = Some(false);
            hc.port_bindings = Some(HashMap::from([(
                "5672/tcp".to_string(),
                Some(vec![PortBinding {
                    host_ip: Some(if local { "127.0.0.1" } else { "0.0.0.0" }.to_string()),
                    host_port: Some(String::new()),
                }]),
            )]));
        })
        .start()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "AMQP_URL is unset and a container engine is configured (DOCKER_HOST), but RabbitMQ ({name}:{tag}) did not start in it: {e}. Run `.ci/containers start`, or set AMQP_URL."
            )
        });
    let port = container
        .get_host_port_ipv4(5672)
        .await
        .expect("the broker container publishes 5672");
    // Not `get_host()` for a local engine: inside a container (/.dockerenv) it names the
    // bridge's gateway, which a test on this machine should not need.
    let host = if local {
        "127.0.0.1".to_string()
    } else {
        container
            .get_host()
            .await
            .expect("the engine's host")
            .to_string()
    };
    eprintln!("tests use RabbitMQ in container {BROKER_CONTAINER} ({name}:{tag}) at {host}:{port}");
    format!("amqp://guest:guest@{host}:{port}/%2f")
}

/// Waits until the broker at `url` accepts a connection, or fails the test after
/// [`REUSED_BROKER_READY`].
async fn wait_until_accepting(url: &str) {
    let deadline = tokio::time::Instant::now() + REUSED_BROKER_READY;
    loop {
        match Connection::connect(url, ConnectionProperties::default()).await {
            Ok(c) => {
                let _ = c.close(200, "".into()).await;
                return;
            }
            Err(e) if tokio::time::Instant::now() >= deadline => {
                panic!("the broker container at {url} did not accept connections: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// How a test runs `rabbitmqctl` against the broker under test (for what AMQP cannot do:
/// listing every queue, raising an alarm).
#[derive(Clone, Copy, Debug)]
pub enum Rabbitmqctl {
    /// Inside [`BROKER_CONTAINER`], through the container engine's exec.
    InContainer,
    /// The machine's own `rabbitmqctl`: the broker is the one on this machine's 5672.
    Local,
}

/// How to run `rabbitmqctl` against the broker under test; None when there is no way to (a
/// broker elsewhere, or no `rabbitmqctl` here).
pub async fn rabbitmqctl() -> Option<Rabbitmqctl> {
    let broker = broker().await;
    if broker.in_container {
        return Some(Rabbitmqctl::InContainer);
    }
    let local = [
        "@127.0.0.1:5672/",
        "@localhost:5672/",
        "@127.0.0.1/",
        "@localhost/",
    ]
    .iter()
    .any(|h| broker.url.contains(h));
    let installed = std::process::Command::new("rabbitmqctl")
        .arg("--help")
        .output()
        .is_ok();
    (local && installed).then_some(Rabbitmqctl::Local)
}

impl Rabbitmqctl {
    /// Runs `rabbitmqctl ARGS` and waits for it (about a second): its standard output, or what
    /// it said when it failed. Blocks the calling thread, so it also serves drop guards.
    pub fn run(self, args: &[&str]) -> Result<String, String> {
        match self {
            Rabbitmqctl::Local => {
                let out = std::process::Command::new("rabbitmqctl")
                    .args(args)
                    .output()
                    .map_err(|e| format!("rabbitmqctl does not run: {e}"))?;
                if out.status.success() {
                    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
                } else {
                    Err(String::from_utf8_lossy(&out.stderr).into_owned())
                }
            }
            // A thread and runtime of its own: the caller may be a test's runtime, or a drop
            // guard while that runtime unwinds.
            Rabbitmqctl::InContainer => {
                let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
                std::thread::spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())?
                        .block_on(exec_in_broker_container(args))
                })
                .join()
                .map_err(|_| "the rabbitmqctl thread panicked".to_string())?
            }
        }
    }
}

/// `rabbitmqctl ARGS` inside [`BROKER_CONTAINER`] through the engine's API (the same for
/// Docker and podman), with a client of its own.
async fn exec_in_broker_container(args: Vec<String>) -> Result<String, String> {
    use futures_util::StreamExt;
    use testcontainers::bollard::{
        Docker,
        container::LogOutput,
        exec::{CreateExecOptions, StartExecResults},
    };
    let docker = Docker::connect_with_defaults().map_err(|e| e.to_string())?;
    let mut cmd = vec!["rabbitmqctl".to_string()];
    cmd.extend(args);
    let exec = docker
        .create_exec(
            BROKER_CONTAINER,
            CreateExecOptions {
                cmd: Some(cmd),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("exec in {BROKER_CONTAINER}: {e}"))?;
    let StartExecResults::Attached { mut output, .. } = docker
        .start_exec(&exec.id, None)
        .await
        .map_err(|e| format!("exec in {BROKER_CONTAINER}: {e}"))?
    else {
        return Err("exec started detached".into());
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    while let Some(chunk) = output.next().await {
        match chunk.map_err(|e| format!("exec output: {e}"))? {
            LogOutput::StdOut { message } => stdout.extend_from_slice(&message),
            LogOutput::StdErr { message } => stderr.extend_from_slice(&message),
            _ => {}
        }
    }
    let code = docker
        .inspect_exec(&exec.id)
        .await
        .map_err(|e| format!("exec in {BROKER_CONTAINER}: {e}"))?
        .exit_code;
    if code == Some(0) {
        Ok(String::from_utf8_lossy(&stdout).into_owned())
    } else {
        Err(format!(
            "exit code {code:?}: {}",
            String::from_utf8_lossy(&stderr)
        ))
    }
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

/// Declares the output exchange and the observer queue, bound to it with `output_binding`
/// (None: no binding).
pub(super) async fn declare_observer(
    channel: &Channel,
    names: &Names,
    output_binding: Option<&str>,
) {
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
}

impl TestApp {
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

    /// This test's queues: the worker's input, dead-letter, delay and window queues, the
    /// observer queue and `extra_queues`.
    pub(super) fn queues(&self) -> Vec<String> {
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
        queues.push(topology.window_queue_name());
        queues.extend(self.extra_queues.iter().cloned());
        queues.sort();
        queues.dedup();
        queues
    }

    /// This test's exchanges: input, output and dead-letter.
    pub(super) fn exchanges(&self) -> Vec<String> {
        let n = &self.names;
        vec![
            n.input_exchange.clone(),
            n.output_exchange.clone(),
            n.dead_letter_exchange.clone(),
        ]
    }
}

/// Deletes the broker objects of a test that did not reach `cleanup`, on a thread of its own
/// with its own runtime and connection (the test's runtime may be unwinding), bounded by
/// `LEFTOVER_DELETE_TIMEOUT`; returns when it is done.
pub(super) fn delete_leftovers(url: String, queues: Vec<String>, exchanges: Vec<String>) {
    let deleter = std::thread::spawn(move || {
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

/// Deletes `queues` and `exchanges`, ignoring what is already gone; a failure closes its channel,
/// so the next deletion gets a new one.
pub(super) async fn delete_broker_objects(
    conn: &Connection,
    queues: &[String],
    exchanges: &[String],
) {
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
