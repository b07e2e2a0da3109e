//! Test-only upstreams for the proxy data-path tests: a scriptable HTTP
//! server (HTTP/1.1 and h2c, or TLS with ALPN h2/http1.1 under a test CA)
//! that records what reached it, a body the test feeds frame by frame, a
//! throwaway certificate authority, and a raw HTTP/1.1 client for requests
//! that ordinary clients would normalise.
//!
//! Included with `#[path = "support/upstream.rs"] mod upstream;` by the
//! `proxy_*` test files, next to `mod support;`.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query exactly as received.
    pub target: String,
    pub version: Version,
    pub headers: HeaderMap,
}

/// A response body: whole, empty, or fed frame by frame through a channel.
pub enum TestBody {
    Full(Option<Bytes>),
    /// Frames as the test sends them; ends when the sender is dropped.
    Channel(mpsc::Receiver<Frame<Bytes>>),
    /// `n` bytes of `fill`, produced in 64 KiB chunks as the reader pulls.
    Generated {
        left: u64,
        chunk: Bytes,
    },
}

impl TestBody {
    pub fn text(s: impl Into<String>) -> Self {
        TestBody::Full(Some(Bytes::from(s.into())))
    }

    pub fn empty() -> Self {
        TestBody::Full(None)
    }

    /// A body and the sender that feeds it.
    pub fn channel() -> (mpsc::Sender<Frame<Bytes>>, Self) {
        let (tx, rx) = mpsc::channel(4);
        (tx, TestBody::Channel(rx))
    }

    pub fn generated(len: u64) -> Self {
        TestBody::Generated {
            left: len,
            chunk: Bytes::from(vec![b'x'; 64 * 1024]),
        }
    }
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut *self {
            TestBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            TestBody::Channel(rx) => rx.poll_recv(cx).map(|f| f.map(Ok)),
            TestBody::Generated { left, chunk } => {
                if *left == 0 {
                    return Poll::Ready(None);
                }
                let n = (*left).min(chunk.len() as u64);
                *left -= n;
                Poll::Ready(Some(Ok(Frame::data(chunk.slice(..n as usize)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            TestBody::Full(b) => b.is_none(),
            TestBody::Channel(_) => false,
            TestBody::Generated { left, .. } => *left == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            TestBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            TestBody::Channel(_) => SizeHint::default(),
            TestBody::Generated { left, .. } => SizeHint::with_exact(*left),
        }
    }
}

pub type BoxFuture = Pin<Box<dyn Future<Output = Response<TestBody>> + Send>>;
type Handler = Arc<dyn Fn(Request<Incoming>) -> BoxFuture + Send + Sync>;

/// A scriptable upstream on `127.0.0.1:0`; stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// Plain HTTP/1.1 and h2c, answering every request with `handler`.
    pub async fn start<F, Fut>(handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        Self::start_inner(handler, None).await
    }

    /// TLS with ALPN `h2` and `http/1.1`, presenting `cert`.
    pub async fn start_tls<F, Fut>(cert: &Leaf, handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        Self::start_inner(handler, Some(cert.acceptor())).await
    }

    /// TLS with ALPN `http/1.1` only (no HTTP/2), presenting `cert`.
    pub async fn start_tls_http1<F, Fut>(cert: &Leaf, handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        Self::start_inner(handler, Some(cert.acceptor_with(&[b"http/1.1"]))).await
    }

    async fn start_inner<F, Fut>(handler: F, tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(move |req| Box::pin(handler(req)));
        let recorder = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                let recorder = recorder.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        recorder.lock().unwrap().push(Seen {
                            method: req.method().to_string(),
                            target: req
                                .uri()
                                .path_and_query()
                                .map(|p| p.as_str().to_owned())
                                .unwrap_or_default(),
                            version: req.version(),
                            headers: req.headers().clone(),
                        });
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                                .await;
                        }
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(stream).await {
                                let _ = builder
                                    .serve_connection_with_upgrades(TokioIo::new(s), service)
                                    .await;
                            }
                        }
                    }
                });
            }
        });
        Upstream { addr, seen, task }
    }

    /// An upstream that answers 200 with `ok` to everything.
    pub async fn ok() -> Upstream {
        Self::start(|_| async { Response::new(TestBody::text("ok")) }).await
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The one request seen so far (panics unless exactly one).
    pub fn only(&self) -> Seen {
        let seen = self.seen();
        assert_eq!(seen.len(), 1, "expected one upstream request, saw {seen:?}");
        seen.into_iter().next().unwrap()
    }
}

