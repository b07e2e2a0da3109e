//! Accept loops for the proxy and admin listeners, and the shutdown sequence
//! they share: stop accepting, let in-flight exchanges finish within the
//! grace period, then return.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::proxy::stall::StallGuard;

/// Connection settings of one server.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub max_connections: usize,
    /// Idle keep-alive connections (and slow request heads) are closed after this.
    pub idle_timeout: Duration,
    /// Largest request head; beyond it the client gets 431.
    pub max_header_bytes: usize,
    pub http2: bool,
    /// A connection whose client takes no bytes for this long is closed
    /// (see [`crate::proxy::stall`]); `None` for no limit.
    pub write_stall_timeout: Option<Duration>,
}

/// A set of accept loops sharing one stop signal; each loop watches its own
/// connections and, once stopped, waits for them up to the grace period.
pub struct Server {
    /// `Some(grace)` once shutdown has begun.
    stop: watch::Sender<Option<Duration>>,
    loops: JoinSet<bool>,
    /// Connection slots, shared by every listener of this server so that
    /// `max_connections` bounds them together (set by the first `spawn`).
    slots: Option<Arc<Semaphore>>,
}

impl Server {
    pub fn new() -> Self {
        Server {
            stop: watch::channel(None).0,
            loops: JoinSet::new(),
            slots: None,
        }
    }

    /// Serves `listener` with `handler` until [`Server::shutdown`].
    pub fn spawn<H, F, B>(&mut self, listener: TcpListener, opts: ServeOptions, handler: H)
    where
        H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<B>> + Send + 'static,
        B: Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(opts.idle_timeout)
            .max_buf_size(opts.max_header_bytes.max(8192))
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(opts.idle_timeout / 2))
            .max_header_list_size(opts.max_header_bytes as u32);
        let builder = if opts.http2 {
            builder
        } else {
            builder.http1_only()
        };
        let stop = self.stop.subscribe();
        let slots = self
            .slots
            .get_or_insert_with(|| Arc::new(Semaphore::new(opts.max_connections)))
            .clone();
        self.loops.spawn(accept_loop(
            listener,
            slots,
            opts,
            Arc::new(builder),
            handler,
            stop,
        ));
    }

    /// Stops accepting at once; waits up to `grace` for open exchanges (idle
    /// keep-alive connections are closed at once). Returns whether every
    /// connection finished in time.
    pub async fn shutdown(mut self, grace: Duration) -> bool {
        let _ = self.stop.send(Some(grace));
        let mut clean = true;
        while let Some(r) = self.loops.join_next().await {
            clean &= r.unwrap_or(false);
        }
        clean
    }
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

async fn accept_loop<H, F, B>(
    listener: TcpListener,
    slots: Arc<Semaphore>,
    opts: ServeOptions,
    builder: Arc<auto::Builder<TokioExecutor>>,
    handler: H,
    mut stop: watch::Receiver<Option<Duration>>,
) -> bool
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Beyond max_connections, new connections wait in the listen backlog.
    let graceful = GracefulShutdown::new();
    let grace = loop {
        let permit = tokio::select! {
            _ = stop.changed() => break grace_of(&stop),
            p = slots.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => break grace_of(&stop),
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |req| {
            let fut = handler(req, peer);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let io = TokioIo::new(StallGuard::new(stream, opts.write_stall_timeout));
        let conn = builder
            .serve_connection_with_upgrades(io, service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(permit);
        });
    };
    drop(listener); // new connections are refused from now on
    tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_ok()
}

fn grace_of(stop: &watch::Receiver<Option<Duration>>) -> Duration {
    stop.borrow().unwrap_or_default()
}
