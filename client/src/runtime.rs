//! The process-global runtime: [`init`], [`Runtime`], and the object verbs.
//!
//! `init` connects this process to a store (forking an embedded one by default) and installs a
//! process-global runtime, so that [`ObjectRef`]s can take and drop references wherever they
//! are (inside values, in other threads) without carrying a handle.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use trove_executor::mailbox::{Mailbox, MailboxError, mailbox_bytes};
use trove_executor::record::{INLINE_MAX, Seen, Took};
use trove_executor::{EmbeddedStore, ProcessError, SpawnRequest, Zygote};
use trove_store::client::{OwnedWriter, Readiness};
use trove_store::protocol::Owned;
use trove_store::{ObjectId, Stats, StoreClient, StoreError};

use crate::actor::{
    self, ActorHandle, Attached, Constructor, Function, MAILBOX_SLOTS, SLOT_BYTES, TASK_SLOTS,
};
use crate::outcome::Outcome;

use crate::codec::{self, Plain, Value};
use crate::error::{Error, Result};
use crate::obj::{Obj, Stored};
use crate::object_ref::ObjectRef;

/// Size of the embedded store when neither [`Config::memory`] nor `TROVE_MEMORY` says.
pub const DEFAULT_MEMORY: u64 = 1 << 30;

/// How [`init`] sets trove up.
#[derive(Debug, Clone)]
pub struct Config {
    store: Option<PathBuf>,
    memory: u64,
    prefault: bool,
    num_cpus: usize,
    namespace: Option<String>,
}

impl Default for Config {
    /// An embedded store of `TROVE_MEMORY` bytes (default 1 GiB), or the running store named
    /// by `TROVE_STORE`.
    fn default() -> Config {
        let memory = std::env::var("TROVE_MEMORY")
            .ok()
            .and_then(|s| trove_store::size::parse_size(&s).ok())
            .unwrap_or(DEFAULT_MEMORY);
        Config {
            store: std::env::var_os("TROVE_STORE").map(PathBuf::from),
            memory,
            prefault: false,
            num_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            namespace: None,
        }
    }
}

impl Config {
    /// Connect to the running `troved` at this socket instead of starting one.
    pub fn store(mut self, socket: impl Into<PathBuf>) -> Config {
        self.store = Some(socket.into());
        self
    }
    /// Bytes of object space of the embedded store.
    pub fn memory(mut self, bytes: u64) -> Config {
        self.memory = bytes;
        self
    }
    /// Pre-fault the embedded store's memory before `init` returns (else in the background).
    pub fn prefault(mut self, yes: bool) -> Config {
        self.prefault = yes;
        self
    }
    /// Number of task workers (the executor's pool).
    pub fn num_cpus(mut self, n: usize) -> Config {
        self.num_cpus = n.max(1);
        self
    }
    pub fn get_num_cpus(&self) -> usize {
        self.num_cpus
    }
    /// The namespace of this driver's named actors (Ray's `namespace`): names are found only
    /// within it. By default each driver has its own (unique per `init`), so two programs
    /// sharing a `troved` never see each other's names unless both name one namespace.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Config {
        self.namespace = Some(namespace.into());
        self
    }
}

/// A namespace no other driver has: this process's pid and a random id.
fn unique_namespace() -> String {
    let r = ObjectId::random();
    let hex: String = r.0[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("driver-{}-{hex}", std::process::id())
}

pub(crate) struct Shared {
    pub(crate) client: StoreClient,
    embedded: Mutex<Option<EmbeddedStore>>,
    /// The driver's zygote (none in forked processes).
    zygote: Option<Zygote>,
    task_queue_id: ObjectId,
    task_queue: OnceLock<std::result::Result<Attached, String>>,
    /// Where this tree's named actors live (see [`Config::namespace`]).
    namespace: String,
    /// What the driver holds for the pool and the actors it started (mailboxes, names).
    owned: Mutex<Vec<ObjectRef<[u8]>>>,
    named: Mutex<HashMap<String, ObjectRef<[u8]>>>,
    /// Calls in flight whose completion record this process has not read yet.
    calls: Mutex<Calls>,
}

/// Calls in flight: where each result will be recorded (see [`trove_executor::record`]).
/// A small result comes back only through its record, so a call stays here until its record
/// has been read (the result taken into this process, or found in the store) or the caller
/// asked for the store.
///
/// Each call also keeps what its arguments refer to (the argument object, and every
/// `ObjectRef` inside the arguments) until the callee has run it: the callee takes its own
/// references while it deserialises the arguments, so once the call has run, the caller's
/// are no longer needed. They are released with the call's entry (`Kept`'s drop), keyed by
/// the call, never by the order calls were made in.
#[derive(Default)]
struct Calls {
    by_id: FxHashMap<ObjectId, Hint>,
    /// Results in call order, for harvesting finished calls before their records are reused.
    /// Holds ids already settled too (skipped when met); compacted when those dominate.
    order: VecDeque<ObjectId>,
    /// Calls forgotten by id (their result asked for in the store, or dropped) that may
    /// still be running and keep arguments: kept until they have run (see [`Running`]).
    running: Vec<Running>,
}

/// A call's mailbox and position, and what it keeps alive while it runs.
struct Hint {
    mailbox: Mailbox,
    pos: u64,
    keep: Kept,
    _keepalive: Option<Arc<dyn Send + Sync>>,
}

/// A call that may still be running, forgotten by id: its arguments' references are kept
/// until it has run, and its result is held meanwhile, so that the store tells when the
/// call is over even if its record never does (a consumer that died mid-call).
struct Running {
    result: ObjectId,
    hint: Hint,
}

/// References this process holds for a call in flight, released when dropped.
pub(crate) struct Kept(pub(crate) Vec<ObjectId>);

impl Drop for Kept {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        if let Some(sh) = current() {
            for id in &self.0 {
                sh.client.release(id);
            }
        }
    }
}

