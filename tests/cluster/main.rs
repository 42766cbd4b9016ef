//! Disruptions of the worker's dependencies under load (issue 19): two worker replicas,
//! `AMQP_URL` naming the three nodes of a RabbitMQ cluster, a quorum input queue on all three,
//! Redis behind three sentinels for the fleet's state, and a few hundred credentials flowing
//! while, in turn: (a) each broker node is stopped and started; (b) the node a replica is
//! connected to is killed (kill -9) and started again; (c) Sentinel fails Redis over
//! (`SENTINEL FAILOVER`); (d) the Redis primary is killed (kill -9). After it: every credential
//! had exactly one session-server call (the emulator counts them: its credentials are reusable,
//! so a second call would open a second session), one `session.created` each (a repeat carries
//! the same `message_id`), nothing dead-lettered, nothing left in the input or window queue,
//! and the flow went on after the last disruption without a restart. It prints how long each
//! disruption paused the flow (the longest gap between two sessions around it).
//!
//! Needs the cluster of `.ci/cluster start` (its `CLUSTER_*` settings, and `CLUSTER_DIR` for the
//! Erlang cookie, default `target/cluster`), so it is ignored unless asked for (`.ci/run` does):
//! `eval "$(.ci/cluster start)"; cargo test --test cluster -- --ignored --nocapture`.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use bunq_session_worker::{
    Worker,
    config::{DelayTiers, ListenAddr, Settings},
    tools::emulator,
};
use clap::Parser;
use futures_util::StreamExt;
use lapin::{BasicProperties, options::*, types::FieldTable};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

mod support;

use support::*;

const INPUTS: usize = 600;

