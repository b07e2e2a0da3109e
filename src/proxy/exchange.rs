//! One proxied exchange, whichever engine serves it: what the access log
//! line and the request metrics are made of. The access log line is
//! written once, when the exchange is dropped (after the last byte of both
//! bodies), with the byte counts of both directions.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;

use http::{HeaderValue, Method};
use tokio::time::Instant;

use crate::metrics::RouteMetrics;

/// One request/response exchange, shared by its two bodies; when the last
/// of them is dropped the exchange is over: the in-flight gauge goes down and
/// the access log line is written, with the byte counts of both directions.
pub struct Exchange {
    pub start: Instant,
    pub method: Method,
    /// The raw path, without the query (never logged: it may carry secrets).
    pub path: Box<str>,
    pub request_id: HeaderValue,
    pub status: AtomicU16,
    pub generation: AtomicU64,
    pub upstream_us: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub replayed: AtomicBool,
    /// The series of the route the request took (`""`: none).
    pub stats: Arc<RouteMetrics>,
    pub access_log: bool,
}

impl Exchange {
    pub fn new(
        method: Method,
        path: &[u8],
        request_id: HeaderValue,
        stats: Arc<RouteMetrics>,
        access_log: bool,
    ) -> Self {
        stats.inflight().inc();
        Exchange {
            start: Instant::now(),
            method,
            path: String::from_utf8_lossy(path).into(),
            request_id,
            status: AtomicU16::new(0),
            generation: AtomicU64::new(0),
            upstream_us: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            replayed: AtomicBool::new(false),
            stats,
            access_log,
        }
    }
}

impl Exchange {
    /// The response head is ready to go to the client (from the upstream
    /// or the sidecar's own): the request duration is recorded now, on
    /// both engines.
    pub fn response_started(&self) {
        self.stats.request_done(self.start.elapsed());
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.stats.inflight().dec();
        if !self.access_log {
            return;
        }
        // Path only: a query string may carry personal data or secrets.
        tracing::info!(
            target: "token_sidecar::access",
            route = &*self.stats.name,
            method = %self.method,
            path = &*self.path,
            status = self.status.load(Ordering::Relaxed),
            total_ms = self.start.elapsed().as_secs_f64() * 1000.0,
            upstream_ms = self.upstream_us.load(Ordering::Relaxed) as f64 / 1000.0,
            bytes_in = self.bytes_up.load(Ordering::Relaxed),
            bytes_out = self.bytes_down.load(Ordering::Relaxed),
            request_id = self.request_id.to_str().unwrap_or("-"),
            generation = self.generation.load(Ordering::Relaxed),
            replayed = self.replayed.load(Ordering::Relaxed),
            "request"
        );
    }
}
