//! Event shapes: the "provision ready" input and the `session.created` / `session.failed` output.
//!
//! Input is decoded by hand from a [`serde_json::Value`] rather than with typed serde structs so
//! that no error message can echo a field's value (a token put in the wrong field would otherwise
//! be quoted back by serde into a log line or a dead-letter header).
//!
//! Accepted input shapes (bunq: <https://doc.bunq.com/basics/user-provisioning>):
//! - slim: `{"provision_id": int|string, "token_value": string, "credential_id"?: int,
//!   "expiry_time"?: string, "external_uuid"?: string}`;
//! - bunq's object, wrapped `{"PartnerUserProvision": {...}}` or unwrapped `{"id": .., ...}`;
//! - bunq's callback body `{"NotificationUrl": {"object": {"PartnerUserProvision": {...}}}}`.

mod strict_json;

use std::{collections::HashSet, fmt};

use secrecy::{ExposeSecret, SecretString};
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use time::{OffsetDateTime, PrimitiveDateTime, format_description::well_known::Rfc3339};

use crate::failure::FailureReason;

/// Longest accepted string `provision_id`, in bytes (UTF-8).
pub const MAX_PROVISION_ID_BYTES: usize = 128;

/// Escapes control characters and shortens input text to 100 characters for a log line, so a
/// field cannot forge log lines or flood them.
pub fn log_safe(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().take(100) {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    if s.chars().count() > 100 {
        out.push('…');
    }
    out
}

/// Version of the output event bodies; bumped on an incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

/// A provision's id as the input gave it: bunq's integer, or a partner's string.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ProvisionId {
    /// bunq's `PartnerUserProvision.id`.
    Int(i64),
    /// A non-empty string id.
    Str(String),
}

impl fmt::Display for ProvisionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProvisionId::Int(i) => write!(f, "{i}"),
            ProvisionId::Str(s) => f.write_str(s),
        }
    }
}

/// A ready credential: everything needed to open a session. `Debug` hides the token.
#[derive(Clone, Debug)]
pub struct ProvisionReady {
    /// The provision the credential belongs to.
    pub provision_id: ProvisionId,
    /// `credential.id`, when the input carried it.
    pub credential_id: Option<i64>,
    /// `external_uuid`, the partner's own reference, when present.
    pub external_uuid: Option<String>,
    /// `credential.expiry_time` (UTC); after it bunq rejects the credential.
    pub expiry_time: Option<OffsetDateTime>,
    /// `credential.token_value`: the one-time API key. Non-empty.
    pub token_value: SecretString,
}

/// A provision event that is valid but whose credential is not usable yet (or any more).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotReady {
    /// The provision's id, when the event had one.
    pub provision_id: Option<ProvisionId>,
    /// Why it is not ready, for the log line (never a secret).
    pub why: String,
}

/// What a delivery's body decodes to.
#[derive(Clone, Debug)]
pub enum Decoded {
    /// Open a session with it.
    Ready(ProvisionReady),
    /// Acknowledge and count as skipped.
    NotReady(NotReady),
}

/// Why a body could not be decoded. Messages name fields and types, never values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// The body is larger than `MAX_MESSAGE_BYTES`.
    #[error("body is {size} bytes, larger than the limit of {max} bytes")]
    TooLarge {
        /// Body size in bytes.
        size: usize,
        /// The configured limit in bytes.
        max: usize,
    },
    /// The body is not valid UTF-8.
    #[error("body is not valid UTF-8 (invalid byte at offset {valid_up_to})")]
    NotUtf8 {
        /// Offset of the first invalid byte.
        valid_up_to: usize,
    },
    /// The body is UTF-8 but not JSON.
    #[error("body is not JSON: {0}")]
    MalformedJson(String),
    /// The body is JSON but not a provision event.
    #[error("{0}")]
    InvalidEvent(String),
    /// A key the worker reads appears more than once in its object (the path, never a value).
    #[error(
        "the key {0} appears more than once in its object, so readers of this event could disagree on its value"
    )]
    DuplicateKey(String),
}

