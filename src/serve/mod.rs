//! Accept loops for the proxy and admin listeners, and the shutdown sequence
//! they share: stop accepting, let open connections finish within the grace
//! period, then close whatever is left.
//!
//! What a connection is served with is not this module's business: each
//! server is given a [`Handler`] (the proxy's engines, the admin's hyper
//! service). [`http`] serves a connection with hyper for either.

pub mod http;
pub mod stall;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use stall::StallGuard;

/// An accepted client connection: writes that stall are failed
/// ([`stall`]).
pub type ClientIo = StallGuard<TcpStream>;

/// Shutdown as a connection sees it: `Some(grace)` once it has begun.
pub type StopSignal = watch::Receiver<Option<Duration>>;

/// Serves accepted connections, each to its end.
pub trait Handler: Send + Sync + 'static {
    fn serve(
        self: Arc<Self>,
        io: ClientIo,
        peer: SocketAddr,
        stop: StopSignal,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Connection settings of one server.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub max_connections: usize,
    /// Idle keep-alive connections (and slow request heads) are closed after this.
    pub idle_timeout: Duration,
    /// Largest request head; beyond it the client gets 431.
    pub max_header_bytes: usize,
    /// h2c (HTTP/2 with prior knowledge) besides HTTP/1.1.
    pub http2: bool,
    /// A connection whose client takes no bytes for this long is closed
    /// (see [`stall`]); `None` for no limit.
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

    /// Serves `listener` with hyper, each request with `handler`, until
    /// [`Server::shutdown`] (the admin server, the stand-in servers).
    pub fn spawn<H, F, B>(&mut self, listener: TcpListener, opts: ServeOptions, handler: H)
    where
        H: Fn(::http::Request<hyper::body::Incoming>, SocketAddr) -> F
            + Clone
            + Send
            + Sync
            + 'static,
        F: Future<Output = ::http::Response<B>> + Send + 'static,
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let handler = Arc::new(http::HttpHandler::new(&opts, handler));
        self.spawn_handler(listener, opts, handler)
    }

    /// Serves `listener` with `handler` until [`Server::shutdown`].
    pub fn spawn_handler<H: Handler>(
        &mut self,
        listener: TcpListener,
        opts: ServeOptions,
        handler: Arc<H>,
    ) {
        let stop = self.stop.subscribe();
        let slots = self
            .slots
            .get_or_insert_with(|| Arc::new(Semaphore::new(opts.max_connections)))
            .clone();
        self.loops
            .spawn(accept_loop(listener, slots, opts, handler, stop));
    }

    /// Stops accepting at once; waits up to `grace` for open exchanges (idle
    /// keep-alive connections are closed at once), then closes the rest.
    /// Returns whether every connection finished in time.
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

async fn accept_loop<H: Handler>(
    listener: TcpListener,
    slots: Arc<Semaphore>,
    opts: ServeOptions,
    handler: Arc<H>,
    mut stop: StopSignal,
) -> bool {
    let mut conns = JoinSet::new();
    let grace = loop {
        // Beyond max_connections, new connections wait in the listen backlog.
        let permit = tokio::select! {
            _ = stop.changed() => break grace_of(&stop),
            p = slots.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => break grace_of(&stop),
            // Reap finished connections as we go (their results say nothing).
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
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
        let serving = handler.clone().serve(io, peer, stop.clone());
        conns.spawn(async move {
            serving.await;
            drop(permit);
        });
    };
    drop(listener); // new connections are refused from now on
    let all_done = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, all_done).await.is_ok() {
        return true;
    }
    // Grace is over: what is still open is closed now (its client sees the
    // connection end), so the process can exit.
    debug!(
        connections = conns.len(),
        "closing connections still open after the grace period"
    );
    conns.shutdown().await;
    false
}

fn grace_of(stop: &StopSignal) -> Duration {
    stop.borrow().unwrap_or_default()
}
