//! Bodies through the proxy: streamed both ways as they come (never buffered
//! whole), the RFCs' special cases (100-continue, HEAD, 204, 304, trailers),
//! what happens when either side goes quiet or away, and the limits on
//! connections and request heads.

#[path = "support/binary.rs"]
mod binary;
mod sidecar_process;
mod support;
#[path = "support/upstream.rs"]
mod upstream;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use upstream::{response, Front, TestBody, Upstream};

/// An upstream whose every response body is fed by the test: each request
/// hands the test the sender of its body.
async fn fed_upstream(
    content_type: &'static str,
) -> (
    Upstream,
    mpsc::UnboundedReceiver<mpsc::Sender<Frame<Bytes>>>,
) {
    let (senders_tx, senders) = mpsc::unbounded_channel();
    let up = Upstream::start(move |_| {
        let (tx, body) = TestBody::channel();
        senders_tx.send(tx).unwrap();
        async move { response(200, &[("content-type", content_type)], body) }
    })
    .await;
    (up, senders)
}

engines! {
#[tokio::test]
async fn a_chunked_download_reaches_the_client_chunk_by_chunk() {
    let (up, mut senders) = fed_upstream("application/octet-stream").await;
    let front = Front::start(&up.url("/base/"), "").await;
    let mut resp = support::client()
        .get(front.url("/report"))
        .send()
        .await
        .unwrap();
    let tx = senders.recv().await.unwrap();
    for i in 0..5 {
        let chunk = format!("chunk {i};");
        tx.send(Frame::data(Bytes::from(chunk.clone())))
            .await
            .unwrap();
        // The upstream has not sent the next chunk yet: this one must arrive alone.
        let got = resp.chunk().await.unwrap().expect("a chunk");
        assert_eq!(got, chunk.as_bytes());
    }
    drop(tx);
    assert!(resp.chunk().await.unwrap().is_none());
}

#[tokio::test]
async fn server_sent_events_arrive_one_by_one() {
    let (up, mut senders) = fed_upstream("text/event-stream").await;
    let front = Front::start(&up.url("/base/"), "").await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut resp = client
        .get(front.url("/events"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let tx = senders.recv().await.unwrap();
    for i in 0..3 {
        let event = format!("id: {i}\ndata: {{\"n\":{i}}}\n\n");
        tx.send(Frame::data(Bytes::from(event.clone())))
            .await
            .unwrap();
        assert_eq!(resp.chunk().await.unwrap().unwrap(), event.as_bytes());
    }
}

// A chunked upload: the lane hands those to hyper.
@handed_over
#[tokio::test]
async fn an_upload_streams_to_the_upstream_before_the_client_has_finished() {
    let (chunks_tx, mut chunks) = mpsc::unbounded_channel::<Bytes>();
    let up = Upstream::start(move |req: Request<Incoming>| {
        let chunks_tx = chunks_tx.clone();
        async move {
            let mut body = req.into_body();
            let mut total = 0;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    total += data.len();
                    chunks_tx.send(data).unwrap();
                }
            }
            Response::new(TestBody::text(total.to_string()))
        }
    })
    .await;
    let front = Front::start(&up.url("/base/"), "").await;
    let mut s = TcpStream::connect(front.proxy).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        front.proxy
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    for i in 0..4 {
        let part = format!("part {i} of the upload;");
        s.write_all(format!("{:x}\r\n{part}\r\n", part.len()).as_bytes())
            .await
            .unwrap();
        // The upstream gets this part while the client still holds the rest.
        let mut got = Vec::new();
        while got.len() < part.len() {
            got.extend_from_slice(&chunks.recv().await.unwrap());
        }
        assert_eq!(got, part.as_bytes());
        received.extend(got);
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let resp = upstream::parse_response(&out);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body_text(), received.len().to_string());
}

// `Expect: 100-continue`: the lane hands those to hyper.
@handed_over
#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let up = Upstream::start(|req: Request<Incoming>| async move {
        let expect = req.headers().contains_key("expect");
        let n = req.into_body().collect().await.unwrap().to_bytes().len();
        Response::new(TestBody::text(format!("{n} {expect}")))
    })
    .await;
    let front = Front::start(&up.url("/base/"), "").await;
    let mut s = TcpStream::connect(front.proxy).await.unwrap();
    let head = format!(
        "PUT /doc HTTP/1.1\r\nHost: {}\r\nContent-Length: 11\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        front.proxy
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // The client sends nothing more until told to continue.
    let interim = upstream::read_head(&mut s).await;
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n"),
        "{interim}"
    );
    s.write_all(b"hello world").await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let resp = upstream::parse_response(&out);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body_text(), "11 true");
}
}

