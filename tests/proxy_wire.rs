//! The HTTP/1.1 wire through the proxy, byte for byte, black-box: clients
//! write exact bytes on raw TCP and read back exactly what the proxy wrote;
//! most upstreams are raw TCP too, answering with scripted bytes and
//! recording which connection carried which request.
//!
//! These pin what any HTTP/1.1 data path of the proxy must keep doing
//! (pipelining, framing of bodies both ways, connection reuse and its limits,
//! header rules on the wire, interim responses, malformed input from either
//! side), whatever parses and writes the messages. What `proxy_http`,
//! `proxy_stream` and `upstream_pool` already cover is not repeated here.

mod support;
#[path = "support/upstream.rs"]
mod upstream;
#[path = "support/wire.rs"]
mod wire;

use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::mpsc;
use upstream::{Front, TestBody, Upstream};
use wire::*;

// ---------------------------------------------------------------------------
// Pipelining

/// An upstream that describes each request in its body: method, target,
/// body length and the request id it received. `/base/slow` answers late.
async fn describing_upstream() -> Upstream {
    Upstream::start(|req: Request<Incoming>| async move {
        let method = req.method().to_string();
        let target = req.uri().to_string();
        let id = req
            .headers()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        if target == "/base/slow" {
            // A slow answer: were the next request answered first, the
            // responses would come out of order.
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let n = req.into_body().collect().await.unwrap().to_bytes().len();
        Response::new(TestBody::text(format!("{method} {target} {n} id={id}")))
    })
    .await
}

engines! {
#[tokio::test]
async fn pipelined_requests_are_answered_in_order_with_their_own_ids() {
    let up = describing_upstream().await;
    let front = Front::start(&up.url("/base/"), "").await;
    let mut c = Wire::connect(front.proxy).await;

    // Two in one write.
    let mut two = get(&front, "/slow", "X-Request-Id: pipe-1\r\n");
    two.extend(get(&front, "/second", "X-Request-Id: pipe-2\r\n"));
    c.send(&two).await;
    for (target, id) in [("/base/slow", "pipe-1"), ("/base/second", "pipe-2")] {
        let r = c.response().await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.text(), format!("GET {target} 0 id={id}"));
        assert_eq!(r.head.get("x-request-id"), Some(id));
    }

    // Three in one write, a POST with a body in the middle and one without
    // an id (it gets its own, the same both ways).
    let mut three = get(&front, "/slow", "X-Request-Id: pipe-3\r\n");
    three.extend(
        format!(
            "POST /posted HTTP/1.1\r\nHost: {}\r\nX-Request-Id: pipe-4\r\nContent-Length: 7\r\n\r\npayload",
            front.proxy
        )
        .as_bytes(),
    );
    three.extend(get(&front, "/third", ""));
    c.send(&three).await;
    let r = c.response().await;
    assert_eq!(r.text(), "GET /base/slow 0 id=pipe-3");
    assert_eq!(r.head.get("x-request-id"), Some("pipe-3"));
    let r = c.response().await;
    assert_eq!(r.text(), "POST /base/posted 7 id=pipe-4");
    assert_eq!(r.head.get("x-request-id"), Some("pipe-4"));
    let r = c.response().await;
    let id = r
        .head
        .get("x-request-id")
        .expect("a generated id")
        .to_owned();
    assert_eq!(id.len(), 32, "{id}");
    assert_eq!(r.text(), format!("GET /base/third 0 id={id}"));

    // A request and half of the next in one write, the rest after the
    // first answer: the proxy keeps the half it already read.
    let next = get(&front, "/fifth", "X-Request-Id: pipe-6\r\n");
    let (first_half, second_half) = next.split_at(next.len() / 2);
    let mut write = get(&front, "/slow", "X-Request-Id: pipe-5\r\n");
    write.extend(first_half);
    c.send(&write).await;
    assert_eq!(c.response().await.text(), "GET /base/slow 0 id=pipe-5");
    c.send(second_half).await;
    let r = c.response().await;
    assert_eq!(r.text(), "GET /base/fifth 0 id=pipe-6");
    assert_eq!(r.head.get("x-request-id"), Some("pipe-6"));
    assert_eq!(up.seen().len(), 7);
}

// ---------------------------------------------------------------------------
// Request bodies

#[tokio::test]
async fn a_content_length_body_arrives_upstream_byte_for_byte() {
    let mut up = RawUp::always(&ok("stored"), Then::KeepAlive).await;
    let front = front(&up).await;
    let body = pattern(100 * 1024);
    let mut c = Wire::connect(front.proxy).await;
    let mut req = format!(
        "POST /upload HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        front.proxy,
        body.len()
    )
    .into_bytes();
    req.extend(&body);
    c.send(&req).await;
    let r = c.response().await;
    assert_eq!((r.status(), r.text().as_str()), (200, "stored"));

    let seen = up.request().await;
    assert!(seen.head.start.starts_with("POST /base/upload HTTP/1.1"));
    assert!(!seen.chunked, "a Content-Length body went out chunked");
    assert_eq!(seen.head.get("content-length"), Some("102400"));
    assert!(seen.body == body, "the body changed on the way");

    // The connection is in step for the next request.
    c.send(&get(&front, "/after", "")).await;
    assert_eq!(c.response().await.text(), "stored");
    assert!(up.request().await.body.is_empty());
}

#[tokio::test]
async fn a_body_written_in_pieces_with_pauses_arrives_whole() {
    // The upstream reports how many body bytes it has, frame by frame.
    let (progress_tx, mut progress) = mpsc::unbounded_channel::<usize>();
    let up = Upstream::start(move |req: Request<Incoming>| {
        let progress_tx = progress_tx.clone();
        async move {
            let mut body = req.into_body();
            let mut got = Vec::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    got.extend_from_slice(&data);
                    progress_tx.send(got.len()).unwrap();
                }
            }
            let sum: u64 = got.iter().map(|&b| b as u64).sum();
            Response::new(TestBody::text(format!("{} {sum}", got.len())))
        }
    })
    .await;
    let front = Front::start(&up.url("/base/"), "").await;
    let body = pattern(40_000);
    let sum: u64 = body.iter().map(|&b| b as u64).sum();
    let head = format!(
        "PUT /doc HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n",
        front.proxy,
        body.len()
    );
    let mut c = Wire::connect(front.proxy).await;

    // The head in two writes, split inside the Content-Length line. The
    // pause lets the proxy read the first part alone; the test passes
    // however the bytes are grouped.
    let split = head.find("Length").unwrap();
    c.send(&head.as_bytes()[..split]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.send(&head.as_bytes()[split..]).await;

    // The body in pieces; each next one only once the upstream has the last.
    let mut sent = 0;
    for piece in body.chunks(9_000) {
        c.send(piece).await;
        sent += piece.len();
        loop {
            let got = tokio::time::timeout(WAIT, progress.recv())
                .await
                .expect("the piece reaches the upstream")
                .unwrap();
            if got >= sent {
                assert_eq!(got, sent, "more bytes upstream than the client sent");
                break;
            }
        }
    }
    let r = c.response().await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text(), format!("{} {sum}", body.len()));
    let seen = up.only();
    assert_eq!(seen.headers["content-length"], body.len().to_string());
    assert!(!seen.headers.contains_key("transfer-encoding"));
}

