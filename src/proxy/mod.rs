//! The reverse proxy: every request goes to the configured upstream with
//! `Authorization: Bearer <token>` in place of whatever the client sent.
//!
//! One policy, two engines:
//! - [`policy`] holds every rule, written once, in the phases of an
//!   exchange: admit the request, edit the upstream request head, decide on
//!   the upstream's answer (and the 401 replay), edit the downstream head,
//!   answer locally, log. [`fields`] reads heads for it, [`path`] checks
//!   and maps request targets, [`error`] says what each refusal answers,
//!   [`exchange`] is the access log line and the request metrics.
//! - [`lane`] (the fast lane, over [`h1`]) serves plain HTTP/1.1 exchanges
//!   with an HTTP/1.1 upstream, parsing heads in place; [`hyper_engine`]
//!   serves everything else (HTTP/2 both ways, h2c, upgrades, `Expect`,
//!   chunked uploads, HTTP/1.0, egress proxies), and everything when
//!   `proxy.fast_lane = false`.
//! - [`upstream`] reaches the upstream for both engines (one connector
//!   stack, HTTP/2 chosen per connection); [`pool`] and [`body`] are the
//!   hyper engine's, [`idle`] the idle-connection stack both pools use.
//!
//! Per request: one `ArcSwap` load for the token (no lock, never a call to
//! the token endpoint). A 401 that says the token is bad invalidates that
//! generation and the request is replayed from a bounded copy of its body
//! ([`policy::Replay`]).
//!
//! Which engine serves a connection is decided here, in one place
//! ([`Proxy`]'s [`Handler`] and [`engine_for`]).

pub mod body;
pub mod egress;
pub mod error;
pub mod exchange;
pub mod fields;
pub mod h1;
pub mod hyper_engine;
pub mod idle;
pub mod lane;
pub mod path;
pub mod policy;
pub mod pool;
pub mod route;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use http::uri::{Authority, Scheme};
use http::Uri;
use hyper_util::client::proxy::matcher::Matcher;
use tracing::info;

use crate::config::{ProxyConfig, RouteConfig};
use crate::metrics::{Engine, Metrics};
use crate::serve::{ClientIo, Handler, ServeOptions, StopSignal};
use crate::token::TokenHandle;
pub use error::ProxyError;
use fields::{RequestFacts, TransferCoding, Upgrade};
use hyper_engine::HyperUpstream;
use lane::{Lane, Prefixed};
use policy::Policy;
/// A route as the proxy builds it, with both engines' parts.
type Route = route::Route<Lane, HyperUpstream>;
type Routes = route::Routes<Lane, HyperUpstream>;

/// Largest request head the proxy accepts; beyond it, 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Why the proxy cannot be built from its config and environment.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("route {route}: invalid upstream URL")]
    Upstream {
        route: String,
        #[source]
        source: http::Error,
    },
    #[error("route {route}")]
    Egress {
        route: String,
        #[source]
        source: egress::EgressError,
    },
    #[error("route {route}")]
    Tls {
        route: String,
        #[source]
        source: crate::tls::TlsError,
    },
}

/// A route's settings and the token of its credentials.
pub struct RouteSpec {
    pub config: RouteConfig,
    pub token: Arc<TokenHandle>,
}

/// What one listener serves: the routes without an address of their own
/// on `proxy.listen` (`listen: None`), each route with one on it alone.
pub struct Listener {
    pub listen: Option<SocketAddr>,
    pub proxy: Arc<Proxy>,
}

/// Builds every route, and groups them by the listener that serves them.
pub fn build(
    shared: &ProxyConfig,
    specs: Vec<RouteSpec>,
    metrics: &Arc<Metrics>,
) -> Result<Vec<Listener>, BuildError> {
    let shared = Arc::new(shared.clone());
    let mut on_shared = Vec::new();
    let mut own = Vec::new();
    for spec in specs {
        let listen = spec.config.listen;
        let route = Arc::new(build_route(&shared, spec, metrics)?);
        match listen {
            Some(addr) => own.push((addr, route)),
            None => on_shared.push(route),
        }
    }
    let mut listeners = Vec::new();
    if !on_shared.is_empty() {
        listeners.push(Listener {
            listen: None,
            proxy: Arc::new(Proxy::new(&shared, on_shared, metrics)),
        });
    }
    for (addr, route) in own {
        listeners.push(Listener {
            listen: Some(addr),
            proxy: Arc::new(Proxy::new(&shared, vec![route], metrics)),
        });
    }
    Ok(listeners)
}

