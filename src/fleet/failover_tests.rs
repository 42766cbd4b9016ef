//! The fleet's Redis behind Sentinel, on Redis servers of the test's own (`redis-server` must be
//! installed): the primary is found through the sentinels, a failover is followed, and a
//! claim made before it is still the claim after it.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use redis::aio::MultiplexedConnection;
use secrecy::SecretString;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::ledger::{Ask, Fence, Found};

/// A `redis-server` of this test's, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn redis_server(args: &[&str]) -> Server {
    match Command::new("redis-server")
        .args(args)
        .stdout(Stdio::null())
        .spawn()
    {
        Ok(c) => Server(c),
        Err(e) => panic!("redis-server must be installed for this test: {e}"),
    }
}

/// The primary's and the sentinel's passwords: each has its own, as in production.
const PRIMARY_PASSWORD: &str = "primary-pw";
const SENTINEL_PASSWORD: &str = "sentinel-pw";

/// A plain connection to `port` with `password`, once something answers there (within 10 s).
async fn admin(port: u16, password: &str) -> MultiplexedConnection {
    let client = redis::Client::open(format!("redis://:{password}@127.0.0.1:{port}")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.get_multiplexed_async_connection().await {
            Ok(c) => return c,
            Err(e) => {
                assert!(Instant::now() < deadline, "nothing answers on {port}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Waits (up to `within`) until `check` holds, asking every 100 ms.
async fn until<F: std::future::Future<Output = bool>>(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_sentinel_failover_moves_the_fleet_to_the_new_primary_with_its_claims() {
    let (p1, p2, ps) = (free_port(), free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("sentinel-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let plain = [
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--requirepass",
        PRIMARY_PASSWORD,
        "--masterauth",
        PRIMARY_PASSWORD,
    ];
    let (s1, s2) = (p1.to_string(), p2.to_string());
    let _primary = redis_server(&[&["--port", s1.as_str()][..], &plain].concat());
    let _replica = redis_server(
        &[
            &[
                "--port",
                s2.as_str(),
                "--replicaof",
                "127.0.0.1",
                s1.as_str(),
            ][..],
            &plain,
        ]
        .concat(),
    );
    // Sentinel rewrites its configuration file, so it must be a file of its own.
    let conf = dir.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {ps}\nbind 127.0.0.1\ndir {}\nrequirepass {SENTINEL_PASSWORD}\nsentinel monitor m 127.0.0.1 {p1} 1\nsentinel auth-pass m {PRIMARY_PASSWORD}\nsentinel down-after-milliseconds m 1000\nsentinel failover-timeout m 5000\n",
            dir.display()
        ),
    )
    .unwrap();
    let _sentinel = redis_server(&[conf.to_str().unwrap(), "--sentinel"]);

    let fleet = Fleet::new(
        &Location::Sentinels {
            url: Some(SecretString::from(format!(
                "redis://:{PRIMARY_PASSWORD}@unused/0"
            ))),
            sentinels: vec![format!("127.0.0.1:{ps}")],
            master: "m".into(),
            password: Some(SecretString::from(SENTINEL_PASSWORD)),
        },
        "test-failover:",
        "default",
    )
    .unwrap();
    until(
        Duration::from_secs(15),
        "the fleet writing to the primary",
        || async { fleet.cannot_write().await.is_none() },
    )
    .await;
    let records = Records::Shared(fleet.clone());
    let id = [5u8; 32];
    let claimed = match records
        .claim(&id, Ask::default(), Duration::from_secs(60))
        .await
    {
        Ok(Found::Acquired(c)) => c,
        other => {
            let mut c = admin(p1, PRIMARY_PASSWORD).await;
            let all: Vec<String> = redis::cmd("HGETALL")
                .arg(fleet.record_key(&id))
                .query_async(&mut c)
                .await
                .unwrap_or_default();
            panic!("expected the claim, found {other:?}; the record: {all:?}")
        }
    };

    // The sentinel knows the replica, and the replica has the claim (replication is
    // asynchronous: a claim not yet copied would be lost with the old primary).
    let sentinel = admin(ps, SENTINEL_PASSWORD).await;
    let primary = admin(p1, PRIMARY_PASSWORD).await;
    until(
        Duration::from_secs(20),
        "the replica caught up and known to the sentinel",
        || {
            let (mut sentinel, mut primary) = (sentinel.clone(), primary.clone());
            async move {
                let replicas: Vec<Vec<String>> = redis::cmd("SENTINEL")
                    .arg("REPLICAS")
                    .arg("m")
                    .query_async(&mut sentinel)
                    .await
                    .unwrap_or_default();
                let copied: i64 = redis::cmd("WAIT")
                    .arg(1)
                    .arg(100)
                    .query_async(&mut primary)
                    .await
                    .unwrap_or(0);
                !replicas.is_empty() && copied >= 1
            }
        },
    )
    .await;
    // Claims keep coming while the failover runs, each on a credential of its own: every
    // one the fleet reports acquired must survive the failover (none written to the old
    // primary after the replica took over, which it loses when it is demoted).
    let claiming = CancellationToken::new();
    let claimer = tokio::spawn({
        let (records, claiming) = (records.clone(), claiming.clone());
        async move {
            let mut acquired = Vec::new();
            for n in 0u32.. {
                if claiming.is_cancelled() {
                    break;
                }
                let mut id = [0u8; 32];
                id[..4].copy_from_slice(&n.to_be_bytes());
                id[4] = 0xcc;
                if let Ok(Found::Acquired(_)) = records
                    .claim(&id, Ask::default(), Duration::from_secs(60))
                    .await
                {
                    acquired.push(id);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            acquired
        }
    });
    // Refused (NOGOODSLAVE) until the sentinel has a fresh enough view of the replica.
    until(
        Duration::from_secs(30),
        "the sentinel accepting the failover",
        || {
            let mut sentinel = sentinel.clone();
            async move {
                redis::cmd("SENTINEL")
                    .arg("FAILOVER")
                    .arg("m")
                    .query_async::<()>(&mut sentinel)
                    .await
                    .is_ok()
            }
        },
    )
    .await;
    until(
        Duration::from_secs(30),
        "the sentinel naming the replica as primary",
        || {
            let mut sentinel = sentinel.clone();
            async move {
                let addr: Vec<String> = redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg("m")
                    .query_async(&mut sentinel)
                    .await
                    .unwrap_or_default();
                addr.get(1).is_some_and(|p| *p == p2.to_string())
            }
        },
    )
    .await;

    // Writes go to the new primary at once (the sentinel's +switch-master), although the old
    // one takes writes until the sentinel turns it into a replica (up to 10 s later): a claim
    // made now is on the new primary within 3 s.
    let mut new_primary = admin(p2, PRIMARY_PASSWORD).await;
    let mut k = 0u8;
    until(
        Duration::from_secs(3),
        "a claim landing on the new primary",
        || {
            k += 1;
            let (records, fleet, mut new_primary) =
                (records.clone(), fleet.clone(), new_primary.clone());
            async move {
                let id = [100 + k; 32];
                let _ = records
                    .claim(&id, Ask::default(), Duration::from_secs(60))
                    .await;
                redis::cmd("EXISTS")
                    .arg(fleet.record_key(&id))
                    .query_async::<i64>(&mut new_primary)
                    .await
                    .is_ok_and(|n| n == 1)
            }
        },
    )
    .await;

    claiming.cancel();
    let acquired = claimer.await.unwrap();
    let mut lost = 0;
    for id in &acquired {
        let kept: i64 = redis::cmd("EXISTS")
            .arg(fleet.record_key(id))
            .query_async(&mut new_primary)
            .await
            .unwrap();
        lost += usize::from(kept == 0);
    }
    assert!(
        acquired.len() > 10,
        "claims went on around the failover: {}",
        acquired.len()
    );
    assert_eq!(
        lost,
        0,
        "claims of {} acquired during the failover were lost",
        acquired.len()
    );

    // The same Fleet, without a restart, holds its claim on the new primary.
    until(
        Duration::from_secs(15),
        "the claim renewed on the new primary",
        || async {
            matches!(
                records
                    .fence(&id, claimed.epoch, Duration::from_secs(60))
                    .await,
                Ok(Fence::Held)
            )
        },
    )
    .await;
    assert!(fleet.cannot_write().await.is_none());
    let role: Vec<redis::Value> = redis::cmd("ROLE")
        .query_async(&mut new_primary)
        .await
        .unwrap();
    assert_eq!(
        role.first(),
        Some(&redis::Value::BulkString(b"master".to_vec()))
    );
    let kept: i64 = redis::cmd("EXISTS")
        .arg(fleet.record_key(&id))
        .query_async(&mut new_primary)
        .await
        .unwrap();
    assert_eq!(kept, 1, "the claim is on the new primary");
    let _ = std::fs::remove_dir_all(&dir);
}

/// While no sentinel answers, nothing can be claimed: no bunq call starts.
#[tokio::test]
async fn without_a_sentinel_that_answers_nothing_is_claimed() {
    let fleet = Fleet::new(
        &Location::Sentinels {
            url: None,
            sentinels: vec![format!("127.0.0.1:{}", free_port())],
            master: "m".into(),
            password: None,
        },
        "test-failover:",
        "default",
    )
    .unwrap();
    let records = Records::Shared(fleet.clone());
    assert_eq!(
        records
            .claim(&[6; 32], Ask::default(), Duration::from_secs(60))
            .await,
        Err(Unavailable)
    );
    assert!(fleet.cannot_write().await.unwrap().contains("unreachable"));
}
