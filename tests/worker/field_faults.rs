//! Faults in the fields of an input or of bunq's answer: duplicate keys, an answer whose user
//! part cannot be read, and a refusal after a lost answer (`outcome_unknown`).

use std::{collections::HashMap, time::Duration};

use lapin::BasicProperties;
use serde_json::Value;

use crate::{helpers::*, proxy::TcpProxy, taps::*};

/// bunq's object dates: `2026-11-29 10:24:14.000000`, an hour from now.
fn bunq_expiry() -> String {
    (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(time::macros::format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second].000000"
        ))
        .unwrap()
}

#[tokio::test]
async fn duplicate_keys_the_worker_reads_are_dead_lettered_without_a_bunq_call() {
    let mut app = TestApp::new().await;
    app.bunq_opens_every_session().await;
    let outputs = tap_outputs(&mut app).await;
    let dead_letters = tap_dead_letters(&mut app).await;
    app.start_worker().await;

    let cred = |id: i64, token: &str| {
        format!(
            r#"{{"id": {id}, "credential": {{"status": "PENDING_FIRST_USE", "token_value": "{token}"}}}}"#
        )
    };
    // (name, body, the duplicated key's path); each body carries two values, A and B.
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "slim",
            r#"{"provision_id": 1, "token_value": "DUPVAL-A-slim", "token_value": "DUPVAL-B-slim"}"#
                .into(),
            "token_value",
        ),
        (
            "wrapped",
            r#"{"PartnerUserProvision": {"id": 2, "credential": {"status": "PENDING_FIRST_USE", "token_value": "DUPVAL-A-wrapped", "token_value": "DUPVAL-B-wrapped"}}}"#
                .into(),
            "PartnerUserProvision.credential.token_value",
        ),
        (
            "wrapper twice",
            format!(
                r#"{{"PartnerUserProvision": {}, "PartnerUserProvision": {}}}"#,
                cred(3, "DUPVAL-A-wrapper"),
                cred(4, "DUPVAL-B-wrapper")
            ),
            "PartnerUserProvision",
        ),
        (
            "callback",
            r#"{"NotificationUrl": {"category": "PARTNER_USER_PROVISION", "object": {"PartnerUserProvision": {"id": 5, "credential": {"status": "PENDING_FIRST_USE", "token_value": "DUPVAL-A-callback", "token_value": "DUPVAL-B-callback"}}}}}"#
                .into(),
            "NotificationUrl.object.PartnerUserProvision.credential.token_value",
        ),
        (
            "callback provision twice",
            format!(
                r#"{{"NotificationUrl": {{"object": {{"PartnerUserProvision": {}, "PartnerUserProvision": {}}}}}}}"#,
                cred(6, "DUPVAL-A-callback2"),
                cred(7, "DUPVAL-B-callback2")
            ),
            "NotificationUrl.object.PartnerUserProvision",
        ),
    ];
    for (name, body, _) in &cases {
        // The bodies are JSON that serde_json accepts (it keeps the last value).
        serde_json::from_str::<Value>(body).unwrap_or_else(|e| panic!("{name}: {e}"));
        app.publish(
            body.as_bytes(),
            BasicProperties::default().with_message_id(format!("dup-{name}").as_str().into()),
        )
        .await;
    }
    let mut got = HashMap::new();
    for _ in 0..cases.len() {
        let d = app.next_dead_letter().await;
        let id = d.properties.message_id().as_ref().unwrap().to_string();
        got.insert(id, d);
    }
    for (name, body, path) in &cases {
        let d = got
            .get(&format!("dup-{name}"))
            .unwrap_or_else(|| panic!("{name}: no dead letter"));
        assert_eq!(
            header(d, "x-error-reason").as_deref(),
            Some("duplicate_key"),
            "{name}"
        );
        let detail = header(d, "x-error-detail").unwrap();
        assert!(
            detail.contains(&format!(" {path} ")),
            "{name}: the detail names the path {path}: {detail}"
        );
        assert_eq!(header(d, "x-attempts").as_deref(), Some("0"), "{name}");
        let headers = headers_text(d);
        assert!(
            !headers.contains("DUPVAL-"),
            "{name}: a value in the dead-letter headers: {headers}"
        );
        assert_eq!(&d.data, body.as_bytes(), "{name}: the body is kept");
    }
    // Every outcome is settled once the worker has drained.
    app.stop_worker().await.unwrap();
    assert!(
        app.requests("device-server").await.is_empty(),
        "no bunq call"
    );
    assert!(
        app.requests("session-server").await.is_empty(),
        "no bunq call"
    );
    assert_eq!(app.ready_count(&outputs).await, 0, "no session.failed");
    assert_eq!(app.ready_count(&dead_letters).await, cases.len() as u32);
    assert_eq!(app.ready_count(&app.names.input_queue).await, 0);
    app.cleanup().await;
}

