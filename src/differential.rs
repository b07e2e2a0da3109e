//! A test and fuzz harness, on no request path of the sidecar: it feeds the
//! same raw bytes through both proxy engines and says whether they decided
//! alike. The `differential` fuzz target (fuzz/) and the regression tests
//! (tests/fuzz_regressions.rs) share it; it lives in the library so that
//! every CI build compiles and lints it, and a test replays the kept inputs
//! through it, so it cannot rot unseen while the fuzz crate (not built in
//! CI) goes unbuilt.
//!
//! A [`Rig`] runs sidecars in pairs with the same config but
//! `proxy.fast_lane` (one pair per [`Variant`]), each with a raw-TCP
//! upstream of its own that answers with scripted bytes, and a fake token
//! endpoint. A [`Case`] is a short conversation: up to [`MAX_STEPS`] steps,
//! each the bytes a client writes (in pieces, at the points the case says)
//! and the bytes the upstream answers the next request it reads with (in
//! pieces too). [`Rig::check`] runs the case against both sidecars of a
//! pair at once and compares what the upstream saw and what the client got
//! ([`compare`]).
//!
//! Every wait is bounded: the rig must run on a current-thread runtime
//! with a paused clock (`start_paused`), where time jumps ahead whenever
//! every task is idle. So the sidecars' own timeouts pass at once, an
//! input that makes an engine wait for bytes costs no real time, the
//! harness can wait until everything is idle (a barrier between pieces,
//! steps and inputs), and a hang shows as [`HANG`] of virtual time passing
//! without an answer: a finding, not a stuck fuzzer.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::Figment;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::app::{self, Running};
use crate::fake::{self, FakeServer, World};

/// Steps of a case at most.
pub const MAX_STEPS: usize = 3;

/// Virtual time without a byte after which a wait is a hang: longer than
/// every timeout of the sidecar's config ([`Variant::toml`]).
pub const HANG: Duration = Duration::from_secs(900);

/// Separates the sections of an encoded case: request, answer, request...
pub const SECTION: u8 = 0xff;
/// Splits a section into the pieces written one by one.
pub const CUT: u8 = 0xfe;

/// A sidecar config the pairs differ in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The defaults.
    Plain,
    /// `forwarded_headers = true`, `retry_on_401 = "any"`.
    Forwarded,
}

impl Variant {
    const ALL: [Variant; 2] = [Variant::Plain, Variant::Forwarded];

    fn toml(self) -> &'static str {
        match self {
            Variant::Plain => "",
            Variant::Forwarded => "forwarded_headers = true\nretry_on_401 = \"any\"\n",
        }
    }
}

/// One step of a conversation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// What the client writes, piece by piece.
    pub request: Vec<Vec<u8>>,
    /// What the upstream answers the next request it reads with, piece by
    /// piece; empty: it closes without a byte.
    pub answer: Vec<Vec<u8>>,
}

/// A conversation with one sidecar of each engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    pub variant: Variant,
    pub steps: Vec<Step>,
}

impl Case {
    /// Reads a fuzz input: a flags byte (bit 0: [`Variant`]), then sections
    /// separated by [`SECTION`]: request 1, answer 1, request 2... (at most
    /// [`MAX_STEPS`] steps; a later section is dropped), each cut into
    /// pieces at every [`CUT`].
    pub fn parse(data: &[u8]) -> Case {
        let (flags, rest) = data.split_first().map_or((0, &[][..]), |(f, r)| (*f, r));
        let variant = Variant::ALL[usize::from(flags & 1)];
        let sections: Vec<&[u8]> = rest.split(|&b| b == SECTION).collect();
        let pieces = |s: &[u8]| -> Vec<Vec<u8>> {
            s.split(|&b| b == CUT)
                .filter(|p| !p.is_empty())
                .map(<[u8]>::to_vec)
                .collect()
        };
        let steps = sections
            .chunks(2)
            .take(MAX_STEPS)
            .map(|pair| Step {
                request: pieces(pair[0]),
                answer: pair.get(1).map(|a| pieces(a)).unwrap_or_default(),
            })
            .collect();
        Case { variant, steps }
    }

    /// The fuzz input that [`Case::parse`] reads back as this case.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![u8::from(self.variant == Variant::Forwarded)];
        let join = |out: &mut Vec<u8>, pieces: &[Vec<u8>]| {
            for (i, p) in pieces.iter().enumerate() {
                if i > 0 {
                    out.push(CUT);
                }
                out.extend_from_slice(p);
            }
        };
        for (i, s) in self.steps.iter().enumerate() {
            if i > 0 {
                out.push(SECTION);
            }
            join(&mut out, &s.request);
            out.push(SECTION);
            join(&mut out, &s.answer);
        }
        out
    }

    /// A case of one step, each side written whole.
    pub fn one(variant: Variant, request: &[u8], answer: &[u8]) -> Case {
        Case {
            variant,
            steps: vec![Step {
                request: vec![request.to_vec()],
                answer: vec![answer.to_vec()],
            }],
        }
    }
}

