//! Paused-clock tests of the retry budget, the expiry cut-off and pacing: the call is a closure
//! returning what bunq's client would, so only time and the decisions are under test.

use std::sync::Mutex;

use super::*;
use crate::{
    pacing::{Pace, Pacer},
    rate_limit::RateLimit,
};

fn policy(max_elapsed_s: u64) -> RetryPolicy {
    RetryPolicy {
        initial_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(8),
        max_attempts: 10,
        max_elapsed: Some(Duration::from_secs(max_elapsed_s)),
        jitter: false,
        min_delay: Duration::ZERO,
    }
}

fn error(class: RetryClass, status: u16) -> CallError {
    CallError {
        endpoint: SESSION_SERVER,
        class,
        http_status: Some(status),
        description: "from the test".into(),
        response_id: None,
        answer_lost: false,
    }
}

/// A call that fails with `errors` in turn, then succeeds; records when each attempt began
/// (seconds since `t0`).
struct Script {
    t0: Instant,
    errors: Mutex<Vec<CallError>>,
    at: Mutex<Vec<u64>>,
}

impl Script {
    fn new(mut errors: Vec<CallError>) -> Self {
        errors.reverse();
        Self {
            t0: Instant::now(),
            errors: Mutex::new(errors),
            at: Mutex::new(Vec::new()),
        }
    }

    fn always(class: RetryClass, status: u16) -> Self {
        Self::new(vec![error(class, status); 100])
    }

    async fn call(&self) -> Result<Answer<()>, CallError> {
        self.at.lock().unwrap().push(self.t0.elapsed().as_secs());
        match self.errors.lock().unwrap().pop() {
            Some(e) => Err(e),
            None => Ok(Answer {
                value: (),
                response_id: None,
            }),
        }
    }

    fn at(&self) -> Vec<u64> {
        self.at.lock().unwrap().clone()
    }
}

fn failed(r: Result<Answer<()>, FlowError>) -> Failure {
    match r {
        Err(FlowError::Failed(f)) => f,
        other => panic!("expected a failure, got {other:?}"),
    }
}

fn in_s(s: i64) -> Option<OffsetDateTime> {
    Some(OffsetDateTime::now_utc() + time::Duration::seconds(s))
}

#[tokio::test(start_paused = true)]
async fn the_expiry_cuts_retries_before_the_wait_that_would_pass_it() {
    let pacer = Budget::from(Pacer::new(Pace::elsewhere(None)));
    let cancel = CancellationToken::new();
    let script = Script::always(RetryClass::Transient, 503);
    // Delays 1, 2, 4, 8 s: attempts at 0, 1, 3, 7; the next would be at 15, past the expiry.
    let mut calls = Calls::new(
        policy(300),
        &pacer,
        Instant::now() + FAR,
        in_s(12),
        None,
        &cancel,
    );
    let f = failed(calls.run(DEVICE_SERVER, || script.call()).await);
    assert_eq!(f.reason, FailureReason::CredentialExpired);
    assert!(f.detail.contains("before the next retry"), "{}", f.detail);
    assert_eq!(script.at(), vec![0, 1, 3, 7]);
    assert_eq!((f.attempts, f.http_status), (4, Some(503)));
}

#[tokio::test(start_paused = true)]
async fn the_elapsed_budget_ends_retries_with_retries_exhausted() {
    let pacer = Budget::from(Pacer::new(Pace::elsewhere(None)));
    let cancel = CancellationToken::new();
    let script = Script::always(RetryClass::Transient, 502);
    // Attempts at 0, 1, 3; waiting 4 more would end at 7, past the 5 s budget.
    let mut calls = Calls::new(policy(5), &pacer, Instant::now() + FAR, None, None, &cancel);
    let f = failed(calls.run(DEVICE_SERVER, || script.call()).await);
    assert_eq!(f.reason, FailureReason::RetriesExhausted);
    assert!(
        f.detail.contains("RETRY_MAX_ELAPSED_S (5 s)"),
        "{}",
        f.detail
    );
    assert_eq!(script.at(), vec![0, 1, 3]);
}

