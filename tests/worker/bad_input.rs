//! Bad input of every kind reaches the dead-letter queue with its reason and no bunq call, and
//! the worker keeps running.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString},
};
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn each_kind_of_bad_input_is_dead_lettered_with_its_reason() {
    let mut app = TestApp::new().await;
    app.settings.max_message_bytes = 1024;
    app.bunq_opens_every_session().await;
    app.start_worker().await;

    let mut oversized = br#"{"provision_id": 1, "token_value": "t", "pad": ""#.to_vec();
    oversized.extend(std::iter::repeat_n(b'x', 2000));
    oversized.extend(b"\"}");
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "not json",
            b"hello, world".to_vec(),
            "malformed_json",
            "body is not JSON",
        ),
        (
            "truncated json",
            br#"{"provision_id": 1, "token_value": "#.to_vec(),
            "malformed_json",
            "end of input",
        ),
        ("empty", Vec::new(), "malformed_json", "body is empty"),
        (
            "not utf-8",
            vec![b'{', 0xff, 0xfe, b'}'],
            "not_utf8",
            "not valid UTF-8",
        ),
        (
            "oversized",
            oversized,
            "too_large",
            "larger than the limit of 1024 bytes",
        ),
        (
            "array",
            b"[1,2,3]".to_vec(),
            "invalid_event",
            "expected a JSON object",
        ),
        (
            "wrong type",
            br#"{"provision_id": {"a": 1}, "token_value": "t"}"#.to_vec(),
            "invalid_event",
            "provision_id: expected an integer or a string",
        ),
        (
            "token wrong type",
            br#"{"provision_id": 1, "token_value": 12345}"#.to_vec(),
            "invalid_event",
            "token_value: expected a string",
        ),
        (
            "missing token",
            br#"{"provision_id": 1}"#.to_vec(),
            "invalid_event",
            "token_value is missing",
        ),
        (
            "empty token",
            br#"{"provision_id": 1, "token_value": ""}"#.to_vec(),
            "invalid_event",
            "token_value is empty",
        ),
        (
            "bad time",
            br#"{"provision_id": 1, "token_value": "t", "expiry_time": "soon"}"#.to_vec(),
            "invalid_event",
            "expiry_time",
        ),
        (
            "unknown shape",
            br#"{"hello": "world"}"#.to_vec(),
            "invalid_event",
            "unrecognised event",
        ),
        (
            "other callback",
            br#"{"NotificationUrl": {"object": {"Payment": {"id": 1}}}}"#.to_vec(),
            "invalid_event",
            "no PartnerUserProvision",
        ),
    ];
    for (name, body, reason, detail) in &cases {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-custom".into(),
            AMQPValue::LongString(LongString::from(b"kept".to_vec())),
        );
        let props = BasicProperties::default()
            .with_message_id(format!("msg-{name}").as_str().into())
            .with_content_type("application/json".into())
            .with_headers(headers);
        app.publish(body, props).await;
        let d = app.next_dead_letter().await;
        assert_eq!(
            header(&d, "x-error-reason").as_deref(),
            Some(*reason),
            "{name}"
        );
        let got = header(&d, "x-error-detail").unwrap();
        assert!(got.contains(detail), "{name}: {got}");
        assert_eq!(header(&d, "x-attempts").as_deref(), Some("0"), "{name}");
        assert_eq!(
            header(&d, "x-original-exchange").as_deref(),
            Some(app.names.input_exchange.as_str())
        );
        assert_eq!(
            header(&d, "x-original-routing-key").as_deref(),
            Some("provision.ready")
        );
        let failed_at = header(&d, "x-failed-at").unwrap();
        assert!(
            time::OffsetDateTime::parse(&failed_at, &time::format_description::well_known::Rfc3339)
                .is_ok(),
            "{failed_at}"
        );
        // Body and properties are kept.
        assert_eq!(&d.data, body, "{name}");
        assert_eq!(
            d.properties.message_id().as_ref().unwrap().to_string(),
            format!("msg-{name}")
        );
        assert_eq!(header(&d, "x-custom").as_deref(), Some("kept"));
    }
    // Nothing reached bunq, no session event was published, and the worker still works.
    assert!(app.requests("session-server").await.is_empty());
    assert!(app.requests("device-server").await.is_empty());
    assert_eq!(app.ready_count(&app.names.output_queue).await, 0);
    assert!(app.worker_is_running());
    app.publish_json(&slim(9, "token-after-bad-input")).await;
    assert_eq!(
        body_json(&app.next_output().await)["provision_id"],
        json!(9)
    );
    app.cleanup().await;
}

