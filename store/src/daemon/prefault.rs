//! The background pre-fault thread: populates the heap from start-up, chunk by chunk, unless
//! the daemon was started with the whole arena pre-faulted.

use std::sync::atomic::Ordering;
use std::time::Instant;

use tracing::{debug, warn};

use super::Shared;

const PREFAULT_CHUNK: u64 = 64 << 20;

pub(super) fn prefault_loop(sh: &Shared) {
    let l = *sh.arena.layout();
    let t = Instant::now();
    let mut done = sh.prefaulted.load(Ordering::Relaxed);
    while done < l.heap_len && !sh.stopping.load(Ordering::Relaxed) {
        let n = PREFAULT_CHUNK.min(l.heap_len - done);
        if let Err(e) = sh.arena.populate(l.heap_offset + done, n) {
            warn!("background pre-fault stopped: {e}");
            return;
        }
        done += n;
        sh.prefaulted.store(done, Ordering::Release);
    }
    debug!("background pre-fault done in {:?}", t.elapsed());
}
