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
/// out; [`StartError::Interrupted`] when `shutdown` fired first (nothing is written then).
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
    if let Some(ctx) = ApiContext::load(path)? {
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
    let ctx = key.into_context(token, &server_key)?;
    ctx.save(path)?;
    match answer.response_id.as_deref() {
        Some(id) => {
            info!(path = %path.display(), bunq_response_id = id, "created and saved the bunq API context")
        }
        None => info!(path = %path.display(), "created and saved the bunq API context"),
    }
    Ok(ctx)
}
