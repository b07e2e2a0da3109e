//! The one background task that talks to the token endpoint.
//!
//! It never exits while the process runs: every failure becomes a later
//! attempt. It picks the grant (the "ladder"), applies the pure policy of
//! [`super::schedule`], publishes tokens through the [`TokenHandle`] and keeps
//! the status snapshot current.
//!
//! The ladder:
//! - scheduled refresh: the refresh_token grant when a refresh token is held,
//!   else the password grant;
//! - refresh refused (`invalid_grant`, Spring's 401 `invalid_token`, ...): drop
//!   the refresh token and do the password grant at once;
//! - the upstream rejected our token (a 401 replay asked for a new one): the
//!   password grant first. On servers that keep one token per client and
//!   user, a refresh revokes the token every other pod of the fleet holds, and
//!   if those pods answered their 401s with refreshes of their own they would
//!   revoke each other in a loop; a password grant instead returns the live
//!   token without revoking anything, so the fleet converges;
//! - a token so obtained (password grant after a 401) makes this pod a
//!   follower: its refresh is planned at the top of the band rather than
//!   anywhere in it. Having received the shared token after the pod that
//!   refreshed it, it then refreshes after that pod too, and with any
//!   traffic meets that pod's next refresh as a 401 first (and follows
//!   again) instead of refreshing a few milliseconds behind it and revoking
//!   the token the fleet was just given. The rare refresh that still lands
//!   so (pods started together hold one token received within
//!   milliseconds) is absorbed by the proxy's second replay;
//! - a password grant that answers with the token already held (such servers
//!   again) keeps the generation and the original expiry, and the next attempt
//!   uses the refresh_token grant if one is held, with backoff from
//!   `min_interval`; once that token is past its usable time, the next attempt
//!   is at its true expiry, when the server must issue a new one.
//!
//! Pacing: no two token calls closer than `refresh.min_interval`, whatever
//! asks for them (schedule, 401 invalidations, `POST /admin/refresh`, a secret
//! file change), except the password grant that follows a refused refresh
//! token at once. A refused login (a permanent error) is retried only after
//! `rejected_backoff` or when a secret file changes; upstream 401s do not
//! hurry it, since every failed login counts towards locking the user.
//!
//! While no usable token is held, transient failures are retried at most
//! `refresh.backoff_max_without_token` apart: every request meanwhile gets a
//! 503, and the first attempt after the endpoint comes back ends the outage.
//!
//! Secrets: the client secret and the password are read right before every
//! attempt ([`LiveSecret`]); a file found unreadable or empty is logged and
//! counted, and its last good value is sent instead.
//!
//! Supervision: the loop runs in a task of its own under [`supervise`]. If it
//! ever panics, it is restarted with backoff (a fresh loop that logs in
//! again, keeping the generation count and the token still held); if it
//! cannot be kept running, the [`TokenHandle`] says so and `/healthz` fails,
//! so that the kubelet restarts the container instead of leaving a process
//! that will never obtain a token again.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::client::{Credentials, Grant, TokenEndpoint, TokenResponse};
use super::error::{ErrorClass, GrantKind, Outcome, TokenError};
use super::schedule;
use super::{AttemptReport, Command, Reason, Status, Token, TokenHandle};
use crate::config::{Config, RefreshConfig};
use crate::metrics::Metrics;
use crate::secret::{redact_text, LiveSecret, SecretFileError, SecretSource};

/// What the refresh loop needs from the configuration: one credential
/// profile's worth, self-contained.
#[derive(Debug, Clone)]
pub struct Settings {
    pub refresh: RefreshConfig,
    pub oauth_timeout: Duration,
    /// Read before every attempt; a change of either file triggers an
    /// immediate retry after a refused login.
    pub client_secret: LiveSecret,
    pub password: LiveSecret,
}

impl Settings {
    pub fn from_config(config: &Config) -> Self {
        let live = |key: &str, source: &SecretSource| {
            let key = match source {
                SecretSource::File(_) => format!("{key}_file"),
                SecretSource::Inline(_) => key.to_owned(),
            };
            LiveSecret::new(key, source.clone())
        };
        Settings {
            refresh: config.refresh.clone(),
            oauth_timeout: config.oauth.timeout,
            client_secret: live("oauth.client_secret", &config.oauth.client_secret),
            password: live("oauth.password", &config.oauth.password),
        }
    }
}

