//! The emulator's state and its three endpoints.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aws_lc_rs::{
    encoding::AsDer,
    rsa::{KeyPair, KeySize},
    signature::KeyPair as _,
};
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::time::Instant;

use super::EmulatorError;
use crate::{bunq::signing, config::CredentialUse, rate_limit::RateLimit};

/// bunq's answer to a credential it does not accept, also to a spent one-time credential.
pub const CREDENTIALS_INCORRECT: &str =
    "User credentials are incorrect. Incorrect API key or IP address.";

/// The emulator's state: its server key, the installations it made, spent credentials.
pub struct Emulator {
    server_key: KeyPair,
    server_public_key_pem: String,
    next_id: AtomicU64,
    /// Installation token → the client's public key, parsed.
    installations: Mutex<HashMap<String, aws_lc_rs::signature::ParsedPublicKey>>,
    /// Credentials that opened a session.
    spent: Mutex<HashSet<String>>,
    /// Whether a credential that opened a session is refused afterwards.
    credentials: CredentialUse,
    /// Credentials whose injected one-off fault already happened.
    faulted: Mutex<HashSet<String>>,
    /// Request ids seen (bunq refuses a reused one).
    request_ids: Mutex<HashSet<String>>,
    rate: Option<RateLimit>,
    /// When recent session-server calls arrived, oldest first.
    recent: Mutex<VecDeque<Instant>>,
    /// session-server calls answered with a session.
    sessions: AtomicU64,
    /// session-server calls refused with 429 for the rate.
    rate_limited: AtomicU64,
    /// When the first session-server call came, and when each 429 was given, for tests.
    first_call: Mutex<Option<Instant>>,
    refused_at: Mutex<Vec<Instant>>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("rate", &self.rate)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A refusal in bunq's shape.
struct Refusal(StatusCode, String);

type Answer = Result<Value, Refusal>;

impl Emulator {
    /// A fresh emulator with a new RSA-2048 server key; session-server limited to `rate`;
    /// `credentials` says whether a credential opens one session or many.
    ///
    /// # Errors
    /// [`EmulatorError::Key`] when the key cannot be generated.
    pub fn new(rate: Option<RateLimit>, credentials: CredentialUse) -> Result<Self, EmulatorError> {
        let server_key = KeyPair::generate(KeySize::Rsa2048).map_err(|_| EmulatorError::Key)?;
        let der = server_key
            .public_key()
            .as_der()
            .map_err(|_| EmulatorError::Key)?;
        Ok(Self {
            server_public_key_pem: pem::encode(&pem::Pem::new("PUBLIC KEY", der.as_ref().to_vec())),
            server_key,
            next_id: AtomicU64::new(1000),
            installations: Mutex::default(),
            spent: Mutex::default(),
            credentials,
            faulted: Mutex::default(),
            request_ids: Mutex::default(),
            rate,
            recent: Mutex::default(),
            sessions: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            first_call: Mutex::default(),
            refused_at: Mutex::default(),
        })
    }

    /// Sessions opened so far.
    pub fn sessions_opened(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }

    /// session-server calls refused with 429 for the configured rate so far.
    pub fn rate_limited_calls(&self) -> u64 {
        self.rate_limited.load(Ordering::Relaxed)
    }

