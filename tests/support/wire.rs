//! Raw HTTP/1.1 on both sides of the proxy, for the byte-level tests:
//! clients that write exact bytes on a TCP connection and read back exactly
//! what the proxy wrote; an upstream that answers with scripted bytes and
//! records which connection carried which request.
//!
//! Included with `#[path = "support/wire.rs"] mod wire;` next to
//! `mod support;` and `#[path = "support/upstream.rs"] mod upstream;`.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::upstream::{find, Front};

/// Bounds every wait for bytes or events, so that a missing byte fails the
/// test instead of hanging it. Never reached when things work.
pub const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Messages on the wire

/// A field line: the name as sent, the value without surrounding whitespace.
pub type Field = (String, Vec<u8>);

/// One message head as it crossed the wire.
#[derive(Debug, Clone)]
pub struct Head {
    /// Request line or status line.
    pub start: String,
    pub fields: Vec<Field>,
}

impl Head {
    /// Parses a head that ends with its blank line.
    pub fn parse(raw: &[u8]) -> Head {
        let text = &raw[..raw.len() - 4];
        let mut lines = text
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let start = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
        let fields = lines.map(parse_field).collect();
        Head { start, fields }
    }

    pub fn status(&self) -> u16 {
        self.start
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status code in {:?}", self.start))
    }

    /// Every value of `name` (case-insensitive), in order.
    pub fn all(&self, name: &str) -> Vec<&[u8]> {
        self.fields
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    /// The one value of `name` as text; `None` when absent, a panic when repeated.
    pub fn get(&self, name: &str) -> Option<&str> {
        let all = self.all(name);
        assert!(all.len() <= 1, "{name} repeated in {self:?}");
        all.first()
            .map(|v| std::str::from_utf8(v).expect("an ASCII value"))
    }

    pub fn has(&self, name: &str) -> bool {
        !self.all(name).is_empty()
    }

    /// Whether the comma-separated values of `name` list `token`.
    pub fn lists(&self, name: &str, token: &str) -> bool {
        self.all(name)
            .iter()
            .flat_map(|v| v.split(|&b| b == b','))
            .any(|t| trim(t).eq_ignore_ascii_case(token.as_bytes()))
    }
}

pub fn parse_field(line: &[u8]) -> Field {
    let colon = line.iter().position(|&b| b == b':').unwrap_or_else(|| {
        panic!(
            "a field line without a colon: {:?}",
            String::from_utf8_lossy(line)
        )
    });
    (
        String::from_utf8_lossy(&line[..colon]).into_owned(),
        trim(&line[colon + 1..]).to_vec(),
    )
}

pub fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !c.is_ascii_whitespace());
    let end = b.iter().rposition(|c| !c.is_ascii_whitespace());
    match (start, end) {
        (Some(s), Some(e)) => &b[s..=e],
        _ => &[],
    }
}

pub fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// How a response body was delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Framing {
    /// No body: HEAD, 1xx, 204, 304.
    None,
    Length,
    Chunked,
    /// Until the connection closed.
    Close,
}

#[derive(Debug)]
pub struct Resp {
    pub head: Head,
    pub body: Vec<u8>,
    pub framing: Framing,
    pub trailers: Vec<Field>,
}

impl Resp {
    pub fn status(&self) -> u16 {
        self.head.status()
    }

    pub fn text(&self) -> String {
        lossy(&self.body)
    }
}

/// One side of a TCP connection, with the bytes read but not yet consumed.
pub struct Wire {
    pub s: TcpStream,
    pub buf: Vec<u8>,
    /// How long a read may wait; `None` on the upstream side, whose
    /// connections wait for the proxy for as long as the test runs.
    pub limit: Option<Duration>,
}

