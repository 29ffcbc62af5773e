//! The one spin policy: whether a waiter spins before it parks, and for how long.
//!
//! Spinning pays only while the peer that will end the wait is running on another core. When
//! trove's processes (or anybody's) outnumber the cores, a waiter that spins takes the CPU its
//! peer needs. Every trove wait that spins before it parks (a consumer on an empty mailbox,
//! a caller polling a completion record, both ends of a ring, a wait for an object) asks a
//! [`Spin`] here instead of keeping a constant of its own. Two things decide:
//!
//! - **Permits, machine-wide.** Past a short *grace* ([`GRACE`]: the peer is usually a few
//!   microseconds from answering), a spinner must hold a permit. There are as many as cores
//!   (`TROVE_SPINNERS` overrides), so trove's spinners never outnumber the cores, and a
//!   spinner that finds none parks at once. (`cores - 1`, which would always leave a core to
//!   a thread with work, measured 1.3-4x slower for 1:1 sync calls and tasks on 2 cores:
//!   caller and callee hand the one permit over on every call.) The permits are [`Permits`]:
//!   lease words in the arena header, shared by every process that maps the arena (a process
//!   without an arena uses a process-local set). A permit is a *lease* (CLOCK_MONOTONIC
//!   nanoseconds, the same clock in every process) that expires a little after the longest
//!   spin allowed, so a spinner killed mid-spin holds its permit for at most [`LEASE_SLACK`]
//!   more: nothing leaks, and no count needs repairing.
//! - **A budget learned per wait site** ([`Site`], process-local): a wait that ended while
//!   spinning raises the budget to twice its latency, or lets it decay slowly (1/64 a wait)
//!   towards that, so the budget follows the longest recent latencies. A wait that parked
//!   and still ended within half the site's maximum raises it the same way (a longer spin
//!   would have caught it); one that lasted longer cuts it by a sixteenth, so a site whose
//!   waits are long (an actor called in turn with seven others, an idle worker) stops
//!   spinning after a few dozen waits, while one slow moment does not collapse the budget
//!   of a caller whose peer answers in microseconds. A site may have a floor (a caller whose
//!   alternative is a round of the daemon's notices). A wait whose condition held at once
//!   (it never spun) teaches nothing. Every [`PROBE_EVERY`]-th wait spins up to the site's
//!   maximum, so a collapsed budget grows back once spinning pays again.
//!
//! Parking itself is [`crate::blocks::park`]'s (no lost wake-ups); this module only decides
//! when to stop looking and park.
//!
//! ```text
//! let mut spin = Spin::new(&SITE);
//! loop {
//!     if condition() { spin.done(); return }
//!     if spin.spin() { continue }      // one step: spin hints, then yields
//!     park.wait(deadline, || !condition())?;
//! }
//! ```

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, Weak};
use std::time::Duration;

use crossbeam_utils::Backoff;

/// Spinning without a permit, at the start of every wait (spin hints, then yields).
pub const GRACE: Duration = Duration::from_micros(10);
/// How long past the longest spin a permit stays taken if its holder dies.
pub const LEASE_SLACK: Duration = Duration::from_millis(1);
/// Every this many waits of a site, one spins up to the site's maximum (a probe).
pub const PROBE_EVERY: u32 = 64;
/// Lease words in [`Permits`]: the most spinners there can ever be at once.
pub const MAX_PERMITS: usize = 16;

/// The machine-wide spin permits: [`MAX_PERMITS`] lease words (0 or the CLOCK_MONOTONIC
/// nanosecond at which the lease ends), each on its own cache line, so that spinners of
/// different processes taking and giving back their leases on every wait do not contend.
/// `repr(C)`, 1 KiB, valid for any bit pattern; lives in the arena header.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct Permits {
    leases: [Lease; MAX_PERMITS],
}

#[repr(C, align(64))]
#[derive(Debug, Default)]
struct Lease(AtomicU64);

