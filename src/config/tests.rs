//! The settings as the command line and environment give them: defaults, refusals that name the
//! variable, the cross-group prefetch cap, secrets kept out of `Debug`, and the README's table.

use super::*;
use crate::broker::link::redact_url_password;

fn parse(args: &[&str]) -> Result<Settings, String> {
    let mut argv = vec!["bunq-session-worker"];
    argv.extend_from_slice(args);
    let s = Settings::try_parse_from(argv).map_err(|e| e.to_string())?;
    s.validate().map_err(|e| e.to_string())?;
    Ok(s)
}

#[test]
fn defaults_match_the_documented_interface() {
    let s = parse(&[]).unwrap();
    assert_eq!(s.broker.prefetch.get(), 16);
    assert_eq!(s.max_message_bytes, 65536);
    assert_eq!(s.bunq.http_timeout, Duration::from_millis(10_000));
    assert_eq!(s.retry.max_attempts, 8);
    assert_eq!(s.retry.max_elapsed, Duration::from_secs(300));
    assert_eq!(s.topology.queue_type, QueueType::Quorum);
    assert_eq!(
        s.topology.input_queue,
        "bunq-session-worker.provision-ready"
    );
    assert!(s.bunq.register_device);
    assert_eq!(s.bunq.permitted_ips, vec!["*".to_string()]);
    assert_eq!(s.redis.claim_lease, Duration::from_secs(30));
}

#[test]
fn invalid_values_name_the_setting() {
    let e = parse(&["--prefetch", "0"]).unwrap_err();
    assert!(e.contains("--prefetch"), "{e}");
    let e = parse(&["--http-timeout-ms", "soon"]).unwrap_err();
    assert!(e.contains("--http-timeout-ms"), "{e}");
    let e = parse(&["--queue-type", "stream"]).unwrap_err();
    assert!(e.contains("--queue-type"), "{e}");
    let e = parse(&["--amqp-url", "http://x"]).unwrap_err();
    assert!(e.contains("AMQP_URL"), "{e}");
    let e = parse(&["--amqp-url", "amqp://u:pw@a:5672/%2f,http://b"]).unwrap_err();
    assert!(e.contains("AMQP_URL") && e.contains("broker 2 of 2"), "{e}");
    let s = parse(&[
        "--amqp-url",
        "amqp://u:pw@a:5672/%2f, amqp://u:pw@b:5672/%2f",
    ])
    .unwrap();
    assert_eq!(
        s.broker.amqp_url_redacted(),
        "amqp://u:***@a:5672/%2f,amqp://u:***@b:5672/%2f"
    );
    assert_eq!(s.broker.first_amqp_url(), "amqp://u:pw@a:5672/%2f");
    let e = parse(&["--bunq-permitted-ips", "10.0.0.1,::1"]).unwrap_err();
    assert!(e.contains("BUNQ_PERMITTED_IPS"), "{e}");
    let e = parse(&["--bunq-installation-token", "x"]).unwrap_err();
    assert!(e.contains("BUNQ_CLIENT_PRIVATE_KEY"), "{e}");
    let long = "q".repeat(250);
    let e = parse(&["--input-queue", &long]).unwrap_err();
    assert!(
        e.contains("INPUT_QUEUE is too long for its delay queues"),
        "{e}"
    );
    let e = parse(&["--input-queue", &"q".repeat(300)]).unwrap_err();
    assert!(e.contains("INPUT_QUEUE is longer than 255 bytes"), "{e}");
    let e = parse(&["--shutdown-timeout-s", "18446744073709551615"]).unwrap_err();
    assert!(e.contains("SHUTDOWN_TIMEOUT_S"), "{e}");
    let e = parse(&["--delayed-retry-delays-s", "10000000000"]).unwrap_err();
    assert!(e.contains("--delayed-retry-delays-s"), "{e}");
    let e = parse(&["--bunq-user-agent", "a\nb"]).unwrap_err();
    assert!(e.contains("BUNQ_USER_AGENT"), "{e}");
    let e = parse(&["--retry-max-delay-ms", "10"]).unwrap_err();
    assert!(e.contains("RETRY_MAX_DELAY_MS"), "{e}");
    let e = parse(&["--bunq-session-rate-limit", "1000000000/1s"]).unwrap_err();
    assert!(
        e.contains("BUNQ_SESSION_RATE_LIMIT") && e.contains("at most 1000 calls per second"),
        "{e}"
    );
    assert!(parse(&["--bunq-session-rate-limit", "1000/1s"]).is_ok());
    // A claim must outlast the bunq call it was renewed for.
    let e = parse(&["--http-timeout-ms", "10000", "--claim-lease-ms", "11999"]).unwrap_err();
    assert!(
        e.contains(
            "CLAIM_LEASE_MS (11999 ms) must be at least HTTP_TIMEOUT_MS + 2000 ms = 12000 ms"
        ),
        "{e}"
    );
    assert!(parse(&["--http-timeout-ms", "10000", "--claim-lease-ms", "12000"]).is_ok());
}

