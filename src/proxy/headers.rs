//! Header rewriting in both directions (RFC 9110 7.6.1): hop-by-hop headers in
//! one static list plus whatever `Connection` names; the client's credentials
//! replaced, never appended; redirects into the upstream pointed back at us.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers, removed in both directions. `Trailer` is not one
/// (it describes the message); `TE` is handled on its own.
pub static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
];

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes hop-by-hop headers and the names `Connection` lists. When
/// `keep_upgrade` is set (an upgrade being passed through), `Connection:
/// upgrade` and `Upgrade` stay.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Which hop-by-hop names are present, in one pass over the names: most
    // messages carry none, or only `Connection: keep-alive`, and a hashed
    // removal per name cost more than the rest of the rewriting (callgrind).
    let mut present = [false; HOP_BY_HOP.len()];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    if present[0] {
        debug_assert_eq!(HOP_BY_HOP[0], header::CONNECTION);
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // Those in HOP_BY_HOP go below; of the others only those present
            // become names, so `close` and `keep-alive` allocate nothing.
            .filter(|t| {
                !HOP_BY_HOP
                    .iter()
                    .any(|h| h.as_str().eq_ignore_ascii_case(t))
            })
            .filter(|t| headers.contains_key(*t))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(&name);
        }
    }
    for (name, present) in HOP_BY_HOP.iter().zip(present) {
        let kept = keep_upgrade && (name == header::CONNECTION || name == header::UPGRADE);
        if present && !kept {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether the client asked for trailers (`TE: trailers`), the one `TE`
/// value forwarded upstream.
pub fn wants_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
}

/// Whether this is an HTTP/1.1 upgrade request to pass through
/// (`Connection: upgrade` and an `Upgrade` header).
///
/// Not `h2c`: after that upgrade the connection would carry HTTP/2 requests
/// the proxy never sees, so none of them would get the token. Such a request
/// (Java's HttpClient sends one for every `http://` URL) is forwarded as plain
/// HTTP/1.1 with `Upgrade` stripped, and the client carries on in HTTP/1.1.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    let Some(protocols) = headers.get(header::UPGRADE) else {
        return false;
    };
    let h2c = protocols.to_str().map_or(true, |p| {
        p.split(',')
            .any(|t| t.trim().to_ascii_lowercase().starts_with("h2c"))
    });
    !h2c && headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// What `X-Forwarded-*` says about the client (`proxy.forwarded_headers`).
pub struct Forwarded<'a> {
    pub client_ip: std::net::IpAddr,
    /// HTTP/2's `:authority`, for `X-Forwarded-Host` when there is no `Host`.
    pub authority: Option<&'a str>,
}

/// Rewrites the client's request headers for the upstream, in place, and
/// returns the client's `Host` (removed: the upstream gets its own).
pub fn rewrite_request(
    headers: &mut HeaderMap,
    bearer: HeaderValue,
    upgrade: bool,
    forwarded: Option<Forwarded<'_>>,
) -> Option<HeaderValue> {
    let trailers = wants_trailers(headers);
    strip_hop_by_hop(headers, upgrade);
    headers.remove(header::PROXY_AUTHORIZATION);
    // insert replaces every Authorization the client sent, however many.
    headers.insert(header::AUTHORIZATION, bearer);
    // Host is the upstream's; the client adds it from the URI.
    let client_host = headers.remove(header::HOST);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(f) = forwarded {
        let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {}", f.client_ip),
            None => f.client_ip.to_string(),
        };
        if let Ok(v) = HeaderValue::try_from(xff) {
            headers.insert(&X_FORWARDED_FOR, v);
        }
        // The sidecar serves plain HTTP only.
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        let host = client_host
            .clone()
            .or_else(|| f.authority.and_then(|a| HeaderValue::from_str(a).ok()));
        if let Some(h) = host {
            headers.insert(&X_FORWARDED_HOST, h);
        }
    }
    client_host
}

/// `proxy_redirect default`: a `Location` or `Content-Location` pointing into
/// the upstream base URL is pointed at the sidecar (`public_base`, e.g.
/// `http://localhost:7080/`) instead, so the app does not follow a redirect
/// around the sidecar, where it would arrive without a token.
pub fn rewrite_locations(
    headers: &mut HeaderMap,
    upstream_base: &str,
    upstream_base_path: &str,
    public_base: &str,
) {
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(value) = headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        let Some(rewritten) =
            rewrite_location(value, upstream_base, upstream_base_path, public_base)
        else {
            continue;
        };
        if let Ok(v) = HeaderValue::try_from(rewritten) {
            headers.insert(name, v);
        }
    }
}

