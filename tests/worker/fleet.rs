//! Replicas as one fleet through the real Redis (`TEST_REDIS_URL`, default
//! `redis://127.0.0.1:6379`), each test under a key prefix of its own. The replicas are worker
//! instances in this process: they share nothing but the broker and Redis, as processes would.

use std::time::Duration;

use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::{helpers::*, proxy::*, taps::secrets_sent};

pub(crate) fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Points the app's settings at Redis under a fresh prefix; returns the prefix.
pub(crate) fn use_redis(app: &mut TestApp, url: &str) -> String {
    let prefix = format!("test-{}:", uuid::Uuid::new_v4().simple());
    app.settings.redis.url = Some(SecretString::from(url.to_owned()));
    app.settings.redis.key_prefix = prefix.clone();
    prefix
}

pub(crate) async fn remove_keys(prefix: &str) {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    for k in keys {
        let _: i64 = redis::cmd("DEL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// Redis's clock (ms), and the `fields` of every credential record under `prefix` in the test
/// Redis (in no particular order).
pub(crate) async fn record_fields(
    prefix: &str,
    fields: &[&str],
) -> (u64, Vec<Vec<Option<String>>>) {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}credential:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut records = Vec::new();
    for k in keys {
        let values: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&k)
            .arg(fields)
            .query_async(&mut conn)
            .await
            .unwrap();
        records.push(values);
    }
    (secs * 1000 + micros / 1000, records)
}

/// session-server calls the fake received for `token`.
pub(crate) async fn calls_for(app: &TestApp, token: &str) -> usize {
    secrets_sent(app, "session-server")
        .await
        .iter()
        .filter(|s| *s == token)
        .count()
}

#[tokio::test]
async fn two_replicas_and_a_cut_connection_settle_each_credential_once() {
    let mut app = TestApp::new().await;
    let prefix = use_redis(&mut app, &redis_url());
    app.settings.bunq.register_device = false;
    let mut slow = app.answer(200, &fixture("session-server.user-api-key.json"));
    slow.delay = Some(Duration::from_millis(1500));
    app.session_server().responds_with(slow).await;

    // Replica B talks to the broker directly; replica A through a proxy that will be cut.
    let b_settings = app.settings.clone();
    let proxy = TcpProxy::start(amqp_host_port(&app.amqp_url)).await;
    app.settings.broker.amqp_url = SecretString::from(amqp_url_via(&app.amqp_url, proxy.addr()));
    app.settings.broker.heartbeat_s = 2;
    app.start_worker().await;
    let b = bunq_session_worker::Worker::build(b_settings)
        .await
        .unwrap();
    let stop_b = CancellationToken::new();
    let b_task = tokio::spawn(b.run_until_stopped(stop_b.clone()));

    let tokens: Vec<String> = (0..6).map(|i| format!("fleet-token-{i}")).collect();
    for (i, t) in tokens.iter().enumerate() {
        app.publish_json(&slim(i as i64, t)).await;
    }
    // Every credential is at bunq (each answer takes 1.5 s): cut A's connection now, so its
    // unacked deliveries go to B while A's calls are under way.
    eventually("all six calls started", || async {
        app.requests("session-server").await.len() >= 6
    })
    .await;
    proxy.cut();
    proxy.restore();

    // A publish whose confirm the cut swallowed is published again: the same event (its
    // message_id), never another session.
    let mut created = std::collections::BTreeMap::new();
    while created.len() < tokens.len() {
        let out = app.next_output().await;
        assert_eq!(type_of(&out), "session.created", "{:?}", body_json(&out));
        let id = body_json(&out)["provision_id"].as_i64().unwrap();
        let message_id = out.properties.message_id().clone();
        let session = body_json(&out)["session_id"].clone();
        if let Some((first_id, first_session)) =
            created.insert(id, (message_id.clone(), session.clone()))
        {
            assert_eq!(first_id, message_id, "another event for provision {id}");
            assert_eq!(first_session, session, "another session for provision {id}");
        }
    }
    // Nothing more comes: the input queue drains, and no second event or dead letter follows.
    eventually("the input queue drained", || async {
        app.ready_count(&app.names.input_queue).await == 0
    })
    .await;
    for t in &tokens {
        assert_eq!(calls_for(&app, t).await, 1, "{t}: one session-server call");
    }
    while let Some(out) = app.next_output_within(Duration::from_secs(2)).await {
        let id = body_json(&out)["provision_id"].as_i64().unwrap();
        assert_eq!(
            Some(out.properties.message_id()),
            created.get(&id).map(|(m, _)| m),
            "only a repeat of an event already seen"
        );
    }
    assert_eq!(app.ready_count(&app.names.dead_letter_queue).await, 0);
    stop_b.cancel();
    b_task.await.unwrap().unwrap();
    app.cleanup().await;
    remove_keys(&prefix).await;
}

#[tokio::test]
async fn a_credential_settled_by_one_replica_is_acked_by_another_without_a_call() {
    let mut app = TestApp::new().await;
    let prefix = use_redis(&mut app, &redis_url());
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    app.publish_json(&slim(1, "settled-once")).await;
    assert_eq!(type_of(&app.next_output().await), "session.created");
    app.stop_worker().await.unwrap();
    // A second replica (a fresh process memory) gets the same credential in another shape.
    app.start_worker().await;
    let wrapped = serde_json::json!({"PartnerUserProvision": {"id": 1, "credential": {
        "status": "PENDING_FIRST_USE", "token_value": "settled-once"}}});
    app.publish_json(&wrapped).await;
    eventually("the repeat was acked", || async {
        app.ready_count(&app.names.input_queue).await == 0
            && app.consumer_count(&app.names.input_queue).await == 1
    })
    .await;
    // The bounded look for a second event: the worker acks a settled credential at once.
    let second = app.next_output_within(Duration::from_secs(2)).await;
    assert!(second.is_none(), "no second session.created");
    assert_eq!(calls_for(&app, "settled-once").await, 1);
    app.cleanup().await;
    remove_keys(&prefix).await;
}

#[tokio::test]
async fn with_redis_down_no_call_is_made_nothing_is_lost_and_work_resumes() {
    let mut app = TestApp::new().await;
    let redis_proxy = TcpProxy::start(
        redis_url()
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .to_owned(),
    )
    .await;
    let prefix = use_redis(&mut app, &format!("redis://{}", redis_proxy.addr()));
    app.bunq_opens_every_session().await;
    // Start-up needs Redis (the fleet's seal key); it goes away afterwards.
    app.start_worker().await;
    redis_proxy.stall();
    redis_proxy.black_hole();
    app.publish_json(&slim(1, "while-redis-is-down")).await;
    eventually("the worker holds the delivery", || async {
        app.ready_count(&app.names.input_queue).await == 0
    })
    .await;
    // A bounded look: no session-server call, nothing published or dead-lettered meanwhile.
    let early = app.next_output_within(Duration::from_secs(3)).await;
    assert!(early.is_none(), "nothing is published while Redis is down");
    assert!(app.requests("session-server").await.is_empty());
    assert!(!app.status.as_ref().unwrap().shared_state_reachable().await);
    redis_proxy.restore();
    assert_eq!(type_of(&app.next_output().await), "session.created");
    assert_eq!(app.ready_count(&app.names.dead_letter_queue).await, 0);
    app.cleanup().await;
    remove_keys(&prefix).await;
}

/// Runs `replicas` workers sharing one Redis scope against the bunq emulator limited to one
/// session-server call per `per_s` s, each configured with `configured` as its own limit;
/// publishes `inputs` events and returns when each 429 was given, counted from the first
/// session-server call, once every input has its session.created.
async fn fleet_against_a_rate_limited_bunq(
    shared: bool,
    replicas: usize,
    per_s: u64,
    configured: Option<&str>,
    inputs: i64,
) -> Vec<Duration> {
    use bunq_session_worker::tools::emulator;
    let stop = CancellationToken::new();
    let emu = emulator::start(
        &emulator::EmulatorSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            session_rate_limit: Some(format!("1/{per_s}s").parse().unwrap()),
            credentials: emulator::CredentialUse::SingleUse,
        },
        stop.clone(),
    )
    .await
    .unwrap();
    let mut app = TestApp::new().await;
    let prefix = if shared {
        use_redis(&mut app, &redis_url())
    } else {
        String::from("unused-")
    };
    app.settings.bunq.api_url = emu.base_url.parse().unwrap();
    app.settings.bunq.register_device = false;
    app.settings.bunq.session_rate_limit = configured.map(|c| c.parse().unwrap());
    app.settings.retry.max_elapsed = Duration::from_secs(120);
    app.start_worker().await;
    let mut others = Vec::new();
    for _ in 1..replicas {
        let w = bunq_session_worker::Worker::build(app.settings.clone())
            .await
            .unwrap();
        let token = CancellationToken::new();
        others.push((token.clone(), tokio::spawn(w.run_until_stopped(token))));
    }
    let run = uuid::Uuid::new_v4().simple().to_string();
    for i in 0..inputs {
        app.publish_json(&slim(i, &format!("sandbox_{run}_{i}")))
            .await;
    }
    let mut created = 0;
    while created < inputs {
        let out = app
            .next_output_within(Duration::from_secs(60))
            .await
            .expect("a session event");
        assert_eq!(type_of(&out), "session.created", "{:?}", body_json(&out));
        created += 1;
    }
    for (token, task) in others {
        token.cancel();
        task.await.unwrap().unwrap();
    }
    app.cleanup().await;
    remove_keys(&prefix).await;
    stop.cancel();
    emu.emulator.rate_limited_after_first_call()
}

#[tokio::test]
async fn three_replicas_sharing_bunqs_limit_draw_no_429() {
    let refused = fleet_against_a_rate_limited_bunq(true, 3, 1, Some("1/1s"), 5).await;
    assert!(
        refused.is_empty(),
        "429s drawn with the limit at bunq's own figure: {refused:?}"
    );
}

#[tokio::test]
async fn three_replicas_without_a_limit_learn_bunqs_pace_after_the_first_wave() {
    // Nothing is known yet: each replica probes with one call at a time, so the first wave
    // draws at most one 429 per replica; after it, no call lands inside a window bunq named.
    let refused = fleet_against_a_rate_limited_bunq(true, 3, 1, None, 5).await;
    assert!(refused.len() <= 3, "{refused:?}");
    assert!(
        refused.iter().all(|t| *t < Duration::from_millis(500)),
        "a 429 after the first wave: {refused:?}"
    );
}

#[tokio::test]
async fn one_replica_without_redis_at_bunqs_own_figure_draws_no_429() {
    let refused = fleet_against_a_rate_limited_bunq(false, 1, 1, Some("1/1s"), 5).await;
    assert!(refused.is_empty(), "429s drawn: {refused:?}");
}
