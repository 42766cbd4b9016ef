//! Broker flow control: a memory alarm blocks publishing (`connection.blocked`); the worker waits,
//! shows it, loses nothing, and finishes once the alarm clears.
//!
//! The alarm is broker-wide, so this is a test binary of its own: cargo runs test binaries one
//! after the other, so no other test is publishing meanwhile. It drives the alarm with
//! `rabbitmqctl`: in the tests' broker container (through the engine), or the machine's own for
//! the broker on this machine; it is skipped, saying so, for a broker elsewhere.

#[allow(dead_code)]
#[path = "../worker/helpers/mod.rs"]
mod helpers;

use std::time::Duration;

use helpers::*;

/// Sets the memory high watermark; restores RabbitMQ's default (0.4) when dropped, even if the
/// test fails, so later tests are not blocked.
struct MemoryAlarm(Rabbitmqctl);

impl MemoryAlarm {
    fn raise(ctl: Rabbitmqctl) -> Self {
        if let Err(e) = ctl.run(&["set_vm_memory_high_watermark", "0"]) {
            panic!("rabbitmqctl set_vm_memory_high_watermark 0 ({ctl:?}): {e}");
        }
        MemoryAlarm(ctl)
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        // Not a panic: this may run while the test unwinds.
        if let Err(e) = self.0.run(&["set_vm_memory_high_watermark", "0.4"]) {
            eprintln!(
                "could not clear the memory alarm ({:?}): {e}; later tests may be blocked",
                self.0
            );
        }
    }
}

#[tokio::test]
async fn a_memory_alarm_makes_publishing_wait_and_nothing_is_lost() {
    let Some(ctl) = rabbitmqctl().await else {
        // Loud, not silent: this test cannot drive an alarm on a broker elsewhere.
        eprintln!(
            "SKIPPED flow-control test: rabbitmqctl does not reach the broker under test (not on this machine, nor in the tests' container)"
        );
        return;
    };
    let mut app = TestApp::new().await;
    app.settings.broker.publish_confirm_timeout = Duration::from_millis(500);
    app.settings.bunq.http_timeout = Duration::from_secs(10);
    let mut slow = app.answer(200, &fixture("session-server.user-person.json"));
    // Long enough for rabbitmqctl (about a second) to raise the alarm before the publish.
    slow.delay = Some(Duration::from_millis(3000));
    app.session_server().responds_with(slow).await;
    app.bunq_registers_every_device().await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-alarm")).await;
    app.wait_for_session_server_call().await;

    let alarm = MemoryAlarm::raise(ctl);
    let status = app.status.clone().unwrap();
    eventually("the worker sees publishing blocked", || async {
        status.publishing_blocked()
    })
    .await;
    assert_eq!(
        app.ready_count(&app.names.output_queue).await,
        0,
        "nothing published while blocked"
    );
    assert!(app.worker_is_running());
    drop(alarm);

    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created");
    eventually("publishing unblocked", || async {
        !status.publishing_blocked()
    })
    .await;
    let q = app.names.input_queue.clone();
    eventually("the input is acked", || async {
        app.ready_count(&q).await == 0
    })
    .await;
    assert_eq!(app.requests("session-server").await.len(), 1);
    app.cleanup().await;
}
