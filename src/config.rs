//! Configuration: one TOML file, overridden by `TOKEN_SIDECAR_<SECTION>__<KEY>`
//! environment variables (`TOKEN_SIDECAR_<SECTION>__<NAME>__<KEY>` for the
//! keys of a named route or credentials profile), read with figment.
//!
//! Two forms say where requests go. The single-upstream form
//! (`proxy.upstream` with `[oauth]`) is one route, `default`, for `/`, with
//! one credentials profile, `default`. The routes form names any number of
//! `[credentials.NAME]` profiles (token sources) and `[route.NAME]` routes
//! (a prefix, an upstream and the profile whose token it gets). A file uses
//! one form or the other, never both.
//!
//! The loader reads key by key instead of deserializing whole structs, so that
//! one pass reports *every* problem (serde's derive stops at the first), each
//! naming its key and its source (the file or the exact variable). Every key the
//! loader asks for is recorded, and whatever else the merged document holds is
//! reported as unknown: the list of keys exists once, here, in [`load_figment`]'s
//! readers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::value::Value;
use figment::Figment;
use secrecy::SecretString;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use url::Url;

use crate::secret::SecretSource;

/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "TOKEN_SIDECAR_";
/// Environment variable naming the config file when `--config` is not given.
pub const ENV_CONFIG_PATH: &str = "TOKEN_SIDECAR_CONFIG";

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: ProxyConfig,
    /// Where requests go: at least one route. The single-upstream form
    /// (`proxy.upstream` with `[oauth]`) is one route, `default`, for `/`.
    pub routes: Vec<RouteConfig>,
    /// The token sources: at least one. The single-upstream form's
    /// `[oauth]` is one profile, `default`.
    pub credentials: Vec<CredentialsConfig>,
    /// The file uses the single-upstream form.
    pub single_upstream: bool,
    pub admin: AdminConfig,
    pub refresh: RefreshConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
    pub runtime: RuntimeConfig,
}

/// The listener and the settings every route shares; the per-route keys
/// here (`allow_paths`, `retry_on_401`, `retry_body_limit`,
/// `request_timeout`, `forwarded_headers`, `ca_file`) are the defaults of
/// the routes that do not set them.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: Vec<SocketAddr>,
    pub connect_timeout: Duration,
    /// Until the upstream's response headers arrive.
    pub request_timeout: Duration,
    /// No byte in either direction for this long ends a body transfer.
    pub body_idle_timeout: Duration,
    /// How long an idle client keep-alive connection is kept open.
    pub client_idle_timeout: Duration,
    /// How long an idle pooled upstream connection is kept.
    pub pool_idle_timeout: Duration,
    pub max_connections: usize,
    /// How long a request waits for a first (or replacement) token.
    pub token_wait: Duration,
    pub retry_on_401: RetryOn401,
    pub retry_body_limit: usize,
    pub forwarded_headers: bool,
    /// Percent-decoded path prefixes; empty means every path.
    pub allow_paths: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub access_log: bool,
    /// Serve plain HTTP/1.1 exchanges with the fast lane; `false`: hyper
    /// serves everything.
    pub fast_lane: bool,
}

/// One route: requests whose raw path starts with `prefix` go to
/// `upstream`, with the token of the `credentials` profile.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// The route's name, in metrics and logs.
    pub name: String,
    /// Starts and ends with `/`; the longest matching prefix wins.
    pub prefix: String,
    /// Base URL; its path always ends in `/`.
    pub upstream: Url,
    /// The credentials profile whose token the route injects.
    pub credentials: String,
    /// This route alone, on an address of its own (else `proxy.listen`).
    pub listen: Option<SocketAddr>,
    /// Percent-decoded path prefixes, matched against `/` plus the path
    /// after the route's prefix; empty means every path.
    pub allow_paths: Vec<String>,
    pub retry_on_401: RetryOn401,
    pub retry_body_limit: usize,
    /// Until the upstream's response headers arrive.
    pub request_timeout: Duration,
    pub forwarded_headers: bool,
    pub ca_file: Option<PathBuf>,
}

impl RouteConfig {
    /// The route the single-upstream form means: `default`, for `/`, to
    /// `proxy.upstream`, with the `[proxy]` settings.
    pub fn single(upstream: Url, proxy: &ProxyConfig) -> RouteConfig {
        RouteConfig {
            name: DEFAULT_NAME.into(),
            prefix: "/".into(),
            upstream,
            credentials: DEFAULT_NAME.into(),
            listen: None,
            allow_paths: proxy.allow_paths.clone(),
            retry_on_401: proxy.retry_on_401,
            retry_body_limit: proxy.retry_body_limit,
            request_timeout: proxy.request_timeout,
            forwarded_headers: proxy.forwarded_headers,
            ca_file: proxy.ca_file.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub allow_remote_control: bool,
}

/// The name of the one route and the one credentials profile of the
/// single-upstream form.
pub const DEFAULT_NAME: &str = "default";

/// One credentials profile: a token endpoint, a client and the grant to
/// log in with. Each has a token task of its own.
#[derive(Debug, Clone)]
pub struct CredentialsConfig {
    /// The profile's name, in metrics, logs and `/status`.
    pub name: String,
    /// Where its keys are in the configuration: `oauth` in the
    /// single-upstream form, else `credentials.NAME`. Error hints and
    /// secret file counters name keys under it.
    pub table: String,
    pub login: Login,
    /// Whether `/readyz` waits for this profile's token (when a route uses it).
    pub required: bool,
    pub token_url: Url,
    pub client_id: String,
    pub client_secret: SecretSource,
    pub params_in: ParamsIn,
    pub client_auth: ClientAuth,
    pub scope: String,
    pub timeout: Duration,
    pub default_lifetime: Duration,
    pub ca_file: Option<PathBuf>,
    pub extra_params: BTreeMap<String, String>,
}

/// The grant a profile logs in with, and what only that grant needs.
#[derive(Debug, Clone)]
pub enum Login {
    /// RFC 6749 4.3, the resource owner password credentials grant: the
    /// backoffice user's name and password.
    Password {
        username: String,
        password: SecretSource,
    },
    /// RFC 6749 4.4: the client authenticates as itself, no user.
    ClientCredentials,
}

/// The `grant` key of a credentials profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum GrantChoice {
    Password,
    ClientCredentials,
}

#[derive(Debug, Clone)]
pub struct RefreshConfig {
    pub min_remaining: Duration,
    pub min_interval: Duration,
    /// `None`: the smaller of 5 s and 10% of the lifetime.
    pub expiry_margin: Option<Duration>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Cap on the transient backoff while no usable token is held, so that
    /// traffic resumes soon after the token endpoint comes back.
    pub backoff_max_without_token: Duration,
    pub rejected_backoff_min: Duration,
    pub rejected_backoff_max: Duration,
    /// How often secret files are checked for a change while logins are refused.
    pub secret_poll_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    pub drain_delay: Duration,
    pub grace: Duration,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Default 1: one worker gives the best tail latency on CPUs shared with
    /// the app and is far above a sidecar's usual load (`docs/performance.md`).
    /// 0: the cgroup's CPU quota (or the host's cores when there is none).
    pub worker_threads: usize,
}

/// Where the grant parameters go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamsIn {
    /// In the URL query string, as PaymentIQ documents it.
    Query,
    /// In an `application/x-www-form-urlencoded` body (RFC 6749).
    Form,
}

/// How the client authenticates to the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ClientAuth {
    /// HTTP Basic with the raw `id:secret`, what Spring expects.
    #[serde(rename = "basic")]
    Basic,
    /// HTTP Basic with id and secret form-urlencoded first (RFC 6749 2.3.1).
    #[serde(rename = "basic-rfc")]
    BasicRfc,
    /// `client_id` and `client_secret` sent with the other parameters.
    #[serde(rename = "body")]
    Body,
}

/// Which upstream 401 answers make the proxy fetch a new token and replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn401 {
    /// A 401 whose `WWW-Authenticate` says `error="invalid_token"`.
    InvalidToken,
    Any,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when standard output is not a terminal, text when it is.
    Auto,
    Json,
    Text,
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `oauth.timeout`.
    pub key: String,
    /// Where the value came from: `config.toml`, `environment variable X`, ...
    pub source: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.key, self.source, self.message)
    }
}

/// Every problem found in one pass, and the warnings found beside them
/// (a misnamed variable often explains a missing key).
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
    pub warnings: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{n} configuration problem{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// A valid configuration and the warnings it deserves.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}

/// The config path: `--config`, else `$TOKEN_SIDECAR_CONFIG`, else `config.toml`.
pub fn resolve_path(cli: Option<PathBuf>) -> PathBuf {
    cli.or_else(|| std::env::var_os(ENV_CONFIG_PATH).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("config.toml"))
}

/// Loads the file at `path` with the process environment merged over it.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    if !path.is_file() {
        return Err(ConfigError {
            problems: vec![Problem {
                key: "(file)".into(),
                source: path.display().to_string(),
                message: "config file not found or not a regular file".into(),
            }],
            warnings: Vec::new(),
        });
    }
    let names: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .collect();
    load_with_env(figment(path), &names)
}

