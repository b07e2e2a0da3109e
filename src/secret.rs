//! Secrets: where they come from and how they are kept out of every output.
//!
//! Values live in [`secrecy::SecretString`], whose `Debug` prints `[REDACTED]`,
//! so a secret can only reach a log line through an explicit `expose_secret()`.
//! A `*_file` secret is read afresh on every use: Kubernetes rotates a mounted
//! Secret by swapping a symlink, and a fresh read is the one method that cannot
//! miss such a swap. [`LiveSecret`] is that read as the token task does it:
//! the last good value stands in for a file found empty or unreadable, and
//! its fingerprint lets the task notice a change cheaply so it can retry at
//! once after a rejected login.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};

/// Where one secret comes from.
#[derive(Clone)]
pub enum SecretSource {
    /// Written in the config (the TOML file or an environment variable).
    Inline(SecretString),
    /// Read from this file on every use; one trailing newline is trimmed.
    File(PathBuf),
}

/// A secret file that cannot be used. Names the path, never the content.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("cannot read secret file {path}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Nothing is left once one trailing newline is trimmed: sent, it would
    /// be a failed login that counts towards locking the user.
    #[error("secret file {path} is empty")]
    Empty { path: PathBuf },
}

impl SecretFileError {
    /// The message with its cause, for a config problem or a log line.
    pub fn describe(&self) -> String {
        match self {
            SecretFileError::Unreadable { source, .. } => format!("{self}: {source}"),
            SecretFileError::Empty { .. } => self.to_string(),
        }
    }
}

impl SecretSource {
    /// The current value (a file is read now).
    pub fn load(&self) -> Result<SecretString, SecretFileError> {
        match self {
            SecretSource::Inline(s) => Ok(s.clone()),
            SecretSource::File(path) => read_secret_file(path),
        }
    }
}

/// A secret as the token task uses it at run time: named by its config key,
/// read afresh before every use, and remembered. A file found empty or
/// unreadable after it was once good (a half-written update, a volume being
/// remounted) does not turn into a failed login: the last good value stands
/// in, and the caller reports the problem.
#[derive(Clone)]
pub struct LiveSecret {
    key: String,
    source: SecretSource,
    last_good: Option<SecretString>,
}

/// One read of a [`LiveSecret`].
pub struct SecretRead {
    pub value: SecretString,
    /// Why the file's current content was not used (the value is the last
    /// good one).
    pub problem: Option<SecretFileError>,
}

