//! The store daemon: owns the arena, the allocator, the object table and per-client state, and
//! serves the control-plane protocol on a Unix socket.
//!
//! Threads: one accept loop, one thread per client connection (so a request that waits, such
//! as `Wait` with a timeout, never blocks other clients: it is parked in the waiter table and
//! answered later by whichever thread seals the object, or by the timer thread), one timer
//! thread for wait deadlines, and one background pre-fault thread. All table state is behind
//! one mutex; socket writes happen outside it.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Write};
use std::net::Shutdown;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use tracing::{debug, info, warn};

use crate::alloc::Allocator;
use crate::error::{Result, StoreError};
use crate::id::ObjectId;
use crate::protocol::Owned;
use crate::protocol::{
    self, DeleteOutcome, Event, MAX_REQUEST, ObjectInfo, ObjectState, PROTOCOL_VERSION, Reply,
    Request, Stats,
};
use crate::ring::{Producer, RingError};
use crate::shm::{Arena, FLAG_ERROR, FLAG_REFCOUNTED, Layout, MAX_CLIENTS, Removal};
use crate::sock;

/// How the daemon is set up.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    /// Bytes of object space.
    pub memory: u64,
    /// Pre-fault the whole arena before accepting clients (otherwise: in the background).
    pub prefault: bool,
    /// Most live objects; default from [`Layout::default_max_objects`].
    pub max_objects: Option<u64>,
}

/// How long a blocking reply write to a client may take before the client is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const PREFAULT_CHUNK: u64 = 64 << 20;
/// Bounds of a client slab.
const MIN_SLAB: u64 = 64 << 10;
const MAX_SLAB: u64 = 64 << 20;
/// Notifications kept for a client whose ring is full; beyond this it is disconnected.
const MAX_BACKLOG: usize = 1 << 20;
/// Ids remembered as lost (aborted unsealed), so a late `Watch` still learns of the loss.
const LOST_MEMORY: usize = 1 << 16;

/// A bound, not yet running daemon.
pub struct Daemon {
    shared: Arc<Shared>,
    listener: UnixListener,
    socket: PathBuf,
    lock_path: PathBuf,
    _lock: Flock<File>,
}

/// Stops a running daemon from another thread (or a signal handler thread).
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
}

struct Shared {
    arena: Arena,
    table: Mutex<Table>,
    timer_cv: Condvar,
    uid: u32,
    stopping: AtomicBool,
    listener_fd: std::os::fd::RawFd,
    /// Heap bytes (from the heap start) that the pre-fault thread has populated.
    prefaulted: AtomicU64,
}

struct Conn {
    stream: UnixStream,
    write_lock: Mutex<()>,
}