/// The figment: the TOML file, then two-part `TOKEN_SIDECAR_<SECTION>__<KEY>`
/// variables. One-part ones (`TOKEN_SIDECAR_CONFIG`, and the
/// `TOKEN_SIDECAR_SERVICE_HOST`/`_PORT` that Kubernetes injects for a Service
/// named `token-sidecar`) are not config and are left out.
pub fn figment(path: &Path) -> Figment {
    Figment::new().merge(Toml::file_exact(path)).merge(
        Env::prefixed(ENV_PREFIX)
            .filter(|k| k.as_str().contains("__"))
            .split("__"),
    )
}

/// Validates a figment (the file plus environment, or anything a test builds).
pub fn load_figment(fig: Figment) -> Result<Loaded, ConfigError> {
    load_with_env(fig, &[])
}

/// Validates a figment, and warns about each of the environment variables
/// `env_names` that looks meant for the sidecar but is not read.
pub fn load_with_env(fig: Figment, env_names: &[String]) -> Result<Loaded, ConfigError> {
    // A provider that failed (a TOML syntax error) makes every key look
    // unset: report the failure itself, not a list of "is required".
    if let Err(e) = figment::Provider::data(&fig) {
        return Err(ConfigError {
            problems: vec![Problem {
                key: "(file)".into(),
                source: e
                    .metadata
                    .as_ref()
                    .and_then(|m| m.source.as_ref())
                    .map_or_else(|| "TOML file".into(), |s| s.to_string()),
                message: without_source_lines(&e.kind.to_string()),
            }],
            warnings: Vec::new(),
        });
    }
    let mut r = Reader::new(&fig);

    // Defaults stand next to the key they belong to; README and config.toml
    // document the same values.
    let proxy_listen = r.listen("proxy.listen", &["127.0.0.1:7080", "[::1]:7080"]);
    let proxy = ProxyConfig {
        listen: proxy_listen,
        connect_timeout: r.duration("proxy.connect_timeout", "5s"),
        request_timeout: r.duration("proxy.request_timeout", "60s"),
        body_idle_timeout: r.duration("proxy.body_idle_timeout", "60s"),
        client_idle_timeout: r.duration("proxy.client_idle_timeout", "90s"),
        pool_idle_timeout: r.duration("proxy.pool_idle_timeout", "90s"),
        max_connections: r.positive("proxy.max_connections", 4096),
        token_wait: r.duration("proxy.token_wait", "10s"),
        retry_on_401: r.value("proxy.retry_on_401", RetryOn401::InvalidToken),
        retry_body_limit: r.value("proxy.retry_body_limit", 64 * 1024),
        forwarded_headers: r.value("proxy.forwarded_headers", false),
        allow_paths: r.value("proxy.allow_paths", Vec::new()),
        ca_file: r.optional_path("proxy.ca_file"),
        access_log: r.value("proxy.access_log", true),
        fast_lane: r.value("proxy.fast_lane", true),
    };
    let admin = AdminConfig {
        listen: r
            .listen("admin.listen", &["0.0.0.0:7081"])
            .first()
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 7081))),
        allow_remote_control: r.value("admin.allow_remote_control", false),
    };
    if r.list_len("admin.listen") > 1 {
        r.problem("admin.listen", "takes one address");
    }
    let (routes, credentials) = read_routes(&mut r, &proxy);
    let refresh = RefreshConfig {
        min_remaining: r.duration("refresh.min_remaining", "30s"),
        min_interval: r.duration("refresh.min_interval", "1s"),
        expiry_margin: r.optional_duration("refresh.expiry_margin"),
        backoff_base: r.duration("refresh.backoff_base", "1s"),
        backoff_max: r.duration("refresh.backoff_max", "60s"),
        backoff_max_without_token: r.duration("refresh.backoff_max_without_token", "5s"),
        rejected_backoff_min: r.duration("refresh.rejected_backoff_min", "1m"),
        rejected_backoff_max: r.duration("refresh.rejected_backoff_max", "30m"),
        secret_poll_interval: r.duration("refresh.secret_poll_interval", "2s"),
    };
    let shutdown = ShutdownConfig {
        drain_delay: r.duration("shutdown.drain_delay", "0s"),
        grace: r.duration("shutdown.grace", "20s"),
    };
    let log = LogConfig {
        format: r.value("log.format", LogFormat::Auto),
        level: r.string("log.level").unwrap_or_else(|| "info".into()),
    };
    let runtime = RuntimeConfig {
        worker_threads: r.value("runtime.worker_threads", 1),
    };
    let config = Config {
        single_upstream: credentials.first().is_some_and(|p| p.table == "oauth"),
        routes,
        credentials,
        proxy,
        admin,
        refresh,
        shutdown,
        log,
        runtime,
    };
    r.check_semantics(&config);
    r.check_unknown_keys();
    // Named keys as read, and as patterns for names not (correctly) written.
    let patterns: Vec<String> = PROFILE_KEYS
        .iter()
        .map(|k| format!("credentials.*.{k}"))
        .chain(ROUTE_KEYS.iter().map(|k| format!("route.*.{k}")))
        .collect();
    let known: Vec<&str> = r
        .known
        .iter()
        .chain(&patterns)
        .map(String::as_str)
        .collect();
    r.warnings.extend(unread_variables(env_names, &known));
    if r.problems.is_empty() {
        Ok(Loaded {
            config,
            warnings: r.warnings,
        })
    } else {
        Err(ConfigError {
            problems: r.problems,
            warnings: r.warnings,
        })
    }
}

/// The keys of a `[credentials.NAME]` table: today's `[oauth]` keys, plus
/// `grant` and `required`.
pub const PROFILE_KEYS: &[&str] = &[
    "grant",
    "required",
    "token_url",
    "client_id",
    "client_secret",
    "client_secret_file",
    "username",
    "password",
    "password_file",
    "params_in",
    "client_auth",
    "scope",
    "timeout",
    "default_lifetime",
    "ca_file",
    "extra_params",
];

/// The keys of a `[route.NAME]` table; those after `listen` default to the
/// `[proxy]` key of the same name.
pub const ROUTE_KEYS: &[&str] = &[
    "prefix",
    "upstream",
    "credentials",
    "listen",
    "allow_paths",
    "retry_on_401",
    "retry_body_limit",
    "request_timeout",
    "forwarded_headers",
    "ca_file",
];

/// Whether `name` may name a route or a credentials profile:
/// `^[a-z][a-z0-9_]*$`, without `__` and without a trailing `_`, so that
/// `TOKEN_SIDECAR_ROUTE__<NAME>__<KEY>` splits back into exactly the
/// name and the key (`a_` would read as `a` and `_key`).
pub fn is_valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.first().is_some_and(u8::is_ascii_lowercase)
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
        && !name.contains("__")
        && !name.ends_with('_')
}

/// The routes and the credentials profiles, in whichever form the file
/// uses: the single-upstream form (`proxy.upstream` with `[oauth]`), or
/// `[route.NAME]` with `[credentials.NAME]` tables.
fn read_routes(
    r: &mut Reader<'_>,
    proxy: &ProxyConfig,
) -> (Vec<RouteConfig>, Vec<CredentialsConfig>) {
    let route_names = r.table_names("route");
    let profile_names = r.table_names("credentials");
    if route_names.is_none() && profile_names.is_none() {
        let upstream = r.url("proxy.upstream", true);
        let profile = read_profile(r, "oauth", DEFAULT_NAME, false);
        let route = RouteConfig::single(upstream.unwrap_or_else(placeholder_url), proxy);
        return (vec![route], vec![profile]);
    }
    // The routes form: the single-upstream form's keys are an error here,
    // once each, and not also unknown keys.
    for key in ["proxy.upstream", "oauth"] {
        if r.is_set(key) {
            r.known.insert(key.to_owned());
            r.problem(
                key,
                "the single-upstream form (proxy.upstream with [oauth]) cannot be mixed with \
                 [route.NAME] and [credentials.NAME] tables: write the upstream as a route \
                 and [oauth] as a credentials profile",
            );
        }
    }
    let route_names = route_names.unwrap_or_default();
    let profile_names = profile_names.unwrap_or_default();
    for (section, names) in [("route", &route_names), ("credentials", &profile_names)] {
        if names.is_empty() && !r.problems.iter().any(|p| p.key == section) {
            r.missing(
                section,
                format!("at least one [{section}.NAME] table is required"),
            );
        }
    }
    let profiles: Vec<CredentialsConfig> = profile_names
        .iter()
        .map(|name| read_profile(r, &format!("credentials.{name}"), name, true))
        .collect();
    let routes: Vec<RouteConfig> = route_names
        .iter()
        .map(|name| read_route(r, name, proxy))
        .collect();
    (routes, profiles)
}

