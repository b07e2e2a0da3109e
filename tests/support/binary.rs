//! The real `token-sidecar` binary as a child process, for tests that need a
//! process of its own: environment variables (egress proxies), resident
//! memory. Included with `#[path = "support/binary.rs"] mod binary;`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Proxy variables the tests control; never inherited from the machine.
const PROXY_VARS: &[&str] = &[
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "REQUEST_METHOD",
    "RUST_LOG",
];

/// A running sidecar process; killed when dropped.
pub struct Process {
    child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// Every line of stdout (JSON logs) and stderr so far.
    pub output: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// Starts the binary with `toml` as its config (JSON logs are forced) and
    /// `env` added to a cleaned environment; returns once it listens.
    pub async fn spawn(toml: &str, env: &[(&str, &str)]) -> Process {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            toml.replace("format = \"text\"", "format = \"json\""),
        )
        .expect("write config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_token-sidecar"));
        cmd.arg("--config")
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for v in PROXY_VARS {
            cmd.env_remove(v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn token-sidecar");
        let output = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        collect_lines(stdout, output.clone());
        collect_lines(stderr, output.clone());
        let mut process = Process {
            child,
            proxy: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            output,
            _dir: dir,
        };
        for _ in 0..1000 {
            let listening = process
                .lines()
                .into_iter()
                .find(|l| l["message"] == "listening");
            if let Some(l) = listening {
                let proxy = l["proxy"].as_str().expect("proxy addresses");
                let first = proxy
                    .trim_matches(|c| c == '[' || c == ']')
                    .split(", ")
                    .next()
                    .unwrap();
                process.proxy = first.parse().expect("a proxy address");
                process.admin = l["admin"].as_str().unwrap().parse().unwrap();
                return process;
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!("token-sidecar exited with {status}: {:?}", process.text());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "token-sidecar did not listen within 10 s: {:?}",
            process.text()
        );
    }

    /// Waits until `/readyz` says 200.
    pub async fn ready(&self) {
        let client = crate::support::client();
        let url = format!("http://{}/readyz", self.admin);
        crate::support::eventually(Duration::from_secs(10), "the sidecar is ready", || {
            let req = client.get(&url).send();
            async move { req.await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
    pub fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    pub fn text(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    pub fn lines(&self) -> Vec<serde_json::Value> {
        self.output
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// Appends each line `from` yields to `into`, on a thread of its own.
fn collect_lines(from: impl std::io::Read + Send + 'static, into: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            into.lock().unwrap().push(line);
        }
    });
}

/// `support::base_toml` with `extra` lines added to its `[proxy]` table.
pub fn toml_with_proxy_keys(base: &str, extra: &str) -> String {
    base.replacen("[proxy]\n", &format!("[proxy]\n{extra}\n"), 1)
}
