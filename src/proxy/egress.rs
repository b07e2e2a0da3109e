//! Egress proxies for the upstream client. Corporate clusters often reach the
//! outside only through `HTTPS_PROXY`/`HTTP_PROXY` (or `ALL_PROXY`) with
//! `NO_PROXY` exceptions. The token client (reqwest) honours them; hyper-util's
//! client does not by default, so this module makes it read them the same way,
//! with the same parser ([`Matcher::from_env`], which reqwest uses too).
//!
//! There is one upstream, so the route is decided once, at start:
//! - an `https` upstream goes through a `CONNECT host:port` tunnel; TLS runs end
//!   to end inside it, so the proxy sees the host and port, never the token;
//! - an `http` upstream is sent to the proxy in absolute form
//!   (`GET http://host/path`), as reqwest and curl do, since most proxies
//!   allow `CONNECT` to port 443 only;
//! - credentials in the proxy URL (`http://user:pass@proxy:3128`) become
//!   `Proxy-Authorization: Basic ...` on the `CONNECT` or on each forwarded
//!   request.
//!
//! Only `http://` proxy URLs are supported; an `https://` or `socks` proxy that
//! would apply to the upstream stops the start with an error rather than being
//! silently bypassed.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Uri};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::serve::stall::WriteStall;

/// How the upstream is reached.
#[derive(Debug, Clone)]
pub enum Route {
    Direct,
    /// `CONNECT` through the proxy at `proxy` (an https upstream).
    Tunnel {
        proxy: Uri,
        auth: Option<HeaderValue>,
    },
    /// Absolute-form requests to the proxy at `proxy` (an http upstream).
    Forward {
        proxy: Uri,
        auth: Option<HeaderValue>,
    },
}

impl Route {
    /// The proxy's address (no credentials), if there is one.
    pub fn proxy(&self) -> Option<&Uri> {
        match self {
            Route::Direct => None,
            Route::Tunnel { proxy, .. } | Route::Forward { proxy, .. } => Some(proxy),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error(
        "the egress proxy for the upstream ({proxy}) is not an http:// proxy; \
         only http:// proxies are supported (check HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY)"
    )]
    UnsupportedScheme { proxy: Uri },
}

/// The route to `upstream` that `matcher` (the environment) asks for.
pub fn route(matcher: &Matcher, upstream: &Uri) -> Result<Route, EgressError> {
    let Some(intercept) = matcher.intercept(upstream) else {
        return Ok(Route::Direct);
    };
    let proxy = intercept.uri().clone();
    if proxy.scheme_str() != Some("http") {
        return Err(EgressError::UnsupportedScheme { proxy });
    }
    let auth = intercept.basic_auth().cloned();
    Ok(if upstream.scheme_str() == Some("https") {
        Route::Tunnel { proxy, auth }
    } else {
        Route::Forward { proxy, auth }
    })
}

/// The TCP connector of the upstream client, following a [`Route`]; hyper-rustls
/// wraps it for TLS.
/// Its connections fail a write that stays pending for `write_stall`
/// (see [`super::stall`]).
#[derive(Clone)]
pub struct Connector {
    kind: Kind,
    write_stall: Option<Duration>,
}

#[derive(Clone)]
enum Kind {
    Direct(HttpConnector),
    Tunnel(Tunnel<HttpConnector>),
    Forward { proxy: Uri, http: HttpConnector },
}

impl Connector {
    pub fn new(route: &Route, http: HttpConnector, write_stall: Option<Duration>) -> Self {
        let kind = match route {
            Route::Direct => Kind::Direct(http),
            Route::Tunnel { proxy, auth } => {
                let tunnel = Tunnel::new(proxy.clone(), http);
                Kind::Tunnel(match auth {
                    Some(a) => tunnel.with_auth(a.clone()),
                    None => tunnel,
                })
            }
            Route::Forward { proxy, .. } => Kind::Forward {
                proxy: proxy.clone(),
                http,
            },
        };
        Connector { kind, write_stall }
    }
}

type BoxError = Box<dyn StdError + Send + Sync>;

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match &mut self.kind {
            Kind::Direct(http) | Kind::Forward { http, .. } => {
                http.poll_ready(cx).map_err(Into::into)
            }
            Kind::Tunnel(t) => t.poll_ready(cx).map_err(Into::into),
        }
    }

    // One boxed future per new connection, not per request.
    fn call(&mut self, dst: Uri) -> Self::Future {
        let stall = self.write_stall;
        match &mut self.kind {
            Kind::Direct(http) => {
                let connecting = http.call(dst);
                Box::pin(async move { Ok(Conn::new(connecting.await?, false, stall)) })
            }
            Kind::Tunnel(t) => {
                let connecting = t.call(dst);
                Box::pin(async move { Ok(Conn::new(connecting.await?, false, stall)) })
            }
            Kind::Forward { proxy, http } => {
                let connecting = http.call(proxy.clone());
                Box::pin(async move { Ok(Conn::new(connecting.await?, true, stall)) })
            }
        }
    }
}

