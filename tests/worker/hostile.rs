//! Hostile or absurd input from the producer, bunq or an operator: each case once broke the
//! worker (a panic, a stuck delivery, a lost dead letter); each now has an outcome.

use std::{num::NonZeroU16, time::Duration};

use lapin::{BasicProperties, options::ExchangeDeleteOptions};
use serde_json::json;
use wiremock::{Mock, ResponseTemplate, matchers};

use crate::helpers::*;

#[tokio::test]
async fn absurd_numbers_from_bunq_do_not_strand_a_session() {
    let mut app = TestApp::new().await;
    app.settings.bunq.register_device = false;
    app.session_server()
        .for_credential("t-timeout")
        .answers(
            200,
            r#"{"Response":[{"Id":{"id":1}},{"Token":{"token":"s1","created":"2026-11-29 09:25:11.000000"}},{"UserPerson":{"id":2,"session_timeout":1000000000000000}}]}"#,
        )
        .await;
    app.session_server()
        .for_credential("t-date")
        .answers(
            200,
            r#"{"Response":[{"Id":{"id":3}},{"Token":{"token":"s2","created":"9999-12-31 23:00:00.000000"}},{"UserPerson":{"id":4}}]}"#,
        )
        .await;
    app.start_worker().await;
    for (i, token, session_id) in [(1, "t-timeout", 1), (2, "t-date", 3)] {
        app.publish_json(&slim(i, token)).await;
        let out = app.next_output().await;
        assert_eq!(type_of(&out), "session.created", "{token}");
        let b = body_json(&out);
        assert_eq!(b["session_id"], session_id);
        assert!(
            b["expires_at"].as_str().unwrap().starts_with("9999-12-31"),
            "{b}"
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn a_rate_limit_window_past_the_credentials_expiry_ends_as_credential_expired() {
    let mut app = TestApp::new_with_binding(Some("session.failed")).await;
    app.settings.bunq.register_device = false;
    let mut slow = app.answer(
        429,
        r#"{"Error":[{"error_description":"Too many requests. You can do a maximum of 1 calls per 18446744073709551615 second to this endpoint."}]}"#,
    );
    slow.delay = Some(Duration::from_millis(1200));
    app.session_server().responds_with(slow).await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok")).await;
    let b = body_json(&app.next_output().await);
    // Waiting for bunq's window is not a failure, but this one ends after the credential does.
    assert_eq!(b["reason"], "credential_expired");
    assert_eq!(b["http_status"], 429);
    assert_eq!(b["attempts"], 1, "no call inside the window");
    app.cleanup().await;
}

#[tokio::test]
async fn a_dead_letter_drops_the_inputs_ttl_and_user_id() {
    let mut app = TestApp::new().await;
    app.start_worker().await;
    let props = BasicProperties::default()
        .with_expiration("60000".into())
        .with_user_id("guest".into())
        .with_message_id("m-ttl".into());
    app.publish(b"not json", props).await;
    let d = app.next_dead_letter().await;
    assert_eq!(d.properties.expiration(), &None);
    assert_eq!(d.properties.user_id(), &None);
    assert_eq!(*d.properties.delivery_mode(), Some(2));
    assert_eq!(header(&d, "x-original-user-id").as_deref(), Some("guest"));
    assert_eq!(
        d.properties.message_id().as_ref().unwrap().as_str(),
        "m-ttl"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_deleted_dead_letter_exchange_is_declared_again() {
    let mut app = TestApp::new().await;
    app.start_worker().await;
    app.channel
        .exchange_delete(
            app.names.dead_letter_exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    app.publish(b"not json", BasicProperties::default()).await;
    let d = app.next_dead_letter().await;
    assert_eq!(
        header(&d, "x-error-reason").as_deref(),
        Some("malformed_json")
    );
    assert!(app.worker_is_running());
    app.cleanup().await;
}

#[tokio::test]
async fn an_unroutable_session_failed_does_not_hold_the_worker() {
    // Only session.created has a queue; session.failed is routed nowhere.
    let mut app = TestApp::new_with_binding(Some("session.created")).await;
    app.settings.broker.prefetch = NonZeroU16::new(2).unwrap();
    app.settings.retry.max_elapsed = Duration::from_secs(1);
    app.settings.bunq.register_device = false;
    app.session_server()
        .for_credential("bad-1")
        .answers(400, &fixture("error.credentials-incorrect.json"))
        .await;
    app.session_server()
        .for_credential("bad-2")
        .answers(400, &fixture("error.credentials-incorrect.json"))
        .await;
    app.session_server()
        .for_credential("good")
        .answers(200, &fixture("session-server.user-person.json"))
        .await;
    app.start_worker().await;
    app.publish_json(&slim(1, "bad-1")).await;
    app.publish_json(&slim(2, "bad-2")).await;
    app.publish_json(&slim(3, "good")).await;
    // Both failures are in the dead-letter queue and the good event got through.
    let mut reasons = vec![
        header(&app.next_dead_letter().await, "x-error-reason").unwrap(),
        header(&app.next_dead_letter().await, "x-error-reason").unwrap(),
    ];
    reasons.sort();
    assert_eq!(reasons, ["credential_rejected", "credential_rejected"]);
    let out = app.next_output().await;
    assert_eq!(body_json(&out)["provision_id"], 3);
    let q = app.names.input_queue.clone();
    app.stop_worker().await.unwrap();
    assert_eq!(app.ready_count(&q).await, 0, "all three were acked");
    app.cleanup().await;
}

#[tokio::test]
async fn an_installation_token_no_header_can_carry_stops_start_up() {
    let app = TestApp::new().await;
    Mock::given(matchers::method("POST"))
        .and(matchers::path("/v1/installation"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"Response": [
                {"Id": {"id": 1}},
                {"Token": {"token": "INSTALL-TOK\nSECRET-77"}},
                {"ServerPublicKey": {"server_public_key": app.state.server_public_pem}}
            ]})),
        )
        .with_priority(1)
        .mount(&app.bunq)
        .await;
    let err = app.build_worker().await.unwrap_err();
    let err = chain(&err);
    assert_eq!(
        err,
        "installation token holds characters an HTTP header cannot carry"
    );
    assert!(!app.context_file.exists(), "nothing saved");
    app.cleanup().await;
}

#[tokio::test]
async fn a_multibyte_provision_id_at_the_limit_round_trips() {
    let mut app = TestApp::new().await;
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    let id = "é".repeat(64); // 128 bytes: the limit, and it becomes the correlation_id
    app.publish_json(&json!({"provision_id": id, "token_value": "tok"}))
        .await;
    let out = app.next_output().await;
    assert_eq!(body_json(&out)["provision_id"], json!(id));
    assert_eq!(
        out.properties.correlation_id().as_ref().unwrap().as_str(),
        id
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_deleted_dead_letter_queue_is_declared_again_without_calling_bunq_twice() {
    let mut app = TestApp::new().await;
    app.settings.bunq.register_device = false;
    app.settings.retry.max_elapsed = Duration::from_secs(1);
    app.session_server()
        .answers(400, &fixture("error.credentials-incorrect.json"))
        .await;
    app.start_worker().await;
    app.channel
        .queue_delete(
            app.names.dead_letter_queue.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    app.publish_json(&slim(1, "tok-rejected")).await;
    let dlq = app.names.dead_letter_queue.clone();
    eventually("the dead-letter queue is declared again", || async {
        app.queue_exists(&dlq).await
    })
    .await;
    let d = app.next_dead_letter().await;
    assert_eq!(
        header(&d, "x-error-reason").as_deref(),
        Some("credential_rejected")
    );
    assert_eq!(
        app.requests("session-server").await.len(),
        1,
        "the spent credential went to bunq once"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn the_same_credential_in_another_shape_is_not_sent_to_bunq_twice() {
    let mut app = TestApp::new().await;
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    let token = "tok-two-shapes";
    app.publish_json(&json!({"provision_id": 7, "token_value": token}))
        .await;
    let first = app.next_output().await;
    assert_eq!(type_of(&first), "session.created");
    // The poller forwards bunq's object for the same credential.
    app.publish_json(&json!({"PartnerUserProvision": {"id": 7, "credential": {"status": "PENDING_FIRST_USE", "token_value": token}}}))
        .await;
    let q = app.names.input_queue.clone();
    eventually("the second copy is acked", || async {
        app.ready_count(&q).await == 0
    })
    .await;
    app.stop_worker().await.unwrap();
    assert_eq!(app.requests("session-server").await.len(), 1);
    assert_eq!(
        app.ready_count(&app.names.output_queue).await,
        0,
        "no second event"
    );
    assert_eq!(app.ready_count(&app.names.dead_letter_queue).await, 0);
    assert_eq!(
        first.properties.message_id().as_ref().unwrap().to_string(),
        bunq_session_worker::identity::output_message_id(
            "session.created",
            &bunq_session_worker::identity::input_identity(
                json!({"token_value": token, "provision_id": 7})
                    .to_string()
                    .as_bytes(),
                65536
            )
        ),
        "the message_id follows the credential, not the JSON"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_replayed_dead_letter_is_processed_again() {
    let mut app = TestApp::new_with_binding(Some("session.#")).await;
    app.settings.bunq.register_device = false;
    app.session_server().first_calls(1).answers(503, "{}").await;
    app.session_server()
        .answers(200, &fixture("session-server.user-person.json"))
        .await;
    app.settings.retry.max_attempts = 1;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-replay")).await;
    assert_eq!(
        body_json(&app.next_output().await)["reason"],
        "retries_exhausted"
    );
    let d = app.next_dead_letter().await;
    // The operator replays the dead letter once bunq is back.
    app.publish(&d.data, lapin::BasicProperties::default())
        .await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created");
    assert_eq!(app.requests("session-server").await.len(), 2);
    app.cleanup().await;
}

#[tokio::test]
async fn without_a_consumer_timeout_sessions_still_open() {
    let mut app = TestApp::new().await;
    app.settings.broker.consumer_timeout = Duration::ZERO;
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-no-timeout")).await;
    assert_eq!(type_of(&app.next_output().await), "session.created");
    app.cleanup().await;
}
