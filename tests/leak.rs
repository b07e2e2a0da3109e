//! Everything the sidecar says, at trace level, holds no secret; and the token
//! lifecycle is logged at info with its fields, failures at warn/error with
//! the OAuth `error` code. Also `log.format` and `log.level`/`RUST_LOG`.
//!
//! The leak runs spawn the real binary (`RUST_LOG=trace`, JSON) against the
//! in-process fakes with long, distinctive secrets, and drive a token cycle, a
//! refresh, a 401 replay, a refused refresh and a refused password (with
//! error descriptions that echo the secrets back), `POST /admin/refresh`,
//! `/status`, `/metrics`, proxied requests and the sidecar's own error
//! answers, then SIGTERM. A config-error run (`check`) follows. Every byte of
//! stdout and stderr, of `/metrics`, `/status`, `/readyz`, the admin answers
//! and the sidecar-made error bodies is searched for each secret, each token
//! the fake issued, and their base64 and percent-encoded forms.
//!
//! Proxied response bodies are not searched: the fake backoffice echoes the
//! request headers (so the bearer token) back, and that is the upstream's
//! answer, not the sidecar's output.

mod sidecar_process;
mod support;

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use sidecar_process::{json_line, Process};
use token_sidecar::fake::{self, FakeServer, Scripted, World};

const LIMIT: Duration = Duration::from_secs(15);

const CLIENT_ID: &str = "leak-check-client";
/// Characters that base64, percent- and form-encoding all change.
const CLIENT_SECRET: &str = "CSx7f3a!Kq9 z&v=Wm%2B+x/Lh:QzMARKcs";
const PASSWORD: &str = "Pw~9d@X p&q=r+s/t%u:MmZy#QzMARKpw";
const USERNAME: &str = "leak-check-user";

/// The fakes with our secrets; tokens live 1 s so a refresh comes at 0.5 s
/// (with `refresh.min_interval` lowered to allow it).
async fn world() -> (Arc<World>, FakeServer, FakeServer) {
    let world = World::new(1.0);
    world.with(|w| {
        w.client_id = CLIENT_ID.into();
        w.client_secret = CLIENT_SECRET.into();
        w.username = USERNAME.into();
        w.password = PASSWORD.into();
    });
    let loopback = "127.0.0.1:0".parse().unwrap();
    let auth = fake::token_endpoint(world.clone(), loopback).await.unwrap();
    let api = fake::backoffice(world.clone(), loopback).await.unwrap();
    (world, auth, api)
}

fn toml(world: &World, auth: &FakeServer, api: &FakeServer, oauth_extra: &str) -> String {
    // Secrets inline in TOML here on purpose: the warning about it must not
    // quote them either. TOML basic strings: escape nothing but \ and ".
    support::base_toml(world, &auth.url("/oauth/token"), &api.url("/base/"))
        .replace("format = \"text\"", "format = \"json\"")
        .replace("[oauth]", &format!("[oauth]\n{oauth_extra}"))
        .replace(
            "[proxy]",
            "[proxy]\nallow_paths = [\"/api/\"]\ntoken_wait = \"1s\"",
        )
        + "[refresh]\nmin_interval = \"100ms\"\n"
}

/// What the sidecar produced, to be searched.
#[derive(Default)]
struct Haystacks(Vec<(String, String)>);

impl Haystacks {
    fn add(&mut self, what: impl Into<String>, text: impl Into<String>) {
        self.0.push((what.into(), text.into()));
    }

