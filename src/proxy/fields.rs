//! Header fields as both engines read them: hop-by-hop names, `Connection`
//! tokens, the framing fields, and the few fields the proxy acts on. Pure
//! functions over bytes: the hyper engine feeds them a `HeaderMap`'s fields,
//! the fast lane the slices `httparse` found, so a rule about a field is
//! written once and both engines read a head the same way.

/// Hop-by-hop fields, never forwarded in either direction (RFC 9110 7.6.1).
/// `Trailer` is not one (it describes the message); `TE: trailers` is
/// forwarded on its own terms (see [`RequestFacts::trailers`]).
pub const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
];

/// Whether `name` is one of [`HOP_BY_HOP`], in any case.
#[inline]
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    // Most names have a length none of these has: no comparison at all.
    matches!(name.len(), 2 | 7 | 10 | 16 | 17 | 18)
        && HOP_BY_HOP
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// The comma-separated tokens of a field value, trimmed, empty ones skipped.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&c| c == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

pub fn has_token(value: &[u8], token: &[u8]) -> bool {
    tokens(value).any(|t| t.eq_ignore_ascii_case(token))
}

/// What the `Connection` fields of a head say.
#[derive(Debug, Default)]
pub struct ConnectionTokens<'a> {
    pub close: bool,
    pub keep_alive: bool,
    pub upgrade: bool,
    /// A token other than `close`, `keep-alive` and `upgrade`: a field name
    /// to drop. Almost no message has one, so [`ConnectionTokens::names`]
    /// looks at the values only when it is set.
    lists_names: bool,
    /// The first field values, for the names they list; the rest (more than
    /// four `Connection` fields is rare) in `more`.
    values: [&'a [u8]; 4],
    count: usize,
    more: Vec<&'a [u8]>,
}

impl<'a> ConnectionTokens<'a> {
    fn add(&mut self, value: &'a [u8]) {
        // The common values, whole: no tokenizing.
        if value.eq_ignore_ascii_case(b"keep-alive") {
            self.keep_alive = true;
        } else if value.eq_ignore_ascii_case(b"close") {
            self.close = true;
        } else {
            for token in tokens(value) {
                if token.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    self.upgrade = true;
                } else {
                    self.lists_names = true;
                }
            }
        }
        if !self.lists_names {
            return;
        }
        if self.count < self.values.len() {
            self.values[self.count] = value;
            self.count += 1;
        } else {
            self.more.push(value);
        }
    }

    /// Whether `Connection` lists `name` (one of the names it lists besides
    /// its own `close`, `keep-alive` and `upgrade`).
    #[inline]
    pub fn names(&self, name: &[u8]) -> bool {
        self.lists_names
            && self.values[..self.count]
                .iter()
                .chain(&self.more)
                .any(|v| has_token(v, name))
    }
}

/// What the `Content-Length` fields of a head say (RFC 9110 8.6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ContentLength {
    #[default]
    Absent,
    Valid(u64),
    /// Not digits, beyond 2^63 - 1, a list (`5, 5`) or a repeated field:
    /// refused (400 for a request, 502 for a response), as nginx does.
    Invalid,
}

impl ContentLength {
    fn add(&mut self, value: &[u8]) {
        *self = match (*self, parse_length(value)) {
            (ContentLength::Absent, Some(n)) => ContentLength::Valid(n),
            _ => ContentLength::Invalid,
        };
    }
}

/// A `Content-Length` value: digits only, at most 2^63 - 1 (what nginx and
/// every `off_t` can hold).
fn parse_length(value: &[u8]) -> Option<u64> {
    let v = value.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    (n <= i64::MAX as u64).then_some(n)
}

/// What the `Transfer-Encoding` fields of a head say (RFC 9112 6.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransferCoding {
    #[default]
    Absent,
    /// Exactly `chunked`: the one coding the proxy decodes and re-frames.
    Chunked,
    /// Any other list of codings (`gzip, chunked`, `identity`): the proxy
    /// cannot pass a coding it does not apply, so it refuses the message.
    /// `chunked_last`: the body is still delimited by chunks.
    Other { chunked_last: bool },
}

impl TransferCoding {
    fn add(&mut self, value: &[u8]) {
        let mut count = 0;
        let mut last_chunked = false;
        for t in tokens(value) {
            count += 1;
            last_chunked = t.eq_ignore_ascii_case(b"chunked");
        }
        *self = match (*self, count, last_chunked) {
            (TransferCoding::Absent, 1, true) => TransferCoding::Chunked,
            // A second field continues the list: chunked is no longer alone.
            (_, _, chunked_last) => TransferCoding::Other { chunked_last },
        };
    }

    /// The body is delimited by chunks.
    pub fn is_chunked(self) -> bool {
        matches!(
            self,
            TransferCoding::Chunked | TransferCoding::Other { chunked_last: true }
        )
    }
}

