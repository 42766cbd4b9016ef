//! A whole, signed answer over TLS whose connection closes without `close_notify` is an answer;
//! a cut one is a lost answer.

use aws_lc_rs::{
    encoding::AsDer,
    rsa::{KeyPair, KeySize},
    signature::KeyPair as _,
};
use secrecy::SecretString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::bunq::context::NewKeyPair;

const SESSION: &str = include_str!("../../../tests/fixtures/session-server.user-api-key.json");

/// Serves one HTTPS request with a `Connection: close` answer without `Content-Length`, sending
/// `send` bytes of `body` signed whole, then closes TCP without `close_notify`.
async fn serve_once(body: &'static str, send: usize) -> (Url, Vec<u8>, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_pem = cert.cert.pem().into_bytes();
    let server_key = KeyPair::generate(KeySize::Rsa2048).unwrap();
    let server_pub = pem::encode(&pem::Pem::new(
        "PUBLIC KEY",
        server_key.public_key().as_der().unwrap().as_ref().to_vec(),
    ));
    let signature = signing::sign(&server_key, body.as_bytes()).unwrap();
    let config = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.cert.der().clone()],
            tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(
                cert.signing_key.serialize_der().into(),
            ),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        // Headers, then the small JSON body the client sends.
        while !request.windows(4).any(|w| w == b"\r\n\r\n") || !request.ends_with(b"}") {
            let n = tls.read(&mut buf).await.unwrap();
            request.extend_from_slice(&buf[..n]);
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\nX-Bunq-Server-Signature: {signature}\r\n\r\n"
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        tls.write_all(&body.as_bytes()[..send]).await.unwrap();
        tls.flush().await.unwrap();
        // Drop the TCP stream under TLS: no close_notify.
        let (tcp, _session) = tls.into_inner();
        drop(tcp);
    });
    (
        format!("https://localhost:{port}/v1").parse().unwrap(),
        cert_pem,
        server_pub,
    )
}

fn context(server_pub: &str) -> ApiContext {
    NewKeyPair::generate()
        .unwrap()
        .into_context("installation-token".into(), server_pub)
        .unwrap()
}

#[tokio::test]
async fn a_whole_signed_answer_counts_however_the_connection_ended() {
    let (url, cert, server_pub) = serve_once(SESSION, SESSION.len()).await;
    let client = BunqClient::trusting(url, &cert);
    let answer = client
        .session_server(&context(&server_pub), &SecretString::from("sandbox_tls"))
        .await
        .expect("the whole answer is the answer");
    assert_eq!(answer.value.session_id, 2173);
}

#[tokio::test]
async fn a_cut_answer_is_a_lost_answer() {
    let (url, cert, server_pub) = serve_once(SESSION, SESSION.len() / 2).await;
    let client = BunqClient::trusting(url, &cert);
    let err = client
        .session_server(&context(&server_pub), &SecretString::from("sandbox_tls"))
        .await
        .unwrap_err();
    assert_eq!(err.class, RetryClass::Transient, "{err}");
    assert!(err.answer_lost, "{err}");
}
