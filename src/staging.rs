//! A `session.created` staged in the credential's record ([`crate::ledger`]) between bunq's
//! answer and the publisher confirm, so a crash in that window costs neither the session nor a
//! second bunq call: the next delivery of the credential publishes what was staged.
//!
//! The record never holds a token in clear: a body whose token is sealed for the consumer
//! (`session_token_jwe`) is kept as it is (`p:` + base64); a body with the token in clear is
//! encrypted at rest (`e:` + base64 of a 96-bit nonce, the AES-256-GCM ciphertext and its tag,
//! NIST SP 800-38D), under a key derived from the installation's private key and bound to the
//! credential's identity (the additional data), so a staged body read for another credential
//! does not open. Only replicas sharing the installation open an `e:` body.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::{Engine, engine::general_purpose::STANDARD};

use crate::identity::Key;

/// Why a staged body could not be read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    /// Encrypted under another installation's key (a replica with another `BUNQ_CONTEXT_FILE`),
    /// for another credential, or damaged.
    #[error(
        "the staged session.created does not open with this replica's key: it was staged by a replica with another bunq installation (share BUNQ_CONTEXT_FILE, or set SESSION_TOKEN_ENCRYPTION_KEY so staged sessions need no key), or it is damaged"
    )]
    Key,
    /// Not a staged body of this format.
    #[error("the credential's record holds a staged session.created of an unknown format")]
    Format,
}

/// Seals and opens staged bodies. `Debug` shows nothing of the key.
pub struct Staging {
    key: LessSafeKey,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Staging")
    }
}

impl Staging {
    /// Keyed by `secret`, 32 bytes derived from the installation's private key.
    pub fn new(secret: &[u8; 32]) -> Self {
        let key = UnboundKey::new(&AES_256_GCM, secret).expect("a 32-byte key fits AES-256-GCM");
        Self {
            key: LessSafeKey::new(key),
        }
    }

    /// The staged form of `body`, a `session.created` of the credential `identity`;
    /// `clear_token` says whether it holds the session token in clear (then it is encrypted).
    pub fn seal(&self, body: &[u8], identity: &Key, clear_token: bool) -> String {
        if !clear_token {
            return format!("p:{}", STANDARD.encode(body));
        }
        let mut nonce = [0u8; NONCE_LEN];
        // Without randomness nothing is staged in clear: an unreadable entry is skipped later.
        if aws_lc_rs::rand::fill(&mut nonce).is_err() {
            return "e:".into();
        }
        let mut sealed = body.to_vec();
        if self
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(identity),
                &mut sealed,
            )
            .is_err()
        {
            return "e:".into();
        }
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        format!("e:{}", STANDARD.encode(out))
    }

    /// The body staged as `staged` for the credential `identity`.
    ///
    /// # Errors
    /// [`Unreadable::Key`] when an encrypted body does not open with this key (another
    /// installation's, another credential's, or damaged); [`Unreadable::Format`] otherwise.
    pub fn open(&self, staged: &str, identity: &Key) -> Result<Vec<u8>, Unreadable> {
        let (kind, b64) = staged.split_once(':').ok_or(Unreadable::Format)?;
        let bytes = STANDARD.decode(b64).map_err(|_| Unreadable::Format)?;
        match kind {
            "p" => Ok(bytes),
            "e" if bytes.len() > NONCE_LEN => {
                let (nonce, sealed) = bytes.split_at(NONCE_LEN);
                let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| Unreadable::Key)?;
                let mut sealed = sealed.to_vec();
                let plain = self
                    .key
                    .open_in_place(nonce, Aad::from(identity), &mut sealed)
                    .map_err(|_| Unreadable::Key)?;
                Ok(plain.to_vec())
            }
            "e" => Err(Unreadable::Key),
            _ => Err(Unreadable::Format),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = br#"{"session_id":1,"session_token":"SESSION-TOKEN-SECRET"}"#;

    #[test]
    fn a_clear_token_is_encrypted_and_opens_only_with_its_key_and_credential() {
        let staging = Staging::new(&[7; 32]);
        let sealed = staging.seal(BODY, &[1; 32], true);
        assert!(sealed.starts_with("e:"), "{sealed}");
        assert!(!sealed.contains("SESSION-TOKEN-SECRET"));
        let decoded = STANDARD.decode(&sealed[2..]).unwrap();
        assert!(!decoded.windows(20).any(|w| w == b"SESSION-TOKEN-SECRET"));
        assert_eq!(staging.open(&sealed, &[1; 32]).unwrap(), BODY);
        assert_eq!(staging.open(&sealed, &[2; 32]), Err(Unreadable::Key));
        assert_eq!(
            Staging::new(&[8; 32]).open(&sealed, &[1; 32]),
            Err(Unreadable::Key),
            "another installation's key"
        );
        assert_ne!(sealed, staging.seal(BODY, &[1; 32], true), "a fresh nonce");
    }

    #[test]
    fn a_sealed_token_is_kept_as_it_is_and_junk_is_unreadable() {
        let staging = Staging::new(&[7; 32]);
        let body = br#"{"session_token_jwe":"a.b.c.d.e"}"#;
        let staged = staging.seal(body, &[1; 32], false);
        assert!(staged.starts_with("p:"));
        assert_eq!(
            Staging::new(&[9; 32]).open(&staged, &[3; 32]).unwrap(),
            body
        );
        for junk in ["", "x", "e:", "e:!!", "z:AAAA", "e:AAAA"] {
            assert!(staging.open(junk, &[1; 32]).is_err(), "{junk}");
        }
    }
}
