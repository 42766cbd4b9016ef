//! Taking and holding the claim on a credential: one replica at a time works on a credential, and
//! a credential whose session some replica confirmed is never sent to bunq again. What a verdict
//! means for the delivery is [`crate::decide`]'s to say.

use std::time::Duration;

use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{Claim, Fleet, LEASE};
use crate::{
    identity::Key,
    retry::{Retry, RetryPolicy},
};

/// How often a held claim is looked at again while another replica works on it.
const HELD_POLL: Duration = Duration::from_millis(500);

/// What the claim allows.
pub enum Verdict {
    /// Go ahead; the lease is renewed until it is settled, released or dropped.
    Go(Lease),
    /// Some replica's `session.created` for this credential is confirmed: no bunq call.
    Settled,
    /// Another replica held the credential for as long as this delivery may be held.
    HeldElsewhere,
    /// Redis stayed unreachable for as long as this delivery may be held.
    Unavailable,
    /// The delivery's work stopped while waiting.
    Cancelled,
}

/// This replica's claim on a credential, renewed every third of [`LEASE`] until settled,
/// released or dropped.
#[derive(Debug)]
pub struct Lease {
    fleet: Fleet,
    credential: Key,
    renewal: JoinHandle<()>,
}

impl Lease {
    fn start(fleet: &Fleet, credential: Key) -> Self {
        let renewing = fleet.clone();
        let renewal = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE / 3).await;
                if renewing.claim(&credential).await == Ok(Claim::Settled) {
                    return;
                }
            }
        });
        Self {
            fleet: fleet.clone(),
            credential,
            renewal,
        }
    }

    /// Records the credential's confirmed session in Redis, retrying by `policy` until `stop`:
    /// a replica that gets this credential later then acks it without calling bunq.
    pub async fn settle(&self, policy: RetryPolicy, stop: &CancellationToken) {
        let recorded = crate::retry::retry(
            policy,
            stop,
            |_| self.fleet.settle(&self.credential),
            |_| false,
            |_, _, _| {},
        )
        .await;
        if recorded.is_err() {
            error!(
                "the session is confirmed but could not be recorded in Redis (REDIS_URL); another replica that gets this credential within the lease would call bunq again"
            );
        }
    }

    /// Drops the claim (the input was parked, handed back or dead-lettered, or its work
    /// stopped), so another replica, or a replay, may take it.
    pub async fn release(self) {
        self.renewal.abort();
        if self.fleet.release(&self.credential).await.is_err() {
            warn!("could not release the claim in Redis; it expires by itself");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

/// Takes the claim on `credential` (before any bunq call) and starts renewing it. Another replica's live claim is waited
/// for, at most `max_hold` (half the consumer timeout). While Redis is unreachable, waits with
/// backoff for as long. `live` ends the wait.
pub async fn hold(
    fleet: &Fleet,
    credential: Key,
    max_hold: Duration,
    live: &CancellationToken,
) -> Verdict {
    let hold_until = Instant::now()
        .checked_add(max_hold)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
    let mut unavailable = Retry::new(RetryPolicy::SHARED_STATE, live);
    let mut told = false;
    loop {
        let wait = match fleet.claim(&credential).await {
            Ok(Claim::Acquired) => return Verdict::Go(Lease::start(fleet, credential)),
            Ok(Claim::Settled) => return Verdict::Settled,
            Ok(Claim::Held) => {
                if !told {
                    info!("another replica is working on this credential; waiting for it");
                    told = true;
                }
                if Instant::now() + HELD_POLL >= hold_until {
                    return Verdict::HeldElsewhere;
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
                    return Verdict::Unavailable;
                }
                wait
            }
        };
        if crate::retry::sleep_or_cancel(wait, live).await.is_err() {
            return Verdict::Cancelled;
        }
    }
}