// ---------------------------------------------------------------------------
// Response framing

#[tokio::test]
async fn a_chunked_response_with_trailers_arrives_exact_with_its_trailers() {
    // Chunks of several sizes, an uppercase hex size, a chunk extension,
    // two trailer fields.
    let mut answer =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\
                       Trailer: X-Sum, X-Other\r\n\r\n"
            .to_vec();
    answer.extend(b"5;ext=1\r\nhello\r\n1\r\n,\r\n");
    let big = vec![b'b'; 0x1A2B];
    answer.extend(b"1A2B\r\n");
    answer.extend(&big);
    answer.extend(b"\r\n0\r\nX-Sum: 99\r\nX-Other: two words\r\n\r\n");
    let mut up = RawUp::always(&answer, Then::KeepAlive).await;
    let front = front(&up).await;
    let mut c = Wire::connect(front.proxy).await;

    c.send(&get(&front, "/report", "TE: trailers\r\n")).await;
    let r = c.response().await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.framing, Framing::Chunked, "{:?}", r.head);
    let mut payload = b"hello,".to_vec();
    payload.extend(&big);
    assert!(r.body == payload, "the payload changed on the way");
    let trailer = |name: &str| {
        r.trailers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| lossy(v))
    };
    assert_eq!(trailer("x-sum").as_deref(), Some("99"), "{:?}", r.trailers);
    assert_eq!(trailer("x-other").as_deref(), Some("two words"));
    assert!(up.request().await.head.lists("te", "trailers"));

    // The body ended where the client thought: the next answer is whole.
    c.send(&get(&front, "/again", "TE: trailers\r\n")).await;
    let r = c.response().await;
    assert!(r.body == payload);
}

