//! The fast lane: plain HTTP/1.1 exchanges with an upstream that speaks
//! HTTP/1.1 (plain or over TLS), served without hyper.
//!
//! Why: with hyper on both sides a proxied request cost about 1.7 times the
//! CPU nginx spends on it (bench/run.sh): a header map built and hashed per
//! message on each side, the upstream connection's own task and the channels
//! between it and the request, large futures moved around. The lane does
//! what nginx does: it parses a head in place (`httparse`, offsets into the
//! read buffer), writes the upstream head straight from those bytes with the
//! token put in, sends it on a pooled connection from the same task, and
//! passes the response head and body back the same way, each in one write
//! when it fits.
//!
//! It takes only what it can do completely (see [`h1::parse_request`]): an
//! HTTP/1.1 request with no body or a `Content-Length` one, no `Expect`, no
//! upgrade. Anything else (HTTP/2 prior knowledge, h2c, WebSocket, chunked
//! uploads, HTTP/1.0, malformed or oversized heads) hands the connection, with
//! every byte read so far, to hyper ([`Prefixed`]), which serves the rest of
//! it. An `https` upstream is served over TLS while it answers ALPN with
//! `http/1.1`; once it picks `h2`, requests go to hyper, whose client pools
//! HTTP/2. An upstream behind an egress proxy keeps the lane off altogether.
//! Both paths share the policy: path checks, the token, the 401 replay rule,
//! error answers, hop-by-hop lists, `Location` rewriting, the access log and
//! metrics.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderValue, Method};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::body::Exchange;
use super::h1::{self, Framing, Parse, RequestHead, ResponseHead, ResponseParse, Span};
use super::idle::{IdleConn, IdleStack};
use super::stall::StallGuard;
use super::{ProxyError, MAX_REPLAYS};
use crate::config::RetryOn401;

/// The client connection type both paths serve.
pub type ClientIo = StallGuard<TcpStream>;

/// Largest request head the lane reads before handing over to hyper (which
/// answers 431 beyond [`crate::app::MAX_HEADER_BYTES`]).
const MAX_REQUEST_HEAD: usize = crate::app::MAX_HEADER_BYTES;
/// Read buffers start this large; a head that does not fit grows them.
const READ_BUF: usize = 4 * 1024;
/// Bodies larger than what one read brings are copied through a buffer of this size.
const TRANSFER_BUF: usize = 64 * 1024;

