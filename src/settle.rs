//! Settling a delivery: the only code that publishes, acks and nacks. It carries out a
//! [`Plan`]; what the plan holds was decided elsewhere.
//!
//! Ordering rule (at-least-once): a delivery is acked only after its outcome is safe at the
//! broker, i.e. after the publisher confirm of every message its plan must publish. Until then
//! it stays unacked and a crash makes the broker redeliver it.

use std::time::Duration;

use lapin::{
    Acker,
    options::{BasicAckOptions, BasicNackOptions},
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    broker::{
        PublishError, Publisher, Topology,
        link::{CHANNEL_OP_TIMEOUT, ChannelFault, bounded},
    },
    fleet::{Fenced, Lease},
    ledger::Settlement,
    plan::{IfUnconfirmed, Message, Patience, Plan, Settled},
    retry::{Retry, RetryPolicy},
};

/// Carries plans out at the broker. Shared by all deliveries.
#[derive(Debug)]
pub struct Settler {
    /// The confirmed publisher.
    pub publisher: Publisher,
    /// What the worker declares, declared again when an exchange or queue of its own is gone.
    pub topology: Topology,
    /// How long a message of [`Patience::Budget`] is retried (`RETRY_MAX_ELAPSED_S`).
    pub publish_budget: Duration,
    /// Fires at the end of the drain: publish retries and outcome records stop and the task is
    /// aborted.
    pub hard_stop: CancellationToken,
}

impl Settler {
    /// Publishes the plan's messages in order, each until confirmed or its patience ends; then
    /// acks and ends the delivery's claim on its credential (`lease`) as the plan says. A
    /// message not confirmed in time ends the settlement as its [`IfUnconfirmed`] says
    /// (unfinished, or requeued) and the claim is released (or keeps bunq's refusal). Never
    /// acks before the outcome is confirmed at the broker.
    pub async fn settle(&self, acker: &Acker, plan: Plan<'_>, lease: Option<Lease>) -> Settled {
        let (record, settled) = self.carry_out(plan, lease.as_ref()).await;
        let end_claim = async {
            if let Some(lease) = lease {
                lease.settle(record, &self.hard_stop).await;
            }
        };
        match settled {
            Ok((settled, true)) => {
                // Acked before the record is written: recording may wait for Redis to come
                // back, and a redelivered input would meet an unfinished record.
                ack(acker).await;
                end_claim.await;
                settled
            }
            Ok((settled, false)) => {
                end_claim.await;
                warn!(
                    "the delivery's channel is gone; the broker redelivers it and the redelivery takes the work over"
                );
                settled
            }
            Err(Unconfirmed::Requeue) => {
                end_claim.await;
                nack_requeue(acker).await;
                Settled::Requeued
            }
            Err(Unconfirmed::LeaveUnacked) => {
                end_claim.await;
                Settled::Unfinished
            }
        }
    }

    /// Publishes the plan's messages: how the claim ends and, once all are confirmed, the ack.
    /// A claim taken over meanwhile (this delivery paused past its lease) stops the publishing:
    /// the new holder settles the credential from its record, and this copy is requeued to be
    /// acked as settled. Not so for a session that is not staged: it exists only here.
    async fn carry_out(
        &self,
        plan: Plan<'_>,
        lease: Option<&Lease>,
    ) -> (Settlement, Result<(Settled, bool), Unconfirmed>) {
        let fence = lease.filter(|l| plan.record != Settlement::Created || l.staged());
        for m in plan.messages {
            match self.publish(&m, fence).await {
                Published::Confirmed => continue,
                Published::Taken => {
                    info!(
                        "this delivery's claim was taken over before its outcome was published; the new holder settles the credential, and this copy is requeued"
                    );
                    return (Settlement::Released, Err(Unconfirmed::Requeue));
                }
                Published::GaveUp => {}
            }
            let within = match m.patience {
                Patience::UntilConfirmed => "before the drain ended (SHUTDOWN_TIMEOUT_S)",
                Patience::Budget => "within RETRY_MAX_ELAPSED_S",
            };
            match m.if_unconfirmed {
                IfUnconfirmed::GoOn => {
                    error!(
                        "{} was not confirmed {within}; the messages before it record the outcome",
                        m.what
                    );
                }
                IfUnconfirmed::LeaveUnacked => {
                    error!(
                        "{} was not confirmed {within}; the delivery stays unacked and will be redelivered",
                        m.what
                    );
                    return (Settlement::Released, Err(Unconfirmed::LeaveUnacked));
                }
                IfUnconfirmed::Requeue(record) => {
                    error!(
                        "{} was not confirmed {within}; requeueing the delivery",
                        m.what
                    );
                    return (record, Err(Unconfirmed::Requeue));
                }
            }
        }
        (plan.record, Ok((plan.settled, plan.ack)))
    }

