//! Integration tests: the worker against a real RabbitMQ (a container, `AMQP_URL` or localhost:
//! see `helpers::amqp_url`) and a wiremock bunq.

mod bad_input;
mod binary;
mod breaker;
mod bunq_errors;
mod contract;
mod custody;
mod dead_channel;
mod delivery;
mod demo;
mod field_faults;
mod fleet;
mod frames;
mod handbacks;
mod happy;
mod harness;
mod helpers;
mod hostile;
mod observe;
mod pacing;
mod process;
mod proxy;
mod record;
mod redis_outage;
mod resilience;
mod samples;
mod takeover;
mod taps;
