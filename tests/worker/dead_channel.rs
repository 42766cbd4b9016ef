//! Work of a dead channel is not done twice: a delivery retrying bunq when its connection is
//! cut ends with exactly one outcome, settled by its redelivery.

use std::time::Duration;

use secrecy::SecretString;

use crate::{helpers::*, proxy::*, taps::*};

/// A test whose worker reaches the broker through a proxy (2 s heartbeats, 5 s shutdown
/// timeout), without device-server, retrying session-server every `delay` at most (full
/// jitter) up to `attempts` times.
async fn app_behind_proxy(delay: Duration, attempts: u32) -> (TestApp, TcpProxy) {
    let mut app = TestApp::new().await;
    let proxy = TcpProxy::start(amqp_host_port(&app.amqp_url)).await;
    app.settings.broker.amqp_url = SecretString::from(amqp_url_via(&app.amqp_url, proxy.addr()));
    app.settings.broker.heartbeat_s = 2;
    app.settings.shutdown_timeout = Duration::from_secs(5);
    app.settings.bunq.register_device = false;
    app.settings.retry.initial_delay = delay;
    app.settings.retry.max_delay = delay;
    app.settings.retry.max_attempts = attempts;
    (app, proxy)
}

const UNAVAILABLE: &str = r#"{"Error":[{"error_description":"Service unavailable"}]}"#;

#[tokio::test]
async fn a_delivery_retrying_when_its_channel_dies_is_dead_lettered_once() {
    const ATTEMPTS: u32 = 4;
    let (mut app, proxy) = app_behind_proxy(Duration::from_secs(1), ATTEMPTS).await;
    app.session_server().answers(503, UNAVAILABLE).await;
    let outputs = tap_outputs(&mut app).await;
    let dead_letters = tap_dead_letters(&mut app).await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-dead-channel")).await;
    app.wait_for_session_server_call().await;
    // The delivery waits to retry bunq; its connection dies and comes back.
    proxy.cut();
    let at_cut = app.requests("session-server").await.len();
    proxy.restore();

    eventually("a dead letter and a session.failed", || async {
        app.ready_count(&dead_letters).await >= 1 && app.ready_count(&outputs).await >= 1
    })
    .await;
    let q = app.names.input_queue.clone();
    eventually("the input is settled", || async {
        app.ready_count(&q).await == 0
    })
    .await;
    // Stopping drains whatever work is left: after it nothing more can arrive.
    app.stop_worker().await.unwrap();
    assert_eq!(
        app.ready_count(&q).await,
        0,
        "acked, not left for redelivery"
    );
    assert_eq!(
        app.ready_count(&dead_letters).await,
        1,
        "exactly one dead letter"
    );
    assert_eq!(
        app.ready_count(&app.names.dead_letter_queue).await,
        1,
        "exactly one dead letter in the worker's queue"
    );
    assert_eq!(app.ready_count(&outputs).await, 1, "exactly one event");
    let failed = &take_all(&app, &outputs).await[0];
    assert_eq!(type_of(failed), "session.failed");
    let b = body_json(failed);
    assert_eq!(b["reason"], "retries_exhausted");
    assert_eq!(b["http_status"], 503);
    let dl = &take_all(&app, &dead_letters).await[0];
    assert_eq!(
        header(dl, "x-error-reason").as_deref(),
        Some("retries_exhausted")
    );
    let total = app.requests("session-server").await.len();
    eprintln!(
        "session-server calls: {at_cut} before the cut, {total} in all; session.failed attempts {}, x-attempts {:?}",
        b["attempts"],
        header(dl, "x-attempts")
    );
    assert_eq!(
        total,
        at_cut + ATTEMPTS as usize,
        "after the cut only the redelivery called bunq (its {ATTEMPTS} attempts)"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_delivery_retrying_when_its_channel_dies_opens_one_session() {
    let (mut app, proxy) = app_behind_proxy(Duration::from_millis(300), 20).await;
    app.session_server()
        .first_calls(6)
        .answers(503, UNAVAILABLE)
        .await;
    app.session_server()
        .answers(200, &fixture("session-server.user-person.json"))
        .await;
    let outputs = tap_outputs(&mut app).await;
    let dead_letters = tap_dead_letters(&mut app).await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-dead-channel-ok")).await;
    app.wait_for_session_server_call().await;
    proxy.cut();
    let at_cut = app.requests("session-server").await.len();
    proxy.restore();

    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created");
    assert_eq!(body_json(&out)["provision_id"], 1);
    let q = app.names.input_queue.clone();
    eventually("the input is settled", || async {
        app.ready_count(&q).await == 0
    })
    .await;
    app.stop_worker().await.unwrap();
    assert_eq!(app.ready_count(&q).await, 0);
    assert_eq!(app.ready_count(&outputs).await, 1, "exactly one event");
    assert_eq!(app.ready_count(&dead_letters).await, 0, "no dead letter");
    let calls = app.requests("session-server").await.len();
    eprintln!("session-server calls: {at_cut} before the cut, {calls} in all");
    assert!(at_cut < 7, "the cut came before the session was opened");
    assert_eq!(
        calls, 7,
        "six 503s, then one session: the credential was spent once"
    );
    app.cleanup().await;
}
