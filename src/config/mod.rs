//! Configuration: the only module that reads the environment.
//!
//! Every setting is an environment variable with a matching `--flag` (clap's `env` support), so
//! the same binary runs under an orchestrator (env) or by hand (flags). Values are parsed into typed
//! fields at start-up; an invalid value stops the process with a message that names the variable.
//!
//! One file per settings group, each with the checks clap cannot make field by field:
//! [`broker`](BrokerSettings), [`topology`](TopologySettings), [`bunq`](BunqSettings),
//! [`retry`](RetrySettings), [`redis`](RedisSettings); the `emulator` subcommand's settings
//! ([`EmulatorSettings`]); the shared value parsers. This file holds the command line, the
//! top-level [`Settings`] that gathers the groups, and what applies across groups.

mod broker;
mod bunq;
mod emulator;
mod parse;
mod redis;
mod retry;
mod token;
mod topology;

use std::time::Duration;

use clap::Parser;

use self::parse::{parse_listen, parse_s};
pub use self::{
    broker::BrokerSettings,
    bunq::BunqSettings,
    emulator::{CredentialUse, EmulatorSettings},
    parse::ListenAddr,
    redis::RedisSettings,
    retry::RetrySettings,
    token::{Cleartext, TokenSettings},
    topology::{DelayTiers, TopologySettings},
};
use crate::{broker::QueueType, telemetry::LogFormat};

/// Text shown after `--help`: the variables read outside the settings below.
const AFTER_HELP: &str = "Logging: RUST_LOG sets the log filter (default info; e.g. RUST_LOG=debug or RUST_LOG=bunq_session_worker=debug); LOG_FORMAT=json writes one JSON object per line; text is coloured only on a terminal and never when NO_COLOR is set.";

/// What the binary does.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Command {
    /// Run the worker (the default): consume provision-ready events, open sessions, publish
    /// session events.
    Run,
    /// Try the whole job on this machine with only RabbitMQ (AMQP_URL): an embedded bunq
    /// emulator, the worker on its own exchanges and queues, one sample event of each kind;
    /// exits 0 when every outcome is the expected one.
    Demo,
    /// Publish one sample event of each kind to a running worker's input exchange and print
    /// what comes back (the worker must use the bunq emulator); exits 0 when every outcome is
    /// the expected one.
    Samples,
    /// Serve the bunq emulator: installation, device-server and session-server as bunq answers
    /// them, for trying the worker without bunq credentials. Not for production.
    Emulator(EmulatorSettings),
}

/// The command line: a subcommand (default `run`) and the worker's settings.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "bunq-session-worker",
    version,
    args_override_self = true,
    long_about = None,
    after_help = AFTER_HELP,
    about = "Opens bunq sessions for provisioned users: consumes provision-ready events from RabbitMQ and publishes session events."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The worker's settings.
    #[command(flatten)]
    pub settings: Settings,
}

impl Cli {
    /// Reads the command line and environment; validates the settings.
    ///
    /// # Errors
    /// As [`Settings::load`]; a value that does not parse is reported as
    /// [`LoadError::Invalid`] naming the environment variable (see [`explain`]).
    pub fn load() -> Result<(Command, Settings), LoadError> {
        let cli = Cli::try_parse().map_err(explain::<Cli>)?;
        cli.settings.validate()?;
        Ok((cli.command.unwrap_or(Command::Run), cli.settings))
    }
}

