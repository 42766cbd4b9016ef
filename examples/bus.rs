//! A small companion for trying the worker by hand (not part of the service).
//!
//! ```text
//! cargo run --example bus -- publish tests/fixtures/provision-ready.slim.json
//! cargo run --example bus -- watch          # prints session.created / session.failed
//! cargo run --example bus -- dead-letters   # lists the dead-letter queue (messages stay there,
//!                                           # moved to its end; bodies are not printed)
//! ```
//! Uses `AMQP_URL` and the default exchange and queue names (or `INPUT_EXCHANGE`,
//! `INPUT_ROUTING_KEY`, `OUTPUT_EXCHANGE`, `DEAD_LETTER_QUEUE`).

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Connection, ConnectionProperties, ExchangeKind,
    options::*,
    types::{AMQPValue, FieldTable},
};

fn redact(url: &str) -> String {
    bunq_session_worker::broker::link::redact_url_password(url)
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // In words, with the causes, not Rust's Debug form.
            let mut text = e.to_string();
            let mut source = e.source();
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("bus: {text}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .map_err(|e| {
            format!(
                "cannot connect to RabbitMQ at AMQP_URL ({}): {e}",
                redact(&url)
            )
        })?;
    let ch = conn.create_channel().await?;
    match args.first().map(String::as_str) {
        Some("publish") => {
            let path = args.get(1).ok_or("usage: bus publish FILE")?;
            let body = std::fs::read(path)?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            let exchange = env("INPUT_EXCHANGE", "bunq.provisioning");
            let key = env("INPUT_ROUTING_KEY", "provision.ready");
            let confirm = ch
                .basic_publish(
                    exchange.as_str().into(),
                    key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &body,
                    BasicProperties::default()
                        .with_content_type("application/json".into())
                        .with_delivery_mode(2)
                        .with_message_id(uuid::Uuid::new_v4().to_string().as_str().into()),
                )
                .await?
                .await?;
            if confirm.take_message().is_some() {
                return Err(format!("unroutable: is the worker's queue bound to '{exchange}' with '{key}'? Start the worker once first.").into());
            }
            println!(
                "published {} bytes to {exchange} with routing key {key}",
                body.len()
            );
        }
        Some("watch") => {
            let exchange = env("OUTPUT_EXCHANGE", "bunq.sessions");
            ch.exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
            let q = ch
                .queue_declare(
                    "".into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            ch.queue_bind(
                q.name().clone(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
            println!("watching {exchange} (Ctrl-C to stop)");
            let mut c = ch
                .basic_consume(
                    q.name().clone(),
                    "bus-watch".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            while let Some(d) = c.next().await {
                let d = d?;
                println!(
                    "{} message_id={} {}",
                    d.routing_key,
                    d.properties
                        .message_id()
                        .as_ref()
                        .map(|m| m.as_str())
                        .unwrap_or("-"),
                    masked(&d.data)
                );
            }
        }
        Some("dead-letters") => {
            let queue = env(
                "DEAD_LETTER_QUEUE",
                "bunq-session-worker.provision-ready.dead-letter",
            );
            // Browse without harm: a nack with requeue counts toward a quorum queue's delivery
            // limit (RabbitMQ 4 drops or dead-letters past it), so each message is put back as
            // a confirmed copy at the end of the queue, then the original is acked. Bodies are
            // not printed: they may hold a credential.
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            let mut left: Option<u32> = None;
            while left != Some(0) {
                let Some(m) = ch
                    .basic_get(queue.as_str().into(), BasicGetOptions::default())
                    .await?
                else {
                    break;
                };
                left = Some(left.unwrap_or(m.message_count + 1) - 1);
                let d = &m.delivery;
                let h = d.properties.headers().clone().unwrap_or_default();
                let get = |k: &str| match h.inner().get(k) {
                    Some(AMQPValue::LongString(s)) => {
                        String::from_utf8_lossy(s.as_bytes()).into_owned()
                    }
                    Some(AMQPValue::LongLongInt(i)) => i.to_string(),
                    Some(v) => format!("{v:?}"),
                    None => "-".into(),
                };
                println!(
                    "reason={} attempts={} failed_at={} body_bytes={} detail={:?}",
                    get("x-error-reason"),
                    get("x-attempts"),
                    get("x-failed-at"),
                    d.data.len(),
                    get("x-error-detail"),
                );
                let mut headers = FieldTable::default();
                for (k, v) in h.inner() {
                    if k.as_str() != "x-delivery-count" {
                        headers.insert(k.clone(), v.clone());
                    }
                }
                let copy = d.properties.clone().with_headers(headers);
                let confirm = ch
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &d.data,
                        copy,
                    )
                    .await?
                    .await?;
                if confirm.is_nack() || confirm.take_message().is_some() {
                    return Err("the broker did not take the copy back; the original stays unacked and returns to the queue".into());
                }
                ch.basic_ack(d.delivery_tag, BasicAckOptions::default())
                    .await?;
            }
            if left.is_none() {
                println!("{queue} is empty");
            }
        }
        _ => return Err("usage: bus publish FILE | bus watch | bus dead-letters".into()),
    }
    let _ = conn.close(200, "bye".into()).await;
    Ok(())
}

/// The event's body for a terminal: a session token (in clear or sealed) shows its first 4
/// characters only, as the demo shows it; a terminal's scrollback is no place for a bearer
/// secret. A body that is not JSON is shown as it is.
fn masked(body: &[u8]) -> String {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return String::from_utf8_lossy(body).into_owned();
    };
    for field in ["session_token", "session_token_jwe"] {
        if let Some(t) = v.get(field).and_then(|t| t.as_str()) {
            let shown = format!("{}…", t.chars().take(4).collect::<String>());
            v[field] = serde_json::Value::String(shown);
        }
    }
    v.to_string()
}
