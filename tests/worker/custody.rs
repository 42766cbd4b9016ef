//! The session token's custody: what the worker does under either reading of bunq's credential
//! (single-use or reusable), against the bunq emulator.

use std::time::Duration;

use bunq_session_worker::tools::emulator::{self, CredentialUse};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// The first session-server answer is lost (the emulator answers a `lost…` credential's first call after 5 s,
/// past `HTTP_TIMEOUT_MS`), and bunq has opened a session meanwhile. The retry's answer says
/// what the credential is.
async fn a_lost_answer_under(credentials: CredentialUse) -> serde_json::Value {
    let stop = CancellationToken::new();
    let emu = emulator::start(
        &emulator::EmulatorSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            session_rate_limit: None,
            credentials,
        },
        stop.clone(),
    )
    .await
    .unwrap();
    let mut app = TestApp::new().await;
    app.settings.bunq.api_url = emu.base_url.parse().unwrap();
    app.settings.bunq.register_device = false;
    app.settings.bunq.http_timeout = Duration::from_millis(1000);
    app.start_worker().await;
    app.publish_json(&slim(1, &format!("lost-{}", uuid::Uuid::new_v4().simple())))
        .await;
    let out = app.next_output().await;
    let body = body_json(&out);
    let mut body = body.clone();
    body["type"] = type_of(&out).into();
    body["sessions_opened"] = emu.emulator.sessions_opened().into();
    app.cleanup().await;
    stop.cancel();
    body
}

#[tokio::test]
async fn a_lost_answer_with_a_single_use_credential_is_outcome_unknown() {
    let out = a_lost_answer_under(CredentialUse::SingleUse).await;
    assert_eq!(out["type"], "session.failed", "{out}");
    assert_eq!(out["reason"], "outcome_unknown", "{out}");
    assert_eq!(
        out["sessions_opened"], 1,
        "bunq opened the session whose answer was lost"
    );
}

#[tokio::test]
async fn a_lost_answer_with_a_reusable_credential_is_simply_a_new_session() {
    let out = a_lost_answer_under(CredentialUse::Reusable).await;
    assert_eq!(out["type"], "session.created", "{out}");
    assert_eq!(
        out["sessions_opened"], 2,
        "the lost one, and the one delivered"
    );
}

/// A consumer key pair made with openssl as the README says: (private key path, public key
/// path).
fn consumer_keys(dir: &std::path::Path, kind: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let private = dir.join(format!("consumer-{kind}.key"));
    let public = dir.join(format!("consumer-{kind}.pub.pem"));
    let opt = match kind {
        "rsa" => "rsa_keygen_bits:2048",
        _ => "ec_paramgen_curve:P-256",
    };
    let algorithm = if kind == "rsa" { "RSA" } else { "EC" };
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    run(&[
        "genpkey",
        "-algorithm",
        algorithm,
        "-pkeyopt",
        opt,
        "-out",
        private.to_str().unwrap(),
    ]);
    run(&[
        "pkey",
        "-in",
        private.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    (private, public)
}

/// Opens `jwe` with `private` through joserfc, an independent JOSE implementation.
fn open_with_joserfc(private: &std::path::Path, jwe: &str) -> String {
    let script = format!("{}/tests/jwe_interop.py", env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var("JOSE_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python)
        .args([script.as_str(), private.to_str().unwrap(), jwe])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "joserfc could not open the token (install it: pip install joserfc==1.6.5): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim_end().to_owned()
}

/// With a consumer key the token leaves sealed: `session_token_jwe`, no `session_token`, the
/// event matches its schema, the header names the key, and joserfc opens it with the private
/// key.
async fn sealed_for_the_consumer(kind: &str, alg: &str) {
    const TOKEN: &str = "0c5be2f1a9d84e7cb36a1f0d2e4c6b8a9d7f5e3c1b0a2d4f6e8c0b2a4d6f8e0c";
    let mut app = TestApp::new().await;
    let (private, public) = consumer_keys(&app.dir, kind);
    app.settings.token.encryption_key = Some(public);
    app.settings.bunq.register_device = false;
    app.session_server()
        .answers(200, &fixture("session-server.user-person.json"))
        .await;
    app.start_worker().await;
    app.publish_json(&slim(1, &format!("tok-sealed-{kind}")))
        .await;
    let out = app.next_output().await;
    let body = body_json(&out);
    assert_eq!(type_of(&out), "session.created", "{body}");
    assert!(body.get("session_token").is_none(), "{body}");
    assert!(!String::from_utf8_lossy(&out.data).contains(TOKEN));
    crate::contract::assert_valid(
        &crate::contract::schema("session.created"),
        &body,
        "a sealed session.created",
    );
    let jwe = body["session_token_jwe"].as_str().unwrap();
    let header = jwe.split('.').next().unwrap();
    use base64::Engine;
    let header: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], alg);
    assert_eq!(header["enc"], "A256GCM");
    let pem = std::fs::read_to_string(app.settings.token.encryption_key.as_ref().unwrap()).unwrap();
    let key = bunq_session_worker::jwe::ConsumerKey::from_pem(&pem).unwrap();
    assert_eq!(header["kid"], key.kid());
    assert_eq!(open_with_joserfc(&private, jwe), TOKEN);
    app.cleanup().await;
}

#[tokio::test]
async fn a_token_sealed_for_an_rsa_key_opens_with_joserfc() {
    sealed_for_the_consumer("rsa", "RSA-OAEP-256").await;
}

#[tokio::test]
async fn a_token_sealed_for_a_p256_key_opens_with_joserfc() {
    sealed_for_the_consumer("ec", "ECDH-ES+A256KW").await;
}
