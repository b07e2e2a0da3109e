//! `*_file` secrets rotate without a restart (issue 3, point 7): the token
//! client reads them on every grant, and after a refused login the refresher
//! retries as soon as a file changes. Real sockets, real clock, and the
//! secret volume laid out the way kubelet mounts a Secret: every key is a
//! symlink through `..data`, which is swapped atomically to a new directory.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::Figment;
use http::StatusCode;
use token_sidecar::config;
use token_sidecar::fake::{self, World};

/// Writes `..<version>/{password,client_secret}` and points `..data` at it.
fn publish(dir: &Path, version: &str, password: &str, client_secret: &str) {
    let v = dir.join(format!("..{version}"));
    std::fs::create_dir(&v).unwrap();
    std::fs::write(v.join("password"), format!("{password}\n")).unwrap();
    std::fs::write(v.join("client_secret"), client_secret).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

fn secret_volume(dir: &Path, password: &str, client_secret: &str) -> (PathBuf, PathBuf) {
    publish(dir, "v1", password, client_secret);
    for key in ["password", "client_secret"] {
        std::os::unix::fs::symlink(format!("..data/{key}"), dir.join(key)).unwrap();
    }
    (dir.join("password"), dir.join("client_secret"))
}

engines! {
#[tokio::test]
async fn rotated_secret_files_take_effect_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let world = World::new(300.0);
    let (password_file, secret_file) = secret_volume(dir.path(), "demo-password", "demo-secret");
    let loopback = ([127, 0, 0, 1], 0).into();
    let auth = fake::token_endpoint(world.clone(), loopback).await.unwrap();
    let api = fake::backoffice(world.clone(), loopback).await.unwrap();
    // The base config with the two inline secrets replaced by files.
    let base = support::base_toml(&world, &auth.url("/oauth/token"), &api.url("/base/"))
        .replace(
            "client_secret = \"demo-secret\"",
            &format!(
                "client_secret_file = {:?}",
                secret_file.display().to_string()
            ),
        )
        .replace(
            "password = \"demo-password\"",
            &format!("password_file = {:?}", password_file.display().to_string()),
        );
    let overrides = "[proxy]\ntoken_wait = \"2s\"\n[refresh]\nsecret_poll_interval = \"200ms\"";
    let fig = Figment::new()
        .merge(Toml::string(&base))
        .merge(Toml::string(overrides));
    let config = config::load_figment(fig).unwrap().config;
    let sidecar = support::start_sidecar(&config).await;
    let url = format!("http://{}/api/x", sidecar.proxy_addrs[0]);
    let client = support::client();
    let get = || async { client.get(&url).send().await.unwrap().status() };
    let last_password = || {
        world.with(|w| {
            w.seen
                .iter()
                .rev()
                .find_map(|r| r.param("password").map(str::to_owned))
        })
    };
    assert_eq!(get().await, StatusCode::OK);

    // 1. The Secret is updated first, then the server: the next login (here
    // forced by revoking every token) reads the new files. No client sees it.
    publish(dir.path(), "v2", "second-password", "second-secret");
    world.with(|w| {
        w.password = "second-password".into();
        w.client_secret = "second-secret".into();
    });
    world.revoke_access_tokens();
    world.revoke_refresh_tokens();
    assert_eq!(
        get().await,
        StatusCode::OK,
        "replayed with a token from the new secrets"
    );
    assert_eq!(last_password().as_deref(), Some("second-password"));

    // 2. The server changes first: the login is refused and retried slowly
    // (rejected_backoff_min is 1 min)...
    world.with(|w| w.password = "third-password".into());
    world.revoke_access_tokens();
    world.revoke_refresh_tokens();
    let _ = get().await; // meets the 401; no new token can be had yet
    let token = sidecar.token("default").expect("profile default").clone();
    support::eventually(Duration::from_secs(5), "the login is refused", || async {
        token.status().last_error.as_deref() == Some("invalid_grant")
    })
    .await;
    assert!(
        token.retry_after() >= 30,
        "slow retry: {}",
        token.retry_after()
    );
    // ...until the Secret catches up: retried at once, traffic flows again.
    publish(dir.path(), "v3", "third-password", "second-secret");
    support::eventually(Duration::from_secs(5), "traffic flows again", || async {
        get().await == StatusCode::OK
    })
    .await;
    assert_eq!(last_password().as_deref(), Some("third-password"));
    assert_eq!(token.status().last_error, None);
}
}
