//! The `bunq-session-worker` binary: reads the configuration and runs the worker until SIGINT
//! or SIGTERM. Exit status: 0 after a clean stop, 1 on a start-up or run failure, 2 on invalid
//! configuration.

use std::process::ExitCode;

use bunq_session_worker::{Settings, Worker, config::LoadError, telemetry, telemetry::Chain};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(LoadError::Args(e)) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
        Err(e) => {
            eprintln!("bunq-session-worker: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(settings.log_format);
    let worker = match Worker::build(settings).await {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %Chain(&e), "start-up failed");
            eprintln!("bunq-session-worker: {}", Chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_listener(shutdown.clone()));
    match worker.run_until_stopped(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %Chain(&e), "worker stopped");
            eprintln!("bunq-session-worker: {}", Chain(&e));
            ExitCode::FAILURE
        }
    }
}

async fn signal_listener(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutdown signal received");
    shutdown.cancel();
}
