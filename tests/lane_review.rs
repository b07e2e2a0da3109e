//! Findings of a review of the HTTP/1.1 fast lane (src/proxy/lane.rs,
//! src/proxy/h1.rs), each pinned on the wire: raw TCP clients against a
//! raw TCP upstream that frames requests by `Content-Length` the way a real
//! server does, whatever `Connection` says.
//!
//! The lane must do what the hyper path does for everything it accepts;
//! each test here failed on the lane as first written.

#[path = "support/logs.rs"]
mod logs;
mod support;
#[path = "support/upstream.rs"]
mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use logs::LogBuffer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use upstream::{find, read_exact, read_head, Front, RawResponse};

/// Bounds every wait, so that a missing byte fails a test instead of hanging it.
const WAIT: Duration = Duration::from_secs(5);

/// A request as it reached the raw upstream.
#[derive(Debug)]
struct Seen {
    /// Which upstream connection carried it, counting from 1.
    conn: usize,
    /// The request line.
    line: String,
    head: String,
    body: Vec<u8>,
}

/// A raw upstream: each request gets what `answer` returns for its request
/// line, after its `Content-Length` body was read; a request line with
/// `/early` is answered as soon as its head is in, as servers answer 413 or
/// 401 before the body, and its body is still read and thrown away after;
/// one with `/continue` gets a `100 Continue` as soon as its head is in.
struct RawUp {
    addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<Seen>,
}

impl RawUp {
    async fn start(answer: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static) -> RawUp {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, seen) = mpsc::unbounded_channel();
        let answer = Arc::new(answer);
        let conns = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let conn = conns.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(serve_raw(s, conn, answer.clone(), tx.clone()));
            }
        });
        RawUp { addr, seen }
    }

    fn url(&self) -> String {
        format!("http://{}/base/", self.addr)
    }

    async fn next(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("a request reaches the upstream")
            .expect("the upstream is running")
    }
}

async fn serve_raw(
    mut s: TcpStream,
    conn: usize,
    answer: Arc<impl Fn(&str) -> Vec<u8> + Send + Sync + 'static>,
    tx: mpsc::UnboundedSender<Seen>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i;
            }
            match s.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        let line = head.lines().next().unwrap_or_default().to_owned();
        let length = head
            .lines()
            .skip(1)
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let reply = answer(&line);
        if line.contains("/continue")
            && s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err()
        {
            return;
        }
        let early = line.contains("/early");
        if early && s.write_all(&reply).await.is_err() {
            return;
        }
        while buf.len() < length {
            match s.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        }
        let body = buf.drain(..length).collect();
        let _ = tx.send(Seen {
            conn,
            line,
            head,
            body,
        });
        if !early && s.write_all(&reply).await.is_err() {
            return;
        }
    }
}

fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One keep-alive response with a `Content-Length` body, read exactly.
async fn response(s: &mut TcpStream) -> RawResponse {
    let head = read_head(s).await;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    let mut r = RawResponse {
        status,
        head: head.trim_end().to_owned(),
        body: Vec::new(),
    };
    let n = r
        .header("content-length")
        .unwrap_or_else(|| panic!("no Content-Length in {:?}", r.head))
        .parse()
        .expect("a numeric Content-Length");
    r.body = read_exact(s, n).await;
    r
}

/// Reads until the peer closes (bounded by [`WAIT`]).
async fn until_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("the proxy closes the connection");
    out
}

// ---------------------------------------------------------------------------
// Request smuggling

