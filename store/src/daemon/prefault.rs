//! The background pre-fault thread: populates the heap a bounded distance ahead of what has
//! been allocated ([`PREFAULT_AHEAD`] beyond the highest allocation so far), so that creates
//! land in memory whose pages exist, while the memory a store commits follows its use: a large
//! store is never populated beyond what its objects have reached (unless the daemon was
//! started with the whole arena pre-faulted).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::{Shared, lock};

const PREFAULT_CHUNK: u64 = 64 << 20;
/// How far ahead of the highest allocation the heap is populated.
pub(super) const PREFAULT_AHEAD: u64 = 256 << 20;

pub(super) fn prefault_loop(sh: &Shared) {
    // Populating is work done ahead of need: it takes a core only when nothing else wants it
    // (nice 19 for this thread alone, as Linux applies a thread's own priority), so that on
    // a machine with few cores, or one whose memory is slow to fault in, a fresh store's
    // pre-fault does not slow the calls its processes start making at once.
    if let Err(e) = rustix::process::setpriority_process(None, 19) {
        debug!("background pre-fault keeps its priority: {e}");
    }
    let l = *sh.arena.layout();
    let t = Instant::now();
    let mut done = sh.prefaulted.load(Ordering::Relaxed);
    while done < l.heap_len && !sh.stopping.load(Ordering::Relaxed) {
        let wanted = sh.prefault_wanted.load(Ordering::Acquire).min(l.heap_len);
        if done >= wanted {
            // Nothing to do until an allocation reaches further (or the daemon stops).
            let g = lock(&sh.prefault_mx);
            if sh.prefault_wanted.load(Ordering::Acquire) <= done {
                let _ = sh
                    .prefault_cv
                    .wait_timeout(g, Duration::from_millis(500))
                    .map_err(|_| ());
            }
            continue;
        }
        let n = PREFAULT_CHUNK.min(wanted - done);
        if let Err(e) = sh.arena.populate(l.heap_offset + done, n) {
            warn!("background pre-fault stopped: {e}");
            return;
        }
        done += n;
        sh.prefaulted.store(done, Ordering::Release);
    }
    debug!(
        "background pre-fault ends after {:?} at {} bytes",
        t.elapsed(),
        done
    );
}

impl Shared {
    /// An allocation ends `end` bytes into the heap: populate up to [`PREFAULT_AHEAD`] past it.
    pub(super) fn prefault_ahead_of(&self, end: u64) {
        let want = end.saturating_add(PREFAULT_AHEAD);
        if self.prefault_wanted.fetch_max(want, Ordering::AcqRel) < want {
            let _g = lock(&self.prefault_mx);
            self.prefault_cv.notify_all();
        }
    }
}
