//! The tokio runtime of a running sidecar.
//!
//! With one worker (the default, `runtime.worker_threads = 1`) the runtime
//! is tokio's current-thread scheduler on one
//! dedicated thread: every task, the listener's and the upstream client's
//! connections alike, runs there, and a wake-up is a push onto a local queue.
//! The multi-thread scheduler with one worker gives the same parallelism but
//! pays for work-stealing queues, cross-thread wake-ups through the driver
//! and atomics on every task transition: 1.5% more user-space instructions
//! per proxied request under callgrind and, with every process free to run
//! on either CPU, 11-19% more CPU per request over plain http in
//! `bench/run.sh` (docs/performance.md, "Tail latency"). With more workers
//! the multi-thread scheduler is used; on two CPUs shared with the load it
//! made the tail longer (p99 1.4x at 256 connections against one worker),
//! which is why one is the default.

use std::future::Future;
use std::io;

/// Runs `fut` to completion on a runtime with `workers` worker threads named
/// `thread_name` (the calling thread only waits), then writes the log lines
/// that wait ([`crate::logging::flush`]).
pub fn block_on<F>(workers: usize, thread_name: &str, fut: F) -> io::Result<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    if workers > 1 {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name(thread_name)
            .enable_all()
            .build()?;
        let out = rt.block_on(fut);
        crate::logging::flush();
        return Ok(out);
    }
    // The worker is a thread of its own, as with the multi-thread scheduler,
    // so thread listings show the same names either way.
    let name = thread_name.to_owned();
    let worker = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .thread_name(name)
                .enable_all()
                .build()
                .map(|rt| rt.block_on(fut))
        })?;
    let joined = worker.join();
    crate::logging::flush();
    match joined {
        Ok(result) => result,
        // The panic was already reported by the hook; carry it on.
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_runs_on_a_named_thread_of_its_own() {
        let caller = std::thread::current().id();
        let (name, id) = block_on(1, "bench-worker", async {
            let t = std::thread::current();
            // Spawned tasks run on that same thread.
            let spawned = tokio::spawn(async { std::thread::current().id() })
                .await
                .unwrap();
            assert_eq!(spawned, t.id());
            (t.name().map(str::to_owned), t.id())
        })
        .unwrap();
        assert_eq!(name.as_deref(), Some("bench-worker"));
        assert_ne!(id, caller);
    }

    #[test]
    fn several_workers_use_the_multi_thread_scheduler() {
        let flavor = block_on(2, "bench-worker", async {
            tokio::runtime::Handle::current().runtime_flavor()
        })
        .unwrap();
        assert_eq!(flavor, tokio::runtime::RuntimeFlavor::MultiThread);
        let flavor = block_on(0, "bench-worker", async {
            tokio::runtime::Handle::current().runtime_flavor()
        })
        .unwrap();
        assert_eq!(flavor, tokio::runtime::RuntimeFlavor::CurrentThread);
    }
}
