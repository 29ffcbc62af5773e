//! The atomics the mailbox and completion records use: `std`'s in a normal build, loom's under
//! `--cfg loom` (see `trove_store::sync`). Parking (the futex, and its loom stand-in) is
//! `trove_store::blocks::park`'s.

pub(crate) use trove_store::sync::{AtomicU32, AtomicU64, Backoff, Ordering, fence};

/// A waiter's spin: pure spinning (no system call) at first, then yielding between looks,
/// until a deadline. A yield is a system call that returns at once when the waiter has a
/// core of its own (a call and its reply, each side on its core), and a value that lands
/// meanwhile is seen late; but when waiters outnumber cores (round robin over many actors), a
/// pure spinner takes the core its peer needs. So a waiter spins purely for [`Spin::PURE`]
/// only while its last wait ended within that (`quick`, learned per call site and thread by
/// [`Spin::learn`]), and otherwise spins as crossbeam's `Backoff` does (a few pure spins,
/// then yields). While spinning purely (one `pause` between looks) the clock is read every 64 looks.
pub struct Spin {
    looks: u32,
    start: std::time::Instant,
    pure_until: std::time::Instant,
    now: std::time::Instant,
    backoff: Backoff,
}

impl Spin {
    pub const PURE: std::time::Duration = std::time::Duration::from_micros(2);

    /// A spin starting at `start`; pure at first if `quick` (see [`Spin::learn`]).
    pub fn new(start: std::time::Instant, quick: bool) -> Spin {
        Spin {
            looks: 0,
            start,
            pure_until: if quick { start + Self::PURE } else { start },
            now: start,
            backoff: Backoff::new(),
        }
    }

    /// Waits a little before the next look; `false` once `until` has passed.
    pub fn go_on(&mut self, until: std::time::Instant) -> bool {
        self.looks = self.looks.wrapping_add(1);
        let pure = self.now < self.pure_until;
        if !pure || self.looks.is_multiple_of(64) {
            self.now = std::time::Instant::now();
        }
        if self.now >= until {
            return false;
        }
        if pure {
            std::hint::spin_loop();
        } else if self.backoff.is_completed() {
            std::thread::yield_now();
        } else {
            self.backoff.snooze();
        }
        true
    }

    /// Whether the wait that just ended (what it waited for came) was quick: the next wait
    /// at this place spins purely if so.
    pub fn learn(&self) -> bool {
        self.now < self.start + Self::PURE
    }
}
