//! Shared test support: in-process fake token endpoint and backoffice API
//! (from `token_sidecar::fake`, on 127.0.0.1:0), a sidecar started over real
//! sockets in front of them, and small HTTP helpers.
//!
//! Each test file includes this with `mod support;`; not every file uses
//! every helper.
#![allow(dead_code, unused_imports)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use token_sidecar::app::{self, Running};
use token_sidecar::config::{self, Config};
use token_sidecar::fake::{self, FakeServer, World};
use token_sidecar::metrics::Metrics;

pub use token_sidecar::fake::Scripted;
pub use token_sidecar::metrics::Engine;

// ---------------------------------------------------------------------------
// Which proxy engine a test runs on

/// What a test run expects of the engine counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Every request is served by the engine under test.
    Served,
    /// With the fast lane on, the lane hands some or all of these requests
    /// to hyper by design (h2c, chunked uploads, `Expect`, upgrades,
    /// HTTP/1.0, HTTP/2 upstreams, egress proxies): hyper serves some.
    HandedOver,
    /// Only hyper can serve these (h2c, HTTP/2), whatever the switch says:
    /// the test runs once, with the lane on, and the lane serves none.
    HyperOnly,
}

/// Requests and 401 replays by engine, summed over a test's sidecars.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineCounts {
    pub lane: u64,
    pub lane_replays: u64,
    pub hyper: u64,
    pub hyper_replays: u64,
}

impl EngineCounts {
    fn of(metrics: &Metrics) -> EngineCounts {
        EngineCounts {
            lane: metrics.engine_requests(Engine::FastLane),
            lane_replays: metrics.engine_replays(Engine::FastLane),
            hyper: metrics.engine_requests(Engine::Hyper),
            hyper_replays: metrics.engine_replays(Engine::Hyper),
        }
    }

    /// From a sidecar process's `/metrics` page. Replays are exported as one
    /// total; they are put on the engine under test (exact with the lane
    /// off, where the check asserts hyper served everything).
    fn from_page(text: &str, engine: Engine) -> EngineCounts {
        let get = |series: &str| metric(text, series).unwrap_or(0.0) as u64;
        let replays = get("token_sidecar_upstream_retries_total{reason=\"401\"}");
        let (lane_replays, hyper_replays) = match engine {
            Engine::FastLane => (replays, 0),
            Engine::Hyper => (0, replays),
        };
        EngineCounts {
            lane: get("token_sidecar_proxy_engine_requests_total{engine=\"fast_lane\"}"),
            lane_replays,
            hyper: get("token_sidecar_proxy_engine_requests_total{engine=\"hyper\"}"),
            hyper_replays,
        }
    }

    fn add(self, o: EngineCounts) -> EngineCounts {
        EngineCounts {
            lane: self.lane + o.lane,
            lane_replays: self.lane_replays + o.lane_replays,
            hyper: self.hyper + o.hyper,
            hyper_replays: self.hyper_replays + o.hyper_replays,
        }
    }
}

/// A sidecar the engine check reads at the end of the test.
enum Counted {
    /// Started in this process: its metrics, read directly.
    InProcess(Arc<Metrics>),
    /// A process of its own: its counters as last read from `/metrics`
    /// (see [`ProcessCounts`]); `None` if they never could be.
    Process(Arc<std::sync::Mutex<Option<EngineCounts>>>),
}

/// The engine of the current test, and the sidecars it started.
struct EngineRun {
    engine: Engine,
    sidecars: std::sync::Mutex<Vec<Counted>>,
}

tokio::task_local! {
    static ENGINE: EngineRun;
}

/// The engine of the test under way: set by [`engines!`]; the fast lane
/// (the default configuration) in a test that does not say.
pub fn engine() -> Engine {
    ENGINE
        .try_with(|run| run.engine)
        .unwrap_or(Engine::FastLane)
}

/// `proxy.fast_lane` for the engine under test.
pub fn fast_lane() -> bool {
    engine() == Engine::FastLane
}

/// The environment variable that puts a sidecar process on the engine of
/// the test under way; `None` outside [`engines!`] (the process keeps its
/// config's choice).
pub fn engine_env() -> Option<(&'static str, &'static str)> {
    let engine = ENGINE.try_with(|run| run.engine).ok()?;
    let value = if engine == Engine::FastLane {
        "true"
    } else {
        "false"
    };
    Some(("TOKEN_SIDECAR_PROXY__FAST_LANE", value))
}