/// The sessions-per-second the replicas are paced at: 600 credentials take about 60 s, so every
/// disruption (about 40 s of them here) happens while credentials flow.
const RATE: &str = "10/1s";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the cluster of .ci/cluster start and its CLUSTER_* settings; run with --ignored"]
async fn broker_node_losses_and_redis_failovers_lose_nothing_and_repeat_nothing() {
    let (Ok(list), Ok(sentinels), Ok(master)) = (
        std::env::var("CLUSTER_AMQP_URL"),
        std::env::var("CLUSTER_REDIS_SENTINELS"),
        std::env::var("CLUSTER_REDIS_SENTINEL_MASTER"),
    ) else {
        eprintln!(
            "SKIPPED: the CLUSTER_* settings are not set; run `eval \"$(.ci/cluster start)\"`"
        );
        return;
    };
    let urls: Vec<String> = list.split(',').map(|s| s.trim().to_owned()).collect();
    let sentinels: Vec<String> = sentinels.split(',').map(|s| s.trim().to_owned()).collect();
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
    s.bunq.session_rate_limit = Some(RATE.parse().unwrap());
    s.metrics_addr = ListenAddr(Some("127.0.0.1:0".parse().unwrap()));
    s.redis.sentinels = sentinels.clone();
    s.redis.sentinel_master = Some(master.clone());
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
    let mut tags = Vec::new();
    for _ in 0..2 {
        let w = Worker::build(s.clone()).await.expect("a replica starts");
        tags.push(w.consumer_tag().to_owned());
        let token = CancellationToken::new();
        replicas.push((token.clone(), tokio::spawn(w.run_until_stopped(token))));
    }
    let progress = Progress::default();
    progress.watch(emu.emulator.clone(), stop.clone());
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
    let mut disruptions: Vec<(&str, Instant, Instant)> = Vec::new();

    // (a) Each node stopped and started in turn, while the credentials flow.
    let t0 = Instant::now();
    for node in ["a", "b", "c"] {
        ctl(node, &["stop_app"]);
        ctl(node, &["start_app"]);
        ctl(node, &["await_startup", "-t", "60"]);
    }
    disruptions.push((
        "(a) rolling restart of the 3 broker nodes",
        t0,
        Instant::now(),
    ));
    progress.resumed(disruptions.last().unwrap().2).await;

    // (b) The node the first replica is connected to dies (kill -9) and is started again.
    // A connection's pid names its node (`<rca@localhost.1.2.0>`), its client properties the
    // replica (`connection_name`, the consumer tag). The replica may still be
    // reconnecting after (a).
    let deadline = Instant::now() + Duration::from_secs(30);
    let node = loop {
        let listed = ctl("b", &["list_connections", "pid", "client_properties", "-q"]);
        let found = listed
            .lines()
            .find(|l| l.contains(&tags[0]))
            .and_then(|l| l.split("<rc").nth(1))
            .and_then(|rest| rest.get(..1))
            .map(str::to_owned);
        if let Some(n) = found {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "the first replica ({}) is connected to no node: {listed}",
            tags[0]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("killing node rc{node}, which the first replica is connected to");
    let t0 = Instant::now();
    kill_9(&format!("{node}/pid"));
    // Started again once the killed node is gone (its distribution port closed).
    let dist = 25681 + u16::from(node.as_bytes()[0] - b'a');
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", dist)).is_ok() {
        assert!(Instant::now() < deadline, "the killed node never went away");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster_start();
    disruptions.push((
        "(b) kill -9 of the broker node a replica is on",
        t0,
        Instant::now(),
    ));
    progress.resumed(disruptions.last().unwrap().2).await;

    // (c) Sentinel moves the primary to the replica.
    let old = redis_primary(&sentinels, &master).await;
    let t0 = Instant::now();
    let _: () = sentinel(
        &sentinels,
        redis::cmd("SENTINEL").arg("FAILOVER").arg(&master),
    )
    .await;
    // Done when the old primary follows the new one (until then it may still take writes).
    let deadline = Instant::now() + Duration::from_secs(60);
    while redis_primary(&sentinels, &master).await == old || redis_role(old).await != "slave" {
        assert!(
            Instant::now() < deadline,
            "the sentinels never moved the primary"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    disruptions.push(("(c) SENTINEL FAILOVER of Redis", t0, Instant::now()));
    progress.resumed(disruptions.last().unwrap().2).await;

    // (d) The Redis primary dies (kill -9); the sentinels promote the replica.
    let old = redis_primary(&sentinels, &master).await;
    let t0 = Instant::now();
    kill_9(&format!("redis/{old}.pid"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while redis_primary(&sentinels, &master).await == old {
        assert!(
            Instant::now() < deadline,
            "the sentinels never promoted the replica"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = Instant::now();
    disruptions.push(("(d) kill -9 of the Redis primary", t0, last));

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
    let after_last = progress.after(last);
    assert!(
        after_last > 0,
        "the replicas worked again after the last disruption, without a restart"
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
    for (what, from, to) in &disruptions {
        eprintln!(
            "{what}: took {:.1} s, paused the flow {:.1} s",
            (*to - *from).as_secs_f64(),
            progress.pause(*from, *to).as_secs_f64()
        );
    }
    eprintln!(
        "{} provisions, {INPUTS} session-server calls, {repeats} repeated events, {after_last} sessions after the last disruption",
        seen.len()
    );
    assert_eq!(seen.len(), INPUTS, "a session.created for every provision");
    let dead = passive_count(&ch, &topology.dead_letter_queue).await;
    assert_eq!(dead.map(|d| d.0), Some(0), "nothing dead-lettered");
    let window = passive_count(&ch, &topology.window_queue_name()).await;
    assert!(
        window.is_none_or(|w| w.0 == 0),
        "nothing stranded in the window queue: {window:?}"
    );

    for q in [
        topology.input_queue.clone(),
        topology.dead_letter_queue.clone(),
        observer,
        topology.window_queue_name(),
    ] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
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
    // The killed Redis comes back as a replica of the new primary, so the cluster is whole.
    cluster_start();
    let _ = std::fs::remove_dir_all(&dir);
}
