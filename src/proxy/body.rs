//! One body type for both directions: streams frames as they come (with
//! back-pressure: a frame is read only when the other side wants one), counts
//! bytes for the access log, ends an exchange that stays idle too long, and can
//! keep a bounded copy of what it streams so a request can be replayed after a
//! 401 without ever waiting to buffer it first.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use super::error::ClientBodyError;
use super::exchange::Exchange;

/// An error while streaming a body: the same type the fast lane reports a
/// client's failed upload with, so both are classified alike.
pub type BodyError = ClientBodyError;

/// What happens when a response body has been read to its end: the pooled
/// upstream connection it came from goes back to its pool.
pub trait BodyEnd: Send + 'static {
    fn ended(self: Box<Self>);
}

enum Source {
    Empty,
    Stream(Incoming),
    Chunks(VecDeque<Bytes>),
}

/// Which counter of the [`Exchange`] a body feeds.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to upstream.
    Up,
    /// Upstream to client.
    Down,
}

/// A bounded copy of a streamed request body, handed over when it ends.
struct Tee {
    buf: Vec<Bytes>,
    size: usize,
    limit: usize,
    done: oneshot::Sender<Vec<Bytes>>,
}

pub struct ProxyBody {
    source: Source,
    tee: Option<Tee>,
    idle: Option<Idle>,
    exchange: Option<(Arc<Exchange>, Direction)>,
    /// The pooled upstream connection this response body comes from, handed
    /// back when the body ends (dropped with the body otherwise).
    checkin: Option<Box<dyn BodyEnd>>,
}

struct Idle {
    after: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl ProxyBody {
    pub fn empty() -> Self {
        Self::from_source(Source::Empty)
    }

    pub fn full(bytes: Bytes) -> Self {
        Self::from_source(Source::Chunks(VecDeque::from([bytes])))
    }

    /// A replay of chunks a [`ProxyBody::tee`] kept.
    pub fn chunks(chunks: Vec<Bytes>) -> Self {
        Self::from_source(Source::Chunks(chunks.into()))
    }

    pub fn stream(incoming: Incoming, idle_timeout: Duration) -> Self {
        if incoming.is_end_stream() {
            return Self::empty();
        }
        let mut b = Self::from_source(Source::Stream(incoming));
        b.idle = Some(Idle {
            after: idle_timeout,
            sleep: None,
        });
        b
    }

    fn from_source(source: Source) -> Self {
        ProxyBody {
            source,
            tee: None,
            idle: None,
            exchange: None,
            checkin: None,
        }
    }

    /// Hands `checkin`'s connection back to the pool once this body has ended.
    pub fn with_checkin(mut self, checkin: Option<Box<dyn BodyEnd>>) -> Self {
        match checkin {
            Some(c) if self.source_ended() => c.ended(),
            c => self.checkin = c,
        }
        self
    }

    fn checkin(&mut self) {
        if let Some(c) = self.checkin.take() {
            c.ended();
        }
    }

    /// Keeps a copy of up to `limit` bytes; the receiver gets the chunks when
    /// the body ended within the limit, and an error otherwise.
    pub fn tee(&mut self, limit: usize) -> oneshot::Receiver<Vec<Bytes>> {
        let (tx, rx) = oneshot::channel();
        match &self.source {
            Source::Empty => {
                let _ = tx.send(Vec::new());
            }
            Source::Chunks(c) => {
                let _ = tx.send(c.iter().cloned().collect());
            }
            Source::Stream(_) => {
                self.tee = Some(Tee {
                    buf: Vec::new(),
                    size: 0,
                    limit,
                    done: tx,
                })
            }
        }
        rx
    }

    pub fn track(mut self, exchange: Arc<Exchange>, direction: Direction) -> Self {
        self.exchange = Some((exchange, direction));
        self
    }

    fn source_ended(&self) -> bool {
        match &self.source {
            Source::Empty => true,
            Source::Chunks(c) => c.is_empty(),
            Source::Stream(s) => s.is_end_stream(),
        }
    }

    /// The body ended within the limit: the copy is complete.
    fn finish_tee(&mut self) {
        if let Some(tee) = self.tee.take() {
            let _ = tee.done.send(tee.buf);
        }
    }

    fn count(&self, n: usize) {
        if let Some((ex, dir)) = &self.exchange {
            let c = if *dir == Direction::Up {
                &ex.bytes_up
            } else {
                &ex.bytes_down
            };
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled = match &mut this.source {
            Source::Empty => Poll::Ready(None),
            Source::Chunks(c) => Poll::Ready(c.pop_front().map(|b| Ok(Frame::data(b)))),
            Source::Stream(s) => Pin::new(s)
                .poll_frame(cx)
                .map(|o| o.map(|r| r.map_err(|e| BodyError::Broken(Box::new(e))))),
        };
        let item = match polled {
            Poll::Pending => {
                if let Some(idle) = &mut this.idle {
                    let sleep = idle
                        .sleep
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle.after)));
                    ready!(sleep.as_mut().poll(cx));
                    this.tee = None;
                    return Poll::Ready(Some(Err(BodyError::Idle(idle.after))));
                }
                return Poll::Pending;
            }
            Poll::Ready(item) => item,
        };
        if let Some(idle) = &mut this.idle {
            if let Some(sleep) = &mut idle.sleep {
                sleep.as_mut().reset(Instant::now() + idle.after);
            }
        }
        match &item {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.count(data.len());
                    if let Some(tee) = &mut this.tee {
                        if tee.size + data.len() <= tee.limit {
                            tee.size += data.len();
                            tee.buf.push(data.clone());
                        } else {
                            this.tee = None; // too large to replay
                        }
                    }
                    // hyper stops polling once a body says it has ended (a
                    // Content-Length body after its last byte), so the end
                    // may never come as `None`: hand the copy over now.
                    if this.source_ended() {
                        this.finish_tee();
                        this.checkin();
                    }
                } else {
                    this.tee = None; // trailers: a replay could not carry them
                    if this.source_ended() {
                        this.checkin();
                    }
                }
            }
            Some(Err(_)) => {
                this.tee = None;
                this.checkin = None; // the connection is closed with it
            }
            None => {
                this.finish_tee();
                this.checkin();
            }
        }
        Poll::Ready(item)
    }

    fn is_end_stream(&self) -> bool {
        self.source_ended()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Empty => SizeHint::with_exact(0),
            Source::Chunks(c) => SizeHint::with_exact(c.iter().map(|b| b.len() as u64).sum()),
            Source::Stream(s) => s.size_hint(),
        }
    }
}
