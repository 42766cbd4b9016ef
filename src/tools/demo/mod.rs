//! `demo`: the whole job on this machine, needing only RabbitMQ (`AMQP_URL`).
//!
//! Starts the bunq emulator in-process on a free port with a fresh API context in a temporary
//! directory, runs the worker against its own uniquely named exchanges and queues, publishes one
//! sample event of each kind ([`samples::samples`]), prints each outcome as it arrives, removes
//! what it declared, and reports whether every outcome was the expected one.
//!
//! `samples` (for docker compose) publishes the same events to a running worker's exchange and
//! prints what comes back.

pub mod samples;

use std::{collections::HashMap, path::PathBuf, time::Duration};

use lapin::{
    Channel, Connection, ConnectionProperties,
    options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};
use tokio_util::sync::CancellationToken;

use super::emulator::{self, EmulatorSettings};
use crate::{config::Settings, plan::Settled, telemetry::Chain, worker::Worker};
use samples::{Expect, Sample, Seen};

/// How long the demo waits for all outcomes.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// How long `samples` looks for outcomes when no worker consumes the input queue.
const NO_CONSUMER_DEADLINE: Duration = Duration::from_secs(5);

/// Why the demo or `samples` could not run (as opposed to an unexpected outcome).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The emulator did not start.
    #[error(transparent)]
    Emulator(#[from] emulator::EmulatorError),
    /// The worker did not start.
    #[error(transparent)]
    Start(#[from] crate::worker::StartError),
    /// The broker refused or failed.
    #[error("broker: {0}")]
    Broker(String),
    /// No worker has declared its topology with these settings: nothing to send samples to.
    #[error(
        "exchange '{0}' does not exist: no worker has run with these settings yet. Start the worker first (`cargo run --release`, the same INPUT_EXCHANGE, OUTPUT_EXCHANGE and DEAD_LETTER_EXCHANGE), then run samples again"
    )]
    NoWorker(String),
    /// The temporary directory could not be made.
    #[error("cannot create a temporary directory")]
    TempDir(#[source] std::io::Error),
}

fn broker<E: std::error::Error>(e: E) -> DemoError {
    DemoError::Broker(Chain(&e).to_string())
}

