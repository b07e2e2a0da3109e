//! Built-in stand-ins for the token endpoint and the backoffice API, on
//! loopback. `token-sidecar demo` runs against them, the soak drives them, and
//! the tests (through `tests/support/`) script them.
//!
//! They share one [`World`]: tokens the fake token endpoint issues are the
//! ones the fake backoffice accepts, so expiry and revocation behave as they
//! do between a real authorization server and its resource server.
//! PaymentIQ-like defaults: Spring-style error bodies, parameters accepted in
//! the query or a form body, HTTP Basic client authentication. The
//! client_credentials grant (RFC 6749 4.4) is answered too, without a
//! refresh token unless [`WorldState::refresh_token_with_client_credentials`]
//! says otherwise.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;
use tokio::net::TcpListener;

use crate::proxy::body::ProxyBody;
use crate::serve::{ServeOptions, Server};

/// A scripted answer that replaces the next normal one.
#[derive(Debug, Clone)]
pub struct Scripted {
    pub status: u16,
    pub body: String,
    pub content_type: &'static str,
    /// Wait this long before answering (to provoke timeouts).
    pub delay: Duration,
}

impl Scripted {
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Scripted {
            status,
            body: body.to_string(),
            content_type: "application/json",
            delay: Duration::ZERO,
        }
    }

    /// A non-JSON answer, e.g. a gateway's HTML error page.
    pub fn text(status: u16, content_type: &'static str, body: &str) -> Self {
        Scripted {
            status,
            body: body.to_owned(),
            content_type,
            delay: Duration::ZERO,
        }
    }

    /// This answer, given only after `delay` (a hang when `delay` is longer
    /// than the client waits).
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// A fault the fake token endpoint answers *every* request with (after the
/// script) until it is cleared: an outage, as opposed to a one-off answer.
#[derive(Debug, Clone)]
pub enum Fault {
    /// This answer, every time (with its delay: a hang).
    Answer(Scripted),
    /// `200` with a body of `bytes` spaces, streamed in 64 KiB chunks that
    /// share one buffer (the fake holds 64 KiB whatever the size); with
    /// `chunked`, no `Content-Length` announces the size.
    Flood { bytes: u64, chunked: bool },
}

/// A token request as the fake token endpoint saw it on the wire.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    /// Path and raw query.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// Parameters from the query and a form body, decoded.
    pub params: Vec<(String, String)>,
}

impl SeenRequest {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone)]
struct Issued {
    expires: Instant,
    revoked: bool,
}

/// Mutable state of the fake servers; tests change it through [`World::with`].
#[derive(Debug)]
pub struct WorldState {
    pub client_id: String,
    pub client_secret: String,
    pub username: String,
    pub password: String,
    /// `expires_in` of issued tokens, in seconds (fractions allowed).
    pub expires_in: f64,
    /// Issue a refresh token with the password grant.
    pub issue_refresh_token: bool,
    /// Issue a refresh token with the client_credentials grant (RFC 6749
    /// 4.4.3 says it should not be; some servers do).
    pub refresh_token_with_client_credentials: bool,
    /// Issue a new refresh token on each refresh and revoke the old one.
    pub rotate_refresh_token: bool,
    /// Spring-style: one token per client and user; the password grant
    /// returns the live token, a refresh revokes it.
    pub one_token_per_user: bool,
    /// The backoffice checks tokens (401 `invalid_token` otherwise).
    pub check_tokens: bool,
    /// Answers to give before normal ones, in order.
    pub script: VecDeque<Scripted>,
    /// While set, every token request (once the script is used up) gets this.
    pub fault: Option<Fault>,
    /// Edits every successful token answer (drop `expires_in`, change
    /// `token_type`, ...) without changing the token the backoffice accepts.
    pub edit_answer: Option<fn(&mut serde_json::Value)>,
    /// Issue access tokens as unsigned JWTs carrying their `exp`.
    pub jwt_access_tokens: bool,
    /// When the last access token was issued.
    pub last_issued_at: Option<Instant>,
    pub seen: Vec<SeenRequest>,
    pub password_grants: u64,
    pub client_credentials_grants: u64,
    pub refresh_grants: u64,
    pub backoffice_requests: u64,
    pub backoffice_401s: u64,
    /// 401s for a token the backoffice issued that had expired: the sidecar
    /// must never send one.
    pub backoffice_401_expired: u64,
    /// 401s for a token revoked before its expiry.
    pub backoffice_401_revoked: u64,
    access: HashMap<String, Issued>,
    refresh: HashMap<String, Issued>,
    current_for_user: Option<(String, Option<String>)>,
    counter: u64,
}

