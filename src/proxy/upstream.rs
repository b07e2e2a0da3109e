//! Reaching the upstream, for both engines: one connector stack (TCP with
//! hyper-util's `HttpConnector`, an egress proxy when the environment names
//! one, TLS with ALPN `h2`/`http/1.1`), so both engines connect the same way:
//! `proxy.connect_timeout` split across the resolved addresses, the other
//! address family tried after 300 ms (happy eyeballs), the same TLS policy.
//!
//! Which HTTP version a connection speaks is decided per connection, by
//! ALPN: an HTTP/1.1 connection serves the engine that made it; one that
//! picked `h2` goes to hyper's HTTP/2 client ([`Handoff`]), which pools it,
//! and while such a connection lives, new exchanges go there too
//! ([`Upstream::speaks_h2`]). Once it closes, the next exchange finds out
//! afresh, so a load balancer that mixes versions is followed both ways.

use std::error::Error as StdError;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use tower_service::Service;

use super::egress;
use crate::config::ProxyConfig;

pub type BoxError = Box<dyn StdError + Send + Sync>;

/// A connection to the upstream, plain or TLS, as the connector made it.
pub type Io = MaybeHttpsStream<egress::Conn>;

/// The connector stack to the upstream.
pub type Connector = HttpsConnector<egress::Connector>;

/// The one configured upstream and how it is reached.
pub struct Upstream {
    /// `scheme://authority/`: what the connector connects to.
    dst: Uri,
    pub scheme: Scheme,
    pub authority: Authority,
    /// `Host` of every HTTP/1.1 request: the host, and the port unless it
    /// is the scheme's default; never userinfo (as hyper-util sets it).
    pub host_header: HeaderValue,
    pub route: egress::Route,
    /// ALPN `h2` and `http/1.1`.
    connector: Connector,
    /// ALPN `http/1.1` only: an upgrade cannot ride an HTTP/2 connection.
    connector_h1: Connector,
    handoff: Handoff,
}

impl Upstream {
    pub fn new(
        cfg: &ProxyConfig,
        scheme: Scheme,
        authority: Authority,
        route: egress::Route,
        tls: rustls::ClientConfig,
    ) -> Self {
        let both = connector(cfg, &route, tls.clone(), true);
        let dst = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .expect("a scheme and an authority make a URI");
        Upstream {
            dst,
            host_header: host_header(&scheme, &authority),
            scheme,
            authority,
            connector_h1: connector(cfg, &route, tls, false),
            handoff: Handoff::new(both.clone()),
            connector: both,
            route,
        }
    }

    /// Whether an HTTP/2 connection to the upstream is alive in hyper's
    /// client: new exchanges go there rather than opening HTTP/1.1 ones.
    pub fn speaks_h2(&self) -> bool {
        self.handoff.live.load(Ordering::Relaxed) > 0
    }

    /// A new HTTP/1.1 connection (ALPN `http/1.1`, or none over plain
    /// TCP), or `None` when the upstream picked `h2`: that connection went
    /// to hyper's client ([`Upstream::h2_connector`]) at once, so no
    /// handshake is wasted, and the exchange belongs there too.
    pub async fn connect(&self) -> Result<Option<Io>, BoxError> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx)).await?;
        let io = connector.call(self.dst.clone()).await?;
        if io.connected().is_negotiated_h2() {
            self.handoff.put(io);
            return Ok(None);
        }
        Ok(Some(io))
    }

    /// The connector of hyper's general client (HTTP/2 by ALPN), which
    /// takes the connections [`Upstream::connect`] handed over.
    pub fn h2_connector(&self) -> Handoff {
        self.handoff.clone()
    }

    /// The connector for upgrades (HTTP/1.1 only).
    pub fn h1_connector(&self) -> Connector {
        self.connector_h1.clone()
    }
}

/// The connector stack: TCP (or an egress proxy), then TLS.
fn connector(
    cfg: &ProxyConfig,
    route: &egress::Route,
    tls: rustls::ClientConfig,
    allow_h2: bool,
) -> Connector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
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

/// The general client's connector: takes the connection that
/// [`Upstream::connect`] found to speak HTTP/2, if there is one (so that no
/// connection is wasted, and an egress proxy sees one `CONNECT`); otherwise
/// connects. Counts the HTTP/2 connections alive.
#[derive(Clone)]
pub struct Handoff {
    connector: Connector,
    slot: Arc<Mutex<Option<Tracked>>>,
    live: Arc<AtomicUsize>,
}

impl Handoff {
    fn new(connector: Connector) -> Self {
        Handoff {
            connector,
            slot: Arc::default(),
            live: Arc::default(),
        }
    }

    /// Counted from now: the exchange that found it goes to hyper's
    /// client, which takes it from the slot.
    fn put(&self, io: Io) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Tracked::new(io, &self.live));
    }
}

/// A connection hyper's client holds; while it speaks HTTP/2 it counts as
/// one live HTTP/2 connection.
pub struct Tracked {
    io: Io,
    _guard: Option<LiveGuard>,
}

struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Tracked {
    fn new(io: Io, live: &Arc<AtomicUsize>) -> Self {
        let guard = io.connected().is_negotiated_h2().then(|| {
            live.fetch_add(1, Ordering::Relaxed);
            LiveGuard(live.clone())
        });
        Tracked { io, _guard: guard }
    }
}

impl Service<Uri> for Handoff {
    type Response = Tracked;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Tracked, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.connector.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let live = self.live.clone();
        match self.slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(tracked) => Box::pin(std::future::ready(Ok(tracked))),
            None => {
                let connecting = self.connector.call(dst);
                Box::pin(async move { Ok(Tracked::new(connecting.await?, &live)) })
            }
        }
    }
}

impl Connection for Tracked {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl Read for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
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
