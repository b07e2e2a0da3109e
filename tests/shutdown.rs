//! Probes and graceful shutdown of the real binary: SIGTERM, SIGINT, a second
//! signal, SIGHUP (which must not stop it) and `POST /admin/shutdown`, with a
//! request held in flight by a test upstream that answers only when the test
//! releases it (so no test depends on how long anything takes).

mod sidecar_process;
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use sidecar_process::Process;
use token_sidecar::fake::{self, FakeServer, World};
use token_sidecar::proxy::body::ProxyBody;
use token_sidecar::serve::{ServeOptions, Server};
use tokio::sync::{mpsc, watch};

const LIMIT: Duration = Duration::from_secs(10);

/// An upstream whose `/slow` answers 200 only once the test releases it;
/// every other path answers 200 at once.
struct SlowUpstream {
    addr: SocketAddr,
    /// One message per `/slow` request that has arrived.
    arrived: mpsc::UnboundedReceiver<()>,
    release: watch::Sender<bool>,
    _server: Server,
}

async fn slow_upstream() -> SlowUpstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (arrived_tx, arrived) = mpsc::unbounded_channel();
    let (release, release_rx) = watch::channel(false);
    let mut server = Server::new();
    let opts = ServeOptions {
        max_connections: 64,
        idle_timeout: Duration::from_secs(60),
        max_header_bytes: 64 * 1024,
        http2: false,
        write_stall_timeout: None,
    };
    server.spawn(listener, opts, move |req: Request<Incoming>, _| {
        let arrived = arrived_tx.clone();
        let mut release = release_rx.clone();
        async move {
            let body = if req.uri().path().ends_with("/slow") {
                let _ = arrived.send(());
                let _ = release.wait_for(|r| *r).await;
                "slow done"
            } else {
                "fast"
            };
            Response::new(ProxyBody::full(Bytes::from_static(body.as_bytes())))
        }
    });
    SlowUpstream {
        addr,
        arrived,
        release,
        _server: server,
    }
}

struct Setup {
    sidecar: Process,
    proxy: SocketAddr,
    admin: SocketAddr,
    upstream: SlowUpstream,
    _auth: FakeServer,
    _world: Arc<World>,
}

