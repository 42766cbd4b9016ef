//! Event shapes: the "provision ready" input and the `session.created` / `session.failed` output.
//!
//! - [`input`]: a delivery body → [`Decoded`] ([`decode`], [`ProvisionReady`], [`NotReady`],
//!   [`InputError`]); the accepted input shapes are listed there.
//! - `strict_json`: JSON parsing that records duplicated keys, for [`decode`].
//! - [`output`]: the bodies of `session.created` ([`SessionCreated`]) and `session.failed`
//!   ([`SessionFailed`]).
//! - here: what both sides share: [`ProvisionId`], [`SCHEMA_VERSION`], the time helpers
//!   [`parse_time`] / [`rfc3339`] and [`log_safe`].

pub mod input;
pub mod output;
mod strict_json;

use std::fmt;

use serde::Serialize;
use time::{OffsetDateTime, PrimitiveDateTime, format_description::well_known::Rfc3339};

pub use input::{Decoded, InputError, MAX_PROVISION_ID_BYTES, NotReady, ProvisionReady, decode};
pub use output::{SessionCreated, SessionFailed, SessionToken};

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

#[cfg(test)]
mod tests {
    use super::*;

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
