//! Protocols on both sides of the proxy: h2c from the app, HTTP/2 over TLS to
//! an upstream under a private CA, websocket upgrades, egress proxies from
//! the environment, and how upstream failures are answered.

#[path = "support/binary.rs"]
mod binary;
mod sidecar_process;
mod support;
#[path = "support/upstream.rs"]
mod upstream;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use upstream::{response, Front, TestBody, TestCa, Upstream};

/// Answers with the request's HTTP version and body length.
async fn describe(req: Request<Incoming>) -> Response<TestBody> {
    let version = format!("{:?}", req.version());
    let n = req.into_body().collect().await.unwrap().to_bytes().len();
    Response::new(TestBody::text(format!("{version} {n}")))
}

fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap()
}

engines! {
// h2c with prior knowledge: only hyper serves HTTP/2.
@hyper_only
#[tokio::test]
async fn h2c_with_prior_knowledge_is_served() {
    let up = Upstream::start(describe).await;
    let front = Front::start(&up.url("/base/"), "").await;
    let client = h2c_client();
    let resp = client.get(front.url("/x?y=1")).send().await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    assert_eq!(resp.text().await.unwrap(), "HTTP/1.1 0");
    let resp = client
        .post(front.url("/upload"))
        .body(vec![1u8; 100_000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "HTTP/1.1 100000");
    let seen = up.seen();
    assert_eq!(seen[0].target, "/base/x?y=1");
    assert_eq!(seen[0].headers["host"], up.addr.to_string());
    assert_eq!(seen[0].headers["authorization"], front.bearer());
}

// An HTTP/2 client connection: only hyper serves HTTP/2.
@hyper_only
#[tokio::test]
async fn an_idle_http2_connection_is_closed() {
    let up = Upstream::ok().await;
    let front = Front::start(&up.url("/base/"), r#"proxy.client_idle_timeout = "300ms""#).await;
    let tcp = TcpStream::connect(front.proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::get(front.url("/x"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
    // The client keeps its side open; the sidecar ends the idle connection.
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(
        ended.is_ok(),
        "the idle HTTP/2 connection is closed within 10 s"
    );
    drop(sender);
}
}

/// A TLS upstream under a fresh CA and a sidecar trusting it by `ca_file`.
async fn tls_pair(
    handler: fn(Request<Incoming>) -> upstream::BoxFuture,
) -> (Upstream, Front, tempfile::TempDir) {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write_pem(dir.path());
    let up = Upstream::start_tls(&ca.issue(&["127.0.0.1"]), handler).await;
    let front = Front::start(
        &format!("https://{}/base/", up.addr),
        &format!("proxy.ca_file = {:?}", ca_file.to_str().unwrap()),
    )
    .await;
    (up, front, dir)
}

engines! {
// The upstream picks h2 by ALPN: the lane hands such requests to hyper,
// whose client speaks HTTP/2.
@handed_over
#[tokio::test]
async fn http2_to_a_tls_upstream_under_a_private_ca() {
    let (up, front, _dir) = tls_pair(|r| Box::pin(describe(r))).await;
    let client = support::client();
    // The first request finds out that the upstream speaks HTTP/2, after
    // the fast lane has read its head and body: both reach hyper whole.
    let resp = client
        .post(front.url("/post"))
        .body(vec![1u8; 5000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "HTTP/2.0 5000");
    for _ in 0..3 {
        let resp = client.get(front.url("/x")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "HTTP/2.0 0");
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 4);
    assert!(seen.iter().all(|s| s.version == Version::HTTP_2));
    assert_eq!(seen[0].headers["authorization"], front.bearer());
}

/// An https upstream that offers only HTTP/1.1 by ALPN: served by the fast
/// lane over TLS (the h2 ones above go to hyper's client). Requests and
/// bodies both ways arrive whole; every request carries the token.
#[tokio::test]
async fn http11_to_a_tls_upstream_that_offers_only_http11() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write_pem(dir.path());
    let up = Upstream::start_tls_http1(
        &ca.issue(&["127.0.0.1"]),
        |req: Request<Incoming>| async move {
            if req.uri().path().ends_with("/big") {
                return response(200, &[], TestBody::generated(3 << 20));
            }
            describe(req).await
        },
    )
    .await;
    let front = Front::start(
        &format!("https://{}/base/", up.addr),
        &format!("proxy.ca_file = {:?}", ca_file.to_str().unwrap()),
    )
    .await;
    let client = support::client();
    for _ in 0..3 {
        let resp = client.get(front.url("/x")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "HTTP/1.1 0");
    }
    let upload = vec![7u8; 300 * 1024];
    let resp = client
        .post(front.url("/up"))
        .body(upload)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.text().await.unwrap(),
        format!("HTTP/1.1 {}", 300 * 1024)
    );
    let big = client.get(front.url("/big")).send().await.unwrap();
    assert_eq!(big.bytes().await.unwrap().len(), 3 << 20);
    let seen = up.seen();
    assert_eq!(seen.len(), 5);
    assert!(seen.iter().all(|s| s.version == Version::HTTP_11));
    assert!(seen
        .iter()
        .all(|s| s.headers["authorization"] == front.bearer()));
}

#[tokio::test]
async fn tls_failures_are_502_saying_tls() {
    let ca = TestCa::new();
    let client = support::client();
    // A certificate from a CA the sidecar was not given.
    let up = Upstream::start_tls(&ca.issue(&["127.0.0.1"]), describe).await;
    let front = Front::start(&format!("https://{}/base/", up.addr), "").await;
    // Another CA's certificate, and one for the wrong name under the right CA.
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write_pem(dir.path());
    let wrong_name = Upstream::start_tls(&ca.issue(&["localhost"]), describe).await;
    let front2 = Front::start(
        &format!("https://{}/base/", wrong_name.addr),
        &format!("proxy.ca_file = {:?}", ca_file.to_str().unwrap()),
    )
    .await;
    for url in [front.url("/x"), front2.url("/x")] {
        let resp = client.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 502, "{url}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "upstream_unavailable");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("TLS"), "{message}");
    }
    assert!(up.seen().is_empty() && wrong_name.seen().is_empty());
}

#[tokio::test]
async fn refused_and_reset_are_502_and_a_slow_upstream_is_504() {
    let client = support::client();

    // Refused: nothing listens on the port any more.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let front = Front::start(&format!("http://{port}/"), "").await;
    let resp = client.get(front.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "upstream_unavailable");
    assert!(!body["message"].as_str().unwrap().contains("TLS"));

    // Reset: the upstream reads the request and aborts the connection.
    let reset = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reset_addr = reset.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = reset.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.set_zero_linger();
            drop(s);
        }
    });
    let front = Front::start(&format!("http://{reset_addr}/"), "").await;
    let resp = client.get(front.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "upstream_unavailable");

    // Timeout: the upstream reads the request and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = silent.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            held.push(s);
        }
    });
    let front = Front::start(
        &format!("http://{silent_addr}/"),
        r#"proxy.request_timeout = "300ms""#,
    )
    .await;
    let resp = client.get(front.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 504);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "upstream_timeout");
}

