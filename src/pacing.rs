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

    /// The interval a 429 teaches: the rate bunq stated; else one call per window, at most
    /// bunq's documented interval (a long `Retry-After` is a pause, not a pace: after it calls
    /// go at bunq's documented rate); never faster than the configured pace, else bunq's
    /// documented one, else [`OTHER_HOST_FLOOR`].
    pub fn learned(&self, window: Duration, rate: Option<RateLimit>) -> Duration {
        let floor = self
            .configured
            .or(self.documented)
            .unwrap_or(OTHER_HOST_FLOOR);
        rate.map_or(window.min(DOCUMENTED_INTERVAL), |r| r.interval())
            .max(floor)
    }

    /// The spacing of slots before the margin: the slower of the base and the learned
    /// interval (a 429 never makes the pace faster). None: no spacing.
    pub fn spacing(&self, learned: Option<Duration>) -> Option<Duration> {
        self.base().max(learned)
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
    /// Calls in flight admitted while the pace is unknown ([`Pacer::admit_probe`]).
    probes: u32,
    /// Sessions opened by probes: the probe limit grows with them ([`Pacer::probe_ended`]).
    probe_sessions: u32,
    /// The margin slots keep beyond the spacing.
    margin: Margin,
}

/// The margin slots keep beyond bunq's spacing, since bunq counts calls when they arrive and
/// arrivals wobble (slots are also spaced from the previous answer, so a call's own latency adds
/// to it): a hundredth of the interval, at least 10 ms, to start with; each 429 drawn at a pace
/// already known doubles it, up to a tenth. Per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Margin {
    /// Thousandths of the interval.
    permille: u32,
}

impl Margin {
    /// A hundredth.
    pub const START: Margin = Margin { permille: 10 };
    const MOST: u32 = 100;

    /// `interval` with the margin added.
    pub fn apply(self, interval: Duration) -> Duration {
        interval + (interval * self.permille / 1000).max(Duration::from_millis(10))
    }

    /// Doubled, up to a tenth: a 429 came at the pace this margin kept.
    fn widened(self) -> Margin {
        Margin {
            permille: (self.permille * 2).min(Self::MOST),
        }
    }
}

impl State {
    /// Whether as many probes are in flight as the limit allows: 1, doubling every
    /// [`PROBE_SESSIONS_PER_DOUBLING`] sessions, at most 2^[`MAX_PROBE_DOUBLINGS`].
    fn probes_full(&self) -> bool {
        let doublings =
            (self.probe_sessions / PROBE_SESSIONS_PER_DOUBLING).min(MAX_PROBE_DOUBLINGS);
        self.probes >= 1 << doublings
    }
}

/// Sessions in a row that double the probe limit: a limit of N calls per window shows itself
/// (a 429) before the limit grows past N, for N under this.
const PROBE_SESSIONS_PER_DOUBLING: u32 = 8;

/// The most calls in flight while bunq's pace is unknown, once sessions keep coming (2^10).
const MAX_PROBE_DOUBLINGS: u32 = 10;

