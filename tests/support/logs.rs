//! Log output captured per test thread (see [`LogBuffer`]).
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

/// Log output captured per thread: a global subscriber (set once for this
/// test binary) writes each event to the buffer of the thread that emitted
/// it, if that thread asked for one. A global subscriber rather than a
/// scoped one because tracing caches each callsite's interest from whichever
/// thread reaches it first, and other tests run on other threads.
#[derive(Clone, Default)]
pub struct LogBuffer(Arc<Mutex<Vec<u8>>>);

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<LogBuffer>> = const { std::cell::RefCell::new(None) };
}

struct ThreadWriter;

impl std::io::Write for ThreadWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURE.with(|c| {
            if let Some(b) = &*c.borrow() {
                b.0.lock().unwrap().extend_from_slice(buf);
            }
        });
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    /// Captures what this thread logs from now on.
    pub fn capture() -> LogBuffer {
        static INIT: std::sync::Once = std::sync::Once::new();
        INIT.call_once(|| {
            tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_env_filter("info,token_sidecar=trace")
                .with_writer(|| ThreadWriter)
                .init();
        });
        let buf = LogBuffer::default();
        CAPTURE.with(|c| *c.borrow_mut() = Some(buf.clone()));
        buf
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    pub fn lines(&self) -> Vec<serde_json::Value> {
        self.text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The access-log lines (target `token_sidecar::access`).
    pub fn access_lines(&self) -> Vec<serde_json::Value> {
        self.lines()
            .into_iter()
            .filter(|l| l["target"] == "token_sidecar::access")
            .collect()
    }
}
