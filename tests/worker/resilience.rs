//! Faults of the broker under a running worker: connection cut, queue deleted, exchange deleted.
//! Each test asserts that nothing was lost.

use std::time::Duration;

use lapin::{
    ExchangeKind,
    message::Delivery,
    options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeleteOptions,
    },
    types::{FieldTable, ShortString},
};
use secrecy::SecretString;

use crate::{helpers::*, proxy::*};

/// A test whose worker reaches the broker through a proxy, with 2 s heartbeats and a 5 s
/// shutdown timeout.
async fn app_behind_proxy() -> (TestApp, TcpProxy) {
    let mut app = TestApp::new().await;
    let proxy = TcpProxy::start(amqp_host_port(&app.amqp_url)).await;
    app.settings.broker.amqp_url = SecretString::from(amqp_url_via(&app.amqp_url, proxy.addr()));
    app.settings.broker.heartbeat_s = 2;
    app.settings.shutdown_timeout = Duration::from_secs(5);
    (app, proxy)
}

#[tokio::test]
async fn the_worker_reconnects_and_resumes_after_the_connection_is_cut() {
    let (mut app, proxy) = app_behind_proxy().await;
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-before")).await;
    let first = app.next_output().await;
    assert_eq!(body_json(&first)["provision_id"], 1);
    let first_id = first.properties.message_id().clone();

    proxy.cut();
    // Published while the worker is disconnected: it must not be lost.
    app.publish_json(&slim(2, "tok-during")).await;
    proxy.restore();
    let started = std::time::Instant::now();
    // The cut may have come before event 1's confirm or ack: then event 1 comes again, as the
    // same event, before or after the others.
    let out = next_other_than(&mut app, &first_id).await;
    assert_eq!(body_json(&out)["provision_id"], 2);
    assert_eq!(type_of(&out), "session.created");
    assert_eq!(
        app.requests("session-server").await.len(),
        2,
        "no credential used twice"
    );
    eprintln!(
        "resumed {} ms after the broker was reachable again",
        started.elapsed().as_millis()
    );
    assert!(app.worker_is_running(), "no process restart needed");
    app.publish_json(&slim(3, "tok-after")).await;
    let out = next_other_than(&mut app, &first_id).await;
    assert_eq!(body_json(&out)["provision_id"], 3);
    app.cleanup().await;
}

/// The next output that is not a duplicate of the event whose `message_id` is `duplicate`.
async fn next_other_than(app: &mut TestApp, duplicate: &Option<ShortString>) -> Delivery {
    loop {
        let out = app.next_output().await;
        if out.properties.message_id() != duplicate {
            return out;
        }
    }
}

#[tokio::test]
async fn a_half_open_connection_is_noticed_by_heartbeats_and_replaced() {
    let (mut app, proxy) = app_behind_proxy().await; // heartbeat 2 s
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-before-stall")).await;
    let first = app.next_output().await;
    assert_eq!(body_json(&first)["provision_id"], 1);
    let first_id = first.properties.message_id().clone();
    proxy.stall();
    app.publish_json(&slim(2, "tok-after-stall")).await;
    let out = next_other_than(&mut app, &first_id).await;
    assert_eq!(body_json(&out)["provision_id"], 2);
    assert_eq!(type_of(&out), "session.created");
    assert!(app.worker_is_running());
    // Release the frozen sockets and let the worker finish cleanly.
    proxy.cut();
    proxy.restore();
    app.cleanup().await;
}

#[tokio::test]
async fn a_delivery_in_flight_when_the_connection_dies_is_not_spent_twice() {
    let (mut app, proxy) = app_behind_proxy().await;
    app.settings.bunq.register_device = false;
    let mut slow = app.answer(200, &fixture("session-server.user-api-key.json"));
    slow.delay = Some(Duration::from_millis(1000));
    app.session_server().responds_with(slow).await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-in-flight")).await;
    app.wait_for_session_server_call().await;
    // bunq is answering; the channel the delivery came on dies now.
    proxy.cut();
    proxy.restore();
    let first = app.next_output().await;
    assert_eq!(type_of(&first), "session.created");
    let id = first.properties.message_id().as_ref().unwrap().to_string();
    let q = app.names.input_queue.clone();
    // The redelivered input is settled with the same event, not a second bunq call.
    eventually("the input is settled", || async {
        app.ready_count(&q).await == 0 && app.status.as_ref().unwrap().in_flight() == 0
    })
    .await;
    app.stop_worker().await.unwrap();
    assert_eq!(app.ready_count(&q).await, 0, "acked in the end");
    assert_eq!(
        app.requests("session-server").await.len(),
        1,
        "the credential was used once"
    );
    // Any duplicate carries the same message_id.
    while app.ready_count(&app.names.output_queue).await > 0 {
        let dup = app.next_output().await;
        assert_eq!(
            dup.properties.message_id().as_ref().unwrap().to_string(),
            id
        );
    }
    assert_eq!(app.ready_count(&app.names.dead_letter_queue).await, 0);
    app.cleanup().await;
}

