//! Every outcome's plan, without a broker: the messages, their properties and bookkeeping, and
//! what becomes of the delivery.

use lapin::types::{AMQPValue, FieldTable, ShortString};
use secrecy::SecretString;
use time::macros::datetime;

use super::*;
use crate::{
    broker::{
        Route,
        headers::{int_header, long, str_header},
    },
    events::{self, ProvisionId, SCHEMA_VERSION, SessionCreated},
    failure::FailureReason,
    outcome::Delayed,
};

const NOW: OffsetDateTime = datetime!(2026-12-05 12:00 UTC);
const SLIM: &str = r#"{"provision_id": 7, "credential_id": 8, "token_value": "tok-123"}"#;

fn topology() -> Topology {
    Topology {
        input_exchange: "in.x".into(),
        input_routing_key: "provision.ready".into(),
        input_queue: "in.q".into(),
        queue_type: crate::broker::QueueType::Quorum,
        output_exchange: "out.x".into(),
        dead_letter_exchange: "dlx".into(),
        dead_letter_queue: "dlq".into(),
        delay_tiers: vec![std::time::Duration::from_secs(60)],
        delivery_limit: 5,
    }
}

/// An input as `Inbound::read` makes it: `body` with the producer's `headers`.
fn inbound(body: &str, headers: FieldTable) -> Inbound {
    let body = body.as_bytes().to_vec();
    let decoded = events::decode(&body, 65536);
    let identity = crate::identity::identity(&body, &decoded);
    let properties = BasicProperties::default()
        .with_message_id("m-1".into())
        .with_content_type("application/json".into())
        .with_user_id("partner".into())
        .with_headers(headers);
    Inbound {
        identity,
        decoded,
        body,
        history: History::default(),
        original_route: Route {
            exchange: "in.x".into(),
            routing_key: "provision.ready".into(),
        },
        routing_key: "provision.ready".into(),
        redelivered: false,
        delivery_count: None,
        replay_of: None,
        message_id: "m-1".into(),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        properties,
    }
}

fn producer_headers() -> FieldTable {
    let mut h = FieldTable::default();
    h.insert("tenant".into(), long("acme"));
    h
}

fn plan_of<'a>(i: &'a Inbound, outcome: &Outcome, seal: &Seal, frame_max: u32) -> Plan<'a> {
    let t = topology();
    // The plan borrows only the input, so the topology may go.
    let to = Addresses {
        topology: &t,
        seal,
        frame_max,
    };
    plan(i, outcome, Some(3), to, NOW)
}

fn failure(reason: FailureReason) -> Failure {
    Failure {
        reason,
        detail: "bunq said no".into(),
        http_status: Some(400),
        error_description: Some("User credentials are incorrect.".into()),
        attempts: 2,
        first_attempt_at: NOW,
        last_attempt_at: NOW,
        not_before: None,
    }
}

/// Whether `shown` (a `Debug` rendering) holds `secret` as text or as a list of its bytes.
fn leaks(shown: &str, secret: &str) -> bool {
    let bytes = format!("{:?}", secret.as_bytes());
    shown.contains(secret) || shown.contains(bytes.trim_matches(['[', ']']))
}

fn json(m: &Message<'_>) -> serde_json::Value {
    serde_json::from_slice(&m.body).expect("a JSON body")
}

#[test]
fn created_publishes_the_session_until_confirmed_then_records_it_and_acks() {
    let i = inbound(SLIM, producer_headers());
    let event = SessionCreated {
        schema_version: SCHEMA_VERSION,
        provision_id: ProvisionId::Int(7),
        external_uuid: None,
        credential_id: Some(8),
        session_id: 42,
        session_token: events::SessionToken::Clear(SecretString::from("session-token")),
        user_id: Some(9),
        user_api_key_id: None,
        user_type: None,
        session_timeout_seconds: 600,
        expires_at: NOW,
        created_at: NOW,
        installation_key_sha256: "ab".into(),
    };
    let p = plan_of(
        &i,
        &Outcome::Created(Box::new(crate::outcome::Created::from_event(&event))),
        &Seal::new(&[7; 32]),
        0,
    );
    assert_eq!(p.settled, Settled::Created);
    assert!(p.ack);
    assert_eq!(p.record, Settlement::Created);
    let [m] = &p.messages[..] else {
        panic!("one message: {:?}", p.messages);
    };
    assert_eq!(
        (m.exchange.as_str(), m.routing_key.as_str()),
        ("out.x", "session.created")
    );
    assert_eq!(m.patience, Patience::UntilConfirmed);
    assert!(matches!(m.if_unconfirmed, IfUnconfirmed::LeaveUnacked));
    assert_eq!(json(m)["session_id"], 42);
    let props = &m.properties;
    assert_eq!(
        props.message_id().as_ref().map(ShortString::as_str),
        Some(crate::identity::output_message_id("session.created", &i.identity).as_str())
    );
    assert_eq!(
        props.correlation_id().as_ref().map(ShortString::as_str),
        Some("m-1")
    );
    assert_eq!(
        props.kind().as_ref().map(ShortString::as_str),
        Some("session.created")
    );
    assert_eq!(*props.timestamp(), Some(NOW.unix_timestamp() as u64));
    assert_eq!(
        str_header(props, "traceparent").as_deref(),
        i.traceparent.as_deref()
    );
    // An event carries no producer header but the trace context.
    assert_eq!(str_header(props, "tenant"), None);
    let shown = format!("{p:?}");
    assert!(!leaks(&shown, "session-token"), "{shown}");
    assert!(shown.contains("session.created"), "{shown}");
}