/// Reads one response from a keep-alive connection: the head, then a body
/// of `Content-Length` bytes unless the response has none.
async fn next_response(s: &mut TcpStream, has_body: bool) -> upstream::RawResponse {
    let head = upstream::read_head(s).await;
    let mut resp = upstream::parse_response(head.as_bytes());
    if has_body {
        let n: usize = resp
            .header("content-length")
            .expect("a content-length")
            .parse()
            .unwrap();
        resp.body = upstream::read_exact(s, n).await;
    }
    resp
}

engines! {
#[tokio::test]
async fn head_204_and_304_have_no_body_and_keep_the_connection_in_step() {
    let up = Upstream::start(|req: Request<Incoming>| async move {
        match req.uri().path() {
            "/base/file" => response(
                200,
                &[("content-length", "1234"), ("etag", "\"v1\"")],
                if req.method() == http::Method::HEAD {
                    TestBody::empty()
                } else {
                    TestBody::text("x".repeat(1234))
                },
            ),
            "/base/deleted" => response(204, &[("x-done", "1")], TestBody::empty()),
            "/base/cached" => response(304, &[("etag", "\"v1\"")], TestBody::empty()),
            _ => response(200, &[], TestBody::text("next")),
        }
    })
    .await;
    let front = Front::start(&up.url("/base/"), "").await;
    let mut s = TcpStream::connect(front.proxy).await.unwrap();
    let host = front.proxy;
    let req =
        |method: &str, path: &str| format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");

    s.write_all(req("HEAD", "/file").as_bytes()).await.unwrap();
    let head = next_response(&mut s, false).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("1234"));
    assert_eq!(head.header("etag"), Some("\"v1\""));

    s.write_all(req("GET", "/after-head").as_bytes())
        .await
        .unwrap();
    assert_eq!(next_response(&mut s, true).await.body_text(), "next");

    s.write_all(req("DELETE", "/deleted").as_bytes())
        .await
        .unwrap();
    let deleted = next_response(&mut s, false).await;
    assert_eq!(deleted.status, 204);
    assert_eq!(deleted.header("x-done"), Some("1"));
    assert!(!deleted.has_header("content-length") && !deleted.has_header("transfer-encoding"));

    s.write_all(
        format!("GET /cached HTTP/1.1\r\nHost: {host}\r\nIf-None-Match: \"v1\"\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let cached = next_response(&mut s, false).await;
    assert_eq!(cached.status, 304);
    assert_eq!(cached.header("etag"), Some("\"v1\""));
    assert!(!cached.has_header("transfer-encoding"));

    // Had any of those carried a body, this would read it instead.
    s.write_all(req("GET", "/last").as_bytes()).await.unwrap();
    let last = next_response(&mut s, true).await;
    assert_eq!(last.status, 200);
    assert_eq!(last.body_text(), "next");
    assert_eq!(up.seen()[3].headers["if-none-match"], "\"v1\"");
}

// A chunked upload (with trailers): the lane hands those to hyper.
@handed_over
#[tokio::test]
async fn trailers_pass_through_both_ways() {
    let (trailers_tx, mut request_trailers) = mpsc::unbounded_channel::<Option<HeaderMap>>();
    let up = Upstream::start(move |req: Request<Incoming>| {
        let trailers_tx = trailers_tx.clone();
        async move {
            let collected = req.into_body().collect().await.unwrap();
            trailers_tx.send(collected.trailers().cloned()).unwrap();
            let (tx, body) = TestBody::channel();
            tokio::spawn(async move {
                tx.send(Frame::data(Bytes::from("payload"))).await.unwrap();
                let mut t = HeaderMap::new();
                t.insert("x-checksum", HeaderValue::from_static("abc123"));
                tx.send(Frame::trailers(t)).await.unwrap();
            });
            response(200, &[("trailer", "x-checksum")], body)
        }
    })
    .await;
    let front = Front::start(&up.url("/base/"), "").await;
    let request = format!(
        "POST /t HTTP/1.1\r\nHost: {}\r\nTE: trailers\r\nTrailer: x-client-sum\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         4\r\ndata\r\n0\r\nx-client-sum: 42\r\n\r\n",
        front.proxy
    );
    let resp = upstream::raw(front.proxy, request.as_bytes()).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("trailer"), Some("x-checksum"));
    assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
    let body = resp.body_text();
    assert!(body.contains("payload"), "{body:?}");
    assert!(
        body.ends_with("0\r\nx-checksum: abc123\r\n\r\n"),
        "{body:?}"
    );

    let upstream_trailers = request_trailers.recv().await.unwrap().expect("trailers");
    assert_eq!(upstream_trailers["x-client-sum"], "42");
    assert_eq!(up.only().headers["te"], "trailers");
}
}

