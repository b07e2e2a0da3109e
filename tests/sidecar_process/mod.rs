//! The real `token-sidecar` binary as a child process, for the tests that need
//! one: signals, exit codes, thread names and everything the process prints.
//!
//! Standard output and error are read line by line on two threads into a
//! shared log, which a test can await ("until a line says X"). The proxy and
//! admin ports are ephemeral (`127.0.0.1:0`) and read from the `listening`
//! log line, so tests never guess a free port.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

pub const BIN: &str = env!("CARGO_BIN_EXE_token-sidecar");

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Everything a child printed, in arrival order per stream.
#[derive(Default)]
pub struct Output {
    pub lines: Vec<(Stream, String)>,
    pub closed: usize,
}

impl Output {
    pub fn stdout(&self) -> impl Iterator<Item = &str> {
        self.lines
            .iter()
            .filter(|(s, _)| *s == Stream::Stdout)
            .map(|(_, l)| l.as_str())
    }

    pub fn stderr(&self) -> impl Iterator<Item = &str> {
        self.lines
            .iter()
            .filter(|(s, _)| *s == Stream::Stderr)
            .map(|(_, l)| l.as_str())
    }

    /// Both streams as one text (stdout first).
    pub fn all_text(&self) -> String {
        let mut s: String = self.stdout().collect::<Vec<_>>().join("\n");
        s.push('\n');
        s.push_str(&self.stderr().collect::<Vec<_>>().join("\n"));
        s
    }
}

/// A spawned sidecar; killed when dropped.
pub struct Process {
    pub child: Child,
    pub output: Arc<Mutex<Output>>,
    changed: watch::Receiver<u64>,
    _dir: Option<tempfile::TempDir>,
    /// Inside a test that runs on both engines: its engine counters, read
    /// before the process is signalled or killed (see [`Process::addresses`]).
    engine_counts: Option<crate::support::ProcessCounts>,
}

/// Writes `toml` to a fresh temporary directory; returns the directory (keep
/// it alive) and the file's path.
pub fn write_config(toml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml).expect("write config");
    (dir, path)
}

/// A command for the binary with a clean environment for our variables:
/// no inherited `RUST_LOG` or `TOKEN_SIDECAR_*`, but, in a test that runs
/// on both engines, `proxy.fast_lane` for the engine under test.
pub fn command() -> Command {
    clean(Command::new(BIN))
}

/// [`command`], with `hosts` as the process's `/etc/hosts`: run in a mount
/// namespace of its own (`unshare`, util-linux), so a test can give a name
/// several addresses without touching the machine's file. Arguments added
/// to the command go to the binary.
pub fn command_with_hosts(hosts: &Path) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--map-root-user", "sh", "-c"])
        .arg(r#"mount --bind "$1" /etc/hosts && shift && exec "$0" "$@""#)
        .arg(BIN)
        .arg(hosts);
    clean(cmd)
}

