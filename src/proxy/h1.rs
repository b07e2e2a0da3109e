//! HTTP/1.1 message heads and framing for the fast lane ([`super::lane`]):
//! pure functions over bytes, parsed with `httparse` (hyper's own parser).
//!
//! The lane handles the plain exchanges that make up almost all of the
//! traffic; whatever these functions do not recognise as plain
//! ([`Parse::Fallback`]) goes to hyper with its bytes untouched, so every
//! rule here only has to be right for the cases it accepts.
//!
//! Heads are kept as byte offsets into the buffer they were read into
//! ([`Span`]), so a request head can be written again (a replay after a 401,
//! with a new token) without parsing or copying it twice.

use std::net::IpAddr;

use super::headers::HOP_BY_HOP;

/// Header fields per head, as hyper allows; more goes to hyper (431).
pub const MAX_HEADERS: usize = 100;

/// Bytes `start..end` of the buffer a head was parsed from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    start: u32,
    end: u32,
}

impl Span {
    fn of(buf: &[u8], part: &[u8]) -> Span {
        let start = part.as_ptr() as usize - buf.as_ptr() as usize;
        Span {
            start: start as u32,
            end: (start + part.len()) as u32,
        }
    }

    pub fn get(self, buf: &[u8]) -> &[u8] {
        &buf[self.start as usize..self.end as usize]
    }
}

/// What parsing a head found.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// More bytes are needed.
    Partial,
    /// A complete head the lane handles.
    Ready,
    /// Not for the lane (HTTP/1.0, `Expect`, an upgrade, a chunked request
    /// body, a malformed or oversized head, HTTP/2's preface): hyper serves
    /// the connection from here on, and answers errors in its own way.
    Fallback,
}

/// A client's request head, as offsets into the connection's read buffer.
#[derive(Debug, Default)]
pub struct RequestHead {
    /// Bytes of the head, final CRLF included; the body starts here.
    pub len: usize,
    pub method: Span,
    /// The raw path, without the query.
    pub path: Span,
    pub query: Option<Span>,
    pub content_length: u64,
    /// The client sent `Connection: close`.
    pub close: bool,
    /// The client sent `TE: trailers`: the one `TE` forwarded.
    pub trailers: bool,
    pub host: Option<Span>,
    pub request_id: Option<Span>,
    /// The first `X-Forwarded-For`, for `proxy.forwarded_headers`.
    pub forwarded_for: Option<Span>,
    /// Fields forwarded as they came (name, value): everything but
    /// hop-by-hop fields, credentials, `Host`, `X-Request-Id`, and the
    /// `X-Forwarded-*` the sidecar writes itself.
    pub fields: Vec<(Span, Span)>,
}

/// Parses a request head at the start of `buf` into `head` (its field list
/// is reused from one request to the next).
pub fn parse_request(buf: &[u8], head: &mut RequestHead, forwarded: bool) -> Parse {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut storage);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::Fallback,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parse::Fallback;
    };
    if method == "CONNECT" || !target.starts_with('/') || !hyper_takes_as_is(target) {
        return Parse::Fallback;
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(Span::of(buf, q.as_bytes()))),
        None => (target, None),
    };
    let listed = ConnectionTokens::of(req.headers);
    if listed.upgrade {
        return Parse::Fallback;
    }
    *head = RequestHead {
        len,
        method: Span::of(buf, method.as_bytes()),
        path: Span::of(buf, path.as_bytes()),
        query,
        close: listed.close,
        fields: std::mem::take(&mut head.fields),
        ..RequestHead::default()
    };
    head.fields.clear();
    let mut content_length = None;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value;
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        if is("content-length") {
            match (content_length, parse_length(value)) {
                (None, Some(n)) => content_length = Some(n),
                _ => return Parse::Fallback, // invalid or repeated
            }
            // Forwarded even if `Connection` lists it: it frames the body
            // sent after the head, which would otherwise be read upstream
            // as the next request.
            head.fields
                .push((Span::of(buf, name), Span::of(buf, value)));
            continue;
        } else if is("transfer-encoding") || is("expect") || is("upgrade") {
            return Parse::Fallback;
        } else if is("te") {
            head.trailers |= has_token(value, b"trailers");
            continue;
        } else if is("host") {
            head.host.get_or_insert(Span::of(buf, value));
            continue;
        } else if is("x-request-id") {
            head.request_id.get_or_insert(Span::of(buf, value));
            continue;
        } else if is("authorization") || is("proxy-authorization") {
            continue; // replaced by the sidecar's own
        } else if forwarded && is("x-forwarded-for") {
            head.forwarded_for.get_or_insert(Span::of(buf, value));
            continue;
        } else if forwarded && (is("x-forwarded-proto") || is("x-forwarded-host")) {
            continue;
        }
        if is_hop_by_hop(name) || listed.names(name) {
            continue;
        }
        head.fields
            .push((Span::of(buf, name), Span::of(buf, value)));
    }
    head.content_length = content_length.unwrap_or(0);
    if usize::try_from(head.content_length).is_err() {
        return Parse::Fallback; // a body longer than this machine can count
    }
    Parse::Ready
}

