//! The process-global context: this process's store connection, its zygote (in the driver),
//! its calls in flight, its local values, and the task queue. [`init`](crate::init) (or a
//! forked child's entry) installs it, so that `ObjectRef`s can take and drop references
//! wherever they are (inside values, in other threads) without carrying a handle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use trove_executor::mailbox::Mailbox;
use trove_executor::{EmbeddedStore, Zygote};
use trove_store::Readiness;
use trove_store::{ObjectId, ObjectView, StoreClient};

use crate::calls::Calls;
use crate::error::{Error, Result};
use crate::local::Locals;
use crate::result_map::ResultIds;

/// Mailbox geometry: 1024 slots of 256 bytes (an actor's queue), 4096 for the task queue.
pub(crate) const MAILBOX_SLOTS: u64 = 1024;
pub(crate) const TASK_SLOTS: u64 = 4096;
pub(crate) const SLOT_BYTES: u64 = 256;

/// What this process's trove holds.
pub(crate) struct Shared {
    pub(crate) client: StoreClient,
    pub(crate) embedded: Mutex<Option<EmbeddedStore>>,
    /// The zygote: the driver's handle, or a child's link to it.
    pub(crate) zygote: Option<Zygote>,
    /// A task worker's process (its blocked tasks lend their CPU: see `actor::entry::lend`).
    pub(crate) worker: bool,
    /// How many times a task is run again after its worker died.
    pub(crate) task_retries: u32,
    pub(crate) task_queue_id: ObjectId,
    task_queue: OnceLock<std::result::Result<Attached, String>>,
    /// Where this tree's named actors live (see [`Config::namespace`](crate::Config::namespace)).
    pub(crate) namespace: String,
    /// Names the results of this process's calls (the keys of `calls` and `locals`).
    pub(crate) result_ids: ResultIds,
    /// Calls in flight whose completion record this process has not read yet.
    pub(crate) calls: Calls,
    /// Calls' small results kept in this process's memory, and the references to them
    /// (shared with each thread's copy of the context: see [`hold`] and [`release`]).
    pub(crate) locals: Arc<Locals>,
}

impl Shared {
    pub(crate) fn new(
        client: StoreClient,
        zygote: Option<Zygote>,
        task_queue_id: ObjectId,
        namespace: String,
    ) -> Shared {
        let result_ids = ResultIds::new();
        let prefix = result_ids.prefix();
        Shared {
            client,
            embedded: Mutex::new(None),
            zygote,
            worker: false,
            task_retries: 0,
            task_queue_id,
            task_queue: OnceLock::new(),
            namespace,
            result_ids,
            calls: Calls::new(prefix),
            locals: Arc::new(Locals::new(prefix)),
        }
    }

    /// Looks at the record of the call for `id`, if one is in flight (see [`Calls::settle`]).
    pub(crate) fn settle(&self, id: &ObjectId) -> bool {
        self.calls.settle(&self.client, &self.locals, id)
    }

    /// Asks for the result `id` of a call in flight in the store (see [`Calls::force_store`]).
    pub(crate) fn force_store(&self, id: &ObjectId) {
        self.calls.force_store(&self.client, &self.locals, id)
    }

    /// Takes one more reference to `id` in this process: a local value's count, or the store
    /// client's. While a thread looks, a call's result may move into the local values (the
    /// store client then no longer holds it), and from there back to the store client
    /// (promoted), each at most once and under the local values' lock: so the looks go here,
    /// there, here, there, and the last one takes a new reference if none was found.
    pub(crate) fn hold(&self, id: &ObjectId) {
        if self.locals.hold(id) || self.client.hold_if_held(id) || self.locals.hold(id) {
            return;
        }
        let _ = self.client.hold(id);
    }

    /// Drops one reference to `id` in this process. A local value's costs one lock; for the
    /// others, see [`Shared::before_release`]. The looks go as in [`Shared::hold`].
    pub(crate) fn release(&self, id: &ObjectId) {
        if self.locals.release(&self.client, id) {
            return;
        }
        self.before_release(id);
        if !self.client.release(id) && !self.locals.release(&self.client, id) {
            self.client.release(id);
        }
    }

