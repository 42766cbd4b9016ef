//! Sample "provision ready" events, one of each kind, and what the worker should make of each;
//! published by `demo` and by `samples` (the compose one-shot service).

use std::{collections::HashMap, time::Duration};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable},
};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::events::rfc3339;

/// What the worker should make of a sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// `session.created`.
    Created,
    /// Acked without any event.
    Skipped,
    /// `session.failed` and a dead letter, both with this reason.
    Failed(&'static str),
    /// Only a dead letter with this reason (the input names no provision).
    DeadLetter(&'static str),
}

/// One sample event.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Short name, also the input's `message_id` suffix.
    pub name: &'static str,
    /// The body.
    pub body: Vec<u8>,
    /// The expected outcome.
    pub expect: Expect,
}

/// The six samples: a slim event, bunq's `PartnerUserProvision`, bunq's callback body, a
/// provision that is not ready, a credential bunq (the emulator) rejects, and a body that is not
/// JSON. Tokens are fresh each run (a credential opens one session) and expire in an hour.
pub fn samples() -> Vec<Sample> {
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let expiry = rfc3339(OffsetDateTime::now_utc() + time::Duration::hours(1));
    let credential = |id: i64, token: String| json!({"id": id, "status": "PENDING_FIRST_USE", "expiry_time": expiry, "token_value": token});
    let provision = |id: i64, token: String| {
        json!({"id": id, "external_uuid": format!("demo-{run}-{id}"), "status": "CREATED",
            "sub_status": "PENDING_PROCESS_USER_ONBOARDING", "credential": credential(id + 1000, token)})
    };
    let body = |v: Value| v.to_string().into_bytes();
    vec![
        Sample {
            name: "slim event",
            body: body(
                json!({"provision_id": 1, "token_value": format!("sandbox_demo_{run}_1"),
                "credential_id": 1001, "expiry_time": expiry}),
            ),
            expect: Expect::Created,
        },
        Sample {
            name: "PartnerUserProvision",
            body: body(
                json!({"PartnerUserProvision": provision(2, format!("sandbox_demo_{run}_2"))}),
            ),
            expect: Expect::Created,
        },
        Sample {
            name: "callback body",
            body: body(
                json!({"NotificationUrl": {"category": "PARTNER_USER_PROVISION",
                "event_type": "PARTNER_USER_PROVISION_PROCESS_UPDATED",
                "object": {"PartnerUserProvision": provision(3, format!("sandbox_demo_{run}_3"))}}}),
            ),
            expect: Expect::Created,
        },
        Sample {
            name: "not ready",
            body: body(
                json!({"PartnerUserProvision": {"id": 4, "status": "CREATED",
                "sub_status": "PENDING_PROCESS_RELATION_USER", "credential": null}}),
            ),
            expect: Expect::Skipped,
        },
        Sample {
            name: "rejected credential",
            body: body(
                json!({"provision_id": 5, "token_value": format!("reject_demo_{run}_5"),
                "expiry_time": expiry}),
            ),
            expect: Expect::Failed("credential_rejected"),
        },
        Sample {
            name: "malformed",
            body: b"{\"provision_id\": 6, \"token_value\": ".to_vec(),
            expect: Expect::DeadLetter("malformed_json"),
        },
    ]
}

/// The `message_id` a sample is published with; output events carry it as `correlation_id`
/// and dead letters keep it.
pub fn message_id(run: &str, sample: &Sample) -> String {
    format!("{run}:{}", sample.name)
}

/// Publishes every sample to `exchange` with `routing_key`, each confirmed.
///
/// # Errors
/// The broker's error, or a text when a sample was unroutable (no queue bound yet).
pub async fn publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    run: &str,
    samples: &[Sample],
) -> Result<(), String> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    for s in samples {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(message_id(run, s).as_str().into());
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &s.body,
                props,
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        if confirm.take_message().is_some() {
            return Err(format!(
                "the sample was unroutable: no queue is bound to exchange '{exchange}' with routing key '{routing_key}' (is the worker running?)"
            ));
        }
    }
    Ok(())
}

/// What arrived for one sample.
#[derive(Debug, Default)]
pub struct Seen {
    /// The output event's type and body.
    pub event: Option<(String, Value)>,
    /// The dead letter's `x-error-reason`.
    pub dead_letter: Option<String>,
}

