//! The store daemon: owns the arena, the allocator, the object table and per-client state, and
//! serves the control-plane protocol on a Unix socket.
//!
//! Threads: one accept loop, one thread per client connection (so a request that waits, such
//! as `Wait` with a timeout, never blocks other clients: it is parked in the waiter table and
//! answered later by whichever thread seals the object, or by the timer thread; its stack is
//! small, [`CLIENT_STACK`], so a thousand clients cost little memory), one timer
//! thread for wait deadlines and for forgetting cut-off clients once their process is gone,
//! and one background pre-fault thread. All table state ([`table::Table`]) is behind one
//! mutex; socket writes happen outside it, and a push never waits for another thread's reply.

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

mod conn;
mod prefault;
mod table;
mod timer;

use conn::Conn;
pub use table::Limits;
use table::{Outbox, Table};

use crate::blocks::shm::{
    Arena, DEFAULT_MAX_CLIENTS, Layout, PIN_CLIENTS, POPULATE_MIN, Pages, populate_threads,
};
use crate::error::{Result, StoreError};
use crate::protocol::{self, MAX_REQUEST, PROTOCOL_VERSION, Reply, Request};
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
    /// Back the arena with huge pages (the pool, else transparent ones); `NoHugePages` if
    /// the machine offers neither.
    pub hugepages: bool,
    /// Most clients connected at once (1 to `shm::MAX_MAX_CLIENTS`; default
    /// [`DEFAULT_MAX_CLIENTS`]); one more is refused with `TooManyClients`. Each has a
    /// notification ring of ~68 KiB in the arena, memory only once used. The first
    /// `shm::PIN_CLIENTS` pin objects lock-free with a bit of their own; the others
    /// (*overflow clients*) pin through the daemon, a round trip per first pin.
    pub max_clients: u32,
}

impl DaemonConfig {
    /// A daemon at `socket` with `memory` bytes of object space; the rest as by default (no
    /// pre-fault, the default directory size, base pages).
    pub fn new(socket: impl Into<PathBuf>, memory: u64) -> DaemonConfig {
        DaemonConfig {
            socket: socket.into(),
            memory,
            prefault: false,
            max_objects: None,
            hugepages: false,
            max_clients: DEFAULT_MAX_CLIENTS,
        }
    }

    /// The object space a store gets when nobody says (Ray's rule): 30% of the machine's
    /// memory, capped by what `/dev/shm` has free when it is mounted (the limit a container
    /// puts on shared memory), at least 64 MiB, in whole MiB. Memory is committed as objects
    /// use it, not up front (see the pre-fault thread).
    pub fn default_memory() -> u64 {
        const FLOOR: u64 = 64 << 20;
        let total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let kib = m.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
                kib.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
            })
            .map_or(1 << 30, |kib| kib * 1024);
        let mut bytes = total / 10 * 3;
        if let Ok(fs) = nix::sys::statvfs::statvfs("/dev/shm") {
            // The field types differ between targets (u64 here).
            #[allow(clippy::unnecessary_cast)]
            let free = fs.blocks_available() as u64 * fs.fragment_size() as u64;
            bytes = bytes.min(free);
        }
        (bytes.max(FLOOR) >> 20) << 20
    }
}

/// The stack of a client connection's thread: it decodes frames and runs the table's
/// handlers (no recursion; buffers on the heap), so a thousand clients cost little memory.
pub const CLIENT_STACK: usize = 256 << 10;