    /// [`StoreClient::wait_ready`] for ids that may be local values (ready).
    pub(crate) fn wait_ready(
        &self,
        ids: &[ObjectId],
        num_ready: usize,
        deadline: Option<Instant>,
    ) -> Result<Vec<Readiness>> {
        let local = self.locals.which(ids);
        let here = local.iter().filter(|l| **l).count();
        if here == 0 {
            return Ok(self.client.wait_ready(ids, num_ready, deadline)?);
        }
        let rest: Vec<ObjectId> = ids
            .iter()
            .zip(&local)
            .filter(|(_, l)| !**l)
            .map(|(id, _)| *id)
            .collect();
        let mut states = self
            .client
            .wait_ready(&rest, num_ready.saturating_sub(here), deadline)?
            .into_iter();
        Ok(local
            .iter()
            .map(|l| match l {
                true => Readiness::Ready,
                false => states.next().unwrap_or(Readiness::Pending),
            })
            .collect())
    }

    /// Before this process drops its last reference to a call's result: settle the record so
    /// that an inline result is taken (and dropped here) and a pending one goes to the store
    /// (where the release finds it).
    fn before_release(&self, id: &ObjectId) {
        let last = || self.client.held_count(id) <= 1;
        if self.calls.contains_or_forget(id, last) && last() && !self.settle(id) {
            self.force_store(id);
        }
    }

    /// The pool's task queue, mapped in this process.
    pub(crate) fn task_queue(&self) -> Result<&Mailbox> {
        match self
            .task_queue
            .get_or_init(|| attach(&self.client, self.task_queue_id).map_err(|e| e.to_string()))
        {
            Ok(a) => Ok(&a.mailbox),
            Err(e) => Err(Error::TaskFailed(format!("task queue: {e}"))),
        }
    }

    /// The zygote that forks actors and workers.
    pub(crate) fn zygote(&self) -> Result<&Zygote> {
        self.zygote.as_ref().ok_or_else(|| {
            Error::Init(
                "this process has no link to trove's zygote (it was not started by trove)".into(),
            )
        })
    }
}

/// A mailbox object mapped in this process.
pub(crate) struct Attached {
    _view: ObjectView,
    pub(crate) mailbox: Mailbox,
}

/// Maps the mailbox object `id` (pinned while the result lives).
pub(crate) fn attach(client: &StoreClient, id: ObjectId) -> Result<Attached> {
    let view = client
        .get(id, Duration::from_secs(30))
        .map_err(|e| Error::ActorDied(format!("mailbox {id}: {e}")))?;
    let ptr = view
        .shared_ptr()
        .ok_or_else(|| Error::ActorDied(format!("mailbox {id}: not in shared memory")))?;
    // SAFETY: the pointer comes from the raw shared mapping (writes through it are allowed),
    // the view pins the mailbox object, and the Mailbox is dropped with it (same struct).
    let mailbox = unsafe { Mailbox::attach(ptr, view.len()) }
        .map_err(|e| Error::ActorDied(format!("mailbox {id}: {e}")))?;
    Ok(Attached {
        _view: view,
        mailbox,
    })
}

static RUNTIME: RwLock<Option<Arc<Shared>>> = RwLock::new(None);
/// Bumped (under `RUNTIME`'s write lock) whenever the installed context changes.
static GENERATION: AtomicU64 = AtomicU64::new(0);

std::thread_local! {
    /// This thread's copy of the installed context and the generation it was read at: a
    /// call, a get and a ref's drop each look the context up, and the read lock and count of
    /// `RUNTIME` are shared by every thread. Weak, so that a thread that used trove once does
    /// not keep a shut-down context (its store, its connection) alive; but its local values'
    /// table is held, so that a ref's clone and drop find it with no count taken and given
    /// back (an `Arc`'s count is a locked instruction each way). A stale table is memory only,
    /// let go of at this thread's next look or its exit.
    static CACHED: std::cell::RefCell<Cached> = const {
        std::cell::RefCell::new(Cached {
            generation: u64::MAX,
            shared: Weak::new(),
            locals: None,
        })
    };
}

struct Cached {
    generation: u64,
    shared: Weak<Shared>,
    locals: Option<Arc<Locals>>,
}

