//! `demo`: the whole job against the real broker and the in-process bunq emulator, and nothing
//! of it left behind.

use std::{
    collections::BTreeSet,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bunq_session_worker::Settings;
use clap::Parser;
use secrecy::SecretString;

use crate::helpers::*;

/// Names `rabbitmqctl list_<what> name` prints that start with `demo-`; None when rabbitmqctl
/// cannot be run.
fn demo_names(what: &str) -> Option<BTreeSet<String>> {
    let out = Command::new("rabbitmqctl")
        .args([&format!("list_{what}"), "-q", "name"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("demo-"))
            .map(str::to_owned)
            .collect(),
    )
}

/// The run id of a demo name: `demo-<id>.…` → `<id>`.
fn run_of(name: &str) -> &str {
    name.trim_start_matches("demo-")
        .split('.')
        .next()
        .unwrap_or_default()
}

#[tokio::test]
async fn the_demo_gets_every_expected_outcome_and_leaves_nothing_behind() {
    let mut settings = Settings::try_parse_from(["bunq-session-worker"]).expect("the defaults");
    settings.broker.amqp_url = SecretString::from(amqp_url().await);
    // Only when rabbitmqctl talks to this broker: queues and exchanges before, and a watcher
    // that learns the demo's own names (its run id is its own) while it runs.
    let url = amqp_url().await;
    let local = ["@127.0.0.1:", "@localhost:", "@127.0.0.1/", "@localhost/"]
        .iter()
        .any(|h| url.contains(h));
    let before = local
        .then(|| demo_names("queues").zip(demo_names("exchanges")))
        .flatten();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let watcher = before.as_ref().map(|(queues, _)| {
        let (stop, seen, known) = (stop.clone(), seen.clone(), queues.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Some(now) = demo_names("queues") {
                    seen.lock().unwrap().extend(now.difference(&known).cloned());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    });

    let ok = tokio::time::timeout(
        bunq_session_worker::tools::demo::DEADLINE + Duration::from_secs(30),
        bunq_session_worker::tools::demo::run(settings),
    )
    .await
    .expect("the demo ends")
    .expect("the demo runs");
    stop.store(true, Ordering::SeqCst);
    if let Some(w) = watcher {
        w.join().unwrap();
    }
    assert!(ok, "every outcome was the expected one");

    let Some((queues_before, exchanges_before)) = before else {
        eprintln!(
            "rabbitmqctl is not available (or the broker is not local): not checking that the demo removed its queues and exchanges"
        );
        return;
    };
    let seen = seen.lock().unwrap().clone();
    let runs: BTreeSet<&str> = seen.iter().map(|n| run_of(n)).collect();
    eprintln!("the demo's queues seen while it ran: {seen:?}");
    // The demo has returned: any demo-* queue or exchange that was not there before is its
    // leftover (or, unlikely, another demo's running at the same time).
    let queues_after = demo_names("queues").unwrap();
    let exchanges_after = demo_names("exchanges").unwrap();
    let left: Vec<&String> = queues_after
        .difference(&queues_before)
        .chain(exchanges_after.difference(&exchanges_before))
        .collect();
    assert!(left.is_empty(), "the demo left {left:?}");
    for run in &runs {
        let dir = std::env::temp_dir().join(format!("bunq-session-worker-demo-{run}"));
        assert!(!dir.exists(), "the demo left {}", dir.display());
    }
}
