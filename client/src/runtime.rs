//! [`init`] and [`Runtime`]: starting trove in a process, and the verbs of the process that
//! started it (put, create, get, wait, actors, tasks, shutdown).

use std::sync::Arc;
use std::time::{Duration, Instant};

use trove_executor::message::Failure;
use trove_executor::{EmbeddedConfig, EmbeddedStore, Lifetime, ProcessError, Zygote};
use trove_store::Readiness;
use trove_store::{ObjectId, Stats, StoreClient};

use crate::actor::{self, ActorHandle, ActorOptions, Constructor, Function, entry};
use crate::calls::HINT_SPIN;
use crate::codec::{self, Plain, Value};
use crate::config::Config;
use crate::context::{self, MAILBOX_SLOTS, SLOT_BYTES, Shared, TASK_SLOTS};
use crate::error::{Error, Result};
use crate::get;
use crate::obj::{Obj, Stored};
use crate::object_ref::ObjectRef;
use crate::outcome::Outcome;
use crate::owned::{self, Archive, Seal};

/// Starts trove in this process: call it first thing in `main`, before any thread exists.
///
/// With no store address (neither [`Config::store`] nor `TROVE_STORE`) it forks an embedded
/// store daemon that lives as long as the returned [`Runtime`] (and dies with this process);
/// otherwise it connects to the running `troved`. Fails with [`Error::Init`] if trove is already
/// initialised or the process has other threads.
pub fn init(cfg: Config) -> Result<Runtime> {
    if let Some(sh) = context::current() {
        if cfg.ignore_reinit_error {
            return Ok(Runtime::handle(sh));
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
                ProcessError::NoHugePages(detail) => {
                    Error::Store(trove_store::StoreError::NoHugePages(detail))
                }
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
    sh.task_retries = cfg.task_max_retries;
    let mut pool = Vec::new();
    let queue = entry::new_mailbox(&sh.client, TASK_SLOTS, SLOT_BYTES, 0)?;
    sh.task_queue_id = queue.id();
    pool.push(queue);
    for _ in 0..cfg.num_cpus {
        let own = entry::worker_mailbox(&sh.client)?;
        entry::start_worker(&sh, own.id())?;
        pool.push(own);
    }
    let sh = Arc::new(sh);
    // Threads from here on: every fork is done (store, zygote); the zygote forks the rest.
    context::start_flusher(&sh);
    let rt = Runtime {
        sh,
        _pool: pool,
        owner: true,
    };
    context::install(&rt.sh)?;
    Ok(rt)
}

/// This process's running trove, in the driver or in any task or actor: the same verbs
/// everywhere (put, get, wait, spawn, actors, names, kill, cancel). The handle owns nothing
/// (dropping it stops nothing); [`Error::NotInitialized`] outside a trove process.
pub fn runtime() -> Result<Runtime> {
    Ok(Runtime::handle(context::shared()?))
}

/// What [`Runtime::wait`] returns: `(ready, pending)`.
pub type Waited<T> = (Vec<ObjectRef<T>>, Vec<ObjectRef<T>>);

/// The running trove of this process. Dropping it (or [`Runtime::shutdown`]) stops what
/// [`init`] started; refs that outlive it become inert.
pub struct Runtime {
    sh: Arc<Shared>,
    /// The pool's mailboxes (the task queue, each worker's own), held while this lives.
    _pool: Vec<ObjectRef<[u8]>>,
    /// Made by the `init` that started the runtime (dropping it stops what that started); a
    /// handle from [`runtime`] or a later `init` with [`Config::ignore_reinit_error`] owns
    /// nothing.
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
    /// A handle that owns nothing, on this process's context.
    fn handle(sh: Arc<Shared>) -> Runtime {
        Runtime {
            sh,
            _pool: Vec::new(),
            owner: false,
        }
    }

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
        // First, in input order, until `num_ready` are ready now (a call's record read, or
        // the object in place): waiting for one of many that are mostly done (Ray's pattern
        // of `wait` in a loop) looks at a few, not at every ref.
        if num_ready > 0 {
            let mut found = 0;
            let mut states = vec![Readiness::Pending; ids.len()];
            for (id, state) in ids.iter().zip(states.iter_mut()) {
                self.sh.settle(id);
                if self.sh.locals.contains(id) || self.sh.client.try_get(id).is_some() {
                    *state = Readiness::Ready;
                    found += 1;
                    if found == num_ready {
                        return Ok(split_ready(refs, states, num_ready));
                    }
                }
            }
        }
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
                break get::wait_lending(&self.sh, &ids, num_ready, deadline)?;
            }
            std::thread::yield_now();
        };
        Ok(split_ready(refs, states, num_ready))
    }

    /// Starts an actor: a new process runs `ctor()` and then serves calls. It lives as
    /// [`ActorOptions::default`] says: owned by this process, stopped once no handle to it is
    /// left anywhere.
    pub fn actor<A: 'static, C: Constructor<A, ()>>(&self, ctor: C) -> Result<ActorHandle<A>> {
        self.actor_options(&ActorOptions::default(), ctor, ())
    }

    /// Starts an actor built by `ctor(args...)`.
    pub fn actor_with<A: 'static, C: Constructor<A, Args>, Args: Value>(
        &self,
        ctor: C,
        args: Args,
    ) -> Result<ActorHandle<A>> {
        self.actor_options(&ActorOptions::default(), ctor, args)
    }

    /// Starts an actor registered under `name` (see [`Runtime::get_actor`]); fails with
    /// `AlreadyExists` while an actor of that name lives.
    pub fn actor_named<A: 'static, C: Constructor<A, ()>>(
        &self,
        name: &str,
        ctor: C,
    ) -> Result<ActorHandle<A>> {
        self.actor_options(&ActorOptions::new().name(name), ctor, ())
    }

    /// Starts an actor built by `ctor(args...)` that lives as `opts` says (a name, detached,
    /// restarts, retries).
    pub fn actor_options<A: 'static, C: Constructor<A, Args>, Args: Value>(
        &self,
        opts: &ActorOptions,
        ctor: C,
        args: Args,
    ) -> Result<ActorHandle<A>> {
        self.start_actor(opts, 1, ctor, args)
    }

    /// Ray's threaded actor (`max_concurrency`): up to `max_concurrency` calls run at once,
    /// each on a thread of the actor's process. Methods that take `&self` run beside each
    /// other; one that takes `&mut self` runs alone (the state is behind a read-write lock),
    /// so the actor type must be `Send + Sync`. Calls from one caller may then finish out
    /// of order; `max_concurrency` 1 is an ordinary actor.
    pub fn threaded_actor<A, C, Args>(
        &self,
        opts: &ActorOptions,
        max_concurrency: usize,
        ctor: C,
        args: Args,
    ) -> Result<ActorHandle<A>>
    where
        A: Send + Sync + 'static,
        C: Constructor<A, Args>,
        Args: Value,
    {
        if max_concurrency == 0 || max_concurrency > 1024 {
            return Err(Error::Options(format!(
                "max_concurrency {max_concurrency}: from 1 to 1024"
            )));
        }
        self.start_actor(opts, max_concurrency, ctor, args)
    }

    fn start_actor<A: 'static, C: Constructor<A, Args>, Args: Value>(
        &self,
        opts: &ActorOptions,
        threads: usize,
        _ctor: C,
        args: Args,
    ) -> Result<ActorHandle<A>> {
        opts.check()?;
        let sh = &self.sh;
        let ctor_args = rkyv::to_bytes::<codec::RkyvError>(&args)
            .map_err(|e| Error::Serialize {
                type_name: std::any::type_name::<Args>(),
                reason: e.to_string(),
            })?
            .to_vec();
        let mailbox = entry::new_mailbox(
            &sh.client,
            MAILBOX_SLOTS,
            SLOT_BYTES,
            actor::type_tag::<A>(),
        )?;
        // The token: an object only handles refer to (see `ActorHandle`).
        let token_id = ObjectId::random();
        let internal = Seal {
            internal: true,
            ..Seal::kept(None)
        };
        owned::write(&sh.client, token_id, &mailbox.id().0[..], internal)?;
        let token = ObjectRef::<[u8]>::adopt(token_id);
        // A name's entry (the mailbox and the token) is held by the zygote while the actor
        // lives; ours goes once the zygote has it.
        let entry = match &opts.name {
            Some(name) => {
                let id = named_id(&sh.namespace, name);
                // Created by the daemon (a round trip), so a taken name is refused here.
                owned::write(
                    &sh.client,
                    id,
                    &Archive(&(mailbox.id().0, token_id.0)),
                    Seal {
                        by_daemon: true,
                        internal: true,
                        ..Seal::kept(Some(vec![mailbox.id()]))
                    },
                )?;
                Some(ObjectRef::<[u8]>::adopt(id))
            }
            None => None,
        };
        // A mailbox per extra thread, for its current call and debts; the zygote holds them
        // while the actor lives.
        let lanes = (1..threads)
            .map(|_| entry::worker_mailbox(&sh.client))
            .collect::<Result<Vec<_>>>()?;
        // The zygote waits for the token (a one-way frame): send it now.
        sh.client.flush()?;
        entry::start_actor(
            sh,
            mailbox.id(),
            actor::ctor_address::<A, C, Args>(),
            ctor_args,
            Lifetime {
                max_restarts: opts.max_restarts,
                max_retries: opts.retries(),
                detached: opts.detached,
                token: token_id,
                keep: entry.as_ref().map_or(ObjectId::default(), |e| e.id()),
                ..Lifetime::default()
            },
            lanes.iter().map(|l| l.id()).collect(),
        )?;
        drop((entry, lanes));
        Ok(ActorHandle::new(mailbox, token))
    }

    /// Finds a named actor of this tree's namespace. An actor of another type under that
    /// name gives [`Error::WrongActorType`]; one of another program [`Error::ForeignActor`];
    /// no live actor of that name [`Error::NotFound`].
    pub fn get_actor<A: 'static>(&self, name: &str) -> Result<ActorHandle<A>> {
        self.get_actor_in(&self.sh.namespace, name)
    }

    /// [`Runtime::get_actor`] in the namespace `namespace` (another driver's, named by
    /// [`Config::namespace`]).
    pub fn get_actor_in<A: 'static>(&self, namespace: &str, name: &str) -> Result<ActorHandle<A>> {
        let sh = &self.sh;
        let named = named_id(namespace, name);
        let r = ObjectRef::<([u8; 20], [u8; 20])>::from_id(named);
        let (mailbox, token) = match r.get_timeout(Duration::from_millis(200)) {
            Ok(o) => o.deserialize()?,
            Err(Error::Timeout(_)) | Err(Error::ObjectLost(_)) => {
                return Err(Error::NotFound(named));
            }
            Err(e) => return Err(e),
        };
        // An actor whose handles are all gone is stopping: it is not found (taking a
        // reference to its token now would not bring it back).
        if sh.client.try_get(&ObjectId(token)).is_none() {
            return Err(Error::NotFound(named));
        }
        let h = ActorHandle::new(
            ObjectRef::from_id(ObjectId(mailbox)),
            ObjectRef::from_id(ObjectId(token)),
        );
        // Checked now: of this program, of type `A`.
        h.mailbox(sh)?;
        Ok(h)
    }

    /// Kills an actor's process (SIGKILL) and does not restart it: its pending and later
    /// calls fail with `ActorDied`.
    pub fn kill<A: 'static>(&self, handle: &ActorHandle<A>) -> Result<()> {
        self.sh
            .zygote()?
            .kill(handle.id())
            .map_err(|e| Error::Init(e.to_string()))
    }

    /// Ray's `cancel`: a call or task of this process that has not started is dropped before
    /// it runs, and its ref fails with [`Error::Cancelled`]. With `force`, a task that is
    /// running is stopped too (its worker is killed and replaced; an actor's running call is
    /// never interrupted). A call that has finished, or a ref that is not a call of this
    /// process, is left as it is. Returns whether the ref was cancelled.
    pub fn cancel<T: ?Sized>(&self, r: &ObjectRef<T>, force: bool) -> Result<bool> {
        let sh = &self.sh;
        let id = r.id();
        let Some(mailbox) = sh.calls.cancel(&sh.client, &sh.locals, &id) else {
            return Ok(false);
        };
        // The report takes the result's place: a consumer that meets the call later finds
        // it and skips it; one that runs it anyway cannot store a second result.
        let reported = trove_executor::message::report_failure(
            &sh.client,
            id,
            sh.client.pin_target(),
            Failure::Cancelled,
            "cancelled",
        )?
        .is_some();
        if !reported {
            return Ok(false);
        }
        sh.client.sync_through(sh.client.frames_sent())?;
        mailbox.note_cancel();
        // A get of it parked on the mailbox reads the report now.
        mailbox.result_changed();
        if force && mailbox.type_tag() == 0 {
            sh.zygote()?
                .cancel_running(id)
                .map_err(|e| Error::Init(e.to_string()))?;
        }
        Ok(true)
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
/// `(ready, pending)`: the first `num_ready` refs whose state is not pending, in input order,
/// and all the others.
fn split_ready<T: ?Sized>(
    refs: &[ObjectRef<T>],
    states: Vec<Readiness>,
    num_ready: usize,
) -> Waited<T> {
    let (mut ready, mut pending) = (Vec::new(), Vec::with_capacity(refs.len()));
    for (r, s) in refs.iter().zip(states) {
        if s != Readiness::Pending && ready.len() < num_ready {
            ready.push(r.clone());
        } else {
            pending.push(r.clone());
        }
    }
    (ready, pending)
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