/// The fake token endpoint, the slow upstream, and the binary in front of
/// them with `[shutdown]` set to `shutdown` (TOML lines).
async fn setup(shutdown: &str) -> Setup {
    let world = World::new(300.0);
    let auth = fake::token_endpoint(world.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let upstream = slow_upstream().await;
    let toml = format!(
        "{}\n[shutdown]\n{shutdown}\n",
        support::base_toml(
            &world,
            &auth.url("/oauth/token"),
            &format!("http://{}/base/", upstream.addr)
        )
        .replace("format = \"text\"", "format = \"json\"")
    );
    let mut sidecar = Process::run_config(&toml, |_| {});
    let (proxy, admin) = sidecar.addresses().await;
    let s = Setup {
        sidecar,
        proxy,
        admin,
        upstream,
        _auth: auth,
        _world: world,
    };
    support::eventually(LIMIT, "/readyz 200", || async {
        readyz(s.admin).await == Some(StatusCode::OK)
    })
    .await;
    s
}

async fn readyz(admin: SocketAddr) -> Option<StatusCode> {
    let r = support::client()
        .get(format!("http://{admin}/readyz"))
        .send()
        .await
        .ok()?;
    Some(r.status())
}

impl Setup {
    /// Starts `GET /slow` through the proxy and waits until the upstream holds it.
    async fn hold_a_request(&mut self) -> tokio::task::JoinHandle<reqwest::Result<(u16, String)>> {
        let url = format!("http://{}/slow", self.proxy);
        let task = tokio::spawn(async move {
            let r = support::client().get(url).send().await?;
            let status = r.status().as_u16();
            Ok((status, r.text().await?))
        });
        tokio::time::timeout(LIMIT, self.upstream.arrived.recv())
            .await
            .expect("the slow request reaches the upstream")
            .expect("upstream running");
        // For the engine check: the process may end without a signal.
        self.sidecar.read_engine_counts();
        task
    }

    /// A fresh connection (its own client, so no pooled one) for `GET /fast`.
    async fn fast_request(&self) -> reqwest::Result<u16> {
        let r = support::client()
            .get(format!("http://{}/fast", self.proxy))
            .send()
            .await?;
        self.sidecar.read_engine_counts();
        Ok(r.status().as_u16())
    }
}

/// Waits until a new TCP connection to `addr` is refused.
async fn until_refused(addr: SocketAddr) {
    support::eventually(LIMIT, "new connections are refused", || async {
        matches!(
            tokio::net::TcpStream::connect(addr).await,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    })
    .await;
}

engines! {
#[tokio::test]
async fn sigterm_drains_then_refuses_new_connections_and_finishes_the_request_in_flight() {
    let mut s = setup("drain_delay = \"3s\"\ngrace = \"20s\"").await;
    let slow = s.hold_a_request().await;

    s.sidecar.signal(libc::SIGTERM);
    // /readyz turns 503 at once, with the reason.
    support::eventually(LIMIT, "/readyz 503 draining", || async {
        let r = support::client()
            .get(format!("http://{}/readyz", s.admin))
            .send()
            .await;
        match r {
            Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => {
                r.text().await.is_ok_and(|t| t.contains("draining"))
            }
            _ => false,
        }
    })
    .await;
    // During shutdown.drain_delay the proxy still takes new connections.
    assert_eq!(
        s.fast_request()
            .await
            .expect("accepted during the drain delay"),
        200
    );
    assert!(
        !s.sidecar.text().contains("stopped accepting"),
        "the drain delay (3 s) was over before the request in it was sent; the machine is too slow for this test"
    );

    // Then it stops accepting, while the held request is still in flight.
    s.sidecar
        .wait_event(LIMIT, "stopped accepting; waiting for in-flight requests")
        .await;
    until_refused(s.proxy).await;
    assert!(
        s.sidecar.child.try_wait().unwrap().is_none(),
        "exited with a request in flight"
    );
    assert!(!slow.is_finished());
    assert_eq!(
        readyz(s.admin).await,
        Some(StatusCode::SERVICE_UNAVAILABLE),
        "the admin listener keeps answering during the grace period"
    );

    // The request in flight completes with the upstream's answer; then exit 0.
    s.upstream.release.send_replace(true);
    let (status, body) = slow.await.unwrap().expect("the held request completes");
    assert_eq!((status, body.as_str()), (200, "slow done"));
    let exit = s.sidecar.wait_exit(LIMIT).await;
    assert_eq!(exit.code(), Some(0), "{}", s.sidecar.text());
    assert!(s.sidecar.text().contains("all requests finished"));
}

#[tokio::test]
async fn a_second_signal_exits_at_once_with_128_plus_the_signal_number() {
    // grace 60 s: without the second signal the held request would keep the
    // process up for a minute.
    let mut s = setup("grace = \"60s\"").await;
    let slow = s.hold_a_request().await;
    s.sidecar.signal(libc::SIGTERM);
    s.sidecar
        .wait_event(LIMIT, "stopped accepting; waiting for in-flight requests")
        .await;
    s.sidecar.signal(libc::SIGINT);
    let exit = s.sidecar.wait_exit(LIMIT).await;
    assert_eq!(
        exit.code(),
        Some(128 + libc::SIGINT),
        "{}",
        s.sidecar.text()
    );
    let line = s
        .sidecar
        .wait_event(LIMIT, "second signal: exiting now")
        .await;
    assert_eq!(line["signal"], "SIGINT");
    assert!(
        slow.await.unwrap().is_err(),
        "the held request was cut off, not answered"
    );
}


#[tokio::test]
async fn sigint_waits_at_most_the_grace_period_then_exits_0() {
    let mut s = setup("grace = \"300ms\"").await;
    let slow = s.hold_a_request().await;
    s.sidecar.signal(libc::SIGINT);
    let exit = s.sidecar.wait_exit(LIMIT).await;
    assert_eq!(exit.code(), Some(0), "{}", s.sidecar.text());
    let text = s.sidecar.text();
    assert!(text.contains("\"reason\":\"SIGINT\""), "{text}");
    assert!(text.contains("grace period over"), "{text}");
    assert!(slow.await.unwrap().is_err(), "the held request was cut off");
}

#[tokio::test]
async fn post_admin_shutdown_from_loopback_drains_like_sigterm() {
    let mut s = setup("grace = \"20s\"").await;
    let slow = s.hold_a_request().await;
    let admin = |path: &str| format!("http://{}{path}", s.admin);

    // Only POST starts it.
    let r = support::client()
        .get(admin("/admin/shutdown"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(readyz(s.admin).await, Some(StatusCode::OK));

    let r = support::client()
        .post(admin("/admin/shutdown"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(readyz(s.admin).await, Some(StatusCode::SERVICE_UNAVAILABLE));
    until_refused(s.proxy).await;

    s.upstream.release.send_replace(true);
    let (status, body) = slow.await.unwrap().expect("the held request completes");
    assert_eq!((status, body.as_str()), (200, "slow done"));
    let exit = s.sidecar.wait_exit(LIMIT).await;
    assert_eq!(exit.code(), Some(0), "{}", s.sidecar.text());
    assert!(s
        .sidecar
        .text()
        .contains("\"reason\":\"POST /admin/shutdown\""));
}
}

/// The SIGHUP lines the sidecar has written so far.
fn sighup_lines(p: &Process) -> Vec<serde_json::Value> {
    p.text()
        .lines()
        .filter_map(sidecar_process::json_line)
        .filter(|v| v["signal"] == "SIGHUP")
        .collect()
}

#[tokio::test]
async fn sighup_logs_one_info_line_and_neither_kills_nor_drains() {
    let mut s = setup("grace = \"20s\"").await;
    s.sidecar.signal(libc::SIGHUP);
    // SIGHUP's default action kills the process: without a handler this
    // fails with "the sidecar's output ended".
    s.sidecar
        .wait_line(LIMIT, "the SIGHUP line", |l| {
            sidecar_process::json_line(l).is_some_and(|v| v["signal"] == "SIGHUP")
        })
        .await;
    let line = &sighup_lines(&s.sidecar)[0];
    assert_eq!(line["level"], "INFO", "{line}");
    let message = line["message"].as_str().unwrap();
    assert!(
        message.contains("configuration is read at start only"),
        "{message}"
    );
    assert!(
        message.contains("secret files are re-read on every grant"),
        "{message}"
    );

    // Still serving, still ready, not draining.
    assert_eq!(s.fast_request().await.unwrap(), 200);
    assert_eq!(readyz(s.admin).await, Some(StatusCode::OK));
    assert!(!s.sidecar.text().contains("shutdown started"));

    // A second SIGHUP is one more line, not a "second signal".
    s.sidecar.signal(libc::SIGHUP);
    support::eventually(LIMIT, "a second SIGHUP line", || {
        let n = sighup_lines(&s.sidecar).len();
        async move { n == 2 }
    })
    .await;
    assert_eq!(s.fast_request().await.unwrap(), 200);

    // SIGTERM afterwards is the first shutdown signal: a clean drain, exit 0.
    s.sidecar.signal(libc::SIGTERM);
    let exit = s.sidecar.wait_exit(LIMIT).await;
    assert_eq!(exit.code(), Some(0), "{}", s.sidecar.text());
    let text = s.sidecar.text();
    assert!(!text.contains("second signal"), "{text}");
    assert_eq!(sighup_lines(&s.sidecar).len(), 2, "{text}");
}

#[tokio::test]
async fn healthz_is_unconditional_and_readyz_waits_for_a_token() {
    // A token endpoint that refuses the login: the process serves, has no token.
    let world = World::new(300.0);
    let auth = fake::token_endpoint(world.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let toml = support::base_toml(&world, &auth.url("/oauth/token"), "http://127.0.0.1:9/")
        .replace("format = \"text\"", "format = \"json\"");
    world.with(|w| w.password = "not-what-the-sidecar-sends".into());
    let mut p = Process::run_config(&toml, |_| {});
    let (_, admin) = p.addresses().await;
    p.wait_event(LIMIT, "token request rejected").await;
    let c = support::client();
    let h = c
        .get(format!("http://{admin}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), StatusCode::OK);
    // The status snapshot follows the log line by a moment: await it.
    support::eventually(LIMIT, "/readyz 503 no_token_yet invalid_grant", || async {
        let r = c
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["reason"], "no_token_yet");
        body["last_error"] == "invalid_grant"
    })
    .await;
}

/// Names of the process's threads, from `/proc/PID/task/*/comm`.
fn thread_names(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim_end().to_owned())
        .collect()
}

#[tokio::test]
async fn the_runtime_runs_the_configured_number_of_named_worker_threads() {
    let world = World::new(300.0);
    let auth = fake::token_endpoint(world.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let toml = support::base_toml(&world, &auth.url("/oauth/token"), "http://127.0.0.1:9/")
        .replace("format = \"text\"", "format = \"json\"");

    let mut p = Process::run_config(&format!("{toml}\n[runtime]\nworker_threads = 3\n"), |_| {});
    let started = p.wait_event(LIMIT, "starting the runtime").await;
    assert_eq!(started["worker_threads"], 3);
    assert_eq!(started["source"], "runtime.worker_threads");
    p.wait_event(LIMIT, "token obtained").await;
    let names = thread_names(p.pid());
    let workers = names.iter().filter(|n| *n == "sidecar-worker").count();
    assert_eq!(workers, 3, "{names:?}");
    assert!(
        names.contains(&"token-sidecar".to_owned()),
        "main thread: {names:?}"
    );

    // Default: one worker, however many CPUs the process may use.
    let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut p = Process::run_config(&toml, |_| {});
    let started = p.wait_event(LIMIT, "starting the runtime").await;
    assert_eq!(
        started["worker_threads"], 1,
        "{started} ({allowed} CPUs allowed)"
    );
    p.wait_event(LIMIT, "token obtained").await;
    let names = thread_names(p.pid());
    assert_eq!(
        names.iter().filter(|n| *n == "sidecar-worker").count(),
        1,
        "{names:?}"
    );
    drop(p);

    // 0: what the CPU quota and affinity allow: every allowed CPU...
    let auto = format!("{toml}\n[runtime]\nworker_threads = 0\n");
    let mut p = Process::run_config(&auto, |_| {});
    let started = p.wait_event(LIMIT, "starting the runtime").await;
    assert_eq!(started["worker_threads"], allowed, "{started}");
    assert_eq!(started["source"], "cpu quota and affinity");
    drop(p);

    // ...so pinned to one CPU, one.
    let mut cmd = sidecar_process::command();
    let (_dir, path) = sidecar_process::write_config(&auto);
    cmd.arg("--config").arg(&path);
    // SAFETY: sched_setaffinity is a plain system call, safe between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut p = Process::spawn(cmd);
    let started = p.wait_event(LIMIT, "starting the runtime").await;
    assert_eq!(started["worker_threads"], 1, "{started}");
    assert_eq!(started["source"], "cpu quota and affinity");
    p.wait_event(LIMIT, "token obtained").await;
    let names = thread_names(p.pid());
    assert_eq!(
        names.iter().filter(|n| *n == "sidecar-worker").count(),
        1,
        "{names:?}"
    );
}