#[tokio::test]
async fn upstream_errors_pass_through_untouched() {
    let up = Upstream::start(|req| async move {
        match req.uri().path() {
            "/base/busy" => response(
                503,
                &[("retry-after", "7"), ("content-type", "text/plain")],
                TestBody::text("busy"),
            ),
            "/base/bad-gateway" => response(502, &[], TestBody::text("theirs")),
            _ => response(500, &[("x-upstream", "1")], TestBody::text("boom")),
        }
    })
    .await;
    let front = Front::start(&up.url("/base/"), "").await;
    let client = support::client();
    let r = client.get(front.url("/busy")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "7");
    assert_eq!(r.text().await.unwrap(), "busy");
    let r = client.get(front.url("/bad-gateway")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.text().await.unwrap(), "theirs");
    let r = client.get(front.url("/other")).send().await.unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(r.headers()["x-upstream"], "1");
    assert_eq!(r.text().await.unwrap(), "boom");
}
}

/// A websocket echo server as an upstream handler: answers the handshake
/// with 101, then echoes text frames and answers a close frame.
fn websocket_echo(mut req: Request<Incoming>) -> upstream::BoxFuture {
    Box::pin(async move {
        let is_ws = req
            .headers()
            .get("upgrade")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        if !is_ws {
            return response(400, &[], TestBody::text("not a websocket handshake"));
        }
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let mut io = TokioIo::new(upgraded);
            loop {
                let Some((opcode, payload)) = read_frame(&mut io).await else {
                    return;
                };
                if opcode == 0x8 {
                    let _ = io.write_all(&[0x88, 0x00]).await;
                    return;
                }
                let mut out = vec![0x80 | opcode, payload.len() as u8];
                out.extend_from_slice(&payload);
                let _ = io.write_all(&out).await;
            }
        });
        response(
            101,
            &[
                ("upgrade", "websocket"),
                ("connection", "Upgrade"),
                // The proxy does not check it; a real client would.
                ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            ],
            TestBody::empty(),
        )
    })
}

