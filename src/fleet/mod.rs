//! State shared by the replicas of a fleet, in Redis (`REDIS_URL`): a claim on each credential
//! and one session-server budget per `BUNQ_RATE_LIMIT_SCOPE`.
//!
//! Without `REDIS_URL` each process keeps this in memory ([`crate::ledger`], [`crate::pacing`]),
//! which is right for one replica. With it, every step that must hold for the whole fleet is one
//! Lua script (atomic in Redis), and time is Redis's `TIME`, so replicas whose clocks differ
//! still agree. Keys (under `REDIS_KEY_PREFIX`): `claim:<hex SHA-256 of the credential>` (a
//! replica's lease, or `settled` for 25 h once its `session.created` was confirmed; the token
//! itself is never stored) and `rate:<scope>` (a hash: next slot, pause end, learned interval,
//! all ms of Redis time).
//!
//! Redis unreachable: every call here answers [`Unavailable`], and no session-server call
//! starts, since neither a claim nor a slot can be taken; deliveries wait and are handed back,
//! nothing is dead-lettered for it. A Redis restart that loses its data costs at most one extra
//! session-server call per credential then in flight (enable persistence to avoid even that).

mod claim;
mod scripts;

pub use claim::{Lease, Verdict, hold};

use std::time::Duration;

use redis::{Client, aio::ConnectionManager, aio::ConnectionManagerConfig};
use secrecy::{ExposeSecret, SecretString};

use crate::identity::Key;

/// Redis could not be reached or answered an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the fleet's shared state (Redis, REDIS_URL) is unreachable")]
pub struct Unavailable;

/// `REDIS_URL` is not a Redis URL.
#[derive(Debug, thiserror::Error)]
#[error("REDIS_URL is not a redis:// or rediss:// URL")]
pub struct BadUrl(#[source] redis::RedisError);

/// What a claim on a credential found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This replica holds it now (a lease, renewed while the work goes on).
    Acquired,
    /// Its `session.created` was confirmed by some replica: ack without calling bunq.
    Settled,
    /// Another replica holds a live lease on it.
    Held,
}

