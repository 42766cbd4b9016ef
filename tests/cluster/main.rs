//! Rolling restarts of a three-node RabbitMQ cluster under load (issue 19): two worker replicas,
//! `AMQP_URL` naming all three nodes, a quorum input queue, Redis for the fleet's state, and a
//! few hundred credentials flowing while each node is stopped and started in turn. After it:
//! every credential has exactly one session (the emulator counts calls: its credentials are
//! reusable, so a second call would open a second session), `session.created` for each (a
//! repeat carries the same `message_id`), nothing dead-lettered, nothing left in the queues.
//! Then the first node is killed (kill -9) and started again, the work still flowing.
//!
//! Needs the cluster of `.ci/cluster start` (its `CLUSTER_AMQP_URL`, and `CLUSTER_DIR` for the
//! Erlang cookie, default `target/cluster`), so it is ignored unless asked for:
//! `eval "$(.ci/cluster start)"; cargo test --test cluster -- --ignored --nocapture`.
//! Not run by `.ci/run` yet: 3 runs of 4 passed here (rolling restart 6–8 s, the killed node
//! back in 6–7 s, one repeated event in one run); in the fourth, starting the killed node again
//! did not finish within 120 s (`.ci/cluster` now prints the node's log).

use std::{
    collections::HashMap,
    process::Command,
    time::{Duration, Instant},
};

use bunq_session_worker::{
    Worker,
    config::{DelayTiers, ListenAddr, Settings},
    tools::emulator,
};
use clap::Parser;
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, options::*, types::AMQPValue,
    types::FieldTable,
};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

const INPUTS: usize = 200;

fn cluster_dir() -> String {
    std::env::var("CLUSTER_DIR")
        .unwrap_or_else(|_| format!("{}/target/cluster", env!("CARGO_MANIFEST_DIR")))
}

