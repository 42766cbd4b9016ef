//! The breaker: a failure that says something about the worker's own set-up (its installation,
//! its signature, its egress IP, its configuration) stops the worker taking work, instead of
//! being charged to the users' credentials one by one.
//!
//! - bunq refusing the worker's installation or signature (401, 466, bunq's signature and
//!   installation texts under any status: [`FailureReason::SignatureRejected`]) opens it at once.
//! - Reasons that can be the worker's own (`credential_rejected` with bunq's "Incorrect API key
//!   or IP address", `forbidden`, `unexpected_response`, `response_signature_invalid`) open it
//!   after `BREAKER_THRESHOLD` consecutive failures of one reason on different credentials.
//! - While open, deliveries are handed back unprocessed (no dead letter, no `session.failed`)
//!   and the consumer pauses. After a backoff (1 s, doubling, at most 60 s) one delivery is let
//!   through as a trial: if it gets past bunq the breaker closes; if it fails the same way it
//!   opens again for longer.

use std::{collections::HashSet, sync::Mutex, time::Duration};

use tokio::{sync::watch, time::Instant};

use crate::{failure::FailureReason, identity::Key};

/// First wait before a trial.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait before a trial.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What a failure says about whose fault it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The worker's own set-up, certainly: open at once.
    Setup,
    /// Possibly the worker's own: open after the threshold.
    MaybeSetup,
    /// The credential's (or nobody's): does not concern the breaker.
    Credential,
}

/// Whose fault a failure with `reason` and bunq's `description` is.
pub fn fault_of(reason: FailureReason, description: &str) -> Fault {
    match reason {
        FailureReason::SignatureRejected => Fault::Setup,
        FailureReason::CredentialRejected
            if description.contains("Incorrect API key or IP address") =>
        {
            Fault::MaybeSetup
        }
        FailureReason::Forbidden
        | FailureReason::UnexpectedResponse
        | FailureReason::ResponseSignatureInvalid => Fault::MaybeSetup,
        _ => Fault::Credential,
    }
}

/// May a delivery go to bunq?
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Yes.
    Go,
    /// Yes, as the trial of an open breaker: report its result.
    Trial,
    /// No: hand it back. The reason that opened the breaker.
    Refused(FailureReason),
}

/// Why the breaker is open, for logs and readiness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    /// The reason code that opened it.
    pub reason: FailureReason,
    /// bunq's words or the worker's, no secrets.
    pub detail: String,
    /// When a trial may go.
    pub retry_at: Instant,
}

#[derive(Debug, Default)]
struct State {
    streak: Option<(FailureReason, HashSet<Key>)>,
    open: Option<Open>,
    backoff: Option<Duration>,
    trial: bool,
}

/// The breaker, shared by all deliveries of a worker.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    state: Mutex<State>,
    /// `Some(retry_at)` while open: the consumer pauses until then.
    paused: watch::Sender<Option<Instant>>,
}

