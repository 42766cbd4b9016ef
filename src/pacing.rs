//! Process-wide pacing of `POST /session-server`.
//!
//! bunq limits session-server to 1 call per 30 s (classic limits, per IP; newer docs count per
//! device) and answers 429 "… maximum of X calls per Y second …" beyond it
//! (<https://doc.bunq.com/basics/rate-limits>). The [`Pacer`] spaces this worker's calls evenly
//! at `BUNQ_SESSION_RATE_LIMIT` (N calls per W s: one call every W/N) and, after a 429, pauses
//! every session-server call of the process for the window bunq named, not only the call that
//! was refused.

use std::{sync::Mutex, time::Duration};

use tokio::time::Instant;

use crate::rate_limit::RateLimit;

#[derive(Debug)]
struct State {
    next_slot: Instant,
    paused_until: Instant,
    /// The interval bunq's last 429 stated (or its window, when it stated no rate).
    learned: Option<Duration>,
}

/// Hands out session-server call times, process-wide: spaced by the configured limit (else by
/// the rate bunq's last 429 stated), never inside a pause a 429 started, and spaced from when the
/// previous call was answered, since bunq counts calls when they arrive. Times are tokio's, so
/// tests can pause the clock.
#[derive(Debug)]
pub struct Pacer {
    /// The configured spacing (`BUNQ_SESSION_RATE_LIMIT`).
    pub configured: Option<Duration>,
    default_window: Duration,
    state: Mutex<State>,
}

/// bunq's documented session-server window, used for a 429 that names none: 1 call per 30 s.
pub const DEFAULT_429_WINDOW: Duration = Duration::from_secs(30);

