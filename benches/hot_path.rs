//! The worker's per-delivery CPU work, measured: decoding each input shape, signing a
//! session-server body, verifying a response signature, parsing a session-server answer and
//! deriving the output message_id. bunq's rate limits (session-server: 1 call per 30 s) make
//! these far from the bottleneck; this bench keeps it that way visibly.
//!
//! Run: `cargo bench --bench hot_path` (prints ns per operation; no assertion).

use std::{hint::black_box, time::Instant};

use aws_lc_rs::{
    encoding::AsDer,
    rsa::{KeyPair, KeySize},
    signature::KeyPair as _,
};
use bunq_session_worker::{bunq, events, identity};

fn bench(name: &str, iterations: u32, mut f: impl FnMut()) {
    for _ in 0..iterations.min(100) {
        f(); // warm-up
    }
    let t0 = Instant::now();
    for _ in 0..iterations {
        f();
    }
    let per = t0.elapsed().as_nanos() / u128::from(iterations);
    println!("{name:<40} {per:>10} ns/op  ({iterations} iterations)");
}

fn main() {
    let slim = include_bytes!("../tests/fixtures/provision-ready.slim.json");
    let wrapped = include_bytes!("../tests/fixtures/partner-user-provision.ready.json");
    let callback = include_bytes!("../tests/fixtures/notification.partner-user-provision.json");
    let answer = include_bytes!("../tests/fixtures/session-server.user-api-key.json");

    bench("decode slim event", 100_000, || {
        black_box(events::decode(black_box(slim), 65536).is_ok());
    });
    bench("decode PartnerUserProvision", 100_000, || {
        black_box(events::decode(black_box(wrapped), 65536).is_ok());
    });
    bench("decode NotificationUrl callback", 100_000, || {
        black_box(events::decode(black_box(callback), 65536).is_ok());
    });
    bench("parse session-server answer", 100_000, || {
        black_box(bunq::response::parse_session_server(black_box(answer)).is_ok());
    });
    bench("input identity + output message_id", 100_000, || {
        let identity = identity::input_identity(black_box(slim), 65536);
        black_box(identity::output_message_id("session.created", &identity));
    });

    let key = KeyPair::generate(KeySize::Rsa2048).expect("RSA key");
    let body =
        br#"{"secret":"sandbox_5b9e0c7d4a1f2e3b6c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b"}"#;
    bench("RSA-2048 sign request body", 500, || {
        black_box(bunq::signing::sign(&key, black_box(body)).expect("sign"));
    });
    let spki = bunq::signing::public_key(key.public_key().as_der().expect("der").as_ref())
        .expect("a public key");
    let sig = bunq::signing::sign(&key, answer).expect("sign");
    bench("RSA-2048 verify response signature", 5_000, || {
        black_box(bunq::signing::verify(&spki, black_box(answer), &sig));
    });
}
