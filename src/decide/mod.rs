//! Deciding what becomes of one delivery: `Inbound` → [`Outcome`], in one place.
//!
//! The [`Decider`] owns every policy a decision needs, and asks in this order:
//! 1. for a ready credential, the credential's record ([`crate::ledger`], fleet-wide with
//!    `REDIS_URL`): this delivery takes the claim ([`fleet::hold`]), or the record says the
//!    credential is created, failed or parked already (the copy is acked), or another delivery
//!    holds it (this one waits); a refusal whose dead letter was not confirmed is settled
//!    again without calling bunq;
//! 3. the delivery limit (`DELIVERY_LIMIT`, hand-backs and redeliveries together);
//! 4. for a ready credential, the breaker's admission ([`crate::breaker`]);
//! 5. the input itself: a decoding error is dead-lettered, a provision not ready is skipped, a
//!    ready credential goes to bunq ([`SessionFlow::open`]); a failure of the in-process retries
//!    takes a delayed-retry tier while one is left and the credential outlives it;
//! 6. the breaker is told what bunq's answer says of the worker's own set-up.
//!
//! Makes no broker call and names no lapin type: [`crate::plan`] and [`crate::settle`] carry the
//! outcome out.

use std::{panic::AssertUnwindSafe, sync::Arc, time::Duration};

use futures_util::FutureExt;
use secrecy::ExposeSecret;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    breaker::{Admission, Breaker, Fault, fault_of},
    broker::{Inbound, bookkeeping::History},
    events::{self, Decoded, ProvisionReady, SCHEMA_VERSION, SessionCreated, SessionToken},
    failure::{Failure, FailureReason},
    fleet::{self, Lease, Records, Verdict},
    jwe::ConsumerKey,
    ledger::{Ask, Taken},
    outcome::{Created, Delayed, Outcome},
    session::{FlowError, Opened, SessionFlow},
    staging::Staging,
};

/// A decision: the outcome, and this replica's claim on the credential while it is settled.
#[derive(Debug)]
pub struct Decision {
    /// What becomes of the delivery.
    pub outcome: Outcome,
    /// This delivery's claim on the credential it carries, while it is settled.
    pub lease: Option<Lease>,
}

impl From<Outcome> for Decision {
    fn from(outcome: Outcome) -> Self {
        Self {
            outcome,
            lease: None,
        }
    }
}

/// Decides deliveries. Shared by all deliveries of a worker.
#[derive(Debug)]
pub struct Decider {
    /// bunq's session flow with its budget.
    pub flow: SessionFlow,
    /// Stops the worker taking work when bunq refuses its own set-up.
    pub breaker: Arc<Breaker>,
    /// The credentials' records: in Redis with `REDIS_URL`, else in this process.
    pub records: Records,
    /// `CLAIM_LEASE_MS`: how long a claim lasts without renewal.
    pub claim_lease: Duration,
    /// Seals a `session.created` staged in the credential's record.
    pub staging: Staging,
    /// `SESSION_TOKEN_ENCRYPTION_KEY`: seals the session token for its consumer.
    pub consumer_key: Option<ConsumerKey>,
    /// `DELIVERY_LIMIT`: hand-backs without an outcome before the input is dead-lettered.
    pub delivery_limit: u32,
    /// `DELAYED_RETRY_DELAYS_S`: the delay of each delayed-retry round.
    pub delay_tiers: Vec<Duration>,
    /// Fires once consuming stopped (shutdown): work stopped then is handed back, not left to
    /// the broker.
    pub stop_work: CancellationToken,
}

