//! Configuration: the only module that reads the environment.
//!
//! Every setting is an environment variable with a matching `--flag` (clap's `env` support), so
//! the same binary runs under an orchestrator (env) or by hand (flags). Values are parsed into typed
//! fields at start-up; an invalid value stops the process with a message that names the variable.

use std::{num::NonZeroU16, path::PathBuf, time::Duration};

use clap::{Args, Parser};
use secrecy::{ExposeSecret, SecretString};

use crate::{
    broker::{QueueType, Topology, link::redact_url_password},
    rate_limit::RateLimit,
    retry::RetryPolicy,
    telemetry::LogFormat,
};

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
    Emulator(crate::emulator::EmulatorSettings),
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
/// [`TopologySettings`] the [`Topology`], [`BunqSettings`] the bunq client and pacing,
/// [`RetrySettings`] the bunq [`RetryPolicy`]. `Debug` output never shows a secret: the AMQP URL's
/// password is masked and the bunq context values are [`SecretString`]s.
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

    /// Redis for the fleet's shared state (claims on credentials, one session-server budget per
    /// scope), `redis://` or `rediss://`. Unset: each process keeps its own, right for one
    /// replica.
    #[arg(long, env = "REDIS_URL", hide_env_values = true, value_parser = parse_secret)]
    pub redis_url: Option<SecretString>,

    /// Prefix of every Redis key the worker uses.
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "bunq-session-worker:")]
    pub redis_key_prefix: String,

    /// The session-server budget this replica shares (with `REDIS_URL`): replicas behind one
    /// egress IP share bunq's per-IP limit, so give replicas behind another IP another scope.
    #[arg(long, env = "BUNQ_RATE_LIMIT_SCOPE", default_value = "default")]
    pub bunq_rate_limit_scope: String,

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

/// The broker connection and the consumer.
#[derive(Clone, Args)]
pub struct BrokerSettings {
    /// AMQP 0-9-1 broker URL; `amqps://` uses TLS. `?heartbeat=N` and other lapin URI query
    /// parameters are honoured.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        hide_default_value = true,
        value_parser = parse_secret
    )]
    pub amqp_url: SecretString,

    /// AMQP heartbeat timeout in s (0 disables; a `heartbeat=` in `AMQP_URL` wins). A dead
    /// connection is noticed within about twice this.
    #[arg(
        long = "amqp-heartbeat-s",
        env = "AMQP_HEARTBEAT_S",
        value_name = "AMQP_HEARTBEAT_S",
        default_value_t = 30
    )]
    pub heartbeat_s: u16,

    /// Longest wait for a publisher confirm, in ms; then the publish is retried. While the
    /// broker blocks publishing (memory or disk alarm) publishes wait this long each.
    #[arg(long = "publish-confirm-timeout-ms", env = "PUBLISH_CONFIRM_TIMEOUT_MS", value_name = "PUBLISH_CONFIRM_TIMEOUT_MS", default_value = "15000", value_parser = parse_ms)]
    pub publish_confirm_timeout: Duration,

    /// AMQP prefetch (`basic.qos` prefetch-count): deliveries in flight at once, 1..=65535.
    #[arg(long, env = "PREFETCH", default_value = "16", value_parser = parse_prefetch)]
    pub prefetch: NonZeroU16,

    /// The broker's consumer timeout in s (RabbitMQ `consumer_timeout`, 30 min by default): a
    /// delivery unacked for longer closes the channel. Prefetch is bounded so paced work finishes
    /// well within it. 0: the broker has none.
    #[arg(long = "consumer-timeout-s", env = "CONSUMER_TIMEOUT_S", value_name = "CONSUMER_TIMEOUT_S", default_value = "1800", value_parser = parse_s)]
    pub consumer_timeout: Duration,
}

impl std::fmt::Debug for BrokerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerSettings")
            .field("amqp_url", &self.amqp_url_redacted())
            .field("heartbeat_s", &self.heartbeat_s)
            .field("publish_confirm_timeout", &self.publish_confirm_timeout)
            .field("prefetch", &self.prefetch)
            .field("consumer_timeout", &self.consumer_timeout)
            .finish()
    }
}

impl BrokerSettings {
    /// The AMQP URL with its password replaced by `***`, for logs.
    pub fn amqp_url_redacted(&self) -> String {
        redact_url_password(self.amqp_url.expose_secret())
    }
}

