//! Where log lines go: standard output, with access-log lines batched.
//!
//! A proxied request writes one access-log line; written on its own that is a
//! `write(2)` per request, which `bench/` measured at 10-20% of the CPU time
//! of a small proxied request. Access-log lines are therefore gathered and
//! written together once [`FLUSH_BYTES`] have accumulated, or at the latest
//! [`FLUSH_EVERY`] after the first of them (nginx's `access_log ... buffer=
//! flush=`). Every other line is written at once, after whatever access lines
//! wait, so the order of lines is kept and no warning, error or shutdown
//! message is ever held back. A crash loses at most the access lines of the
//! last [`FLUSH_EVERY`].

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// The target of the access log lines (`proxy::exchange::Exchange`'s drop).
pub const ACCESS_TARGET: &str = "token_sidecar::access";

/// Access lines are written once this many bytes wait (about 60 lines)...
pub const FLUSH_BYTES: usize = 16 * 1024;
/// ...or this long after the first of them, whichever comes first.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// The `MakeWriter` of the subscriber: lines into `out` (stdout in production).
pub struct LogWriter<W> {
    shared: Arc<Shared<W>>,
}

impl<W> Clone for LogWriter<W> {
    fn clone(&self) -> Self {
        LogWriter {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<W> {
    /// False when no flusher thread runs: every line is written at once.
    batch: bool,
    state: Mutex<State<W>>,
    /// Wakes the flusher when the first access line starts to wait.
    waiting: Condvar,
}

struct State<W> {
    out: W,
    pending: Vec<u8>,
}

impl LogWriter<io::Stdout> {
    /// Standard output, with a background thread that writes waiting access
    /// lines after [`FLUSH_EVERY`] (without batching if it cannot start).
    pub fn stdout() -> Self {
        let w = LogWriter::new(io::stdout());
        let shared = w.shared.clone();
        let started = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || shared.flush_loop());
        if started.is_ok() {
            w
        } else {
            LogWriter::unbatched(io::stdout())
        }
    }
}

impl<W: Write> LogWriter<W> {
    /// A writer into `out` without the timed flush (tests call [`Self::flush_pending`]).
    pub fn new(out: W) -> Self {
        Self::with_batching(out, true)
    }

    /// Every line written at once.
    pub fn unbatched(out: W) -> Self {
        Self::with_batching(out, false)
    }

    fn with_batching(out: W, batch: bool) -> Self {
        LogWriter {
            shared: Arc::new(Shared {
                batch,
                state: Mutex::new(State {
                    out,
                    pending: Vec::with_capacity(FLUSH_BYTES + 1024),
                }),
                waiting: Condvar::new(),
            }),
        }
    }

    /// Writes the access lines that wait, if any.
    pub fn flush_pending(&self) {
        let mut state = self.shared.lock();
        let _ = state.write_pending();
    }
}

impl<W: Write> Shared<W> {
    fn lock(&self) -> MutexGuard<'_, State<W>> {
        // A panic while holding the lock leaves only bytes behind: go on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn flush_loop(&self) {
        let mut state = self.lock();
        loop {
            while state.pending.is_empty() {
                state = self.waiting.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            // The first line waits at most FLUSH_EVERY.
            drop(state);
            std::thread::sleep(FLUSH_EVERY);
            state = self.lock();
            let _ = state.write_pending();
        }
    }
}

impl<W: Write> State<W> {
    fn write_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = self
            .out
            .write_all(&self.pending)
            .and_then(|()| self.out.flush());
        // Written or not, those lines are gone: a closed stdout must not
        // make the buffer grow without bound.
        self.pending.clear();
        result
    }
}

/// One log line (tracing-subscriber writes each event with one `write_all`).
pub struct Line<'a, W> {
    shared: &'a Shared<W>,
    batched: bool,
}

impl<W: Write> Write for Line<'_, W> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut state = self.shared.lock();
        if self.batched {
            let first = state.pending.is_empty();
            state.pending.extend_from_slice(line);
            if state.pending.len() >= FLUSH_BYTES {
                state.write_pending()?;
            } else if first {
                self.shared.waiting.notify_one();
            }
        } else {
            // After the access lines before it, in one write when they fit.
            state.pending.extend_from_slice(line);
            state.write_pending()?;
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a, W: Write + 'a> MakeWriter<'a> for LogWriter<W> {
    type Writer = Line<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        Line {
            shared: &self.shared,
            batched: false,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        Line {
            shared: &self.shared,
            batched: self.shared.batch
                && meta.target() == ACCESS_TARGET
                && *meta.level() == Level::INFO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn writes(&self) -> Vec<String> {
            let w = self.0.lock().unwrap();
            w.iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect()
        }
    }

    fn subscriber(w: LogWriter<Sink>) -> impl tracing::Subscriber {
        tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .with_writer(w)
            .finish()
    }

    #[test]
    fn access_lines_wait_and_other_lines_take_them_along_in_order() {
        let sink = Sink::default();
        let w = LogWriter::new(sink.clone());
        tracing::subscriber::with_default(subscriber(w.clone()), || {
            tracing::info!(target: "token_sidecar::access", n = 1, "request");
            tracing::info!(target: "token_sidecar::access", n = 2, "request");
        });
        assert!(
            sink.writes().is_empty(),
            "access lines were written at once"
        );
        tracing::subscriber::with_default(subscriber(w.clone()), || {
            tracing::warn!("upstream slow");
        });
        let writes = sink.writes();
        assert_eq!(writes.len(), 1, "{writes:?}");
        let lines: Vec<_> = writes[0].lines().collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(
            lines[0].contains("n=1") && lines[1].contains("n=2"),
            "{lines:?}"
        );
        assert!(lines[2].contains("upstream slow"), "{lines:?}");

        tracing::subscriber::with_default(subscriber(w.clone()), || {
            tracing::info!(target: "token_sidecar::access", n = 3, "request");
        });
        assert_eq!(sink.writes().len(), 1);
        w.flush_pending();
        assert!(sink.writes()[1].contains("n=3"));
    }

    #[test]
    fn unbatched_writes_every_line_at_once() {
        let sink = Sink::default();
        tracing::subscriber::with_default(subscriber(LogWriter::unbatched(sink.clone())), || {
            tracing::info!(target: "token_sidecar::access", n = 1, "request");
        });
        assert_eq!(sink.writes().len(), 1);
    }

    #[test]
    fn access_lines_are_written_once_enough_wait() {
        let sink = Sink::default();
        let w = LogWriter::new(sink.clone());
        let path = "/p".repeat(100);
        tracing::subscriber::with_default(subscriber(w), || {
            for _ in 0..FLUSH_BYTES / 200 + 1 {
                tracing::info!(target: "token_sidecar::access", path, "request");
            }
        });
        let writes = sink.writes();
        assert_eq!(writes.len(), 1, "{}", writes.len());
        assert!(writes[0].len() >= FLUSH_BYTES);
    }

    #[test]
    fn the_flusher_writes_a_lone_access_line_soon() {
        let sink = Sink::default();
        let w = LogWriter::new(sink.clone());
        let shared = w.shared.clone();
        std::thread::spawn(move || shared.flush_loop());
        tracing::subscriber::with_default(subscriber(w), || {
            tracing::info!(target: "token_sidecar::access", n = 9, "request");
        });
        // Bounded wait for the timed flush (FLUSH_EVERY is 100 ms).
        for _ in 0..100 {
            if !sink.writes().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(sink.writes().concat().contains("n=9"));
    }
}
