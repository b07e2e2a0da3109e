//! Framing and transparency on the wire, byte for byte, on both engines:
//! what the proxy accepts, refuses, re-frames and passes through, where
//! HTTP/1.1 leaves room. Each test names the rule that decided: what nginx
//! 1.22 and hyper agree on, or, where they disagree, RFC 9112 (sections 6
//! and 7 for framing) and RFC 9110.
//!
//! Requests that only hyper serves (a chunked upload, here) are the way to
//! reach the hyper engine with the default configuration; every test also
//! runs with `proxy.fast_lane = false`.

#[path = "support/binary.rs"]
mod binary;
mod sidecar_process;
mod support;
#[path = "support/upstream.rs"]
mod upstream;
#[path = "support/wire.rs"]
mod wire;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use upstream::{find, Front};
use wire::*;

/// A chunked upload of `abc`: the lane hands these to hyper, so behind one
/// the hyper engine answers whatever `proxy.fast_lane` says.
fn chunked_post(front: &Front, path: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        front.proxy
    )
    .into_bytes()
}

/// The JSON `error` code of one of the sidecar's own answers.
fn error_code(resp: &Resp) -> String {
    let v: serde_json::Value = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("not a JSON error body ({e}): {resp:?}"));
    v["error"].as_str().unwrap_or_default().to_owned()
}

// ---------------------------------------------------------------------------
// Interim responses

engines! {
/// An interim `100 Continue` the upstream sends while the request body is
/// still coming asks for the rest of it, even when it arrives in two reads
/// (`HTTP/1.1 100 Con` + `tinue`): the body must keep flowing, or the
/// exchange stalls until `proxy.request_timeout` (RFC 9110 15.2.1: a
/// client may ignore a 100 it did not ask for and go on sending).
#[tokio::test]
async fn an_interim_100_that_arrives_in_pieces_does_not_stop_the_body() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (said_con, mut con_said) = mpsc::channel::<()>(1);
    let (body_tx, mut body_rx) = mpsc::channel::<Vec<u8>>(1);
    let upstream = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let mut w = Wire {
            s,
            buf: Vec::new(),
            limit: Some(WAIT),
        };
        let head = w.head().await.expect("a request head");
        let n: usize = head.get("content-length").unwrap().parse().unwrap();
        w.send(b"HTTP/1.1 100 Con").await;
        let _ = said_con.send(()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        w.send(b"tinue\r\n\r\n").await;
        let body = w.exact(n).await;
        let _ = body_tx.send(body).await;
        w.send(&ok("done")).await;
        w.rest().await;
    });
    let front = Front::start(&format!("http://{addr}/base/"), "").await;
    let mut c = Wire::connect(front.proxy).await;
    c.send(
        format!(
            "POST /x HTTP/1.1\r\nHost: {}\r\nContent-Length: 10\r\n\r\n12345",
            front.proxy
        )
        .as_bytes(),
    )
    .await;
    tokio::time::timeout(WAIT, con_said.recv()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await; // after `tinue`
    c.send(b"67890").await;
    let resp = c.final_response().await;
    assert_eq!((resp.status(), resp.text().as_str()), (200, "done"), "{resp:?}");
    let body = tokio::time::timeout(WAIT, body_rx.recv()).await.unwrap();
    assert_eq!(body.as_deref(), Some(&b"1234567890"[..]));
    upstream.abort();
}
}

// ---------------------------------------------------------------------------
// Response framing

engines! {
@handed_over
/// A response with both `Content-Length` and `Transfer-Encoding: chunked`
/// is framed by the chunks, and the length must not reach the client
/// (RFC 9112 6.3 item 3): `Content-Length: 2` + chunk `abcdef` is `abcdef`,
/// not `ab` with `cdef` left on the connection.
#[tokio::test]
async fn a_response_with_length_and_chunks_is_framed_by_the_chunks_behind_hyper_too() {
    let up = RawUp::always(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n0\r\n\r\n",
        Then::Close,
    )
    .await;
    let front = Front::start(&up.url(), "").await;
    let mut c = Wire::connect(front.proxy).await;
    c.send(&chunked_post(&front, "/x")).await;
    let resp = c.response().await;
    assert_eq!(resp.status(), 200, "{resp:?}");
    assert!(!resp.head.has("content-length"), "{:?}", resp.head);
    assert_eq!(resp.text(), "abcdef");
}
}

