//! The same bytes through both proxy engines: a request conversation (up
//! to three steps, each cut into pieces at arbitrary points) to a sidecar
//! with `proxy.fast_lane = true` and to one with `false`, each in front of
//! a raw upstream that answers with the case's scripted bytes. Both must
//! decide alike: see `token_sidecar::differential` for the input format and
//! the comparison, fuzz/README.md for the accepted differences.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use token_sidecar::differential::{Case, Rig};
use tokio::runtime::Runtime;

/// The sidecars live across inputs: starting them per input would cost
/// far more than an input.
struct Live {
    rt: Runtime,
    rig: Rig,
}

fn live() -> &'static Live {
    static LIVE: OnceLock<Live> = OnceLock::new();
    LIVE.get_or_init(|| {
        // One thread and a paused clock: timeouts pass at once when every
        // task is idle, so no input waits in real time (see the harness).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a tokio runtime");
        let rig = rt.block_on(Rig::start());
        Live { rt, rig }
    })
}

fuzz_target!(|data: &[u8]| {
    let live = live();
    let case = Case::parse(data);
    if let Err(d) = live.rt.block_on(live.rig.check(&case)) {
        panic!("{d}");
    }
});