/// A raw upstream that reports when a request head has arrived and when
/// the connection carrying it is closed by the proxy.
async fn watching_upstream() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<&'static str>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => {
                            let _ = tx.send("closed");
                            return;
                        }
                        Ok(n) => {
                            buf.extend_from_slice(&chunk[..n]);
                            if upstream::find(&buf, b"\r\n\r\n").is_some() {
                                let _ = tx.send("request");
                                buf.clear();
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

engines! {
#[tokio::test]
async fn a_client_going_away_cancels_the_upstream_request() {
    let (addr, mut events) = watching_upstream().await;
    let front = Front::start(&format!("http://{addr}/"), "").await;
    let mut s = TcpStream::connect(front.proxy).await.unwrap();
    let req = format!("GET /slow HTTP/1.1\r\nHost: {}\r\n\r\n", front.proxy);
    s.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(events.recv().await, Some("request"));
    drop(s);
    let closed = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
    assert_eq!(
        closed.expect("the upstream connection closes after the client's"),
        Some("closed")
    );
}

#[tokio::test]
async fn a_client_going_away_mid_download_stops_the_upstream_body() {
    let (up, mut senders) = fed_upstream("application/octet-stream").await;
    let front = Front::start(&up.url("/base/"), "").await;
    let client = support::client();
    let mut resp = client.get(front.url("/big")).send().await.unwrap();
    let tx = senders.recv().await.unwrap();
    tx.send(Frame::data(Bytes::from_static(b"first")))
        .await
        .unwrap();
    assert_eq!(resp.chunk().await.unwrap().unwrap(), "first");
    drop(resp);
    drop(client);
    tokio::time::timeout(Duration::from_secs(10), tx.closed())
        .await
        .expect("the upstream's body is dropped once the client has gone");
}

#[tokio::test]
async fn body_idle_timeout_ends_a_stalled_download() {
    let (up, mut senders) = fed_upstream("application/octet-stream").await;
    let front = Front::start(&up.url("/base/"), r#"proxy.body_idle_timeout = "300ms""#).await;
    let mut resp = support::client()
        .get(front.url("/stalls"))
        .send()
        .await
        .unwrap();
    let tx = senders.recv().await.unwrap();
    tx.send(Frame::data(Bytes::from_static(b"some")))
        .await
        .unwrap();
    assert_eq!(resp.chunk().await.unwrap().unwrap(), "some");
    // The upstream says nothing more; the client sees the body cut short.
    let end = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
        .await
        .expect("the stalled body ends within 10 s");
    assert!(
        end.is_err(),
        "a stalled body must not look complete: {end:?}"
    );
    tokio::time::timeout(Duration::from_secs(10), tx.closed())
        .await
        .expect("and the upstream's side is dropped");
}

#[tokio::test]
async fn body_idle_timeout_ends_a_stalled_upload() {
    let (ended_tx, mut ended) = mpsc::unbounded_channel::<bool>();
    let up = Upstream::start(move |req: Request<Incoming>| {
        let ended_tx = ended_tx.clone();
        async move {
            let complete = req.into_body().collect().await.is_ok();
            ended_tx.send(complete).unwrap();
            Response::new(TestBody::text("done"))
        }
    })
    .await;
    let front = Front::start(&up.url("/base/"), r#"proxy.body_idle_timeout = "300ms""#).await;
    let mut s = TcpStream::connect(front.proxy).await.unwrap();
    let head = format!(
        "POST /up HTTP/1.1\r\nHost: {}\r\nContent-Length: 100\r\n\r\nonly ten b",
        front.proxy
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let complete = tokio::time::timeout(Duration::from_secs(10), ended.recv())
        .await
        .expect("the upstream's request body ends within 10 s");
    assert_eq!(
        complete,
        Some(false),
        "a stalled upload must not look complete"
    );
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let resp = upstream::parse_response(&out);
    assert_eq!(resp.status, 408, "{}", resp.head);
    assert!(resp.body_text().contains("request_timeout"));
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_the_upstream_released() {
    let (up, mut senders) = fed_upstream("application/octet-stream").await;
    let front = Front::start(&up.url("/base/"), r#"proxy.body_idle_timeout = "300ms""#).await;
    let mut s = TcpStream::connect(front.proxy).await.unwrap();
    let req = format!("GET /big HTTP/1.1\r\nHost: {}\r\n\r\n", front.proxy);
    s.write_all(req.as_bytes()).await.unwrap();
    let tx = senders.recv().await.unwrap();
    // The upstream offers far more than the socket buffers hold; the client
    // reads nothing, so the proxy's writes to it stop making progress.
    let chunk = Bytes::from(vec![b'd'; 256 * 1024]);
    let pushed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut n = 0;
        while tx.send(Frame::data(chunk.clone())).await.is_ok() {
            n += 1;
            assert!(n < 1024, "256 MiB went into a client that reads nothing");
        }
    })
    .await;
    assert!(
        pushed.is_ok(),
        "the upstream's body is released within 10 s"
    );
    // And the client's connection was closed, short of a complete body.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the client's connection is closed");
    assert!(rest.starts_with(b"HTTP/1.1 200"));
    assert!(!rest.ends_with(b"0\r\n\r\n"));
}

#[tokio::test]
async fn an_upstream_that_stops_reading_an_upload_is_cut_off() {
    // Reads the request head, then nothing until the test says so; then
    // reports whether the proxy had closed the connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (go_tx, go) = tokio::sync::oneshot::channel::<()>();
    let upstream_side = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let _ = upstream::read_head(&mut s).await;
        let _ = go.await;
        let mut sink = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink))
            .await
            .is_ok()
    });
    let front = Front::start(
        &format!("http://{addr}/"),
        r#"proxy.body_idle_timeout = "300ms""#,
    )
    .await;
    let s = TcpStream::connect(front.proxy).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let len = 256u64 * 1024 * 1024;
    let head = format!(
        "POST /up HTTP/1.1\r\nHost: {}\r\nContent-Length: {len}\r\n\r\n",
        front.proxy
    );
    let writer = tokio::spawn(async move {
        w.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'u'; 256 * 1024];
        for _ in 0..len / chunk.len() as u64 {
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let head = upstream::read_head(&mut r).await;
    let resp = upstream::parse_response(head.as_bytes());
    assert_eq!(resp.status, 502, "{head}");
    writer.abort();
    go_tx.send(()).unwrap();
    assert!(
        upstream_side.await.unwrap(),
        "the proxy closed the stalled upstream connection"
    );
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let (_up, front) = {
        let up = Upstream::ok().await;
        let front = Front::start(&up.url("/base/"), r#"proxy.client_idle_timeout = "300ms""#).await;
        (up, front)
    };
    let mut s = TcpStream::connect(front.proxy).await.unwrap();
    let req = format!("GET /x HTTP/1.1\r\nHost: {}\r\n\r\n", front.proxy);
    s.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(next_response(&mut s, true).await.status, 200);
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the idle connection is closed within 10 s")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_their_turn() {
    let up = Upstream::ok().await;
    let front = Front::start(&up.url("/base/"), "proxy.max_connections = 1").await;
    let req = format!("GET /x HTTP/1.1\r\nHost: {}\r\n\r\n", front.proxy);
    let mut first = TcpStream::connect(front.proxy).await.unwrap();
    first.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(next_response(&mut first, true).await.status, 200);

    // Accepted by the kernel (the backlog), not served while the first is open.
    let mut second = TcpStream::connect(front.proxy).await.unwrap();
    second.write_all(req.as_bytes()).await.unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), second.peek(&mut byte)).await;
    assert!(early.is_err(), "served beyond max_connections");
    assert_eq!(up.seen().len(), 1);

    drop(first);
    assert_eq!(next_response(&mut second, true).await.status, 200);
    assert_eq!(up.seen().len(), 2);
}

#[tokio::test]
async fn max_connections_bounds_all_listeners_together() {
    let up = Upstream::ok().await;
    let front = Front::start(
        &up.url("/base/"),
        "proxy.max_connections = 1\nproxy.listen = [\"127.0.0.1:0\", \"127.0.0.1:0\"]",
    )
    .await;
    let [a, b] = front.sidecar.proxy_addrs[..] else {
        panic!("two listeners: {:?}", front.sidecar.proxy_addrs);
    };
    let req = format!("GET /x HTTP/1.1\r\nHost: {a}\r\n\r\n");
    let mut first = TcpStream::connect(a).await.unwrap();
    first.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(next_response(&mut first, true).await.status, 200);

    let mut second = TcpStream::connect(b).await.unwrap();
    second.write_all(req.as_bytes()).await.unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), second.peek(&mut byte)).await;
    assert!(
        early.is_err(),
        "the other listener served beyond max_connections"
    );

    drop(first);
    assert_eq!(next_response(&mut second, true).await.status, 200);
}
}