impl Decider {
    /// Decides what becomes of `inbound`. `live` fires when the delivery's channel is gone (or
    /// at shutdown): no new bunq call starts for it then. A panic while working on a credential
    /// becomes a dead letter.
    pub async fn decide(&self, inbound: &Inbound, live: &CancellationToken) -> Decision {
        // One deadline for the whole delivery: waiting for another copy's claim and then for
        // bunq's pace together stay within half the consumer timeout.
        let hold_until = tokio::time::Instant::now()
            .checked_add(self.flow.max_hold)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(365 * 86_400));
        let lease = match inbound.credential() {
            Some(_) => {
                let ask = Ask {
                    round: inbound.history.round,
                    replay_of: inbound.replay_of,
                    // A copy the worker made under a claim names its generation.
                    fresh: !inbound.redelivered && inbound.history.generation.is_none(),
                };
                let verdict = fleet::hold(
                    &self.records,
                    inbound.identity,
                    ask,
                    self.claim_lease,
                    hold_until,
                    live,
                )
                .await;
                match verdict {
                    Verdict::Go(lease) => Some(lease),
                    Verdict::Taken(t) => return taken(t).into(),
                    Verdict::HeldElsewhere => return self.held_elsewhere(inbound).into(),
                    Verdict::Unavailable => {
                        return Outcome::Returned { counted: false }.into();
                    }
                    Verdict::Cancelled => return self.stopped(inbound).into(),
                }
            }
            None => None,
        };
        if let Some(staged) = lease.as_ref().and_then(|l| l.claimed.staged.as_deref()) {
            return Decision {
                outcome: self.publish_staged(inbound, staged),
                lease,
            };
        }
        if let Some(failure) = lease.as_ref().and_then(|l| l.claimed.answered.clone()) {
            info!(
                "bunq already refused this credential and its dead letter was not confirmed; settling that failure again without calling bunq"
            );
            return Decision {
                outcome: Outcome::Failed(failure),
                lease,
            };
        }
        let outcome = self
            .claimed(inbound, lease.as_ref(), hold_until, live)
            .await;
        // A failure is kept on the claim before its dead letter goes out, as a session is
        // staged: a delivery that takes the claim over settles it again instead of calling
        // bunq. A claim already taken over is the new holder's to settle.
        if let (Outcome::Failed(f), Some(l)) = (&outcome, &lease)
            && !l.answer(f).await
        {
            info!(
                "this delivery's claim was taken over before its failure was recorded; the new holder settles the credential"
            );
            return Decision {
                outcome: taken(l.taken().unwrap_or(Taken::Elsewhere)),
                lease,
            };
        }
        Decision { outcome, lease }
    }

    /// A session an earlier delivery staged: published again, with no bunq call. One this
    /// replica cannot open is handed back (counted), for a replica that can.
    fn publish_staged(&self, inbound: &Inbound, staged: &str) -> Outcome {
        let body = self.staging.open(staged, &inbound.identity);
        match body.map(Created::from_body) {
            Ok(Some(created)) => {
                info!(
                    "bunq already opened this credential's session (staged by an earlier delivery that did not finish); publishing it without a bunq call"
                );
                Outcome::Created(Box::new(created))
            }
            Ok(None) => {
                warn!(
                    "the credential's record holds a staged session.created that is not one; handing the delivery back"
                );
                self.over_limit(inbound, 1)
                    .unwrap_or(Outcome::Returned { counted: true })
            }
            Err(e) => {
                warn!(error = %e, "handing the delivery back");
                self.over_limit(inbound, 1)
                    .unwrap_or(Outcome::Returned { counted: true })
            }
        }
    }

    /// The outcome of an input this delivery may work on (`lease`: its claim, for a
    /// credential).
    async fn claimed(
        &self,
        inbound: &Inbound,
        lease: Option<&Lease>,
        hold_until: tokio::time::Instant,
        live: &CancellationToken,
    ) -> Outcome {
        let work = lease.map_or(live, Lease::work);
        if let Some(over) = self.over_limit(inbound, 0) {
            return over;
        }
        let ready = match &inbound.decoded {
            Err(e) => {
                let now = OffsetDateTime::now_utc();
                return Outcome::Failed(Box::new(Failure::without_call(
                    e.reason(),
                    e.to_string(),
                    0,
                    None,
                    now,
                )));
            }
            Ok(Decoded::NotReady(n)) => {
                info!(why = %n.why, "provision not ready; skipping");
                return Outcome::Skipped;
            }
            Ok(Decoded::Ready(r)) => r,
        };
        let admission = tokio::select! {
            a = self.breaker.admit() => a,
            _ = work.cancelled() => return self.stopped_or_taken(inbound, lease),
        };
        if let Admission::Refused(reason) = admission {
            info!(%reason, "the breaker is open; handing the delivery back unprocessed");
            return Outcome::Returned { counted: false };
        }
        // A bug must not strand a delivery unacked with its prefetch slot held.
        let opened =
            AssertUnwindSafe(self.open(inbound, ready, lease, hold_until, work)).catch_unwind();
        let outcome = match opened.await {
            Ok(Some(outcome)) => outcome,
            Ok(None) => {
                return self.told(admission, false, self.stopped_or_taken(inbound, lease));
            }
            Err(_) => {
                error!("internal error while handling the delivery; dead-lettering it");
                let failure = Failure::without_call(
                    FailureReason::UnexpectedResponse,
                    "internal error in the worker while handling this delivery (a bug: please report it with the worker's logs)".into(),
                    0,
                    None,
                    OffsetDateTime::now_utc(),
                );
                return self.told(admission, false, Outcome::Failed(Box::new(failure)));
            }
        };
        self.feedback(inbound, admission, outcome)
    }

    /// The work stopped: because the claim was taken (see [`Self::taken`]), or the channel
    /// went, or shutdown ([`Self::stopped`]).
    fn stopped_or_taken(&self, inbound: &Inbound, lease: Option<&Lease>) -> Outcome {
        match lease.and_then(Lease::taken) {
            Some(t) => taken(t),
            None => self.stopped(inbound),
        }
    }

    /// bunq's answer for a ready credential; `None` when the work stopped first.
    async fn open(
        &self,
        inbound: &Inbound,
        ready: &ProvisionReady,
        lease: Option<&Lease>,
        hold_until: tokio::time::Instant,
        work: &CancellationToken,
    ) -> Option<Outcome> {
        Some(
            match self
                .flow
                .open(ready, inbound.history.not_before, lease, hold_until, work)
                .await
            {
                Ok(opened) => {
                    let event = match created_event(
                        ready,
                        opened,
                        &self.flow,
                        self.consumer_key.as_ref(),
                    ) {
                        Ok(event) => event,
                        Err(failure) => return Some(Outcome::Failed(Box::new(failure))),
                    };
                    let created = Created::from_event(&event);
                    if let Some(lease) = lease {
                        let clear = matches!(event.session_token, SessionToken::Clear(_));
                        let staged = self.staging.seal(&created.body, &inbound.identity, clear);
                        lease.stage(staged).await;
                    }
                    Outcome::Created(Box::new(created))
                }
                Err(FlowError::Cancelled) => return None,
                Err(FlowError::Taken(t)) => taken(t),
                // Nothing is dead-lettered or published because the fleet's Redis is down.
                Err(FlowError::SharedStateUnavailable) => Outcome::Returned { counted: false },
                Err(FlowError::Failed(f)) => after_failure(
                    ready,
                    &inbound.history,
                    f,
                    &self.delay_tiers,
                    OffsetDateTime::now_utc(),
                ),
            },
        )
    }

    /// Tells the breaker what the outcome says of the worker's own set-up; a fault that opens
    /// it hands the delivery back instead of charging it to the credential.
    fn feedback(&self, inbound: &Inbound, admission: Admission, outcome: Outcome) -> Outcome {
        let breaker = &self.breaker;
        let told = match &outcome {
            Outcome::Created(_) => {
                breaker.record_ok();
                true
            }
            Outcome::Failed(f) => match fault_of(f.reason, &f.detail) {
                // bunq judged the credential: the worker's own set-up works.
                Fault::Credential if f.http_status.is_some_and(|s| (400..500).contains(&s)) => {
                    breaker.record_ok();
                    true
                }
                Fault::Credential => false,
                fault => {
                    let trial = admission == Admission::Trial;
                    if breaker.record_fault(fault, f.reason, &f.detail, inbound.identity, trial) {
                        return Outcome::Returned { counted: false };
                    }
                    true
                }
            },
            _ => false,
        };
        self.told(admission, told, outcome)
    }

    /// Gives a trial admission back when the breaker learnt nothing from it.
    fn told(&self, admission: Admission, told: bool, outcome: Outcome) -> Outcome {
        if admission == Admission::Trial && !told {
            self.breaker.release_trial();
        }
        outcome
    }

    /// `Some` dead letter with `redelivery_limit` when the input, handed back `now` more times,
    /// reaches `DELIVERY_LIMIT`; `session.failed` follows for a credential.
    fn over_limit(&self, inbound: &Inbound, now: u32) -> Option<Outcome> {
        let limit = self.delivery_limit;
        let times = inbound.handed_back().saturating_add(now);
        if times < limit {
            return None;
        }
        let detail = format!(
            "handed back {} times (DELIVERY_LIMIT {limit}: shutdowns, lost connections or consumer timeouts) without an outcome; {} bunq calls were made",
            inbound.handed_back(),
            inbound.history.calls_before
        );
        Some(Outcome::Failed(Box::new(Failure::without_call(
            FailureReason::RedeliveryLimit,
            detail,
            inbound.history.calls_before,
            inbound.history.first_attempt_at,
            OffsetDateTime::now_utc(),
        ))))
    }

    /// Work stopped before an outcome: at shutdown the delivery is handed back (counted toward
    /// `DELIVERY_LIMIT`); with its channel gone the broker redelivers it.
    fn stopped(&self, inbound: &Inbound) -> Outcome {
        if !self.stop_work.is_cancelled() {
            return Outcome::Abandoned;
        }
        self.over_limit(inbound, 1)
            .unwrap_or(Outcome::Returned { counted: true })
    }

    /// Another replica held the credential for as long as this delivery may be held: the
    /// delayed-retry path when a tier is left, else handed back.
    fn held_elsewhere(&self, inbound: &Inbound) -> Outcome {
        let h = &inbound.history;
        match self.delay_tiers.get(h.tier()) {
            Some(&delay) => Outcome::Delayed(Box::new(Delayed {
                delay,
                window: false,
                retries: h.round + 1,
                calls: h.calls_before,
                detail: "another replica held this credential for half the consumer timeout (CONSUMER_TIMEOUT_S)".into(),
                first_attempt_at: h.first_attempt_at.unwrap_or_else(OffsetDateTime::now_utc),
                not_before: None,
            })),
            None => Outcome::Returned { counted: false },
        }
    }
}

