//! The fast lane's HTTP/1.1 codec (`token_sidecar::proxy::h1`) over any
//! bytes, fed in arbitrary splits: never a panic; a head parses the same
//! whatever prefix of it came first; the chunked decoder decodes the same
//! payload and trailers however its input is split, and what it writes
//! decodes again to that payload; and an upstream response is read as
//! hyper's HTTP/1.1 client reads it (the same head accepted, the same
//! status, the same decoded body, or an error on both), where the policy
//! lets it through.
//!
//! Input: a mode byte (even: a request head; odd: an upstream response),
//! a seed for the split points, then the bytes.
#![no_main]

#[path = "../common/policy.rs"]
mod common;


use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use token_sidecar::proxy::fields::{ContentLength, ResponseFacts, Upgrade};
use token_sidecar::proxy::h1::{self, Chunked, Framing, Parse, RequestHead};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Piece lengths from a seed: 1 to 16 bytes, sometimes long runs.
struct Cuts(u32);

impl Iterator for Cuts {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        self.0 = self.0.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let r = (self.0 >> 16) as usize;
        Some(if r % 8 == 0 { 64 + r % 512 } else { 1 + r % 16 })
    }
}

fn request(data: &[u8], seed: u32) {
    let mut whole = RequestHead::default();
    let parsed = h1::parse_request(data, &mut whole);
    if parsed == Parse::Ready {
        assert!(whole.len <= data.len());
        let path = whole.path.get(data);
        assert!(!path.contains(&b'#') && !path.contains(&b'?'));
        if whole.form == h1::Form::Origin {
            assert_eq!(path.first(), Some(&b'/'));
        }
        for (n, v) in h1::slices(data, &whole.fields) {
            assert!(!n.is_empty());
            let _ = (n, v);
        }
    }
    // Every prefix reads as "more", or as the same decision.
    let mut at = 0;
    let mut head = RequestHead::default();
    for n in Cuts(seed) {
        at = (at + n).min(data.len());
        let p = h1::parse_request(&data[..at], &mut head);
        match (&parsed, &p) {
            (Parse::Ready, Parse::Ready) => {
                assert_eq!((head.len, head.minor), (whole.len, whole.minor));
                assert_eq!(head.fields, whole.fields);
                assert_eq!(head.path, whole.path);
            }
            (_, Parse::Partial) => {}
            (a, b) => assert_eq!(a, b, "a prefix of {at} bytes"),
        }
        if at == data.len() {
            break;
        }
    }
}

/// The re-framed chunked body decoded by a strict reader: payload and
/// trailer lines.
fn decode_reframed(out: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut c = Chunked::default();
    let mut again = Vec::new();
    let (used, done) = c
        .feed(out, &mut again, &|_: &[u8]| true)
        .expect("what the decoder wrote is valid chunked framing");
    assert!(
        done && used == out.len(),
        "the re-framed body ends where it should"
    );
    assert_eq!(again, out, "re-framing a canonical body changes nothing");
    let mut payload = Vec::new();
    let mut rest = out;
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a size line");
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap(), 16)
            .expect("a plain hex size");
        rest = &rest[eol + 2..];
        if size == 0 {
            return (payload, rest.to_vec());
        }
        payload.extend_from_slice(&rest[..size]);
        assert_eq!(&rest[size..size + 2], b"\r\n");
        rest = &rest[size + 2..];
    }
}

#[derive(Debug, PartialEq)]
enum Chunks {
    /// Payload, re-framed trailer section, bytes of input used.
    Done(Vec<u8>, Vec<u8>, usize),
    /// The input ended first.
    Short(Vec<u8>),
    Bad,
}

fn chunks(body: &[u8], cuts: Option<u32>, keep: &dyn Fn(&[u8]) -> bool) -> Chunks {
    let mut c = Chunked::default();
    let mut out = Vec::new();
    let mut at = 0;
    let mut sizes = cuts.map(Cuts);
    loop {
        let n = match sizes.as_mut() {
            Some(s) => s.next().unwrap_or(1).min(body.len() - at),
            None => body.len() - at,
        };
        let piece = &body[at..at + n];
        match c.feed(piece, &mut out, keep) {
            Err(_) => return Chunks::Bad,
            Ok((used, true)) => {
                assert!(used <= n);
                let (payload, trailers) = decode_reframed(&out);
                assert_eq!(payload.len() as u64, c.payload());
                return Chunks::Done(payload, trailers, at + used);
            }
            Ok((used, false)) => {
                assert_eq!(used, n, "an unfinished body uses all it is given");
                at += n;
            }
        }
        if at == body.len() {
            // What a short body decoded to so far: the data chunks written.
            let mut payload = Vec::new();
            let mut rest = &out[..];
            while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
                let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap(), 16)
                    .expect("a plain hex size");
                if size == 0 || rest.len() < eol + 2 + size + 2 {
                    break;
                }
                payload.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
                rest = &rest[eol + 2 + size + 2..];
            }
            assert_eq!(payload.len() as u64, c.payload());
            return Chunks::Short(payload);
        }
    }
}

