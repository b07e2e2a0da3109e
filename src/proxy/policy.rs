//! The proxy's policy, written once and applied by both engines (the fast
//! lane and hyper), for HTTP/1.1 and HTTP/2 alike. It is shaped like the
//! phases of a proxied exchange:
//!
//! 1. [`admit`] and [`Policy::admit_path`]: the request is admitted or
//!    answered locally (method, `Host`, framing fields; then the route's
//!    path checks);
//! 2. [`Policy::bearer`]: the token to inject (one `ArcSwap` load);
//! 3. [`Policy::forwards_request_field`] and
//!    [`Policy::write_request_fields`]: the upstream request head, which of
//!    the client's fields cross and which the sidecar writes itself;
//! 4. [`Policy::check_response`] and [`Replay`]: whether the upstream's
//!    answer is usable, and whether a 401 means "replay with a new token";
//! 5. [`Policy::forwards_response_field`], [`Policy::rewrite_location`] and
//!    [`write_response_fields`]: the downstream response head;
//! 6. [`local_answer`]: the sidecar's own answers, counted and logged;
//! 7. the access log line and request metrics ([`super::exchange`]).
//!
//! Which route a request takes (and so which policy applies) is the first
//! decision, in [`super::route`].
//!
//! An engine only translates between its own head representation (byte
//! spans in the lane, a `HeaderMap` in hyper) and these functions: fields
//! go in as `(name, value)` byte pairs ([`super::fields`]) and come out
//! through a [`FieldSink`]. So a rule is written here once and holds on
//! every engine; the tests run every proxy test on both.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};

use super::error::{BadResponse, ProxyError};
use super::exchange::Exchange;
use super::fields::{self, ContentLength, RequestFacts, ResponseFacts, TransferCoding, Upgrade};
use super::path::{self, PathRejection};
use crate::config::{ProxyConfig, RetryOn401, RouteConfig};
use crate::metrics::{Engine, Metrics, RouteMetrics};
use crate::token::TokenHandle;

/// Replays after a 401 that rejected our token, at most.
///
/// One is the rule. A second happens only when the replay's own, brand-new
/// token was rejected too: on a server that keeps one token per user, a pod
/// of the fleet whose refresh landed in the same milliseconds revokes the
/// token this request was just replayed with, and the token after it is
/// good. Two bound what an upstream that rejects every token can cost a
/// request: two waits for a new token (each paced by `refresh.min_interval`).
pub const MAX_REPLAYS: usize = 2;

/// Longest client `X-Request-Id` taken as the request's id.
const MAX_REQUEST_ID: usize = 200;

/// The request line as the policy sees it, from either engine and any
/// HTTP version.
#[derive(Debug, Clone, Copy)]
pub struct RequestLine<'a> {
    pub version: Version,
    pub method: &'a [u8],
    /// The raw path, without the query.
    pub path: &'a [u8],
    /// HTTP/2's `:authority`, or the authority of an absolute-form target.
    pub authority: Option<&'a [u8]>,
}

/// Where the fields of a head go: the lane writes `name: value` lines, the
/// hyper engine inserts into a `HeaderMap`.
pub trait FieldSink {
    /// A field whose value is `parts`, concatenated.
    fn field(&mut self, name: &'static str, parts: &[&[u8]]);

    /// A field with a ready value; the hyper engine keeps its flags (the
    /// token's value is marked sensitive, so HPACK never indexes it).
    fn value(&mut self, name: &'static str, value: &HeaderValue) {
        self.field(name, &[value.as_bytes()]);
    }
}

impl FieldSink for HeaderMap {
    fn field(&mut self, name: &'static str, parts: &[&[u8]]) {
        let value = match parts {
            [one] => HeaderValue::from_bytes(one),
            _ => HeaderValue::from_bytes(&parts.concat()),
        };
        if let Ok(v) = value {
            self.insert(HeaderName::from_static(name), v);
        }
    }

