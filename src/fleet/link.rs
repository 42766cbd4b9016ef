//! The connection to the fleet's Redis: the one `REDIS_URL` names, or the primary the
//! sentinels (`REDIS_SENTINELS`, `REDIS_SENTINEL_MASTER`) name, asked for again after a
//! failover.
//!
//! Follows Redis's guidance for Sentinel clients (<https://redis.io/docs/latest/develop/reference/sentinel-clients/>):
//! ask the sentinels for the primary, check that it calls itself primary (redis-rs does, in
//! `async_master_for`), and ask again when the connection fails or the server says it is no
//! longer primary (`READONLY`).

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use futures_util::StreamExt;

use redis::{
    Client, ConnectionAddr, IntoConnectionInfo, TlsMode,
    aio::{ConnectionManager, ConnectionManagerConfig},
    sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType},
};
use secrecy::{ExposeSecret, SecretString};

use super::BadUrl;

/// Where the fleet's Redis is.
#[derive(Clone)]
pub enum Location {
    /// `REDIS_URL`: one server (or a name a managed service moves on failover).
    Url(SecretString),
    /// The primary that `sentinels` (`host:port` each) monitor as `master`; `url` gives the
    /// scheme, credentials and database (unset: `redis://`, database 0).
    Sentinels {
        /// `REDIS_URL`, its host unused.
        url: Option<SecretString>,
        /// `REDIS_SENTINELS`.
        sentinels: Vec<String>,
        /// `REDIS_SENTINEL_MASTER`.
        master: String,
    },
}

/// How long asking the sentinels for the primary may take (all of them, and the check that the
/// primary says it is one): a sentinel that does not answer must not hold a claim for ever.
const FIND_PRIMARY_TIMEOUT: Duration = Duration::from_secs(3);

/// The connection, and which one it is (so a caller that saw it fail replaces only that one,
/// not the one another caller has found since).
pub(super) struct RedisLink {
    source: Source,
    current: std::sync::Mutex<Option<(u64, ConnectionManager)>>,
    /// The number the next connection gets.
    next: std::sync::atomic::AtomicU64,
}

enum Source {
    Url(Client),
    Sentinels {
        client: tokio::sync::Mutex<SentinelClient>,
        master: String,
        /// The sentinels as URLs (scheme, host, port), for the `+switch-master` watch.
        addrs: Vec<String>,
        /// Whether the watch runs (started by the first call, which runs on Tokio).
        watching: std::sync::atomic::AtomicBool,
    },
}

fn config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(2))
}

impl RedisLink {
    /// Prepares the link; nothing is connected before the first call.
    pub(super) fn new(location: &Location) -> Result<Self, BadUrl> {
        let (source, current) = match location {
            Location::Url(url) => {
                let client = Client::open(url.expose_secret()).map_err(BadUrl)?;
                let conn = ConnectionManager::new_lazy_with_config(client.clone(), config())
                    .map_err(BadUrl)?;
                (Source::Url(client), Some((0, conn)))
            }
            Location::Sentinels {
                url,
                sentinels,
                master,
            } => {
                let info = url
                    .as_ref()
                    .map_or("redis://localhost", |u| u.expose_secret())
                    .into_connection_info()
                    .map_err(BadUrl)?;
                let (scheme, mut node) = match info.addr() {
                    ConnectionAddr::TcpTls { insecure, .. } => (
                        "rediss",
                        SentinelNodeConnectionInfo::default().set_tls_mode(if *insecure {
                            TlsMode::Insecure
                        } else {
                            TlsMode::Secure
                        }),
                    ),
                    _ => ("redis", SentinelNodeConnectionInfo::default()),
                };
                node = node.set_redis_connection_info(info.redis_settings().clone());
                let addrs: Vec<String> = sentinels
                    .iter()
                    .map(|s| format!("{scheme}://{s}"))
                    .collect();
                let client = SentinelClient::build(
                    addrs.clone(),
                    master,
                    Some(node),
                    SentinelServerType::Master,
                )
                .map_err(BadUrl)?;
                (
                    Source::Sentinels {
                        client: tokio::sync::Mutex::new(client),
                        master: master.clone(),
                        addrs,
                        watching: std::sync::atomic::AtomicBool::new(false),
                    },
                    None,
                )
            }
        };
        Ok(Self {
            source,
            current: std::sync::Mutex::new(current),
            next: std::sync::atomic::AtomicU64::new(1),
        })
    }

