//! The fault matrix: one test per fault the sidecar must ride out. Each test
//! asserts what the client sees and that the sidecar recovers without a
//! restart, and ends with the leak check: no client secret, password, token or
//! Basic credential in the logs (captured at debug level for the whole test
//! binary), `/status`, `/metrics` or any answer the sidecar made itself.
//!
//! Token-endpoint rows run twice: at start-up, when there is no token to fall
//! back on (the client gets 503 `token_unavailable`), and at a refresh, when
//! the current token still serves (the client sees nothing). Faults are
//! switched on and off through the fake world, so no test sleeps to provoke a
//! fault; the timeouts in [`FAST`] only make the ones that must expire short.
//! Rows about a whole process (SIGTERM, memory) spawn the real binary.

mod sidecar_process;
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use figment::providers::{Format, Toml};
use figment::Figment;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};
use token_sidecar::app::Running;
use token_sidecar::config::{self, Config};
use token_sidecar::fake::{self, FakeServer, Fault, Scripted, World};
use token_sidecar::proxy::body::ProxyBody;
use token_sidecar::serve::{ServeOptions, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::{eventually, metric};

/// Short timeouts and retries so every row runs in well under a second.
const FAST: &str = r#"
[proxy]
token_wait = "200ms"
request_timeout = "2s"
[oauth]
timeout = "300ms"
[refresh]
min_interval = "20ms"
backoff_base = "50ms"
backoff_max = "150ms"
secret_poll_interval = "20ms"
"#;

/// Generous bound for anything awaited: only reached when a test fails.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Log capture for the leak check

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this test binary, at debug level, through the same
/// filter the binary uses (which caps `reqwest` at info).
fn capture_logs() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(token_sidecar::logging::filter("debug"))
            .with_writer(|| LogWriter)
            .with_ansi(false)
            .try_init();
    });
}

/// What must never appear in any output: the fake world's client secret and
/// password, the Basic credential built from them, and every token the fake
/// issues (opaque ones by prefix, JWTs by their header).
fn secrets(world: &World) -> Vec<String> {
    let (id, secret, password) = world.with(|w| {
        (
            w.client_id.clone(),
            w.client_secret.clone(),
            w.password.clone(),
        )
    });
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
    vec![
        secret,
        password,
        basic,
        "fake-access-".into(),
        "fake-refresh-".into(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
    ]
}

fn assert_no_secret(what: &str, text: &str, secrets: &[String]) {
    for s in secrets {
        assert!(!text.contains(s.as_str()), "{what} leaks {s:?}");
    }
}

// ---------------------------------------------------------------------------
// A sidecar in front of configurable token endpoint and upstream

/// Base, then [`FAST`], then each of `extra` (separate documents, so each
/// may open any table); one must set the password: see [`inline_password`].
fn config(world: &World, token_url: &str, upstream: &str, extra: &[&str]) -> Config {
    let mut fig = Figment::new()
        .merge(Toml::string(&support::base_toml_without_password(
            world, token_url, upstream,
        )))
        .merge(Toml::string(FAST));
    for e in extra {
        fig = fig.merge(Toml::string(e));
    }
    match config::load_figment(fig) {
        Ok(l) => l.config,
        Err(e) => panic!("test config invalid: {e}"),
    }
}

fn inline_password(world: &World) -> String {
    let p = world.with(|w| w.password.clone());
    format!("[oauth]\npassword = \"{p}\"\n")
}

/// An address on which nothing listens (yet): bound, then released.
async fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Binds `addr` again once the previous listener has let go of it.
async fn rebind<F, Fut>(what: &str, mut start: F) -> FakeServer
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<FakeServer>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match start().await {
            Ok(s) => return s,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("cannot bind {what} again: {e}"),
        }
    }
}

struct Rig {
    world: Arc<World>,
    /// Kept so the sidecar lives as long as the rig.
    _sidecar: Running,
    proxy: SocketAddr,
    admin: SocketAddr,
    http: reqwest::Client,
    /// Bodies of the answers the sidecar made itself, for the leak check.
    local_bodies: Mutex<Vec<String>>,
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

impl Rig {
    async fn start(world: Arc<World>, token_url: &str, upstream: &str, extra: &[&str]) -> Rig {
        capture_logs();
        let cfg = config(&world, token_url, upstream, extra);
        let sidecar = support::start_sidecar(&cfg).await;
        Rig {
            proxy: sidecar.proxy_addrs[0],
            admin: sidecar.admin_addr,
            world,
            _sidecar: sidecar,
            http: support::client(),
            local_bodies: Mutex::new(Vec::new()),
        }
    }

