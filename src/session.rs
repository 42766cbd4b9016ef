//! The business step: open a bunq session for a ready credential, with retries.
//!
//! Flow (bunq's partner client does the same per credential): `POST /device-server` with the
//! credential's token (when enabled), then `POST /session-server`. Transient failures are retried
//! under the bunq [`RetryPolicy`]; the elapsed budget is shared by both calls, never charged for
//! pacing waits, and never reaches past the credential's `expiry_time`. Knows nothing about AMQP.
//! Time is tokio's, so the budget, the expiry cut-off and the 429 pause are tested on a paused
//! clock.

use std::{sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    bunq::{
        ApiContext, BunqClient, CallError, RetryClass,
        client::{Answer, DEVICE_SERVER, SESSION_SERVER},
        response::SessionServer,
    },
    events::{ProvisionReady, rfc3339},
    failure::{Failure, FailureReason},
    fleet::{Fenced, Lease},
    ledger::Taken,
    pacing::{Budget, Slot, TakenSlot},
    retry::{Retry, RetryPolicy, Spent, sleep_until_or_cancel},
};

/// Opens sessions with the worker's API context.
#[derive(Clone, Debug)]
pub struct SessionFlow {
    /// The HTTP client.
    pub client: BunqClient,
    /// The worker's installation.
    pub ctx: Arc<ApiContext>,
    /// Retry limits of bunq calls (`RETRY_*`).
    pub policy: RetryPolicy,
    /// Whether to call device-server first.
    pub register_device: bool,
    /// device-server `description`.
    pub device_description: String,
    /// device-server `permitted_ips`.
    pub permitted_ips: Vec<String>,
    /// Process-wide pacing of session-server calls.
    pub pacer: Arc<Budget>,
    /// Longest a delivery may wait for pacing slots: half the broker's consumer timeout.
    pub max_hold: Duration,
}

/// A session bunq opened.
#[derive(Debug)]
pub struct Opened {
    /// What bunq returned.
    pub session: SessionServer,
}

/// Why no session was opened.
#[derive(Debug)]
pub enum FlowError {
    /// Permanent: dead-letter with `reason`.
    Failed(Failure),
    /// Shutdown began while waiting to retry; nothing permanent happened.
    Cancelled,
    /// The fleet's shared state (Redis) stayed unreachable for as long as the delivery may be
    /// held: no call was made for it; hand it back.
    SharedStateUnavailable,
    /// The delivery's claim on the credential was taken (its lease ran out and another delivery
    /// took it, or the record was settled meanwhile): no further call was made.
    Taken(Taken),
}

/// One delivery's calls: the retry state, the deadlines and what `session.failed` reports.
pub(crate) struct Calls<'a> {
    retry: Retry,
    pacer: &'a Budget,
    /// The delivery's claim, proven before every call.
    lease: Option<&'a Lease>,
    cancel: &'a CancellationToken,
    /// The credential's `expiry_time` as a tokio instant, with its wall-clock form for messages.
    expires: Option<(Instant, OffsetDateTime)>,
    /// The last moment a paced call may start: half the consumer timeout after the delivery
    /// arrived (its wait for another copy's claim included).
    hold_until: Instant,
    calls: u32,
    first_attempt_at: Option<OffsetDateTime>,
    last_attempt_at: Option<OffsetDateTime>,
    last_error: Option<CallError>,
    /// What an earlier session-server attempt whose answer was lost said, if one was (in this
    /// round, or, as the credential's record says, in an earlier one or on another replica).
    lost_answer: Option<String>,
    /// The end of a pause that ended this round, for the delayed-retry copy.
    not_before: Option<OffsetDateTime>,
}

