//! What can go wrong while asking for a token, and what each failure means
//! for the refresh loop.

use std::fmt;
use std::time::Duration;

use crate::secret::{redact_text, SecretFileError};

/// The two grants the sidecar uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantKind {
    Password,
    RefreshToken,
}

impl GrantKind {
    /// The OAuth `grant_type` value, also the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantKind::Password => "password",
            GrantKind::RefreshToken => "refresh_token",
        }
    }
}

impl fmt::Display for GrantKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An OAuth `error` code as a server sent it.
///
/// Policy (the error class, the hint) reads the raw text; every output (logs,
/// `/status`, `check --live`, `Debug`) shows [`ErrorCode::as_str`], the text
/// redacted like any server-supplied text: a registered code passes
/// untouched, but a server may put anything in `error`, an echoed token
/// included.
#[derive(Clone, PartialEq, Eq)]
pub struct ErrorCode {
    raw: String,
    shown: String,
}

impl ErrorCode {
    /// `raw` as received; `known` are the secrets the request carried.
    pub fn new(raw: &str, known: &[&str]) -> Self {
        ErrorCode {
            raw: raw.to_owned(),
            shown: redact_text(raw, known),
        }
    }

    /// Whether the server's code is exactly `code`.
    pub fn is(&self, code: &str) -> bool {
        self.raw == code
    }

    fn is_one_of(&self, codes: &[&str]) -> bool {
        codes.contains(&self.raw.as_str())
    }

    /// The code as it may be shown.
    pub fn as_str(&self) -> &str {
        &self.shown
    }
}

/// A code from a test or a stand-in endpoint, with no secret to hide.
impl From<&str> for ErrorCode {
    fn from(raw: &str) -> Self {
        ErrorCode::new(raw, &[])
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.shown, f)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// A failed token request. No variant shows a secret: descriptions are
/// redacted before they are stored, codes are shown redacted, and transport
/// errors have their URL removed (with `params_in = "query"` the URL holds
/// the password).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The server answered with an OAuth error (RFC 6749 5.2).
    #[error("token endpoint answered {status} {code}{}", description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Rejected {
        status: u16,
        code: ErrorCode,
        /// Redacted `error_description`.
        description: Option<String>,
    },
    /// A non-success status without an OAuth error body.
    #[error("token endpoint answered HTTP {status} without an OAuth error")]
    Status { status: u16 },
    #[error("could not reach the token endpoint")]
    Transport(#[source] reqwest::Error),
    #[error("token request timed out after {0:?}")]
    Timeout(Duration),
    /// The answer was not a usable token response.
    #[error("token response is invalid: {0}")]
    Invalid(&'static str),
    #[error("token response is not JSON")]
    NotJson(#[source] serde_json::Error),
    #[error("token response is larger than {0} bytes")]
    TooLarge(usize),
    #[error(transparent)]
    SecretFile(#[from] SecretFileError),
}

/// What the refresh loop does about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Worth retrying soon: the server or the network had a problem.
    Transient,
    /// Retrying with the same credentials will fail the same way, and repeated
    /// failed logins can lock the backoffice user: retry slowly, or at once
    /// when a secret file changes.
    Permanent,
    /// The refresh token is no good any more: drop it and do the password
    /// grant at once.
    RefreshRefused,
}

/// What most probably went wrong, in an operator's terms: the one diagnosis
/// that both the error class and the hint are read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The client id or secret was refused, or the client may not use the grant.
    ClientRefused,
    /// The username or password was refused, or the user is locked.
    UserRefused,
    /// The refresh token is expired, revoked or unknown.
    RefreshTokenRefused,
    /// The server does not allow this grant for this client.
    GrantUnsupported,
    ScopeRefused,
    /// 404 or 405: not the token endpoint.
    TokenUrlWrong,
    /// 5xx, 429, 408, or an OAuth code for the server's own trouble.
    ServerTrouble,
    Unreachable,
    Timeout,
    /// A 2xx that is not a usable token response.
    NotOAuth,
    SecretFile,
    /// Nothing more specific can be said than the code.
    Unknown,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::ClientRefused => "client_refused",
            Cause::UserRefused => "user_refused",
            Cause::RefreshTokenRefused => "refresh_token_refused",
            Cause::GrantUnsupported => "grant_unsupported",
            Cause::ScopeRefused => "scope_refused",
            Cause::TokenUrlWrong => "token_url_wrong",
            Cause::ServerTrouble => "server_trouble",
            Cause::Unreachable => "unreachable",
            Cause::Timeout => "timeout",
            Cause::NotOAuth => "not_oauth",
            Cause::SecretFile => "secret_file",
            Cause::Unknown => "unknown",
        }
    }

    /// What the refresh loop does about it.
    pub fn class(self) -> ErrorClass {
        match self {
            Cause::ServerTrouble | Cause::Unreachable | Cause::Timeout | Cause::NotOAuth => {
                ErrorClass::Transient
            }
            Cause::RefreshTokenRefused => ErrorClass::RefreshRefused,
            Cause::ClientRefused
            | Cause::UserRefused
            | Cause::GrantUnsupported
            | Cause::ScopeRefused
            | Cause::TokenUrlWrong
            | Cause::SecretFile
            | Cause::Unknown => ErrorClass::Permanent,
        }
    }

    /// What an operator should check, for `check --live`, error logs and `/status`.
    pub fn hint(self) -> &'static str {
        match self {
            Cause::ClientRefused => {
                "the client id or client secret is wrong (oauth.client_id, oauth.client_secret, \
                 oauth.client_auth), or the client may not use this grant"
            }
            Cause::UserRefused => {
                "the username or password is wrong, or the backoffice user is locked"
            }
            Cause::RefreshTokenRefused => {
                "the refresh token was refused; the password grant takes over"
            }
            Cause::GrantUnsupported => "the server does not allow this grant for this client",
            Cause::ScopeRefused => "oauth.scope is not allowed",
            Cause::TokenUrlWrong => "oauth.token_url is probably wrong",
            Cause::ServerTrouble => "the token endpoint reports trouble of its own; retrying",
            Cause::Unreachable => {
                "the token endpoint is unreachable: check oauth.token_url, DNS, egress proxy"
            }
            Cause::Timeout => "the token endpoint did not answer within oauth.timeout",
            Cause::NotOAuth => {
                "the answer is not an OAuth token response: is oauth.token_url the token endpoint?"
            }
            Cause::SecretFile => "a secret file is missing, unreadable or empty",
            Cause::Unknown => "see the error code",
        }
    }
}

