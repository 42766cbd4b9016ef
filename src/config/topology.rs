//! Exchange and queue names, the delayed-retry tiers and the delivery limit; builds the
//! [`Topology`].

use std::time::Duration;

use clap::Args;

use super::{ConfigError, parse::parse_s};
use crate::broker::{QueueType, Topology};

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

    /// Checks what clap cannot check field by field.
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable when an exchange, queue or routing-key name is
    /// longer than 255 bytes, `INPUT_QUEUE` is too long for the names of its delay queues, or
    /// an exchange or queue name is empty.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        // AMQP names are short strings: at most 255 bytes (AMQP 0-9-1 §4.2.5.3).
        for (name, value) in [
            ("INPUT_EXCHANGE", &self.input_exchange),
            ("INPUT_ROUTING_KEY", &self.input_routing_key),
            ("INPUT_QUEUE", &self.input_queue),
            ("OUTPUT_EXCHANGE", &self.output_exchange),
            ("DEAD_LETTER_EXCHANGE", &self.dead_letter_exchange),
            ("DEAD_LETTER_QUEUE", &self.dead_letter_queue),
        ] {
            if value.len() > 255 {
                return err(format!(
                    "{name} is longer than 255 bytes, AMQP's limit for names"
                ));
            }
        }
        if let Some(longest) = self.delayed_retry_delays.0.iter().max() {
            let name = format!("{}.retry-{}s", self.input_queue, longest.as_secs());
            if name.len() > 255 {
                return err(format!(
                    "INPUT_QUEUE is too long for its delay queues: {} bytes with the suffix .retry-{}s (DELAYED_RETRY_DELAYS_S), AMQP allows 255",
                    name.len(),
                    longest.as_secs()
                ));
            }
        }
        // An empty binding key is valid AMQP, so the routing key is not checked here.
        for (name, value) in [
            ("INPUT_EXCHANGE", &self.input_exchange),
            ("INPUT_QUEUE", &self.input_queue),
            ("OUTPUT_EXCHANGE", &self.output_exchange),
            ("DEAD_LETTER_EXCHANGE", &self.dead_letter_exchange),
            ("DEAD_LETTER_QUEUE", &self.dead_letter_queue),
        ] {
            if value.trim().is_empty() {
                return err(format!("{name} must not be empty"));
            }
        }
        Ok(())
    }
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