impl<'a> Calls<'a> {
    /// Starts a delivery's budget now. `expiry` is the credential's `expiry_time`.
    pub(crate) fn new(
        policy: RetryPolicy,
        pacer: &'a Budget,
        hold_until: Instant,
        expiry: Option<OffsetDateTime>,
        lease: Option<&'a Lease>,
        cancel: &'a CancellationToken,
    ) -> Self {
        let now = Instant::now();
        // The expiry is a wall-clock time; every later comparison uses tokio's clock.
        let expires = expiry.map(|e| {
            let left = Duration::try_from(e - OffsetDateTime::now_utc()).unwrap_or(Duration::ZERO);
            (now.checked_add(left).unwrap_or(now + FAR), e)
        });
        Self {
            retry: Retry::new(policy, cancel),
            pacer,
            lease,
            cancel,
            expires,
            hold_until,
            calls: 0,
            first_attempt_at: None,
            last_attempt_at: None,
            last_error: None,
            lost_answer: lease.filter(|l| l.claimed.answer_lost).map(|_| {
                "in an earlier round or on another replica, as the credential's record says".into()
            }),
            not_before: None,
        }
    }

    fn failure(&self, reason: FailureReason, detail: String) -> FlowError {
        let now = OffsetDateTime::now_utc();
        // bunq's description of its last answer, else the worker's own explanation.
        let (http_status, error_description) = match &self.last_error {
            Some(e) => (e.http_status, Some(e.description.clone())),
            None => (None, Some(detail.clone())),
        };
        FlowError::Failed(Failure {
            reason,
            detail,
            http_status,
            error_description,
            attempts: self.calls,
            first_attempt_at: self.first_attempt_at.unwrap_or(now),
            last_attempt_at: self.last_attempt_at.unwrap_or(now),
            not_before: self.not_before.or_else(|| {
                self.pacer
                    .local
                    .paused_until()
                    .map(|until| now + until.saturating_duration_since(Instant::now()))
            }),
        })
    }

    /// Whether the credential will have expired at `at`.
    fn expired_at(&self, at: Instant) -> bool {
        self.expires.is_some_and(|(e, _)| at >= e)
    }

    /// The credential's expiry as RFC 3339, for details.
    fn expiry_text(&self) -> String {
        self.expires.map(|(_, e)| rfc3339(e)).unwrap_or_default()
    }