    /// A sidecar in front of the fake token endpoint and fake backoffice.
    async fn with_fakes(world: Arc<World>, extra: &str) -> (Rig, FakeServer, FakeServer) {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let auth = fake::token_endpoint(world.clone(), loopback).await.unwrap();
        let api = fake::backoffice(world.clone(), loopback).await.unwrap();
        let password = inline_password(&world);
        let rig = Rig::start(
            world,
            &auth.url("/oauth/token"),
            &api.url("/base/"),
            &[&password, extra],
        )
        .await;
        (rig, auth, api)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    async fn get(&self, path: &str) -> Answer {
        let resp = self
            .http
            .get(self.url(path))
            .send()
            .await
            .expect("proxy answers");
        self.answer(resp).await
    }

    async fn answer(&self, resp: reqwest::Response) -> Answer {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.text().await.unwrap_or_default();
        if !(200..300).contains(&status) {
            self.local_bodies.lock().unwrap().push(body.clone());
        }
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn admin_get(&self, path: &str) -> (u16, String) {
        let resp = self
            .http
            .get(format!("http://{}{}", self.admin, path))
            .send()
            .await
            .expect("admin answers");
        (
            resp.status().as_u16(),
            resp.text().await.unwrap_or_default(),
        )
    }

    /// `/status` of the one credentials profile, `default`.
    async fn status(&self) -> Value {
        let (_, body) = self.admin_get("/status").await;
        let all: Value = serde_json::from_str(&body).expect("/status is JSON");
        all["credentials"]["default"].clone()
    }

    async fn generation(&self) -> u64 {
        self.status().await["generation"].as_u64().unwrap_or(0)
    }

    /// `POST /admin/refresh`: forces one attempt and reports it (the
    /// report of the one profile, `default`).
    async fn refresh(&self) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("http://{}/admin/refresh", self.admin))
            .send()
            .await
            .expect("admin answers");
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        self.local_bodies.lock().unwrap().push(body.to_string());
        (status, body["credentials"]["default"].clone())
    }

    async fn wait_ok(&self, path: &str) {
        eventually(WAIT, "a 200 through the proxy", || async {
            self.get(path).await.status == 200
        })
        .await;
    }

    async fn wait_last_error(&self, code: &str) {
        eventually(WAIT, &format!("/status last_error = {code}"), || async {
            self.status().await["last_error"] == code
        })
        .await;
    }

    async fn wait_generation(&self, at_least: u64) {
        eventually(WAIT, &format!("generation {at_least}"), || async {
            self.generation().await >= at_least
        })
        .await;
    }

    async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.1
    }

    /// The leak check over everything this rig's sidecar said.
    async fn assert_no_leak(&self) {
        let secrets = secrets(&self.world);
        assert_no_secret("/status", &self.status().await.to_string(), &secrets);
        assert_no_secret("/readyz", &self.admin_get("/readyz").await.1, &secrets);
        assert_no_secret("/metrics", &self.metrics().await, &secrets);
        for body in self.local_bodies.lock().unwrap().iter() {
            assert_no_secret("an answer of the sidecar", body, &secrets);
        }
        let logs = String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned();
        assert!(!logs.is_empty(), "logs are captured");
        assert_no_secret("the logs", &logs, &secrets);
    }
}

/// 503 `token_unavailable` with a `Retry-After`, and `/readyz` 503.
async fn assert_token_unavailable(rig: &Rig) {
    let a = rig.get("/api/x").await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert_eq!(a.json()["error"], "token_unavailable");
    let retry_after: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    assert_eq!(rig.admin_get("/readyz").await.0, 503);
}

/// The two phases of a token-endpoint row. `fault_on` and `fault_off` switch
/// the fault; `code` is the error code `/status` and `/admin/refresh` report.
async fn token_endpoint_row(
    rig: &Rig,
    code: &str,
    fault_on: impl Fn(&World),
    fault_off: impl Fn(&World),
) {
    // Start-up: no token to fall back on.
    rig.wait_last_error(code).await;
    assert_token_unavailable(rig).await;
    assert_eq!(rig.generation().await, 0);
    fault_off(&rig.world);
    rig.wait_ok("/api/x").await;
    assert_eq!(rig.admin_get("/readyz").await.0, 200);
    assert_eq!(rig.generation().await, 1);

    // At a refresh: the current token keeps serving.
    fault_on(&rig.world);
    let (status, report) = rig.refresh().await;
    assert_eq!(status, 502, "{report}");
    assert_eq!(report["error"], code, "{report}");
    assert_eq!(rig.get("/api/x").await.status, 200);
    assert_eq!(rig.generation().await, 1);
    fault_off(&rig.world);
    // The retry after a transient error comes by itself, within backoff_max.
    rig.wait_generation(2).await;
    assert_eq!(rig.get("/api/x").await.status, 200);
    rig.assert_no_leak().await;
}

async fn fault_row(fault: Fault, code: &str) {
    let world = World::new(300.0);
    world.with(|w| w.fault = Some(fault.clone()));
    let (rig, _auth, _api) = Rig::with_fakes(world, "").await;
    let f = fault.clone();
    token_endpoint_row(
        &rig,
        code,
        move |w| w.with(|w| w.fault = Some(f.clone())),
        |w| w.with(|w| w.fault = None),
    )
    .await;
}

