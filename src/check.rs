//! `token-sidecar check --live`: one real password grant against the
//! configured token endpoint, classified and explained, printing no secret.

use std::time::Duration;

use crate::config::Config;
use crate::token::client::{Credentials, Grant, HttpTokenClient, TokenEndpoint};
use crate::token::GrantKind;

/// Exit code of `check` for a valid config (and of a clean stop).
pub const EXIT_OK: i32 = 0;
/// Exit code of a start-up failure (an address in use, TLS set-up, ...).
pub const EXIT_START_FAILED: i32 = 1;
/// Exit code for a configuration error (also of a normal start).
pub const EXIT_CONFIG: i32 = 2;
/// Exit code of `check --live` when the grant failed.
pub const EXIT_LIVE_FAILED: i32 = 3;
/// Exit code of a command line that cannot be parsed (sysexits' `EX_USAGE`),
/// kept apart from a configuration error.
pub const EXIT_USAGE: i32 = 64;

/// Performs one password grant; returns the line to print and the exit code.
pub async fn live(config: &Config) -> (String, i32) {
    let tls = match crate::tls::client_config(config.oauth.ca_file.as_deref()) {
        Ok(t) => t,
        Err(e) => return (format!("live check failed: {e}"), EXIT_LIVE_FAILED),
    };
    let client = match HttpTokenClient::new(config.oauth.clone(), tls) {
        Ok(c) => c,
        Err(e) => {
            return (
                format!(
                    "live check failed: cannot build the HTTP client: {}",
                    e.without_url()
                ),
                EXIT_LIVE_FAILED,
            )
        }
    };
    let credentials = match Credentials::load(&config.oauth) {
        Ok(c) => c,
        Err(e) => {
            return (
                format!("live check failed: {}", e.describe()),
                EXIT_LIVE_FAILED,
            )
        }
    };
    let timeout = config.oauth.timeout;
    let result = tokio::time::timeout(
        timeout + Duration::from_secs(1),
        client.request(&Grant::Password, &credentials, timeout),
    )
    .await;
    match result {
        Ok(Ok(t)) => (
            format!(
                "live check: success: the password grant returned a bearer token valid for {} s (refresh token: {})",
                t.lifetime.as_secs(),
                if t.refresh_token.is_some() { "yes" } else { "no" }
            ),
            EXIT_OK,
        ),
        Ok(Err(e)) => (
            format!(
                "live check failed: {} ({}): {}",
                e.code(),
                crate::token::refresher::error_chain(&e),
                e.hint(GrantKind::Password)
            ),
            EXIT_LIVE_FAILED,
        ),
        Err(_) => (
            format!("live check failed: timeout: no answer within oauth.timeout ({timeout:?})"),
            EXIT_LIVE_FAILED,
        ),
    }
}
