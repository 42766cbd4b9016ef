//! A failed bunq call and its retry class.
//!
//! The status table follows <https://doc.bunq.com/basics/errors> and bunq swagger.json
//! topic "Errors"; 491 (maintenance) and 429 are transient, 466 means the request signature is
//! missing (a worker bug, so permanent).

use std::time::Duration;

use crate::{failure::FailureReason, rate_limit::RateLimit};

/// How the caller should react to a failed call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetryClass {
    /// Try again after a backoff delay.
    Transient,
    /// Try again, but not before `window` has passed: a 429.
    RateLimited {
        /// How long to wait: `Retry-After` (seconds or an HTTP date) when bunq sent one, else
        /// the window its message names ("… per 30 second …"); `None` when neither says.
        window: Option<Duration>,
        /// The rate bunq's message states ("a maximum of 1 calls per 30 second"), to adopt as
        /// the pace.
        rate: Option<RateLimit>,
    },
    /// Do not retry; dead-letter with this reason.
    Permanent(FailureReason),
}

impl RetryClass {
    /// The class for logs: `transient`, `rate_limited`, or the reason code of a permanent
    /// failure (e.g. `credential_rejected`).
    pub fn as_str(&self) -> &'static str {
        match self {
            RetryClass::Transient => "transient",
            RetryClass::RateLimited { .. } => "rate_limited",
            RetryClass::Permanent(reason) => reason.as_str(),
        }
    }
}

/// One failed call to bunq. Holds no secret: descriptions are scrubbed of the tokens the call
/// carried before they are stored.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{endpoint}: {}", self.summary())]
pub struct CallError {
    /// The endpoint, e.g. `POST /session-server`.
    pub endpoint: &'static str,
    /// What to do about it.
    pub class: RetryClass,
    /// HTTP status, when a response arrived.
    pub http_status: Option<u16>,
    /// bunq's `error_description`, or the worker's description of the fault.
    pub description: String,
    /// bunq's `X-Bunq-Client-Response-Id`, when present.
    pub response_id: Option<String>,
    /// The request may have reached bunq but its answer was lost (a timeout or a broken
    /// connection after the request was sent): bunq may have acted on it.
    pub answer_lost: bool,
}

impl CallError {
    fn summary(&self) -> String {
        match self.http_status {
            Some(s) => format!("HTTP {s}: {}", self.description),
            None => self.description.clone(),
        }
    }
}

/// Classifies an HTTP status that is not 2xx, by what bunq says as well as the status: a
/// refusal of the worker's signature or installation is `signature_rejected` whatever the
/// status (bunq answers "The request signature is invalid." with 400), so it is not charged to
/// the credential.
pub fn classify_status(status: u16, description: &str) -> RetryClass {
    if !matches!(status, 429 | 491 | 500..=599) && refuses_the_installation(description) {
        return RetryClass::Permanent(FailureReason::SignatureRejected);
    }
    match status {
        429 => RetryClass::RateLimited {
            window: rate_limit_window(description),
            rate: stated_rate(description),
        },
        491 | 500..=599 => RetryClass::Transient,
        400 | 490 => RetryClass::Permanent(FailureReason::CredentialRejected),
        401 | 466 => RetryClass::Permanent(FailureReason::SignatureRejected),
        403 => RetryClass::Permanent(FailureReason::Forbidden),
        _ => RetryClass::Permanent(FailureReason::UnexpectedResponse),
    }
}

/// Whether bunq's text refuses the worker's request signature or installation (not the
/// credential): "The request signature is invalid.", "Request signature required.", an unknown
/// or invalid installation or authentication token.
pub fn refuses_the_installation(description: &str) -> bool {
    let d = description.to_ascii_lowercase();
    let about_us =
        d.contains("signature") || d.contains("installation") || d.contains("authentication token");
    let refused = [
        "invalid",
        "required",
        "missing",
        "not valid",
        "unknown",
        "incorrect",
        "not found",
        "does not match",
    ]
    .iter()
    .any(|w| d.contains(w));
    about_us && refused
}

/// Reads the rate from bunq's 429 message: "You can do a maximum of X calls per Y second(s)".
pub fn stated_rate(description: &str) -> Option<RateLimit> {
    let lower = description.to_ascii_lowercase();
    let before = &lower[..lower.find(" per ")?];
    let calls: u32 = before
        .split_whitespace()
        .rev()
        .find_map(|w| w.parse().ok())
        .filter(|n| *n > 0)?;
    Some(RateLimit {
        calls,
        per: rate_limit_window(description)?,
    })
}