    fn value(&mut self, name: &'static str, value: &HeaderValue) {
        self.insert(HeaderName::from_static(name), value.clone());
    }
}

/// What the policy applies to one route's requests: the settings every
/// route shares, the route's own, its credentials' token, and its
/// upstream base URL.
pub struct Policy {
    /// The `[proxy]` settings (timeouts, limits, `token_wait`, access log).
    pub shared: Arc<ProxyConfig>,
    /// The route's name, prefix, upstream and per-route settings.
    pub route: RouteConfig,
    pub token: Arc<TokenHandle>,
    pub metrics: Arc<Metrics>,
    /// The route's series, resolved once.
    pub stats: Arc<RouteMetrics>,
    /// Upstream base URL as text (`https://host/base/`) and its path (`/base/`).
    base_url: String,
    base_path: String,
    /// `Proxy-Authorization` for a forwarding egress proxy with credentials.
    egress_auth: Option<HeaderValue>,
}

impl Policy {
    pub fn new(
        shared: Arc<ProxyConfig>,
        route: RouteConfig,
        token: Arc<TokenHandle>,
        metrics: Arc<Metrics>,
        egress_auth: Option<HeaderValue>,
    ) -> Self {
        Policy {
            base_url: route.upstream.as_str().to_owned(),
            base_path: route.upstream.path().to_owned(),
            stats: Arc::new(metrics.route(&route.name)),
            shared,
            route,
            token,
            metrics,
            egress_auth,
        }
    }

    /// The upstream's base path (ends in `/`), under which every request goes.
    pub fn base_path(&self) -> &str {
        &self.base_path
    }

