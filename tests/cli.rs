//! The command line as an operator meets it, on the real binary: `--help`,
//! `--version`, usage errors apart from config errors, the demo's hints, and
//! the log stream: with `log.format = "json"` every line the process writes
//! is JSON, each config warning appears once, panics included.

mod sidecar_process;
mod support;

use std::time::Duration;

use sidecar_process::{command, json_line, run_to_end, Process};
use token_sidecar::fake::{self, World};

const SIGTERM: i32 = 15;

#[test]
fn help_names_the_environment_overrides_and_the_exit_codes() {
    let mut cmd = command();
    cmd.arg("--help");
    let (status, out, err) = run_to_end(cmd);
    assert_eq!(status.code(), Some(0), "{err}");
    for needle in [
        "TOKEN_SIDECAR_<SECTION>__<KEY>",
        "two underscores",
        "TOKEN_SIDECAR_OAUTH__PASSWORD",
        "TOKEN_SIDECAR_CONFIG",
        "Exit codes:",
        "0    ran and stopped cleanly",
        "1    start-up failure",
        "2    configuration error",
        "3    check --live: the token request failed",
        "64   command-line usage error",
    ] {
        assert!(out.contains(needle), "--help lacks {needle:?}:\n{out}");
    }
}

#[test]
fn version_names_the_revision_and_the_target() {
    let mut cmd = command();
    cmd.arg("--version");
    let (status, out, _) = run_to_end(cmd);
    assert_eq!(status.code(), Some(0));
    let line = out.trim();
    let prefix = format!("token-sidecar {} (revision ", env!("CARGO_PKG_VERSION"));
    assert!(line.starts_with(&prefix), "{line}");
    let rest = &line[prefix.len()..];
    let (revision, target) = rest
        .trim_end_matches(')')
        .split_once(", ")
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        revision == "unknown"
            || (revision.len() == 12 && revision.bytes().all(|b| b.is_ascii_hexdigit())),
        "{line}"
    );
    // The triple this test was built for, which is the binary's.
    assert!(
        target.contains("-") && target.split('-').count() >= 3,
        "{line}"
    );
    assert!(target.starts_with(std::env::consts::ARCH), "{line}");
}

#[test]
fn usage_errors_exit_64_apart_from_config_errors() {
    for args in [
        &["--bogus"][..],
        &["frobnicate"],
        &["check", "--lives"],
        &["demo", "--port", "many"],
    ] {
        let mut cmd = command();
        cmd.args(args);
        let (status, out, err) = run_to_end(cmd);
        assert_eq!(status.code(), Some(64), "{args:?}: {out}{err}");
        assert!(err.starts_with("error:"), "{err}");
    }
}

#[test]
fn demo_refuses_a_config_file() {
    let mut cmd = command();
    cmd.args(["demo", "--config", "config.toml"]);
    let (status, out, err) = run_to_end(cmd);
    assert_eq!(status.code(), Some(64), "{out}{err}");
    assert!(
        err.contains(
            "demo runs with a built-in configuration of its own; --config does not apply to it"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn demo_prints_curl_lines_a_shell_takes_as_they_are() {
    let mut cmd = command();
    cmd.args(["demo", "--port", "0", "--admin-port", "0"]);
    let mut p = Process::spawn(cmd);
    let line = p
        .wait_line(Duration::from_secs(20), "a curl line with a query", |l| {
            l.contains("curl") && l.contains('?')
        })
        .await;
    // Quoted: zsh would otherwise take `?` for a glob and refuse the line.
    let url = line
        .trim()
        .strip_prefix("curl -s '")
        .and_then(|rest| rest.strip_suffix('\''))
        .unwrap_or_else(|| panic!("not a quoted URL: {line:?}"));
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("?limit=5"),
        "{url}"
    );
    let status_line = p
        .wait_line(Duration::from_secs(5), "the status curl line", |l| {
            l.contains("curl") && l.contains("/status")
        })
        .await;
    assert!(
        status_line.trim().starts_with("curl -s 'http://"),
        "{status_line}"
    );
    assert!(status_line.trim().ends_with("/status'"), "{status_line}");
    // And the quoted URL works.
    let r = support::client().get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    p.signal(SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(20)).await.code(), Some(0));
}

/// A config in `format` with three warnings (two inline secrets and the
/// password in the query), against a fake token endpoint.
async fn warned_config(format: &str) -> (Vec<fake::FakeServer>, String) {
    let world = World::new(300.0);
    let loopback = "127.0.0.1:0".parse().unwrap();
    let auth = fake::token_endpoint(world.clone(), loopback).await.unwrap();
    let api = fake::backoffice(world.clone(), loopback).await.unwrap();
    let toml = support::base_toml(&world, &auth.url("/oauth/token"), &api.url("/"))
        .replace("format = \"text\"", &format!("format = \"{format}\""))
        .replace("[oauth]", "[oauth]\nparams_in = \"query\"");
    (vec![auth, api], toml)
}

/// The digits after the decimal point of the number `"field":N` in `line`.
fn decimals(line: &str, field: &str) -> usize {
    let key = format!("\"{field}\":");
    let at = line
        .find(&key)
        .unwrap_or_else(|| panic!("{field} in {line}"))
        + key.len();
    let number: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == 'e' || *c == '-')
        .collect();
    assert!(!number.contains('e'), "{number}");
    number.split_once('.').map_or(0, |(_, frac)| frac.len())
}

