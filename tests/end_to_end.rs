//! The whole path over real sockets: password grant against the fake token
//! endpoint, token injected into a proxied call to the fake backoffice.

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::Value;
use support::Harness;
use token_sidecar::serve::{ServeOptions, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};

engines! {
#[tokio::test]
async fn injects_the_bearer_token_and_replaces_the_clients_authorization() {
    let h = Harness::start(300.0, "").await;
    let resp = support::client()
        .get(h.url("/backoffice/api/merchants?limit=5&q=a%20b"))
        .header("authorization", "Basic bm90OnRoaXM=")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(echo["path"], "/base/backoffice/api/merchants");
    assert_eq!(echo["query"], "limit=5&q=a%20b");
    let auth = echo["headers"]["authorization"].as_str().unwrap();
    assert!(auth.starts_with("Bearer fake-access-1-"), "{auth}");
    assert_eq!(h.world.with(|w| w.password_grants), 1);
}
}

// ---------------------------------------------------------------------------
// Test-only upstreams and helpers.

/// A body fed chunk by chunk from a channel: for uploads from the test client
/// and downloads from a test upstream, so a test decides when each byte leaves.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

/// A test upstream on `127.0.0.1:0` serving `handler`; stops when dropped.
async fn upstream<H, F, B>(handler: H) -> (Server, SocketAddr)
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut server = Server::new();
    server.spawn(
        listener,
        ServeOptions {
            max_connections: 64,
            idle_timeout: Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
            http2: false,
            write_stall_timeout: None,
        },
        handler,
    );
    (server, addr)
}

/// Overrides pointing the proxy at `addr`.
fn upstream_at(addr: SocketAddr, more: &str) -> String {
    format!("[proxy]\nupstream = \"http://{addr}/\"\n{more}")
}

/// Byte `i` of the test pattern: position-dependent, so a dropped, repeated
/// or reordered chunk changes the sum.
fn pattern(chunk: usize, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| ((chunk * 31 + i) % 251) as u8)
            .collect::<Vec<_>>(),
    )
}

fn checksum(sum: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(sum, |s, &b| s.wrapping_mul(31).wrapping_add(u64::from(b)))
}

/// One HTTP/1.1 exchange over a raw socket (`Connection: close` is the
/// caller's): status, lower-cased header lines, body.
async fn raw_http(addr: SocketAddr, request: &str) -> (u16, Vec<String>, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("the sidecar answers and closes within 5 s")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (
        status,
        lines.map(str::to_ascii_lowercase).collect(),
        body.to_owned(),
    )
}

async fn metrics(h: &Harness) -> String {
    let resp = support::client()
        .get(h.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap()
}

/// `token_sidecar_local_responses_total{error="<code>",route="default"}`.
async fn local_count(h: &Harness, code: &str) -> f64 {
    let text = metrics(h).await;
    support::metric(
        &text,
        &format!("token_sidecar_local_responses_total{{error=\"{code}\",route=\"default\"}}"),
    )
    .unwrap_or_else(|| panic!("no local_responses series for {code}:\n{text}"))
}

/// Asserts a local JSON error answer and returns its body.
async fn assert_local_error(resp: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status(), status);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

// ---------------------------------------------------------------------------
// Streaming.

const CHUNK: usize = 64 * 1024;
/// 32 MiB in 64 KiB chunks.
const CHUNKS: usize = 512;

engines! {
// A streamed body of unknown length goes chunked: the lane hands those to hyper.
@handed_over
#[tokio::test]
async fn a_32_mib_upload_arrives_whole() {
    let h = Harness::start(300.0, "").await;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        for i in 0..CHUNKS {
            if tx.send(pattern(i, CHUNK)).await.is_err() {
                return;
            }
        }
    });
    let resp = support::client()
        .post(h.url("/backoffice/api/upload"))
        .body(reqwest::Body::wrap(ChannelBody(rx)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo: Value = resp.json().await.unwrap();
    assert_eq!(echo["body_bytes"], CHUNKS * CHUNK);
    assert_eq!(echo["method"], "POST");
}

#[tokio::test]
async fn a_32_mib_download_arrives_intact() {
    let (_up, addr) = upstream(|_req, _peer| async {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            for i in 0..CHUNKS {
                if tx.send(pattern(i, CHUNK)).await.is_err() {
                    return;
                }
            }
        });
        Response::new(ChannelBody(rx))
    })
    .await;
    let h = Harness::start(300.0, &upstream_at(addr, "")).await;
    let mut resp = support::client()
        .get(h.url("/download"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (mut got, mut sum) = (0usize, 0u64);
    while let Some(chunk) = resp.chunk().await.unwrap() {
        got += chunk.len();
        sum = checksum(sum, &chunk);
    }
    let want = (0..CHUNKS).fold(0, |s, i| checksum(s, &pattern(i, CHUNK)));
    assert_eq!(got, CHUNKS * CHUNK);
    assert_eq!(sum, want, "bytes changed, dropped or reordered");
}

#[tokio::test]
async fn the_download_reaches_the_client_before_the_upstream_has_finished() {
    // The upstream sends its second chunk only once the client has the first:
    // a proxy that buffered the whole response would never deliver it.
    let client_has_first = Arc::new(Notify::new());
    let gate = client_has_first.clone();
    let (_up, addr) = upstream(move |_req, _peer| {
        let gate = gate.clone();
        async move {
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                let _ = tx.send(pattern(0, 16 * 1024)).await;
                gate.notified().await;
                let _ = tx.send(pattern(1, 16 * 1024)).await;
            });
            Response::new(ChannelBody(rx))
        }
    })
    .await;
    let h = Harness::start(300.0, &upstream_at(addr, "")).await;
    let exchange = async {
        let mut resp = support::client().get(h.url("/slow")).send().await.unwrap();
        let mut got = 0;
        while got < 16 * 1024 {
            got += resp.chunk().await.unwrap().expect("more body").len();
        }
        client_has_first.notify_one();
        while let Some(c) = resp.chunk().await.unwrap() {
            got += c.len();
        }
        got
    };
    let got = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .expect("the first chunk reached the client while the upstream waited");
    assert_eq!(got, 32 * 1024);
}