/// One credentials profile, its keys under `table`; `grant` and
/// `required` are read only in the routes form (`named`).
fn read_profile(r: &mut Reader<'_>, table: &str, name: &str, named: bool) -> CredentialsConfig {
    let key = |k: &str| format!("{table}.{k}");
    let grant = if named {
        r.value(&key("grant"), GrantChoice::Password)
    } else {
        GrantChoice::Password
    };
    let login = match grant {
        GrantChoice::Password => Login::Password {
            username: r.required_string(&key("username")),
            password: r.secret(&key("password"), &key("password_file")),
        },
        GrantChoice::ClientCredentials => {
            for k in ["username", "password", "password_file"] {
                let k = key(k);
                if r.raw(&k).is_some() {
                    r.problem(
                        &k,
                        "the client_credentials grant sends no user: remove it, or set grant = \"password\"",
                    );
                }
            }
            Login::ClientCredentials
        }
    };
    let token_url = r.url(&key("token_url"), false);
    CredentialsConfig {
        name: name.to_owned(),
        table: table.to_owned(),
        login,
        required: if named {
            r.value(&key("required"), true)
        } else {
            true
        },
        token_url: token_url.unwrap_or_else(placeholder_url),
        client_id: r.required_string(&key("client_id")),
        client_secret: r.secret(&key("client_secret"), &key("client_secret_file")),
        params_in: r.value(&key("params_in"), ParamsIn::Form),
        client_auth: r.value(&key("client_auth"), ClientAuth::Basic),
        scope: r.string(&key("scope")).unwrap_or_default(),
        timeout: r.duration(&key("timeout"), "10s"),
        default_lifetime: r.duration(&key("default_lifetime"), "5m"),
        ca_file: r.optional_path(&key("ca_file")),
        extra_params: r.value(&key("extra_params"), BTreeMap::new()),
    }
}

/// One `[route.NAME]`; unset per-route keys take the `[proxy]` values.
fn read_route(r: &mut Reader<'_>, name: &str, proxy: &ProxyConfig) -> RouteConfig {
    let key = |k: &str| format!("route.{name}.{k}");
    let listen = r.address(&key("listen"));
    let prefix = match r.string(&key("prefix")) {
        Some(p) => p,
        None => {
            if !r.is_set(&key("listen")) && !r.is_set(&key("prefix")) {
                r.missing(
                    &key("prefix"),
                    "is required (it defaults to \"/\" only for a route with a listen address of its own)",
                );
            }
            "/".into()
        }
    };
    let upstream = r.url(&key("upstream"), true);
    RouteConfig {
        name: name.to_owned(),
        prefix,
        upstream: upstream.unwrap_or_else(placeholder_url),
        credentials: r.required_string(&key("credentials")),
        listen,
        allow_paths: r.value(&key("allow_paths"), proxy.allow_paths.clone()),
        retry_on_401: r.value(&key("retry_on_401"), proxy.retry_on_401),
        retry_body_limit: r.value(&key("retry_body_limit"), proxy.retry_body_limit),
        request_timeout: r
            .optional_duration(&key("request_timeout"))
            .unwrap_or(proxy.request_timeout),
        forwarded_headers: r.value(&key("forwarded_headers"), proxy.forwarded_headers),
        ca_file: r
            .optional_path(&key("ca_file"))
            .or_else(|| proxy.ca_file.clone()),
    }
}

/// A TOML parse error without the quoted source line (`2 | password = "...`),
/// which would print whatever secret stands on the broken line:
/// `TOML parse error at line 2, column 23: invalid basic string`.
fn without_source_lines(message: &str) -> String {
    message
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            !l.is_empty()
                && !l
                    .trim_start_matches(|c: char| c.is_ascii_digit())
                    .trim_start()
                    .starts_with('|')
        })
        .collect::<Vec<_>>()
        .join(": ")
}

fn placeholder_url() -> Url {
    Url::parse("http://invalid./").expect("static URL parses")
}

/// Reads keys one at a time, recording each key asked for and every problem.
struct Reader<'a> {
    fig: &'a Figment,
    known: BTreeSet<String>,
    problems: Vec<Problem>,
    warnings: Vec<String>,
}

impl<'a> Reader<'a> {
    fn new(fig: &'a Figment) -> Self {
        Reader {
            fig,
            known: BTreeSet::new(),
            problems: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// `config.toml`, `environment variable TOKEN_SIDECAR_OAUTH__PASSWORD`, ...
    fn source(&self, key: &str) -> String {
        match self.fig.find_metadata(key) {
            Some(md) if md.name.contains("environment") => {
                format!("environment variable {}", env_name(key))
            }
            Some(md) => match &md.source {
                Some(src) => src.to_string(),
                None => md.name.to_string(),
            },
            None => "default".into(),
        }
    }

    fn is_from_env(&self, key: &str) -> bool {
        self.fig
            .find_metadata(key)
            .is_some_and(|md| md.name.contains("environment"))
    }

    /// A required key that no source sets (its source would otherwise read
    /// "default", which there is none of).
    fn missing(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            source: "not set".into(),
            message: message.into(),
        });
    }

    fn problem(&mut self, key: &str, message: impl Into<String>) {
        let source = self.source(key);
        self.problems.push(Problem {
            key: key.into(),
            source,
            message: message.into(),
        });
    }

    /// The raw value, if the key is set anywhere.
    fn raw(&mut self, key: &str) -> Option<Value> {
        self.known.insert(key.to_owned());
        self.fig.find_value(key).ok()
    }

