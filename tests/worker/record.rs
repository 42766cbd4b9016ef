//! One credential, one record: exactly one successful bunq call and one outcome per credential,
//! whatever the rounds, copies, replicas, pauses and cut connections, with and without Redis
//! where the case applies. Each test counts the session-server calls the fake bunq received for
//! the credential, and the events and dead letters that came out.

use std::time::Duration;

use bunq_session_worker::config::DelayTiers;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::{
    binary::Running,
    fleet::{calls_for, redis_url, remove_keys, use_redis},
    helpers::*,
    proxy::*,
};

/// The same credential as the partner's poller publishes it: bunq's own shape.
fn wrapped(id: i64, token: &str) -> serde_json::Value {
    serde_json::json!({"PartnerUserProvision": {"id": id, "credential": {
        "status": "PENDING_FIRST_USE", "token_value": token}}})
}

/// After everything the test expects: nothing more comes out within a bounded look.
async fn nothing_more(app: &mut TestApp) {
    let more = app.next_output_within(Duration::from_secs(2)).await;
    assert!(
        more.is_none(),
        "a second event: {:?}",
        more.map(|d| body_json(&d))
    );
    assert_eq!(app.ready_count(&app.names.dead_letter_queue).await, 0);
}

/// Waits until no delivery is in the queue or in the worker's hands.
async fn drained(app: &TestApp) {
    eventually("every copy is settled", || async {
        app.ready_count(&app.names.input_queue).await == 0
            && app.status.as_ref().is_none_or(|s| s.in_flight() == 0)
    })
    .await;
}

async fn two_rounds_of_one_credential(redis: bool) {
    let mut app = TestApp::new().await;
    let prefix = redis.then(|| use_redis(&mut app, &redis_url()));
    app.settings.bunq.register_device = false;
    app.settings.retry.max_attempts = 1;
    app.settings.topology.delayed_retry_delays = DelayTiers(vec![Duration::from_secs(1)]);
    // bunq's short outage, then a session, then the credential is spent.
    app.session_server().first_calls(1).answers(500, "{}").await;
    app.session_server()
        .first_calls(1)
        .answers(200, &fixture("session-server.user-person.json"))
        .await;
    app.session_server()
        .answers(400, &fixture("error.credentials-incorrect.json"))
        .await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-two-rounds")).await;
    eventually("the first round failed", || async {
        calls_for(&app, "tok-two-rounds").await == 1
    })
    .await;
    // While round 1 is parked, the poller publishes the credential again.
    app.publish_json(&wrapped(1, "tok-two-rounds")).await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created", "{:?}", body_json(&out));
    drained(&app).await;
    eventually("the parked round came back", || async {
        app.ready_count(&app.names.input_queue).await == 0
    })
    .await;
    nothing_more(&mut app).await;
    assert_eq!(
        calls_for(&app, "tok-two-rounds").await,
        2,
        "a 500, then one session"
    );
    app.cleanup().await;
    if let Some(p) = prefix {
        remove_keys(&p).await;
    }
}

#[tokio::test]
async fn two_rounds_of_one_credential_open_one_session_in_one_process() {
    two_rounds_of_one_credential(false).await;
}

#[tokio::test]
async fn two_rounds_of_one_credential_open_one_session_in_a_fleet() {
    two_rounds_of_one_credential(true).await;
}

async fn two_copies_at_once(redis: bool) {
    let mut app = TestApp::new().await;
    let prefix = redis.then(|| use_redis(&mut app, &redis_url()));
    app.settings.bunq.register_device = false;
    let mut slow = app.answer(200, &fixture("session-server.user-api-key.json"));
    slow.delay = Some(Duration::from_millis(800));
    app.session_server()
        .first_calls(1)
        .responds_with(slow)
        .await;
    app.session_server()
        .answers(400, &fixture("error.credentials-incorrect.json"))
        .await;
    app.start_worker().await;
    // Webhook and poller, at once: two deliveries of one replica, two claimants.
    app.publish_json(&slim(5, "tok-twice-at-once")).await;
    app.publish_json(&wrapped(5, "tok-twice-at-once")).await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created", "{:?}", body_json(&out));
    drained(&app).await;
    nothing_more(&mut app).await;
    assert_eq!(calls_for(&app, "tok-twice-at-once").await, 1);
    app.cleanup().await;
    if let Some(p) = prefix {
        remove_keys(&p).await;
    }
}

