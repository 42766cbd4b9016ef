//! Pacing session-server: a process-wide rate limit, and a 429 that pauses every call; durable
//! delayed retry through per-tier delay queues.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use wiremock::{Mock, Request, Respond, ResponseTemplate, matchers};

use crate::helpers::*;

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

async fn mount_timed(
    app: &TestApp,
    token: Option<&str>,
    resp: Signed,
    times: Option<u64>,
    at: &Arc<Mutex<Vec<(Instant, String)>>>,
) {
    let mut m = Mock::given(matchers::method("POST"))
        .and(matchers::path("/v1/session-server"))
        .and(ValidBunqRequest(app.state.clone()));
    if let Some(t) = token {
        m = m.and(matchers::body_partial_json(
            serde_json::json!({ "secret": t }),
        ));
    }
    let mut m = m.respond_with(Timed {
        inner: resp,
        at: at.clone(),
    });
    if let Some(n) = times {
        m = m.up_to_n_times(n);
    }
    m.mount(&app.bunq).await;
}

#[tokio::test]
async fn a_429_pauses_every_session_server_call_for_its_window() {
    let mut app = TestApp::new().await;
    app.extend_args(&["--bunq-register-device", "false"]);
    let at = Arc::new(Mutex::new(Vec::new()));
    let limited = app.answer(
        429,
        r#"{"Error":[{"error_description":"Too many requests. You can do a maximum of 1 calls per 2 second to this endpoint."}]}"#,
    );
    mount_timed(&app, Some("tok-a"), limited, Some(1), &at).await;
    mount_timed(
        &app,
        None,
        app.answer(200, &fixture("session-server.user-person.json")),
        None,
        &at,
    )
    .await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-a")).await;
    eventually("the 429", || async { !at.lock().unwrap().is_empty() }).await;
    // Another delivery arrives inside the window: it must wait too.
    app.publish_json(&slim(2, "tok-b")).await;
    let mut got = vec![
        body_json(&app.next_output().await)["provision_id"]
            .as_i64()
            .unwrap(),
        body_json(&app.next_output().await)["provision_id"]
            .as_i64()
            .unwrap(),
    ];
    got.sort();
    assert_eq!(got, [1, 2]);
    let calls = at.lock().unwrap().clone();
    assert_eq!(calls.len(), 3, "429, then one call each");
    let (t429, _) = calls[0];
    for (t, secret) in &calls[1..] {
        let after = t.duration_since(t429);
        assert!(
            after >= Duration::from_secs(2),
            "{secret} called {after:?} after the 429, inside its 2 s window"
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn session_server_calls_are_spaced_by_the_rate_limit() {
    let mut app = TestApp::new().await;
    app.extend_args(&[
        "--bunq-register-device",
        "false",
        "--bunq-session-rate-limit",
        "2/1s",
    ]);
    let at = Arc::new(Mutex::new(Vec::new()));
    mount_timed(
        &app,
        None,
        app.answer(200, &fixture("session-server.user-person.json")),
        None,
        &at,
    )
    .await;
    app.start_worker().await;
    for i in 0..4 {
        app.publish_json(&slim(i, &format!("tok-{i}"))).await;
    }
    for _ in 0..4 {
        app.next_output().await;
    }
    let mut times: Vec<Instant> = at.lock().unwrap().iter().map(|(t, _)| *t).collect();
    times.sort();
    for w in times.windows(2) {
        let gap = w[1].duration_since(w[0]);
        // One call every 500 ms, measured where the calls arrive: a loaded machine may delay
        // one request more than the next, so allow 100 ms of slack (unpaced calls come
        // within a few ms of each other).
        assert!(
            gap >= Duration::from_millis(400),
            "calls {gap:?} apart under 2/1s"
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn a_spent_retry_budget_parks_the_delivery_and_it_comes_back() {
    let mut app = TestApp::new().await;
    app.extend_args(&[
        "--bunq-register-device",
        "false",
        "--retry-max-attempts",
        "2",
        "--delayed-retry-delays-s",
        "1,2",
    ]);
    app.extra_queues = vec![
        format!("{}.retry-1s", app.names.input_queue),
        format!("{}.retry-2s", app.names.input_queue),
    ];
    let at = Arc::new(Mutex::new(Vec::new()));
    // Two failures spend the in-process budget; the call after the delay succeeds.
    mount_timed(
        &app,
        None,
        app.answer(503, r#"{"Error":[{"error_description":"down"}]}"#),
        Some(2),
        &at,
    )
    .await;
    mount_timed(
        &app,
        None,
        app.answer(200, &fixture("session-server.user-person.json")),
        None,
        &at,
    )
    .await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-delayed")).await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created");
    let calls = at.lock().unwrap().clone();
    assert_eq!(calls.len(), 3);
    assert!(
        calls[2].0.duration_since(calls[1].0) >= Duration::from_secs(1),
        "the third call waited out the 1 s tier"
    );
    assert_eq!(app.ready_count(&app.names.dead_letter_queue).await, 0);
    app.cleanup().await;
}

#[tokio::test]
async fn delayed_retries_end_in_the_dead_letter_queue_when_every_tier_is_spent() {
    let mut app = TestApp::new_with_binding(Some("session.failed")).await;
    app.extend_args(&[
        "--bunq-register-device",
        "false",
        "--retry-max-attempts",
        "2",
        "--delayed-retry-delays-s",
        "1,1",
    ]);
    app.extra_queues = vec![format!("{}.retry-1s", app.names.input_queue)];
    app.mount("session-server", None, app.answer(500, "{}"), None)
        .await;
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
    app.extend_args(&[
        "--bunq-register-device",
        "false",
        "--retry-max-attempts",
        "1",
        "--delayed-retry-delays-s",
        "3600",
    ]);
    app.extra_queues = vec![format!("{}.retry-3600s", app.names.input_queue)];
    app.mount("session-server", None, app.answer(500, "{}"), None)
        .await;
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
async fn waiting_for_a_pacing_slot_is_not_charged_to_the_retry_budget() {
    let mut app = TestApp::new().await;
    // Four deliveries at once, one call every 500 ms: the last waits ~1.5 s for its slot,
    // longer than the 1 s retry budget, and must still succeed.
    app.extend_args(&[
        "--bunq-register-device",
        "false",
        "--bunq-session-rate-limit",
        "2/1s",
        "--retry-max-elapsed-s",
        "1",
    ]);
    app.mount(
        "session-server",
        None,
        app.answer(200, &fixture("session-server.user-person.json")),
        None,
    )
    .await;
    app.start_worker().await;
    for i in 0..4 {
        app.publish_json(&slim(i, &format!("tok-burst-{i}"))).await;
    }
    for _ in 0..4 {
        assert_eq!(type_of(&app.next_output().await), "session.created");
    }
    assert_eq!(app.ready_count(&app.names.dead_letter_queue).await, 0);
    app.cleanup().await;
}

#[tokio::test]
async fn delayed_retries_return_to_the_input_queue_only() {
    let mut app = TestApp::new().await;
    app.extend_args(&[
        "--bunq-register-device",
        "false",
        "--retry-max-attempts",
        "1",
        "--delayed-retry-delays-s",
        "1",
    ]);
    app.extra_queues = vec![
        format!("{}.retry-1s", app.names.input_queue),
        format!("{}.audit", app.names.input_queue),
    ];
    app.mount("session-server", None, app.answer(503, "{}"), Some(1))
        .await;
    app.mount(
        "session-server",
        None,
        app.answer(200, &fixture("session-server.user-person.json")),
        None,
    )
    .await;
    app.start_worker().await;
    // Someone else listens on the input exchange too.
    let audit = app.extra_queues[1].clone();
    app.channel
        .queue_declare(
            audit.as_str().into(),
            lapin::options::QueueDeclareOptions::default(),
            lapin::types::FieldTable::default(),
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
    app.extend_args(&["--delayed-retry-delays-s", "2"]);
    let delay_queue = format!("{}.retry-2s", app.names.input_queue);
    app.extra_queues = vec![delay_queue.clone()];
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
