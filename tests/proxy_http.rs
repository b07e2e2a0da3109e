//! The proxy as an HTTP intermediary: which headers cross it in each
//! direction, how request targets map onto the upstream, redirects, methods,
//! and the access log. Requests that ordinary clients would normalise are
//! written byte for byte on a raw socket.

#[path = "support/logs.rs"]
mod logs;
mod support;
#[path = "support/upstream.rs"]
mod upstream;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Response;
use http_body_util::BodyExt;
use logs::LogBuffer;
use upstream::{response, Front, TestBody, Upstream};

/// An upstream that answers 200 `ok`, and a sidecar in front of its `/base/`.
async fn ok_pair(overrides: &str) -> (Upstream, Front) {
    let up = Upstream::ok().await;
    let front = Front::start(&up.url("/base/"), overrides).await;
    (up, front)
}

engines! {
#[tokio::test]
async fn hop_by_hop_and_connection_listed_headers_are_removed_both_ways() {
    let up = Upstream::start(|_| async {
        response(
            200,
            &[
                ("connection", "x-hop-resp"),
                ("x-hop-resp", "1"),
                ("keep-alive", "timeout=5"),
                ("proxy-authenticate", "Basic realm=x"),
                ("upgrade", "foo"),
                ("x-kept-resp", "1"),
            ],
            TestBody::text("ok"),
        )
    })
    .await;
    let front = Front::start(&up.url("/base/"), "").await;
    let resp = front
        .get_raw(
            "/x",
            "Connection: X-Hop-Req\r\nConnection: x-hop-two\r\nX-Hop-Req: 1\r\nX-Hop-Two: 2\r\n\
             Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: gzip\r\nUpgrade: foo\r\n\
             Proxy-Authorization: Basic cHJveHk6cHc=\r\nTrailer: x-sum\r\nX-Kept-Req: 1\r\n",
        )
        .await;
    assert_eq!(resp.status, 200, "{}", resp.head);

    let seen = up.only();
    for gone in [
        "x-hop-req",
        "x-hop-two",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "proxy-authorization",
    ] {
        assert!(
            !seen.headers.contains_key(gone),
            "{gone} reached the upstream"
        );
    }
    // The upstream connection is hyper's: keep-alive, no `Connection` from the client.
    assert!(seen.headers.get_all("connection").iter().all(|v| !v
        .to_str()
        .unwrap()
        .to_ascii_lowercase()
        .contains("hop")));
    assert_eq!(seen.headers["x-kept-req"], "1");
    assert_eq!(
        seen.headers["trailer"], "x-sum",
        "Trailer is not hop-by-hop"
    );

    for gone in ["x-hop-resp", "keep-alive", "proxy-authenticate", "upgrade"] {
        assert!(!resp.has_header(gone), "{gone} reached the client");
    }
    assert_eq!(resp.header("x-kept-resp"), Some("1"));
    assert_ne!(resp.header("connection"), Some("x-hop-resp"));
}

#[tokio::test]
async fn an_h2c_upgrade_is_declined_and_the_request_served_in_http1() {
    let (up, front) = ok_pair("").await;
    let resp = front
        .get_raw(
            "/x",
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n",
        )
        .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body_text(), "ok");
    let seen = up.only();
    for gone in ["upgrade", "http2-settings"] {
        assert!(
            !seen.headers.contains_key(gone),
            "{gone} reached the upstream"
        );
    }
    assert!(seen.headers.get_all("connection").iter().all(|v| !v
        .to_str()
        .unwrap()
        .to_ascii_lowercase()
        .contains("upgrade")));
    assert_eq!(seen.headers["authorization"], front.bearer());
}

#[tokio::test]
async fn te_trailers_goes_upstream_only_when_the_client_sent_it() {
    let (up, front) = ok_pair("").await;
    front.get_raw("/with", "TE: gzip, trailers\r\n").await;
    front.get_raw("/without", "TE: gzip\r\n").await;
    front.get_raw("/none", "").await;
    let seen = up.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].headers["te"], "trailers");
    assert!(!seen[1].headers.contains_key("te"));
    assert!(!seen[2].headers.contains_key("te"));
}