/// One route: its policy, its upstream, and both engines' ways there.
fn build_route(
    shared: &Arc<ProxyConfig>,
    spec: RouteSpec,
    metrics: &Arc<Metrics>,
) -> Result<Route, BuildError> {
    let name = spec.config.name.clone();
    let uri: Uri = spec
        .config
        .upstream
        .as_str()
        .parse()
        .map_err(|e: http::uri::InvalidUri| BuildError::Upstream {
            route: name.clone(),
            source: e.into(),
        })?;
    let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTPS);
    let authority = uri
        .authority()
        .cloned()
        .unwrap_or_else(|| Authority::from_static("invalid"));
    // The same environment variables, read by the same parser, as reqwest.
    let egress =
        egress::route(&Matcher::from_env(), &uri).map_err(|source| BuildError::Egress {
            route: name.clone(),
            source,
        })?;
    if let Some(proxy) = egress.proxy() {
        info!(route = %name, egress_proxy = %proxy, "upstream requests go through an egress proxy (from the environment)");
    }
    let egress_auth = match &egress {
        egress::Route::Forward { auth, .. } => auth.clone(),
        _ => None,
    };
    let direct = matches!(egress, egress::Route::Direct);
    let tls = crate::tls::client_config(spec.config.ca_file.as_deref()).map_err(|source| {
        BuildError::Tls {
            route: name,
            source,
        }
    })?;
    let upstream = Arc::new(upstream::Upstream::new(
        shared, scheme, authority, egress, tls,
    ));
    let lane =
        (shared.fast_lane && direct).then(|| Lane::new(upstream.clone(), shared.pool_idle_timeout));
    let policy = Policy::new(
        shared.clone(),
        spec.config,
        spec.token,
        metrics.clone(),
        egress_auth,
    );
    Ok(Route {
        hyper: HyperUpstream::new(&policy, upstream),
        lane,
        policy,
    })
}

/// The proxy of one listener: its routes, served on the fast lane or hyper.
pub struct Proxy {
    routes: Routes,
    shared: Arc<ProxyConfig>,
    builder: hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
}

impl Proxy {
    fn new(shared: &Arc<ProxyConfig>, routes: Vec<Arc<Route>>, metrics: &Arc<Metrics>) -> Self {
        Proxy {
            routes: Routes::new(routes, metrics.clone(), shared.access_log),
            builder: crate::serve::http::builder(&serve_options(shared)),
            shared: shared.clone(),
        }
    }

    /// Serves one connection: on the fast lane while its requests are for
    /// the lane, then (or from the start, with the lane off) on hyper.
    async fn serve_connection(self: Arc<Self>, io: ClientIo, peer: SocketAddr, stop: StopSignal) {
        let io = if self.shared.fast_lane {
            match lane::serve(&self.routes, &self.shared, io, peer, stop.clone()).await {
                Some(io) => io,
                None => return,
            }
        } else {
            Prefixed::new(bytes::Bytes::new(), io)
        };
        let proxy = self.clone();
        crate::serve::http::serve_connection(
            io,
            peer,
            &self.builder,
            self.shared.client_idle_timeout,
            move |req| {
                let proxy = proxy.clone();
                async move { hyper_engine::handle(&proxy.routes, req, peer).await }
            },
            stop,
        )
        .await
    }
}

/// How the proxy listeners' connections are served.
pub fn serve_options(cfg: &ProxyConfig) -> ServeOptions {
    ServeOptions {
        max_connections: cfg.max_connections,
        idle_timeout: cfg.client_idle_timeout,
        max_header_bytes: MAX_HEADER_BYTES,
        http2: true,
        write_stall_timeout: Some(cfg.body_idle_timeout),
    }
}

impl Handler for Proxy {
    fn serve(
        self: Arc<Self>,
        io: ClientIo,
        peer: SocketAddr,
        stop: StopSignal,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(self.serve_connection(io, peer, stop))
    }
}

/// Which engine serves a request the fast lane has read (`minor`: HTTP/1.x
/// minor version): the lane takes what it can do completely, plain
/// HTTP/1.1 with no body or a `Content-Length` one; hyper the rest.
pub fn engine_for(minor: u8, form: h1::Form, facts: &RequestFacts<'_>) -> Engine {
    let plain = minor == 1
        && form == h1::Form::Origin
        && !facts.expect
        && facts.transfer_coding == TransferCoding::Absent
        && facts.upgrade() != Upgrade::Requested;
    if plain {
        Engine::FastLane
    } else {
        Engine::Hyper
    }
}
