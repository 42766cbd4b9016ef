//! The broker under test: connecting to it (where it is: [`super::container`]), the queues a
//! test declares and reads, and deleting a test's queues and exchanges afterwards.

use std::time::Duration;

use lapin::{
    Channel, Connection, ConnectionProperties, ExchangeKind,
    options::*,
    types::{AMQPValue, FieldTable},
};

use super::{Names, TestApp, amqp_url};

/// `x-expires` of the queues a test declares itself (observer queues): the broker deletes them
/// this long after their last consumer is gone, even when the test died before `cleanup`.
pub const OBSERVER_QUEUE_EXPIRES_MS: i32 = 60_000;

/// How long the drop guard of a test that did not reach `cleanup` may spend deleting its broker
/// objects (connecting included), so a dead broker cannot hang the test.
const LEFTOVER_DELETE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the broker or fails the test with a message that says what to do.
pub async fn connect() -> Connection {
    let url = amqp_url().await;
    match tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!(
            "cannot connect to RabbitMQ at AMQP_URL ({url}): {e}. Start it (e.g. `rabbitmq-server -detached`) or set AMQP_URL."
        ),
        Err(_) => panic!("connecting to RabbitMQ at AMQP_URL ({url}) timed out"),
    }
}

/// Arguments of a queue a test declares for itself: it expires when unused, so it goes away
/// even when the test dies before `cleanup`.
pub fn observer_queue_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-expires".into(),
        AMQPValue::LongInt(OBSERVER_QUEUE_EXPIRES_MS),
    );
    args
}

/// Declares the output exchange and the observer queue, bound to it with `output_binding`
/// (None: no binding).
pub(super) async fn declare_observer(
    channel: &Channel,
    names: &Names,
    output_binding: Option<&str>,
) {
    channel
        .exchange_declare(
            names.output_exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_declare(
            names.output_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            observer_queue_args(),
        )
        .await
        .unwrap();
    if let Some(b) = output_binding {
        channel
            .queue_bind(
                names.output_queue.as_str().into(),
                names.output_exchange.as_str().into(),
                b.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
}

impl TestApp {
    /// Declares `queue` as a durable classic queue with these extra string arguments: an
    /// operator's queue that conflicts with what the worker declares.
    pub async fn declare_classic_queue(&self, queue: &str, extra: &[(&str, &str)]) {
        let mut args = FieldTable::default();
        for (k, v) in [("x-queue-type", "classic")].iter().chain(extra) {
            args.insert(
                (*k).into(),
                AMQPValue::LongString(v.as_bytes().to_vec().into()),
            );
        }
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .unwrap();
    }

    /// A passive `queue.declare` on a channel of its own: the queue's state, or None when it
    /// does not exist (a failed passive declare closes its channel).
    async fn inspect_queue(&self, queue: &str) -> Option<lapin::Queue> {
        let ch = self.conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .ok();
        let _ = ch.close(200, "".into()).await;
        q
    }

    /// Consumers on a queue (0 when it does not exist).
    pub async fn consumer_count(&self, queue: &str) -> u32 {
        self.inspect_queue(queue)
            .await
            .map_or(0, |q| q.consumer_count())
    }

    /// Whether a queue exists.
    pub async fn queue_exists(&self, queue: &str) -> bool {
        self.inspect_queue(queue).await.is_some()
    }

    /// Ready-message count of a queue (unacked messages are not counted).
    pub async fn ready_count(&self, queue: &str) -> u32 {
        self.inspect_queue(queue)
            .await
            .unwrap_or_else(|| panic!("queue {queue} exists"))
            .message_count()
    }

    /// This test's queues: the worker's input, dead-letter, delay and window queues, the
    /// observer queue and `extra_queues`.
    pub(super) fn queues(&self) -> Vec<String> {
        let n = &self.names;
        let topology = self.settings.topology.topology();
        let mut queues = vec![
            n.input_queue.clone(),
            n.dead_letter_queue.clone(),
            n.output_queue.clone(),
        ];
        queues.extend(
            topology
                .delay_tiers
                .iter()
                .map(|d| topology.delay_queue_name(*d)),
        );
        queues.push(topology.window_queue_name());
        queues.extend(self.extra_queues.iter().cloned());
        queues.sort();
        queues.dedup();
        queues
    }

    /// This test's exchanges: input, output and dead-letter.
    pub(super) fn exchanges(&self) -> Vec<String> {
        let n = &self.names;
        vec![
            n.input_exchange.clone(),
            n.output_exchange.clone(),
            n.dead_letter_exchange.clone(),
        ]
    }
}

/// Deletes the broker objects of a test that did not reach `cleanup`, on a thread of its own
/// with its own runtime and connection (the test's runtime may be unwinding), bounded by
/// `LEFTOVER_DELETE_TIMEOUT`; returns when it is done.
pub(super) fn delete_leftovers(url: String, queues: Vec<String>, exchanges: Vec<String>) {
    let deleter = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        let deleted = rt.block_on(async {
            tokio::time::timeout(LEFTOVER_DELETE_TIMEOUT, async {
                let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
                delete_broker_objects(&conn, &queues, &exchanges).await;
                let _ = conn.close(200, "".into()).await;
                Ok::<_, lapin::Error>(())
            })
            .await
        });
        match deleted {
            Ok(Ok(())) => eprintln!(
                "test ended without cleanup: deleted its queues {queues:?} and exchanges {exchanges:?}"
            ),
            Ok(Err(e)) => {
                eprintln!("test ended without cleanup; deleting its broker objects failed: {e}")
            }
            Err(_) => eprintln!(
                "test ended without cleanup; deleting its broker objects timed out after {LEFTOVER_DELETE_TIMEOUT:?}"
            ),
        }
        rt.shutdown_timeout(Duration::from_secs(1));
    });
    let _ = deleter.join();
}

/// Deletes `queues` and `exchanges`, ignoring what is already gone; a failure closes its channel,
/// so the next deletion gets a new one.
pub(super) async fn delete_broker_objects(
    conn: &Connection,
    queues: &[String],
    exchanges: &[String],
) {
    let mut ch: Option<Channel> = None;
    for q in queues {
        let Some(c) = channel_of(conn, &mut ch).await else {
            return;
        };
        if c.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .is_err()
        {
            ch = None;
        }
    }
    for e in exchanges {
        let Some(c) = channel_of(conn, &mut ch).await else {
            return;
        };
        if c.exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .is_err()
        {
            ch = None;
        }
    }
}

/// The open channel in `slot`, or a new one.
async fn channel_of<'a>(conn: &Connection, slot: &'a mut Option<Channel>) -> Option<&'a Channel> {
    if slot.is_none() {
        *slot = Some(conn.create_channel().await.ok()?);
    }
    slot.as_ref()
}
