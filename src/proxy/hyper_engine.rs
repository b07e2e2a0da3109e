//! The hyper engine: serves what the fast lane leaves (HTTP/2 both ways,
//! h2c, upgrades, `Expect`, chunked uploads, HTTP/1.0, egress proxies), and
//! everything when `proxy.fast_lane = false`. It translates between
//! hyper's heads (a `HeaderMap`) and the policy ([`super::policy`]), the
//! same functions the lane calls, and streams both bodies ([`ProxyBody`]).
//!
//! Plain HTTP/1.1 requests go to the upstream on its own HTTP/1.1 pool
//! ([`super::pool`]); HTTP/2 (when a connection picks it by ALPN) on
//! hyper-util's client, which multiplexes; upgrades on an HTTP/1.1
//! connection of their own. Header-name case is kept both ways on
//! HTTP/1.1 (hyper's `preserve_header_case`), as the lane keeps it.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{request, HeaderMap, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::debug;

use super::body::{BodyEnd, Direction, ProxyBody};
use super::error::{ProxyError, UpstreamError};
use super::exchange::Exchange;
use super::fields::{ContentLength, RequestFacts, ResponseFacts, Upgrade};
use super::policy::{self, Policy, RequestLine};
use super::pool::{self, Pool};
use super::route::Routes;
use super::upstream::{Connector, Handoff, Upstream};
use crate::metrics::Engine;

/// Serves one request; never fails: errors become local JSON answers.
/// (`L`: the fast lane's part of a route, not this engine's business.)
pub async fn handle<L>(
    routes: &Routes<L, HyperUpstream>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    let client_headers = std::mem::take(&mut parts.headers);
    let facts = RequestFacts::of(
        client_headers
            .iter()
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
    );
    let path = parts.uri.path().as_bytes();
    let authority = parts.uri.authority().map(|a| a.as_str().as_bytes());
    let line = RequestLine {
        version: parts.version,
        method: parts.method.as_str().as_bytes(),
        path,
        authority,
    };
    // The request's own rules first, then its route.
    let found = routes.find(path);
    let stats = routes.stats(&found);
    let route = policy::admit(&line, &facts).and(found.map(|(route, _)| route));
    // Counted by whichever route's metrics serve it; the engine counter too.
    routes.metrics.engine_request(Engine::Hyper);
    let ex = Arc::new(Exchange::new(
        parts.method.clone(),
        path,
        super::policy::request_id(&facts),
        stats,
        routes.access_log,
    ));
    let result = match route {
        Ok(route) => {
            route
                .hyper
                .forward(
                    &route.policy,
                    parts,
                    body,
                    &client_headers,
                    &facts,
                    peer,
                    &ex,
                )
                .await
        }
        Err(e) => Err(e),
    };
    let resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            let a = policy::local_answer(&e, &ex);
            let mut resp = Response::new(ProxyBody::full(a.body));
            *resp.status_mut() = a.status;
            *resp.headers_mut() = a.fields;
            resp
        }
    };
    resp.map(|b| b.track(ex, Direction::Down))
}

/// How the hyper engine reaches one route's upstream.
pub struct HyperUpstream {
    upstream: Arc<Upstream>,
    /// HTTP/1.1 requests: far cheaper per request than `client`.
    pool: Arc<Pool>,
    /// HTTP/2, when a connection to the upstream picked it by ALPN.
    client: Client<Handoff, ProxyBody>,
    /// HTTP/1.1 only: an upgrade cannot ride a pooled HTTP/2 connection.
    upgrade_client: Client<Connector, ProxyBody>,
}

/// What a request needs again for a replay.
struct Resend {
    parts: request::Parts,
    body: Vec<Bytes>,
}