/// Rewrites clap's error for a value that does not parse so that it names the environment
/// variable (and its flag) and says what is allowed, e.g. `PREFETCH (--prefetch): "0" is not
/// allowed: expected a whole number from 1 to 65535`. The value is quoted only when it is not a
/// hidden (secret) setting. Other errors (help, unknown flags) are returned as they are.
pub fn explain<P: clap::CommandFactory>(e: clap::Error) -> LoadError {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return LoadError::Args(e);
    }
    let text = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let Some(arg_text) = text(ContextKind::InvalidArg) else {
        return LoadError::Args(e);
    };
    let flag = arg_text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let command = P::command();
    let arg = command
        .get_arguments()
        .chain(command.get_subcommands().flat_map(|c| c.get_arguments()))
        .find(|a| a.get_long().is_some_and(|l| format!("--{l}") == flag));
    let env = arg
        .and_then(|a| a.get_env())
        .map(|v| v.to_string_lossy().into_owned());
    let hidden = arg.is_some_and(|a| a.is_hide_env_values_set());
    let value = text(ContextKind::InvalidValue).filter(|_| !hidden);
    let allowed = match e.get(ContextKind::ValidValue) {
        Some(ContextValue::Strings(v)) => format!("expected one of {}", v.join(", ")),
        _ => std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_else(|| "not a valid value".into()),
    };
    let name = match env {
        Some(env) => format!("{env} ({flag})"),
        None => flag,
    };
    let value = value.map_or(String::new(), |v| format!(" {v:?} is not allowed:"));
    LoadError::Invalid(ConfigError(format!("{name}:{value} {allowed}")))
}

/// The worker's settings, read from environment variables or flags (a flag wins over its env var).
///
/// Grouped by what each group builds: [`BrokerSettings`] the connection and consumer,
/// [`TopologySettings`] the [`Topology`](crate::broker::Topology), [`BunqSettings`] the bunq client and pacing,
/// [`RetrySettings`] the bunq [`RetryPolicy`](crate::retry::RetryPolicy), [`RedisSettings`] the
/// fleet's shared state. `Debug` output never shows a secret: the AMQP URL's password is masked
/// and the bunq context values and the Redis URL are [`SecretString`](secrecy::SecretString)s.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "bunq-session-worker",
    version,
    args_override_self = true,
    long_about = None,
    about = "Opens bunq sessions for provisioned users: consumes provision-ready events from RabbitMQ and publishes session events."
)]
pub struct Settings {
    /// The broker connection and the consumer.
    #[command(flatten)]
    pub broker: BrokerSettings,
    /// Exchange and queue names.
    #[command(flatten)]
    pub topology: TopologySettings,
    /// bunq's API, the API context and pacing.
    #[command(flatten)]
    pub bunq: BunqSettings,
    /// Retries of bunq calls.
    #[command(flatten)]
    pub retry: RetrySettings,

    /// Largest accepted message body, in bytes; larger ones are dead-lettered as `too_large`.
    #[arg(long, env = "MAX_MESSAGE_BYTES", default_value_t = 65536)]
    pub max_message_bytes: usize,

    /// Where `/metrics` (Prometheus), `/healthz` and `/readyz` are served: `HOST:PORT`, port 0
    /// for a free one (logged), or `off`.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9464", value_parser = parse_listen)]
    pub metrics_addr: ListenAddr,

    /// Redis for the fleet's shared state.
    #[command(flatten)]
    pub redis: RedisSettings,

    /// The session token's custody.
    #[command(flatten)]
    pub token: TokenSettings,

    /// Consecutive failures of one reason that may be the worker's own set-up
    /// (`credential_rejected` "Incorrect API key or IP address", `forbidden`,
    /// `unexpected_response`, `response_signature_invalid`), on different credentials, that stop
    /// the worker taking work. bunq refusing its installation or signature stops it at once.
    #[arg(long, env = "BREAKER_THRESHOLD", default_value = "5", value_parser = clap::value_parser!(u32).range(1..))]
    pub breaker_threshold: u32,