// ---------------------------------------------------------------------------
// What each side saw

/// A field line: name as written, value as written (trimmed).
pub type Field = (Vec<u8>, Vec<u8>);

/// A parsed head's fields, owned.
fn owned_fields(headers: &[httparse::Header<'_>]) -> Vec<Field> {
    headers
        .iter()
        .map(|h| (h.name.as_bytes().to_vec(), h.value.to_vec()))
        .collect()
}

/// A request as the upstream read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpRequest {
    Read {
        method: Vec<u8>,
        target: Vec<u8>,
        minor: u8,
        fields: Vec<Field>,
        /// Decoded: chunked framing removed.
        body: Vec<u8>,
        trailers: Vec<Field>,
        /// The body ended as its framing said (else the upstream closed
        /// the connection without answering).
        complete: bool,
    },
    /// Not a request head the upstream could read (RFC 9112): the bytes.
    Unreadable(Vec<u8>),
}

/// How a response to the client was delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    None,
    Length,
    Chunked,
    Close,
}

/// A response as the client read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub minor: u8,
    pub status: u16,
    pub reason: Vec<u8>,
    pub fields: Vec<Field>,
    pub framing: Framing,
    /// Decoded.
    pub body: Vec<u8>,
    pub trailers: Vec<Field>,
    /// The body ended as its framing said (else the connection ended first).
    pub complete: bool,
}

impl Response {
    fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v.as_slice())
    }

    /// One of hyper's automatic answers to a head it could not parse,
    /// written before any service ran: no `X-Request-Id`, empty body.
    pub fn is_hyper_automatic(&self) -> bool {
        matches!(self.status, 400 | 414 | 431)
            && self.get("x-request-id").is_none()
            && self.body.is_empty()
    }
}

impl Response {
    /// The sidecar's own refusal of a head it could not read (the lane's,
    /// JSON): malformed (400) or too large (431).
    pub fn is_head_refusal(&self) -> bool {
        let says = |what: &[u8]| find(&self.body, what).is_some();
        (self.status == 400 && says(b"\"malformed request head\""))
            || (self.status == 431 && says(b"\"request_header_too_large\""))
    }
}

impl Response {
    /// The sidecar's 502 for an upstream head it could not read.
    pub fn is_invalid_upstream_head(&self) -> bool {
        self.status == 502
            && find(&self.body, b"\"the upstream sent an invalid response\"").is_some()
    }

    /// The sidecar's 502 for an upstream that closed (or failed) before
    /// a whole head.
    pub fn is_upstream_closed(&self) -> bool {
        self.status == 502 && find(&self.body, b"\"the upstream could not be reached\"").is_some()
    }
}

/// How the client's connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The sidecar closed it.
    Closed,
    /// Bytes that are no HTTP/1.1 response.
    Unreadable(Vec<u8>),
    /// Nothing for [`HANG`] of virtual time.
    Hung,
}

/// What one sidecar did with a case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transcript {
    /// Every response the client got, interim ones included, in order.
    pub responses: Vec<Response>,
    pub end: End,
    /// Every request the upstream read, in order.
    pub upstream: Vec<UpRequest>,
    /// The bearer tokens this sidecar's token endpoint issued.
    tokens: Vec<String>,
    /// `host:port` of this sidecar's upstream (its `Host` field).
    upstream_host: String,
}

// ---------------------------------------------------------------------------
// The rig

/// A scripted raw-TCP upstream: reads one request per connection, answers
/// it with the next scripted answer, then closes.
struct RawUpstream {
    addr: SocketAddr,
    state: Arc<Mutex<UpState>>,
    live: Arc<AtomicUsize>,
    /// Accepts and requests so far (the barrier waits for it to settle).
    events: Arc<AtomicUsize>,
}

#[derive(Default)]
struct UpState {
    answers: VecDeque<Vec<Vec<u8>>>,
    seen: Vec<UpRequest>,
}

/// The answer to a request beyond the script (a replay, a pipelined one).
const DEFAULT_ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ndefault";

