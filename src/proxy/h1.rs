//! The fast lane's HTTP/1.1 codec: message heads parsed in place with
//! `httparse` (hyper's own parser) into byte offsets, and the chunked
//! framing decoded and written again. Pure functions over bytes; which
//! fields cross and what a head means is the policy's
//! ([`super::policy`], [`super::fields`]), shared with the hyper engine.
//!
//! Heads are kept as byte offsets into the buffer they were read into
//! ([`Span`]), so nothing is copied before it is written out again.

use super::fields::TransferCoding;

/// Header fields per head, as hyper allows; more is 431 for a request and
/// 502 for a response.
pub const MAX_HEADERS: usize = 100;

/// The HTTP/2 connection preface: h2c with prior knowledge, for hyper.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bytes `start..end` of the buffer a head was parsed from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    start: u32,
    end: u32,
}

impl Span {
    pub fn of(buf: &[u8], part: &[u8]) -> Span {
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

/// The fields of a head, as spans (name, value), in order.
pub type Fields = Vec<(Span, Span)>;

/// The fields of `fields` as byte slices of `buf` (which they borrow; the
/// list itself only while iterating).
pub fn slices<'b, 'f>(
    buf: &'b [u8],
    fields: &'f [(Span, Span)],
) -> impl Iterator<Item = (&'b [u8], &'b [u8])> + use<'b, 'f> {
    fields.iter().map(move |(n, v)| (n.get(buf), v.get(buf)))
}

/// What reading a request head found.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// More bytes are needed.
    Partial,
    /// A complete request head.
    Ready,
    /// HTTP/2 with prior knowledge: not HTTP/1.1 at all (hyper's).
    Http2,
    /// Not a valid HTTP/1.x request head (400).
    Malformed,
    /// More than [`MAX_HEADERS`] fields (431).
    TooManyFields,
}

/// How the request target is written (RFC 9112 3.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Form {
    /// `/path?query`: what the lane serves.
    #[default]
    Origin,
    /// `http://host/path`, `*`, or an authority: hyper's.
    Other,
}

/// A client's request head, as offsets into the connection's read buffer.
#[derive(Debug, Default)]
pub struct RequestHead {
    /// Bytes of the head, final CRLF included; the body starts here.
    pub len: usize,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub method: Span,
    pub form: Form,
    /// The raw path, without the query; a `#fragment` is cut off (as
    /// hyper's URI parser does), so that the path checked is the path sent.
    pub path: Span,
    pub query: Option<Span>,
    /// Every field, in order.
    pub fields: Fields,
}

/// Parses a request head at the start of `buf` into `head` (its field list
/// is reused from one request to the next).
pub fn parse_request(buf: &[u8], head: &mut RequestHead) -> Parse {
    if buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf) {
        return Parse::Partial;
    }
    if buf.starts_with(H2_PREFACE) {
        return Parse::Http2;
    }
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut storage);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parse::TooManyFields,
        Err(_) => return Parse::Malformed,
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Parse::Malformed;
    };
    let target = target.as_bytes();
    // A fragment is not part of a request target (RFC 9112 3.2); a client
    // that sends one means the part before it.
    let target = &target[..target
        .iter()
        .position(|&b| b == b'#')
        .unwrap_or(target.len())];
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(q) => (&target[..q], Some(Span::of(buf, &target[q + 1..]))),
        None => (target, None),
    };
    head.len = len;
    head.minor = minor;
    head.method = Span::of(buf, method.as_bytes());
    head.form = if path.first() == Some(&b'/') {
        Form::Origin
    } else {
        Form::Other
    };
    head.path = Span::of(buf, path);
    head.query = query;
    head.fields.clear();
    head.fields.extend(
        req.headers
            .iter()
            .map(|h| (Span::of(buf, h.name.as_bytes()), Span::of(buf, h.value))),
    );
    Parse::Ready
}

/// `\r\nname: value` (each field ends where the next begins).
#[inline]
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
    /// Chunks, decoded and written again.
    Chunked,
    /// Until the upstream closes: the client connection closes after it.
    UntilClose,
}

impl Framing {
    /// RFC 9112 6.3, for a response the policy found valid.
    pub fn of_response(
        status: u16,
        head_request: bool,
        length: Option<u64>,
        coding: TransferCoding,
    ) -> Framing {
        if head_request || status == 204 || status == 304 {
            Framing::Empty
        } else if coding.is_chunked() {
            Framing::Chunked
        } else {
            match length {
                Some(n) => Framing::Length(n),
                None => Framing::UntilClose,
            }
        }
    }
}

/// An upstream response head.
#[derive(Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub len: usize,
    /// As sent; the policy checks its range.
    pub status: u16,
    /// The reason phrase, if there is one that can be kept: httparse
    /// gives a reason that is not UTF-8 (obs-text) as a static empty
    /// string, not a slice of the buffer.
    pub reason: Option<Span>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
}