#[tokio::test]
async fn a_close_delimited_response_reaches_the_client_delimited() {
    let body = pattern(200 * 1024);
    let mut answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n".to_vec();
    answer.extend(&body);
    let mut up = RawUp::start(move |seen| {
        if seen.head.start.starts_with("GET /base/eof ") {
            (answer.clone(), Then::Close)
        } else {
            (ok("next"), Then::KeepAlive)
        }
    })
    .await;
    let front = front(&up).await;
    let mut c = Wire::connect(front.proxy).await;
    c.send(&get(&front, "/eof", "")).await;
    let r = c.response().await;
    assert_eq!(r.status(), 200);
    assert!(r.body == body, "{} bytes of {}", r.body.len(), body.len());
    assert_eq!(up.request().await.conn, 1);
    match r.framing {
        // Then the client's connection is still in step.
        Framing::Chunked | Framing::Length => {
            c.send(&get(&front, "/same-connection", "")).await;
            assert_eq!(c.response().await.text(), "next");
            assert_ne!(up.request().await.conn, 1);
        }
        Framing::Close => {}
        Framing::None => panic!("a body without framing: {:?}", r.head),
    }

    // A new client connection works; the upstream connection that ended
    // with the close is not used again.
    let mut c = Wire::connect(front.proxy).await;
    c.send(&get(&front, "/fresh", "")).await;
    assert_eq!(c.response().await.text(), "next");
    let seen = up.request().await;
    assert!(seen.head.start.starts_with("GET /base/fresh "), "{seen:?}");
    assert_ne!(seen.conn, 1);
}

#[tokio::test]
async fn an_upstream_connection_close_is_honoured() {
    // The upstream says `Connection: close` but leaves the socket open: the
    // proxy must not send another request on it, and should close it.
    let mut up = RawUp::start(|seen| {
        if seen.conn == 1 {
            let answer = "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nfirst";
            (answer.as_bytes().to_vec(), Then::KeepAlive)
        } else {
            (ok("later"), Then::KeepAlive)
        }
    })
    .await;
    let front = front(&up).await;
    let mut c = Wire::connect(front.proxy).await;
    c.send(&get(&front, "/one", "")).await;
    let r = c.response().await;
    assert_eq!((r.status(), r.text().as_str()), (200, "first"));
    assert_eq!(up.request().await.conn, 1);
    assert_eq!(up.closed().await, (1, Closer::Proxy));

    // The client's own connection may go on, or close; either way the next
    // request goes out on a new upstream connection.
    if r.head.lists("connection", "close") {
        c = Wire::connect(front.proxy).await;
    }
    c.send(&get(&front, "/two", "")).await;
    assert_eq!(c.response().await.text(), "later");
    assert_eq!(up.request().await.conn, 2);
}

#[tokio::test]
async fn an_idle_pooled_connection_closed_by_the_upstream_is_replaced() {
    let mut up = RawUp::start(|seen| {
        let answer = format!("conn={} body={}", seen.conn, lossy(&seen.body));
        (ok(&answer), Then::KeepAlive)
    })
    .await;
    let front = front(&up).await;
    let mut c = Wire::connect(front.proxy).await;
    c.send(&get(&front, "/warm", "")).await;
    assert_eq!(c.response().await.text(), "conn=1 body=");
    up.request().await;

    // The upstream's keep-alive timeout fires between two requests.
    up.close_idle();
    assert_eq!(up.closed().await, (1, Closer::Upstream));
    c.send(&get(&front, "/get", "")).await;
    let r = c.response().await;
    assert_eq!((r.status(), r.text().as_str()), (200, "conn=2 body="));
    assert_eq!(up.request().await.conn, 2);

    // And again before a request with a body.
    up.close_idle();
    assert_eq!(up.closed().await, (2, Closer::Upstream));
    c.send(
        format!(
            "POST /post HTTP/1.1\r\nHost: {}\r\nContent-Length: 10\r\n\r\nsmall body",
            front.proxy
        )
        .as_bytes(),
    )
    .await;
    let r = c.response().await;
    assert_eq!(
        (r.status(), r.text().as_str()),
        (200, "conn=3 body=small body")
    );
    let seen = up.request().await;
    assert_eq!((seen.conn, seen.body.as_slice()), (3, &b"small body"[..]));
    up.no_more_requests();
}