impl RawUpstream {
    async fn start() -> std::io::Result<RawUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let up = RawUpstream {
            addr,
            state: Arc::default(),
            live: Arc::default(),
            events: Arc::default(),
        };
        let (state, live, events) = (up.state.clone(), up.live.clone(), up.events.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                events.fetch_add(1, Ordering::SeqCst);
                live.fetch_add(1, Ordering::SeqCst);
                let (state, live, events) = (state.clone(), live.clone(), events.clone());
                tokio::spawn(async move {
                    serve_upstream(s, &state, &events).await;
                    live.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(up)
    }
}

async fn serve_upstream(mut s: TcpStream, state: &Mutex<UpState>, events: &AtomicUsize) {
    let mut r = Reader::new(&mut s);
    let Some(request) = read_request(&mut r).await else {
        return; // closed (an idle pooled connection) or hung
    };
    events.fetch_add(1, Ordering::SeqCst);
    let readable = matches!(request, UpRequest::Read { complete: true, .. });
    let answer = {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        st.seen.push(request);
        st.answers.pop_front()
    };
    if readable {
        let answer = answer.unwrap_or_else(|| vec![DEFAULT_ANSWER.to_vec()]);
        write_pieces(&mut s, &answer).await;
    }
    let _ = s.shutdown().await;
}

/// Writes `pieces` one by one, each after the reader took the previous one.
async fn write_pieces(s: &mut TcpStream, pieces: &[Vec<u8>]) {
    for (i, p) in pieces.iter().enumerate() {
        if i > 0 {
            idle().await;
        }
        if s.write_all(p).await.is_err() {
            return;
        }
    }
}

/// Returns once every task of the (paused-clock) runtime is idle.
async fn idle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

/// One sidecar with its own upstream.
struct Side {
    running: Running,
    upstream: RawUpstream,
    world: Arc<World>,
    _auth: FakeServer,
}

impl Side {
    async fn start(variant: Variant, fast_lane: bool) -> Side {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        // Tokens that outlive any fuzzing session, even in virtual time.
        let world = World::new(1.0e9);
        let auth = fake::token_endpoint(world.clone(), loopback)
            .await
            .expect("a fake token endpoint on loopback");
        let upstream = RawUpstream::start()
            .await
            .expect("a raw upstream on loopback");
        let (id, secret, user, password) = world.login();
        let toml = format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
upstream = "http://{up}/base/"
fast_lane = {fast_lane}
access_log = false
# Apart, so that a stalled upload is not a tie between two timers of the
# same length (see fuzz/README.md).
body_idle_timeout = "30s"
request_timeout = "60s"
{variant}
[admin]
listen = "127.0.0.1:0"
[oauth]
token_url = "{token}"
client_id = "{id}"
client_secret = "{secret}"
username = "{user}"
password = "{password}"
"#,
            up = upstream.addr,
            variant = variant.toml(),
            token = auth.url("/oauth/token"),
        );
        let config = crate::config::load_figment(Figment::new().merge(Toml::string(&toml)))
            .expect("the harness config is valid")
            .config;
        let running = app::start(&config).await.expect("a sidecar starts");
        running
            .token("default")
            .expect("the single-upstream form's profile")
            .wait_usable(0, Duration::from_secs(10))
            .await
            .expect("a first token");
        Side {
            running,
            upstream,
            world,
            _auth: auth,
        }
    }

    /// Runs `case` against this sidecar.
    async fn run(&self, case: &Case) -> Transcript {
        {
            let mut st = self
                .upstream
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            st.seen.clear();
            st.answers = case.steps.iter().map(|s| s.answer.clone()).collect();
        }
        let mut responses = Vec::new();
        let end = self.converse(case, &mut responses).await;
        self.barrier().await;
        let upstream = {
            let mut st = self
                .upstream
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            st.answers.clear();
            std::mem::take(&mut st.seen)
        };
        Transcript {
            responses,
            end,
            upstream,
            tokens: self.world.issued_tokens(),
            upstream_host: self.upstream.addr.to_string(),
        }
    }

    async fn converse(&self, case: &Case, responses: &mut Vec<Response>) -> End {
        let Ok(mut s) = TcpStream::connect(self.running.proxy_addrs[0]).await else {
            return End::Closed;
        };
        let _ = s.set_nodelay(true);
        let mut r = Reader::new(&mut s);
        for step in &case.steps {
            let method = method_of(step);
            for p in &step.request {
                idle().await;
                // A write the sidecar refused (it closed): what it answered
                // is still read below.
                let _ = r.s.write_all(p).await;
            }
            // Responses until a final one.
            loop {
                match read_response(&mut r, &method).await {
                    Ok(resp) => {
                        let last = !(100..200).contains(&resp.status) || resp.status == 101;
                        let done = !resp.complete || resp.framing == Framing::Close;
                        responses.push(resp);
                        if done {
                            return End::Closed;
                        }
                        if last {
                            break;
                        }
                    }
                    Err(end) => return end,
                }
            }
            if responses.last().is_some_and(|r| r.status == 101) {
                // A tunnel: what follows is not HTTP.
                return match r.rest().await {
                    Ok(rest) if rest.is_empty() => End::Closed,
                    Ok(rest) => End::Unreadable(rest),
                    Err(end) => end,
                };
            }
            // The upstream's connection of this step is closed before the next.
            idle().await;
        }
        // Whatever else comes (answers to requests sent in one piece with
        // the last one), until the sidecar closes the idle connection.
        loop {
            match read_response(&mut r, b"GET").await {
                Ok(resp) => {
                    let done = !resp.complete || resp.framing == Framing::Close;
                    responses.push(resp);
                    if done {
                        return End::Closed;
                    }
                }
                Err(end) => return end,
            }
        }
    }

    /// Waits until nothing is left of the conversation: no upstream
    /// connection open, no accept or request for two idle rounds. An
    /// upstream connection still open waits for a sidecar timeout: the
    /// clock jumps a second at a time, up to [`HANG`].
    async fn barrier(&self) {
        let mut last = usize::MAX;
        for _ in 0..HANG.as_secs() {
            let open = self.upstream.live.load(Ordering::SeqCst) > 0;
            if open {
                tokio::time::sleep(Duration::from_secs(1)).await;
            } else {
                idle().await;
            }
            let now = self.upstream.events.load(Ordering::SeqCst);
            if now == last && !open {
                return;
            }
            last = now;
        }
    }
}

/// The method of the request a step starts with, if its head is one
/// (a head that cannot be read gets an answer with a body, whatever its
/// first word).
fn method_of(step: &Step) -> Vec<u8> {
    let bytes = step.request.concat();
    let mut storage = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut storage);
    match req.parse(&bytes) {
        Ok(httparse::Status::Complete(_)) => req.method.unwrap_or_default().as_bytes().to_vec(),
        _ => b"GET".to_vec(),
    }
}

