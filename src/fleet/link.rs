//! The connection to the fleet's Redis: the one `REDIS_URL` names, or the primary the
//! sentinels (`REDIS_SENTINELS`, `REDIS_SENTINEL_MASTER`) name, asked for again after a
//! failover.
//!
//! Follows Redis's guidance for Sentinel clients (<https://redis.io/docs/latest/develop/reference/sentinel-clients/>):
//! ask the sentinels for the primary, check that it calls itself primary (redis-rs does, in
//! `async_master_for`), and ask again when the connection fails, the server says it is no
//! longer primary (`READONLY`), or a sentinel announces a failover ([`super::watch`]).

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

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
        /// `REDIS_SENTINEL_PASSWORD`: the sentinels' own password (`requirepass` on them).
        password: Option<SecretString>,
    },
}

/// How long asking the sentinels for the primary may take (all of them, and the check that the
/// primary says it is one): a sentinel that does not answer must not hold a claim for ever.
const FIND_PRIMARY_TIMEOUT: Duration = Duration::from_secs(3);

/// After a failed lookup, callers are told so at once for this long rather than each asking the
/// sentinels again (a queue of lookups, one after another, held every caller for seconds).
const LOOKUP_AGAIN_AFTER: Duration = Duration::from_secs(1);

/// How long writes wait, at most, once a sentinel announces that it is promoting a replica
/// (`+failover-state-send-slaveof-noone`), for its `+switch-master`.
pub(super) const FAILOVER_HOLD: Duration = Duration::from_secs(10);

/// A connection: its number (so a caller that saw it fail replaces only that one, not the one
/// another caller has found since), and the primary's `host:port` with sentinels.
type Current = Option<(u64, ConnectionManager, String)>;

/// The link to the fleet's Redis.
pub(super) struct RedisLink {
    source: Source,
    current: Mutex<Current>,
    /// The number the next connection gets.
    next: std::sync::atomic::AtomicU64,
}

enum Source {
    Url(Client),
    Sentinels(Sentinels),
}

