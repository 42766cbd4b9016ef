//! The worker's own bookkeeping headers (`x-bunq-*`) on the copies it publishes of an input
//! (delayed retries, hand-backs), sealed so a producer cannot forge them.
//!
//! Written by [`crate::plan`] on a copy, read back by [`super::Inbound::read`] when the copy
//! returns: the format and its seal live here, in one place.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use time::OffsetDateTime;

use super::headers::{int_header, long, str_header};
use crate::{events, identity::Key};

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
/// Header counting the rounds an input spent waiting for a window bunq asked for, in the
/// window queue: counted in [`DELAYED_RETRIES_HEADER`] too, but not charged to the tiers.
pub const WINDOW_WAITS_HEADER: &str = "x-bunq-window-waits";
/// Header with the generation of the credential's record under which the worker made this
/// copy (parked or handed back after a claim): a copy of an outcome's own generation.
pub const COPY_GENERATION_HEADER: &str = "x-bunq-generation";
/// Header counting the worker's own hand-backs of an input (fresh copies instead of a requeue).
pub const RETURNS_HEADER: &str = "x-bunq-returns";
/// Header sealing the worker's bookkeeping headers: hex HMAC-SHA-256 (RFC 2104) of their values
/// and the input's identity, keyed by the fleet's secret ([`Seal`]).
pub const SEAL_HEADER: &str = "x-bunq-seal";

/// Whether a header is the worker's own bookkeeping (left out of what a producer set).
pub fn is_bookkeeping(name: &str) -> bool {
    name.starts_with("x-bunq-")
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
    /// Of the rounds, those spent waiting for bunq's window (`x-bunq-window-waits`), not
    /// charged to the tiers.
    pub waits: u32,
    /// The credential record's generation under which the worker made this copy
    /// (`x-bunq-generation`); none for a producer's message, or a copy made before any claim.
    pub generation: Option<u64>,
}

impl History {
    /// The delayed-retry tier this input's next delayed retry takes: rounds that waited for a
    /// window are not charged to the tiers.
    pub fn tier(&self) -> usize {
        self.round.saturating_sub(self.waits) as usize
    }
}

/// The key that seals the worker's own bookkeeping headers (`x-bunq-*`), so a producer cannot
/// forge them: headers it sets are ignored, and a message whose seal does not verify counts as
/// a fresh input (logged and counted). With `REDIS_URL` the fleet shares one key kept in Redis;
/// without, it is derived from the installation.
pub struct Seal(aws_lc_rs::hmac::Key);

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seal")
    }
}

impl Seal {
    /// A seal keyed by `secret` (at least 32 bytes: the fleet's key from Redis, or one derived
    /// from the installation).
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

    /// The bookkeeping headers for a copy of the input `identity`, sealed.
    pub fn headers(&self, identity: &Key, h: &History, route: &Route) -> FieldTable {
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
        if h.waits > 0 {
            headers.insert(
                WINDOW_WAITS_HEADER.into(),
                AMQPValue::LongLongInt(h.waits.into()),
            );
        }
        if let Some(g) = h.generation {
            headers.insert(
                COPY_GENERATION_HEADER.into(),
                AMQPValue::LongLongInt(i64::try_from(g).unwrap_or(i64::MAX)),
            );
        }
        headers.insert(ORIGINAL_EXCHANGE_HEADER.into(), long(&route.exchange));
        headers.insert(ORIGINAL_ROUTING_KEY_HEADER.into(), long(&route.routing_key));
        headers.insert(SEAL_HEADER.into(), long(&self.tag(identity, h, route)));
        headers
    }

