//! Assembles a running sidecar from a [`Config`]: token source, proxy and
//! admin servers, and the shutdown sequence. The binary and the tests both
//! start the sidecar through [`start`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::admin::{Admin, RouteInfo};
use crate::config::{Config, CredentialsConfig};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::proxy::RouteSpec;
use crate::serve::Server;
use crate::token::client::{HttpTokenClient, TokenEndpoint};
use crate::token::{refresher, GrantKind, Profile, TokenHandle};

/// Name of the runtime's threads (at most 15 bytes: Linux truncates
/// `/proc/PID/task/TID/comm` there).
pub const WORKER_THREAD_NAME: &str = "sidecar-worker";

/// How many runtime worker threads to start, and why that many.
///
/// `runtime.worker_threads` when not 0 (the default is 1); with 0,
/// `std::thread::available_parallelism`, which on Linux is the affinity mask
/// (cpuset, `taskset`) capped by the cgroup CPU quota, v2 `cpu.max` or v1
/// `cpu.cfs_quota_us / cpu.cfs_period_us`, rounded down and at least 1. So a
/// pod with `limits.cpu: 500m` on a 64-core node runs one worker, not 64.
pub fn worker_threads(configured: usize) -> (usize, &'static str) {
    if configured > 0 {
        return (configured, "runtime.worker_threads");
    }
    match std::thread::available_parallelism() {
        Ok(n) => (n.get(), "cpu quota and affinity"),
        Err(_) => (1, "unknown parallelism: 1"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("credentials {profile}: cannot build the token endpoint client")]
    Client {
        profile: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot set up the upstream client")]
    Upstream(#[source] crate::proxy::BuildError),
}

/// A running sidecar.
pub struct Running {
    /// The addresses of `proxy.listen`.
    pub proxy_addrs: Vec<SocketAddr>,
    /// The addresses of the routes that have one of their own.
    pub route_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    /// The credentials profiles, in the order of the configuration.
    pub profiles: Vec<Arc<Profile>>,
    pub metrics: Arc<Metrics>,
    pub lifecycle: Arc<Lifecycle>,
    proxy_server: Server,
    admin_server: Server,
    refreshers: Vec<JoinHandle<()>>,
    drain_delay: Duration,
    grace: Duration,
}

/// Starts against the token endpoint the config names.
pub async fn start(config: &Config) -> Result<Running, StartError> {
    start_in(config, Arc::new(Lifecycle::new())).await
}

/// Like [`start`], with a lifecycle made beforehand: the binary installs its
/// signal handlers on it first, so a SIGTERM that arrives while the sidecar
/// starts drains it instead of killing it.
pub async fn start_in(config: &Config, lifecycle: Arc<Lifecycle>) -> Result<Running, StartError> {
    let mut endpoints = Vec::new();
    for profile in &config.credentials {
        let tls = crate::tls::client_config(profile.ca_file.as_deref())?;
        let endpoint =
            HttpTokenClient::new(profile.clone(), tls).map_err(|source| StartError::Client {
                profile: profile.name.clone(),
                source,
            })?;
        endpoints.push(endpoint);
    }
    start_inner(config, endpoints, lifecycle).await
}

/// Starts with any token endpoints, one made by `endpoint` for each
/// credentials profile (tests use in-memory ones).
pub async fn start_with<E: TokenEndpoint>(
    config: &Config,
    endpoint: impl FnMut(&CredentialsConfig) -> E,
) -> Result<Running, StartError> {
    let endpoints = config.credentials.iter().map(endpoint).collect();
    start_inner(config, endpoints, Arc::new(Lifecycle::new())).await
}

/// `endpoints`: one per credentials profile, in the configuration's order.
async fn start_inner<E: TokenEndpoint>(
    config: &Config,
    endpoints: Vec<E>,
    lifecycle: Arc<Lifecycle>,
) -> Result<Running, StartError> {
    // Bind first: a port in use must fail start-up before any token request.
    let mut proxy_listeners = Vec::new();
    for addr in &config.proxy.listen {
        match TcpListener::bind(addr).await {
            Ok(l) => proxy_listeners.push(l),
            // A pod without IPv6 has no [::1]: serve on the other loopback.
            Err(e) if addr.is_ipv6() && config.proxy.listen.len() > 1 && ipv6_unavailable(&e) => {
                warn!(%addr, error = %e, "IPv6 loopback unavailable; not listening there");
            }
            Err(source) => {
                return Err(StartError::Bind {
                    addr: *addr,
                    source,
                })
            }
        }
    }
    // Routes served on an address of their own.
    let mut route_listeners = Vec::new();
    for route in &config.routes {
        if let Some(addr) = route.listen {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })?;
            route_listeners.push((addr, listener));
        }
    }
    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.admin.listen,
            source,
        })?;
    let proxy_addrs: Vec<SocketAddr> = proxy_listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.admin.listen,
            source,
        })?;

    let metrics = Arc::new(Metrics::new());
    // One token task per credentials profile.
    let mut profiles = Vec::new();
    let mut refreshers = Vec::new();
    for (profile, endpoint) in config.credentials.iter().zip(endpoints) {
        let settings = refresher::Settings::from_profile(profile, &config.refresh);
        let (token, task) = refresher::spawn(endpoint, settings, &metrics, fastrand::f64);
        refreshers.push(task);
        profiles.push(Arc::new(Profile {
            name: profile.name.clone(),
            table: profile.table.clone(),
            grant: GrantKind::of(&profile.login),
            required: profile.required,
            routes: config
                .routes
                .iter()
                .filter(|r| r.credentials == profile.name)
                .map(|r| r.name.clone())
                .collect(),
            token,
        }));
    }

    // Each route with its profile's token (validation saw that it exists).
    let specs = config
        .routes
        .iter()
        .filter_map(|route| {
            let profile = profiles.iter().find(|p| p.name == route.credentials)?;
            Some(RouteSpec {
                config: route.clone(),
                token: profile.token.clone(),
            })
        })
        .collect();
    let listeners =
        crate::proxy::build(&config.proxy, specs, &metrics).map_err(StartError::Upstream)?;
    let mut proxy_server = Server::new();
    let opts = crate::proxy::serve_options(&config.proxy);
    let mut route_addrs = Vec::new();
    for group in listeners {
        match group.listen {
            None => {
                for listener in std::mem::take(&mut proxy_listeners) {
                    proxy_server.spawn_handler(listener, opts.clone(), group.proxy.clone());
                }
            }
            Some(addr) => {
                if let Some(i) = route_listeners.iter().position(|(a, _)| *a == addr) {
                    let (_, listener) = route_listeners.swap_remove(i);
                    if let Ok(local) = listener.local_addr() {
                        route_addrs.push(local);
                    }
                    proxy_server.spawn_handler(listener, opts.clone(), group.proxy.clone());
                }
            }
        }
    }

    let mut admin_server = Server::new();
    Admin {
        profiles: profiles.clone(),
        routes: config
            .routes
            .iter()
            .map(|r| RouteInfo::new(r, &metrics))
            .collect(),
        metrics: metrics.clone(),
        lifecycle: lifecycle.clone(),
        allow_remote_control: config.admin.allow_remote_control,
    }
    .spawn(&mut admin_server, admin_listener);
    for route in &config.routes {
        info!(route = route.name.as_str(), prefix = route.prefix.as_str(),
            upstream = %route.upstream, credentials = route.credentials.as_str(),
            listen = route.listen.map(|a| a.to_string()), "route");
    }
    info!(proxy = ?proxy_addrs, routes = ?route_addrs, admin = %admin_addr, "listening");
    Ok(Running {
        proxy_addrs,
        route_addrs,
        admin_addr,
        profiles,
        metrics,
        lifecycle,
        proxy_server,
        admin_server,
        refreshers,
        drain_delay: config.shutdown.drain_delay,
        grace: config.shutdown.grace,
    })
}

