//! What this process knows about inputs: the outcomes it already settled and the inputs under
//! way (their identity is [`crate::identity`]).
//!
//! AMQP does not confirm acks, so after a connection loss the broker may redeliver an input
//! whose session was already published, and the same credential may arrive twice (webhook and
//! poller): a single-use credential must not go to bunq again. Memory only, per process.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use crate::{failure::Failure, identity::Key};

/// A remembered outcome.
#[derive(Clone, Debug)]
pub enum Known {
    /// Its `session.created` was confirmed: just ack a repeat.
    Settled,
    /// Its dead letter or delayed-retry copy was confirmed: ack a redelivery of it; a new
    /// message with the same credential (a replayed dead letter) is processed.
    Finished,
    /// bunq refused it permanently but the dead letter was not confirmed yet: settle this again
    /// without calling bunq.
    Failed(Box<Failure>),
}

/// Outcomes this process settled, by [`crate::identity::round_key`].
///
/// A failure whose dead letter could not be published yet is kept so the retry does not call
/// bunq again; a confirmed failure is remembered for redeliveries only, so an operator can replay
/// its dead letter.
/// Bounded: entries live [`KnownOutcomes::TTL`], at most [`KnownOutcomes::CAPACITY`] are kept;
/// when it is full a new outcome evicts the oldest one (counted in
/// `bunq_session_worker_outcome_memory_evictions_total`, and a WARN at most once a minute): it
/// never refuses one. Only credentials' outcomes are remembered ([`crate::plan`]).
/// Expired entries are dropped oldest first from a queue in insertion order, so remembering
/// costs the same with 10 entries or 10,000 (a sweep of the whole map on every outcome was a
/// tenth of the worker's CPU in the benchmark).
#[derive(Debug, Default)]
pub struct KnownOutcomes {
    entries: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    by_key: HashMap<Key, (Instant, Known)>,
    /// When each key was remembered, oldest first; a key remembered again appears once more,
    /// and only its newest stamp removes it.
    order: VecDeque<(Instant, Key)>,
    /// When an eviction was last logged.
    warned_at: Option<Instant>,
}

impl Entries {
    /// Forgets the oldest outcome still remembered, and says so.
    fn evict_oldest(&mut self, now: Instant) {
        while let Some((at, key)) = self.order.pop_front() {
            if self.by_key.get(&key).is_some_and(|(stamp, _)| *stamp == at) {
                self.by_key.remove(&key);
                break;
            }
        }
        metrics::counter!("bunq_session_worker_outcome_memory_evictions_total").increment(1);
        if self
            .warned_at
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(60))
        {
            self.warned_at = Some(now);
            tracing::warn!(
                capacity = KnownOutcomes::CAPACITY,
                ttl_s = KnownOutcomes::TTL.as_secs(),
                "the in-process memory of outcomes is full: the oldest are forgotten before their time, so a repeat of one is worked on again (with REDIS_URL the fleet's record still holds a created session)"
            );
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(at, key)) = self.order.front() {
            if now.duration_since(at) < KnownOutcomes::TTL {
                break;
            }
            self.order.pop_front();
            if self.by_key.get(&key).is_some_and(|(stamp, _)| *stamp == at) {
                self.by_key.remove(&key);
            }
        }
        // Stale stamps of keys remembered again: keep the queue within twice the map.
        if self.order.len() > 2 * KnownOutcomes::CAPACITY {
            let by_key = &self.by_key;
            self.order
                .retain(|(at, key)| by_key.get(key).is_some_and(|(stamp, _)| stamp == at));
        }
    }
}

impl KnownOutcomes {
    /// How long an outcome is remembered: 15 min.
    pub const TTL: Duration = Duration::from_secs(900);
    /// Most outcomes remembered at once.
    pub const CAPACITY: usize = 10_000;

    /// Remembers `known` for `key`; when full, the oldest outcome is forgotten to make room.
    pub fn remember(&self, key: Key, known: Known) {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        e.expire(now);
        if e.by_key.len() >= Self::CAPACITY && !e.by_key.contains_key(&key) {
            e.evict_oldest(now);
        }
        e.by_key.insert(key, (now, known));
        e.order.push_back((now, key));
    }

