//! What identifies an input, and the ids derived from it.
//!
//! A leaf beside [`crate::events`]: the claim in Redis, the breaker's streak, the ledger and the
//! envelope's seal all name an input by its [`Key`], and none of them needs the others for it.

use secrecy::ExposeSecret;

use crate::events::{Decoded, InputError};

/// SHA-256 digest: an input's identity, or a key derived from it.
pub type Key = [u8; 32];

/// Namespace of the deterministic output `message_id`s (UUID v5, RFC 9562 §5.5).
const MESSAGE_ID_NAMESPACE: uuid::Uuid = uuid::uuid!("5f0c2a8e-3b1d-4e7a-9c6f-1d2e3f4a5b6c");

/// What identifies an input, 32 bytes: for a ready credential, the SHA-256 of its
/// `token_value` (the same single-use credential forwarded by a webhook receiver and by a poller,
/// in differently shaped JSON, is one input); otherwise the SHA-256 of the body. The token itself
/// is never kept.
pub fn identity(body: &[u8], decoded: &Result<Decoded, InputError>) -> Key {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    match decoded {
        Ok(Decoded::Ready(r)) => {
            ctx.update(b"credential\0");
            ctx.update(r.token_value.expose_secret().trim().as_bytes());
        }
        _ => {
            ctx.update(b"body\0");
            ctx.update(body);
        }
    }
    digest(ctx)
}

/// [`identity`] of a raw body, decoded with the `max_bytes` limit (`MAX_MESSAGE_BYTES`).
pub fn input_identity(body: &[u8], max_bytes: usize) -> Key {
    identity(body, &crate::events::decode(body, max_bytes))
}

fn digest(ctx: aws_lc_rs::digest::Context) -> Key {
    let mut k = [0u8; 32];
    k.copy_from_slice(ctx.finish().as_ref());
    k
}

/// A deterministic `message_id`: UUID v5 (RFC 9562 §5.5) of the event type and the input's
/// [`identity`]. The same input, or the same credential in another shape, always gives the
/// same id, so consumers can drop duplicates caused by redelivery.
pub fn output_message_id(event_type: &str, identity: &Key) -> String {
    let mut name = Vec::with_capacity(event_type.len() + 1 + 32);
    name.extend_from_slice(event_type.as_bytes());
    name.push(b':');
    name.extend_from_slice(identity);
    uuid::Uuid::new_v5(&MESSAGE_ID_NAMESPACE, &name).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_the_credential_in_any_shape() {
        let slim = br#"{"provision_id": 1, "token_value": "tok"}"#;
        let wrapped =
            br#"{"PartnerUserProvision": {"id": 1, "credential": {"token_value": " tok "}}}"#;
        let a = input_identity(slim, 1024);
        assert_eq!(a, input_identity(wrapped, 1024));
        assert_ne!(a, input_identity(b"not json", 1024));
        assert_eq!(
            output_message_id("session.created", &a),
            output_message_id("session.created", &a)
        );
        assert_ne!(
            output_message_id("session.created", &a),
            output_message_id("session.failed", &a)
        );
    }
}
