//! The harness itself: a test that dies before `cleanup` leaves nothing on the broker.

use std::time::Duration;

use bunq_session_worker::config::DelayTiers;
use lapin::{
    ExchangeKind, options::ExchangeDeclareOptions, options::QueueDeclareOptions, types::FieldTable,
};

use crate::helpers::*;

#[tokio::test]
async fn a_test_that_panics_before_cleanup_leaves_no_queue_or_exchange() {
    let mut app = TestApp::new().await;
    app.settings.topology.delayed_retry_delays = DelayTiers(vec![Duration::from_secs(1)]);
    app.start_worker().await;
    let n = app.names.clone();
    let delay_queue = format!("{}.retry-1s", n.input_queue);
    let queues = [
        n.input_queue.clone(),
        n.dead_letter_queue.clone(),
        n.output_queue.clone(),
        delay_queue,
        format!("{}.wait", n.input_queue),
    ];
    let exchanges = [
        n.input_exchange.clone(),
        n.output_exchange.clone(),
        n.dead_letter_exchange.clone(),
    ];
    let conn = connect().await;
    for q in &queues {
        assert!(queue_exists(&conn, q).await, "the worker declared {q}");
    }
    // Stopped first, so it cannot declare its queues again after they are deleted (a test
    // that panics takes its runtime, and so its worker, down with it).
    app.stop_worker().await.unwrap();
    // The test fails: the panic drops the app without `cleanup`.
    let failing = tokio::spawn(async move {
        let _app = app;
        panic!("a failing test");
    });
    assert!(failing.await.unwrap_err().is_panic());
    for q in &queues {
        assert!(!queue_exists(&conn, q).await, "{q} is left behind");
    }
    for e in &exchanges {
        assert!(!exchange_exists(&conn, e).await, "{e} is left behind");
    }
    let _ = conn.close(200, "".into()).await;
}

/// A passive declare on a channel of its own (a failed one closes its channel).
async fn queue_exists(conn: &lapin::Connection, queue: &str) -> bool {
    let ch = conn.create_channel().await.unwrap();
    let ok = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = ch.close(200, "".into()).await;
    ok
}

async fn exchange_exists(conn: &lapin::Connection, exchange: &str) -> bool {
    let ch = conn.create_channel().await.unwrap();
    let ok = ch
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = ch.close(200, "".into()).await;
    ok
}
