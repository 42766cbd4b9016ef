//! Observing without consuming. A tap is a queue of the test's own, bound to an exchange and
//! never consumed, so its ready count is everything routed there so far (an observer consumer,
//! as `next_output` and `next_dead_letter` open, holds what it was given as unacked, so a
//! queue it consumes cannot prove that nothing more arrived). `take_all` reads a queue's
//! messages with `basic.get`.

use lapin::{
    ExchangeKind,
    message::Delivery,
    options::{BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};

use crate::helpers::*;

/// Declares a queue bound to `exchange` (declared here too, as the worker declares it: a
/// durable topic exchange) with `binding`, deleted with the test's other queues. Returns its
/// name.
pub async fn tap(app: &mut TestApp, exchange: &str, binding: &str) -> String {
    let name = format!(
        "{}.tap-{}",
        app.names.input_queue,
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    app.channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    app.channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            observer_queue_args(),
        )
        .await
        .unwrap();
    app.channel
        .queue_bind(
            name.as_str().into(),
            exchange.into(),
            binding.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    app.extra_queues.push(name.clone());
    name
}

/// A tap on the output exchange (`session.#`).
pub async fn tap_outputs(app: &mut TestApp) -> String {
    let exchange = app.names.output_exchange.clone();
    tap(app, &exchange, "session.#").await
}

/// A tap on the dead-letter exchange (`#`).
pub async fn tap_dead_letters(app: &mut TestApp) -> String {
    let exchange = app.names.dead_letter_exchange.clone();
    tap(app, &exchange, "#").await
}

/// Takes (and acks) every message ready in `queue`, in order.
pub async fn take_all(app: &TestApp, queue: &str) -> Vec<Delivery> {
    let ch = app.conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        out.push(m.delivery);
    }
    let _ = ch.close(200, "".into()).await;
    out
}

/// The `secret` of every request the fake bunq received on `path`.
pub async fn secrets_sent(app: &TestApp, path: &str) -> Vec<String> {
    app.requests(path)
        .await
        .iter()
        .map(|r| {
            r.body_json::<serde_json::Value>().unwrap()["secret"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// Every header of a delivery as `name=value` lines (strings as text), for "no secret in
/// here" checks.
pub fn headers_text(d: &Delivery) -> String {
    let Some(h) = d.properties.headers() else {
        return String::new();
    };
    h.inner()
        .keys()
        .map(|k| format!("{k}={}\n", header(d, k.as_str()).unwrap_or_default()))
        .collect()
}