/// The connection dies while many deliveries are being settled (publishing, confirming,
/// acking): every input still gets its one session, bunq is called once per credential, and
/// nothing waits for ever behind an ack the dead connection never answered.
#[tokio::test]
async fn a_connection_cut_while_deliveries_are_settled_loses_nothing_and_spends_nothing_twice() {
    let (mut app, proxy) = app_behind_proxy().await;
    app.settings.bunq.register_device = false;
    // Spread the answers so that settlements are under way when the cut comes.
    let mut answer = app.answer(200, &fixture("session-server.user-api-key.json"));
    answer.delay = Some(Duration::from_millis(20));
    app.session_server().responds_with(answer).await;
    app.start_worker().await;
    const N: i64 = 40;
    for i in 0..N {
        app.publish_json(&slim(i, &format!("tok-settling-{i}")))
            .await;
    }
    let first = app.next_output().await;
    proxy.cut();
    proxy.restore();
    let mut created = std::collections::BTreeSet::new();
    created.insert(body_json(&first)["provision_id"].as_i64().unwrap());
    while created.len() < N as usize {
        let out = app.next_output().await;
        assert_eq!(type_of(&out), "session.created", "{}", body_json(&out));
        created.insert(body_json(&out)["provision_id"].as_i64().unwrap());
    }
    let q = app.names.input_queue.clone();
    eventually("every input is settled", || async {
        app.ready_count(&q).await == 0 && app.status.as_ref().unwrap().in_flight() == 0
    })
    .await;
    assert_eq!(
        app.requests("session-server").await.len(),
        N as usize,
        "each credential was used once"
    );
    assert_eq!(app.ready_count(&app.names.dead_letter_queue).await, 0);
    app.cleanup().await;
}

