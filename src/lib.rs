//! bunq-session-worker: opens bunq sessions for provisioned users.
//!
//! A partner's provisioning system publishes "provision ready" events to RabbitMQ; this worker
//! consumes them, performs bunq's session flow (device-server, session-server, signed, with
//! retries) with its own installation, and publishes `session.created` with the session id and
//! token, or `session.failed` plus a dead-letter copy that says why.
//!
//! Map of the crate, lowest first: a module names only those listed before it (a test keeps
//! this true, so the import graph has no cycle).
//! - [`failure`]: the reason codes and the one [`failure::Failure`], from bunq's answer to the dead letter.
//! - [`jwe`]: sealing a secret for its consumer: JWE compact serialization (RFC 7516/7518).
//! - [`rate_limit`]: `N` calls per `W` s, as bunq states it and `BUNQ_SESSION_RATE_LIMIT` sets it.
//! - `retry`: the one retry helper and its policies; every wait ends on shutdown.
//! - [`telemetry`]: tracing set-up, text or JSON; error cause chains.
//! - `observe`: Prometheus metrics, `/healthz` and `/readyz` on `METRICS_ADDR`, read through a probe.
//! - [`events`]: input shapes → [`events::ProvisionReady`]; output event bodies.
//! - [`bunq`]: API context, signing, the calls and their error classes.
//! - [`identity`]: an input's identity (its credential) and the ids derived from it.
//! - `staging`: a `session.created` kept in the credential's record before it is published,
//!   never with a token in clear.
//! - `ledger`: a credential's record (free, claimed, created, failed, parked) and the
//!   in-process book of records.
//! - `outcome`: what becomes of a delivery, decided and not yet carried out.
//! - `fleet`: state shared by replicas in Redis: the credentials' records and the claims on
//!   them, one rate budget, the seal key.
//! - [`breaker`]: stops taking work when bunq refuses the worker's own set-up.
//! - [`broker`]: connection, topology, the envelope read once from a delivery, the sealed
//!   bookkeeping headers, the consumer supervisor, confirmed publishing.
//! - `pacing`: spacing and 429 pauses of session-server, per process or per fleet scope.
//! - [`config`]: the only module that reads the environment.
//! - `plan`: `Outcome` + `Inbound` → the messages to publish and the settlement; pure.
//! - `session`: the bunq calls for one credential with their budget; knows nothing of AMQP.
//! - `settle`: the only code that publishes, acks and nacks: carries out a plan.
//! - `decide`: the one place an `Outcome` is made: `Inbound` → `Outcome`.
//! - [`worker`]: start-up wiring and the delivery path: read → decide → plan → settle.
//! - [`tools`]: beside the product: the bunq emulator, `demo` and `samples`.
#![warn(missing_docs)]

pub mod breaker;
pub mod broker;
pub mod bunq;
pub mod config;
mod decide;
pub mod events;
pub mod failure;
mod fleet;
pub mod identity;
pub mod jwe;
mod ledger;
mod observe;
mod outcome;
mod pacing;
mod plan;
pub mod rate_limit;
mod retry;
mod session;
mod settle;
mod staging;
pub mod telemetry;
pub mod tools;
pub mod worker;

#[cfg(test)]
mod crate_map_tests;

pub use config::Settings;
pub use worker::Worker;
