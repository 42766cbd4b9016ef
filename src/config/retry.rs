//! Retries of bunq calls: delays, attempts and the time budget of one delivery; builds the
//! bunq [`RetryPolicy`].

use std::time::Duration;

use clap::Args;

use super::{
    ConfigError,
    parse::{parse_ms, parse_s},
};
use crate::retry::RetryPolicy;

/// Retries of bunq calls; builds the bunq [`RetryPolicy`].
#[derive(Clone, Debug, Args)]
pub struct RetrySettings {
    /// First retry delay before jitter, in ms.
    #[arg(long = "retry-initial-delay-ms", env = "RETRY_INITIAL_DELAY_MS", value_name = "RETRY_INITIAL_DELAY_MS", default_value = "500", value_parser = parse_ms)]
    pub initial_delay: Duration,

    /// Cap of one retry delay before jitter, in ms.
    #[arg(long = "retry-max-delay-ms", env = "RETRY_MAX_DELAY_MS", value_name = "RETRY_MAX_DELAY_MS", default_value = "30000", value_parser = parse_ms)]
    pub max_delay: Duration,

    /// Most attempts of one bunq call, the first included (>= 1).
    #[arg(long = "retry-max-attempts", env = "RETRY_MAX_ATTEMPTS", default_value = "8", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,

    /// Most time spent on one delivery's bunq calls, retries included, in s.
    #[arg(long = "retry-max-elapsed-s", env = "RETRY_MAX_ELAPSED_S", value_name = "RETRY_MAX_ELAPSED_S", default_value = "300", value_parser = parse_s)]
    pub max_elapsed: Duration,
}

impl RetrySettings {
    /// The bunq retry policy: these limits with full jitter.
    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            initial_delay: self.initial_delay,
            max_delay: self.max_delay,
            max_attempts: self.max_attempts,
            max_elapsed: Some(self.max_elapsed),
            jitter: true,
            min_delay: Duration::ZERO,
        }
    }

    /// Checks what clap cannot check field by field.
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable when `RETRY_INITIAL_DELAY_MS` is 0 or
    /// `RETRY_MAX_DELAY_MS` < `RETRY_INITIAL_DELAY_MS`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.initial_delay.is_zero() {
            return Err(ConfigError(
                "RETRY_INITIAL_DELAY_MS must be at least 1".into(),
            ));
        }
        if self.max_delay < self.initial_delay {
            return Err(ConfigError(
                "RETRY_MAX_DELAY_MS must be at least RETRY_INITIAL_DELAY_MS".into(),
            ));
        }
        Ok(())
    }
}