#[tokio::test]
async fn a_deleted_input_queue_is_declared_again_and_consumed() {
    let mut app = TestApp::new().await;
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    app.channel
        .queue_delete(
            app.names.input_queue.as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    // The worker re-declares the queue and its binding; an event published then is consumed.
    let q = app.names.input_queue.clone();
    eventually("the queue is back with a consumer", || async {
        app.consumer_count(&q).await == 1
    })
    .await;
    app.publish_json(&slim(1, "tok-requeue")).await;
    assert_eq!(body_json(&app.next_output().await)["provision_id"], 1);
    assert!(app.worker_is_running());
    app.cleanup().await;
}

#[tokio::test]
async fn a_deleted_output_exchange_is_declared_again_and_nothing_is_lost() {
    let mut app = TestApp::new().await;
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    app.channel
        .exchange_delete(
            app.names.output_exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    app.publish_json(&slim(1, "tok-no-exchange")).await;
    app.wait_for_session_server_call().await;
    // The worker declares the exchange again; a consumer binds its queue again, and the held
    // session is delivered.
    let ex = app.names.output_exchange.clone();
    eventually("the exchange is back", || async {
        let ch = app.conn.create_channel().await.unwrap();
        let ok = ch
            .exchange_declare(
                ex.as_str().into(),
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
    })
    .await;
    app.channel
        .queue_bind(
            app.names.output_queue.as_str().into(),
            ex.as_str().into(),
            "session.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created");
    assert_eq!(app.requests("session-server").await.len(), 1);
    let q = app.names.input_queue.clone();
    eventually("the input is acked", || async {
        app.ready_count(&q).await == 0
    })
    .await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_subscription_that_keeps_failing_stops_the_worker() {
    let mut app = TestApp::new().await;
    app.start_worker().await;
    // Only once the worker has declared its topology and subscribed: its first declaration
    // would otherwise put the topic exchange back between the deletion and the replacement.
    let q = app.names.input_queue.clone();
    eventually("the worker consumes", || async {
        app.consumer_count(&q).await == 1
    })
    .await;
    // Someone replaces the input exchange with a direct one, then deletes the input queue:
    // every re-subscription now fails on the exchange's type.
    let ch = &app.channel;
    ch.exchange_delete(
        app.names.input_exchange.as_str().into(),
        lapin::options::ExchangeDeleteOptions::default(),
    )
    .await
    .unwrap();
    ch.exchange_declare(
        app.names.input_exchange.as_str().into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_delete(
        app.names.input_queue.as_str().into(),
        QueueDeleteOptions::default(),
    )
    .await
    .unwrap();
    eventually("the worker gives up", || async { !app.worker_is_running() }).await;
    let err = chain(&app.stop_worker().await.unwrap_err());
    assert!(err.contains("cannot subscribe after 5 attempts"), "{err}");
    assert!(err.contains("'type'"), "{err}");
    app.cleanup().await;
}

#[tokio::test]
async fn a_broker_that_never_answers_fails_start_up_in_bounded_time() {
    let (app, proxy) = app_behind_proxy().await;
    proxy.black_hole();
    let err = app.build_worker().await.unwrap_err();
    let err = chain(&err);
    assert!(err.contains("did not complete the AMQP handshake"), "{err}");
    proxy.restore();
    app.cleanup().await;
}

#[tokio::test]
async fn shutdown_is_bounded_while_the_broker_is_a_black_hole() {
    let (mut app, proxy) = app_behind_proxy().await; // heartbeat 2 s, shutdown timeout 5 s
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    app.publish_json(&slim(1, "tok-hole")).await;
    assert_eq!(body_json(&app.next_output().await)["provision_id"], 1);
    // The connection freezes and every reconnection attempt is swallowed.
    proxy.black_hole();
    proxy.stall();
    let status = app.status.clone().unwrap();
    eventually("the worker notices the dead connection", || async {
        !status.connected().await
    })
    .await;
    // SIGTERM now: the stop must not wait on the black hole.
    let t0 = std::time::Instant::now();
    app.stop_worker().await.unwrap();
    // SHUTDOWN_TIMEOUT_S (5 s) plus at most three 2 s close steps, not a connect attempt or
    // a heartbeat timeout more.
    assert!(
        t0.elapsed() < Duration::from_secs(12),
        "stopped {:?} after the signal",
        t0.elapsed()
    );
    proxy.cut();
    proxy.restore();
    app.cleanup().await;
}

/// `AMQP_URL` names two brokers (here two routes to the one broker, each through a proxy, as
/// two nodes of a cluster): the worker connects to the first that answers, and when the node it
/// is on goes away, reconnects to the other by itself; nothing is lost on the way.
#[tokio::test]
async fn with_two_broker_nodes_the_worker_moves_to_the_other_when_its_node_goes() {
    let mut app = TestApp::new().await;
    let first = TcpProxy::start(amqp_host_port(&app.amqp_url)).await;
    let second = TcpProxy::start(amqp_host_port(&app.amqp_url)).await;
    // The first node is down when the worker starts.
    first.cut();
    app.settings.broker.amqp_url = SecretString::from(format!(
        "{},{}",
        amqp_url_via(&app.amqp_url, first.addr()),
        amqp_url_via(&app.amqp_url, second.addr())
    ));
    app.settings.broker.heartbeat_s = 2;
    app.bunq_opens_every_session().await;
    app.start_worker().await;
    assert!(second.accepted() > 0, "it connected to the second node");
    app.publish_json(&slim(1, "tok-node-two")).await;
    assert_eq!(body_json(&app.next_output().await)["provision_id"], 1);
    // The first node comes back and the second goes away: the worker moves to the first.
    first.restore();
    let before = first.accepted();
    second.cut();
    app.publish_json(&slim(2, "tok-node-one")).await;
    let out = loop {
        let out = app.next_output().await;
        if body_json(&out)["provision_id"] == 2 {
            break out;
        }
    };
    assert_eq!(type_of(&out), "session.created");
    assert!(
        first.accepted() > before,
        "it reconnected through the first node"
    );
    assert!(app.worker_is_running(), "no process restart needed");
    app.cleanup().await;
}