/// Both sidecars of each [`Variant`], started once and used for every case.
pub struct Rig {
    pairs: Vec<(Variant, Side, Side)>,
}

impl Rig {
    /// Starts the sidecars; call within a current-thread runtime whose
    /// clock is paused.
    pub async fn start() -> Rig {
        let mut pairs = Vec::new();
        for v in Variant::ALL {
            pairs.push((v, Side::start(v, true).await, Side::start(v, false).await));
        }
        Rig { pairs }
    }

    /// Runs `case` on the fast-lane sidecar and the hyper-only one of its
    /// variant, at once, and compares.
    pub async fn run(&self, case: &Case) -> (Transcript, Transcript) {
        let (_, lane, hyper) = self
            .pairs
            .iter()
            .find(|(v, _, _)| *v == case.variant)
            .expect("a pair per variant");
        tokio::join!(lane.run(case), hyper.run(case))
    }

    /// [`Rig::run`] and [`compare`].
    pub async fn check(&self, case: &Case) -> Result<Verdict, Box<Difference>> {
        let (lane, hyper) = self.run(case).await;
        compare(&lane, &hyper)
    }
}

// ---------------------------------------------------------------------------
// Reading HTTP/1.1 strictly

struct Reader<'a> {
    s: &'a mut TcpStream,
    buf: Vec<u8>,
}

impl<'a> Reader<'a> {
    fn new(s: &'a mut TcpStream) -> Self {
        Reader { s, buf: Vec::new() }
    }

    /// Reads more; `Ok(0)` at the end of the connection.
    async fn fill(&mut self) -> Result<usize, End> {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(HANG, self.s.read(&mut chunk)).await {
            Err(_) => Err(End::Hung),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            // A reset ends the connection like a close.
            Ok(Err(_)) => Ok(0),
        }
    }

    async fn rest(&mut self) -> Result<Vec<u8>, End> {
        while self.fill().await? > 0 {}
        Ok(std::mem::take(&mut self.buf))
    }

