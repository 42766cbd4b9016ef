//! Sealing a secret for its consumer: JWE compact serialization (RFC 7516 §7.1) with `enc`
//! `A256GCM` (RFC 7518 §5.3), the content key encrypted for the consumer's public key:
//! `RSA-OAEP-256` (RFC 7518 §4.3) for an RSA key of 2048 bits or more, `ECDH-ES+A256KW`
//! (RFC 7518 §4.6, Concat KDF, then AES Key Wrap, RFC 3394) for a P-256 key. The protected
//! header's `kid` is the key's JWK thumbprint (RFC 7638). Every primitive is aws-lc-rs's; this
//! module only lays the bytes out. The consumer opens it with any JOSE library.

use aws_lc_rs::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    agreement::{self, ECDH_P256, UnparsedPublicKey},
    digest,
    error::Unspecified,
    key_wrap::{AES_256, KeyEncryptionKey, KeyWrap},
    rsa::{OAEP_SHA256_MGF1SHA256, OaepPublicEncryptingKey, PublicEncryptingKey},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};

/// The smallest RSA key accepted, bits (RFC 7518 §4.3 requires 2048).
pub const MIN_RSA_BITS: usize = 2048;

/// Why a PEM is not a consumer key.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not a `-----BEGIN PUBLIC KEY-----` block (SubjectPublicKeyInfo, RFC 5280 §4.1).
    #[error(
        "expected a PEM public key (-----BEGIN PUBLIC KEY-----, SubjectPublicKeyInfo), found {0}"
    )]
    NotPublicKeyPem(String),
    /// An RSA key shorter than [`MIN_RSA_BITS`].
    #[error("an RSA key of {0} bits: at least 2048 are needed")]
    RsaTooShort(usize),
    /// An EC key on another curve than P-256.
    #[error("an EC key on another curve than P-256 (only P-256 is accepted)")]
    OtherCurve,
    /// Another kind of key (Ed25519, DSA, …) or a damaged one.
    #[error("neither an RSA key (2048 bits or more) nor a P-256 EC key, or a damaged one")]
    Unsupported,
}

/// Sealing failed: the system's random source or a primitive failed (never the input's fault).
#[derive(Debug, thiserror::Error)]
#[error("sealing failed in the cryptographic library")]
pub struct SealError;

impl From<Unspecified> for SealError {
    fn from(_: Unspecified) -> Self {
        SealError
    }
}

enum Kind {
    Rsa(OaepPublicEncryptingKey),
    /// The uncompressed point, `04 || x || y`, 65 bytes.
    P256(Vec<u8>),
}

/// The consumer's public key, ready to seal. `Debug` shows `alg` and `kid`.
pub struct ConsumerKey {
    kind: Kind,
    kid: String,
}

impl std::fmt::Debug for ConsumerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerKey")
            .field("alg", &self.alg())
            .field("kid", &self.kid)
            .finish()
    }
}

const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const PRIME256V1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

