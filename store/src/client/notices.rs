//! Notices: this process's notification ring (the daemon's `NOTICE_*` pushes, decoded with
//! `protocol::decode_notice`), what it has said (`Notes`: lost ids, rejected puts), and the
//! waits on it (`wait_ready`).

use std::collections::{HashSet, VecDeque};
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use super::{StoreClient, lock};
use crate::blocks::id::ObjectId;
use crate::blocks::ring::{Consumer, RingError};
use crate::blocks::shm::Lookup;
use crate::error::{Result, StoreError};
use crate::protocol::{self, NOTICE_LOST, NOTICE_REJECTED, Request, decode_notice};

/// What the notification ring has told this process.
pub(super) struct Notes {
    /// The ring's consumer end; `None` while a thread is reading it for everybody.
    pub(super) consumer: Option<Consumer>,
    /// Ids the daemon reported lost (never to be sealed, or freed), bounded.
    pub(super) lost: HashSet<ObjectId>,
    pub(super) lost_order: VecDeque<ObjectId>,
    /// Bumped on every batch of notices, so that waiting threads re-check.
    pub(super) epoch: u64,
}

/// How long a wait polls before it sends `Watch` and parks on the notification ring.
pub(super) const SPIN_BEFORE_WATCH: Duration = Duration::from_micros(50);
/// How many lost ids a client remembers.
pub(super) const LOST_MEMORY: usize = 1 << 16;
/// Longest single park while waiting on the ring: the daemon's liveness is checked between.
pub(super) const PARK_SLICE: Duration = Duration::from_millis(100);

/// Where a wait found an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// It will never be sealed: aborted, its creator died, or it was freed.
    Lost,
    Pending,
}

impl StoreClient {
    /// Waits until at least `num_ready` of `ids` are ready or lost, or `deadline` passes.
    /// Returns each id's state at that moment. Waiting is on this process's notification
    /// ring: spin briefly, then park on its futex; the daemon's liveness is checked at least
    /// every 100 ms, so a dead daemon gives `Disconnected`, not a hang.
    pub fn wait_ready(
        &self,
        ids: &[ObjectId],
        num_ready: usize,
        deadline: Option<Instant>,
    ) -> Result<Vec<Readiness>> {
        let num_ready = num_ready.min(ids.len());
        let mut watched = false;
        // A result usually lands within microseconds: look again for a short while (yielding
        // the CPU) before asking the daemon to notify us and parking.
        let spin_until = Instant::now() + SPIN_BEFORE_WATCH;
        let backoff = crossbeam_utils::Backoff::new();
        loop {
            let epoch = lock(&self.inner.notes).epoch;
            let states = self.readiness(ids);
            let done = states.iter().filter(|s| **s != Readiness::Pending).count();
            if done >= num_ready {
                return Ok(states);
            }
            if !watched && deadline.is_none_or(|d| d > spin_until) && Instant::now() < spin_until {
                if backoff.is_completed() {
                    std::thread::yield_now();
                } else {
                    backoff.snooze();
                }
                continue;
            }
            if let Some(why) = self.inner.conn.broken() {
                return Err(StoreError::Disconnected(why));
            }
            if !watched {
                let mut pending: Vec<ObjectId> = ids
                    .iter()
                    .zip(&states)
                    .filter(|(_, s)| **s == Readiness::Pending)
                    .map(|(id, _)| *id)
                    .collect();
                pending.sort();
                pending.dedup();
                for chunk in pending.chunks(protocol::MAX_IDS) {
                    self.inner.conn.send(
                        0,
                        &Request::Watch {
                            ids: chunk.to_vec(),
                        },
                    )?;
                }
                watched = true;
                continue;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| d <= now) {
                return Ok(states);
            }
            let slice = deadline.map_or(PARK_SLICE, |d| (d - now).min(PARK_SLICE));
            self.inner.conn.flush()?;
            self.await_notes(epoch, slice)?;
        }
    }

    pub(super) fn readiness(&self, ids: &[ObjectId]) -> Vec<Readiness> {
        let dir = self.inner.arena.directory();
        let holds = lock(&self.inner.holds);
        let notes = lock(&self.inner.notes);
        ids.iter()
            .map(|id| {
                match holds.map.get(id) {
                    Some(h) if h.rejected => return Readiness::Lost,
                    Some(h) if h.loc.is_some() => return Readiness::Ready,
                    _ => {}
                }
                match dir.lookup(id) {
                    Lookup::Sealed(_) => Readiness::Ready,
                    _ if notes.lost.contains(id) => Readiness::Lost,
                    _ => Readiness::Pending,
                }
            })
            .collect()
    }