const _: () = assert!(size_of::<Permits>() == 64 * MAX_PERMITS);

impl Permits {
    /// Frees every lease (when the arena is created, before it is shared).
    pub fn reset(&self) {
        for l in &self.leases {
            l.0.store(0, Ordering::Relaxed);
        }
    }

    /// Takes one of the first `cap` leases that is free or expired at `now`, until `until`;
    /// returns its index, or `None` if all are held.
    pub fn try_take(&self, cap: usize, now: u64, until: u64) -> Option<usize> {
        self.try_take_from(0, cap, now, until)
    }

    /// [`Permits::try_take`], looking at the leases from `first` on (modulo `cap`): a process
    /// starts at its own, so that it usually touches only that line.
    pub fn try_take_from(&self, first: usize, cap: usize, now: u64, until: u64) -> Option<usize> {
        let cap = cap.min(MAX_PERMITS);
        for i in (0..cap).map(|k| (first + k) % cap) {
            let l = &self.leases[i].0;
            let v = l.load(Ordering::Relaxed);
            if v <= now
                && l.compare_exchange(v, until, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                return Some(i);
            }
        }
        None
    }

    /// Gives back lease `i` taken until `until` (unless it expired and was taken again).
    pub fn release(&self, i: usize, until: u64) {
        let _ = self.leases[i]
            .0
            .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// How many leases are held at `now` (diagnostics and tests).
    pub fn held(&self, now: u64) -> usize {
        self.leases
            .iter()
            .filter(|l| l.0.load(Ordering::Relaxed) > now)
            .count()
    }
}

/// The permits of this process: the arena's (see [`install`]) or a process-local set.
struct Installed {
    /// Keeps the arena's mapping alive while a spinner uses its permits.
    owner: Weak<dyn Send + Sync>,
    permits: *const Permits,
}

// SAFETY: `permits` points into the mapping `owner` keeps alive; it is only dereferenced
// while an upgraded `owner` is held, and `Permits` is only atomics.
unsafe impl Send for Installed {}

static INSTALLED: Mutex<Option<Installed>> = Mutex::new(None);
static LOCAL: Permits = Permits {
    leases: [const { Lease(AtomicU64::new(0)) }; MAX_PERMITS],
};

/// Makes `permits` (in a mapping that `owner` keeps mapped) this process's spin permits, in
/// place of the process-local set. The arena does this when it is created or attached.
///
/// # Safety
/// `permits` points to a `Permits` that stays valid for as long as `owner` can be upgraded.
pub unsafe fn install(owner: Weak<dyn Send + Sync>, permits: *const Permits) {
    *INSTALLED.lock().unwrap_or_else(|p| p.into_inner()) = Some(Installed { owner, permits });
}

/// A held permit, and what keeps it mapped.
struct Permit {
    _owner: Option<std::sync::Arc<dyn Send + Sync>>,
    permits: *const Permits,
    index: usize,
    until: u64,
}

impl Permit {
    fn take(from: Option<&'static Permits>, until_ns: u64, now: u64) -> Option<Permit> {
        let (owner, permits) = if let Some(p) = from {
            (None, p as *const Permits)
        } else {
            let installed = INSTALLED.lock().unwrap_or_else(|p| p.into_inner());
            match installed
                .as_ref()
                .and_then(|i| Some((i.owner.upgrade()?, i.permits)))
            {
                Some((owner, permits)) => (Some(owner), permits),
                None => (None, &LOCAL as *const Permits),
            }
        };
        let first = std::process::id() as usize;
        // SAFETY: `permits` is LOCAL (static) or lies in the mapping `owner` keeps alive.
        let index = unsafe { &*permits }.try_take_from(first, spinners(), now, until_ns)?;
        Some(Permit {
            _owner: owner,
            permits,
            index,
            until: until_ns,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // SAFETY: as in `take`: `_owner` (dropped after this) keeps the mapping alive.
        unsafe { &*self.permits }.release(self.index, self.until);
    }
}

/// How many spinners may hold permits at once: `TROVE_SPINNERS`, else the cores (at least
/// 1, at most [`MAX_PERMITS`]).
pub fn spinners() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("TROVE_SPINNERS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .clamp(1, MAX_PERMITS)
    })
}

/// CLOCK_MONOTONIC in nanoseconds (the same clock in every process).
fn now_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// One wait site's learned spin budget (process-local; a `static` per site).
#[derive(Debug)]
pub struct Site {
    /// The current budget, in nanoseconds.
    budget: AtomicU32,
    /// The most a wait of this site spins, in nanoseconds.
    max: u32,
    /// The least budget, in nanoseconds: for a site whose park costs far more than a spin.
    floor: u32,
    /// Waits started, for the probes.
    waits: AtomicU32,
}

impl Site {
    /// A site that spins at most `max` (starting there).
    pub const fn new(max: Duration) -> Site {
        Site::with_floor(max, Duration::ZERO)
    }

