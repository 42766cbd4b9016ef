//! Integration tests: the worker against a real RabbitMQ (`AMQP_URL`) and a wiremock bunq.

mod bad_input;
mod bunq_errors;
mod delivery;
mod happy;
mod harness;
mod helpers;
mod hostile;
mod pacing;
mod process;
mod proxy;
mod resilience;
