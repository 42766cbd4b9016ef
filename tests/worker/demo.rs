//! `demo`: the whole job against the real broker and the in-process bunq emulator, and nothing
//! of it left behind.

use std::{
    collections::BTreeSet,
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

/// Names `rabbitmqctl list_<what> name` prints that start with `demo-`; None when it fails.
fn demo_names(ctl: Rabbitmqctl, what: &str) -> Option<BTreeSet<String>> {
    let out = ctl.run(&[&format!("list_{what}"), "-q", "name"]).ok()?;
    Some(
        out.lines()
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
    // Only when rabbitmqctl reaches this broker (on this machine or in the tests' container):
    // queues and exchanges before, and a watcher that learns the demo's own names (its run id
    // is its own) while it runs.
    let ctl = rabbitmqctl().await;
    let before = ctl.and_then(|ctl| demo_names(ctl, "queues").zip(demo_names(ctl, "exchanges")));
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let watcher = ctl.zip(before.as_ref()).map(|(ctl, (queues, _))| {
        let (stop, seen, known) = (stop.clone(), seen.clone(), queues.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Some(now) = demo_names(ctl, "queues") {
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
            "rabbitmqctl does not reach the broker under test: not checking that the demo removed its queues and exchanges"
        );
        return;
    };
    let seen = seen.lock().unwrap().clone();
    let runs: BTreeSet<&str> = seen.iter().map(|n| run_of(n)).collect();
    eprintln!("the demo's queues seen while it ran: {seen:?}");
    // The demo has returned: any demo-* queue or exchange that was not there before is its
    // leftover (or, unlikely, another demo's running at the same time).
    let ctl = ctl.expect("rabbitmqctl listed the names before");
    let queues_after = demo_names(ctl, "queues").expect("rabbitmqctl lists queues");
    let exchanges_after = demo_names(ctl, "exchanges").expect("rabbitmqctl lists exchanges");
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
