//! The admin listener over real HTTP: every metric the README documents, with
//! its type and labels, moving with what happens; the probes; `/status`;
//! `POST /admin/refresh`; the answers to wrong paths and methods.

#[path = "support/logs.rs"]
mod logs;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::{metric, Harness};

/// One metric family of a text exposition page.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: bool,
    /// Label names of each sample (without `le` of histogram buckets).
    label_sets: BTreeSet<Vec<String>>,
    /// Label values of each sample, as `k=v` lists.
    series: BTreeSet<Vec<String>>,
}

/// A small parser of the Prometheus text format, enough to check names,
/// types and labels (promtool checks the syntax in CI).
fn parse(text: &str) -> BTreeMap<String, Family> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            families.entry(name.into()).or_default().kind = kind.into();
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            families.entry(name.into()).or_default().help = true;
        } else if !line.is_empty() && !line.starts_with('#') {
            let (series, _value) = line.rsplit_once(' ').expect("sample value");
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|base| families.get(*base).is_some_and(|f| f.kind == "histogram"))
                .unwrap_or(name);
            let pairs: Vec<String> = labels
                .split(',')
                .filter(|p| !p.is_empty() && !p.starts_with("le="))
                .map(|p| p.replace('"', ""))
                .collect();
            let names = pairs
                .iter()
                .map(|p| p.split('=').next().unwrap().to_owned())
                .collect();
            let f = families
                .get_mut(family)
                .unwrap_or_else(|| panic!("sample {name} before its TYPE line"));
            f.label_sets.insert(names);
            f.series.insert(pairs);
        }
    }
    families
}

async fn scrape(h: &Harness) -> String {
    scrape_at(h.admin).await
}

/// The `/metrics` page of the admin listener at `admin`.
async fn scrape_at(admin: std::net::SocketAddr) -> String {
    let r = support::client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    r.text().await.unwrap()
}