impl InputError {
    /// The dead-letter reason code for this error.
    pub fn reason(&self) -> FailureReason {
        match self {
            InputError::TooLarge { .. } => FailureReason::TooLarge,
            InputError::NotUtf8 { .. } => FailureReason::NotUtf8,
            InputError::MalformedJson(_) => FailureReason::MalformedJson,
            InputError::InvalidEvent(_) => FailureReason::InvalidEvent,
            InputError::DuplicateKey(_) => FailureReason::DuplicateKey,
        }
    }
}

fn invalid(msg: impl Into<String>) -> InputError {
    InputError::InvalidEvent(msg.into())
}

/// Decodes a delivery body into a provision event.
///
/// The size check runs before anything else so an oversized body is never parsed.
///
/// A key that appears twice in an object is refused on every path the worker reads (the
/// wrappers, the provision, its credential, the slim fields), because JSON readers disagree on
/// which value counts. Duplicates in objects or fields the worker ignores (`label_user`,
/// `NotificationUrl.target_url`, …) pass: they cannot change what the worker does.
///
/// # Errors
/// [`InputError::TooLarge`] when `body.len() > max_bytes`; [`InputError::NotUtf8`];
/// [`InputError::MalformedJson`] for an empty body or invalid JSON; [`InputError::DuplicateKey`]
/// for a duplicated key the worker reads; [`InputError::InvalidEvent`] when the JSON matches
/// none of the shapes, a field has the wrong type, a slim event lacks a non-empty
/// `token_value`, or a time does not parse.
pub fn decode(body: &[u8], max_bytes: usize) -> Result<Decoded, InputError> {
    if body.len() > max_bytes {
        return Err(InputError::TooLarge {
            size: body.len(),
            max: max_bytes,
        });
    }
    let text = std::str::from_utf8(body).map_err(|e| InputError::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    // A byte-order mark is legal at the start of a UTF-8 text but not in JSON.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim().is_empty() {
        return Err(InputError::MalformedJson("body is empty".into()));
    }
    let (value, dups) =
        strict_json::parse(text).map_err(|e| InputError::MalformedJson(json_error(&e)))?;
    let Value::Object(root) = &value else {
        return Err(invalid(format!(
            "expected a JSON object, found {}",
            type_name(&value)
        )));
    };
    let root = Obj {
        map: root,
        path: Vec::new(),
        dups: &dups,
    };

    if let Some(notification) = root.get("NotificationUrl")? {
        let notification = root.child("NotificationUrl", notification)?;
        let object = notification
            .get("object")?
            .ok_or_else(|| invalid("NotificationUrl.object is missing"))?;
        let object = notification.child("object", object)?;
        let provision = object.get("PartnerUserProvision")?.ok_or_else(|| {
            invalid("NotificationUrl.object holds no PartnerUserProvision (a callback of another category?)")
        })?;
        return bunq_provision(&object.child("PartnerUserProvision", provision)?);
    }
    if let Some(provision) = root.get("PartnerUserProvision")? {
        return bunq_provision(&root.child("PartnerUserProvision", provision)?);
    }
    if root.get("provision_id")?.is_some() {
        return slim(&root);
    }
    if root.get("id")?.is_some() {
        return bunq_provision(&root);
    }
    Err(invalid(
        "unrecognised event: expected a slim event (provision_id, token_value), a PartnerUserProvision object or a NotificationUrl callback",
    ))
}

/// An object of the input at `path` (the keys from the root); reading a key that appears twice
/// in it is an error.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: Vec<String>,
    dups: &'a HashSet<Vec<String>>,
}

impl<'a> Obj<'a> {
    /// The value of `key`.
    ///
    /// # Errors
    /// [`InputError::DuplicateKey`] when `key` appears more than once in this object.
    fn get(&self, key: &str) -> Result<Option<&'a Value>, InputError> {
        // No path is built for the usual input, which repeats no key.
        if !self.dups.is_empty() && self.dups.contains(&self.child_path(key)) {
            return Err(InputError::DuplicateKey(self.field(key)));
        }
        Ok(self.map.get(key))
    }

    fn child_path(&self, key: &str) -> Vec<String> {
        let mut p = self.path.clone();
        p.push(key.to_owned());
        p
    }

    /// `key`'s value as an object.
    fn child(&self, key: &str, v: &'a Value) -> Result<Obj<'a>, InputError> {
        Ok(Obj {
            map: as_object(v, &self.field(key))?,
            path: self.child_path(key),
            dups: self.dups,
        })
    }

    /// The dotted path of `key`, for messages.
    fn field(&self, key: &str) -> String {
        self.child_path(key).join(".")
    }
}

