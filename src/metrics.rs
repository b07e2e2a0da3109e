//! Prometheus metrics: one registry per sidecar instance (tests run several in
//! one process) and typed handles, so call sites cannot misspell a name or a
//! label. The `prometheus` crate writes the classic text format that
//! `promtool check metrics` parses.
//!
//! Hot-path handles (status classes, local error codes) are resolved once at
//! start, so a request increments an atomic and hashes no label.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::token::{GrantKind, Outcome};

/// Codes of the answers the sidecar makes itself: the `error` label of
/// `token_sidecar_local_responses_total` and the `error` field of the JSON
/// body. A type rather than strings, so that a code without a series cannot
/// be counted (it would not compile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalError {
    TokenUnavailable,
    UpstreamUnavailable,
    UpstreamTimeout,
    RequestTimeout,
    BadRequest,
    MethodNotAllowed,
    PathNotAllowed,
    RequestHeaderTooLarge,
    UnsupportedTransferCoding,
    NoRoute,
}

impl LocalError {
    /// Every code, in the order of their series.
    pub const ALL: [LocalError; 10] = [
        LocalError::TokenUnavailable,
        LocalError::UpstreamUnavailable,
        LocalError::UpstreamTimeout,
        LocalError::RequestTimeout,
        LocalError::BadRequest,
        LocalError::MethodNotAllowed,
        LocalError::PathNotAllowed,
        LocalError::RequestHeaderTooLarge,
        LocalError::UnsupportedTransferCoding,
        LocalError::NoRoute,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LocalError::TokenUnavailable => "token_unavailable",
            LocalError::UpstreamUnavailable => "upstream_unavailable",
            LocalError::UpstreamTimeout => "upstream_timeout",
            LocalError::RequestTimeout => "request_timeout",
            LocalError::BadRequest => "bad_request",
            LocalError::MethodNotAllowed => "method_not_allowed",
            LocalError::PathNotAllowed => "path_not_allowed",
            LocalError::RequestHeaderTooLarge => "request_header_too_large",
            LocalError::UnsupportedTransferCoding => "unsupported_transfer_coding",
            LocalError::NoRoute => "no_route",
        }
    }
}

/// Which of the proxy's two HTTP engines served a request: the fast lane
/// (plain HTTP/1.1, parsed in place) or hyper (everything else).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    FastLane,
    Hyper,
}

impl Engine {
    pub const ALL: [Engine; 2] = [Engine::FastLane, Engine::Hyper];