/// Why an exchange with the upstream failed (502 `upstream_unavailable`).
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    #[error("could not connect to the upstream")]
    Connect(#[source] io::Error),
    #[error("connecting to the upstream timed out (proxy.connect_timeout)")]
    ConnectTimeout,
    #[error("TLS handshake with the upstream failed")]
    Tls(#[source] io::Error),
    /// The upstream chose HTTP/2 by ALPN: the request goes to hyper.
    #[error("the upstream speaks HTTP/2")]
    Http2,
    #[error("the upstream connection failed")]
    Io(#[source] io::Error),
    #[error("the upstream closed the connection before answering")]
    Closed,
    #[error("no data from the upstream for {0:?} (proxy.body_idle_timeout)")]
    Idle(Duration),
    #[error(transparent)]
    Response(#[from] h1::BadResponse),
    #[error(transparent)]
    Chunk(#[from] h1::BadChunk),
}

/// The upstream side of the lane: where to connect, and the idle connections.
pub struct Lane {
    host: String,
    port: u16,
    /// `Host` of every request, as hyper-util's client writes it.
    host_header: HeaderValue,
    connect_timeout: Duration,
    idle: Arc<IdleStack<UpConn>>,
    /// For an `https` upstream: the TLS client (ALPN `h2`, `http/1.1`) and
    /// the name the certificate must have.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Set when the upstream chose HTTP/2 by ALPN: hyper pools those
    /// connections, so new connections stop coming to the lane.
    off: AtomicBool,
}

/// A connection to the upstream and what was read from it but not yet used.
struct UpConn {
    io: UpIo,
    buf: BytesMut,
}

impl UpConn {
    /// Reads what the upstream sent into `buf` (room made first).
    async fn read_more(&mut self) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 512 {
            self.buf.reserve(READ_BUF);
        }
        self.io.read_buf(&mut self.buf).await
    }
}

/// An upstream connection: plain TCP, or TLS over it.
enum UpIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for UpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpIo::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpIo::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpIo::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpIo::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl IdleConn for UpConn {
    fn usable(&mut self) -> bool {
        still_open(&mut self.io)
    }
}

impl Lane {
    /// `None` when the lane cannot serve this upstream (reached through an
    /// egress proxy): hyper does everything then. An `https` upstream is
    /// served over TLS (`tls`: the proxy's client policy) until it turns
    /// out to speak HTTP/2.
    pub fn new(
        upstream: &url::Url,
        host_header: HeaderValue,
        direct: bool,
        tls: &rustls::ClientConfig,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Option<Arc<Lane>> {
        if !direct {
            return None;
        }
        let host = upstream
            .host_str()?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = match upstream.scheme() {
            "http" => None,
            "https" => {
                let mut cfg = tls.clone();
                cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                let name = ServerName::try_from(host.clone()).ok()?;
                Some((TlsConnector::from(Arc::new(cfg)), name))
            }
            _ => return None,
        };
        Some(Arc::new(Lane {
            port: upstream.port_or_known_default()?,
            host,
            host_header,
            connect_timeout,
            idle: IdleStack::new(idle_timeout),
            tls,
            off: AtomicBool::new(false),
        }))
    }

    /// Whether the upstream turned out to speak HTTP/2 (hyper's then).
    fn is_off(&self) -> bool {
        self.off.load(Ordering::Relaxed)
    }

    /// The most recently used idle connection still open, or a new one.
    async fn checkout(self: &Arc<Self>) -> Result<UpConn, LaneError> {
        if let Some(conn) = self.idle.pop() {
            return Ok(conn);
        }
        if self.is_off() {
            return Err(LaneError::Http2); // no new connection: HTTP/2 is hyper's
        }
        let io = timeout(
            self.connect_timeout,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| LaneError::ConnectTimeout)?
        .map_err(LaneError::Connect)?;
        let _ = io.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        let _ = socket2::SockRef::from(&io).set_tcp_keepalive(&keepalive);
        let io = match &self.tls {
            None => UpIo::Plain(io),
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), io)
                    .await
                    // A reset during the handshake is not a TLS failure.
                    .map_err(|e| {
                        if crate::tls::is_tls_error(&e) {
                            LaneError::Tls(e)
                        } else {
                            LaneError::Connect(e)
                        }
                    })?;
                if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    // Not ours: hyper's client pools HTTP/2 connections.
                    self.off.store(true, Ordering::Relaxed);
                    return Err(LaneError::Http2);
                }
                UpIo::Tls(Box::new(tls))
            }
        };
        let conn = UpConn {
            io,
            buf: BytesMut::with_capacity(READ_BUF),
        };
        Ok(conn)
    }

    fn checkin(self: &Arc<Self>, mut conn: UpConn) {
        if !conn.buf.is_empty() {
            return; // bytes nobody asked for: the connection is out of step
        }
        if conn.buf.capacity() > 4 * READ_BUF {
            conn.buf = BytesMut::with_capacity(READ_BUF); // large heads are rare
        }
        self.idle.push(conn);
    }
}

/// Whether an idle connection is still open, without waiting: a closed one
/// reads EOF (or fails), a healthy idle one has nothing to read. A read
/// with a no-op waker costs no system call while the socket is not
/// readable; over TLS it also takes in what is not data (session tickets).
fn still_open(io: &mut UpIo) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    matches!(Pin::new(io).poll_read(&mut cx, &mut buf), Poll::Pending)
}

/// The shutdown signal of one connection. Checking it is one atomic load
/// (`has_changed`); the wake-up for an idle connection is registered once
/// per connection: the task's waker stays the same for its life, so the
/// registered future need not be polled again (each poll takes a lock).
struct Stop {
    rx: watch::Receiver<Option<Duration>>,
    changed: Pin<Box<dyn Future<Output = ()> + Send>>,
    registered: bool,
}

impl Stop {
    fn new(rx: watch::Receiver<Option<Duration>>) -> Self {
        let mut waiter = rx.clone();
        Stop {
            rx,
            changed: Box::pin(async move {
                let _ = waiter.changed().await;
            }),
            registered: false,
        }
    }

    /// Whether shutdown has begun (a closed channel counts).
    fn fired(&self) -> bool {
        self.rx.has_changed().unwrap_or(true)
    }

    /// Ready once shutdown has begun; wakes this task when it does.
    fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.fired() {
            return Poll::Ready(());
        }
        if !self.registered {
            if self.changed.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            self.registered = true;
        }
        Poll::Pending
    }
}