/// Whether hyper's URI parser (the `http` crate) takes an origin-form target
/// byte for byte. It refuses a few bytes httparse lets through (a 400) and
/// cuts a `#fragment` off (`/..#x` is then `/..`, a dot-segment): the lane
/// must not check, log and forward a path other than the hyper path's, so
/// such targets go to hyper.
fn hyper_takes_as_is(target: &str) -> bool {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    !path.bytes().any(|b| matches!(b, b'#' | b'<' | b'>' | b'`'))
        && !query
            .bytes()
            .any(|b| matches!(b, b'"' | b'#' | b'<' | b'>'))
}

/// What the upstream request head says besides the client's fields.
pub struct Upstream<'a> {
    /// Upstream base path, ending in `/`.
    pub base_path: &'a str,
    /// `Host` for the upstream.
    pub host: &'a [u8],
    pub bearer: &'a [u8],
    pub request_id: &'a [u8],
    /// The client's address, when `proxy.forwarded_headers` is on.
    pub forwarded: Option<IpAddr>,
}

/// Writes the head sent upstream for `head` (parsed from `buf`) to `out`.
pub fn write_request_head(out: &mut Vec<u8>, buf: &[u8], head: &RequestHead, up: &Upstream<'_>) {
    out.extend_from_slice(head.method.get(buf));
    out.push(b' ');
    out.extend_from_slice(up.base_path.as_bytes());
    let path = head.path.get(buf);
    let rest = &path[path.iter().take_while(|&&c| c == b'/').count()..];
    out.extend_from_slice(rest);
    if let Some(q) = head.query {
        out.push(b'?');
        out.extend_from_slice(q.get(buf));
    }
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(up.host);
    for (name, value) in &head.fields {
        field(out, name.get(buf), value.get(buf));
    }
    field(out, b"authorization", up.bearer);
    field(out, b"x-request-id", up.request_id);
    if head.trailers {
        field(out, b"te", b"trailers");
    }
    if let Some(ip) = up.forwarded {
        use std::io::Write;
        out.extend_from_slice(b"\r\nx-forwarded-for: ");
        if let Some(prev) = head.forwarded_for {
            out.extend_from_slice(prev.get(buf));
            out.extend_from_slice(b", ");
        }
        let _ = write!(out, "{ip}");
        field(out, b"x-forwarded-proto", b"http");
        if let Some(host) = head.host {
            field(out, b"x-forwarded-host", host.get(buf));
        }
    }
    out.extend_from_slice(b"\r\n\r\n");
}

/// `\r\nname: value` (each field ends where the next begins).
pub fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
}

/// How a response body is delimited (RFC 9112 6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body: a response to HEAD, 204, 304.
    Empty,
    Length(u64),
    /// Passed on as it comes, chunk framing and trailers included.
    Chunked,
    /// Until the upstream closes: the client connection closes after it.
    UntilClose,
}

/// An upstream response head.
#[derive(Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    pub reason: Span,
    pub framing: Framing,
    /// The upstream keeps the connection open after this response.
    pub reusable: bool,
    /// A `WWW-Authenticate` says `error="invalid_token"`.
    pub invalid_token: bool,
    /// `Location` or `Content-Location` is present (may need rewriting).
    pub has_location: bool,
    pub has_date: bool,
}

/// Why an upstream response head is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadResponse {
    #[error("malformed response head from the upstream")]
    Malformed(#[from] httparse::Error),
    #[error("response head from the upstream is too large")]
    TooLarge,
    #[error("invalid Content-Length from the upstream")]
    ContentLength,
    #[error("unexpected 101 Switching Protocols from the upstream")]
    Switching,
}