    /// Waits up to `slice` for notices newer than `epoch`: one thread reads the ring for
    /// everybody, the others wait on a condition variable.
    pub(super) fn await_notes(&self, epoch: u64, slice: Duration) -> Result<()> {
        let mut notes = lock(&self.inner.notes);
        if notes.epoch != epoch {
            return Ok(());
        }
        let Some(mut consumer) = notes.consumer.take() else {
            let (n, _) = self
                .inner
                .notes_cv
                .wait_timeout(notes, slice)
                .unwrap_or_else(|p| p.into_inner());
            drop(n);
            return self.check_alive();
        };
        drop(notes);
        let mut got: Vec<(u8, ObjectId)> = Vec::new();
        let mut parse = |m: &[u8]| {
            if let Some(n) = decode_notice(m) {
                got.push(n);
            }
        };
        let first = consumer.pop_with(Some(slice), &mut parse);
        let mut flush = false;
        let result = match first {
            Ok(()) => {
                while let Ok(Some(())) = consumer.try_pop_with(&mut parse) {}
                Ok(())
            }
            Err(RingError::Timeout) => Ok(()),
            Err(RingError::Notified) => {
                // The daemon has notices that did not fit: ask for them.
                flush = true;
                Ok(())
            }
            Err(RingError::Closed) => Err(StoreError::Disconnected(
                "the store closed the notification ring".into(),
            )),
            Err(e) => Err(StoreError::Protocol(format!("notification ring: {e}"))),
        };
        let mut notes = lock(&self.inner.notes);
        notes.consumer = Some(consumer);
        self.absorb_notes(notes, got);
        if flush {
            self.inner.conn.send(0, &Request::Flush)?;
            self.inner.conn.flush()?;
        }
        result?;
        self.check_alive()
    }

    /// Records a batch of notices (the `notes` lock is released here) and wakes waiters.
    pub(super) fn absorb_notes(&self, mut notes: MutexGuard<'_, Notes>, got: Vec<(u8, ObjectId)>) {
        notes.epoch += 1;
        let mut rejected = Vec::new();
        for (kind, id) in got {
            if kind == NOTICE_REJECTED {
                rejected.push(id);
            }
            // A rejected put says nothing of the id itself (another process's object may
            // exist under it): only this process's own place for it is void.
            if kind == NOTICE_LOST && notes.lost.insert(id) {
                notes.lost_order.push_back(id);
                if notes.lost_order.len() > LOST_MEMORY
                    && let Some(old) = notes.lost_order.pop_front()
                {
                    notes.lost.remove(&old);
                }
            }
        }
        drop(notes);
        if !rejected.is_empty() {
            let mut holds = lock(&self.inner.holds);
            for id in rejected {
                tracing::warn!("the store rejected this process's put of {id}");
                if let Some(h) = holds.map.get_mut(&id)
                    && h.loc.is_some()
                {
                    h.rejected = true;
                }
            }
        }
        self.inner.notes_cv.notify_all();
    }

    /// Takes what the notification ring holds now, without waiting (nothing if another
    /// thread is reading it).
    pub(super) fn poll_notes(&self) {
        let mut notes = lock(&self.inner.notes);
        let Some(consumer) = notes.consumer.as_mut() else {
            return;
        };
        let mut got: Vec<(u8, ObjectId)> = Vec::new();
        while let Ok(Some(())) = consumer.try_pop_with(|m| {
            if let Some(n) = decode_notice(m) {
                got.push(n);
            }
        }) {}
        if !got.is_empty() {
            self.absorb_notes(notes, got);
        }
    }

    /// `PutRejected` if this process's own small put of `id` was rejected by the daemon.
    pub(super) fn check_rejected(&self, id: &ObjectId) -> Result<()> {
        if lock(&self.inner.holds)
            .map
            .get(id)
            .is_some_and(|h| h.rejected)
        {
            return Err(StoreError::PutRejected {
                id: *id,
                reason: "its id exists, or its place was not in this client's slab".into(),
            });
        }
        Ok(())
    }
}