// ---------------------------------------------------------------------------
// Token endpoint

engines! {
#[tokio::test]
async fn token_endpoint_refused_connection() {
    let world = World::new(300.0);
    let auth_addr = free_addr().await;
    let api = fake::backoffice(world.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let extra = inline_password(&world);
    let token_url = format!("http://{auth_addr}/oauth/token");
    let rig = Rig::start(world.clone(), &token_url, &api.url("/base/"), &[&extra]).await;

    rig.wait_last_error("transport").await;
    assert_token_unavailable(&rig).await;
    let w = world.clone();
    let auth = rebind("the token endpoint", || {
        fake::token_endpoint(w.clone(), auth_addr)
    })
    .await;
    rig.wait_ok("/api/x").await;

    // The token endpoint goes away while a token is held.
    drop(auth);
    let (status, report) = rig.refresh().await;
    assert_eq!(status, 502, "{report}");
    assert_eq!(report["error"], "transport", "{report}");
    assert_eq!(rig.get("/api/x").await.status, 200);
    let _auth = rebind("the token endpoint", || {
        fake::token_endpoint(w.clone(), auth_addr)
    })
    .await;
    rig.wait_generation(2).await;
    assert_eq!(rig.get("/api/x").await.status, 200);
    rig.assert_no_leak().await;
}

#[tokio::test]
async fn token_endpoint_hangs_past_oauth_timeout() {
    // The fake answers after 5 s; oauth.timeout is 300 ms.
    let hang = Scripted::json(500, json!({})).after(Duration::from_secs(5));
    fault_row(Fault::Answer(hang), "timeout").await;
}

#[tokio::test]
async fn token_endpoint_500() {
    fault_row(Fault::Answer(Scripted::json(500, json!({}))), "http_status").await;
}

#[tokio::test]
async fn token_endpoint_503_with_an_html_body() {
    let page = Scripted::text(
        503,
        "text/html",
        "<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>",
    );
    fault_row(Fault::Answer(page), "http_status").await;
}

#[tokio::test]
async fn token_endpoint_200_with_truncated_json() {
    let cut = Scripted::text(
        200,
        "application/json",
        r#"{"access_token":"fake-access-cut","token_type":"bearer","expi"#,
    );
    fault_row(Fault::Answer(cut), "invalid_response").await;
}

#[tokio::test]
async fn token_endpoint_200_with_a_64_mib_chunked_body_is_cut_at_the_cap() {
    let flood = Fault::Flood {
        bytes: 64 << 20,
        chunked: true,
    };
    fault_row(flood, "response_too_large").await;
}

#[tokio::test]
async fn token_endpoint_200_with_a_64_mib_content_length_is_refused_unread() {
    let flood = Fault::Flood {
        bytes: 64 << 20,
        chunked: false,
    };
    fault_row(flood, "response_too_large").await;
}

#[tokio::test]
async fn token_type_not_bearer_is_refused() {
    let world = World::new(300.0);
    let mac: fn(&mut Value) = |v| v["token_type"] = json!("mac");
    world.with(|w| w.edit_answer = Some(mac));
    let (rig, _auth, _api) = Rig::with_fakes(world, "").await;
    token_endpoint_row(
        &rig,
        "invalid_response",
        move |w| w.with(|w| w.edit_answer = Some(mac)),
        |w| w.with(|w| w.edit_answer = None),
    )
    .await;
}

#[tokio::test]
async fn expires_in_zero_or_negative_without_a_jwt_exp_is_refused() {
    let world = World::new(300.0);
    let zero: fn(&mut Value) = |v| v["expires_in"] = json!(0);
    let negative: fn(&mut Value) = |v| v["expires_in"] = json!(-5);
    world.with(|w| w.edit_answer = Some(zero));
    let (rig, _auth, _api) = Rig::with_fakes(world, "").await;
    // Start-up with 0, refresh with a negative value.
    token_endpoint_row(
        &rig,
        "invalid_response",
        move |w| w.with(|w| w.edit_answer = Some(negative)),
        |w| w.with(|w| w.edit_answer = None),
    )
    .await;
}
}

/// Seconds between `obtained_at` and `expires_at` in `/status`.
async fn lifetime_secs(rig: &Rig) -> u64 {
    let s = rig.status().await;
    s["expires_at"].as_u64().unwrap() - s["obtained_at"].as_u64().unwrap()
}

engines! {
#[tokio::test]
async fn expires_in_absent_uses_default_lifetime() {
    let world = World::new(300.0);
    let absent: fn(&mut Value) = |v| {
        v.as_object_mut().unwrap().remove("expires_in");
    };
    world.with(|w| w.edit_answer = Some(absent));
    let (rig, _auth, _api) = Rig::with_fakes(world, "[oauth]\ndefault_lifetime = \"7s\"\n").await;
    rig.wait_ok("/api/x").await;
    assert_eq!(lifetime_secs(&rig).await, 7);
    rig.assert_no_leak().await;
}

#[tokio::test]
async fn expires_in_absent_zero_or_negative_with_a_jwt_uses_its_exp() {
    let world = World::new(120.0);
    world.with(|w| w.jwt_access_tokens = true);
    let (rig, _auth, _api) =
        Rig::with_fakes(world.clone(), "[oauth]\ndefault_lifetime = \"7s\"\n").await;
    rig.wait_ok("/api/x").await;
    let edits: [fn(&mut Value); 3] = [
        |v| {
            v.as_object_mut().unwrap().remove("expires_in");
        },
        |v| v["expires_in"] = json!(0),
        |v| v["expires_in"] = json!(-1),
    ];
    for (i, edit) in edits.into_iter().enumerate() {
        world.with(|w| w.edit_answer = Some(edit));
        let (status, report) = rig.refresh().await;
        assert_eq!(status, 200, "{report}");
        assert_eq!(rig.generation().await, i as u64 + 2);
        // exp is whole seconds, so the lifetime is 119.x s: not the default.
        let l = lifetime_secs(&rig).await;
        assert!((118..=120).contains(&l), "lifetime {l} s");
        assert_eq!(rig.get("/api/x").await.status, 200);
    }
    rig.assert_no_leak().await;
}
}

/// A TLS front for the fake token endpoint, whose certificate can be swapped.
struct TlsFront {
    addr: SocketAddr,
    config: Arc<Mutex<Arc<rustls::ServerConfig>>>,
    /// Relayed connections; closed on a swap, so that the client's pooled
    /// connection cannot bypass the new certificate.
    relays: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    failed_handshakes: Arc<AtomicU64>,
}

fn server_config(
    names: &[&str],
    ca: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
) -> rustls::ServerConfig {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = params.signed_by(&key, ca, ca_key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap()
}

impl TlsFront {
    async fn start(backend: SocketAddr, config: rustls::ServerConfig) -> TlsFront {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front = TlsFront {
            addr: listener.local_addr().unwrap(),
            config: Arc::new(Mutex::new(Arc::new(config))),
            relays: Arc::new(Mutex::new(Vec::new())),
            failed_handshakes: Arc::new(AtomicU64::new(0)),
        };
        let (config, failed) = (front.config.clone(), front.failed_handshakes.clone());
        let relays = front.relays.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = tokio_rustls::TlsAcceptor::from(config.lock().unwrap().clone());
                let failed = failed.clone();
                let relay = tokio::spawn(async move {
                    match acceptor.accept(tcp).await {
                        Ok(mut tls) => {
                            if let Ok(mut plain) = TcpStream::connect(backend).await {
                                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                            }
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                relays.lock().unwrap().push(relay.abort_handle());
            }
        });
        front
    }

    /// Presents `config` from now on, to new and (closed) old connections.
    fn present(&self, config: &Arc<rustls::ServerConfig>) {
        *self.config.lock().unwrap() = config.clone();
        for relay in self.relays.lock().unwrap().drain(..) {
            relay.abort();
        }
    }
}

engines! {
#[tokio::test]
async fn token_endpoint_tls_certificate_for_the_wrong_name() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let world = World::new(300.0);
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let auth = fake::token_endpoint(world.clone(), loopback).await.unwrap();
    let api = fake::backoffice(world.clone(), loopback).await.unwrap();
    let wrong = server_config(&["wrong.example.test"], &ca, &ca_key);
    let right = server_config(&["127.0.0.1"], &ca, &ca_key);
    let front = TlsFront::start(auth.addr, wrong.clone()).await;
    let extra = format!(
        "{}ca_file = \"{}\"\n",
        inline_password(&world),
        ca_file.display()
    );
    let token_url = format!("https://{}/oauth/token", front.addr);
    let rig = Rig::start(world.clone(), &token_url, &api.url("/base/"), &[&extra]).await;

    let (on, off) = (Arc::new(wrong), Arc::new(right));
    token_endpoint_row(
        &rig,
        "transport",
        |_| front.present(&on),
        |_| front.present(&off),
    )
    .await;
    // The client refused the certificate, in both phases.
    assert!(front.failed_handshakes.load(Ordering::Relaxed) >= 2);
}
}

// ---------------------------------------------------------------------------
// Upstream

/// A test upstream answering with `handler`; counts requests.
async fn upstream<H, F>(handler: H) -> (SocketAddr, Server, Arc<AtomicU64>)
where
    H: Fn(u64) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let mut server = Server::new();
    server.spawn(
        listener,
        ServeOptions {
            max_connections: 1000,
            idle_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            http2: false,
            write_stall_timeout: None,
        },
        move |_req: Request<Incoming>, _peer| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            handler(n)
        },
    );
    (addr, server, count)
}

