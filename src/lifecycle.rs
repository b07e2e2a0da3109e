//! Shutdown state shared by the signal handler, `POST /admin/shutdown` and
//! `/readyz`: draining starts once, from whichever comes first.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;
use tracing::info;

pub struct Lifecycle {
    draining: AtomicBool,
    trigger: watch::Sender<bool>,
}

impl Lifecycle {
    pub fn new() -> Self {
        Lifecycle {
            draining: AtomicBool::new(false),
            trigger: watch::channel(false).0,
        }
    }

    /// `/readyz` turns 503 from now on.
    pub fn begin_shutdown(&self, why: &str) {
        if !self.draining.swap(true, Ordering::AcqRel) {
            info!(reason = why, "shutdown started: draining");
            self.trigger.send_replace(true);
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Resolves once shutdown has begun.
    pub async fn draining(&self) {
        let mut rx = self.trigger.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}