/// How long a get polls a completion record before it asks for the result in the store and
/// waits for the daemon's notification.
const HINT_SPIN: Duration = Duration::from_micros(200);
/// How many finished calls a new call harvests.
const HARVEST_PER_CALL: usize = 4;

impl Shared {
    fn new(
        client: StoreClient,
        zygote: Option<Zygote>,
        task_queue_id: ObjectId,
        namespace: String,
    ) -> Shared {
        Shared {
            client,
            embedded: Mutex::new(None),
            zygote,
            task_queue_id,
            task_queue: OnceLock::new(),
            namespace,
            owned: Mutex::new(Vec::new()),
            named: Mutex::new(HashMap::new()),
            calls: Mutex::new(Calls::default()),
        }
    }

    pub(crate) fn hint(
        &self,
        result: ObjectId,
        mailbox: Mailbox,
        pos: u64,
        keep: Kept,
        keepalive: Option<Arc<dyn Send + Sync>>,
    ) {
        let mut calls = lock(&self.calls);
        calls.by_id.insert(
            result,
            Hint {
                mailbox,
                pos,
                keep,
                _keepalive: keepalive,
            },
        );
        calls.order.push_back(result);
        // Ids settled out of order stay in `order` until they reach its front: keep it within
        // a constant factor of the calls in flight (amortised O(1)), so that one long call in
        // front does not make it grow without bound.
        if calls.order.len() > 2 * calls.by_id.len() + 1024 {
            let Calls { by_id, order, .. } = &mut *calls;
            order.retain(|id| by_id.contains_key(id));
        }
    }

    /// Reads a call's completion record: takes an inline result into this process, or learns
    /// where the stored one is. `true` once the record has nothing more to say.
    fn look(&self, id: &ObjectId, hint: &Hint) -> bool {
        let rec = hint.mailbox.record(hint.pos);
        match rec.seen(hint.pos) {
            Seen::Pending => false,
            Seen::Inline => {
                let mut bytes = [0u8; INLINE_MAX];
                match rec.take_inline(hint.pos, &mut bytes) {
                    Took::Value { error, len } => {
                        self.client.resolve_local(id, &bytes[..len], error);
                        true
                    }
                    // Evicted to the store meanwhile: the next look says so.
                    Took::No => false,
                }
            }
            Seen::Stored { offset, len, error } => {
                self.client.resolve_pending(id, offset, len, error);
                true
            }
            Seen::Gone => true,
        }
    }

    /// Looks at the record of the call for `id`, if one is in flight; forgets it once read.
    /// `true` if nothing is left to wait for there.
    fn settle(&self, id: &ObjectId) -> bool {
        let mut calls = lock(&self.calls);
        let Some(hint) = calls.by_id.get(id) else {
            return true;
        };
        let done = self.look(id, hint);
        if done {
            let hint = calls.by_id.remove(id);
            // Dropping a hint may drop an actor handle, whose mailbox ref comes back here.
            drop(calls);
            drop(hint);
        }
        done
    }

    /// Polls the completion record of a call in flight for a short while.
    fn await_hint(&self, id: &ObjectId, deadline: Option<Instant>) -> bool {
        let until = Instant::now() + HINT_SPIN;
        let backoff = crossbeam_utils::Backoff::new();
        loop {
            if self.settle(id) {
                return true;
            }
            let now = Instant::now();
            if now >= until || deadline.is_some_and(|d| now >= d) {
                return false;
            }
            if backoff.is_completed() {
                std::thread::yield_now();
            } else {
                backoff.snooze();
            }
        }
    }

    /// Asks for the result `id` (a call in flight) to be put in the store, so that the
    /// daemon can notify waiters and other processes can read it; takes it at once if it is
    /// already inline. A no-op for other ids. The call is forgotten by id; if it may still be
    /// running and keeps arguments alive, it moves to `running` until it has run.
    fn force_store(&self, id: &ObjectId) {
        let mut calls = lock(&self.calls);
        let Some(hint) = calls.by_id.remove(id) else {
            return;
        };
        let rec = hint.mailbox.record(hint.pos);
        rec.want_store(hint.pos);
        // The callee stores it from now on, unless it is inline already: then we take it.
        let mut done = false;
        while !done {
            done = self.look(id, &hint);
            if rec.seen(hint.pos) == Seen::Pending {
                break;
            }
        }
        if done || hint.keep.0.is_empty() {
            // Hints are dropped unlocked (see `settle`).
            drop(calls);
            drop(hint);
            return;
        }
        // Held until the call is over (released in `reap_running`): a result this process
        // no longer refers to could otherwise be freed before we see it.
        if self.client.hold(id).is_err() {
            drop(calls);
            drop(hint);
            return;
        }
        calls.running.push(Running { result: *id, hint });
    }

