//! The soak: the real `token-sidecar` binary in front of the fake token
//! endpoint and fake backoffice (in this process, on loopback), driven by
//! many keep-alive clients while faults are injected on a schedule.
//! Run it with `bench/soak.sh [DURATION_SECS]`.
//!
//! Tokens live `--lifetime` seconds (2 s by default, so a 60 s run spans 30
//! lifetimes). Such short tokens are refreshed just before half their
//! lifetime (0.90-1.00 s for 2 s: the band slides below the
//! `refresh.min_remaining` cap) and injected until 90% of it (the default
//! expiry margin), so after each planned refresh there is a window of about
//! 40% of the lifetime in which a retry still saves the token. Every fault of
//! the main run is placed across the planned refresh and ends inside that
//! window (the timing comes from `token::schedule`, the sidecar's own policy):
//!
//! - token endpoint answers 500 for 1 s (half a second either side of the
//!   refresh);
//! - token endpoint hangs (answers after 5 s, past `oauth.timeout` of
//!   300 ms) for the requests that arrive from 0.2 s before to 0.3 s after
//!   the planned refresh;
//! - every live access token revoked at the backoffice (in-flight requests
//!   meet 401 `invalid_token` and are replayed);
//! - the backoffice password changed and the password file rotated by a
//!   Kubernetes-style `..data` symlink swap, with every refresh token
//!   revoked at the same time so that the next grant must be a password
//!   grant with the new password;
//! - every refresh token revoked (the next refresh is refused; the password
//!   grant takes over).
//!
//! Target for the main run: every request answered 2xx. Then a separate
//! phase takes the token endpoint down for longer than the token has left,
//! `--outages` times: requests must get 503 `token_unavailable` (never a 401
//! for an expired token) and flow again once the endpoint is back. The time
//! from the endpoint's return to the first 2xx is reported per outage
//! (median and max); with no usable token the sidecar retries at most
//! `refresh.backoff_max_without_token` apart, so that is its bound. The
//! sidecar runs with the default backoffs. The backoffice counts 401s for
//! expired tokens apart from revoked ones, and the run fails if it saw any.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use token_sidecar::config;
use token_sidecar::fake::{self, Fault, Scripted, World};
use token_sidecar::token::schedule;

#[derive(Parser, Debug)]
#[command(about = "Soak token-sidecar with short-lived tokens and injected faults")]
struct Args {
    /// Length of the main run, seconds.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Token lifetime, seconds.
    #[arg(long, default_value_t = 2.0)]
    lifetime: f64,
    /// Concurrent keep-alive clients.
    #[arg(long, default_value_t = 48)]
    clients: usize,
    /// Pause of each client between two requests, milliseconds.
    #[arg(long, default_value_t = 20)]
    think_ms: u64,
    /// A fault every this many token lifetimes.
    #[arg(long, default_value_t = 3)]
    fault_every: u32,
    /// Length of each token endpoint outage of the outage phase, in token lifetimes.
    #[arg(long, default_value_t = 2.5)]
    outage_lifetimes: f64,
    /// Number of outages in the outage phase.
    #[arg(long, default_value_t = 1)]
    outages: u32,
    /// The token-sidecar binary to run.
    #[arg(long, default_value = "target/release/token-sidecar")]
    sidecar: PathBuf,
}

/// The faults of the main run, injected in this order, round robin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Injection {
    Token500,
    TokenHang,
    RevokeAccess,
    RotatePassword,
    RevokeRefresh,
}

const INJECTIONS: [Injection; 5] = [
    Injection::Token500,
    Injection::TokenHang,
    Injection::RevokeAccess,
    Injection::RotatePassword,
    Injection::RevokeRefresh,
];

/// `oauth.timeout` of the soaked sidecar: hangs outlast it.
const OAUTH_TIMEOUT: Duration = Duration::from_millis(300);

/// What the clients saw in one phase.
#[derive(Default)]
struct Seen {
    sent: u64,
    ok: u64,
    /// `503 token_unavailable`, `502 upstream_unavailable`, `transport`...
    other: BTreeMap<String, u64>,
    latencies_us: Vec<u32>,
}

impl Seen {
    fn merge(&mut self, o: Seen) {
        self.sent += o.sent;
        self.ok += o.ok;
        for (k, v) in o.other {
            *self.other.entry(k).or_default() += v;
        }
        self.latencies_us.extend(o.latencies_us);
    }

