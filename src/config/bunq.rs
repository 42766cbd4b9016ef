//! bunq's API, the API context, the device-server call, pacing and the HTTP timeout.

use std::{path::PathBuf, time::Duration};

use clap::Args;
use secrecy::SecretString;

use super::{ConfigError, parse::parse_ms};
use crate::rate_limit::RateLimit;

/// bunq's API, the API context, the device-server call and pacing.
#[derive(Clone, Debug, Args)]
pub struct BunqSettings {
    /// Base URL of bunq's public API, including `/v1`.
    #[arg(
        long = "bunq-api-url",
        env = "BUNQ_API_URL",
        default_value = "https://public-api.sandbox.bunq.com/v1"
    )]
    pub api_url: reqwest::Url,

    /// Where the API context (client key pair, installation token, server public key) is read
    /// from, or saved to (mode 0600) after a fresh `POST /installation`.
    #[arg(
        long = "bunq-context-file",
        env = "BUNQ_CONTEXT_FILE",
        default_value = "bunq-context.json"
    )]
    pub context_file: PathBuf,

    /// PEM PKCS#8 client private key (RSA 2048). With the two settings below it supplies the API
    /// context from the environment instead of the file; all three or none.
    #[arg(
        long = "bunq-client-private-key",
        env = "BUNQ_CLIENT_PRIVATE_KEY",
        hide_env_values = true
    )]
    pub client_private_key: Option<SecretString>,

    /// Installation token that belongs to `BUNQ_CLIENT_PRIVATE_KEY`.
    #[arg(
        long = "bunq-installation-token",
        env = "BUNQ_INSTALLATION_TOKEN",
        hide_env_values = true
    )]
    pub installation_token: Option<SecretString>,

    /// PEM server public key returned by that installation.
    #[arg(long = "bunq-server-public-key", env = "BUNQ_SERVER_PUBLIC_KEY")]
    pub server_public_key: Option<String>,

    /// Call `POST /device-server` with the credential's token before `POST /session-server`.
    #[arg(long = "bunq-register-device", env = "BUNQ_REGISTER_DEVICE", default_value_t = true, action = clap::ArgAction::Set)]
    pub register_device: bool,

    /// Comma-separated IPv4 addresses for `permitted_ips` in device-server, or `*`.
    #[arg(
        long = "bunq-permitted-ips",
        env = "BUNQ_PERMITTED_IPS",
        default_value = "*",
        value_delimiter = ','
    )]
    pub permitted_ips: Vec<String>,

    /// `description` sent to device-server.
    #[arg(
        long = "bunq-device-description",
        env = "BUNQ_DEVICE_DESCRIPTION",
        default_value = "bunq-session-worker"
    )]
    pub device_description: String,

    /// Verify `X-Bunq-Server-Signature` on every 2xx response after installation.
    #[arg(long = "bunq-verify-response-signature", env = "BUNQ_VERIFY_RESPONSE_SIGNATURE", default_value_t = true, action = clap::ArgAction::Set)]
    pub verify_response_signature: bool,

    /// `User-Agent` header sent to bunq (required by bunq).
    #[arg(long = "bunq-user-agent", env = "BUNQ_USER_AGENT", default_value = concat!("bunq-session-worker/", env!("CARGO_PKG_VERSION")))]
    pub user_agent: String,

    /// Pace session-server: at most N calls per W seconds for this process, e.g. `1/30s` (bunq's
    /// documented session-server limit). Unset: no pacing (a 429 still pauses all calls).
    #[arg(
        long = "bunq-session-rate-limit",
        env = "BUNQ_SESSION_RATE_LIMIT",
        value_name = "N/Ws"
    )]
    pub session_rate_limit: Option<RateLimit>,

    /// Timeout of one HTTP request to bunq (connect + response), in ms.
    #[arg(long = "http-timeout-ms", env = "HTTP_TIMEOUT_MS", value_name = "HTTP_TIMEOUT_MS", default_value = "10000", value_parser = parse_ms)]
    pub http_timeout: Duration,
}

impl BunqSettings {
    /// Checks what clap cannot check field by field.
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable when: `BUNQ_API_URL` is not http(s); only some of
    /// `BUNQ_CLIENT_PRIVATE_KEY`, `BUNQ_INSTALLATION_TOKEN`, `BUNQ_SERVER_PUBLIC_KEY` are set;
    /// `BUNQ_PERMITTED_IPS` holds something other than IPv4 addresses or `*`;
    /// `BUNQ_USER_AGENT` is empty or holds characters an HTTP header cannot carry;
    /// `HTTP_TIMEOUT_MS` is 0; `BUNQ_SESSION_RATE_LIMIT` spaces calls less than 1 ms apart or
    /// has a window over a day.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        if !matches!(self.api_url.scheme(), "http" | "https") {
            return err("BUNQ_API_URL must be an http:// or https:// URL".into());
        }
        let given = [
            self.client_private_key.is_some(),
            self.installation_token.is_some(),
            self.server_public_key.is_some(),
        ];
        if given.iter().any(|g| *g) && !given.iter().all(|g| *g) {
            return err("BUNQ_CLIENT_PRIVATE_KEY, BUNQ_INSTALLATION_TOKEN and BUNQ_SERVER_PUBLIC_KEY must be set together or not at all".into());
        }
        for ip in &self.permitted_ips {
            let ip = ip.trim();
            if ip != "*" && ip.parse::<std::net::Ipv4Addr>().is_err() {
                return err(format!(
                    "BUNQ_PERMITTED_IPS: {ip:?} is neither an IPv4 address nor *"
                ));
            }
        }
        if reqwest::header::HeaderValue::from_str(&self.user_agent).is_err() {
            return err("BUNQ_USER_AGENT holds characters an HTTP header cannot carry".into());
        }
        if self.http_timeout.is_zero() {
            return err("HTTP_TIMEOUT_MS must be at least 1".into());
        }
        if self.user_agent.trim().is_empty() {
            return err("BUNQ_USER_AGENT must not be empty".into());
        }
        if let Some(limit) = self.session_rate_limit {
            // Pacing keeps time in ms: a finer spacing is no pacing at all.
            if limit.interval() < std::time::Duration::from_millis(1) {
                return err(format!(
                    "BUNQ_SESSION_RATE_LIMIT {}/{}s spaces calls less than 1 ms apart: at most 1000 calls per second (bunq documents 1 per 30 s)",
                    limit.calls,
                    limit.per.as_secs()
                ));
            }
            if limit.per > std::time::Duration::from_secs(86_400) {
                return err("BUNQ_SESSION_RATE_LIMIT's window must be at most a day".into());
            }
        }
        Ok(())
    }
}