/// A restarted task that then runs this long without panicking has
/// recovered: the count of restarts in a row starts again.
pub const STABLE_RUN: Duration = Duration::from_secs(600);

/// Restarts in a row after which the task is given up and `/healthz` fails.
/// With the defaults (restart backoff from `min_interval` = 1 s doubling,
/// jittered) a task that panics at once every time is given up within about
/// 30 s, and the kubelet's liveness probe restarts the container.
pub const MAX_RESTARTS_IN_A_ROW: u32 = 5;

/// Starts the refresh loop under its supervisor; the first attempt is made
/// at once. The handle ends only when aborted (or, having given up on the
/// loop, after saying so through the [`TokenHandle`]).
///
/// `jitter` returns a uniform value in `[0, 1)`; tests pass a constant.
pub fn spawn<E: TokenEndpoint>(
    endpoint: E,
    settings: Settings,
    metrics: Arc<Metrics>,
    jitter: fn() -> f64,
) -> (Arc<TokenHandle>, JoinHandle<()>) {
    let (handle, commands) = TokenHandle::new();
    for secret in [&settings.client_secret, &settings.password] {
        if secret.is_file() {
            metrics.secret_file_errors(secret.key());
        }
    }
    let shared = Shared {
        endpoint: Arc::new(endpoint),
        settings,
        metrics,
        jitter,
        handle: handle.clone(),
        commands: Arc::new(Mutex::new(commands)),
    };
    let task = tokio::spawn(supervise(shared));
    (handle, task)
}

/// What outlives one run of the loop.
struct Shared<E> {
    endpoint: Arc<E>,
    settings: Settings,
    metrics: Arc<Metrics>,
    jitter: fn() -> f64,
    handle: Arc<TokenHandle>,
    /// Held by the running loop; released when it ends, panic included.
    commands: Arc<Mutex<mpsc::Receiver<Command>>>,
}

/// Aborts the task when dropped: aborting the supervisor stops the loop.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the loop, restarting it with backoff whenever it panics.
async fn supervise<E: TokenEndpoint>(shared: Shared<E>) {
    let mut in_a_row = 0u32;
    loop {
        let started = Instant::now();
        let mut run = AbortOnDrop(tokio::spawn(Refresher::new(&shared).run()));
        let why = match (&mut run.0).await {
            Ok(()) => "the refresh loop ended".to_owned(),
            Err(e) if e.is_panic() => panic_text(e.into_panic()),
            Err(_) => return, // cancelled: the runtime is shutting down
        };
        if started.elapsed() >= STABLE_RUN {
            in_a_row = 0;
        }
        in_a_row += 1;
        if in_a_row > MAX_RESTARTS_IN_A_ROW {
            shared.handle.set_refresher_failed();
            error!(restarts_in_a_row = in_a_row - 1, panic = %why,
                "the token refresh task cannot be kept running: no new token will be obtained; /healthz now fails so that the container is restarted");
            return;
        }
        let delay =
            schedule::restart_backoff(in_a_row, (shared.jitter)(), &shared.settings.refresh);
        shared.metrics.refresher_restarted();
        error!(restarts_in_a_row = in_a_row, restart_in_ms = millis(delay), panic = %why,
            "the token refresh task panicked; restarting it");
        tokio::time::sleep(delay).await;
    }
}

/// A panic's message, redacted like any text that may hold a secret.
fn panic_text(payload: Box<dyn Any + Send>) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    redact_text(&text, &[])
}

struct Held {
    access: SecretString,
    expires_at: Instant,
    usable_until: Instant,
}

/// The last failed attempt, for the line that marks the token unusable.
struct Failure {
    at: SystemTime,
    grant: GrantKind,
    error: String,
    cause: &'static str,
    hint: &'static str,
}