    /// Publishes until the broker confirms, or until the message's patience runs out, or, with
    /// `fence`, until a try finds the claim taken over.
    ///
    /// Each failure is logged; waits follow [`RetryPolicy::PUBLISH`]. When the broker says an
    /// exchange does not exist (404, e.g. deleted by an operator) or returns the message as
    /// unroutable, the topology is declared again before the next try.
    async fn publish(&self, m: &Message<'_>, fence: Option<&Lease>) -> Published {
        let policy = match m.patience {
            Patience::UntilConfirmed => RetryPolicy::PUBLISH,
            Patience::Budget => RetryPolicy::publish_within(self.publish_budget),
        };
        let (exchange, routing_key) = (m.exchange.as_str(), m.routing_key.as_str());
        let mut retry = Retry::new(policy, &self.hard_stop);
        loop {
            // Redis unreachable proves nothing either way: the outcome is published.
            if let Some(lease) = fence
                && let Err(Fenced::Taken(_)) = lease.fence().await
            {
                return Published::Taken;
            }
            let attempt = retry.attempt();
            let err = match self
                .publisher
                .publish(exchange, routing_key, &m.body, m.properties.clone())
                .await
            {
                Ok(()) => return Published::Confirmed,
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
                return Published::GaveUp;
            };
            if retry.wait(delay).await.is_err() {
                return Published::GaveUp;
            }
        }
    }
}

/// How a publish ended.
enum Published {
    /// The broker confirmed it.
    Confirmed,
    /// Its patience ran out (or the drain ended).
    GaveUp,
    /// The claim was taken over: the outcome is the new holder's to publish.
    Taken,
}

/// Why a settlement ended before its ack.
enum Unconfirmed {
    /// Nack with requeue.
    Requeue,
    /// Leave it unacked for the broker to redeliver.
    LeaveUnacked,
}

async fn nack_requeue(acker: &Acker) {
    let requeue = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    match bounded("basic.nack", acker.nack(requeue)).await {
        Ok(true) => {}
        // lapin answers Ok(false) when the delivery's channel is gone.
        Ok(false) => {
            warn!("nack impossible: the delivery's channel is gone; the broker redelivers it")
        }
        Err(ChannelFault::Amqp(e)) => {
            warn!(error = %crate::telemetry::Chain(&e), "nack failed; the broker redelivers when the channel closes")
        }
        Err(ChannelFault::Unanswered(_)) => warn!(
            timeout_ms = CHANNEL_OP_TIMEOUT.as_millis() as u64,
            "nack not sent in time (the channel is presumably gone); the broker redelivers when the channel closes"
        ),
    }
}

/// Acks a delivery whose outcome is confirmed.
async fn ack(acker: &Acker) {
    const REDELIVERED: &str =
        "the broker will redeliver it and it will be acked without a second bunq call";
    match bounded("basic.ack", acker.ack(BasicAckOptions::default())).await {
        Ok(true) => {}
        // lapin answers Ok(false) when the delivery's channel is gone: that is not an ack.
        Ok(false) => error!(
            "ack impossible after a confirmed outcome: the delivery's channel is gone; {REDELIVERED}"
        ),
        Err(ChannelFault::Amqp(e)) => {
            error!(error = %crate::telemetry::Chain(&e), "ack failed after a confirmed outcome; {REDELIVERED}")
        }
        Err(ChannelFault::Unanswered(_)) => error!(
            timeout_ms = CHANNEL_OP_TIMEOUT.as_millis() as u64,
            "ack not sent in time after a confirmed outcome (the channel is presumably gone); {REDELIVERED}"
        ),
    }
}
