//! Input: a delivery body → [`Decoded`].
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

use std::collections::HashSet;

use secrecy::SecretString;
use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::{ProvisionId, log_safe, parse_time, strict_json};
use crate::failure::FailureReason;

/// Longest accepted string `provision_id`, in bytes (UTF-8).
pub const MAX_PROVISION_ID_BYTES: usize = 128;

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

#[cfg(test)]
mod tests;