/// Runs the demo with `settings` (only the broker settings are used as given). Returns whether
/// every outcome was the expected one.
///
/// # Errors
/// [`DemoError`] when something it needs could not be set up (the broker, the emulator).
pub async fn run(mut settings: Settings) -> Result<bool, DemoError> {
    let stop = CancellationToken::new();
    let emulator = emulator::start(
        &EmulatorSettings {
            listen: "127.0.0.1:0".parse().expect("a literal socket address"),
            session_rate_limit: None,
            credentials: emulator::CredentialUse::SingleUse,
        },
        stop.clone(),
    )
    .await?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let dir = std::env::temp_dir().join(format!("bunq-session-worker-demo-{run_id}"));
    std::fs::create_dir_all(&dir).map_err(DemoError::TempDir)?;
    configure(&mut settings, &run_id, &emulator.base_url, &dir);
    println!("bunq emulator on {}", emulator.base_url);
    println!(
        "broker {}, exchanges and queues prefixed demo-{run_id}",
        settings.broker.amqp_url_redacted()
    );

    let result = run_with(&settings, &run_id).await;
    stop.cancel();
    let _ = emulator.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Points the settings at the emulator and at this run's own names.
fn configure(s: &mut Settings, run: &str, bunq_url: &str, dir: &std::path::Path) {
    let t = &mut s.topology;
    t.input_exchange = format!("demo-{run}.provisioning");
    t.input_queue = format!("demo-{run}.provision-ready");
    t.output_exchange = format!("demo-{run}.sessions");
    t.dead_letter_exchange = format!("demo-{run}.dead-letter");
    t.dead_letter_queue = format!("demo-{run}.provision-ready.dead-letter");
    t.delayed_retry_delays.0.clear();
    let b = &mut s.bunq;
    b.api_url = bunq_url.parse().expect("the emulator's URL parses");
    b.context_file = PathBuf::from(dir).join("bunq-context.json");
    b.client_private_key = None;
    b.installation_token = None;
    b.server_public_key = None;
    b.session_rate_limit = None;
    s.retry.max_elapsed = Duration::from_secs(20);
    // The demo's worker serves no probes: a real worker on this machine may hold the port.
    s.metrics_addr = crate::config::ListenAddr(None);
    s.shutdown_timeout = Duration::from_secs(5);
}

async fn run_with(settings: &Settings, run: &str) -> Result<bool, DemoError> {
    let worker = Worker::build(settings.clone()).await?;
    let observer = format!("demo-{run}.observer");
    let (conn, channel) = open_observer(settings, &observer).await?;
    let t = &settings.topology;
    let mut handled = worker.handled();
    let stop_worker = CancellationToken::new();
    let worker_task = tokio::spawn(worker.run_until_stopped(stop_worker.clone()));

    let samples = samples::samples();
    let publisher = conn.create_channel().await.map_err(broker)?;
    samples::publish(
        &publisher,
        &t.input_exchange,
        &t.input_routing_key,
        run,
        &samples,
    )
    .await
    .map_err(DemoError::Broker)?;
    println!("published {} sample events; outcomes:", samples.len());

    let by_id: HashMap<String, &Sample> = samples
        .iter()
        .map(|s| (samples::message_id(run, s), s))
        .collect();
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let skipped_id = samples
        .iter()
        .find(|s| s.expect == Expect::Skipped)
        .map(|s| samples::message_id(run, s));
    let mut printed = std::collections::HashSet::new();
    let mut print_if_complete = |id: &str, seen: &HashMap<String, Seen>| {
        if let (Some(s), Some(got)) = (by_id.get(id), seen.get(id))
            && got.complete(s.expect)
            && printed.insert(id.to_owned())
        {
            println!("  {:<22} → {}", s.name, got.describe());
        }
    };
    // The skipped sample leaves no event: the worker's own record says it was handled.
    let skip_watch = async {
        while let Ok(h) = handled.recv().await {
            if Some(&h.message_id) == skipped_id.as_ref() {
                return Some(h.outcome);
            }
        }
        None
    };
    let queues = [observer.as_str()];
    let observe = samples::observe(
        &channel,
        &queues,
        &mut seen,
        DEADLINE,
        |seen| {
            by_id.iter().all(|(id, s)| {
                s.expect == Expect::Skipped || seen.get(id).is_some_and(|g| g.complete(s.expect))
            })
        },
        &mut print_if_complete,
    );
    let (observed, skip) = tokio::join!(observe, tokio::time::timeout(DEADLINE, skip_watch));
    observed.map_err(DemoError::Broker)?;
    let skip_outcome = skip.ok().flatten();
    if let Some(name) = samples
        .iter()
        .find(|s| s.expect == Expect::Skipped)
        .map(|s| s.name)
    {
        match skip_outcome {
            Some(Settled::Skipped) => {
                println!("  {name:<22} → acked, nothing published (skipped)")
            }
            Some(other) => println!("  {name:<22} → {other}"),
            None => println!("  {name:<22} → no outcome in time"),
        }
    }
    stop_worker.cancel();
    let _ = worker_task.await;

    let mut all_ok = skip_outcome == Some(Settled::Skipped);
    for s in &samples {
        if s.expect == Expect::Skipped {
            continue;
        }
        let got = seen
            .remove(&samples::message_id(run, s))
            .unwrap_or_default();
        if !got.matches(s.expect) {
            all_ok = false;
            println!(
                "  UNEXPECTED {}: expected {:?}, got {}",
                s.name,
                s.expect,
                got.describe()
            );
        }
    }
    remove_topology(&channel, settings).await;
    let _ = conn.close(200, "demo done".into()).await;
    Ok(all_ok)
}

/// Connects and declares `queue`, the run's own observer (exclusive, gone when unused), bound
/// as [`bind_observer`] says.
async fn open_observer(
    settings: &Settings,
    queue: &str,
) -> Result<(Connection, Channel), DemoError> {
    let conn = Connection::connect(
        &settings.broker.first_amqp_url(),
        ConnectionProperties::default(),
    )
    .await
    .map_err(broker)?;
    let channel = conn.create_channel().await.map_err(broker)?;
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(600_000));
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            args,
        )
        .await
        .map_err(broker)?;
    bind_observer(&channel, queue, settings).await?;
    Ok((conn, channel))
}

/// Binds the observer queue to the output exchange (`session.#`) and to the dead-letter exchange
/// (`#`), so the dead-letter queue itself is left as it is.
async fn bind_observer(channel: &Channel, queue: &str, s: &Settings) -> Result<(), DemoError> {
    let t = &s.topology;
    for (exchange, key) in [
        (&t.output_exchange, "session.#"),
        (&t.dead_letter_exchange, "#"),
    ] {
        channel
            .queue_bind(
                queue.into(),
                exchange.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker)?;
    }
    Ok(())
}