impl Breaker {
    /// A closed breaker opening after `threshold` (>= 1) possible set-up faults in a row.
    pub fn new(threshold: u32) -> Self {
        Self {
            threshold: threshold.max(1),
            state: Mutex::default(),
            paused: watch::Sender::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Some(until)` while the consumer should pause.
    pub fn paused(&self) -> watch::Receiver<Option<Instant>> {
        self.paused.subscribe()
    }

    /// Why it is open, if it is.
    pub fn open(&self) -> Option<Open> {
        self.lock().open.clone()
    }

    /// Asks whether a delivery may go to bunq. While a trial is under way, waits for its
    /// result.
    pub async fn admit(&self) -> Admission {
        let mut changes = self.paused.subscribe();
        loop {
            {
                let mut st = self.lock();
                let Some(open) = &st.open else {
                    return Admission::Go;
                };
                if !st.trial && Instant::now() >= open.retry_at {
                    st.trial = true;
                    return Admission::Trial;
                }
                if !st.trial {
                    return Admission::Refused(open.reason);
                }
            }
            if changes.changed().await.is_err() {
                return Admission::Go;
            }
        }
    }

    /// Reports a delivery that got past bunq (a session, or a failure that is the credential's):
    /// closes the breaker and ends any streak.
    pub fn record_ok(&self) {
        let mut st = self.lock();
        st.streak = None;
        st.trial = false;
        if st.open.take().is_some() {
            st.backoff = None;
            tracing::info!(
                "bunq accepts the worker's set-up again; the breaker is closed and work resumes"
            );
            self.paused.send_replace(None);
        }
    }

    /// Reports a trial that ended without an answer (shutdown): the next delivery may try.
    pub fn release_trial(&self) {
        self.lock().trial = false;
        self.paused.send_modify(|_| {});
    }

    /// Reports a failure that may be the worker's own (see [`fault_of`]) on the credential
    /// `identity`; `trial` says whether the delivery was the breaker's trial. Returns whether the
    /// breaker is open now: then the delivery is handed back instead of dead-lettered.
    pub fn record_fault(
        &self,
        fault: Fault,
        reason: FailureReason,
        detail: &str,
        identity: Key,
        trial: bool,
    ) -> bool {
        let mut st = self.lock();
        // Only a failed trial lengthens the wait: refusals of calls already under way when the
        // breaker opened say nothing new.
        if fault != Fault::Credential && st.open.is_some() && !trial {
            return true;
        }
        let opens = match fault {
            Fault::Credential => return false,
            Fault::Setup => true,
            Fault::MaybeSetup => {
                let streak = match &mut st.streak {
                    Some((r, ids)) if *r == reason => ids,
                    _ => &mut st.streak.insert((reason, HashSet::new())).1,
                };
                streak.insert(identity);
                streak.len() as u32 >= self.threshold || st.open.is_some()
            }
        };
        if !opens {
            return false;
        }
        let backoff = st
            .backoff
            .map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF));
        st.backoff = Some(backoff);
        st.trial = false;
        let retry_at = Instant::now() + backoff;
        if st.open.is_none() {
            tracing::error!(
                %reason,
                %detail,
                "bunq refuses the worker's own set-up, not a user's credential: not taking work. Check the API context (BUNQ_CONTEXT_FILE or BUNQ_CLIENT_PRIVATE_KEY / BUNQ_INSTALLATION_TOKEN / BUNQ_SERVER_PUBLIC_KEY) is bunq's for BUNQ_API_URL, and that this host's egress IP is permitted; deliveries are handed back meanwhile"
            );
        }
        tracing::warn!(%reason, retry_in_s = backoff.as_secs(), "breaker open; one delivery will be tried again");
        st.open = Some(Open {
            reason,
            detail: detail.to_owned(),
            retry_at,
        });
        self.paused.send_replace(Some(retry_at));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REJECTED: &str = "User credentials are incorrect. Incorrect API key or IP address.";

    #[test]
    fn faults_are_told_apart_by_reason_and_bunqs_words() {
        use FailureReason::*;
        assert_eq!(fault_of(SignatureRejected, ""), Fault::Setup);
        assert_eq!(fault_of(CredentialRejected, REJECTED), Fault::MaybeSetup);
        assert_eq!(
            fault_of(CredentialRejected, "Token expired."),
            Fault::Credential
        );
        assert_eq!(fault_of(Forbidden, ""), Fault::MaybeSetup);
        assert_eq!(fault_of(CredentialExpired, ""), Fault::Credential);
        assert_eq!(fault_of(RetriesExhausted, ""), Fault::Credential);
    }

    #[tokio::test(start_paused = true)]
    async fn a_streak_on_different_credentials_opens_it_and_a_trial_closes_it() {
        let b = Breaker::new(3);
        let r = FailureReason::CredentialRejected;
        assert!(!b.record_fault(Fault::MaybeSetup, r, REJECTED, [1; 32], false));
        // The same credential again does not lengthen the streak.
        assert!(!b.record_fault(Fault::MaybeSetup, r, REJECTED, [1; 32], false));
        assert!(!b.record_fault(Fault::MaybeSetup, r, REJECTED, [2; 32], false));
        assert!(b.record_fault(Fault::MaybeSetup, r, REJECTED, [3; 32], false));
        assert_eq!(b.admit().await, Admission::Refused(r));
        assert_eq!(*b.paused().borrow(), Some(Instant::now() + FIRST_BACKOFF));
        tokio::time::advance(FIRST_BACKOFF).await;
        assert_eq!(b.admit().await, Admission::Trial);
        b.record_ok();
        assert_eq!(b.admit().await, Admission::Go);
        assert_eq!(*b.paused().borrow(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_setup_fault_opens_it_at_once_and_failed_trials_back_off_to_a_minute() {
        let b = Breaker::new(5);
        let r = FailureReason::SignatureRejected;
        assert!(b.record_fault(Fault::Setup, r, "HTTP 401", [1; 32], false));
        // Refusals of calls that were already under way do not push the trial back.
        for i in 2..10u8 {
            assert!(b.record_fault(Fault::Setup, r, "HTTP 401", [i; 32], false));
        }
        let mut waits = Vec::new();
        for _ in 0..8 {
            let until = b.paused().borrow().unwrap();
            waits.push(until.duration_since(Instant::now()).as_secs());
            tokio::time::advance(until.duration_since(Instant::now())).await;
            assert_eq!(b.admit().await, Admission::Trial);
            assert!(b.record_fault(Fault::Setup, r, "HTTP 401", [1; 32], true));
        }
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[tokio::test(start_paused = true)]
    async fn others_wait_for_the_trial() {
        let b = std::sync::Arc::new(Breaker::new(1));
        b.record_fault(
            Fault::Setup,
            FailureReason::SignatureRejected,
            "",
            [1; 32],
            false,
        );
        tokio::time::advance(FIRST_BACKOFF).await;
        assert_eq!(b.admit().await, Admission::Trial);
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.admit().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        b.record_ok();
        assert_eq!(waiting.await.unwrap(), Admission::Go);
    }
}
