//! Accept loops for the proxy and admin listeners, and the shutdown sequence
//! they share: stop accepting, let in-flight exchanges finish within the
//! grace period, then return.

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
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::proxy::lane::{ClientIo, Prefixed};
use crate::proxy::stall::StallGuard;

/// Serves a connection before hyper does (the proxy's fast lane): returns
/// `None` when it served the connection to its end, or the connection (with
/// the bytes it read) for hyper to serve from there on.
pub type FirstServer = Arc<
    dyn Fn(
            ClientIo,
            SocketAddr,
            watch::Receiver<Option<Duration>>,
        ) -> Pin<Box<dyn Future<Output = Option<Prefixed<ClientIo>>> + Send>>
        + Send
        + Sync,
>;

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
        self.spawn_with_first(listener, opts, None, handler)
    }

    /// As [`Server::spawn`], each connection served by `first` until it
    /// hands the connection to hyper.
    pub fn spawn_with_first<H, F, B>(
        &mut self,
        listener: TcpListener,
        opts: ServeOptions,
        first: Option<FirstServer>,
        handler: H,
    ) where
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
            first,
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
    first: Option<FirstServer>,
    handler: H,
    mut stop: watch::Receiver<Option<Duration>>,
) -> bool
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Every connection task holds a sender; once all are gone, recv() says so.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let grace = loop {
        // Beyond max_connections, new connections wait in the listen backlog.
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
        let io = StallGuard::new(stream, opts.write_stall_timeout);
        let conn = serve_connection(
            io,
            peer,
            first.clone(),
            builder.clone(),
            handler.clone(),
            stop.clone(),
            opts.idle_timeout,
        );
        let done = done_tx.clone();
        tokio::spawn(async move {
            conn.await;
            drop(permit);
            drop(done);
        });
    };
    drop(listener); // new connections are refused from now on
    drop(done_tx);
    tokio::time::timeout(grace, done_rx.recv()).await.is_ok()
}

/// One connection: `first` (if any) until it hands over, then hyper.
async fn serve_connection<H, F, B>(
    io: ClientIo,
    peer: SocketAddr,
    first: Option<FirstServer>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    handler: H,
    mut stop: watch::Receiver<Option<Duration>>,
    idle: Duration,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = match first {
        Some(first) => match first(io, peer, stop.clone()).await {
            Some(io) => io,
            None => return,
        },
        None => Prefixed::new(bytes::Bytes::new(), io),
    };
    let requests = Arc::new(AtomicU64::new(0));
    let counted = requests.clone();
    let service = service_fn(move |req| {
        counted.fetch_add(1, Ordering::Relaxed);
        let fut = handler(req, peer);
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

fn grace_of(stop: &watch::Receiver<Option<Duration>>) -> Duration {
    stop.borrow().unwrap_or_default()
}
