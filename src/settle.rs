//! Settling a delivery: the only code that publishes, acks and nacks.
//!
//! Ordering rule (at-least-once): a delivery is acked only after its outcome is safe at the
//! broker, i.e. after the publisher confirm of `session.created`, or of the dead-letter copy (and
//! `session.failed`), or of the delayed-retry copy. Until then it stays unacked and a crash makes
//! the broker redeliver it.

use std::time::Duration;

use lapin::{
    Acker, BasicProperties,
    options::{BasicAckOptions, BasicNackOptions},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    broker::{PublishError, Publisher, Topology, envelope::Inbound},
    identity::Key,
    ledger::{Known, KnownOutcomes},
    outcome::Outcome,
    retry::{Retry, RetryPolicy},
};

/// How long a publish keeps trying.
#[derive(Clone, Copy, Debug)]
enum Patience {
    /// Until confirmed; only the end of the drain (`SHUTDOWN_TIMEOUT_S`) stops it. For
    /// `session.created`: giving up would lose a session whose single-use credential is spent.
    UntilConfirmed,
    /// For `RETRY_MAX_ELAPSED_S`; then the caller falls back.
    Budget,
}

/// Carries outcomes out at the broker. Shared by all deliveries.
#[derive(Debug)]
pub struct Settler {
    /// The confirmed publisher.
    pub publisher: Publisher,
    /// Names of the exchanges and queues.
    pub topology: Topology,
    /// Outcomes already settled, shared with the consumer's lookup.
    pub known: std::sync::Arc<KnownOutcomes>,
    /// How long a dead-letter copy, delayed-retry copy or `session.failed` is retried
    /// (`RETRY_MAX_ELAPSED_S`).
    pub publish_budget: Duration,
    /// Fires at the end of the drain: publish retries stop and the task is aborted.
    pub hard_stop: CancellationToken,
    /// The fleet's shared state, with `REDIS_URL`: a confirmed session is recorded there.
    pub fleet: Option<crate::fleet::Fleet>,
    /// Seals the bookkeeping headers of delayed and hand-back copies.
    pub seal: std::sync::Arc<crate::broker::envelope::Seal>,
}

