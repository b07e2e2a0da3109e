//! Request targets: which paths may pass, and the upstream target they map
//! to. Pure functions over the raw bytes of the target, which are forwarded
//! as they came (any byte above 0x20 but DEL, as nginx does).

use percent_encoding::percent_decode;

/// Why a path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRejection {
    /// A dot-segment in any spelling: the request could escape the base path.
    DotSegment,
    /// Not under any `proxy.allow_paths` prefix.
    NotAllowed,
    /// Not a path at all: `OPTIONS *` asks about this server, not the upstream.
    NotAPath,
    /// A NUL byte, percent-encoded (`%00`): no server means it, several
    /// cut the path there (nginx refuses it too).
    Nul,
}

/// Checks a raw request path (without the query).
///
/// Rejects `.` and `..` segments however they are spelled: literally,
/// percent-encoded (`%2e%2E`), with `;` path parameters (`/..;/`, which Tomcat
/// strips before resolving), or hidden behind an encoded separator (`%2f`,
/// `%5c`). `allow` prefixes are matched against the percent-decoded path.
pub fn check(raw_path: &[u8], allow: &[String]) -> Result<(), PathRejection> {
    check_segments(raw_path)?;
    check_allowed(raw_path, allow)
}

/// The dot-segment and NUL checks of [`check`], on a whole raw path.
pub fn check_segments(raw_path: &[u8]) -> Result<(), PathRejection> {
    if raw_path.first() != Some(&b'/') {
        return Err(PathRejection::NotAPath);
    }
    if raw_path.contains(&b'\\') {
        return Err(PathRejection::DotSegment);
    }
    for segment in raw_path.split(|&c| c == b'/') {
        if !segment.contains(&b'.') && !segment.contains(&b'%') {
            continue; // the common case: nothing to decode
        }
        let decoded: Vec<u8> = percent_decode(segment).collect();
        if decoded.contains(&0) {
            return Err(PathRejection::Nul);
        }
        for piece in decoded.split(|&c| c == b'/' || c == b'\\') {
            let bare = piece.split(|&c| c == b';').next().unwrap_or(b"");
            if bare == b"." || bare == b".." {
                return Err(PathRejection::DotSegment);
            }
        }
    }
    Ok(())
}

/// The `allow_paths` check of [`check`]: `raw_path`, percent-decoded, is
/// under one of the prefixes (every path is, when there are none).
pub fn check_allowed(raw_path: &[u8], allow: &[String]) -> Result<(), PathRejection> {
    if !allow.is_empty() {
        let decoded: Vec<u8> = percent_decode(raw_path).collect();
        if !allow
            .iter()
            .any(|prefix| decoded.starts_with(prefix.as_bytes()))
        {
            return Err(PathRejection::NotAllowed);
        }
    }
    Ok(())
}

/// Writes `base_path` (ends in `/`) joined to `raw_path` with exactly one
/// `/`, then the raw query, byte for byte.
pub fn write_join(out: &mut Vec<u8>, base_path: &str, raw_path: &[u8], query: Option<&[u8]>) {
    let rest = &raw_path[raw_path.iter().take_while(|&&c| c == b'/').count()..];
    out.extend_from_slice(base_path.as_bytes());
    out.extend_from_slice(rest);
    if let Some(q) = query {
        out.push(b'?');
        out.extend_from_slice(q);
    }
}

/// [`write_join`] into a new buffer.
pub fn join(base_path: &str, raw_path: &[u8], query: Option<&[u8]>) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(base_path.len() + raw_path.len() + query.map_or(0, |q| q.len() + 1));
    write_join(&mut out, base_path, raw_path, query);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_dot_segments_in_every_spelling() {
        for p in [
            "/a/../b",
            "/a/./b",
            "/..",
            "/a/%2e%2e/b",
            "/a/%2E%2e/b",
            "/a/.%2e/b",
            "/a/..;/b",
            "/a/..;x=1/b",
            "/a/%2e%2e;/b",
            "/a/..%2fb",
            "/a/%2e%2e%2fb",
            "/a\\..\\b",
            "/a/..%5cb",
            "/a/%2e/b",
        ] {
            assert_eq!(
                check(p.as_bytes(), &[]),
                Err(PathRejection::DotSegment),
                "{p}"
            );
        }
    }

    #[test]
    fn accepts_ordinary_paths() {
        for p in [
            "/",
            "/a/b.json",
            "/a/...",
            "/a/.well-known/x",
            "/a/%20b",
            "/a/b%2Fc",
            "/v1.2/x",
        ] {
            assert_eq!(check(p.as_bytes(), &[]), Ok(()), "{p}");
        }
    }

    #[test]
    fn asterisk_form_is_not_a_path() {
        assert_eq!(check(b"*", &[]), Err(PathRejection::NotAPath));
    }

    #[test]
    fn an_encoded_nul_is_refused_and_raw_bytes_pass() {
        assert_eq!(check(b"/a%00b", &[]), Err(PathRejection::Nul));
        assert_eq!(check(b"/a/%00", &[]), Err(PathRejection::Nul));
        assert_eq!(check(b"/a<b>/\"x\"/\xff", &[]), Ok(()));
    }

    #[test]
    fn allow_paths_match_decoded() {
        let allow = vec!["/backoffice/api/".to_string()];
        assert_eq!(check(b"/backoffice/api/x", &allow), Ok(()));
        assert_eq!(check(b"/backoffice%2Fapi/x", &allow), Ok(()));
        assert_eq!(check(b"/other", &allow), Err(PathRejection::NotAllowed));
    }

    #[test]
    fn joins_with_one_slash_and_raw_query() {
        assert_eq!(
            join("/paymentiq/", b"/backoffice/api/x", Some(b"a=%20&b=+")),
            b"/paymentiq/backoffice/api/x?a=%20&b=+"
        );
        assert_eq!(join("/", b"/x", None), b"/x");
        assert_eq!(join("/base/", b"//x", None), b"/base/x");
        assert_eq!(
            join("/base/", b"/\"<>\"", Some(b"{\"a\":1}")),
            b"/base/\"<>\"?{\"a\":1}"
        );
    }
}
