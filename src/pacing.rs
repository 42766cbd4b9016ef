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

/// bunq's documented session-server rate: 1 call per 30 s
/// (<https://doc.bunq.com/basics/rate-limits>).
pub const DOCUMENTED_INTERVAL: Duration = Duration::from_secs(30);

/// The window of a 429 that names none, or a zero or past one (`Retry-After: 0`, a date behind
/// the worker's clock): bunq's documented window.
pub const DEFAULT_429_WINDOW: Duration = DOCUMENTED_INTERVAL;

/// The fastest pace a 429 may teach against a host that is not bunq's (the emulator, a fake, a
/// proxy): 1 call a second. `BUNQ_SESSION_RATE_LIMIT` sets a faster one.
pub const OTHER_HOST_FLOOR: Duration = Duration::from_secs(1);

/// The rules of session-server pacing, in one place: where the pace starts, what a 429 may
/// teach, the margin slots keep and how resumption after a pause is spread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pace {
    /// `BUNQ_SESSION_RATE_LIMIT` as an interval between calls.
    pub configured: Option<Duration>,
    /// bunq's documented interval, when `BUNQ_API_URL` is bunq's (production or sandbox).
    pub documented: Option<Duration>,
}

impl Pace {
    /// The pace for `limit` (`BUNQ_SESSION_RATE_LIMIT`) against the API at `api`: on bunq's own
    /// hosts (`api.bunq.com`, `public-api.sandbox.bunq.com`) it starts at bunq's documented
    /// figure, so the first wave draws no 429.
    pub fn new(limit: Option<RateLimit>, api: &reqwest::Url) -> Self {
        let bunq = matches!(
            api.host_str(),
            Some("api.bunq.com" | "public-api.sandbox.bunq.com")
        );
        Self {
            configured: limit.map(|l| l.interval()),
            documented: bunq.then_some(DOCUMENTED_INTERVAL),
        }
    }

    /// The pace against a host that is not bunq's: `limit`, else none until a 429.
    #[cfg(test)]
    pub fn elsewhere(limit: Option<RateLimit>) -> Self {
        Self {
            configured: limit.map(|l| l.interval()),
            documented: None,
        }
    }

    /// The interval before any 429: the configured one, else bunq's documented one.
    pub fn base(&self) -> Option<Duration> {
        self.configured.or(self.documented)
    }

    /// The window a 429 asks for: the one bunq named, or [`DEFAULT_429_WINDOW`] for none, a
    /// zero or a past one.
    pub fn window(&self, named: Option<Duration>) -> Duration {
        named.filter(|w| !w.is_zero()).unwrap_or(DEFAULT_429_WINDOW)
    }

    /// The interval a 429 teaches: the rate bunq stated, else one call per window; never
    /// faster than the configured pace, else bunq's documented one, else [`OTHER_HOST_FLOOR`].
    pub fn learned(&self, window: Duration, rate: Option<RateLimit>) -> Duration {
        let floor = self
            .configured
            .or(self.documented)
            .unwrap_or(OTHER_HOST_FLOOR);
        rate.map_or(window, |r| r.interval()).max(floor)
    }

    /// The spacing of slots: the slower of the base and the learned interval (a 429 never
    /// makes the pace faster), plus the margin ([`with_margin`]). None: no spacing.
    pub fn interval(&self, learned: Option<Duration>) -> Option<Duration> {
        self.base().max(learned).map(with_margin)
    }

    /// How far after a pause's end a caller resumes: a random part of a tenth of `interval`,
    /// so processes paused together do not resume together, and none waits a whole interval.
    pub fn resumption_jitter(interval: Duration) -> Duration {
        crate::retry::RetryPolicy::full_jitter(interval / 10)
    }
}

#[derive(Debug)]
struct State {
    next_slot: Instant,
    paused_until: Instant,
    /// The interval bunq's last 429 taught ([`Pace::learned`]).
    learned: Option<Duration>,
    /// Takes so far: only the latest can be given back.
    takes: u64,
}