    fn others(&self) -> String {
        if self.other.is_empty() {
            return "none".into();
        }
        self.other
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn percentile_ms(&mut self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        self.latencies_us.sort_unstable();
        let i = ((self.latencies_us.len() as f64 * p).ceil() as usize).saturating_sub(1);
        f64::from(self.latencies_us[i.min(self.latencies_us.len() - 1)]) / 1000.0
    }
}

const MAIN: u8 = 0;
const OUTAGE: u8 = 1;

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("soak: cannot build the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let lifetime = Duration::from_secs_f64(args.lifetime);
    let duration = Duration::from_secs(args.duration);
    let world = World::new(args.lifetime);
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let auth = fake::token_endpoint(world.clone(), loopback).await?;
    let api = fake::backoffice(world.clone(), loopback).await?;

    let dir = std::env::temp_dir().join(format!("token-sidecar-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("secrets"))?;
    let (secret, first_password) = world.with(|w| (w.client_secret.clone(), w.password.clone()));
    std::fs::write(dir.join("client_secret"), &secret)?;
    rotate_secret(&dir.join("secrets"), 1, &first_password)?;

    let proxy = free_port().await?;
    let admin = free_port().await?;
    let toml = sidecar_config(&world, &auth, &api, &dir, proxy, admin);
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, &toml)?;
    // The policy the sidecar plans with, from the very config it runs (the
    // file and the TOKEN_SIDECAR_* variables it inherits).
    let refresh_cfg = config::load(&config_path)
        .map_err(|e| anyhow::anyhow!("soak config invalid: {e}"))?
        .config
        .refresh;
    let mean_interval = schedule::mean_refresh_after(lifetime, &refresh_cfg);
    let planned = schedule::refresh_after(lifetime, 0.5, &refresh_cfg);
    let band = (
        schedule::refresh_after(lifetime, 0.0, &refresh_cfg),
        schedule::refresh_after(lifetime, 1.0, &refresh_cfg),
    );
    let usable = lifetime - schedule::expiry_margin(lifetime, &refresh_cfg);

    let log_path = dir.join("sidecar.log");
    let log = std::fs::File::create(&log_path)?;
    let mut child = Command::new(&args.sidecar)
        .arg("--config")
        .arg(&config_path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", args.sidecar.display()))?;
    let outcome = drive(
        &args,
        &world,
        &dir,
        proxy,
        admin,
        &mut child,
        Plan {
            lifetime,
            duration,
            mean_interval,
            planned,
            band,
            usable,
            back_bound: refresh_cfg.backoff_max_without_token,
        },
        &log_path,
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    match outcome {
        Ok(true) => {
            let _ = std::fs::remove_dir_all(&dir);
            Ok(true)
        }
        Ok(false) => {
            eprintln!("soak: sidecar log and config kept in {}", dir.display());
            Ok(false)
        }
        Err(e) => {
            eprintln!("soak: sidecar log and config kept in {}", dir.display());
            Err(e)
        }
    }
}

/// Timing of the token schedule, from the sidecar's own policy.
#[derive(Clone, Copy)]
struct Plan {
    lifetime: Duration,
    duration: Duration,
    /// Mean time between two refreshes (`schedule::mean_refresh_after`).
    mean_interval: Duration,
    /// When a refresh is due, counted from the grant: the middle of `band`.
    planned: Duration,
    /// Earliest and latest refresh the schedule plans.
    band: (Duration, Duration),
    /// How long a token is injected, counted from the grant.
    usable: Duration,
    /// `refresh.backoff_max_without_token`: the most an outage outlives the
    /// endpoint's return.
    back_bound: Duration,
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    args: &Args,
    world: &Arc<World>,
    dir: &Path,
    proxy: SocketAddr,
    admin: SocketAddr,
    child: &mut Child,
    plan: Plan,
    log_path: &Path,
) -> anyhow::Result<bool> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(args.clients)
        .timeout(Duration::from_secs(10))
        .build()?;
    wait_ready(&http, admin, child).await?;

    // Clients.
    let phase = Arc::new(AtomicU8::new(MAIN));
    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("http://{proxy}/api/soak");
    let clients: Vec<_> = (0..args.clients)
        .map(|_| {
            let (http, url, phase, stop) = (http.clone(), url.clone(), phase.clone(), stop.clone());
            let think = Duration::from_millis(args.think_ms);
            tokio::spawn(client(http, url, phase, stop, think))
        })
        .collect();

    // Main run: faults on a schedule.
    let started = Instant::now();
    let main_end = started + plan.duration;
    let mut injected = Vec::new();
    let mut passwords = vec![world.with(|w| w.password.clone())];
    let period = plan.lifetime * args.fault_every;
    let mut next_slot = started + plan.lifetime;
    let mut i = 0;
    // Each fault needs about two lifetimes from its slot.
    while next_slot + 2 * plan.lifetime <= main_end {
        sleep_until(next_slot).await;
        let kind = INJECTIONS[i % INJECTIONS.len()];
        let granted = next_grant(world, main_end).await;
        let Some(granted) = granted else { break };
        inject(world, kind, granted, plan, dir, &mut passwords).await?;
        injected.push(kind);
        i += 1;
        next_slot += period;
    }
    sleep_until(main_end).await;
    let grants_main = grants(world);
    let expired_main = world.with(|w| w.backoffice_401_expired);

    // Outage phase: the token endpoint down for longer than the token lives,
    // `outages` times, each once traffic flowed again after the last.
    phase.store(OUTAGE, Ordering::Release);
    let outage = plan.lifetime.mul_f64(args.outage_lifetimes);
    // The sidecar's bound on endpoint back -> retry while no token is held.
    let back_bound = plan.back_bound;
    let mut outages_over = Vec::new();
    let mut all_recovered = true;
    for _ in 0..args.outages.max(1) {
        let granted = next_grant(world, Instant::now() + 4 * plan.lifetime)
            .await
            .context("no token granted before the outage")?;
        sleep_until(granted + plan.lifetime / 10).await;
        world.with(|w| w.fault = Some(Fault::Answer(Scripted::json(500, serde_json::json!({})))));
        sleep_until(granted + plan.lifetime / 10 + outage).await;
        world.with(|w| w.fault = None);
        let over = Instant::now();
        outages_over.push(over);
        let recovered = wait_grant_after(world, over, over + back_bound + 5 * plan.lifetime).await;
        all_recovered &= recovered.is_some();
        sleep_until(Instant::now() + 2 * plan.lifetime).await;
    }
    stop.store(true, Ordering::Release);

    let mut main = Seen::default();
    let mut out = Seen::default();
    let mut events = Vec::new();
    for c in clients {
        let (m, o, e) = c.await?;
        main.merge(m);
        out.merge(o);
        events.extend(e);
    }
    // Once the token has run out no request succeeds until a new one comes:
    // the first 2xx answered after the endpoint is back marks the recovery.
    let mut recoveries: Vec<Duration> = outages_over
        .iter()
        .filter_map(|&over| {
            events
                .iter()
                .filter(|e| e.2 && e.1 > over)
                .map(|e| e.1)
                .min()
                .map(|t| t - over)
        })
        .collect();
    let unrecovered = outages_over.len() - recoveries.len();
    recoveries.sort_unstable();
    let recovery_median = recoveries.get(recoveries.len() / 2).copied();
    let recovery_max = recoveries.last().copied();

    // The sidecar's own view, its memory, its log.
    let metrics = http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let peak_rss_kib = peak_rss_kib(child.id())?;
    signal_term(child.id())?;
    let exit = wait_exit(child).await?;
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    let leaks = leaks(world, &log, &passwords);

    // Figures.
    let (password, refresh) = world.with(|w| (w.password_grants, w.refresh_grants));
    let attempts = world.with(|w| w.seen.len());
    let (expired, revoked) = world.with(|w| (w.backoffice_401_expired, w.backoffice_401_revoked));
    let replays = metric(
        &metrics,
        "token_sidecar_upstream_retries_total{reason=\"401\"}",
    );
    let refused_logins = metric(
        &metrics,
        "token_sidecar_token_requests_total{grant=\"password\",outcome=\"rejected\"}",
    );
    let revocations = injected
        .iter()
        .filter(|k| {
            matches!(
                k,
                Injection::RevokeAccess | Injection::RevokeRefresh | Injection::RotatePassword
            )
        })
        .count() as u64;
    // Every rotated password was accepted by a password grant.
    let unused_passwords: Vec<&String> = passwords
        .iter()
        .skip(1)
        .filter(|p| {
            !world.with(|w| {
                w.seen.iter().any(|r| {
                    r.param("grant_type") == Some("password") && r.param("password") == Some(p)
                })
            })
        })
        .collect();
    let lifetimes = plan.duration.as_secs_f64() / plan.lifetime.as_secs_f64();
    let planned_grants = plan.duration.as_secs_f64() / plan.mean_interval.as_secs_f64();
    let bound = (1.1 * planned_grants).floor() as u64 + revocations;
    let count = |k: Injection| injected.iter().filter(|&&x| x == k).count();
    let (p50, p99, max) = (
        main.percentile_ms(0.50),
        main.percentile_ms(0.99),
        main.percentile_ms(1.0),
    );
    let outage_503 = out
        .other
        .get("503 token_unavailable")
        .copied()
        .unwrap_or_default();
    let outage_bad: u64 = out
        .other
        .iter()
        .filter(|(k, _)| k.as_str() != "503 token_unavailable")
        .map(|(_, v)| v)
        .sum();

    println!(
        "soak: {dur}s main run, token lifetime {lt}s (refreshed at {b0:.2}-{b1:.2}s, injected until {us:.2}s; {lifetimes:.0} lifetimes), {clients} clients; \
         faults: token-500x1s={f500} token-hang={fhang} revoke-access={fra} rotate-password={frot} revoke-refresh={frr}; \
         main: sent={sent} 2xx={ok} other={other}; \
         grants: password={password} refresh_token={refresh} (main run {grants_main}, bound {bound}), token requests {attempts}; \
         401 replays={replays} (upstream 401s: revoked={revoked} expired={expired}); \
         {n_out} outages of {outage:.1}s: sent={osent} 2xx={ook} 503_token_unavailable={outage_503} other={oother}; \
         endpoint back -> first 2xx: median {rmed} max {rmax} (bound {bound_s:.1}s); \
         peak RSS {rss:.1} MiB; latency p50={p50:.2}ms p99={p99:.2}ms max={max:.1}ms",
        dur = plan.duration.as_secs(),
        lt = plan.lifetime.as_secs_f64(),
        b0 = plan.band.0.as_secs_f64(),
        b1 = plan.band.1.as_secs_f64(),
        us = plan.usable.as_secs_f64(),
        clients = args.clients,
        f500 = count(Injection::Token500),
        fhang = count(Injection::TokenHang),
        fra = count(Injection::RevokeAccess),
        frot = count(Injection::RotatePassword),
        frr = count(Injection::RevokeRefresh),
        sent = main.sent,
        ok = main.ok,
        other = main.others(),
        replays = replays.map_or("?".into(), |r| format!("{r}")),
        outage = outage.as_secs_f64(),
        osent = out.sent,
        ook = out.ok,
        oother = if outage_bad == 0 { "none".into() } else { out.others() },
        n_out = outages_over.len(),
        rmed = recovery_median.map_or("never".into(), |d| format!("{:.2}s", d.as_secs_f64())),
        rmax = recovery_max.map_or("never".into(), |d| format!("{:.2}s", d.as_secs_f64())),
        bound_s = back_bound.as_secs_f64(),
        rss = peak_rss_kib as f64 / 1024.0,
    );

    let checks = [
        (
            lifetimes >= 30.0 - 1e-9,
            format!("main run spans >= 30 token lifetimes ({lifetimes:.1})"),
        ),
        (
            main.sent > 0 && main.ok == main.sent,
            format!("main run: every request 2xx ({} of {})", main.ok, main.sent),
        ),
        (
            INJECTIONS.iter().all(|&k| count(k) >= 1),
            "main run: every kind of fault injected at least once".to_string(),
        ),
        (
            unused_passwords.is_empty() && passwords.len() > 1,
            format!(
                "every rotated password used by the next password grant ({} rotations)",
                passwords.len() - 1
            ),
        ),
        (
            refused_logins == Some(0.0),
            format!("no password grant refused ({refused_logins:?})"),
        ),
        (
            grants_main <= bound,
            format!(
                "grants in the main run {grants_main} <= 1.1 x {planned_grants:.1} planned + {revocations} revocations = {bound}"
            ),
        ),
        (
            expired_main == 0 && expired == 0,
            format!("no expired token reached the upstream ({expired})"),
        ),
        (
            revoked > 0 && replays.unwrap_or(0.0) > 0.0,
            "revoked tokens met 401s that were replayed".to_string(),
        ),
        (
            outage_503 > 0 && outage_bad == 0,
            format!("outage: only 503 token_unavailable besides 2xx ({outage_503} of them)"),
        ),
        (
            all_recovered && unrecovered == 0,
            format!(
                "outages: traffic flows again once the endpoint is back, without a restart ({} of {})",
                recoveries.len(),
                outages_over.len()
            ),
        ),
        (
            recovery_max.is_some_and(|m| m <= back_bound + Duration::from_millis(500)),
            format!(
                "outages: endpoint back -> first 2xx within backoff_max_without_token + 0.5 s ({:.1}s)",
                back_bound.as_secs_f64()
            ),
        ),
        (
            exit.success(),
            format!("sidecar exits cleanly on SIGTERM ({exit})"),
        ),
        (
            leaks.is_empty(),
            format!("no secret in the sidecar's log {leaks:?}"),
        ),
    ];
    let mut pass = true;
    for (ok, what) in &checks {
        println!("  {} {what}", if *ok { "PASS" } else { "FAIL" });
        pass &= ok;
    }
    Ok(pass)
}

/// One request of the outage phase: started, ended, answered 2xx.
type Event = (Instant, Instant, bool);

/// One keep-alive client: requests until told to stop, recording what it
/// saw in the phase each request started in.
async fn client(
    http: reqwest::Client,
    url: String,
    phase: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    think: Duration,
) -> (Seen, Seen, Vec<Event>) {
    let mut seen = [Seen::default(), Seen::default()];
    let mut events = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let p = phase.load(Ordering::Acquire) as usize;
        let start = Instant::now();
        let result = http.get(&url).send().await;
        let s = &mut seen[p];
        s.sent += 1;
        let mut ok = false;
        match result {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = resp.bytes().await;
                let took = start.elapsed();
                s.latencies_us
                    .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
                match (status, body) {
                    (200..=299, Ok(_)) => {
                        s.ok += 1;
                        ok = true;
                    }
                    (_, Ok(b)) => {
                        let code = serde_json::from_slice::<serde_json::Value>(&b)
                            .ok()
                            .and_then(|v| v["error"].as_str().map(str::to_owned))
                            .unwrap_or_default();
                        *s.other.entry(format!("{status} {code}")).or_default() += 1;
                    }
                    (_, Err(_)) => *s.other.entry(format!("{status} body_error")).or_default() += 1,
                }
            }
            Err(_) => *s.other.entry("transport_error".into()).or_default() += 1,
        }
        if p == OUTAGE as usize {
            events.push((start, Instant::now(), ok));
        }
        tokio::time::sleep(think).await;
    }
    let [main, outage] = seen;
    (main, outage, events)
}

/// Injects one fault, placed across the refresh planned after `granted`.
async fn inject(
    world: &World,
    kind: Injection,
    granted: Instant,
    plan: Plan,
    dir: &Path,
    passwords: &mut Vec<String>,
) -> anyhow::Result<()> {
    let refresh_at = granted + plan.planned;
    let quiet = granted + plan.lifetime / 10;
    match kind {
        Injection::Token500 => {
            // 1 s, centred on the planned refresh.
            let half = Duration::from_millis(500);
            sleep_until(refresh_at - half).await;
            let fault = Fault::Answer(Scripted::json(
                500,
                serde_json::json!({"error": "server_error"}),
            ));
            world.with(|w| w.fault = Some(fault));
            sleep_until(refresh_at + half).await;
            world.with(|w| w.fault = None);
        }
        Injection::TokenHang => {
            // Requests arriving from 200 ms before the planned refresh to
            // 300 ms after it are answered only after 5 s: each times out at
            // oauth.timeout, and the last ends with time left for a retry.
            sleep_until(refresh_at - Duration::from_millis(200)).await;
            let hang = Scripted::json(500, serde_json::json!({})).after(Duration::from_secs(5));
            world.with(|w| w.fault = Some(Fault::Answer(hang)));
            sleep_until(refresh_at + Duration::from_millis(300)).await;
            world.with(|w| w.fault = None);
        }
        Injection::RevokeAccess => {
            sleep_until(quiet).await;
            world.revoke_access_tokens();
        }
        Injection::RotatePassword => {
            // Between grants: no password grant is in flight.
            sleep_until(quiet).await;
            let version = passwords.len() as u32 + 1;
            let new = format!("soak-password-{version}");
            world.with(|w| w.password = new.clone());
            rotate_secret(&dir.join("secrets"), version, &new)?;
            passwords.push(new);
            // The next grant is then a password grant: the new one must work.
            world.revoke_refresh_tokens();
        }
        Injection::RevokeRefresh => {
            sleep_until(quiet).await;
            world.revoke_refresh_tokens();
        }
    }
    Ok(())
}

/// Writes `password` as version `v` of a Kubernetes-style secret volume and
/// swaps the `..data` symlink to it atomically, as the kubelet does.
fn rotate_secret(dir: &Path, v: u32, password: &str) -> anyhow::Result<()> {
    let version = format!("..v{v}");
    std::fs::create_dir(dir.join(&version))?;
    std::fs::write(dir.join(&version).join("password"), format!("{password}\n"))?;
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(&version, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    if v == 1 {
        std::os::unix::fs::symlink("..data/password", dir.join("password"))?;
    }
    Ok(())
}

fn sidecar_config(
    world: &World,
    auth: &fake::FakeServer,
    api: &fake::FakeServer,
    dir: &Path,
    proxy: SocketAddr,
    admin: SocketAddr,
) -> String {
    let (id, user) = world.with(|w| (w.client_id.clone(), w.username.clone()));
    format!(
        r#"# Generated by the soak (src/bin/soak.rs).
[proxy]
listen = "{proxy}"
upstream = "{upstream}"
token_wait = "2s"
request_timeout = "5s"
access_log = false
[admin]
listen = "{admin}"
[oauth]
token_url = "{token_url}"
client_id = "{id}"
client_secret_file = "{dir}/client_secret"
username = "{user}"
password_file = "{dir}/secrets/password"
timeout = "{timeout}ms"
[refresh]
min_interval = "100ms"
backoff_base = "100ms"
secret_poll_interval = "200ms"
[log]
format = "json"
level = "info"
"#,
        upstream = api.url("/base/"),
        token_url = auth.url("/oauth/token"),
        dir = dir.display(),
        timeout = OAUTH_TIMEOUT.as_millis(),
    )
}

async fn free_port() -> std::io::Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    l.local_addr()
}

async fn wait_ready(
    http: &reqwest::Client,
    admin: SocketAddr,
    child: &mut Child,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the sidecar exited at start: {status}");
        }
        if let Ok(r) = http.get(format!("http://{admin}/readyz")).send().await {
            if r.status() == 200 {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the sidecar was not ready within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn grants(world: &World) -> u64 {
    world.with(|w| w.password_grants + w.refresh_grants)
}

/// Waits for the next token grant and returns when it was issued.
async fn next_grant(world: &World, deadline: Instant) -> Option<Instant> {
    let before = world.with(|w| w.last_issued_at);
    while Instant::now() < deadline {
        let now = world.with(|w| w.last_issued_at);
        if now != before {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

/// The first grant issued after `after`.
async fn wait_grant_after(world: &World, after: Instant, deadline: Instant) -> Option<Instant> {
    while Instant::now() < deadline {
        if let Some(t) = world.with(|w| w.last_issued_at).filter(|t| *t > after) {
            return Some(t);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

async fn sleep_until(t: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await;
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}

/// Peak resident memory (VmHWM) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")
}

fn signal_term(pid: u32) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        bail!("kill -TERM {pid} failed");
    }
    Ok(())
}

async fn wait_exit(child: &mut Child) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("the sidecar did not exit within 30 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Secrets found in the sidecar's log: credentials, every password the run
/// used, tokens (the fake's are recognisable by their prefix).
fn leaks(world: &World, log: &str, passwords: &[String]) -> Vec<String> {
    use base64::Engine;
    let (id, secret) = world.with(|w| (w.client_id.clone(), w.client_secret.clone()));
    let mut needles = vec![
        secret.clone(),
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}")),
        "fake-access-".into(),
        "fake-refresh-".into(),
    ];
    needles.extend(passwords.iter().cloned());
    needles.into_iter().filter(|n| log.contains(n)).collect()
}
