//! A local stand-in for bunq's sandbox, for trying the worker without bunq credentials.
//!
//! ```text
//! cargo run --example fake_bunq            # listens on 127.0.0.1:8089, base URL http://127.0.0.1:8089/v1
//! ```
//! It answers `POST /v1/installation`, checks every later request's headers and signature against
//! the key the worker registered, and signs its answers. session-server answers by `secret`:
//! a token starting with `reject` gets 400 "User credentials are incorrect", `flaky` gets one 503
//! and then a session, anything else gets a session (a `UserApiKey` answer).

#[path = "../tests/support/fake_bunq.rs"]
mod fake_bunq;

use fake_bunq::{BunqState, Installation, Signed, ValidBunqRequest};
use wiremock::{Mock, MockServer, matchers};

const SESSION: &str = include_str!("../tests/fixtures/session-server.user-api-key.json");
const REJECTED: &str = include_str!("../tests/fixtures/error.credentials-incorrect.json");

#[tokio::main]
async fn main() {
    let addr = std::env::var("FAKE_BUNQ_ADDR").unwrap_or_else(|_| "127.0.0.1:8089".into());
    let listener = std::net::TcpListener::bind(&addr).expect("bind FAKE_BUNQ_ADDR");
    let server = MockServer::builder().listener(listener).start().await;
    let state = BunqState::new();
    let answer = |status: u16, body: &str| Signed {
        state: state.clone(),
        status,
        body: body.as_bytes().to_vec(),
        content_type: "application/json",
        sign: (200..300).contains(&status),
        bad_signature: false,
        delay: None,
    };
    let post = |path: &str| {
        Mock::given(matchers::method("POST")).and(matchers::path(format!("/v1/{path}")))
    };
    post("installation")
        .respond_with(Installation(state.clone()))
        .mount(&server)
        .await;
    post("device-server")
        .and(ValidBunqRequest(state.clone()))
        .respond_with(answer(200, r#"{"Response":[{"Id":{"id":77}}]}"#))
        .mount(&server)
        .await;
    post("session-server")
        .and(ValidBunqRequest(state.clone()))
        .and(matchers::body_string_contains("\"secret\":\"reject"))
        .respond_with(answer(400, REJECTED))
        .with_priority(1)
        .mount(&server)
        .await;
    post("session-server")
        .and(ValidBunqRequest(state.clone()))
        .and(matchers::body_string_contains("\"secret\":\"flaky"))
        .respond_with(answer(
            503,
            r#"{"Error":[{"error_description":"Service unavailable"}]}"#,
        ))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    post("session-server")
        .and(ValidBunqRequest(state.clone()))
        .respond_with(answer(200, SESSION))
        .with_priority(2)
        .mount(&server)
        .await;
    println!(
        "fake bunq listening: BUNQ_API_URL={}/v1 (Ctrl-C to stop)",
        server.uri()
    );
    let _ = tokio::signal::ctrl_c().await;
}