/// One short websocket frame: (opcode, unmasked payload).
async fn read_frame<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await.ok()?;
    let masked = head[1] & 0x80 != 0;
    let len = (head[1] & 0x7f) as usize;
    assert!(len < 126, "short frames only");
    let mut mask = [0u8; 4];
    if masked {
        s.read_exact(&mut mask).await.ok()?;
    }
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.ok()?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Some((head[0] & 0x0f, payload))
}

/// A masked client frame.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut out = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Handshake through the proxy, two echoes, a close; checks what the
/// upstream saw.
async fn websocket_round_trip(up: &Upstream, front: &Front) {
    let mut s = TcpStream::connect(front.proxy).await.unwrap();
    let handshake = format!(
        "GET /ws/chat?room=1 HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Basic bm90OnRoaXM=\r\n\r\n",
        front.proxy
    );
    s.write_all(handshake.as_bytes()).await.unwrap();
    let head = upstream::read_head(&mut s).await;
    let resp = upstream::parse_response(head.as_bytes());
    assert_eq!(resp.status, 101, "{head}");
    assert!(resp
        .header("upgrade")
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket")));
    assert!(resp
        .header("connection")
        .is_some_and(|v| v.eq_ignore_ascii_case("upgrade")));
    assert!(resp.has_header("sec-websocket-accept"));

    for msg in ["hello", "second message"] {
        s.write_all(&client_frame(0x1, msg.as_bytes()))
            .await
            .unwrap();
        let (opcode, payload) = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut s))
            .await
            .expect("an echo within 10 s")
            .expect("a frame");
        assert_eq!(opcode, 0x1);
        assert_eq!(payload, msg.as_bytes());
    }
    s.write_all(&client_frame(0x8, b"")).await.unwrap();
    let (opcode, _) = read_frame(&mut s).await.expect("a close frame");
    assert_eq!(opcode, 0x8);
    // The upstream closed; so does the tunnel.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the tunnel closes after the upstream does")
        .ok();
    assert!(rest.is_empty());

    let seen = up.only();
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(seen.target, "/base/ws/chat?room=1");
    assert_eq!(seen.headers["authorization"], front.bearer());
    assert_eq!(seen.headers["upgrade"], "websocket");
    assert_eq!(
        seen.headers["sec-websocket-key"],
        "dGhlIHNhbXBsZSBub25jZQ=="
    );
    assert_eq!(seen.headers["sec-websocket-version"], "13");
    let connection = seen.headers["connection"].to_str().unwrap().to_lowercase();
    assert!(connection.contains("upgrade"), "{connection}");
    assert!(!connection.contains("keep-alive"), "{connection}");
}

engines! {
// An upgrade: the lane hands those to hyper.
@handed_over
#[tokio::test]
async fn websocket_upgrade_passes_through_with_the_token() {
    let up = Upstream::start(websocket_echo).await;
    let front = Front::start(&up.url("/base/"), "").await;
    websocket_round_trip(&up, &front).await;
}

// An upgrade: the lane hands those to hyper.
@handed_over
#[tokio::test]
async fn websocket_to_an_http2_upstream_uses_http1() {
    let (up, front, _dir) = tls_pair(websocket_echo).await;
    websocket_round_trip(&up, &front).await;
}
}

/// What an egress proxy saw: request lines and their Proxy-Authorization.
#[derive(Debug, Clone, PartialEq)]
struct ProxySeen {
    line: String,
    auth: Option<String>,
}