    /// Releases what calls in `running` kept, for those that have run: their record moved
    /// on, their result is in the store (or lost), or their mailbox is dead.
    fn reap_running(&self) {
        let mut calls = lock(&self.calls);
        if calls.running.is_empty() {
            return;
        }
        let mut over = Vec::new();
        let mut i = 0;
        while i < calls.running.len() {
            let r = &calls.running[i];
            let h = &r.hint;
            let ran = h.mailbox.is_dead()
                || h.mailbox.record(h.pos).seen(h.pos) != Seen::Pending
                || self
                    .client
                    .wait_ready(&[r.result], 0, Some(Instant::now()))
                    .is_ok_and(|s| s[0] != Readiness::Pending);
            if ran {
                over.push(calls.running.swap_remove(i));
            } else {
                i += 1;
            }
        }
        drop(calls);
        for r in over {
            // Its arguments first (the hint's `Kept`), then the hold on its result.
            drop(r.hint);
            self.client.release(&r.result);
        }
    }

    /// Reads the records of finished calls, oldest first (at most `max`), so that their
    /// inline results are taken before the callee reuses the records.
    fn harvest(&self, max: usize) {
        let mut calls = lock(&self.calls);
        // Dropped unlocked (see `settle`).
        let mut read = Vec::new();
        while read.len() < max {
            let Some(id) = calls.order.front().copied() else {
                break;
            };
            if let Some(hint) = calls.by_id.remove(&id) {
                if !self.look(&id, &hint) {
                    calls.by_id.insert(id, hint);
                    break;
                }
                trove_store::client::shrink_if_sparse(&mut calls.by_id);
                read.push(hint);
            }
            calls.order.pop_front();
        }
        let running = !calls.running.is_empty();
        drop(calls);
        drop(read);
        if running {
            self.reap_running();
        }
    }

    /// Pushes a call message, harvesting finished calls while the mailbox is full.
    pub(crate) fn push_call(
        &self,
        mailbox: &Mailbox,
        msg: &[u8],
    ) -> std::result::Result<u64, MailboxError> {
        self.harvest(HARVEST_PER_CALL);
        let backoff = crossbeam_utils::Backoff::new();
        loop {
            if mailbox.is_dead() {
                return Err(MailboxError::Dead);
            }
            if let Some(pos) = mailbox.try_push(msg)? {
                return Ok(pos);
            }
            // Full: the consumer is draining it. Take finished results meanwhile and yield
            // (a sleep would outlast the whole queue's work).
            self.harvest(usize::MAX);
            if backoff.is_completed() {
                std::thread::yield_now();
            } else {
                backoff.snooze();
            }
        }
    }

    /// Before this process drops its last reference to a call's result: settle the record so
    /// that an inline result is taken (and dropped here) and a pending one goes to the store
    /// (where the release finds it).
    fn before_release(&self, id: &ObjectId) {
        let pending = lock(&self.calls).by_id.contains_key(id);
        if pending && self.client.held_count(id) <= 1 && !self.settle(id) {
            self.force_store(id);
        }
    }

    pub(crate) fn task_queue(&self) -> Result<&Mailbox> {
        match self.task_queue.get_or_init(|| {
            actor::attach(&self.client, self.task_queue_id).map_err(|e| e.to_string())
        }) {
            Ok(a) => Ok(&a.mailbox),
            Err(e) => Err(Error::TaskFailed(format!("task queue: {e}"))),
        }
    }

    fn zygote(&self) -> Result<&Zygote> {
        self.zygote.as_ref().ok_or_else(|| {
            Error::Init(
                "actors and workers are started by the driver (the process that called init)"
                    .into(),
            )
        })
    }