/// What the link keeps about the sentinels.
pub(super) struct Sentinels {
    /// Boxed: far larger than the rest of the link.
    client: Box<tokio::sync::Mutex<SentinelClient>>,
    pub(super) master: String,
    /// The sentinels as URLs (scheme, password, host, port): secret when a password is set.
    pub(super) addrs: Vec<SecretString>,
    /// Whether the watch runs (started by the first call, which runs on Tokio).
    watching: std::sync::atomic::AtomicBool,
    /// Until when writes wait for an announced failover to finish.
    held_until: Mutex<Option<Instant>>,
    /// The last lookup that failed, and why.
    failed: Mutex<Option<(Instant, String)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unavailable(why: String) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::NotConnected, why))
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
                (Source::Url(client), Some((0, conn, String::new())))
            }
            Location::Sentinels {
                url,
                sentinels,
                master,
                password,
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
                let addrs = sentinels
                    .iter()
                    .map(|s| sentinel_url(scheme, s, password.as_ref()))
                    .collect::<Result<Vec<_>, _>>()?;
                let client = SentinelClient::build(
                    addrs.iter().map(|a| a.expose_secret().to_owned()).collect(),
                    master,
                    Some(node),
                    SentinelServerType::Master,
                )
                .map_err(BadUrl)?;
                (
                    Source::Sentinels(Sentinels {
                        client: Box::new(tokio::sync::Mutex::new(client)),
                        master: master.clone(),
                        addrs,
                        watching: std::sync::atomic::AtomicBool::new(false),
                        held_until: Mutex::new(None),
                        failed: Mutex::new(None),
                    }),
                    None,
                )
            }
        };
        Ok(Self {
            source,
            current: Mutex::new(current),
            next: std::sync::atomic::AtomicU64::new(1),
        })
    }

    fn number(&self) -> u64 {
        self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn current(&self) -> MutexGuard<'_, Current> {
        lock(&self.current)
    }

    /// The connection held now, and its number.
    fn connection(&self) -> Option<(u64, ConnectionManager)> {
        self.current()
            .as_ref()
            .map(|(n, conn, _)| (*n, conn.clone()))
    }

    /// Which settings say where Redis is, for messages.
    pub(super) fn label(&self) -> &'static str {
        match self.source {
            Source::Url(_) => "REDIS_URL",
            Source::Sentinels(_) => "REDIS_SENTINELS",
        }
    }

    /// The connection and its number; with sentinels, the primary is asked for first when
    /// there is no connection (at start, or after [`Self::after`] or an announcement dropped
    /// it).
    ///
    /// # Errors
    /// With sentinels: while an announced failover is under way (at most [`FAILOVER_HOLD`]);
    /// when no sentinel answers, none names a primary that says it is one, or that takes
    /// longer than 3 s; and for 1 s after such a failed lookup, with its reason.
    pub(super) async fn get(
        self: &Arc<Self>,
    ) -> Result<(u64, ConnectionManager), redis::RedisError> {
        let Source::Sentinels(sentinels) = &self.source else {
            return Ok(self
                .connection()
                .expect("a REDIS_URL link holds a connection"));
        };
        if !sentinels
            .watching
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            super::watch::start(Arc::downgrade(self), sentinels);
        }
        sentinels.may_write()?;
        if let Some(c) = self.connection() {
            return Ok(c);
        }
        // One caller asks the sentinels; the others wait for its answer, or its failure.
        let mut client = sentinels.client.lock().await;
        sentinels.may_write()?;
        if let Some(c) = self.connection() {
            return Ok(c);
        }
        let found =
            match tokio::time::timeout(FIND_PRIMARY_TIMEOUT, client.async_get_client()).await {
                Ok(Ok(primary)) => Ok(primary),
                Ok(Err(e)) => Err(crate::telemetry::Chain(&e).to_string()),
                Err(_) => Err("no answer within 3 s".to_owned()),
            };
        let primary = found.map_err(|e| {
            let why = format!(
                "the sentinels (REDIS_SENTINELS) name no primary for {} that answers: {e}",
                sentinels.master
            );
            *lock(&sentinels.failed) = Some((Instant::now(), why.clone()));
            unavailable(why)
        })?;
        *lock(&sentinels.failed) = None;
        let addr = primary.get_connection_info().addr().to_string();
        tracing::info!(
            primary = %addr,
            master = %sentinels.master,
            "the fleet's Redis primary, as the sentinels (REDIS_SENTINELS) name it"
        );
        let conn = ConnectionManager::new_lazy_with_config(primary, config())?;
        let number = self.number();
        *self.current() = Some((number, conn.clone(), addr));
        Ok((number, conn))
    }

    /// After connection `number` failed with `e`: with `REDIS_URL`, a timeout replaces it
    /// (redis-rs's `ConnectionManager` reconnects when a connection drops, not when it stops
    /// answering, as a half-open TCP connection after a partition does); with sentinels, any
    /// fault of the connection or the server's role drops it, so the next call asks the
    /// sentinels for the primary again.
    pub(super) fn after(&self, number: u64, e: &redis::RedisError) {
        let mut current = self.current();
        if current.as_ref().is_none_or(|(n, _, _)| *n != number) {
            return;
        }
        match &self.source {
            Source::Url(client) => {
                if !e.is_timeout() {
                    return;
                }
                if let Ok(fresh) = ConnectionManager::new_lazy_with_config(client.clone(), config())
                {
                    *current = Some((self.number(), fresh, String::new()));
                }
            }
            Source::Sentinels(_) => {
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

    /// A sentinel announced that it is promoting a replica of the primary: writes wait (at most
    /// [`FAILOVER_HOLD`]) for the new primary, since the old one takes writes until it is
    /// demoted and loses them then.
    pub(super) fn failover_started(&self, announcement: &str) {
        let Source::Sentinels(sentinels) = &self.source else {
            return;
        };
        *lock(&sentinels.held_until) = Some(Instant::now() + FAILOVER_HOLD);
        self.current().take();
        tracing::warn!(
            announcement,
            "a sentinel is promoting a replica of the fleet's Redis; writes wait for the new primary"
        );
    }

    /// A sentinel announced the new primary (`host:port`): move to it, unless already there.
    pub(super) fn switched(&self, primary: &str, announcement: &str) {
        let Source::Sentinels(sentinels) = &self.source else {
            return;
        };
        *lock(&sentinels.held_until) = None;
        *lock(&sentinels.failed) = None;
        let mut current = self.current();
        if current.as_ref().is_some_and(|(_, _, at)| at != primary) {
            *current = None;
            tracing::info!(
                announcement,
                "a sentinel announced a new primary for the fleet's Redis (+switch-master); moving to it"
            );
        }
    }
}

impl Sentinels {
    /// Whether a write may start: not while an announced failover is under way, nor right
    /// after a lookup failed.
    fn may_write(&self) -> Result<(), redis::RedisError> {
        let mut held = lock(&self.held_until);
        if let Some(until) = *held {
            if Instant::now() < until {
                return Err(unavailable(format!(
                    "a sentinel announced a failover of {}; writes wait for the new primary",
                    self.master
                )));
            }
            *held = None;
        }
        match &*lock(&self.failed) {
            Some((at, why)) if at.elapsed() < LOOKUP_AGAIN_AFTER => Err(unavailable(why.clone())),
            _ => Ok(()),
        }
    }
}

/// `scheme://[:password@]host:port` for one sentinel.
fn sentinel_url(
    scheme: &str,
    host_port: &str,
    password: Option<&SecretString>,
) -> Result<SecretString, BadUrl> {
    let bad = || {
        BadUrl(redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "a sentinel is not host:port",
        )))
    };
    let mut url = url::Url::parse(&format!("{scheme}://{host_port}")).map_err(|_| bad())?;
    if let Some(p) = password {
        url.set_password(Some(p.expose_secret()))
            .map_err(|()| bad())?;
    }
    Ok(SecretString::from(url.to_string()))
}
