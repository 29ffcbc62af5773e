//! What this process holds: per-object counts (`Holds`: views and counted references alike),
//! pins in the directory, releases (`Unhold` frames), and the zero-copy `ObjectView`.
//!
//! A reference may be taken before its object exists: a *pending adoption*
//! (`adopt_pending`, `daemon_seq == Some(PENDING_ADOPTION)`), an object another process will
//! create naming this one in `Owned::pin_for`. Its creator may tell where it is before the
//! daemon has published it (`resolve_pending`); if it will never be created (its creator kept
//! it elsewhere), `abandon_pending` forgets it without a frame: no frame of ours stands for it.
//! Only store objects are known here: whatever a user of this client keeps outside the store
//! is its own to count.

use rustc_hash::FxHashMap;

use super::{StoreClient, lock};
use crate::blocks::id::ObjectId;
use crate::blocks::shm::{FLAG_ERROR, Lookup, SealedEntry};
use crate::error::Result;
use crate::protocol::{Reply, Request};

/// This process's references to one object: views and counted references alike.
pub(super) struct Held {
    pub(super) count: u64,
    /// Where the object is, once this process knows (its own small puts know at once).
    pub(super) loc: Option<(u64, u64)>,
    /// The directory slot, once seen sealed there.
    pub(super) slot: Option<u64>,
    /// The object reports a failure (`FLAG_ERROR`).
    pub(super) error: bool,
    /// The last `Hold`/`PutSmall`/`SealOwned` frame sent for it: until the daemon has handled
    /// it, this process's pin bit is the daemon's to set, so it must also be the daemon's to
    /// clear (an `Unhold` queued behind it) rather than a local unpin that could run first.
    /// `Some(PENDING_ADOPTION)` for a pending adoption (see [`StoreClient::adopt_pending`]).
    pub(super) daemon_seq: Option<u64>,
    /// This process's own small put of it was rejected by the daemon (`NOTICE_REJECTED`):
    /// `loc` is not an object, and a get is `PutRejected`.
    pub(super) rejected: bool,
}

/// The `daemon_seq` of a pending adoption: never synced, since no frame of this process stands
/// for it (the object's creator names this process).
pub(super) const PENDING_ADOPTION: u64 = u64::MAX;

impl Held {
    /// One more view reference, if this is an owned object whose place is known and that
    /// this process's reference keeps (no pin to take); its place.
    fn take_kept(&mut self) -> Option<(u64, u64, bool)> {
        let (offset, size) = self.loc?;
        self.daemon_seq?;
        self.count += 1;
        Some((offset, size, self.error))
    }

    /// One reference, pinned in place by this process (lock-free).
    pub(super) fn pinned(e: &SealedEntry) -> Held {
        Held {
            count: 1,
            loc: Some((e.offset, e.size)),
            slot: Some(e.slot),
            error: e.word & FLAG_ERROR != 0,
            daemon_seq: None,
            rejected: false,
        }
    }

    /// No reference yet, managed by the daemon from the frame with sequence number `seq`.
    pub(super) fn by_daemon(seq: u64) -> Held {
        Held {
            count: 0,
            loc: None,
            slot: None,
            error: false,
            daemon_seq: Some(seq),
            rejected: false,
        }
    }
}

#[derive(Default)]
pub(super) struct Holds {
    pub(super) map: FxHashMap<ObjectId, Held>,
    /// Ids whose last reference went by an `Unhold` frame (value: its sequence number). Until
    /// the daemon has handled it, a new local pin could be undone by it, so new references
    /// to these ids go through the daemon too.
    pub(super) unholding: FxHashMap<ObjectId, u64>,
}