    /// The rest of a raw path after this route's prefix (from its `/`), or
    /// `None` when the path is not the route's. The prefix without its
    /// trailing slash is the route's too: its rest is `/`.
    #[inline]
    pub fn rest_of<'p>(&self, path: &'p [u8]) -> Option<&'p [u8]> {
        let prefix = self.route.prefix.as_bytes();
        if path.starts_with(prefix) {
            Some(&path[prefix.len() - 1..])
        } else if path.len() + 1 == prefix.len() && prefix.starts_with(path) {
            Some(b"/")
        } else {
            None
        }
    }

    // -- 1. Admission ------------------------------------------------------

    /// Admits a request's path for this route (`rest`: the path after the
    /// route's prefix, from its `/`), after [`admit`].
    pub fn admit_path(&self, path: &[u8], rest: &[u8]) -> Result<(), ProxyError> {
        // Dot-segments anywhere in the path (no request leaves its route's
        // base path); `allow_paths` against `/` plus the rest, so that
        // `["/api/"]` means the same under any prefix.
        path::check_segments(path)
            .and_then(|()| path::check_allowed(rest, &self.route.allow_paths))
            .map_err(|r| match r {
                PathRejection::DotSegment => {
                    ProxyError::BadRequest("dot-segments are not allowed in the request path")
                }
                PathRejection::NotAllowed => ProxyError::PathNotAllowed,
                PathRejection::NotAPath => {
                    ProxyError::BadRequest("the request target must be a path")
                }
                PathRejection::Nul => ProxyError::BadRequest("the request path contains %00"),
            })
    }

    // -- 2. The token ------------------------------------------------------

    /// The token to inject and its generation: one `ArcSwap` load; before
    /// the first token ever, a wait for it; an expired token never.
    pub async fn bearer(&self) -> Result<(u64, HeaderValue), ProxyError> {
        match self.token.usable() {
            Some(t) => Ok(t),
            None if !self.token.ever_had_token() => self
                .token
                .wait_first(self.shared.token_wait)
                .await
                .map_err(|u| ProxyError::TokenUnavailable {
                    retry_after: u.retry_after,
                }),
            None => Err(ProxyError::TokenUnavailable {
                retry_after: self.token.retry_after(),
            }),
        }
    }

    // -- 3. The upstream request head -------------------------------------

    /// Writes the upstream request target: the route's base path joined to
    /// `rest` (the raw path after the route's prefix) with one `/`, then
    /// the raw query, byte for byte.
    pub fn write_target(&self, out: &mut Vec<u8>, rest: &[u8], query: Option<&[u8]>) {
        path::write_join(out, &self.base_path, rest, query);
    }

    /// Whether a client's request field crosses to the upstream as it came.
    /// Hop-by-hop fields and those `Connection` lists stay (RFC 9110 7.6.1),
    /// the client's credentials are replaced, never appended, and the
    /// fields the sidecar writes itself ([`Policy::write_request_fields`])
    /// are not taken from the client.
    pub fn forwards_request_field(&self, name: &[u8], facts: &RequestFacts<'_>) -> bool {
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        match name.len() {
            // Forwarded even if `Connection` lists it: it frames the body
            // sent after the head, which would otherwise be read upstream
            // as the next request.
            14 if is(b"content-length") => return true,
            4 if is(b"host") => return false,
            12 if is(b"x-request-id") => return false,
            13 if is(b"authorization") => return false,
            19 if is(b"proxy-authorization") => return false,
            15 if self.route.forwarded_headers && is(b"x-forwarded-for") => return false,
            16 if self.route.forwarded_headers
                && (is(b"x-forwarded-host") || is(b"x-forwarded-proto")) =>
            {
                return false
            }
            _ => {}
        }
        if fields::is_hop_by_hop(name) {
            // An upgrade passed through keeps its `Upgrade` (and gets a
            // `Connection: upgrade` of the sidecar's own).
            return facts.upgrade() == Upgrade::Requested && is(b"upgrade");
        }
        !facts.connection.names(name)
    }

    /// Writes the fields the sidecar adds to every upstream request but the
    /// token ([`Policy::write_bearer`], which a replay changes): the
    /// request id, `Connection: upgrade` for an upgrade passed through,
    /// `TE: trailers` when the client asked for trailers, `X-Forwarded-*`
    /// when `proxy.forwarded_headers` is on, and an egress proxy's
    /// credentials. `authority`: HTTP/2's `:authority`, for
    /// `X-Forwarded-Host` when there is no `Host`.
    pub fn write_request_fields(
        &self,
        sink: &mut impl FieldSink,
        facts: &RequestFacts<'_>,
        request_id: &HeaderValue,
        peer: SocketAddr,
        authority: Option<&[u8]>,
    ) {
        sink.value("x-request-id", request_id);
        if facts.upgrade() == Upgrade::Requested {
            sink.field("connection", &[b"upgrade"]);
        }
        if facts.trailers {
            sink.field("te", &[b"trailers"]);
        }
        if self.route.forwarded_headers {
            let mut ip = [0u8; 64];
            let ip = ip_text(peer.ip(), &mut ip);
            match facts.forwarded_for {
                Some(prev) => sink.field("x-forwarded-for", &[prev, b", ", ip]),
                None => sink.field("x-forwarded-for", &[ip]),
            }
            // The sidecar serves plain HTTP only.
            sink.field("x-forwarded-proto", &[b"http"]);
            if let Some(host) = facts.host.or(authority) {
                sink.field("x-forwarded-host", &[host]);
            }
        }
        if let Some(auth) = &self.egress_auth {
            sink.value("proxy-authorization", auth);
        }
    }

    /// Writes the token: `Authorization: Bearer ...`, replacing whatever
    /// the client sent ([`Policy::forwards_request_field`] drops it).
    pub fn write_bearer(&self, sink: &mut impl FieldSink, bearer: &HeaderValue) {
        sink.value("authorization", bearer);
    }

    // -- 4. The upstream's answer -----------------------------------------

    /// Whether an upstream response head can be passed on (else 502): a
    /// status code of three digits, from 100; one valid `Content-Length`;
    /// no transfer coding but chunked, and none in an HTTP/1.0 answer; a
    /// 101 only to an upgrade.
    pub fn check_response(
        &self,
        version: Version,
        status: u16,
        facts: &ResponseFacts<'_>,
        upgrade: Upgrade,
    ) -> Result<(), BadResponse> {
        if !(100..=999).contains(&status) {
            return Err(BadResponse::Status(status));
        }
        if status == 101 && upgrade != Upgrade::Requested {
            return Err(BadResponse::UnaskedSwitch);
        }
        if matches!(facts.transfer_coding, TransferCoding::Other { .. }) {
            return Err(BadResponse::TransferCoding);
        }
        // RFC 9112 6.1: an HTTP/1.0 message with a transfer coding may
        // have crossed a hop that did not decode it: its framing is
        // faulty (hyper's client refuses it too).
        if version == Version::HTTP_10 && facts.transfer_coding != TransferCoding::Absent {
            return Err(BadResponse::TransferCoding);
        }
        if facts.content_length == ContentLength::Invalid
            && facts.transfer_coding == TransferCoding::Absent
        {
            return Err(BadResponse::ContentLength);
        }
        Ok(())
    }

    /// The replay rule for one request whose first token was `generation`.
    pub fn replay(&self, generation: u64, engine: Engine) -> Replay<'_> {
        Replay {
            policy: self,
            rejected: generation,
            replays: 0,
            engine,
        }
    }

    /// The `proxy.retry_on_401` policy, given whether a `WWW-Authenticate`
    /// of the 401 says `invalid_token`.
    fn rejects_token(&self, says_invalid_token: bool) -> bool {
        match self.route.retry_on_401 {
            RetryOn401::Off => false,
            RetryOn401::Any => true,
            RetryOn401::InvalidToken => says_invalid_token,
        }
    }

    /// Whether the request body is kept for a replay: a request of this
    /// length (`None`: unknown until it ends) may be replayed at all.
    pub fn keeps_body(&self, length: Option<u64>) -> bool {
        self.route.retry_on_401 != RetryOn401::Off
            && length.is_none_or(|n| n <= self.route.retry_body_limit as u64)
    }

    /// How many body bytes a replay may keep.
    pub fn replay_limit(&self) -> usize {
        self.route.retry_body_limit
    }

    // -- 5. The downstream response head ----------------------------------

    /// Whether an upstream response field reaches the client as it came.
    /// `switching`: a 101 being passed through keeps its `Upgrade` and
    /// `Connection`.
    pub fn forwards_response_field(
        &self,
        name: &[u8],
        facts: &ResponseFacts<'_>,
        switching: bool,
    ) -> bool {
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        match name.len() {
            // Kept even if `Connection` lists it: the client frames the body
            // by it. Not when a transfer coding came too: that overrides it
            // (RFC 9112 6.3), and the body is re-framed.
            14 if is(b"content-length") => return facts.transfer_coding == TransferCoding::Absent,
            // The sidecar's own goes back to the client.
            12 if is(b"x-request-id") => return false,
            _ => {}
        }
        if fields::is_hop_by_hop(name) {
            return switching && is(b"upgrade");
        }
        !facts.connection.names(name)
    }

    /// `http://<the name the client used><the route's prefix>`: where
    /// redirects into the route's upstream are pointed instead. `host`:
    /// the client's `Host`, or HTTP/2's `:authority`.
    pub fn public_base(&self, host: Option<&[u8]>) -> String {
        let host = host
            .and_then(|h| std::str::from_utf8(h).ok())
            .map(str::to_owned)
            .or_else(|| {
                self.route
                    .listen
                    .or_else(|| self.shared.listen.first().copied())
                    .map(|a| a.to_string())
            })
            .unwrap_or_else(|| "localhost".into());
        format!("http://{host}{}", self.route.prefix)
    }

    /// `proxy_redirect default`: a `Location` or `Content-Location` value
    /// pointing into the upstream base URL, pointed at `public` (see
    /// [`Policy::public_base`]) instead, so the app does not follow a
    /// redirect around the sidecar, where it would arrive without a token.
    pub fn rewrite_location(&self, value: &[u8], public: &str) -> Option<Vec<u8>> {
        let rest = if let Some(rest) = strip_prefix_ignore_case(value, self.base_url.as_bytes()) {
            rest
        } else {
            let absolute_path = value.first() == Some(&b'/') && value.get(1) != Some(&b'/');
            value
                .strip_prefix(self.base_path.as_bytes())
                .filter(|_| absolute_path)?
        };
        Some([public.as_bytes(), rest].concat())
    }

    /// Counts the upstream's answer that goes to the client (once per
    /// request, whatever replays came before it).
    pub fn pass_response(&self, status: u16, ex: &Exchange) {
        self.stats.upstream_status(status);
        ex.status.store(status, Ordering::Relaxed);
    }

    /// Which trailer fields of a chunked response reach the client, as
    /// hyper's server decides it: only when the client asked for trailers
    /// (`TE: trailers`), only fields the response's `Trailer` field
    /// declared, and never one that must not be a trailer (RFC 9110 6.5.1).
    pub fn trailer_rule(&self, facts: &ResponseFacts<'_>, client_wants: bool) -> TrailerRule {
        if !client_wants {
            return TrailerRule::default();
        }
        let declared = facts
            .trailer
            .iter()
            .flat_map(|v| fields::tokens(v))
            .map(|t| t.to_ascii_lowercase())
            .collect();
        TrailerRule { declared }
    }

    /// The reason phrase of a response passed on: the upstream's when it
    /// has one (`None`: empty, or not UTF-8 and so not kept by the
    /// parser), else the status code's own (RFC 9112 4: clients ignore
    /// it; an empty one is what a status code without a known reason gets).
    pub fn reason_phrase(status: u16, upstream: Option<&[u8]>) -> &[u8] {
        match upstream {
            Some(r) if !r.is_empty() => r,
            _ => http::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("")
                .as_bytes(),
        }
    }

    /// Whether `name` is one whose value [`Policy::rewrite_location`] may rewrite.
    pub fn is_location(name: &[u8]) -> bool {
        name.eq_ignore_ascii_case(b"location") || name.eq_ignore_ascii_case(b"content-location")
    }
}