impl HyperUpstream {
    pub fn new(policy: &Policy, upstream: Arc<Upstream>) -> Self {
        let cfg = &policy.shared;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(upstream.h2_connector());
        let upgrade_client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http1_preserve_header_case(true)
            .build(upstream.h1_connector());
        let absolute_form = matches!(upstream.route, super::egress::Route::Forward { .. });
        HyperUpstream {
            pool: Arc::new(Pool::new(
                upstream.clone(),
                absolute_form,
                cfg.pool_idle_timeout,
            )),
            upstream,
            client,
            upgrade_client,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        policy: &Policy,
        mut parts: request::Parts,
        body: Incoming,
        client_headers: &HeaderMap,
        facts: &RequestFacts<'_>,
        peer: SocketAddr,
        ex: &Arc<Exchange>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().as_bytes().to_vec());
        let path = parts.uri.path().as_bytes();
        let rest = policy.rest_of(path).unwrap_or(b"/");
        policy.admit_path(path, rest)?;
        let (generation, bearer) = policy.bearer().await?;
        ex.generation.store(generation, Ordering::Relaxed);

        let upgrade = parts.version == Version::HTTP_11 && facts.upgrade() == Upgrade::Requested;
        let client_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
        let client_upgrade = client_upgrade.filter(|_| upgrade);
        // The upstream request head: the client's fields that cross, then
        // the sidecar's own.
        let mut target = Vec::with_capacity(64);
        policy.write_target(&mut target, rest, parts.uri.query().map(str::as_bytes));
        parts.uri = Uri::builder()
            .scheme(self.upstream.scheme.clone())
            .authority(self.upstream.authority.clone())
            .path_and_query(
                PathAndQuery::from_maybe_shared(Bytes::from(target))
                    .map_err(|_| ProxyError::BadRequest("invalid request target"))?,
            )
            .build()
            .map_err(|_| ProxyError::BadRequest("invalid request target"))?;
        let mut headers = HeaderMap::with_capacity(client_headers.len() + 4);
        for (name, value) in client_headers {
            if policy.forwards_request_field(name.as_str().as_bytes(), facts) {
                headers.append(name.clone(), value.clone());
            }
        }
        policy.write_request_fields(
            &mut headers,
            facts,
            &ex.request_id,
            peer,
            authority.as_deref(),
        );
        policy.write_bearer(&mut headers, &bearer);
        parts.headers = headers;
        parts.version = Version::HTTP_11;
        // The name the client used, for redirects into the upstream.
        let client_host = facts.host.map(<[u8]>::to_vec).or(authority);

        let mut body = ProxyBody::stream(body, policy.shared.body_idle_timeout)
            .track(ex.clone(), Direction::Up);
        let length = match facts.content_length {
            ContentLength::Valid(n) => Some(n),
            _ => None,
        };
        let mut copy =
            (!upgrade && policy.keeps_body(length)).then(|| body.tee(policy.replay_limit()));
        let mut resend = Resend {
            parts: clone_parts(&parts),
            body: Vec::new(),
        };
        let mut kept = false;
        let mut sent = self
            .send(policy, Request::from_parts(parts, body), upgrade, ex)
            .await?;
        let mut replay = policy.replay(generation, Engine::Hyper);
        loop {
            let facts = ResponseFacts::of(
                sent.0
                    .headers()
                    .iter()
                    .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
            );
            policy
                .check_response(
                    sent.0.version(),
                    sent.0.status().as_u16(),
                    &facts,
                    facts_upgrade(upgrade),
                )
                .map_err(ProxyError::BadUpstreamResponse)?;
            let invalid_token = facts.invalid_token;
            drop(facts);
            // The copy is there only if the body ended within the limit.
            if !kept && sent.0.status() == http::StatusCode::UNAUTHORIZED {
                if let Some(chunks) = copy.as_mut().and_then(|c| c.try_recv().ok()) {
                    resend.body = chunks;
                    kept = true;
                }
            }
            let Some(bearer) = replay
                .again(sent.0.status().as_u16(), invalid_token, kept, ex)
                .await
            else {
                break;
            };
            let mut again = Request::from_parts(
                clone_parts(&resend.parts),
                ProxyBody::chunks(resend.body.clone()),
            );
            policy.write_bearer(again.headers_mut(), &bearer);
            sent = self.send(policy, again, false, ex).await?;
        }
        copy.take();
        Ok(self.respond(policy, sent, client_upgrade, client_host, ex))
    }