impl Settler {
    /// Turns an outcome into broker actions: publish and wait for confirms, then ack (or nack
    /// with requeue). Never acks before the outcome is confirmed at the broker. `key` is the
    /// input's [`crate::identity::round_key`]. Returns what it did, for the log line and the
    /// metric: `created`, `skipped`, `dead_lettered`, `delayed`, `returned`, `requeued`,
    /// `abandoned` or `unfinished`.
    ///
    /// - created: `session.created` until confirmed, remembered, then ack;
    /// - skipped: ack;
    /// - failed: the dead-letter copy within the budget (else the failure is remembered and the
    ///   delivery requeued: nothing is lost, and bunq is not called again for it); then
    ///   `session.failed` within the budget (if it cannot be routed the dead letter still
    ///   records the failure, and an error is logged); then ack;
    /// - delayed: the copy in the tier's delay queue within the budget (else requeued), then
    ///   ack;
    /// - returned: a fresh copy in the input queue within the budget (else requeued), then ack;
    /// - abandoned (the delivery's channel is gone): nothing; the broker redelivers it.
    pub async fn settle(
        &self,
        acker: &Acker,
        inbound: &Inbound,
        key: Key,
        outcome: Outcome,
    ) -> &'static str {
        let t = &self.topology;
        let label = match outcome {
            Outcome::Created(event) => {
                let body = serde_json::to_vec(&*event).expect("SessionCreated always serialises");
                let props =
                    inbound.output_properties("session.created", &event.provision_id.to_string());
                let published = self
                    .publish(
                        &t.output_exchange,
                        "session.created",
                        &body,
                        props,
                        Patience::UntilConfirmed,
                    )
                    .await;
                if !published {
                    error!(
                        "session.created was not confirmed before the drain ended (SHUTDOWN_TIMEOUT_S); the delivery stays unacked and will be redelivered"
                    );
                    return "unfinished";
                }
                // On the delivery's span, so its one INFO line (`delivery handled`) names them.
                let span = tracing::Span::current();
                span.record("session_id", event.session_id);
                if let Some(user_id) = event.user_id {
                    span.record("user_id", user_id);
                }
                debug!("session.created confirmed");
                // Remembered before the ack: AMQP does not confirm acks, so even a sent ack may
                // be lost with the connection and the input come back, to any replica.
                self.known.remember(key, Known::Settled);
                self.record_settled(inbound).await;
                "created"
            }
            Outcome::Skipped(_) => "skipped",
            Outcome::Failed(failure) => {
                let props = inbound.dead_letter_properties(&failure, self.publisher.frame_max());
                let kept = self
                    .publish(
                        &t.dead_letter_exchange,
                        &inbound.routing_key,
                        &inbound.body,
                        props,
                        Patience::Budget,
                    )
                    .await;
                if !kept {
                    error!(reason = %failure.reason, "the dead-letter copy was not confirmed within RETRY_MAX_ELAPSED_S; requeueing the delivery");
                    self.known.remember(key, Known::Failed(failure));
                    nack_requeue(acker).await;
                    return "requeued";
                }
                // Remembered before the ack: a redelivery of this delivery is acked, not sent to
                // bunq again; a replay of the dead letter (a new message) is processed.
                self.known.remember(key, Known::Finished);
                warn!(reason = %failure.reason, detail = %failure.detail, attempts = failure.attempts, "dead-lettered");
                if let Some(event) = &failure.event {
                    let body = serde_json::to_vec(event).expect("SessionFailed always serialises");
                    let props = inbound
                        .output_properties("session.failed", &event.provision_id.to_string());
                    let sent = self
                        .publish(
                            &t.output_exchange,
                            "session.failed",
                            &body,
                            props,
                            Patience::Budget,
                        )
                        .await;
                    if !sent {
                        error!(reason = %failure.reason, "session.failed was not confirmed within RETRY_MAX_ELAPSED_S; the dead letter records the failure");
                    }
                }
                "dead_lettered"
            }
            Outcome::Delayed(d) => {
                let queue = t.delay_queue_name(d.delay);
                // Through the default exchange straight into the tier's delay queue; its TTL
                // dead-letters the copy back to the input queue.
                let parked = self
                    .publish(
                        "",
                        &queue,
                        &inbound.body,
                        inbound.delayed_properties(&d, &self.seal, self.publisher.frame_max()),
                        Patience::Budget,
                    )
                    .await;
                if !parked {
                    error!(%queue, "the delayed-retry copy was not confirmed within RETRY_MAX_ELAPSED_S; requeueing the delivery");
                    nack_requeue(acker).await;
                    return "requeued";
                }
                self.known.remember(key, Known::Finished);
                warn!(
                    %queue,
                    delay_s = d.delay.as_secs(),
                    delayed_retry = d.retries,
                    calls = d.calls,
                    detail = %d.detail,
                    "retries spent; parked for a delayed retry"
                );
                "delayed"
            }
            Outcome::Abandoned => {
                warn!(
                    "the delivery's channel is gone; the broker redelivers it and the redelivery takes the work over"
                );
                return "abandoned";
            }
            Outcome::Returned { counted } => {
                let returns = inbound.history.returns + u32::from(counted);
                // Straight back into the input queue through the default exchange.
                let returned = self
                    .publish(
                        "",
                        &t.input_queue,
                        &inbound.body,
                        inbound.returned_properties(
                            returns,
                            &self.seal,
                            self.publisher.frame_max(),
                        ),
                        Patience::Budget,
                    )
                    .await;
                if !returned {
                    error!(
                        "the hand-back copy was not confirmed within RETRY_MAX_ELAPSED_S; requeueing the delivery"
                    );
                    nack_requeue(acker).await;
                    return "requeued";
                }
                "returned"
            }
        };
        ack(acker).await;
        label
    }

    /// Records a confirmed session in the fleet's Redis, retrying within the publish budget: a
    /// replica that gets this credential later then acks it without calling bunq.
    async fn record_settled(&self, inbound: &Inbound) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        if !matches!(inbound.decoded, Ok(crate::events::Decoded::Ready(_))) {
            return;
        }
        let recorded = crate::retry::retry(
            RetryPolicy::publish_within(self.publish_budget),
            &self.hard_stop,
            |_| fleet.settle(&inbound.identity),
            |_| false,
            |_, _, _| {},
        )
        .await;
        if recorded.is_err() {
            error!(
                "the session is confirmed but could not be recorded in Redis (REDIS_URL); another replica that gets this credential within the lease would call bunq again"
            );
        }
    }

    /// Acks a repeat of an input whose session is already safe at the broker: no second bunq
    /// call, no second event. Returns `already_settled`.
    pub async fn settle_repeat(&self, acker: &Acker) -> &'static str {
        info!(
            "this credential's session.created was already confirmed (a redelivery or a repeat); acking"
        );
        ack(acker).await;
        "already_settled"
    }

    /// Publishes until the broker confirms, or until `patience` runs out (returns `false`).
    ///
    /// Each failure is logged; waits follow [`RetryPolicy::PUBLISH`]. When the broker says an
    /// exchange does not exist (404, e.g. deleted by an operator) or returns the message as
    /// unroutable, the topology is declared again before the next try.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
        patience: Patience,
    ) -> bool {
        let policy = match patience {
            Patience::UntilConfirmed => RetryPolicy::PUBLISH,
            Patience::Budget => RetryPolicy::publish_within(self.publish_budget),
        };
        let mut retry = Retry::new(policy, &self.hard_stop);
        loop {
            let attempt = retry.attempt();
            let err = match self
                .publisher
                .publish(exchange, routing_key, body, props.clone())
                .await
            {
                Ok(()) => return true,
                Err(e) => e,
            };
            let hint = match &err {
                PublishError::Returned { .. } => " (bind a queue to it)",
                _ => "",
            };
            error!(exchange, routing_key, attempt, error = %crate::telemetry::Chain(&err), "publish not confirmed{hint}; the delivery stays unacked");
            let label = if exchange.is_empty() {
                "(default)".to_owned()
            } else {
                exchange.to_owned()
            };
            metrics::counter!("bunq_session_worker_publish_failures_total", "exchange" => label)
                .increment(1);
            // A missing exchange (404) or a copy routed nowhere (the worker's own dead-letter or
            // delay queue deleted): declaring the topology again repairs what is the worker's.
            if (err.is_not_found() || matches!(err, PublishError::Returned { .. }))
                && let Err(e) = self.publisher.redeclare(&self.topology).await
            {
                error!(error = %crate::telemetry::Chain(&e), "declaring the topology again failed");
            }
            let Ok(delay) = retry.next_delay(Duration::ZERO) else {
                return false;
            };
            if retry.wait(delay).await.is_err() {
                return false;
            }
        }
    }
}

async fn nack_requeue(acker: &Acker) {
    let requeue = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    match acker.nack(requeue).await {
        Ok(true) => {}
        Ok(false) => {
            warn!("nack impossible: the delivery's channel is gone; the broker redelivers it")
        }
        Err(e) => {
            warn!(error = %crate::telemetry::Chain(&e), "nack failed; the broker redelivers when the channel closes")
        }
    }
}

/// Acks a delivery whose outcome is confirmed.
async fn ack(acker: &Acker) {
    // lapin answers Ok(false) when the delivery's channel is gone: that is not an ack.
    match acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        Ok(false) => error!(
            "ack impossible after a confirmed outcome: the delivery's channel is gone; the broker will redeliver it and it will be acked without a second bunq call"
        ),
        Err(e) => {
            error!(error = %crate::telemetry::Chain(&e), "ack failed after a confirmed outcome; the broker will redeliver it and it will be acked without a second bunq call")
        }
    }
}
