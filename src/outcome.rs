//! What became of a delivery, decided and not yet carried out: plain values.
//!
//! [`crate::decide`] is the only code that makes an [`Outcome`]; [`crate::plan`] turns it into
//! the messages to publish and the settlement to make; [`crate::settle`] carries that out
//! (publish, wait for the publisher confirms, then ack), so the ordering rule lives in one place.

use crate::{events::SessionCreated, failure::Failure, ledger::Taken};

/// The result of handling one delivery, before any broker action.
#[derive(Debug)]
pub enum Outcome {
    /// A session exists: publish `session.created`, then ack.
    Created(Box<Created>),
    /// Valid but not ready: ack and count as skipped.
    Skipped,
    /// Permanent failure: publish the delivery to the dead-letter exchange with the reason
    /// headers, then `session.failed` when the input is a ready credential, then ack.
    Failed(Box<Failure>),
    /// Transient failures spent the in-process budget but the credential has time: publish a
    /// copy to a delay queue (confirmed), then ack; it comes back through the input exchange.
    Delayed(Box<Delayed>),
    /// The work stopped before a session existed and the delivery's channel is gone: do nothing;
    /// the broker redelivers it. (At shutdown the decision is [`Outcome::Returned`] instead.)
    Abandoned,
    /// Hand the delivery back for later: publish a fresh copy to the input queue (confirmed),
    /// then ack. The broker's own requeue would count toward a quorum queue's delivery limit and
    /// in the end drop the input without the worker's reason.
    Returned {
        /// Whether this return counts toward `DELIVERY_LIMIT` (not when the breaker is open:
        /// that is no fault of the input's).
        counted: bool,
    },
    /// A copy of a credential whose record says its outcome is already safe at the broker
    /// (created or failed, or a later round parked): ack, no bunq call, no event.
    AlreadySettled(Taken),
}

/// A session bunq opened, ready to publish: the exact `session.created` body (what is staged in
/// the credential's record before it is published), and what the delivery's log line names.
/// `Debug` shows the body's length only (it may hold the session token in clear).
pub struct Created {
    /// The `session.created` body, JSON.
    pub body: Vec<u8>,
    /// The provision's id, as text.
    pub provision_id: String,
    /// bunq's session id.
    pub session_id: i64,
    /// The provisioned user's id, when bunq's user part was read.
    pub user_id: Option<i64>,
}

impl std::fmt::Debug for Created {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Created")
            .field("body_bytes", &self.body.len())
            .field("provision_id", &self.provision_id)
            .field("session_id", &self.session_id)
            .field("user_id", &self.user_id)
            .finish()
    }
}

impl Created {
    /// The event, serialised once.
    pub fn from_event(e: &SessionCreated) -> Self {
        Self {
            body: serde_json::to_vec(e).expect("SessionCreated always serialises"),
            provision_id: e.provision_id.to_string(),
            session_id: e.session_id,
            user_id: e.user_id,
        }
    }

    /// A staged body read back from the credential's record; `None` when it is not a
    /// `session.created` body.
    pub fn from_body(body: Vec<u8>) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
        let provision_id = match &v["provision_id"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => return None,
        };
        let session_id = v["session_id"].as_i64()?;
        let user_id = v["user_id"].as_i64();
        Some(Self {
            body,
            provision_id,
            session_id,
            user_id,
        })
    }
}

/// A delivery parked for a durable delayed retry.
#[derive(Debug)]
pub struct Delayed {
    /// The tier's delay (its delay queue is `<input queue>.retry-<seconds>s`), or, for a
    /// window wait, the time left until `not_before`.
    pub delay: std::time::Duration,
    /// Waits for bunq's window (until `not_before`) in the window queue
    /// (`<input queue>.wait`, per-message expiration) rather than a tier: not charged to
    /// `DELAYED_RETRY_DELAYS_S`.
    pub window: bool,
    /// Delayed retries including this one (the `x-bunq-delayed-retries` header).
    pub retries: u32,
    /// bunq calls made so far, all rounds together (the `x-bunq-calls` header).
    pub calls: u32,
    /// Why the in-process retries ended, no secrets.
    pub detail: String,
    /// When the first bunq call for this input started, over all rounds.
    pub first_attempt_at: time::OffsetDateTime,
    /// When a pause bunq asked for ends (`x-bunq-not-before`): the copy makes no call before.
    pub not_before: Option<time::OffsetDateTime>,
}
