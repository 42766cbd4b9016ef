//! A fake of bunq's public API for tests and local trials: answers `POST /installation` with a
//! server key it generated, checks every later request's headers and signature against the key
//! the client registered, and signs its answers. Shared by `tests/worker` and
//! `examples/fake_bunq.rs` through `#[path]`.
#![allow(dead_code)]

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use aws_lc_rs::{
    encoding::AsDer,
    rand::SystemRandom,
    rsa::{KeyPair, KeySize},
    signature::{self, KeyPair as _},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use serde_json::{Value, json};
use wiremock::{Match, Request, Respond, ResponseTemplate};

/// The fake bunq's state: the server key it signs with and what the worker registered.
pub struct BunqState {
    pub server_key: KeyPair,
    pub server_public_pem: String,
    pub installation_token: String,
    pub client_public_key_pem: Mutex<Option<String>>,
    /// Every client key registered, the latest last: replicas with installations of their own
    /// all sign with a key bunq knows.
    pub client_keys: Mutex<Vec<String>>,
}

impl BunqState {
    pub fn new() -> Arc<Self> {
        let server_key = KeyPair::generate(KeySize::Rsa2048).unwrap();
        let der = server_key.public_key().as_der().unwrap();
        let server_public_pem = pem_encode("PUBLIC KEY", der.as_ref());
        Arc::new(Self {
            server_key,
            server_public_pem,
            installation_token: format!("INSTALLATION-TOKEN-{}", uuid::Uuid::new_v4().simple()),
            client_public_key_pem: Mutex::new(None),
            client_keys: Mutex::new(Vec::new()),
        })
    }

    pub fn sign(&self, body: &[u8]) -> String {
        let mut sig = vec![0u8; self.server_key.public_modulus_len()];
        self.server_key
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                body,
                &mut sig,
            )
            .unwrap();
        STANDARD.encode(sig)
    }
}

pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn pem_decode(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(b64).unwrap()
}

/// Answers `POST /installation` and remembers the client public key.
pub struct Installation(pub Arc<BunqState>);

impl Respond for Installation {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&req.body).unwrap();
        let key = body["client_public_key"].as_str().unwrap().to_owned();
        assert!(key.starts_with("-----BEGIN PUBLIC KEY-----"), "{key}");
        self.0.client_keys.lock().unwrap().push(key.clone());
        *self.0.client_public_key_pem.lock().unwrap() = Some(key);
        ResponseTemplate::new(200).set_body_json(json!({"Response": [
            {"Id": {"id": 5511}},
            {"Token": {"id": 5512, "created": "2026-11-29 09:00:00.000000", "updated": "2026-11-29 09:00:00.000000", "token": self.0.installation_token}},
            {"ServerPublicKey": {"server_public_key": self.0.server_public_pem}}
        ]}))
    }
}

/// Matches only requests that carry every documented header, the installation token and a
/// valid signature by the key the worker registered.
pub struct ValidBunqRequest(pub Arc<BunqState>);

impl Match for ValidBunqRequest {
    fn matches(&self, req: &Request) -> bool {
        check_request(&self.0, req).is_ok()
    }
}

/// Why a request is not what bunq requires, or Ok.
pub fn check_request(state: &BunqState, req: &Request) -> Result<(), String> {
    let h = |name: &str| {
        req.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| format!("missing header {name}"))
    };
    if h("User-Agent")?.is_empty() {
        return Err("empty User-Agent".into());
    }
    if h("Cache-Control")? != "no-cache" {
        return Err("Cache-Control".into());
    }
    if h("Content-Type")? != "application/json" {
        return Err("Content-Type".into());
    }
    if h("X-Bunq-Geolocation")? != "0 0 0 0 000" {
        return Err("X-Bunq-Geolocation".into());
    }
    if h("X-Bunq-Language")? != "en_US" || h("X-Bunq-Region")? != "nl_NL" {
        return Err("language/region".into());
    }
    uuid::Uuid::parse_str(&h("X-Bunq-Client-Request-Id")?).map_err(|_| "request id not a UUID")?;
    if h("X-Bunq-Client-Authentication")? != state.installation_token {
        return Err("wrong X-Bunq-Client-Authentication".into());
    }
    let sig = STANDARD
        .decode(h("X-Bunq-Client-Signature")?)
        .map_err(|_| "signature not base64")?;
    let keys = state.client_keys.lock().unwrap().clone();
    if keys.is_empty() {
        return Err("no installation yet".into());
    }
    keys.iter()
        .find(|pem| {
            signature::UnparsedPublicKey::new(
                &signature::RSA_PKCS1_2048_8192_SHA256,
                pem_decode(pem),
            )
            .verify(&req.body, &sig)
            .is_ok()
        })
        .map(|_| ())
        .ok_or_else(|| "signature does not verify over the body".to_string())
}

/// A response signed with the fake server key (or deliberately not).
#[derive(Clone)]
pub struct Signed {
    pub state: Arc<BunqState>,
    pub status: u16,
    pub body: Vec<u8>,
    pub content_type: &'static str,
    pub sign: bool,
    pub bad_signature: bool,
    pub delay: Option<Duration>,
}

impl Respond for Signed {
    fn respond(&self, _req: &Request) -> ResponseTemplate {
        let mut t = ResponseTemplate::new(self.status)
            .set_body_raw(self.body.clone(), self.content_type)
            .insert_header(
                "X-Bunq-Client-Response-Id",
                uuid::Uuid::new_v4().to_string().as_str(),
            );
        if self.sign {
            let sig = if self.bad_signature {
                self.state.sign(b"other bytes")
            } else {
                self.state.sign(&self.body)
            };
            t = t.insert_header("X-Bunq-Server-Signature", sig.as_str());
        }
        if let Some(d) = self.delay {
            t = t.set_delay(d);
        }
        t
    }
}
