//! The business step: open a bunq session for a ready credential, with retries.
//!
//! Flow (bunq's partner client does the same per credential): `POST /device-server` with the
//! credential's token (when enabled), then `POST /session-server`. Transient failures are retried
//! under [`RetryPolicy`]; the budget is shared by both calls and never reaches past the
//! credential's `expiry_time`. Knows nothing about AMQP.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    bunq::{
        ApiContext, BunqClient, CallError, RetryClass,
        client::{Answer, DEVICE_SERVER, SESSION_SERVER},
        response::SessionServer,
    },
    events::{ProvisionReady, rfc3339},
    outcome::FailureReason,
    pacing::Pacer,
    retry::RetryPolicy,
};

/// Opens sessions with the worker's API context.
#[derive(Clone, Debug)]
pub struct SessionFlow {
    /// The HTTP client.
    pub client: BunqClient,
    /// The worker's installation.
    pub ctx: Arc<ApiContext>,
    /// Retry limits.
    pub policy: RetryPolicy,
    /// Whether to call device-server first.
    pub register_device: bool,
    /// device-server `description`.
    pub device_description: String,
    /// device-server `permitted_ips`.
    pub permitted_ips: Vec<String>,
    /// Process-wide pacing of session-server calls.
    pub pacer: Arc<Pacer>,
    /// Longest a delivery may wait for pacing slots: half the broker's consumer timeout.
    pub max_hold: Duration,
}

/// A session bunq opened.
#[derive(Debug)]
pub struct Opened {
    /// What bunq returned.
    pub session: SessionServer,
    /// Calls made, all endpoints together.
    pub attempts: u32,
}

/// Why no session was opened.
#[derive(Debug)]
pub enum FlowError {
    /// Permanent: dead-letter with `reason`.
    Failed(FlowFailure),
    /// Shutdown began while waiting to retry; nothing permanent happened.
    Cancelled,
}

/// A permanent failure with what `session.failed` reports.
#[derive(Debug)]
pub struct FlowFailure {
    /// Reason code.
    pub reason: FailureReason,
    /// Human text, no secrets.
    pub detail: String,
    /// Last HTTP status seen.
    pub http_status: Option<u16>,
    /// bunq's `error_description` of the last answer, if any.
    pub error_description: Option<String>,
    /// Calls made.
    pub attempts: u32,
    /// When the first call started (handling time when none was made).
    pub first_attempt_at: OffsetDateTime,
    /// When the last call ended.
    pub last_attempt_at: OffsetDateTime,
}

struct Budget<'a> {
    policy: &'a RetryPolicy,
    started: Instant,
    expiry: Option<OffsetDateTime>,
    attempts: u32,
    first_attempt_at: Option<OffsetDateTime>,
    last_attempt_at: Option<OffsetDateTime>,
    last_error: Option<CallError>,
    /// Time spent waiting for pacing slots, not charged to `max_elapsed`.
    paced: Duration,
}

impl Budget<'_> {
    fn failure(&self, reason: FailureReason, detail: String) -> FlowError {
        let now = OffsetDateTime::now_utc();
        // bunq's description of its last answer, else the worker's own explanation.
        let (http_status, error_description) = match &self.last_error {
            Some(e) => (e.http_status, Some(e.description.clone())),
            None => (None, Some(detail.clone())),
        };
        FlowError::Failed(FlowFailure {
            reason,
            detail,
            http_status,
            error_description,
            attempts: self.attempts,
            first_attempt_at: self.first_attempt_at.unwrap_or(now),
            last_attempt_at: self.last_attempt_at.unwrap_or(now),
        })
    }

    fn expired(&self, now: OffsetDateTime) -> bool {
        self.expiry.is_some_and(|e| now >= e)
    }

    /// The last moment a paced call may start: the end of the time a delivery may be held
    /// (`max_hold`, half the broker's consumer timeout) or the credential's expiry. Waiting for a
    /// pacing slot is not a failure, so it is not charged to `RETRY_MAX_ELAPSED_S`.
    fn pacing_deadline(&self, max_hold: Duration) -> Instant {
        let budget_end = self
            .started
            .checked_add(max_hold)
            .unwrap_or_else(|| self.started + Duration::from_secs(86_400 * 365));
        match self.expiry {
            Some(e) => {
                let left = e - OffsetDateTime::now_utc();
                let left = Duration::try_from(left).unwrap_or(Duration::ZERO);
                budget_end.min(Instant::now().checked_add(left).unwrap_or(budget_end))
            }
            None => budget_end,
        }
    }
}

impl SessionFlow {
    /// Opens a session for `p`.
    ///
    /// # Errors
    /// [`FlowError::Failed`] with `credential_expired` when the credential has expired before a
    /// call (no call is made for an already-expired credential) or would expire before the next
    /// retry; `retries_exhausted` when transient failures outlast `max_attempts` for one call or
    /// `max_elapsed` for the delivery; the status table's reason for a permanent answer.
    /// [`FlowError::Cancelled`] when `cancel` fires during a retry delay.
    pub async fn open(
        &self,
        p: &ProvisionReady,
        cancel: &CancellationToken,
    ) -> Result<Opened, FlowError> {
        let mut budget = Budget {
            policy: &self.policy,
            started: Instant::now(),
            expiry: p.expiry_time,
            attempts: 0,
            first_attempt_at: None,
            last_attempt_at: None,
            last_error: None,
            paced: Duration::ZERO,
        };
        if budget.expired(OffsetDateTime::now_utc()) {
            return Err(budget.failure(
                FailureReason::CredentialExpired,
                format!(
                    "credential expired at {} before any call",
                    rfc3339(p.expiry_time.expect("expired() implies an expiry"))
                ),
            ));
        }
        if self.register_device {
            self.with_retries(&mut budget, DEVICE_SERVER, cancel, || {
                self.client.device_server(
                    &self.ctx,
                    &p.token_value,
                    &self.device_description,
                    &self.permitted_ips,
                )
            })
            .await?;
        }
        let answer = self
            .with_retries(&mut budget, SESSION_SERVER, cancel, || {
                self.client.session_server(&self.ctx, &p.token_value)
            })
            .await?;
        Ok(Opened {
            session: answer.value,
            attempts: budget.attempts,
        })
    }