    fn typed<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        let v = self.raw(key)?;
        match v.deserialize::<T>() {
            Ok(t) => Some(t),
            Err(e) => {
                self.problem(key, in_user_terms(&e.kind));
                None
            }
        }
    }

    /// Whether any source sets `key` (perhaps to a value of the wrong type,
    /// already reported: it is not "missing" as well).
    fn is_set(&self, key: &str) -> bool {
        self.fig.find_value(key).is_ok()
    }

    fn value<T: DeserializeOwned>(&mut self, key: &str, default: T) -> T {
        self.typed(key).unwrap_or(default)
    }

    /// A string exactly as written. figment parses environment values
    /// (`"007"` would become a number) and trims them, which would corrupt
    /// a password, so a value from the environment is read raw.
    fn string(&mut self, key: &str) -> Option<String> {
        self.raw(key)?;
        if self.is_from_env(key) {
            if let Ok(s) = std::env::var(env_name(key)) {
                return Some(s);
            }
        }
        self.typed::<String>(key)
    }

    fn required_string(&mut self, key: &str) -> String {
        match self.string(key) {
            Some(s) if !s.is_empty() => s,
            Some(_) => {
                self.problem(key, "must not be empty");
                String::new()
            }
            None => {
                if !self.is_set(key) {
                    self.missing(key, "is required");
                }
                String::new()
            }
        }
    }

    fn positive(&mut self, key: &str, default: usize) -> usize {
        let v = self.value(key, default);
        if v == 0 {
            self.problem(key, "must be greater than 0");
            return default;
        }
        v
    }

    fn duration(&mut self, key: &str, default: &str) -> Duration {
        self.optional_duration(key)
            .unwrap_or_else(|| humantime::parse_duration(default).expect("default durations parse"))
    }

    fn optional_duration(&mut self, key: &str) -> Option<Duration> {
        let v = self.raw(key)?;
        let text = match &v {
            Value::String(_, s) => s.clone(),
            _ => {
                self.problem(key, "must be a duration string such as \"30s\" or \"5m\"");
                return None;
            }
        };
        match humantime::parse_duration(&text) {
            Ok(d) => Some(d),
            Err(e) => {
                self.problem(
                    key,
                    format!("invalid duration {text:?} ({e}); use e.g. \"30s\", \"5m\""),
                );
                None
            }
        }
    }

    fn optional_path(&mut self, key: &str) -> Option<PathBuf> {
        let p = self.string(key).map(PathBuf::from)?;
        if !p.is_file() {
            self.problem(key, format!("{} is not a readable file", p.display()));
        }
        Some(p)
    }

    /// The names of the `[section.NAME]` tables the file has, or `None`
    /// when it has none (the section absent, or made of environment
    /// variables alone, each reported: a variable overrides a route's or a
    /// profile's keys but cannot create one).
    fn table_names(&mut self, section: &str) -> Option<Vec<String>> {
        let what = match section {
            "route" => "route",
            _ => "credentials profile",
        };
        let value = self.fig.find_value(section).ok()?;
        let Value::Dict(_, tables) = value else {
            self.known.insert(section.to_owned());
            self.problem(section, format!("must be tables: [{section}.NAME]"));
            return Some(Vec::new());
        };
        let mut names = Vec::new();
        for (name, value) in &tables {
            let key = format!("{section}.{name}");
            let mut leaves = Vec::new();
            leaf_keys(key.clone(), value, &mut leaves);
            if !leaves.is_empty() && leaves.iter().all(|l| self.is_from_env(l)) {
                let mut sources: Vec<String> = leaves.iter().map(|l| self.source(l)).collect();
                sources.sort();
                sources.dedup();
                self.problems.push(Problem {
                    key: key.clone(),
                    source: sources.join(", "),
                    message: format!(
                        "an environment variable cannot create a {what}: the file has no [{key}] \
                         (variables override the keys of the {what}s the file has)"
                    ),
                });
                self.known.insert(key);
                continue;
            }
            if !matches!(value, Value::Dict(..)) {
                self.known.insert(key.clone());
                self.problem(&key, format!("must be a table: [{key}]"));
                continue;
            }
            if !is_valid_name(name) {
                self.problem(
                    &key,
                    format!(
                        "{name:?} is not a valid {what} name: lower-case letters, digits and single \
                         underscores, starting with a letter and not ending with an underscore \
                         (so that TOKEN_SIDECAR_{}__<NAME>__<KEY> can address it)",
                        section.to_ascii_uppercase()
                    ),
                );
            }
            names.push(name.clone());
        }
        if names.is_empty() && self.is_from_env(section) {
            return None;
        }
        if names.is_empty() {
            // An empty `[route]` table: reported as missing its routes, not
            // also as an unknown section.
            self.known.insert(section.to_owned());
        }
        Some(names)
    }

    /// One `IP:port` address, if set.
    fn address(&mut self, key: &str) -> Option<SocketAddr> {
        let text = self.string(key)?;
        match text.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    key,
                    format!("{text:?} is not an IP:port address (e.g. \"127.0.0.1:7082\")"),
                );
                None
            }
        }
    }

    fn list_len(&mut self, key: &str) -> usize {
        match self.fig.find_value(key) {
            Ok(Value::Array(_, a)) => a.len(),
            _ => 1,
        }
    }

    fn listen(&mut self, key: &str, default: &[&str]) -> Vec<SocketAddr> {
        let parsed = match self.raw(key) {
            None => None,
            Some(v) => match v.deserialize::<OneOrMany>() {
                Ok(p) => Some(p),
                Err(_) => {
                    self.problem(
                        key,
                        "must be an address in quotes (\"127.0.0.1:7080\") or a list of them",
                    );
                    return Vec::new();
                }
            },
        };
        let texts = match parsed {
            Some(OneOrMany::One(s)) => vec![s],
            Some(OneOrMany::Many(v)) => v,
            None => default.iter().map(|s| s.to_string()).collect(),
        };
        if texts.is_empty() {
            self.problem(key, "needs at least one address");
        }
        let mut out = Vec::new();
        for t in texts {
            match t.parse::<SocketAddr>() {
                Ok(a) => out.push(a),
                Err(_) => self.problem(
                    key,
                    format!(
                        "{t:?} is not an IP:port address (e.g. \"127.0.0.1:7080\", \"[::1]:7080\")"
                    ),
                ),
            }
        }
        out
    }

    fn url(&mut self, key: &str, is_base: bool) -> Option<Url> {
        let Some(text) = self.string(key) else {
            if !self.is_set(key) {
                self.missing(key, "is required");
            }
            return None;
        };
        let mut url = match Url::parse(&text) {
            Ok(u) => u,
            Err(e) => {
                self.problem(key, format!("{text:?} is not a valid URL: {e}"));
                return None;
            }
        };
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            self.problem(
                key,
                format!("{text:?} must be an http:// or https:// URL with a host"),
            );
            return None;
        }
        if !url.username().is_empty() || url.password().is_some() {
            self.problem(key, "must not carry credentials; use the oauth keys");
            return None;
        }
        if is_base {
            if url.query().is_some() || url.fragment().is_some() {
                self.problem(key, "a base URL takes no query or fragment");
                return None;
            }
            if !url.path().ends_with('/') {
                let p = format!("{}/", url.path());
                url.set_path(&p);
            }
        }
        Some(url)
    }

    /// A secret's text. Unlike [`Reader::string`], a value of the wrong type
    /// is reported without quoting it: serde's message would print an
    /// unquoted numeric password (`password = 20240101`) in full. The empty
    /// string stands in, so the key is not also reported as missing.
    fn secret_string(&mut self, key: &str) -> Option<String> {
        let v = self.raw(key)?;
        if self.is_from_env(key) {
            if let Ok(s) = std::env::var(env_name(key)) {
                return Some(s);
            }
        }
        match v {
            Value::String(_, s) => Some(s),
            _ => {
                self.problem(
                    key,
                    "must be a string (put the value in quotes); the value is not shown since it is a secret",
                );
                Some(String::new())
            }
        }
    }

    /// Exactly one of `inline_key` and `file_key`.
    fn secret(&mut self, inline_key: &str, file_key: &str) -> SecretSource {
        let inline = self.secret_string(inline_key);
        let file = self.string(file_key);
        match (inline, file) {
            (Some(_), Some(_)) => {
                let (a, b) = (self.source(inline_key), self.source(file_key));
                self.problems.push(Problem {
                    key: inline_key.into(),
                    source: if a == b { a } else { format!("{a} and {b}") },
                    message: format!("set both {inline_key} and {file_key}; set exactly one"),
                });
                SecretSource::Inline(SecretString::from(String::new()))
            }
            (None, None) => {
                self.missing(inline_key, format!("set {inline_key} or {file_key}"));
                SecretSource::Inline(SecretString::from(String::new()))
            }
            (Some(v), None) => {
                if !self.is_from_env(inline_key) {
                    self.warnings.push(format!(
                        "{inline_key} is written inline in {}: prefer {file_key} or the environment variable {}",
                        self.source(inline_key),
                        env_name(inline_key)
                    ));
                }
                SecretSource::Inline(SecretString::from(v))
            }
            (None, Some(path)) => {
                let src = SecretSource::File(PathBuf::from(path));
                if let Err(e) = src.load() {
                    self.problem(file_key, e.describe());
                }
                src
            }
        }
    }

    fn check_semantics(&mut self, c: &Config) {
        let r = &c.refresh;
        if r.min_interval.is_zero() {
            self.problem("refresh.min_interval", "must be greater than 0");
        }
        if r.backoff_base.is_zero() || r.backoff_base > r.backoff_max {
            self.problem(
                "refresh.backoff_base",
                "must be greater than 0 and at most refresh.backoff_max",
            );
        }
        if r.rejected_backoff_min.is_zero() || r.rejected_backoff_min > r.rejected_backoff_max {
            self.problem(
                "refresh.rejected_backoff_min",
                "must be greater than 0 and at most refresh.rejected_backoff_max",
            );
        }
        if r.backoff_max_without_token.is_zero() {
            self.problem(
                "refresh.backoff_max_without_token",
                "must be greater than 0",
            );
        }
        if r.secret_poll_interval.is_zero() {
            self.problem("refresh.secret_poll_interval", "must be greater than 0");
        }
        for (key, d) in [
            ("proxy.connect_timeout", c.proxy.connect_timeout),
            ("proxy.request_timeout", c.proxy.request_timeout),
            ("proxy.body_idle_timeout", c.proxy.body_idle_timeout),
        ] {
            if d.is_zero() {
                self.problem(key, "must be greater than 0");
            }
        }
        for p in &c.proxy.allow_paths {
            if !p.starts_with('/') {
                self.problem("proxy.allow_paths", format!("{p:?} must start with '/'"));
            }
        }
        if c.log.level.trim().is_empty()
            || tracing_subscriber::EnvFilter::try_new(&c.log.level).is_err()
        {
            self.problem(
                "log.level",
                format!(
                    "{:?} is not a level or filter (e.g. \"info\", \"token_sidecar=debug\")",
                    c.log.level
                ),
            );
        }
        for a in &c.proxy.listen {
            if !a.ip().is_loopback() {
                self.warnings.push(format!(
                    "proxy.listen {a} is not a loopback address: whoever reaches it acts as the backoffice user"
                ));
            }
        }
        if c.admin.listen.port() != 0 && c.proxy.listen.contains(&c.admin.listen) {
            self.problem(
                "admin.listen",
                "must differ from every proxy.listen address",
            );
        }
        self.check_profiles(c);
        self.check_routes(c);
    }

    fn check_profiles(&mut self, c: &Config) {
        for p in &c.credentials {
            let key = |k: &str| format!("{}.{k}", p.table);
            for (k, d) in [
                ("timeout", p.timeout),
                ("default_lifetime", p.default_lifetime),
            ] {
                if d.is_zero() {
                    self.problem(&key(k), "must be greater than 0");
                }
            }
            if p.params_in == ParamsIn::Query {
                let what = match p.login {
                    Login::Password { .. } => Some("the password"),
                    Login::ClientCredentials if p.client_auth == ClientAuth::Body => {
                        Some("the client secret")
                    }
                    Login::ClientCredentials => None,
                };
                if let Some(what) = what {
                    self.warnings.push(format!(
                        "{} = \"query\" puts {what} in the token URL, where gateways' access logs can keep it",
                        key("params_in")
                    ));
                }
            }
            if !c.routes.iter().any(|r| r.credentials == p.name) {
                self.warnings.push(format!(
                    "{}: no route uses this credentials profile; its token is obtained and kept but never sent",
                    p.table
                ));
            }
        }
    }

    fn check_routes(&mut self, c: &Config) {
        if c.single_upstream {
            return; // one route for "/", made of keys checked as [proxy]'s
        }
        let profiles: Vec<&str> = c.credentials.iter().map(|p| p.name.as_str()).collect();
        for (i, route) in c.routes.iter().enumerate() {
            let key = |k: &str| format!("route.{}.{k}", route.name);
            if !(route.prefix.starts_with('/') && route.prefix.ends_with('/')) {
                self.problem(
                    &key("prefix"),
                    format!(
                        "{:?} must start and end with '/' (e.g. \"/merchants/\")",
                        route.prefix
                    ),
                );
            }
            if !route.credentials.is_empty() && !profiles.contains(&route.credentials.as_str()) {
                let mut m = format!(
                    "{:?} is not a credentials profile (profiles: {})",
                    route.credentials,
                    profiles.join(", ")
                );
                if let Some(near) = nearest(&route.credentials, profiles.iter().copied()) {
                    m.push_str(&format!(": did you mean {near:?}?"));
                }
                self.problem(&key("credentials"), m);
            }
            if route.request_timeout.is_zero() {
                self.problem(&key("request_timeout"), "must be greater than 0");
            }
            for p in &route.allow_paths {
                if !p.starts_with('/') {
                    self.problem(&key("allow_paths"), format!("{p:?} must start with '/'"));
                }
            }
            if let Some(a) = route.listen {
                if a.port() != 0 {
                    if c.proxy.listen.contains(&a) || c.admin.listen == a {
                        self.problem(
                            &key("listen"),
                            format!("{a} is also a proxy.listen or admin.listen address"),
                        );
                    }
                    if let Some(other) = c.routes[..i].iter().find(|o| o.listen == Some(a)) {
                        self.problem(
                            &key("listen"),
                            format!("{a} is also the listen address of route {}", other.name),
                        );
                    }
                }
                if !a.ip().is_loopback() {
                    self.warnings.push(format!(
                        "{} {a} is not a loopback address: whoever reaches it acts as the user of credentials {}",
                        key("listen"),
                        route.credentials
                    ));
                }
            } else if let Some(other) = c.routes[..i]
                .iter()
                .find(|o| o.listen.is_none() && o.prefix == route.prefix)
            {
                self.problem(
                    &key("prefix"),
                    format!(
                        "{:?} is also the prefix of route {} on the same listener (proxy.listen)",
                        route.prefix, other.name
                    ),
                );
            }
        }
    }

    /// Every key in the merged document that no reader asked for.
    fn check_unknown_keys(&mut self) {
        let Ok(root) = self.fig.extract::<BTreeMap<String, Value>>() else {
            return;
        };
        let mut unknown = Vec::new();
        for (k, v) in &root {
            self.walk(k.clone(), v, &mut unknown);
        }
        for (key, value) in unknown {
            let is_section =
                !self.known.iter().any(|k| k.starts_with(&format!("{key}."))) && !key.contains('.');
            // An unknown table's own name is no variable anyone set: name the
            // sources of what it holds (`TOKEN_SIDECAR_NOPE__X`, the file).
            let mut leaves = Vec::new();
            leaf_keys(key.clone(), value, &mut leaves);
            let from_env = leaves.iter().all(|l| self.is_from_env(l));
            let mut sources: Vec<String> = leaves.iter().map(|l| self.source(l)).collect();
            sources.sort();
            sources.dedup();
            let message = if is_section {
                let sections: BTreeSet<&str> = self
                    .known
                    .iter()
                    .filter_map(|k| k.split_once('.'))
                    .map(|(s, _)| s)
                    .collect();
                match nearest(&key, sections) {
                    Some(near) if from_env => format!(
                        "unknown section: did you mean {}?",
                        env_name(&leaves[0].replacen(&key, near, 1))
                    ),
                    Some(near) => format!("unknown section: did you mean [{near}]?"),
                    None => "unknown section".into(),
                }
            } else {
                match self.near_key(&key) {
                    Some(near) if from_env => {
                        format!("unknown key: did you mean {}?", env_name(&near))
                    }
                    Some(near) => format!("unknown key: did you mean {near}?"),
                    None => "unknown key".into(),
                }
            };
            self.problems.push(Problem {
                key,
                source: sources.join(", "),
                message,
            });
        }
    }

    /// A known key that `key` probably meant: a near miss in the same
    /// section, else the same name in another section.
    fn near_key(&self, key: &str) -> Option<String> {
        let (section, name) = key.rsplit_once('.')?;
        let in_section: Vec<(&str, &str)> = self
            .known
            .iter()
            .filter_map(|k| k.rsplit_once('.').map(|(s, n)| (s, n, k.as_str())))
            .filter(|(s, _, _)| *s == section)
            .map(|(_, n, k)| (n, k))
            .collect();
        if let Some(near) = nearest(name, in_section.iter().map(|(n, _)| *n)) {
            return in_section
                .iter()
                .find(|(n, _)| *n == near)
                .map(|(_, k)| k.to_string());
        }
        self.known
            .iter()
            .find(|k| k.rsplit_once('.').is_some_and(|(_, n)| n == name))
            .cloned()
    }

    fn walk<'v>(&self, path: String, v: &'v Value, out: &mut Vec<(String, &'v Value)>) {
        if self.known.contains(path.as_str()) {
            return;
        }
        let prefix = format!("{path}.");
        let section_known = self.known.iter().any(|k| k.starts_with(&prefix));
        match v {
            Value::Dict(_, d) if section_known => {
                for (k, v) in d {
                    self.walk(format!("{path}.{k}"), v, out);
                }
            }
            _ => out.push((path, v)),
        }
    }
}