fn clean(mut cmd: Command) -> Command {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k == "RUST_LOG" || k.starts_with("TOKEN_SIDECAR_") {
            cmd.env_remove(k.as_ref());
        }
    }
    if let Some((k, v)) = crate::support::engine_env() {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

impl Process {
    /// Starts `token-sidecar --config <file with toml>`, plus `extra` settings.
    pub fn run_config(toml: &str, extra: impl FnOnce(&mut Command)) -> Process {
        Self::run_config_with(command(), toml, extra)
    }

    /// [`Process::run_config`] with `cmd` (from [`command`] or
    /// [`command_with_hosts`]).
    pub fn run_config_with(
        mut cmd: Command,
        toml: &str,
        extra: impl FnOnce(&mut Command),
    ) -> Process {
        let (dir, path) = write_config(toml);
        cmd.arg("--config").arg(&path);
        extra(&mut cmd);
        let mut p = Process::spawn(cmd);
        p._dir = Some(dir);
        p
    }

    pub fn spawn(mut cmd: Command) -> Process {
        let mut child = cmd.spawn().expect("spawn token-sidecar");
        let output = Arc::new(Mutex::new(Output::default()));
        let (tx, rx) = watch::channel(0u64);
        let tx = Arc::new(tx);
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        reader(out, Stream::Stdout, output.clone(), tx.clone());
        reader(err, Stream::Stderr, output.clone(), tx);
        Process {
            child,
            output,
            changed: rx,
            _dir: None,
            engine_counts: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig`, after reading the engine counters while the process
    /// still answers.
    pub fn signal(&self, sig: i32) {
        self.read_engine_counts();
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    /// Waits until a line satisfies `pred`; returns it. Panics after `limit`
    /// or when both streams closed without such a line.
    pub async fn wait_line(
        &mut self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            {
                let o = self.output.lock().unwrap();
                if let Some((_, l)) = o.lines.iter().find(|(_, l)| pred(l)) {
                    return l.clone();
                }
                if o.closed == 2 {
                    panic!(
                        "the sidecar's output ended without: {what}\n{}",
                        o.all_text()
                    );
                }
            }
            if tokio::time::timeout_at(deadline, self.changed.changed())
                .await
                .is_err()
            {
                let o = self.output.lock().unwrap();
                panic!(
                    "timed out after {limit:?} waiting for: {what}\n{}",
                    o.all_text()
                );
            }
        }
    }

    /// Waits for a JSON log line whose `message` is `message`; returns it parsed.
    pub async fn wait_event(&mut self, limit: Duration, message: &str) -> serde_json::Value {
        let line = self
            .wait_line(limit, message, |l| {
                json_line(l).is_some_and(|v| v["message"] == message)
            })
            .await;
        json_line(&line).expect("checked above")
    }

    /// Reads the engine counters from `/metrics` now, for the engine check
    /// of a test that runs on both engines (nothing otherwise). Done before
    /// every signal and kill; a test whose process exits another way
    /// (`POST /admin/shutdown`) calls it while the process still serves.
    pub fn read_engine_counts(&self) {
        if let Some(c) = &self.engine_counts {
            c.read();
        }
    }

    /// The proxy and admin addresses, from the (JSON) `listening` line. In a
    /// test that runs on both engines, also registers the process with the
    /// engine check.
    pub async fn addresses(&mut self) -> (SocketAddr, SocketAddr) {
        let v = self.wait_event(Duration::from_secs(20), "listening").await;
        let proxy = v["proxy"]
            .as_str()
            .and_then(|s| s.trim_matches(['[', ']']).split(", ").next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("proxy address in {v}"));
        let admin = v["admin"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("admin address in {v}"));
        if self.engine_counts.is_none() {
            self.engine_counts = crate::support::ProcessCounts::register(admin);
        }
        (proxy, admin)
    }

    /// Waits for the process to exit; panics after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the reader threads drain what is left in the pipes.
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while self.output.lock().unwrap().closed < 2 {
                        if self.changed.changed().await.is_err() {
                            break;
                        }
                    }
                })
                .await;
                return status;
            }
            if tokio::time::Instant::now() > deadline {
                let o = self.output.lock().unwrap();
                panic!(
                    "the sidecar did not exit within {limit:?}\n{}",
                    o.all_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn text(&self) -> String {
        self.output.lock().unwrap().all_text()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.read_engine_counts();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn reader(
    stream: impl Read + Send + 'static,
    which: Stream,
    output: Arc<Mutex<Output>>,
    tx: Arc<watch::Sender<u64>>,
) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                    output.lock().unwrap().lines.push((which, line));
                    tx.send_modify(|n| *n += 1);
                }
            }
        }
        output.lock().unwrap().closed += 1;
        tx.send_modify(|n| *n += 1);
    });
}

/// A log line parsed as JSON, if it is one.
pub fn json_line(line: &str) -> Option<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .filter(|v| v.is_object())
}

/// The config path's directory, for tests that add files next to it.
pub fn dir_of(path: &Path) -> &Path {
    path.parent().expect("config file has a directory")
}

/// Runs the binary to completion with `args`; returns status, stdout, stderr.
pub fn run_to_end(mut cmd: Command) -> (ExitStatus, String, String) {
    cmd.stdin(Stdio::null());
    let out = cmd.output().expect("run token-sidecar");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