/// How soon a call refused by the probe limit looks again.
const PROBE_POLL: Duration = Duration::from_millis(10);

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
                next_slot: now
                    + pace
                        .spacing(None)
                        .map(|i| Margin::START.apply(i))
                        .unwrap_or_default(),
                paused_until: now,
                learned: None,
                takes: 0,
                probes: 0,
                probe_sessions: 0,
                margin: Margin::START,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn interval(&self, st: &State) -> Option<Duration> {
        self.pace.spacing(st.learned).map(|i| st.margin.apply(i))
    }

    /// `interval` with this process's margin ([`Margin`]).
    pub fn with_margin(&self, interval: Duration) -> Duration {
        self.lock().margin.apply(interval)
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

    /// When the next slot is due (now at the earliest), taking nothing.
    pub fn next_due(&self) -> Instant {
        let st = self.lock();
        Instant::now().max(st.next_slot).max(st.paused_until)
    }

    /// While the pace is unknown (no configured or documented one, no 429 yet), admits a call
    /// only while fewer than the probe limit are in flight in this process: the limit starts at
    /// 1 and doubles every [`PROBE_SESSIONS_PER_DOUBLING`] sessions ([`Pacer::probe_ended`]),
    /// so the first wave against an unknown limit draws at most one 429 per process, and an
    /// unlimited bunq is called at full concurrency after a few dozen sessions. `Ok(true)`: admitted as a probe (end it with [`Pacer::probe_ended`]);
    /// `Ok(false)`: the pace is known, no probe needed.
    ///
    /// # Errors
    /// When to look again, while the probe limit is reached.
    pub fn admit_probe(&self) -> Result<bool, Instant> {
        let mut st = self.lock();
        if self.interval(&st).is_some() {
            return Ok(false);
        }
        if st.probes_full() {
            return Err(Instant::now() + PROBE_POLL);
        }
        st.probes += 1;
        Ok(true)
    }

    /// Whether a call would wait for a probe to end now ([`Pacer::admit_probe`]), admitting
    /// nothing.
    pub fn probes_full(&self) -> bool {
        let st = self.lock();
        self.interval(&st).is_none() && st.probes_full()
    }

    /// A call admitted by [`Pacer::admit_probe`] ended; `session`: bunq opened a session.
    pub fn probe_ended(&self, session: bool) {
        let mut st = self.lock();
        st.probes = st.probes.saturating_sub(1);
        if session {
            st.probe_sessions = st.probe_sessions.saturating_add(1);
        }
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
        if self.interval(&st).is_some() {
            // Refused at a pace already known: the margin was too thin.
            st.margin = st.margin.widened();
        }
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
    /// Due: call now.
    Now {
        /// The slot taken, to give back if no call is made (none when only looked at:
        /// [`Budget::due_within`]).
        taken: Option<TakenSlot>,
        /// Admitted as a probe ([`Pacer::admit_probe`]): end it with [`Pacer::probe_ended`].
        probe: bool,
    },
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
    /// Takes the next slot if it is due (and, while the pace is unknown, the probe limit
    /// allows); else says how far off it is, within `max_wait` or not.
    pub async fn take_within(&self, max_wait: Duration) -> Slot {
        let later = |at: Instant| match at.saturating_duration_since(Instant::now()) {
            d if d > max_wait => Slot::TooLate(d),
            d => Slot::NotYet(d),
        };
        // This process's own view first: a pause it just learned may not be in Redis yet.
        if let Some(until) = self.local.paused_until() {
            return later(until);
        }
        let probe = match self.local.admit_probe() {
            Ok(probe) => probe,
            Err(at) => return later(at),
        };
        let slot = match &self.shared {
            None => match self.local.take() {
                Ok(taken) => Slot::Now {
                    taken: Some(taken),
                    probe,
                },
                Err(at) => later(at),
            },
            Some(fleet) => match fleet.take(self.base_with_margin()).await {
                Ok(Ok(taken)) => Slot::Now {
                    taken: Some(TakenSlot::Shared(taken)),
                    probe,
                },
                Ok(Err(d)) => later(Instant::now() + d),
                Err(_) => Slot::Unavailable,
            },
        };
        if probe && !matches!(slot, Slot::Now { .. }) {
            self.local.probe_ended(false);
        }
        slot
    }

    /// Whether a slot will be due within `max_wait`, taking nothing: [`Slot::Now`] with no
    /// slot when it is due now. For a call that must come before the paced one (device-server):
    /// it is made only when the paced one can follow.
    pub async fn due_within(&self, max_wait: Duration) -> Slot {
        if self.local.probes_full() {
            return Slot::NotYet(PROBE_POLL);
        }
        let wait = match &self.shared {
            None => self
                .local
                .next_due()
                .saturating_duration_since(Instant::now()),
            Some(fleet) => match fleet.peek().await {
                Ok(d) => d.max(
                    self.local
                        .next_due()
                        .saturating_duration_since(Instant::now()),
                ),
                Err(_) => return Slot::Unavailable,
            },
        };
        match wait {
            d if d.is_zero() => Slot::Now {
                taken: None,
                probe: false,
            },
            d if d > max_wait => Slot::TooLate(d),
            d => Slot::NotYet(d),
        }
    }

    /// The base spacing with this process's margin, for the fleet's scripts (the learned one,
    /// kept in Redis, already has one).
    fn base_with_margin(&self) -> Option<Duration> {
        self.local.pace.base().map(|b| self.local.with_margin(b))
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
            let _ = fleet.answered(self.base_with_margin()).await;
        }
    }

    /// A 429 (see [`Pacer::rate_limited`]), for the whole scope when the budget is shared.
    pub async fn rate_limited(&self, window: Option<Duration>, rate: Option<RateLimit>) {
        self.local.rate_limited(window, rate);
        if let Some(fleet) = &self.shared {
            let pace = &self.local.pace;
            let window = pace.window(window);
            let learned = pace.learned(window, rate);
            let spacing = pace.spacing(Some(learned)).unwrap_or(learned);
            let jitter = Pace::resumption_jitter(self.local.with_margin(spacing));
            let _ = fleet
                .rate_limited(window, jitter, self.local.with_margin(learned))
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
        // 500 ms apart, plus the margin (10 ms at least); a new process waits one interval.
        assert_eq!(p.take(), Err(t0 + MS(510)), "nothing is taken ahead");
        tokio::time::advance(MS(510)).await;
        let a = p.take().unwrap();
        assert_eq!(p.take(), Err(t0 + MS(1020)));
        // The claim was lost before the call: the slot goes back, due at once.
        p.give_back(a);
        let b = p.take().unwrap();
        // A pause wins over the next slot.
        p.pause_until(Instant::now() + Duration::from_secs(10));
        assert_eq!(p.take(), Err(t0 + MS(10_510)));
        // A slot given back after the schedule moved on changes nothing.
        p.give_back(b);
        assert_eq!(p.take(), Err(t0 + MS(10_510)));
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
            waited >= Duration::from_secs(30) && waited <= MS(33_030),
            "{waited:?}"
        );
        assert_eq!(p.take(), Err(until));
        tokio::time::advance(until - t0).await;
        assert!(p.take().is_ok());
        assert_eq!(p.take(), Err(until + MS(30_300)), "30 s and a hundredth");
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
                waited >= DEFAULT_429_WINDOW && waited <= MS(33_030),
                "{named:?}: {waited:?}"
            );
            // And the pace it teaches is one call per that window, not one per 0 s.
            tokio::time::advance(waited).await;
            assert!(p.take().is_ok());
            assert_eq!(
                p.take(),
                Err(until + Margin::START.apply(DEFAULT_429_WINDOW))
            );
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
        assert_eq!(fake.learned(w, limit("1/600s")), Duration::from_secs(600));
        // A bare window is a pause: the pace after it is one per window up to bunq's figure.
        assert_eq!(
            fake.learned(Duration::from_secs(5), None),
            Duration::from_secs(5)
        );
        assert_eq!(
            fake.learned(Duration::from_secs(86_400), None),
            DOCUMENTED_INTERVAL
        );
        // bunq's own hosts start at bunq's figure; elsewhere nothing is known before a 429.
        assert_eq!(bunq.spacing(None), Some(DOCUMENTED_INTERVAL));
        assert_eq!(fake.spacing(None), None);
        // A 429 never makes the pace faster than the one in force.
        let slow = Pace::elsewhere(limit("1/10s"));
        assert_eq!(
            slow.spacing(Some(Duration::from_secs(1))),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            slow.spacing(Some(Duration::from_secs(60))),
            Some(Duration::from_secs(60)),
            "a 429 slower than the configured pace wins"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn while_the_pace_is_unknown_calls_probe_one_at_a_time_then_more() {
        let p = Pacer::new(Pace::elsewhere(None));
        assert_eq!(p.admit_probe(), Ok(true));
        assert!(p.admit_probe().is_err(), "one probe in flight");
        p.probe_ended(false);
        assert_eq!(p.admit_probe(), Ok(true), "a refusal keeps the limit at 1");
        p.probe_ended(true);
        for _ in 1..PROBE_SESSIONS_PER_DOUBLING {
            assert_eq!(p.admit_probe(), Ok(true));
            assert!(p.admit_probe().is_err(), "one at a time");
            p.probe_ended(true);
        }
        assert_eq!(p.admit_probe(), Ok(true));
        assert_eq!(p.admit_probe(), Ok(true), "8 sessions double the limit");
        assert!(p.admit_probe().is_err());
        p.probe_ended(true);
        p.probe_ended(true);
        // Once a 429 taught the pace, or one is configured, nothing probes.
        p.rate_limited(Some(Duration::from_secs(1)), None);
        assert_eq!(p.admit_probe(), Ok(false));
        let known = Pacer::new(Pace::elsewhere(limit("1/1s")));
        assert_eq!(known.admit_probe(), Ok(false));
    }

    #[tokio::test(start_paused = true)]
    async fn slots_are_spaced_from_the_previous_answer() {
        let p = Pacer::new(Pace::elsewhere(limit("1/2s")));
        let t0 = Instant::now();
        tokio::time::advance(MS(2020)).await;
        assert!(p.take().is_ok());
        // The call took 300 ms: the next may arrive no earlier than 2 s (and the margin) after
        // its answer.
        tokio::time::advance(MS(300)).await;
        p.answered();
        assert_eq!(p.take(), Err(t0 + MS(4340)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_at_a_known_pace_widens_the_margin_up_to_a_tenth() {
        let p = Pacer::new(Pace::elsewhere(limit("1/10s")));
        assert_eq!(p.with_margin(Duration::from_secs(10)), MS(10_100));
        p.rate_limited(Some(Duration::from_secs(1)), limit("1/10s"));
        assert_eq!(p.with_margin(Duration::from_secs(10)), MS(10_200));
        for _ in 0..5 {
            p.rate_limited(Some(Duration::from_secs(1)), limit("1/10s"));
        }
        assert_eq!(
            p.with_margin(Duration::from_secs(10)),
            MS(11_000),
            "a tenth at most"
        );
        // The first 429 against an unknown pace teaches it; it does not widen the margin.
        let q = Pacer::new(Pace::elsewhere(None));
        q.rate_limited(Some(Duration::from_secs(1)), limit("1/10s"));
        assert_eq!(q.with_margin(Duration::from_secs(10)), MS(10_100));
    }
}