/// serde_json's syntax messages quote no input, only positions; keep it that way.
fn json_error(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Eof => "unexpected end of input",
        // serde_json stops at 128 levels of nesting rather than overflow its stack.
        _ if e.to_string().starts_with("recursion limit exceeded") => {
            "nested more than 128 levels deep"
        }
        _ => "syntax error",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

fn slim(root: &Obj<'_>) -> Result<Decoded, InputError> {
    let provision_id = provision_id(root.get("provision_id")?, "provision_id")?;
    let token_value = match root.get("token_value")? {
        None | Some(Value::Null) => return Err(invalid("token_value is missing")),
        Some(Value::String(s)) if s.trim().is_empty() => {
            return Err(invalid("token_value is empty"));
        }
        Some(Value::String(s)) => SecretString::from(s.clone()),
        Some(other) => {
            return Err(invalid(format!(
                "token_value: expected a string, found {}",
                type_name(other)
            )));
        }
    };
    Ok(Decoded::Ready(ProvisionReady {
        provision_id,
        credential_id: opt_int(root.get("credential_id")?, "credential_id")?,
        external_uuid: opt_string(root.get("external_uuid")?, "external_uuid")?,
        expiry_time: opt_time(root.get("expiry_time")?, "expiry_time")?,
        token_value,
    }))
}

fn bunq_provision(p: &Obj<'_>) -> Result<Decoded, InputError> {
    let provision_id = provision_id(p.get("id")?, &p.field("id"))?;
    let external_uuid = opt_string(p.get("external_uuid")?, &p.field("external_uuid"))?;
    let not_ready = |why: &str| {
        Ok(Decoded::NotReady(NotReady {
            provision_id: Some(provision_id.clone()),
            why: why.to_owned(),
        }))
    };
    let credential = match p.get("credential")? {
        None | Some(Value::Null) => return not_ready("provision has no credential yet"),
        Some(c) => p.child("credential", c)?,
    };
    let status = opt_string(credential.get("status")?, &credential.field("status"))?;
    let credential_id = opt_int(credential.get("id")?, &credential.field("id"))?;
    let expiry_time = opt_time(
        credential.get("expiry_time")?,
        &credential.field("expiry_time"),
    )?;
    let token = opt_string(
        credential.get("token_value")?,
        &credential.field("token_value"),
    )?;
    if let Some(status) = status.as_deref()
        && status != "PENDING_FIRST_USE"
    {
        // Status values are bunq's enum names, never secrets.
        return not_ready(&format!("credential status is {}", log_safe(status)));
    }
    let Some(token) = token.filter(|t| !t.trim().is_empty()) else {
        return not_ready("credential has no token_value");
    };
    Ok(Decoded::Ready(ProvisionReady {
        provision_id,
        credential_id,
        external_uuid,
        expiry_time,
        token_value: SecretString::from(token),
    }))
}

fn provision_id(v: Option<&Value>, field: &str) -> Result<ProvisionId, InputError> {
    match v {
        None | Some(Value::Null) => Err(invalid(format!("{field} is missing"))),
        Some(Value::Number(n)) => n.as_i64().map(ProvisionId::Int).ok_or_else(|| {
            invalid(format!(
                "{field}: expected an integer, found a number that is not one"
            ))
        }),
        Some(Value::String(s)) if s.trim().is_empty() => Err(invalid(format!("{field} is empty"))),
        // It may become the AMQP correlation_id, a short string of at most 255 bytes.
        Some(Value::String(s)) if s.len() > MAX_PROVISION_ID_BYTES => Err(invalid(format!(
            "{field} is longer than {MAX_PROVISION_ID_BYTES} bytes"
        ))),
        Some(Value::String(s)) => Ok(ProvisionId::Str(s.clone())),
        Some(other) => Err(invalid(format!(
            "{field}: expected an integer or a string, found {}",
            type_name(other)
        ))),
    }
}

fn opt_int(v: Option<&Value>, field: &str) -> Result<Option<i64>, InputError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| invalid(format!("{field}: expected an integer"))),
        Some(other) => Err(invalid(format!(
            "{field}: expected an integer, found {}",
            type_name(other)
        ))),
    }
}