/// Shared state of a fake token endpoint and a fake backoffice.
pub struct World(Mutex<WorldState>);

impl World {
    pub fn new(expires_in: f64) -> Arc<Self> {
        Arc::new(World(Mutex::new(WorldState {
            client_id: "demo-client".into(),
            client_secret: "demo-secret".into(),
            username: "demo-user".into(),
            password: "demo-password".into(),
            expires_in,
            issue_refresh_token: true,
            refresh_token_with_client_credentials: false,
            rotate_refresh_token: true,
            one_token_per_user: false,
            check_tokens: true,
            script: VecDeque::new(),
            fault: None,
            edit_answer: None,
            jwt_access_tokens: false,
            last_issued_at: None,
            seen: Vec::new(),
            password_grants: 0,
            client_credentials_grants: 0,
            refresh_grants: 0,
            backoffice_requests: 0,
            backoffice_401s: 0,
            backoffice_401_expired: 0,
            backoffice_401_revoked: 0,
            access: HashMap::new(),
            refresh: HashMap::new(),
            current_for_user: None,
            counter: 0,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, WorldState> {
        // A test thread that panicked while holding the lock leaves usable state.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads or changes the state.
    pub fn with<T>(&self, f: impl FnOnce(&mut WorldState) -> T) -> T {
        f(&mut self.lock())
    }

    /// What a config needs to log in: client id and secret, username and
    /// password, as the fake currently accepts them.
    pub fn login(&self) -> (String, String, String, String) {
        self.with(|w| {
            (
                w.client_id.clone(),
                w.client_secret.clone(),
                w.username.clone(),
                w.password.clone(),
            )
        })
    }

    /// Revokes every access token issued so far (the backoffice answers 401).
    pub fn revoke_access_tokens(&self) {
        self.with(|w| w.access.values_mut().for_each(|t| t.revoked = true));
    }

    /// Every access and refresh token issued so far (the leak test looks for
    /// them in the sidecar's output).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.with(|w| w.access.keys().chain(w.refresh.keys()).cloned().collect())
    }

    /// Revokes every refresh token issued so far.
    pub fn revoke_refresh_tokens(&self) {
        self.with(|w| w.refresh.values_mut().for_each(|t| t.revoked = true));
    }

    /// Checks a bearer token like a resource server; a rejection is counted
    /// by its reason.
    fn check_access(&self, token: &str) -> bool {
        self.with(|w| {
            let (valid, expired, revoked) = match w.access.get(token) {
                Some(t) if t.expires <= Instant::now() => (false, true, false),
                Some(t) => (!t.revoked, false, t.revoked),
                None => (false, false, false),
            };
            if !valid {
                w.backoffice_401s += 1;
                w.backoffice_401_expired += u64::from(expired);
                w.backoffice_401_revoked += u64::from(revoked);
            }
            valid
        })
    }

    fn token_answer(&self, req: &SeenRequest) -> (u16, serde_json::Value) {
        let mut w = self.lock();
        let client_ok = match basic_credentials(&req.headers) {
            // Spring compares the raw `id:secret`; RFC 6749 2.3.1 servers
            // form-decode both halves first. Accept either, as the sidecar
            // offers both (`client_auth = "basic"` and `"basic-rfc"`).
            Some((id, secret)) => {
                (id == w.client_id && secret == w.client_secret)
                    || (form_decode(&id) == w.client_id && form_decode(&secret) == w.client_secret)
            }
            None => {
                req.param("client_id") == Some(w.client_id.as_str())
                    && req.param("client_secret") == Some(w.client_secret.as_str())
            }
        };
        if !client_ok {
            return (
                401,
                json!({"error": "invalid_client", "error_description": "Bad client credentials"}),
            );
        }
        let now = Instant::now();
        match req.param("grant_type") {
            Some("password") => {
                if req.param("username") != Some(w.username.as_str())
                    || req.param("password") != Some(w.password.as_str())
                {
                    return (
                        400,
                        json!({"error": "invalid_grant", "error_description": "Bad credentials"}),
                    );
                }
                w.password_grants += 1;
                if w.one_token_per_user {
                    if let Some((at, rt)) = w.current_for_user.clone() {
                        if let Some(t) = w.access.get(&at).filter(|t| !t.revoked && t.expires > now)
                        {
                            let left = t.expires.duration_since(now).as_secs_f64();
                            return (200, token_json(&at, rt.as_deref(), left));
                        }
                    }
                }
                let issue_rt = w.issue_refresh_token;
                w.issue(issue_rt)
            }
            Some("client_credentials") => {
                w.client_credentials_grants += 1;
                let issue_rt = w.refresh_token_with_client_credentials;
                w.issue(issue_rt)
            }
            Some("refresh_token") => {
                let rt = req.param("refresh_token").unwrap_or_default().to_owned();
                let ok = w
                    .refresh
                    .get(&rt)
                    .is_some_and(|t| !t.revoked && t.expires > now);
                if !ok {
                    return (
                        400,
                        json!({"error": "invalid_grant", "error_description": format!("Invalid refresh token: {rt}")}),
                    );
                }
                w.refresh_grants += 1;
                if w.one_token_per_user {
                    // A refresh revokes the user's previous access token.
                    if let Some((at, _)) = w.current_for_user.clone() {
                        if let Some(t) = w.access.get_mut(&at) {
                            t.revoked = true;
                        }
                    }
                }
                if w.rotate_refresh_token {
                    if let Some(t) = w.refresh.get_mut(&rt) {
                        t.revoked = true;
                    }
                    w.issue(true)
                } else {
                    let (status, mut body) = w.issue(false);
                    if w.one_token_per_user {
                        if let Some((at, _)) = w.current_for_user.clone() {
                            w.current_for_user = Some((at, Some(rt.clone())));
                        }
                        body["refresh_token"] = json!(rt);
                    }
                    (status, body)
                }
            }
            _ => (400, json!({"error": "unsupported_grant_type"})),
        }
    }
}

impl WorldState {
    fn issue(&mut self, with_refresh: bool) -> (u16, serde_json::Value) {
        self.counter += 1;
        let n = self.counter;
        let now = Instant::now();
        let lifetime = Duration::from_secs_f64(self.expires_in.max(0.0));
        let at = if self.jwt_access_tokens {
            unsigned_jwt(n, lifetime)
        } else {
            format!("fake-access-{n}-{:016x}", fastrand::u64(..))
        };
        self.last_issued_at = Some(now);
        self.access.insert(
            at.clone(),
            Issued {
                expires: now + lifetime,
                revoked: false,
            },
        );
        let rt = with_refresh.then(|| {
            let rt = format!("fake-refresh-{n}-{:016x}", fastrand::u64(..));
            self.refresh.insert(
                rt.clone(),
                Issued {
                    expires: now + Duration::from_secs(86400),
                    revoked: false,
                },
            );
            rt
        });
        self.current_for_user = Some((at.clone(), rt.clone()));
        let mut answer = token_json(&at, rt.as_deref(), self.expires_in);
        if let Some(edit) = self.edit_answer {
            edit(&mut answer);
        }
        (200, answer)
    }
}

/// `header.payload.sig` with an `exp` claim `lifetime` from now; the
/// signature is a placeholder (the sidecar reads `exp` without verifying).
fn unsigned_jwt(n: u64, lifetime: Duration) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        + lifetime;
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(
        json!({"exp": exp.as_secs(), "jti": format!("{n}-{:016x}", fastrand::u64(..))}).to_string(),
    );
    format!("{header}.{claims}.fake-signature")
}

fn token_json(at: &str, rt: Option<&str>, expires_in: f64) -> serde_json::Value {
    let mut v = json!({
        "access_token": at,
        "token_type": "bearer",
        "expires_in": if expires_in.fract() == 0.0 { json!(expires_in as i64) } else { json!(expires_in) },
        "scope": "default",
        "jti": format!("{:016x}", fastrand::u64(..)),
    });
    if let Some(rt) = rt {
        v["refresh_token"] = json!(rt);
    }
    v
}

fn basic_credentials(h: &HeaderMap) -> Option<(String, String)> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let b64 = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))?;
    let raw = String::from_utf8(STANDARD.decode(b64.trim()).ok()?).ok()?;
    let (id, secret) = raw.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

/// `application/x-www-form-urlencoded` decoding of one value (`+` is a space).
fn form_decode(s: &str) -> String {
    let plus_as_space = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus_as_space)
        .decode_utf8_lossy()
        .into_owned()
}

/// A fake server on `127.0.0.1:0`; stops when dropped.
pub struct FakeServer {
    pub addr: SocketAddr,
    server: Option<Server>,
}

impl FakeServer {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            tokio::spawn(s.shutdown(Duration::ZERO));
        }
    }
}