/// A failure of this round: counted over all rounds. When the in-process retries were spent
/// while bunq's window holds (`not_before`, a 429), the copy waits for the window's end in the
/// window queue, whatever the tiers say, unless the credential expires first. Otherwise it is
/// parked for a delayed retry when a tier is left and the credential outlives the tier's delay
/// (`now` is the wall-clock time of the decision), or dead-lettered.
fn after_failure(
    ready: &ProvisionReady,
    history: &History,
    mut f: Failure,
    delay_tiers: &[Duration],
    now: OffsetDateTime,
) -> Outcome {
    f.attempts = f.attempts.saturating_add(history.calls_before);
    if let Some(first) = history.first_attempt_at {
        f.first_attempt_at = f.first_attempt_at.min(first);
    }
    if f.reason != FailureReason::RetriesExhausted {
        return Outcome::Failed(Box::new(f));
    }
    let (delay, window) = match f.not_before.filter(|t| *t > now) {
        Some(t) => (Duration::try_from(t - now).unwrap_or(Duration::ZERO), true),
        None => match delay_tiers.get(history.tier()) {
            Some(&delay) => (delay, false),
            None => return Outcome::Failed(Box::new(f)),
        },
    };
    let back_at = now + time::Duration::try_from(delay).unwrap_or(time::Duration::MAX);
    if let Some(expiry) = ready.expiry_time
        && back_at >= expiry
    {
        f.reason = FailureReason::CredentialExpired;
        let wait = if window {
            "bunq's window ends"
        } else {
            "it would come back"
        };
        f.detail = format!(
            "{}; no delayed retry: the credential expires at {} before {wait}",
            f.detail,
            events::rfc3339(expiry)
        );
        return Outcome::Failed(Box::new(f));
    }
    Outcome::Delayed(Box::new(Delayed {
        delay,
        window,
        retries: history.round + 1,
        calls: f.attempts,
        detail: f.detail,
        first_attempt_at: f.first_attempt_at,
        not_before: f.not_before,
    }))
}

