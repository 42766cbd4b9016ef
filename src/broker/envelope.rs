//! The AMQP envelope: what the worker reads from a delivery, once, and the properties of what it
//! publishes (output events, dead-letter copies, delayed-retry copies).
//!
//! An [`Inbound`] is read from a lapin `Delivery` in one pass: the decoded body, the input's
//! identity, the worker's own `x-bunq-*` bookkeeping headers, the original route, the
//! redelivered flag and the broker's `x-delivery-count`. Nothing downstream reads a header again,
//! and [`crate::process`] sees no lapin type.

use lapin::{
    BasicProperties,
    message::Delivery,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use time::OffsetDateTime;

use crate::{
    events::{self, Decoded, InputError},
    identity::{self, Key},
    outcome::{Delayed, Failure},
};

/// Value of the `app_id` property on everything the worker publishes.
pub const APP_ID: &str = "bunq-session-worker";

/// Header with the exchange an input was first published to, kept across delayed retries.
pub const ORIGINAL_EXCHANGE_HEADER: &str = "x-bunq-original-exchange";
/// Header with the routing key an input was first published with, kept across delayed retries.
pub const ORIGINAL_ROUTING_KEY_HEADER: &str = "x-bunq-original-routing-key";
/// Header with the first bunq call's time (RFC 3339), kept across delayed retries.
pub const FIRST_ATTEMPT_HEADER: &str = "x-bunq-first-attempt-at";
/// Header counting the delayed retries an input has been through.
pub const DELAYED_RETRIES_HEADER: &str = "x-bunq-delayed-retries";
/// Header carrying the bunq calls made for an input before its latest delayed retry.
pub const CALLS_HEADER: &str = "x-bunq-calls";
/// Header with the end of a pause bunq asked for (RFC 3339): a delayed retry calls no earlier.
pub const NOT_BEFORE_HEADER: &str = "x-bunq-not-before";
/// Header counting the worker's own hand-backs of an input (fresh copies instead of a requeue).
pub const RETURNS_HEADER: &str = "x-bunq-returns";
/// Header a quorum queue sets on a redelivered message: how often it was returned
/// (<https://www.rabbitmq.com/docs/quorum-queues#poison-message-handling>).
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// Header sealing the worker's bookkeeping headers: hex HMAC-SHA-256 (RFC 2104) of their values
/// and the input's identity, keyed by a secret only the worker's installation holds.
pub const SEAL_HEADER: &str = "x-bunq-seal";

/// The key that seals the worker's own bookkeeping headers (`x-bunq-*`), so a producer cannot
/// forge them: headers it sets are ignored, and a message whose seal does not verify counts as
/// a fresh input. Replicas with the same API context share the key.
pub struct Seal(aws_lc_rs::hmac::Key);

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seal")
    }
}

impl Seal {
    /// A seal keyed by `secret` (at least 32 bytes of a secret the installation holds).
    pub fn new(secret: &[u8]) -> Self {
        Self(aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            secret,
        ))
    }

    fn tag(&self, identity: &Key, h: &History, route: &Route) -> String {
        hex::encode(aws_lc_rs::hmac::sign(
            &self.0,
            canonical(identity, h, route).as_bytes(),
        ))
    }

    fn verifies(&self, identity: &Key, h: &History, route: &Route, tag: &str) -> bool {
        hex::decode(tag.trim()).is_ok_and(|t| {
            aws_lc_rs::hmac::verify(&self.0, canonical(identity, h, route).as_bytes(), &t).is_ok()
        })
    }
}

/// The sealed text: every bookkeeping value in a fixed order, separated by a byte no value holds.
fn canonical(identity: &Key, h: &History, route: &Route) -> String {
    let time = |t: Option<OffsetDateTime>| t.map(events::rfc3339).unwrap_or_default();
    format!(
        "{}\u{1}{}\u{1}{}\u{1}{}\u{1}{}\u{1}{}\u{1}{}\u{1}{}",
        hex::encode(identity),
        h.round,
        h.calls_before,
        time(h.first_attempt_at),
        h.returns,
        time(h.not_before),
        route.exchange,
        route.routing_key
    )
}

/// The worker's bookkeeping headers for a copy, sealed.
fn bookkeeping(seal: &Seal, identity: &Key, h: &History, route: &Route) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        DELAYED_RETRIES_HEADER.into(),
        AMQPValue::LongLongInt(h.round.into()),
    );
    headers.insert(
        CALLS_HEADER.into(),
        AMQPValue::LongLongInt(h.calls_before.into()),
    );
    headers.insert(
        RETURNS_HEADER.into(),
        AMQPValue::LongLongInt(h.returns.into()),
    );
    if let Some(t) = h.first_attempt_at {
        headers.insert(FIRST_ATTEMPT_HEADER.into(), long(&events::rfc3339(t)));
    }
    if let Some(t) = h.not_before {
        headers.insert(NOT_BEFORE_HEADER.into(), long(&events::rfc3339(t)));
    }
    headers.insert(ORIGINAL_EXCHANGE_HEADER.into(), long(&route.exchange));
    headers.insert(ORIGINAL_ROUTING_KEY_HEADER.into(), long(&route.routing_key));
    headers.insert(SEAL_HEADER.into(), long(&seal.tag(identity, h, route)));
    headers
}

