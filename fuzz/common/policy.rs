//! A [`Policy`] for the targets that call the proxy's policy directly: the
//! configured upstream and a token source that never answers (the policy
//! functions fuzzed here do not read the token; the bearer is passed in).

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::Figment;
use token_sidecar::metrics::Metrics;
use token_sidecar::proxy::policy::Policy;
use token_sidecar::token::client::{Credentials, Grant, TokenEndpoint, TokenResponse};
use token_sidecar::token::{refresher, TokenError};

pub const BASE: &str = "https://api.example.test/paymentiq/";
#[allow(dead_code)] // used by one target of two
pub const BASE_PATH: &str = "/paymentiq/";

struct Silent;

impl TokenEndpoint for Silent {
    fn request(
        &self,
        _: &Grant,
        _: &Credentials,
        _: Duration,
    ) -> impl Future<Output = Result<TokenResponse, TokenError>> + Send {
        std::future::pending()
    }
}

/// The one current-thread runtime of a fuzz process.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

fn build(forwarded: bool) -> Policy {
    let toml = format!(
        r#"
[proxy]
upstream = "{BASE}"
forwarded_headers = {forwarded}
[oauth]
token_url = "http://127.0.0.1:9/token"
client_id = "c"
client_secret = "s"
username = "u"
password = "p"
"#
    );
    let config = token_sidecar::config::load_figment(Figment::new().merge(Toml::string(&toml)))
        .expect("the fuzz config is valid")
        .config;
    // The refresher is a task; it waits forever on a runtime nobody drives.
    let _enter = runtime().enter();
    let metrics = Arc::new(Metrics::new());
    let profile = config
        .credentials
        .first()
        .expect("the [oauth] table makes a profile");
    let settings = refresher::Settings::from_profile(profile, &config.refresh);
    let (token, _task) = refresher::spawn(Silent, settings, &metrics, || 0.5);
    let route = config
        .routes
        .first()
        .cloned()
        .expect("the upstream makes a route");
    Policy::new(Arc::new(config.proxy), route, token, metrics, None)
}

/// The policy with `proxy.forwarded_headers` as given.
pub fn policy(forwarded: bool) -> &'static Policy {
    static PLAIN: OnceLock<Policy> = OnceLock::new();
    static FORWARDED: OnceLock<Policy> = OnceLock::new();
    let cell = if forwarded { &FORWARDED } else { &PLAIN };
    cell.get_or_init(|| build(forwarded))
}
