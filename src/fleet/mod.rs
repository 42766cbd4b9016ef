//! State shared by the replicas of a fleet, in Redis (`REDIS_URL`): a claim on each credential
//! and one session-server budget per `BUNQ_RATE_LIMIT_SCOPE`.
//!
//! Without `REDIS_URL` each process keeps this in memory ([`crate::ledger::Book`], [`crate::pacing`]),
//! which is right for one replica. With it, every step that must hold for the whole fleet is one
//! Lua script (atomic in Redis), and time is Redis's `TIME`, so replicas whose clocks differ
//! still agree. Keys (under `REDIS_KEY_PREFIX`): `credential:<hex identity>` (the credential's
//! record, [`crate::ledger`]: a hash kept 25 h after its last change; never the token),
//! `rate:<scope>` (a hash: next slot, pause end, learned interval, all ms of Redis time) and
//! `seal` (the fleet's key for sealing bookkeeping headers).
//!
//! Redis unreachable: every call here answers [`Unavailable`], and no session-server call
//! starts, since neither a claim nor a slot can be taken; deliveries wait and are handed back,
//! nothing is dead-lettered for it. A Redis restart that loses its data costs at most one extra
//! session-server call per credential then in flight (enable persistence to avoid even that).

mod claim;
mod link;
mod record;
mod scripts;
mod watch;

pub use claim::{Fenced, Lease, Verdict, hold};
pub use link::Location;
pub use record::Records;

use std::{sync::Arc, time::Duration};

use link::RedisLink;

use crate::identity::Key;

/// How long the readiness check may wait for Redis, in ms.
pub const WRITE_CHECK_TIMEOUT: Duration = Duration::from_millis(800);

/// Redis could not be reached or answered an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the fleet's shared state (Redis, REDIS_URL) is unreachable")]
pub struct Unavailable;