impl Wire {
    pub async fn connect(addr: std::net::SocketAddr) -> Wire {
        Wire {
            s: TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
            limit: Some(WAIT),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("write");
    }

    /// Reads more bytes; 0 when the peer has closed (a reset counts as a close).
    pub async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        let read = self.s.read(&mut chunk);
        let n = match self.limit {
            Some(limit) => tokio::time::timeout(limit, read).await.unwrap_or_else(|_| {
                panic!(
                    "no byte and no close within {limit:?}; unread: {:?}",
                    lossy(&self.buf)
                )
            }),
            None => read.await,
        }
        .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// The next head; `None` when the peer closed before sending a byte of it.
    pub async fn head(&mut self) -> Option<Head> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                let raw: Vec<u8> = self.buf.drain(..i + 4).collect();
                return Some(Head::parse(&raw));
            }
            if self.fill().await == 0 {
                assert!(
                    self.buf.is_empty(),
                    "closed inside a head: {:?}",
                    lossy(&self.buf)
                );
                return None;
            }
        }
    }

    pub async fn exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            if self.fill().await == 0 {
                panic!("closed after {} of {n} bytes", self.buf.len());
            }
        }
        self.buf.drain(..n).collect()
    }

    /// A line, without its CRLF.
    pub async fn line(&mut self) -> Vec<u8> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                return line[..i].to_vec();
            }
            if self.fill().await == 0 {
                panic!("closed inside a line: {:?}", lossy(&self.buf));
            }
        }
    }

    /// A chunked body, decoded strictly: payload and trailer fields.
    pub async fn chunked(&mut self) -> (Vec<u8>, Vec<Field>) {
        let mut body = Vec::new();
        loop {
            let line = self.line().await;
            let size = line.split(|&b| b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(trim(size))
                .ok()
                .and_then(|s| usize::from_str_radix(s, 16).ok())
                .unwrap_or_else(|| panic!("bad chunk size line {:?}", lossy(&line)));
            if size == 0 {
                break;
            }
            body.extend(self.exact(size).await);
            assert_eq!(self.exact(2).await, b"\r\n", "a chunk not ended by CRLF");
        }
        let mut trailers = Vec::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                return (body, trailers);
            }
            trailers.push(parse_field(&line));
        }
    }

    /// Everything until the peer closes.
    pub async fn rest(&mut self) -> Vec<u8> {
        while self.fill().await > 0 {}
        std::mem::take(&mut self.buf)
    }

    /// Whether the peer closes now, with no further byte.
    pub async fn closes(&mut self) -> bool {
        self.rest().await.is_empty()
    }

    /// The next response to a request with `method`, framed as RFC 9112
    /// section 6.3 says.
    pub async fn response_to(&mut self, method: &str) -> Resp {
        let head = self.head().await.expect("a response, not a close");
        let status = head.status();
        let (framing, body, trailers) =
            if method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304 {
                (Framing::None, Vec::new(), Vec::new())
            } else if head.lists("transfer-encoding", "chunked") {
                let (body, trailers) = self.chunked().await;
                (Framing::Chunked, body, trailers)
            } else if let Some(n) = head.get("content-length") {
                let n = n.parse().expect("a numeric Content-Length");
                (Framing::Length, self.exact(n).await, Vec::new())
            } else {
                (Framing::Close, self.rest().await, Vec::new())
            };
        Resp {
            head,
            body,
            framing,
            trailers,
        }
    }

    pub async fn response(&mut self) -> Resp {
        self.response_to("GET").await
    }

    /// The final response, after any interim (1xx) ones.
    pub async fn final_response(&mut self) -> Resp {
        loop {
            let resp = self.response().await;
            if !(100..200).contains(&resp.status()) {
                return resp;
            }
        }
    }
}

/// A GET of `path` on the proxy, keep-alive, with `extra` field lines.
pub fn get(front: &Front, path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\n{extra}\r\n",
        front.proxy
    )
    .into_bytes()
}

/// `n` bytes that are not all alike, so a byte out of place shows.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// A 200 with a `Content-Length` body.
pub fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------
// A raw-TCP upstream

/// A request as it reached the upstream.
#[derive(Debug)]
pub struct Seen {
    /// Which upstream connection carried it, counting from 1.
    pub conn: usize,
    pub head: Head,
    pub body: Vec<u8>,
    /// The body came chunked (else by `Content-Length`, or there was none).
    pub chunked: bool,
}

/// What the upstream does after writing an answer.
#[derive(Clone, Copy, PartialEq)]
pub enum Then {
    KeepAlive,
    Close,
}

/// Who closed an upstream connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Closer {
    Proxy,
    Upstream,
}

