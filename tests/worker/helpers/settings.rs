//! One test's names, the settings of its worker, and the same settings as the binary's flags.

use std::{path::Path, time::Duration};

use bunq_session_worker::{
    Settings,
    config::{DelayTiers, ListenAddr},
};
use clap::Parser;
use secrecy::{ExposeSecret, SecretString};

use super::TestApp;

/// Names of one test's broker objects.
#[derive(Clone, Debug)]
pub struct Names {
    pub input_exchange: String,
    pub input_queue: String,
    pub output_exchange: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub output_queue: String,
}

impl Names {
    pub fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let id = &id[..12];
        Self {
            input_exchange: format!("test-{id}.provisioning"),
            input_queue: format!("test-{id}.provision-ready"),
            output_exchange: format!("test-{id}.sessions"),
            dead_letter_exchange: format!("test-{id}.dead-letter"),
            dead_letter_queue: format!("test-{id}.provision-ready.dead-letter"),
            output_queue: format!("test-{id}.sessions-observer"),
        }
    }
}

/// The settings of one test's worker: the defaults, then this test's names, the fake bunq at
/// `bunq_url`, its own context file, the broker, and fast retries without delayed retry.
pub(super) fn test_settings(
    names: &Names,
    bunq_url: &str,
    context_file: &Path,
    amqp_url: &str,
) -> Settings {
    let mut s = Settings::try_parse_from(["bunq-session-worker"]).expect("the defaults parse");
    s.broker.amqp_url = SecretString::from(amqp_url.to_owned());
    s.bunq.api_url = format!("{bunq_url}/v1")
        .parse()
        .expect("the fake bunq's URL");
    s.bunq.context_file = context_file.to_path_buf();
    let t = &mut s.topology;
    t.input_exchange = names.input_exchange.clone();
    t.input_queue = names.input_queue.clone();
    t.output_exchange = names.output_exchange.clone();
    t.dead_letter_exchange = names.dead_letter_exchange.clone();
    t.dead_letter_queue = names.dead_letter_queue.clone();
    // Tests of the in-process outcome; the delayed-retry tests turn it on.
    t.delayed_retry_delays = DelayTiers::default();
    s.retry.initial_delay = Duration::from_millis(10);
    s.retry.max_delay = Duration::from_millis(50);
    s.bunq.http_timeout = Duration::from_millis(2000);
    // Every worker serves its probes and metrics on a free port of its own.
    s.metrics_addr = ListenAddr(Some("127.0.0.1:0".parse().expect("a literal address")));
    s
}

impl TestApp {
    /// The binary's flags for this test, rendered from `settings`: the broker, the fake bunq,
    /// the context file, the names and the fast retries. Only those: pass what else a test
    /// changes to the binary as environment variables (`Running::start(&app.args(), env)`).
    ///
    /// # Panics
    /// When these flags would not give the binary `settings` (a test changed another typed
    /// field and then started the binary, which would silently not see it).
    pub fn args(&self) -> Vec<String> {
        let s = &self.settings;
        let t = &s.topology;
        let ms = |d: Duration| d.as_millis().to_string();
        let delays = if t.delayed_retry_delays.0.is_empty() {
            "off".to_owned()
        } else {
            t.delayed_retry_delays
                .0
                .iter()
                .map(|d| d.as_secs().to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let args: Vec<String> = [
            ("--amqp-url", s.broker.amqp_url.expose_secret().to_owned()),
            ("--bunq-api-url", s.bunq.api_url.to_string()),
            (
                "--bunq-context-file",
                s.bunq.context_file.to_str().unwrap().to_owned(),
            ),
            ("--input-exchange", t.input_exchange.clone()),
            ("--input-queue", t.input_queue.clone()),
            ("--output-exchange", t.output_exchange.clone()),
            ("--dead-letter-exchange", t.dead_letter_exchange.clone()),
            ("--dead-letter-queue", t.dead_letter_queue.clone()),
            ("--retry-initial-delay-ms", ms(s.retry.initial_delay)),
            ("--retry-max-delay-ms", ms(s.retry.max_delay)),
            ("--http-timeout-ms", ms(s.bunq.http_timeout)),
            ("--delayed-retry-delays-s", delays),
            (
                "--metrics-addr",
                s.metrics_addr
                    .0
                    .map_or_else(|| "off".to_owned(), |a| a.to_string()),
            ),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_owned(), value])
        .collect();
        let rendered = Settings::try_parse_from(
            std::iter::once("bunq-session-worker".to_owned()).chain(args.iter().cloned()),
        )
        .expect("the rendered flags parse");
        assert_eq!(
            format!("{rendered:?}"),
            format!("{s:?}"),
            "the binary's flags do not carry every setting this test changed: pass the others as environment variables"
        );
        args
    }
}