/// One `Location` value pointed at `public_base` if it points into the
/// upstream base URL (absolute, or an absolute path under its base path).
pub fn rewrite_location(
    value: &str,
    upstream_base: &str,
    upstream_base_path: &str,
    public_base: &str,
) -> Option<String> {
    let rest = if let Some(rest) = strip_prefix_ignore_case(value, upstream_base) {
        rest
    } else {
        value
            .strip_prefix(upstream_base_path)
            .filter(|_| value.starts_with('/') && !value.starts_with("//"))?
    };
    Some(format!("{public_base}{rest}"))
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    (s.len() >= prefix.len()
        && s.is_char_boundary(prefix.len())
        && s[..prefix.len()].eq_ignore_ascii_case(prefix))
    .then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn strips_hop_by_hop_and_connection_listed() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "gzip"),
            ("trailer", "x-checksum"),
            ("proxy-connection", "keep-alive"),
            ("x-app", "kept"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["trailer", "x-app"]);
    }

    #[test]
    fn upgrades_except_h2c() {
        let ws = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert!(is_upgrade(&ws));
        let h2c = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
        ]);
        assert!(!is_upgrade(&h2c));
        let no_connection = map(&[("upgrade", "websocket")]);
        assert!(!is_upgrade(&no_connection));
    }

    #[test]
    fn strips_listed_names_in_any_case_and_keeps_upgrade_when_asked() {
        let mut h = map(&[
            ("connection", "Keep-Alive, close"),
            ("connection", "X-Listed"),
            ("x-listed", "1"),
            ("keep-alive", "timeout=5"),
            ("x-app", "kept"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-app"]);

        let mut h = map(&[
            ("connection", "upgrade, x-listed"),
            ("upgrade", "websocket"),
            ("x-listed", "1"),
            ("te", "trailers"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("connection").unwrap(), "upgrade");
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.len(), 2, "{h:?}");

        let mut h = map(&[("x-app", "kept")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn replaces_every_authorization() {
        let mut h = map(&[
            ("authorization", "Basic a"),
            ("authorization", "Bearer b"),
            ("host", "localhost:7080"),
            ("te", "trailers, gzip"),
        ]);
        let host = rewrite_request(&mut h, HeaderValue::from_static("Bearer new"), false, None);
        assert_eq!(host.unwrap(), "localhost:7080");
        let auth: Vec<_> = h.get_all("authorization").iter().collect();
        assert_eq!(auth, [HeaderValue::from_static("Bearer new")]);
        assert!(h.get("host").is_none());
        assert_eq!(h.get("te").unwrap(), "trailers");
    }

    #[test]
    fn forwarded_headers() {
        let mut h = map(&[("host", "localhost:7080"), ("x-forwarded-for", "10.0.0.1")]);
        let client = Forwarded {
            client_ip: [127, 0, 0, 1].into(),
            authority: None,
        };
        rewrite_request(
            &mut h,
            HeaderValue::from_static("Bearer t"),
            false,
            Some(client),
        );
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, 127.0.0.1");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "localhost:7080");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");

        // HTTP/2: no Host, the authority instead.
        let mut h = map(&[]);
        let client = Forwarded {
            client_ip: [127, 0, 0, 1].into(),
            authority: Some("localhost:7080"),
        };
        rewrite_request(
            &mut h,
            HeaderValue::from_static("Bearer t"),
            false,
            Some(client),
        );
        assert_eq!(h.get("x-forwarded-host").unwrap(), "localhost:7080");
        assert_eq!(h.get("x-forwarded-for").unwrap(), "127.0.0.1");
    }

    #[test]
    fn rewrites_locations_into_the_upstream() {
        let mut h = map(&[
            (
                "location",
                "https://API.example.test/paymentiq/backoffice/x?y=1",
            ),
            ("content-location", "/paymentiq/a"),
        ]);
        rewrite_locations(
            &mut h,
            "https://api.example.test/paymentiq/",
            "/paymentiq/",
            "http://localhost:7080/",
        );
        assert_eq!(
            h.get("location").unwrap(),
            "http://localhost:7080/backoffice/x?y=1"
        );
        assert_eq!(
            h.get("content-location").unwrap(),
            "http://localhost:7080/a"
        );
        let mut h = map(&[("location", "https://elsewhere.test/paymentiq/x")]);
        rewrite_locations(
            &mut h,
            "https://api.example.test/paymentiq/",
            "/paymentiq/",
            "http://localhost:7080/",
        );
        assert_eq!(
            h.get("location").unwrap(),
            "https://elsewhere.test/paymentiq/x"
        );
    }
}
