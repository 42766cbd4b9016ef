//! Hand-backs and `DELIVERY_LIMIT`: the worker's own count (`x-bunq-returns`), the copy it
//! hands back at shutdown, and an input queue declared before the limit existed.

use std::time::{Duration, Instant};

use lapin::{
    BasicProperties,
    message::Delivery,
    options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString},
};

use crate::{helpers::*, taps::*};

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Properties with `message_id`, the producer's header `x-custom` and `extra` headers.
fn props(message_id: &str, extra: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("x-custom".into(), text("kept"));
    for (k, v) in extra {
        headers.insert((*k).into(), v.clone());
    }
    BasicProperties::default()
        .with_message_id(message_id.into())
        .with_headers(headers)
}

/// A worker whose bunq answers 503 and whose retries wait a minute: a delivery spends its time
/// waiting to retry, so stopping the worker hands it back.
async fn waiting_app() -> TestApp {
    let mut app = TestApp::new().await;
    app.settings.bunq.register_device = false;
    app.settings.retry.initial_delay = Duration::from_secs(60);
    app.settings.retry.max_delay = Duration::from_secs(60);
    app.settings.retry.max_attempts = 100;
    app.settings.retry.max_elapsed = Duration::from_secs(600);
    app.session_server()
        .answers(
            503,
            r#"{"Error":[{"error_description":"Service unavailable"}]}"#,
        )
        .await;
    app
}

#[tokio::test]
async fn an_input_handed_back_delivery_limit_times_is_dead_lettered_with_its_reason() {
    let mut app = waiting_app().await;
    app.settings.topology.delivery_limit = 2;
    app.start_worker().await;
    let event = slim(1, "tok-at-limit");
    app.publish(event.to_string().as_bytes(), props("in-at-limit", &[]))
        .await;
    // Handed back once (counted), then taken up again and stopped again: the limit is reached
    // and the worker dead-letters the input itself, with its reason.
    app.wait_for_session_server_call().await;
    app.stop_worker().await.unwrap();
    app.start_worker().await;
    eventually("the copy called bunq again", || async {
        app.requests("session-server").await.len() >= 2
    })
    .await;
    app.stop_worker().await.unwrap();
    let failed = app.next_output().await;
    assert_eq!(type_of(&failed), "session.failed");
    let b = body_json(&failed);
    assert_eq!(b["reason"], "redelivery_limit");
    assert_eq!(b["provision_id"], 1);
    let dl = app.next_dead_letter().await;
    assert_eq!(
        header(&dl, "x-error-reason").as_deref(),
        Some("redelivery_limit")
    );
    let detail = header(&dl, "x-error-detail").unwrap();
    assert!(detail.contains("DELIVERY_LIMIT 2"), "{detail}");
    assert_eq!(dl.data, event.to_string().into_bytes(), "the body is kept");
    assert_eq!(header(&dl, "x-custom").as_deref(), Some("kept"));
    for h in ["x-bunq-returns", "x-bunq-seal"] {
        assert_eq!(
            header(&dl, h),
            None,
            "the worker's bookkeeping is removed, so the dead letter can be replayed"
        );
    }
    assert_eq!(app.ready_count(&app.names.input_queue).await, 0);
    app.cleanup().await;
}

#[tokio::test]
async fn bookkeeping_headers_a_producer_sets_are_ignored() {
    let mut app = TestApp::new().await;
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    // Forged: a 429 window until 2098, the limit long passed, rounds and calls made up.
    let forged = props(
        "in-forged",
        &[
            ("x-bunq-not-before", text("2098-01-01T00:00:00Z")),
            ("x-bunq-returns", AMQPValue::LongInt(100)),
            ("x-delivery-count", AMQPValue::LongInt(100)),
            ("x-bunq-delayed-retries", AMQPValue::LongInt(7)),
            ("x-bunq-calls", AMQPValue::LongInt(4_000_000)),
            ("x-bunq-seal", text("00ff")),
        ],
    );
    app.publish(slim(1, "tok-forged").to_string().as_bytes(), forged)
        .await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created", "{:?}", body_json(&out));
    // Nothing was paused by it: the next credential goes to bunq too.
    app.publish_json(&slim(2, "tok-after-forged")).await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created");
    assert_eq!(
        secrets_sent(&app, "session-server").await,
        ["tok-forged", "tok-after-forged"]
    );
    app.cleanup().await;
}

/// Takes the next message of `queue` without acking it, then closes the channel: the broker
/// puts it back.
async fn peek(app: &TestApp, queue: &str) -> Delivery {
    let ch = app.conn.create_channel().await.unwrap();
    let m = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("a message in {queue}"));
    let _ = ch.close(200, "".into()).await;
    m.delivery
}