/// Why an upstream response head cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadHead {
    #[error("malformed response head from the upstream")]
    Malformed(#[from] httparse::Error),
    #[error("response head from the upstream is too large")]
    TooLarge,
}

/// Largest upstream response head accepted.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Parses the upstream response head at the start of `buf`; `fields` gets
/// every field, in order. `None`: more bytes are needed.
pub fn parse_response(buf: &[u8], fields: &mut Fields) -> Result<Option<ResponseHead>, BadHead> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut storage);
    let len = match resp.parse(buf)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial if buf.len() >= MAX_RESPONSE_HEAD => {
            return Err(BadHead::TooLarge)
        }
        httparse::Status::Partial => return Ok(None),
    };
    fields.clear();
    fields.extend(
        resp.headers
            .iter()
            .map(|h| (Span::of(buf, h.name.as_bytes()), Span::of(buf, h.value))),
    );
    Ok(Some(ResponseHead {
        len,
        status: resp.code.unwrap_or(0),
        reason: resp
            .reason
            .filter(|r| buf.as_ptr_range().contains(&r.as_ptr()))
            .map(|r| Span::of(buf, r.as_bytes())),
        minor: resp.version.unwrap_or(1),
    }))
}

/// Decodes a chunked body (RFC 9112 7.1) and writes it again in canonical
/// form: each run of data that arrives as one chunk with a plain size line,
/// chunk extensions and odd spacing dropped, as hyper and nginx do; the
/// trailer fields that `keep_trailer` accepts, then the last chunk.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
    /// Data bytes left in the current chunk.
    size: u64,
    digits: u8,
    /// Chunk data bytes so far (what hyper's data frames would carry).
    payload: u64,
    /// The trailer section read so far, lines ending in CRLF (trailers
    /// are rare and short), where its current line starts, and how many
    /// lines it has.
    line: Vec<u8>,
    line_start: usize,
    lines: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// Spaces after the size, before an extension or the line's end.
    SizeSpace,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    Done,
}

/// A chunked body that does not follow RFC 9112 7.1.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed chunked body from the upstream")]
pub struct BadChunk;

/// Largest chunk size accepted: 2^60 - 1, well within what a body length
/// (at most 2^63 - 1, as for `Content-Length`) can count.
const MAX_CHUNK_SIZE: u64 = (1 << 60) - 1;

/// Largest trailer section accepted.
const MAX_TRAILER_SECTION: usize = 16 * 1024;

impl Chunked {
    /// Decodes the next bytes of the body, writing the re-framed bytes to
    /// `out`; returns how many input bytes belong to the body (all, or up
    /// to its end) and whether the end was reached.
    pub fn feed(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        keep_trailer: &dyn Fn(&[u8]) -> bool,
    ) -> Result<(usize, bool), BadChunk> {
        use ChunkState::*;
        let mut i = 0;
        while i < input.len() {
            if self.state == Data {
                let take = (input.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                write_chunk(out, &input[i..i + take]);
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
                    // The value is bounded, not its digits (RFC 9112 7.1:
                    // leading zeros are fine, as in nginx and hyper).
                    self.digits = self.digits.saturating_add(1);
                    if self.size > MAX_CHUNK_SIZE >> 4 {
                        return Err(BadChunk);
                    }
                    self.size = self.size * 16 + d;
                    Size
                }
                (Size | SizeSpace, b' ' | b'\t') if self.digits > 0 => SizeSpace,
                (Size | SizeSpace, b';') if self.digits > 0 => Ext,
                (Size | SizeSpace, b'\r') if self.digits > 0 => SizeLf,
                (Ext, b'\r') => SizeLf,
                (Ext, b'\n') => return Err(BadChunk),
                (Ext, _) => Ext,
                (SizeLf, b'\n') if self.size == 0 => {
                    // The last chunk is written with the trailer section,
                    // once that has been read whole.
                    self.line.clear();
                    (self.line_start, self.lines) = (0, 0);
                    Trailer
                }
                (SizeLf, b'\n') => Data,
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => {
                    self.digits = 0;
                    Size
                }
                // The section's lines end in CRLF, a bare LF is a byte of
                // its line (as hyper reads it); the section is parsed as
                // a whole once it has ended, as hyper parses it.
                (Trailer, b'\r') => TrailerLf,
                (Trailer, _) => {
                    if self.line.len() >= MAX_TRAILER_SECTION {
                        return Err(BadChunk);
                    }
                    self.line.push(c);
                    Trailer
                }
                (TrailerLf, b'\n') if self.line.len() == self.line_start => {
                    let mark = out.len();
                    out.extend_from_slice(b"0\r\n");
                    if let Err(e) = write_trailers(out, &mut self.line, self.lines, keep_trailer) {
                        out.truncate(mark);
                        return Err(e);
                    }
                    out.extend_from_slice(b"\r\n");
                    self.state = Done;
                    return Ok((i, true));
                }
                (TrailerLf, b'\n') => {
                    // As many trailer fields as head fields, as hyper allows.
                    if self.lines == MAX_HEADERS {
                        return Err(BadChunk);
                    }
                    self.line.extend_from_slice(b"\r\n");
                    self.line_start = self.line.len();
                    self.lines += 1;
                    Trailer
                }
                _ => return Err(BadChunk),
            };
        }
        Ok((i, self.state == Done))
    }

