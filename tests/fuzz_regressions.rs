//! Inputs the fuzz targets in `fuzz/` found, kept as plain tests so the bugs
//! they showed stay fixed without a fuzzer. Each names its target and what
//! was wrong.

mod support;
#[path = "support/upstream.rs"]
mod upstream;

use std::time::{Duration, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use upstream::{Front, RawResponse};

use token_sidecar::differential::{Case, Rig};
use token_sidecar::token::client::parse_token_response;

const KNOWN: [&str; 2] = ["s3cr3t-pass", "client-s3cr3t"];

fn token_error_text(status: u16, body: &[u8]) -> String {
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let e = parse_token_response(status, body, Duration::from_secs(300), now, &KNOWN)
        .expect_err("an OAuth error answer");
    format!("{e} {e:?}")
}

/// token_response: the OAuth `error` code went to logs and `/status`
/// unredacted (and, on a 200, unfiltered), so a server echoing a secret
/// there leaked it. Minimised from crash-33c480ce.
#[test]
fn token_response_error_code_is_redacted() {
    let found: &[u8] = br#"{"error":"invas3cr3t-passlid_token","errop_description":"Invalid refresh token: abcdefabcdrroralid_token","error_description":"Invalid refresh toke:a nbcdefabcdefabcdefaefabcdefabcdef"}"#;
    let text = token_error_text(200, found);
    assert!(!text.contains("s3cr3t-pass"), "{text}");
    let text = token_error_text(400, br#"{"error":"client-s3cr3t"}"#);
    assert!(!text.contains("client-s3cr3t"), "{text}");
    // A 200 error code with control characters is not copied into logs.
    let text = token_error_text(200, b"{\"error\":\"bad\\ncode\"}");
    assert!(text.contains("unknown_error"), "{text}");
}

/// token_response: `redact_text` replaced known secrets before dropping
/// control characters, so a secret split by them ("s3" DEL... "cr3t-pass")
/// came out whole. Shortened from crash-b227c300.
#[test]
fn token_response_secret_split_by_control_characters_is_redacted() {
    let mut body =
        br#"{"error":"invalid_token","error_description":"Invalid refresh token: s3"#.to_vec();
    body.extend_from_slice(&[0x7f; 40]);
    body.extend_from_slice(br#"cr3t-pass and client-s3"#);
    body.extend_from_slice(b"\\u0000\\t");
    body.extend_from_slice(br#"cr3t"}"#);
    let text = token_error_text(200, &body);
    assert!(!text.contains("s3cr3t-pass"), "{text}");
    assert!(!text.contains("client-s3cr3t"), "{text}");
}

/// differential: every committed seed of the target goes through both
/// engines alike (the harness is the fuzz target's own, so this also keeps
/// it working between fuzzing runs).
#[tokio::test(start_paused = true)]
async fn differential_seeds_agree_on_both_engines() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/differential");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("the seed folder")
        .map(|e| e.expect("a seed").path())
        .collect();
    names.sort();
    assert!(names.len() >= 10, "seeds in {dir:?}");
    let rig = Rig::start().await;
    let mut failed = Vec::new();
    for path in names {
        let case = Case::parse(&std::fs::read(&path).expect("a readable seed"));
        match rig.check(&case).await {
            Ok(v) => eprintln!("{}: {v:?}", path.display()),
            Err(d) => failed.push(format!("{}: {d}", path.display())),
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// differential: the harness sees what crosses, and a difference in it is
/// reported (so an agreement above is not for want of looking).
#[tokio::test(start_paused = true)]
async fn differential_harness_sees_and_reports_differences() {
    use token_sidecar::differential::{compare, UpRequest, Variant};
    let rig = Rig::start().await;
    let case = Case::parse(
        &Case::one(
            Variant::Plain,
            b"GET /a?b=1 HTTP/1.1\r\nHost: localhost\r\nX-A: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-B: 2\r\nContent-Length: 5\r\n\r\nhello",
        )
        .encode(),
    );
    let (lane, hyper) = rig.run(&case).await;
    for t in [&lane, &hyper] {
        assert_eq!(t.responses.len(), 1, "{t:?}");
        assert_eq!(t.responses[0].status, 200);
        assert_eq!(t.responses[0].body, b"hello");
        let [UpRequest::Read { target, fields, .. }] = &t.upstream[..] else {
            panic!("one request upstream: {t:?}");
        };
        assert_eq!(target, b"/base/a?b=1");
        assert!(fields.iter().any(|(n, v)| n == b"X-A" && v == b"1"));
    }
    assert!(compare(&lane, &hyper).is_ok());
    let mut other = hyper.clone();
    other.responses[0].body = b"hellO".to_vec();
    assert!(compare(&lane, &other).is_err());
    let mut other = hyper.clone();
    other.responses[0]
        .fields
        .push((b"x-b".to_vec(), b"2".to_vec()));
    assert!(
        compare(&lane, &other).is_err(),
        "a field name's case counts"
    );
    let mut other = hyper.clone();
    if let UpRequest::Read { fields, .. } = &mut other.upstream[0] {
        fields.retain(|(n, _)| n != b"X-A");
    }
    assert!(compare(&lane, &other).is_err());
}

// ---------------------------------------------------------------------------
// differential: what the engines did differently, on the wire, on both

/// A raw upstream on loopback: answers each request (a head; these tests
/// send no bodies) with `answer` as it is, then closes. Its base URL.
async fn raw_upstream(answer: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(answer).await;
                let _ = s.shutdown().await;
            });
        }
    });
    format!("http://{addr}/base/")
}

/// A sidecar in front of a raw upstream answering `answer`, and what a
/// client gets for `GET /x` with `Connection: close`.
async fn through(answer: &'static [u8]) -> RawResponse {
    let front = Front::start(&raw_upstream(answer).await, "").await;
    front.get_raw("/x", "").await
}

engines! {
/// differential: an upstream head that cannot be parsed (a NUL in a field
/// name) was answered `502` "the upstream could not be reached" by the
/// hyper engine and "the upstream sent an invalid response" by the lane.
/// The head arrived: it is an invalid response (the policy's
/// `BadResponse`), on both.
#[tokio::test]
async fn an_unparseable_upstream_head_is_an_invalid_response() {
    let r = through(b"HTTP/1.1 200 OK\r\nWW\0Auth: x\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!(r.status, 502, "{r:?}");
    assert!(
        r.body_text().contains("the upstream sent an invalid response"),
        "{}",
        r.body_text()
    );
}
}

engines! {
/// h1: a chunk size written with leading zeros (`0000000000000005`, 16
/// digits) broke the body off on the lane, which allowed 15 digits; hyper
/// read it. RFC 9112 7.1 bounds the size, not its digits (`1*HEXDIG`, with
/// overflow guarded), and nginx and hyper agree: the value counts.
#[tokio::test]
async fn a_chunk_size_with_leading_zeros_is_read_by_its_value() {
    let r = through(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0000000000000005\r\nhello\r\n00000000000000000\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.head.to_ascii_lowercase().contains("transfer-encoding: chunked"));
    assert_eq!(r.body, b"5\r\nhello\r\n0\r\n\r\n", "{}", r.body_text());
}
}

engines! {
/// h1: an HTTP/1.0 upstream answer with `Transfer-Encoding: chunked` was
/// de-chunked and passed on by the lane, refused (502) by hyper's client.
/// RFC 9112 6.1: a recipient of an HTTP/1.0 message with Transfer-Encoding
/// must treat its framing as faulty (it may have crossed an HTTP/1.0 hop
/// that did not decode it); hyper refuses it, so does the policy now.
#[tokio::test]
async fn an_http_1_0_answer_with_a_transfer_coding_is_refused() {
    let r = through(
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 502, "{r:?}");
    assert!(
        r.body_text().contains("the upstream sent an invalid response"),
        "{}",
        r.body_text()
    );
}
}

engines! {
/// h1: a trailer section with a bare LF in it (`\n0` after the last chunk,
/// then a field, then the empty line) broke the body off on the lane, which
/// refused a bare LF there, while hyper read the section to its CRLF CRLF
/// end and parsed it as header fields do (`httparse`: a leading LF is an
/// empty line: no trailer fields). RFC 9112 2.2 lets a recipient take LF
/// as a line end, 7.1.2 ends the section with an empty line: the body is
/// complete, with no trailer. The lane now reads the trailer section as
/// hyper does, with the same parser.
#[tokio::test]
async fn a_bare_lf_in_the_trailer_section_does_not_break_the_body() {
    let r = through(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\n0\r\nX-T: 1\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, b"5\r\nhello\r\n0\r\n\r\n", "{}", r.body_text());
}
}

engines! {
/// differential: an upstream reason phrase that is not UTF-8 (obs-text,
/// which RFC 9112 4 allows) panicked the lane's connection task: httparse
/// gives such a reason as a static empty string, not a slice of the
/// buffer, and the lane took its offset. The client got no answer; hyper's
/// engine passed the 201 on with the status's own reason, as it does for
/// any reason it cannot keep. Both do that now (RFC 9112 4: a client
/// ignores the reason phrase).
#[tokio::test]
async fn a_reason_phrase_that_is_not_utf8_gets_the_canonical_one() {
    let r = through(b"HTTP/1.1 201 Create\x97\x8a\r\nContent-Length: 2\r\n\r\nok").await;
    assert_eq!(r.status, 201, "{r:?}");
    assert!(r.head.starts_with("HTTP/1.1 201 Created\r\n"), "{}", r.head);
    assert_eq!(r.body, b"ok");
}
}

engines! {
/// differential: the HTTP/2 preface after an HTTP/1.1 exchange on the same
/// connection made the lane hand the connection to hyper as h2c, which
/// answered with HTTP/2 frames; hyper's own HTTP/1.1 connection refuses it
/// (a preface is HTTP/2 only as a connection's first bytes, RFC 9113 3.4).
/// Now the lane refuses it as a malformed HTTP/1.1 head (400, then the
/// connection closes); hyper closes without an answer, its own refusal
/// before any service runs (the documented difference).
#[tokio::test]
async fn an_http2_preface_after_a_request_is_no_switch_to_http2() {
    let front = Front::start(&raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await, "").await;
    let mut s = tokio::net::TcpStream::connect(front.proxy).await.expect("connect");
    s.write_all(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n").await.expect("write");
    let first = upstream::read_head(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert_eq!(upstream::read_exact(&mut s, 2).await, b"ok");
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.expect("write");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the sidecar closes the connection")
        .expect("read");
    let text = String::from_utf8_lossy(&rest);
    match support::engine() {
        support::Engine::FastLane => {
            assert!(text.starts_with("HTTP/1.1 400 "), "{text:?}");
            assert!(text.contains("malformed request head"), "{text:?}");
        }
        support::Engine::Hyper => assert!(rest.is_empty(), "{text:?}"),
    }
}
}

engines! {
/// differential: a chunked upstream body that turns malformed within the
/// first read (`3\r\nabc` then no CRLF) got nothing at all from the lane,
/// which dropped what it had decoded with the fault, while hyper passed on
/// the head and the good chunk before closing; had the fault come in a
/// later read, the lane would have passed them on too. What decoded well
/// goes out, however the bytes arrive; then the connection closes.
#[tokio::test]
async fn a_chunked_body_that_breaks_passes_on_what_came_before() {
    let r = through(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX").await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body, b"3\r\nabc\r\n", "{}", r.body_text());
}
}

engines! {
/// differential: when the request body came in a later read than its head
/// and the upstream's answer then failed (here a malformed head: 502), the
/// lane closed the client connection as if the body were still unread;
/// hyper, which had read it to its end, kept the connection. A body read
/// to its end leaves nothing on the connection but the next request: the
/// lane keeps it too now.
#[tokio::test]
async fn a_failed_exchange_after_a_whole_body_keeps_the_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/base/", listener.local_addr().expect("addr"));
    let (heads_tx, mut heads) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let heads_tx = heads_tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let _ = heads_tx.send(());
                if head.contains("content-length: 2") {
                    while buf.len() < end + 2 {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nBad\0Name: x\r\n\r\n").await;
                let _ = s.shutdown().await;
            });
        }
    });
    let front = Front::start(&url, "").await;
    let mut c = tokio::net::TcpStream::connect(front.proxy).await.expect("connect");
    c.write_all(b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n").await.expect("write");
    tokio::time::timeout(Duration::from_secs(10), heads.recv())
        .await
        .expect("the head reaches the upstream");
    c.write_all(b"hi").await.expect("write");
    let first = upstream::read_head(&mut c).await;
    assert!(first.starts_with("HTTP/1.1 502 "), "{first}");
    assert!(!first.to_ascii_lowercase().contains("connection: close"), "{first}");
    let n: usize = first
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap()))
        .expect("a length");
    upstream::read_exact(&mut c, n).await;
    c.write_all(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n").await.expect("write");
    let second = upstream::read_head(&mut c).await;
    assert!(second.starts_with("HTTP/1.1 502 "), "the connection serves the next request: {second}");
}
}

/// An answer with a chunked body `hello` and `n` trailer field lines.
fn with_trailer_lines(n: usize) -> &'static [u8] {
    let mut answer =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n".to_vec();
    for i in 0..n {
        answer.extend_from_slice(format!("X-T{i}: 1\r\n").as_bytes());
    }
    answer.extend_from_slice(b"\r\n");
    answer.leak()
}

engines! {
/// h1: a trailer section of more than 100 field lines ended the body
/// normally on the lane, while hyper refuses it (at most as many trailer
/// fields as head fields, 100). The lane now keeps the same bound; the good
/// chunk still goes out before the connection closes.
#[tokio::test]
async fn more_than_100_trailer_fields_break_the_body() {
    let r = through(with_trailer_lines(101)).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, b"5\r\nhello\r\n", "{}", r.body_text());
    let r = through(with_trailer_lines(100)).await;
    assert_eq!(r.body, b"5\r\nhello\r\n0\r\n\r\n", "{}", r.body_text());
}
}
