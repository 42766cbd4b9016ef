//! Tracing set-up: human-readable text or one JSON object per line, filtered by `RUST_LOG`
//! (default `info`).
//!
//! Whatever `RUST_LOG` says, two kinds of dependency events are never written, because they
//! carry message bodies (which hold `token_value` or the session token): lapin's TRACE events
//! (they dump whole AMQP frames) and its `lapin::returned_messages` events (it logs every
//! returned message, body included, at WARN). The worker reports returned publishes itself,
//! without the body.

use tracing::{Level, Metadata};
use tracing_subscriber::{
    EnvFilter, Layer, filter::filter_fn, fmt, layer::SubscriberExt, util::SubscriberInitExt,
};

/// How log lines are written to standard output (`LOG_FORMAT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Whether an event or span may carry a message body and must not be written.
pub fn carries_message_bodies(meta: &Metadata<'_>) -> bool {
    let target = meta.target();
    target.starts_with("lapin")
        && (*meta.level() == Level::TRACE || target.starts_with("lapin::returned_messages"))
}

/// Installs the global subscriber writing to standard output. Call once, from `main`.
///
/// `RUST_LOG` sets the filter; without it, `default_level` (e.g. `info`) with lapin's own
/// events off: the worker reports broker failures itself, once, in its own words. Text is
/// coloured only when standard output is a terminal and `NO_COLOR` is unset
/// (<https://no-color.org>). JSON lines carry the current span once, as `span`.
pub fn init(format: LogFormat, default_level: &str) {
    let env = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_level},lapin=off")));
    let safe = filter_fn(|meta| !carries_message_bodies(meta));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let layer = match format {
        LogFormat::Text => fmt::layer().with_target(false).with_ansi(colour).boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(layer.with_filter(env).with_filter(safe))
        .init();
}

/// Formats an error with its cause chain, `outer: cause: root cause`, for the one log line or
/// message where the error is handled. Causes a message already ends with are not repeated.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'a));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = self.0.to_string();
        let mut source = self.0.source();
        while let Some(cause) = source {
            let c = cause.to_string();
            if !c.is_empty() && !text.ends_with(&c) {
                text.push_str(": ");
                text.push_str(&c);
            }
            source = cause.source();
        }
        f.write_str(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot build the HTTP client")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_names_every_cause_once() {
        let e = Outer(std::io::Error::other("no CA certificates found"));
        assert_eq!(
            Chain(&e).to_string(),
            "cannot build the HTTP client: no CA certificates found"
        );
    }
}
