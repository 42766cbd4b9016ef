//! Redis for the fleet's shared state: where it is, the prefix of the worker's keys, and the
//! session-server budget this replica shares.

use std::time::Duration;

use clap::Args;
use secrecy::SecretString;

use super::{
    ConfigError,
    parse::{is_host_port, parse_ms, parse_secret},
};

/// What a claim's lease must have left beyond one bunq call (`HTTP_TIMEOUT_MS`) after the
/// fence that renews it: room for signing, scheduling and the clocks' drift.
pub const LEASE_MARGIN: Duration = Duration::from_secs(2);

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

    /// The Redis Sentinels that watch the fleet's Redis (`host:port`, comma-separated), with
    /// `REDIS_SENTINEL_MASTER`: the worker asks them for the primary and asks again after a
    /// failover. `REDIS_URL` then gives only the scheme, credentials and database (its host is
    /// not used; unset: `redis://`, database 0); the sentinels are reached with its scheme and
    /// without its credentials.
    #[arg(
        long = "redis-sentinels",
        env = "REDIS_SENTINELS",
        value_name = "REDIS_SENTINELS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub sentinels: Vec<String>,

    /// The name the sentinels monitor the primary by (`sentinel monitor <name> …`), with
    /// `REDIS_SENTINELS`.
    #[arg(
        long = "redis-sentinel-master",
        env = "REDIS_SENTINEL_MASTER",
        value_name = "REDIS_SENTINEL_MASTER"
    )]
    pub sentinel_master: Option<String>,

    /// The sentinels' own password (their `requirepass`), when they have one: it is not
    /// `REDIS_URL`'s, which is the primary's.
    #[arg(long = "redis-sentinel-password", env = "REDIS_SENTINEL_PASSWORD", value_name = "REDIS_SENTINEL_PASSWORD", hide_env_values = true, value_parser = parse_secret)]
    pub sentinel_password: Option<SecretString>,

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

    /// How long a delivery's claim on a credential lasts without renewal, in ms: a crashed or
    /// frozen replica's claim is taken over after it. Renewed every third of it, and to its
    /// whole length right before each bunq call, so it must exceed `HTTP_TIMEOUT_MS` by 2 s.
    #[arg(long = "claim-lease-ms", env = "CLAIM_LEASE_MS", value_name = "CLAIM_LEASE_MS", default_value = "30000", value_parser = parse_ms)]
    pub claim_lease: Duration,
}

impl RedisSettings {
    /// Where the fleet's Redis is, or `None` when the fleet's state stays in the process.
    pub fn location(&self) -> Option<crate::fleet::Location> {
        let url = self.url.clone();
        let sentinels = self.sentinels();
        match &self.sentinel_master {
            Some(master) if !sentinels.is_empty() => Some(crate::fleet::Location::Sentinels {
                url,
                sentinels,
                master: master.clone(),
                password: self.sentinel_password.clone(),
            }),
            _ => url.map(crate::fleet::Location::Url),
        }
    }

    /// `REDIS_SENTINELS` trimmed, empty entries left out (as `AMQP_URL`'s are).
    fn sentinels(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Checks what clap cannot check field by field.
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable when only one of `REDIS_SENTINELS` and
    /// `REDIS_SENTINEL_MASTER` is set, when a sentinel is not `host:port`, when `BUNQ_RATE_LIMIT_SCOPE` is empty, or when
    /// `CLAIM_LEASE_MS` does not exceed `http_timeout` (`HTTP_TIMEOUT_MS`) by [`LEASE_MARGIN`]
    /// or is over a day.
    pub fn validate(&self, http_timeout: Duration) -> Result<(), ConfigError> {
        let sentinels = self.sentinels();
        match (sentinels.is_empty(), &self.sentinel_master) {
            (false, None) => {
                return Err(ConfigError(
                    "REDIS_SENTINELS is set but REDIS_SENTINEL_MASTER is not: name the primary the sentinels monitor".into(),
                ));
            }
            (true, Some(_)) => {
                return Err(ConfigError(
                    "REDIS_SENTINEL_MASTER is set but REDIS_SENTINELS is not: list the sentinels (host:port, comma-separated)".into(),
                ));
            }
            (_, Some(m)) if m.trim().is_empty() => {
                return Err(ConfigError(
                    "REDIS_SENTINEL_MASTER must not be empty".into(),
                ));
            }
            _ => {}
        }
        // Checked here rather than by clap, whose refusal would echo the value: a URL put here
        // by mistake may carry a password.
        let n = sentinels.len();
        if let Some(i) = sentinels.iter().position(|s| !is_host_port(s)) {
            return Err(ConfigError(format!(
                "REDIS_SENTINELS: sentinel {} of {n} is not HOST:PORT such as redis-sentinel-0:26379 or [fd00::1]:26379 (no scheme, no credentials: their password is REDIS_SENTINEL_PASSWORD)",
                i + 1
            )));
        }
        if self.rate_limit_scope.trim().is_empty() {
            return Err(ConfigError(
                "BUNQ_RATE_LIMIT_SCOPE must not be empty".into(),
            ));
        }
        let least = http_timeout.saturating_add(LEASE_MARGIN);
        if self.claim_lease < least {
            return Err(ConfigError(format!(
                "CLAIM_LEASE_MS ({} ms) must be at least HTTP_TIMEOUT_MS + {} ms = {} ms: a claim must outlast the bunq call it was renewed for",
                self.claim_lease.as_millis(),
                LEASE_MARGIN.as_millis(),
                least.as_millis()
            )));
        }
        if self.claim_lease > Duration::from_secs(86_400) {
            return Err(ConfigError(
                "CLAIM_LEASE_MS must be at most 86400000 (one day)".into(),
            ));
        }
        Ok(())
    }
}