    /// When each 429 for the rate was given, counted from the first session-server call.
    pub fn rate_limited_after_first_call(&self) -> Vec<Duration> {
        let Some(first) = *lock(&self.first_call) else {
            return Vec::new();
        };
        lock(&self.refused_at)
            .iter()
            .map(|t| t.saturating_duration_since(first))
            .collect()
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn installation(&self, body: &[u8]) -> Answer {
        let v = json_body(body)?;
        let pem_text = v
            .get("client_public_key")
            .and_then(Value::as_str)
            .ok_or_else(|| bad_request("client_public_key is missing"))?;
        let key = pem::parse(pem_text.trim())
            .ok()
            .filter(|p| p.tag() == "PUBLIC KEY")
            .ok_or_else(|| bad_request("client_public_key is not a PEM public key"))?;
        let key = signing::public_key(key.contents())
            .map_err(|_| bad_request("client_public_key is not an RSA key of 2048 to 8192 bits"))?;
        let token = random_hex();
        lock(&self.installations).insert(token.clone(), key);
        let now = bunq_time(OffsetDateTime::now_utc());
        Ok(json!({"Response": [
            {"Id": {"id": self.id()}},
            {"Token": {"id": self.id(), "created": now, "updated": now, "token": token}},
            {"ServerPublicKey": {"server_public_key": self.server_public_key_pem}},
        ]}))
    }

    /// The checks bunq makes on every call after installation; returns the request's `secret`.
    fn authenticate(&self, headers: &HeaderMap, body: &[u8]) -> Result<String, Refusal> {
        for name in [
            "User-Agent",
            "X-Bunq-Client-Request-Id",
            "X-Bunq-Geolocation",
            "X-Bunq-Language",
            "X-Bunq-Region",
        ] {
            if header(headers, name).is_none() {
                return Err(bad_request(&format!("The header {name} is missing.")));
            }
        }
        let token = header(headers, "X-Bunq-Client-Authentication")
            .ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "Insufficient authentication."))?;
        let client_key = lock(&self.installations)
            .get(token)
            .cloned()
            .ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "Insufficient authentication."))?;
        let signature = header(headers, "X-Bunq-Client-Signature").ok_or_else(|| {
            refuse(
                StatusCode::from_u16(466).unwrap_or(StatusCode::BAD_REQUEST),
                "Request signature required.",
            )
        })?;
        if !signing::verify(&client_key, body, signature) {
            return Err(bad_request("The request signature is invalid."));
        }
        let request_id = header(headers, "X-Bunq-Client-Request-Id").unwrap_or_default();
        if !lock(&self.request_ids).insert(request_id.to_owned()) {
            return Err(bad_request("The request id has been used before."));
        }
        let v = json_body(body)?;
        let secret = v
            .get("secret")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad_request("secret is missing"))?;
        Ok(secret.to_owned())
    }

    fn device_server(&self, headers: &HeaderMap, body: &[u8]) -> Answer {
        let secret = self.authenticate(headers, body)?;
        refuse_by_prefix(&secret)?;
        if self.credentials == CredentialUse::SingleUse && lock(&self.spent).contains(&secret) {
            return Err(bad_request(CREDENTIALS_INCORRECT));
        }
        Ok(json!({"Response": [{"Id": {"id": self.id()}}]}))
    }

    async fn session_server(&self, headers: &HeaderMap, body: &[u8]) -> Answer {
        let secret = self.authenticate(headers, body)?;
        self.within_rate()?;
        refuse_by_prefix(&secret)?;
        if (secret.starts_with("flaky") || secret.starts_with("ratelimited"))
            && lock(&self.faulted).insert(secret.clone())
        {
            return Err(if secret.starts_with("flaky") {
                refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Service temporarily unavailable.",
                )
            } else {
                rate_limited(1, 1)
            });
        }
        if secret.starts_with("slow") {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        if !lock(&self.spent).insert(secret.clone()) && self.credentials == CredentialUse::SingleUse
        {
            return Err(bad_request(CREDENTIALS_INCORRECT));
        }
        self.sessions.fetch_add(1, Ordering::Relaxed);
        if secret.starts_with("lost") && lock(&self.faulted).insert(secret.clone()) {
            // The session exists now; the client gives up on the answer.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let now = bunq_time(OffsetDateTime::now_utc());
        let user = |kind: &str, id: u64, name: &str| {
            json!({kind: {"id": id, "created": now, "updated": now, "display_name": name,
                "public_nick_name": name, "session_timeout": 604_800}})
        };
        let session_id = self.id();
        Ok(json!({"Response": [
            {"Id": {"id": session_id}},
            {"Token": {"id": session_id, "created": now, "updated": now, "token": random_hex()}},
            {"UserApiKey": {
                "id": self.id(), "created": now, "updated": now,
                "requested_by_user": user("UserCompany", 1360, "Emulated Partner BV"),
                "granted_by_user": user("UserPerson", self.id(), "Emulated bunqer"),
            }},
        ]}))
    }

    /// Counts a session-server call against the rate: a sliding window of `per`.
    fn within_rate(&self) -> Result<(), Refusal> {
        let Some(rate) = self.rate else {
            return Ok(());
        };
        let now = Instant::now();
        lock(&self.first_call).get_or_insert(now);
        let mut recent = lock(&self.recent);
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= rate.per)
        {
            recent.pop_front();
        }
        if recent.len() >= rate.calls as usize {
            self.rate_limited.fetch_add(1, Ordering::Relaxed);
            lock(&self.refused_at).push(now);
            return Err(rate_limited(rate.calls, rate.per.as_secs()));
        }
        recent.push_back(now);
        Ok(())
    }

    /// Serialises and signs an answer as bunq does.
    fn respond(&self, answer: Answer) -> Response {
        let (status, body) = match answer {
            Ok(v) => (StatusCode::OK, v),
            Err(Refusal(status, text)) => (
                status,
                json!({"Error": [{"error_description": text, "error_description_translated": text}]}),
            ),
        };
        let bytes = body.to_string().into_bytes();
        let mut response = (status, bytes.clone()).into_response();
        let h = response.headers_mut();
        h.insert("Content-Type", HeaderValue::from_static("application/json"));
        if let Ok(v) = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()) {
            h.insert("X-Bunq-Client-Response-Id", v);
        }
        if let Ok(sig) = signing::sign(&self.server_key, &bytes)
            && let Ok(v) = HeaderValue::from_str(&sig)
        {
            h.insert("X-Bunq-Server-Signature", v);
        }
        response
    }
}

