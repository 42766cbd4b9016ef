//! The business decision for one delivery: `(&Inbound, &SessionFlow) -> Outcome`.
//!
//! Decodes nothing twice (the [`Inbound`] carries the decoded body), calls bunq for a ready
//! credential, and chooses between a session, a skip, a delayed retry and a dead letter. Makes no
//! broker call and names no lapin type; [`crate::settle`] carries the outcome out.

use std::{panic::AssertUnwindSafe, time::Duration};

use futures_util::FutureExt;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    broker::envelope::{History, Inbound},
    events::{self, Decoded, ProvisionReady, SCHEMA_VERSION, SessionCreated, SessionFailed},
    failure::FailureReason,
    outcome::{Delayed, Failure, Outcome},
    session::{FlowError, FlowFailure, Opened, SessionFlow},
};

/// Decides a delivery's outcome, with a panic turned into a dead letter: a bug must not strand a
/// delivery unacked with its prefetch slot held.
///
/// `delay_tiers` are the delayed-retry delays (`DELAYED_RETRY_DELAYS_S`); `shutdown` ends waits
/// for a bunq retry (the outcome is then [`Outcome::Abandoned`]).
pub async fn process(
    inbound: &Inbound,
    flow: &SessionFlow,
    delay_tiers: &[Duration],
    shutdown: &CancellationToken,
) -> Outcome {
    match AssertUnwindSafe(decide(inbound, flow, delay_tiers, shutdown))
        .catch_unwind()
        .await
    {
        Ok(outcome) => outcome,
        Err(_) => {
            error!("internal error while handling the delivery; dead-lettering it");
            Outcome::Failed(Box::new(Failure {
                reason: FailureReason::UnexpectedResponse,
                detail: "internal error in the worker while handling this delivery (a bug: please report it with the worker's logs)".into(),
                attempts: 0,
                event: None,
            }))
        }
    }
}

async fn decide(
    inbound: &Inbound,
    flow: &SessionFlow,
    delay_tiers: &[Duration],
    shutdown: &CancellationToken,
) -> Outcome {
    let ready = match &inbound.decoded {
        Err(e) => {
            return Outcome::Failed(Box::new(Failure {
                reason: e.reason(),
                detail: e.to_string(),
                attempts: 0,
                event: None,
            }));
        }
        Ok(Decoded::NotReady(n)) => {
            info!(why = %n.why, "provision not ready; skipping");
            return Outcome::Skipped(n.clone());
        }
        Ok(Decoded::Ready(r)) => r,
    };
    match flow.open(ready, inbound.history.not_before, shutdown).await {
        Ok(opened) => Outcome::Created(Box::new(created_event(ready, opened, flow))),
        Err(FlowError::Cancelled) => Outcome::Abandoned,
        // Nothing is dead-lettered or published because the fleet's Redis is down.
        Err(FlowError::SharedStateUnavailable) => Outcome::Returned { counted: false },
        Err(FlowError::Failed(f)) => after_failure(
            ready,
            &inbound.history,
            f,
            delay_tiers,
            OffsetDateTime::now_utc(),
        ),
    }
}

/// The outcome for an input handed back `limit` times (`DELIVERY_LIMIT`, the worker's own
/// returns and the broker's redeliveries together) without an outcome: a dead letter with
/// `redelivery_limit`, and `session.failed` when it names a provision.
pub fn redelivery_limit(inbound: &Inbound, limit: u32) -> Outcome {
    let times = inbound.handed_back();
    let detail = format!(
        "handed back {times} times (DELIVERY_LIMIT {limit}: shutdowns, lost connections or consumer timeouts) without an outcome; {} bunq calls were made",
        inbound.history.calls_before
    );
    let now = OffsetDateTime::now_utc();
    let event = match &inbound.decoded {
        Ok(Decoded::Ready(ready)) => Some(failed_event(
            ready,
            FlowFailure {
                reason: FailureReason::RedeliveryLimit,
                detail: detail.clone(),
                http_status: None,
                error_description: Some(detail.clone()),
                attempts: inbound.history.calls_before,
                first_attempt_at: inbound.history.first_attempt_at.unwrap_or(now),
                last_attempt_at: now,
                not_before: None,
            },
        )),
        _ => None,
    };
    Outcome::Failed(Box::new(Failure {
        reason: FailureReason::RedeliveryLimit,
        detail,
        attempts: inbound.history.calls_before,
        event,
    }))
}

fn created_event(ready: &ProvisionReady, opened: Opened, flow: &SessionFlow) -> SessionCreated {
    let s = opened.session;
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
    SessionCreated {
        schema_version: SCHEMA_VERSION,
        provision_id: ready.provision_id.clone(),
        external_uuid: ready.external_uuid.clone(),
        credential_id: ready.credential_id,
        session_id: s.session_id,
        session_token: s.token,
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
    }
}

/// A permanent failure of this round: counted over all rounds, then parked for a delayed retry
/// when the in-process retries were spent, a tier is left and the credential outlives the
/// tier's delay (`now` is the wall-clock time of the decision); otherwise dead-lettered.
fn after_failure(
    ready: &ProvisionReady,
    history: &History,
    mut f: FlowFailure,
    delay_tiers: &[Duration],
    now: OffsetDateTime,
) -> Outcome {
    f.attempts = f.attempts.saturating_add(history.calls_before);
    if let Some(first) = history.first_attempt_at {
        f.first_attempt_at = f.first_attempt_at.min(first);
    }
    if f.reason == FailureReason::RetriesExhausted
        && let Some(&delay) = delay_tiers.get(history.round as usize)
    {
        let back_at = now + time::Duration::try_from(delay).unwrap_or(time::Duration::MAX);
        match ready.expiry_time {
            Some(expiry) if back_at >= expiry => {
                f.reason = FailureReason::CredentialExpired;
                f.detail = format!(
                    "{}; no delayed retry: the credential expires at {} before it would come back",
                    f.detail,
                    events::rfc3339(expiry)
                );
            }
            _ => {
                return Outcome::Delayed(Box::new(Delayed {
                    delay,
                    retries: history.round + 1,
                    calls: f.attempts,
                    detail: f.detail,
                    first_attempt_at: f.first_attempt_at,
                    not_before: f.not_before,
                }));
            }
        }
    }
    Outcome::Failed(Box::new(Failure {
        reason: f.reason,
        detail: f.detail.clone(),
        attempts: f.attempts,
        event: Some(failed_event(ready, f)),
    }))
}

fn failed_event(ready: &ProvisionReady, f: FlowFailure) -> SessionFailed {
    SessionFailed {
        schema_version: SCHEMA_VERSION,
        provision_id: ready.provision_id.clone(),
        external_uuid: ready.external_uuid.clone(),
        credential_id: ready.credential_id,
        reason: f.reason,
        http_status: f.http_status,
        error_description: f.error_description,
        attempts: f.attempts,
        first_attempt_at: f.first_attempt_at,
        last_attempt_at: f.last_attempt_at,
    }
}

#[cfg(test)]
mod tests;
