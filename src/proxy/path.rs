//! Request targets: which paths may pass, and the upstream URI they map to.
//! Pure functions over strings.

use percent_encoding::percent_decode_str;

/// Why a path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRejection {
    /// A dot-segment in any spelling: the request could escape the base path.
    DotSegment,
    /// Not under any `proxy.allow_paths` prefix.
    NotAllowed,
    /// Not a path at all: `OPTIONS *` asks about this server, not the upstream.
    NotAPath,
}

/// Checks a raw request path (without the query).
///
/// Rejects `.` and `..` segments however they are spelled: literally,
/// percent-encoded (`%2e%2E`), with `;` path parameters (`/..;/`, which Tomcat
/// strips before resolving), or hidden behind an encoded separator (`%2f`,
/// `%5c`). `allow` prefixes are matched against the percent-decoded path.
pub fn check(raw_path: &str, allow: &[String]) -> Result<(), PathRejection> {
    if !raw_path.starts_with('/') {
        return Err(PathRejection::NotAPath);
    }
    if raw_path.contains('\\') {
        return Err(PathRejection::DotSegment);
    }
    for segment in raw_path.split('/') {
        if !segment.contains('.') && !segment.contains('%') {
            continue; // the common case: nothing to decode
        }
        let decoded = percent_decode_str(segment).decode_utf8_lossy();
        for piece in decoded.split(['/', '\\']) {
            let bare = piece.split(';').next().unwrap_or("");
            if bare == "." || bare == ".." {
                return Err(PathRejection::DotSegment);
            }
        }
    }
    if !allow.is_empty() {
        let decoded = percent_decode_str(raw_path).decode_utf8_lossy();
        if !allow
            .iter()
            .any(|prefix| decoded.starts_with(prefix.as_str()))
        {
            return Err(PathRejection::NotAllowed);
        }
    }
    Ok(())
}

/// `base_path` (ends in `/`) joined to `raw_path` with exactly one `/`, then
/// the raw query, byte for byte.
pub fn join(base_path: &str, raw_path: &str, query: Option<&str>) -> String {
    let rest = raw_path.trim_start_matches('/');
    let mut out =
        String::with_capacity(base_path.len() + rest.len() + query.map_or(0, |q| q.len() + 1));
    out.push_str(base_path);
    out.push_str(rest);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
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
            assert_eq!(check(p, &[]), Err(PathRejection::DotSegment), "{p}");
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
            assert_eq!(check(p, &[]), Ok(()), "{p}");
        }
    }

    #[test]
    fn asterisk_form_is_not_a_path() {
        assert_eq!(check("*", &[]), Err(PathRejection::NotAPath));
    }

    #[test]
    fn allow_paths_match_decoded() {
        let allow = vec!["/backoffice/api/".to_string()];
        assert_eq!(check("/backoffice/api/x", &allow), Ok(()));
        assert_eq!(check("/backoffice%2Fapi/x", &allow), Ok(()));
        assert_eq!(check("/other", &allow), Err(PathRejection::NotAllowed));
    }

    #[test]
    fn joins_with_one_slash_and_raw_query() {
        assert_eq!(
            join("/paymentiq/", "/backoffice/api/x", Some("a=%20&b=+")),
            "/paymentiq/backoffice/api/x?a=%20&b=+"
        );
        assert_eq!(join("/", "/x", None), "/x");
        assert_eq!(join("/base/", "//x", None), "/base/x");
    }
}
