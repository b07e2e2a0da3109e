//! The config loader over any TOML text: never a panic, and a rejected
//! config never quotes a password or client secret it was given, in the
//! `[oauth]` table or in any `[credentials.NAME]` profile.
#![no_main]

use figment::providers::{Format, Toml};
use figment::value::Value;
use figment::Figment;
use libfuzzer_sys::fuzz_target;
use token_sidecar::config::load_figment;

/// The text a secret value has in the file, if it is a scalar.
fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(_, s) => Some(s.clone()),
        Value::Num(_, n) => n
            .to_u128()
            .map(|n| n.to_string())
            .or_else(|| n.to_i128().map(|n| n.to_string())),
        _ => None,
    }
}

fuzz_target!(|text: &str| {
    let fig = Figment::new().merge(Toml::string(text));
    // The single-upstream form's table and every credentials profile.
    let mut keys: Vec<String> = vec!["oauth.password".into(), "oauth.client_secret".into()];
    if let Ok(Value::Dict(_, profiles)) = fig.find_value("credentials") {
        for name in profiles.keys() {
            keys.push(format!("credentials.{name}.password"));
            keys.push(format!("credentials.{name}.client_secret"));
        }
    }
    let secrets: Vec<String> = keys
        .iter()
        .filter_map(|k| fig.find_value(k).ok())
        .filter_map(|v| scalar_text(&v))
        // Short values occur in any message by chance, and a value written
        // elsewhere too (say in a URL) may be quoted for that other key.
        .filter(|s| s.len() >= 6 && text.matches(s.as_str()).count() == 1)
        .collect();
    if let Err(e) = load_figment(fig) {
        let message = e.to_string();
        for s in &secrets {
            assert!(
                !message.contains(s.as_str()),
                "config error quotes a secret: {message}"
            );
        }
    }
});
