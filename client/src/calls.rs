//! Calls in flight: where each result will be recorded (see [`trove_executor::record`]), and
//! what each call keeps alive until it has run.
//!
//! A small result comes back only through its record, so a call stays here until its record
//! has been read (the result taken into this process, or found in the store) or the caller
//! asked for the store.
//!
//! Each call also keeps what its arguments refer to (the argument object, and every
//! `ObjectRef` inside the arguments) until the callee has run it: the callee takes its own
//! references while it deserialises the arguments, so once the call has run, the caller's
//! are no longer needed. They are released with the call's entry ([`Kept`]'s drop), keyed by
//! the call, never by the order calls were made in.
//!
//! A call's entry keeps its actor handle alive, and dropping a handle drops its mailbox ref,
//! which comes back here: so entries are always dropped after the lock is released.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use trove_executor::Spin;
use trove_executor::mailbox::{Mailbox, MailboxError};
use trove_executor::record::{INLINE_MAX, Seen, Took};
use trove_store::Readiness;
use trove_store::{ObjectId, StoreClient};

use crate::local::{Local, Locals};
use crate::result_map::ResultMap;

/// How long a get polls a completion record before it asks for the result in the store and
/// waits for the daemon's notification.
pub(crate) const HINT_SPIN: Duration = Duration::from_micros(200);
std::thread_local! {
    /// Whether this thread's last wait in [`Calls::await_hint`] ended quickly.
    static HINT_QUICK: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}
/// How many finished calls a new call harvests.
const HARVEST_PER_CALL: usize = 4;

/// The calls in flight of this process whose records it still has to read.
pub(crate) struct Calls(Mutex<Inner>);

struct Inner {
    /// By result id: stored in the order calls were made (a harvest reads them front to
    /// back, and a batch of calls sits together in memory), found by index (see
    /// [`ResultMap`]).
    in_flight: ResultMap<Hint>,
    /// Calls forgotten by id (their result asked for in the store, or dropped) that may
    /// still be running and keep arguments: kept until they have run (see [`Running`]).
    running: Vec<Running>,
    /// Calls asked for in the store before they had finished, whose result this process has
    /// not read yet: `true` for a task. If such a result is lost (its consumer died while
    /// writing it, so no failure report can take its place), a get says how the call failed
    /// (`ActorDied`, `TaskFailed`) rather than `ObjectLost`.
    forced: FxHashMap<ObjectId, bool>,
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
#[derive(Default)]
pub(crate) struct Kept {
    ids: Vec<ObjectId>,
    /// The connection the references were taken on (none while there are none).
    client: Option<StoreClient>,
}

impl Kept {
    /// Takes a reference to `id`, kept until this is dropped.
    pub(crate) fn hold(&mut self, client: &StoreClient, id: ObjectId) -> trove_store::Result<()> {
        client.hold(&id)?;
        self.adopt(client, id);
        Ok(())
    }

    /// Keeps the reference to `id` this process already took.
    pub(crate) fn adopt(&mut self, client: &StoreClient, id: ObjectId) {
        self.client.get_or_insert_with(|| client.clone());
        self.ids.push(id);
    }

    fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        if let Some(client) = &self.client {
            for id in &self.ids {
                client.release(id);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Calls {
    /// No calls yet; their results are named with `prefix` (see
    /// [`ResultIds`](crate::result_map::ResultIds)).
    pub(crate) fn new(prefix: [u8; 12]) -> Calls {
        Calls(Mutex::new(Inner {
            in_flight: ResultMap::new(prefix),
            running: Vec::new(),
            forced: FxHashMap::default(),
        }))
    }

    /// Remembers the call whose result is `result`, at `pos` of `mailbox`, and first, under
    /// the same lock, reads a few finished calls' records (oldest first: see
    /// [`Calls::harvest`]).
    pub(crate) fn insert(
        &self,
        client: &StoreClient,
        locals: &Locals,
        result: ObjectId,
        (mailbox, pos): (Mailbox, u64),
        keep: Kept,
        keepalive: Option<Arc<dyn Send + Sync>>,
    ) {
        let mut calls = lock(&self.0);
        let read = Self::harvest_locked(&mut calls, client, locals, HARVEST_PER_CALL);
        let old = calls.in_flight.insert(
            result,
            Hint {
                mailbox,
                pos,
                keep,
                _keepalive: keepalive,
            },
        );
        let running = !calls.running.is_empty();
        // Hints are dropped unlocked (see `settle`).
        drop(calls);
        drop(old);
        drop(read);
        if running {
            self.reap_running(client);
        }
    }

    /// Whether the call for `id` is in flight.
    /// Whether the call for `id` is in flight; if not, and `last()` (this process drops its
    /// last reference to it), forgets what [`Calls::failure_if_lost`] would have said. `last`
    /// is asked only then: most releases pay one lock, as before.
    pub(crate) fn contains_or_forget(&self, id: &ObjectId, last: impl FnOnce() -> bool) -> bool {
        let mut calls = lock(&self.0);
        if calls.in_flight.contains(id) {
            return true;
        }
        if !calls.forced.is_empty() && last() {
            calls.forced.remove(id);
            trove_store::shrink_if_sparse(&mut calls.forced);
        }
        false
    }

    /// How a call whose result `id` was lost failed: `Some(true)` for a task, `Some(false)`
    /// for an actor's call, `None` if `id` is not such a result. Forgets it.
    pub(crate) fn failure_if_lost(&self, id: &ObjectId) -> Option<bool> {
        let mut calls = lock(&self.0);
        if calls.forced.is_empty() {
            return None;
        }
        calls.forced.remove(id)
    }

    /// Remembers that a loss of the result `id` (of a call whose consumer died, found dead
    /// just after the push) means the call failed: its consumer may have taken it and died
    /// writing its result, which the daemon then reports lost.
    pub(crate) fn lost_means_failed(&self, id: ObjectId, task: bool) {
        lock(&self.0).forced.insert(id, task);
    }

    /// The result `id` has been read: it can no longer be lost to its consumer's death.
    pub(crate) fn read(&self, id: &ObjectId) {
        let mut calls = lock(&self.0);
        if !calls.forced.is_empty() {
            calls.forced.remove(id);
        }
    }

    /// Reads a call's completion record: takes an inline result into this process's local
    /// values, or tells the store client where the stored one is. `true` once the record has
    /// nothing more to say. A record that no longer speaks for the call (reused, or abandoned
    /// by the reaper of a consumer that died running it) sends the caller to the store; the
    /// call is then remembered in `forced`, so that a result lost there (its consumer died
    /// writing it) reads as the call's failure, not as `ObjectLost`.
    fn look(
        client: &StoreClient,
        locals: &Locals,
        forced: &mut FxHashMap<ObjectId, bool>,
        id: &ObjectId,
        hint: &Hint,
        taken: Option<&mut Option<Arc<Local>>>,
    ) -> bool {
        let rec = hint.mailbox.record(hint.pos);
        match rec.seen(hint.pos) {
            Seen::Pending => false,
            Seen::Inline => {
                let mut bytes = [0u8; INLINE_MAX];
                match rec.take_inline(hint.pos, &mut bytes) {
                    Took::Value { error, len } => {
                        let bytes = &bytes[..len];
                        match taken {
                            Some(taken) => *taken = locals.take_shared(client, id, bytes, error),
                            None => {
                                locals.take(client, id, bytes, error);
                            }
                        }
                        true
                    }
                    // Evicted to the store meanwhile: the next look says so.
                    Took::No => false,
                }
            }
            Seen::Stored { offset, len, error } => {
                locals.unpend(client, id);
                client.resolve_pending(id, offset, len, error);
                true
            }
            Seen::Gone => {
                // In the store (evicted), or reported there (its consumer died).
                locals.unpend(client, id);
                // The task queue's mailbox has type tag 0; an actor's names its type.
                forced.insert(*id, hint.mailbox.type_tag() == 0);
                true
            }
        }
    }

    /// Looks at the record of the call for `id`, if one is in flight; forgets it once read.
    /// `true` if nothing is left to wait for there.
    pub(crate) fn settle(&self, client: &StoreClient, locals: &Locals, id: &ObjectId) -> bool {
        self.settle_taking(client, locals, id, None)
    }

    /// [`Calls::settle`]; a value it takes out of the record is left in `taken` too.
    fn settle_taking(
        &self,
        client: &StoreClient,
        locals: &Locals,
        id: &ObjectId,
        taken: Option<&mut Option<Arc<Local>>>,
    ) -> bool {
        let mut calls = lock(&self.0);
        let Inner {
            in_flight, forced, ..
        } = &mut *calls;
        let Some(hint) = in_flight.get(id) else {
            return true;
        };
        let done = Self::look(client, locals, forced, id, hint, taken);
        if done {
            let hint = calls.in_flight.remove(id);
            // Dropping a hint may drop an actor handle, whose mailbox ref comes back here.
            drop(calls);
            drop(hint);
        }
        done
    }

    /// Polls the completion record of a call in flight for a short while, then sleeps on
    /// its mailbox for up to `park` until a record changes. The record is
    /// watched without the lock (one load per look; the lock and the map only once it has
    /// something to say), spinning purely at first while this thread's last such wait ended
    /// soon (see [`Spin`]). A value it takes out of the record is left in `taken` too (the
    /// get reads it without looking it up again).
    pub(crate) fn await_hint(
        &self,
        client: &StoreClient,
        locals: &Locals,
        id: &ObjectId,
        deadline: Option<Instant>,
        park: Duration,
        taken: &mut Option<Arc<Local>>,
    ) -> bool {
        let Some((mailbox, pos)) = lock(&self.0).in_flight.get(id).map(|h| (h.mailbox, h.pos))
        else {
            return true;
        };
        // A copy of the mailbox stays readable while this process's store client lives (the
        // region is in its arena mapping): if the call is settled by another thread
        // meanwhile and the record reused, the record reads as moved on and `settle` finds
        // the call gone.
        let rec = mailbox.record(pos);
        // While the callee runs: the slot of this caller's next call, if it calls here again.
        mailbox.prefetch_for_producer();
        let start = Instant::now();
        let until = deadline.map_or(start + HINT_SPIN, |d| d.min(start + HINT_SPIN));
        let mut spin = Spin::new(start, HINT_QUICK.get());
        let mut looks = 0u32;
        loop {
            looks = looks.wrapping_add(1);
            // Every 64 looks the map too, in case the record was reused for a call of
            // another thread.
            if (rec.seen(pos) != Seen::Pending || looks.is_multiple_of(64))
                && self.settle_taking(client, locals, id, Some(&mut *taken))
            {
                HINT_QUICK.set(spin.learn());
                return true;
            }
            if !spin.go_on(until) {
                HINT_QUICK.set(false);
                // Spun for long: the callee is not running (more runnable processes than
                // cores) or the call is long. Sleep until a record of the mailbox changes
                // (its consumer says so after each call), up to `park`: then the store.
                let park_until = start + HINT_SPIN + park;
                let park_until = deadline.map_or(park_until, |d| d.min(park_until));
                // (A call cancelled meanwhile leaves its record pending: it is forgotten here.)
                mailbox.wait_for_result(park_until, || {
                    rec.seen(pos) == Seen::Pending && lock(&self.0).in_flight.contains(id)
                });
                return self.settle_taking(client, locals, id, Some(taken));
            }
        }
    }

    /// Asks for the result `id` (a call in flight) to be put in the store, so that the
    /// daemon can notify waiters and other processes can read it; takes it at once if it is
    /// already inline. A no-op for other ids. The call is forgotten by id; if it may still be
    /// running and keeps arguments alive, it moves to `running` until it has run.
    pub(crate) fn force_store(&self, client: &StoreClient, locals: &Locals, id: &ObjectId) {
        let mut calls = lock(&self.0);
        let Some(hint) = calls.in_flight.remove(id) else {
            return;
        };
        // Its result is going to the store: its references are the store client's to count.
        locals.unpend(client, id);
        let rec = hint.mailbox.record(hint.pos);
        rec.want_store(hint.pos);
        // The task queue's mailbox has type tag 0; an actor's names its type.
        calls.forced.insert(*id, hint.mailbox.type_tag() == 0);
        // The callee stores it from now on, unless it is inline already: then we take it.
        let mut done = false;
        while !done {
            done = Self::look(client, locals, &mut calls.forced, id, &hint, None);
            if rec.seen(hint.pos) == Seen::Pending {
                break;
            }
        }
        if done || hint.keep.is_empty() {
            // Hints are dropped unlocked (see `settle`).
            drop(calls);
            drop(hint);
            return;
        }
        // Held until the call is over (released in `reap_running`): a result this process
        // no longer refers to could otherwise be freed before we see it.
        if client.hold(id).is_err() {
            drop(calls);
            drop(hint);
            return;
        }
        calls.running.push(Running { result: *id, hint });
    }

    /// Forgets the call for `id`, whose caller is about to report it cancelled in the store:
    /// its ref reads the store from now on. Returns its mailbox, or `None` if it is not in
    /// flight here or has finished (its result taken or stored). A result made from now on
    /// goes to the store (where the report, if first, takes its place). What the call keeps
    /// stays kept until it is over, as for [`Calls::force_store`].
    pub(crate) fn cancel(
        &self,
        client: &StoreClient,
        locals: &Locals,
        id: &ObjectId,
    ) -> Option<Mailbox> {
        let mut calls = lock(&self.0);
        let hint = calls.in_flight.remove(id)?;
        // Its report goes to the store: its references are the store client's to count.
        locals.unpend(client, id);
        hint.mailbox.record(hint.pos).want_store(hint.pos);
        if Self::look(client, locals, &mut calls.forced, id, &hint, None) {
            drop(calls);
            drop(hint);
            return None;
        }
        let mailbox = hint.mailbox;
        if hint.keep.is_empty() || client.hold(id).is_err() {
            drop(calls);
            drop(hint);
            return Some(mailbox);
        }
        calls.running.push(Running { result: *id, hint });
        Some(mailbox)
    }

    /// Whether calls forgotten while running keep arguments (see [`Calls::reap_running`]).
    pub(crate) fn has_running(&self) -> bool {
        !lock(&self.0).running.is_empty()
    }

    /// Releases what calls in `running` kept, for those that have run: their record moved
    /// on, their result is in the store (or lost), or their mailbox is dead.
    pub(crate) fn reap_running(&self, client: &StoreClient) {
        let mut calls = lock(&self.0);
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
                || client
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
            client.release(&r.result);
        }
    }

    /// Reads the records of finished calls, oldest first (at most `max`), so that their
    /// inline results are taken before the callee reuses the records.
    fn harvest(&self, client: &StoreClient, locals: &Locals, max: usize) {
        let mut calls = lock(&self.0);
        let read = Self::harvest_locked(&mut calls, client, locals, max);
        let running = !calls.running.is_empty();
        // Dropped unlocked (see `settle`).
        drop(calls);
        drop(read);
        if running {
            self.reap_running(client);
        }
    }

    /// Reads the records of up to `max` of the oldest calls in flight, up to the first one
    /// not finished; returns the hints of those read, for the caller to drop unlocked.
    fn harvest_locked(
        calls: &mut Inner,
        client: &StoreClient,
        locals: &Locals,
        max: usize,
    ) -> Vec<Hint> {
        let mut read = Vec::new();
        let Inner {
            in_flight, forced, ..
        } = calls;
        while read.len() < max {
            let Some((id, hint)) = in_flight.front() else {
                break;
            };
            if !Self::look(client, locals, forced, &id, hint, None) {
                break;
            }
            read.extend(in_flight.remove(&id));
        }
        read
    }

    /// Pushes a call message, harvesting finished calls while the mailbox is full.
    pub(crate) fn push(
        &self,
        client: &StoreClient,
        locals: &Locals,
        mailbox: &Mailbox,
        msg: &[u8],
    ) -> std::result::Result<u64, MailboxError> {
        let backoff = crossbeam_utils::Backoff::new();
        loop {
            if mailbox.is_dead() {
                return Err(MailboxError::Dead);
            }
            if let Some(pos) = mailbox.try_push(msg)? {
                // (A few finished calls are harvested as this one is remembered: `insert`.)
                return Ok(pos);
            }
            // Full: the consumer is draining it. Take finished results meanwhile and yield
            // (a sleep would outlast the whole queue's work).
            self.harvest(client, locals, usize::MAX);
            if backoff.is_completed() {
                std::thread::yield_now();
            } else {
                backoff.snooze();
            }
        }
    }
}