    /// Waits for a session-server slot and takes it when it is due (`take`), or only waits
    /// until one is due (not `take`: before device-server, so that call is made only when
    /// session-server can follow). Waiting is not a failure, so it is left out of
    /// `RETRY_MAX_ELAPSED_S`. A slot past the credential's expiry fails the round. A slot past
    /// the hold time ends the round with the time to come back carried (`not_before`, see
    /// [`Calls::failure`]): bunq's pause, or the next slot at bunq's pace (others took the
    /// slots), at least [`MIN_PACED_WAIT`]; the copy waits for it in the broker.
    async fn pace(
        &mut self,
        take: bool,
    ) -> Result<Option<(TakenSlot, Option<Probe<'a>>)>, FlowError> {
        let deadline = match self.expires {
            Some((e, _)) => self.hold_until.min(e),
            None => self.hold_until,
        };
        let mut unavailable = Retry::new(RetryPolicy::SHARED_STATE, self.cancel);
        loop {
            if Instant::now() >= self.hold_until
                && self
                    .last_error
                    .as_ref()
                    .is_some_and(|e| e.endpoint == SESSION_SERVER)
            {
                // Not pacing: this delivery's own retries used up the time it may be held.
                let last = self
                    .last_error
                    .as_ref()
                    .map_or_else(String::new, |e| format!("; last: {e}"));
                return Err(self.failure(
                    FailureReason::RetriesExhausted,
                    format!("{SESSION_SERVER}: retries took longer than half the consumer timeout (CONSUMER_TIMEOUT_S){last}"),
                ));
            }
            // Past the deadline a slot due now is still taken; a later one is too late.
            let max_wait = deadline.saturating_duration_since(Instant::now());
            let slot = match take {
                true => self.pacer.take_within(max_wait).await,
                false => self.pacer.due_within(max_wait).await,
            };
            match slot {
                Slot::Now { taken, probe } => {
                    let probe = probe.then_some(Probe {
                        pacer: &self.pacer.local,
                        session: false,
                    });
                    return Ok(taken.map(|t| (t, probe)));
                }
                Slot::NotYet(wait) => {
                    self.retry.exclude(wait);
                    // A monotonically growing total, s (metrics' counters hold whole numbers).
                    metrics::gauge!("bunq_session_worker_rate_limit_wait_seconds_total")
                        .increment(wait.as_secs_f64());
                    sleep_until_or_cancel(Instant::now() + wait, self.cancel)
                        .await
                        .map_err(|_| FlowError::Cancelled)?;
                }
                Slot::TooLate(earliest) => {
                    if self.expired_at(Instant::now() + earliest) {
                        return Err(self.failure(
                            FailureReason::CredentialExpired,
                            format!("{SESSION_SERVER} is paced or paused for another {} s (BUNQ_SESSION_RATE_LIMIT or a 429), past the credential's expiry", earliest.as_secs()),
                        ));
                    }
                    let (wait, why) = match self.pacer.paused_for().await {
                        Some(pause) => (pause, "paused (bunq's 429 window)"),
                        None => (
                            earliest.max(MIN_PACED_WAIT),
                            "paced (others took the slots)",
                        ),
                    };
                    self.not_before = Some(OffsetDateTime::now_utc() + wait);
                    return Err(self.failure(
                        FailureReason::RetriesExhausted,
                        format!("{SESSION_SERVER} is {why} for another {} s, past half the consumer timeout (CONSUMER_TIMEOUT_S)", wait.as_secs()),
                    ));
                }
                Slot::Unavailable => {
                    // Neither a slot nor a claim can be had: wait for Redis, not charged to
                    // the retry budget, for as long as the delivery may be held.
                    unavailable.attempt();
                    let wait = unavailable
                        .next_delay(Duration::ZERO)
                        .unwrap_or(Duration::from_secs(5));
                    if Instant::now() + wait >= self.hold_until {
                        return Err(FlowError::SharedStateUnavailable);
                    }
                    self.retry.exclude(wait);
                    unavailable
                        .wait(wait)
                        .await
                        .map_err(|_| FlowError::Cancelled)?;
                }
            }
        }
    }

