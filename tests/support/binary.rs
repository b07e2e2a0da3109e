//! The real `token-sidecar` binary as a child process, for tests that need a
//! process of its own: environment variables (egress proxies), resident
//! memory. Included with `#[path = "support/binary.rs"] mod binary;` next to
//! `mod sidecar_process;`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use crate::sidecar_process;

/// Proxy variables the tests control; never inherited from the machine.
/// (`sidecar_process::command` already drops `RUST_LOG` and `TOKEN_SIDECAR_*`.)
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
];

/// A running sidecar process with its addresses; killed when dropped.
/// A thin layer over [`sidecar_process::Process`], which owns spawning and
/// output capture for every test that runs the binary.
pub struct Process {
    inner: sidecar_process::Process,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
}

impl Process {
    /// Starts the binary with `toml` as its config (JSON logs are forced) and
    /// `env` added to a cleaned environment; returns once it listens.
    pub async fn spawn(toml: &str, env: &[(&str, &str)]) -> Process {
        Self::spawn_with(toml, env, &[]).await
    }

    /// Like [`Self::spawn`], with the variables named in `unset` removed too.
    pub async fn spawn_with(toml: &str, env: &[(&str, &str)], unset: &[&str]) -> Process {
        let toml = toml.replace("format = \"text\"", "format = \"json\"");
        let mut inner = sidecar_process::Process::run_config(&toml, |cmd| {
            for v in PROXY_VARS.iter().chain(unset) {
                cmd.env_remove(v);
            }
            for (k, v) in env {
                cmd.env(k, v);
            }
        });
        let (proxy, admin) = inner.addresses().await;
        Process {
            inner,
            proxy,
            admin,
        }
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
        self.inner.pid() as u32
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
        self.inner.text()
    }

    /// The first JSON log event whose `message` is `message` (panics if none).
    pub fn event(&self, message: &str) -> serde_json::Value {
        self.lines()
            .into_iter()
            .find(|l| l["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line in\n{}", self.text()))
    }

    /// Every output line that is a JSON log event.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        self.text()
            .lines()
            .filter_map(sidecar_process::json_line)
            .collect()
    }
}

/// `support::base_toml` with `extra` lines added to its `[proxy]` table.
pub fn toml_with_proxy_keys(base: &str, extra: &str) -> String {
    base.replacen("[proxy]\n", &format!("[proxy]\n{extra}\n"), 1)
}
