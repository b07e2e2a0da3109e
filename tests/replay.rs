//! Single flight and the upstream-401 replay over real sockets, on the real
//! clock: the sidecar between the fake token endpoint and the fake backoffice
//! (or a small test upstream that answers what a test needs).

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;
use token_sidecar::app::Running;
use token_sidecar::fake::{self, FakeServer, World};
use token_sidecar::proxy::body::ProxyBody;
use token_sidecar::serve::{ServeOptions, Server};
use tokio::task::JoinSet;

use support::{Harness, Scripted};

const RETRIES: &str = "token_sidecar_upstream_retries_total{reason=\"401\"}";

async fn metric(h: &Harness, series: &str) -> f64 {
    let text = support::client()
        .get(h.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    support::metric(&text, series).unwrap_or_else(|| panic!("no {series} in /metrics"))
}

fn token_calls(world: &World) -> usize {
    world.with(|w| w.seen.len())
}

/// The bearer token the fake backoffice saw, from its echo.
fn bearer(echo: &serde_json::Value) -> String {
    echo["headers"]["authorization"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

engines! {
#[tokio::test]
async fn thousand_concurrent_requests_at_start_cause_one_password_grant() {
    // Three sockets per request live in this process (client, proxy in and
    // out, backoffice): 1,000 requests need more than a 1024 soft limit.
    rlimit::increase_nofile_limit(16_384).expect("raise the soft fd limit");
    // The first token call fails after 500 ms and the retry waits for
    // min_interval (3 s): the requests pile up, waiting for the first token.
    let world = World::new(300.0);
    world.with(|w| {
        w.script.push_back(Scripted {
            status: 503,
            body: "<html>starting</html>".into(),
            content_type: "text/html",
            delay: Duration::from_millis(500),
        })
    });
    let h = Harness::start_with_world(
        world.clone(),
        "[proxy]\ntoken_wait = \"20s\"\n[refresh]\nmin_interval = \"3s\"",
    )
    .await;
    let client = support::client();
    let mut requests = JoinSet::new();
    for i in 0..1000 {
        let (client, url) = (client.clone(), h.url(&format!("/api/{i}")));
        requests.spawn(async move { client.get(url).send().await.map(|r| r.status()) });
    }
    // Every request is in the sidecar, waiting, before any token exists.
    let running = h.running();
    support::eventually(
        Duration::from_secs(10),
        "1,000 requests in flight",
        || async { running.metrics.inflight().get() >= 1000 },
    )
    .await;
    assert_eq!(
        running.token("default").expect("profile default").status().generation,
        0,
        "all waited for the first token"
    );
    while let Some(r) = requests.join_next().await {
        assert_eq!(r.unwrap().unwrap(), StatusCode::OK);
    }
    assert_eq!(world.with(|w| w.password_grants), 1);
    assert_eq!(
        token_calls(&world),
        2,
        "one failed call and one password grant"
    );
    assert_eq!(world.with(|w| w.backoffice_requests), 1000);
}

#[tokio::test]
async fn hundred_concurrent_401s_cause_one_grant_and_every_request_is_replayed() {
    // min_interval 2 s: every request meets the revoked token before the
    // new one can exist.
    let h = Harness::start(300.0, "[refresh]\nmin_interval = \"2s\"").await;
    h.ready().await;
    let calls = token_calls(&h.world);
    h.world.revoke_access_tokens();
    let client = support::client();
    let mut requests = JoinSet::new();
    for i in 0..100 {
        let (client, url) = (client.clone(), h.url(&format!("/api/{i}")));
        requests.spawn(async move {
            let resp = client.get(url).send().await.unwrap();
            (
                resp.status(),
                resp.json::<serde_json::Value>().await.unwrap(),
            )
        });
    }
    while let Some(r) = requests.join_next().await {
        let (status, echo) = r.unwrap();
        assert_eq!(status, StatusCode::OK, "{echo}");
        assert!(bearer(&echo).starts_with("Bearer fake-access-2-"), "{echo}");
    }
    assert_eq!(
        token_calls(&h.world),
        calls + 1,
        "one token call for 100 401s"
    );
    assert_eq!(
        h.world.with(|w| w.password_grants),
        2,
        "password grant first"
    );
    assert_eq!(h.world.with(|w| w.backoffice_401s), 100);
    assert_eq!(metric(&h, RETRIES).await, 100.0);
}

#[tokio::test]
async fn retry_off_passes_401_back_and_asks_for_no_token() {
    let h = Harness::start(300.0, "[proxy]\nretry_on_401 = \"off\"").await;
    h.ready().await;
    let calls = token_calls(&h.world);
    h.world.revoke_access_tokens();
    let resp = support::client().get(h.url("/api/x")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // A second request shows the same: nothing was invalidated.
    let resp = support::client().get(h.url("/api/y")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(token_calls(&h.world), calls);
    assert_eq!(metric(&h, RETRIES).await, 0.0);
    assert_eq!(h.running().token("default").expect("profile default").status().generation, 1);
}
}

/// A test upstream that, like Tomcat, reads the whole request body before
/// answering; it rejects the fake's tokens up to generation `reject_up_to`
/// (`Bearer fake-access-N-...`) with `status` and `WWW-Authenticate`, and
/// echoes the body size with 200 for newer ones.
struct Picky {
    running: Running,
    world: Arc<World>,
    _auth: FakeServer,
    _upstream: Server,
    reject_up_to: Arc<AtomicU64>,
    /// (token number, status answered, body bytes received) per request.
    hits: Arc<Mutex<Vec<(u64, u16, usize)>>>,
}

fn token_number(authorization: &str) -> u64 {
    authorization
        .strip_prefix("Bearer fake-access-")
        .and_then(|rest| rest.split('-').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

async fn picky(status: u16, www_authenticate: &'static str, overrides: &str) -> Picky {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let world = World::new(300.0);
    let auth = fake::token_endpoint(world.clone(), loopback).await.unwrap();
    let listener = tokio::net::TcpListener::bind(loopback).await.unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    let reject_up_to = Arc::new(AtomicU64::new(1));
    let hits = Arc::new(Mutex::new(Vec::new()));
    let mut upstream = Server::new();
    let (limit, seen) = (reject_up_to.clone(), hits.clone());
    upstream.spawn(
        listener,
        ServeOptions {
            max_connections: 100,
            idle_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            http2: false,
            write_stall_timeout: None,
        },
        move |req, _| {
            let (limit, seen) = (limit.clone(), seen.clone());
            async move {
                let n = token_number(
                    req.headers()
                        .get(header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default(),
                );
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                let bytes = body.map(|b| b.len()).unwrap_or(0);
                let bad = n <= limit.load(Ordering::SeqCst);
                let code = if bad { status } else { 200 };
                seen.lock().unwrap().push((n, code, bytes));
                let echo = serde_json::json!({ "body_bytes": bytes }).to_string();
                let mut r = Response::new(ProxyBody::full(Bytes::from(echo)));
                *r.status_mut() = StatusCode::from_u16(code).unwrap();
                if bad {
                    r.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static(www_authenticate),
                    );
                }
                r
            }
        },
    );
    let config = support::config_for(
        &world,
        &auth.url("/oauth/token"),
        &format!("http://{upstream_addr}/"),
        overrides,
    );
    let running = support::start_sidecar(&config).await;
    running
        .token("default")
        .expect("profile default")
        .wait_usable(0, Duration::from_secs(10))
        .await
        .unwrap();
    Picky {
        running,
        world,
        _auth: auth,
        _upstream: upstream,
        reject_up_to,
        hits,
    }
}

impl Picky {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.running.proxy_addrs[0], path)
    }

    async fn get(&self) -> StatusCode {
        support::client()
            .get(self.url("/api/x"))
            .send()
            .await
            .unwrap()
            .status()
    }

    fn hits(&self) -> Vec<(u64, u16, usize)> {
        self.hits.lock().unwrap().clone()
    }

    async fn retries(&self) -> f64 {
        let text = support::client()
            .get(format!("http://{}/metrics", self.running.admin_addr))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        support::metric(&text, RETRIES).unwrap()
    }
}

const INVALID_TOKEN: &str = "Bearer error=\"invalid_token\", error_description=\"expired\"";
const PLAIN_401: &str = "Bearer realm=\"backoffice\"";

engines! {
#[tokio::test]
async fn large_body_meeting_a_401_is_passed_back_and_a_small_body_is_replayed_intact() {
    let p = picky(401, INVALID_TOKEN, "[refresh]\nmin_interval = \"100ms\"").await;
    let client = support::client();

    // 1 MiB: past proxy.retry_body_limit (64 KiB), so not replayable; the
    // client gets the upstream's 401, never a replay with a cut or empty body.
    let resp = client
        .post(p.url("/api/upload"))
        .body(vec![b'x'; 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let www = resp.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
    assert!(www.contains("invalid_token"), "{www}");
    assert_eq!(p.hits(), [(1, 401, 1024 * 1024)], "sent once, whole");
    assert_eq!(p.retries().await, 0.0);

    // The 401 still invalidated generation 1: a new token comes anyway.
    p.running
        .token("default").expect("profile default")
        .wait_usable(1, Duration::from_secs(5))
        .await
        .expect("a new token after the 401");

    // A small POST meeting a 401 is replayed with its body intact.
    p.reject_up_to.store(2, Ordering::SeqCst);
    let body: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    let resp = client
        .post(p.url("/api/small"))
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let echo: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(echo["body_bytes"], 1000, "{echo}");
    assert_eq!(p.hits()[1..], [(2, 401, 1000), (3, 200, 1000)]);
    assert_eq!(p.retries().await, 1.0);

    // A body exactly at the limit is still replayable.
    p.reject_up_to.store(3, Ordering::SeqCst);
    let resp = client
        .put(p.url("/api/limit"))
        .body(vec![b'y'; 64 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(p.hits()[3..], [(3, 401, 65536), (4, 200, 65536)]);
}

#[tokio::test]
async fn plain_401_is_passed_back_by_default() {
    let p = picky(401, PLAIN_401, "").await;
    assert_eq!(p.get().await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        p.get().await,
        StatusCode::UNAUTHORIZED,
        "no new token either"
    );
    assert_eq!(token_calls(&p.world), 1);
    assert_eq!(p.retries().await, 0.0);
    assert_eq!(p.hits(), [(1, 401, 0), (1, 401, 0)]);
}

#[tokio::test]
async fn plain_401_is_replayed_under_retry_any() {
    let p = picky(401, PLAIN_401, "[proxy]\nretry_on_401 = \"any\"").await;
    assert_eq!(p.get().await, StatusCode::OK);
    assert_eq!(
        p.hits(),
        [(1, 401, 0), (2, 200, 0)],
        "replayed with a new token"
    );
    assert_eq!(token_calls(&p.world), 2);
    assert_eq!(p.retries().await, 1.0);
}

#[tokio::test]
async fn a_replay_whose_new_token_is_revoked_too_is_replayed_once_more() {
    // As when another pod's refresh revokes the token this request was just
    // replayed with: generations 1 and 2 are rejected, 3 is good.
    let p = picky(401, INVALID_TOKEN, "[refresh]\nmin_interval = \"100ms\"").await;
    p.reject_up_to.store(2, Ordering::SeqCst);
    let resp = support::client()
        .post(p.url("/api/x"))
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(p.hits(), [(1, 401, 7), (2, 401, 7), (3, 200, 7)]);
    assert_eq!(p.retries().await, 2.0);
}

#[tokio::test]
async fn replays_stop_after_two_when_the_upstream_rejects_every_token() {
    let p = picky(401, INVALID_TOKEN, "[refresh]\nmin_interval = \"100ms\"").await;
    p.reject_up_to.store(u64::MAX, Ordering::SeqCst);
    assert_eq!(p.get().await, StatusCode::UNAUTHORIZED);
    assert_eq!(p.hits(), [(1, 401, 0), (2, 401, 0), (3, 401, 0)]);
    assert_eq!(p.retries().await, 2.0);
    assert_eq!(token_calls(&p.world), 3);
}

#[tokio::test]
async fn forbidden_is_never_replayed() {
    let p = picky(
        403,
        "Bearer error=\"insufficient_scope\"",
        "[proxy]\nretry_on_401 = \"any\"",
    )
    .await;
    assert_eq!(p.get().await, StatusCode::FORBIDDEN);
    assert_eq!(p.hits(), [(1, 403, 0)]);
    assert_eq!(token_calls(&p.world), 1, "a 403 asks for no new token");
    assert_eq!(p.retries().await, 0.0);
}

#[tokio::test]
async fn expired_token_is_never_injected_during_an_outage() {
    // 2 s tokens (usable 1.8 s, refresh at 0.9-1 s); the token endpoint goes
    // down right after the first grant and comes back 3 s later.
    let h = Harness::start(
        2.0,
        "[refresh]\nbackoff_base = \"100ms\"\nbackoff_max = \"500ms\"\nmin_interval = \"200ms\"",
    )
    .await;
    h.ready().await;
    h.world.with(|w| {
        w.script = (0..1000)
            .map(|_| Scripted {
                status: 503,
                body: String::new(),
                content_type: "text/plain",
                delay: Duration::ZERO,
            })
            .collect()
    });
    let client = support::client();
    support::eventually(Duration::from_secs(5), "503 token_unavailable", || async {
        let resp = client.get(h.url("/api/x")).send().await.unwrap();
        if resp.status() != StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(resp.status(), StatusCode::OK);
            return false;
        }
        let retry_after: u64 = resp.headers()[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry_after >= 1);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "token_unavailable");
        true
    })
    .await;
    let ready = client.get(h.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The upstream never saw an expired (or any rejected) token.
    assert_eq!(h.world.with(|w| w.backoffice_401s), 0);

    h.world.with(|w| w.script.clear());
    support::eventually(Duration::from_secs(5), "traffic flows again", || async {
        client.get(h.url("/api/x")).send().await.unwrap().status() == StatusCode::OK
    })
    .await;
    assert_eq!(h.world.with(|w| w.backoffice_401s), 0);
}
}