    /// Sends `req` upstream: plain requests on the HTTP/1.1 pool (or
    /// hyper-util's client while the upstream speaks HTTP/2), upgrades on a
    /// connection of their own. Returns the pooled connection to hand back
    /// when the response body ends.
    async fn send(
        &self,
        policy: &Policy,
        req: Request<ProxyBody>,
        upgrade: bool,
        ex: &Exchange,
    ) -> Result<(Response<Incoming>, Option<Box<dyn BodyEnd>>), ProxyError> {
        let started = tokio::time::Instant::now();
        let sending = async {
            let req = if upgrade || self.upstream.speaks_h2() {
                req
            } else {
                match self.pool.send(req).await? {
                    pool::Sent::Response(resp, checkin) => {
                        return Ok((resp, Some(Box::new(checkin) as Box<dyn BodyEnd>)))
                    }
                    pool::Sent::Http2(req) => req,
                }
            };
            let resp = if upgrade {
                self.upgrade_client.request(req).await?
            } else {
                self.client.request(req).await?
            };
            Ok::<_, UpstreamError>((resp, None))
        };
        let result = tokio::time::timeout(policy.route.request_timeout, sending).await;
        ex.upstream_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        match result {
            Err(_) => Err(ProxyError::UpstreamTimeout),
            Ok(Err(e)) => Err(ProxyError::from_upstream(e)),
            Ok(Ok(sent)) => Ok(sent),
        }
    }

    /// The downstream response: the upstream's head edited by the policy,
    /// its body streamed.
    fn respond(
        &self,
        policy: &Policy,
        (mut resp, checkin): (Response<Incoming>, Option<Box<dyn BodyEnd>>),
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        client_host: Option<Vec<u8>>,
        ex: &Exchange,
    ) -> Response<ProxyBody> {
        let status = resp.status().as_u16();
        policy.pass_response(status, ex);
        let switching = status == 101;
        if switching {
            if let Some(client_side) = client_upgrade {
                let upstream_side = hyper::upgrade::on(&mut resp);
                tokio::spawn(tunnel(client_side, upstream_side));
            }
        }
        let (mut parts, body) = resp.into_parts();
        let upstream_headers = std::mem::take(&mut parts.headers);
        let facts = ResponseFacts::of(
            upstream_headers
                .iter()
                .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
        );
        let public = facts
            .has_location
            .then(|| policy.public_base(client_host.as_deref()));
        let mut headers = HeaderMap::with_capacity(upstream_headers.len() + 2);
        for (name, value) in &upstream_headers {
            let name_bytes = name.as_str().as_bytes();
            if !policy.forwards_response_field(name_bytes, &facts, switching) {
                continue;
            }
            let rewritten = match &public {
                Some(public) if Policy::is_location(name_bytes) => policy
                    .rewrite_location(value.as_bytes(), public)
                    .and_then(|v| http::HeaderValue::from_bytes(&v).ok()),
                _ => None,
            };
            headers.append(name.clone(), rewritten.unwrap_or_else(|| value.clone()));
        }
        policy::write_response_fields(&mut headers, ex, facts.has_date, switching);
        drop(facts);
        parts.headers = headers;
        // An intermediary sends its own HTTP version (RFC 9110 2.5).
        parts.version = Version::HTTP_11;
        // hyper writes the reason it read (when not the canonical one) or
        // else the canonical one: it gets the policy's choice.
        if let Some(read) = parts.extensions.get::<hyper::ext::ReasonPhrase>() {
            if Policy::reason_phrase(status, Some(read.as_bytes())) != read.as_bytes() {
                parts.extensions.remove::<hyper::ext::ReasonPhrase>();
            }
        }
        let body = ProxyBody::stream(body, policy.shared.body_idle_timeout).with_checkin(checkin);
        Response::from_parts(parts, body)
    }
}

/// A 101 passes only to a request that asked for an upgrade.
fn facts_upgrade(upgrade: bool) -> Upgrade {
    if upgrade {
        Upgrade::Requested
    } else {
        Upgrade::None
    }
}

/// The head of a request, again, for a replay.
fn clone_parts(parts: &request::Parts) -> request::Parts {
    let mut again = Request::new(());
    *again.method_mut() = parts.method.clone();
    *again.uri_mut() = parts.uri.clone();
    *again.version_mut() = parts.version;
    *again.headers_mut() = parts.headers.clone();
    *again.extensions_mut() = parts.extensions.clone();
    again.into_parts().0
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