/// Exchange and queue names; builds the [`Topology`].
#[derive(Clone, Debug, Args)]
pub struct TopologySettings {
    /// Topic exchange that provision-ready events are published to.
    #[arg(long, env = "INPUT_EXCHANGE", default_value = "bunq.provisioning")]
    pub input_exchange: String,

    /// Routing key that binds the input queue to the input exchange.
    #[arg(long, env = "INPUT_ROUTING_KEY", default_value = "provision.ready")]
    pub input_routing_key: String,

    /// Queue the worker consumes from (competing consumers share it).
    #[arg(
        long,
        env = "INPUT_QUEUE",
        default_value = "bunq-session-worker.provision-ready"
    )]
    pub input_queue: String,

    /// Type of the input and dead-letter queues.
    #[arg(long, env = "QUEUE_TYPE", value_enum, default_value = "quorum")]
    pub queue_type: QueueType,

    /// Topic exchange for `session.created` and `session.failed`.
    #[arg(long, env = "OUTPUT_EXCHANGE", default_value = "bunq.sessions")]
    pub output_exchange: String,

    /// Dead-letter exchange (topic) of the input queue.
    #[arg(
        long,
        env = "DEAD_LETTER_EXCHANGE",
        default_value = "bunq.provisioning.dead-letter"
    )]
    pub dead_letter_exchange: String,

    /// Queue bound to the dead-letter exchange with `#`.
    #[arg(
        long,
        env = "DEAD_LETTER_QUEUE",
        default_value = "bunq-session-worker.provision-ready.dead-letter"
    )]
    pub dead_letter_queue: String,

    /// Durable delayed retry: comma-separated delays in s, one per tier (e.g. `60,300,900`);
    /// when a delivery's in-process retries are spent and its credential still has time, it
    /// waits in the tier's delay queue and comes back. `off` or empty disables.
    #[arg(long = "delayed-retry-delays-s", env = "DELAYED_RETRY_DELAYS_S", value_name = "DELAYED_RETRY_DELAYS_S", default_value = "60,300,900", value_parser = parse_delays)]
    pub delayed_retry_delays: DelayTiers,

    /// Times an input may be handed back (shutdown, lost connections) before it is dead-lettered
    /// as `redelivery_limit`; also declared as the input queue's `x-delivery-limit` (quorum).
    #[arg(long, env = "DELIVERY_LIMIT", default_value = "20", value_parser = clap::value_parser!(u32).range(1..))]
    pub delivery_limit: u32,
}

impl TopologySettings {
    /// The topology these names describe.
    pub fn topology(&self) -> Topology {
        Topology {
            input_exchange: self.input_exchange.clone(),
            input_routing_key: self.input_routing_key.clone(),
            input_queue: self.input_queue.clone(),
            queue_type: self.queue_type,
            output_exchange: self.output_exchange.clone(),
            dead_letter_exchange: self.dead_letter_exchange.clone(),
            dead_letter_queue: self.dead_letter_queue.clone(),
            delay_tiers: self.delayed_retry_delays.0.clone(),
            delivery_limit: self.delivery_limit,
        }
    }
}