/// An AMQP long-string value (header or argument).
pub fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Where a producer published an input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The exchange (empty for the default exchange).
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
}

/// What earlier rounds of an input left in its bookkeeping headers; all zero for a fresh input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// Delayed retries this input has been through (`x-bunq-delayed-retries`).
    pub round: u32,
    /// bunq calls made in earlier rounds (`x-bunq-calls`).
    pub calls_before: u32,
    /// When the first bunq call for this input started, over all rounds
    /// (`x-bunq-first-attempt-at`).
    pub first_attempt_at: Option<OffsetDateTime>,
    /// Times the worker handed it back (`x-bunq-returns`).
    pub returns: u32,
    /// The end of a pause bunq asked for in an earlier round (`x-bunq-not-before`).
    pub not_before: Option<OffsetDateTime>,
}

/// A delivery as the worker reads it, once.
#[derive(Debug)]
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
    /// The producer's `message_id`, shortened and escaped for logs.
    pub message_id: String,
    properties: BasicProperties,
}

impl Inbound {
    /// Reads `delivery` (taking its body) and decodes the body with the `max_bytes` limit
    /// (`MAX_MESSAGE_BYTES`).
    ///
    /// The worker's bookkeeping headers count only when `seal` verifies them (they were written
    /// by a replica of this installation); otherwise the input is fresh, whatever its producer
    /// set. The broker's `x-delivery-count` counts only on a redelivery.
    pub fn read(delivery: &mut Delivery, max_bytes: usize, seal: &Seal) -> Self {
        let body = std::mem::take(&mut delivery.data);
        let decoded = events::decode(&body, max_bytes);
        let identity = identity::identity(&body, &decoded);
        let p = &delivery.properties;
        let own_route = Route {
            exchange: delivery.exchange.to_string(),
            routing_key: delivery.routing_key.to_string(),
        };
        let claimed_route = Route {
            exchange: str_header(p, ORIGINAL_EXCHANGE_HEADER)
                .unwrap_or_else(|| own_route.exchange.clone()),
            routing_key: str_header(p, ORIGINAL_ROUTING_KEY_HEADER)
                .unwrap_or_else(|| own_route.routing_key.clone()),
        };
        let claimed = History {
            round: int_header(p, DELAYED_RETRIES_HEADER).unwrap_or(0),
            calls_before: int_header(p, CALLS_HEADER).unwrap_or(0),
            first_attempt_at: str_header(p, FIRST_ATTEMPT_HEADER)
                .as_deref()
                .and_then(events::parse_time),
            returns: int_header(p, RETURNS_HEADER).unwrap_or(0),
            not_before: str_header(p, NOT_BEFORE_HEADER)
                .as_deref()
                .and_then(events::parse_time),
        };
        let sealed = str_header(p, SEAL_HEADER)
            .is_some_and(|tag| seal.verifies(&identity, &claimed, &claimed_route, &tag));
        let (history, original_route) = if sealed {
            (claimed, claimed_route)
        } else {
            (History::default(), own_route)
        };
        Self {
            identity,
            decoded,
            history,
            original_route,
            routing_key: delivery.routing_key.to_string(),
            redelivered: delivery.redelivered,
            delivery_count: if delivery.redelivered {
                int_header(p, DELIVERY_COUNT_HEADER)
            } else {
                None
            },
            message_id: p
                .message_id()
                .as_ref()
                .map(|m| events::log_safe(m.as_str()))
                .unwrap_or_default(),
            properties: p.clone(),
            body,
        }
    }

    /// Times this input was handed back without an outcome: the worker's own hand-backs and
    /// the broker's redeliveries together (what `DELIVERY_LIMIT` bounds).
    pub fn handed_back(&self) -> u32 {
        self.history
            .returns
            .saturating_add(self.delivery_count.unwrap_or(0))
    }

