//! Process-wide pacing of `POST /session-server`.
//!
//! bunq limits session-server to 1 call per 30 s (classic limits, per IP; newer docs count per
//! device) and answers 429 "… maximum of X calls per Y second …" beyond it
//! (<https://doc.bunq.com/basics/rate-limits>). The [`Pacer`] spaces this worker's calls evenly
//! at `BUNQ_SESSION_RATE_LIMIT` (N calls per W s: one call every W/N) and, after a 429, pauses
//! every session-server call of the process for the window bunq named, not only the call that
//! was refused.

use std::{str::FromStr, sync::Mutex, time::Duration};

use tokio::time::Instant;

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

#[derive(Debug)]
struct State {
    next_slot: Instant,
    paused_until: Instant,
}

/// Hands out session-server call times: evenly spaced when a rate limit is set, and never
/// inside a pause that a 429 started. Times are tokio's, so tests can pause the clock.
#[derive(Debug)]
pub struct Pacer {
    interval: Option<Duration>,
    state: Mutex<State>,
}

impl Pacer {
    /// A pacer spacing calls by `limit` (None: no spacing, pauses only).
    pub fn new(limit: Option<RateLimit>) -> Self {
        let now = Instant::now();
        Self {
            interval: limit.map(|l| l.interval()),
            state: Mutex::new(State {
                next_slot: now,
                paused_until: now,
            }),
        }
    }

    /// Reserves the next call time if it is no later than `deadline`.
    ///
    /// # Errors
    /// When the slot would be later than `deadline`: reserves nothing and returns the earliest
    /// time it could have had.
    pub fn reserve_before(&self, deadline: Instant) -> Result<Instant, Instant> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let slot = Instant::now().max(st.next_slot).max(st.paused_until);
        if slot > deadline {
            return Err(slot);
        }
        if let Some(i) = self.interval {
            st.next_slot = slot + i;
        }
        Ok(slot)
    }

    /// Pauses every later call until `window` from now (a 429 answer).
    pub fn pause(&self, window: Duration) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(until) = Instant::now().checked_add(window) {
            st.paused_until = st.paused_until.max(until);
        }
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

    #[tokio::test(start_paused = true)]
    async fn slots_are_spaced_and_pauses_push_them_back() {
        let p = Pacer::new(Some("2/1s".parse().unwrap()));
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(3600);
        assert_eq!(p.reserve_before(far), Ok(t0));
        assert_eq!(p.reserve_before(far), Ok(t0 + Duration::from_millis(500)));
        p.pause(Duration::from_secs(10));
        let c = p.reserve_before(far).unwrap();
        assert_eq!(
            c,
            t0 + Duration::from_secs(10),
            "the pause wins over the next slot"
        );
        // A deadline before the next slot reserves nothing and says when it could be.
        let soon = t0 + Duration::from_secs(1);
        assert_eq!(p.reserve_before(soon), Err(c + Duration::from_millis(500)));
        assert_eq!(p.reserve_before(far), Ok(c + Duration::from_millis(500)));
        // Time passing frees the slots: after an idle minute the next call goes at once.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(p.reserve_before(far), Ok(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_limit_only_pauses_apply() {
        let p = Pacer::new(None);
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(3600);
        assert_eq!(p.reserve_before(far), Ok(t0));
        assert_eq!(p.reserve_before(far), Ok(t0));
        p.pause(Duration::from_secs(30));
        assert_eq!(p.reserve_before(far), Ok(t0 + Duration::from_secs(30)));
        // A shorter pause later does not shorten the longer one.
        p.pause(Duration::from_secs(1));
        assert_eq!(p.reserve_before(far), Ok(t0 + Duration::from_secs(30)));
    }
}
