//! The reverse proxy: every request goes to the one configured upstream with
//! `Authorization: Bearer <token>` in place of whatever the client sent.
//!
//! Per request: one `ArcSwap` load for the token (no lock, never a call to
//! the token endpoint), header rewriting in place, bodies streamed both ways.
//! A 401 that says the token is bad invalidates that generation (the refresher
//! fetches a new one, once for any number of such 401s) and the request is
//! replayed from the bounded copy its body kept while streaming: once, or
//! twice when the replay's new token was itself revoked in flight
//! ([`MAX_REPLAYS`]).

pub mod body;
pub mod egress;
pub mod error;
pub mod h1;
pub mod headers;
pub mod idle;
pub mod lane;
pub mod path;
pub mod pool;
pub mod stall;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::uri::{Authority, Scheme};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::{ProxyConfig, RetryOn401};
use crate::metrics::Metrics;
use crate::token::TokenHandle;
use body::{BodyError, Direction, Exchange, ProxyBody};
pub use error::ProxyError;
use headers::X_REQUEST_ID;

type UpstreamClient<C = HttpsConnector<egress::Connector>> = Client<C, ProxyBody>;

/// Why the proxy cannot be built from its config and environment.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid upstream URL")]
    Upstream(#[source] http::Error),
    #[error(transparent)]
    Egress(#[from] egress::EgressError),
}

/// Replays after a 401 that rejected our token, at most.
///
/// One is the rule. A second happens only when the replay's own, brand-new
/// token was rejected too: on a server that keeps one token per user, a pod
/// of the fleet whose refresh landed in the same milliseconds revokes the
/// token this request was just replayed with, and the token after it is
/// good. Two bound what an upstream that rejects every token can cost a
/// request: two waits for a new token (each paced by `refresh.min_interval`).
pub const MAX_REPLAYS: usize = 2;

/// Everything a request needs, built once at start.
pub struct Proxy {
    cfg: ProxyConfig,
    token: Arc<TokenHandle>,
    metrics: Arc<Metrics>,
    /// HTTP/2, when the upstream offers it by ALPN (the pool found out).
    client: UpstreamClient<pool::Handoff>,
    /// HTTP/1.1 only: an upgrade cannot ride a pooled HTTP/2 connection.
    upgrade_client: UpstreamClient,
    /// Plain HTTP/1.1 requests: far cheaper per request than `client`, which
    /// takes over when the upstream negotiates HTTP/2.
    pool: Arc<pool::Pool>,
    scheme: Scheme,
    authority: Authority,
    /// Upstream base URL as text (`https://host/base/`) and its path (`/base/`).
    base_url: String,
    base_path: String,
    /// `Proxy-Authorization` for a forwarding egress proxy with credentials.
    egress_auth: Option<HeaderValue>,
    /// Plain HTTP/1.1 exchanges with an HTTP/1.1 upstream (plain or TLS), without hyper.
    lane: Option<Arc<lane::Lane>>,
}

impl Proxy {
    pub fn new(
        cfg: ProxyConfig,
        token: Arc<TokenHandle>,
        metrics: Arc<Metrics>,
        tls: rustls::ClientConfig,
    ) -> Result<Self, BuildError> {
        let upstream: Uri = cfg
            .upstream
            .as_str()
            .parse()
            .map_err(|e: http::uri::InvalidUri| BuildError::Upstream(e.into()))?;
        let scheme = upstream.scheme().cloned().unwrap_or(Scheme::HTTPS);
        let authority = upstream
            .authority()
            .cloned()
            .unwrap_or_else(|| Authority::from_static("invalid"));
        // The same environment variables, read by the same parser, as reqwest.
        let route = egress::route(&Matcher::from_env(), &upstream)?;
        if let Some(proxy) = route.proxy() {
            info!(egress_proxy = %proxy, "upstream requests go through an egress proxy (from the environment)");
        }
        let egress_auth = match &route {
            egress::Route::Forward { auth, .. } => auth.clone(),
            _ => None,
        };
        let handoff = pool::Handoff::new(connector(&cfg, &route, tls.clone(), true));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(handoff.clone());
        let upgrade_client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector(&cfg, &route, tls.clone(), false));
        let lane = lane::Lane::new(
            &cfg.upstream,
            pool::host_header(&scheme, &authority),
            cfg.fast_lane && matches!(route, egress::Route::Direct),
            &tls,
            cfg.connect_timeout,
            cfg.pool_idle_timeout,
        );
        let pool = Arc::new(pool::Pool::new(
            connector(&cfg, &route, tls, true),
            handoff,
            scheme.clone(),
            &authority,
            matches!(route, egress::Route::Forward { .. }),
            cfg.pool_idle_timeout,
        ));

        Ok(Proxy {
            base_url: cfg.upstream.as_str().to_owned(),
            base_path: cfg.upstream.path().to_owned(),
            cfg,
            token,
            metrics,
            client,
            upgrade_client,
            pool,
            scheme,
            authority,
            egress_auth,
            lane,
        })
    }

    /// Serves a client connection on the fast lane when it can; gives the
    /// connection back (with any bytes read) for hyper to serve otherwise.
    pub async fn serve_lane(
        &self,
        io: lane::ClientIo,
        peer: SocketAddr,
        stop: tokio::sync::watch::Receiver<Option<std::time::Duration>>,
    ) -> Option<lane::Prefixed<lane::ClientIo>> {
        match &self.lane {
            Some(l) => lane::serve(self, l, io, peer, stop).await,
            None => Some(lane::Prefixed::new(bytes::Bytes::new(), io)),
        }
    }

    /// Serves one request; never fails: errors become local JSON answers.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        self.metrics.engine_request(crate::metrics::Engine::Hyper);
        let request_id = req
            .headers()
            .get(&X_REQUEST_ID)
            .filter(|v| !v.is_empty() && v.len() <= 200)
            .cloned()
            .unwrap_or_else(new_request_id);
        let exchange = Arc::new(Exchange::new(
            req.method().clone(),
            req.uri().path().into(),
            req.uri().authority().cloned(),
            request_id.clone(),
            self.metrics.clone(),
            self.cfg.access_log,
        ));
        let mut resp = match self.forward(req, peer, &exchange).await {
            Ok(resp) => resp,
            Err(e) => {
                self.note_local_answer(&e, &request_id);
                e.to_response()
            }
        };
        exchange
            .status
            .store(resp.status().as_u16(), Ordering::Relaxed);
        resp.headers_mut().insert(&X_REQUEST_ID, request_id);
        self.metrics.request_done(exchange.start.elapsed());
        resp.map(|b| b.track(exchange, Direction::Down))
    }

    /// Counts and logs an answer the sidecar makes itself.
    fn note_local_answer(&self, e: &ProxyError, request_id: &HeaderValue) {
        self.metrics.local_response(e.code());
        // token_unavailable is not logged per request: during an outage that
        // would be a line per request (thousands a second), and the
        // refresher already logs the cause once per attempt. The access log
        // and the metric still count every one.
        let token_unavailable = matches!(e, ProxyError::TokenUnavailable { .. });
        if e.status().is_server_error() && !token_unavailable {
            warn!(error = e.code().as_str(), request_id = request_id.to_str().unwrap_or("-"),
                cause = %crate::token::refresher::error_chain(e), "answered by the sidecar");
        } else {
            debug!(error = e.code().as_str(), "request refused");
        }
    }

    /// Whether a raw request path may pass (`proxy.allow_paths`, dot-segments).
    fn check_path(&self, raw_path: &str) -> Result<(), ProxyError> {
        path::check(raw_path, &self.cfg.allow_paths).map_err(|r| match r {
            path::PathRejection::DotSegment => {
                ProxyError::BadRequest("dot-segments are not allowed in the request path")
            }
            path::PathRejection::NotAllowed => ProxyError::PathNotAllowed,
            path::PathRejection::NotAPath => {
                ProxyError::BadRequest("the request target must be a path")
            }
        })
    }

    /// The token to inject and its generation: one `ArcSwap` load; before
    /// the first token ever, a wait for it; an expired token never.
    async fn bearer(&self) -> Result<(u64, HeaderValue), ProxyError> {
        match self.token.usable() {
            Some(t) => Ok(t),
            None if !self.token.ever_had_token() => self
                .token
                .wait_first(self.cfg.token_wait)
                .await
                .map_err(|u| ProxyError::TokenUnavailable {
                    retry_after: u.retry_after,
                }),
            None => Err(ProxyError::TokenUnavailable {
                retry_after: self.token.retry_after(),
            }),
        }
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        ex: &Arc<Exchange>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::MethodNotAllowed);
        }
        if req.version() < Version::HTTP_2 {
            if let Some(a) = req.uri().authority() {
                if !is_local_host(a.host()) {
                    return Err(ProxyError::BadRequest(
                        "absolute-form target names another host; this proxy reaches only its configured upstream",
                    ));
                }
            }
        }
        self.check_path(req.uri().path())?;
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path::join(
                &self.base_path,
                req.uri().path(),
                req.uri().query(),
            ))
            .build()
            .map_err(|_| ProxyError::BadRequest("invalid request target"))?;

        let (generation, bearer) = self.bearer().await?;
        ex.generation.store(generation, Ordering::Relaxed);

        let upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let forwarded = self.cfg.forwarded_headers.then(|| headers::Forwarded {
            client_ip: peer.ip(),
            authority: ex.authority.as_ref().map(|a| a.as_str()),
        });
        let client_host = headers::rewrite_request(&mut parts.headers, bearer, upgrade, forwarded);
        parts.headers.insert(&X_REQUEST_ID, ex.request_id.clone());
        if let Some(auth) = &self.egress_auth {
            parts
                .headers
                .insert(header::PROXY_AUTHORIZATION, auth.clone());
        }
        parts.uri = uri;
        parts.version = Version::HTTP_11;

        let mut body =
            ProxyBody::stream(body, self.cfg.body_idle_timeout).track(ex.clone(), Direction::Up);
        let replay = (self.cfg.retry_on_401 != RetryOn401::Off && !upgrade).then(|| {
            let copy = body.tee(self.cfg.retry_body_limit);
            (
                copy,
                parts.method.clone(),
                parts.uri.clone(),
                parts.headers.clone(),
            )
        });
        let mut sent = self
            .send(Request::from_parts(parts, body), upgrade, ex)
            .await?;

        if sent.0.status() == StatusCode::UNAUTHORIZED && self.token_rejected(sent.0.headers()) {
            // Whatever happens to this request, that token is no good.
            self.token.invalidate(generation);
            if let Some((mut copy, method, uri, headers)) = replay {
                // The copy is there only if the body ended within the limit.
                if let Ok(chunks) = copy.try_recv() {
                    let mut rejected = generation;
                    for _ in 0..MAX_REPLAYS {
                        let Ok((newer, bearer)) =
                            self.token.wait_usable(rejected, self.cfg.token_wait).await
                        else {
                            break; // no newer token in time: pass the 401 back
                        };
                        let mut again = Request::new(ProxyBody::chunks(chunks.clone()));
                        *again.method_mut() = method.clone();
                        *again.uri_mut() = uri.clone();
                        *again.headers_mut() = headers.clone();
                        again.headers_mut().insert(header::AUTHORIZATION, bearer);
                        ex.generation.store(newer, Ordering::Relaxed);
                        ex.replayed.store(true, Ordering::Relaxed);
                        self.metrics
                            .replayed_after_401(crate::metrics::Engine::Hyper);
                        sent = self.send(again, false, ex).await?;
                        if sent.0.status() != StatusCode::UNAUTHORIZED
                            || !self.token_rejected(sent.0.headers())
                        {
                            break;
                        }
                        self.token.invalidate(newer);
                        rejected = newer;
                    }
                }
            }
        }
        Ok(self.respond(sent, client_upgrade, client_host, ex))
    }

    /// Whether a 401 says our token is bad, per `proxy.retry_on_401`.
    fn token_rejected(&self, headers: &HeaderMap) -> bool {
        self.rejects_token(
            headers
                .get_all(header::WWW_AUTHENTICATE)
                .iter()
                .any(|v| h1::says_invalid_token(v.as_bytes())),
        )
    }

    /// The `proxy.retry_on_401` policy, given whether a `WWW-Authenticate`
    /// of the 401 says `invalid_token`.
    fn rejects_token(&self, says_invalid_token: bool) -> bool {
        match self.cfg.retry_on_401 {
            RetryOn401::Off => false,
            RetryOn401::Any => true,
            RetryOn401::InvalidToken => says_invalid_token,
        }
    }

    /// Sends `req` upstream: plain requests on the HTTP/1.1 pool (or
    /// hyper-util's client once the upstream turned out to speak HTTP/2),
    /// upgrades on a connection of their own. Returns the pooled connection
    /// to hand back when the response body ends.
    async fn send(
        &self,
        req: Request<ProxyBody>,
        upgrade: bool,
        ex: &Exchange,
    ) -> Result<(Response<Incoming>, Option<pool::Checkin>), ProxyError> {
        let started = Instant::now();
        let sending = async {
            let req = if upgrade || self.pool.is_http2() {
                req
            } else {
                match self.pool.send(req).await? {
                    pool::Sent::Response(resp, checkin) => return Ok((resp, Some(checkin))),
                    pool::Sent::Http2(req) => req,
                }
            };
            let resp = if upgrade {
                self.upgrade_client.request(req).await?
            } else {
                self.client.request(req).await?
            };
            Ok::<_, error::UpstreamError>((resp, None))
        };
        let result = tokio::time::timeout(self.cfg.request_timeout, sending).await;
        ex.upstream_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        match result {
            Err(_) => Err(ProxyError::UpstreamTimeout),
            Ok(Err(e)) => Err(match client_body_error(&*e) {
                Some(BodyError::Idle(_)) => ProxyError::ClientBodyTimeout,
                Some(BodyError::Stream(_)) => ProxyError::ClientBody(e),
                None if crate::tls::is_tls_error(&*e) => ProxyError::UpstreamTls(e),
                None => ProxyError::UpstreamUnavailable(e),
            }),
            Ok(Ok(sent)) => Ok(sent),
        }
    }

    fn respond(
        &self,
        (mut resp, checkin): (Response<Incoming>, Option<pool::Checkin>),
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        client_host: Option<HeaderValue>,
        ex: &Exchange,
    ) -> Response<ProxyBody> {
        self.metrics.upstream_status(resp.status().as_u16());
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            if let Some(client_side) = client_upgrade {
                let upstream_side = hyper::upgrade::on(&mut resp);
                tokio::spawn(tunnel(client_side, upstream_side));
            }
        }
        let (mut parts, body) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, switching);
        if parts.headers.contains_key(header::LOCATION)
            || parts.headers.contains_key(header::CONTENT_LOCATION)
        {
            // The name the client used: `Host`, or HTTP/2's `:authority`.
            let host = client_host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .or_else(|| ex.authority.as_ref().map(|a| a.as_str()))
                .map(str::to_owned)
                .or_else(|| self.cfg.listen.first().map(|a| a.to_string()))
                .unwrap_or_else(|| "localhost".into());
            let public = format!("http://{host}/");
            headers::rewrite_locations(
                &mut parts.headers,
                &self.base_url,
                &self.base_path,
                &public,
            );
        }
        let body = ProxyBody::stream(body, self.cfg.body_idle_timeout).with_checkin(checkin);
        Response::from_parts(parts, body)
    }
}

