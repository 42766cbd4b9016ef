//! A credential's record, and the in-process book that keeps records without `REDIS_URL`.
//!
//! One record per credential, keyed by its identity ([`crate::identity`]), never by round,
//! shape, delivery or process. It holds the credential's whole life:
//!
//! ```text
//! free ──claim──▶ claimed(epoch, lease) ──settle──▶ created | failed | parked(round) | free
//!                   │  ▲ fence (renews)                    answered(failure) = free + failure
//!                   └──┘
//! ```
//!
//! - A **claim** is taken by one delivery (two copies on one replica are two claimants) and
//!   gets a fresh **epoch**; every later step names that epoch and is a compare-and-set on it,
//!   so a holder whose lease ran out and was taken over can change nothing. A claim whose lease
//!   ran out is free for the next claimant.
//! - **created** and **failed** are final (kept [`KEEP`]): a copy that comes later, anywhere, is
//!   acked without a bunq call. A replayed dead letter of the failure's generation
//!   ([`Ask::replay_of`]) starts a new generation; so does a new message of a credential bunq
//!   never took ([`crate::failure::FailureReason::spends_the_credential`]).
//! - **parked(round)**: round `round` sits in a delay queue; a copy of an earlier round is stale
//!   until the parked copy is overdue ([`parked_for`]: a purged delay queue must not strand the
//!   credential), and then may take the work on.
//! - **answered**: bunq's permanent refusal whose dead letter was not confirmed yet: the next
//!   claimant settles it again without calling bunq.
//! - **answer lost**: a session-server attempt's answer never arrived, in any round or replica;
//!   sticky, so a later refusal reads `outcome_unknown`.
//! - **staged**: bunq opened a session and its `session.created` (sealed: never a token in
//!   clear, [`crate::staging`]) is kept before it is published; the next claimant (once the
//!   holder's lease is over: it may still be publishing) publishes it without calling bunq.
//!   Cleared once the record is created.
//!
//! [`Book`] is the in-process form: right for one replica. With `REDIS_URL` the same
//! transitions run as Lua scripts on Redis's clock ([`crate::fleet`]).

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::Duration,
};

use tokio::time::Instant;

use crate::{failure::Failure, identity::Key};

/// How long a record is kept after its last change: at least the 24 h the contract promises
/// for recognising a repeat.
pub const KEEP: Duration = Duration::from_secs(25 * 3600);

/// What a claimant brings to [`Book::claim`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ask {
    /// The delayed-retry round of this copy (`x-bunq-delayed-retries`).
    pub round: u32,
    /// The generation named by a replayed dead letter (`x-credential-generation`), if this copy
    /// is one: a replay of an older generation's dead letter starts nothing.
    pub replay_of: Option<u64>,
    /// Whether this copy is a new message: not redelivered by the broker, and no copy the
    /// worker made under a claim (those name their generation, `x-bunq-generation`). A new
    /// message of a credential bunq never took starts a new generation of its failure; else
    /// the credential published anew is a duplicate (a webhook and a poller both sent it). A
    /// replay of the failure's dead letter starts one either way.
    pub fresh: bool,
}

/// A claim this delivery now holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimed {
    /// The fencing epoch: every later step of this claim names it.
    pub epoch: u64,
    /// The credential's generation (0, or the replays since).
    pub generation: u64,
    /// Some session-server attempt's answer was lost, in any round or replica.
    pub answer_lost: bool,
    /// bunq's permanent refusal, recorded when its dead letter could not be confirmed: settle
    /// it again without calling bunq.
    pub answered: Option<Box<Failure>>,
    /// A `session.created` staged by an earlier claimant ([`crate::staging`]'s sealed form):
    /// publish it without calling bunq.
    pub staged: Option<String>,
}

/// What a claim found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// This delivery holds the claim now.
    Acquired(Claimed),
    /// Another delivery (of this replica or another) holds a live claim.
    Held,
    /// Final: its `session.created` was confirmed.
    Created,
    /// Final: its dead letter was confirmed, in `generation`.
    Failed {
        /// The generation that failed: a replay of its dead letter names it.
        generation: u64,
    },
    /// A later round than this copy's is parked for a delayed retry.
    Parked {
        /// The parked round.
        round: u32,
    },
}

