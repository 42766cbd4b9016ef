//! Against the real Redis (`TEST_REDIS_URL`, default `redis://127.0.0.1:6379`), each test under a
//! prefix of its own, removed afterwards.

use super::*;

fn url() -> SecretString {
    SecretString::from(
        std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
    )
}

/// Two replicas sharing one prefix and scope, and the prefix to clean up.
async fn pair() -> (Fleet, Fleet, String) {
    let prefix = format!("test-{}:", uuid::Uuid::new_v4().simple());
    let a = Fleet::new(&url(), &prefix, "default", "replica-a").unwrap();
    let b = Fleet::new(&url(), &prefix, "default", "replica-b").unwrap();
    assert!(
        a.reachable().await,
        "Redis is not reachable at TEST_REDIS_URL (default redis://127.0.0.1:6379): start it (redis-server --daemonize yes)"
    );
    (a, b, prefix)
}

async fn cleanup(f: &Fleet, prefix: &str) {
    let mut conn = f.conn.clone();
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

#[tokio::test]
async fn one_replica_at_a_time_holds_a_credential_and_settled_is_final() {
    let (a, b, prefix) = pair().await;
    let id = [7u8; 32];
    assert_eq!(a.claim(&id).await, Ok(Claim::Acquired));
    assert_eq!(a.claim(&id).await, Ok(Claim::Acquired), "the holder renews");
    assert_eq!(b.claim(&id).await, Ok(Claim::Held));
    // Only the holder can release.
    b.release(&id).await.unwrap();
    assert_eq!(b.claim(&id).await, Ok(Claim::Held));
    a.release(&id).await.unwrap();
    assert_eq!(b.claim(&id).await, Ok(Claim::Acquired));
    b.settle(&id).await.unwrap();
    assert_eq!(a.claim(&id).await, Ok(Claim::Settled));
    let mut conn = a.conn.clone();
    let ttl: i64 = redis::cmd("TTL")
        .arg(a.claim_key(&id))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 24 * 3600, "settled is kept at least 24 h: {ttl}");
    // The token is never stored: the key is the credential's digest.
    assert!(a.claim_key(&id).ends_with(&hex::encode(id)));
    cleanup(&a, &prefix).await;
}

#[tokio::test]
async fn a_crashed_replicas_claim_frees_itself_when_its_lease_ends() {
    let (a, b, prefix) = pair().await;
    let id = [8u8; 32];
    assert_eq!(a.claim(&id).await, Ok(Claim::Acquired));
    // Stand-in for 30 s without renewal.
    let mut conn = a.conn.clone();
    let _: i64 = redis::cmd("PEXPIRE")
        .arg(a.claim_key(&id))
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while b.claim(&id).await != Ok(Claim::Acquired) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease never ended"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cleanup(&a, &prefix).await;
}

#[tokio::test]
async fn replicas_share_one_session_server_budget_and_its_pauses() {
    let (a, b, prefix) = pair().await;
    let second = Duration::from_secs(1);
    let far = Duration::from_secs(3600);
    let first = a.reserve(far, Some(second)).await.unwrap().unwrap();
    let next = b.reserve(far, Some(second)).await.unwrap().unwrap();
    assert!(first < Duration::from_millis(50), "{first:?}");
    assert!(
        next >= Duration::from_millis(950),
        "{next:?}: spaced across replicas"
    );
    // Nothing reserved past the allowed wait.
    assert!(
        a.reserve(Duration::from_millis(100), Some(second))
            .await
            .unwrap()
            .is_err()
    );
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
    let after = a.reserve(far, None).await.unwrap().unwrap();
    assert!(after >= Duration::from_millis(29_900), "{after:?}");
    let then = b.reserve(far, None).await.unwrap().unwrap();
    assert!(
        then >= after + Duration::from_millis(29_900),
        "{then:?}: the learned pace"
    );
    cleanup(&a, &prefix).await;
}

#[tokio::test]
async fn an_unreachable_redis_is_unavailable_not_an_error_of_the_input() {
    let down = Fleet::new(
        &SecretString::from("redis://127.0.0.1:1"),
        "x:",
        "default",
        "me",
    )
    .unwrap();
    assert_eq!(down.claim(&[1; 32]).await, Err(Unavailable));
    assert_eq!(down.reserve(Duration::ZERO, None).await, Err(Unavailable));
    assert!(!down.reachable().await);
    assert!(Fleet::new(&SecretString::from("http://x"), "x:", "d", "me").is_err());
}
