//! The admin listener: probes, metrics, token status and two control
//! endpoints, as one `match`. It only reads the token sources; the one thing
//! it can ask for (a forced refresh) goes through the token handles' door.
//!
//! With several credentials profiles: `/healthz` fails when any profile's
//! token task cannot be kept running; `/readyz` waits for the token of every
//! `required` profile that a route uses; `/status` lists every profile and
//! every route; `POST /admin/refresh` refreshes one profile
//! (`?credentials=NAME`) or all.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;

use crate::config::RouteConfig;
use crate::lifecycle::Lifecycle;
use crate::metrics::{Metrics, RouteMetrics};
use crate::serve::ServeOptions;
use crate::token::{AttemptReport, Outcome, Profile};

type Body = Full<Bytes>;

/// How the admin listener's connections are served: HTTP/1.1 only, small
/// heads, idle connections closed after 30 s.
pub const SERVE: ServeOptions = ServeOptions {
    max_connections: 64,
    idle_timeout: Duration::from_secs(30),
    max_header_bytes: 16 * 1024,
    http2: false,
    write_stall_timeout: Some(Duration::from_secs(30)),
};

pub struct Admin {
    pub profiles: Vec<Arc<Profile>>,
    pub routes: Vec<RouteInfo>,
    pub metrics: Arc<Metrics>,
    pub lifecycle: Arc<Lifecycle>,
    pub allow_remote_control: bool,
}