    /// Chunk data bytes decoded so far, framing and trailers not counted.
    pub fn payload(&self) -> u64 {
        self.payload
    }
}

/// One chunk: size line, data, CRLF.
fn write_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    use std::io::Write;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The fields of a whole trailer section (`lines` lines, each ending in
/// CRLF), parsed as field lines are (`httparse`, as hyper parses trailers),
/// each that `keep` accepts written with its name in lower case (as hyper
/// writes trailers). A section that is no list of fields is refused.
fn write_trailers(
    out: &mut Vec<u8>,
    section: &mut Vec<u8>,
    lines: usize,
    keep: &dyn Fn(&[u8]) -> bool,
) -> Result<(), BadChunk> {
    if lines == 0 {
        return Ok(());
    }
    section.extend_from_slice(b"\r\n");
    let mut storage = vec![httparse::EMPTY_HEADER; lines];
    let fields = match httparse::parse_headers(section, &mut storage) {
        Ok(httparse::Status::Complete((_, fields))) => fields,
        _ => return Err(BadChunk),
    };
    for f in fields.iter() {
        if keep(f.name.as_bytes()) {
            out.extend(f.name.bytes().map(|b| b.to_ascii_lowercase()));
            out.extend_from_slice(b": ");
            out.extend_from_slice(f.value);
            out.extend_from_slice(b"\r\n");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(raw: &str) -> (Parse, RequestHead) {
        let mut head = RequestHead::default();
        let p = parse_request(raw.as_bytes(), &mut head);
        (p, head)
    }

    #[test]
    fn request_heads_and_what_is_not_one() {
        assert_eq!(request("GET / HTTP/1.1\r\nHost: a\r\n").0, Parse::Partial);
        assert_eq!(request("PRI * HTTP/2").0, Parse::Partial);
        assert_eq!(request("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").0, Parse::Http2);
        assert_eq!(request("GET / HTTP/1.1\r\nHost: a\r\n\r\n").0, Parse::Ready);
        assert_eq!(request("GET /a b HTTP/1.1\r\n\r\n").0, Parse::Malformed);
        assert_eq!(
            request("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n").0,
            Parse::Malformed
        );
        assert_eq!(request("garbage\r\n\r\n").0, Parse::Malformed);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(
            request(&format!("GET / HTTP/1.1\r\n{many}\r\n")).0,
            Parse::TooManyFields
        );
    }

    #[test]
    fn targets_are_kept_byte_for_byte_but_a_fragment() {
        let raw = "GET /a<b>/\"c\"?f={\"a\":1}&x=`^#frag HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\nBODY";
        let (p, head) = request(raw);
        assert_eq!(p, Parse::Ready);
        let buf = raw.as_bytes();
        assert_eq!(head.path.get(buf), b"/a<b>/\"c\"");
        assert_eq!(head.query.unwrap().get(buf), b"f={\"a\":1}&x=`^");
        assert_eq!(head.form, Form::Origin);
        assert_eq!(head.minor, 1);
        assert_eq!(head.len, raw.len() - 4);
        let fields: Vec<_> = slices(buf, &head.fields).collect();
        assert_eq!(fields, [(&b"Host"[..], &b"h"[..]), (b"X-A", b"1")]);
        assert_eq!(
            request("GET /..#x HTTP/1.1\r\n\r\n")
                .1
                .path
                .get(b"GET /..#x HTTP/1.1\r\n\r\n"),
            b"/.."
        );
        assert_eq!(
            request("GET http://a/ HTTP/1.1\r\n\r\n").1.form,
            Form::Other
        );
        assert_eq!(request("OPTIONS * HTTP/1.1\r\n\r\n").1.form, Form::Other);
    }

    #[test]
    fn response_heads() {
        let mut fields = Vec::new();
        let raw = b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\n\r\nrest";
        let head = parse_response(raw, &mut fields).unwrap().unwrap();
        assert_eq!((head.status, head.minor, head.len), (401, 1, raw.len() - 4));
        assert_eq!(head.reason.unwrap().get(raw), b"Unauthorized");
        let obs_text = b"HTTP/1.1 201 Create\x97\r\n\r\n";
        let other = parse_response(obs_text, &mut Vec::new()).unwrap().unwrap();
        assert_eq!((other.status, other.reason), (201, None));
        assert_eq!(fields.len(), 1);
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\n", &mut fields),
            Ok(None)
        );
        assert!(parse_response(b"HTTZ/1.1 200 OK\r\n\r\n", &mut fields).is_err());
        assert_eq!(
            parse_response(b"HTTP/1.0 000 Zero\r\n\r\n", &mut fields)
                .unwrap()
                .unwrap()
                .status,
            0
        );
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        use TransferCoding::*;
        assert_eq!(
            Framing::of_response(200, false, Some(5), Absent),
            Framing::Length(5)
        );
        assert_eq!(
            Framing::of_response(200, true, Some(5), Absent),
            Framing::Empty
        );
        assert_eq!(
            Framing::of_response(204, false, Some(5), Absent),
            Framing::Empty
        );
        assert_eq!(
            Framing::of_response(304, false, Some(5), Absent),
            Framing::Empty
        );
        assert_eq!(
            Framing::of_response(200, false, Some(5), Chunked),
            Framing::Chunked
        );
        assert_eq!(
            Framing::of_response(200, false, None, Absent),
            Framing::UntilClose
        );
    }

    fn reframe(body: &[u8], keep: bool) -> Result<(Vec<u8>, usize, u64), BadChunk> {
        let mut out = Vec::new();
        let mut c = Chunked::default();
        let (used, done) = c.feed(body, &mut out, &|_: &[u8]| keep)?;
        assert!(done);
        Ok((out, used, c.payload()))
    }

    #[test]
    fn chunks_are_written_again_without_extensions_or_spaces() {
        let body = b"5;ext=1\r\nhello\r\nA  \r\n0123456789\r\n0 ; x\r\nX-T: 1\r\n\r\nNEXT";
        let (out, used, payload) = reframe(body, true).unwrap();
        assert_eq!(used, body.len() - 4);
        assert_eq!(payload, 15);
        assert_eq!(out, b"5\r\nhello\r\na\r\n0123456789\r\n0\r\nx-t: 1\r\n\r\n");
        let (out, _, _) = reframe(body, false).unwrap();
        assert_eq!(out, b"5\r\nhello\r\na\r\n0123456789\r\n0\r\n\r\n");
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\r\nhelloXX",
            b"0\r\nX\r\r",
            b"1\n",
            b" 1\r\n",
            b"0\r\nno colon\r\n\r\n",
            b"1000000000000000\r\n",
            b"0001000000000000000\r\n",
        ] {
            let mut c = Chunked::default();
            assert_eq!(
                c.feed(bad, &mut Vec::new(), &|_: &[u8]| true),
                Err(BadChunk),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn chunk_sizes_are_bounded_by_value_not_digits() {
        let body = b"0000000000000000005\r\nhello\r\n000000000000000000\r\n\r\n";
        let (out, used, payload) = reframe(body, true).unwrap();
        assert_eq!((used, payload), (body.len(), 5));
        assert_eq!(out, b"5\r\nhello\r\n0\r\n\r\n");
        let mut c = Chunked::default();
        let fits = b"fffffffffffffff\r\n";
        assert_eq!(
            c.feed(fits, &mut Vec::new(), &|_: &[u8]| true),
            Ok((fits.len(), false))
        );
    }

    proptest! {
        #[test]
        fn chunked_decoding_does_not_depend_on_how_bytes_arrive(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..6),
            cuts in proptest::collection::vec(1usize..17, 0..30),
        ) {
            let mut body = Vec::new();
            let mut data = Vec::new();
            for c in &chunks {
                body.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                body.extend_from_slice(c);
                body.extend_from_slice(b"\r\n");
                data.extend_from_slice(c);
            }
            body.extend_from_slice(b"0\r\nA: b\r\n\r\n");
            let total = body.len();
            body.extend_from_slice(b"tail");
            let mut end = Chunked::default();
            let mut out = Vec::new();
            let (mut at, mut cut) = (0, cuts.iter().cycle());
            loop {
                let n = (*cut.next().unwrap_or(&7)).min(body.len() - at);
                let (used, done) = end.feed(&body[at..at + n], &mut out, &|_: &[u8]| true).unwrap();
                at += used;
                if done { break; }
                prop_assert_eq!(used, n);
            }
            prop_assert_eq!(at, total);
            prop_assert_eq!(end.payload(), data.len() as u64);
            // What was written decodes to the same data.
            let mut again = Chunked::default();
            let mut twice = Vec::new();
            let (used, done) = again.feed(&out, &mut twice, &|_: &[u8]| true).unwrap();
            prop_assert!(done);
            prop_assert_eq!(used, out.len());
            prop_assert_eq!(again.payload(), data.len() as u64);
        }
    }
}
