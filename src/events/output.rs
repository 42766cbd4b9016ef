//! Output: the bodies of `session.created` and `session.failed`, and their serializers.

use secrecy::{ExposeSecret, SecretString};
use serde::{Serialize, Serializer};
use time::OffsetDateTime;

use super::{ProvisionId, rfc3339};
use crate::failure::FailureReason;

fn expose<S: Serializer>(s: &SecretString, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.expose_secret())
}

fn as_rfc3339<S: Serializer>(t: &OffsetDateTime, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(&rfc3339(*t))
}

/// Body of `session.created` (`content_type: application/json`).
///
/// It carries the session token: that is its purpose. `Debug` hides it.
#[derive(Clone, Debug, Serialize)]
pub struct SessionCreated {
    /// Always [`SCHEMA_VERSION`](super::SCHEMA_VERSION).
    pub schema_version: u32,
    /// From the input.
    pub provision_id: ProvisionId,
    /// From the input, or null.
    pub external_uuid: Option<String>,
    /// From the input, or null.
    pub credential_id: Option<i64>,
    /// session-server's `Id.id`.
    pub session_id: i64,
    /// session-server's `Token.token`: the bearer token for the user's API calls.
    #[serde(serialize_with = "expose")]
    pub session_token: SecretString,
    /// The provisioned user's id: `UserApiKey.granted_by_user`'s id, else the user object's id;
    /// null when bunq's user part could not be read.
    pub user_id: Option<i64>,
    /// `UserApiKey.id` when bunq answered with a `UserApiKey`, else null.
    pub user_api_key_id: Option<i64>,
    /// Type of the user `user_id` names, e.g. `UserPerson`, `UserCompany`; null when bunq's
    /// user part could not be read (the session exists all the same).
    pub user_type: Option<String>,
    /// The session's lifetime in s (the user's `session_timeout`).
    pub session_timeout_seconds: u64,
    /// `created_at` + `session_timeout_seconds`, RFC 3339 UTC.
    #[serde(serialize_with = "as_rfc3339")]
    pub expires_at: OffsetDateTime,
    /// When bunq created the session token (`Token.created`), else when the worker got it.
    #[serde(serialize_with = "as_rfc3339")]
    pub created_at: OffsetDateTime,
    /// Lower-case hex SHA-256 of the worker's client public key (DER SubjectPublicKeyInfo), so
    /// consumers know which installation the session is bound to.
    pub installation_key_sha256: String,
}

/// Body of `session.failed`. Holds no secret.
#[derive(Clone, Debug, Serialize)]
pub struct SessionFailed {
    /// Always [`SCHEMA_VERSION`](super::SCHEMA_VERSION).
    pub schema_version: u32,
    /// From the input.
    pub provision_id: ProvisionId,
    /// From the input, or null.
    pub external_uuid: Option<String>,
    /// From the input, or null.
    pub credential_id: Option<i64>,
    /// The reason code, as in the dead-letter header `x-error-reason`.
    pub reason: FailureReason,
    /// The HTTP status of bunq's last answer, when there was one.
    pub http_status: Option<u16>,
    /// bunq's `error_description` or the worker's own explanation.
    pub error_description: Option<String>,
    /// bunq calls made for this delivery (0 when none was made).
    pub attempts: u32,
    /// When the first bunq call started (RFC 3339), or when the delivery was handled if none.
    #[serde(serialize_with = "as_rfc3339")]
    pub first_attempt_at: OffsetDateTime,
    /// When the last bunq call ended (RFC 3339).
    #[serde(serialize_with = "as_rfc3339")]
    pub last_attempt_at: OffsetDateTime,
}
