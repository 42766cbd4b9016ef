//! The one retry helper: capped exponential backoff, optional full jitter, bounded by attempts
//! and elapsed time, and every wait ends early on shutdown.
//!
//! Every retrying loop of the worker goes through [`Retry`]: bunq calls ([`crate::session`]),
//! the installation, publishing ([`crate::settle`]), reconnecting and subscribing
//! ([`crate::broker::consumer`]). Each has its own [`RetryPolicy`], written out below or built
//! from the `RETRY_*` settings.
//!
//! The schedule before jitter comes from [`backon::ExponentialBuilder`] (factor 2): with the
//! bunq defaults (500 ms initial, 30 s cap) the delays are 0.5, 1, 2, 4, 8, 16, 30, 30 … s. Full
//! jitter (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015) then sleeps a uniformly
//! random time in `[0, delay]`, so a fleet of workers that failed together does not retry
//! together. Time is tokio's ([`tokio::time::Instant`]), so tests can pause it.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A retry policy as a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before the first retry, before jitter.
    pub initial_delay: Duration,
    /// Largest delay before jitter.
    pub max_delay: Duration,
    /// Most attempts, the first included (>= 1); `u32::MAX` for no limit.
    pub max_attempts: u32,
    /// Most time spent retrying, measured from [`Retry::new`] minus the time excluded with
    /// [`Retry::exclude`]; `None` for no limit.
    pub max_elapsed: Option<Duration>,
    /// Full jitter on each delay, never below `min_delay`.
    pub jitter: bool,
    /// Shortest wait after jitter (a floor, so a retry is never immediate).
    pub min_delay: Duration,
}

impl RetryPolicy {
    /// Reconnecting to the broker: 100 ms, doubling, at most 2 s between attempts, no jitter,
    /// no limit. A returning broker is used within about 2 s.
    pub const RECONNECT: RetryPolicy = RetryPolicy {
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(2),
        max_attempts: u32::MAX,
        max_elapsed: None,
        jitter: false,
        min_delay: Duration::ZERO,
    };

    /// Declaring the topology and subscribing on a live connection: 200, 400, 800 ms, 1.6 s
    /// between 5 attempts (about 3 s), then the worker exits non-zero rather than stay deaf.
    pub const SUBSCRIBE: RetryPolicy = RetryPolicy {
        initial_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(2),
        max_attempts: 5,
        max_elapsed: None,
        jitter: false,
        min_delay: Duration::ZERO,
    };

    /// Publishing until confirmed: 100 ms, doubling, at most 5 s, full jitter but at least
    /// 50 ms; no limit (callers that give up set `max_elapsed`, see [`Self::publish_within`]).
    pub const PUBLISH: RetryPolicy = RetryPolicy {
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(5),
        max_attempts: u32::MAX,
        max_elapsed: None,
        jitter: true,
        min_delay: Duration::from_millis(50),
    };

    /// Waiting for the fleet's shared state (Redis): 0.5 s, doubling, at most 5 s, full jitter
    /// but at least 100 ms; no limit (callers stop at the time a delivery may be held).
    pub const SHARED_STATE: RetryPolicy = RetryPolicy {
        initial_delay: Duration::from_millis(500),
        max_delay: Duration::from_secs(5),
        max_attempts: u32::MAX,
        max_elapsed: None,
        jitter: true,
        min_delay: Duration::from_millis(100),
    };

    /// Recording a credential's outcome (created, failed, parked) in Redis: 100 ms, doubling,
    /// at most 500 ms, no jitter, no limit (the caller stops at the end of the drain). Until it
    /// lands, another replica may take the credential once the claim's lease is over and call
    /// bunq again, so the record is tried at least as often as a waiting copy looks (500 ms).
    pub const RECORD_OUTCOME: RetryPolicy = RetryPolicy {
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(500),
        max_attempts: u32::MAX,
        max_elapsed: None,
        jitter: false,
        min_delay: Duration::ZERO,
    };

    /// [`Self::PUBLISH`], giving up after `max_elapsed`.
    pub fn publish_within(max_elapsed: Duration) -> RetryPolicy {
        RetryPolicy {
            max_elapsed: Some(max_elapsed),
            ..Self::PUBLISH
        }
    }

    /// The delays between attempts before jitter: `max_attempts - 1` values (endless for
    /// `u32::MAX`).
    pub fn schedule(&self) -> ExponentialBackoff {
        let builder = ExponentialBuilder::default()
            .with_min_delay(self.initial_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0);
        if self.max_attempts == u32::MAX {
            builder.without_max_times().build()
        } else {
            builder
                .with_max_times(self.max_attempts.saturating_sub(1) as usize)
                .build()
        }
    }

    /// Full jitter: a uniformly random duration in `[0, delay]`.
    pub fn full_jitter(delay: Duration) -> Duration {
        delay.mul_f64(fastrand::f64())
    }
}

