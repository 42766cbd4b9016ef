//! The retry policy for bunq calls: capped exponential backoff with full jitter, bounded by
//! attempts, elapsed time and the credential's expiry.
//!
//! The schedule before jitter comes from [`backon::ExponentialBuilder`] (factor 2): with the
//! defaults (500 ms initial, 30 s cap) the delays are 0.5, 1, 2, 4, 8, 16, 30, 30 … s. Full jitter
//! (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015) then sleeps a uniformly random
//! time in `[0, delay]`, so a fleet of workers that failed together does not retry together.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// The retry policy as a value.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Delay before the first retry, before jitter.
    pub initial_delay: Duration,
    /// Largest delay before jitter.
    pub max_delay: Duration,
    /// Most attempts per call, the first included (>= 1).
    pub max_attempts: u32,
    /// Most wall-clock time for one delivery's calls, retries included.
    pub max_elapsed: Duration,
}

impl RetryPolicy {
    /// The delays between attempts before jitter: `max_attempts - 1` values.
    pub fn schedule(&self) -> impl Iterator<Item = Duration> + Send + use<> {
        ExponentialBuilder::default()
            .with_min_delay(self.initial_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .with_max_times(self.max_attempts.saturating_sub(1) as usize)
            .build()
    }

    /// Full jitter: a uniformly random duration in `[0, delay]`.
    pub fn jitter(delay: Duration) -> Duration {
        delay.mul_f64(fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_doubles_up_to_the_cap_and_stops_at_max_attempts() {
        let p = RetryPolicy {
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_attempts: 9,
            max_elapsed: Duration::from_secs(300),
        };
        let s: Vec<u64> = p.schedule().map(|d| d.as_millis() as u64).collect();
        assert_eq!(s, vec![500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        let one = RetryPolicy {
            max_attempts: 1,
            ..p
        };
        assert_eq!(one.schedule().count(), 0);
    }

    #[test]
    fn jitter_stays_within_the_delay() {
        for _ in 0..1000 {
            let j = RetryPolicy::jitter(Duration::from_millis(100));
            assert!(j <= Duration::from_millis(100));
        }
    }
}
