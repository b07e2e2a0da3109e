//! The HTTP/1.1 upstream connection pool: hyper's `http1::SendRequest`s for
//! the one configured upstream, kept for reuse.
//!
//! hyper-util's general client costs about as many instructions per request
//! as the rest of the proxy together: a pool keyed by host behind a `SipHash`
//! map, a task spawned per request to hand the connection back, large future
//! moves. There is one upstream, so this pool is a stack of idle connections;
//! a connection goes back on it when its response body has been read to the
//! end (see [`Checkin`]), and is taken off only when hyper says it is ready
//! for another request. The stack sits behind a mutex held for a push or a
//! pop and never across an `.await` (uncontended with one worker thread:
//! a pair of atomic operations).
//!
//! It connects through the same connector stack as the general client
//! (egress proxies, TLS), and steps aside for it when the upstream negotiates
//! HTTP/2 by ALPN ([`Sent::Http2`]); upgrades never come here.
//!
//! What it keeps from hyper-util's client: only ready connections are reused;
//! idle connections close after `proxy.pool_idle_timeout`; a request that a
//! reused connection gave back unsent (it had closed meanwhile) is sent on
//! another one, never a request whose body may have been read; `Host` is set
//! from the upstream's authority; absolute-form targets go to a forwarding
//! egress proxy, origin-form ones everywhere else.

use std::error::Error as StdError;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::Connection;
use tower_service::Service;
use tracing::debug;

use super::body::ProxyBody;
use super::egress;
use super::idle::{IdleConn, IdleStack};

type BoxError = Box<dyn StdError + Send + Sync>;