/// Writes `request` while reading the answer (the server may answer and close
/// before the whole request is written), until the server closes.
async fn send_oversized(addr: std::net::SocketAddr, request: Vec<u8>) -> Vec<u8> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let _ = w.write_all(&request).await;
        w
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), r.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no answer to an oversized request head within 10 s"),
        }
    }
    drop(writer);
    out
}

engines! {
// Heads over the lane's limit, and h2c: the lane hands both to hyper.
@handed_over
#[tokio::test]
async fn oversized_request_heads_get_431_and_the_proxy_carries_on() {
    let up = Upstream::ok().await;
    let front = Front::start(&up.url("/base/"), "").await;
    let host = front.proxy;

    let mut big = format!("GET /x HTTP/1.1\r\nHost: {host}\r\nX-Big: ").into_bytes();
    big.extend(std::iter::repeat_n(b'a', 1024 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    let out = send_oversized(front.proxy, big).await;
    assert!(
        out.starts_with(b"HTTP/1.1 431 "),
        "{:?}",
        String::from_utf8_lossy(&out)
    );

    let mut many = format!("GET /x HTTP/1.1\r\nHost: {host}\r\n").into_bytes();
    for i in 0..10_000 {
        many.extend_from_slice(format!("h{i}: 1\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let out = send_oversized(front.proxy, many).await;
    assert!(
        out.starts_with(b"HTTP/1.1 431 "),
        "{:?}",
        String::from_utf8_lossy(&out)
    );

    // HTTP/2: a header list over the limit is refused, never forwarded.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap();
    let refused = h2
        .get(front.url("/x"))
        .header("x-big", "a".repeat(1024 * 1024))
        .send()
        .await;
    if let Ok(r) = refused {
        assert_eq!(r.status(), 431);
    }

    assert!(up.seen().is_empty());
    let ok = support::client().get(front.url("/x")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let ok = h2.get(front.url("/x")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
}
}

const GIB: u64 = 1024 * 1024 * 1024;

/// Streams `GIB` bytes up through the sidecar process at `proxy`.
async fn upload_gib(proxy: std::net::SocketAddr) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: {proxy}\r\nContent-Length: {GIB}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'u'; 256 * 1024];
    for _ in 0..GIB / chunk.len() as u64 {
        s.write_all(&chunk).await.unwrap();
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let resp = upstream::parse_response(&out);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body_text(), GIB.to_string());
}

/// Downloads `GIB` bytes through the sidecar process at `proxy`.
async fn download_gib(proxy: std::net::SocketAddr) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let req = format!("GET /download HTTP/1.1\r\nHost: {proxy}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let head = upstream::read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    assert_eq!(total, GIB);
}

engines! {
// Multi-thread: the client, the upstream and the sidecar process all move
// bytes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gib_each_way_keeps_the_sidecars_memory_flat() {
    let world = token_sidecar::fake::World::new(300.0);
    let auth = token_sidecar::fake::token_endpoint(world.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let up = Upstream::start(|req: Request<Incoming>| async move {
        if req.method() == http::Method::POST {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                if let Ok(d) = frame.unwrap().into_data() {
                    n += d.len() as u64;
                }
            }
            Response::new(TestBody::text(n.to_string()))
        } else {
            Response::new(TestBody::generated(GIB))
        }
    })
    .await;
    let toml = support::base_toml(&world, &auth.url("/oauth/token"), &up.url("/base/"));
    let sidecar = binary::Process::spawn(&toml, &[]).await;
    sidecar.ready().await;
    // Warm: one request through, so pools and buffers exist before the baseline.
    let warm = support::client()
        .get(sidecar.url("/warm"))
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status(), 200);
    let before = sidecar.status_kib("VmRSS");

    let started = std::time::Instant::now();
    let transfers = async {
        upload_gib(sidecar.proxy).await;
        download_gib(sidecar.proxy).await;
    };
    tokio::time::timeout(Duration::from_secs(120), transfers)
        .await
        .expect("2 GiB through the sidecar within 120 s");
    let peak = sidecar.status_kib("VmHWM");
    let growth = peak.saturating_sub(before);
    eprintln!(
        "RSS before {before} KiB, peak {peak} KiB, growth {growth} KiB; 2 GiB moved in {:?}",
        started.elapsed()
    );
    assert!(growth < 16 * 1024, "resident memory grew by {growth} KiB");
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_lets_exchanges_finish() {
    let (up, mut senders) = fed_upstream("application/octet-stream").await;
    let front = Front::start(&up.url("/base/"), "").await;
    let proxy = front.proxy;
    let req = format!("GET /x HTTP/1.1\r\nHost: {proxy}\r\n\r\n");

    // An idle keep-alive connection, and one with a download under way.
    let mut idle = TcpStream::connect(proxy).await.unwrap();
    idle.write_all(req.as_bytes()).await.unwrap();
    let tx = senders.recv().await.unwrap();
    tx.send(Frame::data(Bytes::from_static(b"done")))
        .await
        .unwrap();
    drop(tx);
    let _ = upstream::read_head(&mut idle).await;
    let mut busy = TcpStream::connect(proxy).await.unwrap();
    busy.write_all(req.as_bytes()).await.unwrap();
    let tx = senders.recv().await.unwrap();
    tx.send(Frame::data(Bytes::from_static(b"part one;")))
        .await
        .unwrap();
    let head = upstream::read_head(&mut busy).await;
    assert!(head.starts_with("HTTP/1.1 200"));

    let shutdown = tokio::spawn(front.sidecar.shutdown_now());
    // The idle connection is closed (after the rest of its chunked body).
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut rest))
        .await
        .expect("the idle connection is closed")
        .unwrap();
    // New connections are refused.
    support::eventually(
        Duration::from_secs(10),
        "the listener is closed",
        || async move { TcpStream::connect(proxy).await.is_err() },
    )
    .await;
    assert!(!shutdown.is_finished(), "shutdown waits for the download");

    // The download finishes, then so does the shutdown.
    tx.send(Frame::data(Bytes::from_static(b"part two")))
        .await
        .unwrap();
    drop(tx);
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), busy.read_to_end(&mut body))
        .await
        .expect("the download completes and the connection closes")
        .unwrap();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("part one;") && body.contains("part two"),
        "{body}"
    );
    assert!(body.ends_with("0\r\n\r\n"), "{body:?}");
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown returns once the download is done")
        .unwrap();
}
}