/// Why [`Retry::next_delay`] allows no further attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spent {
    /// `max_attempts` attempts were made.
    Attempts,
    /// The next wait would end past `max_elapsed`.
    Elapsed,
}

/// Shutdown began during a wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cancelled;

/// The state of one retrying loop: attempts made, the schedule's position and the elapsed time.
#[derive(Debug)]
pub struct Retry {
    policy: RetryPolicy,
    schedule: ExponentialBackoff,
    attempts: u32,
    started: Instant,
    excluded: Duration,
    shutdown: CancellationToken,
}

impl Retry {
    /// Starts a loop now under `policy`; waits end early when `shutdown` fires.
    pub fn new(policy: RetryPolicy, shutdown: &CancellationToken) -> Self {
        Self {
            schedule: policy.schedule(),
            policy,
            attempts: 0,
            started: Instant::now(),
            excluded: Duration::ZERO,
            shutdown: shutdown.clone(),
        }
    }

    /// Counts an attempt and returns its number (1 for the first).
    pub fn attempt(&mut self) -> u32 {
        self.attempts = self.attempts.saturating_add(1);
        self.attempts
    }

    /// Attempts counted since the start or the last [`Retry::restart_attempts`].
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Starts counting attempts and the schedule again (a new call within the same elapsed
    /// budget: bunq's device-server, then session-server).
    pub fn restart_attempts(&mut self) {
        self.attempts = 0;
        self.schedule = self.policy.schedule();
    }

    /// Leaves `d` out of the elapsed budget (time spent waiting for a pacing slot, which is not
    /// a failure).
    pub fn exclude(&mut self, d: Duration) {
        self.excluded = self.excluded.saturating_add(d);
    }

    /// The policy's elapsed budget.
    pub fn max_elapsed(&self) -> Option<Duration> {
        self.policy.max_elapsed
    }

    /// Time charged to the elapsed budget so far.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed().saturating_sub(self.excluded)
    }

    /// The wait before the next attempt: the schedule's next delay, jittered, at least `floor`
    /// (e.g. a 429's window) and at least the policy's `min_delay`.
    ///
    /// # Errors
    /// [`Spent::Attempts`] when `max_attempts` attempts were made; [`Spent::Elapsed`] when the
    /// wait would end past `max_elapsed`.
    pub fn next_delay(&mut self, floor: Duration) -> Result<Duration, Spent> {
        let Some(base) = self.schedule.next() else {
            return Err(Spent::Attempts);
        };
        let delay = if self.policy.jitter {
            RetryPolicy::full_jitter(base)
        } else {
            base
        };
        let delay = delay.max(self.policy.min_delay).max(floor);
        if let Some(max) = self.policy.max_elapsed
            && self.elapsed().saturating_add(delay) > max
        {
            return Err(Spent::Elapsed);
        }
        Ok(delay)
    }

    /// Sleeps `delay`, or until shutdown.
    ///
    /// # Errors
    /// [`Cancelled`] when shutdown fires first.
    pub async fn wait(&self, delay: Duration) -> Result<(), Cancelled> {
        sleep_or_cancel(delay, &self.shutdown).await
    }
}

/// Sleeps `delay`, or until `shutdown` fires.
///
/// # Errors
/// [`Cancelled`] when shutdown fires first (also when it already has).
pub async fn sleep_or_cancel(
    delay: Duration,
    shutdown: &CancellationToken,
) -> Result<(), Cancelled> {
    sleep_until_or_cancel(Instant::now() + delay, shutdown).await
}

/// Sleeps until `at`, or until `shutdown` fires.
///
/// # Errors
/// [`Cancelled`] when shutdown fires first.
pub async fn sleep_until_or_cancel(
    at: Instant,
    shutdown: &CancellationToken,
) -> Result<(), Cancelled> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Err(Cancelled),
        _ = tokio::time::sleep_until(at) => Ok(()),
    }
}

