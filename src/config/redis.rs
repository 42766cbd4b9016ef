//! Redis for the fleet's shared state: where it is, the prefix of the worker's keys, and the
//! session-server budget this replica shares.

use clap::Args;
use secrecy::SecretString;

use super::{ConfigError, parse::parse_secret};

/// Redis for the fleet's shared state; the worker builds its [`crate::fleet::Fleet`] from these
/// when `url` is set.
///
/// The fields are named within the group (`url`), but the flags and variables keep the names a
/// flat command line needs (`--redis-url`, `REDIS_URL`), hence the explicit `long` and
/// `value_name`.
#[derive(Clone, Debug, Args)]
pub struct RedisSettings {
    /// Redis for the fleet's shared state (claims on credentials, one session-server budget per
    /// scope), `redis://` or `rediss://`. Unset: each process keeps its own, right for one
    /// replica.
    #[arg(long = "redis-url", env = "REDIS_URL", value_name = "REDIS_URL", hide_env_values = true, value_parser = parse_secret)]
    pub url: Option<SecretString>,

    /// Prefix of every Redis key the worker uses.
    #[arg(
        long = "redis-key-prefix",
        env = "REDIS_KEY_PREFIX",
        value_name = "REDIS_KEY_PREFIX",
        default_value = "bunq-session-worker:"
    )]
    pub key_prefix: String,

    /// The session-server budget this replica shares (with `REDIS_URL`): replicas behind one
    /// egress IP share bunq's per-IP limit, so give replicas behind another IP another scope.
    #[arg(
        long = "bunq-rate-limit-scope",
        env = "BUNQ_RATE_LIMIT_SCOPE",
        value_name = "BUNQ_RATE_LIMIT_SCOPE",
        default_value = "default"
    )]
    pub rate_limit_scope: String,
}

impl RedisSettings {
    /// Checks what clap cannot check field by field.
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable when `BUNQ_RATE_LIMIT_SCOPE` is empty.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.rate_limit_scope.trim().is_empty() {
            return Err(ConfigError(
                "BUNQ_RATE_LIMIT_SCOPE must not be empty".into(),
            ));
        }
        Ok(())
    }
}