engines! {
/// `Connection: content-length` made the lane drop the request's
/// `Content-Length` while still sending the body: the upstream read the
/// body as the next request, one the proxy never checked (here a path
/// outside the base path). hyper frames the upstream request by the body.
#[tokio::test]
async fn a_content_length_listed_in_connection_still_frames_the_body_upstream() {
    let mut up = RawUp::start(|_| ok("ok")).await;
    let front = Front::start(&up.url(), "").await;
    let smuggled = "GET /outside-base HTTP/1.1\r\nHost: x\r\n\r\n";
    let req = format!(
        "POST /form HTTP/1.1\r\nHost: {}\r\nConnection: content-length\r\n\
         Content-Length: {}\r\n\r\n{smuggled}",
        front.proxy,
        smuggled.len()
    );
    let mut c = TcpStream::connect(front.proxy).await.expect("connect");
    c.write_all(req.as_bytes()).await.expect("write");
    let r = response(&mut c).await;
    assert_eq!(r.status, 200, "{r:?}");

    let seen = up.next().await;
    assert!(seen.line.starts_with("POST /base/form "), "{seen:?}");
    assert_eq!(seen.body, smuggled.as_bytes(), "{seen:?}");
    assert!(
        seen.head
            .to_ascii_lowercase()
            .contains(&format!("\r\ncontent-length: {}", smuggled.len())),
        "{seen:?}"
    );
    // One more request through the proxy: the only other request upstream.
    c.write_all(format!("GET /after HTTP/1.1\r\nHost: {}\r\n\r\n", front.proxy).as_bytes())
        .await
        .expect("write");
    assert_eq!(response(&mut c).await.status, 200);
    let next = up.next().await;
    assert!(next.line.starts_with("GET /base/after "), "{next:?}");
}

/// The same on the way back: a response whose `Connection` lists
/// `Content-Length` lost its only framing on a keep-alive connection, so
/// the client could not tell where it ended.
#[tokio::test]
async fn a_response_content_length_listed_in_connection_still_frames_it() {
    let up = RawUp::start(|_| {
        b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello".to_vec()
    })
    .await;
    let front = Front::start(&up.url(), "").await;
    let mut c = TcpStream::connect(front.proxy).await.expect("connect");
    for _ in 0..2 {
        c.write_all(format!("GET /x HTTP/1.1\r\nHost: {}\r\n\r\n", front.proxy).as_bytes())
            .await
            .expect("write");
        let r = response(&mut c).await;
        assert_eq!((r.status, r.body_text().as_str()), (200, "hello"), "{r:?}");
    }
}

/// An upstream that sends both framings: the client must get one
/// (RFC 9112 6.3: the `Content-Length` goes), else a client that trusts
/// `Content-Length` reads the chunk framing as the next response.
#[tokio::test]
async fn a_response_with_content_length_and_chunked_reaches_the_client_with_one() {
    let up = RawUp::start(|_| {
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\n"
            .to_vec()
    })
    .await;
    let front = Front::start(&up.url(), "").await;
    let mut c = TcpStream::connect(front.proxy).await.expect("connect");
    c.write_all(format!("GET /x HTTP/1.1\r\nHost: {}\r\n\r\n", front.proxy).as_bytes())
        .await
        .expect("write");
    let head = read_head(&mut c).await;
    let r = upstream::parse_response(head.as_bytes());
    assert_eq!(r.status, 200, "{head}");
    assert!(
        !(r.has_header("content-length") && r.has_header("transfer-encoding")),
        "both framings went to the client: {head}"
    );
}

/// An upstream that answered before the whole request body arrived (413,
/// 401) still expects the rest of that body on its connection; the lane
/// stopped sending it but put the connection back in the pool, so the next
/// request's first bytes were taken as that body and the rest of it as a
/// request of its own.
#[tokio::test]
async fn a_connection_answered_before_the_whole_body_is_not_reused() {
    let mut up = RawUp::start(|line| {
        if line.contains("/early") {
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n".to_vec()
        } else {
            ok("ok")
        }
    })
    .await;
    let front = Front::start(&up.url(), "").await;

    // Half of the body now; the rest never comes.
    let mut c = TcpStream::connect(front.proxy).await.expect("connect");
    let req = format!(
        "POST /early HTTP/1.1\r\nHost: {}\r\nContent-Length: 10\r\n\r\n12345",
        front.proxy
    );
    c.write_all(req.as_bytes()).await.expect("write");
    let r = response(&mut c).await;
    assert_eq!(r.status, 413, "{r:?}");

    let mut c = TcpStream::connect(front.proxy).await.expect("connect");
    c.write_all(format!("GET /second HTTP/1.1\r\nHost: {}\r\n\r\n", front.proxy).as_bytes())
        .await
        .expect("write");
    let r = response(&mut c).await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = loop {
        let seen = up.next().await;
        if seen.line.contains("second") {
            break seen;
        }
    };
    assert!(
        seen.line.starts_with("GET /base/second "),
        "the upstream read the request out of step: {seen:?}"
    );
    assert_ne!(seen.conn, 1, "{seen:?}");
}

/// An interim `100 Continue` the upstream sends unasked (RFC 9110 15.2:
/// a client must take it) while the request body is on its way asks for
/// the rest of the body; the lane took it for an early final answer,
/// stopped sending the body and waited for an answer the upstream could
/// not give until `proxy.request_timeout` (504). hyper sends on.
#[tokio::test]
async fn an_unasked_100_continue_does_not_stop_the_request_body() {
    let mut up = RawUp::start(|_| ok("got it")).await;
    let front = Front::start(&up.url(), r#"proxy.request_timeout = "3s""#).await;
    let mut c = TcpStream::connect(front.proxy).await.expect("connect");
    let req = format!(
        "POST /continue HTTP/1.1\r\nHost: {}\r\nContent-Length: 10\r\n\r\n12345",
        front.proxy
    );
    c.write_all(req.as_bytes()).await.expect("write");
    // Let the 100 reach the proxy before the rest of the body (no event to
    // wait for: without the pause the test passes either way).
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.write_all(b"67890").await.expect("write");
    let r = response(&mut c).await;
    assert_eq!((r.status, r.body_text().as_str()), (200, "got it"), "{r:?}");
    let seen = up.next().await;
    assert_eq!(seen.body, b"1234567890", "{seen:?}");
}

// ---------------------------------------------------------------------------
// Request targets

/// `#` cannot be in a request target; hyper cuts it and what follows (here
/// leaving `/..`, refused as a dot-segment), and so does the lane: had it
/// forwarded the bytes as they came, `/..#` would pass the dot-segment
/// check and reach the upstream, which may well cut the fragment and go
/// above the base path.
#[tokio::test]
async fn a_dot_segment_before_a_fragment_is_refused() {
    let mut up = RawUp::start(|_| ok("ok")).await;
    let front = Front::start(&up.url(), "").await;
    for target in ["/..#x", "/a/..#/b", "/a/%2e%2e#"] {
        let r = front.get_raw(target, "").await;
        assert_eq!(r.status, 400, "{target}: {r:?}");
    }
    assert!(
        up.seen.try_recv().is_err(),
        "a request reached the upstream"
    );
}

// ---------------------------------------------------------------------------
// Timeouts

/// A request head must arrive whole within `proxy.client_idle_timeout`
/// (hyper's `header_read_timeout`); the lane restarted that wait on every
/// byte, so a client sending one byte at a time held its connection (and
/// one of `proxy.max_connections`) for as long as it liked.
#[tokio::test]
async fn a_request_head_sent_a_byte_at_a_time_is_cut_off() {
    let up = RawUp::start(|_| ok("ok")).await;
    let front = Front::start(&up.url(), r#"proxy.client_idle_timeout = "200ms""#).await;
    let c = TcpStream::connect(front.proxy).await.expect("connect");
    let (mut rd, mut wr) = c.into_split();
    let closed = tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = rd.read_to_end(&mut sink).await;
    });
    wr.write_all(b"GET /x HTTP/1.1\r\nX-Slow: ")
        .await
        .expect("write");
    // Up to 15 idle periods of a byte every quarter period.
    for _ in 0..60 {
        if closed.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if wr.write_all(b"a").await.is_err() {
            break;
        }
    }
    assert!(
        closed.is_finished(),
        "the connection is still open after 15 idle periods of dribbling"
    );
}

// ---------------------------------------------------------------------------
// Connection management on the wire

/// hyper says `Connection: close` on the answer to a request that asked
/// for it; the lane closed without saying so.
#[tokio::test]
async fn the_answer_to_a_closing_request_says_connection_close() {
    let up = RawUp::start(|_| ok("bye")).await;
    let front = Front::start(&up.url(), "").await;
    let mut c = TcpStream::connect(front.proxy).await.expect("connect");
    c.write_all(
        format!(
            "GET /x HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            front.proxy
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let out = until_close(&mut c).await;
    let r = upstream::parse_response(&out);
    assert_eq!((r.status, r.body_text().as_str()), (200, "bye"), "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");

    // The sidecar's own answers too.
    let r = front.get_raw("/a/../b", "").await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
}

// ---------------------------------------------------------------------------
// Access log

/// `bytes_out` counts body bytes, as the hyper path counts its data
/// frames; the lane counted a chunked body's framing (sizes, CRLFs, the
/// last chunk) as well.
#[tokio::test]
async fn bytes_out_of_a_chunked_response_counts_its_payload() {
    let logs = LogBuffer::capture();
    let up = RawUp::start(|_| {
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            .to_vec()
    })
    .await;
    let front = Front::start(&up.url(), "").await;
    let r = front.get_raw("/x", "").await;
    assert_eq!(r.status, 200, "{r:?}");
    support::eventually(WAIT, "the access log line", || {
        let n = logs.access_lines().len();
        async move { n > 0 }
    })
    .await;
    let lines = logs.access_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["bytes_out"], 11, "{lines:?}");
}

// ---------------------------------------------------------------------------
// Shutdown

/// A response in flight when shutdown begins still reaches its client, and
/// says `Connection: close` as hyper's does once keep-alive is off; the
/// lane closed the connection after it without saying so.
#[tokio::test]
async fn a_response_in_flight_at_shutdown_arrives_and_says_connection_close() {
    let release = Arc::new(tokio::sync::Notify::new());
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let up = {
        let release = release.clone();
        upstream::Upstream::start(move |_req: http::Request<hyper::body::Incoming>| {
            let (release, arrived_tx) = (release.clone(), arrived_tx.clone());
            async move {
                let _ = arrived_tx.send(());
                release.notified().await;
                http::Response::new(upstream::TestBody::text("late"))
            }
        })
        .await
    };
    let front = Front::start(&up.url("/base/"), "").await;
    let proxy = front.proxy;
    let mut c = TcpStream::connect(proxy).await.expect("connect");
    c.write_all(format!("GET /slow HTTP/1.1\r\nHost: {proxy}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    tokio::time::timeout(WAIT, arrived.recv())
        .await
        .expect("the request reaches the upstream");

    let shutdown = tokio::spawn(front.sidecar.shutdown_now());
    // Shutdown has begun once new connections are refused.
    support::eventually(WAIT, "the listener closes", || async move {
        TcpStream::connect(proxy).await.is_err()
    })
    .await;
    release.notify_one();
    let out = until_close(&mut c).await;
    let r = upstream::parse_response(&out);
    assert_eq!((r.status, r.body_text().as_str()), (200, "late"), "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    tokio::time::timeout(WAIT, shutdown)
        .await
        .expect("shutdown ends")
        .expect("shutdown task");
}

/// A client that leaves while its request waits for the upstream gets no
/// answer and is not counted as a bad request: the exchange just ends
/// (access log status 0), as on the hyper path.
#[tokio::test]
async fn a_client_leaving_before_the_answer_is_not_a_bad_request() {
    let logs = LogBuffer::capture();
    // An upstream that takes requests and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (got, mut requests) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let got = got.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let _ = got.send(());
                }
            });
        }
    });
    let front = Front::start(&format!("http://{addr}/"), "").await;
    let mut c = TcpStream::connect(front.proxy).await.expect("connect");
    c.write_all(b"GET /waits HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    tokio::time::timeout(WAIT, requests.recv())
        .await
        .expect("the request reached the upstream");
    drop(c);
    support::eventually(WAIT, "the access log line", || {
        let n = logs.access_lines().len();
        async move { n > 0 }
    })
    .await;
    assert_eq!(
        logs.access_lines()[0]["status"],
        0,
        "{:?}",
        logs.access_lines()
    );
    let metrics = support::client()
        .get(format!("http://{}/metrics", front.sidecar.admin_addr))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert_eq!(
        support::metric(
            &metrics,
            "token_sidecar_local_responses_total{error=\"bad_request\",route=\"default\"}"
        ),
        Some(0.0),
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------
// Timers: one per connection, each deadline counted from its own start.

/// The keep-alive idle timeout and the request timeout count from the
/// request (or the last response), not from when the connection opened:
/// the lane keeps one timer per connection and moves it lazily, and a
/// deadline left over from an earlier request must not cut a later one.
/// (The pauses are the scenario: time passing between requests.)
#[tokio::test]
async fn deadlines_count_from_each_request_not_from_the_connection() {
    let up = upstream::Upstream::start(|req| async move {
        if req.uri().path().ends_with("/slow") {
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        upstream::response(200, &[], upstream::TestBody::text("ok"))
    })
    .await;
    let front = Front::start(
        &up.url("/base/"),
        "proxy.client_idle_timeout = \"1s\"\nproxy.request_timeout = \"1s\"",
    )
    .await;
    let mut c = TcpStream::connect(front.proxy).await.expect("connect");
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
    // 4 requests 0.6 s apart: 1.8 s on one connection, never 1 s idle.
    for _ in 0..4 {
        c.write_all(&get("/fast")).await.expect("write");
        assert_eq!(response(&mut c).await.status, 200);
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    // 2.4 s after the connection opened, a request taking 0.7 s is within
    // its own 1 s.
    c.write_all(&get("/slow")).await.expect("write");
    assert_eq!(response(&mut c).await.status, 200);
    // Then idle: closed after about 1 s.
    let closed = until_close(&mut c).await;
    assert!(closed.is_empty(), "{closed:?}");
}
}
