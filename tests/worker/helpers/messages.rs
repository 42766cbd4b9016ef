//! What goes in and what comes out: publishing input events, reading the worker's outputs and
//! dead letters, and reading a delivery's type, headers and body.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Consumer,
    message::Delivery,
    options::*,
    types::{AMQPValue, FieldTable},
};
use serde_json::{Value, json};

use super::{TestApp, WAIT};

impl TestApp {
    pub async fn publish(&self, body: &[u8], props: BasicProperties) {
        self.publish_to("provision.ready", body, props).await
    }

    pub async fn publish_to(&self, routing_key: &str, body: &[u8], props: BasicProperties) {
        let c = self
            .channel
            .basic_publish(
                self.names.input_exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(c.take_message().is_none(), "input publish was unroutable");
    }

    pub async fn publish_json(&self, v: &Value) {
        self.publish(v.to_string().as_bytes(), BasicProperties::default())
            .await
    }

    async fn next_from(consumer: &mut Consumer, what: &str) -> Delivery {
        let d = tokio::time::timeout(WAIT, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("consumer open")
            .expect("delivery");
        d.ack(BasicAckOptions::default()).await.unwrap();
        d
    }

    async fn consumer(&self, queue: &str) -> Consumer {
        let ch = self.conn.create_channel().await.unwrap();
        ch.basic_consume(
            queue.into(),
            format!("observer-{}", uuid::Uuid::new_v4()).as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap()
    }

    /// The next message on the output exchange (session.created or session.failed).
    pub async fn next_output(&mut self) -> Delivery {
        if self.outputs.is_none() {
            self.outputs = Some(self.consumer(&self.names.output_queue.clone()).await);
        }
        Self::next_from(self.outputs.as_mut().unwrap(), "an output event").await
    }

    /// The next message on the output exchange if one comes within `within` (for a bounded look
    /// that nothing more is published).
    pub async fn next_output_within(&mut self, within: Duration) -> Option<Delivery> {
        if self.outputs.is_none() {
            self.outputs = Some(self.consumer(&self.names.output_queue.clone()).await);
        }
        let d = tokio::time::timeout(within, self.outputs.as_mut().unwrap().next())
            .await
            .ok()??
            .ok()?;
        d.ack(BasicAckOptions::default()).await.unwrap();
        Some(d)
    }

    /// The next message in the dead-letter queue.
    pub async fn next_dead_letter(&mut self) -> Delivery {
        if self.dead_letters.is_none() {
            self.dead_letters = Some(self.consumer(&self.names.dead_letter_queue.clone()).await);
        }
        Self::next_from(self.dead_letters.as_mut().unwrap(), "a dead letter").await
    }
}

/// A header of a delivery as text (long or short string), or an integer's decimal form.
pub fn header(d: &Delivery, name: &str) -> Option<String> {
    let v = d.properties.headers().as_ref()?.inner().get(name)?.clone();
    Some(match v {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).unwrap(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::LongLongInt(i) => i.to_string(),
        AMQPValue::LongInt(i) => i.to_string(),
        other => format!("{other:?}"),
    })
}

pub fn body_json(d: &Delivery) -> Value {
    serde_json::from_slice(&d.data).expect("output body is JSON")
}

/// A slim event with a fresh token, expiring in an hour.
pub fn slim(provision_id: i64, token: &str) -> Value {
    let expiry = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    json!({
        "provision_id": provision_id,
        "token_value": token,
        "credential_id": provision_id + 1000,
        "external_uuid": format!("ext-{provision_id}"),
        "expiry_time": expiry.format(&time::format_description::well_known::Rfc3339).unwrap(),
    })
}

pub fn type_of(d: &Delivery) -> String {
    d.properties
        .kind()
        .as_ref()
        .map(|k| k.to_string())
        .unwrap_or_default()
}
