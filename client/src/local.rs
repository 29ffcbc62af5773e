//! Local values: a call's small result that came back inline in its completion record (see
//! [`trove_executor::record`]) and that the store has never seen, kept in this process's memory
//! under the result's id, with the count of this process's references to it.
//!
//! A call's result is counted here from the moment its call is queued, as a *pending* entry
//! (no value yet: [`Locals::adopt_pending`]). When the caller takes the value out of the
//! record ([`Locals::take`]) the entry gets it, and references are counted here from then on:
//! a clone or a drop takes this table's lock only, and the last drop tells nobody. If the
//! result goes to the store instead (stored by the callee, asked for there, evicted, or
//! reported failed), the count first moves to the store client as a pending adoption
//! ([`Locals::unpend`], `StoreClient::adopt_pending`); so does the last reference to a pending
//! entry, whose release there tells a call in flight that its result is not wanted. If a ref
//! to a value escapes into an object or a call, the value is put in the store under the same
//! id first ([`Locals::promote`]) and the count moves to the store client.
//!
//! Every reference of this process to an id is counted in exactly one of the two places. A
//! count moves at most three times per id (out of a pending entry, back in with its value,
//! out when promoted), under this table's lock, and a thread that misses the id in one place
//! after the move into the other sees it there (the store client counts before this table
//! forgets, and this table's per-bucket counts are raised before the store client forgets the
//! id). So `Shared::hold` and `Shared::release` (in `context.rs`) look here, in the store
//! client, here, and in the store client again: a reference is never lost, nor counted in the
//! wrong place.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use trove_executor::record::INLINE_MAX;
use trove_store::protocol::Owned;
use trove_store::{ObjectId, StoreClient};

use crate::error::Result;
use crate::result_map::ResultMap;

/// A value kept in process memory: a call's inline result (at most [`INLINE_MAX`] bytes),
/// 16-byte aligned (what rkyv archives need), in one allocation with the `Arc`'s counts, sized
/// to the value (one of [`CLASSES`]): a number's result takes one cache line, not a record's
/// worth, so ten thousand of them fit in a core's cache.
pub(crate) struct Local<B: ?Sized = [Block]> {
    len: u16,
    error: bool,
    blocks: B,
}

/// The sizes, in 16-byte blocks, a value's allocation comes in.
const CLASSES: [usize; 4] = [1, 2, 4, 12];
const _: () = assert!(CLASSES[CLASSES.len() - 1] * 16 >= INLINE_MAX && INLINE_MAX <= 1 << 15);

#[repr(C, align(16))]
#[derive(Clone, Copy, bytemuck::Zeroable, bytemuck::Pod)]
pub(crate) struct Block([u8; 16]);

std::thread_local! {
    /// Values' allocations this thread let go of, for its next takes, by class: a call's
    /// result taken and dropped costs no allocation.
    static SPARE: std::cell::RefCell<[Vec<Arc<Local>>; CLASSES.len()]> =
        const { std::cell::RefCell::new([const { Vec::new() }; CLASSES.len()]) };
}

/// At most this many bytes of spare allocations per thread and class: enough for the values
/// of ten thousand calls in flight (a burst of calls, then a `get_all`), whose takes then
/// allocate nothing (measured: async calls 10% faster than with 64 spares). A thread keeps
/// them until it exits; at most 2 MiB, and only after it held that many values at once.
const SPARE_BYTES: usize = 512 << 10;

/// How many spare allocations of `class` a thread keeps: an allocation is the `Arc`'s two
/// counts, the length and flag (padded to a block), and the blocks.
const fn spare_max(class: usize) -> usize {
    SPARE_BYTES / (16 + 16 + 16 * CLASSES[class])
}

/// The class of a value of `len` bytes.
fn class_of(len: usize) -> usize {
    CLASSES
        .iter()
        .position(|&n| n * 16 >= len)
        .expect("a local value is at most a record's inline bytes")
}

