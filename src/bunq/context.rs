//! The API context: the worker's RSA key pair, its installation token and bunq's server public
//! key. Created once with `POST /installation` and reused for every later call.
//!
//! Source: <https://doc.bunq.com/basics/authentication/installation>; bunq swagger.json
//! `paths./installation`.

use std::{fmt, io::Write, path::Path};

use aws_lc_rs::{
    digest,
    encoding::AsDer,
    rsa::{KeyPair, KeySize},
    signature::KeyPair as _,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Errors loading, creating or saving an API context. Messages name files and fields, never
/// key material or tokens.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// The context file exists but cannot be read or parsed.
    #[error("BUNQ_CONTEXT_FILE {path}: {detail}")]
    File {
        /// The file's path.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// A key does not parse.
    #[error("{0}")]
    Key(String),
    /// The context could not be written.
    #[error("cannot save BUNQ_CONTEXT_FILE {path}: {source}")]
    Save {
        /// The file's path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The worker's installation with bunq. `Debug` shows only the public key's fingerprint.
pub struct ApiContext {
    key_pair: KeyPair,
    public_key_pem: String,
    public_key_sha256: String,
    installation_token: SecretString,
    server_public_key: aws_lc_rs::signature::ParsedPublicKey,
    api_url: Option<String>,
}

impl fmt::Debug for ApiContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiContext")
            .field("public_key_sha256", &self.public_key_sha256)
            .finish_non_exhaustive()
    }
}

/// The on-disk form (JSON, mode 0600), also what the three `BUNQ_*` context env vars hold.
#[derive(Serialize, Deserialize)]
struct StoredContext {
    client_private_key: String,
    installation_token: String,
    server_public_key: String,
    /// The `BUNQ_API_URL` the installation was made with; absent in files from before it was
    /// recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api_url: Option<String>,
}

/// A fresh RSA-2048 key pair that has no installation yet.
pub struct NewKeyPair {
    key_pair: KeyPair,
    /// The public key, PEM `-----BEGIN PUBLIC KEY-----` (SubjectPublicKeyInfo), as sent in
    /// `client_public_key`.
    pub public_key_pem: String,
}

impl fmt::Debug for NewKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NewKeyPair(..)")
    }
}

impl NewKeyPair {
    /// Generates an RSA-2048 key pair.
    ///
    /// # Errors
    /// [`ContextError::Key`] if aws-lc cannot generate the key.
    pub fn generate() -> Result<Self, ContextError> {
        let key_pair = KeyPair::generate(KeySize::Rsa2048)
            .map_err(|_| ContextError::Key("cannot generate an RSA-2048 key pair".into()))?;
        let public_key_pem = public_pem(&key_pair)?;
        Ok(Self {
            key_pair,
            public_key_pem,
        })
    }

    /// Completes the context with `POST /installation`'s answer.
    ///
    /// # Errors
    /// [`ContextError::Key`] when the server public key is not a PEM RSA public key.
    pub fn into_context(
        self,
        installation_token: SecretString,
        server_public_key_pem: &str,
    ) -> Result<ApiContext, ContextError> {
        ApiContext::new(self.key_pair, installation_token, server_public_key_pem)
    }
}

fn public_pem(key_pair: &KeyPair) -> Result<String, ContextError> {
    let der = key_pair
        .public_key()
        .as_der()
        .map_err(|_| ContextError::Key("cannot encode the client public key".into()))?;
    Ok(pem::encode(&pem::Pem::new(
        "PUBLIC KEY",
        der.as_ref().to_vec(),
    )))
}

fn parse_pem(label: &str, what: &str, text: &str) -> Result<Vec<u8>, ContextError> {
    let p = pem::parse(text.trim()).map_err(|_| ContextError::Key(format!("{what} is not PEM")))?;
    if p.tag() != label {
        return Err(ContextError::Key(format!(
            "{what} is PEM {:?}, expected {label:?}",
            p.tag()
        )));
    }
    Ok(p.into_contents())
}

impl ApiContext {
    fn new(
        key_pair: KeyPair,
        installation_token: SecretString,
        server_public_key_pem: &str,
    ) -> Result<Self, ContextError> {
        let server_public_key_der =
            parse_pem("PUBLIC KEY", "server public key", server_public_key_pem)?;
        // Reject a key aws-lc cannot use now rather than on every response.
        let server_public_key =
            super::signing::public_key(&server_public_key_der).map_err(|_| {
                ContextError::Key(
                    "server public key is not an RSA public key of 2048 to 8192 bits".into(),
                )
            })?;
        // Secret files often end in a newline; a token is never meant to hold whitespace.
        let installation_token = SecretString::from(installation_token.expose_secret().trim());
        if installation_token.expose_secret().is_empty() {
            return Err(ContextError::Key("installation token is empty".into()));
        }
        // It is sent as X-Bunq-Client-Authentication: a value no header can carry would fail
        // every call, so refuse it here rather than save it.
        if reqwest::header::HeaderValue::from_str(installation_token.expose_secret()).is_err() {
            return Err(ContextError::Key(
                "installation token holds characters an HTTP header cannot carry".into(),
            ));
        }
        let spki = key_pair
            .public_key()
            .as_der()
            .map_err(|_| ContextError::Key("cannot encode the client public key".into()))?;
        let public_key_sha256 = hex::encode(digest::digest(&digest::SHA256, spki.as_ref()));
        Ok(Self {
            public_key_pem: public_pem(&key_pair)?,
            key_pair,
            public_key_sha256,
            installation_token,
            server_public_key,
            api_url: None,
        })
    }

