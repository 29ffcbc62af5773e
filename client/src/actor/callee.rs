//! The callee's side of a call, in actor and worker processes: the serving loop, the
//! trampolines (monomorphised per type, method and arguments, sent by address), running a
//! call on its arguments read in place, and handing the result back (inline in the completion
//! record, or stored for the caller and owed until its frame is written).

use std::time::Duration;

use trove_executor::debts::{Debt, Debts, Ledger};
use trove_executor::mailbox::{Mailbox, MailboxError};
use trove_executor::message::{CALL_HEADER, Failure, KIND_CALL_BY_OBJECT, KIND_STOP, Message};
use trove_executor::record::{Claim, INLINE_MAX, InlineResult, Record};
use trove_store::{ObjectId, StoreClient};

use super::traits::{Constructor, Function, Method, conjure};
use crate::codec::{self, Value};
use crate::context::SLOT_BYTES;
use crate::error::Result;
use crate::outcome::Outcome;
use crate::owned::{self, Archive, Seal};

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}

/// How inline arguments are aligned, in the mailbox slot and in the callee's copy of the
/// message: rkyv archives need at most 16 (`u128`).
pub(crate) const ARGS_ALIGN: usize = 16;

/// Zero bytes between the message header and inline arguments, so that the arguments start
/// `ARGS_ALIGN`-aligned (the message is so aligned in the slot and in the callee's copy) and
/// are read in place.
pub(crate) const ARGS_PAD: usize = CALL_HEADER.next_multiple_of(ARGS_ALIGN) - CALL_HEADER;

/// The arguments of a `KIND_CALL` message, after their padding.
pub(crate) fn inline_args<'a>(m: &Message<'a>) -> Option<&'a [u8]> {
    m.args.get(ARGS_PAD..)
}

/// What the callee knows about the call it is running: where the result goes, its
/// completion record, and where the callee notes the results it owes.
pub(crate) struct Call<'a> {
    pub(crate) result: ObjectId,
    pub(crate) reply_to: (u32, u32),
    pub(crate) pos: u64,
    pub(crate) record: &'a Record,
    pub(crate) ledger: &'a Ledger,
    /// The result goes to the store, never inline: a retried call, whose caller may be
    /// watching another record.
    pub(crate) to_store: bool,
}

impl Call<'_> {
    /// This call's own result, as a debt.
    fn debt(&self) -> Debt {
        Debt {
            pos: self.pos,
            result: self.result.0,
            reply_to: self.reply_to,
            evicted: false,
        }
    }
}

/// A result stored in the store whose place is recorded once its frame is written (see
/// [`serve`]): position, offset, length, error.
type Deferred = (u64, u64, u64, bool);

/// Runs `f` on deserialised `args`, catching panics, and hands the outcome to its caller.
fn run_and_report<Args: Value, O: Outcome>(
    client: &StoreClient,
    args: &[u8],
    call: &Call,
    f: impl FnOnce(Args) -> O,
) -> Option<Deferred> {
    let outcome = (|| {
        // Read in place: the message's copy or the argument object, both aligned (see
        // `ARGS_PAD`); anything misaligned or malformed is `Invalid`, never read.
        let archived = codec::access::<Args>(call.result, args).map_err(|e| e.to_string())?;
        let sent = client.frames_sent();
        let args = codec::deserialize::<Args>(call.result, archived).map_err(|e| e.to_string())?;
        // A ref in the arguments to an object not sealed yet is held through a one-way `Hold`
        // frame. The caller lets go of its own references once this call has run, possibly
        // on another connection that the daemon serves first: so those frames must have been
        // handled before the call can be seen to have run. (Sealed objects are pinned in
        // place at once, with no frame: the common case costs nothing.)
        if client.frames_sent() != sent {
            client
                .sync_through(client.frames_sent())
                .map_err(|e| e.to_string())?;
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(args))) {
            Ok(o) => o.into_outcome(),
            Err(p) => Err(format!("panicked: {}", panic_message(p))),
        }
    })();
    let mut small = InlineBuf([0; INLINE_MAX]);
    let done = match outcome {
        Ok(v) => match small_value(&v, &mut small.0) {
            Some(len) if !call.to_store => {
                finish(client, call, Finish::Bytes(&small.0[..len], false))
            }
            _ => match call.ledger.put_owed(client, &call.debt(), || {
                owned::write(
                    client,
                    call.result,
                    &Archive(&v),
                    Seal::for_caller(call.reply_to, false),
                )
            }) {
                Ok(((offset, len), _)) => finish(client, call, Finish::Stored(offset, len)),
                Err(e) => failed(client, call, &e.to_string()),
            },
        },
        Err(msg) => failed(client, call, &msg),
    };
    done.unwrap_or_else(|e| {
        tracing::warn!("call result {}: {e}", call.result);
        // Neither the result nor a report of the failure reached the record or the store
        // (the store is full): the id is given up, so that its caller learns it is lost
        // rather than waiting for it.
        let _ = client.give_up(call.result);
        None
    })
}

