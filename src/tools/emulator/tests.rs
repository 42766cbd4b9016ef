//! The emulator answered through the worker's own bunq client, and raw requests for what the
//! client never sends.

use std::time::Duration;

use secrecy::SecretString;

use super::*;
use crate::{
    bunq::{ApiContext, BunqClient, RetryClass, context::NewKeyPair},
    failure::FailureReason,
    rate_limit::RateLimit,
};

async fn emulator(rate: Option<RateLimit>) -> (Running, CancellationToken) {
    emulator_with(rate, CredentialUse::SingleUse).await
}

async fn emulator_with(
    rate: Option<RateLimit>,
    credentials: CredentialUse,
) -> (Running, CancellationToken) {
    let stop = CancellationToken::new();
    let settings = EmulatorSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        session_rate_limit: rate,
        credentials,
    };
    (start(&settings, stop.clone()).await.unwrap(), stop)
}

async fn installed(base: &str) -> (BunqClient, ApiContext) {
    let client = BunqClient::new(
        base.parse().unwrap(),
        "emulator-test".into(),
        Duration::from_secs(5),
        true,
    )
    .unwrap();
    let key = NewKeyPair::generate().unwrap();
    let answer = client.installation(&key.public_key_pem).await.unwrap();
    let (token, server_key) = answer.value;
    (client, key.into_context(token, &server_key).unwrap())
}

#[tokio::test]
async fn a_credential_opens_one_session_with_signed_answers() {
    let (emu, stop) = emulator(None).await;
    let (client, ctx) = installed(&emu.base_url).await;
    let secret = SecretString::from("sandbox_emulator_test");
    client
        .device_server(&ctx, &secret, "test", &["*".to_owned()])
        .await
        .unwrap();
    // The client verifies X-Bunq-Server-Signature on every 2xx answer.
    let session = client.session_server(&ctx, &secret).await.unwrap();
    assert_eq!(session.value.user_type.as_deref(), Some("UserPerson"));
    assert!(session.response_id.is_some());
    assert_eq!(emu.emulator.sessions_opened(), 1);
    let spent = client.session_server(&ctx, &secret).await.unwrap_err();
    assert_eq!(spent.http_status, Some(400));
    assert!(spent.description.contains("Incorrect API key"), "{spent}");
    let rejected = client
        .session_server(&ctx, &SecretString::from("reject_me"))
        .await
        .unwrap_err();
    assert_eq!(
        rejected.class,
        RetryClass::Permanent(FailureReason::CredentialRejected)
    );
    stop.cancel();
}

#[tokio::test]
async fn session_server_is_rate_limited_with_bunqs_message() {
    let rate = RateLimit {
        calls: 1,
        per: Duration::from_secs(30),
    };
    let (emu, stop) = emulator(Some(rate)).await;
    let (client, ctx) = installed(&emu.base_url).await;
    client
        .session_server(&ctx, &SecretString::from("sandbox_a"))
        .await
        .unwrap();
    let limited = client
        .session_server(&ctx, &SecretString::from("sandbox_b"))
        .await
        .unwrap_err();
    assert_eq!(limited.http_status, Some(429));
    assert_eq!(
        limited.class,
        RetryClass::RateLimited {
            window: Some(Duration::from_secs(30)),
            rate: Some(rate),
        }
    );
    stop.cancel();
}

#[tokio::test]
async fn refusals_have_bunqs_status_and_error_body() {
    let (emu, stop) = emulator(None).await;
    let (_, ctx) = installed(&emu.base_url).await;
    let http = reqwest::Client::new();
    let body = br#"{"secret": "sandbox_raw"}"#.to_vec();
    let send = |path: &str, signature: Option<String>, token: Option<&str>| {
        let mut r = http
            .post(format!("{}/{path}", emu.base_url))
            .header("User-Agent", "raw")
            .header("X-Bunq-Client-Request-Id", uuid::Uuid::new_v4().to_string())
            .header("X-Bunq-Geolocation", "0 0 0 0 000")
            .header("X-Bunq-Language", "en_US")
            .header("X-Bunq-Region", "nl_NL")
            .body(body.clone());
        if let Some(t) = token {
            r = r.header("X-Bunq-Client-Authentication", t);
        }
        if let Some(s) = signature {
            r = r.header("X-Bunq-Client-Signature", s);
        }
        r.send()
    };
    let token = secrecy::ExposeSecret::expose_secret(ctx.installation_token()).to_owned();
    let signed = crate::bunq::signing::sign(ctx.key_pair(), &body).unwrap();
    let cases = [
        (
            send("device-server", None, Some(&token)).await,
            466,
            "signature",
        ),
        (
            send("device-server", Some("AAAA".into()), Some(&token)).await,
            400,
            "The request signature is invalid.",
        ),
        (
            send("device-server", Some(signed.clone()), Some("unknown")).await,
            401,
            "Insufficient authentication.",
        ),
        (send("user", None, None).await, 404, "does not exist"),
        // No Content-Type, as bunq's Python SDK sends it: accepted.
        (
            send("device-server", Some(signed), Some(&token)).await,
            200,
            "Id",
        ),
    ];
    for (response, status, text) in cases {
        let response = response.unwrap();
        assert_eq!(response.status().as_u16(), status);
        assert!(response.headers().contains_key("X-Bunq-Server-Signature"));
        let v: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        let described = if status == 200 {
            v.to_string()
        } else {
            v["Error"][0]["error_description"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert!(described.contains(text), "{status}: {described}");
    }
    stop.cancel();
}

#[tokio::test]
async fn a_reusable_credential_opens_a_session_at_every_call() {
    let (emu, stop) = emulator_with(None, CredentialUse::Reusable).await;
    let (client, ctx) = installed(&emu.base_url).await;
    let secret = SecretString::from("sandbox_reusable_test");
    for _ in 0..2 {
        client
            .device_server(&ctx, &secret, "test", &["*".to_owned()])
            .await
            .unwrap();
        client.session_server(&ctx, &secret).await.unwrap();
    }
    assert_eq!(emu.emulator.sessions_opened(), 2);
    stop.cancel();
}
