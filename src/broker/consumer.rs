//! The consumer supervisor: reconnect, subscribe, consume, drain.
//!
//! - Connection lost (network cut, broker restart, closed by an operator, missed heartbeats):
//!   reconnects under [`RetryPolicy::RECONNECT`], declares the topology again and re-subscribes.
//!   Deliveries of the dead channel are never acked on the new one: the broker redelivers them.
//! - Consumer cancelled by the broker (queue deleted, `basic.cancel`) or channel closed: declares
//!   the topology again and re-subscribes.
//! - Subscribing fails on a live connection: retried under [`RetryPolicy::SUBSCRIBE`], then the
//!   worker stops with an error rather than stay alive but deaf.
//! - Shutdown: cancels the consumer (`basic.cancel`), tells the deliveries' work to stop waiting
//!   for bunq retries, gives them the drain time to finish, aborts what is still running (its
//!   deliveries stay unacked and the broker redelivers them), then closes the channel.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use lapin::{
    Channel, Connection,
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use tokio::{sync::watch, task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{
    link::{CHANNEL_OP_TIMEOUT, CONNECT_TIMEOUT, ChannelFault, Link, bounded},
    topology::{Topology, TopologyError, declare},
};
use crate::retry::{Retry, RetryPolicy};

/// Why declaring the topology and subscribing failed.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// Opening the consumer channel failed.
    #[error("cannot open a channel")]
    Channel(#[source] lapin::Error),
    /// Declaring the topology failed.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// `basic.qos` (prefetch) failed.
    #[error("cannot set the prefetch")]
    Qos(#[source] lapin::Error),
    /// `basic.consume` failed.
    #[error("cannot consume from queue '{queue}'")]
    Consume {
        /// The input queue.
        queue: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// The broker did not answer in time.
    #[error("declaring and subscribing took longer than {0} s")]
    Timeout(u64),
}

/// Declaring and subscribing kept failing on a live connection.
#[derive(Debug, thiserror::Error)]
#[error("cannot subscribe after {attempts} attempts in a row")]
pub struct SubscribeFailed {
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    #[source]
    pub last: SubscribeError,
}

/// What the supervisor needs to consume the input queue.
#[derive(Debug)]
pub struct Consumer {
    /// The shared connection.
    pub link: Arc<Link>,
    /// Declared on every (re)subscription.
    pub topology: Topology,
    /// `basic.qos` prefetch-count.
    pub prefetch: u16,
    /// Consumer tag (also the connection name).
    pub consumer_tag: String,
    /// Time in-flight deliveries get to finish after shutdown (`SHUTDOWN_TIMEOUT_S`).
    pub drain_timeout: Duration,
    /// `Some(until)` while consuming should pause (the breaker is open): the consumer is
    /// cancelled and subscribed again at `until`.
    pub pause: Option<watch::Receiver<Option<Instant>>>,
    /// Set while subscribed and not paused (for readiness).
    pub consuming: Arc<std::sync::atomic::AtomicBool>,
}

/// The stop signals of a running consumer.
#[derive(Clone, Debug, Default)]
pub struct Stops {
    /// Fired by the caller: stop consuming and drain.
    pub shutdown: CancellationToken,
    /// Fired by the supervisor once consuming stopped: work waiting to retry bunq gives up.
    pub stop_work: CancellationToken,
    /// Fired by the supervisor at the end of the drain: publish retries stop, then tasks are
    /// aborted.
    pub hard_stop: CancellationToken,
}

/// Why a consumer stopped delivering.
enum ConsumerEnd {
    Shutdown,
    Failed(ChannelFault),
    CancelledByBroker,
}

impl Consumer {
    /// Declares the topology, opens a consumer channel with the prefetch and subscribes, within
    /// [`CONNECT_TIMEOUT`].
    async fn subscribe(
        &self,
        connection: &Connection,
    ) -> Result<(Channel, lapin::Consumer), SubscribeError> {
        let steps = async {
            declare(connection, &self.topology).await?;
            let channel = connection
                .create_channel()
                .await
                .map_err(SubscribeError::Channel)?;
            channel
                .basic_qos(self.prefetch, BasicQosOptions::default())
                .await
                .map_err(SubscribeError::Qos)?;
            let consumer = channel
                .basic_consume(
                    self.topology.input_queue.as_str().into(),
                    self.consumer_tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|source| SubscribeError::Consume {
                    queue: self.topology.input_queue.clone(),
                    source,
                })?;
            Ok((channel, consumer))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, steps)
            .await
            .unwrap_or(Err(SubscribeError::Timeout(CONNECT_TIMEOUT.as_secs())))
    }

    /// Consumes until `stops.shutdown` fires, surviving the broker; each delivery runs
    /// `handle(delivery, channel_live)` in a task of its own, where `channel_live` fires when
    /// the delivery's channel is gone (or at shutdown, with `stops.stop_work`).
    ///
    /// # Errors
    /// [`SubscribeFailed`] when declaring and subscribing fails [`RetryPolicy::SUBSCRIBE`]'s
    /// attempts in a row on a live connection: the process should exit non-zero and be
    /// restarted rather than stay alive but deaf.
    pub async fn run<H, Fut>(
        &self,
        first: Option<Arc<Connection>>,
        stops: &Stops,
        handle: H,
    ) -> Result<(), SubscribeFailed>
    where
        H: Fn(Delivery, CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let shutdown = &stops.shutdown;
        let mut tasks = JoinSet::new();
        let mut reuse = first;
        let mut subscribing = Retry::new(RetryPolicy::SUBSCRIBE, shutdown);
        let mut consumer_channel: Option<(Channel, String)> = None;
        let result = 'outer: loop {
            let connection = match reuse.take().filter(|c| c.status().connected()) {
                Some(c) => c,
                None => match self.link.reconnect(shutdown).await {
                    Some(c) => c,
                    None => break Ok(()),
                },
            };
            let subscribed = tokio::select! {
                r = self.subscribe(&connection) => r,
                _ = shutdown.cancelled() => break Ok(()),
            };
            let (channel, mut consumer) = match subscribed {
                Ok(pair) => pair,
                Err(e) => {
                    let attempt = subscribing.attempt();
                    error!(attempt, error = %crate::telemetry::Chain(&e), "cannot subscribe to the input queue");
                    let Ok(delay) = subscribing.next_delay(Duration::ZERO) else {
                        break Err(SubscribeFailed {
                            attempts: attempt,
                            last: e,
                        });
                    };
                    if subscribing.wait(delay).await.is_err() {
                        break Ok(());
                    }
                    reuse = Some(connection);
                    continue;
                }
            };
            subscribing = Retry::new(RetryPolicy::SUBSCRIBE, shutdown);
            self.set_consuming(true);
            info!(
                queue = %self.topology.input_queue,
                prefetch = self.prefetch,
                consumer_tag = %self.consumer_tag,
                amqp_url = %self.link.redacted_url(),
                "consuming"
            );
            let channel_live = stops.stop_work.child_token();
            // The pause signal as it is now counts: a worker (re)subscribing while the breaker
            // is open pauses at once; later changes wake the loop.
            let mut pause = self.pause.clone();
            let mut paused_until = pause
                .as_mut()
                .and_then(|p| *p.borrow_and_update())
                .filter(|until| *until > Instant::now());
            let mut tag = self.consumer_tag.clone();
            let mut resumes = 0u32;
            let mut draining = false;
            if paused_until.is_some() {
                // Cancel at once; the stream then ends once the broker has said cancel-ok.
                if let Err(e) = self.cancel(&channel, &tag).await {
                    warn!(error = %crate::telemetry::Chain(&e), "cannot pause consuming");
                }
                draining = true;
            }
            let end = loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break ConsumerEnd::Shutdown,
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                    Ok(()) = changed(&mut pause) => {
                        let until = pause
                            .as_mut()
                            .and_then(|p| *p.borrow_and_update())
                            .filter(|until| *until > Instant::now());
                        match (until, paused_until) {
                            (Some(until), None) => {
                                if let Err(e) = self.cancel(&channel, &tag).await {
                                    break ConsumerEnd::Failed(e);
                                }
                                draining = true;
                                paused_until = Some(until);
                            }
                            // Extended, or ended early (the breaker closed).
                            (until, Some(_)) => paused_until = until.or(Some(Instant::now())),
                            (None, None) => {}
                        }
                    }
                    _ = sleep_until_opt(paused_until), if paused_until.is_some() && !draining => {
                        // A fresh consumer tag: RabbitMQ 3.x can fail the channel when a tag is
                        // reused while the cancelled consumer still has deliveries out.
                        resumes += 1;
                        tag = format!("{}-r{resumes}", self.consumer_tag);
                        match self.resume(&channel, &tag).await {
                            Ok(c) => consumer = c,
                            Err(e) => break ConsumerEnd::Failed(e),
                        }
                        paused_until = None;
                    }
                    next = consumer.next(), if paused_until.is_none() || draining => match next {
                        // Deliveries already on their way to a cancelled consumer are handled
                        // as any other (the breaker hands them back): never left unacked.
                        Some(Ok(delivery)) => {
                            tasks.spawn(handle(delivery, channel_live.clone()));
                        }
                        Some(Err(e)) => break ConsumerEnd::Failed(e.into()),
                        None if draining => draining = false,
                        None => break ConsumerEnd::CancelledByBroker,
                    },
                }
            };
            self.set_consuming(false);
            if !matches!(end, ConsumerEnd::Shutdown) {
                // Work of this channel's deliveries starts no new bunq call: the broker
                // redelivers them on the next channel, where they wait for or take over the work.
                channel_live.cancel();
            }
            match end {
                ConsumerEnd::Shutdown => {
                    consumer_channel = Some((channel, tag));
                    break 'outer Ok(());
                }
                ConsumerEnd::Failed(e) => {
                    warn!(error = %crate::telemetry::Chain(&e), "the consumer failed; reconnecting (unacked deliveries will be redelivered)");
                }
                ConsumerEnd::CancelledByBroker => {
                    warn!(queue = %self.topology.input_queue, "the broker cancelled the consumer (queue deleted?); declaring the topology again and re-subscribing");
                }
            }
            let _ = tokio::time::timeout(
                CHANNEL_OP_TIMEOUT,
                channel.close(200, "re-subscribing".into()),
            )
            .await;
            reuse = Some(connection);
        };
        self.drain(tasks, consumer_channel, stops).await;
        result
    }

    fn set_consuming(&self, on: bool) {
        self.consuming
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Pauses consuming: `basic.cancel` of `tag` (the breaker is open).
    async fn cancel(&self, channel: &Channel, tag: &str) -> Result<(), ChannelFault> {
        let cancel = channel.basic_cancel(tag.into(), BasicCancelOptions::default());
        bounded("basic.cancel", cancel).await?;
        self.set_consuming(false);
        warn!(queue = %self.topology.input_queue, "consuming paused by the breaker");
        Ok(())
    }

    /// Consumes again under `tag` on the same channel, so deliveries in flight can still be
    /// settled on it.
    async fn resume(&self, channel: &Channel, tag: &str) -> Result<lapin::Consumer, ChannelFault> {
        let consume = channel.basic_consume(
            self.topology.input_queue.as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        );
        let consumer = bounded("basic.consume", consume).await?;
        self.set_consuming(true);
        info!(queue = %self.topology.input_queue, "consuming again (the breaker lets one delivery try)");
        Ok(consumer)
    }

    /// Stops consuming and lets in-flight deliveries finish within the drain time; every step
    /// is bounded, so a stalled connection cannot hold the process past `SHUTDOWN_TIMEOUT_S`
    /// plus 2 × [`CHANNEL_OP_TIMEOUT`].
    async fn drain(
        &self,
        mut tasks: JoinSet<()>,
        channel: Option<(Channel, String)>,
        stops: &Stops,
    ) {
        info!("stopping: cancelling the consumer and draining in-flight deliveries");
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        if let Some((channel, tag)) = &channel {
            let cancel = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
            let _ = tokio::time::timeout_at(deadline, cancel).await;
        }
        // Work waiting to retry bunq gives up now; calls under way and publishes finish.
        stops.stop_work.cancel();
        let drained = tokio::time::timeout_at(deadline, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                unfinished = tasks.len(),
                "shutdown timeout reached; aborting unfinished deliveries (they stay unacked and will be redelivered)"
            );
            stops.hard_stop.cancel();
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        if let Some((channel, _)) = channel {
            let _ = tokio::time::timeout(CHANNEL_OP_TIMEOUT, channel.close(200, "shutdown".into()))
                .await;
        }
    }
}

/// Sleeps until `until`; never, without one.
async fn sleep_until_opt(until: Option<Instant>) {
    match until {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Waits for a change of the pause signal; never, without one.
async fn changed(
    pause: &mut Option<watch::Receiver<Option<Instant>>>,
) -> Result<(), watch::error::RecvError> {
    match pause {
        Some(p) => p.changed().await,
        None => std::future::pending().await,
    }
}