/// A response with `status` and the given headers.
pub fn response(status: u16, headers: &[(&str, &str)], body: TestBody) -> Response<TestBody> {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        r.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    r
}

/// A throwaway certificate authority.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A server certificate issued by a [`TestCa`].
pub struct Leaf {
    pub cert_der: rustls_pki_types::CertificateDer<'static>,
    pub key_der: Vec<u8>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "token-sidecar test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes the CA certificate as PEM into `dir` and returns its path.
    pub fn write_pem(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("test-ca.pem");
        std::fs::write(&path, self.pem()).unwrap();
        path
    }

    /// A server certificate for `names` (`"127.0.0.1"` becomes an IP SAN).
    pub fn issue(&self, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }
}

impl Leaf {
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.acceptor_with(&[b"h2", b"http/1.1"])
    }

    pub fn acceptor_with(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(self.key_der.clone().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.cert_der.clone()], key)
            .unwrap();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    }
}

/// A raw HTTP/1.1 response: status, head lines, body as received.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The value of the first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    pub fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `request` (raw bytes, which should say `Connection: close`) and
/// reads the whole answer until the server closes.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("the server closes within 10 s")
        .expect("read");
    parse_response(&buf)
}

/// Splits a raw response into head and body (the body is left as sent,
/// chunked framing included).
pub fn parse_response(buf: &[u8]) -> RawResponse {
    let end = find(buf, b"\r\n\r\n").unwrap_or_else(|| {
        panic!(
            "no complete response head in {:?}",
            String::from_utf8_lossy(buf)
        )
    });
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    RawResponse {
        status,
        head,
        body: buf[end + 4..].to_vec(),
    }
}

/// Reads one response head (through the blank line) from `s`, byte by byte
/// so nothing after it is consumed.
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("a response head within 10 s")
            .expect("read");
        assert!(
            n == 1,
            "connection closed inside a head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).expect("ASCII head")
}

/// Reads exactly `n` bytes.
pub async fn read_exact<S: AsyncRead + Unpin>(s: &mut S, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .expect("data within 10 s")
        .expect("read");
    buf
}

/// Writes all of `data`.
pub async fn write_all<S: AsyncWrite + Unpin>(s: &mut S, data: &[u8]) {
    s.write_all(data).await.expect("write");
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A sidecar (with the fake token endpoint) in front of any upstream.
pub struct Front {
    pub world: Arc<token_sidecar::fake::World>,
    pub auth: token_sidecar::fake::FakeServer,
    pub sidecar: token_sidecar::app::Running,
    pub proxy: SocketAddr,
}

impl Front {
    /// Starts a sidecar for `upstream` (a base URL) with `overrides` (TOML)
    /// and waits for its first token.
    pub async fn start(upstream: &str, overrides: &str) -> Front {
        let world = token_sidecar::fake::World::new(300.0);
        let auth =
            token_sidecar::fake::token_endpoint(world.clone(), "127.0.0.1:0".parse().unwrap())
                .await
                .expect("fake token endpoint");
        let config =
            crate::support::config_for(&world, &auth.url("/oauth/token"), upstream, overrides);
        let sidecar = crate::support::start_sidecar(&config).await;
        sidecar
            .token("default")
            .expect("profile default")
            .wait_usable(0, Duration::from_secs(10))
            .await
            .expect("a token within 10 s");
        Front {
            proxy: sidecar.proxy_addrs[0],
            world,
            auth,
            sidecar,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    /// The `Authorization` value the sidecar injects now.
    pub fn bearer(&self) -> String {
        let (_, v) = self
            .sidecar
            .token("default")
            .expect("profile default")
            .usable()
            .expect("a usable token");
        v.to_str().unwrap().to_owned()
    }

    /// A raw GET of `target` with `Connection: close` and `extra` header lines.
    pub async fn get_raw(&self, target: &str, extra: &str) -> RawResponse {
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\n{extra}Connection: close\r\n\r\n",
            self.proxy
        );
        raw(self.proxy, req.as_bytes()).await
    }
}
