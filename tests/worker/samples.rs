//! `samples` as a newcomer meets it: before any worker ran, and against a worker that is not
//! consuming. Each says what is wrong and what to do, instead of a broker's raw words or a
//! silent minute that ends in "skipped".

use std::process::Command;

use crate::helpers::*;

/// `samples` with this test's names (the subcommand reads the same settings as the worker).
fn samples(app: &TestApp) -> std::process::Output {
    let n = &app.names;
    Command::new(env!("CARGO_BIN_EXE_bunq-session-worker"))
        .arg("samples")
        .env_remove("RUST_LOG")
        .env("AMQP_URL", &app.amqp_url)
        .env("INPUT_EXCHANGE", &n.input_exchange)
        .env("INPUT_QUEUE", &n.input_queue)
        .env("OUTPUT_EXCHANGE", &n.output_exchange)
        .env("DEAD_LETTER_EXCHANGE", &n.dead_letter_exchange)
        .env("DEAD_LETTER_QUEUE", &n.dead_letter_queue)
        .output()
        .expect("the binary runs")
}

#[tokio::test]
async fn samples_before_any_worker_ran_say_to_start_one() {
    let app = TestApp::new().await;
    let out = samples(&app);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "exchange '{}' does not exist: no worker has run",
            app.names.input_exchange
        )),
        "{text}"
    );
    assert!(text.contains("Start the worker first"), "{text}");
    assert!(!text.contains("NOT_FOUND"), "{text}");
    app.cleanup().await;
}

#[tokio::test]
async fn samples_without_a_consuming_worker_say_they_are_still_queued() {
    let mut app = TestApp::new().await;
    app.start_worker().await;
    app.stop_worker().await.unwrap();
    let out = samples(&app);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("no worker consumes"), "{text}");
    assert!(text.contains("still wait in"), "{text}");
    assert!(!text.contains("skipped, as expected"), "{text}");
    assert!(app.ready_count(&app.names.input_queue).await > 0);
    app.cleanup().await;
}
