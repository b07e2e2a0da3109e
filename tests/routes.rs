//! Routes and credentials profiles over real sockets: one sidecar in front
//! of two APIs, each behind an OAuth2 server of its own (in-process fakes,
//! each a [`World`] whose backoffice accepts only the tokens its own token
//! endpoint issued). `paymentiq` logs in with the password grant and serves
//! `/backoffice/`; `merchants` uses client_credentials and serves
//! `/merchants/`. Every test that sends requests through the proxy runs on
//! both engines.

mod sidecar_process;
mod support;
#[path = "support/upstream.rs"]
mod upstream;
#[path = "support/wire.rs"]
mod wire;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::{metric, profile_toml, route_toml};
use token_sidecar::app::Running;
use token_sidecar::fake::{self, FakeServer, Fault, Scripted, World};

/// One API: its token endpoint and its backoffice, sharing a world.
struct Api {
    world: Arc<World>,
    auth: FakeServer,
    api: FakeServer,
}

impl Api {
    /// An API whose client is `client` (so the two APIs' clients differ).
    async fn start(client: &str) -> Api {
        let world = World::new(300.0);
        world.with(|w| {
            w.client_id = format!("{client}-client");
            w.client_secret = format!("{client}-secret");
        });
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        Api {
            auth: fake::token_endpoint(world.clone(), loopback).await.unwrap(),
            api: fake::backoffice(world.clone(), loopback).await.unwrap(),
            world,
        }
    }

    /// Token requests this API's token endpoint has seen.
    fn token_calls(&self) -> usize {
        self.world.with(|w| w.seen.len())
    }

    /// Whether `token` is one this API's token endpoint issued.
    fn issued(&self, token: &str) -> bool {
        self.world.issued_tokens().iter().any(|t| t == token)
    }
}

/// The sidecar in front of both APIs.
struct Two {
    pay: Api,
    mer: Api,
    sidecar: Running,
    proxy: SocketAddr,
    admin: SocketAddr,
}

/// The two profiles and the two routes.
fn tables(pay: &Api, mer: &Api) -> String {
    [
        profile_toml(
            "paymentiq",
            &pay.world,
            &pay.auth.url("/paymentiq/oauth/token"),
            "password",
        ),
        profile_toml(
            "merchants",
            &mer.world,
            &mer.auth.url("/oauth2/token"),
            "client_credentials",
        ),
        route_toml(
            "backoffice",
            "/backoffice/",
            &pay.api.url("/paymentiq/backoffice/"),
            "paymentiq",
        ),
        route_toml(
            "merchants",
            "/merchants/",
            &mer.api.url("/api/v2/"),
            "merchants",
        ),
    ]
    .concat()
}

impl Two {
    /// Both APIs and a sidecar: the two profiles and routes, `extra`
    /// tables (which may name `{pay}` and `{mer}`, the two backoffices'
    /// base URLs), then `overrides` merged key by key. `down` runs before
    /// the sidecar starts (to take a token endpoint down from the start).
    async fn start_with(extra: &str, overrides: &str, down: impl FnOnce(&Api, &Api)) -> Two {
        let pay = Api::start("paymentiq").await;
        let mer = Api::start("merchants").await;
        down(&pay, &mer);
        let extra = extra
            .replace("{pay}", &pay.api.url(""))
            .replace("{mer}", &mer.api.url(""));
        let config = support::routes_config(&(tables(&pay, &mer) + &extra), overrides);
        let sidecar = support::start_sidecar(&config).await;
        Two {
            proxy: sidecar.proxy_addrs[0],
            admin: sidecar.admin_addr,
            pay,
            mer,
            sidecar,
        }
    }

    /// Both APIs, the sidecar, and both tokens held.
    async fn start(extra: &str, overrides: &str) -> Two {
        let two = Two::start_with(extra, overrides, |_, _| {}).await;
        for name in ["paymentiq", "merchants"] {
            two.token_of(name).await;
        }
        two
    }