    /// Runs one bunq call with retries: the expiry cut-off before each attempt, pacing for
    /// session-server, the status table's class for each failure, a 429 pausing every
    /// session-server call of the process.
    pub(crate) async fn run<T, F, Fut>(
        &mut self,
        endpoint: &'static str,
        mut call: F,
    ) -> Result<Answer<T>, FlowError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Answer<T>, CallError>>,
    {
        self.retry.restart_attempts();
        loop {
            if self.expired_at(Instant::now()) {
                return Err(self.failure(
                    FailureReason::CredentialExpired,
                    format!(
                        "credential expired before {endpoint} attempt {}",
                        self.retry.attempts() + 1
                    ),
                ));
            }
            let (slot, mut probe) = match endpoint {
                SESSION_SERVER => match self.pace(true).await? {
                    Some((taken, probe)) => (Some(taken), probe),
                    None => (None, None),
                },
                _ => (None, None),
            };
            // Last thing before the call: the claim is still this delivery's, and renewed to
            // outlast the call (bunq takes no fencing token, so this is as close as it gets).
            if let Some(lease) = self.lease
                && let Err(f) = lease.fence().await
            {
                if let Some(taken) = slot {
                    self.pacer.give_back(taken).await;
                }
                return Err(match f {
                    Fenced::Taken(t) => FlowError::Taken(t),
                    Fenced::Unavailable => FlowError::SharedStateUnavailable,
                });
            }
            let attempt = self.retry.attempt();
            self.calls = self.calls.saturating_add(1);
            self.first_attempt_at
                .get_or_insert_with(OffsetDateTime::now_utc);
            let t0 = Instant::now();
            let result = call().await;
            if let Some(p) = probe.as_mut() {
                p.session = result.is_ok();
            }
            self.last_attempt_at = Some(OffsetDateTime::now_utc());
            let status = match &result {
                Ok(_) => "200".to_owned(),
                Err(e) => e
                    .http_status
                    .map_or_else(|| "error".to_owned(), |s| s.to_string()),
            };
            let label = endpoint.trim_start_matches("POST /");
            metrics::counter!("bunq_session_worker_bunq_requests_total", "endpoint" => label, "status" => status)
                .increment(1);
            metrics::histogram!("bunq_session_worker_bunq_request_duration_seconds", "endpoint" => label)
                .record(t0.elapsed().as_secs_f64());
            if endpoint == SESSION_SERVER {
                self.pacer.answered().await;
            }
            let latency_ms = t0.elapsed().as_millis() as u64;
            let err = match result {
                // At DEBUG: a delivery's one INFO line is `delivery handled`; failures are WARN.
                Ok(answer) => {
                    debug!(
                        endpoint,
                        attempt,
                        latency_ms,
                        bunq_response_id = answer.response_id.as_deref(),
                        "bunq call succeeded"
                    );
                    return Ok(answer);
                }
                Err(e) => e,
            };
            warn!(
                endpoint,
                attempt,
                latency_ms,
                http_status = err.http_status,
                bunq_response_id = err.response_id.as_deref(),
                retry_class = err.class.as_str(),
                error = %err,
                "bunq call failed"
            );
            let class = err.class.clone();
            let summary = err.to_string();
            if endpoint == SESSION_SERVER && err.answer_lost && self.lost_answer.is_none() {
                self.lost_answer = Some(summary.clone());
                if let Some(lease) = self.lease {
                    lease.answer_lost().await;
                }
            }
            self.last_error = Some(err);
            let floor = match class {
                // A spent credential is refused at device-server as well as at session-server:
                // after a lost session-server answer either refusal may be bunq's own session.
                RetryClass::Permanent(FailureReason::CredentialRejected) => {
                    return Err(match &self.lost_answer {
                        Some(lost) => self.failure(
                            FailureReason::OutcomeUnknown,
                            format!("an earlier session-server attempt's answer was lost ({lost}) and bunq now refuses the credential ({summary}): bunq may have opened a session whose token never arrived; ask bunq for a token reset (PUT partner-user-provision/{{id}} with TOKEN_RESET_REQUESTED) and publish the new credential"),
                        ),
                        None => self.failure(FailureReason::CredentialRejected, summary),
                    });
                }
                RetryClass::Permanent(reason) => return Err(self.failure(reason, summary)),
                RetryClass::RateLimited { window, rate } if endpoint == SESSION_SERVER => {
                    // A 429 is about this worker, not this delivery: every session-server call
                    // waits out bunq's window and then goes at bunq's pace. The wait is pacing,
                    // left out of RETRY_MAX_ELAPSED_S (see `pace`); the call counts as an
                    // attempt, and a round whose attempts end on a 429 waits for the window's
                    // end in the broker (its copy carries it: see `failure`).
                    self.pacer.rate_limited(window, rate).await;
                    Duration::ZERO
                }
                RetryClass::Transient => Duration::ZERO,
                RetryClass::RateLimited { window, .. } => self.pacer.local.pace.window(window),
            };
            // The probe ends once what bunq said is recorded (a 429's pace and pause), not with
            // the backoff after it.
            drop(probe.take());
            let delay = match self.retry.next_delay(floor) {
                Ok(d) => d,
                Err(Spent::Attempts) => {
                    return Err(self.failure(
                        FailureReason::RetriesExhausted,
                        format!(
                            "{endpoint} failed {attempt} times (RETRY_MAX_ATTEMPTS); last: {summary}"
                        ),
                    ));
                }
                Err(Spent::Elapsed) => {
                    return Err(self.failure(
                        FailureReason::RetriesExhausted,
                        format!(
                            "{endpoint}: the next retry would pass RETRY_MAX_ELAPSED_S ({} s); last: {summary}",
                            self.retry_budget_s()
                        ),
                    ));
                }
            };
            if self.expired_at(Instant::now() + delay) {
                return Err(self.failure(
                    FailureReason::CredentialExpired,
                    format!(
                        "{endpoint}: the credential expires at {} before the next retry; last: {summary}",
                        self.expiry_text()
                    ),
                ));
            }
            self.retry
                .wait(delay)
                .await
                .map_err(|_| FlowError::Cancelled)?;
        }
    }

