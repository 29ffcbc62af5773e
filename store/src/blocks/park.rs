//! Futex parking for structures in shared memory: one wait/wake primitive, [`Park`], used by
//! both sides of the SPSC ring ([`crate::blocks::ring`]) and by the consumers of the
//! executor's MPMC mailbox.
//!
//! A [`Park`] is an *eventcount*: two `u32` words, `event` (bumped by every notification that
//! may have a sleeper to wake; the futex word) and `waiters` (how many threads are between
//! announcing a wait and leaving it). Sleeping is on a *shared* futex (no
//! `FUTEX_PRIVATE_FLAG`): the words live in memory mapped by several processes.
//!
//! The condition waited for is the caller's ("the ring is not empty", "the mailbox is dead"):
//! the waiter passes it as `blocked`, the notifier changes it before it calls `notify_*`. A
//! caller spins on its condition first as it likes, then calls [`Park::wait`] in a loop that
//! re-checks the condition after every return (returns may be spurious).
//!
//! # The protocol
//!
//! ```text
//! waiter (Park::wait)                         notifier (Park::notify_one / notify_all)
//! E: ev = event (Acquire)                     S: the caller's state change (the condition)
//! A: waiters += 1                             G: fence(SeqCst)
//! F: fence(SeqCst)                            L: waiters != 0 ?  (Relaxed)
//! R: blocked()? (re-check the condition)      B:   event += 1 (Release)
//!    then FUTEX_WAIT(event, ev, deadline)     K:   FUTEX_WAKE(event, 1 or all)
//! D: waiters -= 1
//! ```
//!
//! The common path of a notifier is the fence and one load: no syscall unless someone
//! announced a wait.
//!
//! # No lost wake-up
//!
//! `F` and `G` are `SeqCst` fences, so they are totally ordered.
//!
//! - If `G` precedes `F`: `S` is sequenced before `G`, `R` after `F`, so `R` observes `S` (or
//!   later): the waiter sees the condition changed and does not sleep.
//! - If `F` precedes `G`: `A` is sequenced before `F`, `L` after `G`, so `L` observes `A` or a
//!   later value of `waiters`. If it reads non-zero, the notifier bumps `event` (`B`) and
//!   wakes. The waiter's `E` cannot have read `B` (or anything after it): `B` would then
//!   synchronise with `E`, and `G` (before `B`) would happen before `F` (after `E`),
//!   contradicting `F` before `G`. So `ev` is an older value, and the kernel, which compares
//!   the word and queues the waiter atomically with respect to `FUTEX_WAKE`, either finds
//!   `event != ev` (`EAGAIN`: the waiter returns at once) or has queued the waiter before `K`
//!   (`K` wakes it). If `L` reads zero, the waiter's own `D` came before it (`A` is counted
//!   until `D`): the waiter has already returned from its wait and re-checks the condition
//!   before it waits again, with a new `F`, to which the same argument applies.
//!
//! With several waiters, `notify_one` wakes one sleeper per notification (each notification
//! is for one item: the woken waiter takes it or re-checks), `notify_all` wakes all of them
//! (a state every waiter must see: closed, dead).
//!
//! # Waiting
//!
//! [`Park::wait`] is bounded by an optional deadline: past it, it returns
//! [`ParkError::Timeout`] without sleeping; otherwise it sleeps at most until the deadline.
//! `EAGAIN` (the event moved on), `EINTR` (a signal) and `ETIMEDOUT` are ordinary returns: the
//! caller re-checks its condition and the deadline. Any other futex error is returned as
//! [`ParkError::Futex`].
//!
//! # Under loom
//!
//! There is no kernel: under `--cfg loom` a [`Park`] also holds a loom mutex and condition
//! variable that stand in for the futex's hash bucket and wait queue (the compare of `event`
//! with `ev` and the queueing are done under the mutex, as the kernel does under its bucket
//! lock; a wake takes the mutex and notifies one or all). A wait ignores its deadline (the
//! model has no clock): a model must make sure the wake it waits for comes, and a lost
//! wake-up shows as a deadlock, which loom reports. The model `loom_models` below checks the
//! protocol.

use std::time::Instant;

use rustix::io::Errno;

use crate::blocks::sync::{AtomicU32, Ordering, fence};

/// `FUTEX_WAKE`'s count for "every sleeper". The kernel reads the count as an `int`: `u32::MAX`
/// would be -1 there, which wakes exactly one.
const WAKE_ALL: u32 = i32::MAX as u32;

