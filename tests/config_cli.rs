//! The configuration as an operator meets it: the real binary's `check`
//! command on files and environment variables (exit 0, or every problem and
//! exit 2), and the real binary running against the fake token endpoint to
//! show that a secret file's newline is trimmed and that an environment
//! variable overrides the file, raw.
//!
//! Every spawn clears the environment (keeping only `PATH`), so variables of
//! the machine running the tests cannot leak into a case.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use token_sidecar::fake::{self, FakeServer, World};

const BIN: &str = env!("CARGO_BIN_EXE_token-sidecar");
/// Exit code of `check` (and of a normal start) for a configuration error.
const EXIT_CONFIG: i32 = 2;

/// A complete, valid config with inline secrets; cases edit it.
const VALID: &str = r#"
[proxy]
listen = "127.0.0.1:0"
upstream = "https://api.example.test/paymentiq/"
request_timeout = "30s"
[admin]
listen = "127.0.0.1:0"
[oauth]
token_url = "https://api.example.test/paymentiq/oauth/token"
client_id = "client"
client_secret = "Sekr1t-client"
username = "user"
password = "Sekr1t-pass"
timeout = "10s"
"#;

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// A command for the binary with nothing from our environment but `PATH`.
fn bare_command(cwd: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear().current_dir(cwd);
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd
}

/// Runs `token-sidecar check ARGS` in `cwd` with exactly `env` set.
fn check(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let out = bare_command(cwd)
        .arg("check")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("the binary runs");
    Outcome {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Writes `text` to `dir/name` and returns its path.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).expect("write temp file");
    p
}

/// `check --config dir/sidecar.toml` with `toml` and `env`.
fn check_toml(toml: &str, env: &[(&str, &str)]) -> (Outcome, TempDir) {
    let dir = TempDir::new().unwrap();
    let path = write(dir.path(), "sidecar.toml", toml);
    let out = check(dir.path(), &["--config", path.to_str().unwrap()], env);
    (out, dir)
}

/// Marks the secrets of [`VALID`]: they never appear in any output.
const SECRET_MARK: &str = "Sekr1t";

/// Asserts a config error: exit 2, each `needle` on stderr, no secret.
fn assert_problems(out: &Outcome, needles: &[&str]) {
    assert_eq!(out.code, EXIT_CONFIG, "{out:?}");
    assert_no_secret(out);
    assert!(!out.stdout.contains("is valid"), "{out:?}");
    for n in needles {
        assert!(out.stderr.contains(n), "stderr lacks {n:?}: {out:?}");
    }
}

fn assert_no_secret(out: &Outcome) {
    assert!(
        !out.stdout.contains(SECRET_MARK) && !out.stderr.contains(SECRET_MARK),
        "a secret was printed: {out:?}"
    );
}

