//! Acknowledgement order, shutdown and start-up conflicts.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::{options::*, types::FieldTable};

use crate::helpers::*;

#[tokio::test]
async fn a_delivery_stays_unacked_until_its_publish_is_confirmed() {
    // No queue is bound for session.created: every publish comes back unroutable.
    let mut app = TestApp::new_with_binding(None).await;
    app.settings.shutdown_timeout = Duration::from_secs(1);
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-unacked")).await;
    app.wait_for_session_server_call().await;
    // While the worker retries the publish, the delivery is unacked: not ready in the queue.
    assert_eq!(app.ready_count(&app.names.input_queue).await, 0);
    app.stop_worker().await.unwrap();
    // Stopped without a confirmed publish: the broker gives the delivery back.
    let ch = app.conn.create_channel().await.unwrap();
    let mut c = ch
        .basic_consume(
            app.names.input_queue.as_str().into(),
            "probe".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = tokio::time::timeout(WAIT, c.next())
        .await
        .expect("redelivered")
        .unwrap()
        .unwrap();
    assert!(d.redelivered);
    assert_eq!(body_json(&d)["provision_id"], 1);
    d.ack(BasicAckOptions::default()).await.unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn a_returned_publish_is_retried_and_acked_once_routable() {
    let mut app = TestApp::new_with_binding(None).await;
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    app.publish_json(&slim(2, "tok-late-binding")).await;
    app.wait_for_session_server_call().await;
    app.channel
        .queue_bind(
            app.names.output_queue.as_str().into(),
            app.names.output_exchange.as_str().into(),
            "session.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created");
    assert_eq!(
        app.requests("session-server").await.len(),
        1,
        "bunq was called once"
    );
    app.stop_worker().await.unwrap();
    assert_eq!(
        app.ready_count(&app.names.input_queue).await,
        0,
        "acked after the confirm"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_work() {
    let mut app = TestApp::new().await;
    app.bunq_registers_every_device().await;
    let mut slow = app.answer(200, &fixture("session-server.user-api-key.json"));
    slow.delay = Some(Duration::from_millis(1500));
    app.session_server().responds_with(slow).await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-drain")).await;
    app.wait_for_session_server_call().await;
    // Stop while bunq is still answering: the work finishes and is acked.
    app.stop_worker().await.unwrap();
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created");
    assert_eq!(
        app.ready_count(&app.names.input_queue).await,
        0,
        "acked, not left for redelivery"
    );
    // A delivery published after the stop waits in the queue.
    app.publish_json(&slim(2, "tok-after-stop")).await;
    eventually("the new delivery waits", || async {
        app.ready_count(&app.names.input_queue).await == 1
    })
    .await;
    app.cleanup().await;
}

#[tokio::test]
async fn an_inequivalent_queue_stops_start_up_with_a_message_naming_it() {
    let app = TestApp::new().await;
    // Someone declared the input queue as a classic queue.
    let dlx = app.names.dead_letter_exchange.clone();
    app.declare_classic_queue(&app.names.input_queue, &[("x-dead-letter-exchange", &dlx)])
        .await;
    let err = app.build_worker().await.unwrap_err();
    let err = chain(&err);
    assert!(
        err.contains(&format!("queue '{}'", app.names.input_queue)),
        "{err}"
    );
    assert!(err.contains("'x-queue-type'"), "{err}");
    assert!(
        err.contains("already exists on the broker with different arguments"),
        "{err}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_classic_queue_type_can_be_configured() {
    let mut app = TestApp::new().await;
    app.settings.topology.queue_type = bunq_session_worker::broker::QueueType::Classic;
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-classic")).await;
    assert_eq!(type_of(&app.next_output().await), "session.created");
    app.cleanup().await;
}
