//! What can go wrong while asking for a token, and what each failure means
//! for the refresh loop.

use std::fmt;
use std::time::Duration;

use crate::secret::SecretFileError;

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

/// A failed token request. No variant holds a secret: descriptions are
/// redacted before they are stored, and transport errors have their URL
/// removed (with `params_in = "query"` the URL holds the password).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The server answered with an OAuth error (RFC 6749 5.2).
    #[error("token endpoint answered {status} {code}{}", description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Rejected {
        status: u16,
        code: String,
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

/// The `outcome` label of `token_sidecar_token_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    /// An OAuth error answer.
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

impl TokenError {
    /// Classifies by the OAuth `error` code and the grant, not the status
    /// alone: servers disagree on 400 versus 401 for the same problem.
    pub fn class(&self, grant: GrantKind) -> ErrorClass {
        match self {
            TokenError::Rejected { status, code, .. } => {
                if *status >= 500 || *status == 429 || TRANSIENT_CODES.contains(&code.as_str()) {
                    ErrorClass::Transient
                } else if grant == GrantKind::RefreshToken && !CLIENT_CODES.contains(&code.as_str())
                {
                    // invalid_grant, Spring's 401 invalid_token, invalid_request
                    // for an unknown token: the password grant will tell
                    // whether the credentials themselves are wrong.
                    ErrorClass::RefreshRefused
                } else {
                    ErrorClass::Permanent
                }
            }
            TokenError::Status { status } => {
                if *status >= 500 || *status == 429 || *status == 408 {
                    ErrorClass::Transient
                } else {
                    ErrorClass::Permanent
                }
            }
            TokenError::Transport(_)
            | TokenError::Timeout(_)
            | TokenError::Invalid(_)
            | TokenError::NotJson(_)
            | TokenError::TooLarge(_) => ErrorClass::Transient,
            TokenError::SecretFile(_) => ErrorClass::Permanent,
        }
    }

    pub fn outcome(&self) -> Outcome {
        match self {
            TokenError::Rejected { .. } => Outcome::Rejected,
            _ => Outcome::Error,
        }
    }

    /// A short machine-readable code for logs and `/status`: the OAuth
    /// `error` when the server gave one.
    pub fn code(&self) -> &str {
        match self {
            TokenError::Rejected { code, .. } => code,
            TokenError::Status { .. } => "http_status",
            TokenError::Transport(_) => "transport",
            TokenError::Timeout(_) => "timeout",
            TokenError::Invalid(_) | TokenError::NotJson(_) => "invalid_response",
            TokenError::TooLarge(_) => "response_too_large",
            TokenError::SecretFile(_) => "secret_file",
        }
    }

    /// What an operator should check, for `check --live` and error logs.
    pub fn hint(&self, grant: GrantKind) -> &'static str {
        match (self, grant) {
            (TokenError::Rejected { code, .. }, _)
                if code == "invalid_client" || code == "unauthorized_client" =>
            {
                "the client id or client secret is wrong, or the client may not use this grant"
            }
            (TokenError::Rejected { code, .. }, GrantKind::Password)
                if code == "invalid_grant" || code == "invalid_request" =>
            {
                "the username or password is wrong, or the backoffice user is locked"
            }
            (TokenError::Rejected { code, .. }, _) if code == "unsupported_grant_type" => {
                "the server does not allow this grant for this client"
            }
            (TokenError::Rejected { code, .. }, _) if code == "invalid_scope" => {
                "oauth.scope is not allowed"
            }
            (TokenError::Status { status: 404 | 405 }, _) => "oauth.token_url is probably wrong",
            (TokenError::Transport(_), _) => {
                "the token endpoint is unreachable: check oauth.token_url, DNS, egress proxy"
            }
            (TokenError::Timeout(_), _) => "the token endpoint did not answer within oauth.timeout",
            (TokenError::Invalid(_) | TokenError::NotJson(_) | TokenError::TooLarge(_), _) => {
                "the answer is not an OAuth token response: is oauth.token_url the token endpoint?"
            }
            (TokenError::SecretFile(_), _) => "a secret file is missing or unreadable",
            _ => "see the error code",
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
    }

    #[test]
    fn outcome_labels() {
        assert_eq!(rejected(400, "invalid_grant").outcome(), Outcome::Rejected);
        assert_eq!(TokenError::Status { status: 500 }.outcome(), Outcome::Error);
    }
}