#[repr(C, align(64))]
struct InlineBuf([u8; INLINE_MAX]);

/// Serialises `v` into `buf` if it is small enough to travel inline and holds no refs: in
/// one pass, straight into `buf` (no counting pass first: most results fit). One that does
/// not fit, or fails to serialise, goes the store's way, which says why if it fails there.
fn small_value<T: Value>(v: &T, buf: &mut [u8]) -> Option<usize> {
    let (written, refs) = codec::collect_refs(|| codec::serialize_into(v, buf));
    // Refs inside a result need the store to keep them alive: those results are stored.
    written.ok().filter(|_| refs.is_empty())
}

fn failed(client: &StoreClient, call: &Call, msg: &str) -> Result<Option<Deferred>> {
    let report = trove_executor::message::failure_bytes(Failure::TaskFailed, msg);
    if report.len() <= INLINE_MAX {
        return finish(client, call, Finish::Bytes(&report, true));
    }
    let report = call.ledger.put_owed(client, &call.debt(), || {
        owned::report_failure(client, call.result, call.reply_to, Failure::TaskFailed, msg)
    })?;
    match report {
        Some((offset, len)) => finish(client, call, Finish::StoredError(offset, len)),
        None => Ok(None),
    }
}

enum Finish<'a> {
    /// A small value (or failure report, if `true`) not yet anywhere.
    Bytes(&'a [u8], bool),
    /// Already stored for the caller at (offset, len).
    Stored(u64, u64),
    StoredError(u64, u64),
}

/// Completes a call: records the result inline in its completion record when it is small and
/// the record is free, else makes sure it is in the store (its place recorded after the
/// frames are written: the returned [`Deferred`]). A result that goes to the store is owed
/// (noted in `call.ledger`) from before its frame is queued until it is written.
fn finish(client: &StoreClient, call: &Call, what: Finish) -> Result<Option<Deferred>> {
    let rec = call.record;
    // The common case first: a small value, a record with nothing of an earlier caller's to
    // evict, a caller that did not ask for the store: claimed and filled in one go.
    if let Finish::Bytes(bytes, error) = what
        && !call.to_store
        && !rec.wants_store(call.pos)
    {
        match rec.claim_finish_inline(call.pos, call.result.0, call.reply_to, bytes, error) {
            Some(true) => return Ok(None),
            // Claimed, then the caller asked for the store: the record is EVICTING, ours.
            Some(false) => return store_claimed(client, call, bytes, error),
            None => {}
        }
    }
    // An earlier caller's untaken inline result becomes ours to store when we take the record:
    // it is owed from just before we try, so that no moment has it in neither place.
    let evicted_debt = |ev: &InlineResult| Debt {
        pos: ev.pos,
        result: ev.result,
        reply_to: ev.reply_to,
        evicted: true,
    };
    let mut evict_debt = None;
    let claim = rec.claim_with(call.pos, |ev| {
        let d = evicted_debt(ev);
        match evict_debt {
            Some(n) => call.ledger.renote(n, &d),
            None => evict_debt = call.ledger.owe(client, &d),
        }
    });
    let claimed = match claim {
        Claim::Ok(evicted) => {
            match evicted {
                Some(ev) => {
                    let id = ObjectId(ev.result);
                    let stored = call.ledger.pay_with(evict_debt, || {
                        owned::write(
                            client,
                            id,
                            &ev.bytes[..],
                            Seal::for_caller(ev.reply_to, ev.error),
                        )
                    });
                    if let Err(e) = stored {
                        tracing::warn!("evicting result {id}: {e}");
                        let msg = format!("result lost: {e}");
                        let _ = call.ledger.put_owed(client, &evicted_debt(&ev), || {
                            owned::report_failure(
                                client,
                                id,
                                ev.reply_to,
                                Failure::TaskFailed,
                                &msg,
                            )
                        });
                    }
                }
                // The caller took it first: nothing is owed.
                None => {
                    if let Some(n) = evict_debt {
                        call.ledger.cancel(n);
                    }
                }
            }
            true
        }
        Claim::Unavailable => {
            if let Some(n) = evict_debt {
                call.ledger.cancel(n);
            }
            false
        }
    };
    let stored = match what {
        Finish::Bytes(bytes, error) => {
            if claimed
                && !call.to_store
                && !rec.wants_store(call.pos)
                && rec.finish_inline(call.pos, call.result.0, call.reply_to, bytes, error)
            {
                return Ok(None);
            }
            // The record is EVICTING (the caller asked for the store) or not ours.
            if claimed {
                return store_claimed(client, call, bytes, error);
            }
            let (offset, len) = store_bytes(client, call, bytes, error)?;
            (offset, len, error)
        }
        Finish::Stored(offset, len) => (offset, len, false),
        Finish::StoredError(offset, len) => (offset, len, true),
    };
    Ok(claimed.then_some((call.pos, stored.0, stored.1, stored.2)))
}