impl ConsumerKey {
    /// Reads a PEM SubjectPublicKeyInfo (RFC 5280 §4.1.2.7): RSA (RFC 8017 `RSAPublicKey`) of
    /// at least 2048 bits, or EC P-256 (RFC 5480, uncompressed point).
    ///
    /// # Errors
    /// [`KeyError`] saying what was found: not PEM or another PEM label, an RSA key under 2048
    /// bits, another curve, or another kind of key.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let block = pem::parse(pem.trim()).map_err(|_| {
            KeyError::NotPublicKeyPem(if pem.trim().is_empty() {
                "an empty file".into()
            } else {
                "no PEM block".into()
            })
        })?;
        if block.tag() != "PUBLIC KEY" {
            return Err(KeyError::NotPublicKeyPem(format!(
                "a {} block",
                block.tag()
            )));
        }
        let spki = block.contents();
        let Spki {
            algorithm,
            parameter,
            key,
        } = read_spki(spki).ok_or(KeyError::Unsupported)?;
        match algorithm {
            RSA_ENCRYPTION => {
                let mut rsa = Der(key);
                let mut fields = Der(rsa.read(0x30).ok_or(KeyError::Unsupported)?);
                let n = unsigned(fields.read(0x02).ok_or(KeyError::Unsupported)?);
                let e = unsigned(fields.read(0x02).ok_or(KeyError::Unsupported)?);
                let bits = n.len() * 8 - n.first().map_or(8, |b| b.leading_zeros() as usize);
                if bits < MIN_RSA_BITS {
                    return Err(KeyError::RsaTooShort(bits));
                }
                let public =
                    PublicEncryptingKey::from_der(spki).map_err(|_| KeyError::Unsupported)?;
                let public =
                    OaepPublicEncryptingKey::new(public).map_err(|_| KeyError::Unsupported)?;
                let kid = thumbprint(&format!(
                    r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
                    B64.encode(e),
                    B64.encode(n)
                ));
                Ok(Self {
                    kind: Kind::Rsa(public),
                    kid,
                })
            }
            EC_PUBLIC_KEY if parameter != Some(PRIME256V1) => Err(KeyError::OtherCurve),
            EC_PUBLIC_KEY => {
                if key.len() != 65 || key[0] != 0x04 {
                    return Err(KeyError::Unsupported);
                }
                // The point must be on the curve: aws-lc-rs checks it when parsing.
                let parsed: Result<agreement::ParsedPublicKey, _> =
                    (&UnparsedPublicKey::new(&ECDH_P256, key)).try_into();
                if parsed.is_err() {
                    return Err(KeyError::Unsupported);
                }
                Ok(Self {
                    kid: thumbprint(&ec_jwk(key)),
                    kind: Kind::P256(key.to_vec()),
                })
            }
            _ => Err(KeyError::Unsupported),
        }
    }

    /// The key's RFC 7638 JWK thumbprint: base64url (no padding) of the SHA-256 of its
    /// required members in lexicographic order.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWE `alg`: `RSA-OAEP-256` or `ECDH-ES+A256KW`.
    pub fn alg(&self) -> &'static str {
        match self.kind {
            Kind::Rsa(_) => "RSA-OAEP-256",
            Kind::P256(_) => "ECDH-ES+A256KW",
        }
    }

    /// `plaintext` sealed for this key: the JWE compact serialization
    /// `header.encrypted_key.iv.ciphertext.tag`, each part base64url without padding; a fresh
    /// 256-bit content key and 96-bit IV every time.
    ///
    /// # Errors
    /// [`SealError`] when the random source or a primitive fails.
    pub fn seal(&self, plaintext: &[u8]) -> Result<String, SealError> {
        let mut cek = [0u8; 32];
        aws_lc_rs::rand::fill(&mut cek)?;
        let (header, encrypted_key) = match &self.kind {
            Kind::Rsa(public) => {
                let mut out = vec![0u8; public.ciphertext_size()];
                let ek = public.encrypt(&OAEP_SHA256_MGF1SHA256, &cek, &mut out, None)?;
                let header = format!(
                    r#"{{"alg":"RSA-OAEP-256","enc":"A256GCM","kid":"{}"}}"#,
                    self.kid
                );
                (header, ek.to_vec())
            }
            Kind::P256(point) => {
                let ephemeral = agreement::PrivateKey::generate(&ECDH_P256)?;
                let epk = ephemeral.compute_public_key()?;
                let kek = agreement::agree(
                    &ephemeral,
                    UnparsedPublicKey::new(&ECDH_P256, point),
                    Unspecified,
                    |z| Ok(concat_kdf(z, b"ECDH-ES+A256KW", b"", b"", 256)),
                )?;
                let mut out = [0u8; 40];
                let ek = KeyEncryptionKey::new(&AES_256, &kek)?.wrap(&cek, &mut out)?;
                let header = format!(
                    r#"{{"alg":"ECDH-ES+A256KW","enc":"A256GCM","epk":{},"kid":"{}"}}"#,
                    ec_jwk(epk.as_ref()),
                    self.kid
                );
                (header, ek.to_vec())
            }
        };
        let header = B64.encode(header);
        let mut iv = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut iv)?;
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &cek)?);
        let mut ciphertext = plaintext.to_vec();
        let tag = key.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(iv),
            Aad::from(header.as_bytes()),
            &mut ciphertext,
        )?;
        Ok([
            header,
            B64.encode(encrypted_key),
            B64.encode(iv),
            B64.encode(ciphertext),
            B64.encode(tag.as_ref()),
        ]
        .join("."))
    }
}