/// Raises this process's soft limit on open files to its hard limit (a daemon holds a few
/// descriptors per client, and a thousand clients pass the common soft limit of 1,024).
/// Returns the soft limit now in force (`u64::MAX` for unlimited).
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        let raised = rustix::process::Rlimit {
            current: l.maximum,
            maximum: l.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            debug!("cannot raise the open files limit: {e}");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

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
    /// The arena memfd's inode: how a process's mappings of it are recognised.
    arena_ino: u64,
    table: Mutex<Table>,
    timer_cv: Condvar,
    uid: u32,
    stopping: AtomicBool,
    listener_fd: std::os::fd::RawFd,
    /// Heap bytes (from the heap start) that the pre-fault thread has populated.
    prefaulted: AtomicU64,
    /// Heap bytes the pre-fault thread is to populate (see `prefault`), and its wake-up.
    prefault_wanted: AtomicU64,
    prefault_mx: Mutex<()>,
    prefault_cv: Condvar,
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
        let mut layout = Layout::with_clients(cfg.memory, max_objects, cfg.max_clients)?;
        // A test knob: fewer clients with a pin bit of their own, so that a few connections
        // exercise the overflow clients' paths.
        if let Some(n) = std::env::var("TROVE_STORE_PIN_CLIENTS")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|n| *n < PIN_CLIENTS)
        {
            info!("only clients below index {n} have a pin bit (TROVE_STORE_PIN_CLIENTS)");
            layout = layout.with_pin_clients(n);
        }
        let fds = raise_fd_limit();
        // Three descriptors per client (its socket, a clone to write replies on, its pidfd).
        if fds < 3 * cfg.max_clients as u64 + 64 {
            warn!(
                "the open files limit ({fds}) is below what {} clients need",
                cfg.max_clients
            );
        }
        let arena = if cfg.hugepages {
            Arena::create_huge(layout)?
        } else {
            Arena::create(layout)?
        };
        let pages = arena.pages();
        if pages != Pages::Base {
            info!("arena backed by huge pages ({pages:?})");
        }
        let layout = *arena.layout();
        if cfg.prefault {
            let t = Instant::now();
            arena.populate(layout.heap_offset, layout.heap_len)?;
            info!(
                "pre-faulted {} in {:?}",
                crate::blocks::size::format_size(layout.heap_len),
                t.elapsed()
            );
        }
        let limits = Limits::from_env();
        if limits != Limits::default() {
            info!("client limits from the environment: {limits:?}");
        }
        let arena_ino = nix::sys::stat::fstat(arena.fd())?.st_ino;
        let table = Mutex::new(Table::new(&arena, limits));
        let listener = UnixListener::bind(&cfg.socket)?;
        fs::set_permissions(
            &cfg.socket,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        use std::os::fd::AsRawFd;
        let listener_fd = listener.as_raw_fd();
        let shared = Arc::new(Shared {
            prefaulted: AtomicU64::new(if cfg.prefault { layout.heap_len } else { 0 }),
            prefault_wanted: AtomicU64::new(prefault::PREFAULT_AHEAD),
            prefault_mx: Mutex::new(()),
            prefault_cv: Condvar::new(),
            arena,
            table,
            arena_ino,
            timer_cv: Condvar::new(),
            uid: nix::unistd::getuid().as_raw(),
            stopping: AtomicBool::new(false),
            listener_fd,
        });
        info!(
            "store at {}: {} of object space, {} object slots, at most {} clients",
            cfg.socket.display(),
            crate::blocks::size::format_size(layout.heap_len),
            layout.dir_slots / 2,
            layout.max_clients
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
            .spawn(move || timer::timer_loop(&sh))?;
        if self.shared.prefaulted.load(Ordering::Relaxed) < self.shared.arena.layout().heap_len {
            let sh = self.shared.clone();
            std::thread::Builder::new()
                .name("troved-prefault".into())
                .spawn(move || prefault::prefault_loop(&sh))?;
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
        let refuse = |e: StoreError| {
            warn!("refusing a client (pid {pid}, uid {uid}): {e}");
            let _ = (&stream).write_all(&Reply::error(&e).encode(0));
        };
        if uid != self.shared.uid {
            refuse(StoreError::Refused(format!(
                "uid {uid} may not use a store owned by uid {}",
                self.shared.uid
            )));
            return;
        }
        let limits = lock(&self.shared.table).limits;
        let _ = stream.set_write_timeout(Some(limits.client_timeout));
        let writer = match stream.try_clone() {
            Ok(w) => w,
            Err(e) => return warn!("try_clone: {e}"),
        };
        let conn = Arc::new(Conn::new(writer));
        // The peer process, so that what it may still read is kept until it is gone.
        let pidfd = rustix::process::Pid::from_raw(pid).and_then(|p| {
            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
        });
        let index = {
            let mut t = lock(&self.shared.table);
            let Some(index) = t.take_index() else {
                drop(t);
                refuse(StoreError::TooManyClients {
                    limit: self.shared.arena.layout().max_clients,
                });
                return;
            };
            let ring = match self.shared.arena.init_ring(index) {
                Ok(r) => r,
                Err(e) => {
                    t.give_back_index(index);
                    drop(t);
                    refuse(StoreError::Refused(format!("notification ring: {e}")));
                    return;
                }
            };
            t.add_client(index, conn.clone(), pid, pidfd, ring.producer());
            index
        };
        let (ring_offset, ring_len) = self
            .shared
            .arena
            .layout()
            .ring_region(index)
            .expect("an index below max_clients");
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
            .stack_size(CLIENT_STACK)
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
        let _g = lock(&self.shared.prefault_mx);
        self.shared.prefault_cv.notify_all();
    }
}

fn lock_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

impl Shared {
    fn serve(&self, index: u32, stream: UnixStream, conn: Arc<Conn>) {
        let mut r = BufReader::with_capacity(64 << 10, stream);
        loop {
            let body = match protocol::read_frame(&mut r, MAX_REQUEST) {
                Ok(Some(b)) => b,
                Ok(None) => return,
                Err(StoreError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    // The client closed (or died) mid-frame.
                    debug!("client {index}: closed mid-frame: {e}");
                    return;
                }
                Err(e) => {
                    debug!("client {index}: closing: {e}");
                    let _ = conn.reply(&Reply::error(&e).encode(0));
                    conn.cut_off(None);
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
                conn.cut_off(None);
                return;
            }
        }
    }

    /// Handles one request; `None` when the reply comes later (a parked wait) or not at all.
    fn handle(&self, client: u32, req: u64, request: Request) -> Option<Reply> {
        let mut out = Outbox::default();
        let h = lock(&self.table).request(&self.arena, client, req, request, &mut out);
        if h.parked {
            self.timer_cv.notify_all();
        }
        out.flush();
        // A fresh allocation in a region the background pre-fault has not reached yet:
        // populate it now, outside the lock, so the client's writes do not pay first-touch
        // faults (unless the client populates it itself, a large object).
        let mut reply = h.reply;
        if let Some(fresh) = h.fresh {
            let (off, len) = (fresh.offset, fresh.len);
            let l = self.arena.layout();
            let done = l.heap_offset + self.prefaulted.load(Ordering::Acquire);
            let pool = self.arena.pages() == Pages::HugeTlb;
            let beyond = off + len > done;
            let populated = if fresh.daemon_populates && beyond {
                // A large object here is on pool pages (see `Table::request`): populated on
                // the threads its creator would have used.
                if pool && len >= POPULATE_MIN {
                    self.arena.populate_once_with(off, len, populate_threads())
                } else {
                    self.arena.populate(off, len)
                }
            } else {
                Ok(())
            };
            // Pool pages must exist before a client touches them (on pool arenas the daemon
            // always populates). Where the populate failed (a kernel without it, or the
            // store's hugetlb cgroup out of pages) `fallocate` says whether they can be had:
            // a block whose pages cannot is taken back, and the client told so, instead of a
            // SIGBUS in the client.
            if pool
                && beyond
                && let Err(e) = populated.or_else(|_| self.arena.allocate_pool_pages(off, len))
            {
                warn!("no pool pages for a block of {len} bytes at {off}: {e}");
                lock(&self.table).give_back(&self.arena, client, &fresh);
                reply = Some(Reply::error(&StoreError::NoHugePages(format!(
                    "the pool pages for {len} bytes could not be allocated ({e}): the pool \
                     or the store's hugetlb cgroup has none left"
                ))));
            } else {
                self.prefault_ahead_of(off + len - l.heap_offset);
            }
        }
        reply
    }

    /// A client's connection closed (it closed it, or the daemon cut it off). If its process
    /// still maps the arena it keeps its pins, slabs and index until it is gone (the timer
    /// thread looks); otherwise it is forgotten now.
    fn disconnect(&self, index: u32) {
        let mut out = Outbox::default();
        {
            let mut t = lock(&self.table);
            let Some(c) = t.clients.get(&index) else {
                return;
            };
            // A client that closed its connection itself no longer maps the arena: a
            // `StoreClient` unmaps before it closes its socket, and a process that exits loses
            // its mappings before its files. One the daemon cut off may still read: it is kept
            // until its process is gone.
            let cut = c.conn.cut.load(Ordering::SeqCst);
            let _ = c.conn.stream.shutdown(Shutdown::Both);
            let (gone, pid) = (!cut || self.process_gone(c), c.pid);
            t.depart(index);
            if gone {
                t.remove_client(&self.arena, index, &mut out);
            } else {
                debug!("client {index} (pid {pid}) left but still maps the arena");
                self.timer_cv.notify_all();
            }
        }
        out.flush();
    }
}
