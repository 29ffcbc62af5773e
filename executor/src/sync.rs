//! The atomics (and futex) the mailbox and completion records use: `std`'s and rustix's in a
//! normal build, loom's under `--cfg loom` (see `trove_store::sync`).

pub(crate) use trove_store::sync::{AtomicU32, AtomicU64, Backoff, Ordering, fence};

#[cfg(not(loom))]
pub(crate) use rustix::thread::futex;

/// Under loom there is no kernel to park in: a wait that would block yields to loom's
/// scheduler and returns as a spurious wake-up would (callers re-check and wait again), and a
/// wake does nothing. The models run `try_push`/`try_pop`, not the parking loops.
#[cfg(loom)]
pub(crate) mod futex {
    pub use rustix::thread::futex::{Flags, Timespec};

    use super::{AtomicU32, Ordering};

    pub fn wait(
        word: &AtomicU32,
        _flags: Flags,
        val: u32,
        _timeout: Option<&Timespec>,
    ) -> rustix::io::Result<()> {
        if word.load(Ordering::SeqCst) != val {
            return Err(rustix::io::Errno::AGAIN);
        }
        loom::thread::yield_now();
        Ok(())
    }

    pub fn wake(_word: &AtomicU32, _flags: Flags, _n: u32) -> rustix::io::Result<usize> {
        Ok(0)
    }
}
