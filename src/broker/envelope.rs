//! The AMQP envelope of a delivery, read once.
//!
//! An [`Inbound`] is read from a lapin `Delivery` in one pass: the decoded body, the input's
//! identity, the worker's own sealed bookkeeping ([`super::bookkeeping`]), the original route,
//! the redelivered flag, the broker's `x-delivery-count`, and what a copy or an output event
//! carries over from the input (its properties, its producer's headers, its `traceparent`).
//! Nothing downstream reads a header again, and [`crate::decide`] sees no lapin type.

use lapin::{
    BasicProperties,
    message::Delivery,
    types::{FieldTable, ShortString},
};

use super::{
    bookkeeping::{History, Route, Seal, is_bookkeeping},
    headers::{int_header, str_header},
    topology::QueueType,
};
use crate::{
    events::{self, Decoded, InputError, ProvisionReady},
    identity::{self, Key},
};

/// Header a quorum queue sets on a redelivered message: how often it was returned
/// (<https://www.rabbitmq.com/docs/quorum-queues#poison-message-handling>).
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// Header of a dead letter naming the generation of the credential's record that failed
/// ([`crate::ledger`]): a dead letter replayed into the input queue carries it back, which is
/// how a replay is told from a mere repeat of a failed credential.
pub const GENERATION_HEADER: &str = "x-credential-generation";

/// Longest `traceparent` carried onto an output event, bytes; a W3C version-00 value is 55
/// (<https://www.w3.org/TR/trace-context/#traceparent-header>).
pub const TRACEPARENT_MAX_BYTES: usize = 512;

/// A delivery as the worker reads it, once. Its `Debug` shows neither the body (it holds the
/// credential's `token_value`) nor the properties (the producer's headers).
pub struct Inbound {
    /// The body, as received.
    pub body: Vec<u8>,
    /// The body decoded (or why it could not be).
    pub decoded: Result<Decoded, InputError>,
    /// The input's identity ([`identity::identity`]).
    pub identity: Key,
    /// Earlier rounds of this input (delayed retries).
    pub history: History,
    /// Where the producer published it (kept across delayed retries).
    pub original_route: Route,
    /// The routing key of this delivery (a copy back from a delay queue has the queue's name).
    pub routing_key: String,
    /// AMQP's redelivered flag.
    pub redelivered: bool,
    /// The broker's `x-delivery-count`, when a quorum queue set it.
    pub delivery_count: Option<u32>,
    /// The generation a replayed dead letter names ([`GENERATION_HEADER`], with its
    /// `x-error-reason`): a copy that carries it asks for a fresh try of a failed credential.
    pub replay_of: Option<u64>,
    /// The producer's `message_id`, shortened and escaped for logs.
    pub message_id: String,
    /// The input's W3C `traceparent` header, when it is a string of at most
    /// [`TRACEPARENT_MAX_BYTES`]: an arbitrary value from the producer could make an output
    /// event's properties too large for a frame.
    pub traceparent: Option<String>,
    /// The input's properties, as received (a copy keeps most of them).
    pub properties: BasicProperties,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("body_bytes", &self.body.len())
            .field("decoded", &self.decoded)
            .field("history", &self.history)
            .field("original_route", &self.original_route)
            .field("routing_key", &self.routing_key)
            .field("redelivered", &self.redelivered)
            .field("delivery_count", &self.delivery_count)
            .field("replay_of", &self.replay_of)
            .field("message_id", &self.message_id)
            .field("traceparent", &self.traceparent)
            .finish_non_exhaustive()
    }
}

impl Inbound {
    /// Reads `delivery` (taking its body) and decodes the body with the `max_bytes` limit
    /// (`MAX_MESSAGE_BYTES`).
    ///
    /// The worker's bookkeeping headers count only when `seal` verifies them (they were written
    /// by a replica of this installation); otherwise the input is fresh, whatever its producer
    /// set. `x-delivery-count` counts only on a redelivery from a quorum queue (`queue_type`),
    /// where the broker writes it; a classic queue never does, so there it can only be a
    /// producer's.
    pub fn read(
        delivery: &mut Delivery,
        max_bytes: usize,
        seal: &Seal,
        queue_type: QueueType,
    ) -> Self {
        let body = std::mem::take(&mut delivery.data);
        let decoded = events::decode(&body, max_bytes);
        let identity = identity::identity(&body, &decoded);
        let p = &delivery.properties;
        let own_route = Route {
            exchange: delivery.exchange.to_string(),
            routing_key: delivery.routing_key.to_string(),
        };
        let (history, original_route) = seal.read(p, &identity, own_route);
        Self {
            identity,
            decoded,
            history,
            original_route,
            routing_key: delivery.routing_key.to_string(),
            redelivered: delivery.redelivered,
            delivery_count: if delivery.redelivered && queue_type == QueueType::Quorum {
                int_header(p, DELIVERY_COUNT_HEADER)
            } else {
                None
            },
            replay_of: str_header(p, "x-error-reason")
                .and_then(|_| int_header(p, GENERATION_HEADER))
                .map(u64::from),
            message_id: p
                .message_id()
                .as_ref()
                .map(|m| events::log_safe(m.as_str()))
                .unwrap_or_default(),
            traceparent: str_header(p, "traceparent")
                .filter(|tp| tp.len() <= TRACEPARENT_MAX_BYTES),
            properties: p.clone(),
            body,
        }
    }

    /// The ready credential this input carries, if it is one: the only kind that goes to bunq,
    /// is claimed and passes the breaker.
    pub fn credential(&self) -> Option<&ProvisionReady> {
        match &self.decoded {
            Ok(Decoded::Ready(r)) => Some(r),
            _ => None,
        }
    }

    /// The input's headers as its producer set them: without the worker's own bookkeeping
    /// (`x-bunq-*`), the broker's redelivery count and its dead-lettering history (`x-death`,
    /// `x-first-death-*`, `x-last-death-*`, from a delay queue), so a copy tells its own story
    /// and a dead letter can be replayed as a fresh input.
    /// Built only for a copy the worker publishes, not on every delivery.
    pub fn producer_headers(&self) -> FieldTable {
        let mut out = FieldTable::default();
        if let Some(h) = self.properties.headers() {
            for (k, v) in h.inner() {
                let name = k.as_str();
                if is_bookkeeping(name) || name == DELIVERY_COUNT_HEADER || is_death(name) {
                    continue;
                }
                out.insert(k.clone(), v.clone());
            }
        }
        out
    }

    /// Times this input was handed back without an outcome: the worker's own hand-backs and
    /// the broker's redeliveries together (what `DELIVERY_LIMIT` bounds).
    pub fn handed_back(&self) -> u32 {
        self.history
            .returns
            .saturating_add(self.delivery_count.unwrap_or(0))
    }

    /// The `correlation_id` of an event about this input: the input's own, else its
    /// `message_id`, else `provision_id`.
    pub fn correlation_id(&self, provision_id: &str) -> ShortString {
        let input = &self.properties;
        input
            .correlation_id()
            .clone()
            .or_else(|| input.message_id().clone())
            .unwrap_or_else(|| ShortString::from(provision_id.to_owned()))
    }
}

/// The broker's dead-lettering history headers.
fn is_death(name: &str) -> bool {
    name == "x-death" || name.starts_with("x-first-death-") || name.starts_with("x-last-death-")
}
