//! Every input shape and user-object variant becomes a correct `session.created`.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString},
};
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn every_input_shape_opens_a_session() {
    let mut app = TestApp::new().await;
    app.bunq_opens_every_session().await;
    app.start_worker().await;

    let ready = fixture("partner-user-provision.ready.json");
    let mut wrapped: serde_json::Value = serde_json::from_str(&ready).unwrap();
    // Keep the fixture's shape but move its expiry into the future.
    let expiry = (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(time::macros::format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second].000000"
        ))
        .unwrap();
    wrapped["PartnerUserProvision"]["credential"]["expiry_time"] = json!(expiry);
    // Its own credential: the same token in another shape would be recognised as a repeat.
    let mut unwrapped = wrapped["PartnerUserProvision"].clone();
    unwrapped["credential"]["token_value"] = json!("token-unwrapped");
    let mut callback: serde_json::Value =
        serde_json::from_str(&fixture("notification.partner-user-provision.json")).unwrap();
    callback["NotificationUrl"]["object"]["PartnerUserProvision"]["credential"]["expiry_time"] =
        json!(expiry);

    let cases = [
        (slim(1, "token-slim"), json!(1), json!(1001)),
        (wrapped, json!(48213), json!(90211)),
        (unwrapped, json!(48213), json!(90211)),
        (callback, json!(48215), json!(90212)),
        (
            json!({"provision_id": "p-str", "token_value": "token-str"}),
            json!("p-str"),
            json!(null),
        ),
    ];
    for (event, provision_id, credential_id) in cases {
        app.publish_json(&event).await;
        let out = app.next_output().await;
        assert_eq!(type_of(&out), "session.created", "{event}");
        let b = body_json(&out);
        assert_eq!(b["provision_id"], provision_id);
        assert_eq!(b["credential_id"], credential_id);
        assert_eq!(b["session_id"], 2173);
        assert_eq!(b["session_token"], SESSION_TOKEN_API_KEY);
    }
    // One device-server and one session-server call per event, all valid.
    let sessions = app.requests("session-server").await;
    assert_eq!(sessions.len(), 5);
    assert_eq!(app.requests("device-server").await.len(), 5);
    for r in &sessions {
        check_request(&app.state, r).unwrap();
    }
    app.cleanup().await;
}

