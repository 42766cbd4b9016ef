//! Confirmed, mandatory publishing.
//!
//! One channel in confirm mode (RabbitMQ publisher confirms,
//! <https://www.rabbitmq.com/docs/confirms#publisher-confirms>) shared by all in-flight
//! deliveries. A publish counts as done only when the broker acks it and did not return it
//! (`basic.return`, AMQP 0-9-1 §1.8.3.9): a returned message was routed nowhere. When the channel
//! dies (e.g. a publish to a missing exchange closes it with 404), the next publish opens a new
//! one.

use std::{sync::Arc, time::Duration};

use lapin::{
    BasicProperties, Channel,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use tokio::sync::Mutex;

use super::{
    link::{CHANNEL_OP_TIMEOUT, Link},
    topology::{Topology, TopologyError, declare},
};

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
    /// There is no open connection (the worker is reconnecting).
    #[error("not connected to the broker (reconnecting)")]
    NotConnected,
    /// No confirm arrived in time; while the broker blocks publishing (a memory or disk alarm)
    /// this is expected.
    #[error("no publisher confirm within {timeout_ms} ms{}", if *.blocked { " (the broker is blocking publishing: memory or disk alarm)" } else { "" })]
    ConfirmTimeout {
        /// The wait, ms.
        timeout_ms: u64,
        /// Whether the connection was blocked.
        blocked: bool,
    },
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
    link: Arc<Link>,
    channel: Arc<Mutex<Option<Channel>>>,
    confirm_timeout: Duration,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Publisher")
    }
}

impl Publisher {
    /// Creates a publisher on the link's current connection; the channel is opened on first
    /// use and again after the connection is replaced. A publish waits at most
    /// `confirm_timeout` for its confirm.
    pub fn new(link: Arc<Link>, confirm_timeout: Duration) -> Self {
        Self {
            link,
            channel: Arc::new(Mutex::new(None)),
            confirm_timeout,
        }
    }

    async fn channel(&self) -> Result<Channel, PublishError> {
        let mut guard = self.channel.lock().await;
        if let Some(ch) = guard.as_ref()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        let connection = self
            .link
            .current()
            .await
            .ok_or(PublishError::NotConnected)?;
        let ch = connection.create_channel().await?;
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
        let publish = async {
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
            Ok::<_, PublishError>(confirm)
        };
        let confirm = tokio::time::timeout(self.confirm_timeout, publish)
            .await
            .map_err(|_| PublishError::ConfirmTimeout {
                timeout_ms: self.confirm_timeout.as_millis() as u64,
                blocked: self.link.is_blocked(),
            })??;
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

    /// The broker connection's frame size, bytes ([`Link::frame_max`]).
    pub fn frame_max(&self) -> u32 {
        self.link.frame_max()
    }

    /// Declares `topology` again on a channel of its own (after an exchange went missing).
    ///
    /// # Errors
    /// As [`crate::broker::declare`].
    pub async fn redeclare(&self, topology: &Topology) -> Result<(), TopologyError> {
        let Some(connection) = self.link.current().await else {
            return Ok(()); // reconnecting: the supervisor declares the topology on the new one
        };
        declare(&connection, topology).await
    }

    /// Closes the channel, if open, waiting at most [`CHANNEL_OP_TIMEOUT`].
    pub async fn close(&self) {
        let ch = self.channel.lock().await.take();
        if let Some(ch) = ch.filter(|c| c.status().connected()) {
            let _ =
                tokio::time::timeout(CHANNEL_OP_TIMEOUT, ch.close(200, "shutdown".into())).await;
        }
    }
}
