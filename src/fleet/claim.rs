//! Taking and holding one delivery's claim on a credential ([`crate::ledger`]): one delivery at
//! a time works on a credential, fleet-wide with `REDIS_URL`, and proves it still holds the
//! claim before every bunq call. What a verdict means for the delivery is [`crate::decide`]'s
//! to say.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{Records, Unavailable};
use crate::{
    identity::Key,
    ledger::{Ask, Claimed, Fence, Found, Settlement, Taken},
    retry::{Retry, RetryPolicy},
};

/// How often a claim held by another delivery is looked at again.
const HELD_POLL: Duration = Duration::from_millis(500);

/// Woken whenever a delivery of this process ends its claim: a copy waiting on it looks again
/// at once instead of at its next poll (another replica's claim is only polled).
static CLAIM_ENDED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// What the claim allows.
#[derive(Debug)]
pub enum Verdict {
    /// Go ahead; the lease is renewed until it is settled or dropped.
    Go(Lease),
    /// The record already says what became of the credential (never [`Taken::Elsewhere`]).
    Taken(Taken),
    /// Another delivery held the credential for as long as this one may be held.
    HeldElsewhere,
    /// Redis stayed unreachable for as long as this delivery may be held.
    Unavailable,
    /// The delivery's work stopped while waiting.
    Cancelled,
}

/// Why a fence refused a bunq call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fenced {
    /// The claim is no longer this delivery's.
    Taken(Taken),
    /// Redis did not answer: the claim is unproven, so no call.
    Unavailable,
}

/// One delivery's claim on a credential. Renewed every third of its length while held; the
/// renewal that finds the claim taken stops the work ([`Lease::work`]) at once.
#[derive(Debug)]
pub struct Lease {
    records: Records,
    id: Key,
    /// The lease length (`CLAIM_LEASE_MS`).
    length: Duration,
    /// What the claim found: the epoch, the generation, what earlier claimants left.
    pub claimed: Claimed,
    work: CancellationToken,
    taken: Arc<Mutex<Option<Taken>>>,
    /// Whether this delivery's session is staged on the record ([`Lease::stage`]).
    staged: std::sync::atomic::AtomicBool,
    renewal: JoinHandle<()>,
}

impl Lease {
    fn start(
        records: &Records,
        id: Key,
        claimed: Claimed,
        length: Duration,
        live: &CancellationToken,
    ) -> Self {
        let work = live.child_token();
        let taken = Arc::new(Mutex::new(None));
        let renewal = tokio::spawn({
            let (records, work, taken, epoch) =
                (records.clone(), work.clone(), taken.clone(), claimed.epoch);
            async move {
                loop {
                    tokio::time::sleep(length / 3).await;
                    // Unreachable Redis: tried again next time; the fence before a call
                    // refuses the call meanwhile.
                    if let Ok(Fence::Taken(t)) = records.fence(&id, epoch, length).await {
                        warn!(
                            now = t.as_str(),
                            "this delivery's claim on the credential was taken over (its lease ran out: a pause, or Redis unreachable); stopping its work"
                        );
                        *taken.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
                        work.cancel();
                        return;
                    }
                }
            }
        });
        Self {
            records: records.clone(),
            id,
            length,
            claimed,
            work,
            taken,
            staged: std::sync::atomic::AtomicBool::new(false),
            renewal,
        }
    }