/// One step of reading an upstream response.
#[derive(Debug, PartialEq, Eq)]
pub enum ResponseParse {
    Partial,
    /// A 1xx interim response of this many bytes, to skip.
    Interim(usize),
    Final(ResponseHead),
}

/// Largest upstream response head accepted.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Parses the upstream response head at the start of `buf`; `fields` gets
/// the fields to pass to the client (name, value).
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
    fields: &mut Vec<(Span, Span)>,
) -> Result<ResponseParse, BadResponse> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut storage);
    let len = match resp.parse(buf)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial if buf.len() >= MAX_RESPONSE_HEAD => {
            return Err(BadResponse::TooLarge)
        }
        httparse::Status::Partial => return Ok(ResponseParse::Partial),
    };
    let status = resp.code.unwrap_or(0);
    if status == 101 {
        return Err(BadResponse::Switching);
    }
    if (100..200).contains(&status) {
        return Ok(ResponseParse::Interim(len));
    }
    let listed = ConnectionTokens::of(resp.headers);
    let mut head = ResponseHead {
        len,
        status,
        reason: resp
            .reason
            .map(|r| Span::of(buf, r.as_bytes()))
            .unwrap_or_default(),
        framing: Framing::UntilClose,
        reusable: if resp.version == Some(1) {
            !listed.close
        } else {
            listed.keep_alive
        },
        invalid_token: false,
        has_location: false,
        has_date: false,
    };
    let mut length = None;
    let mut chunked = None;
    fields.clear();
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        if is("content-length") {
            let n = parse_length(h.value).ok_or(BadResponse::ContentLength)?;
            if length.is_some_and(|m| m != n) {
                return Err(BadResponse::ContentLength);
            }
            length = Some(n);
            // Kept even if `Connection` lists it: the client frames the
            // body by it on a connection that stays open.
            fields.push((Span::of(buf, name), Span::of(buf, h.value)));
            continue;
        } else if is("transfer-encoding") {
            // Chunked only when it is the last coding (RFC 9112 6.3).
            chunked = Some(last_token(h.value).eq_ignore_ascii_case(b"chunked"));
            continue; // written again below when the body stays chunked
        } else if is("www-authenticate") {
            head.invalid_token |= says_invalid_token(h.value);
        } else if is("location") || is("content-location") {
            head.has_location = true;
        } else if is("date") {
            head.has_date = true;
        } else if is("x-request-id") {
            continue; // the sidecar's own goes back to the client
        }
        if is_hop_by_hop(name) || listed.names(name) {
            continue;
        }
        fields.push((Span::of(buf, name), Span::of(buf, h.value)));
    }
    head.framing = if head_request || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::UntilClose,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::UntilClose,
        }
    };
    if head.framing == Framing::UntilClose {
        head.reusable = false;
    }
    if chunked.is_some() && head.framing == Framing::Empty {
        head.reusable = false; // who knows what follows
    }
    if head.framing == Framing::Chunked && length.is_some() {
        // Both framings (RFC 9112 6.3): chunked wins, the length must not
        // reach the client, and the connection may be out of step.
        fields.retain(|(name, _)| !name.get(buf).eq_ignore_ascii_case(b"content-length"));
        head.reusable = false;
    }
    Ok(ResponseParse::Final(head))
}

/// Whether `WWW-Authenticate` says the token was refused (RFC 6750 3.1).
pub fn says_invalid_token(value: &[u8]) -> bool {
    let v = String::from_utf8_lossy(value).to_ascii_lowercase();
    v.contains("error=\"invalid_token\"") || v.contains("error=invalid_token")
}

/// A hop-by-hop field name: the one list both directions and both paths use.
fn is_hop_by_hop(name: &[u8]) -> bool {
    // Most names have a length none of these has: no comparison at all.
    matches!(name.len(), 2 | 7 | 10 | 16 | 17 | 18)
        && HOP_BY_HOP
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h.as_str().as_bytes()))
}

/// What the `Connection` fields of a head say.
struct ConnectionTokens<'a> {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    /// The field values, for the names they list.
    values: [&'a [u8]; 4],
    count: usize,
    /// More than four `Connection` fields: every field is checked the slow way.
    overflow: &'a [httparse::Header<'a>],
}