/// What a fence (the proof, before a bunq call, that the claim is still this delivery's) found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fence {
    /// Still held; the lease runs a full lease length from now.
    Held,
    /// The claim is no longer this delivery's: the record now says this.
    Taken(Taken),
}

/// What took a credential out of a delivery's hands: what a claim or a fence found instead of
/// the claim, and what becomes of the delivery then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    /// Its `session.created` is confirmed: ack this copy.
    Created,
    /// Its dead letter is confirmed: ack this copy.
    Failed,
    /// A later round is parked for a delayed retry: ack this copy.
    Parked,
    /// Another delivery holds it, or it is free again: hand this copy back.
    Elsewhere,
}

/// How a claim ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// `session.created` is confirmed: final. Recorded even when the claim was lost meanwhile,
    /// since a session exists.
    Created,
    /// The dead letter is confirmed: final for this generation. `spent`
    /// ([`FailureReason::spends_the_credential`]): only a replay of the dead letter starts the
    /// next generation; otherwise a new message of the credential does too.
    Failed {
        /// Whether bunq took the credential.
        spent: bool,
    },
    /// The copy of round `round` is confirmed in a delay queue.
    Parked {
        /// The parked round.
        round: u32,
        /// How long earlier rounds' copies are acked as stale ([`parked_for`]).
        stale_for: Duration,
    },
    /// bunq refused, the dead letter is not confirmed: the delivery is requeued and the next
    /// claimant settles this failure again without calling bunq.
    Answered(Box<Failure>),
    /// No outcome (handed back, abandoned, stopped): free for the next claimant.
    Released,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    Claimed,
    Parked,
    Created,
    Failed,
}

/// How long a parked round makes earlier rounds' copies stale: twice the tier's `delay` plus a
/// minute, then the parked copy is presumed lost.
pub fn parked_for(delay: Duration) -> Duration {
    delay
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(60))
}

#[derive(Debug)]
struct Record {
    state: State,
    epoch: u64,
    /// The claim's lease end, or how long a parked round stays authoritative.
    lease_end: Instant,
    round: u32,
    generation: u64,
    answer_lost: bool,
    answered: Option<Box<Failure>>,
    staged: Option<String>,
    /// Failed without bunq taking the credential: a new message of it starts a generation.
    anew: bool,
    /// When it last changed: its place in [`Entries::order`].
    stamp: Instant,
}

/// The records of one process. Bounded: at most [`Book::CAPACITY`] records, each kept
/// [`KEEP`] after its last change; when full, the oldest record not claimed is forgotten
/// (counted in `bunq_session_worker_outcome_memory_evictions_total`, a WARN at most once a
/// minute): a new record is never refused. Forgetting a record is what a restart does too: a
/// repeat of it is worked on again.
#[derive(Debug, Default)]
pub struct Book {
    entries: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    by_key: HashMap<Key, Record>,
    /// Changes, oldest first; a key changed again appears once more, and only its newest stamp
    /// removes it. Keeps expiry and eviction as cheap with 10 records as with 10,000.
    order: VecDeque<(Instant, Key)>,
    /// Epochs are unique in the process, so a record forgotten and made again never hands out
    /// an epoch a stale holder still names.
    last_epoch: u64,
    warned_at: Option<Instant>,
}

impl Entries {
    fn touch(&mut self, key: Key, now: Instant) {
        if let Some(r) = self.by_key.get_mut(&key) {
            r.stamp = now;
            self.order.push_back((now, key));
        }
    }

    /// Forgets records older than [`KEEP`], and makes room for one more.
    fn make_room(&mut self, now: Instant) {
        while let Some(&(at, key)) = self.order.front() {
            if now.duration_since(at) < KEEP {
                break;
            }
            self.order.pop_front();
            self.forget_if_current(key, at);
        }
        if self.by_key.len() >= Book::CAPACITY {
            while let Some((at, key)) = self.order.pop_front() {
                if self.forget_if_current(key, at) {
                    self.evicted(now);
                    break;
                }
            }
        }
        // Stale stamps of keys changed again: keep the queue within twice the map.
        if self.order.len() > 2 * Book::CAPACITY {
            let by_key = &self.by_key;
            self.order
                .retain(|(at, key)| by_key.get(key).is_some_and(|r| r.stamp == *at));
        }
    }

