//! Test harness: a real RabbitMQ (in a container, or at `AMQP_URL`: see `container::amqp_url`), a
//! wiremock fake of bunq that checks headers and signatures and signs its answers, and a worker
//! with its own `test-<uuid>` names.
//!
//! - `container`: where the broker under test is (a container, `AMQP_URL` or localhost), and
//!   `rabbitmqctl` for it;
//! - `broker`: connecting to the broker under test, its queues, and cleaning up after a test;
//! - `settings`: one test's names and the worker's settings and flags;
//! - `app`: `TestApp`, one test's world, and running its worker;
//! - `bunq`: what the fake bunq answers and what it received;
//! - `messages`: publishing events and reading what the worker published.

use std::{future::Future, time::Duration};

mod app;
mod broker;
mod bunq;
mod container;
mod messages;
mod settings;

#[path = "../../support/fake_bunq.rs"]
mod fake_bunq;

pub use app::*;
pub use broker::*;
pub use bunq::*;
pub use container::*;
pub use fake_bunq::*;
pub use messages::*;
pub use settings::*;

/// How long a test waits for an expected event before failing.
pub const WAIT: Duration = Duration::from_secs(20);

/// Polls `cond` until it holds or `WAIT` passes.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An error as the binary prints it: the message and its causes.
pub fn chain(e: &dyn std::error::Error) -> String {
    bunq_session_worker::telemetry::Chain(e).to_string()
}