    /// A line without its CRLF; `None` if the connection ended first.
    async fn line(&mut self) -> Result<Option<Vec<u8>>, End> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                return Ok(Some(line[..i].to_vec()));
            }
            if self.fill().await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Exactly `n` bytes, or what came before the end.
    async fn exact(&mut self, n: usize) -> Result<(Vec<u8>, bool), End> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Ok((std::mem::take(&mut self.buf), false));
            }
        }
        Ok((self.buf.drain(..n).collect(), true))
    }

    /// A chunked body, strictly (RFC 9112 7.1): data, trailers, complete.
    async fn chunked(&mut self) -> Result<Result<(Vec<u8>, Vec<Field>, bool), ()>, End> {
        let mut body = Vec::new();
        loop {
            let Some(line) = self.line().await? else {
                return Ok(Ok((body, Vec::new(), false)));
            };
            let size = line.split(|&b| b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size.trim_ascii())
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|s| u64::from_str_radix(s, 16).ok());
            let Some(size) = size else { return Ok(Err(())) };
            if size == 0 {
                break;
            }
            let (data, whole) = self.exact(size as usize).await?;
            body.extend(data);
            if !whole {
                return Ok(Ok((body, Vec::new(), false)));
            }
            match self.exact(2).await? {
                (crlf, true) if crlf == b"\r\n" => {}
                (_, true) => return Ok(Err(())),
                (_, false) => return Ok(Ok((body, Vec::new(), false))),
            }
        }
        let mut trailers = Vec::new();
        loop {
            match self.line().await? {
                None => return Ok(Ok((body, trailers, false))),
                Some(l) if l.is_empty() => return Ok(Ok((body, trailers, true))),
                Some(l) => match split_field(&l) {
                    Some(f) => trailers.push(f),
                    None => return Ok(Err(())),
                },
            }
        }
    }

    /// A head ending in an empty line; `None` when the connection ended
    /// before its first byte.
    async fn head(&mut self) -> Result<Option<Vec<u8>>, End> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                return Ok(Some(self.buf.drain(..i + 4).collect()));
            }
            if self.fill().await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(End::Unreadable(std::mem::take(&mut self.buf)));
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn split_field(line: &[u8]) -> Option<Field> {
    let colon = line.iter().position(|&b| b == b':')?;
    Some((
        line[..colon].to_vec(),
        line[colon + 1..].trim_ascii().to_vec(),
    ))
}

/// The comma-separated tokens of every `name` field.
fn tokens_of(fields: &[Field], name: &str) -> Vec<Vec<u8>> {
    fields
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
        .flat_map(|(_, v)| v.split(|&b| b == b','))
        .map(|t| t.trim_ascii().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// How a message body is delimited by its fields; `Err` when they are
/// contradictory or invalid.
fn body_framing(fields: &[Field]) -> Result<Option<Framing>, ()> {
    let te = tokens_of(fields, "transfer-encoding");
    let cls: Vec<&Vec<u8>> = fields
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"content-length"))
        .map(|(_, v)| v)
        .collect();
    if !te.is_empty() {
        if !cls.is_empty() {
            return Err(());
        }
        return Ok(Some(if te.last().is_some_and(|t| t == b"chunked") {
            Framing::Chunked
        } else {
            Framing::Close
        }));
    }
    match cls.as_slice() {
        [] => Ok(None),
        [v] if !v.is_empty() && v.iter().all(u8::is_ascii_digit) && v.len() <= 18 => {
            Ok(Some(Framing::Length))
        }
        _ => Err(()),
    }
}

fn content_length(fields: &[Field]) -> usize {
    fields
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(b"content-length"))
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0)
}

/// The next request on an upstream connection; `None` when it closed first.
async fn read_request(r: &mut Reader<'_>) -> Option<UpRequest> {
    let head = match r.head().await {
        Ok(Some(h)) => h,
        Ok(None) | Err(End::Hung) | Err(End::Closed) => return None,
        Err(End::Unreadable(b)) => return Some(UpRequest::Unreadable(b)),
    };
    let mut storage = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut storage);
    let Ok(httparse::Status::Complete(_)) = req.parse(&head) else {
        return Some(UpRequest::Unreadable(head));
    };
    let fields = owned_fields(req.headers);
    let (method, target, minor) = (
        req.method.unwrap_or_default().as_bytes().to_vec(),
        req.path.unwrap_or_default().as_bytes().to_vec(),
        req.version.unwrap_or_default(),
    );
    let (body, trailers, complete) = match body_framing(&fields) {
        Err(()) | Ok(Some(Framing::Close)) => (Vec::new(), Vec::new(), false),
        Ok(None) | Ok(Some(Framing::None)) => (Vec::new(), Vec::new(), true),
        Ok(Some(Framing::Length)) => match r.exact(content_length(&fields)).await {
            Ok((b, whole)) => (b, Vec::new(), whole),
            Err(_) => (Vec::new(), Vec::new(), false),
        },
        Ok(Some(Framing::Chunked)) => match r.chunked().await {
            Ok(Ok((b, t, whole))) => (b, t, whole),
            _ => (Vec::new(), Vec::new(), false),
        },
    };
    Some(UpRequest::Read {
        method,
        target,
        minor,
        fields,
        body,
        trailers,
        complete,
    })
}

