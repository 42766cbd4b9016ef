//! Metrics and probes, read over HTTP from a running worker.

use std::time::Duration;

use secrecy::SecretString;

use crate::{helpers::*, proxy::*};

async fn get(app: &TestApp, path: &str) -> (u16, String) {
    let addr = app
        .status
        .as_ref()
        .unwrap()
        .metrics_addr()
        .expect("the worker serves its probes");
    let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The value of one sample line (`name{labels} value`) of the Prometheus text, 0 when absent.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An input whose `x-bunq-seal` does not verify (another API context wrote it, or a producer
/// forged it) counts as fresh, and is counted: never silently.
#[tokio::test]
async fn a_seal_this_replica_cannot_verify_is_counted() {
    let mut app = TestApp::new().await;
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    let name = "bunq_session_worker_foreign_seals_total";
    let before = sample(&get(&app, "/metrics").await.1, name, &[]);
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "x-bunq-seal".into(),
        lapin::types::AMQPValue::LongString("00ff".into()),
    );
    let props = lapin::BasicProperties::default().with_headers(headers);
    app.publish(slim(1, "tok-foreign-seal").to_string().as_bytes(), props)
        .await;
    assert_eq!(type_of(&app.next_output().await), "session.created");
    let after = sample(&get(&app, "/metrics").await.1, name, &[]);
    assert!(after >= before + 1.0, "{before} → {after}");
    app.cleanup().await;
}

#[tokio::test]
async fn every_outcome_is_counted_and_read_back_from_metrics() {
    let mut app = TestApp::new().await;
    // Mounted first: wiremock answers with the first mock that matches.
    app.session_server()
        .for_credential("rejected-metrics")
        .answers(400, &fixture("error.credentials-incorrect.json"))
        .await;
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    let (_, before) = get(&app, "/metrics").await;
    let deliveries = "bunq_session_worker_deliveries_total";
    let count = |text: &str, outcome: &str, reason: &str| {
        sample(
            text,
            deliveries,
            &[("outcome", outcome), ("reason", reason)],
        )
    };
    app.publish_json(&slim(1, "ok-metrics")).await;
    app.publish_json(&slim(1, "ok-metrics")).await; // the same credential again: already settled
    app.publish(b"not json", Default::default()).await;
    app.publish_json(&slim(2, "rejected-metrics")).await;
    app.publish_json(&serde_json::json!({"PartnerUserProvision": {"id": 3, "credential": null}}))
        .await;
    let counted = |after: &str| {
        count(after, "created", "") - count(&before, "created", "") >= 1.0
            && count(after, "already_settled", "created")
                - count(&before, "already_settled", "created")
                >= 1.0
            && count(after, "skipped", "") - count(&before, "skipped", "") >= 1.0
            && count(after, "dead_lettered", "malformed_json")
                - count(&before, "dead_lettered", "malformed_json")
                >= 1.0
            && count(after, "dead_lettered", "credential_rejected")
                - count(&before, "dead_lettered", "credential_rejected")
                >= 1.0
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let after = loop {
        let text = get(&app, "/metrics").await.1;
        if counted(&text) {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every delivery was counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let requests = "bunq_session_worker_bunq_requests_total";
    assert!(
        sample(
            &after,
            requests,
            &[("endpoint", "session-server"), ("status", "200")]
        ) >= 1.0
    );
    assert!(
        sample(
            &after,
            requests,
            &[("endpoint", "session-server"), ("status", "400")]
        ) >= 1.0
    );
    for name in [
        "bunq_session_worker_bunq_request_duration_seconds_bucket",
        "bunq_session_worker_delivery_duration_seconds_bucket",
        "bunq_session_worker_in_flight",
        "bunq_session_worker_broker_connected",
        "bunq_session_worker_publishing_blocked",
        "bunq_session_worker_build_info",
    ] {
        assert!(
            after.contains(name),
            "{name} missing from /metrics:\n{after}"
        );
    }
    assert_eq!(
        sample(&after, "bunq_session_worker_broker_connected", &[]),
        1.0
    );
    // No secret and no unbounded label: tokens and provision ids never appear.
    for secret in [
        "ok-metrics",
        "rejected-metrics",
        SESSION_TOKEN_API_KEY,
        "provision_id",
    ] {
        assert!(!after.contains(secret), "{secret} in /metrics");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn readiness_follows_the_broker_link_while_liveness_stays() {
    let mut app = TestApp::new().await;
    let proxy = TcpProxy::start(amqp_host_port(&app.amqp_url)).await;
    app.settings.broker.amqp_url = SecretString::from(amqp_url_via(&app.amqp_url, proxy.addr()));
    app.settings.broker.heartbeat_s = 2;
    app.settings.shutdown_timeout = Duration::from_secs(5);
    app.start_worker().await;
    eventually("ready", || async { get(&app, "/readyz").await.0 == 200 }).await;
    assert_eq!(get(&app, "/healthz").await.0, 200);

    proxy.cut();
    let deadline = tokio::time::Instant::now() + WAIT;
    let body = loop {
        let (status, text) = get(&app, "/readyz").await;
        if status == 503 {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still ready with the link cut"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], false);
    assert!(
        v["reason"].as_str().unwrap().contains("broker")
            || v["reason"].as_str().unwrap().contains("consuming"),
        "{body}"
    );
    assert_eq!(
        get(&app, "/healthz").await.0,
        200,
        "alive while reconnecting"
    );

    proxy.restore();
    eventually("ready again", || async {
        get(&app, "/readyz").await.0 == 200
    })
    .await;
    app.cleanup().await;
}
