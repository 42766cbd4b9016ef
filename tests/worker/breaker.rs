//! The breaker: when bunq refuses the worker's own set-up, inputs are handed back, not
//! dead-lettered; trials go one at a time; a session closes it again.

use std::{collections::BTreeSet, time::Duration};

use bunq_session_worker::failure::FailureReason;
use secrecy::SecretString;

use crate::{helpers::*, proxy::*, taps::*};

const NOT_VALID: &str = r#"{"Error":[{"error_description":"Authentication token not valid."}]}"#;
const BAD_SIGNATURE: &str =
    r#"{"Error":[{"error_description":"The request signature is invalid."}]}"#;

/// Why the breaker is open, if it is.
fn open(app: &TestApp) -> Option<bunq_session_worker::breaker::Open> {
    app.status.as_ref().unwrap().breaker_open()
}

/// Waits until the breaker is open and every one of `n` inputs is back, ready, in the input
/// queue (the consumer pauses while it is open, so nothing holds them).
async fn wait_open_with_all_queued(app: &TestApp, n: u32) {
    let q = app.names.input_queue.clone();
    eventually(
        "the breaker is open and the inputs are back in the queue",
        || async { open(app).is_some() && app.ready_count(&q).await == n },
    )
    .await;
}

/// Empties the fake bunq and mounts it answering sessions: installation, device-server and
/// session-server 200 for any credential.
async fn bunq_accepts_again(app: &TestApp) {
    app.reset_bunq().await;
    app.bunq_opens_every_session().await;
}

/// The provision ids of the next `n` outputs, each a `session.created`. The first may come up to
/// the breaker's longest back-off later: on a slow machine the trials that failed meanwhile have
/// doubled the wait past WAIT.
async fn created_after_trial(app: &mut TestApp, n: i64) -> BTreeSet<i64> {
    let within = bunq_session_worker::breaker::MAX_BACKOFF + WAIT;
    let mut created = BTreeSet::new();
    while created.len() < n as usize {
        let out = app
            .next_output_within(within)
            .await
            .expect("a session.created once bunq accepts again");
        assert_eq!(type_of(&out), "session.created", "{}", body_json(&out));
        created.insert(body_json(&out)["provision_id"].as_i64().unwrap());
    }
    created
}

#[tokio::test]
async fn a_refused_installation_opens_the_breaker_and_the_inputs_wait_for_bunq() {
    refused_installation(true).await;
}

/// The same with one input first and the other nine once the breaker is open: no burst of
/// concurrent refusals.
#[tokio::test]
async fn a_refused_installation_opens_the_breaker_and_later_inputs_wait_for_bunq() {
    refused_installation(false).await;
}

