//! A stack of idle upstream connections for the one upstream, shared by the
//! fast lane's pool and the hyper HTTP/1.1 pool.
//!
//! There is one upstream, so no map keyed by host: the most recently used
//! connection is reused first (its socket buffers are warm, and the others
//! can age out). The stack sits behind a mutex held for one push or pop and
//! never across an `.await` (uncontended with one worker thread: a pair of
//! atomic operations). Connections idle longer than the timeout are
//! skipped when popped, and closed by a reaper task that ends with the stack.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::time::Instant;

/// What the stack needs to know of a connection.
pub trait IdleConn: Send + 'static {
    /// Still usable (not closed by the peer, ready for a request).
    fn usable(&mut self) -> bool;
}

pub struct IdleStack<C> {
    conns: Mutex<Vec<(C, Instant)>>,
    timeout: Duration,
    reaper_started: AtomicBool,
}

impl<C: IdleConn> IdleStack<C> {
    pub fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(IdleStack {
            conns: Mutex::new(Vec::new()),
            timeout,
            reaper_started: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(C, Instant)>> {
        // A panic while holding the lock leaves only connections behind: go on.
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used connection that is usable and not expired;
    /// the others met on the way are closed.
    pub fn pop(&self) -> Option<C> {
        let mut conns = self.lock();
        while let Some((mut conn, since)) = conns.pop() {
            if since.elapsed() < self.timeout && conn.usable() {
                return Some(conn);
            }
        }
        None
    }

    pub fn push(self: &Arc<Self>, conn: C) {
        self.lock().push((conn, Instant::now()));
        if !self.reaper_started.swap(true, Ordering::Relaxed) {
            tokio::spawn(reap(Arc::downgrade(self)));
        }
    }
}

/// Closes connections idle longer than the timeout, or closed meanwhile
/// (they would be skipped on pop anyway; this closes them while nobody
/// asks). Ends with the stack.
async fn reap<C: IdleConn>(stack: Weak<IdleStack<C>>) {
    let Some(timeout) = stack.upgrade().map(|s| s.timeout) else {
        return;
    };
    let mut tick = tokio::time::interval(timeout.max(Duration::from_millis(100)));
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(stack) = stack.upgrade() else { return };
        let expired: Vec<(C, Instant)> = {
            let mut conns = stack.lock();
            let mut expired = Vec::new();
            let mut keep = Vec::with_capacity(conns.len());
            for (mut c, since) in conns.drain(..) {
                if since.elapsed() < timeout && c.usable() {
                    keep.push((c, since));
                } else {
                    expired.push((c, since));
                }
            }
            *conns = keep;
            expired
        };
        drop(expired); // closed outside the lock
    }
}