    /// Waits for the token of profile `name`.
    async fn token_of(&self, name: &str) {
        self.sidecar
            .token(name)
            .unwrap_or_else(|| panic!("profile {name}"))
            .wait_usable(0, Duration::from_secs(10))
            .await
            .unwrap_or_else(|_| panic!("a token of {name} within 10 s"));
    }

    /// `GET path` through the proxy: the status and the JSON body.
    async fn get(&self, path: &str) -> (u16, Value) {
        get_at(self.proxy, path).await
    }

    async fn admin(&self, path: &str) -> (u16, Value) {
        get_at(self.admin, path).await
    }

    async fn metrics(&self) -> String {
        support::scrape(self.admin).await
    }

    /// Neither backoffice rejected a token.
    fn no_401s(&self) {
        assert_eq!(self.pay.world.with(|w| w.backoffice_401s), 0);
        assert_eq!(self.mer.world.with(|w| w.backoffice_401s), 0);
    }
}

/// `GET path` on `addr`: the status and the JSON body (`Null` if none).
async fn get_at(addr: SocketAddr, path: &str) -> (u16, Value) {
    let r = support::client()
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The bearer token a backoffice echo shows.
fn bearer(echo: &Value) -> &str {
    echo["headers"]["authorization"]
        .as_str()
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_else(|| panic!("no bearer token in {echo}"))
}

/// A raw HTTP/1.1 `GET target` (sent as written: no client normalizes its
/// dot-segments), closed after the answer; the status.
async fn raw_get(addr: SocketAddr, target: &str) -> u16 {
    let request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let answer = wire::exchange_until_close(addr, request.into_bytes()).await;
    wire::status_of(&answer).unwrap_or_else(|| panic!("no answer to {target}"))
}

engines! {
#[tokio::test]
async fn each_upstream_gets_only_its_own_profiles_token() {
    let two = Two::start("", "").await;
    let (status, echo) = two.get("/backoffice/api/merchants?limit=5").await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["path"], "/paymentiq/backoffice/api/merchants");
    assert_eq!(echo["query"], "limit=5");
    let pay_token = bearer(&echo).to_owned();
    assert!(two.pay.issued(&pay_token), "{pay_token}");
    assert!(!two.mer.issued(&pay_token), "{pay_token}");

    let (status, echo) = two.get("/merchants/shops/7?x=1").await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["path"], "/api/v2/shops/7");
    assert_eq!(echo["query"], "x=1");
    let mer_token = bearer(&echo).to_owned();
    assert!(two.mer.issued(&mer_token), "{mer_token}");
    assert!(!two.pay.issued(&mer_token), "{mer_token}");
    two.no_401s();

    // Each token endpoint saw its own client and grant only.
    let grants = |api: &Api| -> BTreeSet<(String, String)> {
        api.world.with(|w| {
            w.seen
                .iter()
                .map(|s| {
                    (
                        s.param("grant_type").unwrap_or("").to_owned(),
                        s.target.clone(),
                    )
                })
                .collect()
        })
    };
    assert_eq!(
        grants(&two.pay),
        BTreeSet::from([("password".into(), "/paymentiq/oauth/token".into())])
    );
    assert_eq!(
        grants(&two.mer),
        BTreeSet::from([("client_credentials".into(), "/oauth2/token".into())])
    );
    assert!(two.mer.world.with(|w| w.seen[0].param("username").is_none()));

    // The series of each route, and of each profile.
    let text = two.metrics().await;
    let m = |s: &str| metric(&text, s).unwrap_or_else(|| panic!("{s} in\n{text}"));
    for route in ["backoffice", "merchants"] {
        assert_eq!(
            m(&format!(r#"token_sidecar_proxy_requests_total{{route="{route}",status_class="2xx"}}"#)),
            1.0
        );
    }
    assert_eq!(
        m(r#"token_sidecar_token_requests_total{credentials="paymentiq",grant="password",outcome="success"}"#),
        1.0
    );
    assert_eq!(
        m(r#"token_sidecar_token_requests_total{credentials="merchants",grant="client_credentials",outcome="success"}"#),
        1.0
    );
    // Each profile has the series of its own grants, at zero until used.
    assert_eq!(
        m(r#"token_sidecar_token_requests_total{credentials="merchants",grant="refresh_token",outcome="rejected"}"#),
        0.0
    );
    assert!(!text.contains(r#"credentials="merchants",grant="password""#), "{text}");
    assert!(!text.contains(r#"credentials="paymentiq",grant="client_credentials""#), "{text}");
    for name in ["paymentiq", "merchants"] {
        assert_eq!(m(&format!(r#"token_sidecar_token_valid{{credentials="{name}"}}"#)), 1.0);
        assert_eq!(m(&format!(r#"token_sidecar_token_generation{{credentials="{name}"}}"#)), 1.0);
    }
}

#[tokio::test]
async fn the_longest_prefix_wins() {
    let two = Two::start(
        &route_toml("payments", "/backoffice/payments/", "{mer}/other/", "merchants"),
        "",
    )
    .await;
    let (status, echo) = two.get("/backoffice/payments/9").await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["path"], "/other/9");
    assert!(two.mer.issued(bearer(&echo)));
    // Not under the longer prefix: the shorter one's.
    for (path, upstream_path) in [
        ("/backoffice/paymentsx", "/paymentiq/backoffice/paymentsx"),
        ("/backoffice/api/payments/9", "/paymentiq/backoffice/api/payments/9"),
    ] {
        let (status, echo) = two.get(path).await;
        assert_eq!(status, 200, "{echo}");
        assert_eq!(echo["path"], upstream_path);
        assert!(two.pay.issued(bearer(&echo)));
    }
    // The longer prefix without its slash is its own route's base path.
    let (_, echo) = two.get("/backoffice/payments").await;
    assert_eq!(echo["path"], "/other/");
    two.no_401s();
}

#[tokio::test]
async fn the_prefix_without_its_slash_goes_to_the_routes_base_path() {
    let two = Two::start("", "").await;
    for (path, upstream_path, query) in [
        ("/merchants", "/api/v2/", Value::Null),
        ("/merchants?x=1", "/api/v2/", Value::from("x=1")),
        ("/merchants/", "/api/v2/", Value::Null),
        ("/backoffice", "/paymentiq/backoffice/", Value::Null),
    ] {
        let (status, echo) = two.get(path).await;
        assert_eq!(status, 200, "{path}: {echo}");
        assert_eq!(echo["path"], upstream_path, "{path}");
        assert_eq!(echo["query"], query, "{path}");
    }
    // A longer name is not the prefix: no route.
    let (status, body) = two.get("/merchantsx").await;
    assert_eq!((status, &body["error"]), (404, &"no_route".into()));
}

#[tokio::test]
async fn a_path_under_no_prefix_is_404_no_route_and_counted_without_a_route() {
    let two = Two::start("", "").await;
    let before = (two.pay.token_calls(), two.mer.token_calls());
    for path in ["/", "/other/x", "/api/merchants"] {
        let (status, body) = two.get(path).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["error"], "no_route", "{path}");
    }
    assert_eq!(two.pay.world.with(|w| w.backoffice_requests), 0);
    assert_eq!(two.mer.world.with(|w| w.backoffice_requests), 0);
    assert_eq!((two.pay.token_calls(), two.mer.token_calls()), before);
    let text = two.metrics().await;
    assert_eq!(
        metric(&text, r#"token_sidecar_local_responses_total{error="no_route",route=""}"#),
        Some(3.0)
    );
    assert_eq!(
        metric(&text, r#"token_sidecar_proxy_request_duration_seconds_count{route=""}"#),
        Some(3.0)
    );
    for route in ["backoffice", "merchants"] {
        assert_eq!(
            metric(&text, &format!(r#"token_sidecar_local_responses_total{{error="no_route",route="{route}"}}"#)),
            Some(0.0)
        );
    }
}

#[tokio::test]
async fn the_rest_of_the_path_and_the_query_go_byte_for_byte() {
    let two = Two::start("", "").await;
    for (path, upstream_path, query) in [
        (
            "/merchants/a%2Fb/%E2%82%AC+x/%7Bid%7D?q=a%20b&c=%2B&d=+",
            "/api/v2/a%2Fb/%E2%82%AC+x/%7Bid%7D",
            "q=a%20b&c=%2B&d=+",
        ),
        (
            "/backoffice/api/x;v=1/%25?%3D=%26",
            "/paymentiq/backoffice/api/x;v=1/%25",
            "%3D=%26",
        ),
        // Joined to the base path with exactly one '/'.
        ("/merchants//double", "/api/v2/double", ""),
    ] {
        let (status, echo) = two.get(path).await;
        assert_eq!(status, 200, "{path}: {echo}");
        assert_eq!(echo["path"], upstream_path, "{path}");
        let want = if query.is_empty() { Value::Null } else { query.into() };
        assert_eq!(echo["query"], want, "{path}");
    }
}

#[tokio::test]
async fn dot_segments_cannot_cross_routes() {
    let two = Two::start("", "").await;
    for target in [
        "/merchants/../backoffice/api/x",
        "/merchants/%2e%2e/backoffice/api/x",
        "/merchants/..%2fbackoffice/api/x",
        "/merchants/./../backoffice",
        "/backoffice/../merchants/shops",
        "/merchants/..",
    ] {
        assert_eq!(raw_get(two.proxy, target).await, 400, "{target}");
    }
    assert_eq!(two.pay.world.with(|w| w.backoffice_requests), 0);
    assert_eq!(two.mer.world.with(|w| w.backoffice_requests), 0);
    let text = two.metrics().await;
    assert_eq!(
        metric(&text, r#"token_sidecar_local_responses_total{error="bad_request",route="merchants"}"#),
        Some(5.0)
    );
    assert_eq!(
        metric(&text, r#"token_sidecar_local_responses_total{error="bad_request",route="backoffice"}"#),
        Some(1.0)
    );
    // Still served when whole.
    assert_eq!(raw_get(two.proxy, "/merchants/shops/7").await, 200);
}

#[tokio::test]
async fn a_401_on_one_route_costs_one_token_call_of_its_own_profile_and_none_of_the_other() {
    let two = Two::start("", "").await;
    for (revoked, other, path, grant) in [
        (&two.pay, &two.mer, "/backoffice/api/x", "password"),
        (&two.mer, &two.pay, "/merchants/shops/1", "client_credentials"),
    ] {
        let before = (revoked.token_calls(), other.token_calls());
        let rejections = |api: &Api| api.world.with(|w| w.backoffice_401s);
        let rejected_before = (rejections(revoked), rejections(other));
        revoked.world.revoke_access_tokens();
        let (status, echo) = two.get(path).await;
        assert_eq!(status, 200, "{path}: {echo}");
        assert_eq!(
            (revoked.token_calls(), other.token_calls()),
            (before.0 + 1, before.1),
            "{path}"
        );
        let last = revoked.world.with(|w| w.seen.last().cloned().unwrap());
        assert_eq!(last.param("grant_type"), Some(grant), "{path}");
        assert_eq!(
            (rejections(revoked), rejections(other)),
            (rejected_before.0 + 1, rejected_before.1),
            "{path}"
        );
    }
    // Each profile moved to its second generation; the replays are counted.
    let text = two.metrics().await;
    for name in ["paymentiq", "merchants"] {
        assert_eq!(
            metric(&text, &format!(r#"token_sidecar_token_generation{{credentials="{name}"}}"#)),
            Some(2.0)
        );
    }
    assert_eq!(metric(&text, r#"token_sidecar_upstream_retries_total{reason="401"}"#), Some(2.0));
}

#[tokio::test]
async fn a_profiles_token_endpoint_down_fails_only_its_routes_and_readyz_follows_required() {
    for required in [true, false] {
        let two = Two::start_with(
            "",
            &format!("[proxy]\ntoken_wait = \"300ms\"\n[credentials.merchants]\nrequired = {required}\n"),
            |_, mer| {
                mer.world.with(|w| {
                    w.fault = Some(Fault::Answer(Scripted::text(503, "text/html", "<html>down</html>")))
                })
            },
        )
        .await;
        two.token_of("paymentiq").await;
        support::eventually(Duration::from_secs(5), "a failed merchants token call", || async {
            two.mer.token_calls() >= 1
        })
        .await;

        let (status, body) = two.get("/merchants/shops/1").await;
        assert_eq!((status, &body["error"]), (503, &"token_unavailable".into()), "required = {required}");
        let (status, echo) = two.get("/backoffice/api/x").await;
        assert_eq!(status, 200, "required = {required}: {echo}");
        assert_eq!(two.mer.world.with(|w| w.backoffice_requests), 0);

        let (status, ready) = two.admin("/readyz").await;
        if required {
            assert_eq!(status, 503, "{ready}");
            assert_eq!(ready["credentials"], "merchants");
            assert_eq!(ready["reason"], "no_token_yet");
            assert_eq!(ready["last_error"], "http_status");
        } else {
            assert_eq!((status, &ready), (200, &serde_json::json!({"ready": true})));
        }
        let (_, s) = two.admin("/status").await;
        assert_eq!(s["valid"], !required, "{s}");
        assert_eq!(s["credentials"]["paymentiq"]["valid"], true);
        assert_eq!(s["credentials"]["merchants"]["valid"], false);
        assert_eq!(s["credentials"]["merchants"]["required"], required);
        assert_eq!(s["credentials"]["merchants"]["last_error_cause"], "server_trouble");

        let text = two.metrics().await;
        let m = |s: &str| metric(&text, s).unwrap_or_else(|| panic!("{s} in\n{text}"));
        assert_eq!(m(r#"token_sidecar_token_valid{credentials="merchants"}"#), 0.0);
        assert_eq!(m(r#"token_sidecar_token_valid{credentials="paymentiq"}"#), 1.0);
        assert!(m(r#"token_sidecar_token_requests_total{credentials="merchants",grant="client_credentials",outcome="error"}"#) >= 1.0);
        assert_eq!(m(r#"token_sidecar_local_responses_total{error="token_unavailable",route="merchants"}"#), 1.0);
        assert_eq!(m(r#"token_sidecar_local_responses_total{error="token_unavailable",route="backoffice"}"#), 0.0);
    }
}

#[tokio::test]
async fn a_route_with_a_listen_address_of_its_own_is_served_there_alone() {
    let two = Two::start(
        "[route.legacy]\nlisten = \"127.0.0.1:0\"\nupstream = \"{mer}/legacy/\"\ncredentials = \"merchants\"\n",
        "",
    )
    .await;
    assert_eq!(two.sidecar.route_addrs.len(), 1);
    let own = two.sidecar.route_addrs[0];
    assert_ne!(own, two.proxy);
    // Its prefix is "/": every path, the other routes' prefixes included.
    for (path, upstream_path) in [
        ("/backoffice/api/x", "/legacy/backoffice/api/x"),
        ("/x?y=1", "/legacy/x"),
        ("/", "/legacy/"),
    ] {
        let (status, echo) = get_at(own, path).await;
        assert_eq!(status, 200, "{path}: {echo}");
        assert_eq!(echo["path"], upstream_path, "{path}");
        assert!(two.mer.issued(bearer(&echo)));
    }
    // Not on the shared listener, which keeps the other routes.
    let (status, body) = two.get("/x").await;
    assert_eq!((status, &body["error"]), (404, &"no_route".into()));
    let (status, echo) = two.get("/backoffice/api/x").await;
    assert_eq!(status, 200);
    assert_eq!(echo["path"], "/paymentiq/backoffice/api/x");
    let (_, s) = two.admin("/status").await;
    assert_eq!(s["routes"]["legacy"]["listen"], "127.0.0.1:0");
    assert_eq!(s["routes"]["legacy"]["requests"]["2xx"], 3);
    two.no_401s();
}

#[tokio::test]
async fn environment_variables_override_a_route_and_a_profile() {
    use token_sidecar::config::ENV_PREFIX;
    let pay = Api::start("paymentiq").await;
    let mer = Api::start("merchants").await;
    let password = pay.world.with(|w| w.password.clone());
    // The file sends merchants to a port where nothing answers, and has
    // the wrong password: the variables put both right.
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n{}",
        tables(&pay, &mer)
            .replace(&mer.api.url("/api/v2/"), "http://127.0.0.1:9/api/v2/")
            .replace(&format!("password = \"{password}\""), "password = \"not-this-one\"")
    );
    let mut p = sidecar_process::Process::run_config(&toml, |cmd| {
        cmd.env(format!("{ENV_PREFIX}ROUTE__MERCHANTS__UPSTREAM"), mer.api.url("/api/v2/"))
            .env(format!("{ENV_PREFIX}CREDENTIALS__PAYMENTIQ__PASSWORD"), &password);
    });
    let (proxy, _admin) = p.addresses().await;
    let (status, echo) = get_at(proxy, "/merchants/shops/7").await;
    assert_eq!(status, 200, "{echo}\n{}", p.text());
    assert_eq!(echo["path"], "/api/v2/shops/7");
    assert!(mer.issued(bearer(&echo)));
    let (status, echo) = get_at(proxy, "/backoffice/api/x").await;
    assert_eq!(status, 200, "{echo}\n{}", p.text());
    assert!(pay.issued(bearer(&echo)));
    // Only the variable's password was ever sent.
    assert!(pay.world.with(|w| w
        .seen
        .iter()
        .all(|s| s.param("password") == Some(password.as_str()))));
    p.signal(libc::SIGTERM);
    p.wait_exit(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn the_single_upstream_form_keeps_its_answers_and_series_with_the_new_labels() {
    let h = support::Harness::start(300.0, "[proxy]\nallow_paths = [\"/api/\"]").await;
    h.ready().await;
    let c = support::client();
    let r = c.get(h.url("/api/a?x=1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().await.unwrap();
    assert_eq!(echo["path"], "/base/api/a");
    assert_eq!(echo["query"], "x=1");
    let r = c.get(h.url("/other")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "path_not_allowed");
    assert_eq!(raw_get(h.proxy, "/api/../etc").await, 400);
    // "/" takes every path: no request is without a route.
    let r = c.get(h.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 403, "under the route, outside allow_paths");

    let text = support::scrape(h.admin).await;
    // Every route and credentials label is the one route's and profile's
    // (and "" for the no-route series, at zero).
    let mut routes = BTreeSet::new();
    let mut profiles = BTreeSet::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        for (label, set) in [("route=\"", &mut routes), ("credentials=\"", &mut profiles)] {
            if let Some(rest) = line.split(label).nth(1) {
                set.insert(rest.split('"').next().unwrap().to_owned());
            }
        }
        if line.contains("route=\"\"") {
            assert!(line.ends_with(" 0"), "{line}");
        }
    }
    assert_eq!(routes, BTreeSet::from(["".to_owned(), "default".to_owned()]));
    assert_eq!(profiles, BTreeSet::from(["default".to_owned()]));
    let m = |s: &str| metric(&text, s).unwrap_or_else(|| panic!("{s} in\n{text}"));
    assert_eq!(m(r#"token_sidecar_proxy_requests_total{route="default",status_class="2xx"}"#), 1.0);
    assert_eq!(m(r#"token_sidecar_local_responses_total{error="path_not_allowed",route="default"}"#), 2.0);
    assert_eq!(m(r#"token_sidecar_local_responses_total{error="bad_request",route="default"}"#), 1.0);
    assert_eq!(m(r#"token_sidecar_proxy_request_duration_seconds_count{route="default"}"#), 4.0);
    assert_eq!(
        m(r#"token_sidecar_token_requests_total{credentials="default",grant="password",outcome="success"}"#),
        1.0
    );
    assert_eq!(m(r#"token_sidecar_token_valid{credentials="default"}"#), 1.0);
}
}

#[tokio::test]
async fn status_lists_every_profile_and_route_and_refresh_takes_one_profile_or_all() {
    let two = Two::start("", "").await;
    assert_eq!(two.get("/merchants/a").await.0, 200);
    assert_eq!(two.get("/merchants/b").await.0, 200);
    let (status, s) = two.admin("/status").await;
    assert_eq!(status, 200);
    assert_eq!(s["valid"], true);
    let p = &s["credentials"]["paymentiq"];
    assert_eq!(
        (
            &p["login_grant"],
            &p["grant"],
            &p["generation"],
            &p["valid"]
        ),
        (
            &"password".into(),
            &"password".into(),
            &1.into(),
            &true.into()
        )
    );
    assert_eq!(p["routes"], serde_json::json!(["backoffice"]));
    let m = &s["credentials"]["merchants"];
    assert_eq!(
        (&m["login_grant"], &m["grant"], &m["reason"], &m["required"]),
        (
            &"client_credentials".into(),
            &"client_credentials".into(),
            &"startup".into(),
            &true.into()
        )
    );
    assert!(m["seconds_left"].as_u64().unwrap() > 290, "{m}");
    let r = &s["routes"]["merchants"];
    assert_eq!(r["prefix"], "/merchants/");
    assert_eq!(r["upstream"], two.mer.api.url("/api/v2/"));
    assert_eq!(r["credentials"], "merchants");
    assert_eq!(r["requests"]["2xx"], 2);
    assert_eq!(s["routes"]["backoffice"]["requests"]["2xx"], 0);
    for api in [&two.pay, &two.mer] {
        for secret in api.world.issued_tokens() {
            assert!(!s.to_string().contains(&secret), "a token in /status");
        }
    }

    let c = support::client();
    let refresh = |query: &'static str| {
        let c = c.clone();
        let url = format!("http://{}/admin/refresh{query}", two.admin);
        async move {
            let r = c.post(url).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    // One profile: its own grant again (no refresh token with client_credentials).
    let (status, body) = refresh("?credentials=merchants").await;
    assert_eq!(status, 200, "{body}");
    let names: Vec<&String> = body["credentials"].as_object().unwrap().keys().collect();
    assert_eq!(names, ["merchants"]);
    assert_eq!(
        body["credentials"]["merchants"]["grant"],
        "client_credentials"
    );
    assert_eq!(body["credentials"]["merchants"]["generation"], 2);
    assert_eq!(two.pay.token_calls(), 1);
    assert_eq!(two.mer.world.with(|w| w.client_credentials_grants), 2);

    // All of them; one refused: 502 with every outcome.
    two.mer.world.with(|w| w.client_secret = "changed".into());
    let (status, body) = refresh("").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["credentials"]["paymentiq"]["grant"], "refresh_token");
    assert_eq!(body["credentials"]["paymentiq"]["outcome"], "success");
    assert_eq!(body["credentials"]["merchants"]["outcome"], "rejected");
    assert_eq!(body["credentials"]["merchants"]["error"], "invalid_client");
    let (_, s) = two.admin("/status").await;
    assert_eq!(
        s["credentials"]["merchants"]["last_error_cause"],
        "client_refused"
    );
    assert_eq!(
        s["credentials"]["merchants"]["last_error_hint"],
        "the client id or client secret is wrong (credentials.merchants.client_id, \
         credentials.merchants.client_secret, credentials.merchants.client_auth), or the client \
         may not use this grant"
    );
    // The token held is still good: a refused refresh takes nothing away.
    assert_eq!(two.get("/merchants/c").await.0, 200);

    let (status, body) = refresh("?credentials=nope").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "unknown_credentials");
    assert_eq!(
        body["message"],
        "no credentials profile \"nope\"; profiles: merchants, paymentiq"
    );
}