    fn retry_budget_s(&self) -> u64 {
        self.retry.max_elapsed().map_or(0, |d| d.as_secs())
    }
}

/// Stands for "no limit" without overflowing clocks: a year.
/// A session-server call admitted while bunq's pace is unknown
/// ([`crate::pacing::Pacer::admit_probe`]): ended when dropped, however the call ends.
struct Probe<'a> {
    pacer: &'a crate::pacing::Pacer,
    /// bunq opened a session: the probe limit may grow.
    session: bool,
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        self.pacer.probe_ended(self.session);
    }
}

/// The shortest time a copy waits in the broker for bunq's pace, so a copy that comes back
/// just before its slot does not circle.
pub const MIN_PACED_WAIT: Duration = Duration::from_secs(1);

const FAR: Duration = Duration::from_secs(365 * 86_400);

impl SessionFlow {
    /// Opens a session for `p`.
    ///
    /// # Errors
    /// [`FlowError::Failed`] with `credential_expired` when the credential has expired before a
    /// call (no call is made for an already-expired credential) or would expire before the next
    /// retry; `retries_exhausted` when transient failures outlast `max_attempts` for one call or
    /// `max_elapsed` for the delivery; the status table's reason for a permanent answer.
    /// [`FlowError::Cancelled`] when `cancel` fires during a wait.
    /// [`FlowError::Taken`] when `lease`, proven before every call, is no longer this
    /// delivery's; [`FlowError::SharedStateUnavailable`] when Redis cannot prove it.
    /// `not_before` is the end of a pause bunq asked for in an earlier round (carried by a
    /// delayed-retry copy): no session-server call starts before it.
    pub async fn open(
        &self,
        p: &ProvisionReady,
        not_before: Option<OffsetDateTime>,
        lease: Option<&Lease>,
        hold_until: Instant,
        cancel: &CancellationToken,
    ) -> Result<Opened, FlowError> {
        if let Some(t) = not_before
            && let Ok(left) = Duration::try_from(t - OffsetDateTime::now_utc())
        {
            self.pacer.pause_for(left).await;
        }
        let mut calls = Calls::new(
            self.policy.clone(),
            &self.pacer,
            hold_until,
            p.expiry_time,
            lease,
            cancel,
        );
        if let Some(expiry) = p.expiry_time
            && calls.expired_at(Instant::now())
        {
            return Err(calls.failure(
                FailureReason::CredentialExpired,
                format!("credential expired at {} before any call", rfc3339(expiry)),
            ));
        }
        if self.register_device {
            // Registering the device only when session-server can follow: a credential that
            // must wait for bunq's pace waits before any call, not after one.
            calls.pace(false).await?;
            calls
                .run(DEVICE_SERVER, || {
                    self.client.device_server(
                        &self.ctx,
                        &p.token_value,
                        &self.device_description,
                        &self.permitted_ips,
                    )
                })
                .await?;
        }
        let answer = calls
            .run(SESSION_SERVER, || {
                self.client.session_server(&self.ctx, &p.token_value)
            })
            .await?;
        Ok(Opened {
            session: answer.value,
        })
    }
}

#[cfg(test)]
mod tests;
