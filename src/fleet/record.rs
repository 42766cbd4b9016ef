//! The credential's record ([`crate::ledger`]) where it lives: in Redis for a fleet, in the
//! process's [`Book`] for one replica. Both make the same transitions; the Redis form is one
//! Lua script per step, on Redis's clock.

use std::{sync::Arc, time::Duration};

use super::{Fleet, Unavailable, scripts};
use crate::{
    failure::Failure,
    identity::Key,
    ledger::{Ask, Book, Claimed, Fence, Found, KEEP, Settlement, Taken},
};

/// Where the fleet's credential records live.
#[derive(Clone, Debug)]
pub enum Records {
    /// In this process: one replica.
    Memory(Arc<Book>),
    /// In Redis (`REDIS_URL`): every replica of the fleet.
    Shared(Fleet),
}

impl Records {
    /// Takes the claim on the credential `id` for `lease`, or says why not.
    ///
    /// # Errors
    /// [`Unavailable`] when Redis cannot be reached.
    pub async fn claim(&self, id: &Key, ask: Ask, lease: Duration) -> Result<Found, Unavailable> {
        match self {
            Records::Memory(book) => Ok(book.claim(*id, ask, lease)),
            Records::Shared(fleet) => fleet.claim(id, ask, lease).await,
        }
    }

    /// Proves the claim of `epoch` is still held, renewing it for `lease` from now.
    ///
    /// # Errors
    /// [`Unavailable`] when Redis cannot be reached: the claim is then unproven.
    pub async fn fence(&self, id: &Key, epoch: u64, lease: Duration) -> Result<Fence, Unavailable> {
        match self {
            Records::Memory(book) => Ok(book.fence(*id, epoch, lease)),
            Records::Shared(fleet) => fleet.fence(id, epoch, lease).await,
        }
    }

    /// Records that a session-server answer for `id` was lost.
    ///
    /// # Errors
    /// [`Unavailable`] when Redis cannot be reached.
    pub async fn answer_lost(&self, id: &Key) -> Result<(), Unavailable> {
        match self {
            Records::Memory(book) => {
                book.answer_lost(*id);
                Ok(())
            }
            Records::Shared(fleet) => fleet
                .run::<i64>(&scripts::ANSWER_LOST, fleet.record_key(id), &[ms(KEEP)])
                .await
                .map(|_| ()),
        }
    }

    /// Stages `sealed` (a `session.created`, [`crate::staging`]'s form) on the credential `id`
    /// unless one is staged or the record is created.
    ///
    /// # Errors
    /// [`Unavailable`] when Redis cannot be reached.
    pub async fn stage(&self, id: &Key, sealed: String) -> Result<(), Unavailable> {
        match self {
            Records::Memory(book) => {
                book.stage(*id, sealed);
                Ok(())
            }
            Records::Shared(fleet) => fleet
                .run::<i64>(&scripts::STAGE, fleet.record_key(id), &[sealed, ms(KEEP)])
                .await
                .map(|_| ()),
        }
    }

    /// Keeps `failure` on the claim of `epoch` on `id` before its dead letter is published
    /// ([`crate::ledger::Book::answer`]); `Ok(false)` when the claim is another's.
    ///
    /// # Errors
    /// [`Unavailable`] when Redis cannot be reached.
    pub async fn answer(
        &self,
        id: &Key,
        epoch: u64,
        failure: &crate::failure::Failure,
    ) -> Result<bool, Unavailable> {
        match self {
            Records::Memory(book) => Ok(book.answer(*id, epoch, failure)),
            Records::Shared(fleet) => {
                let json = serde_json::to_string(failure).unwrap_or_default();
                fleet
                    .run::<i64>(
                        &scripts::ANSWER,
                        fleet.record_key(id),
                        &[epoch.to_string(), json, ms(KEEP)],
                    )
                    .await
                    .map(|held| held == 1)
            }
        }
    }

    /// Ends the claim of `epoch` on `id` as `how` says; `Ok(false)` when the claim was lost
    /// and nothing changed.
    ///
    /// # Errors
    /// [`Unavailable`] when Redis cannot be reached.
    pub async fn settle(
        &self,
        id: &Key,
        epoch: u64,
        how: &Settlement,
    ) -> Result<bool, Unavailable> {
        match self {
            Records::Memory(book) => Ok(book.settle(*id, epoch, how)),
            Records::Shared(fleet) => fleet.settle(id, epoch, how).await,
        }
    }
}

