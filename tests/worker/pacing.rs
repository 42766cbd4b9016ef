//! Pacing session-server end to end (the decisions have paused-clock unit tests in the
//! library); durable delayed retry through the broker's per-tier delay queues.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bunq_session_worker::{config::DelayTiers, rate_limit::RateLimit};
use wiremock::{Request, Respond, ResponseTemplate};

use crate::helpers::*;

/// Delayed-retry tiers of `secs` seconds each.
fn tiers(secs: &[u64]) -> DelayTiers {
    DelayTiers(secs.iter().map(|s| Duration::from_secs(*s)).collect())
}

/// Wraps a responder and records when each request arrived.
struct Timed<R> {
    inner: R,
    at: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl<R: Respond> Respond for Timed<R> {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let secret = req.body_json::<serde_json::Value>().unwrap()["secret"]
            .as_str()
            .unwrap()
            .to_owned();
        self.at.lock().unwrap().push((Instant::now(), secret));
        self.inner.respond(req)
    }
}

/// `answer`, recording in `at` when each call arrives and with which credential.
fn timed(answer: Signed, at: &Arc<Mutex<Vec<(Instant, String)>>>) -> Timed<Signed> {
    Timed {
        inner: answer,
        at: at.clone(),
    }
}

/// Pacing is wired end to end: one session-server call per second for the process, across
/// deliveries. The pacing decisions themselves (spacing, 429 pauses, waits not charged to the
/// retry budget) have paused-clock unit tests in `src/pacing.rs` and `src/session/tests.rs`.
#[tokio::test]
async fn session_server_calls_are_paced_across_deliveries() {
    let mut app = TestApp::new().await;
    app.settings.bunq.register_device = false;
    app.settings.bunq.session_rate_limit = Some(RateLimit {
        calls: 1,
        per: Duration::from_secs(1),
    });
    let at = Arc::new(Mutex::new(Vec::new()));
    app.session_server()
        .responds_with(timed(
            app.answer(200, &fixture("session-server.user-person.json")),
            &at,
        ))
        .await;
    app.start_worker().await;
    for i in 0..3 {
        app.publish_json(&slim(i, &format!("tok-paced-{i}"))).await;
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        let out = app.next_output().await;
        assert_eq!(type_of(&out), "session.created");
        got.push(body_json(&out)["provision_id"].as_i64().unwrap());
    }
    got.sort();
    assert_eq!(got, [0, 1, 2]);
    let mut times: Vec<Instant> = at.lock().unwrap().iter().map(|(t, _)| *t).collect();
    assert_eq!(times.len(), 3, "one session-server call per delivery");
    times.sort();
    for w in times.windows(2) {
        let gap = w[1].duration_since(w[0]);
        // One call a second, measured where the calls arrive: a loaded machine may delay one
        // request more than the next, so allow 200 ms of slack (unpaced calls come within a
        // few ms of each other).
        assert!(
            gap >= Duration::from_millis(800),
            "calls {gap:?} apart under 1/1s"
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn a_spent_retry_budget_parks_the_delivery_and_it_comes_back() {
    let mut app = TestApp::new().await;
    app.settings.bunq.register_device = false;
    app.settings.retry.max_attempts = 2;
    app.settings.topology.delayed_retry_delays = tiers(&[1, 2]);
    let at = Arc::new(Mutex::new(Vec::new()));
    // Two failures spend the in-process budget; the call after the delay succeeds.
    app.session_server()
        .first_calls(2)
        .responds_with(timed(
            app.answer(503, r#"{"Error":[{"error_description":"down"}]}"#),
            &at,
        ))
        .await;
    app.session_server()
        .responds_with(timed(
            app.answer(200, &fixture("session-server.user-person.json")),
            &at,
        ))
        .await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-delayed")).await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created");
    let calls = at.lock().unwrap().clone();
    assert_eq!(calls.len(), 3);
    // The parked round shows as a gap of at least the 1 s tier between two calls. Normally it
    // is before the third; which gap it is was once not so in CI, under load, for a reason the
    // logs of that run did not show, and is not what this test is about.
    let offsets: Vec<Duration> = calls
        .iter()
        .map(|c| c.0.duration_since(calls[0].0))
        .collect();
    assert!(
        offsets
            .windows(2)
            .any(|w| w[1] - w[0] >= Duration::from_secs(1)),
        "a call waited out the 1 s tier: calls at {offsets:?} after the first"
    );
    assert_eq!(app.ready_count(&app.names.dead_letter_queue).await, 0);
    app.cleanup().await;
}

#[tokio::test]
async fn delayed_retries_end_in_the_dead_letter_queue_when_every_tier_is_spent() {
    let mut app = TestApp::new_with_binding(Some("session.failed")).await;
    app.settings.bunq.register_device = false;
    app.settings.retry.max_attempts = 2;
    app.settings.topology.delayed_retry_delays = tiers(&[1, 1]);
    app.session_server().answers(500, "{}").await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-never")).await;
    let b = body_json(&app.next_output().await);
    assert_eq!(b["reason"], "retries_exhausted");
    assert_eq!(b["attempts"], 6, "three rounds of two calls");
    let d = app.next_dead_letter().await;
    assert_eq!(header(&d, "x-attempts").as_deref(), Some("6"));
    // The dead letter tells the producer's story: where it was published, no bookkeeping of
    // the worker's, no broker dead-lettering history from the delay queue.
    assert_eq!(header(&d, "x-bunq-delayed-retries"), None);
    assert_eq!(header(&d, "x-death"), None);
    assert_eq!(
        header(&d, "x-original-exchange").as_deref(),
        Some(app.names.input_exchange.as_str())
    );
    assert_eq!(
        header(&d, "x-original-routing-key").as_deref(),
        Some("provision.ready")
    );
    let first = b["first_attempt_at"].as_str().unwrap();
    let last = b["last_attempt_at"].as_str().unwrap();
    let parse = |t: &str| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).unwrap()
    };
    assert!(
        parse(last) - parse(first) >= time::Duration::seconds(2),
        "first_attempt_at is from the first round: {first} .. {last}"
    );
    assert_eq!(app.requests("session-server").await.len(), 6);
    app.cleanup().await;
}

#[tokio::test]
async fn no_delayed_retry_when_the_credential_expires_first() {
    let mut app = TestApp::new_with_binding(Some("session.failed")).await;
    app.settings.bunq.register_device = false;
    app.settings.retry.max_attempts = 1;
    app.settings.topology.delayed_retry_delays = tiers(&[3600]);
    app.session_server().answers(500, "{}").await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-expiring")).await; // expires in 1 h, the tier is 1 h
    let b = body_json(&app.next_output().await);
    assert_eq!(b["reason"], "credential_expired");
    let d = app.next_dead_letter().await;
    assert!(
        header(&d, "x-error-detail")
            .unwrap()
            .contains("no delayed retry")
    );
    app.cleanup().await;
}

#[tokio::test]
async fn delayed_retries_return_to_the_input_queue_only() {
    let mut app = TestApp::new().await;
    app.settings.bunq.register_device = false;
    app.settings.retry.max_attempts = 1;
    app.settings.topology.delayed_retry_delays = tiers(&[1]);
    // Declared by the test itself, so `cleanup` does not know it from the settings.
    app.extra_queues = vec![format!("{}.audit", app.names.input_queue)];
    app.session_server().first_calls(1).answers(503, "{}").await;
    app.session_server()
        .answers(200, &fixture("session-server.user-person.json"))
        .await;
    app.start_worker().await;
    // Someone else listens on the input exchange too.
    let audit = app.extra_queues[0].clone();
    app.channel
        .queue_declare(
            audit.as_str().into(),
            lapin::options::QueueDeclareOptions::default(),
            observer_queue_args(),
        )
        .await
        .unwrap();
    app.channel
        .queue_bind(
            audit.as_str().into(),
            app.names.input_exchange.as_str().into(),
            "provision.ready".into(),
            lapin::options::QueueBindOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    app.publish_json(&slim(1, "tok-audit")).await;
    assert_eq!(type_of(&app.next_output().await), "session.created");
    assert_eq!(
        app.requests("session-server").await.len(),
        2,
        "the retry came back"
    );
    assert_eq!(
        app.ready_count(&audit).await,
        1,
        "the audit queue saw the event once, not the retry"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn delay_queues_dead_letter_at_least_once() {
    // RabbitMQ retries at-least-once dead-lettering on a timer of minutes, too slow to watch in
    // a test; declaring the queue with exactly these arguments succeeds only if the worker
    // declared it so (a difference is PRECONDITION_FAILED).
    let mut app = TestApp::new().await;
    app.settings.topology.delayed_retry_delays = tiers(&[2]);
    let delay_queue = format!("{}.retry-2s", app.names.input_queue);
    app.start_worker().await;
    let mut args = lapin::types::FieldTable::default();
    for (k, v) in [
        ("x-queue-type", "quorum"),
        ("x-dead-letter-exchange", ""),
        ("x-dead-letter-routing-key", app.names.input_queue.as_str()),
        ("x-dead-letter-strategy", "at-least-once"),
        ("x-overflow", "reject-publish"),
    ] {
        args.insert(
            k.into(),
            lapin::types::AMQPValue::LongString(v.as_bytes().to_vec().into()),
        );
    }
    args.insert(
        "x-message-ttl".into(),
        lapin::types::AMQPValue::LongLongInt(2000),
    );
    app.channel
        .queue_declare(
            delay_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("the delay queue has exactly these arguments");
    app.cleanup().await;
}

/// bunq's 429 names a window longer than the delivery may be held (half the consumer timeout),
/// with delayed retry off and the credential good for an hour: the input waits for the
/// window's end in the window queue and then opens its session; nothing is failed.
#[tokio::test]
async fn a_window_longer_than_the_hold_waits_in_the_broker_and_the_session_opens() {
    let mut app = TestApp::new().await;
    app.settings.bunq.register_device = false;
    app.settings.broker.consumer_timeout = Duration::from_secs(4);
    app.settings.topology.delayed_retry_delays = tiers(&[]);
    let at = Arc::new(Mutex::new(Vec::new()));
    app.session_server()
        .first_calls(1)
        .responds_with(timed(
            app.answer(
                429,
                r#"{"Error":[{"error_description":"Too many requests. You can do a maximum of 1 calls per 5 second to this endpoint."}]}"#,
            ),
            &at,
        ))
        .await;
    app.session_server()
        .responds_with(timed(
            app.answer(200, &fixture("session-server.user-person.json")),
            &at,
        ))
        .await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-long-window")).await;
    let wait_queue = format!("{}.wait", app.names.input_queue);
    eventually("the input waits in the window queue", || async {
        app.ready_count(&wait_queue).await == 1
    })
    .await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created", "{:?}", body_json(&out));
    let calls = at.lock().unwrap().clone();
    assert_eq!(
        calls.len(),
        2,
        "one call inside the window would be one too many"
    );
    let gap = calls[1].0.duration_since(calls[0].0);
    assert!(
        gap >= Duration::from_secs(5),
        "called {gap:?} after the 429"
    );
    assert_eq!(app.ready_count(&app.names.dead_letter_queue).await, 0);
    assert_eq!(app.ready_count(&wait_queue).await, 0);
    app.cleanup().await;
}

/// A replica stops (SIGTERM) while its deliveries wait for paced slots, and another starts:
/// slots are taken when due, never ahead, so the stopped replica leaves none behind and the
/// next call comes one interval after the last (with Redis), not after every slot the waiting
/// deliveries would have reserved. Without Redis a new process cannot know when the last one
/// called, so its first call waits one interval.
async fn a_restart_leaves_no_idle_slots(redis: bool) {
    let mut app = TestApp::new().await;
    let prefix = redis.then(|| crate::fleet::use_redis(&mut app, &crate::fleet::redis_url()));
    app.settings.bunq.register_device = false;
    app.settings.bunq.session_rate_limit = Some(RateLimit {
        calls: 1,
        per: Duration::from_secs(2),
    });
    let at = Arc::new(Mutex::new(Vec::new()));
    app.session_server()
        .responds_with(timed(
            app.answer(200, &fixture("session-server.user-person.json")),
            &at,
        ))
        .await;
    app.start_worker().await;
    for i in 0..4 {
        app.publish_json(&slim(i, &format!("tok-restart-{i}")))
            .await;
    }
    eventually("the first call", || async {
        !at.lock().unwrap().is_empty()
    })
    .await;
    app.stop_worker().await.unwrap();
    let before = at.lock().unwrap().len();
    app.start_worker().await;
    eventually("every credential is called", || async {
        at.lock().unwrap().len() == 4
    })
    .await;
    let times: Vec<Instant> = at.lock().unwrap().iter().map(|(t, _)| *t).collect();
    let gap = times[before] - times[before - 1];
    // At 1 per 2 s, reserving ahead would have left the slots of the 3 waiting deliveries
    // (6 s and more) idle.
    assert!(
        gap >= Duration::from_millis(1900),
        "{gap:?}: within the pace"
    );
    if redis {
        assert!(
            gap < Duration::from_secs(5),
            "{gap:?} idle after the restart"
        );
    }
    for _ in 0..4 {
        assert_eq!(type_of(&app.next_output().await), "session.created");
    }
    app.cleanup().await;
    if let Some(p) = prefix {
        crate::fleet::remove_keys(&p).await;
    }
}

#[tokio::test]
async fn a_restart_leaves_no_idle_slots_in_a_fleet() {
    a_restart_leaves_no_idle_slots(true).await;
}

#[tokio::test]
async fn a_restarted_process_without_redis_waits_one_interval() {
    a_restart_leaves_no_idle_slots(false).await;
}

/// bunq teaches a pace slower than a delivery may be held (one call a minute, a 2 s hold):
/// every credential that cannot have a slot in time waits for it in the broker: no hand-back
/// loop, and no device-server call for a round that cannot reach session-server.
#[tokio::test]
async fn a_pace_slower_than_the_hold_parks_without_calling_bunq_again_and_again() {
    let mut app = TestApp::new().await;
    app.settings.broker.consumer_timeout = Duration::from_secs(4);
    app.bunq_registers_every_device().await;
    app.session_server()
        .first_calls(1)
        .answers(
            429,
            r#"{"Error":[{"error_description":"Too many requests. You can do a maximum of 1 calls per 60 second to this endpoint."}]}"#,
        )
        .await;
    app.session_server()
        .answers(200, &fixture("session-server.user-person.json"))
        .await;
    app.start_worker().await;
    for i in 0..3 {
        app.publish_json(&slim(i, &format!("tok-slow-pace-{i}")))
            .await;
    }
    let wait_queue = format!("{}.wait", app.names.input_queue);
    eventually("every credential waits in the window queue", || async {
        app.ready_count(&wait_queue).await == 3
    })
    .await;
    // The first wave registers its devices before bunq's pace is known; none after.
    let devices = app.requests("device-server").await.len();
    assert!(
        devices <= 3,
        "{devices} device-server calls for 3 credentials"
    );
    assert_eq!(app.requests("session-server").await.len(), 1);
    assert_eq!(app.ready_count(&app.names.input_queue).await, 0);
    assert_eq!(app.ready_count(&app.names.dead_letter_queue).await, 0);
    app.cleanup().await;
}
