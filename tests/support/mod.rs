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

use figment::providers::{Format, Toml};
use figment::Figment;
use token_sidecar::app::{self, Running};
use token_sidecar::config::{self, Config};
use token_sidecar::fake::{self, FakeServer, World};

pub use token_sidecar::fake::Scripted;

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
        let sidecar = app::start(&config).await.expect("sidecar starts");
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

/// Builds a validated config: base, then `overrides` merged key by key.
pub fn config_for(world: &World, token_url: &str, upstream: &str, overrides: &str) -> Config {
    let fig = Figment::new()
        .merge(Toml::string(&base_toml(world, token_url, upstream)))
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