// A streamed body of unknown length goes chunked: the lane hands those to hyper.
@handed_over
#[tokio::test]
async fn the_upload_reaches_the_upstream_before_the_client_has_finished() {
    // The client sends its second chunk only once the upstream has the first:
    // a proxy that buffered the whole request would never forward it.
    let upstream_has_first = Arc::new(Notify::new());
    let gate = upstream_has_first.clone();
    let (_up, addr) = upstream(move |req: Request<Incoming>, _peer| {
        let gate = gate.clone();
        async move {
            let mut body = req.into_body();
            let mut got = 0;
            let mut told = false;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    got += data.len();
                }
                if got >= 16 * 1024 && !told {
                    gate.notify_one();
                    told = true;
                }
            }
            Response::new(Full::new(Bytes::from(got.to_string())))
        }
    })
    .await;
    let h = Harness::start(300.0, &upstream_at(addr, "")).await;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let _ = tx.send(pattern(0, 16 * 1024)).await;
        upstream_has_first.notified().await;
        let _ = tx.send(pattern(1, 16 * 1024)).await;
    });
    let exchange = async {
        let resp = support::client()
            .post(h.url("/upload"))
            .body(reqwest::Body::wrap(ChannelBody(rx)))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap()
    };
    let got = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .expect("the first chunk reached the upstream while the client waited");
    assert_eq!(got, (32 * 1024).to_string());
}

// ---------------------------------------------------------------------------
// Token lifecycle seen through the proxy.

#[tokio::test]
async fn tokens_are_refreshed_ahead_of_expiry_while_requests_flow() {
    // 1.5 s tokens: refreshed at 1 s (refresh.min_interval), injected until
    // 1.35 s; the fake backoffice answers 401 to an expired token.
    let h = Harness::start(1.5, "").await;
    let client = support::client();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    let mut requests = 0;
    while h.world.with(|w| w.refresh_grants) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "two refreshes within 8 s"
        );
        let resp = client
            .get(h.url("/backoffice/api/ping"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "request {requests}");
        requests += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(requests > 10, "{requests}");
    let (password, refresh, rejected) = h
        .world
        .with(|w| (w.password_grants, w.refresh_grants, w.backoffice_401s));
    assert_eq!(password, 1, "refreshes use the refresh_token grant");
    assert!(refresh >= 2);
    assert_eq!(rejected, 0, "an expired token was injected");
    assert!(h.running().token.status().generation >= 3);

    let text = metrics(&h).await;
    let series = |s: &str| support::metric(&text, s).unwrap_or_else(|| panic!("{s}\n{text}"));
    assert!(
        series("token_sidecar_token_requests_total{grant=\"refresh_token\",outcome=\"success\"}")
            >= 2.0
    );
    assert_eq!(
        series("token_sidecar_token_requests_total{grant=\"password\",outcome=\"success\"}"),
        1.0
    );
    assert!(series("token_sidecar_token_generation") >= 3.0);
    assert!(series("token_sidecar_proxy_requests_total{route=\"default\",status_class=\"2xx\"}") >= requests as f64);
}

// ---------------------------------------------------------------------------
// Answers the sidecar makes itself, and the admin endpoints.

