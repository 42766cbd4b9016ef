//! Confirmed, mandatory publishing.
//!
//! One channel in confirm mode (RabbitMQ publisher confirms,
//! <https://www.rabbitmq.com/docs/confirms#publisher-confirms>) shared by all in-flight
//! deliveries. A publish counts as done only when the broker acks it and did not return it
//! (`basic.return`, AMQP 0-9-1 §1.8.3.9): a returned message was routed nowhere. When the channel
//! dies (e.g. a publish to a missing exchange closes it with 404), the next publish opens a new
//! one.

use std::sync::Arc;

use lapin::{
    BasicProperties, Channel, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use tokio::sync::Mutex;

use super::topology::{Topology, TopologyError, declare};

/// Why a publish did not become safe at the broker.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Mandatory and unroutable: no queue is bound for this routing key.
    #[error(
        "returned by the broker ({code} {text}): no queue is bound to exchange '{exchange}' for routing key '{routing_key}'"
    )]
    Returned {
        /// Reply code, e.g. 312.
        code: u16,
        /// Reply text, e.g. `NO_ROUTE`.
        text: String,
        /// Target exchange.
        exchange: String,
        /// Routing key used.
        routing_key: String,
    },
    /// The broker nacked the publish (an internal broker error).
    #[error("nacked by the broker")]
    Nacked,
    /// The channel or connection failed.
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
}

impl PublishError {
    /// Whether the broker said the exchange does not exist (404 NOT_FOUND).
    pub fn is_not_found(&self) -> bool {
        matches!(self, PublishError::Broker(e) if matches!(
            e.kind(),
            lapin::ErrorKind::ProtocolError(amqp)
                if *amqp.kind() == lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::NOTFOUND)
        ))
    }
}

/// A confirm-mode channel that reopens itself after a channel error.
#[derive(Clone)]
pub struct Publisher {
    connection: Arc<Connection>,
    channel: Arc<Mutex<Option<Channel>>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Publisher")
    }
}

impl Publisher {
    /// Creates a publisher on `connection`; the channel is opened on first use.
    pub fn new(connection: Arc<Connection>) -> Self {
        Self {
            connection,
            channel: Arc::new(Mutex::new(None)),
        }
    }

    async fn channel(&self) -> Result<Channel, lapin::Error> {
        let mut guard = self.channel.lock().await;
        if let Some(ch) = guard.as_ref()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        let ch = self.connection.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        *guard = Some(ch.clone());
        Ok(ch)
    }

    /// Publishes with `mandatory` set and waits for the publisher confirm.
    ///
    /// # Errors
    /// [`PublishError::Returned`] when unroutable, [`PublishError::Nacked`] on a broker nack,
    /// [`PublishError::Broker`] when the channel or connection fails.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let channel = self.channel().await?;
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await?
            .await?;
        if confirm.is_nack() {
            return Err(PublishError::Nacked);
        }
        if let Some(returned) = confirm.take_message() {
            return Err(PublishError::Returned {
                code: returned.reply_code,
                text: returned.reply_text.to_string(),
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
            });
        }
        Ok(())
    }

    /// Declares `topology` again on a channel of its own (after an exchange went missing).
    ///
    /// # Errors
    /// As [`crate::broker::declare`].
    pub async fn redeclare(&self, topology: &Topology) -> Result<(), TopologyError> {
        let ch = self
            .connection
            .create_channel()
            .await
            .map_err(|source| TopologyError::Other {
                object: "a channel".into(),
                source,
            })?;
        let result = declare(&ch, topology).await;
        let _ = ch.close(200, "declared".into()).await;
        result
    }

    /// Closes the channel, if open.
    pub async fn close(&self) {
        if let Some(ch) = self.channel.lock().await.take() {
            let _ = ch.close(200, "shutdown".into()).await;
        }
    }
}
