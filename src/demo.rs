//! `token-sidecar demo`: the whole sidecar against the built-in stand-ins
//! of [`crate::fake`], on loopback, with short-lived tokens so a refresh shows
//! within a minute. Needs no outside server, and takes no config file: it
//! writes its own (the binary refuses `demo --config`).

use std::net::SocketAddr;

use figment::providers::{Format, Toml};
use figment::Figment;

use crate::app::{self, StartError};
use crate::config::{self, ConfigError};
use crate::fake::{self, World};

/// Token lifetime in the demo: short enough to watch a refresh happen.
pub const DEMO_TOKEN_LIFETIME_SECS: f64 = 40.0;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the built-in stand-ins")]
    Fake(#[source] std::io::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot install the signal handlers")]
    Signals(#[source] std::io::Error),
}

/// Runs until Ctrl-C or SIGTERM (with the sidecar's own shutdown sequence).
pub async fn run(proxy_port: u16, admin_port: u16) -> Result<(), DemoError> {
    let world = World::new(DEMO_TOKEN_LIFETIME_SECS);
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let auth = fake::token_endpoint(world.clone(), loopback)
        .await
        .map_err(DemoError::Fake)?;
    let api = fake::backoffice(world.clone(), loopback)
        .await
        .map_err(DemoError::Fake)?;
    let (id, secret, user, password) = world.login();
    let toml = format!(
        r#"
[proxy]
listen = "127.0.0.1:{proxy_port}"
upstream = "{upstream}"
[admin]
listen = "127.0.0.1:{admin_port}"
[oauth]
token_url = "{token_url}"
client_id = "{id}"
client_secret = "{secret}"
username = "{user}"
password = "{password}"
params_in = "query"
"#,
        upstream = api.url("/paymentiq/"),
        token_url = auth.url("/paymentiq/oauth/token"),
    );
    let loaded = config::load_figment(Figment::new().merge(Toml::string(&toml)))?;
    let lifecycle = std::sync::Arc::new(crate::lifecycle::Lifecycle::new());
    app::install_signal_handlers(lifecycle.clone()).map_err(DemoError::Signals)?;
    let running = app::start_in(&loaded.config, lifecycle).await?;
    let proxy = running.proxy_addrs[0];
    let admin = running.admin_addr;
    println!(
        "\ntoken-sidecar demo: stand-in token endpoint {} and backoffice API {} on loopback;\n\
         tokens live {DEMO_TOKEN_LIFETIME_SECS} s, so a refresh shows in the log within a minute.\n\n\
         Try:\n  curl -s 'http://{proxy}/backoffice/api/merchants?limit=5'\n  curl -s 'http://{admin}/status'\n\n\
         (also http://{admin}/metrics and /readyz). Ctrl-C or SIGTERM stops.\n",
        auth.url("/paymentiq/oauth/token"),
        api.url("/paymentiq/"),
    );
    running.run_until_shutdown().await;
    drop((auth, api));
    Ok(())
}