    /// Creates a mailbox object for consumers of type `type_tag` (see [`Mailbox::init`]); the
    /// returned ref holds it.
    fn new_mailbox(&self, slots: u64, slot_bytes: u64, type_tag: u64) -> Result<ObjectRef<[u8]>> {
        let id = ObjectId::random();
        let len = mailbox_bytes(slots, slot_bytes);
        let mut w = self.client.create_owned(id, len as u64)?;
        // SAFETY: the writer's buffer is `len` bytes of the arena, 64-byte aligned, ours until
        // published, and stays mapped while this process is connected; init only writes it.
        unsafe { Mailbox::init(w.as_mut_slice().as_mut_ptr(), slots, slot_bytes, type_tag) }
            .map_err(|e| Error::Init(format!("mailbox: {e}")))?;
        w.publish(&[])?;
        Ok(ObjectRef::adopt(id))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a forked actor or worker needs to join the tree.
struct ChildSpec {
    socket: PathBuf,
    namespace: String,
    task_queue: ObjectId,
    ctor: u64,
    ctor_args: Vec<u8>,
}

impl ChildSpec {
    fn encode(&self) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt;
        let sock = self.socket.as_os_str().as_bytes();
        let mut b = Vec::new();
        b.extend_from_slice(self.task_queue.as_bytes());
        b.extend_from_slice(&self.ctor.to_le_bytes());
        b.extend_from_slice(&(sock.len() as u32).to_le_bytes());
        b.extend_from_slice(sock);
        b.extend_from_slice(&(self.namespace.len() as u32).to_le_bytes());
        b.extend_from_slice(self.namespace.as_bytes());
        b.extend_from_slice(&self.ctor_args);
        b
    }
    fn decode(b: &[u8]) -> Option<ChildSpec> {
        use std::os::unix::ffi::OsStrExt;
        let task_queue = ObjectId(b.get(..20)?.try_into().ok()?);
        let ctor = u64::from_le_bytes(b.get(20..28)?.try_into().ok()?);
        let n = u32::from_le_bytes(b.get(28..32)?.try_into().ok()?) as usize;
        let socket = PathBuf::from(std::ffi::OsStr::from_bytes(b.get(32..32 + n)?));
        let at = 32 + n;
        let k = u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize;
        let namespace = String::from_utf8(b.get(at + 4..at + 4 + k)?.to_vec()).ok()?;
        Some(ChildSpec {
            socket,
            namespace,
            task_queue,
            ctor,
            ctor_args: b.get(at + 4 + k..)?.to_vec(),
        })
    }
}

/// Joins the tree in a forked child: connects and installs the process-global runtime.
fn init_child(spec: &ChildSpec) -> Option<Runtime> {
    let client = StoreClient::connect(&spec.socket).ok()?;
    let sh = Arc::new(Shared::new(
        client,
        None,
        spec.task_queue,
        spec.namespace.clone(),
    ));
    *RUNTIME.write().unwrap_or_else(|p| p.into_inner()) = Some(sh.clone());
    start_flusher(&sh);
    Some(Runtime { sh })
}

/// Writes batched one-way frames every millisecond or so, so that a process that drops refs
/// and then idles still releases them promptly, and every 10 ms releases the arguments of
/// forgotten calls that have run (`Shared::reap_running`). Ends with the runtime.
fn start_flusher(sh: &Arc<Shared>) {
    let weak = Arc::downgrade(sh);
    if sh.client.set_batching(true).is_err() {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("trove-flusher".into())
        .spawn(move || {
            let mut tick = 0u32;
            while let Some(sh) = weak.upgrade() {
                tick = tick.wrapping_add(1);
                if tick.is_multiple_of(10) {
                    sh.reap_running();
                }
                if sh.client.flush().is_err() {
                    return;
                }
                drop(sh);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
}

/// Entry of an actor process (run by the zygote's child).
fn actor_entry(payload: &[u8]) -> i32 {
    let Some(spec) = ChildSpec::decode(payload.get(20..).unwrap_or(&[])) else {
        return 2;
    };
    let mailbox_id = ObjectId(payload[..20].try_into().expect("20 bytes"));
    let Some(rt) = init_child(&spec) else {
        return 3;
    };
    let Ok(own) = actor::attach(&rt.sh.client, mailbox_id) else {
        return 4;
    };
    let state = match actor::construct(spec.ctor, &spec.ctor_args) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("actor constructor failed: {e}");
            return 5;
        }
    };
    actor::serve(&rt.sh.client, &own.mailbox, &own.mailbox, state)
}

/// Entry of a task worker.
fn worker_entry(payload: &[u8]) -> i32 {
    let Some(spec) = ChildSpec::decode(payload.get(20..).unwrap_or(&[])) else {
        return 2;
    };
    let own_id = ObjectId(payload[..20].try_into().expect("20 bytes"));
    let Some(rt) = init_child(&spec) else {
        return 3;
    };
    let (Ok(own), Ok(queue)) = (actor::attach(&rt.sh.client, own_id), rt.sh.task_queue()) else {
        return 4;
    };
    actor::serve(&rt.sh.client, queue, &own.mailbox, std::ptr::null_mut())
}

/// Stores `value` as the result `id` for the caller `reply_to` (which gets the only
/// reference); returns where it is (offset, length).
pub(crate) fn put_result<T: Value>(
    client: &StoreClient,
    id: ObjectId,
    value: &T,
    reply_to: (u32, u32),
) -> Result<(u64, u64)> {
    let (w, refs) = write_owned(client, id, value)?;
    let place = (w.offset(), w.len() as u64);
    w.publish_with(Owned {
        contained: refs,
        pin_for: Some(reply_to),
        ..Owned::default()
    })?;
    Ok(place)
}

/// Serialises `value` as the owned object `id`, not yet published; returns the writer and the
/// refs inside the value (for `Owned::contained`).
fn write_owned<T: Value>(
    client: &StoreClient,
    id: ObjectId,
    value: &T,
) -> Result<(OwnedWriter, Vec<ObjectId>)> {
    // Refs first: sharing one may put it in this client's slab, which must happen before this
    // object takes its place there (small puts are published in slab order).
    let (len, refs) = codec::archived_len_and_refs(value)?;
    share_refs(client, &refs)?;
    let mut w = client.alloc_owned(id, len as u64)?;
    let (written, refs) = codec::collect_refs(|| codec::serialize_into(value, w.as_mut_slice()));
    let written = written?;
    if written != len {
        return Err(Error::Serialize {
            type_name: std::any::type_name::<T>(),
            reason: format!("archive was {written} bytes, {len} expected"),
        });
    }
    Ok((w, refs))
}

/// A 20-byte id derived from a namespace and a name (the same in every process and program:
/// FNV-1a, whose output no Rust release changes).
fn named_id(namespace: &str, name: &str) -> ObjectId {
    let mut b = [0u8; 20];
    for (i, chunk) in b.chunks_mut(8).enumerate() {
        let mut key = format!("trove actor {i} ").into_bytes();
        // Lengths first, so that no two (namespace, name) pairs give the same key.
        key.extend_from_slice(&(namespace.len() as u64).to_le_bytes());
        key.extend_from_slice(namespace.as_bytes());
        key.extend_from_slice(name.as_bytes());
        let h = trove_executor::process::fnv1a(&key);
        chunk.copy_from_slice(&h.to_le_bytes()[..chunk.len()]);
    }
    ObjectId(b)
}

/// Sends a task to the worker pool from any process of the tree (a task may spawn tasks).
pub fn spawn<F, Args>(f: F, args: Args) -> Result<ObjectRef<<F::Output as Outcome>::Value>>
where
    F: Function<Args>,
    Args: Value,
{
    actor::spawn_task(&*shared()?, f, args)
}

/// Finds a named actor of this tree's namespace from any process of the tree. An actor of
/// another type under that name gives [`Error::WrongActorType`]; one of another program
/// [`Error::ForeignActor`].
pub fn get_actor<A: 'static>(name: &str) -> Result<ActorHandle<A>> {
    let sh = shared()?;
    get_actor_in(&sh.namespace, name)
}

/// [`get_actor`] in the namespace `namespace` (another driver's, named by
/// [`Config::namespace`]).
pub fn get_actor_in<A: 'static>(namespace: &str, name: &str) -> Result<ActorHandle<A>> {
    let sh = shared()?;
    let named = named_id(namespace, name);
    let r = ObjectRef::<([u8; 20], i32)>::from_id(named);
    let h = match r.get_timeout(Duration::from_millis(200)) {
        Ok(o) => {
            let (id, pid) = o.deserialize()?;
            ActorHandle::new(ObjectRef::from_id(ObjectId(id)), pid)
        }
        Err(Error::Timeout(_)) | Err(Error::ObjectLost(_)) => return Err(Error::NotFound(named)),
        Err(e) => return Err(e),
    };
    // Checked now: of this program, of type `A`.
    h.mailbox(&sh)?;
    Ok(h)
}

static RUNTIME: RwLock<Option<Arc<Shared>>> = RwLock::new(None);

fn current() -> Option<Arc<Shared>> {
    RUNTIME.read().unwrap_or_else(|p| p.into_inner()).clone()
}

pub(crate) fn shared() -> Result<Arc<Shared>> {
    current().ok_or(Error::NotInitialized)
}

/// Starts trove in this process: call it first thing in `main`, before any thread exists.
///
/// With no store address (neither [`Config::store`] nor `TROVE_STORE`) it forks an embedded
/// store daemon that lives as long as the returned [`Runtime`] (and dies with this process);
/// otherwise it connects to the running `troved`. Fails with [`Error::Init`] if trove is already
/// initialised or the process has other threads.
pub fn init(cfg: Config) -> Result<Runtime> {
    if current().is_some() {
        return Err(Error::Init(
            "trove is already initialised in this process".into(),
        ));
    }
    trove_executor::ensure_single_threaded().map_err(|e| Error::Init(e.to_string()))?;
    let (socket, embedded) = match &cfg.store {
        Some(s) => (s.clone(), None),
        None => {
            let store = EmbeddedStore::start(cfg.memory, cfg.prefault).map_err(|e| match e {
                ProcessError::Io(io) => Error::Io(io),
                other => Error::Init(other.to_string()),
            })?;
            (store.socket().to_path_buf(), Some(store))
        }
    };
    let zygote = Zygote::start(&socket).map_err(|e| match e {
        ProcessError::Io(io) => Error::Io(io),
        other => Error::Init(other.to_string()),
    })?;
    let client = StoreClient::connect(&socket)?;
    let namespace = cfg.namespace.clone().unwrap_or_else(unique_namespace);
    let mut sh = Shared::new(client, Some(zygote), ObjectId::default(), namespace);
    *sh.embedded.get_mut().unwrap_or_else(|p| p.into_inner()) = embedded;
    let queue = sh.new_mailbox(TASK_SLOTS, SLOT_BYTES, 0)?;
    sh.task_queue_id = queue.id();
    lock(&sh.owned).push(queue);
    for _ in 0..cfg.num_cpus {
        // A worker's own mailbox: no calls, only its current call and its debts.
        let own = sh.new_mailbox(2, 64, 0)?;
        let spec = ChildSpec {
            socket: socket.clone(),
            namespace: sh.namespace.clone(),
            task_queue: sh.task_queue_id,
            ctor: 0,
            ctor_args: Vec::new(),
        };
        let mut payload = own.id().as_bytes().to_vec();
        payload.extend_from_slice(&spec.encode());
        sh.zygote()?
            .spawn(&SpawnRequest {
                entry: worker_entry,
                mailbox: own.id(),
                queue: sh.task_queue_id,
                respawn: true,
                payload,
            })
            .map_err(|e| Error::Init(e.to_string()))?;
        lock(&sh.owned).push(own);
    }
    let sh = Arc::new(sh);
    // Threads from here on: every fork is done (store, zygote); the zygote forks the rest.
    start_flusher(&sh);
    let mut g = RUNTIME.write().unwrap_or_else(|p| p.into_inner());
    if g.is_some() {
        return Err(Error::Init(
            "trove is already initialised in this process".into(),
        ));
    }
    *g = Some(sh.clone());
    Ok(Runtime { sh })
}

/// Takes one more reference to `id` in this process (a no-op without a runtime).
pub(crate) fn hold(id: &ObjectId) {
    if let Some(sh) = current() {
        let _ = sh.client.hold(id);
    }
}

/// Drops one reference to `id` in this process.
pub(crate) fn release(id: &ObjectId) {
    if let Some(sh) = current() {
        // Most drops are of results already in this process's memory: nothing to settle.
        if !sh.client.release_if_local(id) {
            sh.before_release(id);
            sh.client.release(id);
        }
    }
}

/// Makes the objects `refs` readable by other processes before their ids escape into an
/// object or a call: results of calls in flight are asked for in the store, and results held
/// only in this process's memory are put there.
pub(crate) fn share_refs(client: &StoreClient, refs: &[ObjectId]) -> Result<()> {
    if refs.is_empty() {
        return Ok(());
    }
    let sh = current();
    for id in refs {
        if let Some(sh) = &sh {
            sh.force_store(id);
        }
        client.promote_local(id)?;
    }
    Ok(())
}

/// What [`Runtime::wait`] returns: `(ready, pending)`.
pub type Waited<T> = (Vec<ObjectRef<T>>, Vec<ObjectRef<T>>);

/// The running trove of this process. Dropping it (or [`Runtime::shutdown`]) stops what
/// [`init`] started; refs that outlive it become inert.
pub struct Runtime {
    sh: Arc<Shared>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("store", &self.sh.client.socket_path())
            .finish()
    }
}

