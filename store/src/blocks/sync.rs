//! The atomics the lock-free protocols use, swappable for `loom`'s.
//!
//! In a normal build these are `std`'s atomics and crossbeam's `Backoff`. Built with
//! `RUSTFLAGS="--cfg loom"` they are `loom`'s, so the model tests (`shm::loom_models`, and
//! the executor's) run the real protocol code under loom's scheduler, which explores the
//! interleavings and the weak-memory outcomes (release/acquire causality, stale loads) that
//! the C11 model allows. Under loom a spin-wait must yield to loom, so `Backoff` does that.
//!
//! Only the modules whose structures are shared between processes and modelled use this
//! (`shm`'s directory slots, `park`'s eventcount and `region`'s header words here; the
//! executor's mailboxes and completion records). The futex has no stand-in here: `park` is
//! its only user, and under loom it waits on a loom mutex and condition variable instead (see
//! `blocks::park`).

#[cfg(not(loom))]
pub use crossbeam_utils::Backoff;
#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

#[cfg(loom)]
pub use loom::sync::atomic::{Ordering, fence};
#[cfg(loom)]
pub use model::{AtomicU32, AtomicU64};

/// Loom's atomics, with `SeqCst` accesses made to mean what they mean in C11.
///
/// Loom treats a `SeqCst` load, store or read-modify-write as `AcqRel` (its README lists this
/// as unsupported: it gives false alarms), but models `fence(SeqCst)` fully. The Dekker
/// handshakes here (pin bit vs. state word, `want` vs. record state; a `Park`'s use explicit
/// fences) are pairs of `SeqCst` accesses, which C11 (and x86 and ARMv8) do order. So under
/// loom a `SeqCst` store is followed by `fence(SeqCst)`, a `SeqCst` load preceded by one, and a
/// `SeqCst` read-modify-write has one on each side. That is slightly stronger than C11 for a
/// `Relaxed` access next to a `SeqCst` one (the fence orders it too), so the models check the
/// `SeqCst` pairs and the release/acquire chains, not `Relaxed` neighbours of `SeqCst`
/// accesses. Other orderings go to loom unchanged.
#[cfg(loom)]
mod model {
    use loom::sync::atomic::{Ordering, fence};

    fn sc_fence(order: Ordering) {
        if order == Ordering::SeqCst {
            fence(Ordering::SeqCst);
        }
    }

    macro_rules! atomic {
        ($name:ident, $int:ty) => {
            #[derive(Debug)]
            pub struct $name(loom::sync::atomic::$name);

            impl $name {
                pub fn new(v: $int) -> $name {
                    $name(loom::sync::atomic::$name::new(v))
                }
                pub fn load(&self, order: Ordering) -> $int {
                    sc_fence(order);
                    self.0.load(order)
                }
                pub fn store(&self, v: $int, order: Ordering) {
                    self.0.store(v, order);
                    sc_fence(order);
                }
                fn rmw<R>(
                    &self,
                    order: Ordering,
                    f: impl FnOnce(&loom::sync::atomic::$name) -> R,
                ) -> R {
                    sc_fence(order);
                    let r = f(&self.0);
                    sc_fence(order);
                    r
                }
                pub fn swap(&self, v: $int, order: Ordering) -> $int {
                    self.rmw(order, |a| a.swap(v, order))
                }
                pub fn fetch_add(&self, v: $int, order: Ordering) -> $int {
                    self.rmw(order, |a| a.fetch_add(v, order))
                }
                pub fn fetch_sub(&self, v: $int, order: Ordering) -> $int {
                    self.rmw(order, |a| a.fetch_sub(v, order))
                }
                pub fn fetch_or(&self, v: $int, order: Ordering) -> $int {
                    self.rmw(order, |a| a.fetch_or(v, order))
                }
                pub fn fetch_and(&self, v: $int, order: Ordering) -> $int {
                    self.rmw(order, |a| a.fetch_and(v, order))
                }
                pub fn fetch_max(&self, v: $int, order: Ordering) -> $int {
                    self.rmw(order, |a| a.fetch_max(v, order))
                }
                pub fn compare_exchange(
                    &self,
                    current: $int,
                    new: $int,
                    success: Ordering,
                    failure: Ordering,
                ) -> Result<$int, $int> {
                    self.rmw(success, |a| {
                        a.compare_exchange(current, new, success, failure)
                    })
                }
                pub fn compare_exchange_weak(
                    &self,
                    current: $int,
                    new: $int,
                    success: Ordering,
                    failure: Ordering,
                ) -> Result<$int, $int> {
                    self.rmw(success, |a| {
                        a.compare_exchange_weak(current, new, success, failure)
                    })
                }
            }
        };
    }

    atomic!(AtomicU32, u32);
    atomic!(AtomicU64, u64);
}

/// Under loom a spin-wait yields to loom's scheduler (a plain spin would never let the thread
/// it waits for run) and never "completes" (so callers never sleep in real time).
#[cfg(loom)]
#[derive(Debug, Default)]
pub struct Backoff(());

#[cfg(loom)]
impl Backoff {
    pub fn new() -> Backoff {
        Backoff(())
    }
    pub fn spin(&self) {
        loom::thread::yield_now();
    }
    pub fn snooze(&self) {
        loom::thread::yield_now();
    }
    pub fn is_completed(&self) -> bool {
        false
    }
    pub fn reset(&self) {}
}

/// Runs the model `f` under loom (all interleavings of its threads, with at most
/// `LOOM_MAX_PREEMPTIONS` preemptions each, `preemptions` if unset) and returns how many
/// executions it explored; prints that count (`--nocapture` shows it).
#[cfg(loom)]
pub fn explore<F>(name: &str, preemptions: usize, f: F) -> usize
where
    F: Fn() + Sync + Send + 'static,
{
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(preemptions);
    }
    if std::env::var_os("LOOM_MAX_BRANCHES").is_none() {
        // Spin-waits (a consumer polling an empty queue) take many branches per execution.
        builder.max_branches = 100_000;
    }
    let bound = builder.preemption_bound;
    builder.check(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f();
    });
    let n = runs.load(std::sync::atomic::Ordering::Relaxed);
    println!("loom model {name}: {n} executions explored (preemption bound {bound:?})");
    n
}

#[cfg(all(test, loom))]
mod loom_models {
    use std::sync::Arc;

    use super::*;

    /// The store-buffering litmus test (Dekker): each thread stores its flag then loads the
    /// other's. Both may read 0 unless the accesses are `SeqCst`. Returns whether loom found
    /// the outcome where neither saw the other.
    fn both_missed(store: Ordering, load: Ordering) -> bool {
        std::panic::catch_unwind(|| {
            explore("store_buffering", 3, move || {
                let flags = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
                let other = Arc::clone(&flags);
                let t = loom::thread::spawn(move || {
                    other[0].store(1, store);
                    other[1].load(load)
                });
                flags[1].store(1, store);
                let mine = flags[0].load(load);
                let theirs = t.join().expect("thread");
                assert!(mine == 1 || theirs == 1, "both threads missed the other");
            });
        })
        .is_err()
    }

    /// The shim's `SeqCst` is C11's: a Dekker pair of `SeqCst` accesses holds, and loom still
    /// finds the failure when the same accesses are only release/acquire.
    #[test]
    fn loom_seqcst_dekker_holds_and_acqrel_fails() {
        assert!(!both_missed(Ordering::SeqCst, Ordering::SeqCst));
        println!("expected: loom finds \"both threads missed the other\" with release/acquire");
        assert!(both_missed(Ordering::Release, Ordering::Acquire));
    }
}