impl Local {
    /// A shared copy of `bytes` (at most [`INLINE_MAX`] of them); `error`: they are a failure
    /// report, not a value. In a spare allocation of its class if this thread has one.
    pub(crate) fn shared(bytes: &[u8], error: bool) -> Arc<Local> {
        let class = class_of(bytes.len());
        let spare = SPARE
            .try_with(|s| s.borrow_mut()[class].pop())
            .ok()
            .flatten();
        if let Some(mut a) = spare
            && let Some(l) = Arc::get_mut(&mut a)
        {
            bytemuck::cast_slice_mut::<Block, u8>(&mut l.blocks)[..bytes.len()]
                .copy_from_slice(bytes);
            l.len = bytes.len() as u16;
            l.error = error;
            return a;
        }
        match class {
            0 => Self::sized::<{ CLASSES[0] }>(bytes, error),
            1 => Self::sized::<{ CLASSES[1] }>(bytes, error),
            2 => Self::sized::<{ CLASSES[2] }>(bytes, error),
            _ => Self::sized::<{ CLASSES[3] }>(bytes, error),
        }
    }

    /// A new allocation of `N` blocks holding `bytes`.
    fn sized<const N: usize>(bytes: &[u8], error: bool) -> Arc<Local> {
        let mut blocks = [Block([0; 16]); N];
        bytemuck::cast_slice_mut::<Block, u8>(&mut blocks)[..bytes.len()].copy_from_slice(bytes);
        Arc::new(Local {
            len: bytes.len() as u16,
            error,
            blocks,
        })
    }

    /// Lets go of `value`: kept as a spare if nothing else refers to it.
    fn recycle(value: Arc<Local>) {
        if Arc::strong_count(&value) == 1 {
            let class = class_of(value.blocks.len() * 16);
            let _ = SPARE.try_with(|s| {
                let mut s = s.borrow_mut();
                if s[class].len() < spare_max(class) {
                    s[class].push(value);
                }
            });
        }
    }

    /// The value's bytes, 16-byte aligned.
    pub(crate) fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.blocks)[..usize::from(self.len)]
    }

    /// The value is a failure report.
    pub(crate) fn is_error(&self) -> bool {
        self.error
    }
}

/// Where [`Locals::copy_many`] copied a value.
pub(crate) struct Copied {
    /// The first block in the buffer.
    start: usize,
    len: usize,
    error: bool,
}

impl Copied {
    /// The value's bytes in `buf`, 16-byte aligned.
    pub(crate) fn bytes<'b>(&self, buf: &'b [Block]) -> &'b [u8] {
        &bytemuck::cast_slice(&buf[self.start..])[..self.len]
    }

    /// The value is a failure report.
    pub(crate) fn is_error(&self) -> bool {
        self.error
    }
}

/// One local value and this process's references to it.
struct Entry {
    count: u64,
    /// `None` while the call is in flight (a *pending* entry, see [`Locals::adopt_pending`]).
    value: Option<Arc<Local>>,
}

/// This process's local values, by id.
pub(crate) struct Locals {
    /// How many values the table holds, by a byte of their id ([`bucket`]): the hot paths
    /// skip the lock when the id's bucket is empty, so a process whose local values are few
    /// seldom pays it for store objects. Raised before a count leaves the store client (in
    /// [`Locals::take`]), so a thread that then misses the id in the store client (whose lock
    /// orders the two) sees it non-zero. Written only under `map`'s lock ([`raise`],
    /// [`lower`]).
    held: [AtomicUsize; BUCKETS],
    /// By result id: found by index, in the order the calls were made (see [`ResultMap`]).
    map: Mutex<ResultMap<Entry>>,
}

const BUCKETS: usize = 64;

/// The bucket of `id`: the low byte of the counter in a call's result id (see
/// [`ResultIds`](crate::result_map::ResultIds); `ObjectId::random`'s ids have the same layout),
/// so a process's recent ids spread over all of them. Any byte would be correct; a poor one
/// only makes the lock-free miss rarer.
#[inline]
fn bucket(id: &ObjectId) -> usize {
    usize::from(id.0[12]) % BUCKETS
}

impl Locals {
    /// No values yet; calls' results are named with `prefix` (see
    /// [`ResultIds`](crate::result_map::ResultIds)).
    pub(crate) fn new(prefix: [u8; 12]) -> Locals {
        Locals {
            held: std::array::from_fn(|_| AtomicUsize::new(0)),
            map: Mutex::new(ResultMap::new(prefix)),
        }
    }
}