    /// Whether the session this delivery is publishing is staged on the record: then a
    /// delivery that takes the claim over publishes it, and this one may stop.
    pub fn staged(&self) -> bool {
        self.staged.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The token the delivery's work runs under: fires when its channel is gone, at shutdown,
    /// or when the claim is taken.
    pub fn work(&self) -> &CancellationToken {
        &self.work
    }

    /// What took the claim, once a renewal or a fence found it taken.
    pub fn taken(&self) -> Option<Taken> {
        *self.taken.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Proves, immediately before a bunq call, that this delivery still holds the claim, and
    /// renews it for a whole lease length (`CLAIM_LEASE_MS`, validated to exceed
    /// `HTTP_TIMEOUT_MS` by a margin), so the call ends before the lease does.
    ///
    /// # Errors
    /// [`Fenced::Taken`] when another delivery took the claim or the record was settled;
    /// [`Fenced::Unavailable`] when Redis does not answer.
    pub async fn fence(&self) -> Result<(), Fenced> {
        match self
            .records
            .fence(&self.id, self.claimed.epoch, self.length)
            .await
        {
            Ok(Fence::Held) => Ok(()),
            Ok(Fence::Taken(t)) => {
                *self.taken.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
                Err(Fenced::Taken(t))
            }
            Err(Unavailable) => Err(Fenced::Unavailable),
        }
    }

    /// Stages `sealed`, the `session.created` bunq's answer made ([`crate::staging`]'s form), on
    /// the credential before it is published: a crash before the publisher confirm then costs
    /// neither the session nor a second bunq call.
    pub async fn stage(&self, sealed: String) {
        if self.records.stage(&self.id, sealed).await.is_ok() {
            self.staged
                .store(true, std::sync::atomic::Ordering::Relaxed);
        } else {
            warn!(
                "could not stage the session in Redis before publishing it; if this replica dies before the broker confirms session.created, the session is lost"
            );
        }
    }

    /// Keeps bunq's answer that failed the credential on the claim before its dead letter is
    /// published, so a delivery that takes the claim over (this one paused past its lease)
    /// settles the same failure again instead of calling bunq. False when the claim is already
    /// another's: the outcome is then the new holder's to give. Redis unreachable counts as
    /// held (the outcome is published; the lease still guards the call).
    pub async fn answer(&self, failure: &crate::failure::Failure) -> bool {
        match self
            .records
            .answer(&self.id, self.claimed.epoch, failure)
            .await
        {
            Ok(held) => held,
            Err(Unavailable) => {
                warn!(
                    "could not keep bunq's refusal in Redis before publishing it; a replica that takes this claim over would call bunq again"
                );
                true
            }
        }
    }

    /// Records on the credential that a session-server answer was lost, so a refusal in any
    /// later round, on any replica, reads `outcome_unknown`.
    pub async fn answer_lost(&self) {
        if self.records.answer_lost(&self.id).await.is_err() {
            warn!(
                "could not record the lost answer in Redis; a later round on another replica would report a refusal as credential_rejected"
            );
        }
    }

    /// Ends the claim as `how` says. An outcome (created, failed, parked) is recorded until it
    /// lands or `stop` fires ([`RetryPolicy::RECORD_OUTCOME`]): without the record a copy
    /// elsewhere would spend the credential again. A release is tried once (the lease expires
    /// by itself).
    pub async fn settle(self, how: Settlement, stop: &CancellationToken) {
        self.renewal.abort();
        let _wake = WakeWaiters;
        let epoch = self.claimed.epoch;
        let settled = match how {
            Settlement::Released | Settlement::Answered(_) => {
                self.records.settle(&self.id, epoch, &how).await
            }
            _ => crate::retry::retry(
                RetryPolicy::RECORD_OUTCOME,
                stop,
                |_| self.records.settle(&self.id, epoch, &how),
                |_| false,
                |_, _, _| {},
            )
            .await
            .map_err(|_| Unavailable),
        };
        match (settled, &how) {
            (Ok(true), _) => {}
            (Ok(false), _) => info!(
                "the claim was taken over before this delivery settled; the record keeps what the new holder says"
            ),
            (Err(_), Settlement::Created) => error!(
                "the session is confirmed but could not be recorded in Redis (REDIS_URL) before the drain ended; another replica that gets this credential would call bunq again"
            ),
            (Err(_), Settlement::Failed { .. } | Settlement::Parked { .. }) => error!(
                "the outcome is confirmed but could not be recorded in Redis (REDIS_URL) before the drain ended; a copy of this credential would be worked on again"
            ),
            (Err(_), _) => warn!("could not release the claim in Redis; it expires by itself"),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

/// Wakes the copies waiting in [`hold`] when dropped, i.e. once the record has changed.
struct WakeWaiters;

impl Drop for WakeWaiters {
    fn drop(&mut self) {
        CLAIM_ENDED.notify_waiters();
    }
}

impl Taken {
    /// `created`, `failed`, `parked` or `elsewhere`, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Taken::Created => "created",
            Taken::Failed => "failed",
            Taken::Parked => "parked",
            Taken::Elsewhere => "elsewhere",
        }
    }
}

/// Takes the claim on the credential `id` (before any bunq call) for `length`, and starts
/// renewing it. Another delivery's live claim is waited for, until `hold_until` (the
/// delivery's deadline: half the consumer timeout after it arrived); while Redis is
/// unreachable, waits with backoff for as long. `live` ends
/// the wait, and the lease's work token is its child.
pub async fn hold(
    records: &Records,
    id: Key,
    ask: Ask,
    length: Duration,
    hold_until: Instant,
    live: &CancellationToken,
) -> Verdict {
    let mut unavailable = Retry::new(RetryPolicy::SHARED_STATE, live);
    let mut told = false;
    loop {
        // Armed before looking, so an end of claim between the look and the wait is not missed.
        let ended = CLAIM_ENDED.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        let wait = match records.claim(&id, ask, length).await {
            Ok(Found::Acquired(claimed)) => {
                return Verdict::Go(Lease::start(records, id, claimed, length, live));
            }
            Ok(Found::Created) => return Verdict::Taken(Taken::Created),
            Ok(Found::Failed { .. }) => return Verdict::Taken(Taken::Failed),
            Ok(Found::Parked { .. }) => return Verdict::Taken(Taken::Parked),
            Ok(Found::Held) => {
                if !told {
                    info!("another delivery is working on this credential; waiting for it");
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
        tokio::select! {
            r = crate::retry::sleep_or_cancel(wait, live) => if r.is_err() {
                return Verdict::Cancelled;
            },
            () = &mut ended => {}
        }
    }
}
