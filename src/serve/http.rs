//! Serving one connection with hyper (HTTP/1.1, and HTTP/2 where allowed),
//! for the admin server and the proxy's hyper engine alike: header-read
//! timeouts, idle HTTP/2 connections asked to close, and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::debug;

use super::{ClientIo, Handler, ServeOptions, StopSignal};

/// hyper's connection builder for these options. HTTP/1.1 header-name case
/// is kept as the peer wrote it, in both directions (the fast lane keeps it
/// too, and some clients read names case-sensitively).
pub fn builder(opts: &ServeOptions) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.idle_timeout)
        .max_buf_size(opts.max_header_bytes.max(8192))
        .preserve_header_case(true)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(opts.idle_timeout / 2))
        .max_header_list_size(opts.max_header_bytes as u32);
    if opts.http2 {
        builder
    } else {
        builder.http1_only()
    }
}

/// Serves `io` with `handler` until the peer leaves, the connection idles
/// out, or shutdown begins (then in-flight requests finish first).
pub async fn serve_connection<I, H, F, B>(
    io: I,
    peer: SocketAddr,
    builder: &auto::Builder<TokioExecutor>,
    idle: Duration,
    handler: H,
    mut stop: StopSignal,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let requests = Arc::new(AtomicU64::new(0));
    let counted = requests.clone();
    let service = service_fn(move |req| {
        counted.fetch_add(1, Ordering::Relaxed);
        let fut = handler(req);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    // HTTP/1.1 closes idle keep-alive connections itself
    // (header_read_timeout); HTTP/2 has no such timer, so a connection that
    // started no request for a whole period is asked to close (GOAWAY: open
    // streams still finish).
    let mut idle_check = tokio::time::interval_at(Instant::now() + idle, idle);
    let mut seen = 0;
    let mut closing = false;
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = stop.changed(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = idle_check.tick(), if !closing => {
                let started = requests.load(Ordering::Relaxed);
                if started == seen {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                seen = started;
            }
        }
    };
    if let Err(e) = result {
        debug!(error = %e, %peer, "connection ended with an error");
    }
}

/// A [`Handler`] that serves each connection with hyper, each request with
/// `handler` (the admin server, the test and demo stand-ins).
pub struct HttpHandler<H> {
    builder: auto::Builder<TokioExecutor>,
    idle: Duration,
    handler: H,
}

impl<H> HttpHandler<H> {
    pub fn new(opts: &ServeOptions, handler: H) -> Self {
        HttpHandler {
            builder: builder(opts),
            idle: opts.idle_timeout,
            handler,
        }
    }
}

impl<H, F, B> Handler for HttpHandler<H>
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn serve(
        self: Arc<Self>,
        io: ClientIo,
        peer: SocketAddr,
        stop: StopSignal,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            let handler = self.handler.clone();
            serve_connection(
                io,
                peer,
                &self.builder,
                self.idle,
                move |req| handler(req, peer),
                stop,
            )
            .await
        })
    }
}