/// Why a request could not be sent on a pooled connection.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("could not connect to the upstream")]
    Connect(#[source] BoxError),
    #[error("HTTP/1.1 handshake with the upstream failed")]
    Handshake(#[source] hyper::Error),
    #[error("the upstream exchange failed")]
    Send(#[source] hyper::Error),
    /// A reused connection closed and the new one negotiated HTTP/2: the
    /// request was already rewritten for HTTP/1.1 (rare; the next request
    /// goes to the general client).
    #[error("the upstream switched to HTTP/2 between two connections")]
    SwitchedToHttp2,
}

/// What [`Pool::send`] did with a request.
pub enum Sent {
    /// The response, and the connection to hand back once its body has ended.
    Response(Response<Incoming>, Checkin),
    /// The upstream speaks HTTP/2 (ALPN): the request, unsent, for the
    /// general client, which pools HTTP/2 connections.
    Http2(Request<ProxyBody>),
}

type Io = MaybeHttpsStream<egress::Conn>;

pub struct Pool {
    connector: HttpsConnector<egress::Connector>,
    /// Where a connection that negotiated HTTP/2 goes, for the general client.
    handoff: Handoff,
    /// `scheme://authority/`: what the connector connects to.
    dst: Uri,
    /// `Host` of every request: the upstream's authority, as hyper-util sets it.
    host: HeaderValue,
    /// Requests keep their absolute-form target (a forwarding egress proxy).
    absolute_form: bool,
    idle: Arc<IdleStack<SendRequest<ProxyBody>>>,
    /// Set once a connection negotiated HTTP/2: the general client takes over.
    http2: AtomicBool,
}

impl IdleConn for SendRequest<ProxyBody> {
    /// hyper says it can take a request (not closed, not busy).
    fn usable(&mut self) -> bool {
        self.is_ready()
    }
}

impl Pool {
    pub fn new(
        connector: HttpsConnector<egress::Connector>,
        handoff: Handoff,
        scheme: Scheme,
        authority: &Authority,
        absolute_form: bool,
        idle_timeout: Duration,
    ) -> Self {
        let dst = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .expect("a scheme and an authority make a URI");
        Pool {
            connector,
            handoff,
            host: host_header(&scheme, authority),
            dst,
            absolute_form,
            idle: IdleStack::new(idle_timeout),
            http2: AtomicBool::new(false),
        }
    }

    /// Whether the upstream negotiated HTTP/2, so this pool is not used.
    pub fn is_http2(&self) -> bool {
        self.http2.load(Ordering::Relaxed)
    }

    /// Sends `req` on an idle ready connection, or a new one. A reused
    /// connection that closed before taking the request gives it back
    /// unsent; it is then sent on the next one.
    pub async fn send(self: &Arc<Self>, mut req: Request<ProxyBody>) -> Result<Sent, PoolError> {
        let mut prepared = false;
        loop {
            let (mut tx, reused) = match self.checkout() {
                Some(tx) => (tx, true),
                None => match self.connect().await? {
                    Some(tx) => (tx, false),
                    // The general client needs the request as it came.
                    None if !prepared => return Ok(Sent::Http2(req)),
                    None => {
                        return Err(PoolError::Connect("the upstream switched to HTTP/2".into()))
                    }
                },
            };
            if !prepared {
                self.prepare(&mut req);
                prepared = true;
            }
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    let checkin = Checkin {
                        pool: Arc::downgrade(self),
                        tx: Some(tx),
                    };
                    return Ok(Sent::Response(resp, checkin));
                }
                Err(mut e) => match e.take_message() {
                    // Not written: safe to send again, body untouched.
                    Some(unsent) if reused => {
                        debug!(error = %e.error(), "pooled upstream connection closed; sending on another");
                        req = unsent;
                    }
                    _ => return Err(PoolError::Send(e.into_error())),
                },
            }
        }
    }

    /// The request target and `Host` for an HTTP/1.1 connection.
    fn prepare(&self, req: &mut Request<ProxyBody>) {
        if !self.absolute_form {
            let origin = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::from(origin);
        }
        req.headers_mut()
            .entry(header::HOST)
            .or_insert_with(|| self.host.clone());
    }

    /// The most recently used idle connection that is ready.
    fn checkout(&self) -> Option<SendRequest<ProxyBody>> {
        self.idle.pop()
    }

    /// A new HTTP/1.1 connection, or `None` when the upstream chose HTTP/2.
    async fn connect(&self) -> Result<Option<SendRequest<ProxyBody>>, PoolError> {
        if self.is_http2() {
            return Ok(None);
        }
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(PoolError::Connect)?;
        let io = connector
            .call(self.dst.clone())
            .await
            .map_err(PoolError::Connect)?;
        if io.connected().is_negotiated_h2() {
            self.http2.store(true, Ordering::Relaxed);
            self.handoff.put(io);
            return Ok(None);
        }
        let (tx, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(PoolError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Some(tx))
    }

    fn checkin(self: &Arc<Self>, mut tx: SendRequest<ProxyBody>) {
        if tx.is_ready() {
            return self.idle.push(tx);
        }
        if tx.is_closed() {
            return;
        }
        // The connection task has not yet seen the end of the exchange (or
        // the upstream is closing it): hand it back once hyper knows.
        let pool = self.clone();
        tokio::spawn(async move {
            if tx.ready().await.is_ok() {
                pool.idle.push(tx);
            }
        });
    }
}

/// A connection lent to one exchange. [`Checkin::done`] when the response
/// body has ended hands it back to the pool; dropped before that, the
/// connection is closed (its response was not read to the end).
pub struct Checkin {
    pool: Weak<Pool>,
    tx: Option<SendRequest<ProxyBody>>,
}

impl Checkin {
    pub fn done(mut self) {
        if let (Some(pool), Some(tx)) = (self.pool.upgrade(), self.tx.take()) {
            pool.checkin(tx);
        }
    }
}

/// The general client's connector: takes the connection the pool made and
/// found to speak HTTP/2, if there is one, so that no connection is wasted
/// (and an egress proxy sees one `CONNECT`); otherwise connects.
#[derive(Clone)]
pub struct Handoff {
    connector: HttpsConnector<egress::Connector>,
    slot: Arc<Mutex<Option<Io>>>,
}

impl Handoff {
    pub fn new(connector: HttpsConnector<egress::Connector>) -> Self {
        Handoff {
            connector,
            slot: Arc::default(),
        }
    }

    fn put(&self, io: Io) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(io);
    }
}

impl Service<Uri> for Handoff {
    type Response = Io;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Io, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.connector.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        match self.slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(io) => Box::pin(std::future::ready(Ok(io))),
            None => Box::pin(self.connector.call(dst)),
        }
    }
}

/// `Host` for `authority` as hyper-util's client sets it: the host, and the
/// port unless it is the scheme's default; never userinfo.
pub fn host_header(scheme: &Scheme, authority: &Authority) -> HeaderValue {
    let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    let host = match authority.port_u16() {
        Some(p) if p != default_port => format!("{}:{p}", authority.host()),
        _ => authority.host().to_owned(),
    };
    HeaderValue::from_str(&host).expect("an authority's host is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_drops_default_ports_and_userinfo() {
        let h = |s: &str, a: &str| host_header(&s.parse().unwrap(), &a.parse().unwrap());
        assert_eq!(h("http", "api.test:80"), "api.test");
        assert_eq!(h("https", "api.test:443"), "api.test");
        assert_eq!(h("http", "api.test:443"), "api.test:443");
        assert_eq!(h("https", "user:pw@api.test:8443"), "api.test:8443");
        assert_eq!(h("http", "[::1]:8080"), "[::1]:8080");
    }
}