// -- 6. Local answers -----------------------------------------------------

/// The sidecar's own answer to `e`, for the exchange `ex` (of a route, or
/// of no route): counted in the exchange's route series, logged, and its
/// head and JSON body (framing is the engine's).
pub fn local_answer(e: &ProxyError, ex: &Exchange) -> LocalAnswer {
    note_local_answer(e, ex);
    let status = e.status();
    ex.status.store(status.as_u16(), Ordering::Relaxed);
    let mut fields = e.headers();
    write_response_fields(&mut fields, ex, false, false);
    LocalAnswer {
        status,
        fields,
        body: e.body(),
        close: e.closes(),
    }
}

/// Counts and logs an answer the sidecar makes itself.
fn note_local_answer(e: &ProxyError, ex: &Exchange) {
    ex.stats.local_response(e.code());
    // token_unavailable is not logged per request: during an outage that
    // would be a line per request (thousands a second), and the
    // refresher already logs the cause once per attempt. The access log
    // and the metric still count every one.
    let token_unavailable = matches!(e, ProxyError::TokenUnavailable { .. });
    if e.status().is_server_error() && !token_unavailable {
        tracing::warn!(error = e.code().as_str(), route = &*ex.stats.name,
            request_id = ex.request_id.to_str().unwrap_or("-"),
            cause = %crate::token::refresher::error_chain(e), "answered by the sidecar");
    } else {
        tracing::debug!(error = e.code().as_str(), route = &*ex.stats.name, reason = %e, "request refused");
    }
}