/// The dotted paths of the non-table values under `path` (itself if it is one).
fn leaf_keys(path: String, v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Dict(_, d) if !d.is_empty() => {
            for (k, v) in d {
                leaf_keys(format!("{path}.{k}"), v, out);
            }
        }
        _ => out.push(path),
    }
}

/// Variables under [`ENV_PREFIX`] that are not settings and are ignored
/// without a word: the config path, and what Kubernetes injects for a
/// Service named `token-sidecar` (`TOKEN_SIDECAR_SERVICE_HOST`,
/// `TOKEN_SIDECAR_PORT_7080_TCP`, ...) into pods that keep service links on.
/// A trailing `*` matches any rest.
pub const IGNORED_VARIABLES: &[&str] = &[
    "CONFIG",
    "SERVICE_HOST",
    "SERVICE_PORT",
    "SERVICE_PORT_*",
    "PORT",
    "PORT_*",
];

/// A warning for each variable among `names` that starts with
/// [`ENV_PREFIX`] but is neither a setting (those hold `__` and are read, or
/// reported as unknown keys) nor ignored ([`IGNORED_VARIABLES`]), naming the
/// form it probably meant.
///
/// `keys` are the dotted config keys; a segment `*` stands for a name the
/// user chooses, so `credentials.*.password` turns
/// `TOKEN_SIDECAR_CREDENTIALS_BILLING_PASSWORD` into
/// `TOKEN_SIDECAR_CREDENTIALS__BILLING__PASSWORD`.
pub fn unread_variables(names: &[String], keys: &[&str]) -> Vec<String> {
    let mut warnings = Vec::new();
    for name in names {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if rest.contains("__") || is_ignored_variable(rest) {
            continue;
        }
        warnings.push(match meant_variable(rest, keys) {
            Some(meant) => format!(
                "environment variable {name} is not read: did you mean {meant}? (two underscores between the parts of a setting)"
            ),
            None => format!(
                "environment variable {name} is not read: settings are {ENV_PREFIX}<SECTION>__<KEY>, e.g. {}",
                env_name("oauth.password")
            ),
        });
    }
    warnings
}

fn is_ignored_variable(rest: &str) -> bool {
    IGNORED_VARIABLES
        .iter()
        .any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => rest.starts_with(prefix),
            None => rest == *pattern,
        })
}