fn respond(
    status: u16,
    headers: &[(&'static str, &'static str)],
    body: Bytes,
) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        r.headers_mut().insert(*k, HeaderValue::from_static(v));
    }
    r
}

/// A sidecar with the fake token endpoint in front of `upstream`.
async fn rig_for_upstream(upstream: SocketAddr, extra: &str) -> (Rig, FakeServer) {
    let world = World::new(300.0);
    let auth = fake::token_endpoint(world.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let password = inline_password(&world);
    let rig = Rig::start(
        world,
        &auth.url("/oauth/token"),
        &format!("http://{upstream}/base/"),
        &[&password, extra],
    )
    .await;
    (rig, auth)
}

fn grants(world: &World) -> u64 {
    world.with(|w| w.password_grants + w.refresh_grants)
}

engines! {
#[tokio::test]
async fn upstream_refused() {
    let addr = free_addr().await;
    let (rig, _auth) = rig_for_upstream(addr, "").await;
    let a = rig.get("/api/x").await;
    assert_eq!(a.status, 502, "{}", a.body);
    assert_eq!(a.json()["error"], "upstream_unavailable");
    let world = rig.world.clone();
    let _api = rebind("the upstream", || fake::backoffice(world.clone(), addr)).await;
    rig.wait_ok("/api/x").await;
    rig.assert_no_leak().await;
}

#[tokio::test]
async fn upstream_resets_mid_response() {
    // A raw upstream: the first connection announces 100000 bytes, sends
    // 1000 and resets; later ones answer properly.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut tcp, _)) = listener.accept().await {
            n += 1;
            let first = n == 1;
            tokio::spawn(async move {
                loop {
                    if read_head(&mut tcp).await.is_none() {
                        return;
                    }
                    if first {
                        let _ = tcp
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n")
                            .await;
                        let _ = tcp.write_all(&[b'x'; 1000]).await;
                        let _ = tcp.flush().await;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let _ = tcp.set_zero_linger();
                        return; // dropped with linger 0: RST
                    }
                    let _ = tcp
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    let (rig, _auth) = rig_for_upstream(addr, "").await;
    let resp = rig.http.get(rig.url("/api/x")).send().await.unwrap();
    // The status and headers were already on their way; the body is cut, and
    // the client can tell (fewer bytes than Content-Length, then an error).
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.content_length(), Some(100_000));
    assert!(
        resp.bytes().await.is_err(),
        "a cut body must not look complete"
    );
    let a = rig.get("/api/x").await;
    assert_eq!((a.status, a.body.as_str()), (200, "ok"));
    eventually(WAIT, "no exchange left in flight", || async {
        metric(
            &rig.metrics().await,
            "token_sidecar_proxy_inflight_requests",
        ) == Some(0.0)
    })
    .await;
    rig.assert_no_leak().await;
}
}

/// Reads one request head (and ignores any body); `None` at EOF.
async fn read_head(tcp: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tcp.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(head)
}

engines! {
#[tokio::test]
async fn upstream_slow_headers_past_request_timeout() {
    let (addr, _server, count) = upstream(|n| async move {
        if n == 0 {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        respond(200, &[], Bytes::from_static(b"ok"))
    })
    .await;
    let (rig, _auth) = rig_for_upstream(addr, "[proxy]\nrequest_timeout = \"300ms\"\n").await;
    let a = rig.get("/api/x").await;
    assert_eq!(a.status, 504, "{}", a.body);
    assert_eq!(a.json()["error"], "upstream_timeout");
    let a = rig.get("/api/x").await;
    assert_eq!((a.status, a.body.as_str()), (200, "ok"));
    assert_eq!(count.load(Ordering::SeqCst), 2);
    rig.assert_no_leak().await;
}

#[tokio::test]
async fn upstream_401_invalid_token_is_replayed_with_a_new_token() {
    let world = World::new(300.0);
    let (rig, _auth, _api) = Rig::with_fakes(world.clone(), "").await;
    rig.wait_ok("/api/x").await;
    world.revoke_access_tokens();
    let a = rig.get("/api/x").await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(world.with(|w| w.backoffice_401_revoked), 1);
    assert_eq!(rig.generation().await, 2);
    let m = rig.metrics().await;
    assert_eq!(
        metric(&m, "token_sidecar_upstream_retries_total{reason=\"401\"}"),
        Some(1.0)
    );
    rig.assert_no_leak().await;
}

#[tokio::test]
async fn upstream_401_without_invalid_token_is_passed_back() {
    let (addr, _server, count) = upstream(|_| async {
        respond(
            401,
            &[("www-authenticate", "Basic realm=\"backoffice\"")],
            Bytes::from_static(b"{\"error\":\"unauthorized\"}"),
        )
    })
    .await;
    let (rig, _auth) = rig_for_upstream(addr, "").await;
    let a = rig.get("/api/x").await;
    assert_eq!(a.status, 401);
    assert_eq!(a.headers["www-authenticate"], "Basic realm=\"backoffice\"");
    assert_eq!(count.load(Ordering::SeqCst), 1, "not replayed");
    assert_eq!(grants(&rig.world), 1, "no new token asked for");
    rig.assert_no_leak().await;
}

#[tokio::test]
async fn upstream_403_is_not_replayed_even_with_retry_on_any_401() {
    let (addr, _server, count) =
        upstream(|_| async { respond(403, &[], Bytes::from_static(b"{\"error\":\"forbidden\"}")) })
            .await;
    let (rig, _auth) = rig_for_upstream(addr, "[proxy]\nretry_on_401 = \"any\"\n").await;
    let a = rig.get("/api/x").await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (403, "{\"error\":\"forbidden\"}")
    );
    assert_eq!(count.load(Ordering::SeqCst), 1, "not replayed");
    assert_eq!(grants(&rig.world), 1, "no new token asked for");
    rig.assert_no_leak().await;
}
}

// ---------------------------------------------------------------------------
// Client

async fn wait_idle(rig: &Rig) {
    eventually(WAIT, "no exchange left in flight", || async {
        metric(
            &rig.metrics().await,
            "token_sidecar_proxy_inflight_requests",
        ) == Some(0.0)
    })
    .await;
}

engines! {
#[tokio::test]
async fn client_disconnects_mid_upload() {
    let world = World::new(300.0);
    let (rig, _auth, _api) = Rig::with_fakes(world.clone(), "").await;
    rig.wait_ok("/api/x").await;
    let mut tcp = TcpStream::connect(rig.proxy).await.unwrap();
    tcp.write_all(
        b"POST /api/upload HTTP/1.1\r\nhost: localhost\r\ncontent-length: 1048576\r\n\r\n",
    )
    .await
    .unwrap();
    tcp.write_all(&[b'u'; 100 * 1024]).await.unwrap();
    // The upstream has the request (the fake counts it on arrival).
    eventually(WAIT, "the upload reached the upstream", || async {
        world.with(|w| w.backoffice_requests) >= 2
    })
    .await;
    drop(tcp);
    wait_idle(&rig).await;
    rig.wait_ok("/api/x").await;
    rig.assert_no_leak().await;
}

#[tokio::test]
async fn client_disconnects_mid_download() {
    // 32 MiB, far more than the socket buffers hold.
    let (addr, _server, _count) = upstream(|_| async {
        let chunk = Bytes::from(vec![b'd'; 64 * 1024]);
        let mut r = Response::new(ProxyBody::chunks(vec![chunk; 512]));
        *r.status_mut() = StatusCode::OK;
        r
    })
    .await;
    let (rig, _auth) = rig_for_upstream(addr, "").await;
    let mut tcp = TcpStream::connect(rig.proxy).await.unwrap();
    tcp.write_all(b"GET /api/big HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < buf.len() {
        got += tcp.read(&mut buf[got..]).await.unwrap();
    }
    assert!(buf.starts_with(b"HTTP/1.1 200"));
    drop(tcp);
    wait_idle(&rig).await;
    let resp = rig.http.get(rig.url("/api/big")).send().await.unwrap();
    assert_eq!(resp.bytes().await.unwrap().len(), 32 << 20);
    rig.assert_no_leak().await;
}
}

/// Writes `request` (ignoring a write error: the server may close early) and
/// returns the status code of the answer, if one came before the close.
async fn raw_status(addr: SocketAddr, request: Vec<u8>) -> Option<u16> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&request).await;
        wr
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, rd.read_to_end(&mut answer)).await;
    drop(writer.await);
    let line = String::from_utf8_lossy(&answer);
    line.strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
}