struct Refresher<E> {
    endpoint: Arc<E>,
    settings: Settings,
    handle: Arc<TokenHandle>,
    commands: Arc<Mutex<mpsc::Receiver<Command>>>,
    metrics: Arc<Metrics>,
    jitter: fn() -> f64,
    held: Option<Held>,
    refresh_token: Option<SecretString>,
    generation: u64,
    transient_failures: u32,
    rejected_failures: u32,
    same_token_answers: u32,
    last_attempt: Option<Instant>,
    next: Instant,
    /// Why the attempt at `next` is made.
    next_reason: Reason,
    /// An invalidation is waiting for `min_interval` to pass.
    forced: bool,
    /// The current token came from a password grant that answered an
    /// upstream 401. On a server keeping one token per user, that means
    /// another pod of the fleet refreshed: this pod refreshes at the top of
    /// its band, after that pod.
    follower: bool,
    /// Fingerprints of the secrets as the last attempt sent them.
    prints_at_attempt: [Option<u64>; 2],
    /// While logins are refused: when to look at the secret files next.
    secret_poll_at: Option<Instant>,
    /// The problem last logged for each secret file, so that a file that
    /// stays empty is logged once (and counted at every read).
    secret_problems: [Option<String>; 2],
    last_failure: Option<Failure>,
    /// When the held token became unusable with no new one, once logged.
    unusable_since: Option<Instant>,
    status: Status,
}

impl<E: TokenEndpoint> Refresher<E> {
    /// A fresh loop: no token of its own yet, the generation count and the
    /// status carried on from the handle (a restart keeps them).
    fn new(shared: &Shared<E>) -> Self {
        let status = (*shared.handle.status()).clone();
        Refresher {
            endpoint: shared.endpoint.clone(),
            settings: shared.settings.clone(),
            handle: shared.handle.clone(),
            commands: shared.commands.clone(),
            metrics: shared.metrics.clone(),
            jitter: shared.jitter,
            held: None,
            refresh_token: None,
            generation: status.generation,
            transient_failures: 0,
            rejected_failures: 0,
            same_token_answers: 0,
            last_attempt: None,
            next: Instant::now(),
            next_reason: Reason::Startup,
            forced: false,
            follower: false,
            prints_at_attempt: [None, None],
            secret_poll_at: None,
            secret_problems: [None, None],
            last_failure: None,
            unusable_since: None,
            status,
        }
    }

    /// The loop. Every branch ends by setting `next` at least `min_interval`
    /// after the last attempt (the one exception: a refused refresh token is
    /// followed by the password grant at once, and that grant cannot be
    /// refused the same way), so it can neither spin nor stop.
    async fn run(mut self) {
        let commands = self.commands.clone();
        let mut commands = commands.lock().await;
        loop {
            self.status.next_attempt = self.next;
            self.handle.set_status(self.status.clone());
            let poll_at = self.secret_poll_at;
            let unusable_at = self.unusable_watch();
            tokio::select! {
                biased;
                Some(Command::Refresh(reply)) = commands.recv() => {
                    // An operator may force a refresh, but not a grant storm.
                    tokio::time::sleep_until(self.earliest()).await;
                    let report = self.attempt(Reason::Admin).await;
                    let _ = reply.send(report);
                }
                () = self.handle.invalidation() => self.on_invalidation(),
                () = tokio::time::sleep_until(self.next) => {
                    let reason = if self.forced { Reason::Upstream401 } else { self.next_reason };
                    self.attempt(reason).await;
                }
                () = sleep_until_some(poll_at) => self.poll_secrets(),
                () = sleep_until_some(unusable_at) => self.on_unusable(),
            }
        }
    }

    /// The soonest the next token call may be made: `min_interval` after the
    /// last one.
    fn earliest(&self) -> Instant {
        let now = Instant::now();
        self.last_attempt
            .map_or(now, |t| (t + self.settings.refresh.min_interval).max(now))
    }

    fn on_invalidation(&mut self) {
        if self.generation == 0 || self.handle.invalidated_generation() < self.generation {
            return; // a newer token already exists, or none yet: nothing to force
        }
        if self.rejected_failures > 0 {
            // Logins are being refused: another one now would only count
            // towards locking the user. The slow retry (or a secret change)
            // stays in charge.
            return;
        }
        self.forced = true;
        // Never sooner than min_interval after the last attempt, so an upstream
        // that rejects every token cannot drive a grant storm.
        self.next = self.next.min(self.earliest());
    }