/// Counts one more value in `id`'s bucket. Only under the table's lock (which orders the
/// writers): a load and a store, no read-modify-write. The hot paths read the buckets
/// without the lock.
#[inline]
fn raise(held: &[AtomicUsize; BUCKETS], id: &ObjectId) {
    let n = &held[bucket(id)];
    n.store(n.load(Ordering::Relaxed) + 1, Ordering::Release);
}

/// Counts one value less in `id`'s bucket; as [`raise`], only under the table's lock.
#[inline]
fn lower(held: &[AtomicUsize; BUCKETS], id: &ObjectId) {
    let n = &held[bucket(id)];
    n.store(n.load(Ordering::Relaxed) - 1, Ordering::Release);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Locals {
    /// Surely not a local value: its bucket is empty (no lock taken).
    #[inline]
    fn surely_not(&self, id: &ObjectId) -> bool {
        self.held[bucket(id)].load(Ordering::Acquire) == 0
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.held.iter().all(|n| n.load(Ordering::Acquire) == 0)
    }

    /// Counts the first reference to `id`, the result of a call this process just sent, here
    /// as a *pending* entry: no value yet. A call whose result comes back inline (most) never
    /// touches the store client's table; one whose result goes to the store has its count
    /// moved there first ([`Locals::unpend`]).
    pub(crate) fn adopt_pending(&self, id: &ObjectId) {
        let mut map = lock(&self.map);
        if let Some(e) = map.get_mut(id) {
            e.count += 1;
            return;
        }
        raise(&self.held, id);
        map.insert(
            *id,
            Entry {
                count: 1,
                value: None,
            },
        );
    }

    /// Moves the references to `id`, if it is a pending entry, to the store client as a
    /// pending adoption (its result is going to the store: its place will be told there, or
    /// the daemon will pin it for this process). A no-op otherwise. The store client counts
    /// them before this table forgets them, under this table's lock (see the module docs).
    pub(crate) fn unpend(&self, client: &StoreClient, id: &ObjectId) {
        if self.surely_not(id) {
            return;
        }
        let mut map = lock(&self.map);
        let Some(count) = map.get(id).filter(|e| e.value.is_none()).map(|e| e.count) else {
            return;
        };
        map.remove(id);
        Self::hand_to_client(&self.held, client, id, count);
    }

    /// Gives the `count` references of the pending entry `id`, just taken out of the table
    /// (its lock held), to the store client, then counts the entry gone from its bucket: a thread
    /// that looks here (under the lock, or at the buckets after it) and misses finds them
    /// there.
    fn hand_to_client(
        held: &[AtomicUsize; BUCKETS],
        client: &StoreClient,
        id: &ObjectId,
        count: u64,
    ) {
        for _ in 0..count {
            client.adopt_pending(id);
        }
        lower(held, id);
    }

    /// Keeps `bytes` as the value of the call result `id`: its pending entry here gets them,
    /// or, if its references were moved to the store client (see [`Locals::unpend`]), they
    /// move back here. `false` (and nothing kept) if no reference to `id` is left, or its
    /// value was taken already.
    pub(crate) fn take(
        &self,
        client: &StoreClient,
        id: &ObjectId,
        bytes: &[u8],
        error: bool,
    ) -> bool {
        self.take_value(client, id, bytes, error, false).is_some()
    }

    /// [`Locals::take`], returning the value kept (for a view of it: a get that took it).
    pub(crate) fn take_shared(
        &self,
        client: &StoreClient,
        id: &ObjectId,
        bytes: &[u8],
        error: bool,
    ) -> Option<Arc<Local>> {
        self.take_value(client, id, bytes, error, true).flatten()
    }

    /// [`Locals::take`]: `None` if the value was not kept, else, with `share`, a second `Arc`
    /// of it (without, none: no count is taken and given back for nothing).
    fn take_value(
        &self,
        client: &StoreClient,
        id: &ObjectId,
        bytes: &[u8],
        error: bool,
        share: bool,
    ) -> Option<Option<Arc<Local>>> {
        let value = Local::shared(bytes, error);
        let shared = share.then(|| value.clone());
        let mut map = lock(&self.map);
        if let Some(e) = map.get_mut(id) {
            if e.value.is_some() {
                return None;
            }
            e.value = Some(value);
            return Some(shared);
        }
        raise(&self.held, id);
        let count = client.abandon_pending(id);
        if count == 0 {
            lower(&self.held, id);
            return None;
        }
        map.insert(
            *id,
            Entry {
                count,
                value: Some(value),
            },
        );
        Some(shared)
    }

    /// Takes one more reference to `id` if it is a local value; `false` otherwise.
    #[inline]
    pub(crate) fn hold(&self, id: &ObjectId) -> bool {
        if self.surely_not(id) {
            return false;
        }
        match lock(&self.map).get_mut(id) {
            Some(e) => {
                e.count += 1;
                true
            }
            None => false,
        }
    }

    /// [`Locals::release`] of a reference that needs nothing but this table: to a value, or
    /// not the last one to a pending entry. `false` (nothing done) otherwise.
    #[inline]
    pub(crate) fn release_local(&self, id: &ObjectId) -> bool {
        self.release_with(None, id)
    }

    /// Drops one reference to `id` if it is a local value (the last one forgets the value);
    /// `false` otherwise. The last reference to a pending entry is moved to the store client
    /// instead (see [`Locals::unpend`]) and `false` returned: its release there is what tells
    /// a call in flight that its result is no longer wanted.
    #[inline]
    pub(crate) fn release(&self, client: &StoreClient, id: &ObjectId) -> bool {
        self.release_with(Some(client), id)
    }

    /// [`Locals::release`]; without a store client, the last reference to a pending entry is
    /// left alone.
    #[inline]
    fn release_with(&self, client: Option<&StoreClient>, id: &ObjectId) -> bool {
        if self.surely_not(id) {
            return false;
        }
        let mut map = lock(&self.map);
        // Counted down in place (an entry taken out and put back could land aside: see
        // `ResultMap::insert`), taken out on the last drop.
        let Some(e) = map.get_mut(id) else {
            return false;
        };
        if e.value.is_none() && e.count == 1 {
            // The last reference to a pending entry: moved to the store client (as
            // `unpend` does, under this lock), or left here for a caller that has none.
            if let Some(client) = client {
                map.remove(id);
                Self::hand_to_client(&self.held, client, id, 1);
            }
            return false;
        }
        if e.count > 1 {
            e.count -= 1;
            return true;
        }
        let e = map.remove(id).expect("found just now");
        lower(&self.held, id);
        drop(map);
        if let Some(value) = e.value {
            Local::recycle(value);
        }
        true
    }

    /// The value of `id`, if it is a local value, for a view of it (which counts as no
    /// reference: the `Arc` keeps the bytes).
    #[inline]
    pub(crate) fn view(&self, id: &ObjectId) -> Option<Arc<Local>> {
        if self.surely_not(id) {
            return None;
        }
        lock(&self.map).get(id).and_then(|e| e.value.clone())
    }

    /// Copies of the local values among `ids`, in order, under one lock and with no count
    /// taken (a `get_all` of many small results deserialises them from the copies): each
    /// value's bytes are appended to `buf`, from a block's start, and `out` gets where they
    /// are; `None` for an id that is not a local value.
    pub(crate) fn copy_many(
        &self,
        ids: impl Iterator<Item = ObjectId>,
        buf: &mut Vec<Block>,
        out: &mut Vec<Option<Copied>>,
    ) {
        let mut map = None;
        for id in ids {
            if self.surely_not(&id) {
                out.push(None);
                continue;
            }
            let map = map.get_or_insert_with(|| lock(&self.map));
            out.push(map.get(&id).and_then(|e| e.value.as_deref()).map(|v| {
                let start = buf.len();
                let len = usize::from(v.len);
                buf.extend_from_slice(&v.blocks[..len.div_ceil(16)]);
                Copied {
                    start,
                    len,
                    error: v.error,
                }
            }));
        }
    }

    /// Whether `id` is a local value.
    pub(crate) fn contains(&self, id: &ObjectId) -> bool {
        !self.surely_not(id) && lock(&self.map).get(id).is_some_and(|e| e.value.is_some())
    }

    /// Which of `ids` are local values.
    pub(crate) fn which(&self, ids: &[ObjectId]) -> Vec<bool> {
        if ids.iter().all(|id| self.surely_not(id)) {
            return vec![false; ids.len()];
        }
        let map = lock(&self.map);
        ids.iter()
            .map(|id| map.get(id).is_some_and(|e| e.value.is_some()))
            .collect()
    }

    /// Puts the local value `id` in the store under its id, so that other processes can read
    /// it (its ref is escaping into an object or a call); this process's references move to
    /// the store client, as references to the stored object. A no-op for other ids.
    ///
    /// The object is written under the table's lock, so exactly one thread promotes a value
    /// and nobody counts a reference to it meanwhile. A value is at most a record's inline
    /// bytes, so this is a bump allocation in this client's slab and a queued frame (a round
    /// trip only when the slab is full).
    pub(crate) fn promote(&self, client: &StoreClient, id: &ObjectId) -> Result<()> {
        if self.surely_not(id) {
            return Ok(());
        }
        let mut map = lock(&self.map);
        let Some(value) = map.get(id).and_then(|e| e.value.clone()) else {
            return Ok(());
        };
        let mut w = client.alloc_owned(*id, u64::from(value.len))?;
        w.as_mut_slice().copy_from_slice(value.bytes());
        w.publish_with(Owned {
            error: value.error,
            keep: true,
            ..Owned::default()
        })?;
        // `publish_with` counted one reference (`keep`); the others follow it.
        let e = map.remove(id).expect("present");
        lower(&self.held, id);
        for _ in 1..e.count {
            let held = client.hold_if_held(id);
            debug_assert!(held, "the published object is held");
        }
        drop(map);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use trove_store::Readiness;
    use trove_store::{Daemon, DaemonConfig, ShutdownHandle, Stats};

    use super::*;
    use crate::context::Shared;

    /// A store daemon on a thread of this process, stopped on drop.
    struct TestDaemon {
        _dir: tempfile::TempDir,
        socket: std::path::PathBuf,
        stop: ShutdownHandle,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl TestDaemon {
        fn start() -> TestDaemon {
            let dir = tempfile::tempdir().unwrap();
            // A directory of its own, created private (0700) by the daemon.
            let socket = dir.path().join("store").join("sock");
            let daemon = Daemon::bind(&DaemonConfig::new(socket.clone(), 64 << 20)).unwrap();
            let stop = daemon.shutdown_handle();
            let thread = std::thread::spawn(move || daemon.run().unwrap());
            TestDaemon {
                _dir: dir,
                socket,
                stop,
                thread: Some(thread),
            }
        }
        fn connect(&self) -> StoreClient {
            StoreClient::connect(Path::new(&self.socket)).unwrap()
        }
    }

    impl Drop for TestDaemon {
        fn drop(&mut self) {
            self.stop.shutdown();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// Waits (bounded) until the store's objects and used bytes are `base`'s again.
    fn back_to(c: &StoreClient, base: &Stats) {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            c.flush().unwrap();
            let s = c.stats().unwrap();
            if (s.objects, s.used) == (base.objects, base.used) {
                return;
            }
            assert!(
                Instant::now() < until,
                "store at {} objects / {} bytes, not {} / {}",
                s.objects,
                s.used,
                base.objects,
                base.used
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn shared(c: &StoreClient) -> Shared {
        Shared::new(c.clone(), None, ObjectId::random(), "test".into())
    }

    /// Every length up to a record's inline bytes, in a new allocation of its class and in a
    /// spare one (of a longer value before).
    #[test]
    fn values_are_aligned_and_kept_whole() {
        for round in 0..2 {
            for len in 0..=INLINE_MAX {
                let bytes: Vec<u8> = (0..len).map(|i| (i + round) as u8).collect();
                let l = Local::shared(&bytes, len % 2 == 0);
                assert_eq!(l.bytes(), &bytes[..]);
                assert!((l.bytes().as_ptr() as usize).is_multiple_of(16));
                assert_eq!(l.is_error(), len % 2 == 0);
                assert!(l.blocks.len() * 16 >= len && l.blocks.len() <= CLASSES[3]);
                Local::recycle(l);
            }
        }
    }

    #[test]
    fn a_local_value_is_counted_here_then_promoted_readable_elsewhere_and_freed() {
        let d = TestDaemon::start();
        let (a, b) = (d.connect(), d.connect());
        let base = a.stats().unwrap();
        let sh = shared(&a);
        let id = ObjectId::random();
        let bytes = b"a call's small result, 16-byte aligned here";
        // Two references taken while the call ran; the value comes back inline.
        a.adopt_pending(&id);
        sh.hold(&id);
        assert_eq!(a.held_count(&id), 2);
        assert!(sh.locals.take(&a, &id, bytes, false));
        assert_eq!(a.held_count(&id), 0, "the store client forgot it");
        assert!(!sh.locals.take(&a, &id, bytes, false), "taken once only");
        sh.hold(&id);
        // A view holds the bytes, and no reference.
        let v = sh.locals.view(&id).expect("local");
        assert_eq!(v.bytes(), bytes);
        sh.release(&id);
        assert_eq!(sh.wait_ready(&[id], 1, None).unwrap(), [Readiness::Ready]);
        // Never in the store.
        a.flush().unwrap();
        let s = a.stats().unwrap();
        assert_eq!((s.objects, s.used), (base.objects, base.used));
        // Its ref escapes: the value goes to the store under its id, with both references.
        sh.locals.promote(&a, &id).unwrap();
        assert_eq!(sh.locals.which(&[id]), [false]);
        assert_eq!(a.held_count(&id), 2);
        a.flush().unwrap();
        let other = b.get(id, Duration::from_secs(10)).unwrap();
        assert_eq!(&other[..], bytes);
        assert!((other.as_ptr() as usize).is_multiple_of(16));
        drop(other);
        // The local copy read before still reads right.
        assert_eq!(v.bytes(), bytes);
        sh.release(&id);
        sh.release(&id);
        assert_eq!(a.held_count(&id), 0);
        // Freed with both processes still connected.
        back_to(&a, &base);
        drop(b);
    }

    #[test]
    fn a_local_values_last_release_tells_the_store_nothing() {
        let d = TestDaemon::start();
        let a = d.connect();
        let base = a.stats().unwrap();
        let sh = shared(&a);
        let ids: Vec<ObjectId> = (0..100).map(|_| sh.result_ids.fresh()).collect();
        for id in &ids {
            a.adopt_pending(id);
            assert!(sh.locals.take(&a, id, &[7; 100], true));
        }
        assert!(sh.locals.view(&ids[0]).unwrap().is_error());
        for id in &ids {
            sh.release(id);
            assert_eq!(sh.locals.which(&[*id]), [false]);
        }
        assert!(sh.locals.is_empty());
        assert_eq!(sh.locals.which(&ids), vec![false; ids.len()]);
        back_to(&a, &base);
    }

    /// A call's result is counted here from the start, as a pending entry: its clones and
    /// drops, and the value taken, never touch the store client; the store never hears of it.
    /// Its references move to the store client when its result goes to the store (`unpend`),
    /// and back with the value if it came inline after all.
    #[test]
    fn a_pending_result_is_counted_here_and_moves_to_the_store_client_when_stored() {
        let d = TestDaemon::start();
        let a = d.connect();
        let base = a.stats().unwrap();
        let sh = shared(&a);
        // Inline: counted here throughout.
        let id = sh.result_ids.fresh();
        sh.locals.adopt_pending(&id);
        sh.hold(&id);
        assert_eq!(a.held_count(&id), 0);
        assert!(sh.locals.view(&id).is_none(), "no value yet");
        assert_eq!(sh.locals.which(&[id]), [false]);
        assert!(!sh.locals.contains(&id));
        sh.release(&id);
        assert!(sh.locals.take(&a, &id, b"inline", false));
        assert!(!sh.locals.take(&a, &id, b"again", false), "taken once only");
        assert_eq!(sh.locals.view(&id).unwrap().bytes(), b"inline");
        assert_eq!(a.held_count(&id), 0);
        sh.release(&id);
        assert!(sh.locals.is_empty());
        // Going to the store: the references move to the store client, two of them.
        let id = sh.result_ids.fresh();
        sh.locals.adopt_pending(&id);
        sh.hold(&id);
        sh.locals.unpend(&a, &id);
        assert_eq!(a.held_count(&id), 2);
        assert!(sh.locals.is_empty());
        // ... and back with the value if it came inline after all.
        assert!(sh.locals.take(&a, &id, b"late", true));
        assert_eq!(a.held_count(&id), 0);
        sh.release(&id);
        assert!(sh.locals.view(&id).unwrap().is_error());
        sh.release(&id);
        assert!(sh.locals.is_empty());
        // The last release of a pending entry goes through the store client (which tells the
        // daemon the result is not wanted): the table-only release (a thread's copy of the
        // context) leaves it alone, and earlier ones it does itself.
        let id = ObjectId::random();
        sh.locals.adopt_pending(&id);
        sh.locals.adopt_pending(&id);
        assert!(sh.locals.release_local(&id), "not the last reference");
        assert!(
            !sh.locals.release_local(&id),
            "the last one needs the store client"
        );
        assert_eq!(a.held_count(&id), 0);
        sh.release(&id);
        assert!(sh.locals.is_empty());
        assert_eq!(a.held_count(&id), 0);
        back_to(&a, &base);
    }

    /// Clones of the oldest value come and go while it stays: it stays in the table's deque,
    /// found by index, not moved aside by a drop that is not its last.
    #[test]
    fn dropping_a_clone_of_the_oldest_value_keeps_it_in_place() {
        let d = TestDaemon::start();
        let a = d.connect();
        let base = a.stats().unwrap();
        let sh = shared(&a);
        let ids: Vec<ObjectId> = (0..3).map(|_| sh.result_ids.fresh()).collect();
        for id in &ids {
            sh.locals.adopt_pending(id);
            assert!(sh.locals.take(&a, id, b"v", false));
        }
        for _ in 0..3 {
            sh.hold(&ids[0]);
            sh.release(&ids[0]);
        }
        // A pending entry's clone too.
        let pending = sh.result_ids.fresh();
        sh.locals.adopt_pending(&pending);
        sh.hold(&pending);
        sh.release(&pending);
        assert_eq!(sh.locals.map.lock().unwrap().aside_len(), 0);
        for id in ids.iter().chain([&pending]) {
            sh.release(id);
        }
        assert!(sh.locals.is_empty());
        // The pending entry's last release went through the store client: the store is back
        // at its baseline, the client still connected.
        back_to(&a, &base);
    }

    /// `copy_many` copies the values among its ids, in order, each aligned in the buffer and
    /// with its flag, and takes no reference: the last release still forgets each value.
    #[test]
    fn values_are_copied_many_at_a_time_in_order_and_aligned() {
        let d = TestDaemon::start();
        let a = d.connect();
        let base = a.stats().unwrap();
        let sh = shared(&a);
        let lens = [8usize, 0, 17, 192, 33];
        let ids: Vec<ObjectId> = lens.iter().map(|_| sh.result_ids.fresh()).collect();
        for (id, len) in ids.iter().zip(lens) {
            sh.locals.adopt_pending(id);
            assert!(sh.locals.take(&a, id, &vec![len as u8; len], len == 17));
        }
        let pending = sh.result_ids.fresh();
        sh.locals.adopt_pending(&pending);
        let asked: Vec<ObjectId> = [ids[0], pending, ObjectId::random()]
            .into_iter()
            .chain(ids[1..].iter().copied())
            .collect();
        let (mut buf, mut out) = (Vec::new(), Vec::new());
        sh.locals
            .copy_many(asked.iter().copied(), &mut buf, &mut out);
        assert_eq!(out.len(), asked.len());
        assert!(
            out[1].is_none() && out[2].is_none(),
            "pending, or not local"
        );
        let copied: Vec<&Copied> = out.iter().flatten().collect();
        for (c, len) in copied.iter().zip(lens) {
            let bytes = c.bytes(&buf);
            assert_eq!(bytes, &vec![len as u8; len][..]);
            assert!((bytes.as_ptr() as usize).is_multiple_of(16));
            assert_eq!(c.is_error(), len == 17);
        }
        for id in ids.iter().chain([&pending]) {
            sh.release(id);
        }
        assert!(sh.locals.is_empty());
        back_to(&a, &base);
    }

    /// A view outlives the last reference to its value: it still reads the bytes, the value is
    /// gone from the table, and the store never heard of it. Its allocation is then reused by
    /// this thread's next take, once the view is gone too (never while it lives).
    #[test]
    fn a_view_outlives_its_values_last_reference_and_keeps_its_bytes() {
        let d = TestDaemon::start();
        let a = d.connect();
        let base = a.stats().unwrap();
        let sh = shared(&a);
        let (id, next) = (sh.result_ids.fresh(), ObjectId::random());
        a.adopt_pending(&id);
        assert!(sh.locals.take(&a, &id, b"first value", false));
        let v = sh.locals.view(&id).expect("local");
        sh.release(&id);
        assert_eq!(sh.locals.which(&[id]), [false]);
        assert!(sh.locals.is_empty());
        // Taken while the view lives: a new allocation, the view's bytes untouched.
        a.adopt_pending(&next);
        assert!(sh.locals.take(&a, &next, b"second value", true));
        assert_eq!(v.bytes(), b"first value");
        assert!(!v.is_error());
        let w = sh.locals.view(&next).expect("local");
        assert!(!Arc::ptr_eq(&v, &w));
        assert_eq!((w.bytes(), w.is_error()), (&b"second value"[..], true));
        drop(v);
        sh.release(&next);
        assert!(sh.locals.is_empty());
        a.flush().unwrap();
        let s = a.stats().unwrap();
        assert_eq!((s.objects, s.used), (base.objects, base.used));
    }

    /// Threads clone and drop call results' refs while each moves from the store client (or
    /// from a pending entry here, through the store client for some) into the local values
    /// and, for some, back (promoted): no reference is lost or counted twice.
    #[test]
    fn references_moving_between_the_store_client_and_the_local_values_are_never_lost() {
        let d = TestDaemon::start();
        let a = d.connect();
        let base = a.stats().unwrap();
        let sh = shared(&a);
        const IDS: usize = 500;
        for round in 0..8 {
            // Most are this process's result ids (kept in order, found by index), some not
            // (kept aside, found by hash).
            let ids: Vec<ObjectId> = (0..IDS)
                .map(|i| match i % 5 {
                    0 => ObjectId::random(),
                    _ => sh.result_ids.fresh(),
                })
                .collect();
            // Some start in the store client, some here as pending entries.
            for (i, id) in ids.iter().enumerate() {
                if i % 2 == 0 {
                    a.adopt_pending(id);
                } else {
                    sh.locals.adopt_pending(id);
                }
            }
            // The id being moved now: the threads hammer it.
            let next = AtomicUsize::new(0);
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        loop {
                            let i = next.load(Ordering::Acquire);
                            let Some(id) = ids.get(i) else {
                                return;
                            };
                            sh.hold(id);
                            std::hint::spin_loop();
                            sh.release(id);
                        }
                    });
                }
                for (i, id) in ids.iter().enumerate() {
                    next.store(i, Ordering::Release);
                    for _ in 0..(i % 13) * 10 {
                        std::hint::spin_loop();
                    }
                    if i % 3 == 0 {
                        // Its result went to the store first, then came inline after all.
                        sh.locals.unpend(&a, id);
                    }
                    assert!(sh.locals.take(&a, id, &[round; 100], false));
                    if i % 4 == 0 {
                        sh.locals.promote(&a, id).unwrap();
                    }
                }
                next.store(IDS, Ordering::Release);
            });
            // Only the first reference to each is left, wherever it is.
            for (i, id) in ids.iter().enumerate() {
                let promoted = i % 4 == 0;
                let (here, there) = (sh.locals.which(&[*id])[0], a.held_count(id));
                assert_eq!((here, there), (!promoted, promoted as u64), "id {i}");
                sh.release(id);
                assert_eq!(sh.locals.which(&[*id]), [false]);
                assert_eq!(a.held_count(id), 0);
            }
        }
        assert!(sh.locals.is_empty());
        back_to(&a, &base);
    }
}