#[tokio::test]
async fn two_copies_at_once_on_one_replica_make_one_call() {
    two_copies_at_once(false).await;
}

#[tokio::test]
async fn two_copies_at_once_on_one_replica_with_redis_make_one_call() {
    two_copies_at_once(true).await;
}

/// Replica A (a process) holds the claim when it freezes (SIGSTOP) past its lease; replica B
/// takes over with another copy and opens the session. A, resumed, finds the claim taken and
/// makes no call: 500, 200, and nothing after.
#[tokio::test]
async fn a_replica_frozen_past_its_lease_makes_no_call_after_it_resumes() {
    let mut app = TestApp::new().await;
    app.settings.bunq.http_timeout = Duration::from_millis(1000);
    // The process's flags; what they do not carry goes in its environment.
    let args = app.args();
    let prefix = use_redis(&mut app, &redis_url());
    app.settings.bunq.register_device = false;
    app.settings.redis.claim_lease = Duration::from_millis(3000);
    let mut outage = app.answer(500, "{}");
    outage.delay = Some(Duration::from_millis(200));
    app.session_server()
        .first_calls(1)
        .responds_with(outage)
        .await;
    app.session_server()
        .first_calls(1)
        .answers(200, &fixture("session-server.user-person.json"))
        .await;
    app.session_server()
        .answers(400, &fixture("error.credentials-incorrect.json"))
        .await;
    let env = [
        ("REDIS_URL", redis_url()),
        ("REDIS_KEY_PREFIX", prefix.clone()),
        ("CLAIM_LEASE_MS", "3000".into()),
        ("BUNQ_REGISTER_DEVICE", "false".into()),
        ("RETRY_MAX_ATTEMPTS", "5".into()),
        // A's one delivery is the first copy: the broker gives the second to B.
        ("PREFETCH", "1".into()),
        ("RUST_LOG", "info,lapin=warn".into()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = Running::start(&args, &env);
    eventually("replica A consumes", || async {
        app.consumer_count(&app.names.input_queue).await == 1
    })
    .await;
    app.publish_json(&slim(9, "tok-frozen")).await;
    eventually("A's first call reached bunq", || async {
        calls_for(&app, "tok-frozen").await == 1
    })
    .await;
    a.signal("-STOP");
    // Replica B, with another copy: it waits out A's lease, then opens the session.
    app.start_worker().await;
    app.publish_json(&wrapped(9, "tok-frozen")).await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created", "{:?}", body_json(&out));
    a.signal("-CONT");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // Acked (the record says created) or handed back (B had not recorded it yet).
    while !a.text().contains("delivery handled") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "A never settled its copy as the record says:\n{}",
            a.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drained(&app).await;
    nothing_more(&mut app).await;
    assert_eq!(calls_for(&app, "tok-frozen").await, 2, "{}", a.text());
    assert!(
        a.text().contains("taken over"),
        "A says why it stopped:\n{}",
        a.text()
    );
    a.signal("-TERM");
    app.cleanup().await;
    remove_keys(&prefix).await;
}

/// A's session-server call is in flight when A's connection drops; the broker redelivers the
/// input (to B, or to A itself on its next connection), which waits on A's claim. bunq refuses
/// the credential: one call, one `session.failed`, one dead letter.
async fn a_dead_channel_then_a_refusal(redis: bool) {
    let mut app = TestApp::new().await;
    let prefix = redis.then(|| use_redis(&mut app, &redis_url()));
    app.settings.bunq.register_device = false;
    let mut slow = app.answer(400, &fixture("error.credentials-incorrect.json"));
    slow.delay = Some(Duration::from_millis(1500));
    app.session_server().responds_with(slow).await;
    let direct = app.settings.clone();
    let proxy = TcpProxy::start(amqp_host_port(&app.amqp_url)).await;
    app.settings.broker.amqp_url = SecretString::from(amqp_url_via(&app.amqp_url, proxy.addr()));
    app.settings.broker.heartbeat_s = 2;
    app.start_worker().await;
    app.publish_json(&slim(3, "tok-dead-channel")).await;
    eventually("A's call reached bunq", || async {
        calls_for(&app, "tok-dead-channel").await == 1
    })
    .await;
    let b = if redis {
        let b = bunq_session_worker::Worker::build(direct).await.unwrap();
        let stop = CancellationToken::new();
        Some((stop.clone(), tokio::spawn(b.run_until_stopped(stop))))
    } else {
        None
    };
    proxy.cut();
    proxy.restore();
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.failed", "{:?}", body_json(&out));
    assert_eq!(body_json(&out)["reason"], "credential_rejected");
    let dl = app.next_dead_letter().await;
    assert_eq!(body_json(&dl)["provision_id"], 3);
    drained(&app).await;
    nothing_more(&mut app).await;
    assert_eq!(calls_for(&app, "tok-dead-channel").await, 1);
    if let Some((stop, task)) = b {
        stop.cancel();
        task.await.unwrap().unwrap();
    }
    app.cleanup().await;
    if let Some(p) = prefix {
        remove_keys(&p).await;
    }
}

#[tokio::test]
async fn a_dead_channel_then_a_refusal_fails_once_in_one_process() {
    a_dead_channel_then_a_refusal(false).await;
}

#[tokio::test]
async fn a_dead_channel_then_a_refusal_fails_once_in_a_fleet() {
    a_dead_channel_then_a_refusal(true).await;
}

async fn a_lost_answer_then_a_refusal(redis: bool) {
    let mut app = TestApp::new().await;
    let prefix = redis.then(|| use_redis(&mut app, &redis_url()));
    app.settings.bunq.register_device = false;
    app.settings.bunq.http_timeout = Duration::from_millis(300);
    app.settings.retry.max_attempts = 1;
    app.settings.topology.delayed_retry_delays = DelayTiers(vec![Duration::from_secs(1)]);
    // Round 0: bunq's answer never arrives in time (it may have opened a session).
    let mut lost = app.answer(200, &fixture("session-server.user-person.json"));
    lost.delay = Some(Duration::from_millis(1500));
    app.session_server()
        .first_calls(1)
        .responds_with(lost)
        .await;
    // Round 1: the credential is spent.
    app.session_server()
        .answers(400, &fixture("error.credentials-incorrect.json"))
        .await;
    app.start_worker().await;
    app.publish_json(&slim(4, "tok-lost-answer")).await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.failed", "{:?}", body_json(&out));
    assert_eq!(body_json(&out)["reason"], "outcome_unknown");
    let dl = app.next_dead_letter().await;
    assert_eq!(
        header(&dl, "x-error-reason").as_deref(),
        Some("outcome_unknown")
    );
    assert_eq!(calls_for(&app, "tok-lost-answer").await, 2);
    app.cleanup().await;
    if let Some(p) = prefix {
        remove_keys(&p).await;
    }
}

#[tokio::test]
async fn a_refusal_in_a_later_round_after_a_lost_answer_is_outcome_unknown() {
    a_lost_answer_then_a_refusal(false).await;
}

#[tokio::test]
async fn a_refusal_in_a_later_round_after_a_lost_answer_is_outcome_unknown_with_redis() {
    a_lost_answer_then_a_refusal(true).await;
}

/// A failure is final for every copy of the credential; replaying its dead letter (with its
/// headers) starts one fresh try, and replaying the same dead letter again starts none.
async fn replays(redis: bool) {
    let mut app = TestApp::new().await;
    let prefix = redis.then(|| use_redis(&mut app, &redis_url()));
    app.settings.bunq.register_device = false;
    app.settings.retry.max_attempts = 1;
    app.settings.topology.delayed_retry_delays = DelayTiers(vec![]);
    app.session_server().first_calls(1).answers(503, "{}").await;
    app.session_server()
        .first_calls(1)
        .answers(200, &fixture("session-server.user-person.json"))
        .await;
    app.session_server()
        .answers(400, &fixture("error.credentials-incorrect.json"))
        .await;
    app.start_worker().await;
    app.publish_json(&slim(6, "tok-replayed")).await;
    assert_eq!(
        body_json(&app.next_output().await)["reason"],
        "retries_exhausted"
    );
    let dl = app.next_dead_letter().await;
    assert_eq!(
        header(&dl, "x-credential-generation").as_deref(),
        Some("0"),
        "the dead letter names the generation that failed"
    );
    // The operator replays it, headers and all, twice (a double click).
    app.publish(&dl.data, dl.properties.clone()).await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created", "{:?}", body_json(&out));
    app.publish(&dl.data, dl.properties.clone()).await;
    drained(&app).await;
    nothing_more(&mut app).await;
    assert_eq!(calls_for(&app, "tok-replayed").await, 2);
    app.cleanup().await;
    if let Some(p) = prefix {
        remove_keys(&p).await;
    }
}

/// The partner's poller publishes a credential again after its `session.failed`: a duplicate
/// when bunq refused it (a second call would spend it again), another try when bunq never
/// answered for it (`retries_exhausted`).
async fn published_anew_after_a_failure(redis: bool) {
    let mut app = TestApp::new().await;
    let prefix = redis.then(|| use_redis(&mut app, &redis_url()));
    app.settings.bunq.register_device = false;
    app.settings.retry.max_attempts = 1;
    app.settings.topology.delayed_retry_delays = DelayTiers(vec![]);
    app.session_server()
        .first_calls(1)
        .answers(400, &fixture("error.credentials-incorrect.json"))
        .await;
    app.session_server().first_calls(1).answers(503, "{}").await;
    app.session_server()
        .answers(200, &fixture("session-server.user-person.json"))
        .await;
    app.start_worker().await;
    app.publish_json(&slim(7, "tok-refused")).await;
    let out = app.next_output().await;
    assert_eq!(body_json(&out)["reason"], "credential_rejected");
    app.next_dead_letter().await;
    app.publish_json(&slim(7, "tok-refused")).await;
    drained(&app).await;
    nothing_more(&mut app).await;
    assert_eq!(calls_for(&app, "tok-refused").await, 1);

    app.publish_json(&slim(8, "tok-unanswered")).await;
    let out = app.next_output().await;
    assert_eq!(body_json(&out)["reason"], "retries_exhausted");
    app.next_dead_letter().await;
    app.publish_json(&slim(8, "tok-unanswered")).await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created", "{:?}", body_json(&out));
    drained(&app).await;
    nothing_more(&mut app).await;
    assert_eq!(calls_for(&app, "tok-unanswered").await, 2);
    app.cleanup().await;
    if let Some(p) = prefix {
        remove_keys(&p).await;
    }
}

#[tokio::test]
async fn published_anew_after_a_failure_in_one_process() {
    published_anew_after_a_failure(false).await;
}

#[tokio::test]
async fn published_anew_after_a_failure_in_a_fleet() {
    published_anew_after_a_failure(true).await;
}

#[tokio::test]
async fn a_replayed_dead_letter_is_tried_once_in_one_process() {
    replays(false).await;
}

#[tokio::test]
async fn a_replayed_dead_letter_is_tried_once_in_a_fleet() {
    replays(true).await;
}

/// Two replicas with their own installations (as `docker compose up --scale worker=2` makes
/// them) read each other's sealed bookkeeping: the rounds count across both, and the input is
/// dead-lettered once when the tiers are spent, with every call counted.
#[tokio::test]
async fn replicas_with_their_own_installations_read_each_others_bookkeeping() {
    let mut app = TestApp::new().await;
    let prefix = use_redis(&mut app, &redis_url());
    app.settings.bunq.register_device = false;
    app.settings.retry.max_attempts = 1;
    app.settings.topology.delayed_retry_delays =
        DelayTiers(vec![Duration::from_secs(1), Duration::from_secs(1)]);
    app.session_server().answers(500, "{}").await;
    let mut b_settings = app.settings.clone();
    b_settings.bunq.context_file = app.settings.bunq.context_file.with_extension("b.json");
    app.start_worker().await;
    let b = bunq_session_worker::Worker::build(b_settings)
        .await
        .unwrap();
    let stop_b = CancellationToken::new();
    let b_task = tokio::spawn(b.run_until_stopped(stop_b.clone()));
    app.publish_json(&slim(8, "tok-two-installations")).await;
    let out = app.next_output().await;
    assert_eq!(
        body_json(&out)["reason"],
        "retries_exhausted",
        "{}",
        body_json(&out)
    );
    let dl = app.next_dead_letter().await;
    assert_eq!(
        header(&dl, "x-attempts").as_deref(),
        Some("3"),
        "three rounds, one call each"
    );
    drained(&app).await;
    nothing_more(&mut app).await;
    assert_eq!(calls_for(&app, "tok-two-installations").await, 3);
    stop_b.cancel();
    b_task.await.unwrap().unwrap();
    app.cleanup().await;
    remove_keys(&prefix).await;
}

/// Every key and value under `prefix` in Redis, as text.
async fn redis_dump(prefix: &str) -> String {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut dump = String::new();
    for k in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
        let value: Vec<Vec<u8>> = match kind.as_str() {
            "hash" => redis::cmd("HGETALL")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .unwrap(),
            _ => vec![
                redis::cmd("GET")
                    .arg(&k)
                    .query_async(&mut conn)
                    .await
                    .unwrap(),
            ],
        };
        dump.push_str(&k);
        for v in value {
            dump.push(' ');
            dump.push_str(&String::from_utf8_lossy(&v));
        }
        dump.push('\n');
    }
    dump
}

/// Replica A is killed (SIGKILL) after bunq answered and before the broker confirmed
/// `session.created` (nothing is bound to the output exchange, so the mandatory publish keeps
/// coming back). Replica B, on the same Redis, publishes the session A staged: one
/// `session.created` carrying that session, one session-server call, no `session.failed`.
/// Redis never held the token in clear.
#[tokio::test]
async fn a_replica_killed_after_bunqs_answer_costs_neither_the_session_nor_a_second_call() {
    const TOKEN: &str = "0c5be2f1a9d84e7cb36a1f0d2e4c6b8a9d7f5e3c1b0a2d4f6e8c0b2a4d6f8e0c";
    let mut app = TestApp::new_with_binding(None).await;
    app.settings.bunq.http_timeout = Duration::from_millis(1000);
    let args = app.args();
    let prefix = use_redis(&mut app, &redis_url());
    app.settings.bunq.register_device = false;
    // B takes the staged session over once A's lease is over.
    app.settings.redis.claim_lease = Duration::from_millis(3000);
    app.session_server()
        .first_calls(1)
        .answers(200, &fixture("session-server.user-person.json"))
        .await;
    app.session_server()
        .answers(400, &fixture("error.credentials-incorrect.json"))
        .await;
    let env = [
        ("REDIS_URL", redis_url()),
        ("REDIS_KEY_PREFIX", prefix.clone()),
        ("BUNQ_REGISTER_DEVICE", "false".into()),
        ("CLAIM_LEASE_MS", "3000".into()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // A shares B's installation (one BUNQ_CONTEXT_FILE), which opens a staged session.
    let mut a = Running::start(&args, &env);
    eventually("replica A consumes", || async {
        app.consumer_count(&app.names.input_queue).await == 1
    })
    .await;
    app.publish_json(&slim(11, "tok-killed-after-answer")).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !a.text().contains("publish not confirmed") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "A never tried to publish:\n{}",
            a.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.signal("-KILL");
    a.wait().await;
    let dump = redis_dump(&prefix).await;
    assert!(dump.contains("credential:"), "the record is there:\n{dump}");
    assert!(!dump.contains(TOKEN), "a session token in Redis:\n{dump}");
    assert!(
        !dump.contains("tok-killed-after-answer"),
        "a credential in Redis:\n{dump}"
    );
    // The consumer side comes back; replica B gets the redelivered input.
    app.channel
        .queue_bind(
            app.names.output_queue.as_str().into(),
            app.names.output_exchange.as_str().into(),
            "session.#".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    app.start_worker().await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created", "{:?}", body_json(&out));
    assert_eq!(body_json(&out)["session_id"], 3301);
    assert_eq!(body_json(&out)["session_token"], TOKEN);
    drained(&app).await;
    nothing_more(&mut app).await;
    assert_eq!(calls_for(&app, "tok-killed-after-answer").await, 1);
    let dump = redis_dump(&prefix).await;
    assert!(!dump.contains(TOKEN), "a session token in Redis:\n{dump}");
    app.cleanup().await;
    remove_keys(&prefix).await;
}