    /// While logins are refused: retry at once when a secret file changed.
    fn poll_secrets(&mut self) {
        self.secret_poll_at = Some(Instant::now() + self.settings.refresh.secret_poll_interval);
        // Read as an attempt would (a bad read is reported; the last good
        // value, unchanged, is then what is compared).
        let _ = self.read_secrets();
        if self.fingerprints() != self.prints_at_attempt {
            info!("a secret file changed; retrying the login now");
            self.secret_poll_at = None;
            self.next = self.earliest();
            self.next_reason = Reason::SecretChanged;
        }
    }

    /// When to mark the held token unusable: its usable end, unless that
    /// was already logged.
    fn unusable_watch(&self) -> Option<Instant> {
        match (&self.held, self.unusable_since) {
            (Some(h), None) => Some(h.usable_until),
            _ => None,
        }
    }

    /// The held token reached its usable end and no new one came.
    fn on_unusable(&mut self) {
        let Some(held) = &self.held else { return };
        let since = held.usable_until;
        self.unusable_since = Some(since);
        let next_in = self.next.saturating_duration_since(Instant::now());
        match &self.last_failure {
            Some(f) => warn!(
                generation = self.generation,
                last_failure_at = %humantime::format_rfc3339_millis(f.at),
                last_grant = %f.grant,
                error = f.error.as_str(),
                cause = f.cause,
                hint = f.hint,
                next_attempt_in_ms = millis(next_in),
                "token unusable: no new token before the old one's expiry margin; requests get 503 until one comes"
            ),
            None => warn!(
                generation = self.generation,
                next_attempt_in_ms = millis(next_in),
                "token unusable: no new token before the old one's expiry margin; requests get 503 until one comes"
            ),
        }
    }

    fn choose_grant(&self, reason: Reason) -> Grant {
        let password_first = reason == Reason::Upstream401 && self.same_token_answers == 0;
        match &self.refresh_token {
            Some(rt) if !password_first => Grant::RefreshToken(rt.clone()),
            _ => Grant::Password,
        }
    }

    /// Reads both secrets (a bad re-read is logged and counted, and the
    /// last good value used); an error only if one was never good.
    fn read_secrets(&mut self) -> Result<Credentials, SecretFileError> {
        let client_secret = self.read_secret(0)?;
        let password = self.read_secret(1)?;
        Ok(Credentials {
            client_secret,
            password,
        })
    }

    fn read_secret(&mut self, i: usize) -> Result<SecretString, SecretFileError> {
        let secret = match i {
            0 => &mut self.settings.client_secret,
            _ => &mut self.settings.password,
        };
        let key = secret.key().to_owned();
        let read = secret.read();
        let problem = match &read {
            Ok(r) => r.problem.as_ref(),
            Err(e) => Some(e),
        };
        match problem {
            Some(p) => {
                self.metrics.secret_file_errors(&key).inc();
                let text = p.describe();
                if self.secret_problems[i].as_ref() != Some(&text) {
                    error!(
                        key = key.as_str(),
                        problem = text.as_str(),
                        using_last_good_value = read.is_ok(),
                        "secret file cannot be used; the last good value is sent instead"
                    );
                    self.secret_problems[i] = Some(text);
                }
            }
            None => {
                if self.secret_problems[i].take().is_some() {
                    info!(key = key.as_str(), "secret file usable again");
                }
            }
        }
        read.map(|r| r.value)
    }

