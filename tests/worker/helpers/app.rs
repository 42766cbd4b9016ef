//! `TestApp`: one test's world (broker connection and names, fake bunq, settings, files) and the
//! worker it runs in this process.

use std::{path::PathBuf, sync::Arc};

use bunq_session_worker::{
    Settings, Worker,
    worker::{RunError, StartError},
};
use lapin::{Channel, Connection, Consumer};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wiremock::MockServer;

use super::{
    BunqState, Names, WAIT, amqp_url, connect, declare_observer, delete_broker_objects,
    delete_leftovers, mount_installation, test_settings,
};

/// One test's world.
///
/// `cleanup` deletes the test's broker objects and files; a `TestApp` dropped without it (the
/// test panicked) deletes them from its drop guard, best effort and bounded in time.
pub struct TestApp {
    pub names: Names,
    pub bunq: MockServer,
    pub state: Arc<BunqState>,
    pub conn: Connection,
    pub channel: Channel,
    pub dir: PathBuf,
    pub context_file: PathBuf,
    /// The broker's own URL (the worker's `settings.broker.amqp_url` may point at a proxy).
    pub amqp_url: String,
    /// The worker's settings: change fields before `start_worker`, e.g.
    /// `app.settings.retry.max_attempts = 1`.
    pub settings: Settings,
    pub(super) outputs: Option<Consumer>,
    pub(super) dead_letters: Option<Consumer>,
    worker: Option<(CancellationToken, JoinHandle<Result<(), RunError>>)>,
    pub status: Option<bunq_session_worker::worker::WorkerStatus>,
    /// More queues the test declared itself (delay queues follow from the settings), deleted
    /// by `cleanup` and the drop guard.
    pub extra_queues: Vec<String>,
    /// Set by `cleanup`: the drop guard has nothing left to do.
    cleaned_up: bool,
}

impl TestApp {
    /// Broker connection, names, fake bunq with installation mounted, and an observer queue
    /// bound to the output exchange with `output_binding` (None: no binding).
    pub async fn new_with_binding(output_binding: Option<&str>) -> Self {
        // `RUST_LOG=info cargo test -- --nocapture` shows the worker's logs.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let names = Names::new();
        let bunq = MockServer::start().await;
        let state = BunqState::new();
        mount_installation(&bunq, &state).await;
        let conn = connect().await;
        let channel = conn.create_channel().await.unwrap();
        declare_observer(&channel, &names, output_binding).await;
        let dir = std::env::temp_dir().join(format!("bsw-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let context_file = dir.join("bunq-context.json");
        let amqp_url = amqp_url().await;
        let settings = test_settings(&names, &bunq.uri(), &context_file, &amqp_url);
        Self {
            names,
            bunq,
            state,
            conn,
            channel,
            dir,
            context_file,
            amqp_url,
            settings,
            outputs: None,
            dead_letters: None,
            worker: None,
            status: None,
            extra_queues: Vec::new(),
            cleaned_up: false,
        }
    }

    pub async fn new() -> Self {
        Self::new_with_binding(Some("session.#")).await
    }

    /// Validates `settings` and builds a worker from a copy of them.
    pub async fn build_worker(&self) -> Result<Worker, StartError> {
        self.settings.validate().unwrap();
        Worker::build(self.settings.clone()).await
    }

    /// Builds and runs a worker in this process.
    pub async fn start_worker(&mut self) {
        let worker = self.build_worker().await.expect("worker starts");
        self.status = Some(worker.status());
        let token = CancellationToken::new();
        let handle = tokio::spawn(worker.run_until_stopped(token.clone()));
        self.worker = Some((token, handle));
    }

    /// Cancels the worker and returns its result.
    pub async fn stop_worker(&mut self) -> Result<(), RunError> {
        let (token, handle) = self.worker.take().expect("a worker is running");
        token.cancel();
        tokio::time::timeout(WAIT, handle)
            .await
            .expect("worker stops in time")
            .expect("worker task does not panic")
    }

    pub fn worker_is_running(&self) -> bool {
        self.worker.as_ref().is_some_and(|(_, h)| !h.is_finished())
    }

    /// Deletes this test's broker objects and files.
    pub async fn cleanup(mut self) {
        if self.worker.is_some() {
            let _ = self.stop_worker().await;
        }
        delete_broker_objects(&self.conn, &self.queues(), &self.exchanges()).await;
        let _ = self.conn.close(200, "".into()).await;
        let _ = std::fs::remove_dir_all(&self.dir);
        self.cleaned_up = true;
    }
}

/// The drop guard: a test that did not reach `cleanup` (it panicked) still leaves no queue,
/// exchange or file behind.
impl Drop for TestApp {
    fn drop(&mut self) {
        if self.cleaned_up {
            return;
        }
        if let Some((token, _)) = &self.worker {
            token.cancel();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        delete_leftovers(self.amqp_url.clone(), self.queues(), self.exchanges());
    }
}
