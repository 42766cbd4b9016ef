//! Planning a settlement: `Outcome` + `Inbound` → the messages to publish and what to do with
//! the delivery then. A pure function: no broker, no clock of its own, no I/O; unit-tested
//! without RabbitMQ.
//!
//! | outcome          | messages (in order)                                  | record   | then      |
//! |------------------|------------------------------------------------------|----------|-----------|
//! | created          | `session.created`, until confirmed                   | created  | ack       |
//! | skipped          | none                                                 | –        | ack       |
//! | failed           | dead-letter copy; `session.failed` for a credential  | failed   | ack       |
//! | delayed          | copy to the tier's delay queue                       | parked   | ack       |
//! | returned         | fresh copy to the input queue                        | released | ack       |
//! | already settled  | none                                                 | –        | ack       |
//! | abandoned        | none                                                 | released | – (redelivered) |
//!
//! The record column is how the delivery's claim on its credential ends ([`Settlement`]), once
//! the messages are confirmed and before the ack; only a ready credential has a claim. When a
//! message is not confirmed in time, [`IfUnconfirmed`] says what becomes of the delivery.

pub mod properties;

use std::borrow::Cow;

use lapin::BasicProperties;
use time::OffsetDateTime;

use crate::{
    broker::{Inbound, Seal, Topology, bookkeeping::History},
    events::SessionFailed,
    failure::Failure,
    ledger::{Settlement, parked_for},
    outcome::Outcome,
};

/// What a settlement did, for the log line, the `outcome` label of
/// `bunq_session_worker_deliveries_total` and observers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Settled {
    /// `session.created` confirmed, then acked.
    Created,
    /// Not ready yet: acked.
    Skipped,
    /// The dead-letter copy confirmed (and `session.failed` tried), then acked.
    DeadLettered,
    /// The delayed-retry copy confirmed, then acked.
    Delayed,
    /// A fresh copy in the input queue confirmed, then acked.
    Returned,
    /// A copy could not be confirmed in time: nacked with requeue.
    Requeued,
    /// The delivery's channel is gone: left for the broker to redeliver.
    Abandoned,
    /// `session.created` not confirmed before the drain ended: left unacked.
    Unfinished,
    /// A repeat of an input already settled: acked without a bunq call.
    Repeat,
}

impl Settled {
    /// The label: `created`, `skipped`, `dead_lettered`, `delayed`, `returned`, `requeued`,
    /// `abandoned`, `unfinished` or `already_settled`.
    pub fn as_str(self) -> &'static str {
        match self {
            Settled::Created => "created",
            Settled::Skipped => "skipped",
            Settled::DeadLettered => "dead_lettered",
            Settled::Delayed => "delayed",
            Settled::Returned => "returned",
            Settled::Requeued => "requeued",
            Settled::Abandoned => "abandoned",
            Settled::Unfinished => "unfinished",
            Settled::Repeat => "already_settled",
        }
    }
}

impl std::fmt::Display for Settled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long a publish keeps trying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Patience {
    /// Until confirmed; only the end of the drain (`SHUTDOWN_TIMEOUT_S`) stops it. For
    /// `session.created`: giving up would lose a session whose single-use credential is spent.
    UntilConfirmed,
    /// For `RETRY_MAX_ELAPSED_S`.
    Budget,
}

/// What becomes of the delivery when a message is not confirmed in time.
#[derive(Clone, Debug)]
pub enum IfUnconfirmed {
    /// Leave it unacked: the broker redelivers it when the channel closes
    /// ([`Settled::Unfinished`]).
    LeaveUnacked,
    /// End the claim so (an unconfirmed refusal is kept, so the redelivery does not call bunq
    /// again), then nack it with requeue ([`Settled::Requeued`]): nothing is lost.
    Requeue(Settlement),
    /// Log it and go on: the messages before it already record the outcome.
    GoOn,
}

/// One message to publish with a publisher confirm. Its `Debug` shows neither the body (a
/// `session.created` holds the session token, a copy the input's `token_value`) nor the
/// properties (the producer's headers).
pub struct Message<'a> {
    /// What it is, for logs: `session.created`, `the dead-letter copy`, ….
    pub what: &'static str,
    /// The exchange (empty: the default exchange, straight into the queue named by the key).
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
    /// The body: the input's own for a copy.
    pub body: Cow<'a, [u8]>,
    /// Its properties, within one frame.
    pub properties: BasicProperties,
    /// How long to try.
    pub patience: Patience,
    /// And if it is not confirmed.
    pub if_unconfirmed: IfUnconfirmed,
}

impl std::fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("what", &self.what)
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("body_bytes", &self.body.len())
            .field("patience", &self.patience)
            .field("if_unconfirmed", &self.if_unconfirmed)
            .finish_non_exhaustive()
    }
}

/// A settlement, planned: publish `messages` in order, each confirmed before the next; then
/// end the claim on the credential, then ack (or not).
#[derive(Debug)]
pub struct Plan<'a> {
    /// Published in order.
    pub messages: Vec<Message<'a>>,
    /// How the delivery's claim on its credential ends once every message that must be
    /// confirmed is, before the ack: AMQP does not confirm acks, so even a sent ack may be lost
    /// with the connection and the input come back, to find this in the record.
    pub record: Settlement,
    /// Whether the delivery is acked at the end (not when its channel is gone).
    pub ack: bool,
    /// What the settlement did, when every message was confirmed.
    pub settled: Settled,
}