impl LiveSecret {
    /// `key` names the secret in logs and metrics (`oauth.password_file`).
    pub fn new(key: impl Into<String>, source: SecretSource) -> Self {
        LiveSecret {
            key: key.into(),
            source,
            last_good: None,
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether it is read from a file (and so can change or go bad).
    pub fn is_file(&self) -> bool {
        matches!(self.source, SecretSource::File(_))
    }

    /// Reads the secret now. An error only when it was never good.
    pub fn read(&mut self) -> Result<SecretRead, SecretFileError> {
        match (self.source.load(), &self.last_good) {
            (Ok(value), _) => {
                self.last_good = Some(value.clone());
                Ok(SecretRead {
                    value,
                    problem: None,
                })
            }
            (Err(problem), Some(last)) => Ok(SecretRead {
                value: last.clone(),
                problem: Some(problem),
            }),
            (Err(problem), None) => Err(problem),
        }
    }

    /// A hash of the value last read, to notice rotation without keeping a
    /// second copy. `None` for inline secrets, which never change, and for a
    /// file never read successfully.
    pub fn fingerprint(&self) -> Option<u64> {
        match self.source {
            SecretSource::Inline(_) => None,
            SecretSource::File(_) => {
                let value = self.last_good.as_ref()?;
                let mut h = std::collections::hash_map::DefaultHasher::new();
                value.expose_secret().hash(&mut h);
                Some(h.finish())
            }
        }
    }
}

impl fmt::Debug for LiveSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveSecret")
            .field("key", &self.key)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Inline(_) => f.write_str("Inline([redacted])"),
            SecretSource::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

fn read_secret_file(path: &Path) -> Result<SecretString, SecretFileError> {
    let mut text = std::fs::read_to_string(path).map_err(|source| SecretFileError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    trim_one_newline(&mut text);
    if text.is_empty() {
        return Err(SecretFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(SecretString::from(text))
}

/// `echo secret > file` and `kubectl create secret --from-file` leave one
/// trailing newline that is not part of the secret; more than one is kept,
/// since a secret may really end in white space.
pub fn trim_one_newline(text: &mut String) {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
}

/// Shortest run of token-like characters that [`redact_text`] hides.
///
/// Access and refresh tokens (opaque or JWT) are far longer; ordinary words
/// are shorter. Some registered OAuth error codes are not
/// (`temporarily_unavailable` has 23 characters): those are spared by name,
/// see [`OAUTH_ERROR_CODES`].
pub const REDACT_MIN_RUN: usize = 20;

/// The registered OAuth error codes: RFC 6749 5.2 (token endpoint) and
/// 4.1.2.1 (authorization endpoint), RFC 6750 3.1 (resource server).
///
/// They are the vocabulary an operator looks up, never a secret, so
/// [`redact_text`] lets a run that is exactly one of them through untouched
/// wherever it stands. A run that merely contains one (`invalid_grant.eyJ...`)
/// is still a token-like run and still hidden.
pub const OAUTH_ERROR_CODES: &[&str] = &[
    // RFC 6749 5.2
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    // RFC 6749 4.1.2.1 (besides those above)
    "access_denied",
    "unsupported_response_type",
    "server_error",
    "temporarily_unavailable",
    // RFC 6750 3.1 (besides invalid_request)
    "invalid_token",
    "insufficient_scope",
];

/// Whether `code` is one of [`OAUTH_ERROR_CODES`].
pub fn is_registered_error_code(code: &str) -> bool {
    OAUTH_ERROR_CODES.contains(&code)
}

/// Longest text kept from a server's `error_description`.
pub const DESCRIPTION_MAX_CHARS: usize = 200;

/// Makes server-supplied text safe to log.
///
/// Servers echo tokens (and sometimes the submitted credentials) in
/// `error_description`, raw or in the encoding they received them in, so
/// every `known` secret is replaced wherever it stands, raw, percent-encoded
/// or base64-encoded; every run of [`REDACT_MIN_RUN`] or more token-like
/// characters (percent-escapes included) is replaced unless it is exactly a
/// registered OAuth error code ([`OAUTH_ERROR_CODES`]); and the result is cut
/// to [`DESCRIPTION_MAX_CHARS`].
pub fn redact_text(text: &str, known: &[&str]) -> String {
    // Control characters go first: dropped after the replacement below, they
    // would join the halves of a secret split by them.
    let mut out: String = text.chars().filter(|c| !c.is_control()).collect();
    for secret in known {
        // Cleaned the same way, or a secret holding a control character
        // would no longer match the text it was echoed in.
        let secret: String = secret.chars().filter(|c| !c.is_control()).collect();
        if secret.len() < 3 {
            continue;
        }
        for form in encoded_forms(&secret) {
            out = out.replace(&form, "[redacted]");
        }
    }
    let mut result = String::with_capacity(out.len());
    let mut run = String::new();
    let flush = |run: &mut String, result: &mut String| {
        if run.chars().count() >= REDACT_MIN_RUN && !is_registered_error_code(run) {
            result.push_str("[redacted]");
        } else {
            result.push_str(run);
        }
        run.clear();
    };
    for c in out.chars() {
        if c.is_ascii_alphanumeric() || "-._~+/=%".contains(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut result);
            if !c.is_control() {
                result.push(c);
            }
        }
    }
    flush(&mut run, &mut result);
    if result.chars().count() > DESCRIPTION_MAX_CHARS {
        result = result.chars().take(DESCRIPTION_MAX_CHARS).collect();
        result.push('…');
    }
    result
}

/// A secret as it may travel: raw, in a query or form (`+` for space, or
/// `%20`), and in base64 (standard or URL-safe, padded or not).
fn encoded_forms(secret: &str) -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    use base64::Engine;
    let b = secret.as_bytes();
    let mut forms = vec![
        secret.to_owned(),
        url::form_urlencoded::byte_serialize(b).collect(),
        percent_encoding::utf8_percent_encode(secret, percent_encoding::NON_ALPHANUMERIC)
            .to_string(),
        STANDARD.encode(b),
        STANDARD_NO_PAD.encode(b),
        URL_SAFE.encode(b),
        URL_SAFE_NO_PAD.encode(b),
    ];
    // Longest first, so a padded form is not left with a stray `=`.
    forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
    forms.dedup();
    forms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_token_like_runs_and_known_secrets() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.abcdefghijklmnop";
        let s = redact_text(&format!("Invalid refresh token: {jwt}"), &[]);
        assert_eq!(s, "Invalid refresh token: [redacted]");
        let s = redact_text("Bad credentials for p&ss w0rd", &["p&ss w0rd"]);
        assert_eq!(s, "Bad credentials for [redacted]");
        assert_eq!(redact_text("Bad credentials", &[]), "Bad credentials");
    }

    #[test]
    fn redacts_encoded_forms_of_known_secrets() {
        let pw = "p w&d";
        for echoed in ["p+w%26d", "p%20w%26d", "cCB3JmQ=", "cCB3JmQ"] {
            let s = redact_text(&format!("Bad credentials: {echoed}!"), &[pw]);
            assert_eq!(s, "Bad credentials: [redacted]!", "{echoed}");
        }
        let s = redact_text("got Pw%7E9d%40X%20p%26q%3Dr%2Bs%2Ft here", &[]);
        assert_eq!(s, "got [redacted] here");
    }

    #[test]
    fn cuts_long_descriptions() {
        let s = redact_text(&"ab ".repeat(500), &[]);
        assert!(s.chars().count() <= DESCRIPTION_MAX_CHARS + 1);
    }

    #[test]
    fn trims_exactly_one_newline() {
        let mut s = "pw\n\n".to_string();
        trim_one_newline(&mut s);
        assert_eq!(s, "pw\n");
        let mut s = "pw\r\n".to_string();
        trim_one_newline(&mut s);
        assert_eq!(s, "pw");
    }

    #[test]
    fn registered_error_codes_pass_untouched() {
        let s = redact_text("unsupported_grant_type: Unsupported grant type", &[]);
        assert_eq!(s, "unsupported_grant_type: Unsupported grant type");
        assert_eq!(
            redact_text("temporarily_unavailable", &[]),
            "temporarily_unavailable"
        );
        // A longer run that holds a code is still a token-like run.
        assert_eq!(
            redact_text("temporarily_unavailable.eyJhbGciOi", &[]),
            "[redacted]"
        );
        // An unregistered code of that length is not spared.
        assert_eq!(redact_text("some_long_proprietary_code", &[]), "[redacted]");
    }

    #[test]
    fn a_secret_with_a_control_character_is_still_found() {
        let s = redact_text("echo: pass\u{1}word-1", &["pass\u{1}word-1"]);
        assert_eq!(s, "echo: [redacted]");
    }

    /// Pieces of `out` between the markers: what is left of the input.
    fn pieces(out: &str) -> Vec<&str> {
        out.split("[redacted]").collect()
    }

    proptest::proptest! {
        /// Every registered code survives redaction wherever it stands in a
        /// description, whatever secrets are known.
        #[test]
        fn registered_codes_survive(
            i in 0..OAUTH_ERROR_CODES.len(),
            prefix in "[ -~]{0,80}",
            suffix in "[ -~]{0,80}",
            secret in "[!-Z^-~]{8,64}",
        ) {
            let code = OAUTH_ERROR_CODES[i];
            proptest::prop_assume!(!code.contains(&secret) && !prefix.contains(&secret));
            let text = format!("{prefix} {code} {suffix}");
            let out = redact_text(&text, &[&secret]);
            proptest::prop_assert!(out.contains(&format!(" {code} ")), "{text:?} -> {out:?}");
        }

        /// A known secret of 8 to 4096 characters never survives, raw or
        /// encoded as it may travel, wherever it stands in the text. (No
        /// brackets in it, so that an occurrence can only be one the input
        /// held, not one straddling a `[redacted]` marker.)
        #[test]
        fn known_secrets_never_survive(
            secret in "[!-Z^-~\\ ]{8,4096}",
            prefix in "[ -~]{0,40}",
            suffix in "[ -~]{0,40}",
            form in 0usize..7,
        ) {
            let forms = encoded_forms(&secret);
            let echoed = &forms[form % forms.len()];
            let text = format!("{prefix}{echoed}{suffix}");
            let out = redact_text(&text, &[&secret]);
            for piece in pieces(&out) {
                for f in &forms {
                    proptest::prop_assert!(!piece.contains(f.as_str()), "{f:?} in {out:?}");
                }
            }
        }

        /// A token the sidecar does not know (an access token a server
        /// echoes) is hidden by its length alone.
        #[test]
        fn unknown_tokens_never_survive(
            token in "[A-Za-z0-9._~+/-]{20,4096}",
            prefix in "[ -~]{0,40}",
        ) {
            proptest::prop_assume!(!is_registered_error_code(&token));
            let text = format!("{prefix} {token} rest");
            let out = redact_text(&text, &[]);
            proptest::prop_assert!(!out.contains(&token), "{out:?}");
        }
    }

    #[test]
    fn an_empty_file_is_an_error_and_the_last_good_value_stands_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("password");
        std::fs::write(&path, "\n").unwrap();
        let source = SecretSource::File(path.clone());
        assert!(matches!(source.load(), Err(SecretFileError::Empty { .. })));
        let mut live = LiveSecret::new("oauth.password_file", source);
        assert!(live.read().is_err(), "never good: no value");
        assert_eq!(live.fingerprint(), None);

        std::fs::write(&path, "pw-1\n").unwrap();
        let read = live.read().unwrap();
        assert_eq!(read.value.expose_secret(), "pw-1");
        assert!(read.problem.is_none());
        let print = live.fingerprint();
        assert!(print.is_some());

        std::fs::write(&path, "").unwrap();
        let read = live.read().unwrap();
        assert_eq!(read.value.expose_secret(), "pw-1", "the last good value");
        assert_eq!(
            read.problem.unwrap().describe(),
            format!("secret file {} is empty", path.display())
        );
        assert_eq!(live.fingerprint(), print, "no change seen");

        std::fs::remove_file(&path).unwrap();
        let read = live.read().unwrap();
        assert_eq!(read.value.expose_secret(), "pw-1");
        assert!(read
            .problem
            .unwrap()
            .describe()
            .starts_with("cannot read secret file"));
    }

    #[test]
    fn debug_prints_no_secret() {
        let s = SecretSource::Inline(SecretString::from("hunter2".to_string()));
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