    /// Removes `key` if `at` is its newest stamp and nobody holds it (a claim is renewed, so
    /// it is never the oldest for long; a stale stamp of it is skipped).
    fn forget_if_current(&mut self, key: Key, at: Instant) -> bool {
        let current = self
            .by_key
            .get(&key)
            .is_some_and(|r| r.stamp == at && r.state != State::Claimed);
        if current {
            self.by_key.remove(&key);
        }
        current
    }

    fn evicted(&mut self, now: Instant) {
        metrics::counter!("bunq_session_worker_outcome_memory_evictions_total").increment(1);
        if self
            .warned_at
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(60))
        {
            self.warned_at = Some(now);
            tracing::warn!(
                capacity = Book::CAPACITY,
                keep_s = KEEP.as_secs(),
                "the in-process book of credentials is full: the oldest settled records are forgotten before their time, so a repeat of one is worked on again (set REDIS_URL to keep them in Redis)"
            );
        }
    }
}

impl Book {
    /// Most records kept at once.
    pub const CAPACITY: usize = 10_000;

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the claim on `key` for `lease`, or says why not (see [`Found`]).
    pub fn claim(&self, key: Key, ask: Ask, lease: Duration) -> Found {
        let now = Instant::now();
        let mut e = self.entries();
        if !e.by_key.contains_key(&key) {
            e.make_room(now);
        }
        e.last_epoch += 1;
        let epoch = e.last_epoch;
        let r = e.by_key.entry(key).or_insert_with(|| Record {
            state: State::Free,
            epoch: 0,
            lease_end: now,
            round: 0,
            generation: 0,
            answer_lost: false,
            answered: None,
            staged: None,
            anew: false,
            stamp: now,
        });
        match r.state {
            State::Created => return Found::Created,
            // The generation check alone keeps a replay to one try: a replay handed back or
            // redelivered before its claim is still that replay.
            State::Failed
                if match ask.replay_of {
                    Some(g) => g == r.generation,
                    None => ask.fresh && r.anew,
                } =>
            {
                r.generation += 1;
                r.state = State::Free;
            }
            State::Failed => {
                return Found::Failed {
                    generation: r.generation,
                };
            }
            // A live holder may be publishing its staged session right now: wait for it, so
            // the session is published once.
            State::Claimed if r.lease_end > now => return Found::Held,
            // A staged session needs no bunq call: whoever staged it, publish it.
            _ if r.staged.is_some() => {}
            State::Parked if ask.round < r.round && r.lease_end > now => {
                return Found::Parked { round: r.round };
            }
            _ => {}
        }
        r.state = State::Claimed;
        r.epoch = epoch;
        r.lease_end = now + lease;
        let claimed = Claimed {
            epoch,
            generation: r.generation,
            answer_lost: r.answer_lost,
            answered: r.answered.clone(),
            staged: r.staged.clone(),
        };
        e.touch(key, now);
        Found::Acquired(claimed)
    }

    /// Proves the claim of `epoch` is still held and renews it for `lease` from now.
    pub fn fence(&self, key: Key, epoch: u64, lease: Duration) -> Fence {
        let now = Instant::now();
        let mut e = self.entries();
        let Some(r) = e.by_key.get_mut(&key) else {
            return Fence::Taken(Taken::Elsewhere);
        };
        if r.state == State::Claimed && r.epoch == epoch {
            r.lease_end = now + lease;
            e.touch(key, now);
            return Fence::Held;
        }
        Fence::Taken(match r.state {
            State::Created => Taken::Created,
            State::Failed => Taken::Failed,
            State::Parked => Taken::Parked,
            State::Free | State::Claimed => Taken::Elsewhere,
        })
    }

    /// Records that a session-server attempt's answer was lost: bunq may have opened a session.
    pub fn answer_lost(&self, key: Key) {
        let now = Instant::now();
        let mut e = self.entries();
        if let Some(r) = e.by_key.get_mut(&key) {
            r.answer_lost = true;
            e.touch(key, now);
        }
    }