impl Admin {
    /// Serves the admin listener until `server` shuts down.
    pub fn spawn(self, server: &mut crate::serve::Server, listener: tokio::net::TcpListener) {
        let admin = Arc::new(self);
        server.spawn(listener, SERVE, move |req, peer| {
            let admin = admin.clone();
            async move { admin.handle(req, peer).await }
        });
    }

    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let get = matches!(*req.method(), Method::GET | Method::HEAD);
        let post = req.method() == Method::POST;
        match req.uri().path() {
            "/healthz" if get => self.health(),
            "/readyz" if get => self.ready(),
            "/metrics" if get => {
                let valid: Vec<(&str, bool)> = self
                    .profiles
                    .iter()
                    .map(|p| (p.name.as_str(), p.token.usable().is_some()))
                    .collect();
                let body = self.metrics.render(&valid);
                let mut r = text(StatusCode::OK, body);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(Metrics::CONTENT_TYPE),
                );
                r
            }
            "/status" if get => json_response(StatusCode::OK, self.status_json()),
            "/admin/refresh" | "/admin/shutdown"
                if post && !control_allowed(peer.ip(), self.allow_remote_control) =>
            {
                json_response(
                    StatusCode::FORBIDDEN,
                    json!({"error": "forbidden", "message": "control endpoints accept loopback callers only (admin.allow_remote_control)"}),
                )
            }
            "/admin/refresh" if post => self.refresh(req.uri().query()).await,
            "/admin/shutdown" if post => {
                self.lifecycle.begin_shutdown("POST /admin/shutdown");
                json_response(StatusCode::ACCEPTED, json!({"shutdown": "started"}))
            }
            "/healthz" | "/readyz" | "/metrics" | "/status" | "/admin/refresh"
            | "/admin/shutdown" => json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "method_not_allowed", "message": "method not allowed"}),
            ),
            _ => json_response(StatusCode::NOT_FOUND, json!({"error": "not_found"})),
        }
    }

    /// Alive unless a token task could not be kept running: then no token
    /// will ever come again for its routes, and only a restart of the
    /// container helps.
    fn health(&self) -> Response<Body> {
        match self.profiles.iter().find(|p| !p.token.refresher_running()) {
            None => text(StatusCode::OK, "ok\n"),
            Some(p) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the token refresh task of credentials {} cannot be kept running\n",
                    p.name
                ),
            ),
        }
    }

    /// Ready when not draining and every required profile that a route
    /// uses holds a usable token; otherwise the first that does not, and why.
    fn ready(&self) -> Response<Body> {
        if self.lifecycle.is_draining() {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"ready": false, "reason": "draining"}),
            );
        }
        let waiting = self
            .profiles
            .iter()
            .find(|p| p.gates_readiness() && p.token.usable().is_none());
        let Some(p) = waiting else {
            return json_response(StatusCode::OK, json!({"ready": true}));
        };
        let s = p.token.status();
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({
                "ready": false,
                "reason": if s.generation == 0 { "no_token_yet" } else { "token_expired" },
                "credentials": p.name,
                "last_error": s.last_error,
                "retry_after_secs": p.token.retry_after(),
            }),
        )
    }

    /// `POST /admin/refresh[?credentials=NAME]`: refreshes that profile, or
    /// every one (at once), and answers each outcome; 502 if any failed.
    async fn refresh(&self, query: Option<&str>) -> Response<Body> {
        let wanted = query.and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "credentials")
                .map(|(_, v)| v.into_owned())
        });
        let chosen: Vec<Arc<Profile>> = self
            .profiles
            .iter()
            .filter(|p| wanted.as_deref().is_none_or(|w| w == p.name))
            .cloned()
            .collect();
        if chosen.is_empty() {
            let names: Vec<&str> = self.profiles.iter().map(|p| p.name.as_str()).collect();
            return json_response(
                StatusCode::NOT_FOUND,
                json!({
                    "error": "unknown_credentials",
                    "message": format!("no credentials profile {:?}; profiles: {}", wanted.unwrap_or_default(), names.join(", ")),
                }),
            );
        }
        // Each profile's task paces its own calls; they run side by side.
        let tasks: Vec<_> = chosen
            .iter()
            .map(|p| {
                let token = p.token.clone();
                tokio::spawn(async move { token.refresh_now().await })
            })
            .collect();
        let mut outcomes = serde_json::Map::new();
        let mut failed = false;
        for (p, task) in chosen.iter().zip(tasks) {
            let report: Option<AttemptReport> = task.await.ok().flatten();
            let value = match report {
                Some(r) => {
                    failed |= r.outcome != Outcome::Success || r.error.is_some();
                    serde_json::to_value(r).unwrap_or_default()
                }
                None => {
                    failed = true;
                    json!({"outcome": "error", "error": "refresher_unavailable"})
                }
            };
            outcomes.insert(p.name.clone(), value);
        }
        let status = if failed {
            StatusCode::BAD_GATEWAY
        } else {
            StatusCode::OK
        };
        json_response(status, json!({ "credentials": outcomes }))
    }

    fn status_json(&self) -> serde_json::Value {
        let ready = self
            .profiles
            .iter()
            .filter(|p| p.gates_readiness())
            .all(|p| p.token.usable().is_some());
        let profiles: serde_json::Map<String, serde_json::Value> = self
            .profiles
            .iter()
            .map(|p| (p.name.clone(), profile_json(p)))
            .collect();
        let routes: serde_json::Map<String, serde_json::Value> = self
            .routes
            .iter()
            .map(|r| (r.config.name.clone(), r.json()))
            .collect();
        json!({
            "valid": ready,
            "draining": self.lifecycle.is_draining(),
            "credentials": profiles,
            "routes": routes,
            "version": env!("CARGO_PKG_VERSION"),
        })
    }
}