/// Reads a `Retry-After` value: delay-seconds or an HTTP date (RFC 9110 §10.2.3), relative to
/// `now`; at most [`MAX_RATE_LIMIT_WINDOW_S`].
pub fn retry_after(value: &str, now: time::OffsetDateTime) -> Option<Duration> {
    let value = value.trim();
    let secs = match value.parse::<u64>() {
        Ok(s) => s,
        Err(_) => {
            let at =
                time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822)
                    .ok()?;
            u64::try_from((at - now).whole_seconds().max(0)).ok()?
        }
    };
    Some(Duration::from_secs(secs.min(MAX_RATE_LIMIT_WINDOW_S)))
}

/// Reads the window from bunq's 429 message: "You can do a maximum of X calls per Y second(s)".
pub fn rate_limit_window(description: &str) -> Option<Duration> {
    let lower = description.to_ascii_lowercase();
    let after = &lower[lower.find(" per ")? + 5..];
    let digits: String = after
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    let n: u64 = digits.parse().ok()?;
    let unit = after.trim_start()[digits.len()..].trim_start();
    let secs = if unit.starts_with("minute") {
        n.checked_mul(60)?
    } else if unit.starts_with("second") || unit.starts_with("sec") || unit.starts_with('s') {
        n
    } else {
        return None;
    };
    Some(Duration::from_secs(secs.min(MAX_RATE_LIMIT_WINDOW_S)))
}

/// Longest rate-limit window honoured, in s (one day): longer than any credential lives, and
/// small enough that adding it to a clock can never overflow.
pub const MAX_RATE_LIMIT_WINDOW_S: u64 = 86_400;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table() {
        use FailureReason::*;
        let p = |s| classify_status(s, "");
        assert_eq!(p(400), RetryClass::Permanent(CredentialRejected));
        assert_eq!(p(490), RetryClass::Permanent(CredentialRejected));
        assert_eq!(p(401), RetryClass::Permanent(SignatureRejected));
        assert_eq!(p(466), RetryClass::Permanent(SignatureRejected));
        assert_eq!(p(403), RetryClass::Permanent(Forbidden));
        assert_eq!(p(404), RetryClass::Permanent(UnexpectedResponse));
        assert_eq!(p(405), RetryClass::Permanent(UnexpectedResponse));
        assert_eq!(p(302), RetryClass::Permanent(UnexpectedResponse));
        for s in [491, 500, 502, 503, 504] {
            assert_eq!(p(s), RetryClass::Transient, "{s}");
        }
        assert_eq!(
            p(429),
            RetryClass::RateLimited {
                window: None,
                rate: None
            }
        );
    }

    #[test]
    fn bunqs_words_about_the_installation_override_the_status() {
        let sig = RetryClass::Permanent(FailureReason::SignatureRejected);
        assert_eq!(
            classify_status(400, "The request signature is invalid."),
            sig
        );
        assert_eq!(classify_status(403, "Request signature required."), sig);
        assert_eq!(classify_status(400, "Installation not found."), sig);
        assert_eq!(
            classify_status(
                400,
                "User credentials are incorrect. Incorrect API key or IP address."
            ),
            RetryClass::Permanent(FailureReason::CredentialRejected)
        );
        // A transient status stays transient whatever it says.
        assert_eq!(
            classify_status(503, "signature service unavailable, invalid state"),
            RetryClass::Transient
        );
    }

    #[test]
    fn reads_the_rate_limit_window() {
        let m =
            "Too many requests. You can do a maximum of 1 calls per 30 second to this endpoint.";
        assert_eq!(rate_limit_window(m), Some(Duration::from_secs(30)));
        assert_eq!(
            classify_status(429, m),
            RetryClass::RateLimited {
                window: Some(Duration::from_secs(30)),
                rate: Some(RateLimit {
                    calls: 1,
                    per: Duration::from_secs(30)
                })
            }
        );
        assert_eq!(
            stated_rate("You can do a maximum of 5 calls per 3 seconds"),
            Some(RateLimit {
                calls: 5,
                per: Duration::from_secs(3)
            })
        );
        assert_eq!(stated_rate("slow down"), None);
        let now = time::macros::datetime!(2026-11-29 12:00 UTC);
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after("Sun, 29 Nov 2026 12:01:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            retry_after("Sun, 29 Nov 2026 11:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(
            rate_limit_window("maximum of 5 calls per 3 seconds"),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            rate_limit_window("maximum of 5 calls per 2 minutes"),
            Some(Duration::from_secs(120))
        );
        assert_eq!(rate_limit_window("slow down"), None);
        assert_eq!(
            rate_limit_window("maximum of 1 calls per 18446744073709551615 second"),
            Some(Duration::from_secs(MAX_RATE_LIMIT_WINDOW_S))
        );
        assert_eq!(rate_limit_window("per fortnight"), None);
    }
}