#[tokio::test]
async fn duplicates_in_fields_the_worker_ignores_still_open_a_session() {
    let mut app = TestApp::new().await;
    app.bunq_opens_every_session().await;
    let dead_letters = tap_dead_letters(&mut app).await;
    app.start_worker().await;
    let expiry = bunq_expiry();
    let cases = [
        (
            11,
            "tok-ignored-label",
            format!(
                r#"{{"PartnerUserProvision": {{"id": 11, "label_user": {{"display_name": "a", "display_name": "b"}}, "products": [{{"x": 1, "x": 2}}], "credential": {{"id": 21, "status": "PENDING_FIRST_USE", "expiry_time": "{expiry}", "token_value": "tok-ignored-label"}}}}}}"#
            ),
        ),
        (
            12,
            "tok-ignored-target",
            format!(
                r#"{{"NotificationUrl": {{"target_url": "https://a.example", "target_url": "https://b.example", "event_type": "X", "event_type": "Y", "object": {{"PartnerUserProvision": {{"id": 12, "credential": {{"id": 22, "status": "PENDING_FIRST_USE", "expiry_time": "{expiry}", "token_value": "tok-ignored-target"}}}}}}}}}}"#
            ),
        ),
        (
            13,
            "tok-ignored-note",
            r#"{"provision_id": 13, "credential_id": 23, "note": "a", "note": "b", "token_value": "tok-ignored-note"}"#.to_owned(),
        ),
    ];
    for (_, _, body) in &cases {
        app.publish(body.as_bytes(), BasicProperties::default())
            .await;
    }
    let mut seen = HashMap::new();
    for _ in 0..cases.len() {
        let out = app.next_output().await;
        assert_eq!(type_of(&out), "session.created");
        let b = body_json(&out);
        seen.insert(b["provision_id"].as_i64().unwrap(), b);
    }
    for (id, _, _) in &cases {
        let b = &seen[id];
        assert_eq!(b["credential_id"], id + 10);
        assert_eq!(b["session_id"], 2173);
    }
    app.stop_worker().await.unwrap();
    let mut sent = secrets_sent(&app, "session-server").await;
    sent.sort();
    let mut expected: Vec<_> = cases.iter().map(|(_, t, _)| t.to_string()).collect();
    expected.sort();
    assert_eq!(sent, expected, "each credential went to bunq once");
    assert_eq!(app.ready_count(&dead_letters).await, 0);
    app.cleanup().await;
}