    /// A 32-byte secret derived from the private key, for sealing the worker's own message
    /// headers: every replica with this context has it, nobody without the key can compute it.
    pub fn bookkeeping_key(&self) -> [u8; 32] {
        let der = self
            .key_pair
            .as_der()
            .map(|d| d.as_ref().to_vec())
            .unwrap_or_default();
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"bunq-session-worker bookkeeping seal\0");
        ctx.update(&der);
        let mut k = [0u8; 32];
        k.copy_from_slice(ctx.finish().as_ref());
        k
    }

    /// The key that encrypts a staged `session.created` at rest ([`crate::staging`]): SHA-256
    /// of a label and the private key's DER, so only replicas with this installation open it.
    pub fn staging_key(&self) -> [u8; 32] {
        let der = self
            .key_pair
            .as_der()
            .map(|d| d.as_ref().to_vec())
            .unwrap_or_default();
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"bunq-session-worker staged session\0");
        ctx.update(&der);
        let mut k = [0u8; 32];
        k.copy_from_slice(ctx.finish().as_ref());
        k
    }

    /// The bunq base URL (`BUNQ_API_URL`) this installation was made with, when known.
    pub fn api_url(&self) -> Option<&str> {
        self.api_url.as_deref()
    }

    /// Records the bunq base URL this installation belongs to (saved with the context).
    pub fn set_api_url(&mut self, url: &str) {
        self.api_url = Some(url.trim_end_matches('/').to_owned());
    }

    /// Builds a context from its three parts as PEM / text (the env var form).
    ///
    /// # Errors
    /// [`ContextError::Key`] when the private key is not PEM PKCS#8 RSA (`-----BEGIN PRIVATE
    /// KEY-----`), the server key is not PEM RSA, or the token is empty.
    pub fn from_parts(
        client_private_key_pem: &SecretString,
        installation_token: SecretString,
        server_public_key_pem: &str,
    ) -> Result<Self, ContextError> {
        let der = parse_pem(
            "PRIVATE KEY",
            "client private key",
            client_private_key_pem.expose_secret(),
        )?;
        let key_pair = KeyPair::from_pkcs8(&der)
            .map_err(|_| ContextError::Key("client private key is not an RSA PKCS#8 key".into()))?;
        Self::new(key_pair, installation_token, server_public_key_pem)
    }

    /// Reads a context file written by [`ApiContext::save`]. `Ok(None)` when it does not exist.
    ///
    /// # Errors
    /// [`ContextError::File`] when it cannot be read or is not the expected JSON;
    /// [`ContextError::Key`] as in [`ApiContext::from_parts`].
    pub fn load(path: &Path) -> Result<Option<Self>, ContextError> {
        let file_err = |detail: String| ContextError::File {
            path: path.display().to_string(),
            detail,
        };
        #[cfg(unix)]
        if let Ok(meta) = std::fs::metadata(path) {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{:o}", meta.permissions().mode() & 0o777),
                    "BUNQ_CONTEXT_FILE is readable by others than its owner; it holds the private key and installation token: chmod 600 it"
                );
            }
        }
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(file_err(e.to_string())),
        };
        let stored: StoredContext = serde_json::from_str(&text).map_err(|e| {
            file_err(format!(
                "not a context file (expected client_private_key, installation_token, server_public_key) at line {} column {}",
                e.line(),
                e.column()
            ))
        })?;
        let mut ctx = Self::from_parts(
            &SecretString::from(stored.client_private_key),
            SecretString::from(stored.installation_token),
            &stored.server_public_key,
        )?;
        ctx.api_url = stored.api_url;
        Ok(Some(ctx))
    }

    /// Writes the context to `path` with mode 0600, atomically (temporary file, then rename).
    ///
    /// # Errors
    /// [`ContextError::Save`] on any I/O error.
    pub fn save(&self, path: &Path) -> Result<(), ContextError> {
        let save_err = |source| ContextError::Save {
            path: path.display().to_string(),
            source,
        };
        let private_der = self
            .key_pair
            .as_der()
            .map_err(|_| ContextError::Key("cannot encode the client private key".into()))?;
        let stored = StoredContext {
            client_private_key: pem::encode(&pem::Pem::new(
                "PRIVATE KEY",
                private_der.as_ref().to_vec(),
            )),
            installation_token: self.installation_token.expose_secret().to_owned(),
            server_public_key: pem::encode(&pem::Pem::new(
                "PUBLIC KEY",
                self.server_public_key_der().to_vec(),
            )),
            api_url: self.api_url.clone(),
        };
        let json = serde_json::to_vec_pretty(&stored).map_err(|e| save_err(e.into()))?;
        // A new file with an unguessable name: an existing file (with looser permissions, or a
        // link planted by someone else) is never reused.
        let tmp = path.with_extension(format!("{}.tmp", uuid::Uuid::new_v4().simple()));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let write = || -> std::io::Result<()> {
            let mut f = opts.open(&tmp)?;
            #[cfg(unix)]
            {
                // The umask can only remove bits; set the mode explicitly all the same.
                use std::os::unix::fs::PermissionsExt;
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            save_err(e)
        })
    }

    /// The RSA key pair that signs requests.
    pub fn key_pair(&self) -> &KeyPair {
        &self.key_pair
    }

    /// The client public key as PEM.
    pub fn public_key_pem(&self) -> &str {
        &self.public_key_pem
    }

    /// Lower-case hex SHA-256 of the client public key's DER SubjectPublicKeyInfo.
    pub fn public_key_sha256(&self) -> &str {
        &self.public_key_sha256
    }

    /// The installation token (`X-Bunq-Client-Authentication` for device-server and
    /// session-server).
    pub fn installation_token(&self) -> &SecretString {
        &self.installation_token
    }

    /// bunq's server public key, DER SubjectPublicKeyInfo.
    pub fn server_public_key_der(&self) -> &[u8] {
        self.server_public_key.as_ref()
    }

    /// bunq's server public key, parsed for [`super::signing::verify`].
    pub fn server_public_key(&self) -> &aws_lc_rs::signature::ParsedPublicKey {
        &self.server_public_key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_key_pem() -> String {
        NewKeyPair::generate().unwrap().public_key_pem
    }

    #[test]
    fn save_then_load_round_trips_with_mode_0600() {
        let dir = std::env::temp_dir().join(format!("ctx-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctx.json");
        let ctx = NewKeyPair::generate()
            .unwrap()
            .into_context(SecretString::from("install-token"), &server_key_pem())
            .unwrap();
        ctx.save(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let loaded = ApiContext::load(&path).unwrap().unwrap();
        assert_eq!(loaded.public_key_sha256(), ctx.public_key_sha256());
        assert_eq!(loaded.installation_token().expose_secret(), "install-token");
        assert_eq!(loaded.server_public_key_der(), ctx.server_public_key_der());
        assert!(!format!("{loaded:?}").contains("install-token"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn saving_over_a_world_readable_file_leaves_it_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ctx-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctx.json");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(dir.join("ctx.tmp"), "planted").unwrap();
        let ctx = NewKeyPair::generate()
            .unwrap()
            .into_context(SecretString::from("install-token"), &server_key_pem())
            .unwrap();
        ctx.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_to_string(dir.join("ctx.tmp")).unwrap(),
            "planted"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_file_is_none_and_garbage_is_an_error() {
        let path = std::env::temp_dir().join(format!("absent-{}.json", uuid::Uuid::new_v4()));
        assert!(ApiContext::load(&path).unwrap().is_none());
        std::fs::write(&path, "{\"client_private_key\": \"x\"").unwrap();
        let e = ApiContext::load(&path).unwrap_err().to_string();
        assert!(e.contains("not a context file"), "{e}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn installation_tokens_are_trimmed_and_must_fit_a_header() {
        let server = server_key_pem();
        let ctx = NewKeyPair::generate()
            .unwrap()
            .into_context(SecretString::from("tok-123\n"), &server)
            .unwrap();
        assert_eq!(ctx.installation_token().expose_secret(), "tok-123");
        let e = NewKeyPair::generate()
            .unwrap()
            .into_context(SecretString::from("INSTALL-TOK\nSECRET-77"), &server)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "installation token holds characters an HTTP header cannot carry"
        );
        assert!(!e.contains("SECRET-77"));
    }

    #[test]
    fn bad_keys_are_named() {
        let e = ApiContext::from_parts(
            &SecretString::from("garbage"),
            SecretString::from("t"),
            &server_key_pem(),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "client private key is not PEM");
        let e = NewKeyPair::generate()
            .unwrap()
            .into_context(
                SecretString::from("t"),
                "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            )
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("server public key is not an RSA"), "{e}");
    }
}
