//! Redis cut off at the worst moment: right after bunq opened a session. The worker reaches
//! Redis through a proxy that drops every connection (commands in flight are lost, as in a
//! network cut), while the test reads the record behind it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use wiremock::{Request, Respond, ResponseTemplate};

use crate::{
    fleet::{calls_for, record_fields, redis_url, remove_keys, use_redis},
    helpers::*,
    proxy::TcpProxy,
};

/// Answers `answer`, after cutting the worker off Redis on the first call.
struct CutsRedis {
    answer: Signed,
    proxy: Arc<TcpProxy>,
    done: AtomicBool,
}

impl Respond for CutsRedis {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        if !self.done.swap(true, Ordering::SeqCst) {
            self.proxy.cut();
        }
        self.answer.respond(req)
    }
}

/// Each credential record under `prefix`: its state (`st`) and whether its lease (`le`) is over
/// on Redis's clock.
async fn records(prefix: &str) -> Vec<(String, bool)> {
    let (now_ms, records) = record_fields(prefix, &["st", "le"]).await;
    records
        .into_iter()
        .map(|r| {
            let lease_end: u64 = r[1].as_deref().and_then(|le| le.parse().ok()).unwrap_or(0);
            (r[0].clone().unwrap_or_default(), lease_end <= now_ms)
        })
        .collect()
}

/// bunq opens the session and the worker loses Redis at that moment, for longer than the
/// claim's lease and than RETRY_MAX_ELAPSED_S. `session.created` is published all the same; the
/// record of it lands once Redis is reachable again (until then another replica could take the
/// credential over), and a later copy of the credential is acked without a call.
#[tokio::test]
async fn a_session_opened_while_redis_is_cut_off_is_recorded_once_redis_is_back() {
    let mut app = TestApp::new().await;
    app.settings.bunq.http_timeout = Duration::from_millis(1000);
    app.settings.retry.max_elapsed = Duration::from_secs(1);
    let proxy = Arc::new(TcpProxy::start(redis_url().trim_start_matches("redis://")).await);
    let prefix = use_redis(&mut app, &format!("redis://{}", proxy.addr()));
    app.settings.bunq.register_device = false;
    app.settings.redis.claim_lease = Duration::from_millis(3000);
    app.session_server()
        .responds_with(CutsRedis {
            answer: app.answer(200, &fixture("session-server.user-person.json")),
            proxy: proxy.clone(),
            done: AtomicBool::new(false),
        })
        .await;
    app.start_worker().await;
    app.publish_json(&slim(21, "tok-redis-cut")).await;
    let out = app.next_output().await;
    assert_eq!(type_of(&out), "session.created", "{:?}", body_json(&out));
    eventually(
        "the claim's lease is over while Redis is cut off",
        || async { records(&prefix).await == [("claimed".to_owned(), true)] },
    )
    .await;
    proxy.restore();
    eventually("the session is recorded in Redis", || async {
        records(&prefix).await.first().map(|r| r.0.as_str()) == Some("created")
    })
    .await;
    app.publish_json(&slim(21, "tok-redis-cut")).await;
    eventually("the copy is settled", || async {
        app.ready_count(&app.names.input_queue).await == 0
            && app.status.as_ref().is_none_or(|s| s.in_flight() == 0)
    })
    .await;
    let more = app.next_output_within(Duration::from_secs(2)).await;
    assert!(more.is_none(), "a second event");
    assert_eq!(app.ready_count(&app.names.dead_letter_queue).await, 0);
    assert_eq!(calls_for(&app, "tok-redis-cut").await, 1);
    app.cleanup().await;
    remove_keys(&prefix).await;
}
