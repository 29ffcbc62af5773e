//! [`init`] and [`Runtime`]: starting trove in a process, and the verbs of the process that
//! started it (put, create, get, wait, actors, tasks, shutdown).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use trove_executor::{EmbeddedConfig, EmbeddedStore, ProcessError, Zygote};
use trove_store::Readiness;
use trove_store::{ObjectId, Stats, StoreClient, StoreError};

use crate::actor::{self, ActorHandle, Constructor, Function, entry};
use crate::calls::HINT_SPIN;
use crate::codec::{self, Plain, Value};
use crate::config::Config;
use crate::context::{self, MAILBOX_SLOTS, SLOT_BYTES, Shared, TASK_SLOTS};
use crate::error::{Error, Result};
use crate::get;
use crate::obj::{Obj, Stored};
use crate::object_ref::ObjectRef;
use crate::outcome::Outcome;
use crate::owned::{self, Archive, NewMailbox, Seal};

/// Starts trove in this process: call it first thing in `main`, before any thread exists.
///
/// With no store address (neither [`Config::store`] nor `TROVE_STORE`) it forks an embedded
/// store daemon that lives as long as the returned [`Runtime`] (and dies with this process);
/// otherwise it connects to the running `troved`. Fails with [`Error::Init`] if trove is already
/// initialised or the process has other threads.
pub fn init(cfg: Config) -> Result<Runtime> {
    if let Some(sh) = context::current() {
        if cfg.ignore_reinit_error {
            return Ok(Runtime {
                sh,
                _pool: Vec::new(),
                named: Mutex::new(HashMap::new()),
                owner: false,
            });
        }
        return Err(Error::Init(
            "trove is already initialised in this process \
             (Config::ignore_reinit_error(true) returns the running one)"
                .into(),
        ));
    }
    trove_executor::ensure_single_threaded().map_err(|e| Error::Init(e.to_string()))?;
    let (socket, embedded) = match &cfg.store {
        Some(s) => (s.clone(), None),
        None => {
            let store = EmbeddedStore::start(EmbeddedConfig {
                memory: cfg.memory.unwrap_or_else(crate::config::default_memory),
                prefault: cfg.prefault,
                hugepages: cfg.hugepages,
            })
            .map_err(|e| match e {
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
    let namespace = cfg.namespace_or_unique();
    let mut sh = Shared::new(client, Some(zygote), ObjectId::default(), namespace);
    *sh.embedded.get_mut().unwrap_or_else(|p| p.into_inner()) = embedded;
    let mut pool = Vec::new();
    let queue = new_mailbox(&sh.client, TASK_SLOTS, SLOT_BYTES, 0)?;
    sh.task_queue_id = queue.id();
    pool.push(queue);
    for _ in 0..cfg.num_cpus {
        // A worker's own mailbox: no calls, only its current call and its debts.
        let own = new_mailbox(&sh.client, 2, 64, 0)?;
        entry::start_worker(&sh, socket.clone(), own.id())?;
        pool.push(own);
    }
    let sh = Arc::new(sh);
    // Threads from here on: every fork is done (store, zygote); the zygote forks the rest.
    context::start_flusher(&sh);
    let rt = Runtime {
        sh,
        _pool: pool,
        named: Mutex::new(HashMap::new()),
        owner: true,
    };
    context::install(&rt.sh)?;
    Ok(rt)
}

/// Creates a mailbox object for consumers of type `type_tag` (see
/// [`trove_executor::mailbox::Mailbox::init`]); the returned ref holds it.
fn new_mailbox(
    client: &StoreClient,
    slots: u64,
    slot_bytes: u64,
    type_tag: u64,
) -> Result<ObjectRef<[u8]>> {
    let id = ObjectId::random();
    let content = NewMailbox {
        slots,
        slot_bytes,
        type_tag,
    };
    let seal = Seal {
        by_daemon: true,
        ..Seal::kept(None)
    };
    owned::write(client, id, &content, seal)?;
    Ok(ObjectRef::adopt(id))
}

/// What [`Runtime::wait`] returns: `(ready, pending)`.
pub type Waited<T> = (Vec<ObjectRef<T>>, Vec<ObjectRef<T>>);

/// The running trove of this process. Dropping it (or [`Runtime::shutdown`]) stops what
/// [`init`] started; refs that outlive it become inert.
pub struct Runtime {
    sh: Arc<Shared>,
    /// The pool's mailboxes (the task queue, each worker's own), held while this lives.
    _pool: Vec<ObjectRef<[u8]>>,
    /// The entries of this driver's named actors.
    named: Mutex<HashMap<String, ObjectRef<[u8]>>>,
    /// Made by the `init` that started the runtime (dropping it stops what that started); a
    /// handle from a later `init` with [`Config::ignore_reinit_error`] owns nothing.
    owner: bool,
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

    /// The store's statistics (capacity, used bytes, objects, clients...).
    pub fn stats(&self) -> Result<Stats> {
        Ok(self.sh.client.stats()?)
    }

    /// Stores a value: serialised once, straight into shared memory.
    pub fn put<T: Value>(&self, value: &T) -> Result<ObjectRef<T>> {
        let id = ObjectId::random();
        owned::write(&self.sh.client, id, &Archive(value), Seal::kept(None))?;
        Ok(ObjectRef::adopt(id))
    }

    /// Stores raw bytes.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<ObjectRef<[u8]>> {
        self.put_slice(bytes)
    }

    /// Stores a slice of plain data; read it back as `&[T]` with no copy.
    pub fn put_slice<T: Plain>(&self, values: &[T]) -> Result<ObjectRef<[T]>> {
        let id = ObjectId::random();
        owned::write(
            &self.sh.client,
            id,
            codec::as_bytes(values),
            Seal::kept(None),
        )?;
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
        let writer = owned::begin(&self.sh.client, id, bytes)?;
        Ok(Builder {
            writer,
            len,
            _marker: std::marker::PhantomData,
        })
    }

    /// [`ObjectRef::get`]: waits for the object and returns a zero-copy, validated view.
    pub fn get<T: Stored + ?Sized>(&self, r: &ObjectRef<T>) -> Result<Obj<T>> {
        r.get()
    }

    /// [`ObjectRef::get_timeout`].
    pub fn get_timeout<T: Stored + ?Sized>(
        &self,
        r: &ObjectRef<T>,
        timeout: Duration,
    ) -> Result<Obj<T>> {
        r.get_timeout(timeout)
    }

    /// Waits for every ref and returns owned values, in order.
    pub fn get_all<T: Value>(&self, refs: &[ObjectRef<T>]) -> Result<Vec<T>> {
        get::all_until(&self.sh, refs, None)
    }

    /// [`Runtime::get_all`] with a bound on the whole wait.
    pub fn get_all_timeout<T: Value>(
        &self,
        refs: &[ObjectRef<T>],
        timeout: Duration,
    ) -> Result<Vec<T>> {
        get::all_until(&self.sh, refs, Some(Instant::now() + timeout))
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
            let states = self.sh.wait_ready(&ids, num_ready, now)?;
            let ready = states.iter().filter(|s| **s != Readiness::Pending).count();
            if ready >= num_ready.min(ids.len()) {
                break states;
            }
            if !spinning {
                break self.sh.wait_ready(&ids, num_ready, deadline)?;
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
        let mailbox = new_mailbox(
            &sh.client,
            MAILBOX_SLOTS,
            SLOT_BYTES,
            actor::type_tag::<A>(),
        )?;
        let pid = entry::start_actor(
            sh,
            mailbox.id(),
            actor::ctor_address::<A, C, Args>(),
            ctor_args,
        )?;
        Ok(ActorHandle::new(mailbox, pid))
    }

    /// Starts an actor registered under `name` (see [`get_actor`]); fails if the name is taken.
    pub fn actor_named<A: 'static, C: Constructor<A, ()>>(
        &self,
        name: &str,
        ctor: C,
    ) -> Result<ActorHandle<A>> {
        let id = named_id(&self.sh.namespace, name);
        if lock(&self.named).contains_key(name) {
            return Err(Error::Store(StoreError::AlreadyExists(id)));
        }
        let h = self.actor(ctor)?;
        let entry = (h.id().0, h.pid());
        owned::write(
            &self.sh.client,
            id,
            &Archive(&entry),
            Seal::kept(Some(vec![h.id()])),
        )?;
        lock(&self.named).insert(name.to_string(), ObjectRef::adopt(id));
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
        if !self.owner {
            return;
        }
        context::uninstall(&self.sh);
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

/// An object being written in place ([`Runtime::create`]): derefs to `[T]`.
pub struct Builder<T: Plain> {
    writer: trove_store::OwnedWriter,
    len: usize,
    _marker: std::marker::PhantomData<T>,
}

impl<T: Plain> Builder<T> {
    /// The id the object will have (known to the store, and to waiters, already).
    pub fn id(&self) -> ObjectId {
        self.writer.id()
    }

    /// Seals the object: it becomes immutable and visible to every process.
    pub fn seal(self) -> Result<ObjectRef<[T]>> {
        let id = self.writer.id();
        owned::finish(self.writer)?;
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
    actor::spawn_task(&*context::shared()?, f, args)
}

/// Finds a named actor of this tree's namespace from any process of the tree. An actor of
/// another type under that name gives [`Error::WrongActorType`]; one of another program
/// [`Error::ForeignActor`].
pub fn get_actor<A: 'static>(name: &str) -> Result<ActorHandle<A>> {
    let sh = context::shared()?;
    get_actor_in(&sh.namespace, name)
}

/// [`get_actor`] in the namespace `namespace` (another driver's, named by
/// [`Config::namespace`]).
pub fn get_actor_in<A: 'static>(namespace: &str, name: &str) -> Result<ActorHandle<A>> {
    let sh = context::shared()?;
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
