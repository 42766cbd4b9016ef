//! Output: the bodies of `session.created` and `session.failed`, and their serializers.

use secrecy::{ExposeSecret, SecretString};
use serde::{Serialize, Serializer};
use time::OffsetDateTime;

use super::{ProvisionId, ProvisionReady, rfc3339};
use crate::failure::Failure;

fn expose<S: Serializer>(s: &SecretString, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.expose_secret())
}

fn as_rfc3339<S: Serializer>(t: &OffsetDateTime, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(&rfc3339(*t))
}

/// The session token as `session.created` carries it.
#[derive(Clone, Debug, Serialize)]
pub enum SessionToken {
    /// In clear, as `session_token` (no consumer key configured). `Debug` hides it.
    #[serde(rename = "session_token", serialize_with = "expose")]
    Clear(SecretString),
    /// Sealed for the consumer (`SESSION_TOKEN_ENCRYPTION_KEY`), as `session_token_jwe`: the
    /// JWE compact serialization (RFC 7516 §7.1) of the token; only the key's holder opens it.
    #[serde(rename = "session_token_jwe")]
    Sealed(String),
}

/// Body of `session.created` (`content_type: application/json`).
///
/// It carries the session token, in clear or sealed for the consumer: that is its purpose.
/// `Debug` hides a clear token.
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
    /// session-server's `Token.token`: the bearer token for the user's API calls, as
    /// `session_token` or `session_token_jwe`.
    #[serde(flatten)]
    pub session_token: SessionToken,
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

/// Body of `session.failed` (`content_type: application/json`): a ready credential's provision
/// and its [`Failure`], read where they are, not copied. Fields, in order: `schema_version`
/// (always [`SCHEMA_VERSION`](super::SCHEMA_VERSION)); `provision_id`, `external_uuid` (or
/// null), `credential_id` (or null) from the input; `reason` (as in the dead letter's
/// `x-error-reason`); `http_status` of bunq's last answer, or null; `error_description`
/// (bunq's, or the worker's own explanation); `attempts` (bunq calls for this input, all rounds;
/// 0 when none was made); `first_attempt_at` and `last_attempt_at` (RFC 3339). The failure's
/// `detail` stays in the dead letter.
#[derive(Clone, Copy, Debug)]
pub struct SessionFailed<'a> {
    /// The provision that failed.
    pub provision: &'a ProvisionReady,
    /// Why.
    pub failure: &'a Failure,
}

impl Serialize for SessionFailed<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let (p, f) = (self.provision, self.failure);
        let mut s = ser.serialize_struct("SessionFailed", 10)?;
        s.serialize_field("schema_version", &super::SCHEMA_VERSION)?;
        s.serialize_field("provision_id", &p.provision_id)?;
        s.serialize_field("external_uuid", &p.external_uuid)?;
        s.serialize_field("credential_id", &p.credential_id)?;
        s.serialize_field("reason", &f.reason)?;
        s.serialize_field("http_status", &f.http_status)?;
        s.serialize_field("error_description", &f.error_description)?;
        s.serialize_field("attempts", &f.attempts)?;
        s.serialize_field("first_attempt_at", &rfc3339(f.first_attempt_at))?;
        s.serialize_field("last_attempt_at", &rfc3339(f.last_attempt_at))?;
        s.end()
    }
}