#[tokio::test]
async fn authorization_is_replaced_when_the_client_sent_one_or_two() {
    let (up, front) = ok_pair("").await;
    front
        .get_raw("/one", "Authorization: Basic dXNlcjpwdw==\r\n")
        .await;
    front
        .get_raw(
            "/two",
            "Authorization: Basic dXNlcjpwdw==\r\nAuthorization: Bearer client-made\r\n",
        )
        .await;
    front.get_raw("/none", "").await;
    let bearer = front.bearer();
    assert!(bearer.starts_with("Bearer fake-access-"), "{bearer}");
    let seen = up.seen();
    assert_eq!(seen.len(), 3);
    for s in seen {
        let auth: Vec<_> = s.headers.get_all("authorization").iter().collect();
        assert_eq!(auth, [bearer.as_str()], "{}", s.target);
    }
}

#[tokio::test]
async fn host_is_the_upstreams() {
    let (up, front) = ok_pair("").await;
    front.get_raw("/x", "").await;
    assert_eq!(up.only().headers["host"], up.addr.to_string());
}

#[tokio::test]
async fn request_id_is_kept_or_generated_and_sent_both_ways() {
    let (up, front) = ok_pair(r#"proxy.allow_paths = ["/api/"]"#).await;
    let kept = front
        .get_raw("/api/kept", "X-Request-Id: abc-123\r\n")
        .await;
    let made = front.get_raw("/api/made", "").await;
    let refused = front.get_raw("/other", "").await;

    assert_eq!(kept.header("x-request-id"), Some("abc-123"));
    let seen = up.seen();
    assert_eq!(seen[0].headers["x-request-id"], "abc-123");

    let id = made.header("x-request-id").expect("a generated id");
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
    assert_eq!(seen[1].headers["x-request-id"], id);

    // The sidecar's own answers carry one too.
    assert_eq!(refused.status, 403);
    assert!(refused.has_header("x-request-id"));
}

// One request comes over h2c, which only hyper serves.
@handed_over
#[tokio::test]
async fn forwarded_headers_are_added_only_when_enabled() {
    let (up, front) = ok_pair("").await;
    front.get_raw("/x", "").await;
    let seen = up.only();
    for h in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"] {
        assert!(!seen.headers.contains_key(h), "{h} added by default");
    }

    let (up, front) = ok_pair("proxy.forwarded_headers = true").await;
    front.get_raw("/x", "X-Forwarded-For: 10.1.2.3\r\n").await;
    let seen = up.only();
    assert_eq!(seen.headers["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], front.proxy.to_string());

    // HTTP/2 has no Host; its :authority names the sidecar.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap();
    h2.get(front.url("/h2")).send().await.unwrap();
    let seen = up.seen().pop().unwrap();
    assert_eq!(seen.headers["x-forwarded-host"], front.proxy.to_string());
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
}

#[tokio::test]
async fn raw_path_and_query_are_forwarded_byte_for_byte() {
    let (up, front) = ok_pair("").await;
    let targets = [
        "/a%2Fb/c",
        "/a%2fb%5Cc",
        "/c+d?x=a+b&y=%2B&z=+",
        "/%20e?q=%20&r=%E2%82%AC&s=%2F",
        "/%E2%82%AC/%C3%A9t%C3%A9?name=%C3%A9",
        // Raw UTF-8, as some clients send it.
        "/caf\u{e9}/\u{20ac}?q=\u{e9}t\u{e9}",
        "/x//y",
        "/semi;jsessionid=1/x;v=2",
        "/q?a=b/c?d&e=f%26g#",
        "/x?",
        "/UPPER/MiXeD%7e~",
        "/",
    ];
    for t in targets {
        let resp = front.get_raw(t, "").await;
        assert_eq!(resp.status, 200, "{t}: {}", resp.head);
    }
    let seen: Vec<String> = up.seen().into_iter().map(|s| s.target).collect();
    let expected: Vec<String> = targets
        .iter()
        // A fragment is not part of a request target; hyper drops `#`.
        .map(|t| format!("/base{}", t.trim_end_matches('#')))
        .collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn the_path_is_joined_to_the_base_with_exactly_one_slash() {
    let (up, front) = ok_pair("").await;
    front.get_raw("//double/lead", "").await;
    front.get_raw("/single", "").await;
    let seen: Vec<String> = up.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(seen, ["/base/double/lead", "/base/single"]);
}

#[tokio::test]
async fn dot_segments_are_refused_in_every_spelling() {
    let (up, front) = ok_pair("").await;
    for t in [
        "/a/../b",
        "/a/./b",
        "/..",
        "/.",
        "/a/..",
        "/a/%2e%2e/b",
        "/a/%2E%2E/b",
        "/a/.%2e/b",
        "/a/%2e./b",
        "/a/%2e/b",
        "/a/..;/b",
        "/a/..;jsessionid=x/b",
        "/a/.;/b",
        "/a/%2e%2e;/b",
        "/a/..%2fb",
        "/a/%2e%2e%2fb",
        "/a/..%5cb",
        "/a/..%2F..%2Fetc",
        "/a/x%2f..%2f..%2fy",
    ] {
        let resp = front.get_raw(t, "").await;
        assert_eq!(resp.status, 400, "{t}: {}", resp.head);
        assert!(resp.body_text().contains("bad_request"), "{t}");
    }
    assert!(up.seen().is_empty(), "{:?}", up.seen());
    // Dots that are not segments pass.
    for t in ["/a/...", "/v1.2/x", "/a/.well-known/b", "/a/..b"] {
        assert_eq!(front.get_raw(t, "").await.status, 200, "{t}");
    }
}

#[tokio::test]
async fn allow_paths_refuse_everything_else_with_403() {
    let (up, front) = ok_pair(r#"proxy.allow_paths = ["/backoffice/api/", "/health"]"#).await;
    for t in ["/backoffice/api/x", "/backoffice/ap%69/x?q=1", "/health"] {
        assert_eq!(front.get_raw(t, "").await.status, 200, "{t}");
    }
    for t in [
        "/backoffice/other",
        "/BACKOFFICE/api/x",
        "/",
        "/backoffice/apix",
    ] {
        let resp = front.get_raw(t, "").await;
        assert_eq!(resp.status, 403, "{t}");
        assert!(resp.body_text().contains("path_not_allowed"), "{t}");
    }
    assert_eq!(up.seen().len(), 3);
}

// Absolute-form, `*` and CONNECT targets: the lane leaves every target that
// is not origin-form to hyper (h1::parse_request).
@handed_over
#[tokio::test]
async fn not_an_open_proxy() {
    let (up, front) = ok_pair("").await;
    for target in [
        "http://example.com/x",
        "https://example.com/x",
        "http://internal.example:8080/x",
    ] {
        let resp = front.get_raw(target, "").await;
        assert_eq!(resp.status, 400, "{target}");
        assert!(resp.body_text().contains("bad_request"));
    }
    // Absolute-form naming the sidecar itself is just a request.
    let own = format!("http://{}/own", front.proxy);
    assert_eq!(front.get_raw(&own, "").await.status, 200);

    let connect = upstream::raw(
        front.proxy,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(connect.status, 405, "{}", connect.head);
    assert!(connect.has_header("allow"));

    // OPTIONS * asks about the sidecar, not a resource to forward.
    let star = upstream::raw(
        front.proxy,
        format!(
            "OPTIONS * HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            front.proxy
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(star.status, 400, "{}", star.head);

    let seen: Vec<String> = up.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(seen, ["/base/own"]);
}

// Half the requests come over h2c, which only hyper serves.
@handed_over
#[tokio::test]
async fn redirects_into_the_upstream_point_back_at_the_sidecar() {
    let up_addr = Arc::new(Mutex::new(String::new()));
    let base = up_addr.clone();
    let up = Upstream::start(move |req| {
        let base = base.lock().unwrap().clone();
        async move {
            let location = match req.uri().path() {
                "/base/abs" => format!("{base}/base/next?x=1"),
                "/base/rel" => "/base/doc/1".to_string(),
                "/base/away" => "https://other.example/base/x".to_string(),
                _ => "/elsewhere".to_string(),
            };
            response(
                302,
                &[("location", &location), ("content-location", "/base/doc/1")],
                TestBody::empty(),
            )
        }
    })
    .await;
    *up_addr.lock().unwrap() = format!("http://{}", up.addr);
    let front = Front::start(&up.url("/base/"), "").await;
    let me = format!("http://{}", front.proxy);

    let h1 = support::client();
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap();
    for client in [h1, h2] {
        let get = |p: &str| client.get(front.url(p)).send();
        let r = get("/abs").await.unwrap();
        assert_eq!(r.status(), 302);
        assert_eq!(r.headers()["location"], format!("{me}/next?x=1"));
        assert_eq!(r.headers()["content-location"], format!("{me}/doc/1"));
        let r = get("/rel").await.unwrap();
        assert_eq!(r.headers()["location"], format!("{me}/doc/1"));
        let r = get("/away").await.unwrap();
        assert_eq!(r.headers()["location"], "https://other.example/base/x");
        let r = get("/out").await.unwrap();
        assert_eq!(r.headers()["location"], "/elsewhere");
    }
}

#[tokio::test]
async fn methods_and_bodies_pass_through() {
    let up = Upstream::start(|req| async move {
        let method = req.method().to_string();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Response::new(TestBody::text(format!("{method} {}", body.len())))
    })
    .await;
    let front = Front::start(&up.url("/base/"), "").await;
    let client = support::client();
    let big = vec![7u8; 300 * 1024];
    for (method, body) in [
        (reqwest::Method::GET, vec![]),
        (reqwest::Method::POST, big.clone()),
        (reqwest::Method::PUT, b"put".to_vec()),
        (reqwest::Method::PATCH, b"{}".to_vec()),
        (reqwest::Method::DELETE, vec![]),
        (reqwest::Method::OPTIONS, vec![]),
        (
            reqwest::Method::from_bytes(b"PROPFIND").unwrap(),
            b"<x/>".to_vec(),
        ),
    ] {
        let n = body.len();
        let r = client
            .request(method.clone(), front.url("/m"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{method}");
        assert_eq!(r.text().await.unwrap(), format!("{method} {n}"));
    }
}

// current_thread (the default): every task of the sidecar runs on this
// thread, so its log lines land in this test's buffer.
#[tokio::test]
async fn access_log_has_one_line_per_request_and_no_token_or_query() {
    let logs = LogBuffer::capture();
    let (up, front) = ok_pair("").await;
    let resp = support::client()
        .post(front.url("/api/orders/42?card=4111111111111111&access_token=leak"))
        .header("authorization", "Bearer client-own-secret")
        .header("x-request-id", "req-log-1")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "ok");
    let bearer = front.bearer();
    let token = bearer.trim_start_matches("Bearer ");

    support::eventually(Duration::from_secs(5), "the access log line", || {
        let n = logs.access_lines().len();
        async move { n > 0 }
    })
    .await;
    let lines = logs.access_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["path"], "/api/orders/42");
    assert_eq!(line["status"], 200);
    assert_eq!(line["request_id"], "req-log-1");
    assert_eq!(line["generation"], 1);
    assert_eq!(line["bytes_in"], 5);
    assert_eq!(line["bytes_out"], 2);
    assert!(line["total_ms"].is_number() && line["upstream_ms"].is_number());
    assert_eq!(up.seen().len(), 1);

    let all = logs.text();
    for secret in [
        token,
        "client-own-secret",
        "4111111111111111",
        "access_token",
        "leak",
    ] {
        assert!(!all.contains(secret), "the log holds {secret:?}:\n{all}");
    }
}
}