/// The `outcome` label of `token_sidecar_token_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    /// The server said no: an OAuth error answer, or a 401.
    Rejected,
    /// Transport, timeout, 5xx, 429, unparseable.
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Rejected => "rejected",
            Outcome::Error => "error",
        }
    }
}

/// OAuth codes that a server uses for its own temporary trouble.
const TRANSIENT_CODES: &[&str] = &["temporarily_unavailable", "server_error", "slow_down"];
/// Codes that say the client itself is wrong: the password grant would fail too.
const CLIENT_CODES: &[&str] = &["invalid_client", "unauthorized_client"];
/// The codes with which a refresh token is refused in a 401 (Spring's
/// `invalid_token`); any other 401 refuses the client.
const REFRESH_401_CODES: &[&str] = &["invalid_token", "invalid_grant"];

impl TokenError {
    /// The diagnosis, by the raw OAuth `error` code, the status and the
    /// grant: servers disagree on 400 versus 401 for the same problem, but a
    /// 401 from a token endpoint means the client authentication failed
    /// (RFC 6749 5.2), whatever the body says (Spring answers a wrong client
    /// secret with `unauthorized` or `Unauthorized`), except for the codes
    /// with which a refresh token is refused.
    pub fn cause(&self, grant: GrantKind) -> Cause {
        match self {
            TokenError::Rejected { status, code, .. } => {
                if *status >= 500 || *status == 429 || code.is_one_of(TRANSIENT_CODES) {
                    Cause::ServerTrouble
                } else if code.is_one_of(CLIENT_CODES) {
                    Cause::ClientRefused
                } else if *status == 401 {
                    if grant == GrantKind::RefreshToken && code.is_one_of(REFRESH_401_CODES) {
                        Cause::RefreshTokenRefused
                    } else {
                        Cause::ClientRefused
                    }
                } else if grant == GrantKind::RefreshToken {
                    // invalid_grant, invalid_request for an unknown token, ...:
                    // the password grant will tell whether the credentials
                    // themselves are wrong.
                    Cause::RefreshTokenRefused
                } else if code.is("invalid_grant") || code.is("invalid_request") {
                    Cause::UserRefused
                } else if code.is("unsupported_grant_type") {
                    Cause::GrantUnsupported
                } else if code.is("invalid_scope") {
                    Cause::ScopeRefused
                } else {
                    Cause::Unknown
                }
            }
            TokenError::Status { status } => match status {
                500.. | 429 | 408 => Cause::ServerTrouble,
                401 => Cause::ClientRefused,
                404 | 405 => Cause::TokenUrlWrong,
                _ => Cause::Unknown,
            },
            TokenError::Transport(_) => Cause::Unreachable,
            TokenError::Timeout(_) => Cause::Timeout,
            TokenError::Invalid(_) | TokenError::NotJson(_) | TokenError::TooLarge(_) => {
                Cause::NotOAuth
            }
            TokenError::SecretFile(_) => Cause::SecretFile,
        }
    }