/// A TCP connection that may lead to a forwarding proxy; hyper's client
/// sends absolute-form request targets on connections marked proxied.
pub struct Conn {
    io: TokioIo<TcpStream>,
    proxied: bool,
    stall: WriteStall,
}

impl Conn {
    fn new(io: TokioIo<TcpStream>, proxied: bool, write_stall: Option<Duration>) -> Self {
        Conn {
            io,
            proxied,
            stall: WriteStall::new(write_stall),
        }
    }

    /// The TCP stream itself, for the fast lane (which bounds its writes
    /// with its own timers).
    pub fn into_tcp(self) -> TcpStream {
        self.io.into_inner()
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.proxied)
    }
}

impl Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.stall.check(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.stall.check(cx, polled)
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
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.stall.check(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    #[test]
    fn https_upstream_tunnels_http_upstream_forwards() {
        let m = Matcher::builder()
            .https("http://user:p%40ss@proxy.corp:3128")
            .http("http://proxy.corp:8080")
            .build();
        match route(&m, &uri("https://api.example.test/base/")).unwrap() {
            Route::Tunnel { proxy, auth } => {
                assert_eq!(proxy, uri("http://proxy.corp:3128/"));
                // user:p@ss
                assert_eq!(auth.unwrap(), "Basic dXNlcjpwQHNz");
            }
            other => panic!("{other:?}"),
        }
        match route(&m, &uri("http://api.example.test/base/")).unwrap() {
            Route::Forward { proxy, auth } => {
                assert_eq!(proxy, uri("http://proxy.corp:8080/"));
                assert!(auth.is_none());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_proxy_and_unset_go_direct() {
        let m = Matcher::builder()
            .all("http://proxy.corp:3128")
            .no("example.test, 10.0.0.0/8")
            .build();
        for u in [
            "https://api.example.test/",
            "http://example.test/",
            "https://10.1.2.3:8443/",
        ] {
            assert!(matches!(route(&m, &uri(u)).unwrap(), Route::Direct), "{u}");
        }
        assert!(matches!(
            route(&m, &uri("https://other.test/")).unwrap(),
            Route::Tunnel { .. }
        ));
        let none = Matcher::builder().build();
        assert!(matches!(
            route(&none, &uri("https://api.example.test/")).unwrap(),
            Route::Direct
        ));
    }

    #[test]
    fn non_http_proxies_are_refused_not_bypassed() {
        for p in ["https://proxy.corp:443", "socks5://proxy.corp:1080"] {
            let m = Matcher::builder().all(p).build();
            let err = route(&m, &uri("https://api.example.test/")).unwrap_err();
            assert!(err.to_string().contains("http:// proxies"), "{err}");
        }
        // ...unless NO_PROXY exempts the upstream.
        let m = Matcher::builder()
            .all("socks5://proxy.corp:1080")
            .no("api.example.test")
            .build();
        assert!(matches!(
            route(&m, &uri("https://api.example.test/")).unwrap(),
            Route::Direct
        ));
    }
}