engines! {
#[tokio::test]
async fn client_sends_10000_headers() {
    let world = World::new(300.0);
    let (rig, _auth, _api) = Rig::with_fakes(world, "").await;
    rig.wait_ok("/api/x").await;
    let mut req = b"GET /api/x HTTP/1.1\r\nhost: localhost\r\n".to_vec();
    for i in 0..10_000 {
        req.extend_from_slice(format!("x-h-{i}: v\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    let status = raw_status(rig.proxy, req).await;
    assert_eq!(status, Some(431));
    rig.wait_ok("/api/x").await;
    rig.assert_no_leak().await;
}

#[tokio::test]
async fn client_sends_a_1_mib_header() {
    let world = World::new(300.0);
    let (rig, _auth, _api) = Rig::with_fakes(world, "").await;
    rig.wait_ok("/api/x").await;
    let mut req = b"GET /api/x HTTP/1.1\r\nhost: localhost\r\nx-big: ".to_vec();
    req.extend_from_slice(&vec![b'b'; 1 << 20]);
    req.extend_from_slice(b"\r\n\r\n");
    let status = raw_status(rig.proxy, req).await;
    assert_eq!(status, Some(431));
    rig.wait_ok("/api/x").await;
    rig.assert_no_leak().await;
}

#[tokio::test]
async fn client_sends_a_malformed_request_line() {
    let world = World::new(300.0);
    let (rig, _auth, _api) = Rig::with_fakes(world.clone(), "").await;
    rig.wait_ok("/api/x").await;
    for line in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /api/x HTTP/9.9\r\n\r\n",
        b"GET  HTTP/1.1\r\nhost: x\r\n\r\n",
        b"\x00\x01\x02 / HTTP/1.1\r\n\r\n",
    ] {
        let status = raw_status(rig.proxy, line.to_vec()).await;
        assert_eq!(status, Some(400), "{:?}", String::from_utf8_lossy(line));
    }
    assert_eq!(
        world.with(|w| w.backoffice_requests),
        1,
        "nothing forwarded"
    );
    rig.wait_ok("/api/x").await;
    rig.assert_no_leak().await;
}

// Absolute-form and CONNECT targets: the lane leaves every target that is
// not origin-form to hyper (h1::parse_request).
@handed_over
#[tokio::test]
async fn not_an_open_proxy() {
    let world = World::new(300.0);
    let (rig, _auth, _api) = Rig::with_fakes(world.clone(), "").await;
    rig.wait_ok("/api/x").await;
    let absolute = b"GET http://backoffice.example.test/api/x HTTP/1.1\r\nhost: backoffice.example.test\r\nconnection: close\r\n\r\n";
    assert_eq!(raw_status(rig.proxy, absolute.to_vec()).await, Some(400));
    let connect = b"CONNECT backoffice.example.test:443 HTTP/1.1\r\nhost: backoffice.example.test:443\r\nconnection: close\r\n\r\n";
    assert_eq!(raw_status(rig.proxy, connect.to_vec()).await, Some(405));
    assert_eq!(
        world.with(|w| w.backoffice_requests),
        1,
        "nothing forwarded"
    );
    rig.assert_no_leak().await;
}
}

// ---------------------------------------------------------------------------
// Process

/// A `..data` layout like a mounted Kubernetes Secret: `dir/password` ->
/// `..data/password`, `..data` -> `..<version>`.
fn write_secret_version(dir: &Path, version: &str, password: &str) {
    let target = dir.join(format!("..{version}"));
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("password"), format!("{password}\n")).unwrap();
    // Swap ..data atomically, as the kubelet does: new link, then rename.
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if !dir.join("password").exists() {
        std::os::unix::fs::symlink("..data/password", dir.join("password")).unwrap();
    }
}

engines! {
#[tokio::test]
async fn secret_file_replaced_by_a_new_symlink_target() {
    let dir = tempfile::tempdir().unwrap();
    write_secret_version(dir.path(), "v1", "old-password");
    let world = World::new(300.0);
    world.with(|w| {
        w.password = "old-password".into();
        // Every grant is a password grant.
        w.issue_refresh_token = false;
    });
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let auth = fake::token_endpoint(world.clone(), loopback).await.unwrap();
    let api = fake::backoffice(world.clone(), loopback).await.unwrap();
    // A refused login backs off a minute: only the file change can explain
    // a retry within this test.
    let extra = format!(
        "[oauth]\npassword_file = \"{}\"\n[refresh]\nrejected_backoff_min = \"1m\"\n",
        dir.path().join("password").display()
    );
    let rig = Rig::start(
        world.clone(),
        &auth.url("/oauth/token"),
        &api.url("/base/"),
        &[&extra],
    )
    .await;
    rig.wait_ok("/api/x").await;

    // The backoffice password changes; the Secret follows a little later.
    world.with(|w| w.password = "new-password".into());
    let (status, report) = rig.refresh().await;
    assert_eq!(
        (status, report["error"].as_str()),
        (502, Some("invalid_grant"))
    );
    assert_eq!(
        rig.get("/api/x").await.status,
        200,
        "the current token still serves"
    );
    write_secret_version(dir.path(), "v2", "new-password");
    rig.wait_generation(2).await;
    let used = world.with(|w| {
        w.seen
            .last()
            .and_then(|r| r.param("password").map(str::to_owned))
    });
    assert_eq!(used.as_deref(), Some("new-password"));
    assert_eq!(rig.get("/api/x").await.status, 200);
    let mut secrets = secrets(&world);
    secrets.push("old-password".into());
    let logs = String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned();
    assert_no_secret("the logs", &logs, &secrets);
    rig.assert_no_leak().await;
}
}

/// The real binary with a config file and secret files in `dir`: a layer
/// over [`sidecar_process::Process`], which spawns it and captures its output.
struct Spawned {
    inner: sidecar_process::Process,
    _dir: tempfile::TempDir,
    proxy: SocketAddr,
    admin: SocketAddr,
}

impl Spawned {
    async fn start(world: &World, token_url: &str, upstream: &str, extra: &str) -> Spawned {
        let dir = tempfile::tempdir().unwrap();
        let (secret, password) = world.with(|w| (w.client_secret.clone(), w.password.clone()));
        std::fs::write(dir.path().join("client_secret"), &secret).unwrap();
        std::fs::write(dir.path().join("password"), &password).unwrap();
        let (id, user) = world.with(|w| (w.client_id.clone(), w.username.clone()));
        let toml = format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
upstream = "{upstream}"
token_wait = "2s"
[admin]
listen = "127.0.0.1:0"
[oauth]
token_url = "{token_url}"
client_id = "{id}"
client_secret_file = "{d}/client_secret"
username = "{user}"
password_file = "{d}/password"
timeout = "1s"
[refresh]
min_interval = "50ms"
backoff_base = "50ms"
backoff_max = "200ms"
[log]
format = "json"
level = "debug"
[runtime]
worker_threads = 2
{extra}
"#,
            d = dir.path().display()
        );
        let mut inner = sidecar_process::Process::run_config(&toml, |_| {});
        let (proxy, admin) = inner.addresses().await;
        let client = support::client();
        eventually(WAIT, "the binary's admin listener", || async {
            client
                .get(format!("http://{admin}/healthz"))
                .send()
                .await
                .is_ok()
        })
        .await;
        Spawned {
            inner,
            _dir: dir,
            proxy,
            admin,
        }
    }

    fn signal(&self, sig: i32) {
        self.inner.signal(sig);
    }

    /// Peak resident memory (VmHWM), in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.inner.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }

    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.inner.wait_exit(WAIT).await
    }

    fn output(&self) -> String {
        self.inner.text()
    }
}

