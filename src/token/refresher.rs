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

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::client::{Grant, TokenEndpoint, TokenResponse};
use super::error::{ErrorClass, GrantKind, Outcome, TokenError};
use super::schedule;
use super::{AttemptReport, Command, Status, Token, TokenHandle};
use crate::config::RefreshConfig;
use crate::metrics::Metrics;
use crate::secret::SecretSource;

/// What the refresh loop needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub refresh: RefreshConfig,
    pub oauth_timeout: Duration,
    /// Secret files whose change triggers an immediate retry after a refused login.
    pub secrets: Vec<SecretSource>,
}

/// Starts the refresh loop; the first attempt is made at once.
///
/// `jitter` returns a uniform value in `[0, 1)`; tests pass a constant.
pub fn spawn<E: TokenEndpoint>(
    endpoint: E,
    settings: Settings,
    metrics: Arc<Metrics>,
    jitter: fn() -> f64,
) -> (Arc<TokenHandle>, JoinHandle<()>) {
    let (handle, commands) = TokenHandle::new();
    let refresher = Refresher {
        endpoint,
        settings,
        handle: handle.clone(),
        commands,
        metrics,
        jitter,
        held: None,
        refresh_token: None,
        generation: 0,
        transient_failures: 0,
        rejected_failures: 0,
        same_token_answers: 0,
        last_attempt: None,
        next: Instant::now(),
        forced: false,
        follower: false,
        prints_at_attempt: Vec::new(),
        secret_poll_at: None,
        status: (*handle.status()).clone(),
    };
    let task = tokio::spawn(refresher.run());
    (handle, task)
}

struct Held {
    access: SecretString,
    expires_at: Instant,
    usable_until: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Scheduled,
    /// The upstream rejected the current generation.
    Invalidated,
    Admin,
}

struct Refresher<E> {
    endpoint: E,
    settings: Settings,
    handle: Arc<TokenHandle>,
    commands: mpsc::Receiver<Command>,
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
    /// An invalidation is waiting for `min_interval` to pass.
    forced: bool,
    /// The current token came from a password grant that answered an
    /// upstream 401. On a server keeping one token per user, that means
    /// another pod of the fleet refreshed: this pod refreshes at the top of
    /// its band, after that pod.
    follower: bool,
    /// Fingerprints of the secret files as they were when the last attempt
    /// read them (taken just before it, so a swap during the call is seen).
    prints_at_attempt: Vec<Option<u64>>,
    /// While logins are refused: when to look at the secret files next.
    secret_poll_at: Option<Instant>,
    status: Status,
}

impl<E: TokenEndpoint> Refresher<E> {
    /// The loop. Every branch ends by setting `next` at least `min_interval`
    /// after the last attempt (the one exception: a refused refresh token is
    /// followed by the password grant at once, and that grant cannot be
    /// refused the same way), so it can neither spin nor stop.
    async fn run(mut self) {
        loop {
            self.status.next_attempt = self.next;
            self.handle.set_status(self.status.clone());
            let poll_at = self.secret_poll_at;
            tokio::select! {
                biased;
                Some(Command::Refresh(reply)) = self.commands.recv() => {
                    // An operator may force a refresh, but not a grant storm.
                    tokio::time::sleep_until(self.earliest()).await;
                    let report = self.attempt(Reason::Admin).await;
                    let _ = reply.send(report);
                }
                () = self.handle.invalidation() => self.on_invalidation(),
                () = tokio::time::sleep_until(self.next) => {
                    let reason = if self.forced { Reason::Invalidated } else { Reason::Scheduled };
                    self.attempt(reason).await;
                }
                () = sleep_until_some(poll_at) => {
                    self.secret_poll_at =
                        Some(Instant::now() + self.settings.refresh.secret_poll_interval);
                    if self.fingerprints() != self.prints_at_attempt {
                        info!("a secret file changed; retrying the login now");
                        self.secret_poll_at = None;
                        self.next = self.earliest();
                    }
                }
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

    fn choose_grant(&self, reason: Reason) -> Grant {
        let password_first = reason == Reason::Invalidated && self.same_token_answers == 0;
        match &self.refresh_token {
            Some(rt) if !password_first => Grant::RefreshToken(rt.clone()),
            _ => Grant::Password,
        }
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
        self.prints_at_attempt = self.fingerprints();
        let result =
            match tokio::time::timeout(timeout, self.endpoint.request(&grant, timeout)).await {
                Ok(r) => r,
                Err(_) => Err(TokenError::Timeout(timeout)),
            };
        let outcome = match &result {
            Ok(_) => Outcome::Success,
            Err(e) => e.outcome(),
        };
        self.metrics.token_request(kind, outcome, sent_at.elapsed());
        self.status.last_attempt_at = Some(sent_wall);
        self.status.last_grant = Some(kind);
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
                self.status.consecutive_failures = 0;
            }
            Err(e) => {
                report.outcome = e.outcome();
                report.error = Some(e.code().to_owned());
                self.on_failure(kind, e);
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
            info!(grant = %kind, generation = self.generation,
                retry_in_ms = self.next.saturating_duration_since(now).as_millis() as u64,
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
        self.generation += 1;
        self.same_token_answers = 0;
        self.follower = reason == Reason::Invalidated && kind == GrantKind::Password;
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
        info!(
            grant = %kind,
            generation = self.generation,
            expires_in = lifetime.as_secs(),
            refresh_in = after.as_secs(),
            rotated_refresh_token = kind == GrantKind::RefreshToken && self.refresh_token.is_some(),
            "{}",
            if self.generation == 1 { "token obtained" } else { "token refreshed" }
        );
        Ok(())
    }

    fn on_failure(&mut self, kind: GrantKind, e: TokenError) {
        let cfg = &self.settings.refresh;
        let now = Instant::now();
        self.status.last_error = Some(e.code().to_owned());
        self.status.consecutive_failures += 1;
        let description = match &e {
            TokenError::Rejected { description, .. } => description.clone(),
            _ => None,
        };
        let valid_for = self
            .held
            .as_ref()
            .map(|h| h.usable_until.saturating_duration_since(now))
            .filter(|d| !d.is_zero());
        match e.class(kind) {
            ErrorClass::RefreshRefused => {
                warn!(grant = %kind, error = e.code(), description = description.as_deref(),
                    "refresh token refused; dropping it and using the password grant");
                self.refresh_token = None;
                self.next = now;
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
                warn!(grant = %kind, error = e.code(), failures = self.transient_failures,
                    retry_in_ms = delay.as_millis() as u64,
                    token_valid_for_ms = valid_for.map(|d| d.as_millis() as u64),
                    cause = %error_chain(&e), "token request failed; will retry");
            }
            ErrorClass::Permanent => {
                self.rejected_failures += 1;
                let delay =
                    schedule::rejected_backoff(self.rejected_failures, (self.jitter)(), cfg);
                self.next = now + delay;
                self.secret_poll_at = Some(now + cfg.secret_poll_interval);
                let message = if e.outcome() == Outcome::Rejected {
                    "token request rejected"
                } else {
                    "token request failed"
                };
                error!(grant = %kind, error = e.code(), description = description.as_deref(),
                    hint = e.hint(kind), failures = self.rejected_failures,
                    retry_in_s = delay.as_secs(), cause = %error_chain(&e), "{message}");
            }
        }
    }

    fn fingerprints(&self) -> Vec<Option<u64>> {
        self.settings
            .secrets
            .iter()
            .map(SecretSource::fingerprint)
            .collect()
    }
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