// ---------------------------------------------------------------------------
// Response fields

#[tokio::test]
async fn hop_by_hop_response_fields_are_not_on_the_clients_wire() {
    let answer = "HTTP/1.1 200 OK\r\n\
                  Connection: Keep-Alive,  X-Foo\r\n\
                  connection: x-BAR\r\n\
                  X-Foo: 1\r\n\
                  x-bar: 2\r\n\
                  Keep-Alive: timeout=5, max=100\r\n\
                  Proxy-Authenticate: Basic realm=\"p\"\r\n\
                  Proxy-Connection: keep-alive\r\n\
                  X-Kept: yes\r\n\
                  Content-Length: 4\r\n\r\nbody";
    let up = RawUp::always(answer.as_bytes(), Then::KeepAlive).await;
    let front = front(&up).await;
    let mut c = Wire::connect(front.proxy).await;
    c.send(&get(&front, "/h", "")).await;
    let r = c.response().await;
    assert_eq!(r.status(), 200);
    for gone in [
        "x-foo",
        "x-bar",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
    ] {
        assert!(!r.head.has(gone), "{gone} reached the client: {:?}", r.head);
    }
    for listed in ["x-foo", "x-bar"] {
        assert!(!r.head.lists("connection", listed), "{:?}", r.head);
    }
    assert_eq!(r.head.get("x-kept"), Some("yes"));
    assert_eq!(r.head.get("content-length"), Some("4"));
    assert_eq!(r.text(), "body");
    // Still keep-alive.
    c.send(&get(&front, "/h2", "")).await;
    assert_eq!(c.response().await.text(), "body");
}

#[tokio::test]
async fn repeated_fields_and_non_ascii_value_bytes_pass_unchanged() {
    let mut answer = b"HTTP/1.1 200 OK\r\n\
        Set-Cookie: a=1; Path=/; Expires=Wed, 21 Oct 2035 07:28:00 GMT; HttpOnly\r\n\
        X-Between: x\r\n\
        Set-Cookie: b=2; Secure\r\n\
        Vary: Accept\r\n\
        Vary: Accept-Encoding\r\n\
        X-Bytes: caf"
        .to_vec();
    // obs-text: bytes 0x80-0xff in a value, not valid UTF-8.
    let obs = b"\xe9 \x80\xff|\xc3\xa9";
    answer.extend(obs);
    answer.extend(b"\r\nContent-Length: 2\r\n\r\nok");
    let up = RawUp::always(&answer, Then::KeepAlive).await;
    let front = front(&up).await;
    let mut c = Wire::connect(front.proxy).await;
    c.send(&get(&front, "/cookies", "")).await;
    let r = c.response().await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.head.all("set-cookie"),
        [
            &b"a=1; Path=/; Expires=Wed, 21 Oct 2035 07:28:00 GMT; HttpOnly"[..],
            b"b=2; Secure"
        ]
    );
    assert_eq!(r.head.all("vary"), [&b"Accept"[..], b"Accept-Encoding"]);
    let mut value = b"caf".to_vec();
    value.extend(obs);
    assert_eq!(r.head.all("x-bytes"), [value.as_slice()]);
    assert_eq!(r.text(), "ok");
}