/// Where and how the worker publishes: the names it declared, the key that seals its
/// bookkeeping, and the connection's negotiated frame size (bytes; 0 means no limit).
#[derive(Clone, Copy, Debug)]
pub struct Addresses<'a> {
    /// The exchanges and queues.
    pub topology: &'a Topology,
    /// Seals delayed-retry and hand-back copies.
    pub seal: &'a Seal,
    /// The frame size a copy's properties must fit (AMQP 0-9-1 §4.2.6.1).
    pub frame_max: u32,
}

/// Plans the settlement of `outcome` for `inbound`, at the wall-clock time `now` (the events'
/// `timestamp`, `x-failed-at`). `claim` is the credential record's generation the delivery
/// worked in (none without a claim): written on a dead letter so a replay names it, and sealed
/// on a parked or handed-back copy so a copy of a settled generation is known for one.
pub fn plan<'a>(
    inbound: &'a Inbound,
    outcome: &Outcome,
    claim: Option<u64>,
    to: Addresses<'_>,
    now: OffsetDateTime,
) -> Plan<'a> {
    let t = to.topology;
    let copy = |what, exchange: &str, routing_key: &str, properties| Message {
        what,
        exchange: exchange.to_owned(),
        routing_key: routing_key.to_owned(),
        body: Cow::Borrowed(&inbound.body[..]),
        properties,
        patience: Patience::Budget,
        if_unconfirmed: IfUnconfirmed::Requeue(Settlement::Released),
    };
    let done = |settled, record| Plan {
        messages: Vec::new(),
        record,
        ack: true,
        settled,
    };
    match outcome {
        Outcome::Created(created) => Plan {
            messages: vec![Message {
                what: "session.created",
                exchange: t.output_exchange.clone(),
                routing_key: "session.created".into(),
                body: Cow::Owned(created.body.clone()),
                properties: properties::event(
                    inbound,
                    "session.created",
                    &created.provision_id,
                    now,
                ),
                patience: Patience::UntilConfirmed,
                if_unconfirmed: IfUnconfirmed::LeaveUnacked,
            }],
            ..done(Settled::Created, Settlement::Created)
        },
        Outcome::Skipped => done(Settled::Skipped, Settlement::Released),
        Outcome::AlreadySettled(_) => done(Settled::Repeat, Settlement::Released),
        Outcome::Abandoned => Plan {
            ack: false,
            ..done(Settled::Abandoned, Settlement::Released)
        },
        Outcome::Failed(failure) => {
            let mut dead_letter = copy(
                "the dead-letter copy",
                &t.dead_letter_exchange,
                &inbound.routing_key,
                properties::dead_letter(inbound, failure, claim.unwrap_or(0), now, to.frame_max),
            );
            // Not confirmed: kept in the record, so the requeued delivery settles this failure
            // again without calling bunq.
            dead_letter.if_unconfirmed =
                IfUnconfirmed::Requeue(Settlement::Answered(failure.clone()));
            let mut messages = vec![dead_letter];
            messages.extend(session_failed(inbound, failure, t, now));
            // Final for this generation: a copy anywhere is acked without a call; a replay of
            // the dead letter (it names the generation) starts the next one.
            let spent = failure.reason.spends_the_credential();
            Plan {
                messages,
                ..done(Settled::DeadLettered, Settlement::Failed { spent })
            }
        }
        Outcome::Delayed(d) => {
            let history = History {
                round: d.retries,
                calls_before: d.calls,
                first_attempt_at: Some(d.first_attempt_at),
                returns: inbound.history.returns,
                not_before: d.not_before,
                waits: inbound.history.waits + u32::from(d.window),
                generation: claim.or(inbound.history.generation),
            };
            // Through the default exchange straight into the tier's delay queue (its TTL), or
            // the window queue (the copy's own expiration); either dead-letters the copy back
            // to the input queue when the time is up.
            let mut properties = properties::bookkept(inbound, &history, to.seal, to.frame_max);
            if d.window {
                properties = properties.with_expiration(d.delay.as_millis().to_string().into());
            }
            let parked = copy(
                "the delayed-retry copy",
                "",
                &t.parking_queue(d),
                properties,
            );
            Plan {
                messages: vec![parked],
                ..done(
                    Settled::Delayed,
                    Settlement::Parked {
                        round: d.retries,
                        stale_for: parked_for(d.delay),
                    },
                )
            }
        }
        Outcome::Returned { counted } => {
            let history = History {
                returns: inbound.history.returns + u32::from(*counted),
                generation: claim.or(inbound.history.generation),
                ..inbound.history.clone()
            };
            // Straight back into the input queue through the default exchange.
            let returned = copy(
                "the hand-back copy",
                "",
                &t.input_queue,
                properties::bookkept(inbound, &history, to.seal, to.frame_max),
            );
            Plan {
                messages: vec![returned],
                ..done(Settled::Returned, Settlement::Released)
            }
        }
    }
}

/// `session.failed`, for a ready credential: tried within the budget; if it cannot be routed
/// the dead letter still records the failure.
fn session_failed<'a>(
    inbound: &Inbound,
    f: &Failure,
    t: &Topology,
    now: OffsetDateTime,
) -> Option<Message<'a>> {
    let ready = inbound.credential()?;
    let event = SessionFailed {
        provision: ready,
        failure: f,
    };
    let provision_id = ready.provision_id.to_string();
    Some(Message {
        what: "session.failed",
        exchange: t.output_exchange.clone(),
        routing_key: "session.failed".into(),
        body: Cow::Owned(serde_json::to_vec(&event).expect("SessionFailed always serialises")),
        properties: properties::event(inbound, "session.failed", &provision_id, now),
        patience: Patience::Budget,
        if_unconfirmed: IfUnconfirmed::GoOn,
    })
}

#[cfg(test)]
mod tests;