/// Stores a small result whose record this consumer holds (claimed, or `EVICTING`): its place
/// is recorded once its frame is written (see [`serve`]); on failure the record is given up.
fn store_claimed(
    client: &StoreClient,
    call: &Call,
    bytes: &[u8],
    error: bool,
) -> Result<Option<Deferred>> {
    match store_bytes(client, call, bytes, error) {
        Ok((offset, len)) => Ok(Some((call.pos, offset, len, error))),
        Err(e) => {
            call.record.finish_empty(call.pos);
            Err(e)
        }
    }
}

/// Stores a small result as its own object (owed until it is written: see `Ledger`).
fn store_bytes(client: &StoreClient, call: &Call, bytes: &[u8], error: bool) -> Result<(u64, u64)> {
    call.ledger
        .put_owed(client, &call.debt(), || {
            owned::write(
                client,
                call.result,
                bytes,
                Seal::for_caller(call.reply_to, error),
            )
        })
        .map(|(place, _)| place)
}

/// The type-erased shape of a method trampoline.
type MethodFn = unsafe fn(*mut u8, &StoreClient, &[u8], &Call) -> Option<Deferred>;
type TaskFn = fn(&StoreClient, &[u8], &Call) -> Option<Deferred>;
type CtorFn = fn(&[u8]) -> std::result::Result<*mut u8, String>;

/// The address a call to method `F` of `A` carries.
pub(crate) fn method_address<A: 'static, F: Method<A, Args, K>, Args: Value, K: 'static>() -> u64 {
    method_trampoline::<A, F, Args, K> as MethodFn as usize as u64
}

/// The lock of a threaded actor's state (see
/// [`Runtime::threaded_actor`](crate::Runtime::threaded_actor)): `&self` methods read,
/// `&mut self` methods write. Unset in a single-threaded actor, which needs none.
static STATE_LOCK: std::sync::OnceLock<std::sync::RwLock<()>> = std::sync::OnceLock::new();

/// Runs `f` as a method of the given receiver kind may run: alone if it takes `&mut self`,
/// beside other `&self` methods if not (on a threaded actor; on any other, calls run one
/// at a time anyway).
fn with_state_access<R>(shared: bool, f: impl FnOnce() -> R) -> R {
    match STATE_LOCK.get() {
        None => f(),
        Some(lock) if shared => {
            let _g = lock.read().unwrap_or_else(|p| p.into_inner());
            f()
        }
        Some(lock) => {
            let _g = lock.write().unwrap_or_else(|p| p.into_inner());
            f()
        }
    }
}

