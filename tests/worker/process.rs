//! The binary as an operator runs it: exit codes, signals, and logs without secrets.

use std::time::Duration;

use lapin::types::FieldTable;
use secrecy::SecretString;

use crate::{binary::Running, helpers::*, proxy::*};

async fn consumers(app: &TestApp) -> u32 {
    app.consumer_count(&app.names.input_queue).await
}

#[tokio::test]
async fn logs_hold_no_secret_and_sigterm_exits_zero() {
    // session.created starts out unroutable, so a returned message (which lapin itself would
    // log, body and token included) is part of the run.
    let mut app = TestApp::new_with_binding(Some("session.failed")).await;
    app.bunq_registers_every_device().await;
    app.session_server()
        .for_credential("SECRET-TOKEN-OK-1111")
        .answers(200, &fixture("session-server.user-api-key.json"))
        .await;
    // A misbehaving server that echoes the credential back in its error.
    app.session_server()
        .for_credential("SECRET-TOKEN-ECHO-2222")
        .answers(
            400,
            r#"{"Error":[{"error_description":"API key SECRET-TOKEN-ECHO-2222 is not valid"}]}"#,
        )
        .await;
    app.session_server()
        .for_credential("SECRET-TOKEN-FLAKY-3333")
        .first_calls(1)
        .answers(500, "<html>oops</html>")
        .await;
    app.session_server()
        .for_credential("SECRET-TOKEN-FLAKY-3333")
        .answers(200, &fixture("session-server.user-person.json"))
        .await;
    // Every level of every crate: a dependency that dumps bodies or headers would show here.
    let mut w = Running::start(&app.args(), &[("RUST_LOG", "trace")]);
    eventually("the worker consumes", || async {
        consumers(&app).await == 1
    })
    .await;

    app.publish_json(&slim(1, "SECRET-TOKEN-OK-1111")).await;
    eventually("a returned session.created", || async {
        w.text().contains("publish not confirmed")
    })
    .await;
    app.channel
        .queue_bind(
            app.names.output_queue.as_str().into(),
            app.names.output_exchange.as_str().into(),
            "session.created".into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(type_of(&app.next_output().await), "session.created");
    app.publish_json(&slim(2, "SECRET-TOKEN-ECHO-2222")).await;
    let failed = app.next_output().await;
    assert_eq!(type_of(&failed), "session.failed");
    let dl = app.next_dead_letter().await;
    app.publish_json(&slim(3, "SECRET-TOKEN-FLAKY-3333")).await;
    assert_eq!(type_of(&app.next_output().await), "session.created");
    app.publish(
        br#"{"provision_id": "SECRET-TOKEN-BAD-4444x", "token_value": 7}"#,
        Default::default(),
    )
    .await;
    let dl2 = app.next_dead_letter().await;

    w.signal("-TERM");
    let status = w.wait().await;
    let logs = w.text();
    assert!(status.success(), "SIGTERM exits 0: {status:?}\n{logs}");
    assert!(logs.contains("stopped"), "{logs}");
    assert!(
        logs.contains("provision_id"),
        "logs carry the provision id: {logs}"
    );
    assert!(logs.contains("latency_ms"), "{logs}");

    let context = std::fs::read_to_string(&app.context_file).unwrap();
    let private: serde_json::Value = serde_json::from_str(&context).unwrap();
    let key_body: String = private["client_private_key"]
        .as_str()
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let mut secrets = vec![
        "SECRET-TOKEN-OK-1111".to_string(),
        "SECRET-TOKEN-ECHO-2222".to_string(),
        "SECRET-TOKEN-FLAKY-3333".to_string(),
        "SECRET-TOKEN-BAD-4444".to_string(),
        app.state.installation_token.clone(),
        SESSION_TOKEN_API_KEY.to_string(),
        "0c5be2f1a9d84e7cb36a1f0d2e4c6b8a9d7f5e3c1b0a2d4f6e8c0b2a4d6f8e0c".to_string(),
    ];
    secrets.extend(
        key_body
            .as_bytes()
            .chunks(40)
            .map(|c| String::from_utf8(c.to_vec()).unwrap()),
    );
    let failed_text = String::from_utf8_lossy(&failed.data).into_owned();
    let dl_headers = format!(
        "{:?} {:?}",
        dl.properties.headers(),
        dl2.properties.headers()
    );
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "secret {s} in logs:\n{logs}");
        // Also as Debug prints bytes: `[.., 102, 57, 56, ..]`.
        let as_bytes = s
            .bytes()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        assert!(
            !logs.contains(&as_bytes),
            "secret {s} in logs as bytes:\n{logs}"
        );
        assert!(
            !failed_text.contains(s.as_str()),
            "secret in session.failed: {failed_text}"
        );
        assert!(
            !dl_headers.contains(s.as_str()),
            "secret in dead-letter headers: {dl_headers}"
        );
    }
    assert!(failed_text.contains("[REDACTED]"), "{failed_text}");
    app.cleanup().await;
}