impl<'a> ConnectionTokens<'a> {
    fn of(headers: &'a [httparse::Header<'a>]) -> Self {
        let mut t = ConnectionTokens {
            close: false,
            keep_alive: false,
            upgrade: false,
            values: [&[]; 4],
            count: 0,
            overflow: &[],
        };
        for h in headers {
            if !h.name.eq_ignore_ascii_case("connection") {
                continue;
            }
            for token in tokens(h.value) {
                t.close |= token.eq_ignore_ascii_case(b"close");
                t.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                t.upgrade |= token.eq_ignore_ascii_case(b"upgrade");
            }
            if t.count < t.values.len() {
                t.values[t.count] = h.value;
                t.count += 1;
            } else {
                t.overflow = headers;
            }
        }
        t
    }

    /// Whether `Connection` lists `name`.
    fn names(&self, name: &[u8]) -> bool {
        let listed = |v: &[u8]| tokens(v).any(|t| t.eq_ignore_ascii_case(name));
        self.values[..self.count].iter().any(|v| listed(v))
            || self
                .overflow
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("connection") && listed(h.value))
    }
}

/// The comma-separated tokens of a field value, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&c| c == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    tokens(value).any(|t| t.eq_ignore_ascii_case(token))
}

fn last_token(value: &[u8]) -> &[u8] {
    tokens(value).last().unwrap_or(b"")
}

