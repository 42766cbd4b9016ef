use secrecy::ExposeSecret;

use super::*;
use crate::events::rfc3339;

const TOKEN: &str = "sandbox_secret_token_value_123";

fn ready(json: &str) -> ProvisionReady {
    match decode(json.as_bytes(), 65536).unwrap() {
        Decoded::Ready(r) => r,
        other => panic!("expected ready, got {other:?}"),
    }
}

fn err(body: &[u8]) -> InputError {
    decode(body, 1024).unwrap_err()
}

#[test]
fn slim_event() {
    let r = ready(&format!(
        r#"{{"provision_id": 48213, "token_value": "{TOKEN}", "credential_id": 9, "expiry_time": "2026-11-29 10:24:14.000000", "external_uuid": "u-1", "extra": [1]}}"#
    ));
    assert_eq!(r.provision_id, ProvisionId::Int(48213));
    assert_eq!(r.credential_id, Some(9));
    assert_eq!(r.external_uuid.as_deref(), Some("u-1"));
    assert_eq!(rfc3339(r.expiry_time.unwrap()), "2026-11-29T10:24:14Z");
    assert_eq!(r.token_value.expose_secret(), TOKEN);
    let r = ready(&format!(
        r#"{{"provision_id": "p-7", "token_value": "{TOKEN}"}}"#
    ));
    assert_eq!(r.provision_id, ProvisionId::Str("p-7".into()));
    assert_eq!(r.expiry_time, None);
}

#[test]
fn wrapped_unwrapped_and_callback_shapes() {
    let cred = format!(
        r#"{{"id": 48213, "status": "CREATED", "external_uuid": "x", "credential": {{"id": 90211, "status": "PENDING_FIRST_USE", "expiry_time": "2026-11-29T10:24:14+01:00", "token_value": "{TOKEN}"}}}}"#
    );
    for json in [
        format!(r#"{{"PartnerUserProvision": {cred}}}"#),
        cred.clone(),
        format!(
            r#"{{"NotificationUrl": {{"category": "PARTNER_USER_PROVISION", "object": {{"PartnerUserProvision": {cred}}}}}}}"#
        ),
    ] {
        let r = ready(&json);
        assert_eq!(r.provision_id, ProvisionId::Int(48213));
        assert_eq!(r.credential_id, Some(90211));
        assert_eq!(rfc3339(r.expiry_time.unwrap()), "2026-11-29T09:24:14Z");
    }
}

#[test]
fn not_ready_variants() {
    for json in [
        r#"{"PartnerUserProvision": {"id": 1, "credential": null}}"#,
        r#"{"PartnerUserProvision": {"id": 1}}"#,
        r#"{"PartnerUserProvision": {"id": 1, "credential": {"status": "ACTIVE", "token_value": null}}}"#,
        r#"{"PartnerUserProvision": {"id": 1, "credential": {"status": "EXPIRED", "token_value": "t"}}}"#,
        r#"{"PartnerUserProvision": {"id": 1, "credential": {"status": "PENDING_FIRST_USE", "token_value": ""}}}"#,
    ] {
        match decode(json.as_bytes(), 1024).unwrap() {
            Decoded::NotReady(n) => assert_eq!(n.provision_id, Some(ProvisionId::Int(1))),
            other => panic!("{json}: expected not ready, got {other:?}"),
        }
    }
    // Status absent but a token present: ready.
    let r = ready(r#"{"PartnerUserProvision": {"id": 1, "credential": {"token_value": "t"}}}"#);
    assert_eq!(r.token_value.expose_secret(), "t");
}

#[test]
fn bad_input_gets_its_reason() {
    assert_eq!(err(&[b'x'; 2000]).reason(), FailureReason::TooLarge);
    assert_eq!(err(&[0xff, 0xfe, b'{']).reason(), FailureReason::NotUtf8);
    assert_eq!(err(b"").reason(), FailureReason::MalformedJson);
    assert_eq!(err(b"   ").reason(), FailureReason::MalformedJson);
    assert_eq!(
        err(b"{\"provision_id\": 1,").reason(),
        FailureReason::MalformedJson
    );
    assert_eq!(err(b"not json").reason(), FailureReason::MalformedJson);
    assert_eq!(
        err(b"[1,2]").to_string(),
        "expected a JSON object, found an array"
    );
    assert_eq!(
        err(b"{\"provision_id\": 1}").to_string(),
        "token_value is missing"
    );
    assert_eq!(
        err(b"{\"provision_id\": 1, \"token_value\": \"  \"}").to_string(),
        "token_value is empty"
    );
    assert_eq!(
        err(b"{\"provision_id\": 1, \"token_value\": 5}").to_string(),
        "token_value: expected a string, found a number"
    );
    assert_eq!(
        err(b"{\"provision_id\": true, \"token_value\": \"t\"}").to_string(),
        "provision_id: expected an integer or a string, found a boolean"
    );
    assert_eq!(
        err(b"{\"provision_id\": 1.5, \"token_value\": \"t\"}").reason(),
        FailureReason::InvalidEvent
    );
    assert!(
        err(b"{\"provision_id\": 1, \"token_value\": \"t\", \"expiry_time\": \"tomorrow\"}")
            .to_string()
            .starts_with("expiry_time: expected bunq's")
    );
    assert!(
        err(b"{\"hello\": 1}")
            .to_string()
            .starts_with("unrecognised event")
    );
    assert!(
        err(b"{\"NotificationUrl\": {\"object\": {\"Payment\": {}}}}")
            .to_string()
            .contains("no PartnerUserProvision")
    );
}

#[test]
fn duplicate_keys_on_read_paths_are_refused_by_path() {
    let cases = [
        (
            r#"{"provision_id": 1, "token_value": "AAAA", "token_value": "BBBB"}"#,
            "token_value",
        ),
        (
            r#"{"provision_id": 1, "provision_id": 2, "token_value": "AAAA"}"#,
            "provision_id",
        ),
        (
            r#"{"PartnerUserProvision": {"id": 1, "credential": {"token_value": "AAAA", "status": "PENDING_FIRST_USE", "token_value": "BBBB"}}}"#,
            "PartnerUserProvision.credential.token_value",
        ),
        (
            r#"{"PartnerUserProvision": {"id": 1, "credential": null}, "PartnerUserProvision": {"id": 2}}"#,
            "PartnerUserProvision",
        ),
        (
            r#"{"NotificationUrl": {"object": {"PartnerUserProvision": {"id": 1}}, "object": {}}}"#,
            "NotificationUrl.object",
        ),
        (
            r#"{"NotificationUrl": {"object": {"PartnerUserProvision": {"id": 1, "credential": {"expiry_time": "2099-01-01 00:00:00", "expiry_time": "2000-01-01 00:00:00", "token_value": "AAAA"}}}}}"#,
            "NotificationUrl.object.PartnerUserProvision.credential.expiry_time",
        ),
        (r#"{"id": 1, "id": 2}"#, "id"),
    ];
    for (body, path) in cases {
        let e = err(body.as_bytes());
        assert_eq!(e, InputError::DuplicateKey(path.into()), "{body}");
        assert_eq!(e.reason(), FailureReason::DuplicateKey);
        let text = e.to_string();
        assert!(text.contains(path), "{text}");
        assert!(!text.contains("AAAA") && !text.contains("BBBB"), "{text}");
    }
}

#[test]
fn a_dotted_key_is_not_a_path() {
    let body = r#"{"PartnerUserProvision.id": 1, "PartnerUserProvision.id": 2,
        "PartnerUserProvision": {"id": 40, "credential": {"token_value": "t"}}}"#;
    assert!(matches!(
        decode(body.as_bytes(), 4096),
        Ok(Decoded::Ready(_))
    ));
    let deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
    let e = err(deep.as_bytes());
    assert!(e.to_string().contains("nested more than 128 levels"), "{e}");
}

#[test]
fn duplicates_in_ignored_fields_pass() {
    let body = r#"{"PartnerUserProvision": {"id": 1, "label_user": {"display_name": "a", "display_name": "b"},
        "products": [{"x": 1, "x": 2}], "credential": {"token_value": "tok", "status": "PENDING_FIRST_USE"}},
        "extra": 1, "extra": 2}"#;
    assert!(matches!(
        decode(body.as_bytes(), 4096),
        Ok(Decoded::Ready(_))
    ));
    let callback = r#"{"NotificationUrl": {"target_url": "a", "target_url": "b",
        "object": {"PartnerUserProvision": {"id": 1, "credential": null}}}}"#;
    assert!(matches!(
        decode(callback.as_bytes(), 4096),
        Ok(Decoded::NotReady(_))
    ));
}