/// This process's context, if trove is initialised.
pub(crate) fn current() -> Option<Arc<Shared>> {
    let generation = GENERATION.load(Ordering::Acquire);
    let cached = CACHED.try_with(|c| {
        let c = c.try_borrow().ok()?;
        if c.generation == generation {
            c.shared.upgrade()
        } else {
            None
        }
    });
    if let Ok(Some(sh)) = cached {
        return Some(sh);
    }
    let g = RUNTIME.read().unwrap_or_else(|p| p.into_inner());
    let sh = g.clone();
    // Read under the lock: a change after it bumps the generation again.
    let generation = GENERATION.load(Ordering::Acquire);
    drop(g);
    let fresh = Cached {
        generation,
        shared: sh.as_ref().map_or_else(Weak::new, Arc::downgrade),
        locals: sh.as_ref().map(|sh| sh.locals.clone()),
    };
    let _ = CACHED.try_with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            *c = fresh;
        }
    });
    sh
}

/// Runs `f` on the installed context's local values, as this thread's copy of the context
/// has them (no count taken): `None` if that copy is stale or there is no context (then
/// [`current`] looks again).
fn with_locals<R>(f: impl FnOnce(&Locals) -> R) -> Option<R> {
    let generation = GENERATION.load(Ordering::Acquire);
    CACHED
        .try_with(|c| {
            let c = c.try_borrow().ok()?;
            if c.generation != generation {
                return None;
            }
            c.locals.as_deref().map(f)
        })
        .ok()
        .flatten()
}

/// This process's context, or [`Error::NotInitialized`].
pub(crate) fn shared() -> Result<Arc<Shared>> {
    current().ok_or(Error::NotInitialized)
}

/// Installs `sh` as this process's context, unless one is installed already.
pub(crate) fn install(sh: &Arc<Shared>) -> Result<()> {
    let mut g = RUNTIME.write().unwrap_or_else(|p| p.into_inner());
    if g.is_some() {
        return Err(Error::Init(
            "trove is already initialised in this process".into(),
        ));
    }
    *g = Some(sh.clone());
    GENERATION.fetch_add(1, Ordering::AcqRel);
    Ok(())
}

/// Installs `sh` as this process's context whatever was there (a forked child joining the
/// tree).
pub(crate) fn install_child(sh: &Arc<Shared>) {
    let mut g = RUNTIME.write().unwrap_or_else(|p| p.into_inner());
    *g = Some(sh.clone());
    GENERATION.fetch_add(1, Ordering::AcqRel);
}

/// Removes `sh` if it is this process's context.
pub(crate) fn uninstall(sh: &Arc<Shared>) {
    let mut g = RUNTIME.write().unwrap_or_else(|p| p.into_inner());
    if g.as_ref().is_some_and(|s| Arc::ptr_eq(s, sh)) {
        *g = None;
        GENERATION.fetch_add(1, Ordering::AcqRel);
    }
    // Its flusher may be waiting for frames: it ends now rather than at its timeout.
    sh.client.wake_flusher();
}

/// Writes batched one-way frames a millisecond or so after they are queued, so that a process
/// that drops refs and then idles still releases them promptly, and every 10 ms releases the
/// arguments of forgotten calls that have run ([`Calls::reap_running`]). With nothing to write
/// and no such calls it sleeps until a frame is queued (at most 100 ms at a time), so an idle
/// process costs nothing. Ends with the context.
pub(crate) fn start_flusher(sh: &Arc<Shared>) {
    let weak = Arc::downgrade(sh);
    let client = sh.client.clone();
    if client.set_batching(true).is_err() {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("trove-flusher".into())
        .spawn(move || {
            let mut reaped = Instant::now();
            loop {
                let Some(sh) = weak.upgrade() else {
                    return;
                };
                let running = sh.calls.has_running();
                if running && reaped.elapsed() >= Duration::from_millis(10) {
                    sh.calls.reap_running(&sh.client);
                    reaped = Instant::now();
                }
                if sh.client.flush().is_err() {
                    return;
                }
                drop(sh);
                if running || client.wait_for_frames(Duration::from_millis(100)) {
                    // Let a burst of frames gather into one write.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
}

/// Takes one more reference to `id` in this process (a no-op without a context).
pub(crate) fn hold(id: &ObjectId) {
    // A local value's count: no look at the rest of the context.
    if with_locals(|l| l.hold(id)) == Some(true) {
        return;
    }
    if let Some(sh) = current() {
        sh.hold(id);
    }
}

/// Drops one reference to `id` in this process.
pub(crate) fn release(id: &ObjectId) {
    if with_locals(|l| l.release_local(id)) == Some(true) {
        return;
    }
    if let Some(sh) = current() {
        sh.release(id);
    }
}
