//! The fake bunq's side of a test: what it answers on each endpoint, and what it received.

use std::sync::Arc;

use serde_json::json;
use wiremock::{Mock, MockServer, Request, Respond, matchers};

use super::{BunqState, Installation, Signed, TestApp, ValidBunqRequest, eventually};

/// The session token in the `session-server.user-api-key.json` fixture.
pub const SESSION_TOKEN_API_KEY: &str =
    "f981bd6d26b8328b89e85a774c404bb02e72d18062dab92bb59c9e59a1c5958f";

/// device-server's answer when it registers a device.
pub const DEVICE_SERVER_OK: &str = r#"{"Response":[{"Id":{"id":77}}]}"#;

pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// Mounts `POST /installation` on `bunq`: it answers with its server key and remembers the
/// client's.
pub(super) async fn mount_installation(bunq: &MockServer, state: &Arc<BunqState>) {
    Mock::given(matchers::method("POST"))
        .and(matchers::path("/v1/installation"))
        .respond_with(Installation(state.clone()))
        .mount(bunq)
        .await;
}

impl TestApp {
    /// An answer of the fake bunq: `status` with `body`, signed when 2xx.
    pub fn answer(&self, status: u16, body: &str) -> Signed {
        Signed {
            state: self.state.clone(),
            status,
            body: body.as_bytes().to_vec(),
            content_type: "application/json",
            sign: (200..300).contains(&status),
            bad_signature: false,
            delay: None,
        }
    }

    /// bunq's `POST /session-server`, to be told what it answers.
    pub fn session_server(&self) -> BunqEndpoint<'_> {
        BunqEndpoint::new(self, "session-server")
    }

    /// bunq's `POST /device-server`, to be told what it answers.
    pub fn device_server(&self) -> BunqEndpoint<'_> {
        BunqEndpoint::new(self, "device-server")
    }

    /// device-server registers a device for any credential.
    pub async fn bunq_registers_every_device(&self) {
        self.device_server().answers(200, DEVICE_SERVER_OK).await;
    }

    /// device-server registers a device and session-server opens a session (the UserApiKey
    /// fixture) for any credential.
    pub async fn bunq_opens_every_session(&self) {
        self.bunq_registers_every_device().await;
        self.session_server()
            .answers(200, &fixture("session-server.user-api-key.json"))
            .await;
    }

    /// Empties the fake bunq (what it answers and what it received) and mounts installation
    /// again; its server key and the client key it registered stay.
    pub async fn reset_bunq(&self) {
        self.bunq.reset().await;
        mount_installation(&self.bunq, &self.state).await;
    }

    /// Requests the fake bunq received on `path` (e.g. "session-server").
    pub async fn requests(&self, path: &str) -> Vec<Request> {
        self.bunq
            .received_requests()
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.url.path() == format!("/v1/{path}"))
            .collect()
    }

    /// Waits until the fake bunq has received a session-server call.
    pub async fn wait_for_session_server_call(&self) {
        eventually("session-server called", || async {
            !self.requests("session-server").await.is_empty()
        })
        .await;
    }
}

/// One endpoint of the fake bunq and which of its calls an answer is for, e.g.
/// `app.session_server().for_credential("t-key").first_calls(1).answers(503, "{}")`. Only calls
/// that carry bunq's headers and a valid signature match. When several answers match a call,
/// the one mounted first gives it.
#[must_use = "nothing is mounted until `answers` or `responds_with`"]
pub struct BunqEndpoint<'a> {
    app: &'a TestApp,
    path: &'static str,
    credential: Option<String>,
    first_calls: Option<u64>,
}

impl<'a> BunqEndpoint<'a> {
    fn new(app: &'a TestApp, path: &'static str) -> Self {
        Self {
            app,
            path,
            credential: None,
            first_calls: None,
        }
    }

    /// Only calls whose `secret` is `token` (without this: any credential).
    pub fn for_credential(mut self, token: &str) -> Self {
        self.credential = Some(token.to_owned());
        self
    }

    /// Only the first `n` of those calls; later ones go to the answers mounted after this one.
    pub fn first_calls(mut self, n: u64) -> Self {
        self.first_calls = Some(n);
        self
    }

    /// Answers `status` with `body`, signed when 2xx (`TestApp::answer`).
    pub async fn answers(self, status: u16, body: &str) {
        let answer = self.app.answer(status, body);
        self.responds_with(answer).await;
    }

    /// Answers with `responder`: an answer changed after `TestApp::answer` (a delay, a bad
    /// signature) or one that records the calls.
    pub async fn responds_with(self, responder: impl Respond + 'static) {
        let mut m = Mock::given(matchers::method("POST"))
            .and(matchers::path(format!("/v1/{}", self.path)))
            .and(ValidBunqRequest(self.app.state.clone()));
        if let Some(t) = &self.credential {
            m = m.and(matchers::body_partial_json(json!({ "secret": t })));
        }
        let mut m = m.respond_with(responder);
        if let Some(n) = self.first_calls {
            m = m.up_to_n_times(n);
        }
        m.mount(&self.app.bunq).await;
    }
}
