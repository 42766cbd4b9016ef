//! Against the real Redis (`TEST_REDIS_URL`, default `redis://127.0.0.1:6379`), each test under a
//! prefix of its own, removed afterwards.

use super::*;
use crate::{
    failure::Failure,
    ledger::{Ask, Claimed, Fence, Found, Settlement, Taken},
};
use secrecy::SecretString;

fn url() -> Location {
    Location::Url(SecretString::from(
        std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
    ))
}

fn at(url: &str) -> Location {
    Location::Url(SecretString::from(url.to_owned()))
}

/// Two replicas sharing one prefix and scope, and the prefix to clean up.
async fn pair() -> (Fleet, Fleet, String) {
    let prefix = format!("test-{}:", uuid::Uuid::new_v4().simple());
    let a = Fleet::new(&url(), &prefix, "default").unwrap();
    let b = Fleet::new(&url(), &prefix, "default").unwrap();
    assert!(
        a.cannot_write().await.is_none(),
        "Redis is not reachable at TEST_REDIS_URL (default redis://127.0.0.1:6379): start it (redis-server --daemonize yes)"
    );
    (a, b, prefix)
}

async fn cleanup(f: &Fleet, prefix: &str) {
    let mut conn = f.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    for k in keys {
        let _: i64 = redis::cmd("DEL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

const LEASE: Duration = Duration::from_secs(30);

/// A copy of `round`; a fresh message when it names a replayed generation.
fn ask(round: u32, replay_of: Option<u64>) -> Ask {
    Ask {
        round,
        replay_of,
        fresh: replay_of.is_some(),
    }
}

async fn acquired(r: &Records, id: &Key, a: Ask) -> Claimed {
    match r.claim(id, a, LEASE).await.unwrap() {
        Found::Acquired(c) => c,
        other => panic!("expected the claim, found {other:?}"),
    }
}

fn refusal() -> Failure {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap();
    Failure::without_call(
        crate::failure::FailureReason::CredentialRejected,
        "bunq said no".into(),
        1,
        None,
        now,
    )
}

/// Every transition of a credential's record, as two replicas (`a`, `b`) see it: the same
/// for the in-process book and for Redis.
async fn a_records_whole_life(a: &Records, b: &Records) {
    let id = [7u8; 32];
    let first = acquired(a, &id, ask(0, None)).await;
    assert_eq!(first.generation, 0);
    assert!(!first.answer_lost && first.answered.is_none());
    assert_eq!(b.claim(&id, ask(0, None), LEASE).await, Ok(Found::Held));
    assert_eq!(a.fence(&id, first.epoch, LEASE).await, Ok(Fence::Held));
    // Released: the next claimant gets a new epoch, and the old one is fenced out.
    assert_eq!(
        a.settle(&id, first.epoch, &Settlement::Released).await,
        Ok(true)
    );
    let second = acquired(b, &id, ask(0, None)).await;
    assert!(second.epoch > first.epoch);
    assert_eq!(
        a.fence(&id, first.epoch, LEASE).await,
        Ok(Fence::Taken(Taken::Elsewhere))
    );
    assert_eq!(
        a.settle(&id, first.epoch, &Settlement::Failed { spent: true })
            .await,
        Ok(false),
        "a stale holder changes nothing"
    );
    // Parked at round 1: a copy of round 0 is stale, the round-1 copy takes it.
    let parked = |stale_for| Settlement::Parked {
        round: 1,
        stale_for,
    };
    b.settle(&id, second.epoch, &parked(LEASE)).await.unwrap();
    assert_eq!(
        a.claim(&id, ask(0, None), LEASE).await,
        Ok(Found::Parked { round: 1 })
    );
    let third = acquired(a, &id, ask(1, None)).await;
    // A lost answer stays with the credential; an unconfirmed refusal is handed on.
    a.answer_lost(&id).await.unwrap();
    let refused = refusal();
    a.settle(
        &id,
        third.epoch,
        &Settlement::Answered(Box::new(refused.clone())),
    )
    .await
    .unwrap();
    let fourth = acquired(b, &id, ask(1, None)).await;
    assert!(fourth.answer_lost);
    assert_eq!(fourth.answered.as_deref(), Some(&refused));
    b.settle(&id, fourth.epoch, &Settlement::Failed { spent: true })
        .await
        .unwrap();
    // Failed is final, for every round and shape; a replay of its generation starts the next.
    for round in [0, 1, 5] {
        assert_eq!(
            a.claim(&id, ask(round, None), LEASE).await,
            Ok(Found::Failed { generation: 0 })
        );
    }
    // The replay was handed back (Redis was down) or redelivered before its claim: still the
    // replay, and it starts the generation.
    let handed_back_replay = Ask {
        fresh: false,
        ..ask(0, Some(0))
    };
    let replay = acquired(a, &id, handed_back_replay).await;
    assert_eq!(replay.generation, 1);
    assert!(replay.answer_lost, "the lost answer outlives the replay");
    assert!(replay.answered.is_none());
    a.settle(&id, replay.epoch, &Settlement::Failed { spent: true })
        .await
        .unwrap();
    assert_eq!(
        b.claim(&id, ask(0, Some(0)), LEASE).await,
        Ok(Found::Failed { generation: 1 }),
        "the same dead letter replayed twice is worked on once"
    );
    // The credential published anew (no dead-letter headers) is a duplicate, not a retry.
    let anew = Ask {
        fresh: true,
        ..Ask::default()
    };
    assert_eq!(
        b.claim(&id, anew, LEASE).await,
        Ok(Found::Failed { generation: 1 }),
        "a new message without the dead letter's generation starts nothing"
    );
    let again = acquired(b, &id, ask(0, Some(1))).await;
    assert_eq!(again.generation, 2);
    // bunq never answered for it (retries exhausted): the credential published anew tries
    // once more, and only once; a redelivery or a worker's copy does not.
    b.settle(&id, again.epoch, &Settlement::Failed { spent: false })
        .await
        .unwrap();
    assert_eq!(
        a.claim(
            &id,
            Ask {
                fresh: false,
                ..anew
            },
            LEASE
        )
        .await,
        Ok(Found::Failed { generation: 2 })
    );
    let unspent = acquired(a, &id, anew).await;
    assert_eq!(unspent.generation, 3);
    a.settle(&id, unspent.epoch, &Settlement::Failed { spent: true })
        .await
        .unwrap();
    assert_eq!(
        b.claim(&id, anew, LEASE).await,
        Ok(Found::Failed { generation: 3 }),
        "spent now: the next new message is a duplicate"
    );
    // Created is final whatever a copy names.
    let fifth = acquired(b, &id, ask(0, Some(3))).await;
    b.settle(&id, fifth.epoch, &Settlement::Created)
        .await
        .unwrap();
    assert_eq!(
        a.claim(&id, ask(0, Some(3)), LEASE).await,
        Ok(Found::Created)
    );
    assert_eq!(
        a.fence(&id, fifth.epoch, LEASE).await,
        Ok(Fence::Taken(Taken::Created))
    );
}

/// A holder whose lease ran out (frozen, or cut off from Redis) is taken over and fenced out;
/// a session it made anyway is still recorded.
async fn a_lapsed_lease_is_taken_over(a: &Records, b: &Records) {
    let id = [8u8; 32];
    let short = Duration::from_millis(50);
    let Ok(Found::Acquired(old)) = a.claim(&id, ask(0, None), short).await else {
        panic!("not acquired");
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let new = loop {
        if let Ok(Found::Acquired(c)) = b.claim(&id, ask(0, None), LEASE).await {
            break c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease never ended"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(
        a.fence(&id, old.epoch, LEASE).await,
        Ok(Fence::Taken(Taken::Elsewhere))
    );
    assert_eq!(b.fence(&id, new.epoch, LEASE).await, Ok(Fence::Held));
    assert_eq!(
        a.settle(&id, old.epoch, &Settlement::Created).await,
        Ok(true),
        "a session exists: recorded even by a fenced-out holder"
    );
    assert_eq!(
        b.fence(&id, new.epoch, LEASE).await,
        Ok(Fence::Taken(Taken::Created))
    );
    // A parked round whose copy is overdue (its delay queue purged) strands nothing: an
    // earlier round's copy may take the work on.
    let id = [9u8; 32];
    let c = acquired(a, &id, ask(0, None)).await;
    let parked = Settlement::Parked {
        round: 1,
        stale_for: short,
    };
    a.settle(&id, c.epoch, &parked).await.unwrap();
    assert_eq!(
        b.claim(&id, ask(0, None), LEASE).await,
        Ok(Found::Parked { round: 1 })
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !matches!(
        b.claim(&id, ask(0, None), LEASE).await,
        Ok(Found::Acquired(_))
    ) {
        assert!(tokio::time::Instant::now() < deadline, "parked for ever");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A session staged by a holder that then died is handed to the next claimant at once, live
/// lease or not, until the record is created.
async fn a_staged_session_goes_to_the_next_claimant(a: &Records, b: &Records) {
    let id = [10u8; 32];
    let holder = acquired(a, &id, ask(0, None)).await;
    a.stage(&id, "p:c3RhZ2Vk".into()).await.unwrap();
    a.stage(&id, "p:c2Vjb25k".into()).await.unwrap();
    assert_eq!(
        b.claim(&id, ask(0, None), LEASE).await,
        Ok(Found::Held),
        "a live holder may be publishing it"
    );
    a.settle(&id, holder.epoch, &Settlement::Released)
        .await
        .unwrap();
    let next = acquired(b, &id, ask(0, None)).await;
    assert_eq!(
        next.staged.as_deref(),
        Some("p:c3RhZ2Vk"),
        "the first staged wins"
    );
    assert!(next.epoch > holder.epoch);
    b.settle(&id, next.epoch, &Settlement::Released)
        .await
        .unwrap();
    let again = acquired(a, &id, ask(0, None)).await;
    assert!(again.staged.is_some(), "kept until the record is created");
    a.settle(&id, again.epoch, &Settlement::Created)
        .await
        .unwrap();
    assert_eq!(b.claim(&id, ask(0, None), LEASE).await, Ok(Found::Created));
    a.stage(&id, "p:bGF0ZQ==".into()).await.unwrap();
    assert_eq!(b.claim(&id, ask(0, None), LEASE).await, Ok(Found::Created));
}

/// bunq's refusal kept on a claim before its dead letter goes out reaches whoever takes the
/// claim over; a holder whose claim was taken keeps nothing.
async fn a_failure_kept_on_the_claim_goes_to_the_next_holder(a: &Records, b: &Records) {
    let id = [12u8; 32];
    let refused = refusal();
    let short = Duration::from_millis(50);
    let Ok(Found::Acquired(old)) = a.claim(&id, ask(0, None), short).await else {
        panic!("not acquired");
    };
    assert_eq!(a.answer(&id, old.epoch, &refused).await, Ok(true));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let new = loop {
        if let Ok(Found::Acquired(c)) = b.claim(&id, ask(0, None), LEASE).await {
            break c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease never ended"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(new.answered.as_deref(), Some(&refused));
    assert_eq!(
        a.answer(&id, old.epoch, &refused).await,
        Ok(false),
        "the claim is the new holder's"
    );
}

#[tokio::test]
async fn the_in_process_book_makes_every_transition() {
    let book = Records::Memory(std::sync::Arc::new(crate::ledger::Book::default()));
    a_records_whole_life(&book, &book).await;
    a_lapsed_lease_is_taken_over(&book, &book).await;
    a_staged_session_goes_to_the_next_claimant(&book, &book).await;
    a_failure_kept_on_the_claim_goes_to_the_next_holder(&book, &book).await;
}

#[tokio::test]
async fn redis_makes_the_same_transitions_for_the_fleet() {
    let (a, b, prefix) = pair().await;
    let (ra, rb) = (Records::Shared(a.clone()), Records::Shared(b));
    a_records_whole_life(&ra, &rb).await;
    a_lapsed_lease_is_taken_over(&ra, &rb).await;
    a_staged_session_goes_to_the_next_claimant(&ra, &rb).await;
    a_failure_kept_on_the_claim_goes_to_the_next_holder(&ra, &rb).await;
    let mut conn = a.conn().await;
    let ttl: i64 = redis::cmd("TTL")
        .arg(a.record_key(&[7u8; 32]))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 24 * 3600, "a record is kept at least 24 h: {ttl}");
    // The token is never stored: the key is the credential's digest.
    assert!(a.record_key(&[7u8; 32]).ends_with(&hex::encode([7u8; 32])));
    cleanup(&a, &prefix).await;
}

#[tokio::test]
async fn replicas_get_one_seal_key() {
    let (a, b, prefix) = pair().await;
    let ka = a.seal_key().await.unwrap();
    assert_eq!(ka.len(), 32);
    assert_eq!(ka, b.seal_key().await.unwrap());
    cleanup(&a, &prefix).await;
}

#[tokio::test]
async fn replicas_share_one_session_server_budget_and_its_pauses() {
    let (a, b, prefix) = pair().await;
    let second = Some(Duration::from_secs(1));
    let first = a.take(second).await.unwrap().unwrap();
    // Spaced across replicas, and nothing taken ahead: b is told when, not given a slot.
    let wait = b.take(second).await.unwrap().unwrap_err();
    assert!(wait >= Duration::from_millis(950), "{wait:?}");
    // a's slot goes unused (its claim was lost): given back, b takes it at once.
    a.give_back(first).await.unwrap();
    let again = b.take(second).await.unwrap().unwrap();
    assert_eq!(again.take, first.take + 1);
    // Given back once the schedule moved on, it changes nothing.
    a.give_back(first).await.unwrap();
    assert!(a.take(second).await.unwrap().is_err());
    // A 429 seen by one replica pauses the other, and its pace is learned.
    let left = b
        .rate_limited(
            Duration::from_secs(30),
            Duration::ZERO,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(left >= Duration::from_millis(29_900), "{left:?}");
    let after = a.take(None).await.unwrap().unwrap_err();
    assert!(after >= Duration::from_millis(29_900), "{after:?}");
    cleanup(&a, &prefix).await;
}

#[tokio::test]
async fn an_unreachable_redis_is_unavailable_not_an_error_of_the_input() {
    let down = Fleet::new(&at("redis://127.0.0.1:1"), "x:", "default").unwrap();
    let records = Records::Shared(down.clone());
    assert_eq!(
        records.claim(&[1; 32], Ask::default(), LEASE).await,
        Err(Unavailable)
    );
    assert_eq!(records.fence(&[1; 32], 1, LEASE).await, Err(Unavailable));
    assert_eq!(down.take(None).await, Err(Unavailable));
    assert!(down.cannot_write().await.unwrap().contains("unreachable"));
    assert!(Fleet::new(&at("http://x"), "x:", "d").is_err());
}

/// A Redis that answers but refuses writes is told apart from one that does not answer: the
/// readiness reason and the log name the refusal. A replica of the test Redis
/// (`REPLICAOF`, read-only) stands for a failover that left `REDIS_URL` on a replica.
#[tokio::test]
async fn a_redis_that_refuses_writes_says_why() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = match std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--replicaof", "127.0.0.1", "1"])
        .stdout(std::process::Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!("redis-server must be installed for this test: {e}"),
    };
    let replica = Fleet::new(
        &at(&format!("redis://127.0.0.1:{port}")),
        "test-readonly:",
        "default",
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let why = loop {
        match replica.cannot_write().await {
            Some(w) if w.contains("refuses writes") => break w,
            _ => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the replica never answered"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(why.contains("read-only replica"), "{why}");
    let records = Records::Shared(replica.clone());
    assert_eq!(
        records.claim(&[1; 32], Ask::default(), LEASE).await,
        Err(Unavailable)
    );
    // Promoted, but its user may not run scripts (an ACL): every claim would be refused the
    // same way, so readiness must say so, not "ready" because a plain SET works.
    let admin = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut admin = admin.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg("-eval")
        .arg("-evalsha")
        .query_async(&mut admin)
        .await
        .unwrap();
    let why = replica.cannot_write().await.expect("not ready");
    assert!(why.contains("no permission"), "{why}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A record lost to a flush or an eviction never hands out an epoch a stale holder still
/// names: the old holder's fence fails once another delivery claims the credential again.
#[tokio::test]
async fn a_lost_record_never_repeats_an_epoch() {
    let (a, b, prefix) = pair().await;
    let (ra, rb) = (Records::Shared(a.clone()), Records::Shared(b));
    let id = [11u8; 32];
    let old = acquired(&ra, &id, ask(0, None)).await;
    let mut conn = a.conn().await;
    let _: i64 = redis::cmd("DEL")
        .arg(a.record_key(&id))
        .query_async(&mut conn)
        .await
        .unwrap();
    let new = acquired(&rb, &id, ask(0, None)).await;
    assert!(new.epoch > old.epoch);
    assert_eq!(
        ra.fence(&id, old.epoch, LEASE).await,
        Ok(Fence::Taken(Taken::Elsewhere))
    );
    cleanup(&a, &prefix).await;
}
