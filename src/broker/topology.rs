//! Declares the worker's exchanges, queues and bindings, idempotently, at start-up.
//!
//! AMQP 0-9-1 `exchange.declare` / `queue.declare` succeed when the object exists with the same
//! arguments and fail with 406 PRECONDITION_FAILED otherwise (AMQP 0-9-1 spec §1.7.2.1,
//! §1.8.2.1); that failure is turned into a message naming the object and the argument.

use lapin::{
    Channel, Connection, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::{AMQPValue, FieldTable},
};

use super::{headers::long, link::CONNECT_TIMEOUT};

/// The type of the input, dead-letter and delay queues (RabbitMQ `x-queue-type`).
///
/// Source: <https://www.rabbitmq.com/docs/quorum-queues>.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueType {
    /// Replicated, durable queue; the default for new deployments.
    Quorum,
    /// RabbitMQ's classic queue, for brokers or policies that need it.
    Classic,
}

impl QueueType {
    /// The value of the `x-queue-type` argument for this type.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

/// Names and types of everything the worker declares.
#[derive(Clone, Debug)]
pub struct Topology {
    /// Topic exchange producers publish provision-ready events to.
    pub input_exchange: String,
    /// Binding key of the input queue.
    pub input_routing_key: String,
    /// The queue consumed.
    pub input_queue: String,
    /// `x-queue-type` of both queues.
    pub queue_type: QueueType,
    /// Topic exchange for session events.
    pub output_exchange: String,
    /// Topic exchange for dead letters (also the input queue's `x-dead-letter-exchange`).
    pub dead_letter_exchange: String,
    /// Queue bound to the dead-letter exchange with `#`.
    pub dead_letter_queue: String,
    /// Delays of the delayed-retry tiers; one delay queue each.
    pub delay_tiers: Vec<std::time::Duration>,
    /// `DELIVERY_LIMIT`: the input queue's `x-delivery-limit` (quorum queues only).
    pub delivery_limit: u32,
}

impl Topology {
    /// The delay queue of a tier: `<input queue>.retry-<seconds>s`.
    pub fn delay_queue_name(&self, delay: std::time::Duration) -> String {
        format!("{}.retry-{}s", self.input_queue, delay.as_secs())
    }

    /// The window queue, where a copy waits for the end of a window bunq asked for (a 429)
    /// with an expiration of its own: `<input queue>.wait`.
    pub fn window_queue_name(&self) -> String {
        format!("{}.wait", self.input_queue)
    }

    /// Where a delayed-retry copy `d` waits: the window queue or its tier's delay queue.
    pub fn parking_queue(&self, d: &crate::outcome::Delayed) -> String {
        if d.window {
            self.window_queue_name()
        } else {
            self.delay_queue_name(d.delay)
        }
    }
}

/// A declaration the broker refused.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The object exists with other arguments (406 PRECONDITION_FAILED).
    #[error(
        "{object} already exists on the broker with different arguments ({argument} differs; broker said: {broker_text}). Delete it or configure the worker to match (QUEUE_TYPE, DEAD_LETTER_EXCHANGE, the *_EXCHANGE / *_QUEUE names)"
    )]
    Inequivalent {
        /// E.g. `queue 'bunq-session-worker.provision-ready'`.
        object: String,
        /// The argument named by the broker, e.g. `x-queue-type`.
        argument: String,
        /// The broker's reply text.
        broker_text: String,
    },
    /// The broker did not answer in time.
    #[error("declaring the topology took longer than {0} s")]
    Timeout(u64),
    /// Any other failure.
    #[error("declaring {object} failed")]
    Other {
        /// What was being declared.
        object: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
}

fn classify(object: String, e: lapin::Error) -> TopologyError {
    if let lapin::ErrorKind::ProtocolError(amqp) = e.kind()
        && *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
        && amqp.get_message().as_str().contains("inequivalent arg")
    {
        let text = amqp.get_message().to_string();
        let argument = text
            .split("inequivalent arg '")
            .nth(1)
            .and_then(|rest| rest.split('\'').next())
            .unwrap_or("an argument")
            .to_owned();
        return TopologyError::Inequivalent {
            object,
            argument: format!("'{argument}'"),
            broker_text: text,
        };
    }
    TopologyError::Other { object, source: e }
}

/// Declares the topology on channels of its own on `connection`.
///
/// The input queue of a quorum type gets `x-delivery-limit` = `DELIVERY_LIMIT`. A queue's
/// arguments cannot change once it exists, so an input queue declared before the worker set the
/// argument is declared again without it and a WARN says how to move to it; the worker reads
/// `x-delivery-count` and keeps its own count either way.
///
/// Every call is bounded: the whole declaration takes at most [`CONNECT_TIMEOUT`], so a broker
/// that dies or stalls under it fails it instead of hanging it.
///
/// # Errors
/// [`TopologyError::Inequivalent`] when an object exists with other arguments;
/// [`TopologyError::Timeout`] when it takes longer than [`CONNECT_TIMEOUT`];
/// [`TopologyError::Other`] otherwise.
pub async fn declare(connection: &Connection, t: &Topology) -> Result<(), TopologyError> {
    tokio::time::timeout(CONNECT_TIMEOUT, declare_unbounded(connection, t))
        .await
        .unwrap_or(Err(TopologyError::Timeout(CONNECT_TIMEOUT.as_secs())))
}

