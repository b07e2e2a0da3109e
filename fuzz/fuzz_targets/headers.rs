//! Header rewriting over any header map a client or upstream can send:
//! never a panic, exactly our bearer token goes upstream, no hop-by-hop
//! header or header named in `Connection` survives, and a redirect into the
//! upstream always points back at the sidecar.
#![no_main]

use arbitrary::Arbitrary;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use token_sidecar::proxy::headers::{
    rewrite_locations, rewrite_request, strip_hop_by_hop, Forwarded,
};

#[derive(Arbitrary, Debug)]
struct Input {
    headers: Vec<(Name, Vec<u8>)>,
    upgrade: bool,
    forwarded: bool,
    response_side: bool,
}

/// Mostly names that matter here, sometimes anything.
#[derive(Arbitrary, Debug)]
enum Name {
    Known(u8),
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
    "x-forwarded-for",
    "x-forwarded-host",
    "x-request-id",
];

fn map(input: &Input) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in &input.headers {
        let name = match name {
            Name::Known(i) => HeaderName::from_static(KNOWN[*i as usize % KNOWN.len()]),
            Name::Other(b) => match HeaderName::from_bytes(b) {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        if let Ok(v) = HeaderValue::from_bytes(value) {
            h.append(name, v);
        }
    }
    h
}

/// Names the `Connection` headers list.
fn listed(h: &HeaderMap) -> Vec<HeaderName> {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

const BASE: &str = "https://api.example.test/paymentiq/";
const BASE_PATH: &str = "/paymentiq/";
const PUBLIC: &str = "http://localhost:7080/";

fuzz_target!(|input: Input| {
    let original = map(&input);
    let mut h = original.clone();
    if input.response_side {
        strip_hop_by_hop(&mut h, input.upgrade);
        for name in listed(&original) {
            let kept = input.upgrade && (name == header::UPGRADE || name == header::CONNECTION);
            assert!(
                kept || !h.contains_key(&name),
                "{name} listed in Connection survived"
            );
        }
        let before: Vec<Option<String>> = [header::LOCATION, header::CONTENT_LOCATION]
            .iter()
            .map(|n| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned))
            .collect();
        rewrite_locations(&mut h, BASE, BASE_PATH, PUBLIC);
        for (name, before) in [header::LOCATION, header::CONTENT_LOCATION]
            .iter()
            .zip(before)
        {
            let Some(before) = before else { continue };
            let after = h
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let into_upstream = before.len() >= BASE.len()
                && before.is_char_boundary(BASE.len())
                && before[..BASE.len()].eq_ignore_ascii_case(BASE);
            if into_upstream {
                assert!(after.starts_with(PUBLIC), "{before:?} -> {after:?}");
            }
        }
    } else {
        let bearer = HeaderValue::from_static("Bearer fuzz-token");
        let forwarded = input.forwarded.then_some(Forwarded {
            client_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            authority: Some("localhost:7080"),
        });
        let host = rewrite_request(&mut h, bearer.clone(), input.upgrade, forwarded);
        if let Some(host) = host {
            assert_eq!(
                Some(&host),
                original.get(header::HOST),
                "the client's Host is returned"
            );
        }
        let auth: Vec<_> = h.get_all(header::AUTHORIZATION).iter().collect();
        assert_eq!(auth, [&bearer], "exactly our bearer token goes upstream");
        assert!(!h.contains_key(header::PROXY_AUTHORIZATION));
        assert!(!h.contains_key(header::HOST));
        for name in [
            "proxy-connection",
            "keep-alive",
            "transfer-encoding",
            "proxy-authenticate",
        ] {
            assert!(!h.contains_key(name), "{name} survived");
        }
        if let Some(te) = h.get(header::TE) {
            assert_eq!(te, "trailers");
        }
        if !input.upgrade {
            assert!(!h.contains_key(header::CONNECTION));
            assert!(!h.contains_key(header::UPGRADE));
        }
        let re_added = |n: &HeaderName| {
            n == header::AUTHORIZATION
                || n == header::TE
                || n.as_str().starts_with("x-forwarded-")
                || (input.upgrade && (n == header::CONNECTION || n == header::UPGRADE))
        };
        for name in listed(&original) {
            assert!(
                re_added(&name) || !h.contains_key(&name),
                "{name} listed in Connection survived"
            );
        }
    }
});