/// The fleet's shared state.
#[derive(Clone)]
pub struct Fleet {
    conn: ConnectionManager,
    prefix: String,
    scope: String,
    owner: String,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("prefix", &self.prefix)
            .field("scope", &self.scope)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// How long a claim's lease lasts without renewal: a crashed replica's claim frees itself then.
pub const LEASE: Duration = Duration::from_secs(30);
/// How long a settled credential is remembered: at least the 24 h the contract promises.
pub const SETTLED_FOR: Duration = Duration::from_secs(25 * 3600);

impl Fleet {
    /// Prepares the connection (made on first use, so start-up does not wait for Redis).
    /// `owner` names this replica in its claims (the consumer tag).
    ///
    /// # Errors
    /// [`BadUrl`] when `url` is not a Redis URL.
    pub fn new(url: &SecretString, prefix: &str, scope: &str, owner: &str) -> Result<Self, BadUrl> {
        let client = Client::open(url.expose_secret()).map_err(BadUrl)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(BadUrl)?;
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
            scope: scope.to_owned(),
            owner: owner.to_owned(),
        })
    }

    fn claim_key(&self, id: &Key) -> String {
        format!("{}claim:{}", self.prefix, hex::encode(id))
    }

    fn rate_key(&self) -> String {
        format!("{}rate:{}", self.prefix, self.scope)
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        key: String,
        args: &[String],
    ) -> Result<T, Unavailable> {
        let mut inv = script.key(key);
        for a in args {
            inv.arg(a);
        }
        let mut conn = self.conn.clone();
        inv.invoke_async(&mut conn).await.map_err(|e| {
            tracing::warn!(error = %crate::telemetry::Chain(&e), "Redis (REDIS_URL) did not answer");
            Unavailable
        })
    }

    /// Whether Redis answers (for readiness).
    pub async fn reachable(&self) -> bool {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
    }

    /// Takes (or renews) this replica's claim on the credential `id` for [`LEASE`].
    ///
    /// # Errors
    /// [`Unavailable`] when Redis cannot be reached.
    pub async fn claim(&self, id: &Key) -> Result<Claim, Unavailable> {
        let found: String = self
            .run(
                &scripts::CLAIM,
                self.claim_key(id),
                &[self.owner.clone(), LEASE.as_millis().to_string()],
            )
            .await?;
        Ok(match found.as_str() {
            "settled" => Claim::Settled,
            "held" => Claim::Held,
            _ => Claim::Acquired,
        })
    }

    /// Records the credential as settled (its `session.created` is confirmed), for
    /// [`SETTLED_FOR`].
    ///
    /// # Errors
    /// [`Unavailable`] when Redis cannot be reached.
    pub async fn settle(&self, id: &Key) -> Result<(), Unavailable> {
        self.run::<i64>(
            &scripts::SETTLE,
            self.claim_key(id),
            &[SETTLED_FOR.as_secs().to_string()],
        )
        .await
        .map(|_| ())
    }

    /// Drops this replica's claim (parked, handed back, or dead-lettered: a replay of the dead
    /// letter is then processed).
    ///
    /// # Errors
    /// [`Unavailable`] when Redis cannot be reached (the lease then expires by itself).
    pub async fn release(&self, id: &Key) -> Result<(), Unavailable> {
        self.run::<i64>(
            &scripts::RELEASE,
            self.claim_key(id),
            std::slice::from_ref(&self.owner),
        )
        .await
        .map(|_| ())
    }

    /// Reserves the scope's next session-server slot if it comes within `max_wait`:
    /// `Ok(Ok(wait))`, or `Ok(Err(earliest))` reserving nothing. `interval` is the configured
    /// spacing (`BUNQ_SESSION_RATE_LIMIT`), else the learned one applies.
    ///
    /// # Errors
    /// [`Unavailable`] when Redis cannot be reached.
    pub async fn reserve(
        &self,
        max_wait: Duration,
        interval: Option<Duration>,
    ) -> Result<Result<Duration, Duration>, Unavailable> {
        let (ok, wait_ms): (i64, i64) = self
            .run(
                &scripts::RESERVE,
                self.rate_key(),
                &[ms(max_wait), ms(interval.unwrap_or_default())],
            )
            .await?;
        let wait = Duration::from_millis(wait_ms.max(0) as u64);
        Ok(if ok == 1 { Ok(wait) } else { Err(wait) })
    }

    /// A call was answered now: the scope's next slot is at least one interval later.
    ///
    /// # Errors
    /// [`Unavailable`] when Redis cannot be reached.
    pub async fn answered(&self, interval: Option<Duration>) -> Result<(), Unavailable> {
        self.run::<i64>(
            &scripts::ANSWERED,
            self.rate_key(),
            &[ms(interval.unwrap_or_default())],
        )
        .await
        .map(|_| ())
    }

    /// A 429: pauses the scope for `window` plus `jitter` and records `learned` as its pace.
    /// Returns how long the pause now lasts.
    ///
    /// # Errors
    /// [`Unavailable`] when Redis cannot be reached.
    pub async fn rate_limited(
        &self,
        window: Duration,
        jitter: Duration,
        learned: Duration,
    ) -> Result<Duration, Unavailable> {
        let left: i64 = self
            .run(
                &scripts::RATE_LIMITED,
                self.rate_key(),
                &[ms(window), ms(jitter), ms(learned)],
            )
            .await?;
        Ok(Duration::from_millis(left.max(0) as u64))
    }

    /// Pauses the scope for `d` at least; returns how long the pause lasts (0: none).
    ///
    /// # Errors
    /// [`Unavailable`] when Redis cannot be reached.
    pub async fn pause_for(&self, d: Duration) -> Result<Duration, Unavailable> {
        let left: i64 = self
            .run(&scripts::PAUSE_FOR, self.rate_key(), &[ms(d)])
            .await?;
        Ok(Duration::from_millis(left.max(0) as u64))
    }
}

fn ms(d: Duration) -> String {
    d.as_millis().min(i64::MAX as u128).to_string()
}

#[cfg(test)]
mod tests;