/// bunq's API, the API context, the device-server call and pacing.
#[derive(Clone, Debug, Args)]
pub struct BunqSettings {
    /// Base URL of bunq's public API, including `/v1`.
    #[arg(
        long = "bunq-api-url",
        env = "BUNQ_API_URL",
        default_value = "https://public-api.sandbox.bunq.com/v1"
    )]
    pub api_url: reqwest::Url,

    /// Where the API context (client key pair, installation token, server public key) is read
    /// from, or saved to (mode 0600) after a fresh `POST /installation`.
    #[arg(
        long = "bunq-context-file",
        env = "BUNQ_CONTEXT_FILE",
        default_value = "bunq-context.json"
    )]
    pub context_file: PathBuf,

    /// PEM PKCS#8 client private key (RSA 2048). With the two settings below it supplies the API
    /// context from the environment instead of the file; all three or none.
    #[arg(
        long = "bunq-client-private-key",
        env = "BUNQ_CLIENT_PRIVATE_KEY",
        hide_env_values = true
    )]
    pub client_private_key: Option<SecretString>,

    /// Installation token that belongs to `BUNQ_CLIENT_PRIVATE_KEY`.
    #[arg(
        long = "bunq-installation-token",
        env = "BUNQ_INSTALLATION_TOKEN",
        hide_env_values = true
    )]
    pub installation_token: Option<SecretString>,

    /// PEM server public key returned by that installation.
    #[arg(long = "bunq-server-public-key", env = "BUNQ_SERVER_PUBLIC_KEY")]
    pub server_public_key: Option<String>,

    /// Call `POST /device-server` with the credential's token before `POST /session-server`.
    #[arg(long = "bunq-register-device", env = "BUNQ_REGISTER_DEVICE", default_value_t = true, action = clap::ArgAction::Set)]
    pub register_device: bool,

    /// Comma-separated IPv4 addresses for `permitted_ips` in device-server, or `*`.
    #[arg(
        long = "bunq-permitted-ips",
        env = "BUNQ_PERMITTED_IPS",
        default_value = "*",
        value_delimiter = ','
    )]
    pub permitted_ips: Vec<String>,

    /// `description` sent to device-server.
    #[arg(
        long = "bunq-device-description",
        env = "BUNQ_DEVICE_DESCRIPTION",
        default_value = "bunq-session-worker"
    )]
    pub device_description: String,

    /// Verify `X-Bunq-Server-Signature` on every 2xx response after installation.
    #[arg(long = "bunq-verify-response-signature", env = "BUNQ_VERIFY_RESPONSE_SIGNATURE", default_value_t = true, action = clap::ArgAction::Set)]
    pub verify_response_signature: bool,

    /// `User-Agent` header sent to bunq (required by bunq).
    #[arg(long = "bunq-user-agent", env = "BUNQ_USER_AGENT", default_value = concat!("bunq-session-worker/", env!("CARGO_PKG_VERSION")))]
    pub user_agent: String,

    /// Pace session-server: at most N calls per W seconds for this process, e.g. `1/30s` (bunq's
    /// documented session-server limit). Unset: no pacing (a 429 still pauses all calls).
    #[arg(
        long = "bunq-session-rate-limit",
        env = "BUNQ_SESSION_RATE_LIMIT",
        value_name = "N/Ws"
    )]
    pub session_rate_limit: Option<RateLimit>,

    /// Timeout of one HTTP request to bunq (connect + response), in ms.
    #[arg(long = "http-timeout-ms", env = "HTTP_TIMEOUT_MS", value_name = "HTTP_TIMEOUT_MS", default_value = "10000", value_parser = parse_ms)]
    pub http_timeout: Duration,
}

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
}

/// A listen address, or none (`off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenAddr(pub Option<std::net::SocketAddr>);

fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("off") {
        return Ok(ListenAddr(None));
    }
    s.parse().map(|a| ListenAddr(Some(a))).map_err(|_| {
        "expected HOST:PORT such as 0.0.0.0:9464 (port 0: a free one), or off".to_owned()
    })
}

fn parse_secret(s: &str) -> Result<SecretString, String> {
    Ok(SecretString::from(s.to_owned()))
}

fn parse_ms(s: &str) -> Result<Duration, String> {
    s.trim()
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| "expected a whole number of milliseconds, such as 500".to_owned())
}

fn parse_prefetch(s: &str) -> Result<NonZeroU16, String> {
    s.trim()
        .parse::<u16>()
        .ok()
        .and_then(NonZeroU16::new)
        .ok_or_else(|| "expected a whole number from 1 to 65535".to_owned())
}

/// The delayed-retry tiers, in order; empty when disabled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DelayTiers(pub Vec<Duration>);

fn parse_delays(s: &str) -> Result<DelayTiers, String> {
    let s = s.trim();
    if s.is_empty() || s.eq_ignore_ascii_case("off") {
        return Ok(DelayTiers::default());
    }
    s.split(',')
        .map(|item| {
            let d = parse_s(item)?;
            if d.is_zero() {
                return Err("each delay must be at least 1 s".to_string());
            }
            // x-message-ttl is an unsigned 32-bit number of ms.
            if d.as_millis() > u128::from(u32::MAX) {
                return Err(format!(
                    "each delay must be at most {} s (RabbitMQ's longest message TTL)",
                    u32::MAX / 1000
                ));
            }
            Ok(d)
        })
        .collect::<Result<Vec<_>, _>>()
        .map(DelayTiers)
}

