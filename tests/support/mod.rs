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

/// What a test run on one engine expects of the engine counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Every request is served by the engine under test.
    Served,
    /// With the fast lane on, the lane hands these requests to hyper
    /// (h2c, chunked uploads, `Expect`, upgrades): hyper serves them.
    HandedOver,
}

/// The engine the current test runs on, and the sidecars it started.
struct EngineRun {
    engine: Engine,
    sidecars: std::sync::Mutex<Vec<Arc<Metrics>>>,
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

/// Records a sidecar started by the current test, so that the engine check
/// at its end sees what it served.
pub fn started(running: &Running) {
    let _ = ENGINE.try_with(|run| {
        run.sidecars
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(running.metrics.clone());
    });
}

/// Starts a sidecar for `config` and records it for the engine check.
pub async fn start_sidecar(config: &Config) -> Running {
    let running = app::start(config).await.expect("sidecar starts");
    started(&running);
    running
}

/// Runs `test` with the proxy on `engine`, then asserts from the sidecars'
/// engine counters that `engine` served the requests (a miswired switch
/// fails here), and appends the per-engine figures to the file named by
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
    let count = |e: Engine| -> (u64, u64) {
        sidecars.iter().fold((0, 0), |(r, p), m| {
            (r + m.engine_requests(e), p + m.engine_replays(e))
        })
    };
    let (lane, lane_replays) = count(Engine::FastLane);
    let (hyper, hyper_replays) = count(Engine::Hyper);
    if let Ok(path) = std::env::var("TOKEN_SIDECAR_ENGINE_STATS") {
        use std::io::Write;
        let test = std::thread::current().name().unwrap_or("?").to_owned();
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(
                f,
                "{test}\t{}\tfast_lane={lane}\tfast_lane_replays={lane_replays}\thyper={hyper}\thyper_replays={hyper_replays}",
                engine.as_str()
            );
        }
    }
    if lane + hyper == 0 {
        return; // nothing proxied (token or admin tests)
    }
    match (engine, expect) {
        (Engine::Hyper, _) => assert!(
            lane == 0 && hyper > 0,
            "with proxy.fast_lane = false hyper must serve every request: fast lane {lane}, hyper {hyper}"
        ),
        (Engine::FastLane, Expect::Served) => assert!(
            lane > 0,
            "with proxy.fast_lane = true the fast lane served nothing (hyper {hyper})"
        ),
        (Engine::FastLane, Expect::HandedOver) => assert!(
            hyper > 0,
            "the fast lane was to hand these requests to hyper, which served none (fast lane {lane})"
        ),
    }
}

/// Runs each test function twice, as `NAME::fast_lane` and `NAME::hyper`:
/// with `proxy.fast_lane` on and off, asserting afterwards which engine
/// served it ([`run_on`]). Attributes (`#[tokio::test(...)]` included) are
/// repeated on both. `@handed_over` before a function: with the lane on,
/// hyper is expected to serve it (the lane hands such requests over).
#[macro_export]
macro_rules! engines {
    ($( $(@$handed:ident)? $(#[$meta:meta])* async fn $name:ident () $body:block )*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $(#[$meta])*
            async fn fast_lane() {
                $crate::support::run_on(
                    $crate::support::Engine::FastLane,
                    $crate::engines!(@expect $($handed)?),
                    async $body,
                )
                .await
            }

            $(#[$meta])*
            async fn hyper() {
                $crate::support::run_on(
                    $crate::support::Engine::Hyper,
                    $crate::support::Expect::Served,
                    async $body,
                )
                .await
            }
        }
    )*};
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
        let token = self.running().token.clone();
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

/// The value of one sample line of a Prometheus text page, e.g.
/// `metric(&text, "token_sidecar_token_requests_total{grant=\"password\",outcome=\"success\"}")`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}