/// Writes the fields the sidecar adds to every answer (the request id;
/// `Date` when the upstream sent none, RFC 9110 6.6.1; `Connection:
/// upgrade` on a 101 passed through), and records the request's
/// duration: the head is ready to go.
pub fn write_response_fields(
    sink: &mut impl FieldSink,
    ex: &Exchange,
    has_date: bool,
    switching: bool,
) {
    sink.value("x-request-id", &ex.request_id);
    if switching {
        sink.field("connection", &[b"upgrade"]);
    }
    if !has_date {
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        sink.field("date", &[date.as_bytes()]);
    }
    ex.response_started();
}

/// Which trailer fields cross ([`Policy::trailer_rule`]).
#[derive(Debug, Default)]
pub struct TrailerRule {
    /// Declared names, lower case; empty: none cross.
    declared: Vec<Vec<u8>>,
}

impl TrailerRule {
    pub fn keeps(&self, name: &[u8]) -> bool {
        const NEVER: [&str; 12] = [
            "authorization",
            "cache-control",
            "content-encoding",
            "content-length",
            "content-range",
            "content-type",
            "host",
            "max-forwards",
            "set-cookie",
            "trailer",
            "transfer-encoding",
            "te",
        ];
        self.declared.iter().any(|d| d.eq_ignore_ascii_case(name))
            && !NEVER
                .iter()
                .any(|n| n.as_bytes().eq_ignore_ascii_case(name))
    }
}