fn parse_s(s: &str) -> Result<Duration, String> {
    s.trim()
        .parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| "expected a whole number of seconds, such as 30".to_owned())
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

    /// Checks what clap cannot check field by field.
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable when: `AMQP_URL` is not `amqp://` or `amqps://`;
    /// `BUNQ_API_URL` is not http(s); only some of `BUNQ_CLIENT_PRIVATE_KEY`,
    /// `BUNQ_INSTALLATION_TOKEN`, `BUNQ_SERVER_PUBLIC_KEY` are set; `BUNQ_PERMITTED_IPS` holds
    /// something other than IPv4 addresses or `*`; `MAX_MESSAGE_BYTES`, `HTTP_TIMEOUT_MS` or
    /// `RETRY_INITIAL_DELAY_MS` is 0; `RETRY_MAX_DELAY_MS` < `RETRY_INITIAL_DELAY_MS`; a name is
    /// empty.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        if !(self.broker.amqp_url.expose_secret().starts_with("amqp://")
            || self.broker.amqp_url.expose_secret().starts_with("amqps://"))
        {
            return err("AMQP_URL must start with amqp:// or amqps://".into());
        }
        if let Err(e) = self
            .broker
            .amqp_url
            .expose_secret()
            .parse::<lapin::uri::AMQPUri>()
        {
            return err(format!("AMQP_URL does not parse: {e}"));
        }
        if !matches!(self.bunq.api_url.scheme(), "http" | "https") {
            return err("BUNQ_API_URL must be an http:// or https:// URL".into());
        }
        let given = [
            self.bunq.client_private_key.is_some(),
            self.bunq.installation_token.is_some(),
            self.bunq.server_public_key.is_some(),
        ];
        if given.iter().any(|g| *g) && !given.iter().all(|g| *g) {
            return err("BUNQ_CLIENT_PRIVATE_KEY, BUNQ_INSTALLATION_TOKEN and BUNQ_SERVER_PUBLIC_KEY must be set together or not at all".into());
        }
        for ip in &self.bunq.permitted_ips {
            let ip = ip.trim();
            if ip != "*" && ip.parse::<std::net::Ipv4Addr>().is_err() {
                return err(format!(
                    "BUNQ_PERMITTED_IPS: {ip:?} is neither an IPv4 address nor *"
                ));
            }
        }
        // AMQP names are short strings: at most 255 bytes (AMQP 0-9-1 §4.2.5.3).
        for (name, value) in [
            ("INPUT_EXCHANGE", &self.topology.input_exchange),
            ("INPUT_ROUTING_KEY", &self.topology.input_routing_key),
            ("INPUT_QUEUE", &self.topology.input_queue),
            ("OUTPUT_EXCHANGE", &self.topology.output_exchange),
            ("DEAD_LETTER_EXCHANGE", &self.topology.dead_letter_exchange),
            ("DEAD_LETTER_QUEUE", &self.topology.dead_letter_queue),
        ] {
            if value.len() > 255 {
                return err(format!(
                    "{name} is longer than 255 bytes, AMQP's limit for names"
                ));
            }
        }
        if let Some(longest) = self.topology.delayed_retry_delays.0.iter().max() {
            let name = format!("{}.retry-{}s", self.topology.input_queue, longest.as_secs());
            if name.len() > 255 {
                return err(format!(
                    "INPUT_QUEUE is too long for its delay queues: {} bytes with the suffix .retry-{}s (DELAYED_RETRY_DELAYS_S), AMQP allows 255",
                    name.len(),
                    longest.as_secs()
                ));
            }
        }
        if self.shutdown_timeout > Duration::from_secs(86_400) {
            return err("SHUTDOWN_TIMEOUT_S must be at most 86400 (one day)".into());
        }
        if reqwest::header::HeaderValue::from_str(&self.bunq.user_agent).is_err() {
            return err("BUNQ_USER_AGENT holds characters an HTTP header cannot carry".into());
        }
        if self.max_message_bytes == 0 {
            return err("MAX_MESSAGE_BYTES must be at least 1".into());
        }
        if self.bunq.http_timeout.is_zero() {
            return err("HTTP_TIMEOUT_MS must be at least 1".into());
        }
        if self.broker.publish_confirm_timeout.is_zero() {
            return err("PUBLISH_CONFIRM_TIMEOUT_MS must be at least 1".into());
        }
        if self.retry.initial_delay.is_zero() {
            return err("RETRY_INITIAL_DELAY_MS must be at least 1".into());
        }
        if self.retry.max_delay < self.retry.initial_delay {
            return err("RETRY_MAX_DELAY_MS must be at least RETRY_INITIAL_DELAY_MS".into());
        }
        for (name, value) in [
            ("INPUT_EXCHANGE", &self.topology.input_exchange),
            ("INPUT_QUEUE", &self.topology.input_queue),
            ("OUTPUT_EXCHANGE", &self.topology.output_exchange),
            ("DEAD_LETTER_EXCHANGE", &self.topology.dead_letter_exchange),
            ("DEAD_LETTER_QUEUE", &self.topology.dead_letter_queue),
            ("BUNQ_USER_AGENT", &self.bunq.user_agent),
            ("BUNQ_RATE_LIMIT_SCOPE", &self.bunq_rate_limit_scope),
        ] {
            if value.trim().is_empty() {
                return err(format!("{name} must not be empty"));
            }
        }
        Ok(())
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

    /// Start-up warnings about settings that work but risk the broker's consumer timeout.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
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
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, String> {
        let mut argv = vec!["bunq-session-worker"];
        argv.extend_from_slice(args);
        let s = Settings::try_parse_from(argv).map_err(|e| e.to_string())?;
        s.validate().map_err(|e| e.to_string())?;
        Ok(s)
    }

    #[test]
    fn defaults_match_the_documented_interface() {
        let s = parse(&[]).unwrap();
        assert_eq!(s.broker.prefetch.get(), 16);
        assert_eq!(s.max_message_bytes, 65536);
        assert_eq!(s.bunq.http_timeout, Duration::from_millis(10_000));
        assert_eq!(s.retry.max_attempts, 8);
        assert_eq!(s.retry.max_elapsed, Duration::from_secs(300));
        assert_eq!(s.topology.queue_type, QueueType::Quorum);
        assert_eq!(
            s.topology.input_queue,
            "bunq-session-worker.provision-ready"
        );
        assert!(s.bunq.register_device);
        assert_eq!(s.bunq.permitted_ips, vec!["*".to_string()]);
    }

    #[test]
    fn invalid_values_name_the_setting() {
        let e = parse(&["--prefetch", "0"]).unwrap_err();
        assert!(e.contains("--prefetch"), "{e}");
        let e = parse(&["--http-timeout-ms", "soon"]).unwrap_err();
        assert!(e.contains("--http-timeout-ms"), "{e}");
        let e = parse(&["--queue-type", "stream"]).unwrap_err();
        assert!(e.contains("--queue-type"), "{e}");
        let e = parse(&["--amqp-url", "http://x"]).unwrap_err();
        assert!(e.contains("AMQP_URL"), "{e}");
        let e = parse(&["--bunq-permitted-ips", "10.0.0.1,::1"]).unwrap_err();
        assert!(e.contains("BUNQ_PERMITTED_IPS"), "{e}");
        let e = parse(&["--bunq-installation-token", "x"]).unwrap_err();
        assert!(e.contains("BUNQ_CLIENT_PRIVATE_KEY"), "{e}");
        let long = "q".repeat(250);
        let e = parse(&["--input-queue", &long]).unwrap_err();
        assert!(
            e.contains("INPUT_QUEUE is too long for its delay queues"),
            "{e}"
        );
        let e = parse(&["--input-queue", &"q".repeat(300)]).unwrap_err();
        assert!(e.contains("INPUT_QUEUE is longer than 255 bytes"), "{e}");
        let e = parse(&["--shutdown-timeout-s", "18446744073709551615"]).unwrap_err();
        assert!(e.contains("SHUTDOWN_TIMEOUT_S"), "{e}");
        let e = parse(&["--delayed-retry-delays-s", "10000000000"]).unwrap_err();
        assert!(e.contains("--delayed-retry-delays-s"), "{e}");
        let e = parse(&["--bunq-user-agent", "a\nb"]).unwrap_err();
        assert!(e.contains("BUNQ_USER_AGENT"), "{e}");
        let e = parse(&["--retry-max-delay-ms", "10"]).unwrap_err();
        assert!(e.contains("RETRY_MAX_DELAY_MS"), "{e}");
    }

    #[test]
    fn prefetch_is_bounded_under_pacing() {
        let s = parse(&["--bunq-session-rate-limit", "1/30s", "--prefetch", "100"]).unwrap();
        let (p, warning) = s.effective_prefetch();
        assert_eq!(p, 30, "1800 s / 2 / 30 s");
        assert!(warning.unwrap().contains("using prefetch 30"));
        let s = parse(&["--bunq-session-rate-limit", "1/30s"]).unwrap();
        assert_eq!(s.effective_prefetch(), (16, None));
        let s = parse(&["--prefetch", "100"]).unwrap();
        assert_eq!(s.effective_prefetch(), (100, None));
        let s = parse(&["--retry-max-elapsed-s", "1000"]).unwrap();
        assert!(s.warnings()[0].contains("RETRY_MAX_ELAPSED_S"));
        let e = parse(&["--bunq-session-rate-limit", "30s"]).unwrap_err();
        assert!(
            e.contains("BUNQ_SESSION_RATE_LIMIT") || e.contains("--bunq-session-rate-limit"),
            "{e}"
        );
        let s = parse(&["--delayed-retry-delays-s", "1,2"]).unwrap();
        assert_eq!(
            s.topology.delayed_retry_delays.0,
            vec![Duration::from_secs(1), Duration::from_secs(2)]
        );
        let s = parse(&["--delayed-retry-delays-s", ""]).unwrap();
        assert!(s.topology.delayed_retry_delays.0.is_empty());
        let s = parse(&["--delayed-retry-delays-s", "off"]).unwrap();
        assert!(s.topology.delayed_retry_delays.0.is_empty());
        assert!(parse(&["--delayed-retry-delays-s", "5,0"]).is_err());
    }

    #[test]
    fn debug_hides_secrets() {
        let s = parse(&[
            "--amqp-url",
            "amqp://user:hunter2@broker:5672/%2f",
            "--bunq-client-private-key",
            "PRIVATE-KEY-MATERIAL",
            "--bunq-installation-token",
            "INSTALLATION-TOKEN-VALUE",
            "--bunq-server-public-key",
            "PUB",
        ])
        .unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(!dbg.contains("PRIVATE-KEY-MATERIAL"), "{dbg}");
        assert!(!dbg.contains("INSTALLATION-TOKEN-VALUE"), "{dbg}");
        assert!(dbg.contains("amqp://user:***@broker:5672/%2f"), "{dbg}");
    }

    #[test]
    fn redacts_only_the_password() {
        assert_eq!(redact_url_password("amqps://a:b@h/v"), "amqps://a:***@h/v");
        assert_eq!(redact_url_password("amqp://h:5672/v"), "amqp://h:5672/v");
        assert_eq!(redact_url_password("amqp://a:b:c@h"), "amqp://a:***@h");
    }

    #[test]
    fn unparsable_values_name_the_variable_and_what_is_allowed() {
        let explained = |args: &[&str]| {
            let mut argv = vec!["bunq-session-worker"];
            argv.extend_from_slice(args);
            match Cli::try_parse_from(argv).map_err(explain::<Cli>) {
                Err(LoadError::Invalid(e)) => e.to_string(),
                other => panic!("expected an explained error, got {other:?}"),
            }
        };
        assert_eq!(
            explained(&["--prefetch", "0"]),
            "invalid configuration: PREFETCH (--prefetch): \"0\" is not allowed: expected a whole number from 1 to 65535"
        );
        let e = explained(&["--queue-type", "stream"]);
        assert!(
            e.contains("QUEUE_TYPE (--queue-type)") && e.contains("quorum, classic"),
            "{e}"
        );
        let e = explained(&["--http-timeout-ms", "soon"]);
        assert!(
            e.contains("HTTP_TIMEOUT_MS") && e.contains("milliseconds"),
            "{e}"
        );
        let e = explained(&["emulator", "--listen", "nowhere"]);
        assert!(e.contains("EMULATOR_LISTEN"), "{e}");
    }

    /// `--help` and the README's configuration table name the same variables.
    #[test]
    fn the_readme_lists_every_setting() {
        use clap::CommandFactory;
        let readme = include_str!("../README.md");
        let section = readme
            .split("## Configuration")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("README has a Configuration section");
        let documented: std::collections::BTreeSet<String> = section
            .lines()
            .filter(|l| l.starts_with("| `"))
            .flat_map(|l| {
                l.split('|')
                    .nth(1)
                    .unwrap_or_default()
                    .split(',')
                    .map(|v| v.trim().trim_matches('`').to_owned())
                    .collect::<Vec<_>>()
            })
            .collect();
        let known: std::collections::BTreeSet<String> = Settings::command()
            .get_arguments()
            .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .chain(["RUST_LOG".to_owned(), "NO_COLOR".to_owned()])
            .collect();
        assert_eq!(documented, known);
    }

    #[test]
    fn groups_build_their_objects() {
        let s = parse(&["--retry-max-elapsed-s", "30", "--input-queue", "q"]).unwrap();
        assert_eq!(s.retry.policy().max_elapsed, Some(Duration::from_secs(30)));
        let t = s.topology.topology();
        assert_eq!(t.input_queue, "q");
        assert_eq!(t.delay_queue_name(Duration::from_secs(60)), "q.retry-60s");
    }
}