    /// What is remembered for `key`, if it is younger than [`Self::TTL`].
    pub fn recall(&self, key: &Key) -> Option<Known> {
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.by_key
            .get(key)
            .filter(|(at, _)| at.elapsed() < Self::TTL)
            .map(|(_, k)| k.clone())
    }
}

/// Per-input async locks: one copy of an input at a time in this process, so a copy redelivered
/// while the first is still at bunq (its channel died) waits for it, then finds its outcome.
/// Entries are removed when nobody holds or waits for them.
#[derive(Debug, Default)]
pub struct InFlight {
    locks: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds an input's lock; dropping it removes the map entry when it is the last user.
#[derive(Debug)]
pub struct InFlightGuard<'a> {
    owner: &'a InFlight,
    key: Key,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl InFlight {
    /// Waits for and takes the lock of `key`.
    pub async fn lock(&self, key: Key) -> InFlightGuard<'_> {
        let m = {
            let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key).or_default().clone()
        };
        InFlightGuard {
            owner: self,
            key,
            guard: Some(m.lock_owned().await),
        }
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.owner.locks.lock().unwrap_or_else(|p| p.into_inner());
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn outcomes_are_forgotten_after_the_ttl() {
        let known = KnownOutcomes::default();
        known.remember([1; 32], Known::Settled);
        assert!(matches!(known.recall(&[1; 32]), Some(Known::Settled)));
        tokio::time::advance(KnownOutcomes::TTL).await;
        assert!(known.recall(&[1; 32]).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_keeps_a_key_remembered_again_and_frees_room() {
        let known = KnownOutcomes::default();
        known.remember([1; 32], Known::Finished);
        tokio::time::advance(KnownOutcomes::TTL / 2).await;
        known.remember([1; 32], Known::Settled);
        known.remember([2; 32], Known::Settled);
        // The first stamp of [1] expires; its newer one keeps it.
        tokio::time::advance(KnownOutcomes::TTL / 2).await;
        known.remember([3; 32], Known::Settled);
        assert!(matches!(known.recall(&[1; 32]), Some(Known::Settled)));
        {
            let e = known.entries.lock().unwrap();
            assert_eq!(e.by_key.len(), 3);
            assert_eq!(e.order.len(), 3);
        }
        tokio::time::advance(KnownOutcomes::TTL).await;
        known.remember([4; 32], Known::Settled);
        let e = known.entries.lock().unwrap();
        assert_eq!(e.by_key.keys().copied().collect::<Vec<_>>(), vec![[4; 32]]);
        assert_eq!(e.order.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn when_full_the_oldest_outcome_is_evicted_and_a_new_one_is_kept() {
        let key = |i: u32| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            k
        };
        let known = KnownOutcomes::default();
        for i in 0..KnownOutcomes::CAPACITY as u32 {
            known.remember(key(i), Known::Settled);
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        // Updating a key already there evicts nothing, and makes it the youngest.
        known.remember(key(0), Known::Finished);
        assert!(known.recall(&key(1)).is_some());
        known.remember([0xff; 32], Known::Settled);
        assert!(matches!(known.recall(&[0xff; 32]), Some(Known::Settled)));
        assert!(known.recall(&key(1)).is_none(), "the oldest is forgotten");
        assert!(matches!(known.recall(&key(0)), Some(Known::Finished)));
        assert!(known.recall(&key(2)).is_some());
        let e = known.entries.lock().unwrap();
        assert_eq!(e.by_key.len(), KnownOutcomes::CAPACITY);
    }

    #[tokio::test]
    async fn in_flight_entries_go_when_the_last_holder_leaves() {
        let f = InFlight::default();
        {
            let _g = f.lock([2; 32]).await;
            assert_eq!(f.locks.lock().unwrap().len(), 1);
        }
        assert!(f.locks.lock().unwrap().is_empty());
    }
}