    /// A site that spins at most `max` and, with a permit, at least `floor`: for a wait whose
    /// alternative to spinning costs far more than a futex wake (a round of the daemon's
    /// notices).
    pub const fn with_floor(max: Duration, floor: Duration) -> Site {
        let max = max.as_nanos() as u32;
        Site {
            budget: AtomicU32::new(max),
            max,
            floor: floor.as_nanos() as u32,
            waits: AtomicU32::new(0),
        }
    }

    /// The current budget.
    pub fn budget(&self) -> Duration {
        Duration::from_nanos(self.budget.load(Ordering::Relaxed) as u64)
    }

    /// Learns from a wait that ended after `elapsed`, while spinning (`parked` false) or
    /// after parking.
    pub fn learn(&self, elapsed: Duration, parked: bool) {
        let b = self.budget.load(Ordering::Relaxed);
        let twice = (2 * elapsed.as_nanos()).min(self.max as u128) as u32;
        let new = if !parked {
            (b - b / 64).max(twice)
        } else if twice < self.max {
            // Parked, yet over within half the maximum: a longer spin would have caught it.
            b.max(twice)
        } else {
            b - b.div_ceil(16)
        };
        self.budget.store(new.max(self.floor), Ordering::Relaxed);
    }

    /// How long the next wait may spin (with a permit): the budget, or the maximum for a
    /// probe.
    fn limit(&self) -> u32 {
        if self.waits.fetch_add(1, Ordering::Relaxed) % PROBE_EVERY == PROBE_EVERY - 1 {
            self.max
        } else {
            self.budget.load(Ordering::Relaxed)
        }
    }
}

/// One wait's spinning (see the module docs).
pub struct Spin<'a> {
    site: &'a Site,
    start: u64,
    /// Nanoseconds after `start` it may spin, with a permit.
    limit: u64,
    permit: Option<Permit>,
    backoff: Backoff,
    parked: bool,
    spun: bool,
    /// Where the permits are, if not this process's (tests).
    from: Option<&'static Permits>,
    /// Under loom: the one step of spinning was taken.
    loom_spun: bool,
}

/// How many threads of this process are spinning now (tests and diagnostics).
static SPINNING: AtomicUsize = AtomicUsize::new(0);

