//! `StoreClient`: a connection to the daemon plus the mapped arena.
//!
//! Gets of sealed objects are served from shared memory without asking the daemon: a lock-free
//! directory lookup, then a pin (this client's bit in the slot's pin mask). Everything that
//! changes the table (create, seal, abort, delete, evict) and every wait goes over the socket.
//! The socket is shared by the threads of a process: requests carry ids, and whichever thread
//! is waiting reads replies for everybody (see `Conn::call`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use crate::blocks::id::ObjectId;
use crate::blocks::ring::{Consumer, RingError};
use crate::blocks::shm::{Arena, FLAG_ERROR, Lookup, SealedEntry};
use crate::error::{Result, StoreError};
use crate::protocol::{
    self, DeleteOutcome, Event, MAX_REPLY, NOTICE_LOST, NOTICE_REJECTED, ObjectInfo, Owned,
    PROTOCOL_VERSION, Reply, Request, Stats, decode_notice,
};
use crate::sock;

/// How long a get may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// Do not wait: only what is sealed now.
    Poll,
    /// Wait at most this long.
    After(Duration),
    /// Wait until this instant.
    Until(Instant),
    Forever,
}

impl Timeout {
    fn deadline(self) -> Option<Instant> {
        match self {
            Timeout::Poll => Some(Instant::now()),
            Timeout::After(d) => Some(Instant::now() + d),
            Timeout::Until(t) => Some(t),
            Timeout::Forever => None,
        }
    }
}