    /// The history and original route in `props`, when their seal verifies for `identity`;
    /// otherwise a fresh input's (no history, published where it was delivered from: `own`).
    pub fn read(&self, props: &BasicProperties, identity: &Key, own: Route) -> (History, Route) {
        let claimed_route = Route {
            exchange: str_header(props, ORIGINAL_EXCHANGE_HEADER)
                .unwrap_or_else(|| own.exchange.clone()),
            routing_key: str_header(props, ORIGINAL_ROUTING_KEY_HEADER)
                .unwrap_or_else(|| own.routing_key.clone()),
        };
        let claimed = History {
            round: int_header(props, DELAYED_RETRIES_HEADER).unwrap_or(0),
            calls_before: int_header(props, CALLS_HEADER).unwrap_or(0),
            first_attempt_at: str_header(props, FIRST_ATTEMPT_HEADER)
                .as_deref()
                .and_then(events::parse_time),
            returns: int_header(props, RETURNS_HEADER).unwrap_or(0),
            not_before: str_header(props, NOT_BEFORE_HEADER)
                .as_deref()
                .and_then(events::parse_time),
            waits: int_header(props, WINDOW_WAITS_HEADER).unwrap_or(0),
            generation: int_header(props, COPY_GENERATION_HEADER).map(u64::from),
        };
        match str_header(props, SEAL_HEADER) {
            Some(tag) if self.verifies(identity, &claimed, &claimed_route, &tag) => {
                (claimed, claimed_route)
            }
            Some(_) => {
                // Never silently fresh: a fleet whose replicas cannot read each other's seals
                // loses its rounds, calls, hand-backs and 429 windows at every hop.
                metrics::counter!("bunq_session_worker_foreign_seals_total").increment(1);
                tracing::warn!(
                    "this input carries worker bookkeeping (x-bunq-seal) this replica cannot verify, so it counts as fresh: either another replica wrote it with another key (every replica of a fleet must set the same REDIS_URL and REDIS_KEY_PREFIX, which share the seal key; without Redis, the same bunq installation), or its producer forged it"
                );
                (History::default(), own)
            }
            None => (History::default(), own),
        }
    }
}

/// The sealed text: every bookkeeping value in a fixed order, separated by a byte no value holds.
fn canonical(identity: &Key, h: &History, route: &Route) -> String {
    let time = |t: Option<OffsetDateTime>| t.map(events::rfc3339).unwrap_or_default();
    // Window waits and the generation only when there are any, so seals written before they
    // existed still verify.
    let waits = match h.waits {
        0 => String::new(),
        w => format!("\u{1}{w}"),
    };
    let waits = match h.generation {
        None => waits,
        Some(g) => format!("{waits}\u{2}{g}"),
    };
    format!(
        "{}\u{1}{}\u{1}{}\u{1}{}\u{1}{}\u{1}{}\u{1}{}\u{1}{}{waits}",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(seal: &Seal, identity: &Key, h: &History, route: &Route) -> BasicProperties {
        BasicProperties::default().with_headers(seal.headers(identity, h, route))
    }

    #[test]
    fn a_sealed_history_reads_back_and_a_forged_one_counts_as_fresh() {
        let seal = Seal::new(&[7; 32]);
        let identity = [1; 32];
        let route = Route {
            exchange: "in".into(),
            routing_key: "provision.ready".into(),
        };
        let h = History {
            round: 2,
            calls_before: 5,
            first_attempt_at: events::parse_time("2026-11-29T12:00:00Z"),
            returns: 1,
            not_before: None,
            waits: 0,
            generation: Some(3),
        };
        let own = Route {
            exchange: String::new(),
            routing_key: "q.retry-60s".into(),
        };
        let props = sealed(&seal, &identity, &h, &route);
        assert_eq!(
            seal.read(&props, &identity, own.clone()),
            (h.clone(), route.clone())
        );
        // Another key, another input, or an edited value: the seal fails.
        let other = Seal::new(&[8; 32]);
        let fresh = (History::default(), own.clone());
        assert_eq!(other.read(&props, &identity, own.clone()), fresh);
        assert_eq!(seal.read(&props, &[2; 32], own.clone()), fresh);
        let mut forged = seal.headers(&identity, &h, &route);
        forged.insert(RETURNS_HEADER.into(), AMQPValue::LongLongInt(0));
        let forged = BasicProperties::default().with_headers(forged);
        assert_eq!(seal.read(&forged, &identity, own), fresh);
    }
}