/// Admits a request whatever its route (method, `Host`, framing fields), or
/// says which answer the sidecar gives instead; the route's path rules
/// follow ([`Policy::admit_path`]).
pub fn admit(line: &RequestLine<'_>, facts: &RequestFacts<'_>) -> Result<(), ProxyError> {
    if line.method == b"CONNECT" {
        return Err(ProxyError::MethodNotAllowed);
    }
    // Methods are case-sensitive and every registered one is upper
    // case: `get` is no GET (nginx refuses it too).
    if line.method.iter().any(u8::is_ascii_lowercase) {
        return Err(ProxyError::BadRequest(
            "the request method must be upper case",
        ));
    }
    // RFC 9112 3.2: exactly one Host in an HTTP/1.1 request; HTTP/1.0
    // and HTTP/2 (`:authority`) may go without.
    let hosts_ok = match line.version {
        Version::HTTP_11 => facts.hosts == 1,
        _ => facts.hosts <= 1,
    };
    if !hosts_ok {
        return Err(ProxyError::BadRequest(
            "an HTTP/1.1 request needs exactly one Host field",
        ));
    }
    if line.version < Version::HTTP_2 {
        if let Some(a) = line.authority {
            if !is_local_host(a) {
                return Err(ProxyError::BadRequest(
                    "absolute-form target names another host; this proxy reaches only its configured upstream",
                ));
            }
        }
    }
    match (facts.content_length, facts.transfer_coding) {
        (ContentLength::Invalid, _) => {
            return Err(ProxyError::BadFraming("invalid Content-Length"))
        }
        // RFC 9112 6.3: "ought to be handled as an error" (smuggling).
        (ContentLength::Valid(_), TransferCoding::Chunked | TransferCoding::Other { .. }) => {
            return Err(ProxyError::BadFraming(
                "both Content-Length and Transfer-Encoding",
            ))
        }
        (_, TransferCoding::Other { chunked_last: true }) => {
            return Err(ProxyError::UnsupportedTransferCoding)
        }
        // The body's end cannot be found: RFC 9112 6.3 says 400.
        (
            _,
            TransferCoding::Other {
                chunked_last: false,
            },
        ) => {
            return Err(ProxyError::BadFraming(
                "Transfer-Encoding must end with chunked",
            ))
        }
        _ => {}
    }
    Ok(())
}

/// The request's id: the client's `X-Request-Id` if it is a usable one,
/// else a new one.
pub fn request_id(facts: &RequestFacts<'_>) -> HeaderValue {
    facts
        .request_id
        .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID)
        .and_then(|v| HeaderValue::from_bytes(v).ok())
        .unwrap_or_else(new_request_id)
}

/// The sidecar's own answer, before framing.
pub struct LocalAnswer {
    pub status: StatusCode,
    /// Every field but the framing ones.
    pub fields: HeaderMap,
    pub body: Bytes,
    /// The connection closes after it (the request's rest is unread).
    pub close: bool,
}

