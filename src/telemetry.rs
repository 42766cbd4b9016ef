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

use crate::config::LogFormat;

/// Whether an event or span may carry a message body and must not be written.
pub fn carries_message_bodies(meta: &Metadata<'_>) -> bool {
    let target = meta.target();
    target.starts_with("lapin")
        && (*meta.level() == Level::TRACE || target.starts_with("lapin::returned_messages"))
}

/// Installs the global subscriber writing to standard output. Call once, from `main`.
pub fn init(format: LogFormat) {
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let safe = filter_fn(|meta| !carries_message_bodies(meta));
    let layer = match format {
        LogFormat::Text => fmt::layer().with_target(false).boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(layer.with_filter(env).with_filter(safe))
        .init();
}