/// The address a task `F` carries.
pub(crate) fn task_address<F: Function<Args>, Args: Value>() -> u64 {
    task_trampoline::<F, Args> as TaskFn as usize as u64
}

/// # Safety
/// `state` is the `Box<A>` the actor's constructor returned, used by this thread only, or,
/// in a threaded actor (`A: Send + Sync`,
/// [`Runtime::threaded_actor`](crate::Runtime::threaded_actor)), by several threads through
/// [`STATE_LOCK`].
unsafe fn method_trampoline<A: 'static, F: Method<A, Args, K>, Args: Value, K: 'static>(
    state: *mut u8,
    client: &StoreClient,
    args: &[u8],
    call: &Call,
) -> Option<Deferred> {
    let actor = state as *mut A;
    run_and_report(client, args, call, |a: Args| {
        with_state_access(F::SHARED, || {
            // SAFETY: `actor` is live (the contract); the lock (or the single thread) keeps
            // a `&mut self` method alone with it, and `&self` methods beside readers only.
            unsafe { conjure::<F>().invoke(actor, a) }
        })
    })
}

fn task_trampoline<F: Function<Args>, Args: Value>(
    client: &StoreClient,
    args: &[u8],
    call: &Call,
) -> Option<Deferred> {
    run_and_report(client, args, call, |a: Args| conjure::<F>().invoke(a))
}

fn ctor_trampoline<A: 'static, C: Constructor<A, Args>, Args: Value>(
    args: &[u8],
) -> std::result::Result<*mut u8, String> {
    // The constructor's arguments come through the zygote's socket: aligned here.
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(args.len());
    aligned.extend_from_slice(args);
    let id = ObjectId::default();
    let archived = codec::access::<Args>(id, &aligned).map_err(|e| e.to_string())?;
    let args = codec::deserialize::<Args>(id, archived).map_err(|e| e.to_string())?;
    let actor = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        conjure::<C>().construct(args)
    }))
    .map_err(|p| format!("constructor panicked: {}", panic_message(p)))?;
    Ok(Box::into_raw(Box::new(actor)) as *mut u8)
}

/// A state pointer handed to the threads of a threaded actor.
struct StatePtr(*mut u8);
// SAFETY: only threaded actors share their state across threads, and those are `Send + Sync`
// (`Runtime::threaded_actor`'s bounds); the threads reach it through `STATE_LOCK`.
unsafe impl Send for StatePtr {}
// SAFETY: as above.
unsafe impl Sync for StatePtr {}