    async fn with_retries<T, F, Fut>(
        &self,
        budget: &mut Budget<'_>,
        endpoint: &'static str,
        cancel: &CancellationToken,
        mut call: F,
    ) -> Result<Answer<T>, FlowError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Answer<T>, CallError>>,
    {
        let mut schedule = budget.policy.schedule();
        let mut attempt_of_call = 0u32;
        loop {
            let now = OffsetDateTime::now_utc();
            if budget.expired(now) {
                return Err(budget.failure(
                    FailureReason::CredentialExpired,
                    format!(
                        "credential expired before {endpoint} attempt {}",
                        attempt_of_call + 1
                    ),
                ));
            }
            if endpoint == SESSION_SERVER {
                match self
                    .pacer
                    .reserve_before(budget.pacing_deadline(self.max_hold))
                {
                    Ok(at) => {
                        budget.paced += at.saturating_duration_since(Instant::now());
                        tokio::select! {
                            _ = tokio::time::sleep_until(at.into()) => {}
                            _ = cancel.cancelled() => return Err(FlowError::Cancelled),
                        }
                    }
                    Err(earliest) => {
                        let wait_s = earliest.saturating_duration_since(Instant::now()).as_secs();
                        let reason = if budget.expiry.is_some_and(|e| {
                            OffsetDateTime::now_utc() + Duration::from_secs(wait_s) >= e
                        }) {
                            FailureReason::CredentialExpired
                        } else {
                            FailureReason::RetriesExhausted
                        };
                        return Err(budget.failure(
                            reason,
                            format!("{endpoint} is paced or paused for another {wait_s} s (BUNQ_SESSION_RATE_LIMIT or a 429), past half the consumer timeout (CONSUMER_TIMEOUT_S) or the credential's expiry"),
                        ));
                    }
                }
            }
            attempt_of_call += 1;
            budget.attempts += 1;
            budget
                .first_attempt_at
                .get_or_insert(OffsetDateTime::now_utc());
            let t0 = Instant::now();
            let result = call().await;
            budget.last_attempt_at = Some(OffsetDateTime::now_utc());
            let latency_ms = t0.elapsed().as_millis() as u64;
            let err = match result {
                Ok(answer) => {
                    info!(
                        endpoint,
                        attempt = attempt_of_call,
                        latency_ms,
                        bunq_response_id = answer.response_id.as_deref().unwrap_or(""),
                        outcome = "ok",
                        "bunq call succeeded"
                    );
                    return Ok(answer);
                }
                Err(e) => e,
            };
            warn!(
                endpoint,
                attempt = attempt_of_call,
                latency_ms,
                http_status = err.http_status,
                bunq_response_id = err.response_id.as_deref().unwrap_or(""),
                outcome = ?err.class,
                error = %err,
                "bunq call failed"
            );
            let class = err.class.clone();
            let summary = err.to_string();
            budget.last_error = Some(err);
            let floor = match class {
                RetryClass::Permanent(reason) => return Err(budget.failure(reason, summary)),
                RetryClass::Transient => None,
                RetryClass::RateLimited { window } => Some(window.unwrap_or_default()),
            };
            let next = schedule.next();
            let delay =
                RetryPolicy::jitter(next.unwrap_or_default()).max(floor.unwrap_or_default());
            if endpoint == SESSION_SERVER && floor.is_some() {
                // A 429 is about this worker, not this delivery: hold every session-server call,
                // also when this delivery retries no more.
                self.pacer.pause(delay);
            }
            if next.is_none() {
                return Err(budget.failure(
                    FailureReason::RetriesExhausted,
                    format!(
                        "{endpoint} failed {attempt_of_call} times (RETRY_MAX_ATTEMPTS); last: {summary}"
                    ),
                ));
            }
            let retrying_for = budget.started.elapsed().saturating_sub(budget.paced);
            if retrying_for.saturating_add(delay) > budget.policy.max_elapsed {
                return Err(budget.failure(
                    FailureReason::RetriesExhausted,
                    format!(
                        "{endpoint}: the next retry would pass RETRY_MAX_ELAPSED_S ({} s); last: {summary}",
                        budget.policy.max_elapsed.as_secs()
                    ),
                ));
            }
            if let Some(expiry) = budget.expiry
                && OffsetDateTime::now_utc()
                    .checked_add(time::Duration::try_from(delay).unwrap_or(time::Duration::MAX))
                    .is_none_or(|next| next >= expiry)
            {
                return Err(budget.failure(
                    FailureReason::CredentialExpired,
                    format!(
                        "{endpoint}: the credential expires at {} before the next retry; last: {summary}",
                        rfc3339(expiry)
                    ),
                ));
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => return Err(FlowError::Cancelled),
            }
        }
    }
}