impl Runtime {
    /// The namespace of this tree's named actors (see [`Config::namespace`]).
    pub fn namespace(&self) -> &str {
        &self.sh.namespace
    }

    /// The store connection (Plasma-level verbs, stats).
    pub fn store(&self) -> &StoreClient {
        &self.sh.client
    }

    /// The pid of the embedded store daemon, if `init` started one.
    pub fn embedded_store_pid(&self) -> Option<i32> {
        self.sh
            .embedded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|s| s.pid())
    }

    pub fn stats(&self) -> Result<Stats> {
        Ok(self.sh.client.stats()?)
    }

    /// Stores a value: serialised once, straight into shared memory.
    pub fn put<T: Value>(&self, value: &T) -> Result<ObjectRef<T>> {
        put_value(&self.sh, value)
    }

    /// Stores raw bytes.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<ObjectRef<[u8]>> {
        self.put_slice(bytes)
    }

    /// Stores a slice of plain data; read it back as `&[T]` with no copy.
    pub fn put_slice<T: Plain>(&self, values: &[T]) -> Result<ObjectRef<[T]>> {
        let bytes = codec::as_bytes(values);
        let id = ObjectId::random();
        let mut w = self.sh.client.alloc_owned(id, bytes.len() as u64)?;
        w.as_mut_slice().copy_from_slice(bytes);
        w.publish(&[])?;
        Ok(ObjectRef::adopt(id))
    }

    /// Starts an object of `len` elements of `T` written in place: fill the returned
    /// [`Builder`], then [`Builder::seal`] it. The object's id is known at once
    /// ([`Builder::id`]); if this process dies before sealing, waiters get `ObjectLost`.
    pub fn create<T: Plain>(&self, len: usize) -> Result<Builder<T>> {
        if align_of::<T>() > 64 || size_of::<T>() == 0 {
            return Err(Error::Serialize {
                type_name: std::any::type_name::<[T]>(),
                reason: "elements must be sized and aligned to at most 64 bytes".into(),
            });
        }
        let bytes = len
            .checked_mul(size_of::<T>())
            .ok_or_else(|| Error::Serialize {
                type_name: std::any::type_name::<[T]>(),
                reason: format!("{len} elements overflow the address space"),
            })?;
        let id = ObjectId::random();
        let writer = self.sh.client.create_owned(id, bytes as u64)?;
        Ok(Builder {
            writer,
            len,
            _marker: std::marker::PhantomData,
        })
    }

    pub fn get<T: Stored + ?Sized>(&self, r: &ObjectRef<T>) -> Result<Obj<T>> {
        r.get()
    }

    pub fn get_timeout<T: Stored + ?Sized>(
        &self,
        r: &ObjectRef<T>,
        timeout: Duration,
    ) -> Result<Obj<T>> {
        r.get_timeout(timeout)
    }

    /// Waits for every ref and returns owned values, in order.
    pub fn get_all<T: Value>(&self, refs: &[ObjectRef<T>]) -> Result<Vec<T>> {
        get_all_until(&self.sh, refs, None)
    }

    /// [`Runtime::get_all`] with a bound on the whole wait.
    pub fn get_all_timeout<T: Value>(
        &self,
        refs: &[ObjectRef<T>],
        timeout: Duration,
    ) -> Result<Vec<T>> {
        get_all_until(&self.sh, refs, Some(Instant::now() + timeout))
    }

    /// Ray's `wait`: returns `(ready, pending)` once `num_ready` of `refs` are ready (or the
    /// timeout passes; `None` waits forever). `ready` holds at most `num_ready` refs, in input
    /// order; everything else is in `pending`. A lost object counts as ready (its `get` fails
    /// at once).
    pub fn wait<T: ?Sized>(
        &self,
        refs: &[ObjectRef<T>],
        num_ready: usize,
        timeout: Option<Duration>,
    ) -> Result<Waited<T>> {
        let ids: Vec<ObjectId> = refs.iter().map(|r| r.id()).collect();
        let deadline = timeout.map(|t| Instant::now() + t);
        let spin_until = Instant::now() + HINT_SPIN;
        let states = loop {
            // Calls in flight answer in their records first; past a short spin, the rest are
            // asked for in the store and waited for through the daemon.
            let spinning =
                Instant::now() < spin_until && deadline.is_none_or(|d| Instant::now() < d);
            for id in &ids {
                if !self.sh.settle(id) && !spinning {
                    self.sh.force_store(id);
                }
            }
            let now = Some(Instant::now());
            let states = self.sh.client.wait_ready(&ids, num_ready, now)?;
            let ready = states.iter().filter(|s| **s != Readiness::Pending).count();
            if ready >= num_ready.min(ids.len()) {
                break states;
            }
            if !spinning {
                break self.sh.client.wait_ready(&ids, num_ready, deadline)?;
            }
            std::thread::yield_now();
        };
        let (mut ready, mut pending) = (Vec::new(), Vec::new());
        for (r, s) in refs.iter().zip(states) {
            if s != Readiness::Pending && ready.len() < num_ready {
                ready.push(r.clone());
            } else {
                pending.push(r.clone());
            }
        }
        Ok((ready, pending))
    }

    /// Starts an actor: a new process runs `ctor()` and then serves calls.
    pub fn actor<A: 'static, C: Constructor<A, ()>>(&self, ctor: C) -> Result<ActorHandle<A>> {
        self.actor_with(ctor, ())
    }

    /// Starts an actor built by `ctor(args...)`.
    pub fn actor_with<A: 'static, C: Constructor<A, Args>, Args: Value>(
        &self,
        _ctor: C,
        args: Args,
    ) -> Result<ActorHandle<A>> {
        let sh = &self.sh;
        let ctor_args = rkyv::to_bytes::<codec::RkyvError>(&args)
            .map_err(|e| Error::Serialize {
                type_name: std::any::type_name::<Args>(),
                reason: e.to_string(),
            })?
            .to_vec();
        let mailbox = sh.new_mailbox(MAILBOX_SLOTS, SLOT_BYTES, actor::type_tag::<A>())?;
        let spec = ChildSpec {
            socket: sh.client.socket_path().to_path_buf(),
            namespace: sh.namespace.clone(),
            task_queue: sh.task_queue_id,
            ctor: actor::ctor_address::<A, C, Args>(),
            ctor_args,
        };
        let mut payload = mailbox.id().as_bytes().to_vec();
        payload.extend_from_slice(&spec.encode());
        let pid = sh
            .zygote()?
            .spawn(&SpawnRequest {
                entry: actor_entry,
                mailbox: mailbox.id(),
                queue: mailbox.id(),
                respawn: false,
                payload,
            })
            .map_err(|e| Error::Init(e.to_string()))?;
        Ok(ActorHandle::new(mailbox, pid))
    }

    /// Starts an actor registered under `name` (see [`get_actor`]); fails if the name is taken.
    pub fn actor_named<A: 'static, C: Constructor<A, ()>>(
        &self,
        name: &str,
        ctor: C,
    ) -> Result<ActorHandle<A>> {
        let id = named_id(&self.sh.namespace, name);
        if lock(&self.sh.named).contains_key(name) {
            return Err(Error::Store(StoreError::AlreadyExists(id)));
        }
        let h = self.actor(ctor)?;
        let entry = (h.id().0, h.pid());
        let len = codec::archived_len(&entry)?;
        let mut w = self.sh.client.alloc_owned(id, len as u64)?;
        codec::serialize_into(&entry, w.as_mut_slice())?;
        w.publish(&[h.id()])?;
        lock(&self.sh.named).insert(name.to_string(), ObjectRef::adopt(id));
        Ok(h)
    }

    /// Kills an actor's process (SIGKILL): its pending and later calls fail with `ActorDied`.
    pub fn kill<A: 'static>(&self, handle: &ActorHandle<A>) -> Result<()> {
        self.sh
            .zygote()?
            .kill(handle.pid())
            .map_err(|e| Error::Init(e.to_string()))
    }

    /// Runs `f(args...)` on the worker pool; returns the result's ref at once.
    pub fn spawn<F: Function<Args>, Args: Value>(
        &self,
        f: F,
        args: Args,
    ) -> Result<ObjectRef<<F::Output as Outcome>::Value>> {
        actor::spawn_task(&self.sh, f, args)
    }

    /// Stops what `init` started: the connection, and the embedded store if there is one.
    /// Objects of this process are released with it.
    pub fn shutdown(self) {
        // Drop does it.
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        {
            let mut g = RUNTIME.write().unwrap_or_else(|p| p.into_inner());
            if g.as_ref().is_some_and(|s| Arc::ptr_eq(s, &self.sh)) {
                *g = None;
            }
        }
        if let Some(z) = &self.sh.zygote {
            z.stop();
        }
        let store = self
            .sh
            .embedded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut s) = store {
            s.stop();
        }
    }
}