/// The next response to a request with `method`, framed as RFC 9112 6.3
/// says; `Err` with how the connection ended if there is none.
async fn read_response(r: &mut Reader<'_>, method: &[u8]) -> Result<Response, End> {
    let Some(head) = r.head().await? else {
        return Err(End::Closed);
    };
    let mut storage = [httparse::EMPTY_HEADER; 256];
    let mut resp = httparse::Response::new(&mut storage);
    let Ok(httparse::Status::Complete(_)) = resp.parse(&head) else {
        let mut rest = head;
        rest.append(&mut r.buf);
        return Err(End::Unreadable(rest));
    };
    let fields = owned_fields(resp.headers);
    let status = resp.code.unwrap_or_default();
    let mut out = Response {
        minor: resp.version.unwrap_or_default(),
        status,
        reason: resp.reason.unwrap_or_default().as_bytes().to_vec(),
        fields,
        framing: Framing::None,
        body: Vec::new(),
        trailers: Vec::new(),
        complete: true,
    };
    let bodiless =
        method == b"HEAD" || (100..200).contains(&status) || status == 204 || status == 304;
    if bodiless {
        return Ok(out);
    }
    match body_framing(&out.fields) {
        Err(()) => {
            // Contradictory framing from the sidecar: a finding in itself.
            let mut rest = head;
            rest.append(&mut r.buf);
            return Err(End::Unreadable(rest));
        }
        Ok(None) | Ok(Some(Framing::Close)) => {
            out.framing = Framing::Close;
            out.body = r.rest().await?;
        }
        Ok(Some(Framing::None)) => {}
        Ok(Some(Framing::Length)) => {
            out.framing = Framing::Length;
            (out.body, out.complete) = r.exact(content_length(&out.fields)).await?;
        }
        Ok(Some(Framing::Chunked)) => {
            out.framing = Framing::Chunked;
            match r.chunked().await? {
                Ok((body, trailers, complete)) => {
                    (out.body, out.trailers, out.complete) = (body, trailers, complete)
                }
                Err(()) => {
                    let mut rest = head;
                    rest.append(&mut r.buf);
                    return Err(End::Unreadable(rest));
                }
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// The comparison

/// Fields whose presence and value are framing or per-request noise: not
/// compared.
const DROPPED: [&str; 5] = [
    "x-request-id",
    "date",
    "content-length",
    "transfer-encoding",
    "connection",
];

/// Fields the sidecar writes itself: their names are compared in any case
/// (the engines write them in their own); every other name as written.
const SIDECAR_WRITES: [&str; 8] = [
    "host",
    "authorization",
    "te",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "proxy-authorization",
    "upgrade",
];

/// The outcome of a comparison that found no difference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Everything compared equal.
    Same,
    /// Equal up to an accepted difference, after which nothing more was
    /// compared.
    Accepted(&'static str),
}

/// Two engines that decided differently, with both transcripts.
#[derive(Debug, Clone)]
pub struct Difference {
    pub what: String,
    pub lane: Transcript,
    pub hyper: Transcript,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "the engines differ: {}", self.what)?;
        writeln!(f, "--- fast lane (proxy.fast_lane = true):")?;
        show(f, &self.lane)?;
        writeln!(f, "--- hyper (proxy.fast_lane = false):")?;
        show(f, &self.hyper)
    }
}

fn lossy(b: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(b)
}

fn show(f: &mut fmt::Formatter<'_>, t: &Transcript) -> fmt::Result {
    for u in &t.upstream {
        match u {
            UpRequest::Read {
                method,
                target,
                minor,
                fields,
                body,
                trailers,
                complete,
            } => {
                writeln!(
                    f,
                    "  upstream read: {} {} HTTP/1.{minor}",
                    lossy(method),
                    lossy(target)
                )?;
                for (n, v) in fields {
                    writeln!(f, "    {}: {}", lossy(n), lossy(v))?;
                }
                writeln!(
                    f,
                    "    body {:?} trailers {trailers:?}{}",
                    lossy(body),
                    if *complete { "" } else { ", cut short" }
                )?;
            }
            UpRequest::Unreadable(b) => writeln!(f, "  upstream unreadable: {:?}", lossy(b))?,
        }
    }
    for r in &t.responses {
        writeln!(
            f,
            "  client got: HTTP/1.{} {} {} ({:?}{})",
            r.minor,
            r.status,
            lossy(&r.reason),
            r.framing,
            if r.complete { "" } else { ", cut short" }
        )?;
        for (n, v) in &r.fields {
            writeln!(f, "    {}: {}", lossy(n), lossy(v))?;
        }
        writeln!(f, "    body {:?} trailers {:?}", lossy(&r.body), r.trailers)?;
    }
    writeln!(f, "  end: {:?}", t.end)
}

/// Fields as compared: [`DROPPED`] left out, the names of
/// [`SIDECAR_WRITES`] in lower case, the bearer token as `<token>` and
/// the sidecar's upstream as `<upstream>` (each sidecar has its own), then
/// sorted by name in any case (a stable sort: the order of fields of one
/// name is kept, the order between names is not compared).
fn normal(fields: &[Field], t: &Transcript) -> Vec<Field> {
    let mut out: Vec<Field> = fields
        .iter()
        .filter(|(n, _)| !DROPPED.iter().any(|d| n.eq_ignore_ascii_case(d.as_bytes())))
        .map(|(n, v)| {
            let sidecars = SIDECAR_WRITES
                .iter()
                .any(|s| n.eq_ignore_ascii_case(s.as_bytes()));
            let name = if sidecars {
                n.to_ascii_lowercase()
            } else {
                n.clone()
            };
            let is_token = n.eq_ignore_ascii_case(b"authorization")
                && v.strip_prefix(b"Bearer ")
                    .is_some_and(|v| t.tokens.iter().any(|k| k.as_bytes() == v));
            let is_upstream = n.eq_ignore_ascii_case(b"host") && v == t.upstream_host.as_bytes();
            let value = if is_token {
                b"Bearer <token>".to_vec()
            } else if is_upstream {
                b"<upstream>".to_vec()
            } else {
                v.clone()
            };
            (name, value)
        })
        .collect();
    out = combine_trailer_lines(out);
    out.sort_by_key(|(n, _)| n.to_ascii_lowercase());
    out
}

/// Several `Trailer` lines are one list (RFC 9110 5.3): hyper writes them
/// as one line joined by ", ", the lane passes them as they came. Either
/// form means the same, so they are compared as one line.
fn combine_trailer_lines(fields: Vec<Field>) -> Vec<Field> {
    let mut out: Vec<Field> = Vec::with_capacity(fields.len());
    let mut first: Option<usize> = None;
    for (name, value) in fields {
        if !name.eq_ignore_ascii_case(b"trailer") {
            out.push((name, value));
        } else if let Some(i) = first {
            let joined = &mut out[i].1;
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(&value);
        } else {
            first = Some(out.len());
            out.push((b"trailer".to_vec(), value));
        }
    }
    out
}

/// An unreadable head as compared: each sidecar's own values (token,
/// upstream address) as placeholders, `X-Request-Id` lines left out.
fn normal_raw(raw: &[u8], t: &Transcript) -> Vec<u8> {
    let mut text = String::from_utf8_lossy(raw).into_owned();
    for token in &t.tokens {
        text = text.replace(token.as_str(), "<token>");
    }
    text = text.replace(&t.upstream_host, "<upstream>");
    text.split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("x-request-id:"))
        .collect::<Vec<_>>()
        .join("\r\n")
        .into_bytes()
}

/// Trailer fields: names in any case (the engines write them lower case).
fn normal_trailers(fields: &[Field]) -> Vec<Field> {
    let mut out: Vec<Field> = fields
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Compares what the fast-lane sidecar and the hyper-only one did with the
/// same case: the status of every response, the request heads the upstream
/// read and the response heads the client got ([`normal`]), the decoded
/// bodies and trailers, and how the connection ended. Two differences are
/// accepted (everything before them still compared, nothing after):
/// - an upstream body delimited by the connection's end: the lane passes
///   it on so and closes the client connection, hyper re-chunks it and
///   keeps the connection;
/// - one of hyper's automatic answers ([`Response::is_hyper_automatic`]) on
///   the hyper-only sidecar: hyper refuses some heads (a raw `"` or `<` in
///   the target, for one) before any service runs; the lane reads every
///   head itself and forwards or answers them. Likewise hyper reads a head
///   only once it has ended, so a bad line the lane refuses at once
///   ([`Response::is_head_refusal`]) leaves hyper waiting for the rest,
///   and closing at its header timeout without an answer. The same holds
///   for upstream heads: a bad line in a head that never ends (the
///   upstream closes first) is an invalid response to the lane at once,
///   and to hyper, when the head came in more than one read, a connection
///   closed before the answer: 502 `upstream_unavailable` on both, with
///   another message;
/// - an upstream body that breaks off before its first byte: the lane has
///   passed the head on (it writes a head as soon as it has it), hyper
///   writes a head together with the first body bytes and so closes the
///   connection without an answer. Either way the exchange fails for the
///   client and the connection closes.
pub fn compare(lane: &Transcript, hyper: &Transcript) -> Result<Verdict, Box<Difference>> {
    let differ = |what: String| {
        Box::new(Difference {
            what,
            lane: lane.clone(),
            hyper: hyper.clone(),
        })
    };
    let mut verdict = Verdict::Same;
    let mut upstream_upto = None;
    let n = lane.responses.len().max(hyper.responses.len());
    for i in 0..n {
        let (a, b) = (lane.responses.get(i), hyper.responses.get(i));
        if let Some(b) = b {
            if b.is_hyper_automatic() && a.is_none_or(|a| !a.is_hyper_automatic()) {
                verdict = Verdict::Accepted("hyper's automatic answer to a head it cannot parse");
                upstream_upto = Some(hyper.upstream.len());
                break;
            }
        }
        // An upstream body that breaks off before its first byte: the
        // lane wrote the head as soon as it had it, hyper writes a head
        // with the first body bytes, and so closes without one.
        if b.is_none()
            && hyper.end == End::Closed
            && a.is_some_and(|a| !a.complete && a.body.is_empty())
        {
            verdict = Verdict::Accepted("an upstream body broken off before its first byte");
            upstream_upto = Some(lane.upstream.len().min(hyper.upstream.len()));
            break;
        }
        // hyper finds a bad line only once the head has ended: till then
        // it waits (and closes at its header timeout, answering nothing).
        if b.is_none() && hyper.end == End::Closed && a.is_some_and(Response::is_head_refusal) {
            verdict = Verdict::Accepted("hyper waits for the end of a head it cannot parse");
            upstream_upto = Some(hyper.upstream.len());
            break;
        }
        let (Some(a), Some(b)) = (a, b) else {
            return Err(differ(format!(
                "response {}: one engine answered, the other did not",
                i + 1
            )));
        };
        if a.status != b.status {
            return Err(differ(format!(
                "response {}: status {} vs {}",
                i + 1,
                a.status,
                b.status
            )));
        }
        if (a.minor, &a.reason) != (b.minor, &b.reason) {
            return Err(differ(format!("response {}: status line", i + 1)));
        }
        if normal(&a.fields, lane) != normal(&b.fields, hyper) {
            return Err(differ(format!("response {}: head fields", i + 1)));
        }
        if a.body != b.body {
            if a.is_invalid_upstream_head() && b.is_upstream_closed() {
                verdict = Verdict::Accepted(
                    "an invalid upstream head that never ends: invalid at once, or closed",
                );
                upstream_upto = Some(lane.upstream.len());
                break;
            }
            return Err(differ(format!("response {}: decoded body", i + 1)));
        }
        if normal_trailers(&a.trailers) != normal_trailers(&b.trailers) {
            return Err(differ(format!("response {}: trailers", i + 1)));
        }
        if a.framing == Framing::Close && b.framing != Framing::Close {
            verdict = Verdict::Accepted("a close-delimited upstream body");
            upstream_upto = Some(lane.upstream.len());
            break;
        }
        if a.complete != b.complete {
            return Err(differ(format!(
                "response {}: cut short on one engine",
                i + 1
            )));
        }
    }
    if verdict == Verdict::Same && lane.end != hyper.end {
        return Err(differ("the connection ended differently".into()));
    }
    let upto = upstream_upto.unwrap_or(usize::MAX);
    let (ua, ub) = (
        &lane.upstream[..lane.upstream.len().min(upto)],
        &hyper.upstream[..hyper.upstream.len().min(upto)],
    );
    if ua.len() != ub.len() {
        return Err(differ(format!(
            "the upstream read {} vs {} requests",
            ua.len(),
            ub.len()
        )));
    }
    for (i, (a, b)) in ua.iter().zip(ub).enumerate() {
        let same = match (a, b) {
            (
                UpRequest::Read {
                    method: m1,
                    target: t1,
                    minor: v1,
                    fields: f1,
                    body: b1,
                    trailers: r1,
                    complete: c1,
                },
                UpRequest::Read {
                    method: m2,
                    target: t2,
                    minor: v2,
                    fields: f2,
                    body: b2,
                    trailers: r2,
                    complete: c2,
                },
            ) => {
                (m1, t1, v1) == (m2, t2, v2)
                    && normal(f1, lane) == normal(f2, hyper)
                    && (b1, c1) == (b2, c2)
                    && normal_trailers(r1) == normal_trailers(r2)
            }
            (UpRequest::Unreadable(a), UpRequest::Unreadable(b)) => {
                normal_raw(a, lane) == normal_raw(b, hyper)
            }
            _ => false,
        };
        if !same {
            return Err(differ(format!("upstream request {}", i + 1)));
        }
    }
    Ok(verdict)
}
