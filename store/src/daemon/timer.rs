//! The timer thread: wait deadlines, and every 20 ms whether a cut-off client's process is
//! gone (its pidfd, taken at accept from the SO_PEERCRED pid, or its `/proc/<pid>/maps`).

use std::fs;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::table::{ClientState, Outbox};
use super::{Shared, lock};

/// How often the timer thread looks whether departed clients' processes are gone.
const DEPARTED_POLL: Duration = Duration::from_millis(20);

pub(super) fn timer_loop(sh: &Shared) {
    let mut t = lock(&sh.table);
    loop {
        if sh.stopping.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        let mut out = Outbox::default();
        while let Some(&(when, w)) = t.deadlines.first() {
            if when > now {
                break;
            }
            t.deadlines.pop_first();
            t.finish_waiter(w, &mut out);
        }
        if !out.0.is_empty() {
            drop(t);
            out.flush();
            t = lock(&sh.table);
            continue;
        }
        // Departed clients whose process is gone now: forget them.
        let gone: Vec<u32> = t
            .departed()
            .filter(|(_, c)| sh.process_gone(c))
            .map(|(i, _)| i)
            .collect();
        for i in &gone {
            t.remove_client(&sh.arena, *i, &mut out);
        }
        if !out.0.is_empty() {
            drop(t);
            out.flush();
            t = lock(&sh.table);
            continue;
        }
        let departed = t.departed().next().is_some();
        let next = t
            .deadlines
            .first()
            .map(|&(when, _)| when.saturating_duration_since(now));
        let wait = match (next, departed) {
            (Some(d), true) => Some(d.min(DEPARTED_POLL)),
            (None, true) => Some(DEPARTED_POLL),
            (d, false) => d,
        };
        t = match wait {
            Some(d) => {
                sh.timer_cv
                    .wait_timeout(t, d)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => sh.timer_cv.wait(t).unwrap_or_else(|p| p.into_inner()),
        };
    }
}

impl Shared {
    /// Whether a cut-off client's process can no longer read the arena: it has exited (its
    /// pidfd says so), or it maps the arena memfd nowhere any more. When that cannot be read,
    /// it is assumed to still map it.
    pub(super) fn process_gone(&self, c: &ClientState) -> bool {
        let Some(fd) = &c.pidfd else {
            return true;
        };
        if pidfd_exited(fd) {
            return true;
        }
        let maps = match fs::read_to_string(format!("/proc/{}/maps", c.pid)) {
            Ok(m) => m,
            Err(_) => return false,
        };
        let ino = self.arena_ino.to_string();
        let mapped = maps
            .lines()
            .any(|l| l.split_whitespace().nth(4) == Some(ino.as_str()) && l.contains("memfd:"));
        // Read after the maps: if it exited meanwhile, the pid may name another process.
        !mapped || pidfd_exited(fd)
    }
}

/// Whether the process behind a pidfd has exited (its pidfd polls readable).
fn pidfd_exited(fd: &std::os::fd::OwnedFd) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
}