#[test]
fn errors_never_quote_values() {
    let secret = "sekrit-token-xyz";
    for json in [
        format!(r#"{{"provision_id": "{secret}x", "token_value": 1}}"#),
        format!(r#"{{"provision_id": 1, "credential_id": "{secret}", "token_value": "t"}}"#),
        format!(r#"{{"provision_id": 1, "token_value": "t", "expiry_time": "{secret}"}}"#),
        format!(r#"{{"provision_id": 1, "token_value": "{secret}"#),
        format!(
            r#"{{"PartnerUserProvision": {{"id": 1, "credential": {{"status": 3, "token_value": "{secret}"}}}}}}"#
        ),
    ] {
        let e = decode(json.as_bytes(), 4096).unwrap_err();
        assert!(!e.to_string().contains(secret), "{e}");
        assert!(!format!("{e:?}").contains(secret), "{e:?}");
    }
}

#[test]
fn debug_hides_tokens() {
    let r = ready(&format!(
        r#"{{"provision_id": 1, "token_value": "{TOKEN}"}}"#
    ));
    assert!(!format!("{r:?}").contains(TOKEN));
}

#[test]
fn hostile_but_valid_input() {
    let r = ready("\u{feff}{\"provision_id\": 1, \"token_value\": \"t\"}");
    assert_eq!(r.provision_id, ProvisionId::Int(1));
    let long = "é".repeat(65); // 130 bytes
    let e = err(format!(r#"{{"provision_id": "{long}", "token_value": "t"}}"#).as_bytes());
    assert_eq!(e.to_string(), "provision_id is longer than 128 bytes");
    match decode(
        br#"{"id": 1, "credential": {"status": "X\nFAKE LINE", "token_value": "t"}}"#,
        1024,
    )
    .unwrap()
    {
        Decoded::NotReady(n) => assert_eq!(n.why, "credential status is X\\nFAKE LINE"),
        other => panic!("{other:?}"),
    }
    assert_eq!(log_safe(&"a".repeat(150)).chars().count(), 101);
}
