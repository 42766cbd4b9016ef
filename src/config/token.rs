//! How `session.created` carries the session token: sealed for its consumer, or in clear.

use std::path::PathBuf;

use clap::Args;

use super::ConfigError;
use crate::jwe::ConsumerKey;

/// The session token's custody.
///
/// The fields are named within the group, but the flags and variables keep the names a flat
/// command line needs, hence the explicit `long` and `value_name`.
#[derive(Clone, Debug, Args)]
pub struct TokenSettings {
    /// The consumer's public key, PEM (SubjectPublicKeyInfo): an RSA key of 2048 bits or more
    /// seals with JWE `RSA-OAEP-256`, a P-256 key with `ECDH-ES+A256KW` (`enc` `A256GCM` both);
    /// `session.created` then carries `session_token_jwe` and no `session_token`.
    #[arg(
        long = "session-token-encryption-key",
        env = "SESSION_TOKEN_ENCRYPTION_KEY",
        value_name = "SESSION_TOKEN_ENCRYPTION_KEY"
    )]
    pub encryption_key: Option<PathBuf>,

    /// `allow`: against bunq production, publish tokens in clear without a consumer key.
    #[arg(
        long = "session-token-cleartext",
        env = "SESSION_TOKEN_CLEARTEXT",
        value_name = "SESSION_TOKEN_CLEARTEXT",
        value_enum
    )]
    pub cleartext: Option<Cleartext>,
}

/// The operator's word that tokens may go out in clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Cleartext {
    /// Publish tokens in clear even against bunq production.
    Allow,
}

impl TokenSettings {
    /// The consumer's key, read and checked; `None` when none is configured.
    ///
    /// # Errors
    /// [`ConfigError`] naming `SESSION_TOKEN_ENCRYPTION_KEY` when the file cannot be read or
    /// holds no RSA (2048 bits or more) or P-256 public key.
    pub fn consumer_key(&self) -> Result<Option<ConsumerKey>, ConfigError> {
        let Some(path) = &self.encryption_key else {
            return Ok(None);
        };
        let pem = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!(
                "SESSION_TOKEN_ENCRYPTION_KEY: cannot read {}: {e}",
                path.display()
            ))
        })?;
        ConsumerKey::from_pem(&pem).map(Some).map_err(|e| {
            ConfigError(format!(
                "SESSION_TOKEN_ENCRYPTION_KEY ({}): {e}",
                path.display()
            ))
        })
    }

    /// Checks the key, and that tokens go to bunq production's consumers sealed unless the
    /// operator allowed clear text.
    ///
    /// # Errors
    /// [`ConfigError`] from [`Self::consumer_key`]; or naming both settings when `api_url` is
    /// bunq production (`https://api.bunq.com…`), no key is set and `SESSION_TOKEN_CLEARTEXT` is
    /// not `allow`.
    pub fn validate(&self, api_url: &reqwest::Url) -> Result<(), ConfigError> {
        let key = self.consumer_key()?;
        if key.is_none() && is_production(api_url) && self.cleartext != Some(Cleartext::Allow) {
            return Err(ConfigError(
                "against bunq production (BUNQ_API_URL https://api.bunq.com) session tokens must be sealed for their consumer: set SESSION_TOKEN_ENCRYPTION_KEY to the consumer's public key (PEM), or SESSION_TOKEN_CLEARTEXT=allow to publish them in clear".into(),
            ));
        }
        Ok(())
    }

    /// The start-up warning when tokens go out in clear, if they do.
    pub fn warning(&self) -> Option<String> {
        self.encryption_key.is_none().then(|| {
            "session tokens are published in clear in session.created (no SESSION_TOKEN_ENCRYPTION_KEY): anyone who can bind a queue to the output exchange reads them".to_owned()
        })
    }
}

/// Whether `url` is bunq's production API.
fn is_production(url: &reqwest::Url) -> bool {
    url.scheme() == "https" && url.host_str() == Some("api.bunq.com")
}