/// An actor's or worker's process: serves `queue` on one thread per mailbox in `owns` (each
/// thread notes its current call and debts in its own; see [`serve`]), and returns once
/// every thread has stopped. With more than one, the actor is threaded: its state is
/// reached through [`STATE_LOCK`].
pub(crate) fn serve_all(
    client: &StoreClient,
    queue: &Mailbox,
    owns: &[Mailbox],
    state: *mut u8,
    on_idle: &(dyn Fn(Duration) -> bool + Sync),
) -> i32 {
    let ledgers = Debts::open_all(owns.iter().map(|m| m.debts()).collect(), client);
    if owns.len() == 1 {
        return serve(client, queue, &owns[0], &ledgers[0], state, on_idle);
    }
    let _ = STATE_LOCK.set(std::sync::RwLock::new(()));
    let shared = StatePtr(state);
    std::thread::scope(|scope| {
        let shared = &shared;
        let mut threads = Vec::new();
        for (i, (own, ledger)) in owns.iter().zip(&ledgers).enumerate().skip(1) {
            let spawned = std::thread::Builder::new()
                .name(format!("trove-actor-{i}"))
                .spawn_scoped(scope, move || {
                    serve(client, queue, own, ledger, shared.0, on_idle)
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => tracing::warn!("starting an actor thread: {e}"),
            }
        }
        let code = serve(client, queue, &owns[0], &ledgers[0], shared.0, on_idle);
        for t in threads {
            let _ = t.join();
        }
        code
    })
}

/// The loop of one consumer thread: pop, run, repeat, until stopped, marked dead, or the
/// store goes away. `queue` holds the calls and their completion records; `own` is this
/// thread's mailbox, where it notes the call it runs, and `ledger` (on `own`) the results it
/// owes (`own` is `queue` for a single-threaded actor), so that whoever reaps the process
/// can fail them if it dies.
///
/// `on_idle` is asked, each time the queue has been empty a while, with how long it has been
/// empty; `true` ends the loop (an extra worker retiring).
fn serve(
    client: &StoreClient,
    queue: &Mailbox,
    own: &Mailbox,
    ledger: &Ledger,
    state: *mut u8,
    on_idle: &(dyn Fn(Duration) -> bool + Sync),
) -> i32 {
    // Aligned, so that inline arguments (at `CALL_HEADER + ARGS_PAD`) are read in place.
    let mut buf = rkyv::util::AlignedVec::<ARGS_ALIGN>::with_capacity(SLOT_BYTES as usize);
    // Results whose frames are queued but not yet written: recorded once they are.
    let mut done: Vec<Deferred> = Vec::new();
    // This consumer's tag in the queue slots it holds (see `Mailbox::try_pop`).
    let tag = std::process::id();
    let record_done = |done: &mut Vec<Deferred>| {
        for (pos, offset, len, error) in done.drain(..) {
            queue.record(pos).finish_stored(pos, offset, len, error);
        }
        queue.result_changed();
    };
    // A call left as current by our previous instance, which died running it: the zygote
    // asks us to run it again (a retry), before anything queued after it.
    let mut idle_since: Option<std::time::Instant> = None;
    let mut rerun = own.current().map(|(pos, m)| {
        buf.clear();
        buf.extend_from_slice(&m);
        pos
    });
    loop {
        // Nothing queued, or a batch is full: write the batched frames, then tell the callers
        // where their results are (only once the `PutSmall`s are in the socket, so the daemon
        // learns of each object even if we die next).
        if !done.is_empty() && (queue.is_empty() || done.len() >= 64) {
            if client.flush().is_err() {
                return 0;
            }
            record_done(&mut done);
        }
        if queue.is_empty() && client.flush().is_err() {
            return 0;
        }
        // The message is noted as current while its queue slot still names us (inside the
        // pop), so a death at any moment leaves it in one of the two for the reaper.
        let (pos, retry) = match rerun.take() {
            Some(pos) => (pos, true),
            None => match queue.pop(tag, Duration::from_millis(100), |pos, m| {
                buf.clear();
                buf.extend_from_slice(m);
                own.set_current(pos, m);
                pos
            }) {
                Ok(pos) => (pos, false),
                Err(MailboxError::Timeout) => {
                    // Results batched while another consumer emptied the queue: handed over
                    // before this consumer may retire (else its reaper fails them).
                    if !done.is_empty() {
                        if client.flush().is_err() {
                            return 0;
                        }
                        record_done(&mut done);
                    }
                    // Idle since the first empty wait (no clock read per call).
                    let since = *idle_since.get_or_insert_with(std::time::Instant::now);
                    if client.check_alive().is_err() || on_idle(since.elapsed()) {
                        return 0;
                    }
                    continue;
                }
                Err(_) => return 0,
            },
        };
        idle_since = None;
        let Some(m) = Message::decode(&buf) else {
            own.clear_current();
            continue;
        };
        if m.kind == KIND_STOP {
            own.clear_current();
            // The other threads of a threaded actor stop too, each after its current call.
            let _ = queue.try_push(&buf);
            // Hand over what is done before going.
            if client.flush().is_ok() {
                record_done(&mut done);
            }
            return 0;
        }
        // A call its caller cancelled before it ran: its result (the report) exists already.
        if queue.has_cancels() && client.try_get(&m.result).is_some() {
            own.clear_current();
            continue;
        }
        let call = Call {
            result: m.result,
            reply_to: m.reply_to,
            pos,
            record: queue.record(pos),
            ledger,
            to_store: retry || m.retried,
        };
        let deferred = run_call(client, &m, &call, state);
        if let Some(d) = deferred {
            done.push(d);
        }
        // A caller that waited long parks until a record changes.
        queue.result_changed();
        // Its result is in its record, or owed (see `finish`): the call is no longer ours to
        // fail.
        own.clear_current();
    }
}

/// Runs one call: fetches arguments passed as an object, calls the trampoline.
fn run_call(client: &StoreClient, m: &Message, call: &Call, state: *mut u8) -> Option<Deferred> {
    let args_view;
    let args: &[u8] = if m.kind == KIND_CALL_BY_OBJECT {
        let args = <[u8; 20]>::try_from(m.args)
            .map_err(|_| "a malformed argument id".to_string())
            .and_then(|id| {
                client
                    .get(ObjectId(id), Duration::from_secs(30))
                    .map_err(|e| e.to_string())
            });
        match args {
            Ok(v) => {
                args_view = v;
                &args_view
            }
            Err(e) => {
                return failed(client, call, &format!("arguments lost: {e}")).unwrap_or_else(|e| {
                    tracing::warn!("call result {}: {e}", call.result);
                    None
                });
            }
        }
    } else {
        match inline_args(m) {
            Some(args) => args,
            None => {
                return failed(client, call, "malformed arguments").unwrap_or_else(|e| {
                    tracing::warn!("call result {}: {e}", call.result);
                    None
                });
            }
        }
    };
    if state.is_null() {
        // SAFETY: the address was made from a `TaskFn` by a process of this tree (same
        // binary); a corrupt mailbox is the only other writer, and only our own processes
        // can write to it.
        let f = unsafe { std::mem::transmute::<usize, TaskFn>(m.func as usize) };
        f(client, args, call)
    } else {
        // SAFETY: as above, a `MethodFn` for this actor's type: calls are typed by the
        // `ActorHandle<A>` they went through, which checked the mailbox's program identity
        // and type fingerprint before sending anything; `state` is our actor, used only here.
        unsafe {
            let f = std::mem::transmute::<usize, MethodFn>(m.func as usize);
            f(state, client, args, call)
        }
    }
}

pub(crate) fn ctor_address<A: 'static, C: Constructor<A, Args>, Args: Value>() -> u64 {
    ctor_trampoline::<A, C, Args> as CtorFn as usize as u64
}

