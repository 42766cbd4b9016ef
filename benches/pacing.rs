//! Pacing benchmark: how much of bunq's session-server budget a fleet uses.
//!
//! ```text
//! cargo bench --bench pacing -- [REPLICAS (3)] [INPUTS (30)] [RUNS (3)]
//! ```
//! Runs REPLICAS workers (in this process, each a worker of its own, sharing one Redis scope as
//! replicas behind one egress IP do) against the bunq emulator allowing one session-server call
//! per second (a sliding window), queues INPUTS credentials at once and times the drain from
//! the first `session.created` to the last, against the ideal of one a second ((INPUTS − 1) s).
//! Two cases: the limit configured at bunq's figure (`BUNQ_SESSION_RATE_LIMIT=1/1s`), and
//! learned (no limit set: from bunq's 429s). It prints the achieved rate as a fraction of the
//! limit (ideal ÷ drain), the 429s drawn, and those of the first wave (within the first second
//! of the first call). Medians over RUNS, with the spread. Needs RabbitMQ at `AMQP_URL` and
//! Redis at `REDIS_URL` (defaults: localhost). A benchmark, not a test: it asserts nothing.

use std::time::{Duration, Instant};

use bunq_session_worker::{
    Worker,
    config::{DelayTiers, ListenAddr, Settings},
    tools::emulator,
};
use clap::Parser;
use futures_util::StreamExt;
use lapin::{BasicProperties, Connection, ConnectionProperties, options::*, types::FieldTable};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    // `cargo bench` passes `--bench`; the rest are ours.
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .filter_map(|a| a.parse().ok())
        .collect();
    let replicas = args.first().copied().unwrap_or(3);
    let inputs = args.get(1).copied().unwrap_or(30);
    let runs = args.get(2).copied().unwrap_or(3);
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    rt.block_on(async {
        for (case, limit) in [("configured 1/1s", Some("1/1s")), ("learned", None)] {
            let mut all = Vec::new();
            for run in 1..=runs {
                let f = one_run(replicas, inputs, limit).await;
                println!("{case}, run {run}: {f:?}");
                all.push(f);
            }
            let col = |get: fn(&Figures) -> f64| {
                let mut v: Vec<f64> = all.iter().map(get).collect();
                v.sort_by(|a, b| a.total_cmp(b));
                (v[v.len() / 2], v[0], v[v.len() - 1])
            };
            let (ratio, rlo, rhi) = col(|f| f.ratio);
            let (drain, dlo, dhi) = col(|f| f.drain_s);
            let (r429, lo429, hi429) = col(|f| f.refused as f64);
            let (w429, wlo, whi) = col(|f| f.first_wave as f64);
            println!(
                "\n{case}: {replicas} replicas, {inputs} credentials, bunq allowing 1/s; median of {runs}, spread min–max\n\
                 rate achieved ÷ limit: {ratio:.3} ({rlo:.3}–{rhi:.3})\n\
                 drain: {drain:.1} s ({dlo:.1}–{dhi:.1}) against an ideal {} s\n\
                 429s: {r429} ({lo429}–{hi429}), in the first wave: {w429} ({wlo}–{whi})\n",
                inputs - 1
            );
        }
    });
    std::process::ExitCode::SUCCESS
}

/// One run's figures.
#[derive(Debug, Clone, Copy)]
struct Figures {
    /// Ideal drain ÷ drain: the achieved rate as a fraction of bunq's.
    ratio: f64,
    drain_s: f64,
    /// 429s bunq gave.
    refused: usize,
    /// Of those, within the first second after the first call.
    first_wave: usize,
}