/// What the client asks of the connection beyond this exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// No upgrade (an `Upgrade` field that `Connection` does not list is
    /// hop-by-hop noise and is dropped).
    None,
    /// Only `h2c` offered (Java's HttpClient does it on every request):
    /// declined by forwarding the request as plain HTTP/1.1. After that
    /// upgrade the connection would carry HTTP/2 requests the proxy never
    /// sees, so none of them would get the token.
    H2cDeclined,
    /// A protocol switch (WebSocket...) to pass through end to end.
    Requested,
}

/// The fields of a request head that the proxy acts on.
#[derive(Debug, Default)]
pub struct RequestFacts<'a> {
    pub connection: ConnectionTokens<'a>,
    /// `Host` fields seen, and the first one's value.
    pub hosts: u32,
    pub host: Option<&'a [u8]>,
    pub request_id: Option<&'a [u8]>,
    /// The first `X-Forwarded-For`, for `proxy.forwarded_headers`; none when
    /// `Connection` lists it.
    pub forwarded_for: Option<&'a [u8]>,
    pub content_length: ContentLength,
    pub transfer_coding: TransferCoding,
    /// An `Expect` field (`100-continue`): hyper answers it.
    pub expect: bool,
    /// The `Upgrade` value, if any.
    pub upgrade_value: Option<&'a [u8]>,
    /// The client sent `TE: trailers`, the one `TE` forwarded.
    pub trailers: bool,
}

impl<'a> RequestFacts<'a> {
    /// Reads the fields of one request head (name, value), in one pass.
    pub fn of<I>(fields: I) -> Self
    where
        I: IntoIterator<Item = (&'a [u8], &'a [u8])>,
    {
        let mut f = RequestFacts::default();
        for (name, value) in fields {
            // Dispatch on length first: one comparison for most names.
            match name.len() {
                4 if name.eq_ignore_ascii_case(b"host") => {
                    f.hosts += 1;
                    f.host.get_or_insert(value);
                }
                10 if name.eq_ignore_ascii_case(b"connection") => f.connection.add(value),
                14 if name.eq_ignore_ascii_case(b"content-length") => f.content_length.add(value),
                17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                    f.transfer_coding.add(value)
                }
                12 if name.eq_ignore_ascii_case(b"x-request-id") => {
                    f.request_id.get_or_insert(value);
                }
                15 if name.eq_ignore_ascii_case(b"x-forwarded-for") => {
                    f.forwarded_for.get_or_insert(value);
                }
                2 if name.eq_ignore_ascii_case(b"te") => {
                    f.trailers |= has_token(value, b"trailers");
                }
                6 if name.eq_ignore_ascii_case(b"expect") => f.expect = true,
                7 if name.eq_ignore_ascii_case(b"upgrade") => {
                    f.upgrade_value.get_or_insert(value);
                }
                _ => {}
            }
        }
        // A chain the client declared hop-by-hop is not the client's to
        // pass on (listing it is how a client would hide its origin).
        if f.forwarded_for.is_some() && f.connection.names(b"x-forwarded-for") {
            f.forwarded_for = None;
        }
        f
    }

    /// Whether the request asks for a protocol switch, and which kind.
    pub fn upgrade(&self) -> Upgrade {
        match self.upgrade_value {
            Some(protocols) if self.connection.upgrade => {
                let only_h2c =
                    tokens(protocols).all(|p| p.len() >= 3 && p[..3].eq_ignore_ascii_case(b"h2c"));
                if only_h2c {
                    Upgrade::H2cDeclined
                } else {
                    Upgrade::Requested
                }
            }
            _ => Upgrade::None,
        }
    }
}

/// The fields of a response head that the proxy acts on.
#[derive(Debug, Default)]
pub struct ResponseFacts<'a> {
    pub connection: ConnectionTokens<'a>,
    pub content_length: ContentLength,
    pub transfer_coding: TransferCoding,
    /// A `WWW-Authenticate` says `error="invalid_token"` (RFC 6750 3.1).
    pub invalid_token: bool,
    /// `Location` or `Content-Location` is present (may need rewriting).
    pub has_location: bool,
    pub has_date: bool,
    /// The `Trailer` field values: the trailer fields the body may end with.
    pub trailer: Vec<&'a [u8]>,
}

impl<'a> ResponseFacts<'a> {
    /// Reads the fields of one response head (name, value), in one pass.
    pub fn of<I>(fields: I) -> Self
    where
        I: IntoIterator<Item = (&'a [u8], &'a [u8])>,
    {
        let mut f = ResponseFacts::default();
        for (name, value) in fields {
            match name.len() {
                4 if name.eq_ignore_ascii_case(b"date") => f.has_date = true,
                7 if name.eq_ignore_ascii_case(b"trailer") => f.trailer.push(value),
                8 if name.eq_ignore_ascii_case(b"location") => f.has_location = true,
                10 if name.eq_ignore_ascii_case(b"connection") => f.connection.add(value),
                14 if name.eq_ignore_ascii_case(b"content-length") => f.content_length.add(value),
                16 if name.eq_ignore_ascii_case(b"content-location") => f.has_location = true,
                16 if name.eq_ignore_ascii_case(b"www-authenticate") => {
                    f.invalid_token |= says_invalid_token(value);
                }
                17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                    f.transfer_coding.add(value)
                }
                _ => {}
            }
        }
        f
    }
}