/// What the lane makes of an upstream response to a GET.
#[derive(Debug)]
enum Lane {
    /// Not a response head (502).
    Malformed,
    /// The head never ended.
    Short,
    /// A head the policy refuses (502).
    Refused,
    /// Status and body: `None` when the body broke off or is malformed.
    Passed(u16, Option<Vec<u8>>),
}

fn lane(data: &[u8], seed: u32) -> Lane {
    let mut fields = Vec::new();
    let mut rest = data;
    let head = loop {
        match h1::parse_response(rest, &mut fields) {
            Err(_) => return Lane::Malformed,
            Ok(None) => return Lane::Short,
            Ok(Some(h)) if (100..200).contains(&h.status) && h.status != 101 => {
                rest = &rest[h.len..];
            }
            Ok(Some(h)) => break h,
        }
    };
    let facts = ResponseFacts::of(h1::slices(rest, &fields));
    if common::policy(false)
        .check_response(
            if head.minor == 0 {
                http::Version::HTTP_10
            } else {
                http::Version::HTTP_11
            },
            head.status,
            &facts,
            Upgrade::None,
        )
        .is_err()
    {
        return Lane::Refused;
    }
    let length = match facts.content_length {
        ContentLength::Valid(n) => Some(n),
        _ => None,
    };
    let body = &rest[head.len..];
    let framing = Framing::of_response(head.status, false, length, facts.transfer_coding);
    let keep = |_: &[u8]| false;
    let out = match framing {
        Framing::Empty => Some(Vec::new()),
        Framing::UntilClose => Some(body.to_vec()),
        Framing::Length(n) => (body.len() as u64 >= n).then(|| body[..n as usize].to_vec()),
        Framing::Chunked => {
            let whole = chunks(body, None, &keep);
            let split = chunks(body, Some(seed), &keep);
            assert_eq!(
                whole, split,
                "chunked decoding depends on how the bytes arrive"
            );
            let keep_all = |_: &[u8]| true;
            match (chunks(body, None, &keep_all), &whole) {
                (Chunks::Done(p, _, n), Chunks::Done(q, _, m)) => {
                    assert_eq!((&p, n), (q, *m), "trailers change the payload");
                }
                (a, b) => assert_eq!(
                    std::mem::discriminant(&a),
                    std::mem::discriminant(b),
                    "keeping trailers changes the outcome"
                ),
            }
            match whole {
                Chunks::Done(p, _, _) => Some(p),
                _ => None,
            }
        }
    };
    Lane::Passed(head.status, out)
}

/// What hyper's HTTP/1.1 client makes of the same answer to a GET.
#[derive(Debug)]
enum Hyper {
    Head,
    Passed(u16, Option<Vec<u8>>),
}

fn hyper(data: &[u8]) -> Hyper {
    let rt = common::runtime();
    let data = Bytes::copy_from_slice(data);
    rt.block_on(async move {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let upstream = tokio::spawn(async move {
            let mut req = [0u8; 1024];
            let _ = server.read(&mut req).await;
            let _ = server.write_all(&data).await;
            let _ = server.shutdown().await;
            // Held open until the client is done, as a socket would be.
            let _ = server.read(&mut req).await;
        });
        let Ok((mut tx, conn)) = hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Empty<Bytes>,
        >(TokioIo::new(client))
        .await
        else {
            return Hyper::Head;
        };
        let conn = tokio::spawn(conn);
        let req = http::Request::get("/")
            .header("host", "up")
            .body(Default::default())
            .unwrap();
        let out = match tx.send_request(req).await {
            Err(_) => Hyper::Head,
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .ok()
                    .map(|b| b.to_bytes().to_vec());
                Hyper::Passed(status, body)
            }
        };
        drop(tx);
        conn.abort();
        upstream.abort();
        out
    })
}

fn response(data: &[u8], seed: u32) {
    let l = lane(data, seed);
    let h = hyper(data);
    match (&l, &h) {
        // Where the policy refuses a head, hyper's reading of it is moot.
        (Lane::Refused, _) => {}
        (Lane::Malformed | Lane::Short, Hyper::Head) => {}
        (Lane::Passed(a, x), Hyper::Passed(b, y)) => {
            assert_eq!(a, b, "status");
            assert_eq!(x, y, "decoded body (None: broken)");
        }
        _ => panic!("the lane and hyper read this answer differently:\nlane: {l:?}\nhyper: {h:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let [mode, s0, s1, rest @ ..] = data else {
        return;
    };
    let seed = u32::from_le_bytes([*s0, *s1, 0, 0]);
    if mode % 2 == 0 {
        request(rest, seed);
    } else {
        response(rest, seed);
    }
});
