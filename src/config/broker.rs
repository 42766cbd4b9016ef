//! The broker connection and the consumer: `AMQP_URL`, heartbeat, confirms, prefetch, the
//! broker's consumer timeout.

use std::{num::NonZeroU16, time::Duration};

use clap::Args;
use secrecy::{ExposeSecret, SecretString};

use super::{
    ConfigError,
    parse::{parse_ms, parse_s, parse_secret},
};
use crate::broker::link::{amqp_urls, redact_url_password};

/// The broker connection and the consumer.
#[derive(Clone, Args)]
pub struct BrokerSettings {
    /// AMQP 0-9-1 broker URL; `amqps://` uses TLS. `?heartbeat=N` and other lapin URI query
    /// parameters are honoured. Several, comma-separated (a cluster's nodes): the worker
    /// connects to the first that answers and, on every reconnect, tries the others in turn,
    /// starting after the one it lost.
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
        amqp_urls(self.amqp_url.expose_secret())
            .map(redact_url_password)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The first of `AMQP_URL`'s brokers, for the tools (`demo`, `samples`) that need one.
    pub fn first_amqp_url(&self) -> String {
        amqp_urls(self.amqp_url.expose_secret())
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    /// Checks what clap cannot check field by field.
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable when `AMQP_URL` is not `amqp://` or `amqps://` or
    /// does not parse as an AMQP URI, or `PUBLISH_CONFIRM_TIMEOUT_MS` is 0.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let urls: Vec<&str> = amqp_urls(self.amqp_url.expose_secret()).collect();
        if urls.is_empty() {
            return Err(ConfigError("AMQP_URL names no broker".into()));
        }
        for (i, url) in urls.iter().enumerate() {
            let which = match urls.len() {
                1 => String::new(),
                _ => format!(" (broker {} of {})", i + 1, urls.len()),
            };
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                return Err(ConfigError(format!(
                    "AMQP_URL must start with amqp:// or amqps://{which}"
                )));
            }
            if let Err(e) = url.parse::<lapin::uri::AMQPUri>() {
                return Err(ConfigError(format!(
                    "AMQP_URL does not parse{which}: {}",
                    redact_url_password(&e)
                )));
            }
        }
        if self.publish_confirm_timeout.is_zero() {
            return Err(ConfigError(
                "PUBLISH_CONFIRM_TIMEOUT_MS must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

fn parse_prefetch(s: &str) -> Result<NonZeroU16, String> {
    s.trim()
        .parse::<u16>()
        .ok()
        .and_then(NonZeroU16::new)
        .ok_or_else(|| "expected a whole number from 1 to 65535".to_owned())
}
