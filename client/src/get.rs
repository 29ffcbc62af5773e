//! Reading: waiting for an object (a call's completion record first, then the daemon; a call's
//! small result is read in this process's memory, see [`crate::local`]), and
//! [`ObjectRef::get`] and its variants.

use std::sync::Arc;
use std::time::{Duration, Instant};

use trove_store::ObjectId;
use trove_store::Readiness;

use crate::actor::entry;
use crate::codec::Value;
use crate::context::{self, Shared};
use crate::error::{Error, Result};
use crate::obj::{self, LocalView, Obj, Stored, View};
use crate::object_ref::ObjectRef;

/// A view of `id` if it can be had now: a local value, or a store object pinned in place.
fn try_view(sh: &Arc<Shared>, id: &ObjectId) -> Option<View> {
    local_view(sh, id).or_else(|| sh.client.try_get(id).map(View::Store))
}

/// A view of `id` if it is a local value (a call's small result taken from its record).
fn local_view(sh: &Arc<Shared>, id: &ObjectId) -> Option<View> {
    sh.locals
        .view(id)
        .map(|value| View::Local(LocalView { id: *id, value }))
}

/// Waits for an object (a call's result in its record first, then the daemon) and pins it.
pub(crate) fn view(sh: &Arc<Shared>, id: ObjectId, deadline: Option<Instant>) -> Result<View> {
    // Once the daemon said ready: the view found forgets how a loss would have read
    // (`Calls::read`), not before (a lost result may still read as ready for a moment).
    let mut waited = false;
    let found = |v: View, waited: bool| {
        if waited {
            sh.calls.read(&id);
        }
        Ok(v)
    };
    for _ in 0..64 {
        // A call in flight is read from its record first: no store lookup while it runs (in
        // a fresh process each lookup of a new id touches a directory page not yet mapped).
        if let Some(v) = local_view(sh, &id) {
            return found(v, waited);
        }
        // A task worker parks for less: a wait that lasts lends its CPU (see `wait_lending`).
        let park = if sh.worker { PARK_WORKER } else { PARK };
        let mut taken = None;
        if !sh
            .calls
            .await_hint(&sh.client, &sh.locals, &id, deadline, park, &mut taken)
        {
            // Still running: have the result stored so the daemon tells us when it is there.
            sh.force_store(&id);
        }
        // Taken out of its record just now: no need to look it up.
        if let Some(value) = taken {
            return found(View::Local(LocalView { id, value }), waited);
        }
        if let Some(v) = try_view(sh, &id) {
            return found(v, waited);
        }
        match wait_lending(sh, &[id], 1, deadline)?[0] {
            Readiness::Ready => waited = true,
            Readiness::Lost => {
                // A call's result lost with the process that was writing it: the call failed.
                return Err(match sh.calls.failure_if_lost(&id) {
                    Some(true) => Error::TaskFailed(format!(
                        "the worker running it died while writing its result {id}, or could not store it"
                    )),
                    Some(false) => Error::ActorDied(format!(
                        "the actor died while writing the result {id}, or could not store it"
                    )),
                    None => Error::ObjectLost(id),
                });
            }
            Readiness::Pending => return Err(Error::Timeout(id)),
        }
    }
    // Sealed every time we looked, gone every time we pinned: it is being freed.
    Err(Error::ObjectLost(id))
}

/// How long a get sleeps on its call's mailbox, after spinning, before it asks for the result
/// in the store and waits for the daemon: a consumer that is not running (more runnable
/// processes than cores) wakes its caller itself when it gets a core, with no third process.
const PARK: Duration = Duration::from_millis(20);
/// [`PARK`] in a task worker.
const PARK_WORKER: Duration = Duration::from_micros(500);

/// How long a wait in a task goes before the task's worker lends its CPU to the pool.
const LEND_AFTER: Duration = Duration::from_millis(1);

/// [`Shared::wait_ready`]; in a task worker, a wait that lasts lends the worker's CPU to the
/// pool (another worker runs meanwhile: see `actor::entry::lend`), so that tasks waiting for
/// tasks never hold every worker.
pub(crate) fn wait_lending(
    sh: &Arc<Shared>,
    ids: &[ObjectId],
    num_ready: usize,
    deadline: Option<Instant>,
) -> Result<Vec<Readiness>> {
    if !sh.worker {
        return sh.wait_ready(ids, num_ready, deadline);
    }
    let soon = Instant::now() + LEND_AFTER;
    let first = deadline.map_or(soon, |d| d.min(soon));
    let states = sh.wait_ready(ids, num_ready, Some(first))?;
    let ready = states.iter().filter(|s| **s != Readiness::Pending).count();
    if ready >= num_ready.min(ids.len()) || deadline.is_some_and(|d| Instant::now() >= d) {
        return Ok(states);
    }
    let _lent = entry::lend(sh);
    sh.wait_ready(ids, num_ready, deadline)
}

/// How many refs a `get_all` looks up among the local values under one lock.
const LOOKUP_BATCH: usize = 32;

/// Waits for every ref (until `deadline`) and deserialises owned values, in order. Local
/// values (calls' small results already taken) are copied a batch at a time, under one lock,
/// and deserialised from the copies; the rest wait as a get does.
pub(crate) fn all_until<T: Value>(
    sh: &Arc<Shared>,
    refs: &[ObjectRef<T>],
    deadline: Option<Instant>,
) -> Result<Vec<T>> {
    let mut out = Vec::with_capacity(refs.len());
    let mut found = Vec::with_capacity(LOOKUP_BATCH.min(refs.len()));
    let mut copies = Vec::new();
    for batch in refs.chunks(LOOKUP_BATCH) {
        // (`found` is drained by the loop below.)
        copies.clear();
        sh.locals
            .copy_many(batch.iter().map(|r| r.id()), &mut copies, &mut found);
        for (r, copied) in batch.iter().zip(found.drain(..)) {
            let id = r.id();
            out.push(match copied {
                Some(c) => obj::deserialize_copy::<T>(id, c.bytes(&copies), c.is_error())?,
                None => Obj::<T>::new(view(sh, id, deadline)?)?.deserialize()?,
            });
        }
    }
    Ok(out)
}

impl<T: Stored + ?Sized> ObjectRef<T> {
    /// Waits for the object and returns a zero-copy, validated view of it.
    pub fn get(&self) -> Result<Obj<T>> {
        let sh = context::shared()?;
        Obj::new(view(&sh, self.id(), None)?)
    }

    /// [`ObjectRef::get`], giving up with [`Error::Timeout`] after `timeout`.
    pub fn get_timeout(&self, timeout: Duration) -> Result<Obj<T>> {
        let sh = context::shared()?;
        Obj::new(view(&sh, self.id(), Some(Instant::now() + timeout))?)
    }

    /// [`ObjectRef::get`] without validating the bytes: for trusted hot loops.
    ///
    /// # Safety
    /// The object holds a `T` written by trove (this ref's type is right and nobody corrupted
    /// the bytes); see [`Stored::view_unchecked`].
    pub unsafe fn get_unchecked(&self) -> Result<Obj<T>> {
        let sh = context::shared()?;
        let view = view(&sh, self.id(), None)?;
        // SAFETY: forwarded from the caller.
        unsafe { Obj::new_unchecked(view) }
    }

    /// Whether the object is sealed now (no waiting).
    pub fn is_ready(&self) -> bool {
        context::current().is_some_and(|sh| {
            sh.settle(&self.id());
            sh.wait_ready(&[self.id()], 0, Some(Instant::now()))
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
