//! `token-sidecar check [--live]` and the exit codes, on the real binary:
//! 0 ok, 1 start failure, 2 config error, 3 live check failed. The live check
//! performs one password grant against the in-process fake token endpoint and
//! prints the classified outcome, never a secret.

mod sidecar_process;
mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sidecar_process::{command, run_to_end, write_config};
use token_sidecar::fake::{self, FakeServer, Scripted, World};

const SECRET: &str = "check-live-client-secret-QzMARK1";
const PASSWORD: &str = "check-live-password-QzMARK2";

async fn fake_auth() -> (Arc<World>, FakeServer) {
    let world = World::new(300.0);
    world.with(|w| {
        w.client_secret = SECRET.into();
        w.password = PASSWORD.into();
    });
    let auth = fake::token_endpoint(world.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    (world, auth)
}

fn config(world: &World, token_url: &str) -> String {
    support::base_toml(world, token_url, "http://127.0.0.1:9/")
}

/// Runs the binary with `args` on a config file holding `toml`, on a
/// blocking thread (the fake token endpoint runs on this test's runtime).
async fn run(
    toml: String,
    args: &'static [&'static str],
    env: impl FnOnce(&mut Command) + Send + 'static,
) -> (Option<i32>, String, String) {
    tokio::task::spawn_blocking(move || {
        let (_dir, path) = write_config(&toml);
        let mut cmd = command();
        cmd.arg("--config").arg(&path).args(args);
        env(&mut cmd);
        let (status, out, err) = run_to_end(cmd);
        for secret in [
            SECRET.to_owned(),
            PASSWORD.to_owned(),
            STANDARD.encode(SECRET),
            STANDARD.encode(PASSWORD),
            "QzMARK".to_owned(),
        ] {
            assert!(
                !out.contains(&secret) && !err.contains(&secret),
                "{secret:?} printed by {args:?}:\n{out}\n{err}"
            );
        }
        (status.code(), out, err)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_successful_grant_exits_0_with_the_token_lifetime() {
    let (world, auth) = fake_auth().await;
    let (code, out, err) = run(
        config(&world, &auth.url("/oauth/token")),
        &["check", "--live"],
        |_| {},
    )
    .await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("configuration is valid"), "{out}");
    assert!(
        out.contains("live check: success") && out.contains("valid for 300 s"),
        "{out}"
    );
    assert_eq!(world.with(|w| w.password_grants), 1);
}

#[tokio::test]
async fn a_wrong_password_exits_3_and_says_so() {
    let (world, auth) = fake_auth().await;
    let toml = config(&world, &auth.url("/oauth/token"));
    world.with(|w| w.password = "something-else".into());
    let (code, out, err) = run(toml, &["check", "--live"], |_| {}).await;
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(out.contains("live check failed: invalid_grant"), "{out}");
    assert!(out.contains("the username or password is wrong"), "{out}");
}

#[tokio::test]
async fn a_wrong_client_secret_exits_3_and_says_so() {
    let (world, auth) = fake_auth().await;
    let toml = config(&world, &auth.url("/oauth/token"));
    world.with(|w| w.client_secret = "something-else".into());
    let (code, out, err) = run(toml, &["check", "--live"], |_| {}).await;
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(out.contains("live check failed: invalid_client"), "{out}");
    assert!(out.contains("client id or client secret is wrong"), "{out}");
}

#[tokio::test]
async fn an_unreachable_token_url_exits_3_and_says_so() {
    let (world, _auth) = fake_auth().await;
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let toml = config(&world, &format!("http://127.0.0.1:{port}/oauth/token"));
    let (code, out, err) = run(toml, &["check", "--live"], |_| {}).await;
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(out.contains("live check failed: transport"), "{out}");
    assert!(out.contains("unreachable"), "{out}");
}

#[tokio::test]
async fn a_token_endpoint_that_does_not_answer_in_time_exits_3() {
    let (world, auth) = fake_auth().await;
    world.with(|w| {
        w.script.push_back(Scripted {
            delay: Duration::from_secs(5),
            ..Scripted::json(200, serde_json::json!({}))
        })
    });
    let toml = config(&world, &auth.url("/oauth/token"))
        .replace("[oauth]", "[oauth]\ntimeout = \"300ms\"");
    let (code, out, err) = run(toml, &["check", "--live"], |_| {}).await;
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(out.contains("live check failed: timeout"), "{out}");
}

#[tokio::test]
async fn a_config_error_exits_2_and_names_key_and_source() {
    let (world, auth) = fake_auth().await;
    let toml =
        config(&world, &auth.url("/oauth/token")).replace("[oauth]", "[oauth]\ntimeout = \"soon\"");
    for args in [&["check"][..], &["check", "--live"], &[]] {
        let (code, out, err) = run(toml.clone(), args, |c| {
            c.env("TOKEN_SIDECAR_REFRESH__MIN_INTERVAL", "0s");
        })
        .await;
        assert_eq!(code, Some(2), "{args:?}: {out}{err}");
        assert!(err.contains("2 configuration problems"), "{err}");
        assert!(
            err.contains("oauth.timeout (") && err.contains("config.toml)"),
            "{err}"
        );
        assert!(
            err.contains(
                "refresh.min_interval (environment variable TOKEN_SIDECAR_REFRESH__MIN_INTERVAL)"
            ),
            "{err}"
        );
    }
    assert_eq!(world.with(|w| w.seen.len()), 0, "no grant on a bad config");
}

#[tokio::test]
async fn a_valid_config_exits_0_without_contacting_the_token_endpoint() {
    let (world, auth) = fake_auth().await;
    let (code, out, err) = run(
        config(&world, &auth.url("/oauth/token")),
        &["check"],
        |_| {},
    )
    .await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(world.with(|w| w.seen.len()), 0);
}

#[tokio::test]
async fn a_start_failure_exits_1() {
    let (world, auth) = fake_auth().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let toml = config(&world, &auth.url("/oauth/token")).replace(
        "listen = \"127.0.0.1:0\"\nupstream",
        &format!("listen = \"{}\"\nupstream", taken.local_addr().unwrap()),
    );
    let (code, out, err) = run(toml, &[], |_| {}).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("cannot start: cannot listen on"), "{err}");
}

#[tokio::test]
async fn a_secret_written_inline_in_the_file_triggers_a_warning() {
    let (world, auth) = fake_auth().await;
    let toml = config(&world, &auth.url("/oauth/token"));
    let (code, _, err) = run(toml.clone(), &["check"], |_| {}).await;
    assert_eq!(code, Some(0));
    assert!(
        err.contains("warning: oauth.client_secret is written inline in"),
        "{err}"
    );
    assert!(
        err.contains("warning: oauth.password is written inline in"),
        "{err}"
    );

    // From the environment and from a file: no warning.
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("client_secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let toml = toml
        .lines()
        .filter(|l| !l.starts_with("client_secret =") && !l.starts_with("password ="))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            "[oauth]",
            &format!(
                "[oauth]\nclient_secret_file = \"{}\"",
                secret_file.display()
            ),
        );
    let (code, out, err) = run(toml, &["check", "--live"], |c| {
        c.env("TOKEN_SIDECAR_OAUTH__PASSWORD", PASSWORD);
    })
    .await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(!err.contains("written inline"), "{err}");
}

/// Runs `check --live` against a token endpoint that answers `status` with `body`.
async fn live_with_answer(status: u16, body: serde_json::Value) -> (Option<i32>, String) {
    let (world, auth) = fake_auth().await;
    world.with(|w| w.script.push_back(Scripted::json(status, body)));
    let (code, out, err) = run(
        config(&world, &auth.url("/oauth/token")),
        &["check", "--live"],
        |_| {},
    )
    .await;
    (code, format!("{out}{err}"))
}

#[tokio::test]
async fn a_registered_error_code_is_shown_with_its_hint() {
    let (code, out) = live_with_answer(
        400,
        serde_json::json!({"error": "unsupported_grant_type", "error_description": "Unsupported grant type: None"}),
    )
    .await;
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains(
            "live check failed: unsupported_grant_type (token endpoint answered 400 \
             unsupported_grant_type: Unsupported grant type: None): \
             the server does not allow this grant for this client"
        ),
        "{out}"
    );
    let (code, out) =
        live_with_answer(503, serde_json::json!({"error": "temporarily_unavailable"})).await;
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains("live check failed: temporarily_unavailable (token endpoint answered 503 temporarily_unavailable)"),
        "{out}"
    );
}

#[tokio::test]
async fn a_spring_401_for_a_wrong_client_secret_gets_the_client_hint() {
    for body in [
        serde_json::json!({"error": "unauthorized", "error_description": "Full authentication is required to access this resource"}),
        serde_json::json!({"timestamp": "2024-05-01T12:00:00.000+00:00", "status": 401, "error": "Unauthorized", "path": "/oauth/token"}),
    ] {
        let (code, out) = live_with_answer(401, body.clone()).await;
        assert_eq!(code, Some(3), "{out}");
        let shown = body["error"].as_str().unwrap();
        assert!(
            out.contains(&format!(
                "live check failed: {shown} (token endpoint answered 401 {shown}"
            )),
            "{out}"
        );
        assert!(
            out.contains(
                "the client id or client secret is wrong (oauth.client_id, oauth.client_secret, \
                 oauth.client_auth), or the client may not use this grant"
            ),
            "{out}"
        );
    }
}
