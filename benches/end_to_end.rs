//! End-to-end benchmark: the worker binary against the real broker and the bunq emulator
//! answering at once, each in a process of its own, full protocol (device-server and
//! session-server, both signed, answers verified).
//!
//! ```text
//! cargo bench --bench end_to_end -- [EVENTS (3000)] [RUNS (3)] [STEADY_S (10)]
//! ```
//! Per run: preloads EVENTS events and measures the worker draining them (throughput, CPU per
//! 1,000 events from the worker process's own CPU time, utime + stime in `/proc/<pid>/stat`;
//! latency from publish to session.created), then publishes at a steady 100 events/s for
//! STEADY_S s (latency), and reads the worker's RSS idle (after a restart that loads the saved
//! context, subscribed, before any work) and at its peak. It also times the signing
//! floor (two RSA-2048 signatures per event) with its own aws-lc-rs loop and prints CPU per
//! event as a multiple of it. Medians over the runs, with the spread. The worker runs as
//! deployed (`deploy/kubernetes`): `bunq-session-worker run`, JSON log lines at `info` (to
//! /dev/null), metrics served. Needs RabbitMQ at AMQP_URL (default localhost). A benchmark, not
//! a test: it asserts nothing.
//!
//! With `BENCH_PERF_DATA=FILE` it also records the worker's drain with `perf record` into FILE;
//! `benches/profile_report.py FILE` then prints where the CPU went, by component.

use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::*,
    types::{AMQPValue, FieldTable},
};

/// The binary under test, built by `cargo bench` with the profile the release uses.
const WORKER: &str = env!("CARGO_BIN_EXE_bunq-session-worker");

fn main() -> std::process::ExitCode {
    // `cargo bench` passes `--bench`; the rest are ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    rt.block_on(bench(&args))
}

/// One run's figures.
#[derive(Debug, Default, Clone)]
struct Figures {
    events_per_s: f64,
    cpu_ms_per_event: f64,
    backlog_p50_ms: f64,
    backlog_p99_ms: f64,
    steady_p50_ms: f64,
    steady_p99_ms: f64,
    steady_max_ms: f64,
    idle_rss_mib: f64,
    peak_rss_mib: f64,
    floor_ms: f64,
}

async fn bench(args: &[String]) -> std::process::ExitCode {
    let events: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(3000);
    let runs: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let steady_s: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10);
    let mut all = Vec::new();
    for run in 1..=runs {
        let f = one_run(events, steady_s).await;
        println!("run {run}: {f:?}");
        all.push(f);
    }
    let col = |get: fn(&Figures) -> f64| {
        let mut v: Vec<f64> = all.iter().map(get).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    println!(
        "\nmedian of {runs} runs ({events} queued events, prefetch 64; steady 100 events/s for {steady_s} s), spread min–max:\n"
    );
    println!("| measure | median | spread |");
    println!("|---|---|---|");
    let row = |name: &str, (m, lo, hi): (f64, f64, f64), unit: &str| {
        println!("| {name} | {m:.2} {unit} | {lo:.2}–{hi:.2} |");
    };
    row("throughput (backlog)", col(|f| f.events_per_s), "events/s");
    row("CPU per event", col(|f| f.cpu_ms_per_event), "ms");
    row("CPU per 1,000 events", col(|f| f.cpu_ms_per_event), "s");
    row(
        "signing floor (2 RSA-2048 signatures)",
        col(|f| f.floor_ms),
        "ms",
    );
    row(
        "CPU per event ÷ signing floor",
        col(|f| f.cpu_ms_per_event / f.floor_ms),
        "×",
    );
    row("latency p50 (backlog)", col(|f| f.backlog_p50_ms), "ms");
    row("latency p99 (backlog)", col(|f| f.backlog_p99_ms), "ms");
    row("latency p50 (100 events/s)", col(|f| f.steady_p50_ms), "ms");
    row("latency p99 (100 events/s)", col(|f| f.steady_p99_ms), "ms");
    row("latency max (100 events/s)", col(|f| f.steady_max_ms), "ms");
    row("RSS idle", col(|f| f.idle_rss_mib), "MiB");
    row("RSS peak", col(|f| f.peak_rss_mib), "MiB");

    std::process::ExitCode::SUCCESS
}

/// CPU time of two aws-lc-rs RSA-2048 signatures of a session-server-sized body, ms: the floor
/// per event. Timed in this thread's own CPU time, so other processes taking the core between
/// signatures do not count; measured in every run, beside that run's figures.
fn signing_floor_ms() -> f64 {
    use aws_lc_rs::rsa::{KeyPair, KeySize};
    let key = KeyPair::generate(KeySize::Rsa2048).expect("a key");
    let body = br#"{"secret":"sandbox_5b9e0c7d4a1f2e3b6c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b"}"#;
    let n = 1000;
    let started = thread_cpu_ns();
    for _ in 0..n {
        std::hint::black_box(bunq_session_worker::bunq::signing::sign(&key, body).unwrap());
    }
    2.0 * (thread_cpu_ns() - started) as f64 / 1e6 / n as f64
}