/// Sentinels come with the name of the primary they monitor, each as `host:port`; a bad entry
/// is refused without echoing it (a URL there may carry a password).
#[test]
fn sentinels_name_their_primary() {
    let e = parse(&["--redis-sentinels", "s1:26379"]).unwrap_err();
    assert!(e.contains("REDIS_SENTINEL_MASTER"), "{e}");
    let e = parse(&["--redis-sentinel-master", "bsw"]).unwrap_err();
    assert!(e.contains("REDIS_SENTINELS"), "{e}");
    let e = parse(&[
        "--redis-sentinels",
        "redis://u:hunter2@s1:26379",
        "--redis-sentinel-master",
        "m",
    ])
    .unwrap_err();
    assert!(
        e.contains("sentinel 1 of 1 is not HOST:PORT") && !e.contains("hunter2"),
        "{e}"
    );
    for bad in ["s1:0", ":pw@s1:26379", "::1:26379", "s1"] {
        let e = parse(&["--redis-sentinels", bad, "--redis-sentinel-master", "m"]).unwrap_err();
        assert!(e.contains("HOST:PORT") && !e.contains("pw@"), "{bad}: {e}");
    }
    // Empty entries are left out, as AMQP_URL's are; an empty list is no list.
    assert!(
        parse(&[
            "--redis-sentinels",
            "[::1]:26379,,s2:26379,",
            "--redis-sentinel-master",
            "m"
        ])
        .is_ok()
    );
    assert!(parse(&["--redis-sentinels", ""]).is_ok());
    let s = parse(&[
        "--redis-sentinels",
        "s1:26379, 10.0.0.2:26379",
        "--redis-sentinel-master",
        "bsw",
    ])
    .unwrap();
    match s.redis.location() {
        Some(crate::fleet::Location::Sentinels {
            url: None,
            sentinels,
            master,
            password: None,
        }) => {
            assert_eq!(sentinels, ["s1:26379", "10.0.0.2:26379"]);
            assert_eq!(master, "bsw");
        }
        _ => panic!("sentinels without REDIS_URL are a fleet's Redis"),
    }
    assert!(parse(&[]).unwrap().redis.location().is_none());
}

#[test]
fn prefetch_is_bounded_under_pacing() {
    let s = parse(&["--bunq-session-rate-limit", "1/30s", "--prefetch", "100"]).unwrap();
    let (p, warning) = s.effective_prefetch();
    assert_eq!(p, 30, "1800 s / 2 / 30 s");
    assert!(warning.unwrap().contains("using prefetch 30"));
    let s = parse(&["--bunq-session-rate-limit", "1/30s"]).unwrap();
    assert_eq!(s.effective_prefetch(), (16, None));
    let s = parse(&["--prefetch", "100"]).unwrap();
    assert_eq!(s.effective_prefetch(), (100, None));
    let s = parse(&["--retry-max-elapsed-s", "1000"]).unwrap();
    assert!(
        s.warnings()
            .iter()
            .any(|w| w.contains("RETRY_MAX_ELAPSED_S")),
        "{:?}",
        s.warnings()
    );
    let e = parse(&["--bunq-session-rate-limit", "30s"]).unwrap_err();
    assert!(
        e.contains("BUNQ_SESSION_RATE_LIMIT") || e.contains("--bunq-session-rate-limit"),
        "{e}"
    );
    let s = parse(&["--delayed-retry-delays-s", "1,2"]).unwrap();
    assert_eq!(
        s.topology.delayed_retry_delays.0,
        vec![Duration::from_secs(1), Duration::from_secs(2)]
    );
    let s = parse(&["--delayed-retry-delays-s", ""]).unwrap();
    assert!(s.topology.delayed_retry_delays.0.is_empty());
    let s = parse(&["--delayed-retry-delays-s", "off"]).unwrap();
    assert!(s.topology.delayed_retry_delays.0.is_empty());
    assert!(parse(&["--delayed-retry-delays-s", "5,0"]).is_err());
}

#[test]
fn debug_hides_secrets() {
    let s = parse(&[
        "--amqp-url",
        "amqp://user:hunter2@broker:5672/%2f",
        "--bunq-client-private-key",
        "PRIVATE-KEY-MATERIAL",
        "--bunq-installation-token",
        "INSTALLATION-TOKEN-VALUE",
        "--bunq-server-public-key",
        "PUB",
    ])
    .unwrap();
    let dbg = format!("{s:?}");
    assert!(!dbg.contains("hunter2"), "{dbg}");
    assert!(!dbg.contains("PRIVATE-KEY-MATERIAL"), "{dbg}");
    assert!(!dbg.contains("INSTALLATION-TOKEN-VALUE"), "{dbg}");
    assert!(dbg.contains("amqp://user:***@broker:5672/%2f"), "{dbg}");
}