#[test]
fn skipped_and_already_settled_only_ack_and_abandoned_leaves_the_delivery() {
    let i = inbound(SLIM, FieldTable::default());
    let seal = Seal::new(&[7; 32]);
    for (outcome, settled, ack) in [
        (Outcome::Skipped, Settled::Skipped, true),
        (
            Outcome::AlreadySettled(crate::ledger::Taken::Failed),
            Settled::Repeat,
            true,
        ),
        (Outcome::Abandoned, Settled::Abandoned, false),
    ] {
        let p = plan_of(&i, &outcome, &seal, 0);
        assert!(p.messages.is_empty(), "{settled}");
        assert_eq!((p.settled, p.ack), (settled, ack));
        assert_eq!(p.record, Settlement::Released, "{settled}");
    }
}

#[test]
fn a_failed_credential_is_dead_lettered_with_its_reason_then_reported() {
    let i = inbound(SLIM, producer_headers());
    let f = failure(FailureReason::CredentialRejected);
    let p = plan_of(
        &i,
        &Outcome::Failed(Box::new(f.clone())),
        &Seal::new(&[7; 32]),
        0,
    );
    assert_eq!(p.settled, Settled::DeadLettered);
    assert_eq!(p.record, Settlement::Failed { spent: true });
    let [dl, event] = &p.messages[..] else {
        panic!("two messages: {:?}", p.messages);
    };
    assert_eq!(
        (dl.exchange.as_str(), dl.routing_key.as_str()),
        ("dlx", "provision.ready")
    );
    assert_eq!(&dl.body[..], SLIM.as_bytes());
    let shown = format!("{p:?}");
    assert!(
        !leaks(&shown, "tok-123"),
        "the input's token_value: {shown}"
    );
    match &dl.if_unconfirmed {
        IfUnconfirmed::Requeue(Settlement::Answered(kept)) => assert_eq!(**kept, f),
        other => panic!("the failure is kept for the requeue: {other:?}"),
    }
    let h = &dl.properties;
    assert_eq!(
        str_header(h, "x-error-reason").as_deref(),
        Some("credential_rejected")
    );
    assert_eq!(
        str_header(h, "x-error-detail").as_deref(),
        Some("bunq said no")
    );
    assert_eq!(int_header(h, "x-attempts"), Some(2));
    assert_eq!(
        int_header(h, crate::broker::GENERATION_HEADER),
        Some(3),
        "a replay names the generation that failed"
    );
    assert_eq!(
        str_header(h, "x-original-exchange").as_deref(),
        Some("in.x")
    );
    assert_eq!(
        str_header(h, "x-original-routing-key").as_deref(),
        Some("provision.ready")
    );
    assert_eq!(
        str_header(h, "x-failed-at").as_deref(),
        Some("2026-12-05T12:00:00Z")
    );
    assert_eq!(str_header(h, "tenant").as_deref(), Some("acme"));
    // A user_id that is not the worker's login would make the broker refuse the copy.
    assert_eq!(h.user_id(), &None);
    assert_eq!(
        str_header(h, "x-original-user-id").as_deref(),
        Some("partner")
    );

    assert_eq!(
        (event.exchange.as_str(), event.routing_key.as_str()),
        ("out.x", "session.failed")
    );
    assert!(matches!(event.if_unconfirmed, IfUnconfirmed::GoOn));
    let body = json(event);
    assert_eq!(body["schema_version"], 1);
    assert_eq!(body["reason"], "credential_rejected");
    assert_eq!(body["first_attempt_at"], "2026-12-05T12:00:00Z");
    assert_eq!(body["provision_id"], 7);
    assert_eq!(body["http_status"], 400);
    assert_eq!(body["attempts"], 2);
    assert!(body.get("detail").is_none(), "{body}");
}

#[test]
fn input_that_is_no_credential_is_dead_lettered_without_an_event() {
    let i = inbound("not json", FieldTable::default());
    let f = Failure::without_call(
        FailureReason::MalformedJson,
        "not JSON".into(),
        0,
        None,
        NOW,
    );
    let p = plan_of(&i, &Outcome::Failed(Box::new(f)), &Seal::new(&[7; 32]), 0);
    let [dl] = &p.messages[..] else {
        panic!("only the dead letter: {:?}", p.messages);
    };
    assert_eq!(dl.exchange, "dlx");
    assert_eq!(
        str_header(&dl.properties, "x-error-reason").as_deref(),
        Some("malformed_json")
    );
    // No credential, no record, nothing to replay into.
    assert_eq!(
        int_header(&dl.properties, crate::broker::GENERATION_HEADER),
        None
    );
}