/// Hands out session-server slots, process-wide: spaced by the [`Pace`], never inside a pause a
/// 429 started, and spaced from when the previous call was answered, since bunq counts calls
/// when they arrive. A slot is taken only when it is due, never ahead: a delivery that stops
/// waiting (handed back, shut down, its channel lost) holds nothing, and one that takes a slot
/// and then makes no call gives it back ([`Pacer::give_back`]). Times are tokio's, so tests can
/// pause the clock.
#[derive(Debug)]
pub struct Pacer {
    /// The rules.
    pub pace: Pace,
    state: Mutex<State>,
}

impl Pacer {
    /// A pacer following `pace`. When the pace is known, the first slot is one interval after
    /// now: a process does not know when the one before it (a restart) last called.
    pub fn new(pace: Pace) -> Self {
        let now = Instant::now();
        Self {
            pace,
            state: Mutex::new(State {
                next_slot: now + pace.interval(None).unwrap_or_default(),
                paused_until: now,
                learned: None,
                takes: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn interval(&self, st: &State) -> Option<Duration> {
        self.pace.interval(st.learned)
    }

    /// Takes the next slot if it is due now; otherwise takes nothing and returns when it will
    /// be (try again then: another caller may take it first).
    ///
    /// # Errors
    /// The next slot's time, when it is not due yet.
    pub fn take(&self) -> Result<TakenSlot, Instant> {
        let mut st = self.lock();
        let now = Instant::now();
        let slot = now.max(st.next_slot).max(st.paused_until);
        if slot > now {
            return Err(slot);
        }
        let before = st.next_slot;
        if let Some(i) = self.interval(&st) {
            st.next_slot = now + i;
        }
        st.takes += 1;
        Ok(TakenSlot::Local {
            before,
            take: st.takes,
        })
    }

    /// Gives back a slot taken and not used, unless another caller took one since.
    pub fn give_back(&self, taken: TakenSlot) {
        if let TakenSlot::Local { before, take } = taken {
            let mut st = self.lock();
            if st.takes == take {
                st.next_slot = before;
            }
        }
    }

    /// A session-server call was answered now: the next slot is at least one interval later,
    /// which keeps a margin when the limit is set at bunq's own figure.
    pub fn answered(&self) {
        let mut st = self.lock();
        if let Some(i) = self.interval(&st) {
            st.next_slot = st.next_slot.max(Instant::now() + i);
        }
    }

    /// A 429: pauses every later call for the window ([`Pace::window`]: bunq's `Retry-After`
    /// or the window its message names) and adopts what it teaches as the pace
    /// ([`Pace::learned`]) until a later 429 says otherwise. Calls resume spaced, the first
    /// after [`Pace::resumption_jitter`]. Returns when the pause ends.
    pub fn rate_limited(&self, window: Option<Duration>, rate: Option<RateLimit>) -> Instant {
        let window = self.pace.window(window);
        let mut st = self.lock();
        st.learned = Some(self.pace.learned(window, rate));
        let interval = self.interval(&st).unwrap_or(window);
        let now = Instant::now();
        let until = now
            .checked_add(window + Pace::resumption_jitter(interval))
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

/// `interval` plus a fiftieth, at least 20 ms: the margin slots keep, since bunq counts calls
/// when they arrive and arrivals wobble. Slots are also spaced from the previous answer, so the
/// call's own latency adds to it.
pub fn with_margin(interval: Duration) -> Duration {
    interval + (interval / 50).max(Duration::from_millis(20))
}

/// A slot taken from a [`Pacer`] or the fleet's budget: what [`Budget::give_back`] needs to
/// undo it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TakenSlot {
    /// From this process's pacer.
    Local {
        /// The next slot before the take.
        before: Instant,
        /// The take's number: only the latest take can be given back.
        take: u64,
    },
    /// From the fleet's budget in Redis.
    Shared(crate::fleet::SharedSlot),
}

/// A session-server slot, as [`Budget::take_within`] found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// TakenSlot: call now.
    Now(TakenSlot),
    /// The next slot is this far off, within the wait allowed: nothing taken; try again then.
    NotYet(Duration),
    /// The next slot is this far off, past the wait allowed. Nothing taken.
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
    /// Takes the next slot if it is due; else says how far off it is, within `max_wait` or not.
    pub async fn take_within(&self, max_wait: Duration) -> Slot {
        let Some(fleet) = &self.shared else {
            return match self.local.take() {
                Ok(taken) => Slot::Now(taken),
                Err(at) => match at.saturating_duration_since(Instant::now()) {
                    d if d > max_wait => Slot::TooLate(d),
                    d => Slot::NotYet(d),
                },
            };
        };
        match fleet.take(self.local.pace.base().map(with_margin)).await {
            Ok(Ok(taken)) => Slot::Now(TakenSlot::Shared(taken)),
            Ok(Err(d)) if d > max_wait => Slot::TooLate(d),
            Ok(Err(d)) => Slot::NotYet(d),
            Err(_) => Slot::Unavailable,
        }
    }

    /// Gives back a slot taken and not used (the claim was lost before the call, or the work
    /// was cancelled), so the next caller need not wait for it.
    pub async fn give_back(&self, taken: TakenSlot) {
        match (taken, &self.shared) {
            (TakenSlot::Shared(slot), Some(fleet)) => {
                let _ = fleet.give_back(slot).await;
            }
            (taken, _) => self.local.give_back(taken),
        }
    }

    /// A call was answered now (see [`Pacer::answered`]).
    pub async fn answered(&self) {
        self.local.answered();
        if let Some(fleet) = &self.shared {
            let _ = fleet
                .answered(self.local.pace.base().map(with_margin))
                .await;
        }
    }

    /// A 429 (see [`Pacer::rate_limited`]), for the whole scope when the budget is shared.
    pub async fn rate_limited(&self, window: Option<Duration>, rate: Option<RateLimit>) {
        self.local.rate_limited(window, rate);
        if let Some(fleet) = &self.shared {
            let pace = &self.local.pace;
            let window = pace.window(window);
            let learned = pace.learned(window, rate);
            let interval = pace.interval(Some(learned)).unwrap_or(learned);
            let jitter = Pace::resumption_jitter(interval);
            let _ = fleet
                .rate_limited(window, jitter, with_margin(learned))
                .await;
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

    fn limit(s: &str) -> Option<RateLimit> {
        Some(s.parse().unwrap())
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[tokio::test(start_paused = true)]
    async fn slots_are_taken_when_due_spaced_and_given_back() {
        let p = Pacer::new(Pace::elsewhere(limit("2/1s")));
        let t0 = Instant::now();
        // 500 ms apart, plus the margin (20 ms at least); a new process waits one interval.
        assert_eq!(p.take(), Err(t0 + MS(520)), "nothing is taken ahead");
        tokio::time::advance(MS(520)).await;
        let a = p.take().unwrap();
        assert_eq!(p.take(), Err(t0 + MS(1040)));
        // The claim was lost before the call: the slot goes back, due at once.
        p.give_back(a);
        let b = p.take().unwrap();
        // A pause wins over the next slot.
        p.pause_until(Instant::now() + Duration::from_secs(10));
        assert_eq!(p.take(), Err(t0 + MS(10_520)));
        // A slot given back after the schedule moved on changes nothing.
        p.give_back(b);
        assert_eq!(p.take(), Err(t0 + MS(10_520)));
        // Time passing frees the slots: after an idle minute the next call goes at once.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(p.take().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_limit_only_pauses_and_learned_rates_apply() {
        let p = Pacer::new(Pace::elsewhere(None));
        let t0 = Instant::now();
        assert!(p.take().is_ok());
        assert!(p.take().is_ok(), "no limit: no spacing");
        // bunq says 1 call per 30 s: pause 30 s (plus up to a tenth of the interval of
        // jitter), then calls resume spaced by 30 s, not together.
        let until = p.rate_limited(Some(Duration::from_secs(30)), limit("1/30s"));
        let waited = until - t0;
        assert!(
            waited >= Duration::from_secs(30) && waited <= MS(33_060),
            "{waited:?}"
        );
        assert_eq!(p.take(), Err(until));
        tokio::time::advance(until - t0).await;
        assert!(p.take().is_ok());
        assert_eq!(p.take(), Err(until + MS(30_600)), "30 s and a fiftieth");
        // A shorter pause later does not shorten the longer one.
        p.pause_until(t0 + Duration::from_secs(1));
        assert_eq!(p.paused_until(), None, "the pause is over");
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_naming_no_window_or_a_zero_one_waits_bunqs_documented_window() {
        for named in [None, Some(Duration::ZERO)] {
            let p = Pacer::new(Pace::elsewhere(None));
            let t0 = Instant::now();
            let until = p.rate_limited(named, None);
            let waited = until - t0;
            assert!(
                waited >= DEFAULT_429_WINDOW && waited <= MS(33_060),
                "{named:?}: {waited:?}"
            );
            // And the pace it teaches is one call per that window, not one per 0 s.
            tokio::time::advance(waited).await;
            assert!(p.take().is_ok());
            assert_eq!(p.take(), Err(until + with_margin(DEFAULT_429_WINDOW)));
        }
    }

    #[test]
    fn a_429_never_teaches_a_pace_faster_than_the_floor() {
        let bunq = Pace::new(None, &"https://api.bunq.com/v1".parse().unwrap());
        let sandbox = Pace::new(
            None,
            &"https://public-api.sandbox.bunq.com/v1".parse().unwrap(),
        );
        let fake = Pace::new(None, &"http://127.0.0.1:9/v1".parse().unwrap());
        let configured = Pace::elsewhere(limit("1/10s"));
        let fast = limit("1000/1s");
        let w = Duration::from_secs(1);
        assert_eq!(bunq.learned(w, fast), DOCUMENTED_INTERVAL);
        assert_eq!(sandbox.learned(w, fast), DOCUMENTED_INTERVAL);
        assert_eq!(fake.learned(w, fast), OTHER_HOST_FLOOR);
        assert_eq!(configured.learned(w, fast), Duration::from_secs(10));
        // Slower than the floor is taken as bunq says.
        assert_eq!(fake.learned(w, limit("1/5s")), Duration::from_secs(5));
        // bunq's own hosts start at bunq's figure; elsewhere nothing is known before a 429.
        assert_eq!(bunq.interval(None), Some(with_margin(DOCUMENTED_INTERVAL)));
        assert_eq!(fake.interval(None), None);
        // A 429 never makes the pace faster than the one in force.
        let slow = Pace::elsewhere(limit("1/10s"));
        assert_eq!(
            slow.interval(Some(Duration::from_secs(1))),
            Some(with_margin(Duration::from_secs(10)))
        );
        assert_eq!(
            slow.interval(Some(Duration::from_secs(60))),
            Some(with_margin(Duration::from_secs(60))),
            "a 429 slower than the configured pace wins"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slots_are_spaced_from_the_previous_answer() {
        let p = Pacer::new(Pace::elsewhere(limit("1/2s")));
        let t0 = Instant::now();
        tokio::time::advance(MS(2040)).await;
        assert!(p.take().is_ok());
        // The call took 300 ms: the next may arrive no earlier than 2 s (and the margin) after
        // its answer.
        tokio::time::advance(MS(300)).await;
        p.answered();
        assert_eq!(p.take(), Err(t0 + MS(4380)));
    }
}