#[test]
fn a_valid_config_passes() {
    let (out, _dir) = check_toml(VALID, &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_no_secret(&out);
    assert!(
        out.stdout.contains("sidecar.toml: configuration is valid"),
        "{out:?}"
    );
    assert!(!out.stderr.contains("problem"), "{out:?}");
}

#[test]
fn a_missing_required_key_is_named() {
    let (out, _dir) = check_toml(&VALID.replace("username = \"user\"\n", ""), &[]);
    assert_problems(
        &out,
        &[
            "1 configuration problem:",
            "oauth.username (not set): is required",
        ],
    );
}

#[test]
fn a_missing_config_file_is_an_error() {
    let dir = TempDir::new().unwrap();
    let out = check(dir.path(), &["--config", "nowhere.toml"], &[]);
    assert_problems(&out, &["nowhere.toml", "config file not found"]);
}

#[test]
fn password_and_password_file_together_name_both_sources() {
    let dir = TempDir::new().unwrap();
    let pw = write(dir.path(), "pw", "from-file\n");
    let cfg = write(dir.path(), "sidecar.toml", VALID);
    let out = check(
        dir.path(),
        &["--config", cfg.to_str().unwrap()],
        &[("TOKEN_SIDECAR_OAUTH__PASSWORD_FILE", pw.to_str().unwrap())],
    );
    assert_problems(
        &out,
        &[
            "oauth.password (sidecar.toml and environment variable TOKEN_SIDECAR_OAUTH__PASSWORD_FILE)",
            "set both oauth.password and oauth.password_file",
        ],
    );
}

#[test]
fn client_secret_and_client_secret_file_together_are_an_error() {
    let dir = TempDir::new().unwrap();
    let secret = write(dir.path(), "secret", "s\n");
    let toml = VALID.replace(
        "client_secret = \"Sekr1t-client\"",
        &format!(
            "client_secret = \"Sekr1t-client\"\nclient_secret_file = {:?}",
            secret.to_str().unwrap()
        ),
    );
    let (out, _dir) = check_toml(&toml, &[]);
    assert_problems(
        &out,
        &[
            "oauth.client_secret (sidecar.toml):",
            "set both oauth.client_secret and oauth.client_secret_file",
        ],
    );
}

#[test]
fn an_unknown_key_in_the_file_is_named_with_the_file() {
    let toml = VALID.replace(
        "password = \"Sekr1t-pass\"",
        "password = \"Sekr1t-pass\"\npasword = \"typo\"",
    );
    let (out, _dir) = check_toml(&toml, &[]);
    assert_problems(&out, &["oauth.pasword (sidecar.toml): unknown key"]);
    let (out, _dir) = check_toml(&format!("{VALID}\n[proxyy]\nlisten = \"x\"\n"), &[]);
    assert_problems(&out, &["proxyy (sidecar.toml): unknown section"]);
}

#[test]
fn an_unknown_key_in_a_variable_names_the_variable() {
    let (out, _dir) = check_toml(VALID, &[("TOKEN_SIDECAR_OAUTH__PASWORD", "typo")]);
    assert_problems(
        &out,
        &["oauth.pasword (environment variable TOKEN_SIDECAR_OAUTH__PASWORD): unknown key"],
    );
    // An unknown section: the variable, not a made-up TOKEN_SIDECAR_OAUTHH.
    let (out, _dir) = check_toml(VALID, &[("TOKEN_SIDECAR_OAUTHH__PASSWORD", "x")]);
    assert_problems(
        &out,
        &["oauthh (environment variable TOKEN_SIDECAR_OAUTHH__PASSWORD): unknown section"],
    );
}

#[test]
fn a_bad_url_is_named() {
    let toml = VALID.replace(
        "https://api.example.test/paymentiq/oauth/token",
        "not a url",
    );
    let (out, _dir) = check_toml(&toml, &[]);
    assert_problems(
        &out,
        &["oauth.token_url (sidecar.toml): \"not a url\" is not a valid URL"],
    );
    let (out, _dir) = check_toml(
        VALID,
        &[("TOKEN_SIDECAR_PROXY__UPSTREAM", "ftp://files.example.test/")],
    );
    assert_problems(
        &out,
        &[
            "proxy.upstream (environment variable TOKEN_SIDECAR_PROXY__UPSTREAM)",
            "must be an http:// or https:// URL",
        ],
    );
}

#[test]
fn a_bad_duration_is_named() {
    let (out, _dir) = check_toml(&VALID.replace("\"10s\"", "\"ten seconds\""), &[]);
    assert_problems(
        &out,
        &["oauth.timeout (sidecar.toml): invalid duration \"ten seconds\""],
    );
    // A bare number is not a duration: seconds or milliseconds?
    let (out, _dir) = check_toml(&VALID.replace("\"30s\"", "30"), &[]);
    assert_problems(
        &out,
        &["proxy.request_timeout (sidecar.toml): must be a duration string"],
    );
}

#[test]
fn every_problem_is_reported_in_one_pass() {
    let toml = VALID
        .replace("username = \"user\"\n", "")
        .replace("\"10s\"", "\"soon\"")
        .replace("https://api.example.test/paymentiq/oauth/token", "::")
        + "\n[refresh]\nbogus = 1\n";
    let (out, _dir) = check_toml(&toml, &[("TOKEN_SIDECAR_OAUTH__PASWORD", "typo")]);
    assert_problems(
        &out,
        &[
            "5 configuration problems:",
            "oauth.username (not set)",
            "oauth.timeout (sidecar.toml)",
            "oauth.token_url (sidecar.toml)",
            "refresh.bogus (sidecar.toml): unknown key",
            "oauth.pasword (environment variable TOKEN_SIDECAR_OAUTH__PASWORD)",
        ],
    );
}

#[test]
fn token_sidecar_config_selects_the_file_when_config_is_absent() {
    // The working directory holds no config.toml: the default would fail.
    let dir = TempDir::new().unwrap();
    let cfg = write(dir.path(), "elsewhere.toml", VALID);
    let broken = write(dir.path(), "broken.toml", "[oauth]\n");
    let cfg = cfg.to_str().unwrap();
    let broken = broken.to_str().unwrap();

    let out = check(dir.path(), &[], &[("TOKEN_SIDECAR_CONFIG", cfg)]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout
            .contains("elsewhere.toml: configuration is valid"),
        "{out:?}"
    );

    let out = check(dir.path(), &[], &[("TOKEN_SIDECAR_CONFIG", broken)]);
    assert_problems(&out, &["broken.toml", "oauth.username (not set)"]);

    // --config wins over the variable.
    let out = check(
        dir.path(),
        &["--config", cfg],
        &[("TOKEN_SIDECAR_CONFIG", broken)],
    );
    assert_eq!(out.code, 0, "{out:?}");

    let out = check(dir.path(), &[], &[]);
    assert_problems(&out, &["config.toml", "config file not found"]);
}

#[test]
fn variables_kubernetes_injects_for_a_service_named_token_sidecar_are_ignored() {
    let (out, _dir) = check_toml(
        VALID,
        &[
            ("TOKEN_SIDECAR_SERVICE_HOST", "10.0.0.1"),
            ("TOKEN_SIDECAR_SERVICE_PORT", "tcp://10.0.0.1:7080"),
            ("TOKEN_SIDECAR_SERVICE_PORT_HTTP", "7080"),
            ("TOKEN_SIDECAR_PORT", "tcp://10.0.0.1:7080"),
            ("TOKEN_SIDECAR_PORT_7080_TCP", "tcp://10.0.0.1:7080"),
            ("TOKEN_SIDECAR_PORT_7080_TCP_PROTO", "tcp"),
            ("TOKEN_SIDECAR_PORT_7080_TCP_PORT", "7080"),
            ("TOKEN_SIDECAR_PORT_7080_TCP_ADDR", "10.0.0.1"),
        ],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        !out.stderr.contains("warning: environment variable"),
        "{out:?}"
    );
}

#[test]
fn a_variable_with_one_underscore_gets_a_warning_naming_the_form_it_meant() {
    let without_password = VALID.replace("password = \"Sekr1t-pass\"\n", "");
    let (out, _dir) = check_toml(
        &without_password,
        &[("TOKEN_SIDECAR_OAUTH_PASSWORD", "Sekr1t-env")],
    );
    // The key it did not set is still missing; the warning says why.
    assert_problems(
        &out,
        &[
            "warning: environment variable TOKEN_SIDECAR_OAUTH_PASSWORD is not read: \
             did you mean TOKEN_SIDECAR_OAUTH__PASSWORD? (two underscores between the parts of a setting)\n",
            "oauth.password (not set): set oauth.password or oauth.password_file",
        ],
    );
    // Beside a valid config, a warning only; one line for each variable.
    let (out, _dir) = check_toml(
        VALID,
        &[
            ("TOKEN_SIDECAR_PROXY_REQUEST_TIMEOUT", "5s"),
            ("TOKEN_SIDECAR_NONSENSE", "x"),
        ],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains(
            "warning: environment variable TOKEN_SIDECAR_PROXY_REQUEST_TIMEOUT is not read: \
             did you mean TOKEN_SIDECAR_PROXY__REQUEST_TIMEOUT?"
        ),
        "{out:?}"
    );
    assert!(
        out.stderr.contains(
            "warning: environment variable TOKEN_SIDECAR_NONSENSE is not read: \
             settings are TOKEN_SIDECAR_<SECTION>__<KEY>, e.g. TOKEN_SIDECAR_OAUTH__PASSWORD\n"
        ),
        "{out:?}"
    );
    assert_eq!(
        out.stderr.matches("warning: environment variable").count(),
        2,
        "{out:?}"
    );
}

#[test]
fn a_value_of_the_wrong_type_is_one_problem_in_the_files_terms() {
    let (out, _dir) = check_toml(
        &VALID.replace("client_id = \"client\"", "client_id = 12345"),
        &[],
    );
    assert_problems(
        &out,
        &[
            "1 configuration problem:",
            "oauth.client_id (sidecar.toml): must be a string in quotes, not 12345\n",
        ],
    );
    assert!(!out.stderr.contains("not set"), "{out:?}");
    let (out, _dir) = check_toml(&format!("{VALID}[runtime]\nworker_threads = -2\n"), &[]);
    assert_problems(
        &out,
        &["runtime.worker_threads (sidecar.toml): must be a whole number, 0 or more, not -2\n"],
    );
    assert!(!out.stderr.contains("usize"), "{out:?}");
}

#[test]
fn a_near_miss_key_or_section_gets_a_did_you_mean() {
    let toml = VALID.replace("request_timeout = \"30s\"", "request_timout = \"30s\"")
        + "[logs]\nlevel = \"debug\"\n";
    let (out, _dir) = check_toml(&toml, &[]);
    assert_problems(
        &out,
        &[
            "2 configuration problems:",
            "proxy.request_timout (sidecar.toml): unknown key: did you mean proxy.request_timeout?\n",
            "logs (sidecar.toml): unknown section: did you mean [log]?\n",
        ],
    );
    let (out, _dir) = check_toml(VALID, &[("TOKEN_SIDECAR_OAUTH__PASWORD", "x")]);
    assert_problems(
        &out,
        &[
            "oauth.pasword (environment variable TOKEN_SIDECAR_OAUTH__PASWORD): unknown key: \
           did you mean TOKEN_SIDECAR_OAUTH__PASSWORD?\n",
        ],
    );
}

#[test]
fn an_empty_secret_file_is_a_config_error() {
    let dir = TempDir::new().unwrap();
    // Empty once its one trailing newline is trimmed.
    let pw = write(dir.path(), "password", "\n");
    let toml = VALID.replace(
        "password = \"Sekr1t-pass\"",
        &format!("password_file = {:?}", pw.to_str().unwrap()),
    );
    let cfg = write(dir.path(), "sidecar.toml", &toml);
    let out = check(dir.path(), &["--config", cfg.to_str().unwrap()], &[]);
    assert_problems(
        &out,
        &[&format!(
            "oauth.password_file (sidecar.toml): secret file {} is empty\n",
            pw.display()
        )],
    );
}

#[test]
fn the_shipped_config_toml_passes_with_its_secret_files_provided() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let dir = TempDir::new().unwrap();
    let secret = write(dir.path(), "client_secret", "s3cret\n");
    let password = write(dir.path(), "password", "pw\n");
    let out = check(
        dir.path(),
        &["--config", shipped],
        &[
            (
                "TOKEN_SIDECAR_OAUTH__CLIENT_SECRET_FILE",
                secret.to_str().unwrap(),
            ),
            (
                "TOKEN_SIDECAR_OAUTH__PASSWORD_FILE",
                password.to_str().unwrap(),
            ),
        ],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("configuration is valid"), "{out:?}");

    // Without the overrides, the documented paths are what is checked (on a
    // machine that has no such files).
    if !Path::new("/etc/token-sidecar/secrets/password").exists() {
        let out = check(dir.path(), &["--config", shipped], &[]);
        assert_problems(
            &out,
            &["oauth.client_secret_file (", "oauth.password_file ("],
        );
    }
}

