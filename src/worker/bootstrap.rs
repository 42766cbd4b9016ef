//! The worker's API context at start-up: from the `BUNQ_*` settings, from `BUNQ_CONTEXT_FILE`,
//! or from a new RSA-2048 key and `POST /installation`.

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::StartError;
use crate::{
    bunq::{ApiContext, BunqClient, RetryClass, context::NewKeyPair},
    config::BunqSettings,
    retry::{RetryPolicy, Stopped, retry},
};

/// Loads (or creates) the API context.
///
/// Order: the `BUNQ_CLIENT_PRIVATE_KEY` / `BUNQ_INSTALLATION_TOKEN` / `BUNQ_SERVER_PUBLIC_KEY`
/// settings; `BUNQ_CONTEXT_FILE`; a new key and `POST /installation`, retried under `policy`
/// (permanent answers are not retried), then saved to `BUNQ_CONTEXT_FILE` with mode 0600.
///
/// # Errors
/// [`StartError::Context`] when the settings or the file do not hold a valid context or it cannot
/// be saved; [`StartError::Installation`] when bunq refused the installation or the retries ran
/// out; [`StartError::Interrupted`] when `shutdown` fired first (nothing is written then);
/// [`StartError::ContextForOtherApi`] when the file's installation was made with another
/// `BUNQ_API_URL` (a file without the URL is accepted and the URL recorded in it).
pub async fn load_context(
    bunq: &BunqSettings,
    client: &BunqClient,
    policy: RetryPolicy,
    shutdown: &CancellationToken,
) -> Result<ApiContext, StartError> {
    if let (Some(key), Some(token), Some(server)) = (
        &bunq.client_private_key,
        &bunq.installation_token,
        &bunq.server_public_key,
    ) {
        return Ok(ApiContext::from_parts(key, token.clone(), server)?);
    }
    let path = &bunq.context_file;
    let configured = bunq.api_url.as_str().trim_end_matches('/');
    if let Some(mut ctx) = ApiContext::load(path)? {
        match ctx.api_url() {
            // An installation is bunq's per environment: sandbox's is unknown to production
            // (and to a reset sandbox), so every call would fail as the worker's own fault.
            Some(stored) if stored != configured => {
                return Err(StartError::ContextForOtherApi {
                    file: path.display().to_string(),
                    stored: stored.to_owned(),
                    configured: configured.to_owned(),
                });
            }
            Some(_) => {}
            None => {
                ctx.set_api_url(configured);
                ctx.save(path)?;
                info!(path = %path.display(), "recorded BUNQ_API_URL in the context file");
            }
        }
        info!(path = %path.display(), "loaded the bunq API context");
        return Ok(ctx);
    }
    info!(path = %path.display(), "no API context yet: creating a bunq installation");
    let key = NewKeyPair::generate()?;
    let answer = retry(
        policy,
        shutdown,
        |_| client.installation(&key.public_key_pem),
        |e| matches!(e.class, RetryClass::Permanent(_)),
        |e, attempt, _| warn!(attempt, error = %e, "installation failed; retrying"),
    )
    .await
    .map_err(|stopped| match stopped {
        Stopped::Permanent(e) | Stopped::Spent(e, _) => StartError::Installation(e),
        Stopped::Cancelled => StartError::Interrupted,
    })?;
    let (token, server_key) = answer.value;
    let mut ctx = key.into_context(token, &server_key)?;
    ctx.set_api_url(configured);
    ctx.save(path)?;
    match answer.response_id.as_deref() {
        Some(id) => {
            info!(path = %path.display(), bunq_response_id = id, "created and saved the bunq API context")
        }
        None => info!(path = %path.display(), "created and saved the bunq API context"),
    }
    Ok(ctx)
}

/// How long start-up waits for Redis to hand out the fleet's seal key.
const SEAL_KEY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The fleet's key for sealing bookkeeping headers, from Redis (made by the first replica).
///
/// # Errors
/// [`StartError::RedisAtStart`] when Redis does not answer within 30 s (the orchestrator
/// restarts the worker, as for an unreachable broker).
pub(super) async fn fleet_seal_key(fleet: &crate::fleet::Fleet) -> Result<Vec<u8>, StartError> {
    let policy = RetryPolicy {
        max_elapsed: Some(SEAL_KEY_WAIT),
        ..RetryPolicy::SHARED_STATE
    };
    let never = CancellationToken::new();
    crate::retry::retry(
        policy,
        &never,
        |_| fleet.seal_key(),
        |_| false,
        |_, attempt, delay| {
            warn!(
                attempt,
                retry_in_ms = delay.as_millis() as u64,
                "Redis (REDIS_URL, or the primary of REDIS_SENTINELS) did not answer; waiting for the fleet's seal key"
            )
        },
    )
    .await
    .map_err(|_| StartError::RedisAtStart(SEAL_KEY_WAIT.as_secs()))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{Settings, telemetry::Chain};

    fn bunq_settings(file: &std::path::Path, url: &str) -> BunqSettings {
        Settings::try_parse_from([
            "bunq-session-worker",
            "--bunq-context-file",
            file.to_str().unwrap(),
            "--bunq-api-url",
            url,
        ])
        .unwrap()
        .bunq
    }

    #[tokio::test]
    async fn a_context_made_for_another_url_stops_start_up_and_an_old_one_is_upgraded() {
        let dir = std::env::temp_dir().join(format!("bsw-ctx-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ctx.json");
        let server = NewKeyPair::generate().unwrap();
        let old = NewKeyPair::generate()
            .unwrap()
            .into_context("installation-token".into(), &server.public_key_pem)
            .unwrap();
        old.save(&file).unwrap();
        assert!(!std::fs::read_to_string(&file).unwrap().contains("api_url"));
        let never = CancellationToken::new();
        let policy = crate::config::RetrySettings {
            initial_delay: std::time::Duration::from_millis(1),
            max_delay: std::time::Duration::from_millis(1),
            max_attempts: 1,
            max_elapsed: std::time::Duration::from_secs(1),
        }
        .policy();
        let load = |url: &str| {
            let settings = bunq_settings(&file, url);
            let client = BunqClient::new(
                settings.api_url.clone(),
                "test".into(),
                std::time::Duration::from_secs(1),
                true,
            )
            .unwrap();
            let policy = policy.clone();
            let never = never.clone();
            async move { load_context(&settings, &client, policy, &never).await }
        };
        // A file from before the URL was recorded is accepted and upgraded.
        let ctx = load("http://127.0.0.1:9/v1/").await.unwrap();
        assert_eq!(ctx.api_url(), Some("http://127.0.0.1:9/v1"));
        assert!(
            std::fs::read_to_string(&file)
                .unwrap()
                .contains("http://127.0.0.1:9/v1")
        );
        assert!(load("http://127.0.0.1:9/v1").await.is_ok());
        // Another URL stops start-up with exit status 2, naming the setting, file and remedy.
        let e = load("https://api.bunq.com/v1").await.unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let text = Chain(&e).to_string();
        for needle in [
            "BUNQ_API_URL",
            "BUNQ_CONTEXT_FILE",
            file.to_str().unwrap(),
            "new path",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
