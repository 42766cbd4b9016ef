//! Sealing a secret for its consumer: JWE compact serialization (RFC 7516 §7.1) with `enc`
//! `A256GCM` (RFC 7518 §5.3), the content key encrypted for the consumer's public key:
//! `RSA-OAEP-256` (RFC 7518 §4.3) for an RSA key of 2048 to 8192 bits, `ECDH-ES+A256KW`
//! (RFC 7518 §4.6: ECDH on P-256, Concat KDF, then AES Key Wrap, RFC 3394) for a P-256 key.
//! The protected header's `kid` is the key's JWK thumbprint (RFC 7638). Every primitive is
//! aws-lc-rs's; this module only reads the key and lays the bytes out. The consumer opens the
//! result with any JOSE library (`tests/jwe_interop.py` does with joserfc).

use aws_lc_rs::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    agreement::{self, ECDH_P256, EphemeralPrivateKey, UnparsedPublicKey},
    digest,
    error::Unspecified,
    key_wrap::{AES_256, KeyEncryptionKey, KeyWrap},
    rand::{self, SystemRandom},
    rsa::{OAEP_SHA256_MGF1SHA256, OaepPublicEncryptingKey, PublicEncryptingKey},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};

/// The smallest RSA modulus accepted, in bits (RFC 7518 §4.3 requires 2048).
pub const MIN_RSA_BITS: usize = 2048;
/// The largest RSA modulus accepted, in bits (aws-lc-rs's limit for RSA-OAEP).
pub const MAX_RSA_BITS: usize = 8192;

const ACCEPTED: &str = "accepted: a PEM `-----BEGIN PUBLIC KEY-----` block (SubjectPublicKeyInfo) \
     holding an RSA key of 2048 to 8192 bits or an EC P-256 key";

/// Why [`ConsumerKey::from_pem`] refused its input. Each message says what was found and what
/// is accepted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// No PEM block could be read (RFC 7468 §2): empty input, no `-----BEGIN …-----` /
    /// `-----END …-----` lines, mismatched labels, or base64 that does not decode.
    #[error("found {0}, not PEM; {accepted}", accepted = ACCEPTED)]
    NotPem(String),
    /// A PEM block labelled other than `PUBLIC KEY` (RFC 7468 §13), e.g. `PRIVATE KEY`,
    /// `CERTIFICATE` or PKCS#1's `RSA PUBLIC KEY`; holds the label.
    #[error("found a PEM `{0}` block; {accepted}", accepted = ACCEPTED)]
    NotPublicKey(String),
    /// A `PUBLIC KEY` block whose DER cannot be read as the key it claims to be (RFC 5280
    /// §4.1.2.7, RFC 8017 §A.1.1, RFC 5480 §2.2); says what was wrong.
    #[error("found a public key that cannot be read: {0}; {accepted}", accepted = ACCEPTED)]
    Unreadable(&'static str),
    /// An RSA key whose modulus has fewer than [`MIN_RSA_BITS`] or more than [`MAX_RSA_BITS`]
    /// bits; holds its size.
    #[error("found an RSA key of {0} bits; {accepted}", accepted = ACCEPTED)]
    RsaSize(usize),
    /// An EC key on a curve other than P-256; holds the curve's name (or OID).
    #[error("found an EC key on {0}; {accepted}", accepted = ACCEPTED)]
    OtherCurve(String),
    /// A key of another algorithm (Ed25519, X25519, DSA, RSASSA-PSS, …); holds its name (or OID).
    #[error("found a key of algorithm {0}; {accepted}", accepted = ACCEPTED)]
    OtherAlgorithm(String),
}

/// Sealing failed in aws-lc-rs (its random source, RSA-OAEP, ECDH, key wrap or AES-GCM):
/// never the input's fault, and not expected to happen.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("sealing failed in the cryptographic library (aws-lc-rs)")]
pub struct SealError;

impl From<Unspecified> for SealError {
    fn from(_: Unspecified) -> Self {
        SealError
    }
}

