//! bunq's answers: transient ones are retried, permanent ones give `session.failed` plus a
//! dead letter with the right reason and no retry; the credential's expiry bounds everything.

use std::time::Duration;

use serde_json::json;

use crate::{helpers::*, proxy::TcpProxy};

#[tokio::test]
async fn transient_failures_are_retried_until_success() {
    let mut app = TestApp::new().await;
    app.settings.bunq.http_timeout = Duration::from_millis(500);
    app.bunq_registers_every_device().await;
    let mut html = app.answer(502, "<html><body><h1>502 Bad Gateway</h1></body></html>");
    html.content_type = "text/html";
    let mut slow = app.answer(200, &fixture("session-server.user-api-key.json"));
    slow.delay = Some(Duration::from_secs(3));
    let rate_limited = app.answer(
        429,
        r#"{"Error":[{"error_description":"Too many requests. You can do a maximum of 1 calls per 1 second to this endpoint."}]}"#,
    );
    for resp in [
        app.answer(500, r#"{"Error":[{"error_description":"Internal error"}]}"#),
        html,
        app.answer(491, r#"{"Error":[{"error_description":"Maintenance"}]}"#),
        rate_limited,
        slow,
    ] {
        app.session_server()
            .first_calls(1)
            .responds_with(resp)
            .await;
    }
    app.session_server()
        .answers(200, &fixture("session-server.user-api-key.json"))
        .await;
    app.start_worker().await;

    app.publish_json(&slim(1, "token-transient")).await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created");
    assert_eq!(body_json(&out)["session_id"], 2173);
    let calls = app.requests("session-server").await;
    assert_eq!(calls.len(), 6, "500, 502, 491, 429, timeout, then success");
    let ids: std::collections::HashSet<_> = calls
        .iter()
        .map(|r| {
            r.headers
                .get("X-Bunq-Client-Request-Id")
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 6, "a new request id per attempt");
    assert_eq!(app.ready_count(&app.names.dead_letter_queue).await, 0);
    app.cleanup().await;
}

#[tokio::test]
async fn permanent_failures_give_session_failed_and_a_dead_letter_without_retry() {
    // 401 and 466 say the worker's installation or signature is refused: they open the breaker
    // instead (tests/worker/breaker.rs).
    let mut app = TestApp::new_with_binding(Some("session.failed")).await;
    app.bunq_registers_every_device().await;
    let creds = fixture("error.credentials-incorrect.json");
    let mut unsigned = app.answer(200, &fixture("session-server.user-person.json"));
    unsigned.sign = false;
    let mut forged = app.answer(200, &fixture("session-server.user-person.json"));
    forged.bad_signature = true;
    let cases = vec![
        (
            "t400",
            app.answer(400, &creds),
            "credential_rejected",
            Some(400),
        ),
        (
            "t490",
            app.answer(490, r#"{"Error":[{"error_description":"User error"}]}"#),
            "credential_rejected",
            Some(490),
        ),
        (
            "t403",
            app.answer(
                403,
                r#"{"Error":[{"error_description":"Insufficient authorisation."}]}"#,
            ),
            "forbidden",
            Some(403),
        ),
        (
            "t404",
            app.answer(
                404,
                r#"{"Error":[{"error_description":"Route not found."}]}"#,
            ),
            "unexpected_response",
            Some(404),
        ),
        (
            "tnotoken",
            app.answer(
                200,
                r#"{"Response":[{"Id":{"id":1}},{"UserPerson":{"id":2}}]}"#,
            ),
            "unexpected_response",
            None,
        ),
        ("tunsigned", unsigned, "response_signature_invalid", None),
        ("tforged", forged, "response_signature_invalid", None),
    ];
    for (token, resp, _, _) in &cases {
        app.session_server()
            .for_credential(token)
            .responds_with(resp.clone())
            .await;
    }
    app.start_worker().await;
    for (i, (token, _, reason, status)) in cases.iter().enumerate() {
        let event = slim(100 + i as i64, token);
        app.publish_json(&event).await;
        let failed = app.next_output().await;
        assert_eq!(type_of(&failed), "session.failed", "{token}");
        let b = body_json(&failed);
        assert_eq!(b["reason"], *reason, "{token}");
        assert_eq!(b["provision_id"], 100 + i as i64);
        assert_eq!(b["credential_id"], 1100 + i as i64);
        assert_eq!(b["external_uuid"], format!("ext-{}", 100 + i));
        assert_eq!(
            b["attempts"], 2,
            "{token}: device-server + one session-server, no retry"
        );
        if let Some(s) = status {
            assert_eq!(b["http_status"], *s, "{token}");
        } else {
            assert_eq!(b["http_status"], 200, "{token}");
        }
        assert!(b["first_attempt_at"].is_string() && b["last_attempt_at"].is_string());
        assert!(
            !failed
                .data
                .windows(token.len())
                .any(|w| w == token.as_bytes()),
            "no token in session.failed"
        );
        let dl = app.next_dead_letter().await;
        assert_eq!(header(&dl, "x-error-reason").as_deref(), Some(*reason));
        assert_eq!(header(&dl, "x-attempts").as_deref(), Some("2"));
        assert_eq!(dl.data, event.to_string().into_bytes());
        assert_eq!(
            app.requests("session-server")
                .await
                .iter()
                .filter(|r| r.body_json::<serde_json::Value>().unwrap()["secret"] == *token)
                .count(),
            1,
            "{token}: no retry"
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn bunq_error_description_is_reported() {
    let mut app = TestApp::new_with_binding(Some("session.failed")).await;
    app.settings.bunq.register_device = false;
    app.session_server()
        .answers(400, &fixture("error.credentials-incorrect.json"))
        .await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok")).await;
    let b = body_json(&app.next_output().await);
    assert_eq!(
        b["error_description"],
        "User credentials are incorrect. Incorrect API key or IP address."
    );
    assert_eq!(b["attempts"], 1);
    let dl = app.next_dead_letter().await;
    assert!(header(&dl, "x-error-detail").unwrap().contains("HTTP 400"));
    app.cleanup().await;
}

#[tokio::test]
async fn an_expired_credential_makes_no_call_and_expiry_cuts_retries_short() {
    let mut app = TestApp::new_with_binding(Some("session.failed")).await;
    // Retries would go on for 60 s; the credential expires in 2 s.
    app.settings.retry.initial_delay = Duration::from_millis(300);
    app.settings.retry.max_delay = Duration::from_millis(300);
    app.settings.retry.max_attempts = 200;
    app.settings.retry.max_elapsed = Duration::from_secs(60);
    app.bunq_registers_every_device().await;
    // Records when each session-server call arrives.
    let arrivals = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (seen, down) = (
        arrivals.clone(),
        app.answer(503, r#"{"Error":[{"error_description":"down"}]}"#),
    );
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path("/v1/session-server"))
        .respond_with(move |req: &wiremock::Request| {
            seen.lock().unwrap().push(time::OffsetDateTime::now_utc());
            wiremock::Respond::respond(&down, req)
        })
        .mount(&app.bunq)
        .await;
    app.start_worker().await;

    let mut expired = slim(1, "tok-expired");
    expired["expiry_time"] = json!("2020-01-01 00:00:00.000000");
    app.publish_json(&expired).await;
    let b = body_json(&app.next_output().await);
    assert_eq!(b["reason"], "credential_expired");
    assert_eq!(b["attempts"], 0);
    assert_eq!(b["http_status"], serde_json::Value::Null);
    let dl = app.next_dead_letter().await;
    assert_eq!(
        header(&dl, "x-error-reason").as_deref(),
        Some("credential_expired")
    );
    assert!(app.requests("session-server").await.is_empty());
    assert!(app.requests("device-server").await.is_empty());

    let expiry = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let mut soon = slim(2, "tok-soon");
    soon["expiry_time"] = json!(
        expiry
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    );
    app.publish_json(&soon).await;
    let b = body_json(&app.next_output().await);
    assert_eq!(b["reason"], "credential_expired");
    assert_eq!(b["http_status"], 503);
    let attempts = b["attempts"].as_u64().unwrap();
    assert!(attempts >= 2, "it did retry: {attempts}");
    // No call starts after the expiry (arrival at the fake is a few ms after the start).
    for at in arrivals.lock().unwrap().iter() {
        assert!(
            *at < expiry + time::Duration::milliseconds(200),
            "a call arrived at {at}, after the expiry {expiry}"
        );
    }
    assert_eq!(
        app.requests("session-server").await.len() as u64,
        attempts - 1
    );
    app.cleanup().await;
}

#[tokio::test]
async fn retries_are_bounded_by_max_attempts() {
    let mut app = TestApp::new_with_binding(Some("session.failed")).await;
    app.settings.retry.max_attempts = 3;
    app.settings.bunq.register_device = false;
    app.session_server().answers(500, "{}").await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok")).await;
    let b = body_json(&app.next_output().await);
    assert_eq!(b["reason"], "retries_exhausted");
    assert_eq!(b["attempts"], 3);
    assert_eq!(b["http_status"], 500);
    assert_eq!(app.requests("session-server").await.len(), 3);
    app.cleanup().await;
}

#[tokio::test]
async fn a_connection_reset_is_retried() {
    let mut app = TestApp::new().await;
    app.bunq_opens_every_session().await;
    // bunq behind a proxy that, once armed, resets the connection of the next request.
    let proxy = TcpProxy::start(app.bunq.address().to_string()).await;
    app.settings.bunq.api_url = format!("http://{}/v1", proxy.addr()).parse().unwrap();
    app.settings.bunq.register_device = false;
    app.start_worker().await; // installation goes through unharmed
    proxy.reset_next_request();
    app.publish_json(&slim(1, "tok-reset")).await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created");
    assert_eq!(
        proxy.resets(),
        1,
        "the first session-server attempt was reset"
    );
    assert_eq!(
        app.requests("session-server").await.len(),
        1,
        "the retry reached bunq"
    );
    app.cleanup().await;
}