#[tokio::test]
async fn a_topology_conflict_exits_non_zero_naming_the_object_and_argument() {
    let app = TestApp::new().await;
    app.declare_classic_queue(&app.names.dead_letter_queue, &[])
        .await;
    let mut w = Running::start(&app.args(), &[]);
    let status = w.wait().await;
    let out = w.text();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains(&format!("queue '{}'", app.names.dead_letter_queue)),
        "{out}"
    );
    assert!(out.contains("'x-queue-type'"), "{out}");
    app.cleanup().await;
}

#[tokio::test]
async fn invalid_configuration_names_the_variable() {
    let app = TestApp::new().await;
    let mut w = Running::start(&app.args(), &[("PREFETCH", "lots")]);
    let status = w.wait().await;
    assert_eq!(status.code(), Some(2));
    assert!(w.text().contains("PREFETCH"), "{}", w.text());
    let mut w = Running::start(&app.args(), &[("BUNQ_PERMITTED_IPS", "10.0.0.1,not-an-ip")]);
    assert_eq!(w.wait().await.code(), Some(2));
    assert!(w.text().contains("BUNQ_PERMITTED_IPS"), "{}", w.text());
    // A consumer key that is missing, or not a key the worker seals with.
    let weak = app.dir.join("weak.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:1024",
        ])
        .output()
        .unwrap();
    let public = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl pkey -pubout -out {} <<'EOF'\n{}EOF",
            weak.display(),
            String::from_utf8_lossy(&made.stdout)
        ))
        .status()
        .unwrap();
    assert!(public.success());
    for (path, said) in [
        ("/nonexistent/consumer.pem", "cannot read"),
        (weak.to_str().unwrap(), "1024"),
    ] {
        let mut w = Running::start(&app.args(), &[("SESSION_TOKEN_ENCRYPTION_KEY", path)]);
        assert_eq!(w.wait().await.code(), Some(2), "{}", w.text());
        assert!(
            w.text().contains("SESSION_TOKEN_ENCRYPTION_KEY") && w.text().contains(said),
            "{}",
            w.text()
        );
    }
    // Against bunq production, no key and no word from the operator: refused, naming both.
    let mut args = app.args();
    let at = args.iter().position(|a| a == "--bunq-api-url").unwrap();
    args[at + 1] = "https://api.bunq.com/v1".into();
    let mut w = Running::start(&args, &[]);
    assert_eq!(w.wait().await.code(), Some(2), "{}", w.text());
    assert!(
        w.text().contains("SESSION_TOKEN_ENCRYPTION_KEY")
            && w.text().contains("SESSION_TOKEN_CLEARTEXT"),
        "{}",
        w.text()
    );
    app.cleanup().await;
}

#[tokio::test]
async fn sigkill_mid_stream_loses_nothing() {
    stop_mid_stream("-KILL").await;
}

#[tokio::test]
async fn sigterm_under_load_loses_nothing() {
    stop_mid_stream("-TERM").await;
}

