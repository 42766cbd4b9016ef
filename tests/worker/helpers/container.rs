//! Where the broker under test is (`AMQP_URL`, a RabbitMQ container started by testcontainers,
//! or localhost), and `rabbitmqctl` for it (inside the container, through the engine, when it
//! is one).

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

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

/// The broker, or why it could not be had: kept either way, so that after a failure (an engine
/// that does not answer, say) every later test fails at once rather than waiting as long again.
static BROKER: tokio::sync::OnceCell<Result<Broker, String>> = tokio::sync::OnceCell::const_new();

/// The broker under test: `AMQP_URL`; else, where a container engine is configured
/// (`DOCKER_HOST`, or Docker's socket), a RabbitMQ container started once by testcontainers
/// and reused by later runs; else localhost.
pub async fn amqp_url() -> String {
    broker().await.url.clone()
}

async fn broker() -> &'static Broker {
    let found = BROKER
        .get_or_init(|| async {
            // Empty counts as unset, as CI systems export secrets they do not have.
            if let Some(url) = std::env::var("AMQP_URL")
                .ok()
                .filter(|u| !u.trim().is_empty())
            {
                return Ok(Broker {
                    url,
                    in_container: false,
                });
            }
            let docker = std::env::var_os("DOCKER_HOST").is_some_and(|h| !h.is_empty())
                || std::path::Path::new("/var/run/docker.sock").exists();
            if !docker {
                return Ok(Broker {
                    url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
                    in_container: false,
                });
            }
            let url = start_broker_container().await?;
            wait_until_accepting(&url).await?;
            // A reused container may keep the memory alarm of a run killed before its drop
            // guard restored it (the flow-control test): every publish would block for ever.
            exec_in_broker_container(vec!["set_vm_memory_high_watermark".into(), "0.4".into()])
                .await
                .map_err(|e| {
                    format!("resetting the memory watermark of {BROKER_CONTAINER}: {e}")
                })?;
            Ok(Broker {
                url,
                in_container: true,
            })
        })
        .await;
    match found {
        Ok(b) => b,
        Err(why) => panic!("{why}"),
    }
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

/// Starts (or finds, reused) [`BROKER_CONTAINER`] and returns its URL, or why it could not.
async fn start_broker_container() -> Result<String, String> {
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
        .map_err(|e| {
            format!(
                "AMQP_URL is unset and a container engine is configured (DOCKER_HOST), but RabbitMQ ({name}:{tag}) did not start in it: {e}. Run `.ci/containers start` (it removes a leftover {BROKER_CONTAINER} it did not make), or set AMQP_URL."
            )
        })?;
    let port = container
        .get_host_port_ipv4(5672)
        .await
        .map_err(|e| format!("the broker container does not publish 5672: {e}"))?;
    // Not `get_host()` for a local engine: inside a container (/.dockerenv) it names the
    // bridge's gateway, which a test on this machine should not need.
    let host = if local {
        "127.0.0.1".to_string()
    } else {
        container
            .get_host()
            .await
            .map_err(|e| format!("the engine's host: {e}"))?
            .to_string()
    };
    eprintln!("tests use RabbitMQ in container {BROKER_CONTAINER} ({name}:{tag}) at {host}:{port}");
    Ok(format!("amqp://guest:guest@{host}:{port}/%2f"))
}

/// Waits until the broker at `url` accepts a connection, or says so after
/// [`REUSED_BROKER_READY`].
async fn wait_until_accepting(url: &str) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + REUSED_BROKER_READY;
    loop {
        match Connection::connect(url, ConnectionProperties::default()).await {
            Ok(c) => {
                let _ = c.close(200, "".into()).await;
                return Ok(());
            }
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!(
                    "the broker container at {url} did not accept connections: {e}"
                ));
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
