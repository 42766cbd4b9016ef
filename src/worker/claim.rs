//! The claim on a credential, with `REDIS_URL`: one replica at a time works on a credential, and
//! a credential whose session some replica confirmed is never sent to bunq again.

use std::time::Duration;

use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Shared;
use crate::{
    broker::Inbound,
    events::Decoded,
    fleet::{Claim, Fleet, LEASE},
    outcome::{Delayed, Outcome},
    retry::{Retry, RetryPolicy},
};

/// How often a held claim is looked at again while another replica works on it.
const HELD_POLL: Duration = Duration::from_millis(500);

/// What the claim allows.
pub(super) enum Claimed {
    /// Go ahead; the lease (if any) is renewed until it is dropped or released.
    Go(Option<Lease>),
    /// Some replica's `session.created` for this credential is confirmed: ack, no bunq call.
    AlreadySettled,
    /// Not now: settle this instead.
    Instead(Outcome),
}

/// This replica's claim, renewed every third of [`LEASE`] until dropped.
pub(super) struct Lease {
    fleet: Fleet,
    renewal: JoinHandle<()>,
}

impl Lease {
    fn start(fleet: &Fleet, inbound: &Inbound) -> Self {
        let renewing = fleet.clone();
        let id = inbound.identity;
        let renewal = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE / 3).await;
                if renewing.claim(&id).await == Ok(Claim::Settled) {
                    return;
                }
            }
        });
        Self {
            fleet: fleet.clone(),
            renewal,
        }
    }

    /// Drops the claim (the input was parked, handed back or dead-lettered, or its work
    /// stopped), so another replica, or a replay, may take it.
    pub(super) async fn release(self, inbound: &Inbound) {
        self.renewal.abort();
        if self.fleet.release(&inbound.identity).await.is_err() {
            warn!("could not release the claim in Redis; it expires by itself");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

/// Takes the claim on a ready credential before any bunq call (nothing to claim without Redis
/// or for input that is not a ready credential). Another replica's live claim is waited for,
/// at most half the consumer timeout; then the input takes the delayed-retry path (or is handed
/// back). While Redis is unreachable, waits with backoff for as long, then hands the input
/// back: nothing is dead-lettered for it.
pub(super) async fn claim(shared: &Shared, inbound: &Inbound, live: &CancellationToken) -> Claimed {
    let Some(fleet) = &shared.fleet else {
        return Claimed::Go(None);
    };
    if !matches!(inbound.decoded, Ok(Decoded::Ready(_))) {
        return Claimed::Go(None);
    }
    let hold_until = Instant::now()
        .checked_add(shared.flow.max_hold)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
    let mut unavailable = Retry::new(RetryPolicy::SHARED_STATE, live);
    let mut told = false;
    loop {
        let wait = match fleet.claim(&inbound.identity).await {
            Ok(Claim::Acquired) => return Claimed::Go(Some(Lease::start(fleet, inbound))),
            Ok(Claim::Settled) => return Claimed::AlreadySettled,
            Ok(Claim::Held) => {
                if !told {
                    info!("another replica is working on this credential; waiting for it");
                    told = true;
                }
                if Instant::now() + HELD_POLL >= hold_until {
                    return Claimed::Instead(held_elsewhere(shared, inbound));
                }
                HELD_POLL
            }
            Err(_) => {
                unavailable.attempt();
                let wait = unavailable
                    .next_delay(Duration::ZERO)
                    .unwrap_or(Duration::from_secs(5));
                if Instant::now() + wait >= hold_until {
                    warn!(
                        "Redis (REDIS_URL) stayed unreachable; handing the delivery back unprocessed"
                    );
                    return Claimed::Instead(Outcome::Returned { counted: false });
                }
                wait
            }
        };
        if crate::retry::sleep_or_cancel(wait, live).await.is_err() {
            return Claimed::Instead(Outcome::Abandoned);
        }
    }
}

/// Another replica held the credential for as long as this delivery may be held: the
/// delayed-retry path when a tier is left, else handed back.
fn held_elsewhere(shared: &Shared, inbound: &Inbound) -> Outcome {
    let tiers = &shared.settler.topology.delay_tiers;
    match tiers.get(inbound.history.round as usize) {
        Some(&delay) => Outcome::Delayed(Box::new(Delayed {
            delay,
            retries: inbound.history.round + 1,
            calls: inbound.history.calls_before,
            detail: "another replica held this credential for half the consumer timeout (CONSUMER_TIMEOUT_S)".into(),
            first_attempt_at: inbound
                .history
                .first_attempt_at
                .unwrap_or_else(time::OffsetDateTime::now_utc),
            not_before: None,
        })),
        None => Outcome::Returned { counted: false },
    }
}