/// An HTTP proxy on loopback: `CONNECT` tunnels and absolute-form requests,
/// both only to 127.0.0.1; records each connection's first request line.
async fn egress_proxy() -> (std::net::SocketAddr, Arc<Mutex<Vec<ProxySeen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let head = upstream::read_head(&mut client).await;
                let line = head.lines().next().unwrap_or_default().to_owned();
                let auth = head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("proxy-authorization")
                        .then(|| v.trim().to_owned())
                });
                record.lock().unwrap().push(ProxySeen {
                    line: line.clone(),
                    auth,
                });
                let mut parts = line.split(' ');
                let method = parts.next().unwrap_or_default();
                let target = parts.next().unwrap_or_default();
                let host_port = if method == "CONNECT" {
                    target.to_owned()
                } else {
                    let rest = target.strip_prefix("http://").unwrap_or_default();
                    rest.split('/').next().unwrap_or_default().to_owned()
                };
                if !host_port.starts_with("127.0.0.1:") {
                    let _ = client
                        .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let Ok(mut origin) = TcpStream::connect(&host_port).await else {
                    let _ = client
                        .write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    return;
                };
                if method == "CONNECT" {
                    client
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .unwrap();
                } else {
                    // Origin servers accept absolute-form too; pass the head on.
                    origin.write_all(head.as_bytes()).await.unwrap();
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut origin).await;
            });
        }
    });
    (addr, seen)
}

engines! {
// An egress proxy keeps the lane off, and the upstream picks h2 by ALPN
// (hyper's) once NO_PROXY bypasses it.
@handed_over
#[tokio::test]
async fn https_proxy_from_the_environment_tunnels_and_no_proxy_bypasses_it() {
    let world = token_sidecar::fake::World::new(300.0);
    let auth = token_sidecar::fake::token_endpoint(world.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write_pem(dir.path());
    let up = Upstream::start_tls(&ca.issue(&["127.0.0.1"]), describe).await;
    let (proxy_addr, proxy_seen) = egress_proxy().await;
    let toml = binary::toml_with_proxy_keys(
        &support::base_toml(
            &world,
            &auth.url("/oauth/token"),
            &format!("https://{}/base/", up.addr),
        ),
        &format!("ca_file = {:?}", ca_file.to_str().unwrap()),
    );
    let https_proxy = format!("http://corp%5Cuser:s3cret@{proxy_addr}");
    let client = support::client();

    let sidecar = binary::Process::spawn(&toml, &[("HTTPS_PROXY", &https_proxy)]).await;
    sidecar.ready().await;
    let resp = client.get(sidecar.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "HTTP/2.0 0");
    let seen = proxy_seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [ProxySeen {
            line: format!("CONNECT {} HTTP/1.1", up.addr),
            // corp\user:s3cret
            auth: Some("Basic Y29ycFx1c2VyOnMzY3JldA==".into()),
        }]
    );
    // The proxy's credentials are not logged.
    assert!(!sidecar.text().contains("s3cret"));
    drop(sidecar);

    let sidecar = binary::Process::spawn(
        &toml,
        &[
            ("HTTPS_PROXY", &https_proxy),
            ("NO_PROXY", "localhost,127.0.0.1"),
        ],
    )
    .await;
    sidecar.ready().await;
    let resp = client.get(sidecar.url("/y")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(proxy_seen.lock().unwrap().len(), 1, "NO_PROXY was ignored");
    assert_eq!(up.seen().len(), 2);
}

// An egress proxy keeps the lane off: hyper serves everything.
@handed_over
#[tokio::test]
async fn http_proxy_from_the_environment_carries_both_clients() {
    let world = token_sidecar::fake::World::new(300.0);
    let auth = token_sidecar::fake::token_endpoint(world.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let up = Upstream::start(describe).await;
    let (proxy_addr, proxy_seen) = egress_proxy().await;
    let toml = support::base_toml(&world, &auth.url("/oauth/token"), &up.url("/base/"));
    let sidecar =
        binary::Process::spawn(&toml, &[("HTTP_PROXY", &format!("http://{proxy_addr}"))]).await;
    sidecar.ready().await;
    let resp = support::client()
        .get(sidecar.url("/x?q=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let lines: Vec<String> = proxy_seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.line.clone())
        .collect();
    // The token client (reqwest) and the upstream client leave the same way.
    assert_eq!(
        lines,
        [
            format!("POST {} HTTP/1.1", auth.url("/oauth/token")),
            format!("GET {} HTTP/1.1", up.url("/base/x?q=1")),
        ]
    );
    assert_eq!(up.only().headers["host"], up.addr.to_string());
}
}
