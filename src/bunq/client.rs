//! The three bunq calls: installation, device-server and session-server.
//!
//! Every call after installation carries the documented headers (`User-Agent`,
//! `Cache-Control`, `Content-Type`, `X-Bunq-Client-Authentication`, `X-Bunq-Client-Signature`,
//! a new `X-Bunq-Client-Request-Id`, `X-Bunq-Geolocation`, `X-Bunq-Language`, `X-Bunq-Region`)
//! and is signed over the exact body bytes sent. 2xx answers are checked against
//! `X-Bunq-Server-Signature` when verification is on.
//! Sources: bunq swagger.json topic "Headers"; sdk_python `api_client.py`;
//! <https://doc.bunq.com/basics/signing>.

use std::time::Duration;

use reqwest::{StatusCode, Url, header::HeaderMap};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use super::{
    context::ApiContext,
    error::retry_after,
    error::{CallError, RetryClass, classify_status},
    response::{
        SessionServer, error_description, merge_response, parse_session_server, shorten_description,
    },
    signing,
};
use crate::failure::FailureReason;

/// Largest response body the worker reads, in bytes; bunq's answers are a few KiB.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// `POST /installation`.
pub const INSTALLATION: &str = "POST /installation";
/// `POST /device-server`.
pub const DEVICE_SERVER: &str = "POST /device-server";
/// `POST /session-server`.
pub const SESSION_SERVER: &str = "POST /session-server";

/// The answer to one successful call.
#[derive(Debug)]
pub struct Answer<T> {
    /// The parsed value.
    pub value: T,
    /// bunq's `X-Bunq-Client-Response-Id`, for bunq support.
    pub response_id: Option<String>,
}

/// An HTTP client for bunq's public API.
#[derive(Clone, Debug)]
pub struct BunqClient {
    http: reqwest::Client,
    /// The three endpoints' URLs, joined to the base once.
    urls: Urls,
    user_agent: String,
    verify_responses: bool,
}

/// `POST` targets under the base URL.
#[derive(Clone, Debug)]
struct Urls {
    installation: Url,
    device_server: Url,
    session_server: Url,
}

impl Urls {
    fn under(base: &Url) -> Self {
        let join = |path: &str| {
            let mut url = base.clone();
            let joined = format!("{}/{}", url.path().trim_end_matches('/'), path);
            url.set_path(&joined);
            url
        };
        Self {
            installation: join("installation"),
            device_server: join("device-server"),
            session_server: join("session-server"),
        }
    }
}

