//! The sentinels' announcements about the fleet's Redis, heard on every sentinel at once (one
//! that hangs or goes away must not leave the worker deaf): a failover starting
//! (`+failover-state-send-slaveof-noone`, `<type> <name> <ip> <port> @ <master> <ip> <port>`)
//! holds writes, its end (`+switch-master`, `<master> <old ip> <old port> <new ip> <new port>`)
//! moves the link to the new primary.
//!
//! Why: after a failover the old primary keeps taking writes until the sentinels turn it into a
//! replica (up to 10 s later, on their next `INFO`), and loses them then; and the new primary
//! is announced about 1 s after it took over. Writes held from the start of the promotion to
//! its announcement go to no primary that will lose them. Events:
//! <https://redis.io/docs/latest/operate/oss_and_stack/management/sentinel/#pubsub-messages>.

use std::{sync::Weak, time::Duration};

use futures_util::StreamExt;
use redis::Client;
use secrecy::ExposeSecret;

use super::link::{RedisLink, Sentinels};

const FAILOVER_STARTS: &str = "+failover-state-send-slaveof-noone";
const SWITCHED: &str = "+switch-master";

/// How often a silent subscription checks that the link still lives.
const RECHECK: Duration = Duration::from_secs(5);

/// Watches each of `sentinels` for as long as `link` lives.
pub(super) fn start(link: Weak<RedisLink>, sentinels: &Sentinels) {
    for url in &sentinels.addrs {
        tokio::spawn(watch_one(
            link.clone(),
            url.expose_secret().to_owned(),
            sentinels.master.clone(),
        ));
    }
}

/// Subscribes to one sentinel's announcements, again 1 s after it goes away.
async fn watch_one(link: Weak<RedisLink>, url: String, master: String) {
    while link.strong_count() > 0 {
        if let Ok(client) = Client::open(url.as_str())
            && let Ok(Ok(mut pubsub)) =
                tokio::time::timeout(RECHECK, client.get_async_pubsub()).await
            && pubsub.subscribe(&[FAILOVER_STARTS, SWITCHED]).await.is_ok()
        {
            let mut messages = pubsub.on_message();
            loop {
                match tokio::time::timeout(RECHECK, messages.next()).await {
                    Ok(Some(msg)) => {
                        let text: String = msg.get_payload().unwrap_or_default();
                        let Some(link) = link.upgrade() else { return };
                        heard(&link, msg.get_channel_name(), &text, &master);
                    }
                    Ok(None) => break,
                    Err(_) if link.strong_count() == 0 => return,
                    Err(_) => {}
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Acts on one announcement about `master` (others are ignored).
fn heard(link: &RedisLink, channel: &str, text: &str, master: &str) {
    let words: Vec<&str> = text.split(' ').collect();
    match channel {
        FAILOVER_STARTS => {
            let of = words
                .iter()
                .position(|w| *w == "@")
                .and_then(|i| words.get(i + 1));
            if of == Some(&master) {
                link.failover_started(text);
            }
        }
        SWITCHED if words.first() == Some(&master) && words.len() >= 5 => {
            link.switched(&format!("{}:{}", words[3], words[4]), text);
        }
        _ => {}
    }
}