/// Runs the binary over N events, stops it with `signal` after a few outcomes, starts a new
/// one, and accounts for all N: each has its `session.created`, duplicates repeat the
/// `message_id`, nothing stays queued or is dead-lettered.
async fn stop_mid_stream(signal: &str) {
    let mut app = TestApp::new().await;
    app.bunq_registers_every_device().await;
    let mut slow = app.answer(200, &fixture("session-server.user-person.json"));
    slow.delay = Some(Duration::from_millis(100));
    app.session_server().responds_with(slow).await;
    const N: i64 = 24;

    // Four deliveries in flight at once, so a stop finds work under way.
    let env = [("PREFETCH", "4")];
    let mut w = Running::start(&app.args(), &env);
    eventually("the worker consumes", || async {
        consumers(&app).await == 1
    })
    .await;
    for i in 0..N {
        app.publish_json(&slim(i, &format!("tok-kill-{i}"))).await;
    }
    let mut seen: std::collections::HashMap<i64, String> = std::collections::HashMap::new();
    let record = |d: &lapin::message::Delivery,
                  seen: &mut std::collections::HashMap<i64, String>| {
        assert_eq!(type_of(d), "session.created");
        let id = body_json(d)["provision_id"].as_i64().unwrap();
        let mid = d.properties.message_id().as_ref().unwrap().to_string();
        if let Some(prev) = seen.insert(id, mid.clone()) {
            assert_eq!(prev, mid, "a duplicate of {id} carries the same message_id");
        }
    };
    while seen.len() < 5 {
        let d = app.next_output().await;
        record(&d, &mut seen);
    }
    w.signal(signal);
    let status = w.wait().await;
    assert_eq!(
        status.success(),
        signal == "-TERM",
        "{signal}: {status:?}\n{}",
        w.text()
    );

    // A new process picks up whatever the killed one left unacked.
    let mut w = Running::start(&app.args(), &env);
    while seen.len() < N as usize {
        let d = app.next_output().await;
        record(&d, &mut seen);
    }
    let q = app.names.input_queue.clone();
    eventually("every input settled", || async {
        app.ready_count(&q).await == 0
    })
    .await;
    w.signal("-TERM");
    assert!(w.wait().await.success());
    assert_eq!(
        app.ready_count(&q).await,
        0,
        "nothing left unacked after a clean stop"
    );
    assert_eq!(app.ready_count(&app.names.dead_letter_queue).await, 0);
    // Drain duplicates, if any: each repeats an event already seen, with its message_id.
    while app.ready_count(&app.names.output_queue).await > 0 {
        let d = app.next_output().await;
        record(&d, &mut seen);
    }
    assert_eq!(
        seen.len(),
        N as usize,
        "every input has its session.created"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn sigterm_while_start_up_waits_for_the_broker_exits_zero_at_once() {
    let mut app = TestApp::new().await;
    // The broker accepts TCP and never answers: start-up hangs in the AMQP handshake (10 s).
    let proxy = TcpProxy::start(amqp_host_port(&app.amqp_url)).await;
    proxy.black_hole();
    app.settings.broker.amqp_url = SecretString::from(amqp_url_via(&app.amqp_url, proxy.addr()));
    let mut w = Running::start(&app.args(), &[]);
    eventually("the worker connects into the black hole", || async {
        proxy.accepted() >= 1
    })
    .await;
    let t0 = std::time::Instant::now();
    w.signal("-TERM");
    let status = w.wait().await;
    let took = t0.elapsed();
    let logs = w.text();
    assert!(status.success(), "SIGTERM exits 0: {status:?}\n{logs}");
    assert!(
        took < Duration::from_secs(3),
        "exited {took:?} after SIGTERM\n{logs}"
    );
    assert!(logs.contains("stopped during start-up"), "{logs}");
    proxy.cut();
    proxy.restore();
    app.cleanup().await;
}

#[tokio::test]
async fn duplicate_keys_and_an_unknown_outcome_keep_every_token_out_of_logs_and_headers() {
    let mut app = TestApp::new().await;
    app.settings.bunq.http_timeout = Duration::from_millis(300);
    app.bunq_registers_every_device().await;
    // The first session-server answer for this credential comes too late; the retry is refused.
    let mut lost = app.answer(200, &fixture("session-server.user-person.json"));
    lost.delay = Some(Duration::from_secs(2));
    app.session_server()
        .for_credential("SECRET-LOST-5555")
        .first_calls(1)
        .responds_with(lost)
        .await;
    app.session_server()
        .answers(400, &fixture("error.credentials-incorrect.json"))
        .await;
    let mut w = Running::start(&app.args(), &[("RUST_LOG", "trace")]);
    eventually("the worker consumes", || async {
        consumers(&app).await == 1
    })
    .await;
    app.publish(
        br#"{"provision_id": 1, "token_value": "SECRET-DUP-A-6666", "token_value": "SECRET-DUP-B-7777"}"#,
        Default::default(),
    )
    .await;
    app.publish(
        br#"{"NotificationUrl": {"object": {"PartnerUserProvision": {"id": 2, "credential": {"status": "PENDING_FIRST_USE", "token_value": "SECRET-DUP-C-8888", "token_value": "SECRET-DUP-D-9999"}}}}}"#,
        Default::default(),
    )
    .await;
    app.publish_json(&slim(3, "SECRET-LOST-5555")).await;
    let mut dead_letters = Vec::new();
    for _ in 0..3 {
        dead_letters.push(app.next_dead_letter().await);
    }
    let mut reasons: Vec<String> = dead_letters
        .iter()
        .map(|d| header(d, "x-error-reason").unwrap())
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        ["duplicate_key", "duplicate_key", "outcome_unknown"]
    );
    let failed = app.next_output().await;
    assert_eq!(body_json(&failed)["reason"], "outcome_unknown");

    w.signal("-TERM");
    assert!(w.wait().await.success());
    let logs = w.text();
    assert!(logs.contains("duplicate_key"), "{logs}");
    assert!(logs.contains("outcome_unknown"), "{logs}");
    let failed_text = String::from_utf8_lossy(&failed.data).into_owned();
    let headers: String = dead_letters.iter().map(crate::taps::headers_text).collect();
    for s in [
        "SECRET-DUP-A-6666",
        "SECRET-DUP-B-7777",
        "SECRET-DUP-C-8888",
        "SECRET-DUP-D-9999",
        "SECRET-LOST-5555",
        app.state.installation_token.as_str(),
    ] {
        assert!(!logs.contains(s), "secret {s} in logs:\n{logs}");
        assert!(!failed_text.contains(s), "{s} in session.failed");
        assert!(!headers.contains(s), "{s} in dead-letter headers");
    }
    app.cleanup().await;
}