    async fn attempt(&mut self, reason: Reason) -> AttemptReport {
        let grant = self.choose_grant(reason);
        let kind = grant.kind();
        let sent_at = Instant::now();
        let sent_wall = SystemTime::now();
        // A hung call must not outlive the token it is meant to replace: while
        // that token is in use, the call ends by its true expiry at the latest,
        // leaving the loop free to try again. Once it is past its usable time
        // nothing is left to protect, and a call cut to the few milliseconds
        // before expiry would only fail and delay the recovery.
        let timeout = match &self.held {
            Some(h) if sent_at < h.usable_until => {
                self.settings.oauth_timeout.min(h.expires_at - sent_at)
            }
            _ => self.settings.oauth_timeout,
        };
        self.last_attempt = Some(sent_at);
        self.forced = false;
        let credentials = self.read_secrets();
        self.prints_at_attempt = self.fingerprints();
        let result = match credentials {
            Err(e) => Err(TokenError::SecretFile(e)),
            Ok(credentials) => {
                let call = self.endpoint.request(&grant, &credentials, timeout);
                match tokio::time::timeout(timeout, call).await {
                    Ok(r) => r,
                    Err(_) => Err(TokenError::Timeout(timeout)),
                }
            }
        };
        let outcome = match &result {
            Ok(_) => Outcome::Success,
            Err(e) => e.outcome(),
        };
        self.metrics.token_request(kind, outcome, sent_at.elapsed());
        self.status.last_attempt_at = Some(sent_wall);
        self.status.last_grant = Some(kind);
        self.status.last_reason = Some(reason);
        self.status.last_outcome = Some(outcome);
        let mut report = AttemptReport {
            grant: kind,
            outcome,
            generation: self.generation,
            error: None,
            expires_in_secs: None,
        };
        let result = result.and_then(|resp| {
            let lifetime = resp.lifetime;
            self.on_success(reason, kind, resp, sent_at, sent_wall)
                .map(|()| lifetime)
        });
        match result {
            Ok(lifetime) => {
                report.generation = self.generation;
                report.expires_in_secs = Some(lifetime.as_secs());
                self.status.last_error = None;
                self.status.last_cause = None;
                self.status.consecutive_failures = 0;
                self.last_failure = None;
            }
            Err(e) => {
                report.outcome = e.outcome();
                report.error = Some(e.code().to_owned());
                self.on_failure(reason, kind, sent_wall, e);
            }
        }
        report
    }

    fn on_success(
        &mut self,
        reason: Reason,
        kind: GrantKind,
        resp: TokenResponse,
        sent_at: Instant,
        sent_wall: SystemTime,
    ) -> Result<(), TokenError> {
        let cfg = &self.settings.refresh;
        let now = Instant::now();
        let same = self
            .held
            .as_ref()
            .is_some_and(|h| h.access.expose_secret() == resp.access_token.expose_secret());
        // Keep the old refresh token when a refresh (or a same-token answer)
        // brings none: the server did not rotate it.
        let keep_old = kind == GrantKind::RefreshToken || same;
        let old = self.refresh_token.take();
        self.refresh_token = resp.refresh_token.or(if keep_old { old } else { None });
        self.transient_failures = 0;
        self.rejected_failures = 0;
        self.secret_poll_at = None;
        self.next_reason = Reason::Scheduled;

        if let Some(held) = self.held.as_ref().filter(|_| same) {
            // Same token, same expiry: never reschedule at 75% of a shrinking
            // remainder. Try again (refresh grant if held) with backoff from
            // min_interval while the token is usable. Once it is not, the
            // server will go on answering with it until it expires: ask again
            // right then, not after a backoff grown meanwhile.
            self.same_token_answers += 1;
            let usable_left = held.usable_until.saturating_duration_since(now);
            self.next = if usable_left.is_zero() {
                held.expires_at.max(now + cfg.min_interval)
            } else {
                now + schedule::transient_backoff(
                    self.same_token_answers,
                    (self.jitter)(),
                    Some(usable_left),
                    cfg,
                )
            };
            info!(grant = %kind, reason = %reason, generation = self.generation,
                retry_in_ms = millis(self.next.saturating_duration_since(now)),
                "token endpoint answered with the token already held; expiry unchanged");
            return Ok(());
        }

        let mut header =
            HeaderValue::try_from(format!("Bearer {}", resp.access_token.expose_secret()))
                .map_err(|_| {
                    TokenError::Invalid("access_token holds characters a header cannot carry")
                })?;
        header.set_sensitive(true);
        let lifetime = resp.lifetime;
        let expires_at = sent_at + lifetime;
        let usable_until = expires_at - schedule::expiry_margin(lifetime, cfg);
        let expires_wall = sent_wall + lifetime;
        // The held token ran out: logged by the loop, or (if it ran out while
        // this call was under way, which the loop does not watch) now.
        let lapsed_at = self.unusable_since.take().or_else(|| {
            self.held
                .as_ref()
                .map(|h| h.usable_until)
                .filter(|u| *u <= now)
        });
        self.generation += 1;
        self.same_token_answers = 0;
        self.follower = reason == Reason::Upstream401 && kind == GrantKind::Password;
        self.handle.publish(Token {
            generation: self.generation,
            header,
            usable_until,
            expires_at: expires_wall,
        });
        self.held = Some(Held {
            access: resp.access_token,
            expires_at,
            usable_until,
        });
        // A follower takes the top of its band: having received the token
        // after the pod that refreshed it, it then renews after that pod too.
        let jitter = if self.follower { 1.0 } else { (self.jitter)() };
        let after = schedule::refresh_after(lifetime, jitter, cfg);
        self.next = (sent_at + after).max(now + cfg.min_interval);
        self.metrics.token_obtained(self.generation, expires_wall);
        self.status.generation = self.generation;
        self.status.obtained_at = Some(sent_wall);
        self.status.expires_at = Some(expires_wall);
        self.status.grant = Some(kind);
        self.status.reason = Some(reason);
        info!(
            grant = %kind,
            reason = %reason,
            generation = self.generation,
            expires_in = lifetime.as_secs(),
            refresh_in = after.as_secs(),
            rotated_refresh_token = kind == GrantKind::RefreshToken && self.refresh_token.is_some(),
            "{}",
            if self.generation == 1 { "token obtained" } else { "token refreshed" }
        );
        if let Some(since) = lapsed_at {
            info!(
                generation = self.generation,
                outage_ms = millis(now.saturating_duration_since(since)),
                "token usable again"
            );
        }
        Ok(())
    }