/// A deadline that moves often and rarely passes, on one timer per
/// connection: setting it costs nothing; the timer is moved only when it
/// fires early (tokio's `timeout` would insert and remove a timer entry per
/// request).
struct Deadline {
    at: Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Deadline {
    fn new(at: Instant) -> Self {
        Deadline {
            at,
            timer: Box::pin(tokio::time::sleep_until(at)),
        }
    }

    fn set(&mut self, at: Instant) {
        self.at = at;
    }

    /// Ready once the deadline has passed.
    fn poll_passed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while self.timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= self.at {
                return Poll::Ready(());
            }
            let at = self.at;
            self.timer.as_mut().reset(at);
        }
        Poll::Pending
    }

    /// Runs `fut` until the deadline; `None` if it passed first.
    async fn run<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            self.poll_passed(cx).map(|()| None)
        })
        .await
    }
}

/// One client connection served by the lane.
struct Conn<'p> {
    proxy: &'p super::Proxy,
    lane: &'p Arc<Lane>,
    io: ClientIo,
    peer: SocketAddr,
    buf: BytesMut,
    head: RequestHead,
    out: Vec<u8>,
    fields: Vec<(Span, Span)>,
    /// Shutdown: once it has begun, each answer says `Connection: close`.
    stop: Stop,
    /// `proxy.request_timeout` of the exchange under way (out while it runs).
    request_deadline: Option<Deadline>,
}

/// What happened to an exchange, for the connection.
enum Next {
    KeepAlive,
    Close,
    /// The upstream speaks HTTP/2: hyper serves this request and the rest.
    ToHyper,
}

/// Why an exchange ended before a response from the upstream.
enum Failed {
    /// The sidecar answers this error itself.
    Answer(ProxyError),
    /// The client went away: nobody to answer.
    Gone,
    /// Not for the lane after all (the upstream chose HTTP/2); nothing was
    /// sent or read past the request head.
    ToHyper,
}

/// Serves `io` until the client leaves, goes idle for
/// `proxy.client_idle_timeout`, or shutdown begins; returns the connection
/// when a request turns out not to be for the lane, for hyper to serve.
pub async fn serve(
    proxy: &super::Proxy,
    lane: &Arc<Lane>,
    io: ClientIo,
    peer: SocketAddr,
    stop: watch::Receiver<Option<Duration>>,
) -> Option<Prefixed<ClientIo>> {
    if lane.is_off() {
        return Some(Prefixed::new(Bytes::new(), io));
    }
    let now = Instant::now();
    let mut c = Conn {
        proxy,
        lane,
        io,
        peer,
        buf: BytesMut::with_capacity(READ_BUF),
        head: RequestHead::default(),
        out: Vec::with_capacity(2 * 1024),
        fields: Vec::new(),
        stop: Stop::new(stop),
        request_deadline: Some(Deadline::new(now + proxy.cfg.request_timeout)),
    };
    let mut idle = Deadline::new(now + proxy.cfg.client_idle_timeout);
    loop {
        // The whole head must come within the idle timeout of the last
        // response (hyper's `header_read_timeout`): a byte now and then
        // does not keep a connection.
        idle.set(Instant::now() + proxy.cfg.client_idle_timeout);
        // A complete head, or the reason there is none.
        loop {
            match h1::parse_request(&c.buf, &mut c.head, proxy.cfg.forwarded_headers) {
                Parse::Ready => break,
                Parse::Partial if c.buf.len() < MAX_REQUEST_HEAD => {}
                Parse::Partial | Parse::Fallback => {
                    return Some(Prefixed::new(c.buf.freeze(), c.io));
                }
            }
            if c.buf.capacity() - c.buf.len() < 512 {
                c.buf.reserve(READ_BUF);
            }
            let waiting_idle = c.buf.is_empty();
            let read = tokio::select! {
                biased;
                r = c.io.read_buf(&mut c.buf) => r,
                () = std::future::poll_fn(|cx| c.stop.poll_fired(cx)), if waiting_idle => return None,
                () = std::future::poll_fn(|cx| idle.poll_passed(cx)) => return None,
            };
            match read {
                Ok(n) if n > 0 => {}
                _ => return None, // closed or failed
            }
        }
        // Things the lane leaves to hyper, found before anything was sent.
        let method = match Method::from_bytes(c.head.method.get(&c.buf)) {
            Ok(m) if std::str::from_utf8(c.head.path.get(&c.buf)).is_ok() => m,
            _ => return Some(Prefixed::new(c.buf.freeze(), c.io)),
        };
        let next = c.exchange(method).await;
        if matches!(next, Next::ToHyper) {
            return Some(Prefixed::new(c.buf.freeze(), c.io));
        }
        if matches!(next, Next::Close) || c.stop.fired() {
            let _ = c.io.shutdown().await;
            return None;
        }
    }
}