impl BunqClient {
    /// Builds a client for `base` (e.g. `https://public-api.sandbox.bunq.com/v1`) with a
    /// per-request `timeout` (connect and response).
    ///
    /// # Errors
    /// When reqwest cannot build its TLS configuration.
    pub fn new(
        base: Url,
        user_agent: String,
        timeout: Duration,
        verify_responses: bool,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            http,
            urls: Urls::under(&base),
            user_agent,
            verify_responses,
        })
    }

    /// A client trusting `root_pem` as well (a test server's self-signed certificate).
    #[cfg(test)]
    fn trusting(base: Url, root_pem: &[u8]) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .add_root_certificate(
                reqwest::Certificate::from_pem(root_pem).expect("a PEM certificate"),
            )
            .build()
            .expect("a TLS client");
        Self {
            http,
            urls: Urls::under(&base),
            user_agent: "tls-test".into(),
            verify_responses: true,
        }
    }

    /// `POST /installation` with `client_public_key` (PEM): the only unsigned call.
    /// Returns the installation token and the server public key (PEM).
    ///
    /// # Errors
    /// [`CallError`] classified as for the other calls; a 2xx without `Token.token` or
    /// `ServerPublicKey.server_public_key` is `unexpected_response`.
    pub async fn installation(
        &self,
        client_public_key_pem: &str,
    ) -> Result<Answer<(SecretString, String)>, CallError> {
        let body = serde_json::to_vec(&json!({ "client_public_key": client_public_key_pem }))
            .expect("a JSON object of strings always serialises");
        let (status, headers, bytes) = self
            .post(INSTALLATION, &self.urls.installation, None, body, &[])
            .await?;
        let response_id = response_id(&headers);
        let unexpected = |d: &str| CallError {
            endpoint: INSTALLATION,
            class: RetryClass::Permanent(FailureReason::UnexpectedResponse),
            http_status: Some(status),
            description: d.to_owned(),
            response_id: response_id.clone(),
            answer_lost: false,
        };
        let m = merge_response(&bytes).map_err(|d| unexpected(&d))?;
        let token = m
            .get("Token")
            .and_then(|t| t.get("token"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unexpected("installation response has no Token.token"))?;
        let server_key = m
            .get("ServerPublicKey")
            .and_then(|t| t.get("server_public_key"))
            .and_then(|t| t.as_str())
            .ok_or_else(|| unexpected("installation response has no ServerPublicKey"))?;
        Ok(Answer {
            value: (SecretString::from(token.to_owned()), server_key.to_owned()),
            response_id,
        })
    }

    /// `POST /device-server` binding the credential's API key (`secret`) to this installation.
    ///
    /// # Errors
    /// [`CallError`] with the class from the status table.
    pub async fn device_server(
        &self,
        ctx: &ApiContext,
        secret: &SecretString,
        description: &str,
        permitted_ips: &[String],
    ) -> Result<Answer<()>, CallError> {
        let body = serde_json::to_vec(&json!({
            "description": description,
            "secret": secret.expose_secret(),
            "permitted_ips": permitted_ips,
        }))
        .expect("a JSON object of strings always serialises");
        let (_, headers, _) = self
            .post(
                DEVICE_SERVER,
                &self.urls.device_server,
                Some(ctx),
                body,
                &[secret],
            )
            .await?;
        Ok(Answer {
            value: (),
            response_id: response_id(&headers),
        })
    }

    /// `POST /session-server` with the credential's API key: opens the user's session.
    ///
    /// # Errors
    /// [`CallError`] with the class from the status table; a 2xx without `Id`, `Token` or a
    /// user object is `unexpected_response`.
    pub async fn session_server(
        &self,
        ctx: &ApiContext,
        secret: &SecretString,
    ) -> Result<Answer<SessionServer>, CallError> {
        let body = serde_json::to_vec(&json!({ "secret": secret.expose_secret() }))
            .expect("a JSON object of strings always serialises");
        let (status, headers, bytes) = self
            .post(
                SESSION_SERVER,
                &self.urls.session_server,
                Some(ctx),
                body,
                &[secret],
            )
            .await?;
        let response_id = response_id(&headers);
        let value = parse_session_server(&bytes).map_err(|d| CallError {
            endpoint: SESSION_SERVER,
            class: RetryClass::Permanent(FailureReason::UnexpectedResponse),
            http_status: Some(status),
            description: d,
            response_id: response_id.clone(),
            answer_lost: false,
        })?;
        Ok(Answer { value, response_id })
    }

    /// Whether `bytes` are a whole 2xx answer: its server signature verifies (when answers are
    /// verified), else it is a whole JSON document.
    fn is_whole_answer(&self, ctx: Option<&ApiContext>, headers: &HeaderMap, bytes: &[u8]) -> bool {
        match (self.verify_responses, ctx) {
            (true, Some(ctx)) => headers
                .get("X-Bunq-Server-Signature")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|sig| signing::verify(ctx.server_public_key(), bytes, sig)),
            _ => serde_json::from_slice::<serde_json::Value>(bytes).is_ok(),
        }
    }

    /// Sends one attempt. `secrets` are scrubbed from any error description bunq echoes.
    async fn post(
        &self,
        endpoint: &'static str,
        url: &Url,
        ctx: Option<&ApiContext>,
        body: Vec<u8>,
        secrets: &[&SecretString],
    ) -> Result<(u16, HeaderMap, Vec<u8>), CallError> {
        let fail = |class, http_status, description: String, response_id| CallError {
            endpoint,
            class,
            http_status,
            description,
            response_id,
            answer_lost: false,
        };
        let mut req = self
            .http
            .post(url.clone())
            .header("User-Agent", &self.user_agent)
            .header("Cache-Control", "no-cache")
            .header("Content-Type", "application/json")
            .header("X-Bunq-Client-Request-Id", uuid::Uuid::new_v4().to_string())
            .header("X-Bunq-Geolocation", "0 0 0 0 000")
            .header("X-Bunq-Language", "en_US")
            .header("X-Bunq-Region", "nl_NL");
        if let Some(ctx) = ctx {
            let signature = signing::sign(ctx.key_pair(), &body).map_err(|_| {
                fail(
                    RetryClass::Permanent(FailureReason::SignatureRejected),
                    None,
                    "cannot sign the request".into(),
                    None,
                )
            })?;
            req = req
                .header(
                    "X-Bunq-Client-Authentication",
                    ctx.installation_token().expose_secret(),
                )
                .header("X-Bunq-Client-Signature", signature);
        }
        let mut resp = req.body(body).send().await.map_err(|e| CallError {
            // Past the connection stage the request may have reached bunq.
            answer_lost: !e.is_connect(),
            ..fail(RetryClass::Transient, None, transport_error(&e), None)
        })?;
        let status = resp.status();
        let headers = std::mem::take(resp.headers_mut());
        let rid = response_id(&headers);
        let mut bytes = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
                        return Err(fail(
                            if status.is_success() {
                                RetryClass::Permanent(FailureReason::UnexpectedResponse)
                            } else {
                                classify_status(status.as_u16(), "")
                            },
                            Some(status.as_u16()),
                            format!("response body larger than {MAX_RESPONSE_BYTES} bytes"),
                            rid,
                        ));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                // A whole answer whose connection then ended badly (over TLS: closed without
                // close_notify) is an answer: once bunq made a session, losing it over how the
                // connection ended would waste a spent credential.
                Err(_) if status.is_success() && self.is_whole_answer(ctx, &headers, &bytes) => {
                    break;
                }
                Err(e) => {
                    return Err(CallError {
                        answer_lost: true,
                        ..fail(
                            RetryClass::Transient,
                            Some(status.as_u16()),
                            format!("reading the response failed: {}", transport_error(&e)),
                            rid,
                        )
                    });
                }
            }
        }
        if status.is_success() {
            if let (true, Some(ctx)) = (self.verify_responses, ctx) {
                let valid = headers
                    .get("X-Bunq-Server-Signature")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|sig| signing::verify(ctx.server_public_key(), &bytes, sig));
                if !valid {
                    return Err(fail(
                        RetryClass::Permanent(FailureReason::ResponseSignatureInvalid),
                        Some(status.as_u16()),
                        "X-Bunq-Server-Signature is missing or does not match the body and the installation's server public key".into(),
                        rid,
                    ));
                }
            }
            return Ok((status.as_u16(), headers, bytes));
        }
        let description = match error_description(&bytes) {
            Some(d) => shorten_description(&scrub(d, ctx, secrets)),
            None => describe_non_json(status, &headers, bytes.len()),
        };
        let mut class = classify_status(status.as_u16(), &description);
        if let RetryClass::RateLimited { window, .. } = &mut class
            && let Some(after) = headers
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry_after(v, time::OffsetDateTime::now_utc()))
        {
            // bunq's own header, when it sends one, is more precise than its message.
            *window = Some(after);
        }
        Err(fail(class, Some(status.as_u16()), description, rid))
    }
}