/// Runs a constructor given by address (in the actor process).
pub(crate) fn construct(addr: u64, args: &[u8]) -> std::result::Result<*mut u8, String> {
    // SAFETY: the address came from `ctor_address` in the driver, of which this process is a
    // fork (same binary), through the zygote's private socket.
    let f = unsafe { std::mem::transmute::<usize, CtorFn>(addr as usize) };
    f(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A result travels inline exactly when its archive fits a record's inline bytes and it
    /// holds no refs; the bytes written are its whole archive, read back in place.
    #[test]
    fn small_values_fit_a_record_in_one_pass_and_nothing_else_does() {
        let mut buf = InlineBuf([0; INLINE_MAX]);
        let fits = [7u8; INLINE_MAX];
        let len = small_value(&fits, &mut buf.0).expect("fits exactly");
        assert_eq!(len, INLINE_MAX);
        let id = ObjectId([1; 20]);
        let back = codec::access::<[u8; INLINE_MAX]>(id, &buf.0[..len]).expect("valid");
        assert_eq!(
            codec::deserialize::<[u8; INLINE_MAX]>(id, back).unwrap(),
            fits
        );
        assert_eq!(small_value(&[7u8; INLINE_MAX + 1], &mut buf.0), None);
        assert_eq!(small_value(&vec![0u64; 100], &mut buf.0), None);
        let len = small_value(&(42u64, -1i32), &mut buf.0).expect("small");
        let back = codec::access::<(u64, i32)>(id, &buf.0[..len]).expect("valid");
        assert_eq!(
            codec::deserialize::<(u64, i32)>(id, back).unwrap(),
            (42, -1)
        );
        // A ref inside: stored, so that the store keeps what it refers to alive.
        let r = crate::ObjectRef::<u64>::adopt(ObjectId([2; 20]));
        assert_eq!(small_value(&r, &mut buf.0), None);
        std::mem::forget(r);
    }
}
