//! Value parsers shared by the settings groups, and the value types they produce.
//!
//! Each parser returns a message that says what is allowed; [`super::explain`] puts the variable's
//! name in front of it.

use std::time::Duration;

use secrecy::SecretString;

/// A listen address, or none (`off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenAddr(pub Option<std::net::SocketAddr>);

pub(super) fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("off") {
        return Ok(ListenAddr(None));
    }
    s.parse().map(|a| ListenAddr(Some(a))).map_err(|_| {
        "expected HOST:PORT such as 0.0.0.0:9464 (port 0: a free one), or off".to_owned()
    })
}

/// Whether `s` is `host:port`: a name or IPv4 address, or an IPv6 address in brackets, and a
/// port 1-65535; no scheme, path or credentials.
pub(super) fn is_host_port(s: &str) -> bool {
    s.trim().rsplit_once(':').is_some_and(|(host, port)| {
        let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => !host.is_empty() && !host.contains([':', '/', '@', '[', ']']),
        };
        host_ok && port.parse::<u16>().is_ok_and(|p| p > 0)
    })
}

pub(super) fn parse_secret(s: &str) -> Result<SecretString, String> {
    Ok(SecretString::from(s.to_owned()))
}

pub(super) fn parse_ms(s: &str) -> Result<Duration, String> {
    s.trim()
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| "expected a whole number of milliseconds, such as 500".to_owned())
}

pub(super) fn parse_s(s: &str) -> Result<Duration, String> {
    s.trim()
        .parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| "expected a whole number of seconds, such as 30".to_owned())
}
