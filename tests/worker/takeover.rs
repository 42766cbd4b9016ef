//! A replica pauses (SIGSTOP) after bunq answered, while its outcome is not yet confirmed at
//! the broker, for longer than its claim's lease; another replica takes the claim over with a
//! copy of the credential. One bunq call and one outcome all the same: the new holder settles
//! the credential from its record (the staged session, or the failure kept before its dead
//! letter went out), and the paused replica, resumed, stops publishing and hands its copy back.

use std::time::Duration;

use crate::{
    binary::Running,
    fleet::{calls_for, record_fields, redis_url, remove_keys, use_redis},
    helpers::*,
};

/// The scenario, with bunq's one answer `status`/`body` (any later call would open a session,
/// so a second call shows up as a `session.created` that should not be there).
async fn paused_while_settling(status: u16, body: &str, token: &str, expected: &str) {
    // Nothing bound to the output exchange: A's event keeps coming back, so A is still
    // publishing when it freezes.
    let mut app = TestApp::new_with_binding(None).await;
    app.settings.bunq.http_timeout = Duration::from_millis(1000);
    let args = app.args();
    let prefix = use_redis(&mut app, &redis_url());
    app.settings.bunq.register_device = false;
    app.settings.retry.max_attempts = 1;
    app.settings.redis.claim_lease = Duration::from_millis(3000);
    app.session_server()
        .first_calls(1)
        .answers(status, body)
        .await;
    app.session_server()
        .answers(200, &fixture("session-server.user-person.json"))
        .await;
    let env = [
        ("REDIS_URL", redis_url()),
        ("REDIS_KEY_PREFIX", prefix.clone()),
        ("CLAIM_LEASE_MS", "3000".into()),
        ("BUNQ_REGISTER_DEVICE", "false".into()),
        ("RETRY_MAX_ATTEMPTS", "1".into()),
        ("PREFETCH", "1".into()),
        ("RUST_LOG", "info,lapin=warn".into()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = Running::start(&args, &env);
    eventually("replica A consumes", || async {
        app.consumer_count(&app.names.input_queue).await == 1
    })
    .await;
    app.publish_json(&slim(31, token)).await;
    eventually("A publishes its outcome and it comes back", || async {
        a.text().contains("publish not confirmed")
    })
    .await;
    let a_epoch = epoch(&prefix).await;
    a.signal("-STOP");
    // Replica B, with another copy, once A's lease is over.
    app.start_worker().await;
    app.publish_json(
        &serde_json::json!({"PartnerUserProvision": {"id": 31, "credential": {
        "status": "PENDING_FIRST_USE", "token_value": token}}}),
    )
    .await;
    eventually("B takes the claim over", || async {
        epoch(&prefix).await != a_epoch
    })
    .await;
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
    let out = app.next_output().await;
    assert_eq!(type_of(&out), expected, "{:?}", body_json(&out));
    a.signal("-CONT");
    eventually("A hands its copy back and it is settled", || async {
        a.text().contains("before its outcome was published")
            && app.ready_count(&app.names.input_queue).await == 0
            && app.status.as_ref().is_some_and(|s| s.in_flight() == 0)
    })
    .await;
    // Whatever else comes out is the same event again (same message_id), never another one.
    while let Some(more) = app.next_output_within(Duration::from_secs(2)).await {
        assert_eq!(type_of(&more), expected, "{:?}", body_json(&more));
        assert_eq!(more.properties.message_id(), out.properties.message_id());
    }
    assert_eq!(calls_for(&app, token).await, 1, "{}", a.text());
    a.signal("-TERM");
    app.cleanup().await;
    remove_keys(&prefix).await;
}

#[tokio::test]
async fn a_replica_paused_while_publishing_a_refusal_costs_no_second_call() {
    paused_while_settling(
        400,
        &fixture("error.credentials-incorrect.json"),
        "tok-paused-refusal",
        "session.failed",
    )
    .await;
}

#[tokio::test]
async fn a_replica_paused_while_publishing_a_session_publishes_it_once() {
    paused_while_settling(
        200,
        &fixture("session-server.user-person.json"),
        "tok-paused-session",
        "session.created",
    )
    .await;
}

/// The fencing epoch of the one credential record under `prefix`.
async fn epoch(prefix: &str) -> Option<String> {
    let (_, records) = record_fields(prefix, &["ep"]).await;
    records.into_iter().next().and_then(|mut r| r.remove(0))
}