/// One profile in `/status`: its token's metadata, never the token.
fn profile_json(p: &Profile) -> serde_json::Value {
    let s = p.token.status();
    let now = SystemTime::now();
    let unix = |t: Option<SystemTime>| {
        t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
    };
    // The same instants for a person: RFC 3339, UTC, whole seconds.
    let rfc3339 =
        |t: Option<SystemTime>| t.map(|t| humantime::format_rfc3339_seconds(t).to_string());
    let seconds_left = s
        .expires_at
        .map(|e| e.duration_since(now).map(|d| d.as_secs()).unwrap_or(0));
    json!({
        "valid": p.token.usable().is_some(),
        "login_grant": p.grant,
        "required": p.required,
        "routes": p.routes,
        "generation": s.generation,
        "obtained_at": unix(s.obtained_at),
        "obtained_at_rfc3339": rfc3339(s.obtained_at),
        "expires_at": unix(s.expires_at),
        "expires_at_rfc3339": rfc3339(s.expires_at),
        "seconds_left": seconds_left,
        "grant": s.grant,
        "reason": s.reason,
        "last_attempt_at": unix(s.last_attempt_at),
        "last_attempt_at_rfc3339": rfc3339(s.last_attempt_at),
        "last_grant": s.last_grant,
        "last_reason": s.last_reason,
        "last_outcome": s.last_outcome,
        "last_error": s.last_error,
        "last_error_cause": s.last_cause,
        "last_error_hint": s.last_cause.map(|c| c.hint_in(&p.table)),
        "consecutive_failures": s.consecutive_failures,
        "refresher_running": p.token.refresher_running(),
        "next_attempt_in_secs": s.next_attempt.saturating_duration_since(tokio::time::Instant::now()).as_secs(),
    })
}

/// A route as `/status` shows it, with its request series.
pub struct RouteInfo {
    pub config: RouteConfig,
    stats: RouteMetrics,
}

impl RouteInfo {
    pub fn new(config: &RouteConfig, metrics: &Metrics) -> Self {
        RouteInfo {
            stats: metrics.route(&config.name),
            config: config.clone(),
        }
    }

    fn json(&self) -> serde_json::Value {
        let by_class: serde_json::Map<String, serde_json::Value> = self
            .stats
            .requests_by_class()
            .iter()
            .map(|(class, n)| (class.to_string(), json!(n)))
            .collect();
        let local: serde_json::Map<String, serde_json::Value> = self
            .stats
            .local_responses()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(code, n)| (code.to_string(), json!(n)))
            .collect();
        json!({
            "prefix": self.config.prefix,
            "upstream": self.config.upstream.as_str(),
            "credentials": self.config.credentials,
            "listen": self.config.listen.map(|a| a.to_string()),
            "requests": by_class,
            "local_responses": local,
        })
    }
}

/// Whether `peer` may use the control endpoints (`POST /admin/refresh`,
/// `/admin/shutdown`).
///
/// The admin listener is usually reachable from the pod network (the kubelet
/// probes it, Prometheus scrapes it), and anyone who can reach it could
/// otherwise stop the sidecar or make it hammer the token endpoint. So by
/// default only loopback callers, i.e. the containers of the same pod, are
/// allowed; `admin.allow_remote_control = true` lifts that. An IPv4 caller
/// on a dual-stack socket arrives as `::ffff:127.0.0.1`, hence `to_canonical`.
pub fn control_allowed(peer: IpAddr, allow_remote_control: bool) -> bool {
    allow_remote_control || peer.to_canonical().is_loopback()
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_endpoints_take_loopback_callers_unless_remote_control_is_allowed() {
        let loopback: [IpAddr; 4] = [
            "127.0.0.1".parse().unwrap(),
            "127.3.2.1".parse().unwrap(),
            "::1".parse().unwrap(),
            "::ffff:127.0.0.1".parse().unwrap(),
        ];
        let remote: [IpAddr; 4] = [
            "10.1.2.3".parse().unwrap(),
            "0.0.0.0".parse().unwrap(),
            "fd00::1".parse().unwrap(),
            "::ffff:10.1.2.3".parse().unwrap(),
        ];
        for ip in loopback {
            assert!(control_allowed(ip, false), "{ip}");
            assert!(control_allowed(ip, true), "{ip}");
        }
        for ip in remote {
            assert!(!control_allowed(ip, false), "{ip}");
            assert!(control_allowed(ip, true), "{ip}");
        }
    }
}