#[tokio::test]
async fn unusual_status_lines_keep_their_status_code() {
    let mut up = RawUp::start(|seen| {
        let line = match seen.head.start.split(' ').nth(1) {
            Some("/base/299") => "HTTP/1.1 299 Whatever\r\n",
            Some("/base/418") => "HTTP/1.1 418 I'm a teapot\r\n",
            Some("/base/599") => "HTTP/1.1 599 \r\n",
            _ => "HTTP/1.1 200 Fine Thanks\r\n",
        };
        let answer = format!("{line}Content-Length: 4\r\n\r\nbody");
        (answer.into_bytes(), Then::KeepAlive)
    })
    .await;
    let front = front(&up).await;
    let mut c = Wire::connect(front.proxy).await;
    for code in [299, 418, 599, 200] {
        c.send(&get(&front, &format!("/{code}"), "")).await;
        let r = c.response().await;
        assert_eq!(r.status(), code, "{:?}", r.head.start);
        assert!(r.head.start.starts_with("HTTP/1.1 "), "{:?}", r.head.start);
        assert_eq!(r.text(), "body");
        up.request().await;
    }
}

// ---------------------------------------------------------------------------
// Request fields

#[tokio::test]
async fn repeated_request_fields_arrive_upstream_in_order() {
    let mut up = RawUp::always(&ok("ok"), Then::KeepAlive).await;
    let front = front(&up).await;
    let mut c = Wire::connect(front.proxy).await;
    c.send(&get(
        &front,
        "/multi",
        "X-Multi: one\r\nAccept: text/html\r\nX-Multi: two, three\r\nx-multi: four\r\n\
         Accept: application/json\r\n",
    ))
    .await;
    assert_eq!(c.response().await.status(), 200);
    let seen = up.request().await;
    assert_eq!(
        seen.head.all("x-multi"),
        [&b"one"[..], b"two, three", b"four"]
    );
    assert_eq!(
        seen.head.all("accept"),
        [&b"text/html"[..], b"application/json"]
    );
}

#[tokio::test]
async fn request_field_names_work_in_any_case() {
    let mut up = RawUp::always(&ok("ok"), Then::KeepAlive).await;
    let front = front(&up).await;
    let mut c = Wire::connect(front.proxy).await;
    let req = format!(
        "POST /case HTTP/1.1\r\nhOST: {}\r\nCONTENT-length: 5\r\nx-request-ID: Case-1\r\n\
         AUTHORIZATION: Basic dXNlcjpwdw==\r\nCONNECTION: X-Drop\r\nX-DROP: 1\r\n\
         te: TRAILERS\r\nkeep-ALIVE: timeout=1\r\nX-MiXeD-Case: v\r\n\r\nhello",
        front.proxy
    );
    c.send(req.as_bytes()).await;
    let r = c.response().await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.head.get("x-request-id"), Some("Case-1"));

    let seen = up.request().await;
    assert_eq!(seen.body, b"hello");
    assert_eq!(seen.head.get("content-length"), Some("5"));
    assert_eq!(seen.head.get("host"), Some(up.addr.to_string().as_str()));
    assert_eq!(seen.head.get("x-request-id"), Some("Case-1"));
    assert_eq!(
        seen.head.get("authorization"),
        Some(front.bearer().as_str())
    );
    assert_eq!(seen.head.get("x-mixed-case"), Some("v"));
    assert!(seen.head.lists("te", "trailers"), "{:?}", seen.head);
    for gone in ["x-drop", "keep-alive"] {
        assert!(!seen.head.has(gone), "{gone} reached the upstream");
    }
}

#[tokio::test]
async fn a_client_connection_close_gets_its_answer_then_the_close() {
    let mut up = RawUp::always(&ok("bye"), Then::KeepAlive).await;
    let front = front(&up).await;
    let mut c = Wire::connect(front.proxy).await;
    // A request after the closing one, in the same write: never served.
    let mut write = get(&front, "/last", "Connection: close\r\n");
    write.extend(get(&front, "/after-close", ""));
    c.send(&write).await;
    let r = c.response().await;
    assert_eq!((r.status(), r.text().as_str()), (200, "bye"));
    assert!(c.closes().await, "the proxy keeps talking after the close");

    let seen = up.request().await;
    assert!(seen.head.start.starts_with("GET /base/last "));
    assert!(
        !seen.head.lists("connection", "close"),
        "the client's Connection: close went upstream"
    );
    // The pipelined request after the close was dropped, and the proxy
    // serves the next connection.
    let mut c = Wire::connect(front.proxy).await;
    c.send(&get(&front, "/next", "")).await;
    assert_eq!(c.response().await.text(), "bye");
    let next = up.request().await;
    assert!(next.head.start.starts_with("GET /base/next "), "{next:?}");
    up.no_more_requests();
}

