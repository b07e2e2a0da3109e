//! The answers the sidecar makes itself, in one place: each error's status,
//! code and message, the JSON body `{"error": code, "message": ...}`, and
//! how a failed upstream exchange is classified, whichever engine had it.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};

use crate::metrics::LocalError;

/// A failed upstream exchange, as either engine reports it.
pub type UpstreamError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no valid access token is available; retry later")]
    TokenUnavailable { retry_after: u64 },
    #[error("the upstream could not be reached")]
    UpstreamUnavailable(#[source] UpstreamError),
    #[error(
        "TLS handshake with the upstream failed (check proxy.ca_file and the upstream certificate)"
    )]
    UpstreamTls(#[source] UpstreamError),
    #[error("the upstream sent an invalid response")]
    BadUpstreamResponse(#[source] BadResponse),
    #[error("the upstream did not send response headers within proxy.request_timeout")]
    UpstreamTimeout,
    /// The client stopped sending its request body for `proxy.body_idle_timeout`.
    #[error("the request body stalled for longer than proxy.body_idle_timeout")]
    ClientBodyTimeout,
    /// The client's request body broke off or was malformed.
    #[error("the request body could not be read")]
    ClientBody(#[source] UpstreamError),
    #[error("{0}")]
    BadRequest(&'static str),
    /// The request's framing cannot be trusted: where its body ends is
    /// unknown, so the connection closes after the answer.
    #[error("{0}")]
    BadFraming(&'static str),
    #[error("the request head is larger than the proxy accepts")]
    HeaderTooLarge,
    #[error(
        "the request uses a transfer coding other than chunked, which the proxy does not apply"
    )]
    UnsupportedTransferCoding,
    #[error("method not allowed through this proxy")]
    MethodNotAllowed,
    #[error("path not allowed by proxy.allow_paths")]
    PathNotAllowed,
    #[error("no route matches the request path")]
    NoRoute,
}

/// Why an upstream response head is unusable (502): the same rules on both
/// engines ([`super::policy::Policy::check_response`]).
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum BadResponse {
    #[error("malformed response head")]
    Malformed,
    #[error("response head too large")]
    TooLarge,
    #[error("status code {0} out of range")]
    Status(u16),
    #[error("invalid Content-Length")]
    ContentLength,
    #[error("a transfer coding other than chunked, or one in an HTTP/1.0 response")]
    TransferCoding,
    #[error("101 Switching Protocols to a request that asked for no upgrade")]
    UnaskedSwitch,
}

/// A client's request body that failed while it was being sent upstream:
/// the client's fault, not the upstream's (both engines report it so, and
/// [`ProxyError::from_upstream`] finds it in the error chain).
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error("no data for {0:?} (proxy.body_idle_timeout)")]
    Idle(Duration),
    #[error("body stream failed")]
    Broken(#[source] UpstreamError),
}

impl ProxyError {
    /// Classifies a failed upstream exchange by its error chain: the
    /// client's request body (stalled or broken), TLS, a response head
    /// that arrived but cannot be read (as the lane's parser reports it,
    /// so hyper's client is read the same way), or the upstream.
    pub fn from_upstream(e: UpstreamError) -> ProxyError {
        match client_body_error(&*e) {
            Some(ClientBodyError::Idle(_)) => ProxyError::ClientBodyTimeout,
            Some(ClientBodyError::Broken(_)) => ProxyError::ClientBody(e),
            None if crate::tls::is_tls_error(&*e) => ProxyError::UpstreamTls(e),
            None => match unreadable_head(&*e) {
                Some(bad) => ProxyError::BadUpstreamResponse(bad),
                None => ProxyError::UpstreamUnavailable(e),
            },
        }
    }

    /// The `error` code, also the `token_sidecar_local_responses_total` label.
    pub fn code(&self) -> LocalError {
        match self {
            ProxyError::TokenUnavailable { .. } => LocalError::TokenUnavailable,
            ProxyError::UpstreamUnavailable(_)
            | ProxyError::UpstreamTls(_)
            | ProxyError::BadUpstreamResponse(_) => LocalError::UpstreamUnavailable,
            ProxyError::UpstreamTimeout => LocalError::UpstreamTimeout,
            ProxyError::ClientBodyTimeout => LocalError::RequestTimeout,
            ProxyError::BadRequest(_) | ProxyError::BadFraming(_) | ProxyError::ClientBody(_) => {
                LocalError::BadRequest
            }
            ProxyError::HeaderTooLarge => LocalError::RequestHeaderTooLarge,
            ProxyError::UnsupportedTransferCoding => LocalError::UnsupportedTransferCoding,
            ProxyError::MethodNotAllowed => LocalError::MethodNotAllowed,
            ProxyError::PathNotAllowed => LocalError::PathNotAllowed,
            ProxyError::NoRoute => LocalError::NoRoute,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::TokenUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnavailable(_)
            | ProxyError::UpstreamTls(_)
            | ProxyError::BadUpstreamResponse(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ClientBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BadRequest(_) | ProxyError::BadFraming(_) | ProxyError::ClientBody(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::PathNotAllowed => StatusCode::FORBIDDEN,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
        }
    }

    /// Whether the connection closes after this answer: the rest of the
    /// request (its body, or a head that could not be read) is still on
    /// the connection, and would be read as the next request.
    pub fn closes(&self) -> bool {
        matches!(
            self,
            ProxyError::ClientBodyTimeout
                | ProxyError::ClientBody(_)
                | ProxyError::BadFraming(_)
                | ProxyError::HeaderTooLarge
                | ProxyError::UnsupportedTransferCoding
        )
    }

    /// The JSON body of the answer.
    pub fn body(&self) -> Bytes {
        Bytes::from(json_error(self.code().as_str(), &self.to_string()))
    }

    /// The header fields of the answer, besides framing, `Date` and
    /// `X-Request-Id`.
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(6);
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.closes() {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        match self {
            ProxyError::TokenUnavailable { retry_after } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            ProxyError::MethodNotAllowed => {
                h.insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE"),
                );
            }
            _ => {}
        }
        h
    }
}

/// The client's request body failure that made sending fail, if that is why
/// (so a stalled or broken upload is not blamed on the upstream).
fn client_body_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a ClientBodyError> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(b) = err.downcast_ref::<ClientBodyError>() {
            return Some(b);
        }
        cur = err.source();
    }
    None
}

