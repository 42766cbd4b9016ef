//! bunq's `Response` array, parsed by key rather than position.
//!
//! A session-server answer is `{"Response":[{"Id":{"id":N}},{"Token":{"token":"..",..}},
//! {<user object>}]}` where the user object is one of `UserApiKey`, `UserPerson`, `UserCompany`,
//! `UserPaymentServiceProvider` (swagger `SessionServerCreate`). bunq's partner client merges
//! the items by key, which survives reordering; so does this.
//! Source: <https://doc.bunq.com/basics/authentication/session-server>.

use secrecy::SecretString;
use serde_json::{Map, Value};

/// Session lifetime bunq uses when the user object names none, in s (one week).
pub const DEFAULT_SESSION_TIMEOUT_S: u64 = 604_800;

/// The user object types that can stand for the user directly.
const USER_TYPES: &[&str] = &[
    "UserPerson",
    "UserCompany",
    "UserPaymentServiceProvider",
    "UserLight",
];

/// Merges the items of a `Response` array into one map keyed by their single key.
///
/// # Errors
/// A description (no values quoted) when the body is not `{"Response": [ {..}, .. ]}`.
pub fn merge_response(body: &[u8]) -> Result<Map<String, Value>, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|_| "response body is not JSON".to_string())?;
    let items = v
        .get("Response")
        .and_then(Value::as_array)
        .ok_or_else(|| "response has no Response array".to_string())?;
    let mut merged = Map::new();
    for item in items {
        if let Value::Object(m) = item {
            for (k, v) in m {
                merged.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
    }
    Ok(merged)
}

/// bunq's `error_description` from an error body `{"Error":[{"error_description":".."}]}`,
/// whole: the caller scrubs secrets from it first and shortens it after (see
/// [`shorten_description`]), so a secret can never be cut into an unrecognisable prefix.
pub fn error_description(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let d = v
        .get("Error")?
        .as_array()?
        .first()?
        .get("error_description")?
        .as_str()?;
    Some(d.to_owned())
}

/// Longest error description kept, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 500;

/// Shortens a (scrubbed) description to [`MAX_DESCRIPTION_CHARS`] and escapes control
/// characters, so bunq's text cannot forge log lines.
pub fn shorten_description(d: &str) -> String {
    let mut out = String::new();
    for c in d.chars().take(MAX_DESCRIPTION_CHARS) {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    if d.chars().count() > MAX_DESCRIPTION_CHARS {
        out.push('…');
    }
    out
}

/// What the worker keeps of a session-server answer. `Debug` hides the token.
#[derive(Clone, Debug)]
pub struct SessionServer {
    /// `Id.id`.
    pub session_id: i64,
    /// `Token.token`.
    pub token: SecretString,
    /// `Token.created` (bunq's form, UTC), when present.
    pub token_created: Option<String>,
    /// The provisioned user's id.
    pub user_id: i64,
    /// The provisioned user's object type.
    pub user_type: String,
    /// `UserApiKey.id` when the answer was a `UserApiKey`.
    pub user_api_key_id: Option<i64>,
    /// Session lifetime, s.
    pub session_timeout_seconds: u64,
}

/// Parses a session-server answer.
///
/// For a `UserApiKey` the user is `granted_by_user` (the provisioned user) and the timeout is
/// `requested_by_user.session_timeout`, as bunq's SDKs take it; failing that the granted user's,
/// then [`DEFAULT_SESSION_TIMEOUT_S`].
///
/// # Errors
/// A description (no values quoted) when `Id.id`, `Token.token` or a user object with an `id` is
/// missing: the caller dead-letters that as `unexpected_response`.
pub fn parse_session_server(body: &[u8]) -> Result<SessionServer, String> {
    let m = merge_response(body)?;
    let session_id = m
        .get("Id")
        .and_then(|v| v.get("id"))
        .and_then(Value::as_i64)
        .ok_or("response has no Id.id")?;
    let token_obj = m.get("Token").ok_or("response has no Token")?;
    let token = token_obj
        .get("token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or("response has no Token.token")?;
    let token_created = token_obj
        .get("created")
        .and_then(Value::as_str)
        .map(str::to_owned);

    let (user_id, user_type, user_api_key_id, timeout) = if let Some(k) = m.get("UserApiKey") {
        let key_id = k.get("id").and_then(Value::as_i64);
        let (gtype, granted) =
            single_user(k.get("granted_by_user")).ok_or("UserApiKey has no granted_by_user")?;
        let gid = granted
            .get("id")
            .and_then(Value::as_i64)
            .ok_or("UserApiKey.granted_by_user has no id")?;
        let timeout = single_user(k.get("requested_by_user"))
            .and_then(|(_, u)| timeout_of(u))
            .or_else(|| timeout_of(granted));
        (gid, gtype, key_id, timeout)
    } else {
        let (t, u) = USER_TYPES
            .iter()
            .find_map(|t| m.get(*t).map(|u| (t.to_string(), u)))
            .or_else(|| {
                // An unknown future user type: take any other User* object.
                m.iter()
                    .find(|(k, v)| k.starts_with("User") && v.is_object())
                    .map(|(k, v)| (k.clone(), v))
            })
            .ok_or("response has no user object")?;
        let id = u
            .get("id")
            .and_then(Value::as_i64)
            .ok_or("user object has no id")?;
        (id, t, None, timeout_of(u))
    };
    Ok(SessionServer {
        session_id,
        token: SecretString::from(token.to_owned()),
        token_created,
        user_id,
        user_type,
        user_api_key_id,
        session_timeout_seconds: timeout.unwrap_or(DEFAULT_SESSION_TIMEOUT_S),
    })
}

/// `{"UserPerson": {..}}` → ("UserPerson", {..}).
fn single_user(v: Option<&Value>) -> Option<(String, &Value)> {
    let m = v?.as_object()?;
    m.iter()
        .find(|(_, v)| v.is_object())
        .map(|(k, v)| (k.clone(), v))
}

fn timeout_of(user: &Value) -> Option<u64> {
    user.get("session_timeout")
        .and_then(Value::as_u64)
        .filter(|t| *t > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const API_KEY: &str = include_str!("../../tests/fixtures/session-server.user-api-key.json");
    const PERSON: &str = include_str!("../../tests/fixtures/session-server.user-person.json");
    const COMPANY: &str = include_str!("../../tests/fixtures/session-server.user-company.json");

    #[test]
    fn user_api_key() {
        let s = parse_session_server(API_KEY.as_bytes()).unwrap();
        assert_eq!(s.session_id, 2173);
        assert_eq!(
            s.token.expose_secret(),
            "f981bd6d26b8328b89e85a774c404bb02e72d18062dab92bb59c9e59a1c5958f"
        );
        assert_eq!(s.user_id, 1363);
        assert_eq!(s.user_type, "UserPerson");
        assert_eq!(s.user_api_key_id, Some(1364));
        assert_eq!(s.session_timeout_seconds, 604_800);
        assert!(!format!("{s:?}").contains("f981bd6d"));
    }

    #[test]
    fn person_company_and_psp() {
        let s = parse_session_server(PERSON.as_bytes()).unwrap();
        assert_eq!(
            (s.session_id, s.user_id, s.user_type.as_str()),
            (3301, 4410, "UserPerson")
        );
        assert_eq!(s.session_timeout_seconds, 3600);
        assert_eq!(s.user_api_key_id, None);
        let s = parse_session_server(COMPANY.as_bytes()).unwrap();
        assert_eq!(
            (s.session_id, s.user_id, s.user_type.as_str()),
            (3302, 4411, "UserCompany")
        );
        let psp = r#"{"Response":[{"Token":{"token":"t"}},{"UserPaymentServiceProvider":{"id":9}},{"Id":{"id":7}}]}"#;
        let s = parse_session_server(psp.as_bytes()).unwrap();
        assert_eq!(
            (s.session_id, s.user_id, s.user_type.as_str()),
            (7, 9, "UserPaymentServiceProvider")
        );
        assert_eq!(s.session_timeout_seconds, DEFAULT_SESSION_TIMEOUT_S);
    }

    #[test]
    fn missing_parts_are_named() {
        let e = |b: &str| parse_session_server(b.as_bytes()).unwrap_err();
        assert_eq!(e("<html>"), "response body is not JSON");
        assert_eq!(e("{}"), "response has no Response array");
        assert_eq!(
            e(r#"{"Response":[{"Token":{"token":"t"}}]}"#),
            "response has no Id.id"
        );
        assert_eq!(
            e(r#"{"Response":[{"Id":{"id":1}}]}"#),
            "response has no Token"
        );
        assert_eq!(
            e(r#"{"Response":[{"Id":{"id":1}},{"Token":{"token":""}}]}"#),
            "response has no Token.token"
        );
        assert_eq!(
            e(r#"{"Response":[{"Id":{"id":1}},{"Token":{"token":"t"}}]}"#),
            "response has no user object"
        );
    }

    #[test]
    fn error_descriptions() {
        let b = include_str!("../../tests/fixtures/error.credentials-incorrect.json");
        assert_eq!(
            error_description(b.as_bytes()).as_deref(),
            Some("User credentials are incorrect. Incorrect API key or IP address.")
        );
        assert_eq!(error_description(b"<html>502</html>"), None);
    }
}