/// How a wait ended other than by returning to re-check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParkError {
    /// The deadline had passed before the wait (no sleep).
    #[error("timed out")]
    Timeout,
    #[error("futex wait failed: {0}")]
    Futex(Errno),
}

/// An eventcount in shared memory (see the module docs). `repr(C)`, 8 bytes: `event` then
/// `waiters`. Valid for any bit pattern; [`Park::reset`] zeroes it when its region is
/// initialised.
#[repr(C)]
#[derive(Debug)]
pub struct Park {
    /// Bumped by a notification that saw a waiter; the futex word.
    event: AtomicU32,
    /// Threads between announcing a wait and leaving it.
    waiters: AtomicU32,
    /// The futex's stand-in under loom (see the module docs).
    #[cfg(loom)]
    model: sys::Queue,
}

#[cfg(not(loom))]
const _: () = assert!(size_of::<Park>() == 8 && align_of::<Park>() == 4);

impl Default for Park {
    fn default() -> Self {
        Self::new()
    }
}

impl Park {
    /// A zeroed `Park` in local memory (models and tests; shared ones are [`Park::reset`]).
    pub fn new() -> Park {
        Park {
            event: AtomicU32::new(0),
            waiters: AtomicU32::new(0),
            #[cfg(loom)]
            model: sys::Queue::new(),
        }
    }

    /// Zeroes both words (when the region holding it is initialised, before it is shared).
    pub fn reset(&self) {
        self.event.store(0, Ordering::Relaxed);
        self.waiters.store(0, Ordering::Relaxed);
    }

    /// How many threads are waiting or about to (a hint: for tests and diagnostics).
    pub fn waiters(&self) -> u32 {
        self.waiters.load(Ordering::Relaxed)
    }

    /// The waiter's half: announce, fence, re-check `blocked` (the caller's condition, true
    /// while it must wait), and if still blocked sleep until a notification, the deadline, or
    /// a spurious return. `Ok(())` means "re-check"; `Err(Timeout)` that `deadline` had
    /// passed on entry.
    pub fn wait(
        &self,
        deadline: Option<Instant>,
        blocked: impl FnOnce() -> bool,
    ) -> Result<(), ParkError> {
        let timeout = match deadline {
            None => None,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ParkError::Timeout);
                }
                // Too far to express: wait without a bound (the caller re-checks anyway).
                sys::Timespec::try_from(left).ok()
            }
        };
        // E: read before the announcement's fence (see the module docs).
        let ev = self.event.load(Ordering::Acquire);
        // A, F.
        self.waiters.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        // R.
        let result = if blocked() {
            sys::wait(self, ev, timeout)
        } else {
            Ok(())
        };
        // D.
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        result
    }

    /// The notifier's half, after the caller changed the condition: wakes one sleeper, if
    /// anyone announced a wait.
    pub fn notify_one(&self) {
        self.notify(1);
    }

    /// As [`Park::notify_one`], waking every sleeper.
    pub fn notify_all(&self) {
        self.notify(WAKE_ALL);
    }

    fn notify(&self, n: u32) {
        // G, L.
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::Relaxed) != 0 {
            // B, K.
            self.event.fetch_add(1, Ordering::Release);
            sys::wake(self, n);
        }
    }

    /// For the model's negative control: the notifier without its fence.
    #[cfg(all(test, loom))]
    fn notify_one_unfenced(&self) {
        if self.waiters.load(Ordering::Relaxed) != 0 {
            self.event.fetch_add(1, Ordering::Release);
            sys::wake(self, 1);
        }
    }
}

/// The kernel's futex.
#[cfg(not(loom))]
mod sys {
    use rustix::io::Errno;
    use rustix::thread::futex;

    use super::{Park, ParkError};

    pub(super) use rustix::thread::futex::Timespec;

    /// No `FUTEX_PRIVATE_FLAG`: the word is shared between processes.
    const SHARED: futex::Flags = futex::Flags::empty();

    pub(super) fn wait(p: &Park, ev: u32, timeout: Option<Timespec>) -> Result<(), ParkError> {
        match futex::wait(&p.event, SHARED, ev, timeout.as_ref()) {
            Ok(()) | Err(Errno::AGAIN | Errno::INTR | Errno::TIMEDOUT) => Ok(()),
            Err(e) => Err(ParkError::Futex(e)),
        }
    }

    pub(super) fn wake(p: &Park, n: u32) {
        // Cannot fail for a valid address; a missed wake would only cost the waiter its
        // deadline.
        let _ = futex::wake(&p.event, SHARED, n);
    }
}

