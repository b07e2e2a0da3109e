//! Inputs the fuzz targets in `fuzz/` found, kept as plain tests so the bugs
//! they showed stay fixed without a fuzzer. Each names its target and what
//! was wrong.

use std::time::{Duration, UNIX_EPOCH};

use token_sidecar::token::client::parse_token_response;

const KNOWN: [&str; 2] = ["s3cr3t-pass", "client-s3cr3t"];

fn token_error_text(status: u16, body: &[u8]) -> String {
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let e = parse_token_response(status, body, Duration::from_secs(300), now, &KNOWN)
        .expect_err("an OAuth error answer");
    format!("{e} {e:?}")
}

/// token_response: the OAuth `error` code went to logs and `/status`
/// unredacted (and, on a 200, unfiltered), so a server echoing a secret
/// there leaked it. Minimised from crash-33c480ce.
#[test]
fn token_response_error_code_is_redacted() {
    let found: &[u8] = br#"{"error":"invas3cr3t-passlid_token","errop_description":"Invalid refresh token: abcdefabcdrroralid_token","error_description":"Invalid refresh toke:a nbcdefabcdefabcdefaefabcdefabcdef"}"#;
    let text = token_error_text(200, found);
    assert!(!text.contains("s3cr3t-pass"), "{text}");
    let text = token_error_text(400, br#"{"error":"client-s3cr3t"}"#);
    assert!(!text.contains("client-s3cr3t"), "{text}");
    // A 200 error code with control characters is not copied into logs.
    let text = token_error_text(200, b"{\"error\":\"bad\\ncode\"}");
    assert!(text.contains("unknown_error"), "{text}");
}

/// token_response: `redact_text` replaced known secrets before dropping
/// control characters, so a secret split by them ("s3" DEL... "cr3t-pass")
/// came out whole. Shortened from crash-b227c300.
#[test]
fn token_response_secret_split_by_control_characters_is_redacted() {
    let mut body =
        br#"{"error":"invalid_token","error_description":"Invalid refresh token: s3"#.to_vec();
    body.extend_from_slice(&[0x7f; 40]);
    body.extend_from_slice(br#"cr3t-pass and client-s3"#);
    body.extend_from_slice(b"\\u0000\\t");
    body.extend_from_slice(br#"cr3t"}"#);
    let text = token_error_text(200, &body);
    assert!(!text.contains("s3cr3t-pass"), "{text}");
    assert!(!text.contains("client-s3cr3t"), "{text}");
}