// ---------------------------------------------------------------------------
// HTTP/1.0 and interim responses

// HTTP/1.0: the lane hands those to hyper.
@handed_over
#[tokio::test]
async fn an_http10_request_without_host_is_answered_and_delimited() {
    let mut up = RawUp::start(|seen| {
        if seen.head.start.starts_with("GET /base/chunked ") {
            let answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                           4\r\nten \r\n6\r\nchunks\r\n0\r\n\r\n";
            (answer.to_vec(), Then::KeepAlive)
        } else {
            (ok("ten length"), Then::KeepAlive)
        }
    })
    .await;
    let front = front(&up).await;

    for (path, body) in [("/length", "ten length"), ("/chunked", "ten chunks")] {
        let mut c = Wire::connect(front.proxy).await;
        c.send(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await;
        let r = c.response().await;
        assert_eq!(r.status(), 200, "{path}");
        // An HTTP/1.0 client cannot read chunked (RFC 9112 section 6.1).
        assert_ne!(r.framing, Framing::Chunked, "{path}: {:?}", r.head);
        assert_eq!(r.text(), body, "{path}");
        // Not keep-alive: the proxy closes after the answer.
        assert!(c.closes().await, "{path}");

        let seen = up.request().await;
        assert!(
            seen.head.start.ends_with(" HTTP/1.1"),
            "{:?}",
            seen.head.start
        );
        assert_eq!(seen.head.get("host"), Some(up.addr.to_string().as_str()));
    }
}

#[tokio::test]
async fn interim_responses_before_the_final_one_do_not_break_the_exchange() {
    let mut up = RawUp::start(|seen| {
        let interim: &[u8] = if seen.conn == 1 && seen.head.start.contains("/hints ") {
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        } else {
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
        };
        let mut answer = interim.to_vec();
        answer.extend(ok("final"));
        (answer, Then::KeepAlive)
    })
    .await;
    let front = front(&up).await;
    let mut c = Wire::connect(front.proxy).await;
    for path in ["/hints", "/two-interim", "/hints"] {
        c.send(&get(&front, path, "")).await;
        let r = c.final_response().await;
        assert_eq!((r.status(), r.text().as_str()), (200, "final"), "{path}");
        up.request().await;
    }
}
}

// ---------------------------------------------------------------------------
// Bad requests

