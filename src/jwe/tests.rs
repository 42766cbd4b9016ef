//! The module against the RFCs' own examples, round trips through aws-lc-rs's decryption, and
//! every kind of key it must refuse.

use aws_lc_rs::{
    agreement::{self, ECDH_P256, UnparsedPublicKey},
    encoding::AsDer,
    rsa::{KeySize, OaepPrivateDecryptingKey, PrivateDecryptingKey},
};

use super::*;

fn b64(s: &str) -> Vec<u8> {
    B64.decode(s).unwrap()
}

fn pem_of(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("PUBLIC KEY", der.to_vec()))
}

/// SubjectPublicKeyInfo of a P-256 point (RFC 5480).
fn p256_spki(point: &[u8]) -> Vec<u8> {
    let mut der = hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200").unwrap();
    der.extend_from_slice(point);
    der
}

#[test]
fn the_rfc_7638_example_key_has_its_thumbprint() {
    // RFC 7638 §3.1: n and e of the example RSA key, and its thumbprint.
    let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
    let jwk = format!(r#"{{"e":"AQAB","kty":"RSA","n":"{n}"}}"#);
    assert_eq!(
        thumbprint(&jwk),
        "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    );
    // The same key read from its SubjectPublicKeyInfo gives the same kid.
    let (n, e) = (b64(n), b64("AQAB"));
    let int = |v: &[u8]| der_int(v);
    let rsa = der(0x30, &[int(&n), int(&e)].concat());
    let mut bits = vec![0u8];
    bits.extend_from_slice(&rsa);
    let algorithm = hex::decode("300d06092a864886f70d0101010500").unwrap();
    let spki = der(0x30, &[algorithm, der(0x03, &bits)].concat());
    let key = ConsumerKey::from_pem(&pem_of(&spki)).unwrap();
    assert_eq!(key.kid(), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
    assert_eq!(key.alg(), "RSA-OAEP-256");
}

/// A DER INTEGER of an unsigned magnitude: a zero byte in front when the high bit is set.
fn der_int(v: &[u8]) -> Vec<u8> {
    let mut body = if v[0] & 0x80 != 0 { vec![0u8] } else { vec![] };
    body.extend_from_slice(v);
    der(0x02, &body)
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

#[test]
fn the_rfc_7518_appendix_c_key_agreement_derives_its_key() {
    let alice = agreement::PrivateKey::from_private_key(
        &ECDH_P256,
        &b64("0_NxaRPUMQoAJt50Gz8YiTr8gRTwyEaCumd-MToTmIo"),
    )
    .unwrap();
    let mut bob = vec![0x04];
    bob.extend(b64("weNJy2HscCSM6AEDTDg04biOvhFhyyWvOHQfeF_PxMQ"));
    bob.extend(b64("e8lnCO-AlStT-NJVX-crhB7QRYhiix03illJOVAOyck"));
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

/// The five parts of a compact JWE, the header parsed.
fn parts(jwe: &str) -> (serde_json::Value, Vec<Vec<u8>>, String) {
    let p: Vec<&str> = jwe.split('.').collect();
    assert_eq!(p.len(), 5, "{jwe}");
    let header = serde_json::from_slice(&b64(p[0])).unwrap();
    (
        header,
        p[1..].iter().map(|s| b64(s)).collect(),
        p[0].to_owned(),
    )
}

/// Opens the content with the content key, as a consumer would.
fn open_content(cek: &[u8], rest: &[Vec<u8>], header_b64: &str) -> Vec<u8> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, cek).unwrap());
    let mut sealed = [rest[2].clone(), rest[3].clone()].concat();
    let nonce = Nonce::try_assume_unique_for_key(&rest[1]).unwrap();
    key.open_in_place(nonce, Aad::from(header_b64.as_bytes()), &mut sealed)
        .unwrap()
        .to_vec()
}

#[test]
fn a_token_sealed_for_an_rsa_key_opens_with_the_private_key() {
    let private = PrivateDecryptingKey::generate(KeySize::Rsa2048).unwrap();
    let spki = private.public_key().as_der().unwrap();
    let key = ConsumerKey::from_pem(&pem_of(spki.as_ref())).unwrap();
    let jwe = key.seal(b"session-token-123").unwrap();
    let (header, rest, h) = parts(&jwe);
    assert_eq!(header["alg"], "RSA-OAEP-256");
    assert_eq!(header["enc"], "A256GCM");
    assert_eq!(header["kid"], key.kid());
    let oaep = OaepPrivateDecryptingKey::new(private).unwrap();
    let mut cek = vec![0u8; oaep.min_output_size()];
    let cek = oaep
        .decrypt(&OAEP_SHA256_MGF1SHA256, &rest[0], &mut cek, None)
        .unwrap();
    assert_eq!(open_content(cek, &rest, &h), b"session-token-123");
    assert_ne!(jwe, key.seal(b"session-token-123").unwrap(), "fresh keys");
    assert!(!jwe.contains("session-token-123"));
}

#[test]
fn a_token_sealed_for_a_p256_key_opens_with_the_private_key() {
    let private = agreement::PrivateKey::generate(&ECDH_P256).unwrap();
    let point = private.compute_public_key().unwrap();
    let key = ConsumerKey::from_pem(&pem_of(&p256_spki(point.as_ref()))).unwrap();
    assert_eq!(key.alg(), "ECDH-ES+A256KW");
    let jwe = key.seal(b"session-token-456").unwrap();
    let (header, rest, h) = parts(&jwe);
    assert_eq!(header["alg"], "ECDH-ES+A256KW");
    assert_eq!(header["enc"], "A256GCM");
    assert_eq!(header["kid"], key.kid());
    assert_eq!(header["epk"]["kty"], "EC");
    assert_eq!(header["epk"]["crv"], "P-256");
    let mut epk = vec![0x04];
    epk.extend(b64(header["epk"]["x"].as_str().unwrap()));
    epk.extend(b64(header["epk"]["y"].as_str().unwrap()));
    let kek = agreement::agree(
        &private,
        UnparsedPublicKey::new(&ECDH_P256, &epk),
        (),
        |z| Ok(concat_kdf(z, b"ECDH-ES+A256KW", b"", b"", 256)),
    )
    .unwrap();
    let mut cek = [0u8; 32];
    let cek = KeyEncryptionKey::new(&AES_256, &kek)
        .unwrap()
        .unwrap(&rest[0], &mut cek)
        .unwrap();
    assert_eq!(open_content(cek, &rest, &h), b"session-token-456");
}

#[test]
fn keys_it_cannot_seal_for_are_refused_saying_what_they_are() {
    // RSA-1024 (an SPKI built by hand: aws-lc-rs no longer makes such keys).
    let n = [vec![0xc0], vec![0x11; 127]].concat();
    let int = |v: &[u8]| der_int(v);
    let rsa = der(0x30, &[int(&n), int(&[1, 0, 1])].concat());
    let mut bits = vec![0u8];
    bits.extend_from_slice(&rsa);
    let algorithm = hex::decode("300d06092a864886f70d0101010500").unwrap();
    let spki = der(0x30, &[algorithm, der(0x03, &bits)].concat());
    assert_eq!(
        ConsumerKey::from_pem(&pem_of(&spki)).unwrap_err(),
        KeyError::RsaTooShort(1024)
    );
    // P-384.
    let p384 = agreement::PrivateKey::generate(&agreement::ECDH_P384).unwrap();
    let point = p384.compute_public_key().unwrap();
    let mut spki = hex::decode("3076301006072a8648ce3d020106052b81040022036200").unwrap();
    spki.extend_from_slice(point.as_ref());
    assert_eq!(
        ConsumerKey::from_pem(&pem_of(&spki)).unwrap_err(),
        KeyError::OtherCurve
    );
    // Ed25519 (RFC 8410).
    let mut ed = hex::decode("302a300506032b6570032100").unwrap();
    ed.extend_from_slice(&[7; 32]);
    assert_eq!(
        ConsumerKey::from_pem(&pem_of(&ed)).unwrap_err(),
        KeyError::Unsupported
    );
    // A point not on the curve.
    let mut off = vec![0x04];
    off.extend_from_slice(&[1; 64]);
    assert_eq!(
        ConsumerKey::from_pem(&pem_of(&p256_spki(&off))).unwrap_err(),
        KeyError::Unsupported
    );
    // A private key, garbage, nothing.
    let private = pem::encode(&pem::Pem::new("PRIVATE KEY", vec![1, 2, 3]));
    assert!(matches!(
        ConsumerKey::from_pem(&private).unwrap_err(),
        KeyError::NotPublicKeyPem(found) if found.contains("PRIVATE KEY")
    ));
    for junk in [
        "",
        "garbage",
        "-----BEGIN PUBLIC KEY-----\n!!\n-----END PUBLIC KEY-----",
    ] {
        assert!(ConsumerKey::from_pem(junk).is_err(), "{junk:?}");
    }
    assert_eq!(
        ConsumerKey::from_pem(&pem_of(&[0x30, 0x03, 0x02, 0x01, 0x00])).unwrap_err(),
        KeyError::Unsupported
    );
}
