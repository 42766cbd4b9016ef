//! One delivery's path, wired: read the envelope once, decide, plan, settle; then count it,
//! log it and tell observers.

use std::sync::Arc;

use lapin::message::Delivery;
use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::Shared;
use crate::{
    broker::Inbound,
    events::{self, Decoded},
    outcome::Outcome,
    plan::{self, Addresses, Settled},
};

/// Handles one delivery to the end: acked, handed back, or left for the broker to redeliver.
/// `channel_live` fires when the delivery's channel is gone (or at shutdown): no new bunq call
/// starts for it then.
pub(super) async fn handle(
    shared: Arc<Shared>,
    mut delivery: Delivery,
    channel_live: CancellationToken,
) {
    let inbound = Inbound::read(
        &mut delivery,
        shared.max_message_bytes,
        &shared.seal,
        shared.settler.topology.queue_type,
    );
    let provision_id = match &inbound.decoded {
        Ok(Decoded::Ready(r)) => Some(&r.provision_id),
        Ok(Decoded::NotReady(n)) => n.provision_id.as_ref(),
        Err(_) => None,
    }
    .map(|id| events::log_safe(&id.to_string()));
    // Every field known now is set now: recording one later costs a re-serialisation of the
    // span's fields in JSON logs. A field that is `None` or never recorded is left out.
    let span = info_span!(
        "delivery",
        delivery_tag = delivery.delivery_tag,
        // Already shortened and escaped by `Inbound::read`.
        message_id = (!inbound.message_id.is_empty()).then_some(inbound.message_id.as_str()),
        redelivered = inbound.redelivered,
        provision_id,
        session_id = tracing::field::Empty,
        user_id = tracing::field::Empty,
    );
    async move {
        let started = Instant::now();
        let _counted = InFlightCount::new(&shared.gauges.in_flight);
        let decision = shared.decider.decide(&inbound, &channel_live).await;
        let settler = &shared.settler;
        let to = Addresses {
            topology: &settler.topology,
            seal: &shared.seal,
            frame_max: settler.publisher.frame_max(),
        };
        let generation = decision.lease.as_ref().map(|l| l.claimed.generation);
        let planned = plan::plan(
            &inbound,
            &decision.outcome,
            generation,
            to,
            OffsetDateTime::now_utc(),
        );
        let settled = settler
            .settle(&delivery.acker, planned, decision.lease)
            .await;
        report(&decision.outcome, settled, &settler.topology, started);
        let _ = shared.handled.send(super::Handled {
            message_id: inbound.message_id.clone(),
            outcome: settled,
        });
    }
    .instrument(span)
    .await
}

/// The delivery's metrics and its one INFO line (with a WARN before it for a dead letter or a
/// delayed retry, saying why).
fn report(outcome: &Outcome, settled: Settled, t: &crate::broker::Topology, started: Instant) {
    let mut reason = "";
    match (outcome, settled) {
        (Outcome::Created(created), Settled::Created) => {
            // On the delivery's span, so its one INFO line names them.
            let span = tracing::Span::current();
            span.record("session_id", created.session_id);
            if let Some(user_id) = created.user_id {
                span.record("user_id", user_id);
            }
        }
        // Which record said so: created, failed or parked.
        (Outcome::AlreadySettled(t), Settled::Repeat) => reason = t.as_str(),
        (Outcome::Failed(f), Settled::DeadLettered) => {
            reason = f.reason.as_str();
            warn!(reason = %f.reason, detail = %f.detail, attempts = f.attempts, "dead-lettered");
        }
        (Outcome::Delayed(d), Settled::Delayed) if d.window => warn!(
            queue = %t.parking_queue(d),
            delay_s = d.delay.as_secs(),
            delayed_retry = d.retries,
            calls = d.calls,
            detail = %d.detail,
            "bunq's window outlasts the time a delivery may be held; waiting for its end in the window queue"
        ),
        (Outcome::Delayed(d), Settled::Delayed) => warn!(
            queue = %t.parking_queue(d),
            delay_s = d.delay.as_secs(),
            delayed_retry = d.retries,
            calls = d.calls,
            detail = %d.detail,
            "retries spent; parked for a delayed retry"
        ),
        _ => {}
    }
    let latency_ms = started.elapsed().as_millis() as u64;
    metrics::counter!("bunq_session_worker_deliveries_total", "outcome" => settled.as_str(), "reason" => reason)
        .increment(1);
    metrics::histogram!("bunq_session_worker_delivery_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    info!(outcome = settled.as_str(), latency_ms, "delivery handled");
}

/// Counts a delivery in `bunq_session_worker_in_flight` while it is handled.
struct InFlightCount<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> InFlightCount<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for InFlightCount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