#[tokio::test]
async fn a_session_bunq_made_is_published_however_its_user_part_looks() {
    let mut app = TestApp::new().await;
    app.bunq_registers_every_device().await;
    let api_key = fixture("session-server.user-api-key.json");
    let stringly = api_key.replace(r#""id":1363"#, r#""id":"1363""#);
    assert_ne!(stringly, api_key, "the fixture holds the user id 1363");
    app.session_server()
        .for_credential("t-string-id")
        .answers(200, &stringly)
        .await;
    app.session_server()
        .for_credential("t-unreadable-user")
        .answers(
            200,
            r#"{"Response":[{"Id":{"id":3401}},{"Token":{"id":3401,"created":"2026-11-29 09:25:11.594918","updated":"2026-11-29 09:25:11.594918","token":"SESSION-TOKEN-UNREADABLE-3401"}},{"UserApiKey":{"id":5,"granted_by_user":{"UserPerson":{"name":"x"}}}}]}"#,
        )
        .await;
    let outputs = tap_outputs(&mut app).await;
    let dead_letters = tap_dead_letters(&mut app).await;
    app.start_worker().await;

    app.publish_json(&slim(1, "t-string-id")).await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created");
    let b = body_json(&out);
    assert_eq!(b["provision_id"], 1);
    assert_eq!(b["session_id"], 2173);
    assert_eq!(b["session_token"], SESSION_TOKEN_API_KEY);
    assert_eq!(b["user_id"], 1363, "a string of digits is read as a number");
    assert_eq!(b["user_type"], "UserPerson");
    assert_eq!(b["user_api_key_id"], 1364);

    app.publish_json(&slim(2, "t-unreadable-user")).await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created", "the session is not lost");
    let b = body_json(&out);
    assert_eq!(b["provision_id"], 2);
    assert_eq!(b["session_id"], 3401);
    assert_eq!(b["session_token"], "SESSION-TOKEN-UNREADABLE-3401");
    assert_eq!(b["created_at"], "2026-11-29T09:25:11.594918Z");
    assert_eq!(b["user_id"], Value::Null);
    assert_eq!(b["user_type"], Value::Null);
    assert_eq!(b["user_api_key_id"], Value::Null);

    app.stop_worker().await.unwrap();
    assert_eq!(app.ready_count(&dead_letters).await, 0, "no dead letter");
    assert_eq!(
        app.ready_count(&outputs).await,
        2,
        "two events and no session.failed"
    );
    assert_eq!(app.requests("session-server").await.len(), 2, "no retry");
    app.cleanup().await;
}

#[tokio::test]
async fn a_2xx_without_a_token_is_still_unexpected_response() {
    let mut app = TestApp::new().await;
    app.bunq_registers_every_device().await;
    app.session_server()
        .answers(
            200,
            r#"{"Response":[{"Id":{"id":3402}},{"UserPerson":{"id":4410}}]}"#,
        )
        .await;
    app.start_worker().await;
    app.publish_json(&slim(3, "t-no-token")).await;
    let failed = app.next_output().await;
    assert_eq!(type_of(&failed), "session.failed");
    let b = body_json(&failed);
    assert_eq!(b["reason"], "unexpected_response");
    assert_eq!(b["http_status"], 200);
    assert_eq!(b["provision_id"], 3);
    let dl = app.next_dead_letter().await;
    assert_eq!(
        header(&dl, "x-error-reason").as_deref(),
        Some("unexpected_response")
    );
    let detail = header(&dl, "x-error-detail").unwrap();
    assert!(detail.contains("Token"), "{detail}");
    assert_eq!(app.requests("session-server").await.len(), 1, "no retry");
    app.cleanup().await;
}

/// A test whose session-server calls time out after 300 ms, without device-server.
async fn app_with_short_timeout() -> TestApp {
    let mut app = TestApp::new().await;
    app.settings.bunq.http_timeout = Duration::from_millis(300);
    app.settings.bunq.register_device = false;
    app
}

/// Checks a `session.failed` and its dead letter for `reason`; returns the dead letter's
/// detail.
async fn failed_with(app: &mut TestApp, provision_id: i64, reason: &str, token: &str) -> String {
    let failed = app.next_output().await;
    assert_eq!(type_of(&failed), "session.failed");
    let b = body_json(&failed);
    assert_eq!(b["reason"], reason, "{b}");
    assert_eq!(b["provision_id"], provision_id);
    assert_eq!(b["http_status"], 400);
    assert!(
        !String::from_utf8_lossy(&failed.data).contains(token),
        "no token in session.failed"
    );
    let dl = app.next_dead_letter().await;
    assert_eq!(header(&dl, "x-error-reason").as_deref(), Some(reason));
    assert!(
        !headers_text(&dl).contains(token),
        "no token in the headers"
    );
    header(&dl, "x-error-detail").unwrap()
}

#[tokio::test]
async fn a_refusal_after_a_lost_answer_is_outcome_unknown() {
    let mut app = app_with_short_timeout().await;
    // bunq opens the session, but its answer comes after the worker gave up waiting.
    let mut lost = app.answer(200, &fixture("session-server.user-person.json"));
    lost.delay = Some(Duration::from_secs(2));
    app.session_server()
        .first_calls(1)
        .responds_with(lost)
        .await;
    // The retry finds the credential spent.
    app.session_server()
        .answers(400, &fixture("error.credentials-incorrect.json"))
        .await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-lost-answer")).await;
    let detail = failed_with(&mut app, 1, "outcome_unknown", "tok-lost-answer").await;
    assert!(detail.contains("token reset"), "{detail}");
    assert!(detail.contains("TOKEN_RESET_REQUESTED"), "{detail}");
    assert_eq!(
        secrets_sent(&app, "session-server").await,
        ["tok-lost-answer", "tok-lost-answer"],
        "the lost attempt and the refused retry"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_refusal_after_a_reset_connection_is_outcome_unknown() {
    let mut app = app_with_short_timeout().await;
    app.session_server()
        .answers(400, &fixture("error.credentials-incorrect.json"))
        .await;
    // bunq behind a proxy that resets the connection carrying the first session-server call.
    let proxy = TcpProxy::start(app.bunq.address().to_string()).await;
    app.settings.bunq.api_url = format!("http://{}/v1", proxy.addr()).parse().unwrap();
    app.start_worker().await;
    proxy.reset_next_request();
    app.publish_json(&slim(4, "tok-reset-answer")).await;
    let detail = failed_with(&mut app, 4, "outcome_unknown", "tok-reset-answer").await;
    assert!(detail.contains("token reset"), "{detail}");
    assert_eq!(proxy.resets(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_refusal_without_a_lost_session_answer_stays_credential_rejected() {
    let mut app = app_with_short_timeout().await;
    app.settings.bunq.register_device = true;
    // A lost device-server answer opens no session: it does not make the refusal unknown.
    let mut slow_device = app.answer(200, DEVICE_SERVER_OK);
    slow_device.delay = Some(Duration::from_secs(2));
    app.device_server()
        .for_credential("tok-lost-device")
        .first_calls(1)
        .responds_with(slow_device)
        .await;
    app.bunq_registers_every_device().await;
    app.session_server()
        .answers(400, &fixture("error.credentials-incorrect.json"))
        .await;
    app.start_worker().await;
    for (id, token) in [(2, "tok-plain-refusal"), (3, "tok-lost-device")] {
        app.publish_json(&slim(id, token)).await;
        let detail = failed_with(&mut app, id, "credential_rejected", token).await;
        assert!(!detail.contains("token reset"), "{token}: {detail}");
        assert!(detail.contains("HTTP 400"), "{token}: {detail}");
    }
    assert_eq!(
        secrets_sent(&app, "session-server").await,
        ["tok-plain-refusal", "tok-lost-device"],
        "one session-server call each"
    );
    assert_eq!(
        secrets_sent(&app, "device-server")
            .await
            .iter()
            .filter(|s| *s == "tok-lost-device")
            .count(),
        2,
        "the lost device-server attempt was retried"
    );
    app.cleanup().await;
}