fn opt_string(v: Option<&Value>, field: &str) -> Result<Option<String>, InputError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(format!(
            "{field}: expected a string, found {}",
            type_name(other)
        ))),
    }
}

fn opt_time(v: Option<&Value>, field: &str) -> Result<Option<OffsetDateTime>, InputError> {
    match opt_string(v, field)? {
        None => Ok(None),
        Some(s) => parse_time(&s).map(Some).ok_or_else(|| {
            invalid(format!(
                "{field}: expected bunq's \"YYYY-MM-DD HH:MM:SS.ffffff\" (UTC) or RFC 3339"
            ))
        }),
    }
}

fn as_object<'a>(v: &'a Value, field: &str) -> Result<&'a Map<String, Value>, InputError> {
    match v {
        Value::Object(m) => Ok(m),
        other => Err(invalid(format!(
            "{field}: expected an object, found {}",
            type_name(other)
        ))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses a time in bunq's form (`2026-11-29 10:24:14.000000`, UTC, fraction optional) or RFC 3339.
///
/// Source: bunq's object dates, <https://doc.bunq.com/basics/bunq-api-objects>.
pub fn parse_time(s: &str) -> Option<OffsetDateTime> {
    let s = s.trim();
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Some(t);
    }
    const BUNQ: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second][optional [.[subsecond]]]"
    );
    PrimitiveDateTime::parse(s, BUNQ)
        .ok()
        .map(|t| t.assume_utc())
}