enum Kind {
    Rsa(OaepPublicEncryptingKey),
    /// The uncompressed point, `04 || x || y`, 65 bytes, checked on the curve.
    P256(Vec<u8>),
}

/// The consumer's public key, checked and ready to seal for: RSA (2048 to 8192 bits) or EC
/// P-256. Built by [`ConsumerKey::from_pem`]; `Debug` shows only `alg` and `kid`.
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

// OIDs, DER content bytes (X.690 §8.19).
const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const PRIME256V1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// Other algorithms and curves a `SubjectPublicKeyInfo` commonly names, for the error messages.
const KNOWN: &[(&[u8], &str)] = &[
    (&[0x2b, 0x65, 0x6e], "X25519"),
    (&[0x2b, 0x65, 0x6f], "X448"),
    (&[0x2b, 0x65, 0x70], "Ed25519"),
    (&[0x2b, 0x65, 0x71], "Ed448"),
    (&[0x2a, 0x86, 0x48, 0xce, 0x38, 0x04, 0x01], "DSA"),
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a],
        "RSASSA-PSS",
    ),
    (&[0x2b, 0x81, 0x04, 0x00, 0x0a], "secp256k1"),
    (&[0x2b, 0x81, 0x04, 0x00, 0x22], "P-384 (secp384r1)"),
    (&[0x2b, 0x81, 0x04, 0x00, 0x23], "P-521 (secp521r1)"),
];