/// How a simple retrying loop ended without success.
#[derive(Debug)]
pub enum Stopped<E> {
    /// The caller's judge said the error is not worth retrying.
    Permanent(E),
    /// Attempts or elapsed time ran out; the last error, and which budget ran out (for `Debug`
    /// and tests: no caller reacts differently to either).
    Spent(E, #[allow(dead_code)] Spent),
    /// Shutdown began.
    Cancelled,
}

/// Runs `op` until it succeeds, `is_permanent` says an error is final, the policy is spent or
/// shutdown fires. `on_retry(error, attempt, delay)` is called before each wait (for the log
/// line). Shutdown also ends an attempt under way.
///
/// # Errors
/// [`Stopped`] saying why it ended.
pub async fn retry<T, E, Fut>(
    policy: RetryPolicy,
    shutdown: &CancellationToken,
    mut op: impl FnMut(u32) -> Fut,
    is_permanent: impl Fn(&E) -> bool,
    mut on_retry: impl FnMut(&E, u32, Duration),
) -> Result<T, Stopped<E>>
where
    Fut: Future<Output = Result<T, E>>,
{
    let mut r = Retry::new(policy, shutdown);
    loop {
        let attempt = r.attempt();
        let result = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Err(Stopped::Cancelled),
            res = op(attempt) => res,
        };
        let err = match result {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if is_permanent(&err) {
            return Err(Stopped::Permanent(err));
        }
        let delay = match r.next_delay(Duration::ZERO) {
            Ok(d) => d,
            Err(spent) => return Err(Stopped::Spent(err, spent)),
        };
        on_retry(&err, attempt, delay);
        if r.wait(delay).await.is_err() {
            return Err(Stopped::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bunq_defaults() -> RetryPolicy {
        RetryPolicy {
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_attempts: 9,
            max_elapsed: Some(Duration::from_secs(300)),
            jitter: true,
            min_delay: Duration::ZERO,
        }
    }

    #[test]
    fn schedule_doubles_up_to_the_cap_and_stops_at_max_attempts() {
        let p = bunq_defaults();
        let s: Vec<u64> = p.schedule().map(|d| d.as_millis() as u64).collect();
        assert_eq!(s, vec![500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        let one = RetryPolicy {
            max_attempts: 1,
            ..p
        };
        assert_eq!(one.schedule().count(), 0);
        let subscribe: Vec<u64> = RetryPolicy::SUBSCRIBE
            .schedule()
            .map(|d| d.as_millis() as u64)
            .collect();
        assert_eq!(subscribe, vec![200, 400, 800, 1600]);
        assert_eq!(RetryPolicy::RECONNECT.schedule().take(100).count(), 100);
    }

    #[test]
    fn jitter_stays_within_the_delay_and_above_the_floors() {
        for _ in 0..1000 {
            let j = RetryPolicy::full_jitter(Duration::from_millis(100));
            assert!(j <= Duration::from_millis(100));
        }
        let shutdown = CancellationToken::new();
        let mut r = Retry::new(RetryPolicy::PUBLISH, &shutdown);
        for _ in 0..100 {
            let d = r.next_delay(Duration::ZERO).unwrap();
            assert!(
                d >= Duration::from_millis(50) && d <= Duration::from_secs(5),
                "{d:?}"
            );
        }
        let mut r = Retry::new(bunq_defaults(), &shutdown);
        assert_eq!(
            r.next_delay(Duration::from_secs(7)).unwrap(),
            Duration::from_secs(7),
            "a floor above the jittered delay wins"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_elapsed_budget_leaves_out_excluded_time() {
        let shutdown = CancellationToken::new();
        let policy = RetryPolicy {
            jitter: false,
            max_elapsed: Some(Duration::from_secs(10)),
            ..bunq_defaults()
        };
        let mut r = Retry::new(policy, &shutdown);
        tokio::time::sleep(Duration::from_secs(9)).await;
        // 9 s charged + 0.5 s delay fits; after another second it would not.
        assert_eq!(r.next_delay(Duration::ZERO), Ok(Duration::from_millis(500)));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(r.next_delay(Duration::ZERO), Err(Spent::Elapsed));
        r.exclude(Duration::from_secs(5));
        assert_eq!(r.elapsed(), Duration::from_secs(5));
        // The refused 1 s step was used up: the schedule goes on at 2 s.
        assert_eq!(r.next_delay(Duration::ZERO), Ok(Duration::from_secs(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_stops_on_permanent_spent_and_shutdown() {
        let shutdown = CancellationToken::new();
        let policy = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::SUBSCRIBE
        };
        let mut calls = 0;
        let r: Result<(), _> = retry(
            policy.clone(),
            &shutdown,
            |_| {
                calls += 1;
                async { Err::<(), _>("transient") }
            },
            |_| false,
            |_, _, _| {},
        )
        .await;
        assert!(matches!(
            r,
            Err(Stopped::Spent("transient", Spent::Attempts))
        ));
        assert_eq!(calls, 3);

        let r: Result<(), _> = retry(
            policy.clone(),
            &shutdown,
            |_| async { Err::<(), _>("bad") },
            |e| *e == "bad",
            |_, _, _| {},
        )
        .await;
        assert!(matches!(r, Err(Stopped::Permanent("bad"))));

        let started = Instant::now();
        let stopper = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            stopper.cancel();
        });
        let r: Result<(), _> = retry(
            RetryPolicy::RECONNECT,
            &shutdown,
            |_| async { Err::<(), _>("down") },
            |_| false,
            |_, _, _| {},
        )
        .await;
        assert!(matches!(r, Err(Stopped::Cancelled)));
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(300),
            "the wait ended at shutdown"
        );
    }
}