/// A response head that hyper's client could not parse, as the policy
/// names it ([`BadResponse`]).
fn unreadable_head(e: &(dyn std::error::Error + 'static)) -> Option<BadResponse> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            return if h.is_parse_too_large() {
                Some(BadResponse::TooLarge)
            } else if h.is_parse() || h.is_parse_status() {
                Some(BadResponse::Malformed)
            } else {
                None
            };
        }
        cur = err.source();
    }
    None
}

/// `{"error": code, "message": message}`.
pub fn json_error(code: &str, message: &str) -> String {
    serde_json::json!({ "error": code, "message": message }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("send failed")]
    struct Wrapper(#[source] UpstreamError);

    #[test]
    fn a_failed_exchange_is_classified_by_its_cause() {
        let idle = Wrapper(Box::new(ClientBodyError::Idle(Duration::from_secs(1))));
        assert!(matches!(
            ProxyError::from_upstream(Box::new(idle)),
            ProxyError::ClientBodyTimeout
        ));
        let broken = ClientBodyError::Broken(Box::new(std::io::Error::from(
            std::io::ErrorKind::UnexpectedEof,
        )));
        assert_eq!(
            ProxyError::from_upstream(Box::new(Wrapper(Box::new(broken)))).status(),
            StatusCode::BAD_REQUEST
        );
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            ProxyError::from_upstream(Box::new(refused)).status(),
            StatusCode::BAD_GATEWAY
        );
    }
}
