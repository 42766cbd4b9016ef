//! One delivery's path: read the envelope, look it up in the ledger, decide, settle.

use std::sync::Arc;

use lapin::message::Delivery;
use tokio::time::Instant;
use tracing::{Instrument, info, info_span};

use super::Shared;
use crate::{
    broker::Inbound,
    ledger::{self, Known},
    outcome::Outcome,
    process::process,
};

/// Handles one delivery to the end: acked, nacked, or left for the broker to redeliver.
pub(super) async fn handle(shared: Arc<Shared>, mut delivery: Delivery) {
    let inbound = Inbound::read(&mut delivery, shared.max_message_bytes);
    let span = info_span!(
        "delivery",
        delivery_tag = delivery.delivery_tag,
        message_id = %inbound.message_id,
        redelivered = inbound.redelivered,
        provision_id = tracing::field::Empty,
    );
    async move {
        let started = Instant::now();
        let key = ledger::round_key(&inbound.identity, inbound.history.round);
        // One copy of an input at a time in this process: a copy redelivered while the first is
        // still at bunq (its channel died) waits for it, then finds its outcome below.
        let _guard = shared.in_flight.lock(key).await;
        let acker = &delivery.acker;
        let label = match shared.settler.known.recall(&key) {
            Some(Known::Settled) => shared.settler.settle_repeat(acker).await,
            Some(Known::Failed(failure)) => {
                info!(
                    "this input already failed; settling that failure again without calling bunq"
                );
                shared
                    .settler
                    .settle(acker, &inbound, key, Outcome::Failed(failure))
                    .await
            }
            None => {
                let outcome = process(
                    &inbound,
                    &shared.flow,
                    &shared.settler.topology.delay_tiers,
                    &shared.stop_work,
                )
                .await;
                shared.settler.settle(acker, &inbound, key, outcome).await
            }
        };
        let latency_ms = started.elapsed().as_millis() as u64;
        metrics::counter!("bunq_session_worker_deliveries_total", "outcome" => label).increment(1);
        metrics::histogram!("bunq_session_worker_delivery_seconds")
            .record(started.elapsed().as_secs_f64());
        info!(outcome = label, latency_ms, "delivery handled");
        let _ = shared.handled.send(super::Handled {
            message_id: inbound.message_id.clone(),
            outcome: label,
        });
    }
    .instrument(span)
    .await
}
