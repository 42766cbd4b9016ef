//! Headers near the frame size: whatever a producer puts in them, the worker's events and copies
//! still fit in one AMQP frame, also after the broker adds its own headers.

use std::time::Duration;

use bunq_session_worker::{broker::link::FRAME_MAX, config::DelayTiers};
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString},
};

use crate::helpers::*;

fn big_header(key: &str, n: usize) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert(
        key.into(),
        AMQPValue::LongString(LongString::from("y".repeat(n))),
    );
    h
}

/// An input whose `traceparent` fills its frame: the event's own properties would not fit
/// beside it, so it is not carried over, and the session is published.
#[tokio::test]
async fn a_traceparent_that_fills_the_frame_is_not_carried_onto_the_event() {
    let mut app = TestApp::new().await;
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    // The input's properties: 2 flags + 4 table + 17 entry header + n, and 20 in the frame.
    let n = FRAME_MAX as usize - 43 - 60;
    let props = BasicProperties::default().with_headers(big_header("traceparent", n));
    app.publish(slim(7, "tok-traceparent").to_string().as_bytes(), props)
        .await;
    let out = app
        .next_output_within(Duration::from_secs(20))
        .await
        .expect("session.created for an input with a frame-filling traceparent");
    assert_eq!(type_of(&out), "session.created");
    assert_eq!(header(&out, "traceparent"), None);
    assert!(app.worker_is_running());
    app.cleanup().await;
}

/// A delayed-retry copy that would only just fit comes back from its delay queue with the
/// broker's `x-death` headers added: it goes out without the producer's headers instead, comes
/// back readable and is processed.
#[tokio::test]
async fn a_delayed_copy_keeps_room_for_the_headers_the_broker_adds() {
    let mut app = TestApp::new().await;
    app.settings.bunq.register_device = false;
    app.settings.retry.max_attempts = 2;
    app.settings.topology.delayed_retry_delays = DelayTiers(vec![Duration::from_secs(1)]);
    app.session_server()
        .first_calls(2)
        .answers(503, r#"{"Error":[{"error_description":"down"}]}"#)
        .await;
    app.session_server()
        .answers(200, &fixture("session-server.user-person.json"))
        .await;
    app.start_worker().await;
    // The copy is the input plus about 330 bytes of sealed bookkeeping: about 150 bytes under
    // the frame, less than what the delay queue's dead-lettering adds.
    let props = BasicProperties::default().with_headers(big_header("x-producer-context", 130_544));
    app.publish(slim(8, "tok-delayed-big").to_string().as_bytes(), props)
        .await;
    let out = app
        .next_output_within(Duration::from_secs(25))
        .await
        .expect("session.created after the delayed retry");
    assert_eq!(type_of(&out), "session.created");
    assert_eq!(body_json(&out)["provision_id"], serde_json::json!(8));
    assert_eq!(app.requests("session-server").await.len(), 3);
    assert_eq!(app.ready_count(&app.names.dead_letter_queue).await, 0);
    assert!(app.worker_is_running());
    app.cleanup().await;
}