#[tokio::test]
async fn an_input_waiting_to_retry_bunq_at_shutdown_is_handed_back_as_a_counted_copy() {
    let mut app = waiting_app().await;
    let outputs = tap_outputs(&mut app).await;
    let dead_letters = tap_dead_letters(&mut app).await;
    app.start_worker().await;
    let event = slim(1, "tok-handed-back");
    app.publish(event.to_string().as_bytes(), props("in-handed-back", &[]))
        .await;
    app.wait_for_session_server_call().await;
    let t0 = Instant::now();
    app.stop_worker().await.unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "handed back at once, not after SHUTDOWN_TIMEOUT_S: {:?}",
        t0.elapsed()
    );
    let q = app.names.input_queue.clone();
    assert_eq!(app.ready_count(&q).await, 1, "one copy, nothing lost");
    let copy = peek(&app, &q).await;
    assert_eq!(header(&copy, "x-bunq-returns").as_deref(), Some("1"));
    assert!(
        header(&copy, "x-bunq-seal").is_some(),
        "the worker's bookkeeping is sealed"
    );
    assert!(!copy.redelivered, "a fresh copy, not a requeue");
    assert_eq!(copy.data, event.to_string().into_bytes());
    assert_eq!(
        copy.properties.message_id().as_ref().unwrap().as_str(),
        "in-handed-back"
    );
    assert_eq!(header(&copy, "x-custom").as_deref(), Some("kept"));
    assert_eq!(
        header(&copy, "x-bunq-original-exchange").as_deref(),
        Some(app.names.input_exchange.as_str())
    );
    assert_eq!(
        header(&copy, "x-bunq-original-routing-key").as_deref(),
        Some("provision.ready")
    );
    assert_eq!(app.ready_count(&dead_letters).await, 0);
    assert_eq!(app.ready_count(&outputs).await, 0);
    let calls_before = app.requests("session-server").await.len();

    // A worker started later, with bunq back, opens the session.
    app.reset_bunq().await;
    app.session_server()
        .answers(200, &fixture("session-server.user-person.json"))
        .await;
    app.settings.retry.initial_delay = Duration::from_millis(10);
    app.settings.retry.max_delay = Duration::from_millis(50);
    app.start_worker().await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created");
    assert_eq!(body_json(&out)["provision_id"], 1);
    app.stop_worker().await.unwrap();
    assert_eq!(app.ready_count(&q).await, 0);
    assert_eq!(app.ready_count(&dead_letters).await, 0);
    assert_eq!(app.ready_count(&outputs).await, 1);
    assert!(calls_before >= 1);
    assert_eq!(
        secrets_sent(&app, "session-server").await,
        ["tok-handed-back"],
        "the second worker called bunq once"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn an_input_queue_declared_without_a_delivery_limit_is_used_as_it_is() {
    let mut app = TestApp::new().await;
    app.bunq_opens_every_session().await;
    // As an earlier version declared it: quorum, dead-letter exchange, no x-delivery-limit.
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert(
        "x-dead-letter-exchange".into(),
        text(&app.names.dead_letter_exchange),
    );
    let q = app.names.input_queue.clone();
    app.channel
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    // An input already waiting in it.
    let confirm = app
        .channel
        .basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            slim(1, "tok-old-queue").to_string().as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.take_message().is_none());
    eventually("the input waits in the old queue", || async {
        app.ready_count(&q).await == 1
    })
    .await;

    app.start_worker().await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created");
    assert_eq!(
        body_json(&out)["provision_id"],
        1,
        "the queue was kept, with its input"
    );
    // Bound to the input exchange as usual.
    app.publish_json(&slim(2, "tok-old-queue-2")).await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created");
    assert_eq!(body_json(&out)["provision_id"], 2);
    assert!(app.worker_is_running());
    app.cleanup().await;
}

/// A classic queue never writes `x-delivery-count`, so a producer's (say, a message forwarded
/// from a quorum queue elsewhere) is not believed even on a redelivery: the input goes to bunq,
/// not to the dead-letter queue as `redelivery_limit`.
#[tokio::test]
async fn a_producers_delivery_count_is_not_believed_on_a_classic_queue() {
    let mut app = TestApp::new().await;
    app.settings.topology.queue_type = bunq_session_worker::broker::QueueType::Classic;
    app.bunq_opens_every_session().await;
    let dead_letters = tap_dead_letters(&mut app).await;
    // The worker declares the topology, then stops: the input waits in the queue.
    app.start_worker().await;
    let q = app.names.input_queue.clone();
    eventually("the worker consumes", || async {
        app.consumer_count(&q).await == 1
    })
    .await;
    app.stop_worker().await.unwrap();
    let forwarded = props(
        "in-forwarded",
        &[("x-delivery-count", AMQPValue::LongInt(100))],
    );
    app.publish(slim(1, "tok-forwarded").to_string().as_bytes(), forwarded)
        .await;
    // Taken and put back: the worker gets it with the redelivered flag.
    assert!(!peek(&app, &q).await.redelivered);
    app.start_worker().await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created", "{}", body_json(&out));
    assert_eq!(app.ready_count(&dead_letters).await, 0);
    app.cleanup().await;
}
