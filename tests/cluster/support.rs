//! The cluster test's tools: the cluster (`rabbitmqctl` on its nodes, `.ci/cluster start`, its
//! sentinels), connecting to any node, and the flow's progress (when each session was opened).

use std::{
    process::Command,
    time::{Duration, Instant},
};

use bunq_session_worker::tools::emulator;
use lapin::{
    Channel, Connection, ConnectionProperties, options::*, types::AMQPValue, types::FieldTable,
};
use tokio_util::sync::CancellationToken;

pub fn cluster_dir() -> String {
    std::env::var("CLUSTER_DIR")
        .unwrap_or_else(|_| format!("{}/target/cluster", env!("CARGO_MANIFEST_DIR")))
}

/// `rabbitmqctl -n rc<node>@localhost ARGS` with the cluster's cookie; its output.
pub fn ctl(node: &str, args: &[&str]) -> String {
    let out = Command::new("/usr/lib/rabbitmq/bin/rabbitmqctl")
        .env("HOME", cluster_dir())
        .args(["-n", &format!("rc{node}@localhost")])
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl -n rc{node}@localhost {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `.ci/cluster start`: brings back whatever was stopped or killed.
pub fn cluster_start() {
    let start = Command::new(format!("{}/.ci/cluster", env!("CARGO_MANIFEST_DIR")))
        .arg("start")
        .env("CLUSTER_DIR", cluster_dir())
        .output()
        .unwrap();
    assert!(
        start.status.success(),
        "{}",
        String::from_utf8_lossy(&start.stderr)
    );
}

/// A command to the first of `sentinels` that answers.
pub async fn sentinel<T: redis::FromRedisValue>(sentinels: &[String], cmd: &redis::Cmd) -> T {
    for s in sentinels {
        let Ok(client) = redis::Client::open(format!("redis://{s}")) else {
            continue;
        };
        if let Ok(mut c) = client.get_multiplexed_async_connection().await
            && let Ok(v) = cmd.query_async(&mut c).await
        {
            return v;
        }
    }
    panic!("no sentinel answers {cmd:?}")
}

/// The port of the Redis primary the sentinels name.
pub async fn redis_primary(sentinels: &[String], master: &str) -> u16 {
    let addr: Vec<String> = sentinel(
        sentinels,
        redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(master),
    )
    .await;
    addr[1].parse().unwrap()
}

/// Every moment a session was opened, sampled every 20 ms from the emulator's count.
#[derive(Clone, Default)]
pub struct Progress(std::sync::Arc<std::sync::Mutex<Vec<Instant>>>);

impl Progress {
    pub fn watch(&self, emu: std::sync::Arc<emulator::Emulator>, stop: CancellationToken) {
        let times = self.0.clone();
        tokio::spawn(async move {
            let mut seen = 0;
            while !stop.is_cancelled() {
                let now = emu.sessions_opened();
                if now > seen {
                    let t = Instant::now();
                    times.lock().unwrap().extend((seen..now).map(|_| t));
                    seen = now;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }

    /// The longest time without a session among the gaps that overlap `from..to`.
    pub fn pause(&self, from: Instant, to: Instant) -> Duration {
        let times = self.0.lock().unwrap();
        times
            .windows(2)
            .filter(|w| w[1] >= from && w[0] <= to)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }

    pub fn after(&self, t: Instant) -> usize {
        self.0.lock().unwrap().iter().filter(|&&x| x > t).count()
    }

    /// Waits (up to 60 s) until 10 sessions were opened after `t`: the flow is back, and the
    /// next disruption's pause is its own.
    pub async fn resumed(&self, t: Instant) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.after(t) < 10 {
            assert!(Instant::now() < deadline, "the flow did not resume");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The role a Redis server says it has (`master`, `slave`), or `down`.
pub async fn redis_role(port: u16) -> String {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
        return "down".into();
    };
    let Ok(mut c) = client.get_multiplexed_async_connection().await else {
        return "down".into();
    };
    let role: Result<Vec<redis::Value>, _> = redis::cmd("ROLE").query_async(&mut c).await;
    match role.ok().and_then(|r| r.into_iter().next()) {
        Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
        _ => "down".into(),
    }
}

/// A connection to the first node of `urls` that answers.
pub async fn connect_any(urls: &[String]) -> Connection {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for u in urls {
            if let Ok(Ok(c)) = tokio::time::timeout(
                Duration::from_secs(5),
                Connection::connect(u, ConnectionProperties::default()),
            )
            .await
            {
                return c;
            }
        }
        assert!(Instant::now() < deadline, "no cluster node answers");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

pub async fn passive_count(ch: &Channel, queue: &str) -> Option<(u32, u32)> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .ok()
    .map(|q| (q.message_count(), q.consumer_count()))
}

/// kill -9 of the process whose pid `pid_file` (under the cluster's directory) holds.
pub fn kill_9(pid_file: &str) {
    let pid = std::fs::read_to_string(format!("{}/{pid_file}", cluster_dir())).unwrap();
    assert!(
        Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .unwrap()
            .success(),
        "kill -9 of {pid_file}"
    );
}