fn put_value<T: Value>(sh: &Shared, value: &T) -> Result<ObjectRef<T>> {
    let id = ObjectId::random();
    let (w, refs) = write_owned(&sh.client, id, value)?;
    w.publish(&refs)?;
    Ok(ObjectRef::adopt(id))
}

/// Waits for an object to be sealed and pins it.
fn get_view(
    sh: &Shared,
    id: ObjectId,
    deadline: Option<Instant>,
) -> Result<trove_store::ObjectView> {
    for _ in 0..64 {
        if let Some(v) = sh.client.try_get(&id) {
            return Ok(v);
        }
        if !sh.await_hint(&id, deadline) {
            // Still running: have the result stored so the daemon tells us when it is there.
            sh.force_store(&id);
        }
        if let Some(v) = sh.client.try_get(&id) {
            return Ok(v);
        }
        match sh.client.wait_ready(&[id], 1, deadline)?[0] {
            Readiness::Ready => {}
            Readiness::Lost => return Err(Error::ObjectLost(id)),
            Readiness::Pending => return Err(Error::Timeout(id)),
        }
    }
    // Sealed every time we looked, gone every time we pinned: it is being freed.
    Err(Error::ObjectLost(id))
}

fn get_all_until<T: Value>(
    sh: &Shared,
    refs: &[ObjectRef<T>],
    deadline: Option<Instant>,
) -> Result<Vec<T>> {
    refs.iter()
        .map(|r| {
            let view = get_view(sh, r.id(), deadline)?;
            Obj::<T>::new(view)?.deserialize()
        })
        .collect()
}