fn ipv6_unavailable(e: &io::Error) -> bool {
    // EADDRNOTAVAIL (99) or EAFNOSUPPORT (97) on Linux.
    matches!(e.raw_os_error(), Some(97) | Some(99))
}

impl Running {
    /// The token of the credentials profile `name`, if there is one.
    pub fn token(&self, name: &str) -> Option<&Arc<TokenHandle>> {
        self.profiles
            .iter()
            .find(|p| p.name == name)
            .map(|p| &p.token)
    }

    /// Runs until shutdown begins (signal or `POST /admin/shutdown`), then:
    /// `/readyz` is already 503; keep accepting for `shutdown.drain_delay`;
    /// stop accepting; give in-flight requests `shutdown.grace`; return.
    pub async fn run_until_shutdown(self) {
        self.lifecycle.draining().await;
        self.shutdown_now().await;
    }

    /// The shutdown sequence, without waiting for a trigger.
    pub async fn shutdown_now(self) {
        self.lifecycle.begin_shutdown("shutdown requested");
        if !self.drain_delay.is_zero() {
            info!(
                drain_delay_ms = self.drain_delay.as_millis() as u64,
                "still accepting during the drain delay"
            );
            tokio::time::sleep(self.drain_delay).await;
        }
        info!(
            grace_ms = self.grace.as_millis() as u64,
            "stopped accepting; waiting for in-flight requests"
        );
        let clean = self.proxy_server.shutdown(self.grace).await;
        if clean {
            info!("all requests finished");
        } else {
            warn!("grace period over; closing the remaining connections");
        }
        self.admin_server.shutdown(Duration::from_millis(100)).await;
        for task in &self.refreshers {
            task.abort();
        }
    }
}

/// SIGTERM or SIGINT begins the shutdown; a second one exits at once with
/// status 128 + the signal number (after writing the log lines that wait).
///
/// SIGHUP, which operators send to nginx or Vault Agent for a reload, would
/// otherwise kill the process on the spot (its default action). Nothing here
/// needs it: the config is read at start only, secret files are re-read on
/// every grant and a `ca_file` at each new TLS connection. So it is answered
/// with one line saying that.
pub fn install_signal_handlers(lifecycle: Arc<Lifecycle>) -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        // Signal numbers as on Linux (and every Unix this runs on).
        const SIGINT: i32 = 2;
        const SIGTERM: i32 = 15;
        let mut count = 0;
        loop {
            let (name, number) = tokio::select! {
                _ = term.recv() => ("SIGTERM", SIGTERM),
                _ = int.recv() => ("SIGINT", SIGINT),
                _ = hup.recv() => {
                    info!(
                        signal = "SIGHUP",
                        "SIGHUP changes nothing: the configuration is read at start only (restart to apply a change); \
                         secret files are re-read on every grant and ca_file at each new TLS connection"
                    );
                    continue;
                }
            };
            count += 1;
            if count == 1 {
                lifecycle.begin_shutdown(name);
            } else {
                // The shell's convention for "killed by signal N": 143, 130.
                let code = 128 + number;
                warn!(
                    signal = name,
                    exit_code = code,
                    "second signal: exiting now"
                );
                // process::exit runs no destructor: write what waits first.
                crate::logging::flush();
                std::process::exit(code);
            }
        }
    });
    Ok(())
}
