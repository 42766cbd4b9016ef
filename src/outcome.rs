//! What became of a delivery, and the reason codes shared by dead-letter headers and
//! `session.failed`.
//!
//! Business steps return an [`Outcome`]; only [`crate::worker`] turns it into broker actions
//! (publish, wait for the publisher confirm, then ack), so the ordering rule lives in one place.

use serde::Serialize;

use crate::events::{NotReady, SessionCreated, SessionFailed};

/// Why a delivery ended in the dead-letter queue. The string forms are a public contract:
/// they appear in the `x-error-reason` header and in `session.failed`'s `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// The body is not JSON (or is empty).
    MalformedJson,
    /// The body is not UTF-8.
    NotUtf8,
    /// JSON, but not a provision event (wrong shape or types, missing or empty token).
    InvalidEvent,
    /// Larger than `MAX_MESSAGE_BYTES`.
    TooLarge,
    /// bunq answered 400 or 490: the credential (API key) or IP was refused.
    CredentialRejected,
    /// bunq answered 401 or 466: the installation token or request signature was refused.
    SignatureRejected,
    /// bunq answered 403.
    Forbidden,
    /// The credential's `expiry_time` passed before a session could be opened.
    CredentialExpired,
    /// Transient failures (timeouts, 5xx, 429, 491) outlasted the retry budget.
    RetriesExhausted,
    /// Another 4xx, a 1xx/3xx, or a 2xx without `Id` or `Token`.
    UnexpectedResponse,
    /// A 2xx whose `X-Bunq-Server-Signature` is missing or does not verify.
    ResponseSignatureInvalid,
}

impl FailureReason {
    /// The reason code, e.g. `credential_rejected`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::MalformedJson => "malformed_json",
            FailureReason::NotUtf8 => "not_utf8",
            FailureReason::InvalidEvent => "invalid_event",
            FailureReason::TooLarge => "too_large",
            FailureReason::CredentialRejected => "credential_rejected",
            FailureReason::SignatureRejected => "signature_rejected",
            FailureReason::Forbidden => "forbidden",
            FailureReason::CredentialExpired => "credential_expired",
            FailureReason::RetriesExhausted => "retries_exhausted",
            FailureReason::UnexpectedResponse => "unexpected_response",
            FailureReason::ResponseSignatureInvalid => "response_signature_invalid",
        }
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of handling one delivery, before any broker action.
#[derive(Debug)]
pub enum Outcome {
    /// A session exists: publish `session.created`, then ack.
    Created(Box<SessionCreated>),
    /// Valid but not ready: ack and count as skipped.
    Skipped(NotReady),
    /// Permanent failure: publish `session.failed` (when the input named a provision), publish
    /// the delivery to the dead-letter exchange with the reason headers, then ack.
    Failed(Box<Failure>),
    /// Transient failures spent the in-process budget but the credential has time: publish a
    /// copy to a delay queue (confirmed), then ack; it comes back through the input exchange.
    Delayed(Box<Delayed>),
    /// Shutdown interrupted the work before a session existed: nack with requeue so another
    /// consumer takes it.
    Abandoned,
}

/// A delivery parked for a durable delayed retry.
#[derive(Debug)]
pub struct Delayed {
    /// The tier's delay queue.
    pub queue: String,
    /// The tier's delay.
    pub delay: std::time::Duration,
    /// Delayed retries including this one (the `x-bunq-delayed-retries` header).
    pub retries: u32,
    /// bunq calls made so far, all rounds together (the `x-bunq-calls` header).
    pub calls: u32,
    /// Why the in-process retries ended, no secrets.
    pub detail: String,
    /// When the first bunq call for this input started, over all rounds.
    pub first_attempt_at: time::OffsetDateTime,
}

/// A permanent failure of one delivery.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The reason code.
    pub reason: FailureReason,
    /// Human text for `x-error-detail`; never holds a secret.
    pub detail: String,
    /// bunq calls made (the `x-attempts` header).
    pub attempts: u32,
    /// The `session.failed` event, absent for input that names no provision.
    pub event: Option<SessionFailed>,
}