    /// Properties of an output event (`session.created` / `session.failed`): persistent, JSON,
    /// `type` = `event_type`, a deterministic `message_id` ([`identity::output_message_id`]), the
    /// input's `correlation_id` (else its `message_id`, else the provision id), the time in s,
    /// [`APP_ID`], and the input's W3C `traceparent` header when it had one (a string of at most
    /// [`TRACEPARENT_MAX_BYTES`]).
    pub fn output_properties(&self, event_type: &str, provision_id: &str) -> BasicProperties {
        let input = &self.properties;
        let correlation_id = input
            .correlation_id()
            .clone()
            .or_else(|| input.message_id().clone())
            .unwrap_or_else(|| ShortString::from(provision_id.to_owned()));
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_type(event_type.into())
            .with_message_id(identity::output_message_id(event_type, &self.identity).into())
            .with_correlation_id(correlation_id)
            .with_timestamp(OffsetDateTime::now_utc().unix_timestamp().max(0) as u64)
            .with_app_id(APP_ID.into());
        // Only what can be a W3C trace context: an arbitrary value from the producer could
        // make the event's properties too large for a frame.
        if let Some(tp) =
            str_header(input, "traceparent").filter(|tp| tp.len() <= TRACEPARENT_MAX_BYTES)
        {
            let mut headers = FieldTable::default();
            headers.insert("traceparent".into(), long(&tp));
            props = props.with_headers(headers);
        }
        props
    }

    /// The dead-letter copy's properties: the input's plus `x-error-reason`, `x-error-detail`,
    /// `x-attempts`, `x-original-exchange`, `x-original-routing-key` and `x-failed-at`
    /// (RFC 3339).
    pub fn dead_letter_properties(&self, failure: &Failure, frame_max: u32) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert("x-error-reason".into(), long(failure.reason.as_str()));
        headers.insert("x-error-detail".into(), long(&failure.detail));
        headers.insert(
            "x-attempts".into(),
            AMQPValue::LongLongInt(i64::from(failure.attempts)),
        );
        headers.insert(
            "x-original-exchange".into(),
            long(&self.original_route.exchange),
        );
        headers.insert(
            "x-original-routing-key".into(),
            long(&self.original_route.routing_key),
        );
        headers.insert(
            "x-failed-at".into(),
            long(&events::rfc3339(OffsetDateTime::now_utc())),
        );
        self.copy_properties(headers, frame_max)
    }

    /// The delayed-retry copy's properties: the input's plus the worker's sealed bookkeeping
    /// headers (round, calls, original route, first attempt time, the end of a 429 window).
    pub fn delayed_properties(&self, d: &Delayed, seal: &Seal, frame_max: u32) -> BasicProperties {
        let history = History {
            round: d.retries,
            calls_before: d.calls,
            first_attempt_at: Some(d.first_attempt_at),
            returns: self.history.returns,
            not_before: d.not_before,
        };
        self.bookkept_copy(&history, seal, frame_max)
    }

    /// A hand-back copy's properties: the input's, its sealed bookkeeping with `x-bunq-returns`
    /// = `returns`, without the broker's redelivery count and dead-lettering history.
    pub fn returned_properties(
        &self,
        returns: u32,
        seal: &Seal,
        frame_max: u32,
    ) -> BasicProperties {
        let history = History {
            returns,
            ..self.history.clone()
        };
        self.bookkept_copy(&history, seal, frame_max)
    }

    /// A copy carrying `history` in the worker's sealed bookkeeping headers.
    fn bookkept_copy(&self, history: &History, seal: &Seal, frame_max: u32) -> BasicProperties {
        let own = bookkeeping(seal, &self.identity, history, &self.original_route);
        self.copy_properties(own, frame_max)
    }

    /// Properties for a copy of the input that the worker publishes itself (dead letter, delayed
    /// retry, hand-back): the input's, its producer's headers with the worker's `own` added,
    /// minus what would make the copy vanish or be refused. RabbitMQ's own dead-lettering drops
    /// `expiration` likewise (<https://www.rabbitmq.com/docs/dlx>); a `user_id` that is not the
    /// worker's own login makes the broker refuse the publish
    /// (<https://www.rabbitmq.com/docs/validated-user-id>), so it is kept as the header
    /// `x-original-user-id`.
    ///
    /// Properties travel in one frame of at most `frame_max` bytes (AMQP 0-9-1 §4.2.6.1), and a
    /// larger one makes the broker close the connection: were the producer's headers too large
    /// to fit beside the worker's, every try would fail the same way. They are then left out,
    /// and `x-producer-headers-dropped` says how large they were.
    fn copy_properties(&self, own: FieldTable, frame_max: u32) -> BasicProperties {
        let whole = self.copy_with(self.producer_headers(), &own);
        let size = properties_size(&whole);
        let room =
            (frame_max as usize).saturating_sub(HEADER_FRAME_OVERHEAD + BROKER_HEADERS_RESERVE);
        if frame_max == 0 || size.is_some_and(|s| s <= room) {
            return whole;
        }
        let mut note = FieldTable::default();
        note.insert(
            PRODUCER_HEADERS_DROPPED_HEADER.into(),
            long(&format!(
                "the input's headers were left out: with them this copy's properties take {} bytes, more than the {room} bytes one AMQP frame of {frame_max} bytes holds with room for the headers the broker adds (x-death, x-delivery-count)",
                size.map_or_else(|| "too many".to_owned(), |s| s.to_string())
            )),
        );
        self.copy_with(note, &own)
    }

    fn copy_with(&self, base: FieldTable, own: &FieldTable) -> BasicProperties {
        let mut headers = base;
        for (k, v) in own.inner() {
            headers.insert(k.clone(), v.clone());
        }
        let input = &self.properties;
        if let Some(user) = input.user_id() {
            headers.insert("x-original-user-id".into(), long(user.as_str()));
        }
        let mut props = BasicProperties::default()
            .with_headers(headers)
            .with_delivery_mode(2);
        macro_rules! keep {
            ($($get:ident => $with:ident),*) => {
                $(if let Some(v) = input.$get().clone() { props = props.$with(v); })*
            };
        }
        keep!(content_type => with_content_type, content_encoding => with_content_encoding,
              priority => with_priority, correlation_id => with_correlation_id,
              reply_to => with_reply_to, message_id => with_message_id, timestamp => with_timestamp,
              kind => with_type, app_id => with_app_id, cluster_id => with_cluster_id);
        props
    }

    /// The input's headers as its producer set them: without the worker's own bookkeeping
    /// (`x-bunq-*`) and without the broker's dead-lettering history (`x-death`,
    /// `x-first-death-*`, `x-last-death-*`) from a delay queue, so a dead letter tells its own
    /// story and can be replayed as a fresh input.
    fn producer_headers(&self) -> FieldTable {
        let mut out = FieldTable::default();
        if let Some(h) = self.properties.headers() {
            for (k, v) in h.inner() {
                let k_str = k.as_str();
                if k_str.starts_with("x-bunq-") || k_str == DELIVERY_COUNT_HEADER || is_death(k_str)
                {
                    continue;
                }
                out.insert(k.clone(), v.clone());
            }
        }
        out
    }
}