/// Whether a `WWW-Authenticate` value says the token was refused.
pub fn says_invalid_token(value: &[u8]) -> bool {
    const QUOTED: &[u8] = b"error=\"invalid_token\"";
    const BARE: &[u8] = b"error=invalid_token";
    value.windows(BARE.len()).enumerate().any(|(i, w)| {
        w.eq_ignore_ascii_case(BARE)
            || value
                .get(i..i + QUOTED.len())
                .is_some_and(|q| q.eq_ignore_ascii_case(QUOTED))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(fields: &[(&str, &str)]) -> RequestFacts<'static> {
        let owned: Vec<(&'static [u8], &'static [u8])> = fields
            .iter()
            .map(|(n, v)| {
                (
                    &*Box::leak(n.as_bytes().to_vec().into_boxed_slice()),
                    &*Box::leak(v.as_bytes().to_vec().into_boxed_slice()),
                )
            })
            .collect();
        RequestFacts::of(owned)
    }

    #[test]
    fn hop_by_hop_names_are_known_in_any_case() {
        for h in HOP_BY_HOP {
            assert!(is_hop_by_hop(h.to_ascii_uppercase().as_bytes()), "{h}");
        }
        assert!(!is_hop_by_hop(b"content-length"));
        assert!(!is_hop_by_hop(b"trailer"));
    }

    #[test]
    fn content_length_is_one_plain_number_within_63_bits() {
        let cl = |vals: &[&str]| {
            let fields: Vec<_> = vals.iter().map(|v| ("Content-Length", *v)).collect();
            request(&fields).content_length
        };
        assert_eq!(cl(&[]), ContentLength::Absent);
        assert_eq!(cl(&["0"]), ContentLength::Valid(0));
        assert_eq!(cl(&[" 42 "]), ContentLength::Valid(42));
        assert_eq!(
            cl(&["9223372036854775807"]),
            ContentLength::Valid(i64::MAX as u64)
        );
        for bad in [
            &["9223372036854775808"][..],
            &["9999999999999999999"],
            &["18446744073709551616"],
            &["5, 5"],
            &["5", "5"],
            &["-1"],
            &["+1"],
            &["0x10"],
            &[""],
        ] {
            assert_eq!(cl(bad), ContentLength::Invalid, "{bad:?}");
        }
    }

    #[test]
    fn transfer_coding_is_chunked_alone_or_refused() {
        let te = |vals: &[&str]| {
            let fields: Vec<_> = vals.iter().map(|v| ("Transfer-Encoding", *v)).collect();
            request(&fields).transfer_coding
        };
        assert_eq!(te(&[]), TransferCoding::Absent);
        assert_eq!(te(&["chunked"]), TransferCoding::Chunked);
        assert_eq!(te(&[" Chunked "]), TransferCoding::Chunked);
        assert_eq!(
            te(&["gzip, chunked"]),
            TransferCoding::Other { chunked_last: true }
        );
        assert_eq!(
            te(&["identity", "chunked"]),
            TransferCoding::Other { chunked_last: true }
        );
        assert_eq!(
            te(&["chunked", "chunked"]),
            TransferCoding::Other { chunked_last: true }
        );
        assert_eq!(
            te(&["chunked, gzip"]),
            TransferCoding::Other {
                chunked_last: false
            }
        );
    }

    #[test]
    fn connection_lists_names_and_upgrade_offers() {
        let f = request(&[
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("Upgrade", "h2c"),
            ("connection", "x-a"),
            ("Connection", "x-b"),
            ("Connection", "x-c"),
            ("Connection", "x-d, close"),
        ]);
        assert!(f.connection.upgrade && f.connection.close);
        for n in ["http2-settings", "X-A", "x-d"] {
            assert!(f.connection.names(n.as_bytes()), "{n}");
        }
        assert!(!f.connection.names(b"x-e"));
        assert_eq!(f.upgrade(), Upgrade::H2cDeclined);
        let ws = request(&[("Connection", "upgrade"), ("Upgrade", "websocket")]);
        assert_eq!(ws.upgrade(), Upgrade::Requested);
        let mixed = request(&[("Connection", "upgrade"), ("Upgrade", "h2c, websocket")]);
        assert_eq!(mixed.upgrade(), Upgrade::Requested);
        let unlisted = request(&[("Upgrade", "websocket")]);
        assert_eq!(unlisted.upgrade(), Upgrade::None);
    }

    #[test]
    fn invalid_token_in_www_authenticate() {
        assert!(says_invalid_token(
            b"Bearer realm=\"x\", error=\"invalid_token\""
        ));
        assert!(says_invalid_token(b"Bearer ERROR=invalid_token"));
        assert!(!says_invalid_token(b"Bearer error=\"insufficient_scope\""));
        assert!(!says_invalid_token(b"Basic"));
    }
}