/// Scripted answers over raw TCP on loopback: each request gets the bytes
/// its handler returns, written as they are.
pub struct RawUp {
    pub addr: std::net::SocketAddr,
    pub requests: mpsc::UnboundedReceiver<Seen>,
    pub closes: mpsc::UnboundedReceiver<(usize, Closer)>,
    /// Bumped to make every idle connection close (see [`RawUp::close_idle`]).
    pub kill: watch::Sender<u64>,
}

impl RawUp {
    pub async fn start<H>(handler: H) -> RawUp
    where
        H: Fn(&Seen) -> (Vec<u8>, Then) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (req_tx, requests) = mpsc::unbounded_channel();
        let (close_tx, closes) = mpsc::unbounded_channel();
        let (kill, _) = watch::channel(0);
        let killed = kill.clone();
        let handler = Arc::new(handler);
        let count = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let conn = count.fetch_add(1, Ordering::SeqCst) + 1;
                let (handler, req_tx, close_tx) =
                    (handler.clone(), req_tx.clone(), close_tx.clone());
                let mut kill = killed.subscribe();
                tokio::spawn(async move {
                    let mut wire = Wire {
                        s,
                        buf: Vec::new(),
                        limit: None,
                    };
                    loop {
                        let idle = wire.buf.is_empty();
                        let head = tokio::select! {
                            h = wire.head() => h,
                            _ = kill.changed(), if idle => {
                                let _ = wire.s.shutdown().await;
                                let _ = close_tx.send((conn, Closer::Upstream));
                                return;
                            }
                        };
                        let Some(head) = head else {
                            let _ = close_tx.send((conn, Closer::Proxy));
                            return;
                        };
                        let chunked = head.lists("transfer-encoding", "chunked");
                        let body = if chunked {
                            wire.chunked().await.0
                        } else if let Some(n) = head.get("content-length") {
                            wire.exact(n.parse().expect("a numeric Content-Length"))
                                .await
                        } else {
                            Vec::new()
                        };
                        let seen = Seen {
                            conn,
                            head,
                            body,
                            chunked,
                        };
                        let (answer, then) = handler(&seen);
                        let _ = req_tx.send(seen);
                        if wire.s.write_all(&answer).await.is_err() {
                            return;
                        }
                        if then == Then::Close {
                            let _ = wire.s.shutdown().await;
                            let _ = close_tx.send((conn, Closer::Upstream));
                            return;
                        }
                    }
                });
            }
        });
        RawUp {
            addr,
            requests,
            closes,
            kill,
        }
    }

    /// An upstream answering every request with the same bytes.
    pub async fn always(answer: &[u8], then: Then) -> RawUp {
        let answer = answer.to_vec();
        RawUp::start(move |_| (answer.clone(), then)).await
    }

    pub fn url(&self) -> String {
        format!("http://{}/base/", self.addr)
    }

    /// The next request to arrive.
    pub async fn request(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.requests.recv())
            .await
            .expect("a request reaches the upstream")
            .expect("the upstream is running")
    }

    /// The next connection to close, and who closed it.
    pub async fn closed(&mut self) -> (usize, Closer) {
        tokio::time::timeout(WAIT, self.closes.recv())
            .await
            .expect("an upstream connection closes")
            .expect("the upstream is running")
    }

    /// The upstream closes every connection that is waiting for a request,
    /// as a server whose keep-alive timeout fired.
    pub fn close_idle(&self) {
        self.kill.send_modify(|n| *n += 1);
    }

    pub fn no_more_requests(&mut self) {
        if let Ok(seen) = self.requests.try_recv() {
            panic!("an unexpected request reached the upstream: {seen:?}");
        }
    }
}

/// A sidecar in front of a raw upstream.
pub async fn front(up: &RawUp) -> Front {
    Front::start(&up.url(), "").await
}

/// Writes `request` while reading whatever comes back until the proxy
/// closes (it may answer and close before the request is all written).
pub async fn exchange_until_close(addr: std::net::SocketAddr, request: Vec<u8>) -> Vec<u8> {
    let (mut rd, mut wr) = TcpStream::connect(addr).await.unwrap().into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&request).await;
        wr
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, rd.read_to_end(&mut out))
        .await
        .expect("the proxy answers and closes");
    drop(writer.await);
    out
}

pub fn status_of(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|&b| b == b'\r').next()?;
    std::str::from_utf8(line)
        .ok()?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}