/// `/status` of the admin listener at `admin`.
async fn status_at(admin: std::net::SocketAddr) -> serde_json::Value {
    support::client()
        .get(format!("http://{admin}/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn series(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

engines! {
#[tokio::test]
async fn every_documented_metric_exists_with_its_type_and_labels() {
    let h = Harness::start(300.0, "[proxy]\nallow_paths = [\"/api/\"]").await;
    h.ready().await;
    let c = support::client();
    assert_eq!(c.get(h.url("/api/a")).send().await.unwrap().status(), 200);
    h.world.revoke_access_tokens();
    assert_eq!(c.get(h.url("/api/b")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(h.url("/other")).send().await.unwrap().status(), 403);

    let text = scrape(&h).await;
    let families = parse(&text);
    let expected: &[(&str, &str, &[&str])] = &[
        (
            "token_sidecar_token_requests_total",
            "counter",
            &["grant", "outcome"],
        ),
        (
            "token_sidecar_token_request_duration_seconds",
            "histogram",
            &[],
        ),
        ("token_sidecar_token_expiry_timestamp_seconds", "gauge", &[]),
        ("token_sidecar_token_generation", "gauge", &[]),
        ("token_sidecar_token_valid", "gauge", &[]),
        (
            "token_sidecar_proxy_requests_total",
            "counter",
            &["route", "status_class"],
        ),
        (
            "token_sidecar_local_responses_total",
            "counter",
            &["error", "route"],
        ),
        (
            "token_sidecar_proxy_engine_requests_total",
            "counter",
            &["engine"],
        ),
        (
            "token_sidecar_proxy_request_duration_seconds",
            "histogram",
            &["route"],
        ),
        (
            "token_sidecar_upstream_retries_total",
            "counter",
            &["reason"],
        ),
        ("token_sidecar_proxy_inflight_requests", "gauge", &[]),
        ("token_sidecar_refresher_restarts_total", "counter", &[]),
        ("token_sidecar_build_info", "gauge", &["version"]),
        // token_sidecar_secret_file_errors_total{key} shows with secret
        // files only: see secret_files_and_restarts_are_counted.
    ];
    for (name, kind, labels) in expected {
        let f = families
            .get(*name)
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"));
        assert_eq!(f.kind, *kind, "{name}");
        assert!(f.help, "{name} has no HELP");
        assert_eq!(
            f.label_sets,
            BTreeSet::from([series(labels)]),
            "labels of {name}"
        );
    }
    assert_eq!(
        families.len(),
        expected.len(),
        "undocumented families: {:?}",
        families.keys().collect::<Vec<_>>()
    );

    // Every label value an alert or a dashboard needs exists from the start.
    let token_series = &families["token_sidecar_token_requests_total"].series;
    for grant in ["password", "refresh_token"] {
        for outcome in ["success", "rejected", "error"] {
            assert!(
                token_series.contains(&series(&[
                    &format!("grant={grant}"),
                    &format!("outcome={outcome}")
                ])),
                "{grant}/{outcome}"
            );
        }
    }
    // The route's series, and those of requests that match no route.
    for route in ["default", ""] {
        for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
            assert!(families["token_sidecar_proxy_requests_total"]
                .series
                .contains(&series(&[
                    &format!("route={route}"),
                    &format!("status_class={class}")
                ])));
        }
        for code in token_sidecar::metrics::LocalError::ALL.map(|c| c.as_str()) {
            assert!(families["token_sidecar_local_responses_total"]
                .series
                .contains(&series(&[&format!("error={code}"), &format!("route={route}")])));
        }
    }

    // And the values follow what happened: a password grant, a 401 replay
    // (a second password grant, see token::refresher), two answers from the
    // upstream and one from the sidecar.
    let m = |s: &str| metric(&text, s).unwrap_or_else(|| panic!("{s} in\n{text}"));
    assert_eq!(
        m(r#"token_sidecar_token_requests_total{grant="password",outcome="success"}"#),
        2.0
    );
    assert_eq!(m("token_sidecar_token_request_duration_seconds_count"), 2.0);
    assert_eq!(m("token_sidecar_token_generation"), 2.0);
    assert_eq!(m("token_sidecar_token_valid"), 1.0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let expiry = m("token_sidecar_token_expiry_timestamp_seconds");
    assert!(
        (now + 290.0..now + 301.0).contains(&expiry),
        "{expiry} vs {now}"
    );
    assert_eq!(
        m(r#"token_sidecar_proxy_requests_total{route="default",status_class="2xx"}"#),
        2.0
    );
    assert_eq!(
        m(r#"token_sidecar_local_responses_total{error="path_not_allowed",route="default"}"#),
        1.0
    );
    assert_eq!(
        m(r#"token_sidecar_upstream_retries_total{reason="401"}"#),
        1.0
    );
    assert_eq!(m(r#"token_sidecar_proxy_request_duration_seconds_count{route="default"}"#), 3.0);
    assert_eq!(m("token_sidecar_proxy_inflight_requests"), 0.0);
    assert_eq!(m("token_sidecar_refresher_restarts_total"), 0.0);
    assert_eq!(
        m(&format!(
            r#"token_sidecar_build_info{{version="{}"}}"#,
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
}
}

#[tokio::test]
async fn probes_status_and_forced_refresh() {
    let h = Harness::start(300.0, "").await;
    h.ready().await;
    let c = support::client();
    let get = |p: &str| c.get(h.admin_url(p)).send();

    let r = get("/healthz").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok\n");
    let r = c.head(h.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = get("/readyz").await.unwrap();
    assert_eq!(r.status(), 200);

    let s: serde_json::Value = get("/status").await.unwrap().json().await.unwrap();
    assert_eq!(s["valid"], true);
    assert_eq!(s["draining"], false);
    assert_eq!(s["generation"], 1);
    assert_eq!(s["grant"], "password");
    assert_eq!(s["last_outcome"], "success");
    assert!(s["seconds_left"].as_u64().unwrap() > 290, "{s}");

    // A forced refresh uses the refresh token and reports what it did.
    let r = c.post(h.admin_url("/admin/refresh")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let report: serde_json::Value = r.json().await.unwrap();
    assert_eq!(report["grant"], "refresh_token");
    assert_eq!(report["outcome"], "success");
    assert_eq!(report["generation"], 2);
    assert_eq!(report["expires_in_secs"], 300);
    assert_eq!(h.world.with(|w| w.refresh_grants), 1);
    let text = scrape(&h).await;
    assert_eq!(
        metric(
            &text,
            r#"token_sidecar_token_requests_total{grant="refresh_token",outcome="success"}"#
        ),
        Some(1.0)
    );
    assert_eq!(metric(&text, "token_sidecar_token_generation"), Some(2.0));

    let r = get("/nope").await.unwrap();
    assert_eq!(r.status(), 404);
    let r = get("/admin/refresh").await.unwrap();
    assert_eq!(r.status(), 405);
    let r = c.post(h.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 405);
}

engines! {
#[tokio::test]
async fn a_lost_token_shows_in_readyz_status_and_metrics() {
    // 2 s tokens refresh at 1 s; the refresh and then the password are refused.
    let h = Harness::start(2.0, "").await;
    h.ready().await;
    h.world.revoke_refresh_tokens();
    h.world.with(|w| w.password = "changed".into());
    let c = support::client();
    support::eventually(Duration::from_secs(10), "/readyz 503", || async {
        c.get(h.admin_url("/readyz")).send().await.unwrap().status() == 503
    })
    .await;
    let r: serde_json::Value = c
        .get(h.admin_url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["reason"], "token_expired");
    assert_eq!(r["last_error"], "invalid_grant");
    assert!(r["retry_after_secs"].as_u64().unwrap() >= 1);

    let s = status_at(h.admin).await;
    assert_eq!(s["valid"], false);
    assert_eq!(s["last_grant"], "password");
    assert_eq!(s["last_outcome"], "rejected");
    assert!(s["consecutive_failures"].as_u64().unwrap() >= 2, "{s}");

    let r = c.get(h.url("/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));

    let text = scrape(&h).await;
    let m = |s: &str| metric(&text, s).unwrap_or_else(|| panic!("{s} in\n{text}"));
    assert_eq!(m("token_sidecar_token_valid"), 0.0);
    assert_eq!(
        m(r#"token_sidecar_token_requests_total{grant="refresh_token",outcome="rejected"}"#),
        1.0
    );
    assert_eq!(
        m(r#"token_sidecar_token_requests_total{grant="password",outcome="rejected"}"#),
        1.0
    );
    assert_eq!(
        m(r#"token_sidecar_local_responses_total{error="token_unavailable",route="default"}"#),
        1.0
    );
}
}

/// The same instant as epoch seconds and RFC 3339.
fn same_instant(s: &serde_json::Value, field: &str) {
    let epoch = s[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {s}"));
    let text = s[format!("{field}_rfc3339")]
        .as_str()
        .unwrap_or_else(|| panic!("{field}_rfc3339 in {s}"));
    assert!(text.ends_with('Z') && text.len() == 20, "{text}");
    let parsed = humantime::parse_rfc3339(text).unwrap();
    assert_eq!(parsed, UNIX_EPOCH + Duration::from_secs(epoch), "{field}");
}

#[tokio::test]
async fn status_gives_rfc3339_times_the_reason_and_the_diagnosis() {
    let logs = logs::LogBuffer::capture();
    let h = Harness::start(300.0, "").await;
    h.ready().await;
    let c = support::client();
    let s = status_at(h.admin).await;
    for field in ["obtained_at", "expires_at", "last_attempt_at"] {
        same_instant(&s, field);
    }
    assert_eq!(s["reason"], "startup");
    assert_eq!(s["last_reason"], "startup");
    assert_eq!(s["last_error_cause"], serde_json::Value::Null);
    assert_eq!(s["refresher_running"], true);

    // Spring answers a wrong client secret with 401 "unauthorized".
    h.world.with(|w| {
        w.script.push_back(support::Scripted::json(
            401,
            serde_json::json!({"error": "unauthorized", "error_description": "Full authentication is required to access this resource"}),
        ))
    });
    let r = c.post(h.admin_url("/admin/refresh")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let s = status_at(h.admin).await;
    assert_eq!(s["reason"], "startup", "the token held is still the first");
    assert_eq!(s["last_reason"], "admin");
    assert_eq!(s["last_grant"], "refresh_token");
    assert_eq!(s["last_outcome"], "rejected");
    assert_eq!(s["last_error"], "unauthorized");
    assert_eq!(s["last_error_cause"], "client_refused");
    assert_eq!(
        s["last_error_hint"],
        "the client id or client secret is wrong (oauth.client_id, oauth.client_secret, \
         oauth.client_auth), or the client may not use this grant"
    );
    assert_eq!(s["valid"], true);
    let lines = logs.lines();
    let rejected = lines
        .iter()
        .find(|l| l["message"] == "token request rejected")
        .unwrap_or_else(|| panic!("no rejection logged: {lines:?}"));
    assert_eq!(rejected["level"], "ERROR");
    assert_eq!(rejected["error"], "unauthorized");
    assert_eq!(rejected["cause"], "client_refused");
    assert_eq!(rejected["reason"], "admin");
    assert_eq!(rejected["hint"], s["last_error_hint"]);
}

/// A token endpoint that panics on its first `panics` calls (or on all of
/// them), then is the real HTTP client: the test-only way to make the token
/// task panic in a whole sidecar.
struct Panicking {
    inner: token_sidecar::token::client::HttpTokenClient,
    panics: std::sync::atomic::AtomicU32,
}

impl token_sidecar::token::client::TokenEndpoint for Panicking {
    fn request(
        &self,
        grant: &token_sidecar::token::client::Grant,
        credentials: &token_sidecar::token::client::Credentials,
        timeout: Duration,
    ) -> impl std::future::Future<
        Output = Result<
            token_sidecar::token::client::TokenResponse,
            token_sidecar::token::TokenError,
        >,
    > + Send {
        use std::sync::atomic::Ordering;
        let left = self.panics.load(Ordering::Relaxed);
        if left > 0 {
            self.panics.store(left - 1, Ordering::Relaxed);
            panic!("injected panic in the token task");
        }
        self.inner.request(grant, credentials, timeout)
    }
}

/// A sidecar whose token task panics `panics` times, restarting fast.
async fn panicking_sidecar(panics: u32) -> (support::Harness, token_sidecar::app::Running) {
    let h = Harness::start(300.0, "").await;
    let config = support::config_for(
        &h.world,
        &h.auth.url("/oauth/token"),
        &h.api.url("/base/"),
        "[refresh]\nmin_interval = \"10ms\"\nbackoff_base = \"10ms\"\nbackoff_max = \"40ms\"",
    );
    let tls = token_sidecar::tls::client_config(None).unwrap();
    let endpoint = Panicking {
        inner: token_sidecar::token::client::HttpTokenClient::new(config.oauth.clone(), tls)
            .unwrap(),
        panics: panics.into(),
    };
    let running = token_sidecar::app::start_with(&config, endpoint)
        .await
        .unwrap();
    (h, running)
}

#[tokio::test]
async fn a_panicking_token_task_is_restarted_and_counted() {
    let (_h, running) = panicking_sidecar(2).await;
    running
        .token
        .wait_usable(0, Duration::from_secs(10))
        .await
        .expect("a token after two restarts");
    let c = support::client();
    let admin = |p: &str| format!("http://{}{p}", running.admin_addr);
    let r = c.get(admin("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = scrape_at(running.admin_addr).await;
    assert_eq!(
        metric(&text, "token_sidecar_refresher_restarts_total"),
        Some(2.0)
    );
}

#[tokio::test]
async fn healthz_fails_when_the_token_task_cannot_be_kept_running() {
    let (_h, running) = panicking_sidecar(u32::MAX).await;
    let c = support::client();
    let admin = |p: &str| format!("http://{}{p}", running.admin_addr);
    support::eventually(Duration::from_secs(10), "/healthz 503", || async {
        c.get(admin("/healthz")).send().await.unwrap().status() == 503
    })
    .await;
    let r = c.get(admin("/healthz")).send().await.unwrap();
    assert_eq!(
        r.text().await.unwrap(),
        "the token refresh task cannot be kept running\n"
    );
    let text = scrape_at(running.admin_addr).await;
    assert_eq!(
        metric(&text, "token_sidecar_refresher_restarts_total"),
        Some(5.0)
    );
    assert_eq!(
        status_at(running.admin_addr).await["refresher_running"],
        false
    );
}

#[tokio::test]
async fn secret_file_errors_are_a_series_per_file_key() {
    let world = token_sidecar::fake::World::new(300.0);
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("password");
    std::fs::write(&pw, format!("{}\n", world.with(|w| w.password.clone()))).unwrap();
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let auth = token_sidecar::fake::token_endpoint(world.clone(), loopback)
        .await
        .unwrap();
    let api = token_sidecar::fake::backoffice(world.clone(), loopback)
        .await
        .unwrap();
    let toml =
        support::base_toml_without_password(&world, &auth.url("/oauth/token"), &api.url("/"))
            .replace(
                "[log]",
                &format!("password_file = {:?}\n[log]", pw.to_str().unwrap()),
            );
    let config = token_sidecar::config::load_figment(
        figment::Figment::new()
            .merge(<figment::providers::Toml as figment::providers::Format>::string(&toml)),
    )
    .unwrap()
    .config;
    let running = token_sidecar::app::start(&config).await.unwrap();
    running
        .token
        .wait_usable(0, Duration::from_secs(10))
        .await
        .unwrap();
    std::fs::write(&pw, "").unwrap();
    let c = support::client();
    let admin = |p: &str| format!("http://{}{p}", running.admin_addr);
    let r = c.post(admin("/admin/refresh")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the last good password stood in");
    let text = scrape_at(running.admin_addr).await;
    let families = parse(&text);
    let f = &families["token_sidecar_secret_file_errors_total"];
    assert_eq!(f.kind, "counter");
    assert!(f.help);
    assert_eq!(f.label_sets, BTreeSet::from([series(&["key"])]));
    assert_eq!(
        metric(
            &text,
            r#"token_sidecar_secret_file_errors_total{key="oauth.password_file"}"#
        ),
        Some(1.0)
    );
}
