//! The event contract (asyncapi.yaml, schemas/*.json) against the events the worker really
//! publishes and every input fixture.

use serde_json::Value;

use crate::helpers::*;

pub(crate) fn schema(name: &str) -> jsonschema::Validator {
    let text = std::fs::read_to_string(format!(
        "{}/schemas/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let schema: Value = serde_json::from_str(&text).unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("schemas/{name}.json is not a valid schema: {e}"))
}

pub(crate) fn assert_valid(v: &jsonschema::Validator, instance: &Value, what: &str) {
    let errors: Vec<String> = v.iter_errors(instance).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "{what} does not match its schema: {errors:?}\n{instance}"
    );
}

#[test]
fn every_input_fixture_matches_provision_ready_and_asyncapi_names_the_schemas() {
    let input = schema("provision.ready");
    for name in [
        "provision-ready.slim.json",
        "partner-user-provision.ready.json",
        "partner-user-provision.not-ready.json",
        "notification.partner-user-provision.json",
    ] {
        let v: Value = serde_json::from_str(&fixture(name)).unwrap();
        assert_valid(&input, &v, name);
    }
    // Something that is none of the shapes does not pass.
    assert!(!input.is_valid(&serde_json::json!({"hello": 1})));
    assert!(!input.is_valid(&serde_json::json!({"provision_id": 1})));
    let asyncapi =
        std::fs::read_to_string(format!("{}/asyncapi.yaml", env!("CARGO_MANIFEST_DIR"))).unwrap();
    assert!(asyncapi.starts_with("# ") && asyncapi.contains("asyncapi: 3.0.0"));
    for s in ["provision.ready", "session.created", "session.failed"] {
        assert!(asyncapi.contains(&format!("./schemas/{s}.json")), "{s}");
    }
}

#[tokio::test]
async fn every_event_the_worker_publishes_matches_its_schema() {
    let created = schema("session.created");
    let failed = schema("session.failed");
    let mut app = TestApp::new().await;
    app.bunq_registers_every_device().await;
    let unreadable = r#"{"Response":[{"Id":{"id":9}},{"Token":{"token":"t0k3n"}},{"UserApiKey":{"id":"x","granted_by_user":{"UserPerson":{"name":"no id"}}}}]}"#;
    let cases = [
        (
            "contract-api-key",
            fixture("session-server.user-api-key.json"),
            200,
        ),
        (
            "contract-person",
            fixture("session-server.user-person.json"),
            200,
        ),
        (
            "contract-company",
            fixture("session-server.user-company.json"),
            200,
        ),
        ("contract-unreadable", unreadable.to_owned(), 200),
        (
            "contract-rejected",
            fixture("error.credentials-incorrect.json"),
            400,
        ),
    ];
    for (token, body, status) in &cases {
        app.session_server()
            .for_credential(token)
            .answers(*status, body)
            .await;
    }
    app.start_worker().await;
    for (i, (token, _, _)) in cases.iter().enumerate() {
        app.publish_json(&slim(i as i64, token)).await;
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in &cases {
        let out = app.next_output().await;
        let body = body_json(&out);
        match type_of(&out).as_str() {
            "session.created" => assert_valid(&created, &body, "session.created"),
            "session.failed" => assert_valid(&failed, &body, "session.failed"),
            other => panic!("unexpected event {other}"),
        }
        seen.insert((type_of(&out), body["user_type"].as_str().map(str::to_owned)));
    }
    // Every user variant and both event types were checked.
    let kinds: Vec<_> = seen.iter().map(|(t, u)| format!("{t}:{u:?}")).collect();
    for want in [
        "session.created:Some(\"UserPerson\")",
        "session.created:Some(\"UserCompany\")",
        "session.created:None",
        "session.failed:None",
    ] {
        assert!(
            kinds.iter().any(|k| k == want),
            "{want} not among {kinds:?}"
        );
    }
    app.cleanup().await;
}
