//! `token-sidecar check --live`: one real grant per credentials profile
//! against its token endpoint, classified and explained, printing no secret.

use std::time::Duration;

use crate::config::{Config, CredentialsConfig};
use crate::token::client::{Credentials, Grant, HttpTokenClient, TokenEndpoint};

/// Exit code of `check` for a valid config (and of a clean stop).
pub const EXIT_OK: i32 = 0;
/// Exit code of a start-up failure (an address in use, TLS set-up, ...).
pub const EXIT_START_FAILED: i32 = 1;
/// Exit code for a configuration error (also of a normal start).
pub const EXIT_CONFIG: i32 = 2;
/// Exit code of `check --live` when a grant failed.
pub const EXIT_LIVE_FAILED: i32 = 3;
/// Exit code of a command line that cannot be parsed (sysexits' `EX_USAGE`),
/// kept apart from a configuration error.
pub const EXIT_USAGE: i32 = 64;

/// Performs one grant per credentials profile, each with the profile's own
/// grant (password or client_credentials); returns the lines to print (one
/// per profile) and the exit code: [`EXIT_LIVE_FAILED`] if any failed.
pub async fn live(config: &Config) -> (String, i32) {
    let mut lines = Vec::new();
    let mut code = EXIT_OK;
    for profile in &config.credentials {
        let (line, ok) = live_one(profile).await;
        // The single-upstream form's one profile needs no name.
        let label = if config.single_upstream {
            String::new()
        } else {
            format!(" ({})", profile.table)
        };
        let (head, rest) = line.split_once(':').unwrap_or((&line, ""));
        lines.push(format!("{head}{label}:{rest}"));
        if !ok {
            code = EXIT_LIVE_FAILED;
        }
    }
    (lines.join("\n"), code)
}

/// One profile's grant: the line (`live check: ...` or `live check failed:
/// ...`) and whether it succeeded.
async fn live_one(profile: &CredentialsConfig) -> (String, bool) {
    let tls = match crate::tls::client_config(profile.ca_file.as_deref()) {
        Ok(t) => t,
        Err(e) => return (format!("live check failed: {e}"), false),
    };
    let client = match HttpTokenClient::new(profile.clone(), tls) {
        Ok(c) => c,
        Err(e) => {
            return (
                format!(
                    "live check failed: cannot build the HTTP client: {}",
                    e.without_url()
                ),
                false,
            )
        }
    };
    let credentials = match Credentials::load(profile) {
        Ok(c) => c,
        Err(e) => return (format!("live check failed: {}", e.describe()), false),
    };
    let grant = Grant::login(&profile.login);
    let kind = grant.kind();
    let timeout = profile.timeout;
    let result = tokio::time::timeout(
        timeout + Duration::from_secs(1),
        client.request(&grant, &credentials, timeout),
    )
    .await;
    match result {
        Ok(Ok(t)) => (
            format!(
                "live check: success: the {kind} grant returned a bearer token valid for {} s (refresh token: {})",
                t.lifetime.as_secs(),
                if t.refresh_token.is_some() { "yes" } else { "no" }
            ),
            true,
        ),
        Ok(Err(e)) => (
            format!(
                "live check failed: {} ({}): {}",
                e.code(),
                crate::token::refresher::error_chain(&e),
                e.cause(kind).hint_in(&profile.table)
            ),
            false,
        ),
        Err(_) => (
            format!(
                "live check failed: timeout: no answer within {}.timeout ({timeout:?})",
                profile.table
            ),
            false,
        ),
    }
}
