//! Prometheus metrics: one registry per sidecar instance (tests run several in
//! one process) and typed handles, so call sites cannot misspell a name or a
//! label. The `prometheus` crate writes the classic text format that
//! `promtool check metrics` parses.
//!
//! Hot-path handles (status classes, local error codes) are resolved once at
//! start, so a request increments an atomic and hashes no label.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::token::{GrantKind, Outcome};

/// Codes of the answers the sidecar makes itself (the `error` label, and the
/// `error` field of the JSON body).
pub const LOCAL_ERRORS: &[&str] = &[
    "token_unavailable",
    "upstream_unavailable",
    "upstream_timeout",
    "request_timeout",
    "bad_request",
    "method_not_allowed",
    "path_not_allowed",
];

pub struct Metrics {
    registry: Registry,
    token_requests: IntCounterVec,
    token_request_duration: Histogram,
    token_expiry: Gauge,
    token_generation: IntGauge,
    token_valid: IntGauge,
    proxy_requests: [IntCounter; 5],
    local_responses: Vec<IntCounter>,
    proxy_duration: Histogram,
    upstream_retries_401: IntCounter,
    inflight: IntGauge,
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
            &["status_class"],
        )
        .expect("static metric definition is valid");
        let proxy_requests =
            ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|c| proxy_requests_vec.with_label_values(&[c]));
        let local_vec = IntCounterVec::new(
            Opts::new(
                "token_sidecar_local_responses_total",
                "Answers the sidecar made itself instead of the upstream, by error code.",
            ),
            &["error"],
        )
        .expect("static metric definition is valid");
        let local_responses = LOCAL_ERRORS
            .iter()
            .map(|e| local_vec.with_label_values(&[e]))
            .collect();
        let proxy_duration = Histogram::with_opts(
            HistogramOpts::new(
                "token_sidecar_proxy_request_duration_seconds",
                "Time from request received to response headers sent.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ]),
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
            Box::new(proxy_requests_vec),
            Box::new(local_vec),
            Box::new(proxy_duration.clone()),
            Box::new(retries),
            Box::new(inflight.clone()),
            Box::new(build_info),
            Box::new(crate::tls::ca_file_reload_errors()),
            // process_cpu_seconds_total, process_resident_memory_bytes,
            // process_open_fds, process_max_fds, process_start_time_seconds, ...
            // read from /proc at each scrape. It registers itself only in the
            // crate's default registry, hence here.
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
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
            proxy_requests,
            local_responses,
            proxy_duration,
            upstream_retries_401,
            inflight,
        }
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

    /// Counts an upstream answer by class.
    #[inline]
    pub fn upstream_status(&self, status: u16) {
        let i = (status / 100).clamp(1, 5) as usize - 1;
        self.proxy_requests[i].inc();
    }

    /// Counts an answer the sidecar made itself; `code` is one of [`LOCAL_ERRORS`].
    pub fn local_response(&self, code: &str) {
        if let Some(i) = LOCAL_ERRORS.iter().position(|c| *c == code) {
            self.local_responses[i].inc();
        }
    }

    #[inline]
    pub fn request_done(&self, took: Duration) {
        self.proxy_duration.observe(took.as_secs_f64());
    }

    pub fn replayed_after_401(&self) {
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