/// `rabbitmqctl -n rc<node>@localhost ARGS` with the cluster's cookie.
fn ctl(node: &str, args: &[&str]) {
    let out = Command::new("/usr/lib/rabbitmq/bin/rabbitmqctl")
        .env("HOME", cluster_dir())
        .args(["-n", &format!("rc{node}@localhost")])
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl -n rc{node}@localhost {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A connection to the first node of `urls` that answers.
async fn connect_any(urls: &[String]) -> Connection {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for u in urls {
            if let Ok(Ok(c)) = tokio::time::timeout(
                Duration::from_secs(5),
                Connection::connect(u, ConnectionProperties::default()),
            )
            .await
            {
                return c;
            }
        }
        assert!(Instant::now() < deadline, "no cluster node answers");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

async fn passive_count(ch: &Channel, queue: &str) -> Option<(u32, u32)> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .ok()
    .map(|q| (q.message_count(), q.consumer_count()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the cluster of .ci/cluster start and CLUSTER_AMQP_URL; run with --ignored"]
async fn rolling_restarts_of_every_broker_node_lose_nothing_and_repeat_nothing() {
    let Ok(list) = std::env::var("CLUSTER_AMQP_URL") else {
        eprintln!(
            "SKIPPED: CLUSTER_AMQP_URL is not set; run `eval \"$(.ci/cluster start)\"` and set CLUSTER_AMQP_URL=$CLUSTER_AMQP_URL"
        );
        return;
    };
    let urls: Vec<String> = list.split(',').map(|s| s.trim().to_owned()).collect();
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let stop = CancellationToken::new();
    let emu = emulator::start(
        &emulator::EmulatorSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            session_rate_limit: None,
            credentials: emulator::CredentialUse::Reusable,
        },
        stop.clone(),
    )
    .await
    .unwrap();
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let dir = std::env::temp_dir().join(format!("cluster-{run}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut s = Settings::try_parse_from(["bunq-session-worker"]).unwrap();
    s.broker.amqp_url = SecretString::from(list.clone());
    s.broker.heartbeat_s = 2;
    s.bunq.api_url = emu.base_url.parse().unwrap();
    s.bunq.context_file = dir.join("ctx.json");
    s.bunq.register_device = false;
    // About 20 s of work, so every node restarts while credentials flow.
    s.bunq.session_rate_limit = Some("10/1s".parse().unwrap());
    s.metrics_addr = ListenAddr(Some("127.0.0.1:0".parse().unwrap()));
    s.redis.url = Some(SecretString::from(redis_url.clone()));
    s.redis.key_prefix = format!("cluster-{run}:");
    let t = &mut s.topology;
    t.input_exchange = format!("cluster-{run}.in");
    t.input_queue = format!("cluster-{run}.q");
    t.output_exchange = format!("cluster-{run}.out");
    t.dead_letter_exchange = format!("cluster-{run}.dlx");
    t.dead_letter_queue = format!("cluster-{run}.dl");
    t.delayed_retry_delays = DelayTiers::default();
    let topology = s.topology.topology();

    let mut replicas = Vec::new();
    for _ in 0..2 {
        let w = Worker::build(s.clone()).await.expect("a replica starts");
        let token = CancellationToken::new();
        replicas.push((token.clone(), tokio::spawn(w.run_until_stopped(token))));
    }
    let conn = connect_any(&urls).await;
    let ch = conn.create_channel().await.unwrap();
    let observer = format!("cluster-{run}.observer");
    ch.queue_declare(
        observer.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        quorum(),
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
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..INPUTS {
        let body =
            serde_json::json!({"provision_id": i, "token_value": format!("cluster_{run}_{i}")});
        ch.basic_publish(
            topology.input_exchange.as_str().into(),
            s.topology.input_routing_key.as_str().into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&body).unwrap(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    drop(ch);
    let _ = conn.close(200, "published".into()).await;

    // (a) Each node stopped and started in turn, while the credentials flow.
    let started = Instant::now();
    for node in ["a", "b", "c"] {
        ctl(node, &["stop_app"]);
        ctl(node, &["start_app"]);
        ctl(node, &["await_startup", "-t", "60"]);
    }
    eprintln!("rolling restart took {} ms", started.elapsed().as_millis());

    // (b) The first node (where the replicas went back to) dies (kill -9) and is started again.
    let pid = std::fs::read_to_string(format!("{}/a/pid", cluster_dir())).unwrap();
    let killed = Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap();
    assert!(killed.success());
    let restarted = Instant::now();
    let start = Command::new(format!("{}/.ci/cluster", env!("CARGO_MANIFEST_DIR")))
        .arg("start")
        .env("CLUSTER_DIR", cluster_dir())
        .output()
        .unwrap();
    assert!(
        start.status.success(),
        "{}",
        String::from_utf8_lossy(&start.stderr)
    );
    eprintln!(
        "node a killed and back in {} ms",
        restarted.elapsed().as_millis()
    );

    // Every credential gets its session: one call each.
    let deadline = Instant::now() + Duration::from_secs(180);
    while emu.emulator.sessions_opened() < INPUTS as u64 {
        assert!(
            Instant::now() < deadline,
            "{} of {INPUTS} sessions",
            emu.emulator.sessions_opened()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let conn = connect_any(&urls).await;
    let ch = conn.create_channel().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let input = passive_count(&ch, &topology.input_queue).await;
        if input.is_some_and(|(ready, _)| ready == 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the input queue never drained: {input:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (token, task) in replicas {
        token.cancel();
        let _ = task.await;
    }
    assert_eq!(
        emu.emulator.sessions_opened(),
        INPUTS as u64,
        "one session-server call per credential"
    );
    // One session.created per provision; a repeat is the same event.
    let mut consumer = ch
        .basic_consume(
            observer.as_str().into(),
            "cluster-observer".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut seen: HashMap<i64, String> = HashMap::new();
    let mut repeats = 0;
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(3), consumer.next()).await
    {
        let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(
            d.properties.kind().as_ref().map(|k| k.as_str()),
            Some("session.created"),
            "{body}"
        );
        let id = body["provision_id"].as_i64().unwrap();
        let message_id = d.properties.message_id().as_ref().unwrap().to_string();
        if let Some(first) = seen.insert(id, message_id.clone()) {
            assert_eq!(first, message_id, "another event for provision {id}");
            repeats += 1;
        }
    }
    eprintln!("{} provisions, {repeats} repeated events", seen.len());
    assert_eq!(seen.len(), INPUTS, "a session.created for every provision");
    let dead = passive_count(&ch, &topology.dead_letter_queue).await;
    assert_eq!(dead.map(|d| d.0), Some(0), "nothing dead-lettered");

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
    stop.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}
