//! The AMQP properties of what the worker publishes: output events and its copies of an input
//! (dead letter, delayed retry, hand-back).

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use time::OffsetDateTime;

use crate::{
    broker::{GENERATION_HEADER, Inbound, Seal, bookkeeping::History, headers::long},
    events,
    failure::Failure,
    identity,
};

/// Value of the `app_id` property on everything the worker publishes.
pub const APP_ID: &str = "bunq-session-worker";

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

/// Properties of an output event (`session.created` / `session.failed`): persistent, JSON,
/// `type` = `event_type`, a deterministic `message_id` ([`identity::output_message_id`]), the
/// input's `correlation_id` (else its `message_id`, else the provision id), the time `now` in
/// s, [`APP_ID`], and the input's W3C `traceparent` header when it had one.
pub fn event(
    inbound: &Inbound,
    event_type: &str,
    provision_id: &str,
    now: OffsetDateTime,
) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_type(event_type.into())
        .with_message_id(identity::output_message_id(event_type, &inbound.identity).into())
        .with_correlation_id(inbound.correlation_id(provision_id))
        .with_timestamp(now.unix_timestamp().max(0) as u64)
        .with_app_id(APP_ID.into());
    if let Some(tp) = &inbound.traceparent {
        let mut headers = FieldTable::default();
        headers.insert("traceparent".into(), long(tp));
        props = props.with_headers(headers);
    }
    props
}

/// The dead-letter copy's properties: the input's plus `x-error-reason`, `x-error-detail`,
/// `x-attempts`, `x-original-exchange`, `x-original-routing-key`, `x-failed-at` (RFC 3339,
/// `now`) and, for a credential, `x-credential-generation` (`generation`: a replay names it).
pub fn dead_letter(
    inbound: &Inbound,
    failure: &Failure,
    generation: u64,
    now: OffsetDateTime,
    frame_max: u32,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("x-error-reason".into(), long(failure.reason.as_str()));
    headers.insert("x-error-detail".into(), long(&failure.detail));
    headers.insert(
        "x-attempts".into(),
        AMQPValue::LongLongInt(i64::from(failure.attempts)),
    );
    let route = &inbound.original_route;
    headers.insert("x-original-exchange".into(), long(&route.exchange));
    headers.insert("x-original-routing-key".into(), long(&route.routing_key));
    headers.insert("x-failed-at".into(), long(&events::rfc3339(now)));
    if inbound.credential().is_some() {
        headers.insert(
            GENERATION_HEADER.into(),
            AMQPValue::LongLongInt(i64::try_from(generation).unwrap_or(i64::MAX)),
        );
    }
    copy(inbound, headers, frame_max)
}

/// A delayed-retry or hand-back copy's properties: the input's, with `history` in the worker's
/// sealed bookkeeping headers (round, calls, original route, first attempt time, returns, the
/// end of a 429 window).
pub fn bookkept(
    inbound: &Inbound,
    history: &History,
    seal: &Seal,
    frame_max: u32,
) -> BasicProperties {
    let own = seal.headers(&inbound.identity, history, &inbound.original_route);
    copy(inbound, own, frame_max)
}

/// Properties for a copy of the input that the worker publishes itself (dead letter, delayed
/// retry, hand-back): the input's, its producer's headers with the worker's `own` added, minus
/// what would make the copy vanish or be refused. RabbitMQ's own dead-lettering drops
/// `expiration` likewise (<https://www.rabbitmq.com/docs/dlx>); a `user_id` that is not the
/// worker's own login makes the broker refuse the publish
/// (<https://www.rabbitmq.com/docs/validated-user-id>), so it is kept as the header
/// `x-original-user-id`.
///
/// Properties travel in one frame of at most `frame_max` bytes (AMQP 0-9-1 §4.2.6.1), and a
/// larger one makes the broker close the connection: were the producer's headers too large to
/// fit beside the worker's, every try would fail the same way. They are then left out, and
/// `x-producer-headers-dropped` says how large they were. `frame_max` 0 means no limit.
fn copy(inbound: &Inbound, own: FieldTable, frame_max: u32) -> BasicProperties {
    let whole = copy_with(inbound, inbound.producer_headers(), &own);
    let size = encoded_size(&whole);
    let room = (frame_max as usize).saturating_sub(HEADER_FRAME_OVERHEAD + BROKER_HEADERS_RESERVE);
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
    copy_with(inbound, note, &own)
}

fn copy_with(inbound: &Inbound, base: FieldTable, own: &FieldTable) -> BasicProperties {
    let mut headers = base;
    for (k, v) in own.inner() {
        headers.insert(k.clone(), v.clone());
    }
    let input = &inbound.properties;
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

/// Encoded size of `props` in a content header frame, bytes, by lapin's own encoder; `None` when
/// it cannot be encoded.
pub fn encoded_size(props: &BasicProperties) -> Option<usize> {
    cookie_factory::r#gen(
        lapin::protocol::basic::gen_properties(props),
        Vec::with_capacity(256),
    )
    .ok()
    .map(|(_, written)| written as usize)
}