/// Bodies of several frames are read and published whole, and headers almost as large as a
/// frame (`FRAME_MAX`, RabbitMQ's default, the most a producer can send) reach the worker and
/// stay on its dead letter.
#[tokio::test]
async fn inputs_and_dead_letters_of_several_frames_or_large_headers_arrive_whole() {
    use bunq_session_worker::broker::link::FRAME_MAX;
    // What a producer can put in headers on RabbitMQ's default 128 KiB frames, with room left.
    const HEADER_BYTES: usize = 120 * 1024;
    let mut app = TestApp::new().await;
    app.settings.max_message_bytes = 3 * FRAME_MAX as usize;
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    let pad = "x".repeat(2 * FRAME_MAX as usize);
    let mut big_headers = FieldTable::default();
    big_headers.insert(
        "x-producer-context".into(),
        AMQPValue::LongString(LongString::from("y".repeat(HEADER_BYTES))),
    );
    let props = || BasicProperties::default().with_headers(big_headers.clone());

    let mut ready = slim(41, "token-of-a-large-input");
    ready["pad"] = json!(pad);
    app.publish(ready.to_string().as_bytes(), props()).await;
    assert_eq!(
        body_json(&app.next_output().await)["provision_id"],
        json!(41)
    );

    // Not an event: its dead letter carries the body and the headers, byte for byte.
    let body = format!(r#"{{"hello": "{pad}"}}"#).into_bytes();
    app.publish(&body, props()).await;
    let d = app.next_dead_letter().await;
    assert_eq!(
        header(&d, "x-error-reason").as_deref(),
        Some("invalid_event")
    );
    assert_eq!(d.data, body);
    assert_eq!(
        header(&d, "x-producer-context").map(|h| h.len()),
        Some(HEADER_BYTES)
    );
    assert!(app.worker_is_running());
    app.cleanup().await;
}

/// Headers that reach the worker but leave no room for its own in one frame: the dead letter
/// goes out without them, saying so, instead of the broker closing the connection on every try.
#[tokio::test]
async fn a_copy_whose_headers_would_not_fit_in_a_frame_goes_out_without_the_producers() {
    use bunq_session_worker::{broker::link::FRAME_MAX, worker::PRODUCER_HEADERS_DROPPED_HEADER};
    let mut app = TestApp::new().await;
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    // The input's properties fit in a frame; with the worker's dead-letter headers they would not.
    let mut headers = FieldTable::default();
    headers.insert(
        "x-producer-context".into(),
        AMQPValue::LongString(LongString::from("y".repeat(FRAME_MAX as usize - 200))),
    );
    let props = BasicProperties::default()
        .with_message_id("msg-crowded".into())
        .with_headers(headers);
    app.publish(b"not json", props).await;
    let d = app.next_dead_letter().await;
    assert_eq!(
        header(&d, "x-error-reason").as_deref(),
        Some("malformed_json")
    );
    assert_eq!(header(&d, "x-producer-context"), None);
    let note = header(&d, PRODUCER_HEADERS_DROPPED_HEADER).unwrap();
    assert!(
        note.contains(&format!("frame of {FRAME_MAX} bytes")),
        "{note}"
    );
    assert!(note.contains("x-death"), "{note}");
    assert_eq!(d.data, b"not json");
    assert_eq!(
        d.properties.message_id().as_ref().map(|m| m.as_str()),
        Some("msg-crowded")
    );
    // The connection held: the worker goes on.
    app.publish_json(&slim(42, "token-after-crowded-headers"))
        .await;
    assert_eq!(
        body_json(&app.next_output().await)["provision_id"],
        json!(42)
    );
    assert!(app.worker_is_running());
    app.cleanup().await;
}