#[tokio::test(start_paused = true)]
async fn the_budget_is_shared_by_both_calls_but_attempts_are_per_call() {
    let pacer = Budget::from(Pacer::new(Pace::elsewhere(None)));
    let cancel = CancellationToken::new();
    let p = RetryPolicy {
        max_attempts: 3,
        ..policy(300)
    };
    let mut calls = Calls::new(p, &pacer, Instant::now() + FAR, None, None, &cancel);
    let device = Script::new(vec![error(RetryClass::Transient, 503); 2]);
    calls.run(DEVICE_SERVER, || device.call()).await.unwrap();
    let session = Script::always(RetryClass::Transient, 503);
    let f = failed(calls.run(SESSION_SERVER, || session.call()).await);
    assert_eq!(f.reason, FailureReason::RetriesExhausted);
    assert!(
        f.detail.contains("failed 3 times (RETRY_MAX_ATTEMPTS)"),
        "{}",
        f.detail
    );
    assert_eq!(
        f.attempts, 6,
        "3 device-server calls and 3 session-server calls"
    );
}

fn too_many(window_s: u64) -> CallError {
    error(
        RetryClass::RateLimited {
            window: Some(Duration::from_secs(window_s)),
            rate: Some(RateLimit {
                calls: 1,
                per: Duration::from_secs(window_s),
            }),
        },
        429,
    )
}

#[tokio::test(start_paused = true)]
async fn a_429_pauses_every_session_server_call_then_they_go_at_bunqs_pace() {
    let pacer = Budget::from(Pacer::new(Pace::elsewhere(None)));
    let cancel = CancellationToken::new();
    let script = Script::new(vec![too_many(30)]);
    let mut calls = Calls::new(
        policy(300),
        &pacer,
        Instant::now() + FAR,
        None,
        None,
        &cancel,
    );
    let t0 = Instant::now();
    let first = calls.run(SESSION_SERVER, || script.call());
    // Another delivery that wants a slot once the 429 has arrived waits out the same window.
    let other_script = Script::new(vec![]);
    let other = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut calls = Calls::new(
            policy(300),
            &pacer,
            Instant::now() + FAR,
            None,
            None,
            &cancel,
        );
        calls.run(SESSION_SERVER, || other_script.call()).await
    };
    let (first, other) = tokio::join!(first, other);
    first.unwrap();
    other.unwrap();
    assert_eq!(
        t0.elapsed().as_secs(),
        script.at()[1].max(other_script.at()[0])
    );
    let mut slots = [script.at()[1], other_script.at()[0]];
    slots.sort();
    // 30 s, plus up to a tenth of the interval of jitter so processes do not resume together;
    // then one call per 30 s, bunq's stated rate, not together (whichever goes first).
    assert!((30..=33).contains(&slots[0]), "{slots:?}");
    assert!(
        (30..=31).contains(&(slots[1] - slots[0])),
        "30 s and the margin: {slots:?}"
    );
}

/// A 429 counts as an attempt (the bound on calls), its wait as pacing (not elapsed time); a
/// round whose attempts end on 429s carries the window's end for the copy that waits it out.
#[tokio::test(start_paused = true)]
async fn a_round_whose_attempts_end_on_429s_carries_the_window() {
    let pacer = Budget::from(Pacer::new(Pace::elsewhere(None)));
    let cancel = CancellationToken::new();
    let p = RetryPolicy {
        max_attempts: 2,
        ..policy(5)
    };
    let script = Script::new(vec![too_many(10), too_many(10), too_many(10)]);
    let mut calls = Calls::new(p, &pacer, Instant::now() + FAR, None, None, &cancel);
    let f = failed(calls.run(SESSION_SERVER, || script.call()).await);
    assert_eq!(f.reason, FailureReason::RetriesExhausted);
    let at = script.at();
    assert_eq!(at.len(), 2, "two attempts: {at:?}");
    assert!(at[1] >= 10, "the second waited out the 10 s window: {at:?}");
    let left =
        (f.not_before.expect("the window's end") - OffsetDateTime::now_utc()).whole_seconds();
    assert!((9..=12).contains(&left), "{left}");
}

