//! The policy's header rules over any fields a client or upstream can send
//! (`token_sidecar::proxy::policy`, read through `proxy::fields`, as both
//! engines call them): never a panic; exactly our bearer token goes
//! upstream, with one request id; no hop-by-hop field and no field named in
//! `Connection` crosses either way, but what the sidecar writes itself; no
//! client `Host` or `Proxy-Authorization`; `TE` only as `trailers`; a
//! `Content-Length` never beside a transfer coding in a response; a
//! redirect into the upstream base URL points back at the sidecar.
#![no_main]

#[path = "../common/policy.rs"]
mod common;

use arbitrary::Arbitrary;
use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use token_sidecar::proxy::fields::{self, RequestFacts, ResponseFacts, TransferCoding, Upgrade};
use token_sidecar::proxy::policy::{FieldSink, Policy};

#[derive(Arbitrary, Debug)]
struct Input {
    fields: Vec<(Name, Vec<u8>)>,
    forwarded: bool,
    response_side: bool,
    switching: bool,
}

/// Mostly names that matter here, in any case; sometimes anything.
#[derive(Arbitrary, Debug)]
enum Name {
    Known(u8, bool),
    Other(Vec<u8>),
}

const KNOWN: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
    "authorization",
    "host",
    "trailer",
    "location",
    "content-location",
    "content-length",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-request-id",
];

const PUBLIC: &str = "http://localhost:7080/";
const BEARER: &str = "Bearer fuzz-token";

/// The fields an engine writes: name and value, in order.
#[derive(Default)]
struct Written(Vec<(String, Vec<u8>)>);

impl FieldSink for Written {
    fn field(&mut self, name: &'static str, parts: &[&[u8]]) {
        self.0.push((name.to_owned(), parts.concat()));
    }
}

fn fields(input: &Input) -> Vec<(Vec<u8>, Vec<u8>)> {
    input
        .fields
        .iter()
        .map(|(name, value)| {
            let name = match name {
                Name::Known(i, upper) => {
                    let n = KNOWN[*i as usize % KNOWN.len()];
                    if *upper {
                        n.to_ascii_uppercase().into_bytes()
                    } else {
                        n.as_bytes().to_vec()
                    }
                }
                Name::Other(b) => b.clone(),
            };
            (name, value.clone())
        })
        .collect()
}

fn is(name: &[u8], n: &str) -> bool {
    name.eq_ignore_ascii_case(n.as_bytes())
}

fn request_side(policy: &Policy, all: &[(Vec<u8>, Vec<u8>)]) {
    let facts = RequestFacts::of(all.iter().map(|(n, v)| (&n[..], &v[..])));
    let crossed: Vec<&[u8]> = all
        .iter()
        .filter(|(n, _)| policy.forwards_request_field(n, &facts))
        .map(|(n, _)| &n[..])
        .collect();
    let mut own = Written::default();
    let id = HeaderValue::from_static("fuzz-id");
    let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 1234));
    policy.write_request_fields(&mut own, &facts, &id, peer, Some(b"localhost:7080"));
    policy.write_bearer(&mut own, &HeaderValue::from_static(BEARER));
    let upgrade = facts.upgrade() == Upgrade::Requested;
    for name in &crossed {
        for n in [
            "authorization",
            "proxy-authorization",
            "host",
            "x-request-id",
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "transfer-encoding",
            "proxy-authenticate",
        ] {
            assert!(!is(name, n), "the client's {n} crossed");
        }
        if is(name, "upgrade") {
            assert!(upgrade, "Upgrade crossed without an upgrade");
        }
        let listed = facts.connection.names(name);
        assert!(
            !listed || is(name, "content-length") || (upgrade && is(name, "upgrade")),
            "{:?} is named in Connection and crossed",
            String::from_utf8_lossy(name)
        );
    }
    let count = |n: &str| own.0.iter().filter(|(k, _)| k == n).count();
    assert_eq!(count("authorization"), 1);
    assert_eq!(count("x-request-id"), 1);
    let auth = own.0.iter().find(|(k, _)| k == "authorization");
    assert_eq!(auth.map(|(_, v)| &v[..]), Some(BEARER.as_bytes()));
    for (k, v) in &own.0 {
        match k.as_str() {
            "te" => assert_eq!(v, b"trailers"),
            "connection" => assert!(upgrade && v == b"upgrade"),
            "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host" => {
                assert!(policy.route.forwarded_headers)
            }
            "authorization" | "x-request-id" => {}
            other => panic!("the sidecar wrote {other}"),
        }
        if k == "x-forwarded-for" {
            assert!(
                v.ends_with(b"127.0.0.1"),
                "{:?}",
                String::from_utf8_lossy(v)
            );
        }
    }
}

fn response_side(policy: &Policy, all: &[(Vec<u8>, Vec<u8>)], switching: bool) {
    let facts = ResponseFacts::of(all.iter().map(|(n, v)| (&n[..], &v[..])));
    let chunked = facts.transfer_coding != TransferCoding::Absent;
    let public = policy.public_base(Some(b"localhost:7080"));
    assert_eq!(public, PUBLIC);
    for (name, value) in all {
        if !policy.forwards_response_field(name, &facts, switching) {
            continue;
        }
        for n in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "transfer-encoding",
            "proxy-authenticate",
            "x-request-id",
        ] {
            assert!(!is(name, n), "the upstream's {n} crossed");
        }
        assert!(
            !is(name, "upgrade") || switching,
            "Upgrade crossed without a switch"
        );
        assert!(
            !(chunked && is(name, "content-length")),
            "Content-Length crossed beside a transfer coding"
        );
        assert!(
            !fields::is_hop_by_hop(name) || (switching && is(name, "upgrade")),
            "a hop-by-hop field crossed"
        );
        let listed = facts.connection.names(name);
        assert!(
            !listed || is(name, "content-length"),
            "{:?} is named in Connection and crossed",
            String::from_utf8_lossy(name)
        );
        if Policy::is_location(name) {
            let into_upstream = value.len() >= common::BASE.len()
                && value[..common::BASE.len()].eq_ignore_ascii_case(common::BASE.as_bytes());
            let rewritten = policy.rewrite_location(value, &public);
            if into_upstream {
                let r = rewritten
                    .clone()
                    .expect("a redirect into the upstream is rewritten");
                assert!(r.starts_with(PUBLIC.as_bytes()));
                assert_eq!(&r[PUBLIC.len()..], &value[common::BASE.len()..]);
            }
            if value.starts_with(common::BASE_PATH.as_bytes()) && !value.starts_with(b"//") {
                assert!(rewritten.is_some_and(|r| r.starts_with(PUBLIC.as_bytes())));
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let policy = common::policy(input.forwarded);
    let all = fields(&input);
    if input.response_side {
        response_side(policy, &all, input.switching);
    } else {
        request_side(policy, &all);
    }
});
