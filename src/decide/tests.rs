//! The choice after a failed round: delayed retry, expiry, or dead letter.

use secrecy::SecretString;
use time::macros::datetime;

use super::*;
use crate::events::ProvisionId;

const NOW: OffsetDateTime = datetime!(2026-11-29 12:00 UTC);

fn ready(expires_in_s: i64) -> ProvisionReady {
    ProvisionReady {
        provision_id: ProvisionId::Int(7),
        credential_id: Some(8),
        external_uuid: None,
        expiry_time: Some(NOW + time::Duration::seconds(expires_in_s)),
        token_value: SecretString::from("tok"),
    }
}

fn failure(reason: FailureReason) -> Failure {
    Failure {
        reason,
        detail: "503 for a while".into(),
        http_status: Some(503),
        error_description: None,
        attempts: 3,
        first_attempt_at: NOW,
        last_attempt_at: NOW,
        not_before: None,
    }
}

const TIERS: [Duration; 2] = [Duration::from_secs(60), Duration::from_secs(300)];

#[test]
fn spent_retries_take_the_next_tier_and_carry_the_history() {
    let history = History {
        round: 1,
        calls_before: 5,
        first_attempt_at: Some(NOW - time::Duration::minutes(2)),
        returns: 0,
        not_before: None,
        waits: 0,
        generation: None,
    };
    let Outcome::Delayed(d) = after_failure(
        &ready(3600),
        &history,
        failure(FailureReason::RetriesExhausted),
        &TIERS,
        NOW,
    ) else {
        panic!("expected a delayed retry");
    };
    assert_eq!(
        d.delay,
        Duration::from_secs(300),
        "round 1 takes the second tier"
    );
    assert_eq!((d.retries, d.calls), (2, 8));
    assert_eq!(d.first_attempt_at, NOW - time::Duration::minutes(2));
}

#[test]
fn a_credential_that_expires_before_the_copy_returns_fails_as_expired() {
    let out = after_failure(
        &ready(59),
        &History::default(),
        failure(FailureReason::RetriesExhausted),
        &TIERS,
        NOW,
    );
    let Outcome::Failed(f) = out else {
        panic!("expected a failure");
    };
    assert_eq!(f.reason, FailureReason::CredentialExpired);
    assert!(f.detail.contains("no delayed retry"), "{}", f.detail);
    // session.failed is built from this same failure (crate::plan): it reports the same reason.
    assert_eq!(f.http_status, Some(503));
}

#[test]
fn without_a_tier_left_or_for_a_permanent_reason_it_is_dead_lettered() {
    let last = History {
        round: 2,
        ..History::default()
    };
    for (history, reason) in [
        (&last, FailureReason::RetriesExhausted),
        (&History::default(), FailureReason::CredentialRejected),
    ] {
        let Outcome::Failed(f) = after_failure(&ready(3600), history, failure(reason), &TIERS, NOW)
        else {
            panic!("expected a failure for {reason}");
        };
        assert_eq!(f.reason, reason);
        assert_eq!(f.attempts, 3);
    }
}

/// A round that ended inside bunq's window waits for its end in the window queue, whatever the
/// tiers say (none left, or none at all), without using a tier; only the expiry ends it.
#[test]
fn a_window_past_the_hold_waits_for_its_end_whatever_the_tiers() {
    let window_end = NOW + time::Duration::seconds(991);
    let spent_tiers = History {
        round: 2,
        waits: 0,
        ..History::default()
    };
    for (history, tiers) in [
        (&History::default(), &TIERS[..]),
        (&spent_tiers, &TIERS[..]),
        (&History::default(), &[][..]),
    ] {
        let f = Failure {
            not_before: Some(window_end),
            ..failure(FailureReason::RetriesExhausted)
        };
        let Outcome::Delayed(d) = after_failure(&ready(4 * 3600), history, f, tiers, NOW) else {
            panic!("expected a window wait for {history:?}, {tiers:?}");
        };
        assert!(d.window);
        assert_eq!(d.delay, Duration::from_secs(991));
        assert_eq!(d.retries, history.round + 1);
        assert_eq!(d.not_before, Some(window_end));
    }
    // The credential expires before the window ends: credential_expired, not a wait.
    let f = Failure {
        not_before: Some(window_end),
        ..failure(FailureReason::RetriesExhausted)
    };
    let Outcome::Failed(f) = after_failure(&ready(600), &History::default(), f, &TIERS, NOW) else {
        panic!("expected a failure");
    };
    assert_eq!(f.reason, FailureReason::CredentialExpired);
    assert!(
        f.detail.contains("before bunq's window ends"),
        "{}",
        f.detail
    );
    // A window already over is no reason to wait: the tiers apply.
    let f = Failure {
        not_before: Some(NOW - time::Duration::seconds(1)),
        ..failure(FailureReason::RetriesExhausted)
    };
    let Outcome::Delayed(d) = after_failure(&ready(3600), &History::default(), f, &TIERS, NOW)
    else {
        panic!("expected a delayed retry");
    };
    assert!(!d.window);
    assert_eq!(d.delay, TIERS[0]);
}

/// Rounds spent waiting for windows are not charged to the tiers.
#[test]
fn window_waits_are_not_charged_to_the_tiers() {
    let history = History {
        round: 3,
        waits: 2,
        ..History::default()
    };
    let Outcome::Delayed(d) = after_failure(
        &ready(3600),
        &history,
        failure(FailureReason::RetriesExhausted),
        &TIERS,
        NOW,
    ) else {
        panic!("expected a delayed retry");
    };
    assert!(!d.window);
    assert_eq!(
        d.delay, TIERS[1],
        "round 3 with 2 window waits takes tier 1"
    );
    assert_eq!(d.retries, 4);
}