    fn on_failure(&mut self, reason: Reason, kind: GrantKind, at: SystemTime, e: TokenError) {
        let cfg = &self.settings.refresh;
        let now = Instant::now();
        let cause = e.cause(kind);
        self.status.last_error = Some(e.code().to_owned());
        self.status.last_cause = Some(cause);
        self.status.consecutive_failures += 1;
        self.last_failure = Some(Failure {
            at,
            grant: kind,
            error: e.code().to_owned(),
            cause: cause.as_str(),
            hint: cause.hint(),
        });
        let description = match &e {
            TokenError::Rejected { description, .. } => description.clone(),
            _ => None,
        };
        let valid_for = self
            .held
            .as_ref()
            .map(|h| h.usable_until.saturating_duration_since(now))
            .filter(|d| !d.is_zero());
        match cause.class() {
            ErrorClass::RefreshRefused => {
                warn!(grant = %kind, reason = %reason, error = e.code(), cause = cause.as_str(),
                    description = description.as_deref(),
                    "refresh token refused; dropping it and using the password grant");
                self.refresh_token = None;
                self.next = now;
                self.next_reason = Reason::RefreshRefused;
            }
            ErrorClass::Transient => {
                self.transient_failures += 1;
                let delay = schedule::transient_backoff(
                    self.transient_failures,
                    (self.jitter)(),
                    valid_for,
                    cfg,
                );
                self.next = now + delay;
                self.next_reason = Reason::Retry;
                warn!(grant = %kind, reason = %reason, error = e.code(), cause = cause.as_str(),
                    failures = self.transient_failures, retry_in_ms = millis(delay),
                    token_valid_for_ms = valid_for.map(millis),
                    cause_chain = %error_chain(&e), "token request failed; will retry");
            }
            ErrorClass::Permanent => {
                self.rejected_failures += 1;
                let delay =
                    schedule::rejected_backoff(self.rejected_failures, (self.jitter)(), cfg);
                self.next = now + delay;
                self.next_reason = Reason::Retry;
                self.secret_poll_at = Some(now + cfg.secret_poll_interval);
                let message = if e.outcome() == Outcome::Rejected {
                    "token request rejected"
                } else {
                    "token request failed"
                };
                error!(grant = %kind, reason = %reason, error = e.code(), cause = cause.as_str(),
                    description = description.as_deref(), hint = cause.hint(),
                    failures = self.rejected_failures, retry_in_s = delay.as_secs(),
                    cause_chain = %error_chain(&e), "{message}");
            }
        }
    }

    fn fingerprints(&self) -> [Option<u64>; 2] {
        [
            self.settings.client_secret.fingerprint(),
            self.settings.password.fingerprint(),
        ]
    }
}

/// Whole milliseconds, for log fields.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `error: cause: cause` for a log field; every link is secret-free by
/// construction of [`TokenError`].
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