impl From<Duration> for Timeout {
    fn from(d: Duration) -> Self {
        Timeout::After(d)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct ReadState {
    reader: Option<BufReader<UnixStream>>,
    /// Replies that arrived for other threads' requests.
    replies: HashMap<u64, Reply>,
    /// Set when the connection broke: every call fails with this from then on.
    broken: Option<String>,
}

/// The socket half of a client: request/reply with ids, any thread may read for the others.
struct Conn {
    writer: Mutex<Writer>,
    read: Mutex<ReadState>,
    cv: Condvar,
    next_req: AtomicU64,
    /// Sequence number of the last frame written (under the writer lock).
    sent: AtomicU64,
    /// Every frame up to this sequence number has been handled by the daemon: it serves one
    /// connection in order, so the reply to a request vouches for all frames sent before it.
    synced: AtomicU64,
}

/// The socket's write side: one-way frames are batched here and written by [`Conn::flush`]
/// (before any request, before a wait parks, when the batch is large, and by the runtime's
/// flusher every millisecond), so that a burst of notices costs one system call.
struct Writer {
    stream: UnixStream,
    batch: Vec<u8>,
    /// Off by default: every frame is written at once. The `trove` runtime turns it on (it
    /// runs a flusher).
    batching: bool,
    /// Sequence number of the last frame in `batch`.
    last: u64,
    /// Told the sequence number of the last frame written, after each write.
    on_written: Option<Box<dyn Fn(u64) + Send>>,
    /// Told the sequence number of each frame that publishes an object (`PutSmall`,
    /// `SealOwned`) queued by a thread inside [`StoreClient::stamping`], before it can be
    /// written.
    on_queued: Option<Box<dyn Fn(u64) + Send>>,
}

thread_local! {
    /// Whether this thread is inside [`StoreClient::stamping`].
    static STAMPING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A batch this large is written at once.
const BATCH_LIMIT: usize = 32 << 10;

impl Writer {
    fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let r = self.stream.write_all(&self.batch);
        self.batch.clear();
        r.map_err(|e| StoreError::Disconnected(format!("write to the store failed: {e}")))?;
        if let Some(f) = &self.on_written {
            f(self.last);
        }
        Ok(())
    }
}

impl Conn {
    /// Queues one frame (written now if `req != 0`, a request awaiting its reply); returns
    /// its sequence number.
    fn send(&self, req: u64, r: &Request) -> Result<u64> {
        let frame = r.encode(req);
        let mut w = lock(&self.writer);
        w.batch.extend_from_slice(&frame);
        let seq = self.sent.fetch_add(1, Ordering::AcqRel) + 1;
        w.last = seq;
        if let Some(f) = &w.on_queued
            && STAMPING.get()
            && matches!(r, Request::PutSmall { .. } | Request::SealOwned { .. })
        {
            f(seq);
        }
        if req != 0 || !w.batching || w.batch.len() >= BATCH_LIMIT {
            w.flush()?;
        }
        Ok(seq)
    }

    fn flush(&self) -> Result<()> {
        lock(&self.writer).flush()
    }

    /// Sends a request and waits for its reply.
    fn call(&self, r: &Request) -> Result<Reply> {
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let seq = match self.send(req, r) {
            Ok(seq) => seq,
            // The daemon closed the connection: it may have said why first (a client cut off
            // for misbehaviour is sent the error); read up to its end for that reason.
            Err(StoreError::Disconnected(_)) => {
                return Err(self
                    .wait_reply(|_| None::<()>)
                    .expect_err("only a broken connection ends this wait"));
            }
            Err(e) => return Err(e),
        };
        let reply = self.wait_reply(|st| st.replies.remove(&req))?;
        self.synced.fetch_max(seq, Ordering::AcqRel);
        Ok(reply)
    }

    /// Whether the daemon has handled the frame with sequence number `seq`.
    fn is_synced(&self, seq: u64) -> bool {
        self.synced.load(Ordering::Acquire) >= seq
    }

    fn broken(&self) -> Option<String> {
        lock(&self.read).broken.clone()
    }

    /// Waits until `take` finds something, reading frames for everybody meanwhile.
    fn wait_reply<T>(&self, mut take: impl FnMut(&mut ReadState) -> Option<T>) -> Result<T> {
        let mut st = lock(&self.read);
        loop {
            if let Some(v) = take(&mut st) {
                return Ok(v);
            }
            if let Some(why) = &st.broken {
                return Err(StoreError::Disconnected(why.clone()));
            }
            match st.reader.take() {
                // Nobody is reading: this thread reads one frame for everybody.
                Some(mut reader) => {
                    drop(st);
                    let frame = protocol::read_frame(&mut reader, MAX_REPLY);
                    st = lock(&self.read);
                    st.reader = Some(reader);
                    match frame.and_then(|f| match f {
                        Some(body) => Reply::decode(&body).map(Some),
                        None => Ok(None),
                    }) {
                        Ok(Some((_, Reply::Event(_)))) => {}
                        Ok(Some((req, reply))) => {
                            if req == 0 {
                                // An unsolicited error (the daemon is closing us).
                                st.broken = Some(format!("store closed the connection: {reply:?}"));
                            } else {
                                st.replies.insert(req, reply);
                            }
                        }
                        Ok(None) => st.broken = Some("the store closed the connection".into()),
                        Err(e) => st.broken = Some(format!("reading from the store: {e}")),
                    }
                    self.cv.notify_all();
                }
                None => st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

/// This process's references to one object: views and counted references alike.
struct Held {
    count: u64,
    /// Where the object is, once this process knows (its own small puts know at once).
    loc: Option<(u64, u64)>,
    /// The directory slot, once seen sealed there.
    slot: Option<u64>,
    /// The object reports a failure (`FLAG_ERROR`).
    error: bool,
    /// The last `Hold`/`PutSmall`/`SealOwned` frame sent for it: until the daemon has handled
    /// it, this process's pin bit is the daemon's to set, so it must also be the daemon's to
    /// clear (an `Unhold` queued behind it) rather than a local unpin that could run first.
    daemon_seq: Option<u64>,
    /// The object's bytes in this process's own memory: a call's small result that came back
    /// inline and that the store has never seen (see [`StoreClient::resolve_local`]).
    local: Option<Arc<Local>>,
    /// This process's own small put of it was rejected by the daemon (`NOTICE_REJECTED`):
    /// `loc` is not an object, and a get is `PutRejected`.
    rejected: bool,
}

/// A result kept in process memory, 16-byte aligned (what rkyv archives need); small ones
/// (calls' inline results) live in the same allocation as the count.
struct Local {
    blocks: LocalBlocks,
    len: usize,
    error: bool,
}

enum LocalBlocks {
    Small([Block; LOCAL_SMALL_BLOCKS]),
    Large(Box<[Block]>),
}

/// Values up to this many 16-byte blocks are kept without a second allocation.
const LOCAL_SMALL_BLOCKS: usize = 12;

#[repr(C, align(16))]
#[derive(Clone, Copy, bytemuck::Zeroable, bytemuck::Pod)]
struct Block([u8; 16]);

impl Local {
    fn new(bytes: &[u8], error: bool) -> Local {
        let n = bytes.len().div_ceil(16);
        let mut blocks = if n <= LOCAL_SMALL_BLOCKS {
            LocalBlocks::Small([Block([0; 16]); LOCAL_SMALL_BLOCKS])
        } else {
            LocalBlocks::Large(vec![Block([0; 16]); n].into_boxed_slice())
        };
        let all: &mut [Block] = match &mut blocks {
            LocalBlocks::Small(b) => b,
            LocalBlocks::Large(b) => b,
        };
        bytemuck::cast_slice_mut::<Block, u8>(all)[..bytes.len()].copy_from_slice(bytes);
        Local {
            blocks,
            len: bytes.len(),
            error,
        }
    }
    fn bytes(&self) -> &[u8] {
        let all: &[Block] = match &self.blocks {
            LocalBlocks::Small(b) => b,
            LocalBlocks::Large(b) => b,
        };
        &bytemuck::cast_slice(all)[..self.len]
    }
}

/// Where a view's bytes are.
enum Pinned {
    Arena { offset: u64, size: u64, error: bool },
    Local(Arc<Local>),
}

impl Held {
    /// One reference, pinned in place by this process (lock-free).
    fn pinned(e: &SealedEntry) -> Held {
        Held {
            count: 1,
            loc: Some((e.offset, e.size)),
            slot: Some(e.slot),
            error: e.word & FLAG_ERROR != 0,
            daemon_seq: None,
            local: None,
            rejected: false,
        }
    }

    /// No reference yet, managed by the daemon from the frame with sequence number `seq`.
    fn by_daemon(seq: u64) -> Held {
        Held {
            count: 0,
            loc: None,
            slot: None,
            error: false,
            daemon_seq: Some(seq),
            local: None,
            rejected: false,
        }
    }
}

#[derive(Default)]
struct Holds {
    map: FxHashMap<ObjectId, Held>,
    /// Ids whose last reference went by an `Unhold` frame (value: its sequence number). Until
    /// the daemon has handled it, a new local pin could be undone by it, so new references
    /// to these ids go through the daemon too.
    unholding: FxHashMap<ObjectId, u64>,
}

/// Gives memory back once a map that grew large (a burst of objects) is mostly empty: a sparse
/// table costs a cache miss on every lookup of the calls that follow. Amortised O(1).
pub fn shrink_if_sparse<K: std::hash::Hash + Eq, V>(map: &mut FxHashMap<K, V>) {
    if map.capacity() > 1 << 14 && map.len() * 8 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

/// The slab this client bump-allocates small objects from.
struct ClientSlab {
    start: u64,
    end: u64,
    next: u64,
    /// Writers placed in this slab and not yet published or dropped. The daemon frees a slab
    /// this client has moved on from once its objects are gone, so the client only moves on
    /// when none is outstanding (others go to the daemon meanwhile).
    outstanding: u32,
}

/// What the notification ring has told this process.
struct Notes {
    /// The ring's consumer end; `None` while a thread is reading it for everybody.
    consumer: Option<Consumer>,
    /// Ids the daemon reported lost (never to be sealed, or freed), bounded.
    lost: HashSet<ObjectId>,
    lost_order: VecDeque<ObjectId>,
    /// Bumped on every batch of notices, so that waiting threads re-check.
    epoch: u64,
}

struct Inner {
    arena: Arena,
    /// This client's notification ring: the daemon closes it when the connection ends (a
    /// client it cut off sees that without a round trip).
    ring: crate::blocks::ring::RingRef,
    conn: Conn,
    index: u32,
    /// The pid that connected (a client is never used across a fork).
    pid: u32,
    socket: PathBuf,
    holds: Mutex<Holds>,
    slab: Mutex<Option<ClientSlab>>,
    notes: Mutex<Notes>,
    notes_cv: Condvar,
}

/// Objects up to this size are placed in the client's slab without a round trip.
pub const SMALL_OBJECT_MAX: u64 = 32 << 10;
/// Size of the slabs a client asks for.
const SLAB_LEN: u64 = 1 << 20;
/// How long a wait polls before it sends `Watch` and parks on the notification ring.
const SPIN_BEFORE_WATCH: Duration = Duration::from_micros(50);
/// How many in-flight `Unhold`s a client tracks before it syncs with the daemon to forget them.
const UNHOLDING_PRUNE: usize = 4096;
/// How many lost ids a client remembers.
const LOST_MEMORY: usize = 1 << 16;
/// Longest single park while waiting on the ring: the daemon's liveness is checked between.
const PARK_SLICE: Duration = Duration::from_millis(100);

/// Where a wait found an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// It will never be sealed: aborted, its creator died, or it was freed.
    Lost,
    Pending,
}

/// A connection to a store daemon with the arena mapped. Cheap to clone (shared).
#[derive(Clone)]
pub struct StoreClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StoreClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreClient")
            .field("socket", &self.inner.socket)
            .field("client_index", &self.inner.index)
            .finish()
    }
}

impl StoreClient {
    /// Connects to the daemon at `socket` and maps its arena.
    pub fn connect(socket: impl AsRef<Path>) -> Result<StoreClient> {
        let socket = socket.as_ref();
        let (stream, index, fd) = handshake(socket)?;
        let arena = Arena::attach(fd)?;
        let ring = arena.attach_ring(index)?;
        let consumer = ring.consumer();
        let reader = BufReader::with_capacity(64 << 10, stream.try_clone()?);
        Ok(StoreClient {
            inner: Arc::new(Inner {
                arena,
                ring,
                conn: Conn {
                    writer: Mutex::new(Writer {
                        stream,
                        batch: Vec::with_capacity(BATCH_LIMIT),
                        batching: false,
                        last: 0,
                        on_written: None,
                        on_queued: None,
                    }),
                    read: Mutex::new(ReadState {
                        reader: Some(reader),
                        replies: HashMap::new(),
                        broken: None,
                    }),
                    cv: Condvar::new(),
                    next_req: AtomicU64::new(1),
                    sent: AtomicU64::new(0),
                    synced: AtomicU64::new(0),
                },
                index,
                pid: std::process::id(),
                socket: socket.to_path_buf(),
                holds: Mutex::new(Holds::default()),
                slab: Mutex::new(None),
                notes: Mutex::new(Notes {
                    consumer: Some(consumer),
                    lost: HashSet::new(),
                    lost_order: VecDeque::new(),
                    epoch: 0,
                }),
                notes_cv: Condvar::new(),
            }),
        })
    }

    /// This client's index (its bit in the pin masks).
    pub fn client_index(&self) -> u32 {
        self.inner.index
    }

    pub fn socket_path(&self) -> &Path {
        &self.inner.socket
    }

    pub fn arena(&self) -> &Arena {
        &self.inner.arena
    }

    /// Pre-faults this process's page tables for the whole heap (the daemon allocates the
    /// pages; each process still pays a minor fault per page on first touch of its mapping).
    pub fn populate(&self) -> std::io::Result<()> {
        let l = *self.inner.arena.layout();
        self.inner.arena.populate(l.heap_offset, l.heap_len)
    }

    fn call(&self, r: &Request) -> Result<Reply> {
        self.inner.conn.call(r)
    }

    fn expect_ok(&self, r: &Request, id: ObjectId) -> Result<()> {
        match self.call(r)? {
            Reply::Ok => Ok(()),
            other => Err(reply_error(other, id)),
        }
    }

    /// Creates an object of `size` bytes: a writable buffer in shared memory. Seal it to make
    /// it visible; dropping it unsealed aborts it.
    pub fn create(&self, id: ObjectId, size: u64) -> Result<ObjectWriter> {
        let offset = self.create_raw(id, size)?;
        let ptr = self.inner.arena.ptr(offset, size).ok_or_else(|| {
            StoreError::Protocol(format!("daemon gave an out-of-bounds offset {offset}"))
        })?;
        Ok(ObjectWriter {
            client: self.clone(),
            id,
            ptr,
            len: size as usize,
            done: false,
        })
    }

    /// The verb alone: allocates and returns the arena offset. Prefer [`StoreClient::create`].
    pub fn create_raw(&self, id: ObjectId, size: u64) -> Result<u64> {
        match self.call(&Request::Create { id, size })? {
            Reply::Created { offset } => Ok(offset),
            other => Err(reply_error(other, id)),
        }
    }

    /// Seals an object this client created.
    pub fn seal(&self, id: ObjectId) -> Result<()> {
        self.expect_ok(&Request::Seal { id }, id)
    }

    /// Aborts an object this client is creating: its memory is freed.
    pub fn abort(&self, id: ObjectId) -> Result<()> {
        self.expect_ok(&Request::Abort { id }, id)
    }

    /// Creates, fills and seals an object in one go.
    pub fn put(&self, id: ObjectId, data: &[u8]) -> Result<()> {
        let mut w = self.create(id, data.len() as u64)?;
        w.as_mut_slice().copy_from_slice(data);
        w.seal()
    }

    /// Gets one sealed object, waiting up to `timeout` for it to be sealed.
    /// `Timeout::Poll` on an id the store does not hold gives `NotFound`; a wait that ends
    /// without the object gives `Timeout`.
    pub fn get(&self, id: ObjectId, timeout: impl Into<Timeout>) -> Result<ObjectView> {
        let timeout = timeout.into();
        if let Some(v) = self.get_many(&[id], timeout)?.pop().flatten() {
            return Ok(v);
        }
        if timeout == Timeout::Poll
            && matches!(self.inner.arena.directory().lookup(&id), Lookup::Absent)
        {
            return Err(StoreError::NotFound(id));
        }
        Err(StoreError::Timeout(1))
    }

    /// Gets several objects: each entry is `Some` if it was sealed before the timeout.
    pub fn get_many(&self, ids: &[ObjectId], timeout: Timeout) -> Result<Vec<Option<ObjectView>>> {
        if self.inner.ring.is_closed() {
            return Err(StoreError::Disconnected(
                "the store ended this connection".into(),
            ));
        }
        // A rejected small put of ours is reported on the ring: an error, not its bytes.
        self.poll_notes();
        for id in ids {
            self.check_rejected(id)?;
        }
        let deadline = timeout.deadline();
        let mut out: Vec<Option<ObjectView>> = ids.iter().map(|_| None).collect();
        loop {
            let mut missing = Vec::new();
            for (i, id) in ids.iter().enumerate() {
                if out[i].is_none() {
                    match self.try_get(id) {
                        Some(v) => out[i] = Some(v),
                        None => missing.push(*id),
                    }
                }
            }
            if missing.is_empty() {
                return Ok(out);
            }
            let now = Instant::now();
            let remaining = match deadline {
                Some(d) if d <= now => return Ok(out),
                Some(d) => Some(d - now),
                None => None,
            };
            missing.sort();
            missing.dedup();
            // Round the remaining time up so that a wait never ends before the deadline.
            let timeout = remaining.map(|r| Duration::from_millis(r.as_millis() as u64 + 1));
            for chunk in missing.chunks(protocol::MAX_IDS) {
                match self.call(&Request::Wait {
                    ids: chunk.to_vec(),
                    timeout,
                })? {
                    Reply::Waited { .. } => {}
                    other => return Err(reply_error(other, chunk[0])),
                }
            }
        }
    }

    /// A zero-copy view of a sealed object if it is sealed now (no daemon round trip).
    pub fn try_get(&self, id: &ObjectId) -> Option<ObjectView> {
        for _ in 0..4 {
            if let Some(v) = self.try_view(id) {
                return Some(v);
            }
            // The only reason to retry: an `Unhold` of ours may still be in flight. A round
            // trip settles it.
            let pending = lock(&self.inner.holds)
                .unholding
                .get(id)
                .is_some_and(|seq| !self.inner.conn.is_synced(*seq));
            if !pending || self.sync().is_err() {
                return None;
            }
        }
        None
    }

    /// Makes sure the daemon has handled every frame sent so far.
    fn sync(&self) -> Result<()> {
        match self.call(&Request::Flush)? {
            Reply::Ok => Ok(()),
            other => Err(reply_error(other, ObjectId::default())),
        }
    }

    fn view(&self, id: ObjectId, offset: u64, size: u64) -> Option<ObjectView> {
        let ptr = self.inner.arena.ptr(offset, size)?;
        Some(ObjectView {
            client: self.clone(),
            id,
            offset,
            ptr,
            len: size as usize,
            error: false,
            _local: None,
        })
    }

    /// Pins `id` for a view if that can be done now, without the daemon.
    fn try_view(&self, id: &ObjectId) -> Option<ObjectView> {
        let (offset, size, error) = match self.try_pin_for_view(id)? {
            Pinned::Arena {
                offset,
                size,
                error,
            } => (offset, size, error),
            Pinned::Local(local) => {
                let b = local.bytes();
                return Some(ObjectView {
                    client: self.clone(),
                    id: *id,
                    offset: u64::MAX,
                    ptr: b.as_ptr(),
                    len: b.len(),
                    error: local.error,
                    _local: Some(local),
                });
            }
        };
        let mut v = self.view(*id, offset, size);
        if let Some(v) = &mut v {
            v.error = error;
        }
        v.or_else(|| {
            self.release(id);
            None
        })
    }

    /// Takes one view reference on `id` if it can be pinned now; returns where it is.
    fn try_pin_for_view(&self, id: &ObjectId) -> Option<Pinned> {
        let dir = self.inner.arena.directory();
        let me = self.inner.index;
        let mut guard = lock(&self.inner.holds);
        let holds = &mut *guard;
        let arena = |offset, size, error| {
            Some(Pinned::Arena {
                offset,
                size,
                error,
            })
        };
        if let Some(h) = holds.map.get_mut(id) {
            if h.rejected {
                return None;
            }
            if let Some(local) = &h.local {
                h.count += 1;
                return Some(Pinned::Local(local.clone()));
            }
            if let Some((offset, size)) = h.loc
                && h.daemon_seq.is_some()
            {
                // An owned object: this process's reference keeps it.
                h.count += 1;
                return arena(offset, size, h.error);
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

    /// Our failed pin raced with a deferred delete, or our last pin of a reference-counted
    /// object went: the daemon rechecks the object.
    fn tell_release(&self, id: &ObjectId) {
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
        if !unholding && let Lookup::Sealed(e) = dir.lookup(id) {
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

    /// [`StoreClient::release`] if `id` is a value in this process's memory (see
    /// [`StoreClient::resolve_local`]); `false` (and nothing done) otherwise.
    pub fn release_if_local(&self, id: &ObjectId) -> bool {
        let mut holds = lock(&self.inner.holds);
        let std::collections::hash_map::Entry::Occupied(mut e) = holds.map.entry(*id) else {
            return false;
        };
        if e.get().local.is_none() {
            return false;
        }
        e.get_mut().count -= 1;
        if e.get().count == 0 {
            let gone = e.remove();
            shrink_if_sparse(&mut holds.map);
            drop(holds);
            drop(gone);
        }
        true
    }

    /// Drops one reference taken by [`StoreClient::hold`], a view, or an owned put.
    pub fn release(&self, id: &ObjectId) {
        let mut holds = lock(&self.inner.holds);
        let Some(h) = holds.map.get_mut(id) else {
            return;
        };
        h.count -= 1;
        if h.count > 0 {
            return;
        }
        let h = holds.map.remove(id).expect("present");
        shrink_if_sparse(&mut holds.map);
        if h.local.is_some() {
            // Only ever in this process's memory: nothing to tell the store.
            return;
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
            return;
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
    }

    /// The sequence number of the last one-way frame or request queued on this connection.
    pub fn frames_sent(&self) -> u64 {
        self.inner.conn.sent.load(Ordering::Acquire)
    }

    /// Makes sure the daemon has handled every frame up to sequence number `seq` (one round
    /// trip, unless a reply already vouches for it).
    pub fn sync_through(&self, seq: u64) -> Result<()> {
        if self.inner.conn.is_synced(seq) {
            return Ok(());
        }
        self.sync()
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
            .or_insert_with(|| Held::by_daemon(u64::MAX));
        h.count += 1;
    }

    /// Batch one-way frames (releases, holds, small puts, watches) until [`StoreClient::flush`],
    /// the next request, a wait that parks, or 32 KiB. Whoever turns this on must flush
    /// periodically (the `trove` runtime runs a flusher thread).
    pub fn set_batching(&self, on: bool) -> Result<()> {
        let mut w = lock(&self.inner.conn.writer);
        w.batching = on;
        w.flush()
    }

    /// Writes the one-way frames queued so far (releases, holds, small puts, watches).
    pub fn flush(&self) -> Result<()> {
        self.inner.conn.flush()
    }

    /// Calls `f` with the sequence number of the last frame written to the socket after each
    /// write (frames are numbered from 1 in the order they are queued): every frame up to it is in the daemon's hands from then on, even if this process
    /// dies. Called with the writer's lock held: `f` must be quick and must not use this
    /// client. Replaces an earlier `f`.
    pub fn on_written(&self, f: impl Fn(u64) + Send + 'static) {
        lock(&self.inner.conn.writer).on_written = Some(Box::new(f));
    }

    /// Calls `f` with the sequence number of each frame publishing an owned object (a small
    /// put or an owned seal) that a thread inside [`StoreClient::stamping`] queues, right
    /// after queuing it and before it can be written (under the writer's lock: `f` must be
    /// quick and must not use this client). Replaces an earlier `f`.
    pub fn on_queued(&self, f: impl Fn(u64) + Send + 'static) {
        lock(&self.inner.conn.writer).on_queued = Some(Box::new(f));
    }

    /// Runs `body`, reporting each frame this thread queues meanwhile to the
    /// [`StoreClient::on_queued`] callback.
    pub fn stamping<R>(&self, body: impl FnOnce() -> R) -> R {
        struct Restore(bool);
        impl Drop for Restore {
            fn drop(&mut self) {
                STAMPING.set(self.0);
            }
        }
        let _restore = Restore(STAMPING.replace(true));
        body()
    }

    /// Tells this process where a pending reference's object is, learnt from its creator
    /// before the daemon has published it (a call's result: the callee wrote it, queued its
    /// `PutSmall`, then recorded the place). Gets then read it in place at once. Only for ids
    /// taken with [`StoreClient::adopt_pending`]; the place is bounds-checked when viewed.
    pub fn resolve_pending(&self, id: &ObjectId, offset: u64, size: u64, error: bool) {
        if let Some(h) = lock(&self.inner.holds).map.get_mut(id)
            && h.loc.is_none()
            && h.daemon_seq == Some(u64::MAX)
        {
            h.loc = Some((offset, size));
            h.error = error;
        }
    }

    /// Gives a pending reference (taken with [`StoreClient::adopt_pending`]) its value in this
    /// process's memory: a call's small result that came back inline, which the store never
    /// sees. Views of it read the local copy; its last release tells the store nothing.
    /// Returns `false` (and keeps nothing) if `id` is not such a reference any more.
    pub fn resolve_local(&self, id: &ObjectId, bytes: &[u8], error: bool) -> bool {
        let mut holds = lock(&self.inner.holds);
        match holds.map.get_mut(id) {
            Some(h) if h.loc.is_none() && h.local.is_none() && h.daemon_seq == Some(u64::MAX) => {
                h.local = Some(Arc::new(Local::new(bytes, error)));
                true
            }
            _ => false,
        }
    }

    /// Puts a local value (see [`StoreClient::resolve_local`]) in the store under its id, so
    /// that other processes can read it (its ref is escaping into an object or a call). This
    /// process keeps its references, now to the stored object. A no-op for other ids.
    pub fn promote_local(&self, id: &ObjectId) -> Result<()> {
        let local = {
            let mut holds = lock(&self.inner.holds);
            match holds.map.get_mut(id) {
                Some(h) if h.local.is_some() => h.local.take().expect("local"),
                _ => return Ok(()),
            }
        };
        let put = (|| {
            let mut w = self.alloc_owned(*id, local.len as u64)?;
            w.as_mut_slice().copy_from_slice(local.bytes());
            w.publish_with(Owned {
                error: local.error,
                keep: true,
                ..Owned::default()
            })
        })();
        let mut holds = lock(&self.inner.holds);
        let Some(h) = holds.map.get_mut(id) else {
            return put;
        };
        match put {
            // `publish` counted one more reference for the writer: ours were there already.
            Ok(()) => h.count -= 1,
            Err(_) => {
                h.local = Some(local);
            }
        }
        put
    }

    /// This client's (index, pid) for `Owned::pin_for`.
    pub fn pin_target(&self) -> (u32, u32) {
        (self.inner.index, self.inner.pid)
    }

    /// How many references this process holds on `id` (views included).
    pub fn held_count(&self, id: &ObjectId) -> u64 {
        lock(&self.inner.holds).map.get(id).map_or(0, |h| h.count)
    }

    /// Starts an owned (reference-counted) object of `size` bytes: small ones are placed in
    /// this client's slab without a round trip, larger ones are created by the daemon. Write
    /// it, then [`OwnedWriter::publish`] it.
    pub fn alloc_owned(&self, id: ObjectId, size: u64) -> Result<OwnedWriter> {
        if size > SMALL_OBJECT_MAX {
            return self.create_owned(id, size);
        }
        let step = size.max(1).next_multiple_of(64);
        let mut slab = lock(&self.inner.slab);
        let offset = match &mut *slab {
            Some(s) if s.next + step <= s.end => {
                let o = s.next;
                s.next += step;
                s.outstanding += 1;
                o
            }
            Some(s) if s.outstanding > 0 => {
                // Full, and another thread is still writing into it: not ours to give up yet.
                drop(slab);
                return self.create_owned(id, size);
            }
            _ => {
                let (offset, len) = match self.call(&Request::Slab { size: SLAB_LEN })? {
                    Reply::Slab { offset, len } => (offset, len),
                    other => return Err(reply_error(other, id)),
                };
                if len < step || self.inner.arena.ptr(offset, len).is_none() {
                    return Err(StoreError::Protocol(format!(
                        "daemon granted a bad slab {offset}+{len}"
                    )));
                }
                *slab = Some(ClientSlab {
                    start: offset,
                    end: offset + len,
                    next: offset + step,
                    outstanding: 1,
                });
                offset
            }
        };
        drop(slab);
        let ptr = self
            .inner
            .arena
            .ptr(offset, size)
            .ok_or_else(|| StoreError::Protocol("slab outside the heap".into()))?;
        Ok(OwnedWriter {
            client: self.clone(),
            id,
            offset,
            ptr,
            len: size as usize,
            small: true,
            done: false,
        })
    }

    /// Like [`StoreClient::alloc_owned`] but always created by the daemon, whatever the size:
    /// the id is known to the store (and to waiters) from now on, and is reported lost if this
    /// process dies before publishing it.
    pub fn create_owned(&self, id: ObjectId, size: u64) -> Result<OwnedWriter> {
        let offset = self.create_raw(id, size)?;
        let ptr = self.inner.arena.ptr(offset, size).ok_or_else(|| {
            StoreError::Protocol(format!("daemon gave an out-of-bounds offset {offset}"))
        })?;
        Ok(OwnedWriter {
            client: self.clone(),
            id,
            offset,
            ptr,
            len: size as usize,
            small: false,
            done: false,
        })
    }

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

    fn readiness(&self, ids: &[ObjectId]) -> Vec<Readiness> {
        let dir = self.inner.arena.directory();
        let holds = lock(&self.inner.holds);
        let notes = lock(&self.inner.notes);
        ids.iter()
            .map(|id| {
                match holds.map.get(id) {
                    Some(h) if h.rejected => return Readiness::Lost,
                    Some(h) if h.loc.is_some() || h.local.is_some() => return Readiness::Ready,
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
    fn await_notes(&self, epoch: u64, slice: Duration) -> Result<()> {
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
    fn absorb_notes(&self, mut notes: MutexGuard<'_, Notes>, got: Vec<(u8, ObjectId)>) {
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
                    && h.local.is_none()
                {
                    h.rejected = true;
                }
            }
        }
        self.inner.notes_cv.notify_all();
    }

    /// Takes what the notification ring holds now, without waiting (nothing if another
    /// thread is reading it).
    fn poll_notes(&self) {
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
    fn check_rejected(&self, id: &ObjectId) -> Result<()> {
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

    /// `Disconnected` if the daemon has gone (its end of the socket is closed).
    pub fn check_alive(&self) -> Result<()> {
        if let Some(why) = self.inner.conn.broken() {
            return Err(StoreError::Disconnected(why));
        }
        use rustix::event::{PollFd, PollFlags, Timespec};
        let w = lock(&self.inner.conn.writer);
        let mut fds = [PollFd::new(&w.stream, PollFlags::RDHUP)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let n = rustix::event::poll(&mut fds, Some(&zero)).map_err(std::io::Error::from)?;
        let gone = n > 0
            && fds[0]
                .revents()
                .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR);
        drop(w);
        if gone {
            return Err(StoreError::Disconnected(
                "the store closed the connection".into(),
            ));
        }
        Ok(())
    }

    pub fn contains(&self, id: ObjectId) -> Result<bool> {
        match self.call(&Request::Contains { id })? {
            Reply::Bool(b) => Ok(b),
            other => Err(reply_error(other, id)),
        }
    }

    /// Deletes objects; pinned ones are deleted when their last pin goes.
    pub fn delete(&self, ids: &[ObjectId]) -> Result<Vec<DeleteOutcome>> {
        let mut all = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(protocol::MAX_IDS) {
            match self.call(&Request::Delete {
                ids: chunk.to_vec(),
            })? {
                Reply::Deleted { outcomes } if outcomes.len() == chunk.len() => {
                    all.extend(outcomes)
                }
                other => return Err(reply_error(other, chunk[0])),
            }
        }
        Ok(all)
    }

    pub fn list(&self) -> Result<Vec<ObjectInfo>> {
        match self.call(&Request::List)? {
            Reply::Listed { objects } => Ok(objects),
            other => Err(reply_error(other, ObjectId::default())),
        }
    }

    /// Evicts at least `bytes` of unpinned objects (LRU first). Returns (objects, bytes) freed.
    pub fn evict(&self, bytes: u64) -> Result<(u64, u64)> {
        match self.call(&Request::Evict { bytes })? {
            Reply::Evicted { count, bytes } => Ok((count, bytes)),
            other => Err(reply_error(other, ObjectId::default())),
        }
    }

    pub fn stats(&self) -> Result<Stats> {
        match self.call(&Request::Stats)? {
            Reply::Stats(s) => Ok(s),
            other => Err(reply_error(other, ObjectId::default())),
        }
    }

    /// Opens a subscription to seal and delete events (its own connection to the daemon).
    pub fn subscribe(&self) -> Result<Subscription> {
        Subscription::connect(&self.inner.socket)
    }
}

/// A stream of seal and delete events on a connection of its own.
pub struct Subscription {
    reader: BufReader<UnixStream>,
}

impl Subscription {
    pub fn connect(socket: &Path) -> Result<Subscription> {
        let (stream, _index, _fd) = handshake(socket)?;
        (&stream)
            .write_all(&Request::Subscribe.encode(1))
            .map_err(|e| StoreError::Disconnected(e.to_string()))?;
        let mut s = Subscription {
            reader: BufReader::new(stream),
        };
        match s.read()? {
            Some((1, Reply::Ok)) => Ok(s),
            other => Err(StoreError::Protocol(format!(
                "subscribe answered {other:?}"
            ))),
        }
    }

    fn read(&mut self) -> Result<Option<(u64, Reply)>> {
        match protocol::read_frame(&mut self.reader, MAX_REPLY)? {
            Some(body) => Ok(Some(Reply::decode(&body)?)),
            None => Err(StoreError::Disconnected(
                "the store closed the connection".into(),
            )),
        }
    }

    /// The next event, waiting up to `timeout`; `Ok(None)` on timeout.
    pub fn next(&mut self, timeout: Duration) -> Result<Option<Event>> {
        use std::os::fd::AsFd;
        let deadline = Instant::now() + timeout;
        loop {
            if self.reader.buffer().is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                let ms = left.as_millis().min(i32::MAX as u128) as i32;
                let mut fds = [nix::poll::PollFd::new(
                    self.reader.get_ref().as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let n = nix::poll::poll(
                    &mut fds,
                    nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX),
                )?;
                if n == 0 {
                    return Ok(None);
                }
            }
            // Frames are small and written whole: once readable, the rest follows at once.
            if let Some((_, Reply::Event(ev))) = self.read()? {
                return Ok(Some(ev));
            }
        }
    }
}

/// Connects and reads the welcome: (stream, client index, arena fd).
fn handshake(socket: &Path) -> Result<(UnixStream, u32, std::os::fd::OwnedFd)> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        StoreError::Disconnected(format!("cannot connect to {}: {e}", socket.display()))
    })?;
    let mut buf = vec![0u8; 4096];
    let (n, fd) = sock::recv_with_fd(&stream, &mut buf)?;
    if n < 4 {
        return Err(StoreError::Disconnected(
            "the store closed the connection during the handshake".into(),
        ));
    }
    let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if len + 4 != n {
        return Err(StoreError::Protocol("malformed welcome".into()));
    }
    let (_, reply) = Reply::decode(&buf[4..n])?;
    let index = match reply {
        Reply::Welcome {
            version,
            client_index,
            ..
        } if version == PROTOCOL_VERSION => client_index,
        Reply::Welcome { version, .. } => {
            return Err(StoreError::Refused(format!(
                "protocol version {version}, this client speaks {PROTOCOL_VERSION}"
            )));
        }
        Reply::Error { message, .. } => return Err(StoreError::Refused(message)),
        other => {
            return Err(StoreError::Protocol(format!(
                "expected a welcome, got {other:?}"
            )));
        }
    };
    let fd = fd.ok_or_else(|| StoreError::Protocol("welcome without the arena fd".into()))?;
    Ok((stream, index, fd))
}

fn reply_error(r: Reply, id: ObjectId) -> StoreError {
    match r {
        Reply::Error {
            code,
            nums,
            message,
        } => Reply::into_error(code, nums, message, id),
        other => StoreError::Protocol(format!("unexpected reply {other:?}")),
    }
}

/// A writable buffer for an object being created. `seal` publishes it; drop aborts it.
pub struct ObjectWriter {
    client: StoreClient,
    id: ObjectId,
    ptr: *mut u8,
    len: usize,
    done: bool,
}

// SAFETY: the buffer is owned by this writer alone (the daemon gave this range to this client
// for this object, and no other process reads an unsealed object), so moving it between
// threads is fine.
unsafe impl Send for ObjectWriter {}

impl ObjectWriter {
    pub fn id(&self) -> ObjectId {
        self.id
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: [ptr, ptr+len) is inside the mapping (checked at create), exclusively ours
        // until seal or abort, and the mapping outlives self (self holds the client).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }
    /// Seals the object: it becomes immutable and visible to every client.
    pub fn seal(mut self) -> Result<()> {
        self.done = true;
        self.client.seal(self.id)
    }
    /// Aborts the object explicitly (same as dropping the writer).
    pub fn abort(mut self) -> Result<()> {
        self.done = true;
        self.client.abort(self.id)
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.client.abort(self.id);
        }
    }
}

/// A pinned, zero-copy view of a sealed object. The object stays in memory while this lives;
/// dropping it releases the pin.
pub struct ObjectView {
    client: StoreClient,
    id: ObjectId,
    offset: u64,
    ptr: *const u8,
    len: usize,
    error: bool,
    /// Keeps a local value's bytes (see [`StoreClient::resolve_local`]) alive.
    _local: Option<Arc<Local>>,
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
    /// pointer would be undefined behaviour. `None` for a value held in process memory.
    pub fn shared_ptr(&self) -> Option<*mut u8> {
        self._local.is_none().then_some(self.ptr as *mut u8)
    }
    /// The object's offset in the arena (`u64::MAX` for a value held in process memory).
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
            _local: self._local.clone(),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.conn.flush();
    }
}

impl Drop for ObjectView {
    fn drop(&mut self) {
        self.client.release(&self.id);
    }
}

/// A writable buffer for an owned (reference-counted) object. [`OwnedWriter::publish`] seals
/// it and leaves this process holding one reference; dropping it unpublished abandons it.
pub struct OwnedWriter {
    client: StoreClient,
    id: ObjectId,
    offset: u64,
    ptr: *mut u8,
    len: usize,
    small: bool,
    done: bool,
}

// SAFETY: the buffer is this writer's alone until it is published (a slab range this client
// allocated, or an object the daemon created for it), so moving it between threads is fine.
unsafe impl Send for OwnedWriter {}

impl OwnedWriter {
    pub fn id(&self) -> ObjectId {
        self.id
    }
    /// Where the object is in the arena.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: [ptr, ptr+len) is inside the heap (checked at allocation) and exclusively
        // ours until published; the mapping outlives self (self holds the client).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as for `as_mut_slice`; `&self` excludes writers through this object.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Seals the object; `contained` are ids of objects it references (kept alive while it
    /// lives). This process then holds one reference, dropped with [`StoreClient::release`].
    pub fn publish(self, contained: &[ObjectId]) -> Result<()> {
        self.publish_with(Owned {
            contained: contained.to_vec(),
            keep: true,
            ..Owned::default()
        })
    }

    /// Seals the object as `owned` says. This process holds a reference afterwards only if
    /// `owned.keep`.
    pub fn publish_with(mut self, owned: Owned) -> Result<()> {
        self.done = true;
        let c = &self.client;
        if owned.contained.len() > protocol::MAX_IDS {
            if !self.small {
                let _ = c.abort(self.id);
            }
            return Err(StoreError::InvalidRequest(format!(
                "an object may reference at most {} others, not {}",
                protocol::MAX_IDS,
                owned.contained.len()
            )));
        }
        let keep = owned.keep;
        // A one-way publish names the objects it contains: until the daemon has handled it,
        // they must not lose this process's pins by a local unpin that could overtake it (the
        // daemon would then see neither pin nor holder, and free them). Their releases go as
        // `Unhold`s queued behind it, as for an id whose own `Hold` is unhandled.
        let contained = if self.small {
            owned.contained.clone()
        } else {
            Vec::new()
        };
        let seq = if self.small {
            c.inner.conn.send(
                0,
                &Request::PutSmall {
                    id: self.id,
                    offset: self.offset,
                    size: self.len as u64,
                    owned,
                },
            )?
        } else {
            let req = c.inner.conn.next_req.fetch_add(1, Ordering::Relaxed);
            let seq = c
                .inner
                .conn
                .send(req, &Request::SealOwned { id: self.id, owned })?;
            let reply = c.inner.conn.wait_reply(|st| st.replies.remove(&req))?;
            c.inner.conn.synced.fetch_max(seq, Ordering::AcqRel);
            if !matches!(reply, Reply::Ok) {
                return Err(reply_error(reply, self.id));
            }
            seq
        };
        if !contained.is_empty() {
            let mut holds = lock(&c.inner.holds);
            for id in &contained {
                if let Some(h) = holds.map.get_mut(id)
                    && h.local.is_none()
                {
                    h.daemon_seq = Some(h.daemon_seq.map_or(seq, |s| s.max(seq)));
                }
            }
        }
        if !keep {
            return Ok(());
        }
        let mut holds = lock(&c.inner.holds);
        holds.unholding.remove(&self.id);
        let h = holds
            .map
            .entry(self.id)
            .or_insert_with(|| Held::by_daemon(seq));
        h.count += 1;
        h.loc = Some((self.offset, self.len as u64));
        h.daemon_seq = Some(seq);
        Ok(())
    }
}

impl Drop for OwnedWriter {
    fn drop(&mut self) {
        if self.small {
            // Published (its frame is queued: runs after `publish_with`'s send) or abandoned.
            if let Some(s) = &mut *lock(&self.client.inner.slab)
                && (s.start..s.end).contains(&self.offset)
            {
                s.outstanding = s.outstanding.saturating_sub(1);
            }
        }
        if !self.done && !self.small {
            let _ = self.client.abort(self.id);
        }
    }
}