impl Conn<'_> {
    /// One request and its response. The request head and whatever body
    /// bytes came with it stay in `self.buf` until the end, for a replay.
    async fn exchange(&mut self, method: Method) -> Next {
        let proxy = self.proxy;
        proxy
            .metrics
            .engine_request(crate::metrics::Engine::FastLane);
        let request_id = self
            .head
            .request_id
            .map(|s| s.get(&self.buf))
            .filter(|v| !v.is_empty() && v.len() <= 200)
            .and_then(|v| HeaderValue::from_bytes(v).ok())
            .unwrap_or_else(super::new_request_id);
        let path = std::str::from_utf8(self.head.path.get(&self.buf)).unwrap_or("/");
        let mut ex = Exchange::new(
            method.clone(),
            path.into(),
            None,
            request_id,
            proxy.metrics.clone(),
            proxy.cfg.access_log,
        );
        let head_request = method == Method::HEAD;
        let in_buf = (self.buf.len() - self.head.len).min(self.head.content_length as usize);
        let consumed = self.head.len + in_buf;
        let close = self.head.close;
        let next = match self.forward(&ex).await {
            Ok(next) => next,
            // The client went away while waiting: nobody to answer (the
            // access log line says status 0, as on the hyper path).
            Err((Failed::Gone, _)) => Next::Close,
            // Nothing was sent or read past the head: hyper takes the
            // connection from this request on (and logs it).
            Err((Failed::ToHyper, _)) => {
                ex.access_log = false;
                return Next::ToHyper;
            }
            Err((Failed::Answer(e), body_left)) => {
                let next = self.answer(&e, &ex, head_request, body_left).await;
                if body_left {
                    Next::Close // the rest of the request body is still on the way
                } else {
                    next
                }
            }
        };
        self.buf.advance(consumed);
        if self.out.capacity() > TRANSFER_BUF {
            self.out = Vec::with_capacity(2 * 1024); // a replayed body was in it
        }
        if close {
            Next::Close
        } else {
            next
        }
    }

    /// Checks, token, upstream exchange (with replays), response to the
    /// client. An error comes back before anything was written to the
    /// client, with whether request body bytes are left unread.
    async fn forward(&mut self, ex: &Exchange) -> Result<Next, (Failed, bool)> {
        let proxy = self.proxy;
        let body_left = (self.head.content_length as usize) > self.buf.len() - self.head.len;
        let path = std::str::from_utf8(self.head.path.get(&self.buf)).unwrap_or("/");
        proxy
            .check_path(path)
            .map_err(|e| (Failed::Answer(e), body_left))?;
        let (generation, bearer) = proxy
            .bearer()
            .await
            .map_err(|e| (Failed::Answer(e), body_left))?;
        ex.generation.store(generation, Ordering::Relaxed);

        let replay = proxy.cfg.retry_on_401 != RetryOn401::Off;
        let mut copy = (replay && self.head.content_length as usize <= proxy.cfg.retry_body_limit)
            .then(Vec::new);
        let (mut up, mut resp, sent_all) = self
            .send(ex, &bearer, Body::Client(&mut copy))
            .await
            .map_err(|e| (e, body_left))?;

        let (mut rejected, mut replays) = (generation, 0);
        while resp.status == 401 && proxy.rejects_token(resp.invalid_token) {
            // Whatever happens to this request, that token is no good.
            proxy.token.invalidate(rejected);
            if replays == MAX_REPLAYS {
                break;
            }
            // The copy is there only if the body was within the limit and all sent.
            let Some(copy) = copy.as_ref().filter(|_| sent_all) else {
                break;
            };
            let Ok((newer, bearer)) = proxy
                .token
                .wait_usable(rejected, proxy.cfg.token_wait)
                .await
            else {
                break; // no newer token in time: pass the 401 back
            };
            drop(up); // its 401 body is not wanted: the connection goes
            ex.generation.store(newer, Ordering::Relaxed);
            ex.replayed.store(true, Ordering::Relaxed);
            proxy
                .metrics
                .replayed_after_401(crate::metrics::Engine::FastLane);
            (up, resp, _) =
                self.send(ex, &bearer, Body::Copy(copy))
                    .await
                    .map_err(|e| match e {
                        // Too late to hand over: the first answer was read.
                        Failed::ToHyper => (
                            Failed::Answer(ProxyError::UpstreamUnavailable(Box::new(
                                LaneError::Http2,
                            ))),
                            false,
                        ),
                        e => (e, false),
                    })?;
            rejected = newer;
            replays += 1;
        }
        Ok(self.respond(up, resp, ex, !sent_all).await)
    }

    /// Sends the request upstream (head, then body) and reads the response
    /// head. Returns the connection with the head at the start of its
    /// buffer, and whether the whole request body went out (the upstream
    /// may answer before it has read it all).
    async fn send(
        &mut self,
        ex: &Exchange,
        bearer: &HeaderValue,
        mut body: Body<'_>,
    ) -> Result<(UpConn, ResponseHead, bool), Failed> {
        let proxy = self.proxy;
        let started = Instant::now();
        let until = started + proxy.cfg.request_timeout;
        let mut deadline = self
            .request_deadline
            .take()
            .unwrap_or_else(|| Deadline::new(until));
        deadline.set(until);
        let sending = async {
            let mut up = self.lane.checkout().await?;
            self.out.clear();
            h1::write_request_head(
                &mut self.out,
                &self.buf,
                &self.head,
                &h1::Upstream {
                    base_path: &proxy.base_path,
                    host: self.lane.host_header.as_bytes(),
                    bearer: bearer.as_bytes(),
                    request_id: ex.request_id.as_bytes(),
                    forwarded: proxy.cfg.forwarded_headers.then(|| self.peer.ip()),
                },
            );
            let length = self.head.content_length as usize;
            let in_buf = (self.buf.len() - self.head.len).min(length);
            let sent_all = match &mut body {
                Body::Copy(copy) => {
                    self.out.extend_from_slice(copy);
                    up.io.write_all(&self.out).await.map_err(LaneError::Io)?;
                    // TLS may keep records back until flushed; TCP: a no-op.
                    up.io.flush().await.map_err(LaneError::Io)?;
                    true
                }
                Body::Client(copy) => {
                    let first = &self.buf[self.head.len..self.head.len + in_buf];
                    self.out.extend_from_slice(first);
                    if let Some(c) = copy.as_mut() {
                        c.extend_from_slice(first);
                    }
                    up.io.write_all(&self.out).await.map_err(LaneError::Io)?;
                    // TLS may keep records back until flushed; TCP: a no-op.
                    up.io.flush().await.map_err(LaneError::Io)?;
                    ex.bytes_up.fetch_add(in_buf as u64, Ordering::Relaxed);
                    let rest = (length - in_buf) as u64;
                    rest == 0 || self.stream_body(&mut up, rest, copy, ex).await?
                }
            };
            let resp = self.response_head(&mut up).await?;
            Ok::<_, SendError>((up, resp, sent_all))
        };
        let result = deadline.run(sending).await;
        self.request_deadline = Some(deadline);
        ex.upstream_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        match result {
            None => Err(Failed::Answer(ProxyError::UpstreamTimeout)),
            Some(Err(SendError::Upstream(LaneError::Http2))) => Err(Failed::ToHyper),
            Some(Err(SendError::Upstream(e @ LaneError::Tls(_)))) => {
                Err(Failed::Answer(ProxyError::UpstreamTls(Box::new(e))))
            }
            // A fatal alert or a bad record after the handshake, as hyper's path says it.
            Some(Err(SendError::Upstream(LaneError::Io(e)))) if crate::tls::is_tls_error(&e) => {
                Err(Failed::Answer(ProxyError::UpstreamTls(Box::new(
                    LaneError::Io(e),
                ))))
            }
            Some(Err(SendError::Upstream(e))) => {
                Err(Failed::Answer(ProxyError::UpstreamUnavailable(Box::new(e))))
            }
            Some(Err(SendError::ClientIdle)) => Err(Failed::Answer(ProxyError::ClientBodyTimeout)),
            Some(Err(SendError::ClientBody(e))) => {
                Err(Failed::Answer(ProxyError::ClientBody(Box::new(e))))
            }
            Some(Err(SendError::ClientGone)) => Err(Failed::Gone),
            Some(Ok(sent)) => Ok(sent),
        }
    }

    /// Streams the rest of the request body (`rest` bytes) from the client
    /// to the upstream, keeping a copy while it fits. Stops early when the
    /// upstream starts answering; returns whether everything was sent.
    async fn stream_body(
        &mut self,
        up: &mut UpConn,
        mut rest: u64,
        copy: &mut Option<Vec<u8>>,
        ex: &Exchange,
    ) -> Result<bool, SendError> {
        let idle = self.proxy.cfg.body_idle_timeout;
        let mut chunk = vec![0u8; TRANSFER_BUF.min(rest as usize)];
        while rest > 0 {
            let want = chunk.len().min(rest as usize);
            let n = tokio::select! {
                r = timeout(idle, self.io.read(&mut chunk[..want])) => match r {
                    Err(_) => return Err(SendError::ClientIdle),
                    Ok(Err(e)) => return Err(SendError::ClientBody(e)),
                    // Cut short: answered 400 (if anyone listens), as hyper does.
                    Ok(Ok(0)) => {
                        return Err(SendError::ClientBody(io::ErrorKind::UnexpectedEof.into()))
                    }
                    Ok(Ok(n)) => n,
                },
                // An early answer (413, 401...): stop sending, read it.
                // (Both reads may be dropped unfinished: neither loses bytes.)
                r = up.read_more() => {
                    match r {
                        Ok(0) => return Err(LaneError::Closed.into()),
                        Ok(_) => {
                            // An interim answer (a 100 Continue sent unasked)
                            // asks for the rest of the body: skip it, send on.
                            while let Ok(ResponseParse::Interim(len)) =
                                h1::parse_response(&up.buf, false, &mut self.fields)
                            {
                                up.buf.advance(len);
                            }
                            if up.buf.is_empty() {
                                continue;
                            }
                            return Ok(false);
                        }
                        Err(e) => return Err(LaneError::Io(e).into()),
                    }
                }
            };
            if let Some(c) = copy.as_mut() {
                c.extend_from_slice(&chunk[..n]);
            }
            write_up(&mut up.io, &chunk[..n], idle).await?;
            ex.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
            rest -= n as u64;
        }
        Ok(true)
    }

    /// Reads the upstream's response head (skipping 1xx interim answers),
    /// watching the client: if it goes away, so does this exchange.
    async fn response_head(&mut self, up: &mut UpConn) -> Result<ResponseHead, SendError> {
        let head_request = self.head.method.get(&self.buf) == b"HEAD";
        let mut gone = std::pin::pin!(client_gone(self.io.get_ref()));
        loop {
            match h1::parse_response(&up.buf, head_request, &mut self.fields)? {
                ResponseParse::Final(head) => return Ok(head),
                ResponseParse::Interim(len) => {
                    up.buf.advance(len);
                    continue;
                }
                ResponseParse::Partial => {}
            }
            if up.buf.capacity() - up.buf.len() < 512 {
                up.buf.reserve(READ_BUF);
            }
            let n = tokio::select! {
                biased;
                r = up.io.read_buf(&mut up.buf) => r.map_err(LaneError::Io)?,
                () = &mut gone => return Err(SendError::ClientGone),
            };
            if n == 0 {
                return Err(LaneError::Closed.into());
            }
        }
    }

    /// Passes the response to the client: head, then body as it comes.
    async fn respond(
        &mut self,
        mut up: UpConn,
        resp: ResponseHead,
        ex: &Exchange,
        body_left: bool,
    ) -> Next {
        let proxy = self.proxy;
        proxy.metrics.upstream_status(resp.status);
        ex.status.store(resp.status, Ordering::Relaxed);
        let close = body_left
            || resp.framing == Framing::UntilClose
            || self.head.close
            || self.stop.fired();
        self.out.clear();
        self.out.extend_from_slice(b"HTTP/1.1 ");
        self.out
            .extend_from_slice(itoa::Buffer::new().format(resp.status).as_bytes());
        self.out.push(b' ');
        self.out.extend_from_slice(resp.reason.get(&up.buf));
        let public = resp.has_location.then(|| self.public_base());
        for (name, value) in &self.fields {
            let (name, value) = (name.get(&up.buf), value.get(&up.buf));
            let rewritten = public.as_deref().and_then(|public| {
                let location = name.eq_ignore_ascii_case(b"location")
                    || name.eq_ignore_ascii_case(b"content-location");
                location
                    .then(|| std::str::from_utf8(value).ok())
                    .flatten()
                    .and_then(|v| {
                        super::headers::rewrite_location(
                            v,
                            &proxy.base_url,
                            &proxy.base_path,
                            public,
                        )
                    })
            });
            h1::field(
                &mut self.out,
                name,
                rewritten.as_deref().map_or(value, str::as_bytes),
            );
        }
        if resp.framing == Framing::Chunked {
            h1::field(&mut self.out, b"transfer-encoding", b"chunked");
        }
        h1::field(&mut self.out, b"x-request-id", ex.request_id.as_bytes());
        if !resp.has_date {
            h1::field(
                &mut self.out,
                b"date",
                httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes(),
            );
        }
        if close {
            h1::field(&mut self.out, b"connection", b"close");
        }
        self.out.extend_from_slice(b"\r\n\r\n");
        up.buf.advance(resp.len);
        proxy.metrics.request_done(ex.start.elapsed());

        match self.pass_body(&mut up, resp.framing, ex).await {
            // An upstream that answered before the whole request body
            // still waits for the rest of it, which is not coming: the
            // next request would be read as that body.
            Ok(true) if resp.reusable && !body_left => self.lane.checkin(up),
            Ok(_) => {}
            Err(e) => {
                debug!(error = %e, request_id = ex.request_id.to_str().unwrap_or("-"), "response body broke off");
                return Next::Close;
            }
        }
        if close {
            Next::Close
        } else {
            Next::KeepAlive
        }
    }

    /// Writes the head in `self.out` and the body after it, the first part
    /// in the same write as the head. Returns whether the connection ended
    /// exactly with the body (no stray bytes after it).
    async fn pass_body(
        &mut self,
        up: &mut UpConn,
        framing: Framing,
        ex: &Exchange,
    ) -> Result<bool, BodyFault> {
        let idle = self.proxy.cfg.body_idle_timeout;
        let mut left = match framing {
            Framing::Empty => 0,
            Framing::Length(n) => n,
            Framing::Chunked | Framing::UntilClose => u64::MAX,
        };
        let mut chunked = (framing == Framing::Chunked).then(h1::ChunkedEnd::default);
        // Large bodies go through a larger buffer than the connection's.
        let mut big: Option<Vec<u8>> = None;
        let mut head_written = false;
        loop {
            let avail: &[u8] = big.as_deref().unwrap_or(&up.buf);
            let mut take = avail.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let payload_before = chunked.as_ref().map_or(0, h1::ChunkedEnd::payload);
            let done = match chunked.as_mut() {
                Some(end) => {
                    let (used, ended) = end.feed(&avail[..take])?;
                    take = used;
                    ended
                }
                None if framing == Framing::UntilClose => false,
                None => {
                    left -= take as u64;
                    left == 0
                }
            };
            let part = &avail[..take];
            if !head_written {
                self.out.extend_from_slice(part);
                self.io
                    .write_all(&self.out)
                    .await
                    .map_err(BodyFault::Client)?;
                head_written = true;
            } else if !part.is_empty() {
                self.io.write_all(part).await.map_err(BodyFault::Client)?;
            }
            // Body bytes, as the hyper path counts them: not chunk framing.
            let counted = match chunked.as_ref() {
                Some(end) => end.payload() - payload_before,
                None => take as u64,
            };
            ex.bytes_down.fetch_add(counted, Ordering::Relaxed);
            let stray = avail.len() > take;
            match big.as_mut() {
                Some(b) => b.clear(),
                None => up.buf.advance(take),
            }
            if done {
                return Ok(!stray);
            }
            if big.is_none() && framing != Framing::Chunked && left > TRANSFER_BUF as u64 {
                big = Some(Vec::with_capacity(TRANSFER_BUF));
            }
            if big.is_none() && up.buf.capacity() - up.buf.len() < 512 {
                up.buf.reserve(READ_BUF);
            }
            let reading = async {
                match big.as_mut() {
                    Some(b) => timeout(idle, up.io.read_buf(b)).await,
                    None => timeout(idle, up.io.read_buf(&mut up.buf)).await,
                }
            };
            let read = tokio::select! {
                biased;
                r = reading => r,
                // Nobody to pass the rest to: the upstream request ends here.
                () = client_gone(self.io.get_ref()) => return Err(BodyFault::ClientGone),
            };
            match read {
                Err(_) => return Err(BodyFault::Upstream(LaneError::Idle(idle))),
                // TLS peers often close without close_notify: for a body
                // that ends with the connection, that is its end.
                Ok(Err(e))
                    if framing == Framing::UntilClose
                        && e.kind() == io::ErrorKind::UnexpectedEof =>
                {
                    return Ok(false)
                }
                Ok(Err(e)) => return Err(BodyFault::Upstream(LaneError::Io(e))),
                Ok(Ok(0)) if framing == Framing::UntilClose => return Ok(false),
                Ok(Ok(0)) => return Err(BodyFault::Upstream(LaneError::Closed)),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// `http://<the name the client used>/`, for redirects into the upstream.
    fn public_base(&self) -> String {
        let host = self
            .head
            .host
            .and_then(|h| std::str::from_utf8(h.get(&self.buf)).ok())
            .map(str::to_owned)
            .or_else(|| self.proxy.cfg.listen.first().map(|a| a.to_string()))
            .unwrap_or_else(|| "localhost".into());
        format!("http://{host}/")
    }

    /// The sidecar's own answer (an error), in the layout of hyper's;
    /// `body_left`: request body bytes are still unread.
    async fn answer(
        &mut self,
        e: &ProxyError,
        ex: &Exchange,
        head_request: bool,
        body_left: bool,
    ) -> Next {
        self.proxy.note_local_answer(e, &ex.request_id);
        let status = e.status();
        ex.status.store(status.as_u16(), Ordering::Relaxed);
        let body = e.body();
        self.out.clear();
        self.out.extend_from_slice(b"HTTP/1.1 ");
        self.out.extend_from_slice(status.as_str().as_bytes());
        self.out.push(b' ');
        self.out
            .extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        let headers = e.headers();
        for (name, value) in &headers {
            h1::field(&mut self.out, name.as_str().as_bytes(), value.as_bytes());
        }
        let says_close = headers.contains_key(http::header::CONNECTION);
        let close = says_close || body_left || self.head.close || self.stop.fired();
        if close && !says_close {
            h1::field(&mut self.out, b"connection", b"close");
        }
        h1::field(
            &mut self.out,
            b"content-length",
            body.len().to_string().as_bytes(),
        );
        h1::field(&mut self.out, b"x-request-id", ex.request_id.as_bytes());
        h1::field(
            &mut self.out,
            b"date",
            httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes(),
        );
        self.out.extend_from_slice(b"\r\n\r\n");
        if !head_request {
            self.out.extend_from_slice(&body);
            ex.bytes_down
                .fetch_add(body.len() as u64, Ordering::Relaxed);
        }
        self.proxy.metrics.request_done(ex.start.elapsed());
        match self.io.write_all(&self.out).await {
            Ok(()) if !close => Next::KeepAlive,
            _ => Next::Close,
        }
    }
}

/// Resolves when the client has closed its connection (EOF or an error),
/// never when it has only sent more (pipelined requests).
async fn client_gone(client: &TcpStream) {
    let mut byte = [0u8; 1];
    match client.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Where the request body of a send comes from.
enum Body<'a> {
    /// The client connection (the first send), keeping a copy if there is one.
    Client(&'a mut Option<Vec<u8>>),
    /// The copy the first send kept (a replay).
    Copy(&'a [u8]),
}

/// Why a send failed, before the response head arrived.
#[derive(Debug)]
enum SendError {
    Upstream(LaneError),
    ClientIdle,
    ClientBody(io::Error),
    ClientGone,
}

impl From<LaneError> for SendError {
    fn from(e: LaneError) -> Self {
        SendError::Upstream(e)
    }
}

impl From<h1::BadResponse> for SendError {
    fn from(e: h1::BadResponse) -> Self {
        SendError::Upstream(e.into())
    }
}

/// Why a response body broke off (the client connection is closed).
#[derive(Debug, thiserror::Error)]
enum BodyFault {
    #[error("writing to the client failed")]
    Client(#[source] io::Error),
    #[error("the client went away")]
    ClientGone,
    #[error(transparent)]
    Upstream(LaneError),
}

impl From<h1::BadChunk> for BodyFault {
    fn from(e: h1::BadChunk) -> Self {
        BodyFault::Upstream(e.into())
    }
}

async fn write_up(io: &mut UpIo, bytes: &[u8], idle: Duration) -> Result<(), LaneError> {
    let write = async {
        io.write_all(bytes).await?;
        io.flush().await
    };
    match timeout(idle, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(LaneError::Io(e)),
        Err(_) => Err(LaneError::Idle(idle)),
    }
}

pin_project_lite::pin_project! {
    /// A connection whose first bytes were already read: they are read
    /// again first. How the lane hands a connection to hyper.
    pub struct Prefixed<T> {
        prefix: Bytes,
        #[pin]
        inner: T,
    }
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<T: AsyncRead> AsyncRead for Prefixed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for Prefixed<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