engines! {
#[tokio::test]
async fn request_heads_over_the_size_limit_get_431_and_under_it_pass() {
    let limit = token_sidecar::proxy::MAX_HEADER_BYTES;
    let mut up = RawUp::always(&ok("ok"), Then::KeepAlive).await;
    let front = front(&up).await;

    // Three quarters of the limit: forwarded, the value intact.
    let value = "v".repeat(limit * 3 / 4);
    let mut c = Wire::connect(front.proxy).await;
    c.send(&get(&front, "/big", &format!("X-Big: {value}\r\n")))
        .await;
    assert_eq!(c.response().await.status(), 200);
    assert_eq!(up.request().await.head.get("x-big"), Some(value.as_str()));

    // Just over it: 431, and nothing forwarded.
    let value = "v".repeat(limit + 1024);
    let out = exchange_until_close(
        front.proxy,
        get(&front, "/too-big", &format!("X-Big: {value}\r\n")),
    )
    .await;
    assert_eq!(status_of(&out), Some(431), "{:?}", lossy(&out));

    // The same connection that carried the big-but-allowed head still works.
    c.send(&get(&front, "/after", "")).await;
    assert_eq!(c.response().await.status(), 200);
    assert!(up
        .request()
        .await
        .head
        .start
        .starts_with("GET /base/after "));
    up.no_more_requests();
}

#[tokio::test]
async fn malformed_requests_get_400_and_the_proxy_carries_on() {
    let mut up = RawUp::always(&ok("ok"), Then::KeepAlive).await;
    let front = front(&up).await;
    for bad in [
        &b"GET /x HTTP/1.1\r\nHost x\r\n\r\n"[..],
        b"GET /x HTTP/1.1\r\nHost : x\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHo(st: x\r\n\r\n",
        b"GET /x y HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /x HTTP/1.1 extra\r\nHost: x\r\n\r\n",
        b"GET\r\n\r\n",
    ] {
        let out = exchange_until_close(front.proxy, bad.to_vec()).await;
        assert_eq!(status_of(&out), Some(400), "{:?}", lossy(bad));
    }
    up.no_more_requests();

    // Garbage after a good request on a keep-alive connection: the good one
    // is answered, the garbage gets 400, then the close.
    let mut write = get(&front, "/good", "");
    write.extend(b"NOT HTTP AT ALL\r\n\r\n");
    let mut c = Wire::connect(front.proxy).await;
    c.send(&write).await;
    let good = c.response().await;
    assert_eq!((good.status(), good.text().as_str()), (200, "ok"));
    let bad = c.head().await.expect("an answer to the garbage");
    assert_eq!(bad.status(), 400);
    c.rest().await;
    assert!(up.request().await.head.start.starts_with("GET /base/good "));

    let mut c = Wire::connect(front.proxy).await;
    c.send(&get(&front, "/still-serving", "")).await;
    assert_eq!(c.response().await.status(), 200);
}

// `Transfer-Encoding`, and invalid or repeated `Content-Length`: the lane
// leaves those to hyper (h1::parse_request).
@handed_over
#[tokio::test]
async fn request_framing_that_could_smuggle_is_refused_or_read_as_chunked() {
    let mut up = RawUp::always(&ok("ok"), Then::KeepAlive).await;
    let front = front(&up).await;
    let host = front.proxy;
    // Lengths that disagree or are not plain digits: 400, nothing forwarded.
    for framing in [
        "Content-Length: 5\r\nContent-Length: 6",
        "Content-Length: 5, 6",
        "Content-Length: +5",
        "Content-Length: -5",
        "Content-Length: 0x5",
        "Content-Length: 5 5",
    ] {
        let req = format!("POST /x HTTP/1.1\r\nHost: {host}\r\n{framing}\r\n\r\nhello!");
        let out = exchange_until_close(front.proxy, req.into_bytes()).await;
        assert_eq!(status_of(&out), Some(400), "{framing}: {:?}", lossy(&out));
    }
    up.no_more_requests();

    // Both Content-Length and chunked: never read by the length (RFC 9112
    // section 6.3): refused, or the chunked body (empty here) forwarded.
    let req = format!(
        "POST /both HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n0\r\n\r\n"
    );
    let out = exchange_until_close(front.proxy, req.into_bytes()).await;
    match status_of(&out) {
        Some(400) => up.no_more_requests(),
        Some(200) => {
            let seen = up.request().await;
            assert!(seen.body.is_empty(), "read by the length: {seen:?}");
            assert!(
                !(seen.head.has("content-length") && seen.head.has("transfer-encoding")),
                "both framings went upstream: {:?}",
                seen.head
            );
        }
        other => panic!("{other:?}: {:?}", lossy(&out)),
    }
}

// ---------------------------------------------------------------------------
// Bad responses

#[tokio::test]
async fn an_invalid_response_head_is_502_upstream_unavailable() {
    for garbage in [
        &b"garbage\r\n\r\n"[..],
        b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNo colon here\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\nok",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        // Closed without a byte.
        b"",
    ] {
        let up = RawUp::always(garbage, Then::Close).await;
        let front = front(&up).await;
        let mut c = Wire::connect(front.proxy).await;
        c.send(&get(&front, "/x", "")).await;
        let r = c.response().await;
        assert_eq!(r.status(), 502, "{:?}: {}", lossy(garbage), r.text());
        let json: serde_json::Value = serde_json::from_slice(&r.body).expect("a JSON error");
        assert_eq!(
            json["error"],
            "upstream_unavailable",
            "{:?}",
            lossy(garbage)
        );
        assert!(r.head.has("x-request-id"));
        // The client's connection is still good.
        c.send(&get(&front, "/y", "")).await;
        assert_eq!(c.response().await.status(), 502);
    }
}

#[tokio::test]
async fn a_response_cut_short_closes_the_client_connection() {
    let mut up = RawUp::start(|seen| match seen.head.start.split(' ').nth(1) {
        Some("/base/short") => {
            let mut answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".to_vec();
            answer.extend(vec![b's'; 100]);
            (answer, Then::Close)
        }
        Some("/base/short-chunked") => {
            let answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
            (answer.to_vec(), Then::Close)
        }
        _ => (ok("fine"), Then::KeepAlive),
    })
    .await;
    let front = front(&up).await;

    let mut c = Wire::connect(front.proxy).await;
    c.send(&get(&front, "/short", "")).await;
    let head = c.head().await.expect("the head was on its way");
    assert_eq!(head.status(), 200);
    assert_eq!(head.get("content-length"), Some("1000"));
    // Fewer bytes than announced, then the close: the client can tell.
    let rest = c.rest().await;
    assert!(rest.len() < 1000, "{} bytes", rest.len());
    up.request().await;

    let mut c = Wire::connect(front.proxy).await;
    c.send(&get(&front, "/short-chunked", "")).await;
    let head = c.head().await.expect("the head was on its way");
    assert!(head.lists("transfer-encoding", "chunked"), "{head:?}");
    // No last chunk: the client must not take the cut body as complete.
    let rest = c.rest().await;
    assert!(
        !rest.ends_with(b"0\r\n\r\n"),
        "a cut body was terminated as if whole: {:?}",
        lossy(&rest)
    );
    up.request().await;

    let mut c = Wire::connect(front.proxy).await;
    c.send(&get(&front, "/fine", "")).await;
    assert_eq!(c.response().await.text(), "fine");
}

#[tokio::test]
async fn bytes_after_a_complete_response_are_not_taken_for_the_next_one() {
    // The upstream writes more than its Content-Length: the surplus looks
    // like a response, and must never be served as the answer to a later
    // request (a desynchronised connection).
    let mut up = RawUp::start(|seen| {
        if seen.conn == 1 {
            let answer = format!(
                "{}HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled",
                lossy(&ok("first"))
            );
            (answer.into_bytes(), Then::KeepAlive)
        } else {
            (ok("clean"), Then::KeepAlive)
        }
    })
    .await;
    let front = front(&up).await;
    let mut c = Wire::connect(front.proxy).await;
    c.send(&get(&front, "/one", "")).await;
    assert_eq!(c.response().await.text(), "first");
    up.request().await;
    for _ in 0..3 {
        c.send(&get(&front, "/next", "")).await;
        let r = c.response().await;
        assert_ne!(r.text(), "smuggled", "a stray response was served");
        assert_eq!((r.status(), r.text().as_str()), (200, "clean"));
        assert_ne!(up.request().await.conn, 1);
    }
}

// The handover is the point: a chunked upload and an `Expect` go to hyper.
@handed_over
#[tokio::test]
async fn a_connection_handed_to_hyper_mid_way_keeps_the_bytes_already_read() {
    // The fast lane serves plain requests and hands a connection to hyper
    // at the first one it does not take (here a chunked upload), with
    // every byte it has read: pipelined requests after it must survive.
    let up = describing_upstream().await;
    let front = Front::start(&up.url("/base/"), "").await;
    let mut c = Wire::connect(front.proxy).await;
    let mut write = get(&front, "/one", "X-Request-Id: hand-1\r\n");
    write.extend(
        format!(
            "POST /two HTTP/1.1\r\nHost: {}\r\nX-Request-Id: hand-2\r\n\
             Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
            front.proxy
        )
        .as_bytes(),
    );
    write.extend(get(&front, "/three", "X-Request-Id: hand-3\r\n"));
    c.send(&write).await;
    for expected in [
        "GET /base/one 0 id=hand-1",
        "POST /base/two 7 id=hand-2",
        "GET /base/three 0 id=hand-3",
    ] {
        let r = c.response().await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.text(), expected);
    }
    // And a connection whose very first request is not for the lane.
    let mut c = Wire::connect(front.proxy).await;
    let mut write = format!(
        "POST /four HTTP/1.1\r\nHost: {}\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
        front.proxy
    )
    .into_bytes();
    write.extend(get(&front, "/five", "X-Request-Id: hand-5\r\n"));
    c.send(&write).await;
    assert_eq!(
        c.final_response().await.text().split(" id=").next(),
        Some("POST /base/four 2")
    );
    assert_eq!(c.response().await.text(), "GET /base/five 0 id=hand-5");
}
}