/// A `Content-Length` value: digits only (RFC 9110 8.6).
fn parse_length(value: &[u8]) -> Option<u64> {
    let v = value.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Finds where a chunked body ends while its bytes are passed on untouched.
#[derive(Debug, Default)]
pub struct ChunkedEnd {
    state: ChunkState,
    size: u64,
    digits: u8,
    /// Chunk data bytes so far (what hyper's data frames would carry).
    payload: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// A chunked body that does not follow RFC 9112 7.1.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed chunked body from the upstream")]
pub struct BadChunk;

impl ChunkedEnd {
    /// Feeds the next bytes of the body; returns how many of them belong
    /// to it (all, or up to its end) and whether the end was reached.
    pub fn feed(&mut self, input: &[u8]) -> Result<(usize, bool), BadChunk> {
        use ChunkState::*;
        let mut i = 0;
        while i < input.len() {
            if self.state == Data {
                let take = (input.len() - i).min(self.size as usize);
                i += take;
                self.size -= take as u64;
                self.payload += take as u64;
                if self.size == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            let c = input[i];
            i += 1;
            self.state = match (self.state, c) {
                (Size, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                    let d = (c as char).to_digit(16).unwrap_or(0) as u64;
                    self.digits += 1;
                    if self.digits > 15 {
                        return Err(BadChunk);
                    }
                    self.size = self.size * 16 + d;
                    Size
                }
                (Size, b';' | b' ' | b'\t') if self.digits > 0 => Ext,
                (Size, b'\r') if self.digits > 0 => SizeLf,
                (Ext, b'\r') => SizeLf,
                (Ext, b'\n') => return Err(BadChunk),
                (Ext, _) => Ext,
                (SizeLf, b'\n') if self.size == 0 => TrailerStart,
                (SizeLf, b'\n') => Data,
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => {
                    self.digits = 0;
                    Size
                }
                (TrailerStart, b'\r') => EndLf,
                (TrailerStart | TrailerLine, b'\n') => return Err(BadChunk),
                (TrailerLine, b'\r') => TrailerLf,
                (TrailerStart | TrailerLine, _) => TrailerLine,
                (TrailerLf, b'\n') => TrailerStart,
                (EndLf, b'\n') => {
                    self.state = Done;
                    return Ok((i, true));
                }
                _ => return Err(BadChunk),
            };
        }
        Ok((i, self.state == Done))
    }

    /// Chunk data bytes fed so far, framing and trailers not counted.
    pub fn payload(&self) -> u64 {
        self.payload
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(raw: &str) -> (Parse, RequestHead) {
        let mut head = RequestHead::default();
        let p = parse_request(raw.as_bytes(), &mut head, false);
        (p, head)
    }

    fn upstream_head(raw: &str, forwarded: Option<IpAddr>) -> String {
        let mut head = RequestHead::default();
        assert_eq!(
            parse_request(raw.as_bytes(), &mut head, forwarded.is_some()),
            Parse::Ready
        );
        let mut out = Vec::new();
        let up = Upstream {
            base_path: "/base/",
            host: b"api.test:8080",
            bearer: b"Bearer T",
            request_id: b"rid",
            forwarded,
        };
        write_request_head(&mut out, raw.as_bytes(), &head, &up);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn plain_requests_are_ready_and_the_rest_falls_back() {
        assert_eq!(request("GET / HTTP/1.1\r\nHost: a\r\n").0, Parse::Partial);
        assert_eq!(request("GET / HTTP/1.1\r\nHost: a\r\n\r\n").0, Parse::Ready);
        // What hyper takes as it is: JSON in the path, `` ` `` and `^` in the query.
        assert_eq!(
            request("GET /{\"a\":|1}^?x=`^{} HTTP/1.1\r\n\r\n").0,
            Parse::Ready
        );
        for raw in [
            "GET / HTTP/1.0\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\n\r\n",
            "GET /..#x HTTP/1.1\r\n\r\n",
            "GET /a<b> HTTP/1.1\r\n\r\n",
            "GET /a`b HTTP/1.1\r\n\r\n",
            "GET /a?b=\"c\" HTTP/1.1\r\n\r\n",
            "GET /a?b#c HTTP/1.1\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert_eq!(request(raw).0, Parse::Fallback, "{raw:?}");
        }
    }

    #[test]
    fn request_head_is_rewritten_for_the_upstream() {
        let raw = "POST //a/%2F+b%20?x=1&y=%2B HTTP/1.1\r\nHost: localhost:7080\r\n\
                   Authorization: Basic old\r\nauthorization: two\r\nProxy-Authorization: p\r\n\
                   Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
                   TE: gzip, trailers\r\nX-Request-Id: theirs\r\nX-Multi: 1\r\nX-Multi: 2\r\n\
                   Content-Length: 3\r\n\r\nabc";
        let out = upstream_head(raw, None);
        assert_eq!(
            out,
            "POST /base/a/%2F+b%20?x=1&y=%2B HTTP/1.1\r\nhost: api.test:8080\r\n\
             X-Multi: 1\r\nX-Multi: 2\r\nContent-Length: 3\r\nauthorization: Bearer T\r\n\
             x-request-id: rid\r\nte: trailers\r\n\r\n"
        );
        let (_, head) = request(raw);
        assert_eq!(head.content_length, 3);
        assert_eq!(head.len, raw.len() - 3);
        assert_eq!(head.request_id.unwrap().get(raw.as_bytes()), b"theirs");
        assert_eq!(head.host.unwrap().get(raw.as_bytes()), b"localhost:7080");
        assert!(!head.close);
    }

    #[test]
    fn forwarded_headers_are_replaced_or_appended() {
        let raw = "GET /p HTTP/1.1\r\nHost: h:1\r\nX-Forwarded-For: 10.0.0.1\r\n\
                   X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n\r\n";
        let out = upstream_head(raw, Some([127, 0, 0, 1].into()));
        assert!(out.ends_with(
            "x-request-id: rid\r\nx-forwarded-for: 10.0.0.1, 127.0.0.1\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: h:1\r\n\r\n"
        ));
        assert!(!out.contains("evil") && !out.contains("https"), "{out}");
        // Off: the client's pass through untouched.
        let out = upstream_head(raw, None);
        assert!(out.contains("X-Forwarded-Host: evil"), "{out}");
    }

    #[test]
    fn content_length_goes_upstream_even_if_connection_lists_it() {
        let raw = "POST /p HTTP/1.1\r\nConnection: content-length\r\nContent-Length: 3\r\n\r\nabc";
        let out = upstream_head(raw, None);
        assert!(out.contains("\r\nContent-Length: 3\r\n"), "{out}");
    }

    #[test]
    fn hop_by_hop_names_are_known_whatever_their_length() {
        for h in &HOP_BY_HOP {
            assert!(
                is_hop_by_hop(h.as_str().to_ascii_uppercase().as_bytes()),
                "{h}"
            );
        }
        assert!(!is_hop_by_hop(b"content-length"));
    }

    #[test]
    fn connection_close_is_noticed() {
        let (p, head) = request("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n");
        assert_eq!(p, Parse::Ready);
        assert!(head.close);
    }

    fn response(raw: &str, head_request: bool) -> (ResponseHead, Vec<String>) {
        let mut fields = Vec::new();
        let Ok(ResponseParse::Final(head)) =
            parse_response(raw.as_bytes(), head_request, &mut fields)
        else {
            panic!("not a final response: {raw:?}");
        };
        let names = fields
            .iter()
            .map(|(n, v)| {
                format!(
                    "{}: {}",
                    String::from_utf8_lossy(n.get(raw.as_bytes())),
                    String::from_utf8_lossy(v.get(raw.as_bytes()))
                )
            })
            .collect();
        (head, names)
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let f = |raw: &str, head: bool| response(raw, head).0.framing;
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false),
            Framing::Length(5)
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true),
            Framing::Empty
        );
        assert_eq!(
            f("HTTP/1.1 204 No\r\nContent-Length: 5\r\n\r\n", false),
            Framing::Empty
        );
        assert_eq!(
            f("HTTP/1.1 304 NM\r\nContent-Length: 5\r\n\r\n", false),
            Framing::Empty
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\n",
                false
            ),
            Framing::Chunked
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false),
            Framing::UntilClose
        );
        assert_eq!(f("HTTP/1.1 200 OK\r\n\r\n", false), Framing::UntilClose);
        let mut fields = Vec::new();
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: five\r\n\r\n",
            "HTTP/1.1 101 Switching\r\n\r\n",
            "HTTZ/1.1 200 OK\r\n\r\n",
        ] {
            assert!(
                parse_response(bad.as_bytes(), false, &mut fields).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_response(
                b"HTTP/1.1 103 Early Hints\r\nLink: <a>\r\n\r\nHTTP/1.1",
                false,
                &mut fields
            ),
            Ok(ResponseParse::Interim(39))
        );
    }

    #[test]
    fn response_reuse_and_fields() {
        let (head, fields) = response(
            "HTTP/1.1 401 Unauthorized\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\
             Keep-Alive: timeout=5\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\
             WWW-Authenticate: Bearer error=\"invalid_token\"\r\nX-Request-Id: up\r\n\
             Location: /base/x\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert!(head.reusable && head.invalid_token && head.has_location && !head.has_date);
        assert_eq!(head.status, 401);
        assert_eq!(
            fields,
            [
                "Set-Cookie: a=1",
                "Set-Cookie: b=2",
                "WWW-Authenticate: Bearer error=\"invalid_token\"",
                "Location: /base/x",
                "Content-Length: 0"
            ]
        );
        assert!(
            !response(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                false
            )
            .0
            .reusable
        );
        assert!(
            !response("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false)
                .0
                .reusable
        );
        assert!(
            response(
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
                false
            )
            .0
            .reusable
        );
        assert!(!response("HTTP/1.1 200 OK\r\n\r\n", false).0.reusable);
    }

    #[test]
    fn chunked_end_is_found_with_extensions_and_trailers() {
        let body = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let mut end = ChunkedEnd::default();
        assert_eq!(end.feed(body), Ok((body.len() - 4, true)));
        assert_eq!(end.payload(), 15);
        let mut end = ChunkedEnd::default();
        assert_eq!(end.feed(b"0\r\n\r\n"), Ok((5, true)));
        for bad in [&b"x\r\n"[..], b"\r\n", b"5\r\nhelloXX", b"0\r\nX\n", b"1\n"] {
            assert_eq!(ChunkedEnd::default().feed(bad), Err(BadChunk), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn chunked_end_does_not_depend_on_how_bytes_arrive(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..6),
            cuts in proptest::collection::vec(1usize..17, 0..30),
        ) {
            let mut body = Vec::new();
            for c in &chunks {
                body.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                body.extend_from_slice(c);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\nA: b\r\n\r\n");
            let total = body.len();
            body.extend_from_slice(b"tail");
            let mut end = ChunkedEnd::default();
            let (mut at, mut cut) = (0, cuts.iter().cycle());
            loop {
                let n = (*cut.next().unwrap_or(&7)).min(body.len() - at);
                let (used, done) = end.feed(&body[at..at + n]).unwrap();
                at += used;
                if done { break; }
                prop_assert_eq!(used, n);
            }
            prop_assert_eq!(at, total);
        }
    }
}
