//! The `bunq-session-worker` binary: reads the configuration and runs the worker until SIGINT
//! or SIGTERM, or runs `demo`, `samples` or `emulator`. Exit status: 0 after a clean stop (or a
//! demo whose outcomes were all expected), 1 on a start-up or run failure (or an unexpected demo
//! outcome), 2 on invalid configuration.

// The worker's future (the whole run, its Redis lookups through Sentinel included) is deeper
// than the compiler's default query depth when it checks that it is `Send`.
#![recursion_limit = "256"]

use std::process::ExitCode;

use bunq_session_worker::{
    Settings, Worker,
    config::{Cli, Command, LoadError},
    telemetry,
    telemetry::Chain,
    tools::{demo, emulator},
};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let (command, settings) = match Cli::load() {
        Ok(loaded) => loaded,
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
    // Signals are handled from the first moment: as PID 1 in a container an unhandled SIGTERM
    // is ignored by the kernel, and start-up (connecting, the installation) can take a while.
    let shutdown = CancellationToken::new();
    #[cfg(unix)]
    let term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("bunq-session-worker: cannot handle SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::spawn(signal_listener(
        shutdown.clone(),
        #[cfg(unix)]
        term,
    ));
    // The demo prints its own lines; the worker inside it speaks only of errors.
    let quiet = !matches!(command, Command::Run | Command::Emulator(_));
    telemetry::init(settings.log_format, if quiet { "error" } else { "info" });
    execute(command, settings, shutdown).await
}

async fn execute(command: Command, settings: Settings, shutdown: CancellationToken) -> ExitCode {
    match command {
        Command::Run => run(settings, shutdown).await,
        Command::Demo => interruptible(demo::run(settings), &shutdown).await,
        Command::Samples => interruptible(demo::publish_samples(&settings), &shutdown).await,
        Command::Emulator(e) => match emulator::start(&e, shutdown).await {
            Ok(running) => {
                tracing::info!(base_url = %running.base_url, "bunq emulator listening (give the worker this base URL as BUNQ_API_URL)");
                match running.wait().await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => fail(&e),
                }
            }
            Err(e) => fail(&e),
        },
    }
}

async fn run(settings: Settings, shutdown: CancellationToken) -> ExitCode {
    let worker = tokio::select! {
        built = Worker::build(settings) => match built {
            Ok(w) => w,
            Err(e) => {
                fail_at_start(&e);
                return ExitCode::from(e.exit_code());
            }
        },
        // The context file is written whole or not at all, so stopping here leaves nothing
        // half-written.
        _ = shutdown.cancelled() => {
            tracing::info!("stopped during start-up");
            return ExitCode::SUCCESS;
        }
    };
    match worker.run_until_stopped(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// Runs a demo step unless a signal comes first (then exit 130, as a shell does for SIGINT).
async fn interruptible(
    step: impl Future<Output = Result<bool, demo::DemoError>>,
    shutdown: &CancellationToken,
) -> ExitCode {
    let result = tokio::select! {
        r = step => r,
        _ = shutdown.cancelled() => return ExitCode::from(130),
    };
    match result {
        Ok(true) => {
            println!("every outcome was the expected one");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("some outcomes were not the expected ones (see above)");
            ExitCode::FAILURE
        }
        Err(e) => fail(&e),
    }
}

/// Logs an error once, with its causes.
fn fail(e: &dyn std::error::Error) -> ExitCode {
    tracing::error!(error = %Chain(e), "stopped");
    ExitCode::FAILURE
}

/// Logs a start-up error once, with its causes.
fn fail_at_start(e: &dyn std::error::Error) -> ExitCode {
    tracing::error!(error = %Chain(e), "start-up failed");
    ExitCode::FAILURE
}

async fn signal_listener(
    shutdown: CancellationToken,
    #[cfg(unix)] mut term: tokio::signal::unix::Signal,
) {
    #[cfg(unix)]
    {
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
