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