engines! {
#[tokio::test]
async fn sigterm_under_load_loses_no_inflight_request() {
    const INFLIGHT: u64 = 16;
    let world = World::new(300.0);
    let auth = fake::token_endpoint(world.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let release = Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    let (addr, _server, count) = upstream(move |_| {
        let r = r.clone();
        async move {
            r.notified().await;
            respond(200, &[], Bytes::from(vec![b'p'; 100_000]))
        }
    })
    .await;
    let mut sidecar = Spawned::start(
        &world,
        &auth.url("/oauth/token"),
        &format!("http://{addr}/base/"),
        "[shutdown]\ngrace = \"10s\"\n",
    )
    .await;
    let client = support::client();
    let url = format!("http://{}/api/slow", sidecar.proxy);
    let requests: Vec<_> = (0..INFLIGHT)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let resp = client.get(url).send().await?;
                let status = resp.status().as_u16();
                Ok::<_, reqwest::Error>((status, resp.bytes().await?.len()))
            })
        })
        .collect();
    eventually(WAIT, "every request in flight at the upstream", || async {
        count.load(Ordering::SeqCst) == INFLIGHT
    })
    .await;
    sidecar.signal(libc::SIGTERM);
    // Draining: the admin listener reports not ready before we let go.
    eventually(WAIT, "/readyz 503 while draining", || async {
        match client
            .get(format!("http://{}/readyz", sidecar.admin))
            .send()
            .await
        {
            Ok(r) => r.status() == 503,
            Err(_) => true,
        }
    })
    .await;
    eventually(WAIT, "new connections refused", || async {
        TcpStream::connect(sidecar.proxy).await.is_err()
    })
    .await;
    release.notify_waiters();
    for r in requests {
        let (status, len) = r.await.unwrap().expect("in-flight request completes");
        assert_eq!((status, len), (200, 100_000));
    }
    let exit = sidecar.wait_exit().await;
    assert!(exit.success(), "{exit:?}");
    assert_no_secret("the binary's output", &sidecar.output(), &secrets(&world));
}