fn response_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("X-Bunq-Client-Response-Id")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(100).collect())
}

/// Names the kind of transport failure without the URL's path, query or any header; one that
/// never reached bunq (connect, timeout) names the host and `BUNQ_API_URL`, the setting to check.
fn transport_error(e: &reqwest::Error) -> String {
    let kind = if e.is_builder() {
        "the request could not be built"
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "connection broke while reading the body"
    } else if e.is_request() {
        "request failed (connection reset?)"
    } else {
        "transport error"
    };
    let place = e
        .url()
        .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)));
    let kind = match place {
        Some(p) if e.is_connect() || e.is_timeout() => format!("{kind} to {p} (BUNQ_API_URL)"),
        _ => kind.to_owned(),
    };
    let mut source = std::error::Error::source(e);
    let mut cause = String::new();
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if cause.is_empty() {
        kind
    } else {
        format!("{kind}: {cause}")
    }
}

fn describe_non_json(status: StatusCode, headers: &HeaderMap, len: usize) -> String {
    let ct = headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("no content type");
    format!(
        "{} with a non-JSON body ({ct}, {len} bytes)",
        status.canonical_reason().unwrap_or("unknown status")
    )
}

/// Removes tokens the call carried from text bunq sent back: their exact form, and any word of
/// the text (a run of token characters) that shares [`FRAGMENT`] characters in a row with one,
/// whatever the case, so a token echoed trimmed, upper-cased, cut short or quoted is hidden too.
pub(crate) fn scrub(
    mut text: String,
    ctx: Option<&ApiContext>,
    secrets: &[&SecretString],
) -> String {
    let installation = ctx.map(|c| c.installation_token());
    for s in secrets.iter().copied().chain(installation) {
        let raw = s.expose_secret();
        for form in [raw, raw.trim()] {
            // Shorter strings are not real credentials and would garble ordinary words.
            if form.len() >= 4 && text.contains(form) {
                text = text.replace(form, "[REDACTED]");
            }
        }
        text = redact_fragments(&text, raw.trim());
    }
    text
}