impl<'a> Spin<'a> {
    /// Starts a wait at `site` (after its condition was first found false).
    pub fn new(site: &'a Site) -> Spin<'a> {
        Spin {
            site,
            start: now_ns(),
            limit: site.limit() as u64,
            permit: None,
            backoff: Backoff::new(),
            parked: false,
            spun: false,
            from: None,
            loom_spun: false,
        }
    }

    /// One step of spinning: `true` to look again, `false` to park now (and on every later
    /// call: once a wait parks, it does not spin again).
    pub fn spin(&mut self) -> bool {
        self.spun = true;
        if self.parked {
            return false;
        }
        if cfg!(loom) {
            // Models explore the protocols, not timing: one step of spinning (a yield to
            // loom), then park.
            if self.permit.is_none() && !self.loom_spun {
                self.loom_spun = true;
                crate::blocks::sync::Backoff::new().snooze();
                return true;
            }
            return self.stop();
        }
        let now = now_ns();
        let elapsed = now.saturating_sub(self.start);
        let grace = GRACE.as_nanos() as u64;
        if elapsed < grace {
            self.backoff.snooze();
            return true;
        }
        if elapsed >= self.limit.max(grace) {
            return self.stop();
        }
        if self.permit.is_none() {
            let until = self.start + self.limit + LEASE_SLACK.as_nanos() as u64;
            match Permit::take(self.from, until, now) {
                Some(p) => {
                    self.permit = Some(p);
                    SPINNING.fetch_add(1, Ordering::Relaxed);
                }
                None => return self.stop(),
            }
        }
        if self.backoff.is_completed() {
            std::thread::yield_now();
        } else {
            self.backoff.snooze();
        }
        true
    }

    fn stop(&mut self) -> bool {
        self.parked = true;
        self.give_back();
        false
    }

    fn give_back(&mut self) {
        if self.permit.take().is_some() {
            SPINNING.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Whether this wait has stopped spinning (it parks from now on).
    pub fn parked(&self) -> bool {
        self.parked
    }

    /// The wait is over (its condition came true): the site learns from it.
    pub fn done(mut self) {
        self.give_back();
        if !self.spun {
            return;
        }
        let elapsed = Duration::from_nanos(now_ns().saturating_sub(self.start));
        self.site.learn(elapsed, self.parked);
    }
}

impl Drop for Spin<'_> {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// How many threads of this process hold a spin permit now.
pub fn spinning() -> usize {
    SPINNING.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: u64 = 1_000;

    #[test]
    fn permits_are_leases_that_expire() {
        let p = Permits::default();
        assert_eq!(p.try_take(2, 100, 200), Some(0));
        assert_eq!(p.try_take(2, 100, 300), Some(1));
        assert_eq!(p.try_take(2, 150, 300), None, "both held");
        assert_eq!(p.held(150), 2);
        // A third slot exists but the cap is 2.
        assert_eq!(p.try_take(3, 150, 300), Some(2));
        p.release(2, 300);
        // The holder of lease 0 died: past its end, the lease is free again.
        assert_eq!(p.try_take(2, 250, 400), Some(0));
        // The dead holder's late release does not free the new holder's lease.
        p.release(0, 200);
        assert_eq!(p.held(260), 2);
        p.release(0, 400);
        p.release(1, 300);
        assert_eq!(p.held(260), 0);
        // From another first lease, wrapping around.
        assert_eq!(p.try_take_from(1, 2, 300, 500), Some(1));
        assert_eq!(p.try_take_from(1, 2, 300, 500), Some(0));
        assert_eq!(p.try_take_from(5, 2, 300, 500), None);
        assert_eq!(p.try_take(0, 1, 2), None, "no permits at cap 0");
    }

    #[test]
    fn the_budget_follows_the_waits() {
        let s = Site::new(Duration::from_micros(100));
        assert_eq!(s.budget(), Duration::from_micros(100));
        // Waits that parked and lasted long cut it by a sixteenth each.
        s.learn(Duration::from_micros(500), true);
        assert_eq!(s.budget(), Duration::from_nanos(100_000 - 6_250));
        for _ in 0..100 {
            s.learn(Duration::from_micros(500), true);
        }
        assert!(s.budget() < Duration::from_micros(1));
        // A wait that ended while spinning at 20 us: twice that.
        s.learn(Duration::from_micros(20), false);
        assert_eq!(s.budget(), Duration::from_micros(40));
        // Shorter ones decay it slowly towards twice theirs, never below.
        s.learn(Duration::from_micros(1), false);
        assert_eq!(s.budget(), Duration::from_nanos(40 * US - 40 * US / 64));
        for _ in 0..1000 {
            s.learn(Duration::from_micros(1), false);
        }
        assert_eq!(s.budget(), Duration::from_micros(2));
        // A wait that parked but ended soon (30 us): a spin of 60 us would have caught it.
        s.learn(Duration::from_micros(30), true);
        assert_eq!(s.budget(), Duration::from_micros(60));
        // Never above the maximum.
        s.learn(Duration::from_millis(1), false);
        assert_eq!(s.budget(), Duration::from_micros(100));
        // A floor holds against long waits.
        let f = Site::with_floor(Duration::from_micros(200), Duration::from_micros(50));
        for _ in 0..200 {
            f.learn(Duration::from_millis(1), true);
        }
        assert_eq!(f.budget(), Duration::from_micros(50));
    }

    #[test]
    fn probes_spin_to_the_maximum_when_the_budget_collapsed() {
        let s = Site::new(Duration::from_micros(100));
        for _ in 0..400 {
            s.learn(Duration::from_millis(1), true);
        }
        assert_eq!(s.budget(), Duration::ZERO);
        let limits: Vec<u32> = (0..2 * PROBE_EVERY).map(|_| s.limit()).collect();
        assert_eq!(limits.iter().filter(|l| **l == 100_000).count(), 2);
        assert_eq!(
            limits.iter().filter(|l| **l == 0).count() as u32,
            2 * PROBE_EVERY - 2
        );
    }

    #[test]
    fn a_wait_with_no_budget_parks_after_the_grace() {
        let s = Site::new(Duration::from_micros(100));
        for _ in 0..400 {
            s.learn(Duration::from_millis(1), true);
        }
        // Not a probe.
        s.waits.store(0, Ordering::Relaxed);
        let start = std::time::Instant::now();
        let mut spin = Spin::new(&s);
        // It spins through the grace (unless descheduled through all of it), then stops.
        while spin.spin() {
            assert!(start.elapsed() < Duration::from_secs(5), "never stopped");
        }
        assert!(spin.parked());
        assert!(!spin.spin(), "stays parked");
        // (What it learns depends on how long it took: see `the_budget_follows_the_waits`.)
        spin.done();
        assert!(s.budget() <= Duration::from_micros(100));
    }

    #[test]
    fn a_spinner_without_a_permit_parks_and_a_holder_gives_it_back() {
        static PERMITS: Permits = Permits {
            leases: [const { Lease(AtomicU64::new(0)) }; MAX_PERMITS],
        };
        let s = Site::new(Duration::from_secs(1));
        let now = now_ns();
        let far = now + 10_000_000_000;
        // Every permit is held (by someone else, for a while): past its grace, a spinner
        // parks at once, long before its budget.
        let held: Vec<usize> = (0..spinners())
            .map(|_| PERMITS.try_take(spinners(), now, far).unwrap())
            .collect();
        let mut spin = Spin::new(&s);
        spin.from = Some(&PERMITS);
        let start = std::time::Instant::now();
        while spin.spin() {
            assert!(start.elapsed() < Duration::from_secs(5), "never stopped");
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "parked before its budget"
        );
        drop(spin);
        for i in held {
            PERMITS.release(i, far);
        }
        assert_eq!(PERMITS.held(now_ns()), 0);
        // With a permit free it spins past the grace, holding one, and gives it back.
        let mut spin = Spin::new(&s);
        spin.from = Some(&PERMITS);
        let start = std::time::Instant::now();
        while spin.permit.is_none() {
            assert!(spin.spin(), "stopped with a permit free, within its budget");
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "never took a permit"
            );
        }
        assert!(spin.spin(), "spins on, holding it");
        assert_eq!(PERMITS.held(now_ns()), 1);
        spin.done();
        assert_eq!(PERMITS.held(now_ns()), 0);
        assert!(s.budget() >= Duration::from_micros(40));
        // A wait whose condition held at once teaches nothing.
        let before = s.budget();
        Spin::new(&s).done();
        assert_eq!(s.budget(), before);
    }
}