/// The variable that `rest` (a name after the prefix) was probably meant to
/// be: the same words with the parts of a key told apart, or failing that
/// a near miss of such a name.
fn meant_variable(rest: &str, keys: &[&str]) -> Option<String> {
    let words: Vec<&str> = rest.split('_').filter(|w| !w.is_empty()).collect();
    for key in keys {
        let parts: Vec<String> = key.split('.').map(str::to_ascii_uppercase).collect();
        if let Some(filled) = fill_parts(&words, &parts) {
            return Some(format!("{ENV_PREFIX}{}", filled.join("__")));
        }
    }
    // A near miss (`OAUTH_PASWORD`), among the keys without a name in them.
    let joined = words.join("_");
    let plain: Vec<(String, &str)> = keys
        .iter()
        .filter(|k| !k.split('.').any(|p| p == "*"))
        .map(|k| (k.to_ascii_uppercase().replace('.', "_"), *k))
        .collect();
    nearest(&joined, plain.iter().map(|(flat, _)| flat.as_str())).and_then(|near| {
        plain
            .iter()
            .find(|(flat, _)| flat == near)
            .map(|(_, key)| env_name(key))
    })
}

/// Matches `words` against the parts of a key (each part one or more words;
/// `*` any one or more words) and returns the parts as filled in.
fn fill_parts(words: &[&str], parts: &[String]) -> Option<Vec<String>> {
    let Some((part, rest)) = parts.split_first() else {
        return words.is_empty().then(Vec::new);
    };
    let mut prefixes: Vec<usize> = Vec::new();
    if part == "*" {
        prefixes.extend(1..=words.len());
    } else {
        let n = part.split('_').count();
        let candidate = words.get(..n)?;
        if candidate.join("_") == *part {
            prefixes.push(n);
        }
    }
    prefixes.into_iter().find_map(|n| {
        let mut filled = fill_parts(&words[n..], rest)?;
        filled.insert(0, words[..n].join("_"));
        Some(filled)
    })
}

/// `oauth.password` -> `TOKEN_SIDECAR_OAUTH__PASSWORD`.
pub fn env_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.to_ascii_uppercase().replace('.', "__")
    )
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A deserialization error in the terms of the TOML file: "true or false",
/// "a whole number", "a list", never a Rust type name such as `usize`.
/// (figment's own Display also adds "for key ... in source", which the
/// problem line names itself.)
fn in_user_terms(kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    match kind {
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            format!(
                "must be {}, not {}",
                expected_terms(expected),
                actual_terms(actual)
            )
        }
        Kind::UnknownVariant(found, expected) => {
            let choices = expected
                .iter()
                .map(|c| format!("\"{c}\""))
                .collect::<Vec<_>>()
                .join(", ");
            let mut m = format!("\"{found}\" is not one of {choices}");
            if let Some(near) = nearest(found, expected.iter().copied()) {
                m.push_str(&format!(": did you mean \"{near}\"?"));
            }
            m
        }
        Kind::InvalidLength(n, expected) => {
            format!("has {n} items; expected {}", expected_terms(expected))
        }
        other => other.to_string().replace('`', "\""),
    }
}

/// serde's "expected ..." in TOML terms.
fn expected_terms(expected: &str) -> String {
    match expected {
        "a string" => "a string in quotes".into(),
        "a boolean" => "true or false".into(),
        "usize" | "u64" | "u32" | "u16" | "u8" | "u128" => "a whole number, 0 or more".into(),
        "isize" | "i64" | "i32" | "i16" | "i8" | "i128" => "a whole number".into(),
        "f64" | "f32" => "a number".into(),
        "a sequence" => "a list".into(),
        "a map" => "a table".into(),
        other => other.replace('`', "\""),
    }
}

/// What was found instead, as written in the file.
fn actual_terms(actual: &figment::error::Actual) -> String {
    use figment::error::Actual;
    match actual {
        Actual::Bool(b) => b.to_string(),
        Actual::Unsigned(n) => n.to_string(),
        Actual::Signed(n) => n.to_string(),
        Actual::Float(f) => f.to_string(),
        Actual::Char(c) => format!("\"{c}\""),
        Actual::Str(s) => format!("\"{s}\""),
        Actual::Seq => "a list".into(),
        Actual::Map => "a table".into(),
        other => other.to_string().replace('`', "\""),
    }
}

/// Most edits that still make a near miss worth a "did you mean".
const NEAR_MISS_EDITS: usize = 2;

