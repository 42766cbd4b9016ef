//! bunq-session-worker: opens bunq sessions for provisioned users.
//!
//! A partner's provisioning system publishes "provision ready" events to RabbitMQ; this worker
//! consumes them, performs bunq's session flow (device-server, session-server, signed, with
//! retries) with its own installation, and publishes `session.created` with the session id and
//! token, or `session.failed` plus a dead-letter copy that says why.
//!
//! Map of the crate, lowest first (a module uses only those above it):
//! - [`failure`]: the reason codes (`credential_rejected`, …).
//! - [`retry`]: the one retry helper and its policies; every wait ends on shutdown.
//! - [`fleet`]: state shared by replicas in Redis: claims on credentials, one rate budget.
//! - [`pacing`]: spacing and 429 pauses of session-server, per process or per fleet scope.
//! - [`events`]: input shapes → [`events::ProvisionReady`]; output event bodies.
//! - [`outcome`]: what became of a delivery, before any broker action.
//! - [`bunq`]: API context, signing, the calls and their error classes.
//! - [`session`]: the bunq calls for one credential with their budget; knows nothing of AMQP.
//! - [`ledger`]: input identity, output message ids, outcomes already settled, inputs in flight.
//! - [`broker`]: connection, topology, the envelope read once from a delivery, the consumer
//!   supervisor, confirmed publishing.
//! - [`process`]: `(&Inbound, &SessionFlow) -> Outcome`, the business decision, no broker call.
//! - [`settle`]: the only code that publishes, acks and nacks.
//! - [`breaker`]: stops taking work when bunq refuses the worker's own set-up.
//! - [`config`]: the only module that reads the environment.
//! - [`telemetry`]: tracing set-up, text or JSON; error cause chains.
//! - [`worker`]: start-up wiring and the delivery path.
//! - [`observe`]: Prometheus metrics, `/healthz` and `/readyz` on `METRICS_ADDR`.
//! - [`emulator`]: a bunq emulator (installation, device-server, session-server) for trying
//!   the worker without bunq credentials.
//! - [`demo`]: `demo` (emulator + worker + one sample of each kind) and `samples`.
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
mod ledger;
mod observe;
mod outcome;
mod pacing;
mod plan;
pub mod rate_limit;
mod retry;
mod session;
mod settle;
pub mod telemetry;
pub mod tools;
pub mod worker;

pub use config::Settings;
pub use worker::Worker;