/// The Concat KDF of RFC 7518 §4.6.2 (NIST SP 800-56A §5.8.1, SHA-256): `keydatalen` bits
/// derived from the shared secret `z`, with the algorithm id and the party infos each
/// length-prefixed (32-bit big-endian) and `SuppPubInfo` the key length in bits.
pub(crate) fn concat_kdf(z: &[u8], alg: &[u8], apu: &[u8], apv: &[u8], keydatalen: u32) -> Vec<u8> {
    let want = keydatalen as usize / 8;
    let mut out = Vec::with_capacity(want + 32);
    let mut round: u32 = 1;
    while out.len() < want {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(&round.to_be_bytes());
        ctx.update(z);
        for part in [alg, apu, apv] {
            ctx.update(&(part.len() as u32).to_be_bytes());
            ctx.update(part);
        }
        ctx.update(&keydatalen.to_be_bytes());
        out.extend_from_slice(ctx.finish().as_ref());
        round += 1;
    }
    out.truncate(want);
    out
}

/// `{"crv":"P-256","kty":"EC","x":…,"y":…}` of an uncompressed point (members in RFC 7638's
/// order, so it serves the thumbprint and the `epk` alike).
fn ec_jwk(point: &[u8]) -> String {
    let (x, y) = point[1..].split_at(32);
    format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        B64.encode(x),
        B64.encode(y)
    )
}

fn thumbprint(jwk: &str) -> String {
    B64.encode(digest::digest(&digest::SHA256, jwk.as_bytes()))
}

/// An integer's magnitude without its leading zero bytes.
fn unsigned(int: &[u8]) -> &[u8] {
    let first = int.iter().position(|b| *b != 0).unwrap_or(int.len());
    &int[first..]
}

/// What a SubjectPublicKeyInfo holds (RFC 5280 §4.1.2.7).
struct Spki<'a> {
    /// The algorithm's OID, DER content bytes.
    algorithm: &'a [u8],
    /// Its parameter when that is an OID (the named curve of an EC key).
    parameter: Option<&'a [u8]>,
    /// The key bits.
    key: &'a [u8],
}

fn read_spki(spki: &[u8]) -> Option<Spki<'_>> {
    let mut outer = Der(spki);
    let mut info = Der(outer.read(0x30)?);
    let mut algorithm = Der(info.read(0x30)?);
    let oid = algorithm.read(0x06)?;
    let parameter = algorithm.read(0x06);
    let bits = info.read(0x03)?;
    let (&unused, key) = bits.split_first()?;
    (unused == 0).then_some(Spki {
        algorithm: oid,
        parameter,
        key,
    })
}

/// A cursor over DER (X.690 §8.1): reads one element of an expected tag.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn read(&mut self, tag: u8) -> Option<&'a [u8]> {
        let (&t, rest) = self.0.split_first()?;
        if t != tag {
            return None;
        }
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |l, b| l << 8 | usize::from(*b));
            rest = &rest[n..];
            len
        };
        if rest.len() < len {
            return None;
        }
        let (value, after) = rest.split_at(len);
        self.0 = after;
        Some(value)
    }
}

#[cfg(test)]
mod tests;
