//! The admin listener: probes, metrics, token status and two control
//! endpoints, as one `match`. It only reads the token source; the one thing it
//! can ask for (a forced refresh) goes through the token handle's door.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;

use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::serve::ServeOptions;
use crate::token::TokenHandle;

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
    pub token: Arc<TokenHandle>,
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
                let body = self.metrics.render(self.token.usable().is_some());
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
            "/admin/refresh" if post => match self.token.refresh_now().await {
                Some(report) => {
                    let status = if report.error.is_none() {
                        StatusCode::OK
                    } else {
                        StatusCode::BAD_GATEWAY
                    };
                    json_response(status, serde_json::to_value(report).unwrap_or_default())
                }
                None => json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": "refresher_unavailable"}),
                ),
            },
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

    /// Alive unless the token task could not be kept running: then no token
    /// will ever come again, and only a restart of the container helps.
    fn health(&self) -> Response<Body> {
        if self.token.refresher_running() {
            text(StatusCode::OK, "ok\n")
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the token refresh task cannot be kept running\n",
            )
        }
    }

    fn ready(&self) -> Response<Body> {
        if self.lifecycle.is_draining() {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"ready": false, "reason": "draining"}),
            );
        }
        if self.token.usable().is_some() {
            return json_response(StatusCode::OK, json!({"ready": true}));
        }
        let s = self.token.status();
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({
                "ready": false,
                "reason": if s.generation == 0 { "no_token_yet" } else { "token_expired" },
                "last_error": s.last_error,
                "retry_after_secs": self.token.retry_after(),
            }),
        )
    }

    fn status_json(&self) -> serde_json::Value {
        let s = self.token.status();
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
            "valid": self.token.usable().is_some(),
            "draining": self.lifecycle.is_draining(),
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
            "last_error_hint": s.last_cause.map(|c| c.hint()),
            "consecutive_failures": s.consecutive_failures,
            "refresher_running": self.token.refresher_running(),
            "next_attempt_in_secs": s.next_attempt.saturating_duration_since(tokio::time::Instant::now()).as_secs(),
            "version": env!("CARGO_PKG_VERSION"),
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