    /// Keeps `failure`, bunq's answer that failed the credential, on the claim of `epoch` before
    /// its dead letter is published: whoever takes the claim over settles that failure again
    /// without calling bunq. False when the claim is no longer that epoch's.
    pub fn answer(&self, key: Key, epoch: u64, failure: &Failure) -> bool {
        let now = Instant::now();
        let mut e = self.entries();
        let Some(r) = e.by_key.get_mut(&key) else {
            return false;
        };
        if r.state != State::Claimed || r.epoch != epoch {
            return false;
        }
        r.answered = Some(Box::new(failure.clone()));
        e.touch(key, now);
        true
    }

    /// Stages `sealed`, a `session.created` bunq's answer made, unless one is staged already or
    /// the record is created. Whoever holds the claim: the session exists.
    pub fn stage(&self, key: Key, sealed: String) {
        let now = Instant::now();
        let mut e = self.entries();
        if let Some(r) = e.by_key.get_mut(&key)
            && r.state != State::Created
            && r.staged.is_none()
        {
            r.staged = Some(sealed);
            e.touch(key, now);
        }
    }

    /// Ends the claim of `epoch` as `how` says. A lost claim changes nothing, except that a
    /// created session is always recorded. Returns whether the record changed.
    pub fn settle(&self, key: Key, epoch: u64, how: &Settlement) -> bool {
        let now = Instant::now();
        let mut e = self.entries();
        let Some(r) = e.by_key.get_mut(&key) else {
            return false;
        };
        let holder = r.state == State::Claimed && r.epoch == epoch;
        match how {
            Settlement::Created => {
                r.state = State::Created;
                r.answered = None;
                r.staged = None;
            }
            _ if !holder => return false,
            Settlement::Failed { spent } => {
                r.state = State::Failed;
                r.answered = None;
                r.anew = !spent;
            }
            Settlement::Parked { round, stale_for } => {
                r.state = State::Parked;
                r.round = *round;
                r.lease_end = now.checked_add(*stale_for).unwrap_or(now + KEEP);
            }
            Settlement::Answered(f) => {
                r.state = State::Free;
                r.answered = Some(f.clone());
            }
            Settlement::Released => r.state = State::Free,
        }
        e.touch(key, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(30);

    fn acquired(f: Found) -> Claimed {
        match f {
            Found::Acquired(c) => c,
            other => panic!("expected a claim, found {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn records_are_forgotten_after_keep() {
        let book = Book::default();
        let c = acquired(book.claim([1; 32], Ask::default(), LEASE));
        assert!(book.settle([1; 32], c.epoch, &Settlement::Created));
        tokio::time::advance(KEEP).await;
        assert!(matches!(
            book.claim([2; 32], Ask::default(), LEASE),
            Found::Acquired(_)
        ));
        assert!(matches!(
            book.claim([1; 32], Ask::default(), LEASE),
            Found::Acquired(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn when_full_the_oldest_settled_record_is_evicted_and_a_claim_never_is() {
        let key = |i: u32| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            k
        };
        let book = Book::default();
        // The oldest record is a live claim: eviction passes it over.
        let held = acquired(book.claim(key(0), Ask::default(), KEEP * 2));
        for i in 1..Book::CAPACITY as u32 {
            let c = acquired(book.claim(key(i), Ask::default(), LEASE));
            book.settle(key(i), c.epoch, &Settlement::Created);
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert!(matches!(
            book.claim([0xff; 32], Ask::default(), LEASE),
            Found::Acquired(_)
        ));
        assert_eq!(book.fence(key(0), held.epoch, LEASE), Fence::Held);
        assert!(
            matches!(
                book.claim(key(1), Ask::default(), LEASE),
                Found::Acquired(_)
            ),
            "the oldest settled record is forgotten"
        );
        assert_eq!(
            book.claim(key(3), Ask::default(), LEASE),
            Found::Created,
            "younger ones are kept"
        );
        assert!(book.entries().by_key.len() <= Book::CAPACITY);
    }
}