#[tokio::test]
async fn a_refused_login_answers_503_at_once_instead_of_holding_requests() {
    // A request held for token_wait (15 s) would hit the client's 10 s
    // timeout. After a refused login the next attempt is at least a minute
    // away, beyond token_wait, so waiting cannot help: answer at once.
    let h = Harness::start(
        300.0,
        "[oauth]\npassword = \"wrong\"\n[proxy]\ntoken_wait = \"15s\"",
    )
    .await;
    let token = h.running().token.clone();
    support::eventually(Duration::from_secs(10), "the refused login", || {
        let token = token.clone();
        async move { token.status().last_error.as_deref() == Some("invalid_grant") }
    })
    .await;
    let resp = support::client()
        .get(h.url("/backoffice/api/x"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("answered without waiting out proxy.token_wait");
    let retry_after: u64 = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After of whole seconds");
    assert!(
        retry_after >= 30,
        "the next login is minutes away: {retry_after}"
    );
    assert_local_error(resp, 503, "token_unavailable").await;
}

#[tokio::test]
async fn no_token_at_start_gives_503_token_unavailable_with_retry_after() {
    let h = Harness::start(
        300.0,
        "[oauth]\npassword = \"wrong\"\n[proxy]\ntoken_wait = \"300ms\"",
    )
    .await;
    let resp = support::client()
        .get(h.url("/backoffice/api/x"))
        .send()
        .await
        .unwrap();
    let retry_after: u64 = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After of whole seconds");
    assert!(retry_after >= 1, "{retry_after}");
    assert_local_error(resp, 503, "token_unavailable").await;
    assert_eq!(h.world.with(|w| w.backoffice_requests), 0);
    assert_eq!(h.world.with(|w| w.password_grants), 0);
    assert_eq!(local_count(&h, "token_unavailable").await, 1.0);

    let ready = support::client()
        .get(h.admin_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["ready"], false);
    assert_eq!(body["reason"], "no_token_yet");
    assert_eq!(body["last_error"], "invalid_grant");

    let health = support::client()
        .get(h.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}
}

#[tokio::test]
async fn readyz_and_healthz_with_a_token() {
    let h = Harness::start(300.0, "").await;
    h.ready().await;
    let ready = support::client()
        .get(h.admin_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["ready"], true);
    let health = support::client()
        .get(h.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

engines! {
#[tokio::test]
async fn an_unreachable_upstream_gives_502_upstream_unavailable() {
    // A loopback port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let h = Harness::start(300.0, &upstream_at(closed, "")).await;
    h.ready().await;
    let resp = support::client()
        .get(h.url("/backoffice/api/x"))
        .send()
        .await
        .unwrap();
    assert_local_error(resp, 502, "upstream_unavailable").await;
    assert_eq!(local_count(&h, "upstream_unavailable").await, 1.0);
    // Counted apart from what upstreams answered.
    let text = metrics(&h).await;
    assert_eq!(
        support::metric(
            &text,
            "token_sidecar_proxy_requests_total{route=\"default\",status_class=\"5xx\"}"
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn an_upstream_that_never_answers_gives_504_upstream_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Accepts, reads nothing, answers nothing, keeps the connections open.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let h = Harness::start(300.0, &upstream_at(addr, "request_timeout = \"300ms\"")).await;
    h.ready().await;
    let resp = support::client()
        .get(h.url("/backoffice/api/x"))
        .send()
        .await
        .unwrap();
    assert_local_error(resp, 504, "upstream_timeout").await;
    assert_eq!(local_count(&h, "upstream_timeout").await, 1.0);
    silent.abort();
}

// An absolute-form target: the lane leaves every target that is not
// origin-form to hyper (h1::parse_request).
@handed_over
#[tokio::test]
async fn an_absolute_form_target_naming_another_host_gives_400() {
    let h = Harness::start(300.0, "").await;
    h.ready().await;
    let (status, _, body) = raw_http(
        h.proxy,
        "GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "bad_request");
    assert_eq!(local_count(&h, "bad_request").await, 1.0);
    assert_eq!(h.world.with(|w| w.backoffice_requests), 0);

    // Naming this sidecar itself is fine: it still goes to the upstream.
    let (status, _, body) = raw_http(
        h.proxy,
        &format!(
            "GET http://{0}/backoffice/api/x HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
            h.proxy
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let echo: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["path"], "/base/backoffice/api/x");
}

// CONNECT: the lane leaves it to hyper (h1::parse_request).
@handed_over
#[tokio::test]
async fn connect_gives_405() {
    let h = Harness::start(300.0, "").await;
    h.ready().await;
    let (status, headers, body) = raw_http(
        h.proxy,
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405, "{body}");
    assert!(
        headers.iter().any(|l| l.starts_with("allow:")),
        "{headers:?}"
    );
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "method_not_allowed");
    assert_eq!(local_count(&h, "method_not_allowed").await, 1.0);
    assert_eq!(h.world.with(|w| w.backoffice_requests), 0);
}
}
