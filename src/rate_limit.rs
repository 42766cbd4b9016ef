//! A rate limit as bunq states it and `BUNQ_SESSION_RATE_LIMIT` sets it: `N` calls per `W` s.
//!
//! A leaf: the HTTP client reads one from bunq's 429 answers, the pacing and the emulator apply
//! one, the settings parse one; none of them need the others for it.

use std::{str::FromStr, time::Duration};

/// `N/Ws`: at most `calls` per `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Calls allowed per window (>= 1).
    pub calls: u32,
    /// The window.
    pub per: Duration,
}

impl RateLimit {
    /// The even spacing between calls: `per / calls`.
    pub fn interval(&self) -> Duration {
        self.per / self.calls
    }
}

impl FromStr for RateLimit {
    type Err = String;

    /// Parses `N/Ws`, `N/Wm` or `N/W` (seconds), e.g. `1/30s`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("expected N/Ws such as 1/30s, got {s:?}");
        let (n, w) = s.trim().split_once('/').ok_or_else(bad)?;
        let calls: u32 = n.trim().parse().map_err(|_| bad())?;
        let w = w.trim();
        let (num, unit) = match w.strip_suffix('s') {
            Some(num) => (num, 1),
            None => match w.strip_suffix('m') {
                Some(num) => (num, 60),
                None => (w, 1),
            },
        };
        let secs: u64 = num.trim().parse().map_err(|_| bad())?;
        if calls == 0 || secs == 0 {
            return Err(format!("{s:?}: N and W must be at least 1"));
        }
        Ok(Self {
            calls,
            per: Duration::from_secs(secs.saturating_mul(unit)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rate_limits() {
        let l: RateLimit = "1/30s".parse().unwrap();
        assert_eq!((l.calls, l.per), (1, Duration::from_secs(30)));
        assert_eq!(l.interval(), Duration::from_secs(30));
        let l: RateLimit = "5/3".parse().unwrap();
        assert_eq!(l.interval(), Duration::from_millis(600));
        assert_eq!(
            "2/1m".parse::<RateLimit>().unwrap().per,
            Duration::from_secs(60)
        );
        for bad in ["", "1", "0/30s", "x/30s", "1/0s", "1/30h"] {
            assert!(bad.parse::<RateLimit>().is_err(), "{bad}");
        }
    }
}