impl<T: Stored + ?Sized> ObjectRef<T> {
    /// Waits for the object and returns a zero-copy, validated view of it.
    pub fn get(&self) -> Result<Obj<T>> {
        let sh = shared()?;
        Obj::new(get_view(&sh, self.id(), None)?)
    }

    /// [`ObjectRef::get`], giving up with [`Error::Timeout`] after `timeout`.
    pub fn get_timeout(&self, timeout: Duration) -> Result<Obj<T>> {
        let sh = shared()?;
        Obj::new(get_view(&sh, self.id(), Some(Instant::now() + timeout))?)
    }

    /// [`ObjectRef::get`] without validating the bytes: for trusted hot loops.
    ///
    /// # Safety
    /// The object holds a `T` written by trove (this ref's type is right and nobody corrupted
    /// the bytes); see [`Stored::view_unchecked`].
    pub unsafe fn get_unchecked(&self) -> Result<Obj<T>> {
        let sh = shared()?;
        let view = get_view(&sh, self.id(), None)?;
        // SAFETY: forwarded from the caller.
        unsafe { Obj::new_unchecked(view) }
    }

    /// Whether the object is sealed now (no waiting).
    pub fn is_ready(&self) -> bool {
        current().is_some_and(|sh| {
            sh.settle(&self.id());
            sh.client
                .wait_ready(&[self.id()], 0, Some(Instant::now()))
                .is_ok_and(|s| s[0] == Readiness::Ready)
        })
    }
}

impl<T: Value> ObjectRef<T> {
    /// Waits for the object and deserialises an owned `T`.
    pub fn deserialize(&self) -> Result<T> {
        self.get()?.deserialize()
    }
}

/// An object being written in place ([`Runtime::create`]): derefs to `[T]`.
pub struct Builder<T: Plain> {
    writer: trove_store::client::OwnedWriter,
    len: usize,
    _marker: std::marker::PhantomData<T>,
}

impl<T: Plain> Builder<T> {
    pub fn id(&self) -> ObjectId {
        self.writer.id()
    }

    /// Seals the object: it becomes immutable and visible to every process.
    pub fn seal(self) -> Result<ObjectRef<[T]>> {
        let id = self.writer.id();
        self.writer.publish(&[])?;
        Ok(ObjectRef::adopt(id))
    }
}

impl<T: Plain> std::ops::Deref for Builder<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // The arena hands out 64-byte aligned blocks, and `create` refused T aligned beyond.
        &bytemuck::cast_slice(self.writer.as_slice())[..self.len]
    }
}

impl<T: Plain> std::ops::DerefMut for Builder<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        let len = self.len;
        &mut bytemuck::cast_slice_mut(self.writer.as_mut_slice())[..len]
    }
}
