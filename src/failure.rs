//! The failure vocabulary: the reason codes shared by dead-letter headers (`x-error-reason`),
//! `session.failed`'s `reason` and the classification of bunq's answers, and the one
//! [`Failure`] value that goes from the session flow (or the input, or the worker's own limits)
//! to the dead letter and `session.failed`.
//!
//! A low-level module on purpose: [`crate::events`], [`crate::bunq`] and [`crate::outcome`] all
//! name these codes, and none of them depends on another for it.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A permanent failure of one input: what its dead letter's headers and its `session.failed`
/// report. Serialised (JSON, RFC 3339 times) only into the credential's record
/// ([`crate::ledger::Settlement::Answered`]); it holds no secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The reason code (`x-error-reason`, `session.failed`'s `reason`).
    pub reason: FailureReason,
    /// Human text for `x-error-detail`; never holds a secret.
    pub detail: String,
    /// The last HTTP status bunq answered with, if a call got an answer.
    pub http_status: Option<u16>,
    /// bunq's `error_description` of its last answer, else the worker's own explanation.
    pub error_description: Option<String>,
    /// bunq calls made for the input, all rounds together (`x-attempts`).
    pub attempts: u32,
    /// When the first bunq call started, over all rounds (the decision's time when none was
    /// made).
    #[serde(with = "time::serde::rfc3339")]
    pub first_attempt_at: OffsetDateTime,
    /// When the last call ended (the decision's time when none was made).
    #[serde(with = "time::serde::rfc3339")]
    pub last_attempt_at: OffsetDateTime,
    /// When a pause bunq asked for (a 429) ends, if one is under way: a delayed retry makes no
    /// call before it.
    #[serde(with = "time::serde::rfc3339::option")]
    pub not_before: Option<OffsetDateTime>,
}

impl Failure {
    /// A failure decided at `now` without a bunq call of this round: the input itself (not
    /// JSON, wrong shape, …), the worker's own limits or a bug. `attempts` are the calls of
    /// earlier rounds, the first of which started at `first_attempt_at` (`now` when none).
    pub fn without_call(
        reason: FailureReason,
        detail: String,
        attempts: u32,
        first_attempt_at: Option<OffsetDateTime>,
        now: OffsetDateTime,
    ) -> Self {
        Self {
            reason,
            error_description: Some(detail.clone()),
            detail,
            http_status: None,
            attempts,
            first_attempt_at: first_attempt_at.unwrap_or(now),
            last_attempt_at: now,
            not_before: None,
        }
    }
}

/// Why a delivery ended in the dead-letter queue. The string forms are a public contract:
/// they appear in the `x-error-reason` header and in `session.failed`'s `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    /// A key the worker reads appears twice in its object.
    DuplicateKey,
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
    /// The input was handed back `DELIVERY_LIMIT` times (shutdowns, lost connections) without
    /// an outcome.
    RedeliveryLimit,
    /// An earlier session-server attempt's answer was lost and a retry was refused as a spent
    /// credential: bunq may have opened a session whose token never arrived.
    OutcomeUnknown,
}

impl FailureReason {
    /// Whether bunq took the credential: it answered for it (opened a session, refused it, or
    /// forbade it) or the credential ran out. Then a new message of it is a duplicate. Not so
    /// when bunq never gave an answer (`retries_exhausted`, `redelivery_limit`): a new message
    /// of the credential (the partner's poller sending it again) tries once more.
    pub fn spends_the_credential(self) -> bool {
        !matches!(
            self,
            FailureReason::RetriesExhausted | FailureReason::RedeliveryLimit
        )
    }

    /// The reason code, e.g. `credential_rejected`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::MalformedJson => "malformed_json",
            FailureReason::NotUtf8 => "not_utf8",
            FailureReason::InvalidEvent => "invalid_event",
            FailureReason::TooLarge => "too_large",
            FailureReason::DuplicateKey => "duplicate_key",
            FailureReason::CredentialRejected => "credential_rejected",
            FailureReason::SignatureRejected => "signature_rejected",
            FailureReason::Forbidden => "forbidden",
            FailureReason::CredentialExpired => "credential_expired",
            FailureReason::RetriesExhausted => "retries_exhausted",
            FailureReason::UnexpectedResponse => "unexpected_response",
            FailureReason::ResponseSignatureInvalid => "response_signature_invalid",
            FailureReason::OutcomeUnknown => "outcome_unknown",
            FailureReason::RedeliveryLimit => "redelivery_limit",
        }
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