async fn declare_unbounded(connection: &Connection, t: &Topology) -> Result<(), TopologyError> {
    let open = || async {
        connection
            .create_channel()
            .await
            .map_err(|source| TopologyError::Other {
                object: "a channel".into(),
                source,
            })
    };
    let channel = open().await?;
    let with_limit = declare_on(&channel, t, true).await;
    let channel = match with_limit {
        Err(TopologyError::Inequivalent { argument, .. }) if argument == "'x-delivery-limit'" => {
            tracing::warn!(
                queue = %t.input_queue,
                "the input queue was declared without x-delivery-limit (by an earlier version); it keeps working, with the broker's own delivery limit (20 on RabbitMQ 4). To use DELIVERY_LIMIT there, set a policy: rabbitmqctl set_policy <name> '^<queue>$' '{{\"delivery-limit\": <N>}}' --apply-to queues"
            );
            // The refused declaration closed the channel.
            let channel = open().await?;
            declare_on(&channel, t, false).await?;
            channel
        }
        Err(e) => return Err(e),
        Ok(()) => channel,
    };
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

async fn declare_on(
    channel: &Channel,
    t: &Topology,
    delivery_limit: bool,
) -> Result<(), TopologyError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for name in [
        &t.input_exchange,
        &t.output_exchange,
        &t.dead_letter_exchange,
    ] {
        channel
            .exchange_declare(
                name.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(|e| classify(format!("exchange '{name}'"), e))?;
    }

    let mut dl_args = FieldTable::default();
    dl_args.insert("x-queue-type".into(), long(t.queue_type.as_str()));
    let queue_opts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(t.dead_letter_queue.as_str().into(), queue_opts, dl_args)
        .await
        .map_err(|e| classify(format!("queue '{}'", t.dead_letter_queue), e))?;
    channel
        .queue_bind(
            t.dead_letter_queue.as_str().into(),
            t.dead_letter_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| classify(format!("binding of queue '{}'", t.dead_letter_queue), e))?;

    let mut in_args = FieldTable::default();
    in_args.insert("x-queue-type".into(), long(t.queue_type.as_str()));
    in_args.insert(
        "x-dead-letter-exchange".into(),
        long(&t.dead_letter_exchange),
    );
    if delivery_limit && t.queue_type == QueueType::Quorum {
        in_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(t.delivery_limit.into()),
        );
    }
    channel
        .queue_declare(t.input_queue.as_str().into(), queue_opts, in_args)
        .await
        .map_err(|e| classify(format!("queue '{}'", t.input_queue), e))?;
    channel
        .queue_bind(
            t.input_queue.as_str().into(),
            t.input_exchange.as_str().into(),
            t.input_routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| classify(format!("binding of queue '{}'", t.input_queue), e))?;

    // Plugin-free delayed retry: a message waits out the queue's TTL, then RabbitMQ
    // dead-letters it back to the input queue (<https://www.rabbitmq.com/docs/ttl>,
    // <https://www.rabbitmq.com/docs/dlx>).
    // The window queue has no TTL of its own: each copy carries its `expiration`, and RabbitMQ
    // expires copies from the head, so one waits at most as long as the copy before it.
    let tiers = t
        .delay_tiers
        .iter()
        .map(|d| (t.delay_queue_name(*d), Some(*d)));
    for (name, ttl) in tiers.chain([(t.window_queue_name(), None)]) {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long(t.queue_type.as_str()));
        if let Some(delay) = ttl {
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
            );
        }
        // Back through the default exchange straight to the input queue: not through the input
        // exchange, whose other bindings (another deployment, an audit queue) must not get
        // the worker's retries.
        args.insert("x-dead-letter-exchange".into(), long(""));
        args.insert("x-dead-letter-routing-key".into(), long(&t.input_queue));
        if t.queue_type == QueueType::Quorum {
            // RabbitMQ's own dead-lettering is at-most-once by default: a copy expiring while
            // the input queue is unavailable would be dropped. At-least-once needs
            // reject-publish overflow (<https://www.rabbitmq.com/docs/quorum-queues#dead-lettering>).
            args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
            args.insert("x-overflow".into(), long("reject-publish"));
        }
        channel
            .queue_declare(name.as_str().into(), queue_opts, args)
            .await
            .map_err(|e| classify(format!("queue '{name}'"), e))?;
    }
    Ok(())
}