/// Says a copy's producer headers were left out, and why.
pub const PRODUCER_HEADERS_DROPPED_HEADER: &str = "x-producer-headers-dropped";

/// A content header frame's bytes besides the properties: the frame's type, channel and size
/// (7) and end (1), the class id, weight and body size (12) (AMQP 0-9-1 §4.2.3, §4.2.6.1).
const HEADER_FRAME_OVERHEAD: usize = 20;

/// Room kept in a copy's frame for the headers the broker adds to it later, bytes: a delay
/// queue's dead-lettering writes `x-death` (a table per queue and reason, names of up to 255
/// bytes) and six `x-first-death-*` / `x-last-death-*` headers, a quorum queue's redelivery
/// `x-delivery-count`; about 2.5 KiB at most. A copy that fits only without them would come back
/// too large for the worker's own frames.
const BROKER_HEADERS_RESERVE: usize = 4096;

/// Longest `traceparent` carried onto an output event, bytes; a W3C version-00 value is 55
/// (<https://www.w3.org/TR/trace-context/#traceparent-header>).
pub const TRACEPARENT_MAX_BYTES: usize = 512;

/// Encoded size of `props` in a content header frame, bytes, by lapin's own encoder; `None` when
/// it cannot be encoded.
fn properties_size(props: &BasicProperties) -> Option<usize> {
    cookie_factory::r#gen(
        lapin::protocol::basic::gen_properties(props),
        Vec::with_capacity(256),
    )
    .ok()
    .map(|(_, written)| written as usize)
}

/// The broker's dead-lettering history headers.
fn is_death(name: &str) -> bool {
    name == "x-death" || name.starts_with("x-first-death-") || name.starts_with("x-last-death-")
}

/// A string header (long or short string).
fn str_header(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// An integer header (any AMQP integer type, or a decimal string) that fits a `u32`.
fn int_header(props: &BasicProperties, name: &str) -> Option<u32> {
    let v = props.headers().as_ref()?.inner().get(name)?;
    let n: i64 = match v {
        AMQPValue::ShortShortInt(i) => (*i).into(),
        AMQPValue::ShortShortUInt(i) => (*i).into(),
        AMQPValue::ShortInt(i) => (*i).into(),
        AMQPValue::ShortUInt(i) => (*i).into(),
        AMQPValue::LongInt(i) => (*i).into(),
        AMQPValue::LongUInt(i) => (*i).into(),
        AMQPValue::LongLongInt(i) => *i,
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes())
            .ok()?
            .trim()
            .parse()
            .ok()?,
        _ => return None,
    };
    u32::try_from(n).ok()
}