fn ms(d: Duration) -> String {
    d.as_millis().min(i64::MAX as u128).to_string()
}

impl Fleet {
    async fn claim(&self, id: &Key, ask: Ask, lease: Duration) -> Result<Found, Unavailable> {
        let replay = ask.replay_of.map(|g| g.to_string()).unwrap_or_default();
        let found: Vec<String> = self
            .run2(
                &scripts::CLAIM,
                [self.record_key(id), format!("{}epoch", self.prefix)],
                &[
                    ms(lease),
                    ask.round.to_string(),
                    replay,
                    ms(KEEP),
                    u8::from(ask.fresh).to_string(),
                ],
            )
            .await?;
        let num = |i: usize| {
            found
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(match found.first().map(String::as_str) {
            Some("created") => Found::Created,
            Some("failed") => Found::Failed { generation: num(1) },
            Some("parked") => Found::Parked {
                round: u32::try_from(num(1)).unwrap_or(u32::MAX),
            },
            Some("acquired") => Found::Acquired(Claimed {
                epoch: num(1),
                generation: num(2),
                answer_lost: found.get(3).is_some_and(|v| v == "1"),
                answered: found
                    .get(4)
                    .filter(|v| !v.is_empty())
                    .and_then(|v| serde_json::from_str::<Failure>(v).ok())
                    .map(Box::new),
                staged: found.get(5).filter(|v| !v.is_empty()).cloned(),
            }),
            _ => Found::Held,
        })
    }

    async fn fence(&self, id: &Key, epoch: u64, lease: Duration) -> Result<Fence, Unavailable> {
        let found: String = self
            .run(
                &scripts::FENCE,
                self.record_key(id),
                &[epoch.to_string(), ms(lease), ms(KEEP)],
            )
            .await?;
        Ok(match found.as_str() {
            "held" => Fence::Held,
            "created" => Fence::Taken(Taken::Created),
            "failed" => Fence::Taken(Taken::Failed),
            "parked" => Fence::Taken(Taken::Parked),
            _ => Fence::Taken(Taken::Elsewhere),
        })
    }

    async fn settle(&self, id: &Key, epoch: u64, how: &Settlement) -> Result<bool, Unavailable> {
        let none = Duration::ZERO;
        let (name, round, failure, stale) = match how {
            Settlement::Created => ("created", 0, String::new(), none),
            Settlement::Failed { spent: true } => ("failed", 0, String::new(), none),
            Settlement::Failed { spent: false } => ("unspent", 0, String::new(), none),
            Settlement::Parked { round, stale_for } => {
                ("parked", *round, String::new(), *stale_for)
            }
            Settlement::Answered(f) => {
                let json = serde_json::to_string(f).unwrap_or_default();
                ("answered", 0, json, none)
            }
            Settlement::Released => ("released", 0, String::new(), none),
        };
        let changed: i64 = self
            .run(
                &scripts::SETTLE,
                self.record_key(id),
                &[
                    epoch.to_string(),
                    name.into(),
                    round.to_string(),
                    failure,
                    ms(KEEP),
                    ms(stale.min(KEEP)),
                ],
            )
            .await?;
        Ok(changed == 1)
    }

    /// The fleet's key for sealing bookkeeping headers: the first replica's random key, kept
    /// in Redis, so every replica reads every other's seals without sharing an installation.
    ///
    /// # Errors
    /// [`Unavailable`] when Redis cannot be reached.
    pub async fn seal_key(&self) -> Result<Vec<u8>, Unavailable> {
        let mut fresh = [0u8; 32];
        aws_lc_rs::rand::fill(&mut fresh).map_err(|_| Unavailable)?;
        let key: String = self
            .run(
                &scripts::SEAL_KEY,
                format!("{}seal", self.prefix),
                &[hex::encode(fresh)],
            )
            .await?;
        hex::decode(key.trim())
            .ok()
            .filter(|k| k.len() >= 32)
            .ok_or(Unavailable)
    }
}