impl Pacer {
    /// A pacer spacing calls by `limit` (`BUNQ_SESSION_RATE_LIMIT`; None: only what bunq's 429s
    /// say). A 429 naming no window and sending no `Retry-After` pauses [`DEFAULT_429_WINDOW`].
    pub fn new(limit: Option<RateLimit>) -> Self {
        let now = Instant::now();
        Self {
            configured: limit.map(|l| l.interval()),
            default_window: DEFAULT_429_WINDOW,
            state: Mutex::new(State {
                next_slot: now,
                paused_until: now,
                learned: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The spacing of slots: the configured or learned interval plus a margin (a tenth, at
    /// least 50 ms), since bunq counts calls when they arrive and arrivals wobble.
    fn interval(&self, st: &State) -> Option<Duration> {
        self.configured.or(st.learned).map(with_margin)
    }

    /// Reserves the next call time if it is no later than `deadline`.
    ///
    /// # Errors
    /// When the slot would be later than `deadline`: reserves nothing and returns the earliest
    /// time it could have had.
    pub fn reserve_before(&self, deadline: Instant) -> Result<Instant, Instant> {
        let mut st = self.lock();
        let slot = Instant::now().max(st.next_slot).max(st.paused_until);
        if slot > deadline {
            return Err(slot);
        }
        if let Some(i) = self.interval(&st) {
            st.next_slot = slot + i;
        }
        Ok(slot)
    }

    /// A session-server call was answered now: the next slot is at least one interval later,
    /// which keeps a margin when the limit is set at bunq's own figure.
    pub fn answered(&self) {
        let mut st = self.lock();
        if let Some(i) = self.interval(&st) {
            st.next_slot = st.next_slot.max(Instant::now() + i);
        }
    }

    /// A 429: pauses every later call for `window` (bunq's `Retry-After` or the window its
    /// message names; [`DEFAULT_429_WINDOW`] when neither) and adopts the `rate` bunq stated as
    /// the pace (without one, one call per window) until a later 429 says otherwise; a
    /// configured limit still wins. Calls resume spaced, the first after a random part of one
    /// interval, so processes paused together do not resume together. Returns when the pause
    /// ends.
    pub fn rate_limited(&self, window: Option<Duration>, rate: Option<RateLimit>) -> Instant {
        let window = window.unwrap_or(self.default_window);
        let mut st = self.lock();
        st.learned = Some(rate.map_or(window, |r| r.interval()));
        let interval = self.interval(&st).unwrap_or(window);
        let now = Instant::now();
        let until = now
            .checked_add(window + crate::retry::RetryPolicy::full_jitter(interval.min(window)))
            .unwrap_or(now + window);
        st.paused_until = st.paused_until.max(until);
        st.next_slot = st.next_slot.max(st.paused_until);
        st.paused_until
    }

    /// Pauses every later call until `until` at least (a delayed-retry copy carrying the end of
    /// a window bunq named).
    pub fn pause_until(&self, until: Instant) {
        let mut st = self.lock();
        st.paused_until = st.paused_until.max(until);
    }

    /// When the current pause ends, if one is under way.
    pub fn paused_until(&self) -> Option<Instant> {
        let st = self.lock();
        (st.paused_until > Instant::now()).then_some(st.paused_until)
    }
}

/// `interval` plus a tenth, at least 50 ms: the margin slots keep.
pub fn with_margin(interval: Duration) -> Duration {
    interval + (interval / 10).max(Duration::from_millis(50))
}

/// A session-server slot, as [`Budget::reserve_within`] found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Reserved: wait this long, then call.
    Wait(Duration),
    /// Not within the wait allowed; the earliest slot is this far off. Nothing reserved.
    TooLate(Duration),
    /// The fleet's shared budget (Redis) cannot be reached: no call may start.
    Unavailable,
}

/// Where session-server slots come from: this process's [`Pacer`] or, with `REDIS_URL`, the
/// budget shared by every replica of the `BUNQ_RATE_LIMIT_SCOPE` (see [`crate::fleet`]).
#[derive(Debug)]
pub struct Budget {
    /// This process's pacer; without Redis the only one, with it a record of what was learned.
    pub local: Pacer,
    /// The fleet's shared budget, when `REDIS_URL` is set.
    pub shared: Option<crate::fleet::Fleet>,
}

impl From<Pacer> for Budget {
    fn from(local: Pacer) -> Self {
        Self {
            local,
            shared: None,
        }
    }
}

impl Budget {
    /// Reserves the next slot if it comes within `max_wait`.
    pub async fn reserve_within(&self, max_wait: Duration) -> Slot {
        let Some(fleet) = &self.shared else {
            let now = Instant::now();
            let deadline = now
                .checked_add(max_wait)
                .unwrap_or(now + Duration::from_secs(86_400 * 365));
            return match self.local.reserve_before(deadline) {
                Ok(at) => Slot::Wait(at.saturating_duration_since(now)),
                Err(at) => Slot::TooLate(at.saturating_duration_since(now)),
            };
        };
        match fleet
            .reserve(max_wait, self.local.configured.map(with_margin))
            .await
        {
            Ok(Ok(wait)) => Slot::Wait(wait),
            Ok(Err(earliest)) => Slot::TooLate(earliest),
            Err(_) => Slot::Unavailable,
        }
    }

    /// A call was answered now (see [`Pacer::answered`]).
    pub async fn answered(&self) {
        self.local.answered();
        if let Some(fleet) = &self.shared {
            let interval = self.local.configured.map(with_margin);
            let _ = fleet.answered(interval).await;
        }
    }

    /// A 429 (see [`Pacer::rate_limited`]), for the whole scope when the budget is shared.
    pub async fn rate_limited(&self, window: Option<Duration>, rate: Option<RateLimit>) {
        self.local.rate_limited(window, rate);
        if let Some(fleet) = &self.shared {
            let window = window.unwrap_or(self.local.default_window);
            let learned = with_margin(rate.map_or(window, |r| r.interval()));
            let interval = self.local.configured.map_or(learned, with_margin);
            let jitter = crate::retry::RetryPolicy::full_jitter(interval.min(window));
            let _ = fleet.rate_limited(window, jitter, learned).await;
        }
    }

    /// Pauses every later call for `d` at least.
    pub async fn pause_for(&self, d: Duration) {
        self.local.pause_until(Instant::now() + d);
        if let Some(fleet) = &self.shared {
            let _ = fleet.pause_for(d).await;
        }
    }

    /// How long the current pause lasts, if one is under way.
    pub async fn paused_for(&self) -> Option<Duration> {
        let local = self
            .local
            .paused_until()
            .map(|u| u.saturating_duration_since(Instant::now()));
        let shared = match &self.shared {
            Some(fleet) => fleet
                .pause_for(Duration::ZERO)
                .await
                .ok()
                .filter(|d| !d.is_zero()),
            None => None,
        };
        local.max(shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn slots_are_spaced_and_pauses_push_them_back() {
        let p = Pacer::new(Some("2/1s".parse().unwrap()));
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(3600);
        assert_eq!(p.reserve_before(far), Ok(t0));
        // 500 ms apart, plus the margin (50 ms at least).
        assert_eq!(p.reserve_before(far), Ok(t0 + Duration::from_millis(550)));
        p.pause_until(t0 + Duration::from_secs(10));
        let c = p.reserve_before(far).unwrap();
        assert_eq!(
            c,
            t0 + Duration::from_secs(10),
            "the pause wins over the next slot"
        );
        // A deadline before the next slot reserves nothing and says when it could be.
        let soon = t0 + Duration::from_secs(1);
        assert_eq!(p.reserve_before(soon), Err(c + Duration::from_millis(550)));
        assert_eq!(p.reserve_before(far), Ok(c + Duration::from_millis(550)));
        // Time passing frees the slots: after an idle minute the next call goes at once.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(p.reserve_before(far), Ok(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_limit_only_pauses_and_learned_rates_apply() {
        let p = Pacer::new(None);
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(3600);
        assert_eq!(p.reserve_before(far), Ok(t0));
        assert_eq!(p.reserve_before(far), Ok(t0), "no limit: no spacing");
        // bunq says 1 call per 30 s: pause 30 s (plus up to one interval of jitter), then
        // calls resume spaced by 30 s, not together.
        let until = p.rate_limited(
            Some(Duration::from_secs(30)),
            Some(RateLimit {
                calls: 1,
                per: Duration::from_secs(30),
            }),
        );
        assert!(until >= t0 + Duration::from_secs(30) && until <= t0 + Duration::from_secs(60));
        let a = p.reserve_before(far).unwrap();
        let b = p.reserve_before(far).unwrap();
        assert_eq!(a, until);
        assert_eq!(b - a, Duration::from_secs(33), "30 s and a tenth of margin");
        // A shorter pause later does not shorten the longer one.
        p.pause_until(t0 + Duration::from_secs(1));
        assert_eq!(p.paused_until(), Some(until));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_naming_nothing_waits_bunqs_documented_window() {
        let p = Pacer::new(None);
        let until = p.rate_limited(None, None);
        let waited = until.duration_since(Instant::now());
        assert!(
            waited >= DEFAULT_429_WINDOW && waited <= DEFAULT_429_WINDOW * 2,
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slots_are_spaced_from_the_previous_answer() {
        let p = Pacer::new(Some("1/2s".parse().unwrap()));
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(3600);
        assert_eq!(p.reserve_before(far), Ok(t0));
        // The call took 300 ms: the next may arrive no earlier than 2 s (and the margin) after
        // its answer.
        tokio::time::advance(Duration::from_millis(300)).await;
        p.answered();
        assert_eq!(p.reserve_before(far), Ok(t0 + Duration::from_millis(2500)));
    }
}