/// The real binary running (no subcommand); killed when dropped.
struct Sidecar {
    child: Child,
    log: PathBuf,
}

impl Sidecar {
    fn spawn(dir: &Path, config: &Path, env: &[(&str, &str)]) -> Sidecar {
        let log = dir.join("sidecar.log");
        let out = fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = bare_command(dir)
            .arg("--config")
            .arg(config)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("the binary starts");
        Sidecar { child, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the fake token endpoint accepted a password grant.
    async fn await_password_grant(&mut self, world: &World) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while world.with(|w| w.password_grants) == 0 {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sidecar exited ({status}):\n{}", self.log());
            }
            if tokio::time::Instant::now() > deadline {
                let seen = world.with(|w| w.seen.len());
                panic!(
                    "no accepted password grant in 10 s ({seen} token requests seen):\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fake token endpoint and backoffice, and a config for the binary
/// pointing at them; `oauth_tail` completes the `[oauth]` section.
async fn fakes_and_config(
    world: &Arc<World>,
    dir: &Path,
    oauth_tail: &str,
) -> (FakeServer, FakeServer, PathBuf) {
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let auth = fake::token_endpoint(world.clone(), loopback).await.unwrap();
    let api = fake::backoffice(world.clone(), loopback).await.unwrap();
    let base = support::base_toml_without_password(world, &auth.url("/oauth/token"), &api.url("/"));
    let toml = base.replace("[log]", &format!("{oauth_tail}\n[log]"));
    let path = write(dir, "sidecar.toml", &toml);
    (auth, api, path)
}

/// The password the fake token endpoint received, decoded.
fn received_password(world: &World) -> String {
    world.with(|w| {
        w.seen
            .iter()
            .find_map(|s| s.param("password").map(str::to_owned))
            .expect("a password grant was seen")
    })
}

#[tokio::test]
async fn a_secret_files_trailing_newline_is_trimmed() {
    let world = World::new(300.0);
    world.with(|w| w.password = "pw from file".into());
    let dir = TempDir::new().unwrap();
    // What `echo ... > file` and `kubectl create secret --from-file` leave.
    let pw = write(dir.path(), "password", "pw from file\n");
    let (_auth, _api, cfg) = fakes_and_config(
        &world,
        dir.path(),
        &format!("password_file = {:?}", pw.to_str().unwrap()),
    )
    .await;
    let mut sidecar = Sidecar::spawn(dir.path(), &cfg, &[]);
    sidecar.await_password_grant(&world).await;
    assert_eq!(received_password(&world), "pw from file");
    assert!(!sidecar.log().contains("pw from file"), "{}", sidecar.log());
}

#[tokio::test]
async fn an_environment_variable_overrides_the_file_raw() {
    // figment would read 007 as the number 7; the loader reads it as written.
    let world = World::new(300.0);
    world.with(|w| w.password = "007".into());
    let dir = TempDir::new().unwrap();
    let (_auth, _api, cfg) =
        fakes_and_config(&world, dir.path(), "password = \"not-this-one\"").await;
    let mut sidecar = Sidecar::spawn(
        dir.path(),
        &cfg,
        &[("TOKEN_SIDECAR_OAUTH__PASSWORD", "007")],
    );
    sidecar.await_password_grant(&world).await;
    assert_eq!(received_password(&world), "007");
    // And it was the only password tried.
    assert!(world.with(|w| w.seen.iter().all(|s| s.param("password") == Some("007"))));
}
