//! The fast lane: the engine for plain HTTP/1.1 exchanges with an upstream
//! that speaks HTTP/1.1 (plain or over TLS), without hyper.
//!
//! Why: with hyper on both sides a proxied request cost about 1.7 times the
//! CPU nginx spends on it (bench/run.sh): a header map built and hashed per
//! message on each side, the upstream connection's own task and the channels
//! between it and the request, large futures moved around. The lane does
//! what nginx does: it parses a head in place ([`h1`], offsets into the read
//! buffer), writes the upstream head straight from those bytes, sends it on
//! a pooled connection from the same task, and passes the response head and
//! body back the same way, each in one write when it fits.
//!
//! What crosses and what is refused is the policy's ([`super::policy`]),
//! the same functions the hyper engine calls; this module only translates
//! between byte spans and the policy. It reads every HTTP/1.1 head first and
//! answers a malformed or oversized one itself, with the JSON error body.
//! Requests it does not serve ([`super::engine_for`]: HTTP/1.0, `Expect`,
//! a chunked upload, an upgrade, HTTP/2 with prior knowledge) hand the
//! connection, with every byte read so far, to hyper ([`Prefixed`]), which
//! serves the rest of it; so does an upstream connection that picks HTTP/2.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderValue, Method, Version};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tracing::debug;

use super::error::{BadResponse, ClientBodyError, ProxyError, UpstreamError};
use super::exchange::Exchange;
use super::fields::{ContentLength, RequestFacts, ResponseFacts, Upgrade};
use super::h1::{self, Fields, Framing, Parse, RequestHead, Span};
use super::idle::{IdleConn, IdleStack};
use super::policy::{self as rules, FieldSink, Policy, RequestLine, TrailerRule};
use super::route::Routes;
use super::upstream::{self, Upstream};
use crate::config::ProxyConfig;
use crate::metrics::Engine;
use crate::serve::{ClientIo, StopSignal};

/// Read buffers start this large; a head that does not fit grows them.
const READ_BUF: usize = 4 * 1024;
/// Bodies larger than what one read brings are copied through a buffer of this size.
const TRANSFER_BUF: usize = 64 * 1024;