#[test]
fn redacts_only_the_password() {
    assert_eq!(redact_url_password("amqps://a:b@h/v"), "amqps://a:***@h/v");
    assert_eq!(redact_url_password("amqp://h:5672/v"), "amqp://h:5672/v");
    assert_eq!(redact_url_password("amqp://a:b:c@h"), "amqp://a:***@h");
}

#[test]
fn unparsable_values_name_the_variable_and_what_is_allowed() {
    let explained = |args: &[&str]| {
        let mut argv = vec!["bunq-session-worker"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).map_err(explain::<Cli>) {
            Err(LoadError::Invalid(e)) => e.to_string(),
            other => panic!("expected an explained error, got {other:?}"),
        }
    };
    assert_eq!(
        explained(&["--prefetch", "0"]),
        "invalid configuration: PREFETCH (--prefetch): \"0\" is not allowed: expected a whole number from 1 to 65535"
    );
    let e = explained(&["--queue-type", "stream"]);
    assert!(
        e.contains("QUEUE_TYPE (--queue-type)") && e.contains("quorum, classic"),
        "{e}"
    );
    let e = explained(&["--http-timeout-ms", "soon"]);
    assert!(
        e.contains("HTTP_TIMEOUT_MS") && e.contains("milliseconds"),
        "{e}"
    );
    let e = explained(&["emulator", "--listen", "nowhere"]);
    assert!(e.contains("EMULATOR_LISTEN"), "{e}");
}

/// `--help` and the README's configuration table name the same variables.
#[test]
fn the_readme_lists_every_setting() {
    use clap::CommandFactory;
    let readme = include_str!("../../README.md");
    let section = readme
        .split("## Configuration")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has a Configuration section");
    let documented: std::collections::BTreeSet<String> = section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .flat_map(|l| {
            l.split('|')
                .nth(1)
                .unwrap_or_default()
                .split(',')
                .map(|v| v.trim().trim_matches('`').to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    let known: std::collections::BTreeSet<String> = Settings::command()
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .chain(["RUST_LOG".to_owned(), "NO_COLOR".to_owned()])
        .collect();
    assert_eq!(documented, known);
}

#[test]
fn groups_build_their_objects() {
    let s = parse(&["--retry-max-elapsed-s", "30", "--input-queue", "q"]).unwrap();
    assert_eq!(s.retry.policy().max_elapsed, Some(Duration::from_secs(30)));
    let t = s.topology.topology();
    assert_eq!(t.input_queue, "q");
    assert_eq!(t.delay_queue_name(Duration::from_secs(60)), "q.retry-60s");
}

#[test]
fn the_consumer_key_is_checked_and_bunq_production_needs_one() {
    let dir = std::env::temp_dir().join(format!("bsw-token-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("consumer.pub.pem");
    let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let der = {
        use aws_lc_rs::{encoding::AsDer, signature::KeyPair};
        key.public_key().as_der().unwrap()
    };
    let pem = pem::encode(&pem::Pem::new("PUBLIC KEY", der.as_ref().to_vec()));
    std::fs::write(&path, pem).unwrap();
    let p = path.to_str().unwrap();
    let s = parse(&["--session-token-encryption-key", p]).unwrap();
    assert_eq!(
        s.token.consumer_key().unwrap().unwrap().alg(),
        "RSA-OAEP-256"
    );
    assert!(!s.warnings().iter().any(|w| w.contains("in clear")));
    let e = parse(&[
        "--session-token-encryption-key",
        "/nonexistent/consumer.pem",
    ])
    .unwrap_err();
    assert!(
        e.contains("SESSION_TOKEN_ENCRYPTION_KEY") && e.contains("cannot read"),
        "{e}"
    );
    let prod = ["--bunq-api-url", "https://api.bunq.com/v1"];
    let e = parse(&prod).unwrap_err();
    assert!(
        e.contains("SESSION_TOKEN_ENCRYPTION_KEY") && e.contains("SESSION_TOKEN_CLEARTEXT=allow"),
        "{e}"
    );
    assert!(parse(&[prod[0], prod[1], "--session-token-cleartext", "allow"]).is_ok());
    assert!(parse(&[prod[0], prod[1], "--session-token-encryption-key", p]).is_ok());
    let sandbox = parse(&["--bunq-api-url", "https://public-api.sandbox.bunq.com/v1"]).unwrap();
    assert!(sandbox.warnings().iter().any(|w| w.contains("in clear")));
    std::fs::remove_dir_all(dir).unwrap();
}