    fn number(&self) -> u64 {
        self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Option<(u64, ConnectionManager)>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection and its number; with sentinels, the primary is asked for first when
    /// there is no connection (at start, or after [`Self::after`] dropped it).
    ///
    /// # Errors
    /// Redis's error when no sentinel answers, none names a primary that says it is one, or
    /// that takes longer than 3 s.
    pub(super) async fn get(
        self: &Arc<Self>,
    ) -> Result<(u64, ConnectionManager), redis::RedisError> {
        if let Some(c) = self.current().clone() {
            return Ok(c);
        }
        let Source::Sentinels {
            client,
            master,
            addrs,
            watching,
        } = &self.source
        else {
            unreachable!("a REDIS_URL link always holds a connection")
        };
        if !watching.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tokio::spawn(watch_switches(
                Arc::downgrade(self),
                addrs.clone(),
                master.clone(),
            ));
        }
        // One caller asks the sentinels; the others wait for its answer.
        let mut client = client.lock().await;
        if let Some(c) = self.current().clone() {
            return Ok(c);
        }
        let primary = tokio::time::timeout(FIND_PRIMARY_TIMEOUT, client.async_get_client())
            .await
            .map_err(|_| {
                redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the sentinels did not name a primary within 3 s",
                ))
            })??;
        tracing::info!(
            primary = %primary.get_connection_info().addr(),
            master = %master,
            "the fleet's Redis primary, as the sentinels (REDIS_SENTINELS) name it"
        );
        let conn = ConnectionManager::new_lazy_with_config(primary, config())?;
        let number = self.number();
        *self.current() = Some((number, conn.clone()));
        Ok((number, conn))
    }

    /// After connection `number` failed with `e`: with `REDIS_URL`, a timeout replaces it
    /// (redis-rs's `ConnectionManager` reconnects when a connection drops, not when it stops
    /// answering, as a half-open TCP connection after a partition does); with sentinels, any
    /// fault of the connection or the server's role drops it, so the next call asks the
    /// sentinels for the primary again.
    pub(super) fn after(&self, number: u64, e: &redis::RedisError) {
        let mut current = self.current();
        if current.as_ref().is_none_or(|(n, _)| *n != number) {
            return;
        }
        match &self.source {
            Source::Url(client) => {
                if !e.is_timeout() {
                    return;
                }
                if let Ok(fresh) = ConnectionManager::new_lazy_with_config(client.clone(), config())
                {
                    *current = Some((self.number(), fresh));
                }
            }
            Source::Sentinels { .. } => {
                let role = matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"));
                if role
                    || e.is_timeout()
                    || e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_unrecoverable_error()
                {
                    *current = None;
                    drop(current);
                    tracing::info!(
                        error = %crate::telemetry::Chain(e),
                        "the fleet's Redis primary failed; asking the sentinels (REDIS_SENTINELS) again"
                    );
                }
            }
        }
    }

    /// Drops the connection, whichever it is: a sentinel announced another primary.
    fn switched(&self, announcement: &str) {
        if self.current().take().is_some() {
            tracing::info!(
                announcement,
                "a sentinel announced a new primary for the fleet's Redis (+switch-master); moving to it"
            );
        }
    }
}

/// Listens to the sentinels' `+switch-master` announcements (`<master> <old ip> <old port>
/// <new ip> <new port>`) and drops the connection when `master` moves, for as long as the link
/// lives. Needed because after a failover the old primary keeps taking writes until the
/// sentinels turn it into a replica (up to 10 s later, on their next `INFO`), and those writes
/// are lost when it does. Any sentinel will do; when it goes away the next is tried, after 1 s.
async fn watch_switches(link: Weak<RedisLink>, sentinels: Vec<String>, master: String) {
    const RECHECK: Duration = Duration::from_secs(5);
    loop {
        for url in &sentinels {
            if link.strong_count() == 0 {
                return;
            }
            let Ok(client) = Client::open(url.as_str()) else {
                continue;
            };
            let Ok(Ok(mut pubsub)) =
                tokio::time::timeout(FIND_PRIMARY_TIMEOUT, client.get_async_pubsub()).await
            else {
                continue;
            };
            if pubsub.subscribe("+switch-master").await.is_err() {
                continue;
            }
            let mut messages = pubsub.on_message();
            loop {
                match tokio::time::timeout(RECHECK, messages.next()).await {
                    Ok(Some(msg)) => {
                        let text: String = msg.get_payload().unwrap_or_default();
                        if text.split(' ').next() == Some(master.as_str()) {
                            let Some(link) = link.upgrade() else { return };
                            link.switched(&text);
                        }
                    }
                    // The sentinel went away: try the next.
                    Ok(None) => break,
                    Err(_) if link.strong_count() == 0 => return,
                    Err(_) => {}
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