/// The 401 replay rule of one request: a 401 that says our token was
/// rejected invalidates that token's generation (the refresher fetches a new
/// one, once for any number of such 401s) and, while the request body was
/// kept whole, sends the request again with the next token, at most
/// [`MAX_REPLAYS`] times.
pub struct Replay<'p> {
    policy: &'p Policy,
    rejected: u64,
    replays: usize,
    engine: Engine,
}

impl Replay<'_> {
    /// After an upstream answer with `status` (`invalid_token`: its
    /// `WWW-Authenticate` said so): the token to send the request again
    /// with, or `None` to pass this answer on. `replayable`: the request
    /// body was kept whole.
    pub async fn again(
        &mut self,
        status: u16,
        invalid_token: bool,
        replayable: bool,
        ex: &Exchange,
    ) -> Option<HeaderValue> {
        let policy = self.policy;
        if status != 401 || !policy.rejects_token(invalid_token) {
            return None;
        }
        // Whatever happens to this request, that token is no good.
        policy.token.invalidate(self.rejected);
        if self.replays == MAX_REPLAYS || !replayable {
            return None;
        }
        // No newer token in time: the 401 goes back to the client.
        let (newer, bearer) = policy
            .token
            .wait_usable(self.rejected, policy.shared.token_wait)
            .await
            .ok()?;
        ex.generation.store(newer, Ordering::Relaxed);
        ex.replayed.store(true, Ordering::Relaxed);
        policy.metrics.replayed_after_401(self.engine);
        self.rejected = newer;
        self.replays += 1;
        Some(bearer)
    }
}

/// Hosts an absolute-form request target may name: this machine.
fn is_local_host(authority: &[u8]) -> bool {
    let Ok(a) = std::str::from_utf8(authority) else {
        return false;
    };
    let host = match a.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => a,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn strip_prefix_ignore_case<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &s[prefix.len()..])
}

/// An IP address as text, in `buf`, without allocating.
fn ip_text(ip: IpAddr, buf: &mut [u8; 64]) -> &[u8] {
    use std::io::Write;
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let _ = write!(cursor, "{ip}");
    let n = cursor.position() as usize;
    &buf[..n]
}

/// A fresh request id: 128 random bits in hex (written by hand: `format!`
/// costs more than the rest of this function together).
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = fastrand::u128(..);
    let mut id = [0u8; 32];
    for (i, d) in id.iter_mut().enumerate() {
        *d = HEX[(n >> (124 - 4 * i) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).expect("hex digits are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_32_hex_digits_and_differ() {
        let (a, b) = (new_request_id(), new_request_id());
        for id in [&a, &b] {
            let s = id.to_str().unwrap();
            assert_eq!(s.len(), 32, "{s}");
            assert!(
                s.bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
                "{s}"
            );
        }
        assert_ne!(a, b);
        fastrand::seed(7);
        let n = fastrand::u128(..);
        fastrand::seed(7);
        assert_eq!(new_request_id().to_str().unwrap(), format!("{n:032x}"));
    }

    #[test]
    fn local_hosts() {
        for h in [
            "localhost",
            "LOCALHOST:7080",
            "127.0.0.1",
            "127.0.0.1:80",
            "[::1]:7080",
            "[::1]",
        ] {
            assert!(is_local_host(h.as_bytes()), "{h}");
        }
        for h in [
            "example.test",
            "10.0.0.1:80",
            "[2001:db8::1]:80",
            "localhost.evil",
        ] {
            assert!(!is_local_host(h.as_bytes()), "{h}");
        }
    }

    #[test]
    fn ip_text_needs_no_allocation() {
        let mut buf = [0u8; 64];
        assert_eq!(ip_text([127, 0, 0, 1].into(), &mut buf), b"127.0.0.1");
        let v6: IpAddr = "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap();
        assert_eq!(
            ip_text(v6, &mut buf),
            b"2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"
        );
    }
}