#[test]
fn a_delayed_copy_carries_sealed_bookkeeping_that_reads_back() {
    let mut headers = producer_headers();
    headers.insert("x-death".into(), AMQPValue::LongLongInt(1));
    let i = inbound(SLIM, headers);
    let seal = Seal::new(&[7; 32]);
    let d = Delayed {
        delay: std::time::Duration::from_secs(60),
        window: false,
        retries: 1,
        calls: 4,
        detail: "503 for a while".into(),
        first_attempt_at: NOW,
        not_before: Some(NOW + time::Duration::seconds(30)),
    };
    let p = plan_of(&i, &Outcome::Delayed(Box::new(d)), &seal, 0);
    assert_eq!(p.settled, Settled::Delayed);
    assert_eq!(
        p.record,
        Settlement::Parked {
            round: 1,
            stale_for: std::time::Duration::from_secs(180)
        }
    );
    let [m] = &p.messages[..] else {
        panic!("one copy: {:?}", p.messages);
    };
    assert_eq!(
        (m.exchange.as_str(), m.routing_key.as_str()),
        ("", "in.q.retry-60s")
    );
    assert!(matches!(
        m.if_unconfirmed,
        IfUnconfirmed::Requeue(Settlement::Released)
    ));
    let (history, route) = seal.read(
        &m.properties,
        &i.identity,
        Route {
            exchange: String::new(),
            routing_key: "in.q.retry-60s".into(),
        },
    );
    assert_eq!(
        history,
        History {
            round: 1,
            calls_before: 4,
            first_attempt_at: Some(NOW),
            returns: 0,
            not_before: Some(NOW + time::Duration::seconds(30)),
            waits: 0,
            generation: Some(3),
        }
    );
    assert_eq!(route, i.original_route);
    assert_eq!(str_header(&m.properties, "tenant").as_deref(), Some("acme"));
    assert!(int_header(&m.properties, "x-death").is_none());
    assert!(
        m.properties.expiration().is_none(),
        "the tier's TTL applies"
    );
}

/// A window wait goes to the window queue with its own expiration, counts a round and a
/// window wait, and both read back sealed.
#[test]
fn a_window_wait_goes_to_the_window_queue_with_its_expiration() {
    let mut i = inbound(SLIM, producer_headers());
    i.history.round = 1;
    let seal = Seal::new(&[7; 32]);
    let d = Delayed {
        delay: std::time::Duration::from_millis(991_250),
        window: true,
        retries: 2,
        calls: 1,
        detail: "429".into(),
        first_attempt_at: NOW,
        not_before: Some(NOW + time::Duration::seconds(991)),
    };
    let p = plan_of(&i, &Outcome::Delayed(Box::new(d)), &seal, 0);
    let [m] = &p.messages[..] else {
        panic!("one copy: {:?}", p.messages);
    };
    assert_eq!(m.routing_key, "in.q.wait");
    assert_eq!(
        m.properties.expiration().as_ref().map(|e| e.as_str()),
        Some("991250")
    );
    let (history, _) = seal.read(&m.properties, &i.identity, i.original_route.clone());
    assert_eq!((history.round, history.waits, history.tier()), (2, 1, 1));
}

#[test]
fn a_counted_hand_back_adds_a_return_and_an_uncounted_one_does_not() {
    let mut i = inbound(SLIM, FieldTable::default());
    i.history.returns = 2;
    let seal = Seal::new(&[7; 32]);
    for (counted, returns) in [(true, 3), (false, 2)] {
        let p = plan_of(&i, &Outcome::Returned { counted }, &seal, 0);
        assert_eq!(p.settled, Settled::Returned);
        assert_eq!(p.record, Settlement::Released);
        let [m] = &p.messages[..] else {
            panic!("one copy: {:?}", p.messages);
        };
        assert_eq!((m.exchange.as_str(), m.routing_key.as_str()), ("", "in.q"));
        let (history, _) = seal.read(&m.properties, &i.identity, i.original_route.clone());
        assert_eq!(history.returns, returns, "counted: {counted}");
    }
}

#[test]
fn producer_headers_too_large_for_a_frame_are_left_out_and_said_so() {
    let mut big = FieldTable::default();
    big.insert("blob".into(), long(&"x".repeat(20_000)));
    let i = inbound(SLIM, big);
    let seal = Seal::new(&[7; 32]);
    let outcome = Outcome::Returned { counted: true };
    let fits = plan_of(&i, &outcome, &seal, 131_072);
    assert!(str_header(&fits.messages[0].properties, "blob").is_some());
    let small = plan_of(&i, &outcome, &seal, 16_384);
    let props = &small.messages[0].properties;
    assert!(str_header(props, "blob").is_none());
    let note = str_header(props, properties::PRODUCER_HEADERS_DROPPED_HEADER).unwrap();
    assert!(note.contains("16384"), "{note}");
    assert!(properties::encoded_size(props).unwrap() < 16_384 - 4096);
    // The bookkeeping survives the fallback.
    let (history, _) = seal.read(props, &i.identity, i.original_route.clone());
    assert_eq!(history.returns, 1);
}