/// The futex's stand-in under loom (see the module docs).
#[cfg(loom)]
mod sys {
    use loom::sync::{Condvar, Mutex};

    use super::{Park, ParkError};
    use crate::blocks::sync::Ordering;

    pub(super) use rustix::thread::futex::Timespec;

    /// The futex's hash bucket (the mutex) and wait queue (the condition variable).
    #[derive(Debug)]
    pub(super) struct Queue {
        bucket: Mutex<()>,
        sleepers: Condvar,
    }

    impl Queue {
        pub(super) fn new() -> Queue {
            Queue {
                bucket: Mutex::new(()),
                sleepers: Condvar::new(),
            }
        }
    }

    pub(super) fn wait(p: &Park, ev: u32, _timeout: Option<Timespec>) -> Result<(), ParkError> {
        let bucket = p.model.bucket.lock().expect("bucket");
        // The kernel reads the word under the bucket lock, after a full barrier.
        if p.event.load(Ordering::SeqCst) != ev {
            return Ok(()); // EAGAIN
        }
        drop(p.model.sleepers.wait(bucket).expect("bucket"));
        Ok(())
    }

    pub(super) fn wake(p: &Park, n: u32) {
        let _bucket = p.model.bucket.lock().expect("bucket");
        if n == 1 {
            p.model.sleepers.notify_one();
        } else {
            p.model.sleepers.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::thread;
    use std::time::Duration;

    use super::*;

    const LONG: Duration = Duration::from_secs(30);

    fn wait_for_waiter(p: &Park) {
        let start = Instant::now();
        while p.waiters() == 0 {
            assert!(start.elapsed() < Duration::from_secs(10), "never parked");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_past_deadline_is_a_timeout_without_sleeping() {
        let p = Park::new();
        let now = Instant::now();
        assert_eq!(p.wait(Some(now), || true), Err(ParkError::Timeout));
        assert_eq!(p.waiters(), 0);
    }

    #[test]
    fn a_wait_ends_at_its_deadline() {
        let p = Park::new();
        let start = Instant::now();
        let deadline = start + Duration::from_millis(30);
        while p.wait(Some(deadline), || true).is_ok() {
            assert!(start.elapsed() < LONG, "never timed out");
        }
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert_eq!(p.waiters(), 0);
    }

    #[test]
    fn an_unblocked_waiter_does_not_sleep() {
        let p = Park::new();
        let start = Instant::now();
        assert_eq!(p.wait(Some(start + LONG), || false), Ok(()));
        assert!(start.elapsed() < LONG);
        assert_eq!(p.waiters(), 0);
    }

    #[test]
    fn notify_one_wakes_a_sleeper_and_notify_all_wakes_every_one() {
        let p = Park::new();
        let ready = AtomicBool::new(false);
        thread::scope(|s| {
            let waiter = s.spawn(|| {
                while !ready.load(Ordering::Acquire) {
                    p.wait(Some(Instant::now() + LONG), || {
                        !ready.load(Ordering::Acquire)
                    })
                    .unwrap();
                }
                Instant::now()
            });
            wait_for_waiter(&p);
            let notified = Instant::now();
            ready.store(true, Ordering::Release);
            p.notify_one();
            let woken = waiter.join().unwrap();
            assert!(woken.duration_since(notified) < Duration::from_secs(5));
        });
        let done = AtomicBool::new(false);
        thread::scope(|s| {
            let waiters: Vec<_> = (0..3)
                .map(|_| {
                    s.spawn(|| {
                        while !done.load(Ordering::Acquire) {
                            p.wait(Some(Instant::now() + LONG), || {
                                !done.load(Ordering::Acquire)
                            })
                            .unwrap();
                        }
                    })
                })
                .collect();
            let start = Instant::now();
            while p.waiters() < 3 {
                assert!(start.elapsed() < Duration::from_secs(10), "never parked");
                thread::sleep(Duration::from_millis(1));
            }
            let notified = Instant::now();
            done.store(true, Ordering::Release);
            p.notify_all();
            for w in waiters {
                w.join().unwrap();
            }
            // All three woken by the one notification, not only the first.
            assert!(
                notified.elapsed() < Duration::from_secs(5),
                "{:?}",
                notified.elapsed()
            );
        });
        assert_eq!(p.waiters(), 0);
    }
}

#[cfg(all(test, loom))]
mod loom_models;