/// bunq answers session-server with 401 to 10 inputs (published at once when `burst`, else
/// one first and nine once the breaker is open): nothing is dead-lettered or reported, the
/// inputs wait in the queue, trials go one at a time, and once bunq accepts the worker all ten
/// get their session.
async fn refused_installation(burst: bool) {
    let mut app = TestApp::new().await;
    app.settings.bunq.register_device = false;
    app.session_server().answers(401, NOT_VALID).await;
    let outputs = tap_outputs(&mut app).await;
    let dead_letters = tap_dead_letters(&mut app).await;
    app.start_worker().await;
    const N: i64 = 10;
    let first = if burst { N } else { 1 };
    for i in 0..first {
        app.publish_json(&slim(i, &format!("tok-breaker-{i}")))
            .await;
    }
    app.wait_for_session_server_call().await;
    eventually("the breaker opens", || async { open(&app).is_some() }).await;
    let opened = open(&app).unwrap();
    let first_wait = opened
        .retry_at
        .saturating_duration_since(tokio::time::Instant::now());
    let refused = app.requests("session-server").await.len();
    eprintln!(
        "the breaker opened after {refused} session-server calls; first trial in {first_wait:?}"
    );
    for i in first..N {
        app.publish_json(&slim(i, &format!("tok-breaker-{i}")))
            .await;
    }
    assert_eq!(opened.reason, FailureReason::SignatureRejected);
    assert!(opened.detail.contains("401"), "{}", opened.detail);
    assert!(
        !opened.detail.contains("tok-breaker"),
        "no token: {}",
        opened.detail
    );
    // Documented: "after 1 s, then doubling up to 60 s, one delivery is tried".
    assert!(
        first_wait <= bunq_session_worker::breaker::FIRST_BACKOFF,
        "the first trial comes {first_wait:?} after the breaker opened (after {refused} refused calls), not within 1 s"
    );

    wait_open_with_all_queued(&app, N as u32).await;
    // A trial: one delivery goes to bunq, is refused, and the breaker opens again.
    let opened_at = std::time::Instant::now();
    let before_trial = app.requests("session-server").await.len();
    eventually("a trial reaches bunq", || async {
        app.requests("session-server").await.len() > before_trial
    })
    .await;
    wait_open_with_all_queued(&app, N as u32).await;
    let while_open = app.requests("session-server").await.len() - before_trial;
    assert!(
        while_open <= 2,
        "{while_open} session-server calls in the {:?} the breaker was open",
        opened_at.elapsed()
    );
    assert_eq!(app.ready_count(&dead_letters).await, 0, "no dead letter");
    assert_eq!(app.ready_count(&outputs).await, 0, "no session.failed");
    assert!(app.worker_is_running());

    // bunq accepts the worker again: the next trial closes the breaker and all 10 go through.
    bunq_accepts_again(&app).await;
    assert_eq!(created_after_trial(&mut app, N).await, (0..N).collect());
    assert!(open(&app).is_none(), "the breaker is closed");
    app.stop_worker().await.unwrap();
    assert_eq!(app.ready_count(&app.names.input_queue).await, 0);
    assert_eq!(app.ready_count(&dead_letters).await, 0, "no dead letter");
    assert_eq!(
        app.ready_count(&outputs).await,
        N as u32,
        "one event per input"
    );
    assert_eq!(
        app.requests("session-server").await.len(),
        N as usize,
        "once bunq accepted, each credential went to it once"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn bunqs_signature_refusal_under_a_400_opens_the_breaker_at_once() {
    let mut app = TestApp::new().await;
    app.settings.bunq.register_device = false;
    app.session_server().answers(400, BAD_SIGNATURE).await;
    let outputs = tap_outputs(&mut app).await;
    let dead_letters = tap_dead_letters(&mut app).await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-bad-signature")).await;
    wait_open_with_all_queued(&app, 1).await;
    let opened = open(&app).unwrap();
    assert_eq!(opened.reason, FailureReason::SignatureRejected);
    assert!(
        opened.detail.contains("The request signature is invalid."),
        "{}",
        opened.detail
    );
    assert!(
        (1..=2).contains(&app.requests("session-server").await.len()),
        "the first refusal opened it (threshold 5)"
    );
    assert_eq!(app.ready_count(&dead_letters).await, 0);
    assert_eq!(app.ready_count(&outputs).await, 0);
    app.cleanup().await;
}

#[tokio::test]
async fn threshold_refusals_in_a_row_on_different_credentials_open_the_breaker() {
    let mut app = TestApp::new().await;
    app.settings.breaker_threshold = 3;
    app.settings.bunq.register_device = false;
    app.session_server()
        .answers(400, &fixture("error.credentials-incorrect.json"))
        .await;
    let outputs = tap_outputs(&mut app).await;
    let dead_letters = tap_dead_letters(&mut app).await;
    app.start_worker().await;
    // One at a time, so the order of the refusals is known.
    for i in 1..=2 {
        app.publish_json(&slim(i, &format!("tok-threshold-{i}")))
            .await;
        eventually("the refusal is dead-lettered and reported", || async {
            app.ready_count(&dead_letters).await == i as u32
                && app.ready_count(&outputs).await == i as u32
        })
        .await;
        assert!(open(&app).is_none(), "{i} refusals do not open it");
    }
    app.publish_json(&slim(3, "tok-threshold-3")).await;
    eventually("the third refusal opens the breaker", || async {
        open(&app).is_some()
    })
    .await;
    assert_eq!(
        open(&app).unwrap().reason,
        FailureReason::CredentialRejected
    );
    for i in 4..=5 {
        app.publish_json(&slim(i, &format!("tok-threshold-{i}")))
            .await;
    }
    wait_open_with_all_queued(&app, 3).await;
    // Through one trial, refused the same way.
    let before_trial = app.requests("session-server").await.len();
    eventually("a trial reaches bunq", || async {
        app.requests("session-server").await.len() > before_trial
    })
    .await;
    wait_open_with_all_queued(&app, 3).await;

    assert_eq!(app.ready_count(&dead_letters).await, 2);
    assert_eq!(app.ready_count(&outputs).await, 2);
    let mut failed: Vec<i64> = Vec::new();
    for d in take_all(&app, &outputs).await {
        let b = body_json(&d);
        assert_eq!(b["reason"], "credential_rejected");
        failed.push(b["provision_id"].as_i64().unwrap());
    }
    failed.sort();
    assert_eq!(failed, [1, 2], "only the first two were dead-lettered");
    for d in take_all(&app, &dead_letters).await {
        assert_eq!(
            header(&d, "x-error-reason").as_deref(),
            Some("credential_rejected")
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn inputs_survive_a_connection_loss_while_the_breaker_is_open() {
    let mut app = TestApp::new().await;
    let proxy = TcpProxy::start(amqp_host_port(&app.amqp_url)).await;
    app.settings.broker.amqp_url = SecretString::from(amqp_url_via(&app.amqp_url, proxy.addr()));
    app.settings.broker.heartbeat_s = 2;
    app.settings.shutdown_timeout = Duration::from_secs(5);
    app.settings.bunq.register_device = false;
    app.session_server().answers(401, NOT_VALID).await;
    let dead_letters = tap_dead_letters(&mut app).await;
    app.start_worker().await;
    app.publish_json(&slim(0, "tok-open-cut-0")).await;
    eventually("the breaker opens", || async { open(&app).is_some() }).await;
    const N: i64 = 5;
    for i in 1..N {
        app.publish_json(&slim(i, &format!("tok-open-cut-{i}")))
            .await;
    }
    wait_open_with_all_queued(&app, N as u32).await;
    // The connection is lost and comes back while the breaker is open.
    let status = app.status.clone().unwrap();
    proxy.cut();
    eventually("the worker notices", || async { !status.connected().await }).await;
    proxy.restore();
    eventually("the worker is back", || async { status.connected().await }).await;
    bunq_accepts_again(&app).await;
    assert_eq!(created_after_trial(&mut app, N).await, (0..N).collect());
    assert_eq!(app.ready_count(&dead_letters).await, 0);
    app.cleanup().await;
}