impl Seen {
    /// Whether this is all `expect` needs (a skip is never "complete": it is the absence of
    /// events).
    pub fn complete(&self, expect: Expect) -> bool {
        match expect {
            Expect::Created | Expect::Skipped => self.event.is_some(),
            Expect::Failed(_) => self.event.is_some() && self.dead_letter.is_some(),
            Expect::DeadLetter(_) => self.dead_letter.is_some(),
        }
    }

    /// Whether what arrived is what `expect` says.
    pub fn matches(&self, expect: Expect) -> bool {
        let event_type = self.event.as_ref().map(|(t, _)| t.as_str());
        let event_reason = self
            .event
            .as_ref()
            .and_then(|(_, b)| b["reason"].as_str().map(str::to_owned));
        match expect {
            Expect::Created => event_type == Some("session.created") && self.dead_letter.is_none(),
            Expect::Skipped => self.event.is_none() && self.dead_letter.is_none(),
            Expect::Failed(r) => {
                event_type == Some("session.failed")
                    && event_reason.as_deref() == Some(r)
                    && self.dead_letter.as_deref() == Some(r)
            }
            Expect::DeadLetter(r) => self.event.is_none() && self.dead_letter.as_deref() == Some(r),
        }
    }

    /// One line describing what arrived, the session token masked.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some((kind, body)) = &self.event {
            let detail = match kind.as_str() {
                "session.created" => match body["session_token_jwe"].as_str() {
                    Some(jwe) => format!(
                        "session_id={} user_id={} session_token_jwe={} (sealed)",
                        body["session_id"],
                        body["user_id"],
                        mask(jwe)
                    ),
                    None => format!(
                        "session_id={} user_id={} session_token={}",
                        body["session_id"],
                        body["user_id"],
                        mask(body["session_token"].as_str().unwrap_or(""))
                    ),
                },
                _ => format!("reason={}", body["reason"].as_str().unwrap_or("?")),
            };
            parts.push(format!("{kind} {detail}"));
        }
        if let Some(reason) = &self.dead_letter {
            parts.push(format!("dead letter x-error-reason={reason}"));
        }
        if parts.is_empty() {
            "acked, nothing published (skipped)".into()
        } else {
            parts.join("; ")
        }
    }
}

/// The first 4 characters of a token, then `…`.
pub fn mask(token: &str) -> String {
    format!("{}…", token.chars().take(4).collect::<String>())
}

/// Consumes `queue` (acking) until `wanted` says every sample is complete or `deadline` passes,
/// recording output events and dead letters by sample `message_id` / `correlation_id`.
/// `on_arrival(message_id)` is called after each recorded message.
pub async fn observe(
    channel: &Channel,
    queues: &[&str],
    seen: &mut HashMap<String, Seen>,
    deadline: Duration,
    mut done: impl FnMut(&HashMap<String, Seen>) -> bool,
    mut on_arrival: impl FnMut(&str, &HashMap<String, Seen>),
) -> Result<(), String> {
    let mut streams = Vec::new();
    for q in queues {
        let consumer = channel
            .basic_consume(
                (*q).into(),
                format!("demo-observer-{}", uuid::Uuid::new_v4().simple())
                    .as_str()
                    .into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("cannot consume from '{q}': {e}"))?;
        streams.push(consumer);
    }
    let mut merged = futures_util::stream::select_all(streams);
    let end = tokio::time::Instant::now() + deadline;
    while !done(seen) {
        let next = tokio::time::timeout_at(end, merged.next()).await;
        let Ok(Some(Ok(delivery))) = next else {
            return Ok(());
        };
        let _ = delivery.ack(BasicAckOptions::default()).await;
        if let Some(id) = record(&delivery, seen) {
            on_arrival(&id, seen);
        }
    }
    Ok(())
}

fn record(d: &Delivery, seen: &mut HashMap<String, Seen>) -> Option<String> {
    let p = &d.properties;
    if let Some(reason) = header(p, "x-error-reason") {
        let id = p.message_id().as_ref()?.to_string();
        seen.entry(id.clone()).or_default().dead_letter = Some(reason);
        return Some(id);
    }
    let id = p.correlation_id().as_ref()?.to_string();
    let kind = p.kind().as_ref()?.to_string();
    let body = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
    seen.entry(id.clone()).or_default().event = Some((kind, body));
    Some(id)
}

fn header(p: &BasicProperties, name: &str) -> Option<String> {
    match p.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}