/// Why an exchange with the upstream failed (502 `upstream_unavailable`).
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    #[error("could not connect to the upstream")]
    Connect(#[source] UpstreamError),
    #[error("the upstream connection failed")]
    Io(#[source] io::Error),
    #[error("the upstream closed the connection before answering")]
    Closed,
    #[error("no data from the upstream for {0:?} (proxy.body_idle_timeout)")]
    Idle(Duration),
    #[error(transparent)]
    Head(#[from] h1::BadHead),
    #[error(transparent)]
    Chunk(#[from] h1::BadChunk),
}

/// The upstream side of the lane: its HTTP/1.1 connections to the upstream.
pub struct Lane {
    upstream: Arc<Upstream>,
    idle: Arc<IdleStack<UpConn>>,
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

/// An upstream connection: plain TCP, or TLS over the connector's stream.
enum UpIo {
    Plain(TcpStream),
    Tls(Box<TokioIo<upstream::Io>>),
}

impl AsyncRead for UpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpIo::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
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
            UpIo::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpIo::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpIo::Plain(s) => s.is_write_vectored(),
            UpIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpIo::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpIo::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

impl IdleConn for UpConn {
    fn usable(&mut self) -> bool {
        still_open(&mut self.io)
    }
}

/// Why no upstream connection was had.
enum Checkout {
    /// The upstream speaks HTTP/2: the exchange is hyper's.
    Http2,
    Failed(UpstreamError),
}

impl Lane {
    pub fn new(upstream: Arc<Upstream>, idle_timeout: Duration) -> Self {
        Lane {
            upstream,
            idle: IdleStack::new(idle_timeout),
        }
    }

    /// Whether a new exchange can start on the lane (no HTTP/2 connection
    /// to the upstream is alive, or an HTTP/1.1 one is idle).
    fn takes_new(&self) -> bool {
        !self.upstream.speaks_h2()
    }

    /// The most recently used idle connection still open, or a new one.
    async fn checkout(&self) -> Result<UpConn, Checkout> {
        if let Some(conn) = self.idle.pop() {
            return Ok(conn);
        }
        if self.upstream.speaks_h2() {
            return Err(Checkout::Http2);
        }
        let io = match self.upstream.connect().await {
            Ok(Some(io)) => io,
            Ok(None) => return Err(Checkout::Http2),
            Err(e) => return Err(Checkout::Failed(e)),
        };
        let io = match io {
            MaybeHttpsStream::Http(conn) => UpIo::Plain(conn.into_tcp()),
            tls @ MaybeHttpsStream::Https(_) => UpIo::Tls(Box::new(TokioIo::new(tls))),
        };
        Ok(UpConn {
            io,
            buf: BytesMut::with_capacity(READ_BUF),
        })
    }

    fn checkin(&self, mut conn: UpConn) {
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
    rx: StopSignal,
    changed: Pin<Box<dyn Future<Output = ()> + Send>>,
    registered: bool,
}

impl Stop {
    fn new(rx: StopSignal) -> Self {
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

/// The policy's fields written as HTTP/1.1 field lines.
struct Lines<'a>(&'a mut Vec<u8>);

impl FieldSink for Lines<'_> {
    fn field(&mut self, name: &'static str, parts: &[&[u8]]) {
        self.0.extend_from_slice(b"\r\n");
        self.0.extend_from_slice(name.as_bytes());
        self.0.extend_from_slice(b": ");
        for p in parts {
            self.0.extend_from_slice(p);
        }
    }
}

/// [`Lines`], but the token's value is not copied: only where it goes is
/// noted, and [`write_head`] sends it from the one shared copy. The token
/// is a kilobyte or more; copied into each connection's buffer it is the
/// largest write a request makes to memory that, with hundreds of
/// connections, has left the CPU's caches since that connection's last
/// request (`CACHE_SIM=1 bench/profile.sh`, docs/performance.md).
struct BearerLines<'a, 'b> {
    out: &'a mut Vec<u8>,
    bearer: &'b HeaderValue,
    at: Option<usize>,
}

impl FieldSink for BearerLines<'_, '_> {
    fn field(&mut self, name: &'static str, parts: &[&[u8]]) {
        Lines(self.out).field(name, parts);
    }

    fn value(&mut self, name: &'static str, value: &HeaderValue) {
        if self.at.is_some() || !std::ptr::eq(value, self.bearer) {
            return Lines(self.out).value(name, value);
        }
        Lines(self.out).field(name, &[]);
        self.at = Some(self.out.len());
    }
}

/// What the lane keeps of a request between its phases.
#[derive(Default)]
struct Request {
    /// Body bytes announced by `Content-Length`.
    length: u64,
    head_request: bool,
    /// The client sent `Connection: close`.
    close: bool,
    /// The client sent `TE: trailers`.
    trailers: bool,
    /// The client's `Host`, for redirects into the upstream.
    host: Option<Span>,
}

/// One client connection served by the lane (`H`: the hyper engine's part
/// of a route, not the lane's business).
struct Conn<'p, H> {
    routes: &'p Routes<Lane, H>,
    shared: &'p ProxyConfig,
    /// The policy and upstream side of the route of the request under way.
    policy: &'p Policy,
    lane: &'p Lane,
    io: ClientIo,
    peer: SocketAddr,
    buf: BytesMut,
    head: RequestHead,
    req: Request,
    /// The upstream request head but its `Authorization` ([`Conn::template`]
    /// bytes), then whatever is being written.
    out: Vec<u8>,
    template: usize,
    /// The fields of the upstream response head under way.
    up_fields: Fields,
    /// Shutdown: once it has begun, each answer says `Connection: close`.
    stop: Stop,
    /// `proxy.request_timeout` of the exchange under way (out while it runs).
    request_deadline: Option<Deadline>,
}

/// What happened to an exchange, for the connection.
enum Next {
    KeepAlive,
    Close,
    /// hyper serves this request and the rest of the connection.
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

/// An upstream answer the lane has read the head of; `Conn::up_fields`
/// holds the fields that cross.
struct Answer {
    head: h1::ResponseHead,
    invalid_token: bool,
    framing: Framing,
    /// The upstream keeps the connection open after this response.
    reusable: bool,
    has_location: bool,
    has_date: bool,
    trailers: TrailerRule,
}

/// Serves `io` until the client leaves, goes idle for
/// `proxy.client_idle_timeout`, or shutdown begins; returns the connection
/// when a request turns out not to be for the lane, for hyper to serve.
pub async fn serve<H>(
    routes: &Routes<Lane, H>,
    shared: &ProxyConfig,
    io: ClientIo,
    peer: SocketAddr,
    stop: StopSignal,
) -> Option<Prefixed<ClientIo>> {
    // Until the first request says which route it takes, the first route
    // the lane serves stands in.
    let Some((policy, lane)) = routes
        .iter()
        .find_map(|r| r.lane.as_ref().map(|l| (&r.policy, l)))
    else {
        return Some(Prefixed::new(Bytes::new(), io));
    };
    let now = Instant::now();
    let mut c = Conn {
        routes,
        shared,
        policy,
        lane,
        io,
        peer,
        buf: BytesMut::with_capacity(READ_BUF),
        head: RequestHead::default(),
        req: Request::default(),
        out: Vec::with_capacity(2 * 1024),
        template: 0,
        up_fields: Vec::new(),
        stop: Stop::new(stop),
        request_deadline: Some(Deadline::new(now + shared.request_timeout)),
    };
    let mut idle = Deadline::new(now + shared.client_idle_timeout);
    // HTTP/2 with prior knowledge starts with the connection (RFC 9113
    // 3.4): after a request, the preface is a malformed HTTP/1.1 head.
    let mut first = true;
    loop {
        // The whole head must come within the idle timeout of the last
        // response (hyper's `header_read_timeout`): a byte now and then
        // does not keep a connection.
        idle.set(Instant::now() + shared.client_idle_timeout);
        // A complete head, or the reason there is none.
        loop {
            let refused = match h1::parse_request(&c.buf, &mut c.head) {
                Parse::Ready => break,
                Parse::Http2 if first => return Some(c.hand_over()),
                Parse::Http2 => Some(ProxyError::BadRequest("malformed request head")),
                Parse::Partial if c.buf.len() < super::MAX_HEADER_BYTES => None,
                Parse::Partial | Parse::TooManyFields => Some(ProxyError::HeaderTooLarge),
                Parse::Malformed => Some(ProxyError::BadRequest("malformed request head")),
            };
            if let Some(e) = refused {
                c.refuse(&e).await;
                return None;
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
        first = false;
        match c.exchange().await {
            Next::KeepAlive if !c.stop.fired() => {}
            Next::ToHyper => return Some(c.hand_over()),
            Next::KeepAlive | Next::Close => {
                let _ = c.io.shutdown().await;
                return None;
            }
        }
    }
}

impl<H> Conn<'_, H> {
    /// The connection for hyper, with every byte read so far.
    fn hand_over(self) -> Prefixed<ClientIo> {
        Prefixed::new(self.buf.freeze(), self.io)
    }

    /// One request and its response. The request head and whatever body
    /// bytes came with it stay in `self.buf` until the end, for a replay.
    async fn exchange(&mut self) -> Next {
        let buf = &self.buf[..];
        let head = &self.head;
        let facts = RequestFacts::of(h1::slices(buf, &head.fields));
        let path = head.path.get(buf);
        let route = self.routes.find(path);
        // The one place that picks the engine for each request.
        let lane = match &route {
            Ok((route, _)) => route.lane.as_ref().filter(|l| l.takes_new()),
            Err(_) => Some(self.lane),
        };
        let Some(lane) =
            lane.filter(|_| super::engine_for(head.minor, head.form, &facts) == Engine::FastLane)
        else {
            return Next::ToHyper;
        };
        self.lane = lane;
        let method_bytes = head.method.get(buf);
        let method = Method::from_bytes(method_bytes).unwrap_or(Method::GET);
        let stats = self.routes.stats(&route);
        if let Ok((route, _)) = &route {
            self.policy = &route.policy;
        }
        let policy = self.policy;
        let ex = Exchange::new(
            method,
            path,
            rules::request_id(&facts),
            stats,
            self.shared.access_log,
        );
        let length = match facts.content_length {
            ContentLength::Valid(n) => n,
            _ => 0,
        };
        self.req = Request {
            length,
            head_request: method_bytes == b"HEAD",
            close: facts.connection.close,
            trailers: facts.trailers,
            host: facts.host.map(|h| Span::of(buf, h)),
        };
        let in_buf = (buf.len() - head.len).min(usize::try_from(length).unwrap_or(usize::MAX));
        let consumed = head.len + in_buf;
        let body_left = (in_buf as u64) < length;
        let line = RequestLine {
            version: Version::HTTP_11,
            method: method_bytes,
            path,
            authority: None,
        };
        let admitted = rules::admit(&line, &facts)
            .and(route)
            .and_then(|(_, rest)| policy.admit_path(path, rest).map(|()| rest));
        if let Ok(rest) = admitted {
            // The upstream head, but for the token: written once, sent with
            // each attempt.
            let out = &mut self.out;
            out.clear();
            out.extend_from_slice(method_bytes);
            out.push(b' ');
            policy.write_target(out, rest, head.query.map(|q| q.get(buf)));
            out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
            out.extend_from_slice(self.lane.upstream.host_header.as_bytes());
            for (name, value) in h1::slices(buf, &head.fields) {
                if policy.forwards_request_field(name, &facts) {
                    h1::field(out, name, value);
                }
            }
            policy.write_request_fields(&mut Lines(out), &facts, &ex.request_id, self.peer, None);
            self.template = out.len();
        }
        drop(facts);
        let next = match admitted {
            Err(e) => Err((Failed::Answer(e), body_left)),
            Ok(_) => self.forward(&ex, body_left).await,
        };
        // Counted once it is clear the lane served it (not when the
        // upstream turned out to speak HTTP/2 and hyper took it over).
        if !matches!(next, Err((Failed::ToHyper, _))) {
            self.routes.metrics.engine_request(Engine::FastLane);
        }
        let next = match next {
            Ok(next) => next,
            // The client went away while waiting: nobody to answer (the
            // access log line says status 0, as on the hyper engine).
            Err((Failed::Gone, _)) => Next::Close,
            // Nothing was sent or read past the head: hyper takes the
            // connection from this request on (and counts and logs it).
            Err((Failed::ToHyper, _)) => {
                let mut ex = ex;
                ex.access_log = false;
                return Next::ToHyper;
            }
            Err((Failed::Answer(e), body_left)) => {
                let next = self.answer(&e, &ex, body_left).await;
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
        if self.req.close {
            Next::Close
        } else {
            next
        }
    }

    /// Token, upstream exchange (with replays), response to the client. An
    /// error comes back before anything was written to the client, with
    /// whether request body bytes are left unread.
    async fn forward(&mut self, ex: &Exchange, body_left: bool) -> Result<Next, (Failed, bool)> {
        let policy = self.policy;
        let (generation, bearer) = policy
            .bearer()
            .await
            .map_err(|e| (Failed::Answer(e), body_left))?;
        ex.generation.store(generation, Ordering::Relaxed);

        let mut copy = policy.keeps_body(Some(self.req.length)).then(Vec::new);
        let (mut up, mut answer, sent_all) =
            self.send(ex, &bearer, Body::Client(&mut copy)).await?;
        let mut replay = policy.replay(generation, Engine::FastLane);
        // The copy is there only if the body was within the limit and all sent.
        let replayable = copy.is_some() && sent_all;
        while let Some(bearer) = replay
            .again(answer.head.status, answer.invalid_token, replayable, ex)
            .await
        {
            drop(up); // its 401 body is not wanted: the connection goes
            let copy = copy.as_deref().unwrap_or_default();
            (up, answer, _) =
                self.send(ex, &bearer, Body::Copy(copy))
                    .await
                    .map_err(|(e, _)| match e {
                        // Too late to hand over: the first answer was read.
                        Failed::ToHyper => (
                            Failed::Answer(ProxyError::UpstreamUnavailable(
                                "the upstream switched to HTTP/2 before a replay".into(),
                            )),
                            false,
                        ),
                        e => (e, false),
                    })?;
        }
        Ok(self.respond(up, answer, ex, !sent_all).await)
    }

    /// Sends the request upstream (head, then body) and reads the response
    /// head. Returns the connection with the head at the start of its
    /// buffer, and whether the whole request body went out (the upstream
    /// may answer before it has read it all); a failure comes with whether
    /// client body bytes are still unread (a body read to its end leaves
    /// the connection usable for the next request).
    async fn send(
        &mut self,
        ex: &Exchange,
        bearer: &HeaderValue,
        mut body: Body<'_>,
    ) -> Result<(UpConn, Answer, bool), (Failed, bool)> {
        let policy = self.policy;
        let started = Instant::now();
        let until = started + policy.route.request_timeout;
        let mut deadline = self
            .request_deadline
            .take()
            .unwrap_or_else(|| Deadline::new(until));
        deadline.set(until);
        let mut unread = matches!(body, Body::Client(_))
            && (self.buf.len() - self.head.len) < self.req.length as usize;
        let sending = async {
            let mut up = match self.lane.checkout().await {
                Ok(up) => up,
                Err(Checkout::Http2) => return Err(SendError::ToHyper),
                Err(Checkout::Failed(e)) => return Err(LaneError::Connect(e).into()),
            };
            self.out.truncate(self.template);
            let mut sink = BearerLines {
                out: &mut self.out,
                bearer,
                at: None,
            };
            policy.write_bearer(&mut sink, bearer);
            // The head goes out as: out[..at], the token, out[at..].
            let idle = self.shared.body_idle_timeout;
            let (at, token) = match sink.at {
                Some(at) => (at, bearer.as_bytes()),
                None => (self.out.len(), &b""[..]),
            };
            self.out.extend_from_slice(b"\r\n\r\n");
            let length = self.req.length as usize;
            let in_buf = (self.buf.len() - self.head.len).min(length);
            let sent_all = match &mut body {
                Body::Copy(copy) => {
                    self.out.extend_from_slice(copy);
                    write_head(&mut up.io, &self.out, at, token, idle).await?;
                    true
                }
                Body::Client(copy) => {
                    let first = &self.buf[self.head.len..self.head.len + in_buf];
                    self.out.extend_from_slice(first);
                    if let Some(c) = copy.as_mut() {
                        c.extend_from_slice(first);
                    }
                    write_head(&mut up.io, &self.out, at, token, idle).await?;
                    ex.bytes_up.fetch_add(in_buf as u64, Ordering::Relaxed);
                    let rest = (length - in_buf) as u64;
                    let all = rest == 0 || self.stream_body(&mut up, rest, copy, ex).await?;
                    unread = !all;
                    all
                }
            };
            let answer = self.response_head(&mut up).await?;
            Ok::<_, SendError>((up, answer, sent_all))
        };
        let result = deadline.run(sending).await;
        self.request_deadline = Some(deadline);
        ex.upstream_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        let failed = match result {
            Some(Ok(sent)) => return Ok(sent),
            None => Failed::Answer(ProxyError::UpstreamTimeout),
            Some(Err(SendError::ToHyper)) => Failed::ToHyper,
            Some(Err(SendError::ClientGone)) => Failed::Gone,
            Some(Err(SendError::BadResponse(e))) => {
                Failed::Answer(ProxyError::BadUpstreamResponse(e))
            }
            Some(Err(SendError::ClientBody(e))) => {
                Failed::Answer(ProxyError::from_upstream(Box::new(e)))
            }
            Some(Err(SendError::Upstream(e))) => {
                Failed::Answer(ProxyError::from_upstream(Box::new(e)))
            }
        };
        Err((failed, unread))
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
        let idle = self.shared.body_idle_timeout;
        let mut chunk = vec![0u8; TRANSFER_BUF.min(rest as usize)];
        while rest > 0 {
            let want = chunk.len().min(rest as usize);
            let n = tokio::select! {
                r = timeout(idle, self.io.read(&mut chunk[..want])) => match r {
                    Err(_) => return Err(SendError::ClientBody(ClientBodyError::Idle(idle))),
                    Ok(Err(e)) => return Err(SendError::ClientBody(ClientBodyError::Broken(Box::new(e)))),
                    // Cut short: answered 400 (if anyone listens), as hyper does.
                    Ok(Ok(0)) => {
                        return Err(SendError::ClientBody(ClientBodyError::Broken(
                            Box::new(io::Error::from(io::ErrorKind::UnexpectedEof)),
                        )))
                    }
                    Ok(Ok(n)) => n,
                },
                // An early answer (413, 401...): stop sending, read it.
                // (Both reads may be dropped unfinished: neither loses bytes.)
                r = up.read_more() => {
                    match r {
                        Ok(0) => return Err(LaneError::Closed.into()),
                        Ok(_) if self.answer_started(up)? => return Ok(false),
                        Ok(_) => continue,
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

    /// Whether what the upstream sent while the request body was still
    /// going out is the start of its final answer. Interim answers (a
    /// `100 Continue` sent unasked) ask for the rest of the body: they are
    /// skipped, even when one arrives in pieces.
    fn answer_started(&mut self, up: &mut UpConn) -> Result<bool, SendError> {
        loop {
            match h1::parse_response(&up.buf, &mut self.up_fields) {
                Ok(Some(head)) if is_interim(head.status) => up.buf.advance(head.len),
                Ok(Some(_)) => return Ok(true),
                // Not a whole head yet: go on sending.
                Ok(None) => return Ok(false),
                Err(e) => return Err(LaneError::Head(e).into()),
            }
        }
    }

    /// Reads the upstream's response head (skipping 1xx interim answers),
    /// watching the client: if it goes away, so does this exchange.
    async fn response_head(&mut self, up: &mut UpConn) -> Result<Answer, SendError> {
        let mut gone = std::pin::pin!(client_gone(self.io.get_ref()));
        loop {
            let head = match h1::parse_response(&up.buf, &mut self.up_fields) {
                Ok(Some(head)) if is_interim(head.status) => {
                    up.buf.advance(head.len);
                    continue;
                }
                Ok(Some(head)) => head,
                Ok(None) => {
                    let n = tokio::select! {
                        biased;
                        r = up.read_more() => r.map_err(LaneError::Io)?,
                        () = &mut gone => return Err(SendError::ClientGone),
                    };
                    if n == 0 {
                        return Err(LaneError::Closed.into());
                    }
                    continue;
                }
                Err(h1::BadHead::TooLarge) => {
                    return Err(SendError::BadResponse(BadResponse::TooLarge))
                }
                Err(h1::BadHead::Malformed(_)) => {
                    return Err(SendError::BadResponse(BadResponse::Malformed))
                }
            };
            let facts = ResponseFacts::of(h1::slices(&up.buf, &self.up_fields));
            self.policy
                .check_response(version(head.minor), head.status, &facts, Upgrade::None)
                .map_err(SendError::BadResponse)?;
            let length = match facts.content_length {
                ContentLength::Valid(n) => Some(n),
                _ => None,
            };
            let framing = Framing::of_response(
                head.status,
                self.req.head_request,
                length,
                facts.transfer_coding,
            );
            let keeps_open = if head.minor == 1 {
                !facts.connection.close
            } else {
                facts.connection.keep_alive
            };
            // A body that ends with the connection, or framing the client
            // cannot check (a transfer coding beside a length, or on a
            // bodiless answer): the connection may be out of step.
            let doubtful = facts.transfer_coding != Default::default()
                && (length.is_some() || framing == Framing::Empty);
            let policy = self.policy;
            let buf = &up.buf[..];
            self.up_fields
                .retain(|(name, _)| policy.forwards_response_field(name.get(buf), &facts, false));
            return Ok(Answer {
                invalid_token: facts.invalid_token,
                reusable: keeps_open && framing != Framing::UntilClose && !doubtful,
                has_location: facts.has_location,
                has_date: facts.has_date,
                trailers: policy.trailer_rule(&facts, self.req.trailers),
                framing,
                head,
            });
        }
    }

    /// Passes the response to the client: head, then body as it comes.
    async fn respond(
        &mut self,
        mut up: UpConn,
        answer: Answer,
        ex: &Exchange,
        body_left: bool,
    ) -> Next {
        let policy = self.policy;
        let status = answer.head.status;
        policy.pass_response(status, ex);
        let close = body_left
            || answer.framing == Framing::UntilClose
            || self.req.close
            || self.stop.fired();
        {
            let out = &mut self.out;
            out.clear();
            out.extend_from_slice(b"HTTP/1.1 ");
            out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
            out.push(b' ');
            let reason = answer.head.reason.map(|r| r.get(&up.buf));
            out.extend_from_slice(Policy::reason_phrase(status, reason));
            let public = answer
                .has_location
                .then(|| policy.public_base(self.req.host.map(|h| h.get(&self.buf))));
            for (name, value) in h1::slices(&up.buf, &self.up_fields) {
                let rewritten = match &public {
                    Some(public) if Policy::is_location(name) => {
                        policy.rewrite_location(value, public)
                    }
                    _ => None,
                };
                h1::field(out, name, rewritten.as_deref().unwrap_or(value));
            }
            if answer.framing == Framing::Chunked {
                h1::field(out, b"transfer-encoding", b"chunked");
            }
            rules::write_response_fields(&mut Lines(out), ex, answer.has_date, false);
            if close {
                h1::field(out, b"connection", b"close");
            }
            out.extend_from_slice(b"\r\n\r\n");
        }
        up.buf.advance(answer.head.len);

        match self
            .pass_body(&mut up, answer.framing, ex, &answer.trailers)
            .await
        {
            // An upstream that answered before the whole request body
            // still waits for the rest of it, which is not coming: the
            // next request would be read as that body.
            Ok(true) if answer.reusable && !body_left => self.lane.checkin(up),
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
        keep_trailer: &TrailerRule,
    ) -> Result<bool, BodyFault> {
        let idle = self.shared.body_idle_timeout;
        let mut left = match framing {
            Framing::Empty => 0,
            Framing::Length(n) => n,
            Framing::Chunked | Framing::UntilClose => u64::MAX,
        };
        let mut chunked = (framing == Framing::Chunked).then(h1::Chunked::default);
        let keep = |name: &[u8]| keep_trailer.keeps(name);
        // Large bodies go through a larger buffer than the connection's.
        let mut big: Option<Vec<u8>> = None;
        let mut head_written = false;
        loop {
            let avail: &[u8] = big.as_deref().unwrap_or(&up.buf);
            if head_written {
                self.out.clear();
            }
            let (take, done, counted) = match chunked.as_mut() {
                Some(dec) => {
                    let before = dec.payload();
                    let (used, ended) = match dec.feed(avail, &mut self.out, &keep) {
                        Ok(fed) => fed,
                        Err(e) => {
                            // What decoded well still goes out, as it would
                            // have had the fault come in a later read; then
                            // the connection closes.
                            if !self.out.is_empty() {
                                let _ = self.io.write_all(&self.out).await;
                            }
                            return Err(e.into());
                        }
                    };
                    // Body bytes, as the hyper engine counts them: not the framing.
                    (used, ended, dec.payload() - before)
                }
                None => {
                    let take = avail.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    self.out.extend_from_slice(&avail[..take]);
                    if framing != Framing::UntilClose {
                        left -= take as u64;
                    }
                    (
                        take,
                        framing != Framing::UntilClose && left == 0,
                        take as u64,
                    )
                }
            };
            if !self.out.is_empty() {
                self.io
                    .write_all(&self.out)
                    .await
                    .map_err(BodyFault::Client)?;
            }
            head_written = true;
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

    /// The sidecar's own answer to a request it parsed; `body_left`:
    /// request body bytes are still unread.
    async fn answer(&mut self, e: &ProxyError, ex: &Exchange, body_left: bool) -> Next {
        let a = rules::local_answer(e, ex);
        let close = a.close || body_left || self.req.close || self.stop.fired();
        self.out.clear();
        self.out.extend_from_slice(b"HTTP/1.1 ");
        self.out.extend_from_slice(a.status.as_str().as_bytes());
        self.out.push(b' ');
        self.out
            .extend_from_slice(a.status.canonical_reason().unwrap_or("").as_bytes());
        for (name, value) in &a.fields {
            h1::field(&mut self.out, name.as_str().as_bytes(), value.as_bytes());
        }
        if close && !a.fields.contains_key(http::header::CONNECTION) {
            h1::field(&mut self.out, b"connection", b"close");
        }
        h1::field(
            &mut self.out,
            b"content-length",
            itoa::Buffer::new().format(a.body.len()).as_bytes(),
        );
        self.out.extend_from_slice(b"\r\n\r\n");
        if !self.req.head_request {
            self.out.extend_from_slice(&a.body);
            ex.bytes_down
                .fetch_add(a.body.len() as u64, Ordering::Relaxed);
        }
        match self.io.write_all(&self.out).await {
            Ok(()) if !close => Next::KeepAlive,
            _ => Next::Close,
        }
    }

    /// Answers a head the lane could not read (malformed, too large), on a
    /// connection that then closes: the rest of it cannot be told apart
    /// from the next request.
    async fn refuse(&mut self, e: &ProxyError) {
        self.routes.metrics.engine_request(Engine::FastLane);
        let ex = Exchange::new(
            Method::from_bytes(b"-").unwrap_or(Method::GET),
            b"-",
            rules::new_request_id(),
            self.routes
                .stats(&Err(ProxyError::BadRequest("no request target"))),
            self.shared.access_log,
        );
        self.req = Request {
            close: true,
            ..Request::default()
        };
        self.answer(e, &ex, true).await;
        let _ = self.io.shutdown().await;
    }
}

/// The HTTP/1.x version of a minor version number.
fn version(minor: u8) -> Version {
    if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    }
}

fn is_interim(status: u16) -> bool {
    (100..200).contains(&status) && status != 101
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
    BadResponse(BadResponse),
    ClientBody(ClientBodyError),
    ClientGone,
    ToHyper,
}

impl From<LaneError> for SendError {
    fn from(e: LaneError) -> Self {
        SendError::Upstream(e)
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

/// Writes `out` with `token` inserted at `at`, in vectored writes (one
/// system call, or one TLS record, as a single buffer would be), then
/// flushes (TLS may keep records back until flushed).
async fn write_head(
    io: &mut UpIo,
    out: &[u8],
    at: usize,
    token: &[u8],
    idle: Duration,
) -> Result<(), LaneError> {
    let (head, rest) = out.split_at(at);
    let write = async {
        let mut slices = [
            io::IoSlice::new(head),
            io::IoSlice::new(token),
            io::IoSlice::new(rest),
        ];
        let mut bufs = &mut slices[..];
        while !bufs.is_empty() {
            let n = io.write_vectored(bufs).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            io::IoSlice::advance_slices(&mut bufs, n);
        }
        io.flush().await
    };
    within(idle, write).await
}

async fn write_up(io: &mut UpIo, bytes: &[u8], idle: Duration) -> Result<(), LaneError> {
    let write = async {
        io.write_all(bytes).await?;
        // TLS may keep records back until flushed; TCP: a no-op.
        io.flush().await
    };
    within(idle, write).await
}

/// An upstream write, given `idle` to complete (`proxy.body_idle_timeout`).
async fn within(
    idle: Duration,
    write: impl Future<Output = io::Result<()>>,
) -> Result<(), LaneError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A head larger than the socket takes at once goes out whole and in
    /// order: the vectored write resumes mid-slice, inside the token too.
    #[tokio::test]
    async fn a_spliced_head_survives_partial_writes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let client = client.unwrap();
        let (mut server, _) = accepted.unwrap();
        socket2::SockRef::from(&client)
            .set_send_buffer_size(4096)
            .unwrap();
        let out: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let token: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 13) as u8).collect();
        let at = 100_003;
        let mut expected = out[..at].to_vec();
        expected.extend_from_slice(&token);
        expected.extend_from_slice(&out[at..]);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut io = UpIo::Plain(client);
        write_head(&mut io, &out, at, &token, Duration::from_secs(10))
            .await
            .unwrap();
        drop(io);
        assert!(reader.await.unwrap() == expected, "the bytes differ");
    }
}