engines! {
/// Chunk extensions and spaces on a size line are not passed on: the
/// chunks are decoded and written again (nginx and hyper both re-frame).
#[tokio::test]
async fn chunk_extensions_and_odd_spacing_are_not_passed_on() {
    let up = RawUp::always(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=\"x\"\r\nhello\r\n3 \t\r\nabc\r\n0;last\r\n\r\n",
        Then::KeepAlive,
    )
    .await;
    let front = Front::start(&up.url(), "").await;
    let mut c = Wire::connect(front.proxy).await;
    c.send(&wire_get(&front, "/x")).await;
    let head = c.head().await.expect("a response");
    assert_eq!(head.status(), 200);
    assert!(head.lists("transfer-encoding", "chunked"), "{head:?}");
    // Every size line is bare hex; the data is what was sent.
    let mut data = Vec::new();
    loop {
        let line = c.line().await;
        assert!(
            !line.is_empty() && line.iter().all(u8::is_ascii_hexdigit),
            "size line {:?}",
            String::from_utf8_lossy(&line)
        );
        let n = usize::from_str_radix(std::str::from_utf8(&line).unwrap(), 16).unwrap();
        if n == 0 {
            break;
        }
        data.extend(c.exact(n).await);
        assert_eq!(c.exact(2).await, b"\r\n");
    }
    assert_eq!(c.line().await, b"", "no trailer fields, then the end");
    assert_eq!(data, b"helloabc");
    if support::engine() == Engine::FastLane {
        // The lane writes each run of data it read as one chunk.
        c.send(&wire_get(&front, "/y")).await;
        let _ = c.head().await;
        let body = c.exact(b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n".len()).await;
        assert_eq!(body, b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n");
    }
}
}

engines! {
/// A status code out of range (`000`) is no answer: 502, never a status
/// line `HTTP/1.1 0` (hyper refuses it; nginx too, below 100).
#[tokio::test]
async fn a_status_code_out_of_range_is_502() {
    for bad in [
        &b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n"[..],
        b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n",
    ] {
        let up = RawUp::always(bad, Then::Close).await;
        let front = Front::start(&up.url(), "").await;
        let mut c = Wire::connect(front.proxy).await;
        c.send(&wire_get(&front, "/x")).await;
        let resp = c.response().await;
        assert_eq!(resp.status(), 502, "{:?}: {resp:?}", String::from_utf8_lossy(bad));
        assert_eq!(error_code(&resp), "upstream_unavailable");
    }
}
}

engines! {
@handed_over
/// Behind a request only hyper serves: an upstream `Content-Length: 5, 5`
/// (a list; nginx refuses it, RFC 9110 8.6 allows refusing) is 502 as on
/// the lane; a `101` to a request that asked for no upgrade is 502 (RFC
/// 9110 15.2.2: a server switches only on request); an `HTTP/1.0` status
/// line reaches the client as `HTTP/1.1` (RFC 9110 2.5: an intermediary
/// sends its own version).
#[tokio::test]
async fn upstream_framing_and_versions_are_checked_behind_hyper_too() {
    for (answer, status) in [
        (&b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello"[..], 502),
        (b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n", 502),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200),
    ] {
        let up = RawUp::always(answer, Then::Close).await;
        let front = Front::start(&up.url(), "").await;
        let mut c = Wire::connect(front.proxy).await;
        c.send(&chunked_post(&front, "/x")).await;
        let resp = c.response().await;
        assert_eq!(resp.status(), status, "{:?}: {resp:?}", String::from_utf8_lossy(answer));
        assert!(resp.head.start.starts_with("HTTP/1.1 "), "{:?}", resp.head);
        if status == 200 {
            assert_eq!(resp.text(), "ok");
        } else {
            assert_eq!(error_code(&resp), "upstream_unavailable");
        }
    }
}
}

// ---------------------------------------------------------------------------
// Request framing and admission

engines! {
/// A `Content-Length` beyond 2^63 - 1 cannot be a body anyone sends: 400,
/// nothing forwarded, connection closed (nginx: 400; RFC 9112 6.3 item 5:
/// an invalid length is an unrecoverable framing error).
#[tokio::test]
async fn a_content_length_beyond_63_bits_is_refused() {
    let mut up = RawUp::always(&ok("ok"), Then::KeepAlive).await;
    let front = Front::start(&up.url(), "").await;
    for n in ["9223372036854775808", "9999999999999999999"] {
        let req = format!("POST /x HTTP/1.1\r\nHost: {}\r\nContent-Length: {n}\r\n\r\nabc", front.proxy);
        let out = exchange_until_close(front.proxy, req.into_bytes()).await;
        assert_eq!(status_of(&out), Some(400), "{n}: {:?}", String::from_utf8_lossy(&out));
        assert!(find(&out, b"\"bad_request\"").is_some(), "{:?}", String::from_utf8_lossy(&out));
    }
    up.no_more_requests();
}
}

engines! {
@handed_over
/// A transfer coding the proxy does not apply (`gzip, chunked`,
/// `identity, chunked`) cannot be passed on re-chunked without it: 501
/// `unsupported_transfer_coding`, and the connection closes (RFC 9112 6.1:
/// a server that receives a coding it does not understand should answer
/// 501; nginx answers 501 too). Nothing reaches the upstream.
#[tokio::test]
async fn transfer_codings_other_than_chunked_are_refused_with_501() {
    let mut up = RawUp::always(&ok("ok"), Then::KeepAlive).await;
    let front = Front::start(&up.url(), "").await;
    for coding in ["gzip, chunked", "identity, chunked"] {
        let req = format!(
            "POST /x HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: {coding}\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            front.proxy
        );
        let out = exchange_until_close(front.proxy, req.into_bytes()).await;
        assert_eq!(status_of(&out), Some(501), "{coding}: {:?}", String::from_utf8_lossy(&out));
        assert!(
            find(&out, b"\"unsupported_transfer_coding\"").is_some(),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }
    up.no_more_requests();
}
}

engines! {
/// Admission rules: an HTTP/1.1 request without `Host` or with two is 400
/// (RFC 9112 3.2); a lower-case method is 400 (methods are case-sensitive
/// and every registered one is upper case; nginx refuses it too); a path
/// with `%00` is 400 (nginx refuses it; a NUL cuts the path in many
/// servers). Each answer is the JSON error, and nothing is forwarded.
#[tokio::test]
async fn requests_without_one_host_lower_case_methods_and_nul_paths_are_refused() {
    let mut up = RawUp::always(&ok("ok"), Then::KeepAlive).await;
    let front = Front::start(&up.url(), "").await;
    let host = front.proxy;
    for req in [
        "GET /x HTTP/1.1\r\nConnection: close\r\n\r\n".to_string(),
        format!("GET /x HTTP/1.1\r\nHost: {host}\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        format!("get /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        format!("GET /a%00b HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    ] {
        let out = exchange_until_close(front.proxy, req.clone().into_bytes()).await;
        assert_eq!(status_of(&out), Some(400), "{req:?}: {:?}", String::from_utf8_lossy(&out));
        assert!(find(&out, b"\"bad_request\"").is_some(), "{:?}", String::from_utf8_lossy(&out));
    }
    up.no_more_requests();
}
}

engines! {
/// Request targets as `HttpURLConnection` sends them (unencoded `"`, `<`,
/// `>`, `{`, `}` in the query, `<`, `>` in the path) are forwarded byte for
/// byte, as nginx does (any byte above 0x20 but DEL). The dot-segment check
/// still applies. With `proxy.fast_lane = false`, hyper's URI parser
/// refuses such a target before any service runs: its bare 400 (no JSON,
/// no `X-Request-Id`) is the documented difference of that setting.
#[tokio::test]
async fn raw_quotes_and_angle_brackets_are_forwarded_byte_for_byte() {
    let mut up = RawUp::always(&ok("ok"), Then::KeepAlive).await;
    let front = Front::start(&up.url(), "").await;
    let target = "/search/<a>?filter={\"a\":1}&x=<b>";
    let mut c = Wire::connect(front.proxy).await;
    c.send(&wire_get(&front, target)).await;
    let resp = c.response().await;
    match support::engine() {
        Engine::FastLane => {
            assert_eq!(resp.status(), 200, "{resp:?}");
            let seen = up.request().await;
            assert_eq!(
                seen.head.start,
                format!("GET /base/search/<a>?filter={{\"a\":1}}&x=<b> HTTP/1.1")
            );
            // The dot-segment check sees the same bytes.
            let mut c = Wire::connect(front.proxy).await;
            c.send(&wire_get(&front, "/a/<b>/../..")).await;
            assert_eq!(c.response().await.status(), 400);
        }
        Engine::Hyper => {
            assert_eq!(resp.status(), 400, "{resp:?}");
            assert!(!resp.head.has("x-request-id"), "hyper's own answer: {:?}", resp.head);
            up.no_more_requests();
            // The proxy still serves plain targets on that setting.
            let mut c = Wire::connect(front.proxy).await;
            c.send(&wire_get(&front, "/plain")).await;
            assert_eq!(c.response().await.status(), 200);
        }
    }
}
}

// ---------------------------------------------------------------------------
// Transparency

engines! {
@handed_over
/// The upstream's header-name case reaches the client on every HTTP/1.1
/// path, also after a request that only hyper serves on the same
/// connection (Java's `HttpURLConnection.getHeaderFields()` is a
/// case-sensitive map).
#[tokio::test]
async fn response_field_names_keep_their_case_on_every_path() {
    let up = RawUp::always(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Mixed-CASE: 1\r\nContent-Length: 2\r\n\r\n{}",
        Then::KeepAlive,
    )
    .await;
    let front = Front::start(&up.url(), "").await;
    let mut c = Wire::connect(front.proxy).await;
    for req in [
        wire_get(&front, "/first"),
        chunked_post(&front, "/upload"),
        wire_get(&front, "/after"),
    ] {
        c.send(&req).await;
        let resp = c.response().await;
        assert_eq!(resp.status(), 200, "{resp:?}");
        let names: Vec<&str> = resp.head.fields.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"Content-Type"), "{names:?}");
        assert!(names.contains(&"X-Mixed-CASE"), "{names:?}");
    }
}
}

engines! {
/// `Connection: host, x-forwarded-for` from the client: the client's
/// `X-Forwarded-For` is hop-by-hop and not passed on, so the chain starts
/// at the client's address; `X-Forwarded-Host` and `Location` rewriting
/// still use the `Host` the client sent (it names the request's target,
/// whatever `Connection` says). Both engines read it so.
#[tokio::test]
async fn connection_listed_host_and_forwarded_for_are_read_alike() {
    let mut up = RawUp::start(|seen: &Seen| {
        let location = format!("http://{}/base/next", seen.head.get("host").unwrap_or(""));
        (
            format!("HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n").into_bytes(),
            Then::KeepAlive,
        )
    })
    .await;
    let front = Front::start(&up.url(), "[proxy]\nforwarded_headers = true").await;
    let mut c = Wire::connect(front.proxy).await;
    c.send(
        b"GET /x HTTP/1.1\r\nHost: app.local:7080\r\nConnection: host, x-forwarded-for\r\n\
          X-Forwarded-For: 10.9.9.9\r\n\r\n",
    )
    .await;
    let resp = c.response().await;
    assert_eq!(resp.status(), 302, "{resp:?}");
    assert_eq!(resp.head.get("location"), Some("http://app.local:7080/next"));
    let seen = up.request().await;
    assert_eq!(seen.head.get("x-forwarded-for"), Some("127.0.0.1"), "{:?}", seen.head);
    assert_eq!(seen.head.get("x-forwarded-host"), Some("app.local:7080"));
    assert_eq!(seen.head.get("x-forwarded-proto"), Some("http"));
}
}

/// Java's `HttpClient` (default version) offers `Upgrade: h2c` with
/// `HTTP2-Settings` on every request, POSTs included. The offer is
/// declined (the request goes upstream as plain HTTP/1.1 without it), and
/// the fast lane serves it: it would otherwise cost hyper's CPU per request.
#[tokio::test]
async fn java_h2c_offers_are_declined_on_the_fast_lane() {
    let mut up = RawUp::always(&ok("ok"), Then::KeepAlive).await;
    let front = Front::start(&up.url(), "").await;
    let mut c = Wire::connect(front.proxy).await;
    let offer = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAEAAEAAAAIAAAABAAMAAABkAAQBAAAAAAUAAEAA\r\n";
    c.send(format!("GET /get HTTP/1.1\r\nHost: {}\r\n{offer}\r\n", front.proxy).as_bytes())
        .await;
    assert_eq!(c.response().await.status(), 200);
    c.send(
        format!(
            "POST /post HTTP/1.1\r\nHost: {}\r\n{offer}Content-Length: 3\r\n\r\nabc",
            front.proxy
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(c.response().await.status(), 200);
    for _ in 0..2 {
        let seen = up.request().await;
        for gone in ["upgrade", "http2-settings", "connection"] {
            assert!(!seen.head.has(gone), "{gone} forwarded: {:?}", seen.head);
        }
    }
    let m = &front.sidecar.metrics;
    assert_eq!(m.engine_requests(Engine::FastLane), 2);
    assert_eq!(m.engine_requests(Engine::Hyper), 0);
}

/// A GET on the proxy with `Connection: keep-alive` semantics (no close).
fn wire_get(front: &Front, target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: {}\r\n\r\n", front.proxy).into_bytes()
}

// ---------------------------------------------------------------------------
// Reaching the upstream

/// An https upstream behind a balancer that changes its mind: while it
/// picks `h2`, exchanges go to hyper's HTTP/2 client; once that
/// connection is gone and new connections pick `http/1.1`, the fast lane
/// serves again. The choice follows each connection, not the first answer
/// the process ever got.
#[tokio::test]
async fn the_http_version_is_chosen_per_upstream_connection() {
    let ca = upstream::TestCa::new();
    let leaf = ca.issue(&["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write_pem(dir.path());
    let h2 = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (both, h1_only) = (leaf.acceptor(), leaf.acceptor_with(&[b"http/1.1"]));
    let (pick, tasks) = (h2.clone(), conns.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = if pick.load(std::sync::atomic::Ordering::SeqCst) {
                both.clone()
            } else {
                h1_only.clone()
            };
            tasks.lock().unwrap().push(tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                    ))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            }));
        }
    });
    let front = Front::start(
        &format!("https://localhost:{}/base/", addr.port()),
        &format!("[proxy]\nca_file = {:?}", ca_file.display().to_string()),
    )
    .await;
    let m = front.sidecar.metrics.clone();
    let client = support::client();
    let get = |path: &'static str| client.get(front.url(path)).send();
    assert_eq!(get("/a").await.unwrap().status(), 200);
    assert_eq!(get("/b").await.unwrap().status(), 200);
    let hyper_before = m.engine_requests(Engine::Hyper);
    assert!(hyper_before >= 2, "HTTP/2 upstream: hyper's");
    // The upstream drops its HTTP/2 connection and speaks HTTP/1.1 only.
    h2.store(false, std::sync::atomic::Ordering::SeqCst);
    for t in conns.lock().unwrap().drain(..) {
        t.abort();
    }
    // Once the sidecar has seen that connection end, a new client
    // connection is the lane's again.
    support::eventually(WAIT, "the fast lane serves again", || async {
        let fresh = support::client();
        let lane_before = m.engine_requests(Engine::FastLane);
        let ok = fresh
            .get(front.url("/c"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        ok && m.engine_requests(Engine::FastLane) > lane_before
    })
    .await;
}

/// A name whose first address never answers (a SYN that gets no reply)
/// and whose second serves: both engines connect the same way, so both
/// reach the second address well within `proxy.connect_timeout` (the
/// other address family is tried after 300 ms), rather than one of them
/// giving the whole timeout to the first address and answering 502.
///
/// The sidecar runs as a process with its own `/etc/hosts` (a mount
/// namespace, util-linux `unshare`), where `dual.test` is `::1` then
/// `127.0.0.1`; `[::1]:PORT` is a listener whose backlog is full, so a
/// connection attempt hangs.
#[tokio::test]
async fn a_first_address_that_never_answers_does_not_fail_the_request() {
    for engine in [Engine::FastLane, Engine::Hyper] {
        let (blackhole, filler, port) = full_backlog_on_ipv6_loopback();
        let up = Upstream4::bind(port).await;
        let hosts = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(hosts.path(), "::1 dual.test\n127.0.0.1 dual.test\n").unwrap();
        let world = token_sidecar::fake::World::new(300.0);
        let auth =
            token_sidecar::fake::token_endpoint(world.clone(), "127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
        let toml = support::base_toml(
            &world,
            &auth.url("/oauth/token"),
            &format!("http://dual.test:{port}/base/"),
        )
        .replace("format = \"text\"", "format = \"json\"")
        .replacen(
            "[proxy]\n",
            &format!(
                "[proxy]\nconnect_timeout = \"3s\"\nfast_lane = {}\n",
                engine == Engine::FastLane
            ),
            1,
        );
        let mut p = sidecar_process::Process::run_config_with(
            sidecar_process::command_with_hosts(hosts.path()),
            &toml,
            |_| {},
        );
        let (proxy, _) = p.addresses().await;
        let started = std::time::Instant::now();
        let resp = support::client()
            .get(format!("http://{proxy}/x"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{engine:?}: {}", p.text());
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{engine:?}: took {:?}",
            started.elapsed()
        );
        drop((blackhole, filler, up));
    }
}

/// A listener on `[::1]:0` that accepts nothing, with its one backlog slot
/// taken: further connection attempts to it hang. Also returns its port.
fn full_backlog_on_ipv6_loopback() -> (socket2::Socket, std::net::TcpStream, u16) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
    s.bind(&"[::1]:0".parse::<std::net::SocketAddr>().unwrap().into())
        .unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let filler = std::net::TcpStream::connect(addr).unwrap();
    (s, filler, addr.port())
}

/// An upstream answering 200 `ok` on `127.0.0.1:port`.
struct Upstream4(tokio::task::JoinHandle<()>);

impl Upstream4 {
    async fn bind(port: u16) -> Upstream4 {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        Upstream4(tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    loop {
                        let Ok(n) = s.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        got.extend_from_slice(&buf[..n]);
                        while let Some(i) = find(&got, b"\r\n\r\n") {
                            got.drain(..i + 4);
                            if s.write_all(&ok("ok")).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        }))
    }
}

impl Drop for Upstream4 {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---------------------------------------------------------------------------
// Shutdown

engines! {
/// After `shutdown.grace`, connections still open are closed: the
/// client sees its connection end once the shutdown sequence returns,
/// not whenever the process happens to exit.
#[tokio::test]
async fn connections_still_open_after_the_grace_period_are_closed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // An upstream that takes requests and never answers.
    let hang = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let front = Front::start(
        &format!("http://{addr}/base/"),
        "[shutdown]\ngrace = \"300ms\"",
    )
    .await;
    let mut c = TcpStream::connect(front.proxy).await.unwrap();
    c.write_all(format!("GET /slow HTTP/1.1\r\nHost: {}\r\n\r\n", front.proxy).as_bytes())
        .await
        .unwrap();
    // The request is in flight once the upstream has it.
    support::eventually(WAIT, "the request is in flight", || async {
        front.sidecar.metrics.inflight().get() == 1
    })
    .await;
    let running = front.sidecar;
    tokio::time::timeout(WAIT, running.shutdown_now())
        .await
        .expect("the shutdown sequence ends after the grace period");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_millis(500), c.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the client connection is still open after the shutdown");
    hang.abort();
}
}