/// The candidate closest to `word` within [`NEAR_MISS_EDITS`] edits
/// (a swap of two letters counts as one), if any.
fn nearest<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    let word = word.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|c| {
            (
                strsim::damerau_levenshtein(&word, &c.to_ascii_lowercase()),
                c,
            )
        })
        .filter(|(d, _)| *d <= NEAR_MISS_EDITS)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    fn base() -> String {
        r#"
[proxy]
upstream = "https://api.example.test/base"
[oauth]
token_url = "https://auth.example.test/oauth/token"
client_id = "id"
client_secret = "s"
username = "u"
password = "p"
"#
        .into()
    }

    fn load_str(s: &str) -> Result<Loaded, ConfigError> {
        load_figment(Figment::new().merge(Toml::string(s)))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = load_str(&base()).unwrap().config;
        assert_eq!(c.routes.len(), 1);
        assert_eq!(
            c.routes[0].upstream.as_str(),
            "https://api.example.test/base/"
        );
        assert_eq!(c.proxy.listen.len(), 2);
        assert_eq!(c.credentials[0].params_in, ParamsIn::Form);
        assert_eq!(c.credentials[0].timeout, Duration::from_secs(10));
        assert_eq!(c.refresh.min_remaining, Duration::from_secs(30));
    }

    #[test]
    fn reports_every_problem_in_one_pass() {
        let s = base().replace("username = \"u\"", "")
            + "\n[refresh]\nmin_interval = \"soon\"\nbogus = 1\n[nope]\nx = 1\n";
        let e = load_str(&s).unwrap_err();
        let keys: Vec<_> = e.problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"oauth.username"), "{e}");
        assert!(keys.contains(&"refresh.min_interval"), "{e}");
        assert!(keys.contains(&"refresh.bogus"), "{e}");
        assert!(keys.contains(&"nope"), "{e}");
    }

    #[test]
    fn extra_params_take_any_key() {
        let s = base() + "\n";
        let s = s.replace(
            "username = \"u\"",
            "username = \"u\"\nextra_params = { audience = \"x\" }",
        );
        let c = load_str(&s).unwrap().config;
        assert_eq!(
            c.credentials[0]
                .extra_params
                .get("audience")
                .map(String::as_str),
            Some("x")
        );
    }

    #[test]
    fn both_secret_forms_is_an_error() {
        let s = base().replace(
            "password = \"p\"",
            "password = \"p\"\npassword_file = \"/x\"",
        );
        let e = load_str(&s).unwrap_err();
        assert!(e.to_string().contains("oauth.password_file"), "{e}");
    }

    #[test]
    fn serialized_override_wins() {
        let fig = Figment::new()
            .merge(Toml::string(&base()))
            .merge(Serialized::default("oauth.timeout", "3s"));
        let c = load_figment(fig).unwrap().config;
        assert_eq!(c.credentials[0].timeout, Duration::from_secs(3));
    }

    #[test]
    fn a_secret_of_the_wrong_type_is_reported_without_its_value() {
        let s = base().replace("password = \"p\"", "password = 8675309123");
        let e = load_str(&s).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert_eq!(e.problems[0].key, "oauth.password");
        assert!(!e.to_string().contains("8675309123"), "{e}");
    }

    #[test]
    fn a_toml_syntax_error_is_reported_as_such_without_the_line() {
        let e = load_str("[oauth]\npassword = \"Secret-Val\n").unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        let m = &e.problems[0].message;
        assert!(
            m.starts_with("TOML parse error at line 2, column 23"),
            "{m}"
        );
        assert!(m.contains("invalid basic string"), "{m}");
        assert!(!m.contains("Secret-Val"), "{m}");
    }

    fn problems(s: &str) -> Vec<String> {
        load_str(s)
            .unwrap_err()
            .problems
            .iter()
            .map(|p| format!("{}: {}", p.key, p.message))
            .collect()
    }

    #[test]
    fn a_value_of_the_wrong_type_is_one_problem_in_the_users_terms() {
        let s = base().replace("client_id = \"id\"", "client_id = 12345");
        assert_eq!(
            problems(&s),
            ["oauth.client_id: must be a string in quotes, not 12345"]
        );
        let s = base().replace(
            "token_url = \"https://auth.example.test/oauth/token\"",
            "token_url = 3",
        );
        assert_eq!(
            problems(&s),
            ["oauth.token_url: must be a string in quotes, not 3"]
        );
        for (extra, expected) in [
            (
                "[proxy]\nretry_body_limit = \"big\"",
                "proxy.retry_body_limit: must be a whole number, 0 or more, not \"big\"",
            ),
            (
                "[proxy]\nforwarded_headers = \"yes\"",
                "proxy.forwarded_headers: must be true or false, not \"yes\"",
            ),
            (
                "[proxy]\nallow_paths = \"/x\"",
                "proxy.allow_paths: must be a list, not \"/x\"",
            ),
            (
                "[oauth]\nclient_auth = \"basic_rfc\"",
                "oauth.client_auth: \"basic_rfc\" is not one of \"basic\", \"basic-rfc\", \"body\": did you mean \"basic-rfc\"?",
            ),
            (
                "[log]\nformat = \"jsn\"",
                "log.format: \"jsn\" is not one of \"auto\", \"json\", \"text\": did you mean \"json\"?",
            ),
            (
                "[proxy]\nlisten = 7080",
                "proxy.listen: must be an address in quotes (\"127.0.0.1:7080\") or a list of them",
            ),
        ] {
            let fig = Figment::new()
                .merge(Toml::string(&base()))
                .merge(Toml::string(extra));
            let e = load_figment(fig).unwrap_err();
            let got: Vec<String> = e
                .problems
                .iter()
                .map(|p| format!("{}: {}", p.key, p.message))
                .collect();
            assert_eq!(got, [expected], "{extra}");
            assert!(!got[0].contains('`'), "{got:?}");
            for rust in ["usize", "sequence", "map", "OneOrMany", "enum"] {
                assert!(!got[0].contains(rust), "{got:?}");
            }
        }
    }

    #[test]
    fn near_miss_keys_and_sections_get_a_suggestion() {
        let s = base().replace(
            "upstream = \"https://api.example.test/base\"",
            "upstream = \"https://api.example.test/base\"\nrequest_timout = \"3s\"\ntoken_url = \"x\"",
        ) + "\n[logs]\nlevel = \"debug\"\n";
        let mut got = problems(&s);
        got.sort();
        assert_eq!(
            got,
            [
                "logs: unknown section: did you mean [log]?",
                "proxy.request_timout: unknown key: did you mean proxy.request_timeout?",
                "proxy.token_url: unknown key: did you mean oauth.token_url?",
            ]
        );
        let s = base() + "\n[nothing_like_it]\nx = 1\n";
        assert_eq!(problems(&s), ["nothing_like_it: unknown section"]);
    }

    #[test]
    fn unread_variables_get_a_warning_with_the_form_they_meant() {
        let names: Vec<String> = [
            "TOKEN_SIDECAR_OAUTH_PASSWORD",
            "TOKEN_SIDECAR_OAUTH_CLIENT_SECRET_FILE",
            "TOKEN_SIDECAR_OAUTH_PASWORD",
            "TOKEN_SIDECAR_WHATEVER",
            "TOKEN_SIDECAR_OAUTH__PASSWORD",
            "TOKEN_SIDECAR_CONFIG",
            "TOKEN_SIDECAR_SERVICE_HOST",
            "TOKEN_SIDECAR_SERVICE_PORT",
            "TOKEN_SIDECAR_SERVICE_PORT_HTTP",
            "TOKEN_SIDECAR_PORT",
            "TOKEN_SIDECAR_PORT_7080_TCP_ADDR",
            "OTHER_OAUTH_PASSWORD",
        ]
        .map(String::from)
        .to_vec();
        let keys = ["oauth.password", "oauth.client_secret_file", "log.level"];
        assert_eq!(
            unread_variables(&names, &keys),
            [
                "environment variable TOKEN_SIDECAR_OAUTH_PASSWORD is not read: did you mean TOKEN_SIDECAR_OAUTH__PASSWORD? (two underscores between the parts of a setting)",
                "environment variable TOKEN_SIDECAR_OAUTH_CLIENT_SECRET_FILE is not read: did you mean TOKEN_SIDECAR_OAUTH__CLIENT_SECRET_FILE? (two underscores between the parts of a setting)",
                "environment variable TOKEN_SIDECAR_OAUTH_PASWORD is not read: did you mean TOKEN_SIDECAR_OAUTH__PASSWORD? (two underscores between the parts of a setting)",
                "environment variable TOKEN_SIDECAR_WHATEVER is not read: settings are TOKEN_SIDECAR_<SECTION>__<KEY>, e.g. TOKEN_SIDECAR_OAUTH__PASSWORD",
            ]
        );
        // A key with a name of the user's choosing: the three-part form.
        let keys = ["credentials.*.password", "oauth.password"];
        let names = ["TOKEN_SIDECAR_CREDENTIALS_BILLING_EU_PASSWORD".to_string()];
        let w = unread_variables(&names, &keys);
        assert!(
            w[0].contains("did you mean TOKEN_SIDECAR_CREDENTIALS__BILLING_EU__PASSWORD?"),
            "{w:?}"
        );
    }

    #[test]
    fn warnings_about_variables_come_with_the_problems_too() {
        let s = base().replace("password = \"p\"", "");
        let e = load_with_env(
            Figment::new().merge(Toml::string(&s)),
            &["TOKEN_SIDECAR_OAUTH_PASSWORD".to_string()],
        )
        .unwrap_err();
        assert_eq!(e.problems.len(), 1);
        assert!(
            e.warnings
                .iter()
                .any(|w| w.contains("did you mean TOKEN_SIDECAR_OAUTH__PASSWORD?")),
            "{e:?}"
        );
    }

    #[test]
    fn an_empty_secret_file_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "\n").unwrap();
        let s = base().replace(
            "password = \"p\"",
            &format!("password_file = {:?}", path.to_str().unwrap()),
        );
        assert_eq!(
            problems(&s),
            [format!(
                "oauth.password_file: secret file {} is empty",
                path.display()
            )]
        );
    }

    #[test]
    fn env_names() {
        assert_eq!(env_name("oauth.password"), "TOKEN_SIDECAR_OAUTH__PASSWORD");
        assert_eq!(
            env_name("credentials.paymentiq.password"),
            "TOKEN_SIDECAR_CREDENTIALS__PAYMENTIQ__PASSWORD"
        );
    }

    /// The routes form of the issue's example, with inline secrets.
    fn routes() -> String {
        r#"
[proxy]
request_timeout = "30s"
[credentials.paymentiq]
token_url = "https://test-api.paymentiq.io/paymentiq/oauth/token"
client_id = "pid"
client_secret = "s1"
username = "u"
password = "p"
params_in = "query"
[credentials.merchants]
grant = "client_credentials"
token_url = "https://auth.example.com/oauth2/token"
client_id = "mid"
client_secret = "s2"
scope = "merchants.read"
required = false
[route.backoffice]
prefix = "/backoffice/"
upstream = "https://test-api.paymentiq.io/paymentiq/backoffice"
credentials = "paymentiq"
[route.merchants]
prefix = "/merchants/"
upstream = "https://merchants.example.com/api/v2/"
credentials = "merchants"
request_timeout = "5s"
allow_paths = ["/shops/"]
"#
        .into()
    }

    /// `key: message` of every problem, sorted.
    fn sorted_problems(s: &str) -> Vec<String> {
        let mut p = problems(s);
        p.sort();
        p
    }

    #[test]
    fn the_routes_form_names_profiles_and_routes() {
        let loaded = load_str(&routes()).unwrap();
        let c = loaded.config;
        assert!(!c.single_upstream);
        let names: Vec<&str> = c.credentials.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["merchants", "paymentiq"]);
        let m = &c.credentials[0];
        assert_eq!(m.table, "credentials.merchants");
        assert!(matches!(m.login, Login::ClientCredentials));
        assert!(!m.required);
        assert_eq!(m.scope, "merchants.read");
        let p = &c.credentials[1];
        assert!(
            matches!(&p.login, Login::Password { username, .. } if username == "u"),
            "{p:?}"
        );
        assert!(p.required, "required by default");
        assert_eq!(p.params_in, ParamsIn::Query);

        let r = |name: &str| c.routes.iter().find(|r| r.name == name).unwrap();
        let b = r("backoffice");
        assert_eq!(b.prefix, "/backoffice/");
        assert_eq!(
            b.upstream.as_str(),
            "https://test-api.paymentiq.io/paymentiq/backoffice/",
            "a base URL's path ends in /"
        );
        assert_eq!(b.credentials, "paymentiq");
        // Unset per-route keys take the [proxy] values; set ones win.
        assert_eq!(b.request_timeout, Duration::from_secs(30));
        assert!(b.allow_paths.is_empty());
        let m = r("merchants");
        assert_eq!(m.request_timeout, Duration::from_secs(5));
        assert_eq!(m.allow_paths, ["/shops/"]);
        assert_eq!(m.listen, None);
        // A password in the query draws its warning, named by its key.
        assert!(
            loaded
                .warnings
                .iter()
                .any(|w| w
                    .starts_with("credentials.paymentiq.params_in = \"query\" puts the password")),
            "{:?}",
            loaded.warnings
        );
    }

    #[test]
    fn the_single_upstream_form_is_one_route_and_one_profile_named_default() {
        let c = load_str(&base()).unwrap().config;
        assert!(c.single_upstream);
        assert_eq!(c.routes.len(), 1);
        let r = &c.routes[0];
        assert_eq!((r.name.as_str(), r.prefix.as_str()), ("default", "/"));
        assert_eq!(r.credentials, "default");
        assert_eq!(c.credentials.len(), 1);
        let p = &c.credentials[0];
        assert_eq!((p.name.as_str(), p.table.as_str()), ("default", "oauth"));
        assert!(p.required);
        assert!(matches!(p.login, Login::Password { .. }));
        // [oauth] has today's keys only.
        let s = base().replace("[oauth]", "[oauth]\ngrant = \"password\"");
        assert_eq!(problems(&s), ["oauth.grant: unknown key"]);
    }

    #[test]
    fn a_route_with_its_own_listen_address_defaults_its_prefix_to_the_root() {
        let s = routes()
            + "[route.legacy]\nlisten = \"127.0.0.1:7082\"\nupstream = \"https://legacy.example.com/\"\ncredentials = \"paymentiq\"\n";
        let c = load_str(&s).unwrap().config;
        let r = c.routes.iter().find(|r| r.name == "legacy").unwrap();
        assert_eq!(r.prefix, "/");
        assert_eq!(r.listen, Some("127.0.0.1:7082".parse().unwrap()));
    }

    #[test]
    fn names_match_the_pattern_that_environment_variables_can_address() {
        for ok in ["a", "merchants", "eu_2", "b2b_api"] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "A",
            "Merchants",
            "2fa",
            "_a",
            "a__b",
            "a_",
            "a-b",
            "a.b",
            "é",
        ] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn every_routes_form_problem_is_named_by_its_key() {
        let cases: Vec<(String, Vec<&str>)> = vec![
            (
                routes().replace("credentials = \"merchants\"", "credentials = \"merchant\""),
                vec![
                    "route.merchants.credentials: \"merchant\" is not a credentials profile (profiles: merchants, paymentiq): did you mean \"merchants\"?",
                ],
            ),
            (
                routes().replace("prefix = \"/merchants/\"", "prefix = \"/backoffice/\""),
                vec![
                    "route.merchants.prefix: \"/backoffice/\" is also the prefix of route backoffice on the same listener (proxy.listen)",
                ],
            ),
            (
                routes().replace("prefix = \"/merchants/\"", "prefix = \"/merchants\""),
                vec![
                    "route.merchants.prefix: \"/merchants\" must start and end with '/' (e.g. \"/merchants/\")",
                ],
            ),
            (
                routes().replace("prefix = \"/merchants/\"", "prefix = \"merchants/\""),
                vec![
                    "route.merchants.prefix: \"merchants/\" must start and end with '/' (e.g. \"/merchants/\")",
                ],
            ),
            (
                routes().replace("[route.merchants]", "[route.Merchants]"),
                vec![
                    "route.Merchants: \"Merchants\" is not a valid route name: lower-case letters, digits and single underscores, starting with a letter and not ending with an underscore (so that TOKEN_SIDECAR_ROUTE__<NAME>__<KEY> can address it)",
                ],
            ),
            (
                routes()
                    .replace("[credentials.merchants]", "[credentials.merchants__eu]")
                    .replace("credentials = \"merchants\"", "credentials = \"merchants__eu\""),
                vec![
                    "credentials.merchants__eu: \"merchants__eu\" is not a valid credentials profile name: lower-case letters, digits and single underscores, starting with a letter and not ending with an underscore (so that TOKEN_SIDECAR_CREDENTIALS__<NAME>__<KEY> can address it)",
                ],
            ),
            (
                routes().replace("scope = \"merchants.read\"", "scope = \"merchants.read\"\nusername = \"x\"\npassword_file = \"/x\""),
                vec![
                    "credentials.merchants.password_file: the client_credentials grant sends no user: remove it, or set grant = \"password\"",
                    "credentials.merchants.username: the client_credentials grant sends no user: remove it, or set grant = \"password\"",
                ],
            ),
            (
                routes().replace("scope = \"merchants.read\"", "password = \"x\""),
                vec![
                    "credentials.merchants.password: the client_credentials grant sends no user: remove it, or set grant = \"password\"",
                ],
            ),
            (
                routes().replace("grant = \"client_credentials\"", "grant = \"client-credentials\""),
                vec![
                    "credentials.merchants.grant: \"client-credentials\" is not one of \"password\", \"client_credentials\": did you mean \"client_credentials\"?",
                    // Then read as a password profile, which lacks a user.
                    "credentials.merchants.password: set credentials.merchants.password or credentials.merchants.password_file",
                    "credentials.merchants.username: is required",
                ],
            ),
            (
                routes().replace("username = \"u\"\n", ""),
                vec!["credentials.paymentiq.username: is required"],
            ),
            (
                routes().replace("prefix = \"/merchants/\"\n", ""),
                vec![
                    "route.merchants.prefix: is required (it defaults to \"/\" only for a route with a listen address of its own)",
                ],
            ),
            (
                routes().replace("request_timeout = \"5s\"", "request_timeout = \"0s\"\nbogus = 1"),
                vec![
                    "route.merchants.bogus: unknown key",
                    "route.merchants.request_timeout: must be greater than 0",
                ],
            ),
            (
                routes().replace("allow_paths = [\"/shops/\"]", "allow_paths = [\"shops/\"]\nupstrem = \"x\""),
                vec![
                    "route.merchants.allow_paths: \"shops/\" must start with '/'",
                    "route.merchants.upstrem: unknown key: did you mean route.merchants.upstream?",
                ],
            ),
            (
                routes() + "[route.a]\nlisten = \"127.0.0.1:7082\"\nupstream = \"https://a.example/\"\ncredentials = \"paymentiq\"\n[route.b]\nlisten = \"127.0.0.1:7082\"\nupstream = \"https://b.example/\"\ncredentials = \"paymentiq\"\n[route.c]\nlisten = \"127.0.0.1:7081\"\nupstream = \"https://c.example/\"\ncredentials = \"paymentiq\"\n[route.d]\nlisten = \"localhost:80\"\nupstream = \"https://d.example/\"\ncredentials = \"paymentiq\"\n[admin]\nlisten = \"127.0.0.1:7081\"\n",
                vec![
                    "route.b.listen: 127.0.0.1:7082 is also the listen address of route a",
                    "route.c.listen: 127.0.0.1:7081 is also a proxy.listen or admin.listen address",
                    "route.d.listen: \"localhost:80\" is not an IP:port address (e.g. \"127.0.0.1:7082\")",
                ],
            ),
            (
                format!("[proxy]\nupstream = \"https://x.example/\"\n{}", routes().replace("[proxy]", "")),
                vec![
                    "proxy.upstream: the single-upstream form (proxy.upstream with [oauth]) cannot be mixed with [route.NAME] and [credentials.NAME] tables: write the upstream as a route and [oauth] as a credentials profile",
                ],
            ),
            (
                base() + "[route.x]\nprefix = \"/x/\"\nupstream = \"https://x.example/\"\ncredentials = \"default\"\n",
                vec![
                    "credentials: at least one [credentials.NAME] table is required",
                    "oauth: the single-upstream form (proxy.upstream with [oauth]) cannot be mixed with [route.NAME] and [credentials.NAME] tables: write the upstream as a route and [oauth] as a credentials profile",
                    "proxy.upstream: the single-upstream form (proxy.upstream with [oauth]) cannot be mixed with [route.NAME] and [credentials.NAME] tables: write the upstream as a route and [oauth] as a credentials profile",
                    "route.x.credentials: \"default\" is not a credentials profile (profiles: )",
                ],
            ),
            (
                routes().split("[route.backoffice]").next().unwrap().to_owned(),
                vec!["route: at least one [route.NAME] table is required"],
            ),
            (
                "[route]\nx = 1\n".into(),
                vec![
                    "credentials: at least one [credentials.NAME] table is required",
                    "route.x: must be a table: [route.x]",
                    "route: at least one [route.NAME] table is required",
                ],
            ),
        ];
        for (toml, expected) in cases {
            assert_eq!(sorted_problems(&toml), expected, "{toml}");
        }
    }

    #[test]
    fn credentials_no_route_uses_are_a_warning() {
        let s = routes() + "[credentials.spare]\ngrant = \"client_credentials\"\ntoken_url = \"https://a.example/t\"\nclient_id = \"c\"\nclient_secret_file = \"/dev/null/x\"\n";
        // (the file does not exist: a problem; the warning comes with it)
        let e = load_str(&s).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        let s = s.replace(
            "client_secret_file = \"/dev/null/x\"",
            "client_secret = \"s3\"",
        );
        let w = load_str(&s).unwrap().warnings;
        assert!(
            w.contains(&"credentials.spare: no route uses this credentials profile; its token is obtained and kept but never sent".to_string()),
            "{w:?}"
        );
    }
}