fn refuse_by_prefix(secret: &str) -> Result<(), Refusal> {
    if secret.starts_with("reject") {
        return Err(bad_request(CREDENTIALS_INCORRECT));
    }
    if secret.starts_with("forbidden") {
        return Err(refuse(StatusCode::FORBIDDEN, "Insufficient authorisation."));
    }
    Ok(())
}

fn rate_limited(calls: u32, per_s: u64) -> Refusal {
    refuse(
        StatusCode::TOO_MANY_REQUESTS,
        &format!(
            "Too many requests. You can do a maximum of {calls} calls per {per_s} second to this endpoint."
        ),
    )
}

fn refuse(status: StatusCode, text: &str) -> Refusal {
    Refusal(status, text.to_owned())
}

fn bad_request(text: &str) -> Refusal {
    refuse(StatusCode::BAD_REQUEST, text)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
}

fn json_body(body: &[u8]) -> Result<Value, Refusal> {
    serde_json::from_slice(body).map_err(|_| bad_request("The request body is not valid JSON."))
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    for b in &mut bytes {
        *b = fastrand::u8(..);
    }
    hex::encode(bytes)
}

/// bunq's timestamp form, e.g. `2026-11-29 09:25:11.594918` (UTC).
fn bunq_time(t: OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// The emulator's routes; anything else is bunq's 404.
pub fn router(emulator: Arc<Emulator>) -> Router {
    Router::new()
        .route(
            "/v1/installation",
            post(|State(e): State<Arc<Emulator>>, body: Bytes| async move {
                e.respond(e.installation(&body))
            }),
        )
        .route(
            "/v1/device-server",
            post(
                |State(e): State<Arc<Emulator>>, headers: HeaderMap, body: Bytes| async move {
                    e.respond(e.device_server(&headers, &body))
                },
            ),
        )
        .route(
            "/v1/session-server",
            post(
                |State(e): State<Arc<Emulator>>, headers: HeaderMap, body: Bytes| async move {
                    let answer = e.session_server(&headers, &body).await;
                    e.respond(answer)
                },
            ),
        )
        .fallback(|State(e): State<Arc<Emulator>>| async move {
            e.respond(Err(refuse(
                StatusCode::NOT_FOUND,
                "The requested endpoint does not exist.",
            )))
        })
        .with_state(emulator)
}