    /// Time in-flight deliveries get to finish after SIGINT/SIGTERM, in s.
    #[arg(long = "shutdown-timeout-s", env = "SHUTDOWN_TIMEOUT_S", value_name = "SHUTDOWN_TIMEOUT_S", default_value = "30", value_parser = parse_s)]
    pub shutdown_timeout: Duration,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// A settings error found after parsing, naming the variable at fault.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// Why [`Settings::load`] returned no settings.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// clap could not parse the arguments or environment, or `--help` / `--version` was asked
    /// for: print it ([`clap::Error::print`]); exit 0 when [`clap::Error::use_stderr`] is false,
    /// else 2.
    #[error(transparent)]
    Args(#[from] clap::Error),
    /// The values parse but do not fit together.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

impl Settings {
    /// Reads the settings from the process's arguments and environment.
    ///
    /// # Errors
    /// [`LoadError::Args`] when a value does not parse (clap's message names the flag and
    /// value) or help was asked for; [`LoadError::Invalid`] when values are inconsistent (see
    /// [`Settings::validate`]).
    pub fn load() -> Result<Self, LoadError> {
        let settings = Settings::try_parse().map_err(explain::<Settings>)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what clap cannot check field by field: each group's own checks
    /// ([`BrokerSettings::validate`], [`BunqSettings::validate`],
    /// [`TopologySettings::validate`], [`RetrySettings::validate`],
    /// [`RedisSettings::validate`], [`TokenSettings::validate`]), then the settings outside the groups.
    ///
    /// # Errors
    /// The first [`ConfigError`] found, naming the variable; here: `SHUTDOWN_TIMEOUT_S` is over
    /// one day or `MAX_MESSAGE_BYTES` is 0.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.broker.validate()?;
        self.bunq.validate()?;
        self.topology.validate()?;
        if self.shutdown_timeout > Duration::from_secs(86_400) {
            return Err(ConfigError(
                "SHUTDOWN_TIMEOUT_S must be at most 86400 (one day)".into(),
            ));
        }
        if self.max_message_bytes == 0 {
            return Err(ConfigError("MAX_MESSAGE_BYTES must be at least 1".into()));
        }
        self.retry.validate()?;
        self.redis.validate(self.bunq.http_timeout)?;
        self.token.validate(&self.bunq.api_url)
    }

    /// The prefetch actually used, and a warning when it had to be lowered.
    ///
    /// With pacing, deliveries queue behind each other at one session-server call per
    /// `interval`; the last of `prefetch` deliveries waits about `prefetch × interval`. To finish
    /// well within the broker's consumer timeout, prefetch is capped at
    /// `consumer_timeout / 2 / interval` (at least 1).
    pub fn effective_prefetch(&self) -> (u16, Option<String>) {
        let wanted = self.broker.prefetch.get();
        let Some(limit) = self.bunq.session_rate_limit else {
            return (wanted, None);
        };
        if self.broker.consumer_timeout.is_zero() {
            return (wanted, None);
        }
        let interval = limit.interval().as_secs_f64().max(0.001);
        let cap = ((self.broker.consumer_timeout.as_secs_f64() / 2.0) / interval).floor();
        let cap = cap.clamp(1.0, f64::from(u16::MAX)) as u16;
        if wanted > cap {
            (
                cap,
                Some(format!(
                    "PREFETCH={wanted} with BUNQ_SESSION_RATE_LIMIT (one call every {:.1} s) could hold deliveries past half the consumer timeout ({} s, CONSUMER_TIMEOUT_S); using prefetch {cap}",
                    interval,
                    self.broker.consumer_timeout.as_secs()
                )),
            )
        } else {
            (wanted, None)
        }
    }

    /// Start-up warnings about settings that work but risk the broker's consumer timeout, or
    /// publish session tokens in clear.
    pub fn warnings(&self) -> Vec<String> {
        let mut w: Vec<String> = self.token.warning().into_iter().collect();
        if let (_, Some(m)) = self.effective_prefetch() {
            w.push(m);
        }
        if self.topology.queue_type == QueueType::Classic
            && !self.topology.delayed_retry_delays.0.is_empty()
        {
            w.push("QUEUE_TYPE=classic: the delay queues dead-letter at most once, so a parked retry that expires while the input queue is unavailable is lost; quorum queues dead-letter at least once".into());
        }
        if !self.broker.consumer_timeout.is_zero()
            && self.retry.max_elapsed >= self.broker.consumer_timeout / 2
        {
            w.push(format!(
                "RETRY_MAX_ELAPSED_S ({} s) is not well within the broker's consumer timeout ({} s, CONSUMER_TIMEOUT_S): a delivery retried that long may be redelivered",
                self.retry.max_elapsed.as_secs(),
                self.broker.consumer_timeout.as_secs()
            ));
        }
        w
    }
}

#[cfg(test)]
mod tests;