impl ConsumerKey {
    /// Reads the consumer's public key from a PEM block (RFC 7468 §13) labelled `PUBLIC KEY`
    /// holding a DER `SubjectPublicKeyInfo` (RFC 5280 §4.1.2.7): `rsaEncryption` with an
    /// `RSAPublicKey` (RFC 8017 §A.1.1) of 2048 to 8192 bits, sealed with `RSA-OAEP-256`; or
    /// `id-ecPublicKey` on `prime256v1` (RFC 5480 §2.1.1) with an uncompressed point on the
    /// curve, sealed with `ECDH-ES+A256KW`. Text around the block is ignored.
    ///
    /// # Errors
    /// - [`KeyError::NotPem`]: empty input, no PEM block, damaged base64.
    /// - [`KeyError::NotPublicKey`]: another label (a private key, a certificate, PKCS#1).
    /// - [`KeyError::Unreadable`]: DER that is not a `SubjectPublicKeyInfo` or not the key its
    ///   algorithm says, a compressed EC point, a point off the curve.
    /// - [`KeyError::RsaSize`]: an RSA modulus under 2048 or over 8192 bits.
    /// - [`KeyError::OtherCurve`]: an EC key on another curve than P-256.
    /// - [`KeyError::OtherAlgorithm`]: any other algorithm (Ed25519, X25519, DSA, …).
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let block = pem::parse(pem).map_err(|e| {
            KeyError::NotPem(match e {
                _ if pem.trim().is_empty() => "an empty input".into(),
                pem::PemError::MalformedFraming | pem::PemError::MissingBeginTag => {
                    "no `-----BEGIN …-----` … `-----END …-----` block".into()
                }
                other => format!("a damaged PEM block ({other})"),
            })
        })?;
        if block.tag() != "PUBLIC KEY" {
            return Err(KeyError::NotPublicKey(block.tag().to_owned()));
        }
        let spki = block.contents();
        let (algorithm, parameter, key) =
            read_spki(spki).ok_or(KeyError::Unreadable("not a DER SubjectPublicKeyInfo"))?;
        match algorithm {
            RSA_ENCRYPTION => {
                let (n, e) =
                    read_rsa(key).ok_or(KeyError::Unreadable("not a DER RSAPublicKey (n, e)"))?;
                // `n` has no leading zero byte, so its first byte holds its top bit.
                let bits = n
                    .first()
                    .map_or(0, |b| n.len() * 8 - b.leading_zeros() as usize);
                if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
                    return Err(KeyError::RsaSize(bits));
                }
                let refused = || KeyError::Unreadable("an RSA key aws-lc-rs refuses");
                let public = PublicEncryptingKey::from_der(spki).map_err(|_| refused())?;
                let public = OaepPublicEncryptingKey::new(public).map_err(|_| refused())?;
                let jwk = format!(
                    r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
                    B64.encode(e),
                    B64.encode(n)
                );
                Ok(Self {
                    kind: Kind::Rsa(public),
                    kid: thumbprint(&jwk),
                })
            }
            EC_PUBLIC_KEY => match parameter {
                Some(PRIME256V1) if key.len() == 65 && key[0] == 0x04 => {
                    // aws-lc-rs checks that the point is on the curve.
                    let point = UnparsedPublicKey::new(&ECDH_P256, key);
                    agreement::ParsedPublicKey::try_from(&point)
                        .map_err(|_| KeyError::Unreadable("a point that is not on P-256"))?;
                    Ok(Self {
                        kid: thumbprint(&ec_jwk(key)),
                        kind: Kind::P256(key.to_vec()),
                    })
                }
                Some(PRIME256V1) => Err(KeyError::Unreadable(
                    "a P-256 point not in uncompressed form (65 bytes, 04 || x || y)",
                )),
                Some(curve) => Err(KeyError::OtherCurve(name(curve))),
                None => Err(KeyError::OtherCurve("a curve not named by an OID".into())),
            },
            other => Err(KeyError::OtherAlgorithm(name(other))),
        }
    }

    /// The key's JWK thumbprint (RFC 7638 §3): SHA-256 of the required members in
    /// lexicographic order without whitespace (`{"e","kty","n"}` for RSA, `{"crv","kty","x",
    /// "y"}` for EC), as 43 characters of base64url without padding. Sent as the header's `kid`.
    #[must_use]
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWE `alg` (RFC 7518 §4.1) this key is sealed with: `RSA-OAEP-256` (§4.3) or
    /// `ECDH-ES+A256KW` (§4.6).
    #[must_use]
    pub fn alg(&self) -> &'static str {
        match self.kind {
            Kind::Rsa(_) => "RSA-OAEP-256",
            Kind::P256(_) => "ECDH-ES+A256KW",
        }
    }

    /// `plaintext` sealed for this key as a JWE compact serialization (RFC 7516 §7.1):
    /// `BASE64URL(header).BASE64URL(encrypted key).BASE64URL(iv).BASE64URL(ciphertext).
    /// BASE64URL(tag)`, base64url without padding. The protected header is
    /// `{"alg","enc":"A256GCM","kid"}`, plus `epk` (the ephemeral P-256 public key as a JWK)
    /// for `ECDH-ES+A256KW`. A fresh 32-byte content key encrypts the plaintext with
    /// AES-256-GCM (RFC 7518 §5.3: 96-bit random IV, the encoded header as AAD, 128-bit tag);
    /// the content key is encrypted with RSA-OAEP, SHA-256 and MGF1-SHA-256 (RFC 7518 §4.3),
    /// or wrapped with AES Key Wrap (RFC 3394) under the Concat KDF of an ephemeral-static
    /// ECDH (RFC 7518 §4.6.2, no `apu`/`apv`). Two seals of the same plaintext differ.
    ///
    /// # Errors
    /// [`SealError`] when the random source or an aws-lc-rs primitive fails.
    pub fn seal(&self, plaintext: &[u8]) -> Result<String, SealError> {
        let mut cek = [0u8; 32];
        rand::fill(&mut cek)?;
        // Every value below is base64url or a fixed name: nothing needs JSON escaping.
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
                let ephemeral = EphemeralPrivateKey::generate(&ECDH_P256, &SystemRandom::new())?;
                let epk = ephemeral.compute_public_key()?;
                let kek = agreement::agree_ephemeral(
                    ephemeral,
                    UnparsedPublicKey::new(&ECDH_P256, point),
                    SealError,
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
        rand::fill(&mut iv)?;
        let mut ciphertext = plaintext.to_vec();
        let tag = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &cek)?)
            .seal_in_place_separate_tag(
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

/// The Concat KDF of RFC 7518 §4.6.2 (NIST SP 800-56A §5.8.1 with SHA-256): `keydatalen` bits
/// (a multiple of 8) derived from the shared secret `z`; `OtherInfo` is the algorithm id and
/// the party infos `apu`, `apv`, each prefixed with its length (32-bit big-endian), then
/// `keydatalen` (32-bit big-endian) as `SuppPubInfo`.
fn concat_kdf(z: &[u8], alg: &[u8], apu: &[u8], apv: &[u8], keydatalen: u32) -> Vec<u8> {
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

/// `{"crv":"P-256","kty":"EC","x":…,"y":…}` of an uncompressed 65-byte point: RFC 7638's
/// member order, so it serves the thumbprint and the `epk` alike.
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

/// A `SubjectPublicKeyInfo`'s (RFC 5280 §4.1.2.7) algorithm OID, its parameter when that is
/// an OID (an EC key's named curve), and the key bits, as DER content bytes.
type Spki<'a> = (&'a [u8], Option<&'a [u8]>, &'a [u8]);

/// `None` unless `spki` is exactly one DER `SubjectPublicKeyInfo`.
fn read_spki(spki: &[u8]) -> Option<Spki<'_>> {
    let mut info = Der(Der(spki).only(0x30)?);
    let mut algorithm = Der(info.read(0x30)?);
    let oid = algorithm.read(0x06)?;
    let parameter = algorithm.read(0x06);
    let (&unused, key) = info.read(0x03)?.split_first()?;
    (unused == 0 && info.0.is_empty()).then_some((oid, parameter, key))
}