const WARNINGS: [&str; 4] = [
    "oauth.client_secret is written inline in",
    "oauth.password is written inline in",
    "oauth.params_in = \"query\" puts the password in the token URL",
    "environment variable TOKEN_SIDECAR_OAUTH_TIMEOUT is not read: did you mean TOKEN_SIDECAR_OAUTH__TIMEOUT?",
];

#[tokio::test]
async fn with_json_logs_every_line_is_json_each_warning_once_panics_included() {
    let (_fakes, toml) = warned_config("json").await;
    let mut p = Process::run_config(&toml, |cmd| {
        cmd.env("TOKEN_SIDECAR_OAUTH_TIMEOUT", "3s");
        cmd.env("SIDECAR_TEST_PANIC", "boom in a test");
    });
    let (proxy, _) = p.addresses().await;
    p.wait_event(Duration::from_secs(20), "token obtained")
        .await;
    for _ in 0..20 {
        let r = support::client()
            .get(format!("http://{proxy}/api/x"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    p.wait_event(Duration::from_secs(5), "panic").await;
    p.signal(SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(20)).await.code(), Some(0));

    let output = p.output.lock().unwrap();
    let mut lines = Vec::new();
    for (stream, line) in &output.lines {
        let v = json_line(line)
            .unwrap_or_else(|| panic!("a {stream:?} line that is not JSON: {line:?}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        lines.push(v);
    }
    for w in WARNINGS {
        let n = lines
            .iter()
            .filter(|l| l["message"].as_str().is_some_and(|m| m.contains(w)))
            .count();
        assert_eq!(n, 1, "{w:?} {n} times:\n{}", output.all_text());
    }
    let panic = lines
        .iter()
        .find(|l| l["message"] == "panic")
        .expect("the panic as a JSON line");
    assert_eq!(panic["level"], "ERROR");
    assert_eq!(panic["panic"], "boom in a test");
    assert_eq!(panic["target"], "token_sidecar::panic");
    assert_eq!(panic["thread"], "test-panic");
    assert!(
        panic["location"].as_str().unwrap().contains("main.rs"),
        "{panic}"
    );
    // Timings to the microsecond, without float noise.
    let access: Vec<&str> = output
        .stdout()
        .filter(|l| l.contains("\"target\":\"token_sidecar::access\""))
        .collect();
    assert_eq!(access.len(), 20, "{}", output.all_text());
    for line in access {
        for field in ["total_ms", "upstream_ms"] {
            assert!(decimals(line, field) <= 3, "{field} in {line}");
        }
    }
}

#[tokio::test]
async fn with_text_logs_each_warning_is_printed_once() {
    let (_fakes, toml) = warned_config("text").await;
    let mut p = Process::run_config(&toml, |cmd| {
        cmd.env("TOKEN_SIDECAR_OAUTH_TIMEOUT", "3s");
    });
    p.wait_line(Duration::from_secs(20), "token obtained", |l| {
        l.contains("token obtained")
    })
    .await;
    p.signal(SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(20)).await.code(), Some(0));
    let text = p.output.lock().unwrap().all_text();
    for w in WARNINGS {
        assert_eq!(text.matches(w).count(), 1, "{w:?}:\n{text}");
    }
}