#[tokio::test]
async fn session_created_has_the_documented_body_and_properties() {
    let mut app = TestApp::new().await;
    app.bunq_opens_every_session().await;
    app.start_worker().await;

    let event = slim(42, "token-props");
    let mut headers = FieldTable::default();
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(tp.as_bytes().to_vec())),
    );
    let props = BasicProperties::default()
        .with_correlation_id("corr-1".into())
        .with_message_id("in-1".into())
        .with_headers(headers);
    app.publish(event.to_string().as_bytes(), props).await;
    let out = app.next_output().await;
    let b = body_json(&out);
    assert_eq!(b["schema_version"], 1);
    assert_eq!(b["provision_id"], 42);
    assert_eq!(b["external_uuid"], "ext-42");
    assert_eq!(b["credential_id"], 1042);
    assert_eq!(b["session_id"], 2173);
    assert_eq!(b["user_id"], 1363);
    assert_eq!(b["user_api_key_id"], 1364);
    assert_eq!(b["user_type"], "UserPerson");
    assert_eq!(b["session_timeout_seconds"], 604800);
    assert_eq!(b["created_at"], "2026-11-29T09:25:11.594918Z");
    assert_eq!(b["expires_at"], "2026-12-06T09:25:11.594918Z");
    // The fingerprint is of the key the worker registered at installation.
    let registered = app
        .state
        .client_public_key_pem
        .lock()
        .unwrap()
        .clone()
        .unwrap();
    let der: String = registered
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let der = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, der).unwrap();
    let fp = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der));
    assert_eq!(b["installation_key_sha256"], fp);

    let p = &out.properties;
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(type_of(&out), "session.created");
    assert_eq!(out.routing_key.as_str(), "session.created");
    assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "corr-1");
    assert_eq!(p.app_id().as_ref().unwrap().as_str(), "bunq-session-worker");
    assert!(p.timestamp().unwrap() > 1_700_000_000);
    assert_eq!(header(&out, "traceparent").as_deref(), Some(tp));
    let id = p.message_id().as_ref().unwrap().to_string();
    assert_eq!(
        id,
        bunq_session_worker::identity::output_message_id(
            "session.created",
            &bunq_session_worker::identity::input_identity(event.to_string().as_bytes(), 65536)
        )
    );

    // The same input again is recognised: its outcome is already safe at the broker, so no
    // second event and no second bunq call.
    app.publish(
        event.to_string().as_bytes(),
        BasicProperties::default().with_message_id("in-2".into()),
    )
    .await;
    let q = app.names.input_queue.clone();
    eventually("the repeat is acked", || async {
        app.ready_count(&q).await == 0
    })
    .await;
    // Correlation falls back to the input's message_id ...
    let mut other = slim(44, "token-props-3");
    other["external_uuid"] = json!("other");
    app.publish(
        other.to_string().as_bytes(),
        BasicProperties::default().with_message_id("in-3".into()),
    )
    .await;
    let again = app.next_output().await;
    assert_eq!(body_json(&again)["provision_id"], 44);
    assert_eq!(
        again.properties.correlation_id().as_ref().unwrap().as_str(),
        "in-3"
    );
    // ... and to the provision id when neither is given.
    app.publish_json(&slim(43, "token-props-2")).await;
    let third = app.next_output().await;
    assert_eq!(
        third.properties.correlation_id().as_ref().unwrap().as_str(),
        "43"
    );
    assert_ne!(
        third.properties.message_id().as_ref().unwrap().to_string(),
        id
    );

    // device-server carried the credential's token, the description and permitted IPs.
    let dev = &app.requests("device-server").await[0];
    let body: serde_json::Value = serde_json::from_slice(&dev.body).unwrap();
    assert_eq!(
        body,
        json!({"description": "bunq-session-worker", "secret": "token-props", "permitted_ips": ["*"]})
    );
    // Each attempt has its own request id.
    let ids: std::collections::HashSet<_> = app
        .bunq
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter_map(|r| {
            r.headers
                .get("X-Bunq-Client-Request-Id")
                .map(|v| v.to_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(
        ids.len(),
        7,
        "installation + 3 x (device-server, session-server): the repeated input made no call"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn every_user_object_variant() {
    let mut app = TestApp::new().await;
    app.bunq_registers_every_device().await;
    app.session_server()
        .for_credential("t-key")
        .answers(200, &fixture("session-server.user-api-key.json"))
        .await;
    app.session_server()
        .for_credential("t-person")
        .answers(200, &fixture("session-server.user-person.json"))
        .await;
    app.session_server()
        .for_credential("t-company")
        .answers(200, &fixture("session-server.user-company.json"))
        .await;
    app.session_server()
        .for_credential("t-psp")
        .answers(
            200,
            r#"{"Response":[{"Id":{"id":3303}},{"Token":{"token":"psp-session-token"}},{"UserPaymentServiceProvider":{"id":4412,"session_timeout":1800}}]}"#,
        )
        .await;
    app.start_worker().await;
    let cases = [
        ("t-key", 2173, 1363, json!(1364), "UserPerson", 604800),
        ("t-person", 3301, 4410, json!(null), "UserPerson", 3600),
        ("t-company", 3302, 4411, json!(null), "UserCompany", 604800),
        (
            "t-psp",
            3303,
            4412,
            json!(null),
            "UserPaymentServiceProvider",
            1800,
        ),
    ];
    for (i, (token, session_id, user_id, key_id, user_type, timeout)) in
        cases.into_iter().enumerate()
    {
        app.publish_json(&slim(i as i64, token)).await;
        let b = body_json(&app.next_output().await);
        assert_eq!(b["session_id"], session_id, "{token}");
        assert_eq!(b["user_id"], user_id, "{token}");
        assert_eq!(b["user_api_key_id"], key_id, "{token}");
        assert_eq!(b["user_type"], user_type, "{token}");
        assert_eq!(b["session_timeout_seconds"], timeout, "{token}");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn not_ready_provisions_are_skipped_without_bunq_calls() {
    let mut app = TestApp::new().await;
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    app.publish(
        fixture("partner-user-provision.not-ready.json").as_bytes(),
        BasicProperties::default(),
    )
    .await;
    app.publish_json(&json!({"PartnerUserProvision": {"id": 5, "credential": {"status": "ACTIVE", "token_value": null}}}))
        .await;
    app.publish_json(&json!({"PartnerUserProvision": {"id": 6, "credential": {"status": "EXPIRED", "token_value": "old"}}}))
        .await;
    // A ready event after them proves the skipped ones were handled (acked, not dead-lettered).
    app.publish_json(&slim(7, "token-after-skips")).await;
    let b = body_json(&app.next_output().await);
    assert_eq!(b["provision_id"], 7);
    let q = app.names.input_queue.clone();
    eventually("input queue empty", || async {
        app.ready_count(&q).await == 0
    })
    .await;
    assert_eq!(app.ready_count(&app.names.dead_letter_queue).await, 0);
    assert_eq!(app.requests("session-server").await.len(), 1);
    assert_eq!(
        app.ready_count(&app.names.output_queue).await,
        0,
        "only one output event"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_context_file_is_reused_and_a_device_registration_can_be_turned_off() {
    let mut app = TestApp::new().await;
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-1")).await;
    app.next_output().await;
    app.stop_worker().await.unwrap();
    assert_eq!(app.requests("installation").await.len(), 1);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&app.context_file)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }
    // A second worker reuses the saved installation: no new POST /installation.
    app.settings.bunq.register_device = false;
    app.start_worker().await;
    app.publish_json(&slim(2, "tok-2")).await;
    let b = body_json(&app.next_output().await);
    assert_eq!(b["provision_id"], 2);
    assert_eq!(app.requests("installation").await.len(), 1);
    assert_eq!(
        app.requests("device-server").await.len(),
        1,
        "device-server skipped when off"
    );
    assert_eq!(app.requests("session-server").await.len(), 2);
    app.cleanup().await;
}