#[tokio::test]
async fn token_endpoint_64_mib_body_keeps_the_binary_memory_flat() {
    let world = World::new(300.0);
    world.with(|w| {
        w.fault = Some(Fault::Flood {
            bytes: 64 << 20,
            chunked: true,
        })
    });
    let auth = fake::token_endpoint(world.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let api = fake::backoffice(world.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut sidecar =
        Spawned::start(&world, &auth.url("/oauth/token"), &api.url("/base/"), "").await;
    eventually(WAIT, "three floods refused", || async {
        world.with(|w| w.seen.len()) >= 3
    })
    .await;
    let client = support::client();
    let status: Value = client
        .get(format!("http://{}/status", sidecar.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        status["credentials"]["default"]["last_error"],
        "response_too_large"
    );
    // Buffering one flood would take 64 MiB; the cap keeps the whole
    // process far below that.
    let peak = sidecar.peak_rss_kib();
    assert!(peak < 40 * 1024, "peak RSS {peak} KiB");
    world.with(|w| w.fault = None);
    let url = format!("http://{}/api/x", sidecar.proxy);
    eventually(WAIT, "a 200 once the endpoint recovers", || async {
        client
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    sidecar.signal(libc::SIGTERM);
    assert!(sidecar.wait_exit().await.success());
    assert_no_secret("the binary's output", &sidecar.output(), &secrets(&world));
}
}