/// What becomes of a copy whose credential the record says was taken: acked when it is
/// created, failed or parked (another copy's outcome is safe at the broker), handed back
/// when another delivery holds it.
fn taken(t: Taken) -> Outcome {
    match t {
        Taken::Created => info!(
            "this credential's session.created is already confirmed (a redelivery or a repeat); acking without a bunq call"
        ),
        Taken::Failed => info!(
            "this credential already failed and its dead letter is confirmed; acking without a bunq call (replay that dead letter to try again)"
        ),
        Taken::Parked => info!(
            "a later round of this credential is parked for a delayed retry and carries the work on; acking this copy"
        ),
        Taken::Elsewhere => {
            // Not the input's fault: not counted toward DELIVERY_LIMIT.
            info!("another delivery took this credential over; handing this copy back");
            return Outcome::Returned { counted: false };
        }
    }
    Outcome::AlreadySettled(t)
}

/// `session.created` for the session bunq opened, its token sealed with `key` when one is set.
///
/// # Errors
/// A [`Failure`] (`unexpected_response`) when the token cannot be sealed (the system's random
/// source failed): publishing it in clear instead would break the consumer's custody.
fn created_event(
    ready: &ProvisionReady,
    opened: Opened,
    flow: &SessionFlow,
    key: Option<&ConsumerKey>,
) -> Result<SessionCreated, Failure> {
    let s = opened.session;
    let session_token = match key {
        None => SessionToken::Clear(s.token),
        Some(key) => match key.seal(s.token.expose_secret().as_bytes()) {
            Ok(jwe) => SessionToken::Sealed(jwe),
            Err(e) => {
                error!(error = %e, "bunq opened the session but its token could not be sealed for the consumer; it is not published in clear");
                return Err(Failure::without_call(
                    FailureReason::UnexpectedResponse,
                    format!(
                        "bunq opened session {} but the worker could not seal its token for the consumer (SESSION_TOKEN_ENCRYPTION_KEY): {e}",
                        s.session_id
                    ),
                    1,
                    None,
                    OffsetDateTime::now_utc(),
                ));
            }
        },
    };
    if let Some(keys) = &s.unread_user {
        // The credential is spent and the session exists: publish it rather than lose it.
        warn!(
            keys_seen = %keys.join(","),
            "session opened, but bunq's user part could not be read; session.created carries null user fields"
        );
    }
    let created_at = s
        .token_created
        .as_deref()
        .and_then(events::parse_time)
        .unwrap_or_else(OffsetDateTime::now_utc);
    let timeout = s.session_timeout_seconds;
    Ok(SessionCreated {
        schema_version: SCHEMA_VERSION,
        provision_id: ready.provision_id.clone(),
        external_uuid: ready.external_uuid.clone(),
        credential_id: ready.credential_id,
        session_id: s.session_id,
        session_token,
        user_id: s.user_id,
        user_api_key_id: s.user_api_key_id,
        user_type: s.user_type,
        session_timeout_seconds: timeout,
        // bunq's numbers are input too: an absurd timeout or date must not overflow.
        expires_at: created_at
            .checked_add(time::Duration::seconds(
                i64::try_from(timeout).unwrap_or(i64::MAX),
            ))
            .unwrap_or(time::PrimitiveDateTime::MAX.assume_utc()),
        created_at,
        installation_key_sha256: flow.ctx.public_key_sha256().to_owned(),
    })
}

#[cfg(test)]
mod tests;
