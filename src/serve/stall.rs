//! Ends a connection whose peer stops taking bytes.
//!
//! A body that stops *arriving* is ended by [`crate::proxy::body::ProxyBody`]'s idle
//! timer. A peer that stops *reading* is different: hyper then stops polling
//! the body it is sending (back-pressure), so no body timer can run, and the
//! exchange (and the upstream connection behind it) would be held forever.
//! Only the socket sees it: a write that stays pending. [`WriteStall`] starts
//! a timer when a write returns `Pending`, clears it on any progress, and
//! fails the write with `TimedOut` when it runs out; hyper then closes the
//! connection and drops both bodies. The timer wakes the connection's task,
//! which retries the write and so finds it expired.
//!
//! [`StallGuard`] puts this on a tokio stream (the proxy's inbound
//! connections); the upstream connections use [`WriteStall`] directly.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The stall timer of one connection's write side.
pub struct WriteStall {
    after: Option<Duration>,
    /// Allocated on the first stall, then reset; `armed` says whether it counts.
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl WriteStall {
    /// `None`: never times out.
    pub fn new(after: Option<Duration>) -> Self {
        WriteStall {
            after,
            sleep: None,
            armed: false,
        }
    }

    /// Filters the result of a write or flush.
    #[inline]
    pub fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending => self.pending(cx),
            ready => {
                self.armed = false;
                ready
            }
        }
    }

    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let Some(after) = self.after else {
            return Poll::Pending;
        };
        if !self.armed {
            self.armed = true;
            let deadline = Instant::now() + after;
            match &mut self.sleep {
                Some(s) => s.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let sleep = self.sleep.as_mut().expect("armed above");
        match sleep.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                StalledPeer(after),
            ))),
        }
    }
}

/// The peer took no bytes for this long (`proxy.body_idle_timeout`).
#[derive(Debug, thiserror::Error)]
#[error("the peer took no bytes for {0:?} (proxy.body_idle_timeout)")]
pub struct StalledPeer(pub Duration);

pin_project_lite::pin_project! {
    /// A tokio stream whose writes fail once they have been pending too long.
    pub struct StallGuard<T> {
        #[pin]
        inner: T,
        stall: WriteStall,
    }
}

impl<T> StallGuard<T> {
    pub fn new(inner: T, after: Option<Duration>) -> Self {
        StallGuard {
            inner,
            stall: WriteStall::new(after),
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead> AsyncRead for StallGuard<T> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for StallGuard<T> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, buf);
        this.stall.check(cx, polled)
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(cx, bufs);
        this.stall.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let polled = this.inner.poll_flush(cx);
        this.stall.check(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_write_pending_too_long_fails_and_progress_resets_the_timer() {
        // A 64-byte pipe whose reader reads only when told.
        let (a, mut b) = tokio::io::duplex(64);
        let mut guarded = StallGuard::new(a, Some(Duration::from_secs(5)));
        guarded.write_all(&[1; 64]).await.unwrap();

        // Full: the next write waits; the reader drains in time, so it succeeds.
        let drain = async {
            tokio::time::sleep(Duration::from_secs(4)).await;
            let mut buf = [0u8; 64];
            tokio::io::AsyncReadExt::read_exact(&mut b, &mut buf)
                .await
                .unwrap();
        };
        let (w, ()) = tokio::join!(guarded.write_all(&[2; 64]), drain);
        w.unwrap();

        // Full again and nobody reads: fails after 5 s, not before.
        let started = Instant::now();
        let err = guarded.write_all(&[3; 1]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(err.to_string().contains("body_idle_timeout"));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_limit_it_waits() {
        let (a, _b) = tokio::io::duplex(8);
        let mut guarded = StallGuard::new(a, None);
        guarded.write_all(&[1; 8]).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(3600), guarded.write_all(&[2])).await;
        assert!(r.is_err());
    }
}
