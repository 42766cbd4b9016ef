//! The module against the RFCs' own examples, round trips opened by a test-only decrypter on
//! aws-lc-rs, and every kind of key it must refuse.

use aws_lc_rs::{
    agreement::{self, ECDH_P256, ECDH_P384, UnparsedPublicKey},
    encoding::AsDer,
    rsa::{KeySize, OaepPrivateDecryptingKey, PrivateDecryptingKey},
    signature::{Ed25519KeyPair, KeyPair},
};
use serde_json::{Value, json};

use super::*;

const RFC_7638_KID: &str = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs";

fn b64(s: &str) -> Vec<u8> {
    B64.decode(s).unwrap()
}

fn pem_of(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

/// A DER element (lengths up to 64 KiB).
fn der(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match value.len() {
        l if l < 0x80 => out.push(l as u8),
        l if l < 0x100 => out.extend_from_slice(&[0x81, l as u8]),
        l => out.extend_from_slice(&[0x82, (l >> 8) as u8, l as u8]),
    }
    out.extend_from_slice(value);
    out
}

/// The SubjectPublicKeyInfo of an RSA key of modulus `n` and exponent `e` (big-endian),
/// built by hand: aws-lc-rs makes no key under 2048 bits.
fn rsa_spki(n: &[u8], e: &[u8]) -> Vec<u8> {
    // DER INTEGERs: a leading zero byte only where the top bit is set.
    let int = |v: &[u8]| der(0x02, &[&[0][..(v[0] >> 7).into()], v].concat());
    let rsa = der(0x30, &[int(n), int(e)].concat());
    let algorithm = hex::decode("300d06092a864886f70d0101010500").unwrap();
    der(
        0x30,
        &[algorithm, der(0x03, &[&[0][..], &rsa].concat())].concat(),
    )
}

fn refusal(der: &[u8]) -> KeyError {
    ConsumerKey::from_pem(&pem_of("PUBLIC KEY", der)).unwrap_err()
}

#[test]
fn the_rfc_7638_example_key_has_its_thumbprint() {
    // RFC 7638 §3.1: the example RSA key's n and e; its thumbprint.
    let n = b64(concat!(
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B",
        "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_F",
        "DW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4",
        "vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    ));
    let key = ConsumerKey::from_pem(&pem_of("PUBLIC KEY", &rsa_spki(&n, &[1, 0, 1]))).unwrap();
    assert_eq!(key.kid(), RFC_7638_KID);
    assert_eq!(key.alg(), "RSA-OAEP-256");
    assert_eq!(
        format!("{key:?}"),
        format!(r#"ConsumerKey {{ alg: "RSA-OAEP-256", kid: "{RFC_7638_KID}" }}"#)
    );
}

#[test]
fn the_rfc_7518_appendix_c_key_agreement_derives_its_key() {
    let alice = agreement::PrivateKey::from_private_key(
        &ECDH_P256,
        &b64("0_NxaRPUMQoAJt50Gz8YiTr8gRTwyEaCumd-MToTmIo"),
    )
    .unwrap();
    let bob = [
        &[4][..],
        &b64("weNJy2HscCSM6AEDTDg04biOvhFhyyWvOHQfeF_PxMQ"),
        &b64("e8lnCO-AlStT-NJVX-crhB7QRYhiix03illJOVAOyck"),
    ]
    .concat();
    let derived = agreement::agree(&alice, UnparsedPublicKey::new(&ECDH_P256, &bob), (), |z| {
        Ok(concat_kdf(z, b"A128GCM", b"Alice", b"Bob", 128))
    })
    .unwrap();
    assert_eq!(B64.encode(derived), "VqqN6vgjbSBcIijNcacQGg");
}

#[test]
fn the_rfc_3394_vector_wraps_as_sealing_does() {
    // RFC 3394 §4.6: 256 bits of key data with a 256-bit KEK.
    let kek =
        hex::decode("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F").unwrap();
    let data =
        hex::decode("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F").unwrap();
    let mut out = [0u8; 40];
    let wrapped = KeyEncryptionKey::new(&AES_256, &kek)
        .unwrap()
        .wrap(&data, &mut out)
        .unwrap();
    assert_eq!(
        hex::encode_upper(wrapped),
        "28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21"
    );
}

/// A compact JWE's parts: the encoded header, the header parsed, then the encrypted key, the
/// IV, the ciphertext and the tag decoded.
fn parts(jwe: &str) -> (String, Value, [Vec<u8>; 4]) {
    let p: Vec<&str> = jwe.split('.').collect();
    assert_eq!(p.len(), 5, "{jwe}");
    let header = serde_json::from_slice(&b64(p[0])).unwrap();
    let [ek, iv, ct, tag] = [p[1], p[2], p[3], p[4]].map(b64);
    assert_eq!((iv.len(), tag.len()), (12, 16), "96-bit IV, 128-bit tag");
    (p[0].to_owned(), header, [ek, iv, ct, tag])
}

/// The content opened with the content key as a consumer would, `None` if it does not open.
fn open_content(cek: &[u8], header_b64: &str, [_, iv, ct, tag]: &[Vec<u8>; 4]) -> Option<Vec<u8>> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, cek).unwrap());
    let mut sealed = [ct.as_slice(), tag].concat();
    let nonce = Nonce::try_assume_unique_for_key(iv).unwrap();
    let aad = Aad::from(header_b64.as_bytes());
    key.open_in_place(nonce, aad, &mut sealed)
        .ok()
        .map(|p| p.to_vec())
}

/// The thumbprint recomputed from a JWK written with serde_json, members in RFC 7638's order.
fn thumbprint_of(jwk: &Value) -> String {
    B64.encode(digest::digest(&digest::SHA256, jwk.to_string().as_bytes()))
}

#[test]
fn a_token_sealed_for_an_rsa_key_opens_with_the_private_key() {
    let private = PrivateDecryptingKey::generate(KeySize::Rsa2048).unwrap();
    let spki = private.public_key().as_der().unwrap();
    let key = ConsumerKey::from_pem(&pem_of("PUBLIC KEY", spki.as_ref())).unwrap();
    let jwe = key.seal(b"session-token-123").unwrap();
    let (h, header, rest) = parts(&jwe);
    assert_eq!(
        header,
        json!({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": key.kid()})
    );
    let oaep = OaepPrivateDecryptingKey::new(private).unwrap();
    let mut cek = vec![0u8; oaep.min_output_size()];
    let cek = oaep
        .decrypt(&OAEP_SHA256_MGF1SHA256, &rest[0], &mut cek, None)
        .unwrap();
    assert_eq!(cek.len(), 32);
    assert_eq!(open_content(cek, &h, &rest).unwrap(), b"session-token-123");
    // The header is the AAD: another header does not open.
    let other = B64.encode(r#"{"alg":"RSA-OAEP-256","enc":"A256GCM"}"#);
    assert_eq!(open_content(cek, &other, &rest), None);
    assert_ne!(jwe, key.seal(b"session-token-123").unwrap(), "fresh keys");
}

#[test]
fn a_token_sealed_for_a_p256_key_opens_with_the_private_key() {
    let private = agreement::PrivateKey::generate(&ECDH_P256).unwrap();
    let public = private.compute_public_key().unwrap();
    let key = ConsumerKey::from_pem(&pem_of("PUBLIC KEY", public.as_der().unwrap().as_ref()));
    let key = key.unwrap();
    assert_eq!(key.alg(), "ECDH-ES+A256KW");
    let (x, y) = public.as_ref()[1..].split_at(32);
    let jwk = json!({"crv": "P-256", "kty": "EC", "x": B64.encode(x), "y": B64.encode(y)});
    assert_eq!(key.kid(), thumbprint_of(&jwk));

    let jwe = key.seal(b"session-token-456").unwrap();
    let (h, header, rest) = parts(&jwe);
    let epk = &header["epk"];
    assert_eq!(
        header,
        json!({"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "epk": epk, "kid": key.kid()}),
        "no apu, apv or other members"
    );
    assert_eq!((&epk["kty"], &epk["crv"]), (&json!("EC"), &json!("P-256")));
    let [x, y] = ["x", "y"].map(|c| b64(epk[c].as_str().unwrap()));
    assert_eq!((x.len(), y.len(), rest[0].len()), (32, 32, 40));
    let kek = agreement::agree(
        &private,
        UnparsedPublicKey::new(&ECDH_P256, [&[4][..], &x, &y].concat()),
        (),
        |z| Ok(concat_kdf(z, b"ECDH-ES+A256KW", b"", b"", 256)),
    )
    .unwrap();
    let mut cek = [0u8; 32];
    let cek = KeyEncryptionKey::new(&AES_256, &kek)
        .unwrap()
        .unwrap(&rest[0], &mut cek)
        .unwrap();
    assert_eq!(open_content(cek, &h, &rest).unwrap(), b"session-token-456");
    let again = key.seal(b"session-token-456").unwrap();
    assert_ne!(parts(&again).1["epk"], *epk, "a fresh ephemeral key");
}

#[test]
fn keys_it_cannot_seal_for_are_refused_saying_what_they_are() {
    let short = [vec![0xc0], vec![0x11; 127]].concat();
    assert_eq!(
        refusal(&rsa_spki(&short, &[1, 0, 1])),
        KeyError::RsaSize(1024)
    );
    let just_short = [vec![0x7f], vec![0x11; 255]].concat();
    assert_eq!(
        refusal(&rsa_spki(&just_short, &[3])),
        KeyError::RsaSize(2047)
    );
    assert_eq!(refusal(&rsa_spki(&[0], &[1])), KeyError::RsaSize(0));

    let p384 = agreement::PrivateKey::generate(&ECDH_P384).unwrap();
    let p384 = p384.compute_public_key().unwrap().as_der().unwrap();
    let error = refusal(p384.as_ref());
    assert_eq!(error, KeyError::OtherCurve("P-384 (secp384r1)".into()));
    let message = error.to_string();
    assert!(message.contains("found an EC key on P-384"), "{message}");
    assert!(
        message.contains("P-256") && message.contains("2048"),
        "{message}"
    );

    let ed = Ed25519KeyPair::generate().unwrap();
    let ed = ed.public_key().as_der().unwrap();
    assert_eq!(
        refusal(ed.as_ref()),
        KeyError::OtherAlgorithm("Ed25519".into())
    );
    let unknown = hex::decode("3010300a06082a8648ce3d040302030200ff").unwrap();
    let found = KeyError::OtherAlgorithm("OID 1.2.840.10045.4.3.2".into());
    assert_eq!(
        refusal(&unknown),
        found,
        "ecdsa-with-SHA256, not a key algorithm"
    );

    let private = PrivateDecryptingKey::generate(KeySize::Rsa2048).unwrap();
    let private = pem_of("PRIVATE KEY", private.as_der().unwrap().as_ref());
    let error = ConsumerKey::from_pem(&private).unwrap_err();
    assert_eq!(error, KeyError::NotPublicKey("PRIVATE KEY".into()));
    assert!(
        error
            .to_string()
            .starts_with("found a PEM `PRIVATE KEY` block; accepted: a PEM")
    );

    let not_pem = |s| ConsumerKey::from_pem(s).unwrap_err();
    assert_eq!(not_pem(""), KeyError::NotPem("an empty input".into()));
    assert_eq!(
        not_pem("garbage"),
        KeyError::NotPem("no `-----BEGIN …-----` … `-----END …-----` block".into())
    );
    let bad_base64 = "-----BEGIN PUBLIC KEY-----\n!!\n-----END PUBLIC KEY-----\n";
    assert!(matches!(not_pem(bad_base64), KeyError::NotPem(m) if m.starts_with("a damaged PEM")));

    let p256 = agreement::PrivateKey::generate(&ECDH_P256).unwrap();
    let p256 = p256.compute_public_key().unwrap().as_der().unwrap();
    let mut off_curve = p256.as_ref().to_vec();
    *off_curve.last_mut().unwrap() ^= 1;
    let unreadable = |what| KeyError::Unreadable(what);
    assert_eq!(
        refusal(&off_curve),
        unreadable("a point that is not on P-256")
    );
    let trailing = [p256.as_ref(), &[0]].concat();
    assert_eq!(
        refusal(&trailing),
        unreadable("not a DER SubjectPublicKeyInfo")
    );
    assert_eq!(
        refusal(&[0x30, 0x03, 0x02, 0x01, 0x00]),
        unreadable("not a DER SubjectPublicKeyInfo")
    );
}

#[test]
fn no_damaged_key_panics() {
    let rsa = PrivateDecryptingKey::generate(KeySize::Rsa2048).unwrap();
    let rsa = rsa.public_key().as_der().unwrap();
    let ec = agreement::PrivateKey::generate(&ECDH_P256).unwrap();
    let ec = ec.compute_public_key().unwrap().as_der().unwrap();
    for spki in [rsa.as_ref(), ec.as_ref()] {
        assert!(ConsumerKey::from_pem(&pem_of("PUBLIC KEY", spki)).is_ok());
        for len in 0..spki.len() {
            assert!(ConsumerKey::from_pem(&pem_of("PUBLIC KEY", &spki[..len])).is_err());
        }
        for at in 0..spki.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut damaged = spki.to_vec();
                damaged[at] ^= flip;
                let _ = ConsumerKey::from_pem(&pem_of("PUBLIC KEY", &damaged));
            }
        }
    }
}