/// Bytes both ways between an upgraded client and upstream, until either closes.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(client, upstream) {
        Ok((c, u)) => {
            let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
            if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                debug!(error = %e, "upgraded connection ended with an error");
            }
        }
        Err(e) => debug!(error = %e, "upgrade failed"),
    }
}

/// The connector stack to the upstream: TCP (or an egress proxy), then TLS.
fn connector(
    cfg: &ProxyConfig,
    route: &egress::Route,
    tls: rustls::ClientConfig,
    allow_h2: bool,
) -> HttpsConnector<egress::Connector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.connect_timeout));
    http.set_keepalive(Some(std::time::Duration::from_secs(60)));
    let tcp = egress::Connector::new(route, http, Some(cfg.body_idle_timeout));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    if allow_h2 {
        builder.enable_http1().enable_http2().wrap_connector(tcp)
    } else {
        builder.enable_http1().wrap_connector(tcp)
    }
}

/// The client's request body failure that made sending fail, if that is why
/// (so a stalled or broken upload is not blamed on the upstream).
fn client_body_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyError> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(b) = err.downcast_ref::<BodyError>() {
            return Some(b);
        }
        cur = err.source();
    }
    None
}

/// Hosts an absolute-form request target may name: this machine.
fn is_local_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A fresh request id: 128 random bits in hex (written by hand: `format!`
/// costs more than the rest of this function together).
fn new_request_id() -> HeaderValue {
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
}