/// Gives memory back once a map that grew large (a burst of objects) is mostly empty: a sparse
/// table costs a cache miss on every lookup of the calls that follow. Amortised O(1).
pub fn shrink_if_sparse<K: std::hash::Hash + Eq, V>(map: &mut FxHashMap<K, V>) {
    if map.capacity() > 1 << 14 && map.len() * 8 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

/// Objects from this size up get their page tables filled by a helper thread the first time
/// this process views them (see [`StoreClient::view`]).
const READ_BEHIND_MIN: u64 = 32 << 20;

/// How many in-flight `Unhold`s a client tracks before it syncs with the daemon to forget them.
pub(super) const UNHOLDING_PRUNE: usize = 4096;
impl StoreClient {
    pub(super) fn view(&self, id: ObjectId, offset: u64, size: u64) -> Option<ObjectView> {
        let ptr = self.inner.arena.ptr(offset, size)?;
        if size >= READ_BEHIND_MIN && self.threads_allowed() {
            // A large object this process has not read before: a helper fills the page
            // tables from its end while the reader faults its way from the start (on a spare
            // core; nothing waits for it). Never in the zygote, which forks.
            if !self.inner.arena.read_populated(offset, size) {
                self.read_behind(offset, size);
            }
        }
        Some(ObjectView {
            client: self.clone(),
            id,
            offset,
            ptr,
            len: size as usize,
            error: false,
        })
    }

    /// Hands `[offset, offset+size)` to this client's read-behind helper, started on first
    /// use: one thread per client (nice 19: work ahead of need yields to the reader), idle
    /// on its queue between objects, gone with the client (it holds only a weak reference).
    fn read_behind(&self, offset: u64, size: u64) {
        let mut queue = lock(&self.inner.populator);
        if let Some(tx) = &*queue
            && tx.send((offset, size)).is_ok()
        {
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel::<(u64, u64)>();
        let client = std::sync::Arc::downgrade(&self.inner);
        let started = std::thread::Builder::new()
            .name("trove-populate".into())
            .stack_size(64 << 10)
            .spawn(move || {
                let _ = rustix::process::setpriority_process(None, 19);
                while let Ok((offset, size)) = rx.recv() {
                    let Some(inner) = client.upgrade() else {
                        return;
                    };
                    let arena = &inner.arena;
                    let _ = arena.populate_read(&arena.claim_unpopulated(offset, size));
                }
            });
        if started.is_ok() && tx.send((offset, size)).is_ok() {
            *queue = Some(tx);
        }
    }

    /// Pins `id` for a view if that can be done now, without the daemon.
    pub(super) fn try_view(&self, id: &ObjectId) -> Option<ObjectView> {
        let (offset, size, error) = self.try_pin_for_view(id)?;
        let mut v = self.view(*id, offset, size);
        if let Some(v) = &mut v {
            v.error = error;
        }
        v.or_else(|| {
            self.release(id);
            None
        })
    }

    /// Takes one view reference on `id` if it can be pinned now; returns where it is:
    /// (offset, size, reports a failure).
    pub(super) fn try_pin_for_view(&self, id: &ObjectId) -> Option<(u64, u64, bool)> {
        if self.inner.overflow {
            return self.try_pin_through_daemon(id);
        }
        let dir = self.inner.arena.directory();
        let me = self.inner.index;
        let mut guard = lock(&self.inner.holds);
        let holds = &mut *guard;
        let arena = |offset, size, error| Some((offset, size, error));
        if let Some(h) = holds.map.get_mut(id) {
            if h.rejected {
                return None;
            }
            if let Some(place) = h.take_kept() {
                return Some(place);
            }
            // Held through the daemon and not seen in place yet.
            let Lookup::Sealed(e) = dir.lookup(id) else {
                return None;
            };
            if !dir.has_pin(e.slot, me) {
                // Pin it ourselves: a pending `Hold` will find the bit set; the release goes
                // through the daemon while that `Hold` is unhandled (see `Held::daemon_seq`).
                let (ok, tell) = dir.try_pin(&e, me);
                if tell {
                    self.tell_release(id);
                }
                if !ok {
                    return None;
                }
            }
            h.count += 1;
            h.loc = Some((e.offset, e.size));
            h.slot = Some(e.slot);
            h.error = e.word & FLAG_ERROR != 0;
            return arena(e.offset, e.size, h.error);
        }
        if holds
            .unholding
            .get(id)
            .is_some_and(|seq| !self.inner.conn.is_synced(*seq))
        {
            return None;
        }
        holds.unholding.remove(id);
        for _ in 0..16 {
            let Lookup::Sealed(e) = dir.lookup(id) else {
                return None;
            };
            let (ok, tell) = dir.try_pin(&e, me);
            if tell {
                self.tell_release(id);
            }
            if ok {
                holds.map.insert(*id, Held::pinned(&e));
                return arena(e.offset, e.size, e.word & FLAG_ERROR != 0);
            }
        }
        None
    }

    /// An overflow client's [`StoreClient::try_pin_for_view`]: it has no pin bit, so its first
    /// reference to a sealed object is a `Pin` round trip (the daemon keeps one pin per object
    /// for it while this process counts references; the last release is an `Unhold`). The
    /// holds lock is kept across the round trip, so the daemon's pin and this process's count
    /// change together: no `Unhold` of another thread comes between them, and every frame of
    /// this client (its `Hold`s, `Unhold`s, puts) reaches the daemon in order.
    fn try_pin_through_daemon(&self, id: &ObjectId) -> Option<(u64, u64, bool)> {
        let mut holds = lock(&self.inner.holds);
        if let Some(h) = holds.map.get_mut(id) {
            if h.rejected {
                return None;
            }
            if let Some(place) = h.take_kept() {
                return Some(place);
            }
        }
        // Not gettable (not sealed yet, or deleted): no round trip (a waiting get asks again
        // once it is sealed).
        if !matches!(self.inner.arena.directory().lookup(id), Lookup::Sealed(_)) {
            return None;
        }
        if let Some(h) = holds.map.get_mut(id)
            && let Some((offset, size)) = h.loc
        {
            // Pinned by an earlier `Pin` of this process, and still gettable.
            h.count += 1;
            return Some((offset, size, h.error));
        }
        let Ok(Reply::Pinned {
            offset,
            size,
            error,
        }) = self.inner.conn.call(&Request::Pin { id: *id })
        else {
            return None;
        };
        // As a bit client's own pin: `daemon_seq` stays `None` for a view (a later get looks
        // at the directory again), or keeps the `Hold` this process sent.
        let h = holds.map.entry(*id).or_insert(Held {
            count: 0,
            loc: None,
            slot: None,
            error,
            daemon_seq: None,
            rejected: false,
        });
        h.count += 1;
        h.loc = Some((offset, size));
        h.error = error;
        Some((offset, size, error))
    }

    /// Our failed pin raced with a deferred delete, or our last pin of a reference-counted
    /// object went: the daemon rechecks the object.
    pub(super) fn tell_release(&self, id: &ObjectId) {
        let _ = self.inner.conn.send(0, &Request::Release { id: *id });
    }

    /// Takes a counted reference to `id` in this process without waiting: pinned in place if
    /// the object is sealed, otherwise through a `Hold` the daemon applies when it is sealed.
    /// Each `hold` is undone by one [`StoreClient::release`]. An object whose references
    /// are all gone (and that no live object contains) is freed.
    pub fn hold(&self, id: &ObjectId) -> Result<()> {
        let dir = self.inner.arena.directory();
        let mut holds = lock(&self.inner.holds);
        if let Some(h) = holds.map.get_mut(id) {
            h.count += 1;
            return Ok(());
        }
        let unholding = holds
            .unholding
            .remove(id)
            .is_some_and(|seq| !self.inner.conn.is_synced(seq));
        // An overflow client has no pin bit: its `Hold` pins it (now if sealed).
        if !unholding
            && !self.inner.overflow
            && let Lookup::Sealed(e) = dir.lookup(id)
        {
            let (ok, tell) = dir.try_pin(&e, self.inner.index);
            if tell {
                self.tell_release(id);
            }
            if ok {
                holds.map.insert(*id, Held::pinned(&e));
                return Ok(());
            }
        }
        let seq = self.inner.conn.send(0, &Request::Hold { id: *id })?;
        holds.map.insert(
            *id,
            Held {
                count: 1,
                ..Held::by_daemon(seq)
            },
        );
        Ok(())
    }

    /// Takes one more reference to `id` if this process holds one already (a count, no frame);
    /// `false`, and nothing done, otherwise.
    pub fn hold_if_held(&self, id: &ObjectId) -> bool {
        match lock(&self.inner.holds).map.get_mut(id) {
            Some(h) => {
                h.count += 1;
                true
            }
            None => false,
        }
    }

    /// Drops one reference taken by [`StoreClient::hold`], a view, an owned put or a pending
    /// adoption. Returns `false` (and does nothing) if this process holds no reference to `id`.
    pub fn release(&self, id: &ObjectId) -> bool {
        let mut holds = lock(&self.inner.holds);
        let Some(h) = holds.map.get_mut(id) else {
            return false;
        };
        h.count -= 1;
        if h.count > 0 {
            return true;
        }
        let h = holds.map.remove(id).expect("present");
        shrink_if_sparse(&mut holds.map);
        if self.inner.overflow {
            // Its pins are the daemon's: an `Unhold`, ordered behind its other frames.
            let _ = self.inner.conn.send(0, &Request::Unhold { id: *id });
            return true;
        }
        let dir = self.inner.arena.directory();
        let me = self.inner.index;
        let daemon_pending = h.daemon_seq.is_some_and(|s| !self.inner.conn.is_synced(s));
        let slot = h.slot.or_else(|| match dir.lookup(id) {
            Lookup::Sealed(e) => Some(e.slot),
            _ => None,
        });
        if !daemon_pending
            && let Some(slot) = slot
            && dir.has_pin(slot, me)
        {
            if dir.unpin(slot, me) {
                self.tell_release(id);
            }
            return true;
        }
        if let Ok(seq) = self.inner.conn.send(0, &Request::Unhold { id: *id }) {
            holds.unholding.insert(*id, seq);
        }
        if holds.unholding.len() >= UNHOLDING_PRUNE {
            // One round trip proves every Unhold so far handled; then forget them all.
            drop(holds);
            if self.sync().is_ok() {
                let conn = &self.inner.conn;
                lock(&self.inner.holds)
                    .unholding
                    .retain(|_, seq| !conn.is_synced(*seq));
            }
        }
        true
    }

    /// Takes a reference to `id` that the daemon sets up when the object is sealed by another
    /// process which names this one in `Owned::pin_for` (a call's result). No frame is sent;
    /// the release always goes through the daemon.
    pub fn adopt_pending(&self, id: &ObjectId) {
        let mut holds = lock(&self.inner.holds);
        // Never "synced": no frame of ours stands for it, the result's creator names us.
        let h = holds
            .map
            .entry(*id)
            .or_insert_with(|| Held::by_daemon(PENDING_ADOPTION));
        h.count += 1;
    }

    /// Tells this process where a pending reference's object is, learnt from its creator
    /// before the daemon has published it (a call's result: the callee wrote it, queued its
    /// `PutSmall`, then recorded the place). Gets then read it in place at once. Only for ids
    /// taken with [`StoreClient::adopt_pending`]; the place is bounds-checked when viewed.
    pub fn resolve_pending(&self, id: &ObjectId, offset: u64, size: u64, error: bool) {
        if let Some(h) = lock(&self.inner.holds).map.get_mut(id)
            && h.loc.is_none()
            && h.daemon_seq == Some(PENDING_ADOPTION)
        {
            h.loc = Some((offset, size));
            h.error = error;
        }
    }

    /// Forgets a pending adoption (taken with [`StoreClient::adopt_pending`]) whose object
    /// will never be created: its creator kept it outside the store. No frame of ours stands
    /// for it and the daemon has set no pin of ours, so nothing is sent. Returns how many
    /// references this process had to it (now its caller's to count), or 0, and nothing done,
    /// if `id` is not a pending adoption (not held, or its place is known already).
    pub fn abandon_pending(&self, id: &ObjectId) -> u64 {
        let mut holds = lock(&self.inner.holds);
        match holds.map.get(id) {
            Some(h) if h.loc.is_none() && h.daemon_seq == Some(PENDING_ADOPTION) => {
                let count = h.count;
                holds.map.remove(id);
                shrink_if_sparse(&mut holds.map);
                count
            }
            _ => 0,
        }
    }

    /// This client's (index, pid) for `Owned::pin_for`.
    pub fn pin_target(&self) -> (u32, u32) {
        (self.inner.index, self.inner.pid)
    }

    /// How many references this process holds on `id` (views included).
    pub fn held_count(&self, id: &ObjectId) -> u64 {
        lock(&self.inner.holds).map.get(id).map_or(0, |h| h.count)
    }
}

/// A pinned, zero-copy view of a sealed object. The object stays in memory while this lives;
/// dropping it releases the pin.
pub struct ObjectView {
    pub(super) client: StoreClient,
    pub(super) id: ObjectId,
    pub(super) offset: u64,
    pub(super) ptr: *const u8,
    pub(super) len: usize,
    pub(super) error: bool,
}

// SAFETY: a view is a read-only slice of immutable shared memory kept alive by the pin.
unsafe impl Send for ObjectView {}
// SAFETY: as above; &ObjectView only hands out shared slices.
unsafe impl Sync for ObjectView {}

impl ObjectView {
    pub fn id(&self) -> ObjectId {
        self.id
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: in bounds (checked when the view was made), sealed (immutable), and pinned
        // (not freed or reused) for as long as self lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    /// The object's bytes as a raw pointer taken from the shared mapping itself (not from a
    /// shared slice), for objects that are shared-memory structures which several processes
    /// write through atomics (actor mailboxes): writing through [`ObjectView::as_slice`]'s
    /// pointer would be undefined behaviour. Every view is of the arena: always `Some`.
    pub fn shared_ptr(&self) -> Option<*mut u8> {
        Some(self.ptr as *mut u8)
    }
    /// The object's offset in the arena.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// The object reports a failure (published with `Owned::error`) instead of a value.
    pub fn is_error(&self) -> bool {
        self.error
    }
}

impl std::ops::Deref for ObjectView {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Clone for ObjectView {
    fn clone(&self) -> Self {
        if let Some(h) = lock(&self.client.inner.holds).map.get_mut(&self.id) {
            h.count += 1;
        }
        ObjectView {
            client: self.client.clone(),
            id: self.id,
            offset: self.offset,
            ptr: self.ptr,
            len: self.len,
            error: self.error,
        }
    }
}

impl Drop for ObjectView {
    fn drop(&mut self) {
        self.client.release(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::daemon::{Daemon, DaemonConfig};
    use crate::protocol::Owned;

    use super::*;

    #[test]
    fn a_pending_adoption_is_abandoned_without_a_frame_and_only_while_pending() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("store").join("sock");
        let daemon = Daemon::bind(&DaemonConfig::new(socket.clone(), 16 << 20)).unwrap();
        let stop = daemon.shutdown_handle();
        let thread = std::thread::spawn(move || daemon.run().unwrap());
        let (a, b) = (
            StoreClient::connect(&socket).unwrap(),
            StoreClient::connect(&socket).unwrap(),
        );
        let base = a.stats().unwrap();
        let sent = a.frames_sent();

        // Two references to an object nobody will create: forgotten, nothing sent.
        let never = ObjectId::random();
        a.adopt_pending(&never);
        assert!(a.hold_if_held(&never));
        assert_eq!(a.held_count(&never), 2);
        assert_eq!(a.abandon_pending(&never), 2);
        assert_eq!(a.held_count(&never), 0);
        assert_eq!(a.abandon_pending(&never), 0);
        assert!(!a.hold_if_held(&never));
        assert!(!a.release(&never));
        assert_eq!(
            a.frames_sent(),
            sent,
            "no frame stands for a pending adoption"
        );

        // One whose place its creator told: an object now, not abandoned; released as one.
        let made = ObjectId::random();
        a.adopt_pending(&made);
        let mut w = b.alloc_owned(made, 8).unwrap();
        w.as_mut_slice().copy_from_slice(b"objected");
        let place = w.offset();
        w.publish_with(Owned {
            pin_for: Some(a.pin_target()),
            ..Owned::default()
        })
        .unwrap();
        b.flush().unwrap();
        a.resolve_pending(&made, place, 8, false);
        assert_eq!(a.abandon_pending(&made), 0);
        assert_eq!(
            &a.get(made, Duration::from_secs(10)).unwrap()[..],
            b"objected"
        );
        assert!(a.release(&made));
        assert_eq!(a.held_count(&made), 0);
        a.sync().unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while a.stats().unwrap().objects != base.objects {
            assert!(
                std::time::Instant::now() < until,
                "the object was not freed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        drop((a, b));
        stop.shutdown();
        thread.join().unwrap();
    }
}