/// Deletes what the demo's worker declared.
async fn remove_topology(channel: &Channel, s: &Settings) {
    let t = &s.topology;
    let window_queue = t.topology().window_queue_name();
    for q in [&t.input_queue, &t.dead_letter_queue, &window_queue] {
        let _ = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for e in [
        &t.input_exchange,
        &t.output_exchange,
        &t.dead_letter_exchange,
    ] {
        let _ = channel
            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}

/// `samples`: publishes the sample events to the worker configured by `settings` (its input
/// exchange and routing key), prints what comes back on its output exchange and dead-letter
/// queue, and returns whether every outcome was the expected one. The not-ready sample must
/// produce nothing.
///
/// # Errors
/// [`DemoError::Broker`] when the broker cannot be used.
pub async fn publish_samples(settings: &Settings) -> Result<bool, DemoError> {
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let observer = format!("samples-{run}.observer");
    let consumers = worker_consumers(settings).await?;
    let (conn, channel) = open_observer(settings, &observer).await?;
    let t = &settings.topology;
    // With no consumer nothing will come back unless one starts: a short look, not a minute.
    let deadline = if consumers == 0 {
        println!(
            "note: no worker consumes '{}' right now; the samples wait there until one does",
            t.input_queue
        );
        NO_CONSUMER_DEADLINE
    } else {
        DEADLINE
    };
    let samples = samples::samples();
    let publisher = conn.create_channel().await.map_err(broker)?;
    samples::publish(
        &publisher,
        &t.input_exchange,
        &t.input_routing_key,
        &run,
        &samples,
    )
    .await
    .map_err(DemoError::Broker)?;
    println!(
        "published {} sample events to {}; outcomes (waiting up to {} s):",
        samples.len(),
        t.input_exchange,
        deadline.as_secs()
    );
    let mut seen = HashMap::new();
    let expected: Vec<(String, &Sample)> = samples
        .iter()
        .map(|s| (samples::message_id(&run, s), s))
        .collect();
    samples::observe(
        &channel,
        &[observer.as_str()],
        &mut seen,
        deadline,
        |seen| {
            expected.iter().all(|(id, s)| {
                s.expect == Expect::Skipped || seen.get(id).is_some_and(|g| g.complete(s.expect))
            })
        },
        |id, seen| {
            if let (Some((_, s)), Some(got)) =
                (expected.iter().find(|(i, _)| i == id), seen.get(id))
                && got.complete(s.expect)
            {
                println!("  {:<22} → {}", s.name, got.describe());
            }
        },
    )
    .await
    .map_err(DemoError::Broker)?;
    // Samples still in the input queue were not handled: neither skipped nor settled.
    let queued = queued_in(&channel, &t.input_queue).await;
    let mut all_ok = true;
    for (id, s) in &expected {
        let got = seen.remove(id).unwrap_or_default();
        if queued > 0 && got.event.is_none() && got.dead_letter.is_none() {
            all_ok = false;
            println!("  {:<22} → no outcome: still queued?", s.name);
        } else if s.expect == Expect::Skipped && got.matches(s.expect) {
            println!("  {:<22} → no event (skipped, as expected)", s.name);
        } else if !got.matches(s.expect) {
            all_ok = false;
            println!(
                "  UNEXPECTED {}: expected {:?}, got {}",
                s.name,
                s.expect,
                got.describe()
            );
        }
    }
    if queued > 0 {
        println!(
            "{queued} message(s) still wait in '{}': the worker is not consuming or not processing them (is it running with these settings? its /readyz says why not: no API context, breaker open, Redis unreachable)",
            t.input_queue
        );
    }
    let _ = conn.close(200, "samples done".into()).await;
    Ok(all_ok)
}

/// How many consumers the worker's input queue has, once its exchanges are known to exist.
///
/// # Errors
/// [`DemoError::NoWorker`] naming the first of the worker's exchanges that does not exist;
/// [`DemoError::Broker`] when the broker cannot be used.
async fn worker_consumers(settings: &Settings) -> Result<u32, DemoError> {
    let t = &settings.topology;
    let conn = Connection::connect(
        &settings.broker.first_amqp_url(),
        ConnectionProperties::default(),
    )
    .await
    .map_err(broker)?;
    // A passive declare that fails closes its channel: one channel per look.
    for exchange in [
        &t.input_exchange,
        &t.output_exchange,
        &t.dead_letter_exchange,
    ] {
        let ch = conn.create_channel().await.map_err(broker)?;
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        if ch
            .exchange_declare(
                exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                passive,
                FieldTable::default(),
            )
            .await
            .is_err()
        {
            let _ = conn.close(200, "samples".into()).await;
            return Err(DemoError::NoWorker(exchange.clone()));
        }
    }
    let ch = conn.create_channel().await.map_err(broker)?;
    let consumers = passive_queue(&ch, &t.input_queue)
        .await
        .map_or(0, |q| q.consumer_count());
    let _ = conn.close(200, "samples".into()).await;
    Ok(consumers)
}

/// Ready messages in `queue` (0 when it cannot be looked at).
async fn queued_in(channel: &Channel, queue: &str) -> u32 {
    passive_queue(channel, queue)
        .await
        .map_or(0, |q| q.message_count())
}

async fn passive_queue(channel: &Channel, queue: &str) -> Option<lapin::Queue> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()
}