fn fake_opts() -> ServeOptions {
    ServeOptions {
        max_connections: 10_000,
        idle_timeout: Duration::from_secs(60),
        max_header_bytes: 64 * 1024,
        http2: true,
        write_stall_timeout: None,
    }
}

async fn serve<H, F>(addr: SocketAddr, handler: H) -> std::io::Result<FakeServer>
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let mut server = Server::new();
    server.spawn(listener, fake_opts(), handler);
    Ok(FakeServer {
        addr,
        server: Some(server),
    })
}

/// The fake token endpoint, answering `POST /oauth/token` (any path, in fact).
pub async fn token_endpoint(world: Arc<World>, addr: SocketAddr) -> std::io::Result<FakeServer> {
    serve(addr, move |req, _| {
        let world = world.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let mut params: Vec<(String, String)> = parts
                .uri
                .query()
                .map(|q| {
                    url::form_urlencoded::parse(q.as_bytes())
                        .into_owned()
                        .collect()
                })
                .unwrap_or_default();
            params.extend(url::form_urlencoded::parse(&body).into_owned());
            let seen = SeenRequest {
                method: parts.method.to_string(),
                target: parts
                    .uri
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                headers: parts.headers,
                body: body.to_vec(),
                params,
            };
            let scripted = world.with(|w| {
                w.seen.push(seen.clone());
                w.script
                    .pop_front()
                    .map(Fault::Answer)
                    .or_else(|| w.fault.clone())
            });
            match scripted {
                Some(Fault::Answer(s)) => {
                    tokio::time::sleep(s.delay).await;
                    return respond(s.status, s.content_type, Bytes::from(s.body));
                }
                Some(Fault::Flood { bytes, chunked }) => return flood(bytes, chunked),
                None => {}
            }
            let (status, body) = world.token_answer(&seen);
            respond(
                status,
                "application/json;charset=UTF-8",
                Bytes::from(body.to_string()),
            )
        }
    })
    .await
}