/// Formats a time as RFC 3339 in UTC.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

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
    /// Always [`SCHEMA_VERSION`].
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
    /// Always [`SCHEMA_VERSION`].
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

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "sandbox_secret_token_value_123";

    fn ready(json: &str) -> ProvisionReady {
        match decode(json.as_bytes(), 65536).unwrap() {
            Decoded::Ready(r) => r,
            other => panic!("expected ready, got {other:?}"),
        }
    }

    fn err(body: &[u8]) -> InputError {
        decode(body, 1024).unwrap_err()
    }

    #[test]
    fn slim_event() {
        let r = ready(&format!(
            r#"{{"provision_id": 48213, "token_value": "{TOKEN}", "credential_id": 9, "expiry_time": "2026-11-29 10:24:14.000000", "external_uuid": "u-1", "extra": [1]}}"#
        ));
        assert_eq!(r.provision_id, ProvisionId::Int(48213));
        assert_eq!(r.credential_id, Some(9));
        assert_eq!(r.external_uuid.as_deref(), Some("u-1"));
        assert_eq!(rfc3339(r.expiry_time.unwrap()), "2026-11-29T10:24:14Z");
        assert_eq!(r.token_value.expose_secret(), TOKEN);
        let r = ready(&format!(
            r#"{{"provision_id": "p-7", "token_value": "{TOKEN}"}}"#
        ));
        assert_eq!(r.provision_id, ProvisionId::Str("p-7".into()));
        assert_eq!(r.expiry_time, None);
    }

    #[test]
    fn wrapped_unwrapped_and_callback_shapes() {
        let cred = format!(
            r#"{{"id": 48213, "status": "CREATED", "external_uuid": "x", "credential": {{"id": 90211, "status": "PENDING_FIRST_USE", "expiry_time": "2026-11-29T10:24:14+01:00", "token_value": "{TOKEN}"}}}}"#
        );
        for json in [
            format!(r#"{{"PartnerUserProvision": {cred}}}"#),
            cred.clone(),
            format!(
                r#"{{"NotificationUrl": {{"category": "PARTNER_USER_PROVISION", "object": {{"PartnerUserProvision": {cred}}}}}}}"#
            ),
        ] {
            let r = ready(&json);
            assert_eq!(r.provision_id, ProvisionId::Int(48213));
            assert_eq!(r.credential_id, Some(90211));
            assert_eq!(rfc3339(r.expiry_time.unwrap()), "2026-11-29T09:24:14Z");
        }
    }

    #[test]
    fn not_ready_variants() {
        for json in [
            r#"{"PartnerUserProvision": {"id": 1, "credential": null}}"#,
            r#"{"PartnerUserProvision": {"id": 1}}"#,
            r#"{"PartnerUserProvision": {"id": 1, "credential": {"status": "ACTIVE", "token_value": null}}}"#,
            r#"{"PartnerUserProvision": {"id": 1, "credential": {"status": "EXPIRED", "token_value": "t"}}}"#,
            r#"{"PartnerUserProvision": {"id": 1, "credential": {"status": "PENDING_FIRST_USE", "token_value": ""}}}"#,
        ] {
            match decode(json.as_bytes(), 1024).unwrap() {
                Decoded::NotReady(n) => assert_eq!(n.provision_id, Some(ProvisionId::Int(1))),
                other => panic!("{json}: expected not ready, got {other:?}"),
            }
        }
        // Status absent but a token present: ready.
        let r = ready(r#"{"PartnerUserProvision": {"id": 1, "credential": {"token_value": "t"}}}"#);
        assert_eq!(r.token_value.expose_secret(), "t");
    }

    #[test]
    fn bad_input_gets_its_reason() {
        assert_eq!(err(&[b'x'; 2000]).reason(), FailureReason::TooLarge);
        assert_eq!(err(&[0xff, 0xfe, b'{']).reason(), FailureReason::NotUtf8);
        assert_eq!(err(b"").reason(), FailureReason::MalformedJson);
        assert_eq!(err(b"   ").reason(), FailureReason::MalformedJson);
        assert_eq!(
            err(b"{\"provision_id\": 1,").reason(),
            FailureReason::MalformedJson
        );
        assert_eq!(err(b"not json").reason(), FailureReason::MalformedJson);
        assert_eq!(
            err(b"[1,2]").to_string(),
            "expected a JSON object, found an array"
        );
        assert_eq!(
            err(b"{\"provision_id\": 1}").to_string(),
            "token_value is missing"
        );
        assert_eq!(
            err(b"{\"provision_id\": 1, \"token_value\": \"  \"}").to_string(),
            "token_value is empty"
        );
        assert_eq!(
            err(b"{\"provision_id\": 1, \"token_value\": 5}").to_string(),
            "token_value: expected a string, found a number"
        );
        assert_eq!(
            err(b"{\"provision_id\": true, \"token_value\": \"t\"}").to_string(),
            "provision_id: expected an integer or a string, found a boolean"
        );
        assert_eq!(
            err(b"{\"provision_id\": 1.5, \"token_value\": \"t\"}").reason(),
            FailureReason::InvalidEvent
        );
        assert!(
            err(b"{\"provision_id\": 1, \"token_value\": \"t\", \"expiry_time\": \"tomorrow\"}")
                .to_string()
                .starts_with("expiry_time: expected bunq's")
        );
        assert!(
            err(b"{\"hello\": 1}")
                .to_string()
                .starts_with("unrecognised event")
        );
        assert!(
            err(b"{\"NotificationUrl\": {\"object\": {\"Payment\": {}}}}")
                .to_string()
                .contains("no PartnerUserProvision")
        );
    }

    #[test]
    fn duplicate_keys_on_read_paths_are_refused_by_path() {
        let cases = [
            (
                r#"{"provision_id": 1, "token_value": "AAAA", "token_value": "BBBB"}"#,
                "token_value",
            ),
            (
                r#"{"provision_id": 1, "provision_id": 2, "token_value": "AAAA"}"#,
                "provision_id",
            ),
            (
                r#"{"PartnerUserProvision": {"id": 1, "credential": {"token_value": "AAAA", "status": "PENDING_FIRST_USE", "token_value": "BBBB"}}}"#,
                "PartnerUserProvision.credential.token_value",
            ),
            (
                r#"{"PartnerUserProvision": {"id": 1, "credential": null}, "PartnerUserProvision": {"id": 2}}"#,
                "PartnerUserProvision",
            ),
            (
                r#"{"NotificationUrl": {"object": {"PartnerUserProvision": {"id": 1}}, "object": {}}}"#,
                "NotificationUrl.object",
            ),
            (
                r#"{"NotificationUrl": {"object": {"PartnerUserProvision": {"id": 1, "credential": {"expiry_time": "2099-01-01 00:00:00", "expiry_time": "2000-01-01 00:00:00", "token_value": "AAAA"}}}}}"#,
                "NotificationUrl.object.PartnerUserProvision.credential.expiry_time",
            ),
            (r#"{"id": 1, "id": 2}"#, "id"),
        ];
        for (body, path) in cases {
            let e = err(body.as_bytes());
            assert_eq!(e, InputError::DuplicateKey(path.into()), "{body}");
            assert_eq!(e.reason(), FailureReason::DuplicateKey);
            let text = e.to_string();
            assert!(text.contains(path), "{text}");
            assert!(!text.contains("AAAA") && !text.contains("BBBB"), "{text}");
        }
    }

    #[test]
    fn a_dotted_key_is_not_a_path() {
        let body = r#"{"PartnerUserProvision.id": 1, "PartnerUserProvision.id": 2,
            "PartnerUserProvision": {"id": 40, "credential": {"token_value": "t"}}}"#;
        assert!(matches!(
            decode(body.as_bytes(), 4096),
            Ok(Decoded::Ready(_))
        ));
        let deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
        let e = err(deep.as_bytes());
        assert!(e.to_string().contains("nested more than 128 levels"), "{e}");
    }

    #[test]
    fn duplicates_in_ignored_fields_pass() {
        let body = r#"{"PartnerUserProvision": {"id": 1, "label_user": {"display_name": "a", "display_name": "b"},
            "products": [{"x": 1, "x": 2}], "credential": {"token_value": "tok", "status": "PENDING_FIRST_USE"}},
            "extra": 1, "extra": 2}"#;
        assert!(matches!(
            decode(body.as_bytes(), 4096),
            Ok(Decoded::Ready(_))
        ));
        let callback = r#"{"NotificationUrl": {"target_url": "a", "target_url": "b",
            "object": {"PartnerUserProvision": {"id": 1, "credential": null}}}}"#;
        assert!(matches!(
            decode(callback.as_bytes(), 4096),
            Ok(Decoded::NotReady(_))
        ));
    }

    #[test]
    fn errors_never_quote_values() {
        let secret = "sekrit-token-xyz";
        for json in [
            format!(r#"{{"provision_id": "{secret}x", "token_value": 1}}"#),
            format!(r#"{{"provision_id": 1, "credential_id": "{secret}", "token_value": "t"}}"#),
            format!(r#"{{"provision_id": 1, "token_value": "t", "expiry_time": "{secret}"}}"#),
            format!(r#"{{"provision_id": 1, "token_value": "{secret}"#),
            format!(
                r#"{{"PartnerUserProvision": {{"id": 1, "credential": {{"status": 3, "token_value": "{secret}"}}}}}}"#
            ),
        ] {
            let e = decode(json.as_bytes(), 4096).unwrap_err();
            assert!(!e.to_string().contains(secret), "{e}");
            assert!(!format!("{e:?}").contains(secret), "{e:?}");
        }
    }

    #[test]
    fn debug_hides_tokens() {
        let r = ready(&format!(
            r#"{{"provision_id": 1, "token_value": "{TOKEN}"}}"#
        ));
        assert!(!format!("{r:?}").contains(TOKEN));
    }

    #[test]
    fn hostile_but_valid_input() {
        let r = ready("\u{feff}{\"provision_id\": 1, \"token_value\": \"t\"}");
        assert_eq!(r.provision_id, ProvisionId::Int(1));
        let long = "é".repeat(65); // 130 bytes
        let e = err(format!(r#"{{"provision_id": "{long}", "token_value": "t"}}"#).as_bytes());
        assert_eq!(e.to_string(), "provision_id is longer than 128 bytes");
        match decode(
            br#"{"id": 1, "credential": {"status": "X\nFAKE LINE", "token_value": "t"}}"#,
            1024,
        )
        .unwrap()
        {
            Decoded::NotReady(n) => assert_eq!(n.why, "credential status is X\\nFAKE LINE"),
            other => panic!("{other:?}"),
        }
        assert_eq!(log_safe(&"a".repeat(150)).chars().count(), 101);
    }

    #[test]
    fn time_forms() {
        assert_eq!(
            rfc3339(parse_time("2026-11-29 10:24:14").unwrap()),
            "2026-11-29T10:24:14Z"
        );
        assert_eq!(
            rfc3339(parse_time("2026-11-29 10:24:14.5").unwrap()),
            "2026-11-29T10:24:14.5Z"
        );
        assert!(parse_time("2026-13-29 10:24:14").is_none());
    }
}
