//! The token lifecycle on tokio's paused clock: the real refresh loop
//! (`refresher::spawn`) against an in-memory token endpoint that scripts its
//! answers and records every grant with its paused-clock time. Time is exact
//! here, so the tests assert exact instants, and a 30-day token costs nothing.
//!
//! Defaults come from the real config loader, so these tests follow them.

#[path = "support/logs.rs"]
mod logs;
mod support;

use std::collections::VecDeque;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use token_sidecar::config::RefreshConfig;
use token_sidecar::fake::World;
use token_sidecar::metrics::Metrics;
use token_sidecar::secret::{LiveSecret, SecretSource};
use token_sidecar::token::client::{Credentials, Grant, TokenEndpoint, TokenResponse};
use token_sidecar::token::refresher::{self, Settings};
use token_sidecar::token::{GrantKind, Outcome, TokenError, TokenHandle};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use logs::LogBuffer;

const S: fn(u64) -> Duration = Duration::from_secs;
const MS: fn(u64) -> Duration = Duration::from_millis;

/// One answer of the in-memory endpoint.
#[derive(Debug, Clone)]
enum Answer {
    /// A new access token (and a refresh token, per the server's settings).
    Issue,
    /// The access token issued last, with what it has left as `expires_in`
    /// (a Spring server keeping one token per client and user).
    Same,
    /// An HTTP status without an OAuth body.
    Status(u16),
    /// An OAuth error answer.
    Rejected(u16, &'static str),
    /// Never answers (the refresher's timeout must end the call).
    Hang,
    /// Panics in the refresh task (the test-only way to inject one).
    Panic,
    /// A new token, answered only after this long.
    Late(Duration),
}

/// One grant as the endpoint saw it.
#[derive(Debug, Clone)]
struct Call {
    /// Paused-clock time since the test started.
    at: Duration,
    grant: GrantKind,
    refresh_token: Option<String>,
    timeout: Duration,
    /// Whether a token (new or same) was answered.
    ok: bool,
}

struct ServerState {
    lifetime: Duration,
    issue_refresh: bool,
    /// A refresh answer carries a new refresh token.
    rotate: bool,
    /// The password grant answers with the live token while it lives.
    one_token: bool,
    /// Answers that replace the normal ones, first in first out.
    script: VecDeque<Answer>,
    /// While set, every call gets this (an outage).
    down: Option<Answer>,
    /// The password the server accepts, when it checks passwords.
    password: Option<&'static str>,
    issued: u64,
    /// The last access token issued, its expiry, its refresh token.
    last: Option<(String, Instant, Option<String>)>,
    calls: Vec<Call>,
}

/// The in-memory token endpoint; clones share one server.
#[derive(Clone)]
struct Endpoint {
    state: Arc<Mutex<ServerState>>,
    start: Instant,
}

impl Endpoint {
    fn new(lifetime: Duration) -> Self {
        Endpoint {
            state: Arc::new(Mutex::new(ServerState {
                lifetime,
                issue_refresh: true,
                rotate: true,
                one_token: false,
                script: VecDeque::new(),
                down: None,
                password: None,
                issued: 0,
                last: None,
                calls: Vec::new(),
            })),
            start: Instant::now(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut ServerState) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    fn calls(&self) -> Vec<Call> {
        self.with(|s| s.calls.clone())
    }

    fn since_start(&self) -> Duration {
        Instant::now() - self.start
    }

    /// Decides the answer now (recording the call); `None` hangs.
    fn answer(
        &self,
        grant: &Grant,
        credentials: &Credentials,
        timeout: Duration,
    ) -> Option<Result<TokenResponse, TokenError>> {
        let at = self.since_start();
        let now = Instant::now();
        let mut s = self.state.lock().unwrap();
        let mut answer = s
            .down
            .clone()
            .or_else(|| s.script.pop_front())
            .unwrap_or(Answer::Issue);
        if let (Grant::Password, Some(expected)) = (grant, s.password) {
            if credentials.password.expose_secret() != expected {
                answer = Answer::Rejected(400, "invalid_grant");
            }
        }
        let live = s.last.as_ref().is_some_and(|(_, exp, _)| *exp > now);
        if matches!(answer, Answer::Issue)
            && s.one_token
            && matches!(grant, Grant::Password)
            && live
        {
            answer = Answer::Same;
        }
        let result = match answer {
            Answer::Panic => {
                s.calls.push(call(at, grant, timeout, false));
                drop(s); // not poisoned: later calls still answer
                panic!("injected panic in the token task");
            }
            Answer::Hang => None,
            Answer::Late(_) => unreachable!("turned into Issue by request()"),
            Answer::Status(status) => Some(Err(TokenError::Status { status })),
            Answer::Rejected(status, code) => Some(Err(TokenError::Rejected {
                status,
                code: code.into(),
                description: None,
            })),
            Answer::Same => {
                let (access, exp, rt) = s.last.clone().expect("a token was issued before");
                Some(Ok(response(&access, rt, exp - now)))
            }
            Answer::Issue => {
                s.issued += 1;
                let n = s.issued;
                let access = format!("access-{n}-0123456789abcdefSECRET");
                let rt = match grant {
                    Grant::Password => s.issue_refresh,
                    Grant::RefreshToken(_) => s.rotate,
                }
                .then(|| format!("refresh-{n}"));
                s.last = Some((access.clone(), now + s.lifetime, rt.clone()));
                Some(Ok(response(&access, rt, s.lifetime)))
            }
        };
        let ok = matches!(result, Some(Ok(_)));
        s.calls.push(call(at, grant, timeout, ok));
        result
    }
}

fn call(at: Duration, grant: &Grant, timeout: Duration, ok: bool) -> Call {
    Call {
        at,
        grant: grant.kind(),
        refresh_token: match grant {
            Grant::RefreshToken(rt) => Some(rt.expose_secret().to_owned()),
            Grant::Password => None,
        },
        timeout,
        ok,
    }
}

fn response(access: &str, refresh: Option<String>, lifetime: Duration) -> TokenResponse {
    TokenResponse {
        access_token: SecretString::from(access.to_owned()),
        lifetime,
        refresh_token: refresh.map(SecretString::from),
        scope: None,
    }
}

impl TokenEndpoint for Endpoint {
    fn request(
        &self,
        grant: &Grant,
        credentials: &Credentials,
        timeout: Duration,
    ) -> impl Future<Output = Result<TokenResponse, TokenError>> + Send {
        let late = self.with(|s| match s.script.front() {
            Some(Answer::Late(d)) => Some(*d),
            _ => None,
        });
        if late.is_some() {
            self.with(|s| s.script[0] = Answer::Issue);
        }
        let answer = self.answer(grant, credentials, timeout);
        async move {
            if let Some(d) = late {
                tokio::time::sleep(d).await;
            }
            match answer {
                Some(result) => result,
                None => std::future::pending().await,
            }
        }
    }
}

/// The `[refresh]` defaults, as the config loader produces them.
fn defaults() -> RefreshConfig {
    let world = World::new(1.0);
    support::config_for(&world, "http://127.0.0.1:9/t", "http://127.0.0.1:9/", "").refresh
}

fn inline(value: &str) -> SecretSource {
    SecretSource::Inline(SecretString::from(value.to_owned()))
}

fn settings() -> Settings {
    Settings {
        refresh: defaults(),
        oauth_timeout: S(10),
        client_secret: LiveSecret::new("oauth.client_secret", inline("client-secret")),
        password: LiveSecret::new("oauth.password", inline("password")),
    }
}

struct Sidecar {
    token: Arc<TokenHandle>,
    task: JoinHandle<()>,
    metrics: Arc<Metrics>,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        assert!(
            std::thread::panicking() || !self.task.is_finished() || !self.token.refresher_running(),
            "the refresh loop must never exit without saying so"
        );
        self.task.abort();
    }
}

fn start(endpoint: &Endpoint, settings: Settings, jitter: fn() -> f64) -> Sidecar {
    let metrics = Arc::new(Metrics::new());
    let (token, task) = refresher::spawn(endpoint.clone(), settings, metrics.clone(), jitter);
    Sidecar {
        token,
        task,
        metrics,
    }
}

fn half() -> f64 {
    0.5
}

/// Sleeps until `t` after the endpoint's start.
async fn at(endpoint: &Endpoint, t: Duration) {
    tokio::time::sleep_until(endpoint.start + t).await;
}

/// Waits (on the paused clock) for generation `gen` or newer.
async fn generation(sidecar: &Sidecar, gen: u64, within: Duration) {
    sidecar
        .token
        .wait_usable(gen - 1, within)
        .await
        .unwrap_or_else(|_| panic!("generation {gen} within {within:?}"));
}

fn assert_paced(calls: &[Call], min_interval: Duration) {
    for w in calls.windows(2) {
        assert!(
            w[1].at - w[0].at >= min_interval,
            "two token calls closer than min_interval: {w:?}"
        );
    }
}

// ---------------------------------------------------------------- schedule

#[tokio::test(start_paused = true)]
async fn schedule_refreshes_inside_the_band_and_before_the_token_runs_out() {
    let cfg = defaults();
    let lifetimes = [2, 3, 10, 60, 120, 150, 3600, 86399, 30 * 86400].map(S);
    let jitters: [fn() -> f64; 3] = [|| 0.0, half, || 0.999];
    for lifetime in lifetimes {
        let mut planned = Vec::new();
        for jitter in jitters {
            let endpoint = Endpoint::new(lifetime);
            let sidecar = start(&endpoint, settings(), jitter);
            generation(&sidecar, 1, S(1)).await;
            let first = endpoint.calls()[0].at;
            assert_eq!(first, Duration::ZERO, "the first grant is made at once");
            // Watch the token all along its first lifetime.
            let margin = token_sidecar::token::schedule::expiry_margin(lifetime, &cfg);
            let step = lifetime / 64;
            let mut t = step;
            while sidecar.token.status().generation < 2 {
                at(&endpoint, t).await;
                assert!(
                    sidecar.token.usable().is_some(),
                    "{lifetime:?}: no usable token at {t:?}"
                );
                t += step;
                assert!(t < lifetime, "{lifetime:?}: no refresh within the lifetime");
            }
            let calls = endpoint.calls();
            let refresh = calls[1].at - first;
            assert_eq!(calls[1].grant, GrantKind::RefreshToken);
            // The bounds of issue 3 point 1, independently of schedule.rs:
            assert!(refresh >= cfg.min_interval, "{lifetime:?}: {refresh:?}");
            assert!(
                refresh <= lifetime.mul_f64(0.80),
                "{lifetime:?}: {refresh:?}"
            );
            let min_remaining = cfg.min_remaining.min(lifetime / 2);
            assert!(
                refresh <= lifetime - min_remaining,
                "{lifetime:?}: {refresh:?}"
            );
            if lifetime >= S(150) {
                assert!(
                    refresh >= lifetime.mul_f64(0.75),
                    "{lifetime:?}: {refresh:?}"
                );
            }
            assert!(
                refresh < lifetime - margin,
                "{lifetime:?}: refresh after the token's usable time"
            );
            planned.push(refresh);
        }
        if lifetime >= S(3) {
            assert!(
                planned[0] < planned[1] && planned[1] < planned[2],
                "{lifetime:?}: the refresh instant is jittered: {planned:?}"
            );
        }
    }
    // The documented example: 86399 s -> between 18.0 h and 19.2 h.
    let l = S(86399);
    let at = |j| token_sidecar::token::schedule::refresh_after(l, j, &cfg).as_secs_f64() / 3600.0;
    assert!((at(0.0) - 18.0).abs() < 0.01 && (at(1.0) - 19.2).abs() < 0.01);
}

#[tokio::test(start_paused = true)]
async fn refreshes_ahead_of_expiry_with_no_gap_over_twenty_lifetimes() {
    let endpoint = Endpoint::new(S(3));
    let sidecar = start(&endpoint, settings(), half);
    let mut t = Duration::ZERO;
    generation(&sidecar, 1, S(1)).await;
    while t < S(60) {
        at(&endpoint, t).await;
        let (g, _) = sidecar
            .token
            .usable()
            .unwrap_or_else(|| panic!("no usable token at {t:?}"));
        assert!(g >= 1);
        t += MS(50);
    }
    let calls = endpoint.calls();
    assert_eq!(calls[0].grant, GrantKind::Password);
    // 3 s tokens with jitter 0.5: every 1.425 s (the 1.35-1.5 s band).
    for w in calls.windows(2) {
        assert_eq!(w[1].grant, GrantKind::RefreshToken);
        assert_eq!(w[1].at - w[0].at, MS(1425));
    }
    assert_eq!(calls.len(), 1 + (60_000 / 1425) as usize);
}

// ---------------------------------------------------------------- the ladder

#[tokio::test(start_paused = true)]
async fn rotated_refresh_token_is_used_for_the_next_refresh() {
    let endpoint = Endpoint::new(S(100));
    let sidecar = start(&endpoint, settings(), half);
    generation(&sidecar, 4, S(400)).await;
    let rts: Vec<_> = endpoint
        .calls()
        .iter()
        .map(|c| c.refresh_token.clone())
        .collect();
    assert_eq!(
        rts[..4],
        [
            None,
            Some("refresh-1".into()),
            Some("refresh-2".into()),
            Some("refresh-3".into())
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn refresh_token_is_kept_when_the_server_does_not_rotate_it() {
    let endpoint = Endpoint::new(S(100));
    endpoint.with(|s| s.rotate = false);
    let sidecar = start(&endpoint, settings(), half);
    generation(&sidecar, 4, S(400)).await;
    let calls = endpoint.calls();
    assert_eq!(calls[0].grant, GrantKind::Password);
    for c in &calls[1..4] {
        assert_eq!(c.refresh_token.as_deref(), Some("refresh-1"));
    }
}

#[tokio::test(start_paused = true)]
async fn refused_refresh_token_falls_back_to_the_password_grant_at_once() {
    // RFC 6749's invalid_grant, and Spring's 401 invalid_token for an
    // expired refresh token.
    for (status, code) in [(400, "invalid_grant"), (401, "invalid_token")] {
        let endpoint = Endpoint::new(S(100));
        endpoint.with(|s| s.script = [Answer::Issue, Answer::Rejected(status, code)].into());
        let sidecar = start(&endpoint, settings(), half);
        generation(&sidecar, 2, S(100)).await;
        let calls = endpoint.calls();
        assert_eq!(calls[1].grant, GrantKind::RefreshToken, "{code}");
        assert!(!calls[1].ok);
        assert_eq!(calls[2].grant, GrantKind::Password, "{code}");
        assert_eq!(
            calls[2].at, calls[1].at,
            "{code}: the password grant follows at once"
        );
        // The refused refresh token is gone: the next refresh uses the new one.
        generation(&sidecar, 3, S(100)).await;
        let calls = endpoint.calls();
        assert_eq!(
            calls[3].refresh_token.as_deref(),
            Some("refresh-2"),
            "{code}"
        );
        // The refused call counts as rejected; the token never lapsed.
        let m = sidecar.metrics.render(true);
        assert!(
            m.contains("token_sidecar_token_requests_total{grant=\"refresh_token\",outcome=\"rejected\"} 1"),
            "{m}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn same_token_answer_keeps_generation_and_expiry_then_uses_the_refresh_token() {
    let endpoint = Endpoint::new(S(100));
    endpoint.with(|s| s.one_token = true);
    let sidecar = start(&endpoint, settings(), half);
    generation(&sidecar, 1, S(1)).await;
    let before = sidecar.token.status();

    // The upstream rejects generation 1 at t = 10 s: password grant first,
    // which answers with the very same token and 90 s left.
    at(&endpoint, S(10)).await;
    sidecar.token.invalidate(1);
    tokio::time::sleep(MS(1)).await;
    let calls = endpoint.calls();
    assert_eq!(
        (calls[1].at, calls[1].grant, calls[1].ok),
        (S(10), GrantKind::Password, true)
    );
    let after = sidecar.token.status();
    assert_eq!(after.generation, 1, "same token, same generation");
    assert_eq!(
        after.expires_at, before.expires_at,
        "the original expiry is kept"
    );
    assert_eq!(after.obtained_at, before.obtained_at);
    assert_eq!(sidecar.token.usable().map(|(g, _)| g), Some(1));

    // Next: the refresh_token grant, no sooner than min_interval.
    generation(&sidecar, 2, S(10)).await;
    let calls = endpoint.calls();
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[2].grant, GrantKind::RefreshToken);
    assert_eq!(calls[2].refresh_token.as_deref(), Some("refresh-1"));
    assert_eq!(calls[2].at, S(11));
    // And the new token is scheduled from its own full lifetime (100 s
    // tokens: 65-70 s, 67.5 s with jitter 0.5).
    generation(&sidecar, 3, S(100)).await;
    assert_eq!(endpoint.calls()[3].at, S(11) + MS(67_500));
}

#[tokio::test(start_paused = true)]
async fn same_token_answers_without_refresh_token_end_at_the_true_expiry() {
    // One token per user and no refresh tokens: the server answers the
    // password grant with the live token until it expires. 20 s tokens:
    // refresh planned at 9.5 s, usable until 18 s, expiry at 20 s.
    let endpoint = Endpoint::new(S(20));
    endpoint.with(|s| {
        s.one_token = true;
        s.issue_refresh = false;
    });
    let sidecar = start(&endpoint, settings(), half);
    generation(&sidecar, 1, S(1)).await;
    let expires_at = sidecar.token.status().expires_at;
    at(&endpoint, MS(17_999)).await;
    assert_eq!(sidecar.token.usable().map(|(g, _)| g), Some(1));
    assert_eq!(sidecar.token.status().expires_at, expires_at);
    generation(&sidecar, 2, S(30)).await;
    let calls = endpoint.calls();
    assert_paced(&calls, defaults().min_interval);
    assert!(calls.iter().all(|c| c.grant == GrantKind::Password && c.ok));
    assert_eq!(calls[1].at, MS(9500));
    // The new token comes at the old one's true expiry, not after a backoff
    // that grew while the server kept answering with the same token.
    assert_eq!(calls.last().unwrap().at, S(20));
    assert!(calls.len() <= 10, "same-token retries back off: {calls:?}");
}

#[tokio::test(start_paused = true)]
async fn after_a_401_the_next_refresh_is_planned_at_the_top_of_the_band() {
    let endpoint = Endpoint::new(S(100));
    let sidecar = start(&endpoint, settings(), half);
    generation(&sidecar, 1, S(1)).await;
    at(&endpoint, S(10)).await;
    sidecar.token.invalidate(1);
    generation(&sidecar, 4, S(300)).await;
    let calls: Vec<_> = endpoint.calls().iter().map(|c| (c.at, c.grant)).collect();
    use GrantKind::*;
    assert_eq!(
        calls[..4],
        [
            (S(0), Password),
            // The 401: password grant first.
            (S(10), Password),
            // Following: the top of the band (100 s tokens: 65-70 s), so
            // after the fleet's pod that refreshed; the refresh_token grant.
            (S(80), RefreshToken),
            // Back to the jittered band (67.5 s with jitter 0.5).
            (S(80) + MS(67_500), RefreshToken),
        ]
    );
    assert_eq!(
        endpoint.calls()[2].refresh_token.as_deref(),
        Some("refresh-2")
    );
}

// ---------------------------------------------------------------- outages

#[tokio::test(start_paused = true)]
async fn outage_shorter_than_the_token_is_invisible() {
    // 200 s tokens: refresh planned at 155 s, usable until 195 s. The token
    // endpoint answers 503 from 150 s to 190 s.
    let endpoint = Endpoint::new(S(200));
    let sidecar = start(&endpoint, settings(), half);
    let outage = {
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            at(&endpoint, S(150)).await;
            endpoint.with(|s| s.down = Some(Answer::Status(503)));
            at(&endpoint, S(190)).await;
            endpoint.with(|s| s.down = None);
        })
    };
    generation(&sidecar, 1, S(1)).await;
    let mut t = Duration::ZERO;
    while t <= S(400) {
        at(&endpoint, t).await;
        assert!(sidecar.token.usable().is_some(), "a gap at {t:?}");
        t += MS(100);
    }
    outage.await.unwrap();
    let calls = endpoint.calls();
    assert_paced(&calls, defaults().min_interval);
    let failed: Vec<_> = calls.iter().filter(|c| !c.ok).collect();
    assert!(failed.len() >= 5, "{calls:?}");
    // Backoff doubles, but is cut to half the usable time left each time:
    // the retry at 192 s still finds the token usable.
    let recovered = calls.iter().find(|c| c.ok && c.at >= S(190)).unwrap();
    assert!(
        recovered.at < S(195),
        "retried before the token ran out: {calls:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn outage_longer_than_the_token_stops_injecting_and_recovers() {
    // 10 s tokens: refresh planned at 4.75 s, usable until 9 s (margin 1 s).
    // The token endpoint answers 503 from 4 s to 40 s.
    let endpoint = Endpoint::new(S(10));
    let sidecar = start(&endpoint, settings(), half);
    generation(&sidecar, 1, S(1)).await;
    at(&endpoint, S(4)).await;
    endpoint.with(|s| s.down = Some(Answer::Status(503)));
    at(&endpoint, MS(8999)).await;
    assert!(sidecar.token.usable().is_some());
    at(&endpoint, S(9)).await;
    assert!(
        sidecar.token.usable().is_none(),
        "not injected past expiry less the margin"
    );
    assert!(sidecar.token.ever_had_token());

    let err = sidecar.token.wait_usable(1, S(2)).await.unwrap_err();
    assert!(err.retry_after >= 1);
    let status = sidecar.token.status();
    assert_eq!(status.last_outcome, Some(Outcome::Error));
    assert_eq!(status.last_error.as_deref(), Some("http_status"));
    assert!(status.consecutive_failures >= 1);

    let mut t = S(11);
    while t < S(40) {
        at(&endpoint, t).await;
        assert!(
            sidecar.token.usable().is_none(),
            "an expired token at {t:?}"
        );
        t += MS(250);
    }
    endpoint.with(|s| s.down = None);
    // Recovery without a restart, within one maximal backoff.
    generation(&sidecar, 2, defaults().backoff_max + S(1)).await;
    let calls = endpoint.calls();
    assert_paced(&calls, defaults().min_interval);
    assert!(calls.last().unwrap().ok);
    assert_eq!(sidecar.token.status().consecutive_failures, 0);
    assert!(sidecar.token.usable().is_some());
}

#[tokio::test(start_paused = true)]
async fn hung_call_ends_when_the_token_expires_and_the_next_gets_the_full_timeout() {
    // 8 s tokens: refresh planned at 3.8 s; that call hangs.
    let endpoint = Endpoint::new(S(8));
    endpoint.with(|s| s.script = [Answer::Issue, Answer::Hang].into());
    let sidecar = start(&endpoint, settings(), half);
    generation(&sidecar, 2, S(20)).await;
    let calls = endpoint.calls();
    assert_eq!(calls[1].at, MS(3800));
    // Its timeout is what the token had left (4.2 s < oauth.timeout 10 s)...
    assert_eq!(calls[1].timeout, MS(4200));
    // ...so it ended at the token's expiry, and the retry (1 s later) got
    // the whole oauth.timeout, the token being past its usable time.
    assert_eq!(calls[2].at, S(9));
    assert_eq!(calls[2].timeout, S(10));
    assert!(calls[2].ok);
    assert_eq!(sidecar.token.status().last_outcome, Some(Outcome::Success));
}

// ---------------------------------------------------------------- refused logins

/// A Kubernetes-style secret volume: `password -> ..data/password`,
/// `..data -> ..v1`; [`swap`] points `..data` at a new directory atomically.
fn secret_volume(dir: &Path, password: &str) -> SecretSource {
    let v1 = dir.join("..v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("password"), format!("{password}\n")).unwrap();
    std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/password", dir.join("password")).unwrap();
    SecretSource::File(dir.join("password"))
}

fn swap(dir: &Path, version: &str, password: &str) {
    let new = dir.join(version);
    std::fs::create_dir(&new).unwrap();
    std::fs::write(new.join("password"), format!("{password}\n")).unwrap();
    std::os::unix::fs::symlink(version, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
}

#[tokio::test(start_paused = true)]
async fn refused_login_retries_slowly_and_at_once_when_the_secret_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let source = secret_volume(dir.path(), "old-password");
    let endpoint = Endpoint::new(S(3600));
    endpoint.with(|s| s.password = Some("new-password"));
    let mut settings = settings();
    settings.password = LiveSecret::new("oauth.password_file", source);
    let sidecar = start(&endpoint, settings, half);

    // Refused at once; no token, and clients are told to come back much later.
    let err = sidecar.token.wait_usable(0, S(1)).await.unwrap_err();
    assert!(err.retry_after >= 59, "retry_after {}", err.retry_after);
    assert!(sidecar.token.usable().is_none());
    let status = sidecar.token.status();
    assert_eq!(status.last_outcome, Some(Outcome::Rejected));
    assert_eq!(status.last_error.as_deref(), Some("invalid_grant"));

    // Slow retries (1-2 min, then 2-4 min): 90 s and 270 s with jitter 0.5.
    // An upstream 401 would not hurry them (no token is held anyway).
    at(&endpoint, S(300)).await;
    let times: Vec<_> = endpoint.calls().iter().map(|c| c.at).collect();
    assert_eq!(times, [S(0), S(90), S(270)]);
    assert!(endpoint.calls().iter().all(|c| !c.ok));

    // The Secret is updated the way kubelet does it: a new directory and an
    // atomic swap of the ..data symlink. The login is retried at once (within
    // the 2 s poll), not after the 4-8 min backoff.
    swap(dir.path(), "..v2", "new-password");
    generation(&sidecar, 1, S(3)).await;
    let last = endpoint.calls().last().unwrap().clone();
    assert!(last.ok && last.at <= S(302), "{last:?}");
    assert_eq!(
        sidecar.token.status().reason,
        Some(token_sidecar::token::Reason::SecretChanged)
    );
    let m = sidecar.metrics.render(true);
    assert!(
        m.contains("token_sidecar_token_requests_total{grant=\"password\",outcome=\"rejected\"} 3"),
        "{m}"
    );
}

// ---------------------------------------------------------------- single flight

#[tokio::test(start_paused = true)]
async fn thousand_waiters_at_start_cause_one_grant() {
    // The first call fails, so the waiters really wait (1 s) for the retry.
    let endpoint = Endpoint::new(S(3600));
    endpoint.with(|s| s.script = [Answer::Status(503)].into());
    let sidecar = start(&endpoint, settings(), half);
    let mut waiters = JoinSet::new();
    for _ in 0..1000 {
        let token = sidecar.token.clone();
        waiters.spawn(async move { token.wait_usable(0, S(10)).await.map(|(g, _)| g) });
    }
    while let Some(r) = waiters.join_next().await {
        assert_eq!(r.unwrap().ok(), Some(1));
    }
    let calls = endpoint.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls.iter().filter(|c| c.ok).count(), 1);
}

#[tokio::test(start_paused = true)]
async fn hundred_concurrent_invalidations_cause_one_grant_no_sooner_than_min_interval() {
    let endpoint = Endpoint::new(S(3600));
    let sidecar = start(&endpoint, settings(), half);
    generation(&sidecar, 1, S(1)).await;
    // 200 ms after the first grant, 100 requests meet a 401 with generation 1.
    at(&endpoint, MS(200)).await;
    let mut requests = JoinSet::new();
    for _ in 0..100 {
        let token = sidecar.token.clone();
        requests.spawn(async move {
            token.invalidate(1);
            token.wait_usable(1, S(10)).await.map(|(g, _)| g)
        });
    }
    while let Some(r) = requests.join_next().await {
        assert_eq!(r.unwrap().ok(), Some(2), "every request gets the new token");
    }
    let calls = endpoint.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    // Password grant first (the fleet rule), at min_interval after the last call.
    assert_eq!((calls[1].grant, calls[1].at), (GrantKind::Password, S(1)));
    // A late 401 for generation 1 changes nothing.
    sidecar.token.invalidate(1);
    at(&endpoint, S(5)).await;
    assert_eq!(endpoint.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn forced_grants_are_limited_to_one_per_min_interval_when_every_token_is_rejected() {
    let endpoint = Endpoint::new(S(3600));
    let sidecar = start(&endpoint, settings(), half);
    generation(&sidecar, 1, S(1)).await;
    // 20 clients for 10 s against an upstream that rejects every token.
    let mut clients = JoinSet::new();
    for _ in 0..20 {
        let token = sidecar.token.clone();
        let start = endpoint.start;
        clients.spawn(async move {
            while Instant::now() < start + S(10) {
                let Some((g, _)) = token.usable() else {
                    panic!("the token stays usable")
                };
                tokio::time::sleep(MS(10)).await; // the upstream answers 401
                token.invalidate(g);
                let _ = token.wait_usable(g, S(2)).await;
            }
        });
    }
    while let Some(r) = clients.join_next().await {
        r.unwrap();
    }
    let calls = endpoint.calls();
    assert_paced(&calls, defaults().min_interval);
    assert!(
        calls.len() <= 11,
        "at most one per second over 10 s: {}",
        calls.len()
    );
    assert!(
        calls.len() >= 9,
        "each rejection still gets a new token: {}",
        calls.len()
    );
}

// ---------------------------------------------------------------- admin, status, resilience

#[tokio::test(start_paused = true)]
async fn admin_refresh_reports_the_outcome_and_respects_min_interval() {
    let endpoint = Endpoint::new(S(100));
    let sidecar = start(&endpoint, settings(), half);
    generation(&sidecar, 1, S(1)).await;
    at(&endpoint, MS(200)).await;
    let report = sidecar.token.refresh_now().await.unwrap();
    assert_eq!(endpoint.calls()[1].at, S(1), "waited for min_interval");
    assert_eq!(
        (
            report.grant,
            report.outcome,
            report.generation,
            report.expires_in_secs
        ),
        (GrantKind::RefreshToken, Outcome::Success, 2, Some(100))
    );
    assert!(report.error.is_none());

    endpoint.with(|s| s.down = Some(Answer::Status(503)));
    let report = sidecar.token.refresh_now().await.unwrap();
    assert_eq!(endpoint.calls()[2].at, S(2));
    assert_eq!((report.outcome, report.generation), (Outcome::Error, 2));
    assert_eq!(report.error.as_deref(), Some("http_status"));

    endpoint.with(|s| s.down = Some(Answer::Rejected(401, "invalid_client")));
    let report = sidecar.token.refresh_now().await.unwrap();
    assert_eq!(report.outcome, Outcome::Rejected);
    assert_eq!(report.error.as_deref(), Some("invalid_client"));
    // The token itself is still the one obtained at 1 s, and still usable.
    assert_eq!(sidecar.token.usable().map(|(g, _)| g), Some(2));
}

#[tokio::test(start_paused = true)]
async fn status_shows_token_metadata_and_never_the_token() {
    let endpoint = Endpoint::new(S(100));
    let sidecar = start(&endpoint, settings(), half);
    generation(&sidecar, 1, S(1)).await;
    let s = sidecar.token.status();
    assert_eq!(s.generation, 1);
    assert_eq!(s.grant, Some(GrantKind::Password));
    assert_eq!(s.last_grant, Some(GrantKind::Password));
    assert_eq!(s.last_outcome, Some(Outcome::Success));
    assert_eq!(s.last_error, None);
    let (obtained, expires) = (s.obtained_at.unwrap(), s.expires_at.unwrap());
    assert_eq!(expires.duration_since(obtained).unwrap(), S(100));
    assert_eq!(s.next_attempt - endpoint.start, MS(67_500));
    let report = sidecar.token.refresh_now().await.unwrap();
    for text in [
        format!("{s:?}"),
        format!("{:?}", sidecar.token.status()),
        format!("{:?}", sidecar.token.usable()),
        serde_json::to_string(&report).unwrap(),
        sidecar.metrics.render(true),
    ] {
        assert!(!text.contains("SECRET"), "a token leaked: {text}");
        assert!(
            !text.contains("refresh-1"),
            "a refresh token leaked: {text}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_loop_survives_every_kind_of_failure() {
    let endpoint = Endpoint::new(S(100));
    endpoint.with(|s| {
        s.script = [
            Answer::Status(500),
            Answer::Status(429),
            Answer::Hang,
            Answer::Rejected(503, "temporarily_unavailable"),
            Answer::Status(404),
            Answer::Rejected(401, "invalid_client"),
            Answer::Rejected(400, "invalid_scope"),
        ]
        .into()
    });
    let sidecar = start(&endpoint, settings(), half);
    generation(&sidecar, 1, S(3 * 3600)).await;
    let calls = endpoint.calls();
    assert_eq!(calls.len(), 8);
    assert_paced(&calls, defaults().min_interval);
    // Permanent errors (404, invalid_client, invalid_scope) are retried no
    // sooner than rejected_backoff_min.
    for i in [5, 6, 7] {
        assert!(calls[i].at - calls[i - 1].at >= defaults().rejected_backoff_min);
    }
    // Sidecar's Drop asserts the task is still running.
}

// ---------------------------------------------------------------- no token: retry sooner

fn almost_one() -> f64 {
    0.999
}

#[tokio::test(start_paused = true)]
async fn without_a_token_retries_come_at_most_backoff_max_without_token_apart() {
    let logs = LogBuffer::capture();
    let cfg = defaults();
    assert_eq!(
        cfg.backoff_max_without_token,
        S(5),
        "the documented default"
    );
    // 10 s tokens: refresh planned near 5 s, usable until 9 s. The endpoint
    // answers 503 from 4 s to 60 s; jitter near 1 is the slowest schedule.
    let endpoint = Endpoint::new(S(10));
    let sidecar = start(&endpoint, settings(), almost_one);
    generation(&sidecar, 1, S(1)).await;
    at(&endpoint, S(4)).await;
    endpoint.with(|s| s.down = Some(Answer::Status(503)));
    at(&endpoint, S(60)).await;
    endpoint.with(|s| s.down = None);
    generation(&sidecar, 2, S(10)).await;

    let calls = endpoint.calls();
    assert_paced(&calls, cfg.min_interval);
    let recovered = calls.iter().find(|c| c.ok && c.at > S(4)).unwrap().at;
    // Once the token is unusable (9 s), no two attempts are further apart
    // than backoff_max_without_token: with backoff_max (60 s) the 7th
    // failure in a row would wait 59.9 s.
    let failed_after: Vec<Duration> = calls
        .iter()
        .filter(|c| c.at >= S(9))
        .map(|c| c.at)
        .collect();
    assert!(failed_after.len() >= 10, "{calls:?}");
    for w in failed_after.windows(2) {
        assert!(w[1] - w[0] <= S(5), "{w:?} in {calls:?}");
    }
    // So traffic resumes at most 5 s after the endpoint is back.
    assert!(recovered >= S(60) && recovered <= S(65), "{recovered:?}");

    // One line marks the moment the token became unusable, with the last
    // failure; one the moment a token is usable again, with the outage.
    let lines = logs.lines();
    let unusable: Vec<_> = lines
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("token unusable"))
        })
        .collect();
    assert_eq!(unusable.len(), 1, "{lines:?}");
    let u = unusable[0];
    assert_eq!(u["level"], "WARN");
    assert_eq!(u["error"], "http_status");
    assert_eq!(u["cause"], "server_trouble");
    assert_eq!(u["generation"], 1);
    let failed_at = u["last_failure_at"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(failed_at).is_ok(), "{failed_at}");
    let again: Vec<_> = lines
        .iter()
        .filter(|l| l["message"] == "token usable again")
        .collect();
    assert_eq!(again.len(), 1, "{lines:?}");
    assert_eq!(again[0]["level"], "INFO");
    assert_eq!(
        again[0]["outage_ms"].as_u64(),
        Some((recovered - S(9)).as_millis() as u64)
    );
}

#[tokio::test(start_paused = true)]
async fn without_a_token_a_refused_login_keeps_its_slow_backoff() {
    // 10 s tokens, refresh at 4.75 s; from 4 s every grant is refused.
    let endpoint = Endpoint::new(S(10));
    let sidecar = start(&endpoint, settings(), half);
    generation(&sidecar, 1, S(1)).await;
    at(&endpoint, S(4)).await;
    endpoint.with(|s| s.down = Some(Answer::Rejected(400, "invalid_grant")));
    at(&endpoint, S(200)).await;
    let calls = endpoint.calls();
    let times: Vec<_> = calls.iter().map(|c| (c.at, c.grant)).collect();
    // The refused refresh token, the password grant at once, then 90 s
    // later (1-2 min with jitter 0.5), not backoff_max_without_token.
    assert_eq!(
        times,
        [
            (S(0), GrantKind::Password),
            (MS(4750), GrantKind::RefreshToken),
            (MS(4750), GrantKind::Password),
            (MS(94_750), GrantKind::Password),
        ]
    );
    assert!(sidecar.token.usable().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_registered_transient_code_is_retried_soon_even_with_a_400() {
    // RFC 6749's temporarily_unavailable in a 400 on the password grant.
    let endpoint = Endpoint::new(S(100));
    endpoint.with(|s| s.script = [Answer::Rejected(400, "temporarily_unavailable")].into());
    let sidecar = start(&endpoint, settings(), half);
    generation(&sidecar, 1, S(5)).await;
    let calls = endpoint.calls();
    assert_eq!(calls[1].at, S(1), "min_interval, not rejected_backoff_min");
}

// ---------------------------------------------------------------- why a grant

#[tokio::test(start_paused = true)]
async fn every_grant_says_why_it_was_made() {
    use token_sidecar::token::Reason;
    let logs = LogBuffer::capture();
    let endpoint = Endpoint::new(S(100));
    let sidecar = start(&endpoint, settings(), half);
    let reason = |sidecar: &Sidecar| {
        let s = sidecar.token.status();
        (s.generation, s.reason, s.last_reason)
    };
    generation(&sidecar, 1, S(1)).await;
    assert_eq!(
        reason(&sidecar),
        (1, Some(Reason::Startup), Some(Reason::Startup))
    );
    generation(&sidecar, 2, S(100)).await; // 67.5 s
    assert_eq!(reason(&sidecar).1, Some(Reason::Scheduled));

    at(&endpoint, S(70)).await;
    sidecar.token.invalidate(2);
    generation(&sidecar, 3, S(2)).await;
    assert_eq!(reason(&sidecar).1, Some(Reason::Upstream401));

    at(&endpoint, S(80)).await;
    sidecar.token.refresh_now().await.unwrap();
    assert_eq!(
        reason(&sidecar),
        (4, Some(Reason::Admin), Some(Reason::Admin))
    );

    // The scheduled refresh (147.5 s) fails; the retry 1 s later works.
    endpoint.with(|s| s.script = [Answer::Status(503)].into());
    at(&endpoint, MS(148_000)).await;
    assert_eq!(
        reason(&sidecar),
        (4, Some(Reason::Admin), Some(Reason::Scheduled))
    );
    generation(&sidecar, 5, S(2)).await;
    assert_eq!(
        reason(&sidecar),
        (5, Some(Reason::Retry), Some(Reason::Retry))
    );

    // The next refresh (216 s) is refused: the password grant follows.
    endpoint.with(|s| s.script = [Answer::Rejected(400, "invalid_grant")].into());
    generation(&sidecar, 6, S(100)).await;
    assert_eq!(reason(&sidecar).1, Some(Reason::RefreshRefused));

    let lines = logs.lines();
    let reasons: Vec<&str> = lines
        .iter()
        .filter(|l| l["message"] == "token obtained" || l["message"] == "token refreshed")
        .map(|l| l["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "startup",
            "scheduled",
            "upstream_401",
            "admin",
            "retry",
            "refresh_refused"
        ]
    );
}

// ---------------------------------------------------------------- secret files at run time

#[tokio::test(start_paused = true)]
async fn a_secret_file_found_empty_keeps_its_last_good_value_and_is_counted() {
    let logs = LogBuffer::capture();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("password");
    std::fs::write(&path, "pw-1\n").unwrap();
    let endpoint = Endpoint::new(S(100));
    endpoint.with(|s| s.password = Some("pw-1"));
    let mut settings = settings();
    settings.password = LiveSecret::new("oauth.password_file", SecretSource::File(path.clone()));
    let sidecar = start(&endpoint, settings, half);
    generation(&sidecar, 1, S(1)).await;
    let series = "token_sidecar_secret_file_errors_total{key=\"oauth.password_file\"}";
    assert_eq!(
        support::metric(&sidecar.metrics.render(true), series),
        Some(0.0)
    );

    // Emptied (a half-written update): the next two logins still send pw-1.
    std::fs::write(&path, "").unwrap();
    for (t, g) in [(10, 2), (20, 3)] {
        at(&endpoint, S(t)).await;
        sidecar.token.invalidate(g - 1);
        generation(&sidecar, g, S(2)).await;
        assert_eq!(endpoint.calls().last().unwrap().grant, GrantKind::Password);
    }
    assert_eq!(
        support::metric(&sidecar.metrics.render(true), series),
        Some(2.0)
    );
    std::fs::write(&path, "pw-1\n").unwrap();
    at(&endpoint, S(30)).await;
    sidecar.token.invalidate(3);
    generation(&sidecar, 4, S(2)).await;
    assert_eq!(
        support::metric(&sidecar.metrics.render(true), series),
        Some(2.0)
    );

    let lines = logs.lines();
    let errors: Vec<_> = lines
        .iter()
        .filter(|l| {
            l["message"] == "secret file cannot be used; the last good value is sent instead"
        })
        .collect();
    assert_eq!(errors.len(), 1, "logged once, counted each time: {lines:?}");
    assert_eq!(errors[0]["level"], "ERROR");
    assert_eq!(errors[0]["key"], "oauth.password_file");
    assert_eq!(
        errors[0]["problem"],
        format!("secret file {} is empty", path.display())
    );
    assert!(lines
        .iter()
        .any(|l| l["message"] == "secret file usable again"));
    assert!(!logs.text().contains("pw-1"));
}

// ---------------------------------------------------------------- supervision

fn restarts(sidecar: &Sidecar) -> Option<f64> {
    support::metric(
        &sidecar.metrics.render(true),
        "token_sidecar_refresher_restarts_total",
    )
}

#[tokio::test(start_paused = true)]
async fn a_panicking_token_task_is_restarted_with_backoff_and_counted() {
    let logs = LogBuffer::capture();
    let endpoint = Endpoint::new(S(100));
    endpoint.with(|s| s.script = [Answer::Panic].into());
    let sidecar = start(&endpoint, settings(), half);
    generation(&sidecar, 1, S(5)).await;
    let calls = endpoint.calls();
    assert_eq!((calls[0].at, calls[0].ok), (S(0), false));
    // Restarted min_interval later (the backoff's floor), and logged in.
    assert_eq!((calls[1].at, calls[1].ok), (S(1), true));
    assert_eq!(restarts(&sidecar), Some(1.0));
    assert!(sidecar.token.refresher_running());
    let lines = logs.lines();
    let line = lines
        .iter()
        .find(|l| l["message"] == "the token refresh task panicked; restarting it")
        .expect("an error line for the panic");
    assert_eq!(line["level"], "ERROR");
    assert_eq!(line["panic"], "injected panic in the token task");
    assert_eq!(line["restarts_in_a_row"], 1);
    assert_eq!(line["restart_in_ms"], 1000);

    // A panic during a refresh: the held token stays in use, the restarted
    // task logs in again and the generation count goes on.
    endpoint.with(|s| s.script = [Answer::Panic].into());
    at(&endpoint, MS(68_499)).await; // refresh at 68.5 s (1 s + 67.5 s)
    assert_eq!(sidecar.token.usable().map(|(g, _)| g), Some(1));
    generation(&sidecar, 2, S(5)).await;
    let calls = endpoint.calls();
    assert_eq!(calls[2].at, MS(68_500));
    assert_eq!(
        (calls[3].at, calls[3].grant),
        (MS(69_500), GrantKind::Password)
    );
    assert_eq!(restarts(&sidecar), Some(2.0));
    // The admin door works with the restarted task too.
    let report = sidecar.token.refresh_now().await.unwrap();
    assert_eq!(report.generation, 3);
}

#[tokio::test(start_paused = true)]
async fn a_token_task_that_cannot_be_kept_running_is_given_up_and_says_so() {
    let logs = LogBuffer::capture();
    let endpoint = Endpoint::new(S(100));
    endpoint.with(|s| s.down = Some(Answer::Panic));
    let sidecar = start(&endpoint, settings(), almost_one);
    let mut waited = Duration::ZERO;
    while sidecar.token.refresher_running() {
        tokio::time::sleep(MS(100)).await;
        waited += MS(100);
        assert!(waited < S(60), "never given up");
    }
    // Restarted 5 times (about 1, 2, 4, 8, 16 s apart), then given up.
    let calls = endpoint.calls();
    assert_eq!(calls.len(), 6, "{calls:?}");
    assert!(calls[5].at < S(32), "{calls:?}");
    assert_eq!(restarts(&sidecar), Some(5.0));
    assert!(sidecar.task.is_finished());
    let lines = logs.lines();
    assert!(lines.iter().any(|l| l["level"] == "ERROR"
        && l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("the token refresh task cannot be kept running"))));
}

#[tokio::test(start_paused = true)]
async fn a_token_that_runs_out_during_a_slow_refresh_is_logged_usable_again() {
    let logs = LogBuffer::capture();
    // 10 s tokens: refresh at 4.75 s, usable until 9 s, expiry at 10 s. The
    // refresh is answered 5 s late, at 9.75 s: a 750 ms outage.
    let endpoint = Endpoint::new(S(10));
    endpoint.with(|s| s.script = [Answer::Issue, Answer::Late(S(5))].into());
    let sidecar = start(&endpoint, settings(), half);
    generation(&sidecar, 2, S(20)).await;
    assert_eq!(endpoint.calls()[1].at, MS(4750));
    let lines = logs.lines();
    let again: Vec<_> = lines
        .iter()
        .filter(|l| l["message"] == "token usable again")
        .collect();
    assert_eq!(again.len(), 1, "{lines:?}");
    assert_eq!(again[0]["outage_ms"], 750);
}