/// `REDIS_URL` is not a Redis URL (or, with sentinels, the sentinels' addresses do not make
/// one).
#[derive(Debug, thiserror::Error)]
#[error(
    "REDIS_URL is not a redis:// or rediss:// URL (or REDIS_SENTINELS holds an address that is not host:port)"
)]
pub struct BadUrl(#[source] redis::RedisError);

/// The fleet's shared state.
#[derive(Clone)]
pub struct Fleet {
    link: Arc<RedisLink>,
    prefix: String,
    scope: String,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("prefix", &self.prefix)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// Prepares the connection to Redis at `location` (made on first use, so start-up does
    /// not wait for Redis).
    ///
    /// # Errors
    /// [`BadUrl`] when the location does not make a Redis URL.
    pub fn new(location: &Location, prefix: &str, scope: &str) -> Result<Self, BadUrl> {
        Ok(Self {
            link: Arc::new(RedisLink::new(location)?),
            prefix: prefix.to_owned(),
            scope: scope.to_owned(),
        })
    }

    fn record_key(&self, id: &Key) -> String {
        format!("{}credential:{}", self.prefix, hex::encode(id))
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
        self.invoke(&inv).await.map_err(|_| Unavailable)
    }

    /// [`Self::run`] with two keys (a record and the fleet's epoch counter: epochs never repeat,
    /// even when a record is lost to a flush or an eviction).
    async fn run2<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        keys: [String; 2],
        args: &[String],
    ) -> Result<T, Unavailable> {
        let mut inv = script.key(&keys[0]);
        inv.key(&keys[1]);
        for a in args {
            inv.arg(a);
        }
        self.invoke(&inv).await.map_err(|_| Unavailable)
    }

    /// Runs `inv` on the link's connection, and tells the link when that connection failed; a
    /// failure is logged (never with a secret: redis-rs's errors name no password).
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<T, redis::RedisError> {
        let outcome = match self.link.get().await {
            Ok((number, mut conn)) => inv.invoke_async(&mut conn).await.inspect_err(|e| {
                self.link.after(number, e);
            }),
            Err(e) => Err(e),
        };
        outcome.inspect_err(|e| {
            let via = self.link.label();
            match refusal(e) {
                Some(why) => tracing::warn!(error = %crate::telemetry::Chain(e), via, "Redis refused writes: {why}"),
                None => tracing::warn!(error = %crate::telemetry::Chain(e), via, "Redis did not answer"),
            }
        })
    }

    /// Why Redis cannot take the worker's writes, or `None` when it can (for readiness): a
    /// write is tried the way claims write, from a Lua script (a key under `REDIS_KEY_PREFIX`
    /// that expires in 10 s), since a Redis that answers PING may still refuse every claim (a
    /// read-only replica after a failover, `min-replicas-to-write` not met, `maxmemory` reached
    /// with `noeviction`, an ACL without `EVAL`/`EVALSHA`). With sentinels, a primary they
    /// cannot name counts as unreachable, with their reason. Answers within
    /// [`WRITE_CHECK_TIMEOUT`] (a Redis that does not answer is unreachable), so readiness
    /// answers within a probe's usual 1 s.
    pub async fn cannot_write(&self) -> Option<String> {
        let via = self.link.label();
        let probe = tokio::time::timeout(
            WRITE_CHECK_TIMEOUT,
            self.invoke::<i64>(&scripts::PROBE.key(format!("{}probe", self.prefix))),
        )
        .await;
        let e = match probe {
            Ok(Ok(_)) => return None,
            Ok(Err(e)) => e,
            Err(_) => {
                return Some(format!(
                    "Redis ({via}) is unreachable: no answer within {} ms",
                    WRITE_CHECK_TIMEOUT.as_millis()
                ));
            }
        };
        Some(match refusal(&e) {
            Some(why) => format!("Redis ({via}) refuses writes: {why}"),
            None => format!(
                "Redis ({via}) is unreachable: {}",
                crate::telemetry::Chain(&e)
            ),
        })
    }

    /// A connection to the fleet's Redis, for tests that read or clear its keys.
    #[cfg(test)]
    async fn conn(&self) -> redis::aio::ConnectionManager {
        self.link.get().await.expect("Redis answers").1
    }

    /// Takes the scope's next session-server slot if it is due: `Ok(Ok(taken))`, or
    /// `Ok(Err(wait))` taking nothing when it is `wait` off. `interval` is the base spacing
    /// ([`crate::pacing::Pace::base`] with its margin); the learned one applies when slower.
    ///
    /// # Errors
    /// [`Unavailable`] when Redis cannot be reached.
    pub async fn take(
        &self,
        interval: Option<Duration>,
    ) -> Result<Result<SharedSlot, Duration>, Unavailable> {
        let (ok, a, b): (i64, i64, i64) = self
            .run(
                &scripts::TAKE,
                self.rate_key(),
                &[ms(interval.unwrap_or_default())],
            )
            .await?;
        Ok(if ok == 1 {
            Ok(SharedSlot {
                before_ms: a,
                take: b,
            })
        } else {
            Err(Duration::from_millis(a.max(0) as u64))
        })
    }

    /// How long until the scope's next session-server slot is due, taking nothing.
    ///
    /// # Errors
    /// [`Unavailable`] when Redis cannot be reached.
    pub async fn peek(&self) -> Result<Duration, Unavailable> {
        let ms: i64 = self.run(&scripts::PEEK, self.rate_key(), &[]).await?;
        Ok(Duration::from_millis(ms.max(0) as u64))
    }

    /// Gives back a slot taken with [`Fleet::take`] and not used, unless the scope's schedule
    /// moved on since.
    ///
    /// # Errors
    /// [`Unavailable`] when Redis cannot be reached (the slot then passes unused).
    pub async fn give_back(&self, slot: SharedSlot) -> Result<(), Unavailable> {
        self.run::<i64>(
            &scripts::GIVE_BACK,
            self.rate_key(),
            &[slot.before_ms.to_string(), slot.take.to_string()],
        )
        .await
        .map(|_| ())
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

/// A session-server slot taken from the scope's budget: what giving it back needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedSlot {
    /// The scope's next slot before the take, ms on Redis's clock (0: none).
    pub before_ms: i64,
    /// The take's number: only the latest take can be given back.
    pub take: i64,
}

/// Why Redis refused a write, in words, when it answered with a refusal rather than not at all.
fn refusal(e: &redis::RedisError) -> Option<&'static str> {
    match e.code()? {
        "READONLY" => Some("read-only replica (a failover left REDIS_URL on a replica?)"),
        "NOREPLICAS" => Some("no replicas to write (min-replicas-to-write not met)"),
        "OOM" => Some("out of memory (maxmemory reached with noeviction)"),
        "MISCONF" => Some("Redis cannot persist (stop-writes-on-bgsave-error)"),
        "NOPERM" => {
            Some("no permission (REDIS_URL's user may not run the scripts: EVAL, EVALSHA, SCRIPT)")
        }
        _ => None,
    }
}

fn ms(d: Duration) -> String {
    d.as_millis().min(i64::MAX as u128).to_string()
}

#[cfg(test)]
mod failover_tests;
#[cfg(test)]
mod tests;