/// How many characters in a row a word must share with a secret to be taken for it.
const FRAGMENT: usize = 12;

/// `text` with every word that shares [`FRAGMENT`] characters in a row with `secret` (ASCII
/// case ignored) replaced by `[REDACTED]`.
fn redact_fragments(text: &str, secret: &str) -> String {
    let secret = secret.to_ascii_lowercase();
    if secret.len() < FRAGMENT || !secret.is_ascii() {
        return text.to_owned();
    }
    let grams: std::collections::HashSet<&[u8]> = secret.as_bytes().windows(FRAGMENT).collect();
    let is_word = |c: char| c.is_ascii_alphanumeric() || "-_+/=.".contains(c);
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(is_word) {
        out.push_str(&rest[..start]);
        let word_len = rest[start..]
            .find(|c| !is_word(c))
            .unwrap_or(rest.len() - start);
        let word = &rest[start..start + word_len];
        let lower = word.to_ascii_lowercase();
        if lower
            .as_bytes()
            .windows(FRAGMENT)
            .any(|w| grams.contains(w))
        {
            out.push_str("[REDACTED]");
        } else {
            out.push_str(word);
        }
        rest = &rest[start + word_len..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tls_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubbing_happens_before_shortening() {
        let token =
            SecretString::from(" a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9 ");
        let bunq_text = format!(
            "{} API key {} is not valid",
            "x".repeat(460),
            token.expose_secret().trim()
        );
        let d = shorten_description(&scrub(bunq_text, None, &[&token]));
        assert!(!d.contains("a1b2c3d4e5f6"), "{d}");
        assert!(d.contains("[REDACTED]"), "{d}");
        let long = shorten_description(&"y".repeat(600));
        assert_eq!(long.chars().count(), 501);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn a_token_echoed_in_another_form_is_hidden() {
        let token = SecretString::from("a1b2c3d4e5f60718293a4b5c6d7e8f90");
        let upper = "A1B2C3D4E5F60718293A4B5C6D7E8F9";
        for text in [
            format!("API key {upper} is not valid"),
            format!("API key \"{}\" is not valid", &token.expose_secret()[3..20]),
            format!("key={upper}, user 42"),
        ] {
            let d = scrub(text.clone(), None, &[&token]);
            assert!(d.contains("[REDACTED]"), "{text} -> {d}");
            assert!(!d.to_ascii_lowercase().contains("c3d4e5f607"), "{d}");
        }
        // Ordinary words and numbers stay.
        let d = scrub(
            "User credentials are incorrect (42).".into(),
            None,
            &[&token],
        );
        assert_eq!(d, "User credentials are incorrect (42).");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            shorten_description("bad\nFAKE LOG LINE"),
            "bad\\nFAKE LOG LINE"
        );
    }
}
