//! The token endpoint's answer, whatever the server sends: never a panic,
//! an accepted token is usable (header-safe, positive lifetime), no known
//! secret survives into an error's text, and a registered OAuth error code
//! is shown as sent.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use secrecy::ExposeSecret;
use token_sidecar::secret::OAUTH_ERROR_CODES;
use token_sidecar::token::client::parse_token_response;
use token_sidecar::token::TokenError;

/// Secrets the sidecar knows (password, client secret, refresh token) and
/// passes to the parser for redaction; a server may echo any of them.
const KNOWN: [&str; 2] = ["s3cr3t-pass", "client-s3cr3t"];

fuzz_target!(|input: (u16, &[u8])| {
    let (status, body) = input;
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    match parse_token_response(status, body, Duration::from_secs(300), now, &KNOWN) {
        Ok(t) => {
            assert!((200..300).contains(&status));
            assert!(
                !t.lifetime.is_zero(),
                "accepted a token that is already expired"
            );
            let token = t.access_token.expose_secret();
            assert!(!token.is_empty());
            assert!(
                http::HeaderValue::try_from(format!("Bearer {token}")).is_ok(),
                "accepted a token no header can carry"
            );
        }
        Err(e) => {
            let text = format!("{e} {e:?}");
            for s in KNOWN {
                assert!(!text.contains(s), "error text leaks {s}: {text}");
            }
            // A registered code is shown as the server sent it.
            let sent = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|j| j.get("error")?.as_str().map(str::to_owned));
            if let (Some(sent), TokenError::Rejected { .. }) = (sent, &e) {
                if OAUTH_ERROR_CODES.contains(&sent.as_str()) {
                    assert_eq!(e.code(), sent, "{text}");
                }
            }
        }
    }
});
