//! One delivery's path: read the envelope, look it up in the ledger, ask the breaker, decide,
//! settle.

use std::sync::Arc;

use lapin::message::Delivery;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span};

use super::{
    Shared,
    claim::{self, Claimed},
};
use crate::{
    breaker::{Admission, Fault, fault_of},
    broker::Inbound,
    events::{self, Decoded},
    ledger::Known,
    outcome::Outcome,
    process,
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
        &shared.settler.seal,
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
        let key = crate::identity::round_key(&inbound.identity, inbound.history.round);
        // One copy of an input at a time in this process: a copy redelivered while the first is
        // still at bunq (its channel died) waits for it, then finds its outcome below.
        let _guard = shared.in_flight.lock(key).await;
        let acker = &delivery.acker;
        let settler = &shared.settler;
        // The dead-letter reason, for the metric's `reason` label.
        let mut reason = "";
        let mut settle = async |outcome: Outcome| {
            if let Outcome::Failed(f) = &outcome {
                reason = f.reason.as_str();
            }
            settler.settle(acker, &inbound, key, outcome).await
        };
        let label = match settler.known.recall(&key) {
            Some(Known::Settled) => settler.settle_repeat(acker).await,
            Some(Known::Finished) if inbound.redelivered => settler.settle_repeat(acker).await,
            Some(Known::Failed(failure)) => {
                info!(
                    "this input already failed; settling that failure again without calling bunq"
                );
                settle(Outcome::Failed(failure)).await
            }
            _ => match claim::claim(&shared, &inbound, &channel_live).await {
                Claimed::AlreadySettled => settler.settle_repeat(acker).await,
                Claimed::Instead(outcome) => {
                    let outcome = match outcome {
                        Outcome::Abandoned => abandoned(&shared, &inbound),
                        other => other,
                    };
                    settle(outcome).await
                }
                Claimed::Go(lease) => {
                    let outcome = decide(&shared, &inbound, &channel_live).await;
                    let label = settle(outcome).await;
                    if let Some(lease) = lease
                        && label != "created"
                    {
                        lease.release(&inbound).await;
                    }
                    label
                }
            },
        };
        if label != "dead_lettered" {
            reason = "";
        }
        let latency_ms = started.elapsed().as_millis() as u64;
        metrics::counter!("bunq_session_worker_deliveries_total", "outcome" => label, "reason" => reason)
            .increment(1);
        metrics::histogram!("bunq_session_worker_delivery_duration_seconds")
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

/// The outcome of a delivery not settled before: the redelivery limit, the breaker, then
/// [`process::process`], with the breaker told what bunq said.
async fn decide(shared: &Shared, inbound: &Inbound, channel_live: &CancellationToken) -> Outcome {
    let limit = shared.settler.topology.delivery_limit;
    if inbound.handed_back() >= limit {
        return process::redelivery_limit(inbound, limit);
    }
    let breaker = &shared.breaker;
    let admission = if matches!(inbound.decoded, Ok(Decoded::Ready(_))) {
        tokio::select! {
            a = breaker.admit() => a,
            _ = channel_live.cancelled() => return abandoned(shared, inbound),
        }
    } else {
        Admission::Go
    };
    if let Admission::Refused(reason) = admission {
        info!(%reason, "the breaker is open; handing the delivery back unprocessed");
        return Outcome::Returned { counted: false };
    }
    let outcome = process::process(
        inbound,
        &shared.flow,
        &shared.settler.topology.delay_tiers,
        channel_live,
    )
    .await;
    let mut told = false;
    match &outcome {
        Outcome::Created(_) => {
            breaker.record_ok();
            told = true;
        }
        Outcome::Failed(f) if f.event.is_some() => {
            let fault = fault_of(f.reason, &f.detail);
            if fault == Fault::Credential {
                // bunq judged the credential: the worker's own set-up works.
                if f.event
                    .as_ref()
                    .and_then(|e| e.http_status)
                    .is_some_and(|s| (400..500).contains(&s))
                {
                    breaker.record_ok();
                    told = true;
                }
            } else if breaker.record_fault(
                fault,
                f.reason,
                &f.detail,
                inbound.identity,
                admission == Admission::Trial,
            ) {
                return Outcome::Returned { counted: false };
            } else {
                told = true;
            }
        }
        _ => {}
    }
    if admission == Admission::Trial && !told {
        breaker.release_trial();
    }
    match outcome {
        Outcome::Abandoned => abandoned(shared, inbound),
        other => other,
    }
}

/// Work stopped before an outcome: at shutdown the delivery is handed back (counted toward
/// `DELIVERY_LIMIT`); with its channel gone the broker redelivers it.
fn abandoned(shared: &Shared, inbound: &Inbound) -> Outcome {
    if !shared.stop_work.is_cancelled() {
        return Outcome::Abandoned;
    }
    let limit = shared.settler.topology.delivery_limit;
    if inbound.handed_back().saturating_add(1) >= limit {
        return process::redelivery_limit(inbound, limit);
    }
    Outcome::Returned { counted: true }
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
