//! `StoreClient`: a connection to the daemon plus the mapped arena.
//!
//! Gets of sealed objects are served from shared memory without asking the daemon: a lock-free
//! directory lookup, then a pin (this client's bit in the slot's pin mask). An *overflow
//! client* (an index past the 127 with a bit, see `shm::PIN_CLIENTS`) pins through the daemon
//! instead: its first reference to an object is a `Pin` round trip (or a `Hold`), its last
//! release an `Unhold` frame, in order with its other frames. Everything that
//! changes the table (create, seal, abort, delete, evict) and every wait goes over the socket.
//! The socket is shared by the threads of a process: requests carry ids, and whichever thread
//! is waiting reads replies for everybody (see `Conn::call`).
//!
//! Here: `StoreClient` and the verbs (connect, create, seal, put, get, delete, list, ...).
//! `conn`: the connection, request/reply, frame batching and numbering, the debt hooks.
//! `holds`: per-object counts, pins, releases, pending adoptions, `ObjectView`. `writers`:
//! `ObjectWriter`, `OwnedWriter` and the client's slab. `notices`: the notification ring and
//! `wait_ready`.
//!
//! The client knows only store objects: a reference it counts is to an object in the store,
//! or to one another process will create for it (a pending adoption). What a user of the
//! client keeps outside the store is that user's to count (`abandon_pending` hands such a
//! reference over).
//!
//! Architecture invariant: the client knows nothing of the daemon but the protocol (it imports
//! `protocol` and the building blocks, never `daemon`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::blocks::id::ObjectId;
use crate::blocks::shm::{Arena, Lookup};
use crate::error::{Result, StoreError};
use crate::protocol::{self, DeleteOutcome, ObjectInfo, Reply, Request, Stats};

mod conn;
mod holds;
mod notices;
mod writers;

use conn::{BATCH_LIMIT, Conn, ReadState, Writer, handshake};
pub use conn::{FrameObserver, Subscription};
use holds::Holds;
pub use holds::{ObjectView, shrink_if_sparse};
use notices::Notes;
pub use notices::Readiness;
use writers::ClientSlab;
pub use writers::{ObjectWriter, OwnedWriter, SMALL_OBJECT_MAX};

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

struct Inner {
    arena: Arena,
    /// This client's notification ring: the daemon closes it when the connection ends (a
    /// client it cut off sees that without a round trip).
    ring: crate::blocks::ring::RingRef,
    conn: Conn,
    index: u32,
    /// This client has no pin bit of its own (its index is past `Layout::pin_clients`): it
    /// pins through the daemon (`Pin`, `Hold`) and unpins with `Unhold` frames.
    overflow: bool,
    /// The pid that connected (a client is never used across a fork).
    pid: u32,
    socket: PathBuf,
    holds: Mutex<Holds>,
    slab: Mutex<Option<ClientSlab>>,
    notes: Mutex<Notes>,
    notes_cv: Condvar,
    /// This client's process forks (the zygote): the client starts no thread of its own
    /// (see [`StoreClient::forbid_threads`]).
    no_threads: std::sync::atomic::AtomicBool,
    /// The read-behind helper's queue (see `StoreClient::view`), once it has started.
    populator: Mutex<Option<std::sync::mpsc::Sender<(u64, u64)>>>,
    /// Until when (`monotonic_ns`) this client asks for no new slab: the daemon refused one
    /// (client slabs at their share of the store), so small objects go to the daemon.
    slab_refused_until: std::sync::atomic::AtomicU64,
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

pub use crate::blocks::shm::POPULATE_MIN;
use crate::blocks::shm::populate_threads;

impl StoreClient {
    /// Connects to the daemon at `socket` and maps its arena.
    pub fn connect(socket: impl AsRef<Path>) -> Result<StoreClient> {
        let socket = socket.as_ref();
        let (stream, index, fd) = handshake(socket)?;
        let arena = Arena::attach(fd)?;
        let ring = arena.attach_ring(index)?;
        let consumer = ring.consumer();
        let overflow = arena.layout().is_overflow_client(index);
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
                        observer: None,
                        flusher_waiting: false,
                    }),
                    queued: Condvar::new(),
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
                overflow,
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
                no_threads: std::sync::atomic::AtomicBool::new(false),
                slab_refused_until: std::sync::atomic::AtomicU64::new(0),
                populator: Mutex::new(None),
            }),
        })
    }

    /// This client's index (its bit in the pin masks, unless it is an overflow client).
    pub fn client_index(&self) -> u32 {
        self.inner.index
    }

    /// Whether this client is an *overflow client*: one past the clients that pin with a bit
    /// of their own (see `shm::PIN_CLIENTS`). It can do everything another client can; its
    /// first pin of an object is a round trip to the daemon, its last release a one-way frame.
    pub fn is_overflow_client(&self) -> bool {
        self.inner.overflow
    }

    pub fn socket_path(&self) -> &Path {
        &self.inner.socket
    }

    pub fn arena(&self) -> &Arena {
        &self.inner.arena
    }

    /// Pre-faults this process's page tables for the whole heap, allocating the memfd's pages
    /// that do not exist yet (the daemon's pre-fault allocates them as objects reach them;
    /// each process still pays a minor fault per page on first touch of its own mapping).
    /// On an arena of pool pages, a page allocated here is charged to this process's hugetlb
    /// cgroup; where that allows none, this is an error (`EFAULT`), not a signal.
    pub fn populate(&self) -> std::io::Result<()> {
        let l = *self.inner.arena.layout();
        self.inner.arena.populate(l.heap_offset, l.heap_len)
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
    ///
    /// A large object's range is populated in this process's mapping first (see
    /// [`Arena::populate_once`]), so that the writer does not take a page fault per 4 KiB.
    /// The daemon leaves that to us: a fresh range's pages are allocated in the same pass
    /// that fills our page tables; a range of 64 MiB or more on as many threads as there are
    /// cores (up to 4), unless this client may start none. (So the pages of a large object
    /// are charged to its creator's memory cgroup, not the daemon's; except on pages of the
    /// huge page pool, which the daemon allocates before it replies, and this pass only maps.)
    pub fn create_raw(&self, id: ObjectId, size: u64) -> Result<u64> {
        match self.call(&Request::Create { id, size })? {
            Reply::Created { offset } => {
                if size >= POPULATE_MIN {
                    let threads = if self.threads_allowed() {
                        populate_threads()
                    } else {
                        1
                    };
                    // Only a speed-up: an old kernel without MADV_POPULATE_WRITE faults instead.
                    let _ = self.inner.arena.populate_once_with(offset, size, threads);
                }
                Ok(offset)
            }
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

    /// Gives up an id that nobody is creating and that is not sealed (a call's result that
    /// could not be stored): the store reports it lost to its waiters.
    pub fn give_up(&self, id: ObjectId) -> Result<()> {
        self.expect_ok(&Request::GiveUp { id }, id)
    }

    /// This client's process forks, so it must stay single-threaded: the client starts no
    /// helper thread (a large object's first view fills its page tables on first touch
    /// only).
    pub fn forbid_threads(&self) {
        self.inner
            .no_threads
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn threads_allowed(&self) -> bool {
        !self
            .inner
            .no_threads
            .load(std::sync::atomic::Ordering::Relaxed)
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

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.conn.flush();
    }
}