/// `n` and `e` of an `RSAPublicKey` (RFC 8017 §A.1.1), big-endian without leading zero bytes.
fn read_rsa(key: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut fields = Der(Der(key).only(0x30)?);
    let (n, e) = (fields.read(0x02)?, fields.read(0x02)?);
    fields.0.is_empty().then(|| (unsigned(n), unsigned(e)))
}

/// A DER INTEGER's content without its leading zero bytes.
fn unsigned(int: &[u8]) -> &[u8] {
    &int[int.iter().take_while(|b| **b == 0).count()..]
}

/// An OID's name from [`KNOWN`], else its dotted form (X.690 §8.19).
fn name(oid: &[u8]) -> String {
    if let Some((_, name)) = KNOWN.iter().find(|(known, _)| *known == oid) {
        return (*name).to_owned();
    }
    // Base-128 subidentifiers, the first packing the first two arcs (X.690 §8.19.4).
    let (mut dotted, mut arc) = (String::from("OID "), 0u64);
    for b in oid {
        arc = arc.wrapping_shl(7) | u64::from(b & 0x7f);
        match arc {
            _ if b & 0x80 != 0 => continue,
            _ if dotted.len() > 4 => dotted.push_str(&format!(".{arc}")),
            0..80 => dotted.push_str(&format!("{}.{}", arc / 40, arc % 40)),
            _ => dotted.push_str(&format!("2.{}", arc - 80)),
        }
        arc = 0;
    }
    dotted
}

/// A cursor over DER (X.690 §8.1, definite lengths up to 4 bytes).
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    /// The next element's content if its tag is `tag`; the cursor moves past it.
    fn read(&mut self, tag: u8) -> Option<&'a [u8]> {
        let [t, first, rest @ ..] = self.0 else {
            return None;
        };
        let (len, rest) = match *first {
            short @ 0..=0x7f => (usize::from(short), rest),
            long @ 0x81..=0x84 => {
                let (len, rest) = rest.split_at_checked(usize::from(long & 0x7f))?;
                (len.iter().fold(0, |l, b| l << 8 | usize::from(*b)), rest)
            }
            _ => return None,
        };
        let (value, after) = rest.split_at_checked(len).filter(|_| *t == tag)?;
        self.0 = after;
        Some(value)
    }

    /// The content of the one element of tag `tag` that fills the input.
    fn only(mut self, tag: u8) -> Option<&'a [u8]> {
        let value = self.read(tag)?;
        self.0.is_empty().then_some(value)
    }
}

#[cfg(test)]
mod tests;