/// This thread's time on a CPU, ns (`/proc/thread-self/schedstat`, first field).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .expect("/proc/thread-self/schedstat (Linux)")
}

struct Names {
    prefix: String,
}

impl Names {
    fn env(&self) -> Vec<(String, String)> {
        let p = &self.prefix;
        [
            ("INPUT_EXCHANGE", format!("{p}.provisioning")),
            ("INPUT_QUEUE", format!("{p}.provision-ready")),
            ("OUTPUT_EXCHANGE", format!("{p}.sessions")),
            ("DEAD_LETTER_EXCHANGE", format!("{p}.dead-letter")),
            ("DEAD_LETTER_QUEUE", format!("{p}.dead-letter-queue")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

fn spawn_worker(env: &[(String, String)]) -> Child {
    Command::new(WORKER)
        .arg("run")
        // The binary's default filter, `info`.
        .env_remove("RUST_LOG")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .spawn()
        .expect("the worker process starts")
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// utime + stime of a process, s.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// A `/proc/<pid>/status` size field (VmRSS, VmHWM), MiB.
fn mem_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

async fn one_run(events: usize, steady_s: u64) -> Figures {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut emulator = Command::new(WORKER)
        .args(["emulator", "--listen", &format!("127.0.0.1:{port}")])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let names = Names {
        prefix: format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
    };
    let dir = std::env::temp_dir().join(&names.prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let mut env = names.env();
    env.extend(
        [
            ("AMQP_URL", url.clone()),
            ("BUNQ_API_URL", format!("http://127.0.0.1:{port}/v1")),
            (
                "BUNQ_CONTEXT_FILE",
                dir.join("ctx.json").display().to_string(),
            ),
            ("PREFETCH", "64".into()),
            // As deployed (deploy/kubernetes): metrics served, JSON log lines at `info`.
            ("METRICS_ADDR", "127.0.0.1:0".into()),
            ("LOG_FORMAT", "json".into()),
            ("DELAYED_RETRY_DELAYS_S", "off".into()),
            ("QUEUE_TYPE", "quorum".into()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    // First start: the worker declares its topology and makes its installation. Second start,
    // as after any restart: it loads that context. Idle is read then: connected, subscribed,
    // nothing to do. Then it stops and the backlog is queued.
    let input_queue = format!("{}.provision-ready", names.prefix);
    let mut w = spawn_worker(&env);
    wait_for_consumer(&conn, &input_queue).await;
    stop(&mut w);
    let mut w = spawn_worker(&env);
    wait_for_consumer(&conn, &input_queue).await;
    let idle_rss = mem_mib(w.id(), "VmRSS");
    stop(&mut w);
    let observer = format!("{}.observer", names.prefix);
    ch.queue_declare(
        observer.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        observer.as_str().into(),
        format!("{}.sessions", names.prefix).as_str().into(),
        "session.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let exchange = format!("{}.provisioning", names.prefix);
    let mut sent: HashMap<String, Instant> = HashMap::new();
    for i in 0..events {
        publish(&ch, &exchange, &format!("b{i}"), &mut sent).await;
    }
    let mut consumer = ch
        .basic_consume(
            observer.as_str().into(),
            "bench".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();

    // The drain is timed from the first session.created to the last, start-up left out.
    let mut w = spawn_worker(&env);
    let pid = w.id();
    let (mut backlog, first) = collect(&mut consumer, &mut sent, events, pid).await;
    let elapsed = first.at.elapsed().as_secs_f64();
    let cpu = cpu_s(pid) - first.cpu_s;
    stop_profiler(first.profiler);
    let drained = backlog.len().saturating_sub(1).max(1);
    // The floor, timed now the worker is idle, beside this run's figures.
    let floor_ms = signing_floor_ms();

    // Steady: 100 events/s.
    let steady = (steady_s * 100) as usize;
    let publisher = {
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let exchange = exchange.clone();
        tokio::spawn(async move {
            let mut sent = HashMap::new();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for i in 0..steady {
                tick.tick().await;
                publish(&ch, &exchange, &format!("s{i}"), &mut sent).await;
            }
            sent
        })
    };
    let mut steady_latencies = Vec::new();
    let mut pending: HashMap<String, Instant> = HashMap::new();
    let mut received: HashMap<String, Instant> = HashMap::new();
    while received.len() < steady {
        let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(30), consumer.next()).await
        else {
            break;
        };
        if let Some(id) = d.properties.correlation_id() {
            received.insert(id.to_string(), Instant::now());
        }
    }
    pending.extend(publisher.await.unwrap());
    for (id, at) in &received {
        if let Some(s) = pending.get(id) {
            steady_latencies.push(at.duration_since(*s).as_secs_f64() * 1000.0);
        }
    }
    let peak_rss = mem_mib(pid, "VmHWM");
    stop(&mut w);
    let _ = emulator.kill();
    let _ = emulator.wait();
    for q in [
        input_queue.clone(),
        format!("{}.dead-letter-queue", names.prefix),
    ] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for e in ["provisioning", "sessions", "dead-letter"] {
        let _ = ch
            .exchange_delete(
                format!("{}.{e}", names.prefix).as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
    let _ = conn.close(200, "bench done".into()).await;
    let _ = std::fs::remove_dir_all(&dir);
    backlog.sort_by(|a, b| a.total_cmp(b));
    steady_latencies.sort_by(|a, b| a.total_cmp(b));
    let pct = |v: &[f64], p: f64| {
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    Figures {
        events_per_s: drained as f64 / elapsed,
        cpu_ms_per_event: cpu * 1000.0 / drained as f64,
        backlog_p50_ms: pct(&backlog, 0.5),
        backlog_p99_ms: pct(&backlog, 0.99),
        steady_p50_ms: pct(&steady_latencies, 0.5),
        steady_p99_ms: pct(&steady_latencies, 0.99),
        steady_max_ms: steady_latencies.last().copied().unwrap_or(f64::NAN),
        idle_rss_mib: idle_rss,
        floor_ms,
        peak_rss_mib: peak_rss,
    }
}

/// Waits until `queue` has a consumer: the worker subscribes once it is connected, its topology
/// is declared and its bunq context is ready.
async fn wait_for_consumer(conn: &Connection, queue: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let ch = conn.create_channel().await.unwrap();
        let consumers = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_or(0, |q| q.consumer_count());
        let _ = ch.close(200, "".into()).await;
        if consumers > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the worker never subscribed to {queue}");
}

async fn publish(ch: &Channel, exchange: &str, id: &str, sent: &mut HashMap<String, Instant>) {
    let expiry = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let body = serde_json::json!({
        "provision_id": id,
        "token_value": format!("sandbox_bench_{}_{id}", uuid::Uuid::new_v4().simple()),
        "expiry_time": expiry.format(&time::format_description::well_known::Rfc3339).unwrap(),
    })
    .to_string();
    let mut headers = FieldTable::default();
    headers.insert("x-bench".into(), AMQPValue::Boolean(true));
    sent.insert(id.to_owned(), Instant::now());
    ch.basic_publish(
        exchange.into(),
        "provision.ready".into(),
        BasicPublishOptions::default(),
        body.as_bytes(),
        BasicProperties::default()
            .with_message_id(id.into())
            .with_headers(headers)
            .with_delivery_mode(2),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// When the first event came back, and the worker's CPU time then.
struct First {
    at: Instant,
    cpu_s: f64,
    /// `perf record` of the worker from then on, when `BENCH_PERF_DATA` names its output file.
    profiler: Option<Child>,
}

/// Starts `perf record` on `pid` (CPU clock at 999 Hz, DWARF call graphs) writing to the file
/// `BENCH_PERF_DATA` names, if it is set. Its sampling costs the worker CPU of its own: a
/// profiled run shows where the time goes, not the table's figures.
fn profile(pid: u32) -> Option<Child> {
    let out = std::env::var("BENCH_PERF_DATA").ok()?;
    let pid = pid.to_string();
    let args = ["record", "-q", "-F", "999", "-e", "cpu-clock"];
    let more = ["--call-graph", "dwarf,16384", "-p", &pid, "-o", &out];
    Command::new("perf")
        .args(args)
        .args(more)
        .stdout(Stdio::null())
        .spawn()
        .inspect_err(|e| eprintln!("bench: cannot run perf (Debian: linux-perf): {e}"))
        .ok()
}

/// Stops a `perf record` so that it writes its file.
fn stop_profiler(perf: Option<Child>) {
    if let Some(mut perf) = perf {
        let _ = Command::new("kill")
            .args(["-INT", &perf.id().to_string()])
            .status();
        let _ = perf.wait();
    }
}

/// Receives `n` events; latencies from publish, ms, and when the first came back.
async fn collect(
    consumer: &mut lapin::Consumer,
    sent: &mut HashMap<String, Instant>,
    n: usize,
    worker_pid: u32,
) -> (Vec<f64>, First) {
    let mut latencies = Vec::with_capacity(n);
    let mut first = None;
    while latencies.len() < n {
        let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(60), consumer.next()).await
        else {
            eprintln!("bench: only {} of {n} events came back", latencies.len());
            break;
        };
        first.get_or_insert_with(|| First {
            at: Instant::now(),
            cpu_s: cpu_s(worker_pid),
            profiler: profile(worker_pid),
        });
        if let Some(s) = d
            .properties
            .correlation_id()
            .as_ref()
            .and_then(|id| sent.remove(id.as_str()))
        {
            latencies.push(s.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let first = first.unwrap_or(First {
        at: Instant::now(),
        cpu_s: cpu_s(worker_pid),
        profiler: None,
    });
    (latencies, first)
}