fn register(sidecar: Counted) {
    let _ = ENGINE.try_with(|run| {
        run.sidecars
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(sidecar);
    });
}

/// Records a sidecar started by the current test, so that the engine check
/// at its end sees what it served.
pub fn started(running: &Running) {
    register(Counted::InProcess(running.metrics.clone()));
}

/// Starts a sidecar for `config` on the engine under test (whatever the
/// config says of `proxy.fast_lane`) and records it for the engine check.
pub async fn start_sidecar(config: &Config) -> Running {
    let running = if ENGINE.try_with(|_| ()).is_ok() {
        let mut config = config.clone();
        config.proxy.fast_lane = fast_lane();
        app::start(&config).await
    } else {
        app::start(config).await
    }
    .expect("sidecar starts");
    started(&running);
    running
}

/// The engine counters of a sidecar process started by the current test,
/// read from its admin listener's `/metrics` while it runs: the process
/// support calls [`ProcessCounts::read`] before it signals or kills the
/// process; a test whose process ends another way reads them itself first.
pub struct ProcessCounts {
    admin: SocketAddr,
    engine: Engine,
    last: Arc<std::sync::Mutex<Option<EngineCounts>>>,
}

impl ProcessCounts {
    /// Registers the process whose admin listener is `admin` with the
    /// current test's engine check; `None` outside [`engines!`].
    pub fn register(admin: SocketAddr) -> Option<ProcessCounts> {
        let engine = ENGINE.try_with(|run| run.engine).ok()?;
        let last = Arc::new(std::sync::Mutex::new(None));
        register(Counted::Process(last.clone()));
        Some(ProcessCounts {
            admin,
            engine,
            last,
        })
    }

    /// Reads the counters now (a blocking loopback request, bounded by a
    /// few seconds: callable from `Drop`). Counters only grow, so the last
    /// reading is the one that counts; a process that no longer answers
    /// keeps its previous reading.
    pub fn read(&self) {
        if let Some(page) = get_blocking(self.admin, "/metrics") {
            let counts = EngineCounts::from_page(&page, self.engine);
            *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(counts);
        }
    }
}

/// `GET path` on `addr` over a plain blocking socket; the body, if the
/// answer is a 200.
fn get_blocking(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let limit = Duration::from_secs(3);
    let mut s = std::net::TcpStream::connect_timeout(&addr, limit).ok()?;
    s.set_read_timeout(Some(limit)).ok()?;
    s.set_write_timeout(Some(limit)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).ok()?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200 ").then(|| body.to_owned())
}

/// Runs `test` with the proxy on `engine`, then asserts from the sidecars'
/// engine counters which engine served it (a miswired switch fails here),
/// and appends the per-engine figures to the file named by
/// `TOKEN_SIDECAR_ENGINE_STATS`, if set.
pub async fn run_on<F: Future<Output = ()>>(engine: Engine, expect: Expect, test: F) {
    let run = EngineRun {
        engine,
        sidecars: std::sync::Mutex::new(Vec::new()),
    };
    let sidecars = ENGINE
        .scope(run, async {
            test.await;
            ENGINE.with(|run| std::mem::take(&mut *run.sidecars.lock().unwrap()))
        })
        .await;
    let test = std::thread::current().name().unwrap_or("?").to_owned();
    assert!(
        !sidecars.is_empty(),
        "{test} runs on both engines but started no sidecar through the test support \
         (support::start_sidecar, Harness, Front or sidecar_process), so the engine is unchecked"
    );
    let mut total = EngineCounts::default();
    for s in &sidecars {
        let counts = match s {
            Counted::InProcess(m) => EngineCounts::of(m),
            Counted::Process(last) => (*last.lock().unwrap_or_else(|p| p.into_inner()))
                .unwrap_or_else(|| {
                    panic!(
                        "{test}: a sidecar process ended before its engine counters were read \
                         (read them with sidecar_process::Process::read_engine_counts first)"
                    )
                }),
        };
        total = total.add(counts);
    }
    let EngineCounts {
        lane,
        lane_replays,
        hyper,
        hyper_replays,
    } = total;
    if let Ok(path) = std::env::var("TOKEN_SIDECAR_ENGINE_STATS") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            // One write per line: tests run in parallel, appending to one file.
            let line = format!(
                "{test}\t{}\tfast_lane={lane}\tfast_lane_replays={lane_replays}\thyper={hyper}\thyper_replays={hyper_replays}\n",
                engine.as_str()
            );
            let _ = f.write_all(line.as_bytes());
        }
    }
    if lane + hyper == 0 {
        return; // nothing reached an engine's request path
    }
    match (engine, expect) {
        (Engine::Hyper, _) => assert!(
            lane == 0 && hyper > 0,
            "with proxy.fast_lane = false hyper must serve every request: fast lane {lane}, hyper {hyper}"
        ),
        (Engine::FastLane, Expect::Served) => assert!(
            lane > 0 && hyper == 0,
            "with proxy.fast_lane = true the fast lane must serve every request of this test \
             (mark it @handed_over if the lane hands some to hyper by design): fast lane {lane}, hyper {hyper}"
        ),
        (Engine::FastLane, Expect::HandedOver) => assert!(
            hyper > 0,
            "the fast lane was to hand these requests to hyper, which served none (fast lane {lane})"
        ),
        (Engine::FastLane, Expect::HyperOnly) => assert!(
            lane == 0 && hyper > 0,
            "only hyper can serve these requests: fast lane {lane}, hyper {hyper}"
        ),
    }
}

