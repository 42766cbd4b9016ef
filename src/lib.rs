//! bunq-session-worker: opens bunq sessions for provisioned users.
//!
//! A partner's provisioning system publishes "provision ready" events to RabbitMQ; this worker
//! consumes them, performs bunq's session flow (device-server, session-server, signed, with
//! retries) with its own installation, and publishes `session.created` with the session id and
//! token, or `session.failed` plus a dead-letter copy that says why.
//!
//! Map of the crate:
//! - [`config`]: the only module that reads the environment.
//! - [`telemetry`]: tracing set-up, text or JSON.
//! - [`events`]: input shapes → [`events::ProvisionReady`]; output event bodies.
//! - [`outcome`]: reason codes and the result of handling a delivery.
//! - [`bunq`]: API context, signing, the calls and their error classes.
//! - [`retry`]: the backoff policy.
//! - [`pacing`]: process-wide spacing and 429 pauses of session-server.
//! - [`session`]: the business step (open a session with retries), knows nothing of AMQP.
//! - [`broker`]: topology and confirmed publishing.
//! - [`worker`]: the consumer loop and the one place an outcome becomes ack / publish.
#![warn(missing_docs)]

pub mod broker;
pub mod bunq;
pub mod config;
pub mod events;
pub mod outcome;
pub mod pacing;
pub mod retry;
pub mod session;
pub mod telemetry;
pub mod worker;

pub use config::Settings;
pub use worker::Worker;
