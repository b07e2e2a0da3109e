//! The token source: one background task ([`refresher`]) is the only caller of
//! the token endpoint; everyone else reads the current token from a
//! [`TokenHandle`] with one lock-free `ArcSwap` load.
//!
//! Data flows one way: the refresher writes the token and a status snapshot;
//! the proxy and the admin server only read them. The two things a reader may
//! *ask* for go through narrow doors: [`TokenHandle::invalidate`] (the upstream
//! rejected generation N; an atomic max plus a wake-up, so 100 concurrent 401s
//! cost one token call) and [`TokenHandle::refresh_now`] (the admin endpoint).

pub mod client;
pub mod error;
pub mod refresher;
pub mod schedule;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use http::HeaderValue;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

pub use error::{Cause, ErrorClass, ErrorCode, GrantKind, Outcome, TokenError};

/// The token as the proxy needs it.
#[derive(Debug)]
pub struct Token {
    /// Starts at 1 and grows with every new access token.
    pub generation: u64,
    /// `Bearer <access token>`, built once and marked sensitive so hyper's
    /// HPACK never indexes it and `Debug` prints no secret.
    pub header: HeaderValue,
    /// True expiry less the safety margin: not injected after this.
    pub usable_until: Instant,
    pub expires_at: SystemTime,
}

/// Why a token request was made: in the grant's log line and `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Reason {
    /// The first request of the token task.
    #[serde(rename = "startup")]
    Startup,
    /// The planned refresh ahead of expiry.
    #[serde(rename = "scheduled")]
    Scheduled,
    /// The upstream rejected the current token.
    #[serde(rename = "upstream_401")]
    Upstream401,
    /// `POST /admin/refresh`.
    #[serde(rename = "admin")]
    Admin,
    /// A secret file changed while logins were refused.
    #[serde(rename = "secret_changed")]
    SecretChanged,
    /// The previous attempt failed.
    #[serde(rename = "retry")]
    Retry,
    /// The password grant right after a refused refresh token.
    #[serde(rename = "refresh_refused")]
    RefreshRefused,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Startup => "startup",
            Reason::Scheduled => "scheduled",
            Reason::Upstream401 => "upstream_401",
            Reason::Admin => "admin",
            Reason::SecretChanged => "secret_changed",
            Reason::Retry => "retry",
            Reason::RefreshRefused => "refresh_refused",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `/status` shows and what the `Retry-After` computation reads.
/// Metadata only; never a token.
#[derive(Debug, Clone)]
pub struct Status {
    pub generation: u64,
    pub obtained_at: Option<SystemTime>,
    pub expires_at: Option<SystemTime>,
    /// Grant that produced the current token, and why it was asked for.
    pub grant: Option<GrantKind>,
    pub reason: Option<Reason>,
    pub last_attempt_at: Option<SystemTime>,
    pub last_grant: Option<GrantKind>,
    pub last_reason: Option<Reason>,
    pub last_outcome: Option<Outcome>,
    /// OAuth `error` or our own code of the last failure, if it failed.
    pub last_error: Option<String>,
    /// The diagnosis of the last failure, and what to check.
    pub last_cause: Option<Cause>,
    pub consecutive_failures: u32,
    pub next_attempt: Instant,
}

/// The result of one attempt, for `POST /admin/refresh`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttemptReport {
    pub grant: GrantKind,
    pub outcome: Outcome,
    pub generation: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
}

/// A token could not be had in time.
#[derive(Debug, Clone, Copy)]
pub struct Unavailable {
    /// Whole seconds until the next token attempt, at least 1.
    pub retry_after: u64,
}

pub(crate) enum Command {
    Refresh(oneshot::Sender<AttemptReport>),
}

/// The shared, read-mostly face of the token source.
pub struct TokenHandle {
    current: ArcSwapOption<Token>,
    changed: watch::Sender<u64>,
    invalidated: AtomicU64,
    wake: Notify,
    status: ArcSwap<Status>,
    commands: mpsc::Sender<Command>,
    /// Set when the token task kept failing and is no longer restarted.
    refresher_failed: AtomicBool,
}