impl Conn {
    /// A reply to this connection's own request: may block (bounded by the write timeout).
    fn reply(&self, frame: &[u8]) -> std::io::Result<()> {
        let _g = lock(&self.write_lock);
        (&self.stream).write_all(frame)
    }
    /// A push caused by another client (wake-up, event): never blocks; a client that does not
    /// read is disconnected.
    fn push(&self, frame: &[u8]) {
        let _g = lock(&self.write_lock);
        if let Err(e) = sock::send_nonblocking(&self.stream, frame) {
            debug!("dropping a client that does not read its socket: {e}");
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryState {
    Creating,
    Sealed,
    DeletePending,
}

struct Entry {
    slot: u64,
    offset: u64,
    size: u64,
    /// Bytes the allocator gave (size rounded up).
    alloc_len: u64,
    state: EntryState,
    owner: u32,
    created: Instant,
    /// The LRU key under which a sealed object sits in `Table::lru`.
    lru_key: u64,
    /// Freed when unreferenced instead of being kept for LRU (see `FLAG_REFCOUNTED`).
    refcounted: bool,
    /// How many live objects contain a reference to this one.
    holders: u32,
    /// Objects this one references (each counted in their `holders`).
    contains: Vec<ObjectId>,
    /// The client slab this object lives in (its memory is the slab's), if any.
    slab: Option<u64>,
}

impl Entry {
    /// A new entry in state CREATING; `slab` for a small object placed in a client slab
    /// (those are always reference-counted).
    fn creating(
        slot: u64,
        offset: u64,
        size: u64,
        alloc_len: u64,
        owner: u32,
        slab: Option<u64>,
    ) -> Entry {
        Entry {
            slot,
            offset,
            size,
            alloc_len,
            state: EntryState::Creating,
            owner,
            created: Instant::now(),
            lru_key: 0,
            refcounted: slab.is_some(),
            holders: 0,
            contains: Vec::new(),
            slab,
        }
    }
}

/// A block of the heap granted to one client, which places small objects in it itself.
struct Slab {
    owner: u32,
    len: u64,
    /// One bit per 64-byte granule already given to an object: a granule is used once, so
    /// objects never overlap, whatever order a client's threads publish them in.
    used: Vec<u64>,
    live: u32,
    /// The client moved on to another slab (or left): freed when `live` reaches 0.
    retired: bool,
}

struct ClientState {
    conn: Arc<Conn>,
    pid: i32,
    creating: HashSet<ObjectId>,
    subscribed: bool,
    /// The producer end of this client's notification ring.
    ring: Producer,
    /// Notifications that did not fit in the ring, pushed on `Flush`.
    backlog: VecDeque<[u8; NOTICE_LEN]>,
    /// The slab this client currently places small objects in.
    slab: Option<u64>,
}

/// A notification: kind, then the id.
pub const NOTICE_LEN: usize = 1 + crate::id::ID_LEN;
/// The object was sealed.
pub const NOTICE_READY: u8 = 1;
/// The object was aborted before it was sealed (or its creator died).
pub const NOTICE_LOST: u8 = 2;

impl ClientState {
    fn notify(&mut self, kind: u8, id: &ObjectId) {
        let mut msg = [0u8; NOTICE_LEN];
        msg[0] = kind;
        msg[1..].copy_from_slice(id.as_bytes());
        if self.backlog.is_empty() {
            match self.ring.try_push(&msg) {
                Ok(()) => return,
                Err(RingError::Full) => {}
                Err(e) => {
                    debug!("notification ring of pid {}: {e}", self.pid);
                    return;
                }
            }
        }
        if self.backlog.len() >= MAX_BACKLOG {
            warn!(
                "pid {} does not read its notifications: disconnecting it",
                self.pid
            );
            let _ = self.conn.stream.shutdown(Shutdown::Both);
            return;
        }
        self.backlog.push_back(msg);
        self.ring.ring().wake_consumer();
    }

    fn flush(&mut self) {
        while let Some(msg) = self.backlog.front() {
            if self.ring.try_push(msg).is_err() {
                self.ring.ring().wake_consumer();
                return;
            }
            self.backlog.pop_front();
        }
    }
}

struct Waiter {
    client: u32,
    req: u64,
    ids: Vec<ObjectId>,
    ready: Vec<bool>,
    remaining: usize,
    deadline: Option<Instant>,
}

struct Table {
    alloc: Allocator,
    objects: HashMap<ObjectId, Entry>,
    /// Sealed, not delete-pending objects by (last use as last seen, id).
    lru: BTreeSet<(u64, ObjectId)>,
    pending_delete: HashSet<ObjectId>,
    clients: HashMap<u32, ClientState>,
    free_indices: Vec<u32>,
    waiters: HashMap<u64, Waiter>,
    waiting_on: HashMap<ObjectId, Vec<u64>>,
    deadlines: BTreeSet<(Instant, u64)>,
    next_waiter: u64,
    evictions: u64,
    max_objects: u64,
    slabs: HashMap<u64, Slab>,
    /// Bytes of live slabs, and of the objects in them.
    slab_bytes: u64,
    slab_object_bytes: u64,
    /// `Hold`s of ids not sealed yet: the pin bits are set at seal.
    holds: HashMap<ObjectId, Vec<u32>>,
    /// Clients to notify when an id is sealed or lost.
    watchers: HashMap<ObjectId, Vec<u32>>,
    lost: VecDeque<ObjectId>,
    lost_set: HashSet<ObjectId>,
    /// References from live objects to ids that were not sealed when those objects were:
    /// they become the id's `holders` when it is sealed.
    pending_holders: HashMap<ObjectId, u32>,
    /// Clients that dropped their reference to an id before it was sealed: a `pin_for`
    /// naming them at seal is ignored.
    early_unholds: HashMap<ObjectId, Vec<u32>>,
}

/// Frames to send once the table lock is released.
#[derive(Default)]
struct Outbox(Vec<(Arc<Conn>, Vec<u8>)>);

impl Outbox {
    fn flush(self) {
        for (conn, frame) in self.0 {
            conn.push(&frame);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock is a bug; the state is still consistent enough to serve
    // (every mutation is completed before any call that may panic), so do not cascade.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Daemon {
    /// Creates the arena, takes the socket's lock and binds the socket.
    pub fn bind(cfg: &DaemonConfig) -> Result<Daemon> {
        let dir = cfg
            .socket
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        sock::ensure_private_dir(dir)?;
        let lock_path = lock_path(&cfg.socket);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| StoreError::AlreadyRunning(cfg.socket.display().to_string()))?;
        // We hold the lock: any socket file left there is stale.
        match fs::remove_file(&cfg.socket) {
            Ok(()) => info!("removed a stale socket at {}", cfg.socket.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let max_objects = cfg
            .max_objects
            .unwrap_or_else(|| Layout::default_max_objects(cfg.memory));
        let layout = Layout::new(cfg.memory, max_objects)?;
        let arena = Arena::create(layout)?;
        if cfg.prefault {
            let t = Instant::now();
            arena.populate(layout.heap_offset, layout.heap_len)?;
            info!(
                "pre-faulted {} in {:?}",
                crate::size::format_size(layout.heap_len),
                t.elapsed()
            );
        }
        let listener = UnixListener::bind(&cfg.socket)?;
        fs::set_permissions(
            &cfg.socket,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        use std::os::fd::AsRawFd;
        let listener_fd = listener.as_raw_fd();
        let shared = Arc::new(Shared {
            prefaulted: AtomicU64::new(if cfg.prefault { layout.heap_len } else { 0 }),
            arena,
            table: Mutex::new(Table {
                alloc: Allocator::new(layout.heap_offset, layout.heap_len),
                objects: HashMap::new(),
                lru: BTreeSet::new(),
                pending_delete: HashSet::new(),
                clients: HashMap::new(),
                free_indices: (0..MAX_CLIENTS).rev().collect(),
                waiters: HashMap::new(),
                waiting_on: HashMap::new(),
                deadlines: BTreeSet::new(),
                next_waiter: 1,
                evictions: 0,
                max_objects: layout.dir_slots / 2,
                slabs: HashMap::new(),
                slab_bytes: 0,
                slab_object_bytes: 0,
                holds: HashMap::new(),
                watchers: HashMap::new(),
                lost: VecDeque::new(),
                lost_set: HashSet::new(),
                pending_holders: HashMap::new(),
                early_unholds: HashMap::new(),
            }),
            timer_cv: Condvar::new(),
            uid: nix::unistd::getuid().as_raw(),
            stopping: AtomicBool::new(false),
            listener_fd,
        });
        info!(
            "store at {}: {} of object space, {} object slots",
            cfg.socket.display(),
            crate::size::format_size(layout.heap_len),
            layout.dir_slots / 2
        );
        Ok(Daemon {
            shared,
            listener,
            socket: cfg.socket.clone(),
            lock_path,
            _lock: lock,
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until [`ShutdownHandle::shutdown`]; then disconnects every client and removes
    /// the socket and its lock file.
    pub fn run(self) -> Result<()> {
        let sh = self.shared.clone();
        let timer = std::thread::Builder::new()
            .name("troved-timer".into())
            .spawn(move || timer_loop(&sh))?;
        if self.shared.prefaulted.load(Ordering::Relaxed) < self.shared.arena.layout().heap_len {
            let sh = self.shared.clone();
            std::thread::Builder::new()
                .name("troved-prefault".into())
                .spawn(move || prefault_loop(&sh))?;
        }
        for stream in self.listener.incoming() {
            if self.shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            match stream {
                Ok(s) => self.accept(s),
                Err(e) => {
                    if self.shared.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    warn!("accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        self.shared.stopping.store(true, Ordering::SeqCst);
        {
            let t = lock(&self.shared.table);
            for c in t.clients.values() {
                let _ = c.conn.stream.shutdown(Shutdown::Both);
            }
        }
        self.shared.timer_cv.notify_all();
        let _ = timer.join();
        let _ = fs::remove_file(&self.socket);
        let _ = fs::remove_file(&self.lock_path);
        info!("store at {} stopped", self.socket.display());
        Ok(())
    }

    fn accept(&self, stream: UnixStream) {
        let (uid, pid) = match sock::peer_cred(&stream) {
            Ok(c) => c,
            Err(e) => {
                warn!("no peer credentials: {e}");
                return;
            }
        };
        let refuse = |why: String| {
            warn!("refusing a client (pid {pid}, uid {uid}): {why}");
            let _ = (&stream).write_all(&Reply::error(&StoreError::Refused(why)).encode(0));
        };
        if uid != self.shared.uid {
            refuse(format!(
                "uid {uid} may not use a store owned by uid {}",
                self.shared.uid
            ));
            return;
        }
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let writer = match stream.try_clone() {
            Ok(w) => w,
            Err(e) => return warn!("try_clone: {e}"),
        };
        let conn = Arc::new(Conn {
            stream: writer,
            write_lock: Mutex::new(()),
        });
        let index = {
            let mut t = lock(&self.shared.table);
            let Some(index) = t.free_indices.pop() else {
                drop(t);
                refuse(format!("too many clients (at most {MAX_CLIENTS})"));
                return;
            };
            let ring = match self.shared.arena.init_ring(index) {
                Ok(r) => r,
                Err(e) => {
                    t.free_indices.push(index);
                    drop(t);
                    refuse(format!("notification ring: {e}"));
                    return;
                }
            };
            t.clients.insert(
                index,
                ClientState {
                    conn: conn.clone(),
                    pid,
                    creating: HashSet::new(),
                    subscribed: false,
                    ring: ring.producer(),
                    backlog: VecDeque::new(),
                    slab: None,
                },
            );
            index
        };
        let (ring_offset, ring_len) = self
            .shared
            .arena
            .layout()
            .ring_region(index)
            .expect("index below MAX_CLIENTS");
        let welcome = Reply::Welcome {
            version: PROTOCOL_VERSION,
            client_index: index,
            ring_offset,
            ring_len,
        }
        .encode(0);
        if let Err(e) = sock::send_with_fd(&stream, &welcome, self.shared.arena.fd()) {
            warn!("welcome to pid {pid} failed: {e}");
            self.shared.disconnect(index);
            return;
        }
        debug!("client {index} (pid {pid}) connected");
        let sh = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("troved-client-{index}"))
            .spawn(move || {
                sh.serve(index, stream, conn);
                sh.disconnect(index);
            });
        if let Err(e) = spawned {
            warn!("cannot spawn a client thread: {e}");
            self.shared.disconnect(index);
        }
    }
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wakes the blocked accept(): on Linux, shutdown of a listening socket makes accept fail.
        // SAFETY-free: a plain syscall on an fd the daemon owns for its whole life.
        let _ =
            nix::sys::socket::shutdown(self.shared.listener_fd, nix::sys::socket::Shutdown::Both);
        self.shared.timer_cv.notify_all();
    }
}

fn lock_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

fn timer_loop(sh: &Shared) {
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
        t = match t.deadlines.first() {
            Some(&(when, _)) => {
                sh.timer_cv
                    .wait_timeout(t, when.saturating_duration_since(now))
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => sh.timer_cv.wait(t).unwrap_or_else(|p| p.into_inner()),
        };
    }
}

fn prefault_loop(sh: &Shared) {
    let l = *sh.arena.layout();
    let t = Instant::now();
    let mut done = sh.prefaulted.load(Ordering::Relaxed);
    while done < l.heap_len && !sh.stopping.load(Ordering::Relaxed) {
        let n = PREFAULT_CHUNK.min(l.heap_len - done);
        if let Err(e) = sh.arena.populate(l.heap_offset + done, n) {
            warn!("background pre-fault stopped: {e}");
            return;
        }
        done += n;
        sh.prefaulted.store(done, Ordering::Release);
    }
    debug!("background pre-fault done in {:?}", t.elapsed());
}

impl Shared {
    fn serve(&self, index: u32, stream: UnixStream, conn: Arc<Conn>) {
        let mut r = BufReader::with_capacity(64 << 10, stream);
        loop {
            let body = match protocol::read_frame(&mut r, MAX_REQUEST) {
                Ok(Some(b)) => b,
                Ok(None) => return,
                Err(e) => {
                    debug!("client {index}: closing: {e}");
                    let _ = conn.reply(&Reply::error(&e).encode(0));
                    return;
                }
            };
            let (req, reply) = match Request::decode(&body) {
                Ok((req, request)) => (req, self.handle(index, req, request)),
                Err(e) => {
                    // Framing is intact, so answer and keep serving.
                    let req = body
                        .get(1..9)
                        .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
                    (req, Some(Reply::error(&e)))
                }
            };
            if let Some(reply) = reply
                && req != 0
                && conn.reply(&reply.encode(req)).is_err()
            {
                return;
            }
        }
    }

    /// Handles one request; `None` when the reply comes later (a parked wait) or not at all.
    fn handle(&self, client: u32, req: u64, request: Request) -> Option<Reply> {
        let mut out = Outbox::default();
        let reply = {
            let mut t = lock(&self.table);
            match request {
                Request::Create { id, size } => Some(
                    t.create(&self.arena, client, id, size, &mut out)
                        .map_or_else(|e| Reply::error(&e), |offset| Reply::Created { offset }),
                ),
                Request::Seal { id } => Some(to_reply(t.seal(&self.arena, client, id, &mut out))),
                Request::Abort { id } => Some(to_reply(t.abort(&self.arena, client, id))),
                Request::Wait { ids, timeout } => {
                    let r = t.wait(client, req, ids, timeout);
                    if r.is_none() {
                        self.timer_cv.notify_all();
                    }
                    r
                }
                Request::Contains { id } => Some(Reply::Bool(
                    t.objects
                        .get(&id)
                        .is_some_and(|e| e.state == EntryState::Sealed),
                )),
                Request::Delete { ids } => Some(Reply::Deleted {
                    outcomes: ids
                        .iter()
                        .map(|id| t.delete(&self.arena, *id, &mut out))
                        .collect(),
                }),
                Request::List => Some(Reply::Listed {
                    objects: t.list(&self.arena),
                }),
                Request::Evict { bytes } => {
                    let (count, bytes) = t.evict(&self.arena, bytes, &mut out);
                    Some(Reply::Evicted { count, bytes })
                }
                Request::Subscribe => {
                    if let Some(c) = t.clients.get_mut(&client) {
                        c.subscribed = true;
                    }
                    Some(Reply::Ok)
                }
                Request::Release { id } => {
                    t.release(&self.arena, id, &mut out);
                    (req != 0).then_some(Reply::Ok)
                }
                Request::Stats => Some(Reply::Stats(t.stats(&self.arena))),
                Request::Slab { size } => {
                    Some(t.slab(&self.arena, client, size, &mut out).map_or_else(
                        |e| Reply::error(&e),
                        |(offset, len)| Reply::Slab { offset, len },
                    ))
                }
                Request::PutSmall {
                    id,
                    offset,
                    size,
                    owned,
                } => {
                    let r = t.put_small(&self.arena, client, id, offset, size, &owned, &mut out);
                    if let Err(e) = &r
                        && req == 0
                    {
                        // Two processes may report the same failed call (ActorDied): the
                        // second finds it exists. Nothing else can be done for a notice.
                        debug!("client {client}: put of {id} failed: {e}");
                    }
                    (req != 0).then(|| to_reply(r))
                }
                Request::SealOwned { id, owned } => Some(to_reply(t.seal_owned(
                    &self.arena,
                    client,
                    id,
                    &owned,
                    &mut out,
                ))),
                Request::Hold { id } => {
                    t.hold(&self.arena, client, id);
                    (req != 0).then_some(Reply::Ok)
                }
                Request::Unhold { id } => {
                    t.unhold(&self.arena, client, id, &mut out);
                    (req != 0).then_some(Reply::Ok)
                }
                Request::Watch { ids } => {
                    t.watch(client, &ids);
                    (req != 0).then_some(Reply::Ok)
                }
                Request::Flush => {
                    if let Some(c) = t.clients.get_mut(&client) {
                        c.flush();
                    }
                    (req != 0).then_some(Reply::Ok)
                }
            }
        };
        out.flush();
        // A fresh allocation in a region the background pre-fault has not reached yet:
        // populate it now, outside the lock, so the client's writes do not pay first-touch faults.
        let fresh = match &reply {
            Some(Reply::Created { offset }) => lock(&self.table)
                .objects
                .values()
                .find(|e| e.offset == *offset)
                .map(|e| (*offset, e.alloc_len)),
            Some(Reply::Slab { offset, len }) => Some((*offset, *len)),
            _ => None,
        };
        if let Some((off, len)) = fresh {
            let l = self.arena.layout();
            let done = l.heap_offset + self.prefaulted.load(Ordering::Acquire);
            if off + len > done {
                let _ = self.arena.populate(off, len);
            }
        }
        reply
    }

    /// Forgets a client: aborts what it was creating, drops its waiters and its pins.
    fn disconnect(&self, index: u32) {
        let mut out = Outbox::default();
        {
            let mut t = lock(&self.table);
            let Some(c) = t.clients.remove(&index) else {
                return;
            };
            let _ = c.conn.stream.shutdown(Shutdown::Both);
            for id in c.creating {
                let _ = t.abort(&self.arena, index, id);
            }
            let mine: Vec<u64> = t
                .waiters
                .iter()
                .filter(|(_, w)| w.client == index)
                .map(|(k, _)| *k)
                .collect();
            for w in mine {
                t.drop_waiter(w);
            }
            // A client's pin bits can only sit on live entries (a pin on an entry being removed
            // makes the removal fail), so clearing them there is enough: O(objects), not
            // O(directory slots), under the table lock.
            let dir = self.arena.directory();
            for e in t.objects.values() {
                dir.unpin_for(e.slot, index);
            }
            let pending: Vec<ObjectId> = t.pending_delete.iter().copied().collect();
            for id in pending {
                t.release(&self.arena, id, &mut out);
            }
            for list in t.holds.values_mut() {
                list.retain(|c| *c != index);
            }
            t.holds.retain(|_, l| !l.is_empty());
            for list in t.watchers.values_mut() {
                list.retain(|c| *c != index);
            }
            t.watchers.retain(|_, l| !l.is_empty());
            for list in t.early_unholds.values_mut() {
                list.retain(|c| *c != index);
            }
            t.early_unholds.retain(|_, l| !l.is_empty());
            let refcounted: Vec<ObjectId> = t
                .objects
                .iter()
                .filter(|(_, e)| e.refcounted)
                .map(|(id, _)| *id)
                .collect();
            for id in refcounted {
                t.check_free(&self.arena, id, &mut out);
            }
            let mine: Vec<u64> = t
                .slabs
                .iter()
                .filter(|(_, s)| s.owner == index)
                .map(|(o, _)| *o)
                .collect();
            for off in mine {
                t.retire_slab(off);
            }
            t.free_indices.push(index);
            debug!("client {index} (pid {}) disconnected", c.pid);
        }
        out.flush();
    }
}

fn to_reply(r: Result<()>) -> Reply {
    match r {
        Ok(()) => Reply::Ok,
        Err(e) => Reply::error(&e),
    }
}

impl Table {
    fn create(
        &mut self,
        arena: &Arena,
        client: u32,
        id: ObjectId,
        size: u64,
        out: &mut Outbox,
    ) -> Result<u64> {
        if self.objects.contains_key(&id) {
            return Err(StoreError::AlreadyExists(id));
        }
        self.make_room_in_directory(arena, out)?;
        let offset = self.allocate(arena, size, out)?;
        let alloc_len = self.alloc.block_len(offset).unwrap_or(size);
        let Some(slot) = arena.directory().insert(&id, offset, size, client) else {
            self.alloc.free(offset);
            return Err(StoreError::DirectoryFull {
                capacity: self.max_objects,
            });
        };
        self.objects.insert(
            id,
            Entry::creating(slot, offset, size, alloc_len, client, None),
        );
        if let Some(c) = self.clients.get_mut(&client) {
            c.creating.insert(id);
        }
        Ok(offset)
    }

    fn make_room_in_directory(&mut self, arena: &Arena, out: &mut Outbox) -> Result<()> {
        while self.objects.len() as u64 >= self.max_objects {
            if self.evict_one(arena, out, &mut Vec::new()).is_none() {
                return Err(StoreError::DirectoryFull {
                    capacity: self.max_objects,
                });
            }
        }
        Ok(())
    }

    /// Allocates `size` heap bytes, evicting unpinned LRU objects if needed.
    fn allocate(&mut self, arena: &Arena, size: u64, out: &mut Outbox) -> Result<u64> {
        let capacity = self.alloc.capacity();
        if size > capacity {
            return Err(StoreError::StoreFull {
                requested: size,
                capacity,
                pinned: self.pinned_bytes(arena),
            });
        }
        let mut skipped = Vec::new();
        let offset = loop {
            if let Some(off) = self.alloc.alloc(size) {
                break Some(off);
            }
            if self.evict_one(arena, out, &mut skipped).is_none() {
                break None;
            }
        };
        for k in skipped {
            self.lru.insert(k);
        }
        offset.ok_or_else(|| StoreError::StoreFull {
            requested: size,
            capacity,
            pinned: self.pinned_bytes(arena),
        })
    }

    fn seal(&mut self, arena: &Arena, client: u32, id: ObjectId, out: &mut Outbox) -> Result<()> {
        self.check_sealable(client, id)?;
        self.publish(arena, client, id, None, out);
        Ok(())
    }

    fn seal_owned(
        &mut self,
        arena: &Arena,
        client: u32,
        id: ObjectId,
        owned: &Owned,
        out: &mut Outbox,
    ) -> Result<()> {
        self.check_sealable(client, id)?;
        self.publish(arena, client, id, Some(owned), out);
        Ok(())
    }

    fn check_sealable(&self, client: u32, id: ObjectId) -> Result<()> {
        let e = self.objects.get(&id).ok_or(StoreError::NotFound(id))?;
        if e.state != EntryState::Creating {
            return Err(StoreError::AlreadySealed(id));
        }
        if e.owner != client {
            return Err(StoreError::NotOwner(id));
        }
        Ok(())
    }

    /// Seals a CREATING object: plain (kept for LRU) when `owned` is None, reference
    /// counted otherwise, with the pins of its first holders (the creator if it keeps one, the
    /// client it is for, pending `Hold`s) set before it becomes visible.
    fn publish(
        &mut self,
        arena: &Arena,
        client: u32,
        id: ObjectId,
        owned: Option<&Owned>,
        out: &mut Outbox,
    ) {
        let mut pins = self.holds.remove(&id).unwrap_or_default();
        let early = self.early_unholds.remove(&id).unwrap_or_default();
        let mut contains = Vec::new();
        let mut flags = 0;
        if let Some(o) = owned {
            flags |= FLAG_REFCOUNTED;
            if o.error {
                flags |= FLAG_ERROR;
            }
            if o.keep {
                pins.push(client);
            }
            if let Some((index, pid)) = o.pin_for
                && self
                    .clients
                    .get(&index)
                    .is_some_and(|c| c.pid as u32 == pid)
                && !early.contains(&index)
            {
                pins.push(index);
            }
            for i in &o.contained {
                match self.objects.get_mut(i) {
                    Some(ie) if ie.state == EntryState::Sealed && ie.refcounted => {
                        ie.holders += 1;
                        contains.push(*i);
                    }
                    Some(ie) if ie.state == EntryState::Sealed => {}
                    // Not sealed yet (a result still being computed, say): counted when it is.
                    _ if !self.lost_set.contains(i) => {
                        *self.pending_holders.entry(*i).or_default() += 1;
                        contains.push(*i);
                    }
                    _ => {}
                }
            }
        }
        let refcounted = owned.is_some();
        let Some(e) = self.objects.get_mut(&id) else {
            return;
        };
        arena.directory().seal_with(e.slot, flags, &pins);
        e.state = EntryState::Sealed;
        e.refcounted = refcounted;
        e.contains = contains;
        e.holders = self.pending_holders.remove(&id).unwrap_or(0);
        e.lru_key = arena.directory().last_use(e.slot);
        let (key, size) = ((e.lru_key, id), e.size);
        if !refcounted {
            self.lru.insert(key);
        }
        if let Some(c) = self.clients.get_mut(&client) {
            c.creating.remove(&id);
        }
        if let Some(ws) = self.watchers.remove(&id) {
            for w in ws {
                if let Some(c) = self.clients.get_mut(&w) {
                    c.notify(NOTICE_READY, &id);
                }
            }
        }
        if let Some(ws) = self.waiting_on.remove(&id) {
            for w in ws {
                let done = match self.waiters.get_mut(&w) {
                    Some(waiter) => {
                        for (i, wid) in waiter.ids.iter().enumerate() {
                            if *wid == id && !waiter.ready[i] {
                                waiter.ready[i] = true;
                                waiter.remaining -= 1;
                            }
                        }
                        waiter.remaining == 0
                    }
                    None => false,
                };
                if done {
                    self.finish_waiter(w, out);
                }
            }
        }
        self.event(Event::Sealed { id, size }, out);
        if refcounted {
            // Nobody may hold it (a result whose caller is gone): free it now.
            self.check_free(arena, id, out);
        }
    }

    fn abort(&mut self, arena: &Arena, client: u32, id: ObjectId) -> Result<()> {
        let e = self.objects.get(&id).ok_or(StoreError::NotFound(id))?;
        if e.state != EntryState::Creating {
            return Err(StoreError::AlreadySealed(id));
        }
        if e.owner != client {
            return Err(StoreError::NotOwner(id));
        }
        arena.directory().remove_unsealed(e.slot);
        self.alloc.free(e.offset);
        self.objects.remove(&id);
        if let Some(c) = self.clients.get_mut(&client) {
            c.creating.remove(&id);
        }
        self.lost(id);
        Ok(())
    }

    /// Records that `id` will never be sealed and tells its watchers.
    fn lost(&mut self, id: ObjectId) {
        self.early_unholds.remove(&id);
        if self.lost_set.insert(id) {
            self.lost.push_back(id);
            if self.lost.len() > LOST_MEMORY
                && let Some(old) = self.lost.pop_front()
            {
                self.lost_set.remove(&old);
            }
        }
        if let Some(ws) = self.watchers.remove(&id) {
            for w in ws {
                if let Some(c) = self.clients.get_mut(&w) {
                    c.notify(NOTICE_LOST, &id);
                }
            }
        }
    }

    fn watch(&mut self, client: u32, ids: &[ObjectId]) {
        for id in ids {
            let kind = match self.objects.get(id) {
                Some(e) if e.state == EntryState::Sealed => Some(NOTICE_READY),
                Some(_) => None,
                None if self.lost_set.contains(id) => Some(NOTICE_LOST),
                None => None,
            };
            match kind {
                Some(k) => {
                    if let Some(c) = self.clients.get_mut(&client) {
                        c.notify(k, id);
                    }
                }
                None => {
                    let list = self.watchers.entry(*id).or_default();
                    if !list.contains(&client) {
                        list.push(client);
                    }
                }
            }
        }
    }

    fn hold(&mut self, arena: &Arena, client: u32, id: ObjectId) {
        match self.objects.get(&id) {
            Some(e) if e.state == EntryState::Sealed => arena.directory().pin_for(e.slot, client),
            _ if self.lost_set.contains(&id) => {}
            _ => {
                let list = self.holds.entry(id).or_default();
                if !list.contains(&client) {
                    list.push(client);
                }
            }
        }
    }

    fn unhold(&mut self, arena: &Arena, client: u32, id: ObjectId, out: &mut Outbox) {
        if let Some(list) = self.holds.get_mut(&id) {
            list.retain(|c| *c != client);
            if list.is_empty() {
                self.holds.remove(&id);
            }
        }
        match self.objects.get(&id) {
            Some(e) if e.state != EntryState::Creating => {
                arena.directory().unpin_for(e.slot, client);
                self.release(arena, id, out);
            }
            _ if self.lost_set.contains(&id) => {}
            _ => {
                let list = self.early_unholds.entry(id).or_default();
                if !list.contains(&client) {
                    list.push(client);
                }
            }
        }
    }

    /// Grants `client` a new slab; its previous one is retired.
    fn slab(
        &mut self,
        arena: &Arena,
        client: u32,
        size: u64,
        out: &mut Outbox,
    ) -> Result<(u64, u64)> {
        if !self.clients.contains_key(&client) {
            return Err(StoreError::InvalidRequest("unknown client".into()));
        }
        let size = size.clamp(MIN_SLAB, MAX_SLAB);
        let offset = self.allocate(arena, size, out)?;
        let len = self.alloc.block_len(offset).unwrap_or(size);
        self.slab_bytes += len;
        self.slabs.insert(
            offset,
            Slab {
                owner: client,
                len,
                used: vec![0; (len / 64).div_ceil(64) as usize],
                live: 0,
                retired: false,
            },
        );
        let c = self.clients.get_mut(&client).expect("checked above");
        if let Some(old) = c.slab.replace(offset) {
            self.retire_slab(old);
        }
        Ok((offset, len))
    }

    fn retire_slab(&mut self, offset: u64) {
        let Some(s) = self.slabs.get_mut(&offset) else {
            return;
        };
        s.retired = true;
        if s.live == 0 {
            let len = s.len;
            self.slabs.remove(&offset);
            self.slab_bytes -= len;
            self.alloc.free(offset);
        }
    }

    /// A small object the client wrote into its current slab: checked, then published.
    #[allow(clippy::too_many_arguments)]
    fn put_small(
        &mut self,
        arena: &Arena,
        client: u32,
        id: ObjectId,
        offset: u64,
        size: u64,
        owned: &Owned,
        out: &mut Outbox,
    ) -> Result<()> {
        if self.objects.contains_key(&id) {
            return Err(StoreError::AlreadyExists(id));
        }
        let slab_off = self
            .clients
            .get(&client)
            .and_then(|c| c.slab)
            .ok_or_else(|| StoreError::InvalidRequest("no slab granted".into()))?;
        let s = &self.slabs[&slab_off];
        let alloc_len = size.max(1).next_multiple_of(64);
        let fits = offset.is_multiple_of(64)
            && offset >= slab_off
            && offset
                .checked_add(alloc_len)
                .is_some_and(|end| end <= slab_off + s.len);
        let first = (offset.wrapping_sub(slab_off) / 64) as usize;
        let granules = first..first + (alloc_len / 64) as usize;
        let bit = |g: usize| (s.used[g / 64] >> (g % 64)) & 1 == 1;
        if !fits || granules.clone().any(bit) {
            return Err(StoreError::InvalidRequest(format!(
                "object at {offset}+{size} is not in the free part of the client's slab"
            )));
        }
        self.make_room_in_directory(arena, out)?;
        let slot = arena.directory().insert(&id, offset, size, client).ok_or(
            StoreError::DirectoryFull {
                capacity: self.max_objects,
            },
        )?;
        let s = self.slabs.get_mut(&slab_off).expect("checked above");
        for g in granules {
            s.used[g / 64] |= 1 << (g % 64);
        }
        s.live += 1;
        self.slab_object_bytes += alloc_len;
        self.objects.insert(
            id,
            Entry::creating(slot, offset, size, alloc_len, client, Some(slab_off)),
        );
        self.publish(arena, client, id, Some(owned), out);
        Ok(())
    }

    /// Frees a reference-counted object that nothing references any more (and, in turn,
    /// what only it referenced).
    fn check_free(&mut self, arena: &Arena, id: ObjectId, out: &mut Outbox) {
        let mut work = vec![id];
        while let Some(id) = work.pop() {
            let Some(e) = self.objects.get(&id) else {
                continue;
            };
            if !e.refcounted
                || e.state != EntryState::Sealed
                || e.holders > 0
                || arena.directory().is_pinned(e.slot)
            {
                continue;
            }
            if arena.directory().try_remove(e.slot, false) != Removal::Removed {
                continue;
            }
            let contained = self.free_entry(id, out);
            work.extend(self.unref(contained));
        }
    }

    /// Drops one holder of each id (references from an object just freed); returns the sealed
    /// ones that are left without holders.
    fn unref(&mut self, ids: Vec<ObjectId>) -> Vec<ObjectId> {
        let mut unheld = Vec::new();
        for i in ids {
            match self.objects.get_mut(&i) {
                Some(ie) if ie.state != EntryState::Creating => {
                    ie.holders = ie.holders.saturating_sub(1);
                    if ie.holders == 0 {
                        unheld.push(i);
                    }
                }
                _ => {
                    if let Some(n) = self.pending_holders.get_mut(&i) {
                        *n -= 1;
                        if *n == 0 {
                            self.pending_holders.remove(&i);
                        }
                    }
                }
            }
        }
        unheld
    }

    fn wait(
        &mut self,
        client: u32,
        req: u64,
        ids: Vec<ObjectId>,
        timeout: Option<Duration>,
    ) -> Option<Reply> {
        let ready: Vec<bool> = ids
            .iter()
            .map(|id| {
                self.objects
                    .get(id)
                    .is_some_and(|e| e.state == EntryState::Sealed)
            })
            .collect();
        let remaining = ready.iter().filter(|r| !**r).count();
        if remaining == 0 || timeout == Some(Duration::ZERO) || req == 0 {
            return Some(Reply::Waited { ready });
        }
        let w = self.next_waiter;
        self.next_waiter += 1;
        let deadline = timeout.map(|t| Instant::now() + t);
        for (id, r) in ids.iter().zip(&ready) {
            if !r {
                let list = self.waiting_on.entry(*id).or_default();
                if !list.contains(&w) {
                    list.push(w);
                }
            }
        }
        if let Some(d) = deadline {
            self.deadlines.insert((d, w));
        }
        self.waiters.insert(
            w,
            Waiter {
                client,
                req,
                ids,
                ready,
                remaining,
                deadline,
            },
        );
        None
    }

    /// Removes a waiter from every index without replying.
    fn drop_waiter(&mut self, w: u64) -> Option<Waiter> {
        let waiter = self.waiters.remove(&w)?;
        for id in &waiter.ids {
            if let Some(list) = self.waiting_on.get_mut(id) {
                list.retain(|x| *x != w);
                if list.is_empty() {
                    self.waiting_on.remove(id);
                }
            }
        }
        if let Some(d) = waiter.deadline {
            self.deadlines.remove(&(d, w));
        }
        Some(waiter)
    }

    /// Replies to a waiter with what is ready now and forgets it.
    fn finish_waiter(&mut self, w: u64, out: &mut Outbox) {
        let Some(waiter) = self.drop_waiter(w) else {
            return;
        };
        if let Some(c) = self.clients.get(&waiter.client) {
            out.0.push((
                c.conn.clone(),
                Reply::Waited {
                    ready: waiter.ready,
                }
                .encode(waiter.req),
            ));
        }
    }

    fn delete(&mut self, arena: &Arena, id: ObjectId, out: &mut Outbox) -> DeleteOutcome {
        let Some(e) = self.objects.get_mut(&id) else {
            return DeleteOutcome::NotFound;
        };
        match e.state {
            EntryState::Creating => DeleteOutcome::NotSealed,
            EntryState::DeletePending => DeleteOutcome::Deferred,
            EntryState::Sealed => {
                let key = (e.lru_key, id);
                match arena.directory().try_remove(e.slot, true) {
                    Removal::Removed => {
                        self.lru.remove(&key);
                        self.free_and_release(arena, id, out);
                        DeleteOutcome::Deleted
                    }
                    Removal::Pinned => {
                        e.state = EntryState::DeletePending;
                        self.lru.remove(&key);
                        self.pending_delete.insert(id);
                        DeleteOutcome::Deferred
                    }
                }
            }
        }
    }

    /// A delete-pending object may have lost its last pin: free it if so.
    fn release(&mut self, arena: &Arena, id: ObjectId, out: &mut Outbox) {
        let Some(e) = self.objects.get(&id) else {
            return;
        };
        if e.state == EntryState::Sealed && e.refcounted {
            return self.check_free(arena, id, out);
        }
        if e.state != EntryState::DeletePending || arena.directory().is_pinned(e.slot) {
            return;
        }
        if arena.directory().try_remove(e.slot, true) == Removal::Removed {
            self.pending_delete.remove(&id);
            self.free_and_release(arena, id, out);
        }
    }

    /// Frees an object, then drops its references to the objects it contained.
    fn free_and_release(&mut self, arena: &Arena, id: ObjectId, out: &mut Outbox) {
        let contained = self.free_entry(id, out);
        for i in self.unref(contained) {
            self.check_free(arena, i, out);
        }
    }

    /// Forgets an object and frees its memory; returns the ids it referenced (their
    /// `holders` are the caller's to decrement).
    fn free_entry(&mut self, id: ObjectId, out: &mut Outbox) -> Vec<ObjectId> {
        let Some(e) = self.objects.remove(&id) else {
            return Vec::new();
        };
        match e.slab {
            Some(slab) => {
                self.slab_object_bytes -= e.alloc_len;
                if let Some(s) = self.slabs.get_mut(&slab) {
                    s.live -= 1;
                    if s.retired && s.live == 0 {
                        self.retire_slab(slab);
                    }
                }
            }
            None => {
                self.alloc.free(e.offset);
            }
        }
        if e.refcounted {
            // Nobody referenced it any more; a late `Watch` learns it is gone, not to wait.
            self.lost(id);
        }
        self.event(Event::Deleted { id }, out);
        e.contains
    }

    /// Evicts the least recently used unpinned sealed object. Pinned candidates are moved to
    /// `skipped` (the caller puts them back). Returns the bytes freed, or None if nothing could go.
    fn evict_one(
        &mut self,
        arena: &Arena,
        out: &mut Outbox,
        skipped: &mut Vec<(u64, ObjectId)>,
    ) -> Option<u64> {
        let dir = arena.directory();
        while let Some((key, id)) = self.lru.pop_first() {
            let Some(e) = self.objects.get_mut(&id) else {
                continue;
            };
            // Clients refresh last_use in shared memory when they pin: honour it lazily.
            let seen = dir.last_use(e.slot);
            if seen > key {
                e.lru_key = seen;
                self.lru.insert((seen, id));
                continue;
            }
            match dir.try_remove(e.slot, false) {
                Removal::Removed => {
                    let bytes = e.alloc_len;
                    self.evictions += 1;
                    self.free_and_release(arena, id, out);
                    return Some(bytes);
                }
                Removal::Pinned => skipped.push((key, id)),
            }
        }
        None
    }

    fn evict(&mut self, arena: &Arena, bytes: u64, out: &mut Outbox) -> (u64, u64) {
        let (mut count, mut freed) = (0, 0);
        let mut skipped = Vec::new();
        while freed < bytes {
            match self.evict_one(arena, out, &mut skipped) {
                Some(b) => {
                    count += 1;
                    freed += b;
                }
                None => break,
            }
        }
        for k in skipped {
            self.lru.insert(k);
        }
        (count, freed)
    }

    fn pinned_bytes(&self, arena: &Arena) -> u64 {
        let dir = arena.directory();
        self.objects
            .values()
            .filter(|e| e.state != EntryState::Sealed || dir.is_pinned(e.slot))
            .map(|e| e.alloc_len)
            .sum()
    }

    fn list(&self, arena: &Arena) -> Vec<ObjectInfo> {
        let dir = arena.directory();
        let mut v: Vec<ObjectInfo> = self
            .objects
            .iter()
            .map(|(id, e)| ObjectInfo {
                id: *id,
                size: e.size,
                state: match e.state {
                    EntryState::Creating => ObjectState::Creating,
                    EntryState::Sealed => ObjectState::Sealed,
                    EntryState::DeletePending => ObjectState::DeletePending,
                },
                pins: dir.pin_count(e.slot),
                age: e.created.elapsed(),
                owner: e.owner,
            })
            .collect();
        v.sort_by_key(|o| std::cmp::Reverse(o.age));
        v
    }

    fn stats(&self, arena: &Arena) -> Stats {
        Stats {
            capacity: self.alloc.capacity(),
            used: self.alloc.used() - self.slab_bytes + self.slab_object_bytes,
            reserved: self.slab_bytes - self.slab_object_bytes,
            pinned: self.pinned_bytes(arena),
            objects: self.objects.len() as u64,
            sealed: self
                .objects
                .values()
                .filter(|e| e.state == EntryState::Sealed)
                .count() as u64,
            clients: self.clients.len() as u64,
            evictions: self.evictions,
        }
    }

    fn event(&self, ev: Event, out: &mut Outbox) {
        let mut frame = None;
        for c in self.clients.values().filter(|c| c.subscribed) {
            let f = frame.get_or_insert_with(|| Reply::Event(ev).encode(0));
            out.0.push((c.conn.clone(), f.clone()));
        }
    }
}