#[tokio::test(start_paused = true)]
async fn a_window_past_the_hold_time_ends_the_round_with_the_window_carried() {
    let pacer = Budget::from(Pacer::new(Pace::elsewhere(None)));
    let cancel = CancellationToken::new();
    let script = Script::new(vec![too_many(600)]);
    let mut calls = Calls::new(
        policy(30),
        &pacer,
        Instant::now() + Duration::from_secs(60),
        None,
        None,
        &cancel,
    );
    let f = failed(calls.run(SESSION_SERVER, || script.call()).await);
    assert_eq!(f.reason, FailureReason::RetriesExhausted);
    assert_eq!(script.at(), vec![0], "no call inside bunq's window");
    let not_before = f
        .not_before
        .expect("the window's end travels with the delayed retry");
    let left = (not_before - OffsetDateTime::now_utc()).whole_seconds();
    assert!((590..=1200).contains(&left), "{left}");
}

#[tokio::test(start_paused = true)]
async fn pacing_waits_are_not_charged_to_the_elapsed_budget() {
    let pacer = Budget::from(Pacer::new(Pace::elsewhere(Some(RateLimit {
        calls: 1,
        per: Duration::from_secs(20),
    }))));
    let cancel = CancellationToken::new();
    // A new process waits one interval for its first slot: 20 s, more than the 5 s budget.
    let script = Script::new(vec![error(RetryClass::Transient, 503)]);
    let mut calls = Calls::new(policy(5), &pacer, Instant::now() + FAR, None, None, &cancel);
    calls.run(SESSION_SERVER, || script.call()).await.unwrap();
    assert_eq!(
        script.at(),
        vec![20, 40],
        "each attempt waits for its slot (20 s and the margin)"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slot_past_the_hold_time_or_the_expiry_fails_without_a_call() {
    let pacer = Budget::from(Pacer::new(Pace::elsewhere(None)));
    let cancel = CancellationToken::new();
    pacer
        .local
        .pause_until(Instant::now() + Duration::from_secs(100));
    let script = Script::new(vec![]);
    let mut calls = Calls::new(
        policy(300),
        &pacer,
        Instant::now() + Duration::from_secs(10),
        None,
        None,
        &cancel,
    );
    let f = failed(calls.run(SESSION_SERVER, || script.call()).await);
    assert_eq!(f.reason, FailureReason::RetriesExhausted);
    assert!(
        f.detail
            .contains("paused (bunq's 429 window) for another 100 s"),
        "{}",
        f.detail
    );
    let mut calls = Calls::new(
        policy(300),
        &pacer,
        Instant::now() + FAR,
        in_s(50),
        None,
        &cancel,
    );
    let f = failed(calls.run(SESSION_SERVER, || script.call()).await);
    assert_eq!(f.reason, FailureReason::CredentialExpired);
    assert!(script.at().is_empty(), "no call was made");
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_a_retry_wait_at_once() {
    let pacer = Budget::from(Pacer::new(Pace::elsewhere(None)));
    let cancel = CancellationToken::new();
    let script = Script::always(RetryClass::Transient, 503);
    let mut calls = Calls::new(
        policy(300),
        &pacer,
        Instant::now() + FAR,
        None,
        None,
        &cancel,
    );
    let t0 = Instant::now();
    let stopper = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stopper.cancel();
    });
    let r = calls.run(DEVICE_SERVER, || script.call()).await;
    assert!(matches!(r, Err(FlowError::Cancelled)), "{r:?}");
    assert_eq!(t0.elapsed(), Duration::from_millis(1500));
    assert_eq!(script.at(), vec![0, 1]);
}

#[tokio::test(start_paused = true)]
async fn a_permanent_answer_is_not_retried() {
    let pacer = Budget::from(Pacer::new(Pace::elsewhere(None)));
    let cancel = CancellationToken::new();
    let script = Script::always(
        RetryClass::Permanent(FailureReason::CredentialRejected),
        400,
    );
    let mut calls = Calls::new(
        policy(300),
        &pacer,
        Instant::now() + FAR,
        None,
        None,
        &cancel,
    );
    let f = failed(calls.run(SESSION_SERVER, || script.call()).await);
    assert_eq!(f.reason, FailureReason::CredentialRejected);
    assert_eq!(f.error_description.as_deref(), Some("from the test"));
    assert_eq!(script.at(), vec![0]);
}

#[tokio::test(start_paused = true)]
async fn a_refusal_after_a_lost_answer_is_outcome_unknown() {
    let pacer = Budget::from(Pacer::new(Pace::elsewhere(None)));
    let cancel = CancellationToken::new();
    let lost = CallError {
        answer_lost: true,
        description: "timed out".into(),
        http_status: None,
        ..error(RetryClass::Transient, 0)
    };
    let spent = error(
        RetryClass::Permanent(FailureReason::CredentialRejected),
        400,
    );
    let script = Script::new(vec![lost, spent.clone()]);
    let mut calls = Calls::new(
        policy(300),
        &pacer,
        Instant::now() + FAR,
        None,
        None,
        &cancel,
    );
    let f = failed(calls.run(SESSION_SERVER, || script.call()).await);
    assert_eq!(f.reason, FailureReason::OutcomeUnknown);
    assert!(f.detail.contains("token reset"), "{}", f.detail);
    assert!(f.detail.contains("timed out"), "{}", f.detail);
    // Without a lost answer before it, the same refusal is the credential's.
    let script = Script::new(vec![spent]);
    let mut calls = Calls::new(
        policy(300),
        &pacer,
        Instant::now() + FAR,
        None,
        None,
        &cancel,
    );
    let f = failed(calls.run(SESSION_SERVER, || script.call()).await);
    assert_eq!(f.reason, FailureReason::CredentialRejected);
}

/// A spent credential is refused at device-server too (the next round registers the device
/// first): after a lost session-server answer, that refusal is `outcome_unknown` as well.
#[tokio::test(start_paused = true)]
async fn a_device_server_refusal_after_a_lost_answer_is_outcome_unknown() {
    let pacer = Budget::from(Pacer::new(Pace::elsewhere(None)));
    let cancel = CancellationToken::new();
    let lost = CallError {
        answer_lost: true,
        description: "timed out".into(),
        http_status: None,
        ..error(RetryClass::Transient, 0)
    };
    let p = RetryPolicy {
        max_attempts: 1,
        ..policy(300)
    };
    let mut calls = Calls::new(p, &pacer, Instant::now() + FAR, None, None, &cancel);
    let script = Script::new(vec![lost]);
    let f = failed(calls.run(SESSION_SERVER, || script.call()).await);
    assert_eq!(f.reason, FailureReason::RetriesExhausted);
    let refused = Script::new(vec![error(
        RetryClass::Permanent(FailureReason::CredentialRejected),
        400,
    )]);
    let f = failed(calls.run(DEVICE_SERVER, || refused.call()).await);
    assert_eq!(f.reason, FailureReason::OutcomeUnknown);
}

#[tokio::test(start_paused = true)]
async fn retries_past_the_hold_time_say_so_rather_than_blame_pacing() {
    let pacer = Budget::from(Pacer::new(Pace::elsewhere(None)));
    let cancel = CancellationToken::new();
    let script = Script::always(RetryClass::Transient, 503);
    // Held at most 5 s: attempts at 0, 1, 3; the next at 7 is past the hold time.
    let mut calls = Calls::new(
        policy(300),
        &pacer,
        Instant::now() + Duration::from_secs(5),
        None,
        None,
        &cancel,
    );
    let f = failed(calls.run(SESSION_SERVER, || script.call()).await);
    assert_eq!(f.reason, FailureReason::RetriesExhausted);
    assert!(
        f.detail
            .contains("retries took longer than half the consumer timeout"),
        "{}",
        f.detail
    );
    assert!(!f.detail.contains("paced"), "{}", f.detail);
    assert_eq!(script.at(), vec![0, 1, 3]);
}