/// The fake backoffice API: checks the bearer token like a resource server
/// and echoes the request as JSON.
pub async fn backoffice(world: Arc<World>, addr: SocketAddr) -> std::io::Result<FakeServer> {
    serve(addr, move |req, _| {
        let world = world.clone();
        async move {
            let token = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default()
                .to_owned();
            let check = world.with(|w| {
                w.backoffice_requests += 1;
                w.check_tokens
            });
            if check && !world.check_access(&token) {
                let mut r = respond(
                    401,
                    "application/json",
                    Bytes::from(json!({"error": "invalid_token", "error_description": "Invalid access token"}).to_string()),
                );
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\", error_description=\"Invalid access token\""),
                );
                return r;
            }
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let headers: serde_json::Map<String, serde_json::Value> = parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), json!(String::from_utf8_lossy(v.as_bytes()))))
                .collect();
            let echo = json!({
                "method": parts.method.as_str(),
                "path": parts.uri.path(),
                "query": parts.uri.query(),
                "headers": headers,
                "body_bytes": body.len(),
            });
            respond(200, "application/json", Bytes::from(echo.to_string()))
        }
    })
    .await
}

/// A `200` whose body is `bytes` spaces (valid JSON white space, never a
/// complete document), all chunks sharing one 64 KiB buffer.
fn flood(bytes: u64, chunked: bool) -> Response<ProxyBody> {
    const CHUNK: usize = 64 * 1024;
    static SPACES: [u8; CHUNK] = [b' '; CHUNK];
    let full = Bytes::from_static(&SPACES);
    let mut chunks = vec![full.clone(); (bytes / CHUNK as u64) as usize];
    chunks.push(full.slice(..(bytes % CHUNK as u64) as usize));
    let mut r = Response::new(ProxyBody::chunks(chunks));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if chunked {
        // An explicit Transfer-Encoding keeps hyper from announcing the length.
        r.headers_mut().insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    r
}

fn respond(status: u16, content_type: &'static str, body: Bytes) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}