/// Runs each test function twice, as `NAME::fast_lane` and `NAME::hyper`:
/// with `proxy.fast_lane` on and off, asserting afterwards which engine
/// served it ([`run_on`]). Attributes (`#[tokio::test(...)]` included) are
/// repeated on both. A marker before a function:
/// - `@handed_over`: with the lane on, the lane hands some of its requests
///   to hyper by design, so hyper serves some ([`Expect::HandedOver`]);
/// - `@hyper_only`: only hyper can serve it (h2c, HTTP/2): it runs once, as
///   `NAME`, with the lane on, and asserts the lane served none of it.
#[macro_export]
macro_rules! engines {
    ($( $(@$mark:ident)? $(#[$meta:meta])* async fn $name:ident () $body:block )*) => {$(
        $crate::engines!(@one [$($mark)?] [$(#[$meta])*] $name $body);
    )*};
    (@one [hyper_only] [$($attr:tt)*] $name:ident $body:block) => {
        $($attr)*
        async fn $name() {
            $crate::support::run_on(
                $crate::support::Engine::FastLane,
                $crate::support::Expect::HyperOnly,
                async $body,
            )
            .await
        }
    };
    (@one [$($mark:ident)?] [$($attr:tt)*] $name:ident $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $($attr)*
            async fn fast_lane() {
                $crate::support::run_on(
                    $crate::support::Engine::FastLane,
                    $crate::engines!(@expect $($mark)?),
                    async $body,
                )
                .await
            }

            $($attr)*
            async fn hyper() {
                $crate::support::run_on(
                    $crate::support::Engine::Hyper,
                    $crate::support::Expect::Served,
                    async $body,
                )
                .await
            }
        }
    };
    (@expect) => { $crate::support::Expect::Served };
    (@expect handed_over) => { $crate::support::Expect::HandedOver };
}

/// A fake world, its two servers, and a sidecar in front of them.
pub struct Harness {
    pub world: Arc<World>,
    pub auth: FakeServer,
    pub api: FakeServer,
    pub sidecar: Option<Running>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub config: Config,
}

impl Harness {
    /// Starts the fakes (tokens living `expires_in` seconds) and a sidecar
    /// whose config is the base config with `overrides` (TOML) merged over it.
    pub async fn start(expires_in: f64, overrides: &str) -> Harness {
        let world = World::new(expires_in);
        Self::start_with_world(world, overrides).await
    }

    pub async fn start_with_world(world: Arc<World>, overrides: &str) -> Harness {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let auth = fake::token_endpoint(world.clone(), loopback)
            .await
            .expect("fake token endpoint");
        let api = fake::backoffice(world.clone(), loopback)
            .await
            .expect("fake backoffice");
        let config = config_for(
            &world,
            &auth.url("/oauth/token"),
            &api.url("/base/"),
            overrides,
        );
        let sidecar = start_sidecar(&config).await;
        Harness {
            proxy: sidecar.proxy_addrs[0],
            admin: sidecar.admin_addr,
            world,
            auth,
            api,
            sidecar: Some(sidecar),
            config,
        }
    }

    /// `http://127.0.0.1:PORT{path}` on the proxy.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn running(&self) -> &Running {
        self.sidecar.as_ref().expect("sidecar running")
    }

    /// Waits until the sidecar holds a token.
    pub async fn ready(&self) {
        let token = self
            .running()
            .token("default")
            .expect("profile default")
            .clone();
        token
            .wait_usable(0, Duration::from_secs(10))
            .await
            .expect("a token within 10 s");
    }
}

/// The base test config: proxy and admin on ephemeral loopback ports,
/// credentials matching the fake world's.
pub fn base_toml(world: &World, token_url: &str, upstream: &str) -> String {
    let password = world.with(|w| w.password.clone());
    let base = base_toml_without_password(world, token_url, upstream);
    base.replace("[log]", &format!("password = \"{password}\"\n[log]"))
}

/// [`base_toml`] without `oauth.password`, for tests that supply the
/// password another way (a file, an environment variable).
pub fn base_toml_without_password(world: &World, token_url: &str, upstream: &str) -> String {
    let (id, secret, user) = world.with(|w| {
        (
            w.client_id.clone(),
            w.client_secret.clone(),
            w.username.clone(),
        )
    });
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
upstream = "{upstream}"
[admin]
listen = "127.0.0.1:0"
[oauth]
token_url = "{token_url}"
client_id = "{id}"
client_secret = "{secret}"
username = "{user}"
[log]
format = "text"
"#
    )
}

/// Builds a validated config: base, the engine under test
/// (`proxy.fast_lane`), then `overrides` merged key by key.
pub fn config_for(world: &World, token_url: &str, upstream: &str, overrides: &str) -> Config {
    let fig = Figment::new()
        .merge(Toml::string(&base_toml(world, token_url, upstream)))
        .merge(Serialized::default("proxy.fast_lane", fast_lane()))
        .merge(Toml::string(overrides));
    match config::load_figment(fig) {
        Ok(l) => l.config,
        Err(e) => panic!("test config invalid: {e}"),
    }
}

/// A `[credentials.NAME]` table for the client (and, with `grant =
/// "password"`, the user) of the fake world `world`, at `token_url`.
pub fn profile_toml(name: &str, world: &World, token_url: &str, grant: &str) -> String {
    let (id, secret, user, password) = world.login();
    let user = if grant == "password" {
        format!("username = \"{user}\"\npassword = \"{password}\"\n")
    } else {
        String::new()
    };
    format!(
        "[credentials.{name}]\ngrant = \"{grant}\"\ntoken_url = \"{token_url}\"\nclient_id = \"{id}\"\nclient_secret = \"{secret}\"\n{user}"
    )
}

/// A `[route.NAME]` table.
pub fn route_toml(name: &str, prefix: &str, upstream: &str, credentials: &str) -> String {
    format!(
        "[route.{name}]\nprefix = \"{prefix}\"\nupstream = \"{upstream}\"\ncredentials = \"{credentials}\"\n"
    )
}

/// A validated config of the routes form: proxy and admin on ephemeral
/// loopback ports, the engine under test, `tables` (profiles and routes,
/// see [`profile_toml`] and [`route_toml`]), then `overrides` merged key by
/// key.
pub fn routes_config(tables: &str, overrides: &str) -> Config {
    let base = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"text\"\n{tables}"
    );
    let fig = Figment::new()
        .merge(Toml::string(&base))
        .merge(Serialized::default("proxy.fast_lane", fast_lane()))
        .merge(Toml::string(overrides));
    match config::load_figment(fig) {
        Ok(l) => l.config,
        Err(e) => panic!("test config invalid: {e}"),
    }
}

/// A plain HTTP client: no redirects followed, no proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .expect("client")
}

/// Polls `check` every 10 ms until it returns true; panics after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `/metrics` page of the admin listener at `admin`.
pub async fn scrape(admin: SocketAddr) -> String {
    client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .expect("the admin listener answers")
        .text()
        .await
        .expect("a text page")
}

/// The value of one sample line of a Prometheus text page, e.g.
/// `metric(&text, "token_sidecar_token_requests_total{grant=\"password\",outcome=\"success\"}")`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}
