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
//! It connects through the upstream's one connector stack
//! ([`super::upstream`]: egress proxies, TLS), and steps aside for hyper's
//! general client when a connection negotiates HTTP/2 by ALPN
//! ([`Sent::Http2`]); upgrades never come here. Header-name case is kept
//! as the upstream wrote it.
//!
//! What it keeps from hyper-util's client: only ready connections are reused;
//! idle connections close after `proxy.pool_idle_timeout`; a request that a
//! reused connection gave back unsent (it had closed meanwhile) is sent on
//! another one, never a request whose body may have been read; `Host` is set
//! from the upstream's authority; absolute-form targets go to a forwarding
//! egress proxy, origin-form ones everywhere else.

use std::sync::{Arc, Weak};
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{header, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use tracing::debug;

use super::body::{BodyEnd, ProxyBody};
use super::idle::{IdleConn, IdleStack};
use super::upstream::{BoxError, Upstream};

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

pub struct Pool {
    upstream: Arc<Upstream>,
    /// Requests keep their absolute-form target (a forwarding egress proxy).
    absolute_form: bool,
    idle: Arc<IdleStack<SendRequest<ProxyBody>>>,
}

impl IdleConn for SendRequest<ProxyBody> {
    /// hyper says it can take a request (not closed, not busy).
    fn usable(&mut self) -> bool {
        self.is_ready()
    }
}

impl Pool {
    pub fn new(upstream: Arc<Upstream>, absolute_form: bool, idle_timeout: Duration) -> Self {
        Pool {
            upstream,
            absolute_form,
            idle: IdleStack::new(idle_timeout),
        }
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
                    None => return Err(PoolError::SwitchedToHttp2),
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
            .or_insert_with(|| self.upstream.host_header.clone());
    }

    /// The most recently used idle connection that is ready.
    fn checkout(&self) -> Option<SendRequest<ProxyBody>> {
        self.idle.pop()
    }

    /// A new HTTP/1.1 connection, or `None` when the upstream chose HTTP/2.
    async fn connect(&self) -> Result<Option<SendRequest<ProxyBody>>, PoolError> {
        let Some(io) = self.upstream.connect().await.map_err(PoolError::Connect)? else {
            return Ok(None);
        };
        let (tx, conn) = http1::Builder::new()
            .preserve_header_case(true)
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

/// A connection lent to one exchange. [`BodyEnd::ended`] when the response
/// body has ended hands it back to the pool; dropped before that, the
/// connection is closed (its response was not read to the end).
pub struct Checkin {
    pool: Weak<Pool>,
    tx: Option<SendRequest<ProxyBody>>,
}

impl BodyEnd for Checkin {
    fn ended(mut self: Box<Self>) {
        if let (Some(pool), Some(tx)) = (self.pool.upgrade(), self.tx.take()) {
            pool.checkin(tx);
        }
    }
}