    pub fn as_str(self) -> &'static str {
        match self {
            Engine::FastLane => "fast_lane",
            Engine::Hyper => "hyper",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    token_requests: IntCounterVec,
    token_request_duration: Histogram,
    token_expiry: Gauge,
    token_generation: IntGauge,
    token_valid: IntGauge,
    proxy_requests: IntCounterVec,
    local_responses: IntCounterVec,
    engine_requests: [IntCounter; Engine::ALL.len()],
    /// 401 replays by engine; not exported (the series counts them all),
    /// read by the tests that assert which engine replayed.
    engine_replays: [std::sync::atomic::AtomicU64; Engine::ALL.len()],
    proxy_duration: HistogramVec,
    upstream_retries_401: IntCounter,
    inflight: IntGauge,
    secret_file_errors: IntCounterVec,
    refresher_restarts: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let token_requests = IntCounterVec::new(
            Opts::new(
                "token_sidecar_token_requests_total",
                "Token endpoint calls by grant and outcome.",
            ),
            &["grant", "outcome"],
        )
        .expect("static metric definition is valid");
        let token_request_duration = Histogram::with_opts(
            HistogramOpts::new(
                "token_sidecar_token_request_duration_seconds",
                "Token endpoint call latency.",
            )
            .buckets(vec![
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )
        .expect("static metric definition is valid");
        let token_expiry = Gauge::new(
            "token_sidecar_token_expiry_timestamp_seconds",
            "Unix time at which the current access token expires.",
        )
        .expect("static metric definition is valid");
        let token_generation = IntGauge::new(
            "token_sidecar_token_generation",
            "Number of distinct access tokens obtained since start.",
        )
        .expect("static metric definition is valid");
        let token_valid = IntGauge::new(
            "token_sidecar_token_valid",
            "1 while a usable token is held (the proxy injects it), else 0.",
        )
        .expect("static metric definition is valid");
        let proxy_requests_vec = IntCounterVec::new(
            Opts::new(
                "token_sidecar_proxy_requests_total",
                "Answers from the upstream, by status class.",
            ),
            &["route", "status_class"],
        )
        .expect("static metric definition is valid");
        let local_vec = IntCounterVec::new(
            Opts::new(
                "token_sidecar_local_responses_total",
                "Answers the sidecar made itself instead of the upstream, by error code.",
            ),
            &["route", "error"],
        )
        .expect("static metric definition is valid");
        let engine_vec = IntCounterVec::new(
            Opts::new(
                "token_sidecar_proxy_engine_requests_total",
                "Requests by the proxy engine that served them: fast_lane (plain HTTP/1.1) or hyper.",
            ),
            &["engine"],
        )
        .expect("static metric definition is valid");
        let engine_requests = Engine::ALL.map(|e| engine_vec.with_label_values(&[e.as_str()]));
        let proxy_duration = HistogramVec::new(
            HistogramOpts::new(
                "token_sidecar_proxy_request_duration_seconds",
                "Time from request received to response headers sent.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ]),
            &["route"],
        )
        .expect("static metric definition is valid");
        let retries = IntCounterVec::new(
            Opts::new(
                "token_sidecar_upstream_retries_total",
                "Requests replayed with a new token after the upstream rejected the old one.",
            ),
            &["reason"],
        )
        .expect("static metric definition is valid");
        let upstream_retries_401 = retries.with_label_values(&["401"]);
        let inflight = IntGauge::new(
            "token_sidecar_proxy_inflight_requests",
            "Proxied requests in progress.",
        )
        .expect("static metric definition is valid");
        let secret_file_errors = IntCounterVec::new(
            Opts::new(
                "token_sidecar_secret_file_errors_total",
                "Re-reads of a secret file that found it unreadable or empty (the last good value was used), by config key.",
            ),
            &["key"],
        )
        .expect("static metric definition is valid");
        let refresher_restarts = IntCounter::new(
            "token_sidecar_refresher_restarts_total",
            "Restarts of the token refresh task after it panicked.",
        )
        .expect("static metric definition is valid");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "token_sidecar_build_info",
                "Always 1; the version label says which build runs.",
            ),
            &["version"],
        )
        .expect("static metric definition is valid");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        for c in [
            Box::new(token_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(token_request_duration.clone()),
            Box::new(token_expiry.clone()),
            Box::new(token_generation.clone()),
            Box::new(token_valid.clone()),
            Box::new(proxy_requests_vec.clone()),
            Box::new(local_vec.clone()),
            Box::new(engine_vec),
            Box::new(proxy_duration.clone()),
            Box::new(retries),
            Box::new(inflight.clone()),
            Box::new(secret_file_errors.clone()),
            Box::new(refresher_restarts.clone()),
            Box::new(build_info),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        // Show every grant/outcome pair from the start, so rate() and alerts
        // see a zero rather than an absent series.
        for g in [GrantKind::Password, GrantKind::RefreshToken] {
            for o in [Outcome::Success, Outcome::Rejected, Outcome::Error] {
                token_requests.with_label_values(&[g.as_str(), o.as_str()]);
            }
        }
        Metrics {
            registry,
            token_requests,
            token_request_duration,
            token_expiry,
            token_generation,
            token_valid,
            proxy_requests: proxy_requests_vec,
            local_responses: local_vec,
            engine_requests,
            engine_replays: Default::default(),
            proxy_duration,
            upstream_retries_401,
            inflight,
            secret_file_errors,
            refresher_restarts,
        }
    }

    /// The error counter of the secret file named by config key `key`
    /// (touching it shows the series at 0).
    pub fn secret_file_errors(&self, key: &str) -> IntCounter {
        self.secret_file_errors.with_label_values(&[key])
    }

    pub fn refresher_restarted(&self) {
        self.refresher_restarts.inc();
    }

    pub fn token_request(&self, grant: GrantKind, outcome: Outcome, took: Duration) {
        self.token_requests
            .with_label_values(&[grant.as_str(), outcome.as_str()])
            .inc();
        self.token_request_duration.observe(took.as_secs_f64());
    }

    pub fn token_obtained(&self, generation: u64, expires_at: SystemTime) {
        self.token_generation.set(generation as i64);
        let ts = expires_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.token_expiry.set(ts);
    }

    /// The series of one route (`""`: requests that matched no route),
    /// resolved once so that a request hashes no label; every series of
    /// the route shows from the start, at zero.
    pub fn route(&self, route: &str) -> RouteMetrics {
        RouteMetrics {
            name: route.into(),
            status: ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .map(|c| self.proxy_requests.with_label_values(&[route, c])),
            local: LocalError::ALL
                .map(|e| self.local_responses.with_label_values(&[route, e.as_str()])),
            duration: self.proxy_duration.with_label_values(&[route]),
            inflight: self.inflight.clone(),
        }
    }

    /// Counts a request by the engine that serves it.
    #[inline]
    pub fn engine_request(&self, engine: Engine) {
        self.engine_requests[engine as usize].inc();
    }

    /// Requests the engine has served so far (tests assert which engine ran).
    pub fn engine_requests(&self, engine: Engine) -> u64 {
        self.engine_requests[engine as usize].get()
    }

    /// 401 replays the engine has made so far.
    pub fn engine_replays(&self, engine: Engine) -> u64 {
        self.engine_replays[engine as usize].load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn replayed_after_401(&self, engine: Engine) {
        self.engine_replays[engine as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.upstream_retries_401.inc();
    }

    pub fn inflight(&self) -> &IntGauge {
        &self.inflight
    }

    /// The exposition text; `token_valid` is read at scrape time since it
    /// changes with the clock, not with an event.
    pub fn render(&self, token_valid: bool) -> String {
        self.token_valid.set(i64::from(token_valid));
        let mut out = String::with_capacity(8 * 1024);
        TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .expect("text encoding of valid metrics cannot fail");
        out
    }

    pub const CONTENT_TYPE: &'static str = "text/plain; version=0.0.4; charset=utf-8";
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The request series of one route ([`Metrics::route`]).
pub struct RouteMetrics {
    /// The `route` label: the route's name, or `""`.
    pub name: Box<str>,
    status: [IntCounter; 5],
    local: [IntCounter; LocalError::ALL.len()],
    duration: Histogram,
    inflight: IntGauge,
}

impl RouteMetrics {
    /// Counts an upstream answer by class.
    #[inline]
    pub fn upstream_status(&self, status: u16) {
        let i = (status / 100).clamp(1, 5) as usize - 1;
        self.status[i].inc();
    }

    /// Counts an answer the sidecar made itself.
    pub fn local_response(&self, code: LocalError) {
        self.local[code as usize].inc();
    }

    /// Time from request received to response head ready.
    #[inline]
    pub fn request_done(&self, took: Duration) {
        self.duration.observe(took.as_secs_f64());
    }

    /// Proxied requests in progress (all routes).
    pub fn inflight(&self) -> &IntGauge {
        &self.inflight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_enums_index_their_series() {
        for (i, e) in LocalError::ALL.iter().enumerate() {
            assert_eq!(*e as usize, i, "{e:?}");
        }
        for (i, e) in Engine::ALL.iter().enumerate() {
            assert_eq!(*e as usize, i, "{e:?}");
        }
    }
}