    /// GET or POST on the sidecar; records status and body.
    async fn fetch(&mut self, method: reqwest::Method, url: &str) -> (u16, String) {
        let r = support::client()
            .request(method.clone(), url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = r.status().as_u16();
        let headers = format!("{:?}", r.headers());
        let body = r.text().await.unwrap();
        self.add(
            format!("{method} {url} -> {status}"),
            format!("{headers}\n{body}"),
        );
        (status, body)
    }
}

/// Every form a secret could leak in.
fn forms(secret: &str) -> Vec<String> {
    let b = secret.as_bytes();
    vec![
        secret.to_owned(),
        STANDARD.encode(b),
        STANDARD_NO_PAD.encode(b),
        URL_SAFE.encode(b),
        URL_SAFE_NO_PAD.encode(b),
        utf8_percent_encode(secret, NON_ALPHANUMERIC).to_string(),
        url::form_urlencoded::byte_serialize(b).collect(),
        serde_json::to_string(secret)
            .unwrap()
            .trim_matches('"')
            .to_owned(),
    ]
}

/// The needles: each secret and token in each form, plus both HTTP Basic
/// encodings of `id:secret`, plus the markers inside our secrets (which
/// survive percent-encoding and truncation).
fn needles(tokens: &[String]) -> Vec<String> {
    let mut n = Vec::new();
    for s in [CLIENT_SECRET, PASSWORD]
        .iter()
        .copied()
        .chain(tokens.iter().map(String::as_str))
    {
        n.extend(forms(s));
    }
    n.push(STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}")));
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    n.push(STANDARD.encode(format!("{}:{}", enc(CLIENT_ID), enc(CLIENT_SECRET))));
    n.push("QzMARKcs".into());
    n.push("QzMARKpw".into());
    n.sort();
    n.dedup();
    n
}

fn assert_no_leak(hay: &Haystacks, tokens: &[String]) {
    let needles = needles(tokens);
    let mut leaks = Vec::new();
    for (what, text) in &hay.0 {
        for n in &needles {
            if let Some(i) = text.find(n.as_str()) {
                let from = text[..i]
                    .char_indices()
                    .rev()
                    .nth(150)
                    .map_or(0, |(j, _)| j);
                let to = (i + n.len() + 60).min(text.len());
                let to = (to..=text.len())
                    .find(|&j| text.is_char_boundary(j))
                    .unwrap_or(text.len());
                leaks.push(format!("{n:?} in {what}: ...{}...", &text[from..to]));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n\n"));
}

/// The whole scenario; returns the process (exited) and what it produced.
async fn trace_run(oauth_extra: &str) -> (Process, Haystacks, Vec<String>) {
    let (world, auth, api) = world().await;
    let mut p = Process::run_config(&toml(&world, &auth, &api, oauth_extra), |c| {
        c.env("RUST_LOG", "trace");
    });
    let (proxy, admin) = p.addresses().await;
    let proxy_url = |path: &str| format!("http://{proxy}{path}");
    let admin_url = |path: &str| format!("http://{admin}{path}");
    let mut hay = Haystacks::default();
    let c = support::client();
    use reqwest::Method as M;

    // Token cycle and a refresh (1 s tokens refresh at 0.5 s).
    p.wait_event(LIMIT, "token obtained").await;
    p.wait_event(LIMIT, "token refreshed").await;
    world.with(|w| w.expires_in = 300.0);
    support::eventually(LIMIT, "a 300 s token", || async {
        let s: serde_json::Value = c
            .get(admin_url("/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        s["credentials"]["default"]["seconds_left"]
            .as_u64()
            .unwrap_or(0)
            > 100
    })
    .await;

    // Proxied requests (their bodies are the upstream's: not searched).
    for path in ["/api/merchants?limit=5", "/api/payments"] {
        let r = c.get(proxy_url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2.get(proxy_url("/api/over-h2")).send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (200, reqwest::Version::HTTP_2)
    );
    let r = c
        .post(proxy_url("/api/payments"))
        .body("{\"amount\": 1}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A 401 replay.
    world.revoke_access_tokens();
    let r = c.get(proxy_url("/api/after-revoke")).send().await.unwrap();
    assert_eq!(r.status(), 200, "replayed with a new token");

    // The sidecar's own error answers.
    let (s, _) = hay.fetch(M::GET, &proxy_url("/not-allowed")).await;
    assert_eq!(s, 403);
    let (s, _) = hay.fetch(M::GET, &admin_url("/nope")).await;
    assert_eq!(s, 404);
    let (s, _) = hay.fetch(M::PUT, &admin_url("/status")).await;
    assert_eq!(s, 405);
    let (s, _) = hay.fetch(M::POST, &admin_url("/admin/refresh")).await;
    assert_eq!(s, 200);

    // A short token, then refresh refused and password refused: the fake's
    // refresh refusal quotes the refresh token in error_description.
    world.with(|w| w.expires_in = 1.0);
    let (s, _) = hay.fetch(M::POST, &admin_url("/admin/refresh")).await;
    assert_eq!(s, 200);
    world.revoke_refresh_tokens();
    world.with(|w| w.password = "the-password-was-changed".into());
    p.wait_event(LIMIT, "token request rejected").await;
    support::eventually(LIMIT, "the token runs out", || async {
        let s: serde_json::Value = c
            .get(admin_url("/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        s["valid"] == false
    })
    .await;
    let (s, _) = hay.fetch(M::GET, &proxy_url("/api/merchants")).await;
    assert_eq!(s, 503, "token_unavailable");
    let (s, _) = hay.fetch(M::GET, &admin_url("/readyz")).await;
    assert_eq!(s, 503);

    // Servers that echo credentials: each forced attempt gets one of these.
    let id_secret_b64 = STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    let echoes = [
        Scripted::json(
            400,
            serde_json::json!({"error": "invalid_grant",
                "error_description": format!("Bad credentials for {USERNAME} / {PASSWORD}")}),
        ),
        Scripted::json(
            401,
            serde_json::json!({"error": "invalid_client",
                "error_description": format!("Unknown client {CLIENT_SECRET} (Basic {id_secret_b64})")}),
        ),
        Scripted {
            status: 500,
            body: format!("<html>java.lang.IllegalStateException: password={PASSWORD}</html>"),
            content_type: "text/html",
            delay: Duration::ZERO,
        },
        Scripted::json(
            200,
            serde_json::json!({"error": "server_error",
                "error_description": format!("{}", utf8_percent_encode(PASSWORD, NON_ALPHANUMERIC))}),
        ),
    ];
    for e in echoes {
        world.with(|w| w.script.push_back(e));
        let (s, _) = hay.fetch(M::POST, &admin_url("/admin/refresh")).await;
        assert_eq!(s, 502, "a failed attempt is reported as 502");
    }

    hay.fetch(M::GET, &admin_url("/status")).await;
    hay.fetch(M::GET, &admin_url("/metrics")).await;
    hay.fetch(M::GET, &admin_url("/healthz")).await;

    p.signal(libc::SIGTERM);
    let exit = p.wait_exit(LIMIT).await;
    assert_eq!(exit.code(), Some(0));
    hay.add("stdout and stderr", p.text());
    let tokens = world.issued_tokens();
    assert!(
        tokens.len() >= 8,
        "the run issued too few tokens to mean much: {tokens:?}"
    );
    (p, hay, tokens)
}

engines! {
// One request of the run comes over h2c, which only hyper serves.
@handed_over
#[tokio::test]
async fn trace_run_with_form_params_and_basic_auth_leaks_no_secret() {
    let (p, hay, tokens) = trace_run("").await;
    assert_no_leak(&hay, &tokens);
    // The run really logged at trace level, from our crate and dependencies.
    let text = p.text();
    assert!(text.contains("\"level\":\"TRACE\""), "no trace lines");
}

// One request of the run comes over h2c, which only hyper serves.
@handed_over
#[tokio::test]
async fn trace_run_with_query_params_and_body_client_auth_leaks_no_secret() {
    // The most exposed setting: password and client secret both in the URL.
    let (_, hay, tokens) = trace_run("params_in = \"query\"\nclient_auth = \"body\"").await;
    assert_no_leak(&hay, &tokens);
}
}

#[tokio::test]
async fn a_config_error_prints_no_secret() {
    let (world, auth, api) = world().await;
    let bad = toml(&world, &auth, &api, "")
        // An unknown key holding the password, a numeric secret, a bad value.
        .replace(
            "[oauth]",
            &format!("[oauth]\npasword = \"{PASSWORD}\"\ntimeout = \"soon\""),
        )
        .replace(
            &format!("client_secret = \"{CLIENT_SECRET}\""),
            "client_secret = 8675309123",
        );
    for args in [&["check"][..], &["check", "--live"], &[]] {
        let (_dir, path) = sidecar_process::write_config(&bad);
        let mut cmd = sidecar_process::command();
        cmd.env("RUST_LOG", "trace")
            .arg("--config")
            .arg(&path)
            .args(args);
        let (status, out, err) = sidecar_process::run_to_end(cmd);
        assert_eq!(status.code(), Some(2), "{args:?}: {out}{err}");
        assert!(err.contains("oauth.pasword"), "{err}");
        let mut hay = Haystacks::default();
        hay.add(format!("{args:?} output"), format!("{out}\n{err}"));
        assert_no_leak(&hay, &["8675309123".to_owned()]);
    }
}

/// The JSON events of a run whose `message` is `message`.
fn events<'a>(lines: &'a [serde_json::Value], message: &str) -> Vec<&'a serde_json::Value> {
    lines.iter().filter(|v| v["message"] == message).collect()
}

engines! {
#[tokio::test]
async fn the_token_lifecycle_is_logged_at_info_and_failures_with_the_oauth_error_code() {
    let (world, auth, api) = world().await;
    let mut p = Process::run_config(&toml(&world, &auth, &api, ""), |_| {});
    let (proxy, admin) = p.addresses().await;
    p.wait_event(LIMIT, "token refreshed").await;
    world.with(|w| w.expires_in = 300.0);
    support::eventually(LIMIT, "a 300 s token", || async {
        let s: serde_json::Value = support::client()
            .get(format!("http://{admin}/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        s["credentials"]["default"]["seconds_left"]
            .as_u64()
            .unwrap_or(0)
            > 100
    })
    .await;
    world.revoke_access_tokens();
    let r = support::client()
        .get(format!("http://{proxy}/api/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    world.revoke_refresh_tokens();
    world.with(|w| w.password = "changed".into());
    support::client()
        .post(format!("http://{admin}/admin/refresh"))
        .send()
        .await
        .unwrap();
    p.wait_event(LIMIT, "token request rejected").await;
    p.signal(libc::SIGTERM);
    p.wait_exit(LIMIT).await;

    let lines: Vec<serde_json::Value> = p
        .output
        .lock()
        .unwrap()
        .stdout()
        .map(|l| json_line(l).unwrap_or_else(|| panic!("not a JSON line: {l}")))
        .collect();
    let obtained = events(&lines, "token obtained");
    assert_eq!(obtained.len(), 1);
    let o = obtained[0];
    assert_eq!(
        (&o["level"], &o["grant"], &o["generation"], &o["expires_in"]),
        (&"INFO".into(), &"password".into(), &1.into(), &1.into()),
        "{o}"
    );
    let refreshed = events(&lines, "token refreshed");
    let r = refreshed
        .iter()
        .find(|e| e["grant"] == "refresh_token")
        .unwrap_or_else(|| panic!("{refreshed:?}"));
    assert_eq!(r["level"], "INFO");
    assert!(r["generation"].as_u64().unwrap() >= 2, "{r}");
    assert!(r["expires_in"].is_u64(), "{r}");
    // The 401 replay: a password grant (see token::refresher) and a replayed request.
    assert!(
        refreshed
            .iter()
            .any(|e| e["grant"] == "password" && e["expires_in"] == 300),
        "{refreshed:?}"
    );
    assert!(
        lines.iter().any(|v| v["message"] == "request"
            && v["path"] == "/api/x"
            && v["replayed"] == true
            && v["status"] == 200),
        "no access-log line for the replayed request"
    );
    // Refresh refused, then the password refused, with the OAuth error code.
    let refused = events(
        &lines,
        "refresh token refused; dropping it and using the password grant",
    );
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(
        (&refused[0]["level"], &refused[0]["error"]),
        (&"WARN".into(), &"invalid_grant".into())
    );
    let rejected = events(&lines, "token request rejected");
    assert!(!rejected.is_empty());
    assert_eq!(
        (
            &rejected[0]["level"],
            &rejected[0]["error"],
            &rejected[0]["grant"]
        ),
        (&"ERROR".into(), &"invalid_grant".into(), &"password".into())
    );
    assert!(rejected[0]["hint"].as_str().unwrap().contains("password"));
    // Every line of the token task names its credentials profile.
    let token_lines: Vec<_> = lines
        .iter()
        .filter(|l| l["target"] == "token_sidecar::token::refresher")
        .collect();
    assert!(token_lines.len() >= 5, "{token_lines:?}");
    for l in token_lines {
        assert_eq!(l["credentials"], "default", "{l}");
    }
}
}

/// Starts the binary with a login the fake refuses; returns its output once
/// the refusal was logged (or the process has run for a moment).
async fn refused_login_run(log: &str, rust_log: Option<&str>) -> Process {
    let (world, auth, api) = world().await;
    let toml = toml(&world, &auth, &api, "").replace("format = \"json\"", log);
    world.with(|w| w.password = "not-what-the-sidecar-sends".into());
    let mut p = Process::run_config(&toml, |c| {
        if let Some(f) = rust_log {
            c.env("RUST_LOG", f);
        }
    });
    p.wait_line(LIMIT, "the rejected login", |l| {
        l.contains("token request rejected")
    })
    .await;
    p.signal(libc::SIGTERM);
    p.wait_exit(LIMIT).await;
    drop((auth, api));
    p
}

#[tokio::test]
async fn log_level_filters_and_rust_log_overrides_it() {
    let p = refused_login_run("format = \"json\"\nlevel = \"error\"", None).await;
    let text = p.text();
    assert!(!text.contains("\"level\":\"INFO\""), "{text}");
    assert!(!text.contains("\"level\":\"WARN\""), "{text}");
    assert!(text.contains("\"level\":\"ERROR\""), "{text}");

    let p = refused_login_run(
        "format = \"json\"\nlevel = \"error\"",
        Some("warn,token_sidecar::app=info"),
    )
    .await;
    let text = p.text();
    assert!(text.contains("\"message\":\"listening\""), "{text}");
    assert!(
        !text.contains("\"message\":\"shutdown started: draining\""),
        "{text}"
    );
}

#[tokio::test]
async fn log_format_text_and_auto() {
    let p = refused_login_run("format = \"text\"", None).await;
    let lines: Vec<String> = p
        .output
        .lock()
        .unwrap()
        .stdout()
        .map(str::to_owned)
        .collect();
    assert!(!lines.is_empty());
    assert!(lines.iter().all(|l| json_line(l).is_none()), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" ERROR ") && l.contains("error=\"invalid_grant\"")),
        "{lines:?}"
    );
    assert!(
        lines.iter().all(|l| !l.contains('\u{1b}')),
        "colour codes in a piped log"
    );

    // auto: standard output is a pipe here, so JSON.
    let p = refused_login_run("format = \"auto\"", None).await;
    let out = p.output.lock().unwrap();
    assert!(out.stdout().count() > 0);
    assert!(out.stdout().all(|l| json_line(l).is_some()));
}