impl TokenHandle {
    pub(crate) fn new() -> (Arc<Self>, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(8);
        let handle = TokenHandle {
            current: ArcSwapOption::empty(),
            changed: watch::channel(0).0,
            invalidated: AtomicU64::new(0),
            wake: Notify::new(),
            status: ArcSwap::from_pointee(Status {
                generation: 0,
                obtained_at: None,
                expires_at: None,
                grant: None,
                reason: None,
                last_attempt_at: None,
                last_grant: None,
                last_reason: None,
                last_outcome: None,
                last_error: None,
                last_cause: None,
                consecutive_failures: 0,
                next_attempt: Instant::now(),
            }),
            commands: tx,
            refresher_failed: AtomicBool::new(false),
        };
        (Arc::new(handle), rx)
    }

    /// The token to inject now, if one is usable: one `ArcSwap` load, no lock.
    #[inline]
    pub fn usable(&self) -> Option<(u64, HeaderValue)> {
        let guard = self.current.load();
        match guard.as_deref() {
            Some(t) if Instant::now() < t.usable_until => Some((t.generation, t.header.clone())),
            _ => None,
        }
    }

    /// Whether a token has ever been obtained (before that, requests wait).
    pub fn ever_had_token(&self) -> bool {
        self.current.load().is_some()
    }

    /// Before the first token: waits up to `wait` for it, unless the refresh
    /// loop will make no attempt within that time (a refused login backs off
    /// for minutes), in which case holding the request would only turn a
    /// prompt 503 into a client-side timeout.
    pub async fn wait_first(&self, wait: Duration) -> Result<(u64, HeaderValue), Unavailable> {
        let next = self.status.load().next_attempt;
        if next > Instant::now() + wait {
            return Err(Unavailable {
                retry_after: self.retry_after(),
            });
        }
        self.wait_usable(0, wait).await
    }

    /// Waits up to `wait` for a usable token newer than generation `newer_than`.
    pub async fn wait_usable(
        &self,
        newer_than: u64,
        wait: Duration,
    ) -> Result<(u64, HeaderValue), Unavailable> {
        let deadline = Instant::now() + wait;
        let mut rx = self.changed.subscribe();
        loop {
            if let Some((g, h)) = self.usable() {
                if g > newer_than {
                    return Ok((g, h));
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => {
                    return Err(Unavailable {
                        retry_after: self.retry_after(),
                    })
                }
            }
        }
    }

    /// The upstream rejected generation `generation`: ask for a new token
    /// unless a newer one exists or was already asked for. Never blocks.
    pub fn invalidate(&self, generation: u64) {
        let before = self.invalidated.fetch_max(generation, Ordering::AcqRel);
        if before < generation {
            self.wake.notify_one();
        }
    }

    /// Whole seconds until the next token attempt, at least 1.
    pub fn retry_after(&self) -> u64 {
        let next = self.status.load().next_attempt;
        schedule::retry_after_secs(next.saturating_duration_since(Instant::now()))
    }

    pub fn status(&self) -> Arc<Status> {
        self.status.load_full()
    }

    /// Forces an attempt now and reports its outcome (`POST /admin/refresh`).
    pub async fn refresh_now(&self) -> Option<AttemptReport> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Refresh(tx)).await.ok()?;
        rx.await.ok()
    }

    /// False once the token task could not be kept running: no token will
    /// ever come again, and `/healthz` fails so the container is restarted.
    pub fn refresher_running(&self) -> bool {
        !self.refresher_failed.load(Ordering::Acquire)
    }

    // Writer side: only the refresher calls these.

    pub(crate) fn set_refresher_failed(&self) {
        self.refresher_failed.store(true, Ordering::Release);
    }

    pub(crate) fn publish(&self, token: Token) {
        let generation = token.generation;
        self.current.store(Some(Arc::new(token)));
        self.changed.send_replace(generation);
    }

    pub(crate) fn set_status(&self, status: Status) {
        self.status.store(Arc::new(status));
    }

    pub(crate) fn invalidated_generation(&self) -> u64 {
        self.invalidated.load(Ordering::Acquire)
    }

    pub(crate) async fn invalidation(&self) {
        self.wake.notified().await
    }
}
