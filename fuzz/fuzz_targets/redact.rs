//! `secret::redact_text` over any text and any known secret: a known secret
//! never survives, raw or in any encoding a server may echo it in, and a
//! registered OAuth error code standing alone always does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use token_sidecar::secret::{redact_text, OAUTH_ERROR_CODES};

fuzz_target!(|input: (&str, &str, u8)| {
    let (text, secret, code) = input;
    // A secret holding a bracket could straddle a `[redacted]` marker and
    // so "appear" where the input never had it; control characters are
    // dropped from both sides before matching; short ones are not looked for.
    let secret: String = secret.chars().filter(|c| !c.is_control()).collect();
    let usable = secret.len() >= 3 && !secret.contains(['[', ']']);
    let code = OAUTH_ERROR_CODES[code as usize % OAUTH_ERROR_CODES.len()];
    let text = format!("{code} {text}");
    let known: Vec<&str> = if usable { vec![&secret] } else { vec![] };
    let out = redact_text(&text, &known);
    if usable {
        for piece in out.split("[redacted]") {
            assert!(!piece.contains(&secret), "{secret:?} survived in {out:?}");
        }
    }
    // With no secret known, only the run rule applies: the code survives.
    let bare = redact_text(&text, &[]);
    assert!(
        bare.starts_with(&format!("{code} ")),
        "{code} did not survive in {bare:?}"
    );
});
