//! The `emulator` subcommand's settings.
//!
//! They live here, not in [`crate::tools::emulator`], so that the configuration (which builds the
//! command line) does not depend on a tool module above it; `crate::tools::emulator` re-exports them.

use std::net::SocketAddr;

use crate::rate_limit::RateLimit;

/// The `emulator` subcommand's settings.
#[derive(Clone, Debug, clap::Args)]
pub struct EmulatorSettings {
    /// Address to listen on; port 0 picks a free port. The base URL to give the worker is
    /// `http://<address>/v1`.
    #[arg(long, env = "EMULATOR_LISTEN", default_value = "127.0.0.1:8089")]
    pub listen: SocketAddr,

    /// Rate limit of session-server, `N/Ws` (bunq's documented figure is `1/30s`); beyond it
    /// the emulator answers 429 with bunq's message. Unset: no limit.
    #[arg(long, env = "EMULATOR_SESSION_RATE_LIMIT", value_name = "N/Ws")]
    pub session_rate_limit: Option<RateLimit>,

    /// Whether a credential opens one session (`single-use`, the cautious reading: a second
    /// session-server call is refused as "Incorrect API key") or any number (`reusable`, as a
    /// regular bunq API key does). bunq's documentation does not say which a partner's
    /// provisioned credential is.
    #[arg(
        long,
        env = "EMULATOR_CREDENTIALS",
        value_enum,
        default_value_t = CredentialUse::SingleUse
    )]
    pub credentials: CredentialUse,
}

/// How often one credential opens a session at the emulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CredentialUse {
    /// One session; later session-server and device-server calls are refused.
    SingleUse,
    /// A session at every call.
    Reusable,
}