    /// What the refresh loop does about this failure.
    pub fn class(&self, grant: GrantKind) -> ErrorClass {
        self.cause(grant).class()
    }

    /// What an operator should check.
    pub fn hint(&self, grant: GrantKind) -> &'static str {
        self.cause(grant).hint()
    }

    pub fn outcome(&self) -> Outcome {
        match self {
            TokenError::Rejected { .. } | TokenError::Status { status: 401 } => Outcome::Rejected,
            _ => Outcome::Error,
        }
    }

    /// A short machine-readable code for logs and `/status`: the OAuth
    /// `error` when the server gave one (as it may be shown).
    pub fn code(&self) -> &str {
        match self {
            TokenError::Rejected { code, .. } => code.as_str(),
            TokenError::Status { .. } => "http_status",
            TokenError::Transport(_) => "transport",
            TokenError::Timeout(_) => "timeout",
            TokenError::Invalid(_) | TokenError::NotJson(_) => "invalid_response",
            TokenError::TooLarge(_) => "response_too_large",
            TokenError::SecretFile(_) => "secret_file",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(status: u16, code: &str) -> TokenError {
        TokenError::Rejected {
            status,
            code: code.into(),
            description: None,
        }
    }

    #[test]
    fn classifies_by_code_and_grant() {
        use ErrorClass::*;
        use GrantKind::*;
        assert_eq!(rejected(400, "invalid_grant").class(Password), Permanent);
        assert_eq!(
            rejected(400, "invalid_grant").class(RefreshToken),
            RefreshRefused
        );
        assert_eq!(
            rejected(401, "invalid_token").class(RefreshToken),
            RefreshRefused
        );
        assert_eq!(
            rejected(401, "invalid_client").class(RefreshToken),
            Permanent
        );
        assert_eq!(rejected(400, "invalid_client").class(Password), Permanent);
        assert_eq!(
            rejected(503, "temporarily_unavailable").class(Password),
            Transient
        );
        assert_eq!(rejected(429, "invalid_request").class(Password), Transient);
        assert_eq!(
            TokenError::Status { status: 502 }.class(Password),
            Transient
        );
        assert_eq!(
            TokenError::Status { status: 404 }.class(Password),
            Permanent
        );
        assert_eq!(TokenError::Invalid("x").class(Password), Transient);
        // Classified on the raw code: 23 characters, not redacted away.
        assert_eq!(
            rejected(400, "temporarily_unavailable").class(Password),
            Transient
        );
    }

    #[test]
    fn a_401_refuses_the_client_whatever_its_body_says() {
        use GrantKind::*;
        for code in [
            "unauthorized",
            "Unauthorized",
            "invalid_request",
            "access_denied",
        ] {
            for grant in [Password, RefreshToken] {
                let e = rejected(401, code);
                assert_eq!(e.cause(grant), Cause::ClientRefused, "{code} {grant}");
                assert_eq!(e.class(grant), ErrorClass::Permanent, "{code} {grant}");
                assert!(e.hint(grant).contains("client secret"), "{code} {grant}");
            }
        }
        assert_eq!(
            TokenError::Status { status: 401 }.cause(Password),
            Cause::ClientRefused
        );
        assert_eq!(
            TokenError::Status { status: 401 }.outcome(),
            Outcome::Rejected
        );
        // The refresh token, not the client, is refused with these.
        for code in ["invalid_token", "invalid_grant"] {
            assert_eq!(
                rejected(401, code).cause(RefreshToken),
                Cause::RefreshTokenRefused
            );
            assert_eq!(rejected(401, code).cause(Password), Cause::ClientRefused);
        }
    }

    #[test]
    fn a_code_is_shown_redacted_but_classified_raw() {
        let e = TokenError::Rejected {
            status: 400,
            code: ErrorCode::new("invalid_grant", &["invalid_grant"]),
            description: None,
        };
        // The server echoed the password as its code: never shown...
        assert_eq!(e.code(), "[redacted]");
        assert!(!format!("{e} {e:?}").contains("invalid_grant"));
        // ...yet the policy still read it.
        assert_eq!(e.cause(GrantKind::Password), Cause::UserRefused);
        assert_eq!(
            rejected(400, "unsupported_grant_type").code(),
            "unsupported_grant_type"
        );
        assert_eq!(
            rejected(400, "unsupported_grant_type").hint(GrantKind::Password),
            "the server does not allow this grant for this client"
        );
    }

    #[test]
    fn outcome_labels() {
        assert_eq!(rejected(400, "invalid_grant").outcome(), Outcome::Rejected);
        assert_eq!(TokenError::Status { status: 500 }.outcome(), Outcome::Error);
    }
}
