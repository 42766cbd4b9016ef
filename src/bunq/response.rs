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
    /// The provisioned user's id, when the user part could be read.
    pub user_id: Option<i64>,
    /// The provisioned user's object type, when the user part could be read.
    pub user_type: Option<String>,
    /// `UserApiKey.id` when the answer was a `UserApiKey`.
    pub user_api_key_id: Option<i64>,
    /// Session lifetime, s.
    pub session_timeout_seconds: u64,
    /// When the user part could not be read in full: the keys the answer held (item names and
    /// the user object's keys, never values), for the WARN that says so.
    pub unread_user: Option<Vec<String>>,
}

/// Parses a session-server answer.
///
/// Once bunq answers 2xx with `Id` and `Token` the one-time credential is spent, so the rest is
/// read leniently: an id sent as a string of digits is read as a number, and a user part that
/// cannot be read leaves the user fields `None` (with [`SessionServer::unread_user`] set) rather
/// than failing. For a `UserApiKey` the user is `granted_by_user` (the provisioned user) and the
/// timeout is `requested_by_user.session_timeout`, as bunq's SDKs take it; failing that the
/// granted user's, then [`DEFAULT_SESSION_TIMEOUT_S`].
///
/// # Errors
/// A description (no values quoted) when the body is not bunq's `Response` array or `Id.id` or
/// `Token.token` is missing: the caller dead-letters that as `unexpected_response`.
pub fn parse_session_server(body: &[u8]) -> Result<SessionServer, String> {
    let m = merge_response(body)?;
    let session_id = m
        .get("Id")
        .and_then(|v| v.get("id"))
        .and_then(lenient_i64)
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
    let user = read_user(&m);
    let (user_id, user_type, user_api_key_id, timeout) = match &user {
        Ok(u) => (Some(u.id), Some(u.kind.clone()), u.api_key_id, u.timeout),
        Err(_) => (None, None, None, None),
    };
    Ok(SessionServer {
        session_id,
        token: SecretString::from(token.to_owned()),
        token_created,
        user_id,
        user_type,
        user_api_key_id,
        session_timeout_seconds: timeout.unwrap_or(DEFAULT_SESSION_TIMEOUT_S),
        unread_user: user.err().map(|()| keys_seen(&m)),
    })
}

struct User {
    id: i64,
    kind: String,
    api_key_id: Option<i64>,
    timeout: Option<u64>,
}

/// The provisioned user, or `Err` when the answer holds none that can be read.
fn read_user(m: &Map<String, Value>) -> Result<User, ()> {
    if let Some(k) = m.get("UserApiKey") {
        let (kind, granted) = single_user(k.get("granted_by_user")).ok_or(())?;
        let id = granted.get("id").and_then(lenient_i64).ok_or(())?;
        let timeout = single_user(k.get("requested_by_user"))
            .and_then(|(_, u)| timeout_of(u))
            .or_else(|| timeout_of(granted));
        return Ok(User {
            id,
            kind,
            api_key_id: k.get("id").and_then(lenient_i64),
            timeout,
        });
    }
    let (kind, u) = USER_TYPES
        .iter()
        .find_map(|t| m.get(*t).map(|u| (t.to_string(), u)))
        .or_else(|| {
            // An unknown future user type: take any other User* object.
            m.iter()
                .find(|(k, v)| k.starts_with("User") && v.is_object())
                .map(|(k, v)| (k.clone(), v))
        })
        .ok_or(())?;
    Ok(User {
        id: u.get("id").and_then(lenient_i64).ok_or(())?,
        kind,
        api_key_id: None,
        timeout: timeout_of(u),
    })
}

/// The answer's item names and, one level down, their keys: `UserApiKey.granted_by_user`.
fn keys_seen(m: &Map<String, Value>) -> Vec<String> {
    let mut keys = Vec::new();
    for (k, v) in m {
        keys.push(k.clone());
        if k.starts_with("User")
            && let Some(inner) = v.as_object()
        {
            keys.extend(inner.keys().map(|i| format!("{k}.{i}")));
        }
    }
    keys
}

/// An integer, or a string of digits (bunq has been seen sending ids as strings).
fn lenient_i64(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str()?.trim().parse().ok())
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
        .and_then(|t| t.as_u64().or_else(|| t.as_str()?.trim().parse().ok()))
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
        assert_eq!(s.user_id, Some(1363));
        assert_eq!(s.user_type.as_deref(), Some("UserPerson"));
        assert!(s.unread_user.is_none());
        assert_eq!(s.user_api_key_id, Some(1364));
        assert_eq!(s.session_timeout_seconds, 604_800);
        assert!(!format!("{s:?}").contains("f981bd6d"));
    }

    #[test]
    fn person_company_and_psp() {
        let s = parse_session_server(PERSON.as_bytes()).unwrap();
        assert_eq!(
            (s.session_id, s.user_id, s.user_type.as_deref()),
            (3301, Some(4410), Some("UserPerson"))
        );
        assert_eq!(s.session_timeout_seconds, 3600);
        assert_eq!(s.user_api_key_id, None);
        let s = parse_session_server(COMPANY.as_bytes()).unwrap();
        assert_eq!(
            (s.session_id, s.user_id, s.user_type.as_deref()),
            (3302, Some(4411), Some("UserCompany"))
        );
        let psp = r#"{"Response":[{"Token":{"token":"t"}},{"UserPaymentServiceProvider":{"id":9}},{"Id":{"id":7}}]}"#;
        let s = parse_session_server(psp.as_bytes()).unwrap();
        assert_eq!(
            (s.session_id, s.user_id, s.user_type.as_deref()),
            (7, Some(9), Some("UserPaymentServiceProvider"))
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
    }

    #[test]
    fn a_session_with_an_unreadable_user_part_is_still_a_session() {
        // The id as a string: read as a number.
        let stringly = API_KEY.replace(r#""id":1363"#, r#""id":"1363""#);
        let s = parse_session_server(stringly.as_bytes()).unwrap();
        assert_eq!(s.user_id, Some(1363));
        for body in [
            r#"{"Response":[{"Id":{"id":1}},{"Token":{"token":"t"}}]}"#,
            r#"{"Response":[{"Id":{"id":1}},{"Token":{"token":"t"}},{"UserApiKey":{"id":5,"granted_by_user":{"UserPerson":{"id":"x13"}}}}]}"#,
            r#"{"Response":[{"Id":{"id":"1"}},{"Token":{"token":"t"}},{"UserPerson":{"name":"no id"}}]}"#,
        ] {
            let s = parse_session_server(body.as_bytes()).unwrap();
            assert_eq!(s.session_id, 1);
            assert_eq!((s.user_id, s.user_type.as_deref()), (None, None), "{body}");
            let seen = s.unread_user.expect("the keys seen are kept");
            assert!(seen.contains(&"Token".to_owned()), "{seen:?}");
            assert!(
                !seen.iter().any(|k| k.contains("x13")),
                "no values: {seen:?}"
            );
        }
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