async fn one_run(replicas: usize, inputs: usize, limit: Option<&str>) -> Figures {
    let amqp_url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let stop = CancellationToken::new();
    let emu = emulator::start(
        &emulator::EmulatorSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            session_rate_limit: Some("1/1s".parse().unwrap()),
            credentials: emulator::CredentialUse::SingleUse,
        },
        stop.clone(),
    )
    .await
    .expect("the emulator starts");
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let dir = std::env::temp_dir().join(format!("bench-pacing-{run}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut s = Settings::try_parse_from(["bunq-session-worker"]).expect("the defaults parse");
    s.broker.amqp_url = SecretString::from(amqp_url.clone());
    s.bunq.api_url = emu.base_url.parse().unwrap();
    s.bunq.context_file = dir.join("ctx.json");
    s.bunq.register_device = false;
    s.bunq.session_rate_limit = limit.map(|l| l.parse().unwrap());
    s.retry.max_elapsed = Duration::from_secs(120);
    s.metrics_addr = ListenAddr(Some("127.0.0.1:0".parse().unwrap()));
    s.redis.url = Some(SecretString::from(redis_url.clone()));
    s.redis.key_prefix = format!("bench-{run}:");
    let t = &mut s.topology;
    t.input_exchange = format!("bench-{run}.in");
    t.input_queue = format!("bench-{run}.q");
    t.output_exchange = format!("bench-{run}.out");
    t.dead_letter_exchange = format!("bench-{run}.dlx");
    t.dead_letter_queue = format!("bench-{run}.dl");
    t.delayed_retry_delays = DelayTiers::default();
    let topology = s.topology.topology();

    let conn = Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ at AMQP_URL");
    let ch = conn.create_channel().await.unwrap();
    let mut workers = Vec::new();
    for _ in 0..replicas {
        let w = Worker::build(s.clone()).await.expect("a worker starts");
        let token = CancellationToken::new();
        workers.push((token.clone(), tokio::spawn(w.run_until_stopped(token))));
    }
    let observer = format!("bench-{run}.observer");
    ch.queue_declare(
        observer.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        observer.as_str().into(),
        topology.output_exchange.as_str().into(),
        "session.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // Every replica consumes before anything is queued.
    loop {
        let q = ch
            .queue_declare(
                topology.input_queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        if q.is_ok_and(|q| q.consumer_count() as usize == replicas) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
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
    let expiry = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let expiry = expiry
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    for i in 0..inputs {
        let body = serde_json::json!({
            "provision_id": i,
            "token_value": format!("sandbox_{run}_{i}"),
            "expiry_time": expiry,
        });
        ch.basic_publish(
            topology.input_exchange.as_str().into(),
            s.topology.input_routing_key.as_str().into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&body).unwrap(),
            BasicProperties::default().with_content_type("application/json".into()),
        )
        .await
        .unwrap();
    }
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let mut created = 0;
    while created < inputs {
        let d = tokio::time::timeout(Duration::from_secs(120), consumer.next())
            .await
            .expect("a session event within 2 minutes")
            .expect("the observer's stream")
            .expect("a delivery");
        if d.properties.kind().as_ref().map(|k| k.as_str()) == Some("session.created") {
            created += 1;
            last = Instant::now();
            first.get_or_insert(last);
        }
    }
    for (token, task) in workers {
        token.cancel();
        let _ = task.await;
    }
    let refused = emu.emulator.rate_limited_after_first_call();
    stop.cancel();
    for q in [
        &topology.input_queue,
        &topology.dead_letter_queue,
        &observer,
    ] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .queue_delete(
            topology.window_queue_name().as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await;
    for e in [
        &topology.input_exchange,
        &topology.output_exchange,
        &topology.dead_letter_exchange,
    ] {
        let _ = ch
            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    remove_keys(&redis_url, &s.redis.key_prefix).await;
    let _ = std::fs::remove_dir_all(&dir);
    let drain = last - first.unwrap_or(last);
    let ideal = (inputs - 1) as f64;
    Figures {
        ratio: ideal / drain.as_secs_f64().max(f64::EPSILON),
        drain_s: drain.as_secs_f64(),
        refused: refused.len(),
        first_wave: refused
            .iter()
            .filter(|t| **t < Duration::from_secs(1))
            .count(),
    }
}

async fn remove_keys(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    for k in keys {
        let _: Result<i64, _> = redis::cmd("DEL").arg(k).query_async(&mut conn).await;
    }
}
