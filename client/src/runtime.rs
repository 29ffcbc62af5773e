//! The process-global runtime: [`init`], [`Runtime`], and the object verbs.
//!
//! `init` connects this process to a store (forking an embedded one by default) and installs a
//! process-global runtime, so that [`ObjectRef`]s can take and drop references wherever they
//! are (inside values, in other threads) without carrying a handle.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use trove_executor::{EmbeddedStore, ProcessError};
use trove_store::client::Readiness;
use trove_store::{ObjectId, Stats, StoreClient};

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
}

pub(crate) struct Shared {
    pub(crate) client: StoreClient,
    embedded: Mutex<Option<EmbeddedStore>>,
}

static RUNTIME: RwLock<Option<Arc<Shared>>> = RwLock::new(None);

fn current() -> Option<Arc<Shared>> {
    RUNTIME.read().unwrap_or_else(|p| p.into_inner()).clone()
}

fn shared() -> Result<Arc<Shared>> {
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
    let client = StoreClient::connect(&socket)?;
    let sh = Arc::new(Shared {
        client,
        embedded: Mutex::new(embedded),
    });
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
        sh.client.release(id);
    }
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
        let states = self.sh.client.wait_ready(&ids, num_ready, deadline)?;
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
    let len = codec::archived_len(value)?;
    let id = ObjectId::random();
    let mut w = sh.client.alloc_owned(id, len as u64)?;
    let (written, refs) = codec::collect_refs(|| codec::serialize_into(value, w.as_mut_slice()));
    let written = written?;
    if written != len {
        return Err(Error::Serialize {
            type_name: std::any::type_name::<T>(),
            reason: format!("archive was {written} bytes, {len} expected"),
        });
    }
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
    let ids: Vec<ObjectId> = refs.iter().map(|r| r.id()).collect();
    sh.client.wait_ready(&ids, ids.len(), deadline)?;
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
        Ok(unsafe { Obj::new_unchecked(view) })
    }

    /// Whether the object is sealed now (no waiting).
    pub fn is_ready(&self) -> bool {
        current().is_some_and(|sh| {
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
