//! The answers the sidecar makes itself, in one place: each error's status,
//! code and message, and the JSON body `{"error": code, "message": ...}`.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};

use super::body::ProxyBody;
use crate::metrics::LocalError;

/// A failed upstream exchange: from the HTTP/1.1 pool or hyper-util's client.
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
    #[error("method not allowed through this proxy")]
    MethodNotAllowed,
    #[error("path not allowed by proxy.allow_paths")]
    PathNotAllowed,
}

impl ProxyError {
    /// The `error` code, also the `token_sidecar_local_responses_total` label.
    pub fn code(&self) -> LocalError {
        match self {
            ProxyError::TokenUnavailable { .. } => LocalError::TokenUnavailable,
            ProxyError::UpstreamUnavailable(_) | ProxyError::UpstreamTls(_) => {
                LocalError::UpstreamUnavailable
            }
            ProxyError::UpstreamTimeout => LocalError::UpstreamTimeout,
            ProxyError::ClientBodyTimeout => LocalError::RequestTimeout,
            ProxyError::BadRequest(_) | ProxyError::ClientBody(_) => LocalError::BadRequest,
            ProxyError::MethodNotAllowed => LocalError::MethodNotAllowed,
            ProxyError::PathNotAllowed => LocalError::PathNotAllowed,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::TokenUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnavailable(_) | ProxyError::UpstreamTls(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ClientBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BadRequest(_) | ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::PathNotAllowed => StatusCode::FORBIDDEN,
        }
    }

    pub fn to_response(&self) -> Response<ProxyBody> {
        let mut resp = Response::new(ProxyBody::full(self.body()));
        *resp.status_mut() = self.status();
        *resp.headers_mut() = self.headers();
        resp
    }

    /// The JSON body of the answer.
    pub fn body(&self) -> Bytes {
        Bytes::from(json_error(self.code().as_str(), &self.to_string()))
    }

    /// The header fields of the answer (hyper adds the framing and `Date`).
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(4);
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if matches!(
            self,
            ProxyError::ClientBodyTimeout | ProxyError::ClientBody(_)
        ) {
            // The rest of the request body is still on the connection.
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

/// `{"error": code, "message": message}`.
pub fn json_error(code: &str, message: &str) -> String {
    serde_json::json!({ "error": code, "message": message }).to_string()
}
