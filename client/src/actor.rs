//! Actors and tasks: typed calls over the executor's mailboxes.
//!
//! A call carries the address of a *trampoline*, a function monomorphised for the method (or
//! task) type, its argument tuple and its return type. Every process of a trove tree is a fork
//! of the driver, so the address means the same function everywhere. Methods and tasks must be
//! fn items or closures without captures: they are zero-sized, so the callee conjures the value
//! from its type alone (a capture is rejected at compile time).

use std::any::type_name;
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rkyv::bytecheck::CheckBytes;
use rkyv::munge::munge;
use rkyv::rancor::{Fallible, Source};
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Place, Portable, Serialize};
use trove_executor::mailbox::{Debt, Mailbox, MailboxError, NOT_QUEUED};
use trove_executor::message::{
    self, CALL_HEADER, Failure, KIND_CALL, KIND_CALL_BY_OBJECT, KIND_STOP, Message,
};
use trove_executor::record::{Claim, INLINE_MAX, InlineResult, Record};
use trove_store::{ObjectId, ObjectView, StoreClient, StoreError};

use crate::codec::{self, RkyvError, Value};
use crate::error::{Error, Result};
use crate::object_ref::ObjectRef;
use crate::outcome::Outcome;
use crate::runtime::{self, Kept, Shared};

/// Mailbox geometry: 1024 slots of 256 bytes (an actor's queue), 4096 for the task queue.
pub(crate) const MAILBOX_SLOTS: u64 = 1024;
pub(crate) const TASK_SLOTS: u64 = 4096;
pub(crate) const SLOT_BYTES: u64 = 256;

/// A method of actor type `A` taking the argument tuple `Args`: `Type::method` or a closure
/// without captures, `Fn(&mut A, T1, .., Tn) -> O` for up to six arguments.
pub trait Method<A, Args>: Copy + Send + 'static {
    type Output: Outcome;
    fn invoke(self, actor: &mut A, args: Args) -> Self::Output;
}

/// A task function taking the argument tuple `Args` (up to six arguments).
pub trait Function<Args>: Copy + Send + 'static {
    type Output: Outcome;
    fn invoke(self, args: Args) -> Self::Output;
}

/// An actor constructor: `Type::default`, `Type::new`, or a closure without captures.
pub trait Constructor<A, Args>: Copy + Send + 'static {
    fn construct(self, args: Args) -> A;
}

macro_rules! arities {
    ($(($($t:ident $v:ident),*)),* $(,)?) => {$(
        impl<A, F, O, $($t),*> Method<A, ($($t,)*)> for F
        where
            F: Fn(&mut A, $($t),*) -> O + Copy + Send + 'static,
            O: Outcome,
        {
            type Output = O;
            #[allow(unused_variables)]
            fn invoke(self, actor: &mut A, ($($v,)*): ($($t,)*)) -> O {
                self(actor, $($v),*)
            }
        }
        impl<F, O, $($t),*> Function<($($t,)*)> for F
        where
            F: Fn($($t),*) -> O + Copy + Send + 'static,
            O: Outcome,
        {
            type Output = O;
            #[allow(unused_variables)]
            fn invoke(self, ($($v,)*): ($($t,)*)) -> O {
                self($($v),*)
            }
        }
        impl<A, F, $($t),*> Constructor<A, ($($t,)*)> for F
        where
            F: Fn($($t),*) -> A + Copy + Send + 'static,
        {
            #[allow(unused_variables)]
            fn construct(self, ($($v,)*): ($($t,)*)) -> A {
                self($($v),*)
            }
        }
    )*};
}

arities!(
    (),
    (T1 a),
    (T1 a, T2 b),
    (T1 a, T2 b, T3 c),
    (T1 a, T2 b, T3 c, T4 d),
    (T1 a, T2 b, T3 c, T4 d, T5 e),
    (T1 a, T2 b, T3 c, T4 d, T5 e, T6 f),
);

/// The value of a zero-sized function type.
fn conjure<F: Copy>() -> F {
    const {
        assert!(
            size_of::<F>() == 0,
            "methods and tasks must be fn items or closures without captures"
        )
    };
    // SAFETY: F is zero-sized (asserted at compile time) and a fn item or capture-less
    // closure (the only zero-sized types implementing the Fn traits that callers can name
    // here), which have no bytes and so no invalid values.
    unsafe { std::mem::zeroed::<F>() }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}

/// What the callee knows about the call it is running: where the result goes, its
/// completion record, and where the callee notes the results it owes (its own mailbox).
pub(crate) struct Call<'a> {
    pub(crate) result: ObjectId,
    pub(crate) reply_to: (u32, u32),
    pub(crate) pos: u64,
    pub(crate) record: &'a Record,
    pub(crate) debts: &'a Mailbox,
}

impl Call<'_> {
    /// Notes that the result of `d` is owed until the store frame `seq` is written (see
    /// [`trove_executor::mailbox`]); `None` if that cannot be noted (the store is gone).
    fn owe(&self, client: &StoreClient, d: &Debt, seq: u64) -> Option<u64> {
        match self.debts.owe(d, seq) {
            Ok(n) => Some(n),
            // Every slot is unpaid: writing the queued frames pays them.
            Err(_) => client
                .flush()
                .ok()
                .and_then(|_| self.debts.owe(d, seq).ok()),
        }
    }

    /// Runs `put`, which stores the result of debt `n` (noted before, so that there is no
    /// moment when the result is neither owed nor in the store): the frames it queues stamp
    /// the debt, which is paid once they are written. A failed put cancels the debt.
    fn pay_with<R, E>(
        &self,
        client: &StoreClient,
        n: Option<u64>,
        put: impl FnOnce() -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        if let Some(n) = n {
            self.debts.arm(n);
        }
        let r = client.stamping(put);
        self.debts.disarm();
        if let (Some(n), Err(_)) = (n, &r) {
            self.debts.set_debt_seq(n, 0);
        }
        r
    }

    /// Notes the debt `d`, then [`Call::pay_with`].
    fn put_owed<R, E>(
        &self,
        client: &StoreClient,
        d: &Debt,
        put: impl FnOnce() -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        let n = self.owe(client, d, NOT_QUEUED);
        self.pay_with(client, n, put)
    }

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
        let mut aligned = AlignedVec::<16>::with_capacity(args.len());
        aligned.extend_from_slice(args);
        let archived = codec::access::<Args>(call.result, &aligned).map_err(|e| e.to_string())?;
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
            Ok(Some(len)) => finish(client, call, Finish::Bytes(&small.0[..len], false)),
            Ok(None) => match call.put_owed(client, &call.debt(), || {
                runtime::put_result(client, call.result, &v, call.reply_to)
            }) {
                Ok((offset, len)) => finish(client, call, Finish::Stored(offset, len)),
                Err(e) => failed(client, call, &e.to_string()),
            },
            Err(e) => failed(client, call, &e.to_string()),
        },
        Err(msg) => failed(client, call, &msg),
    };
    done.unwrap_or_else(|e| {
        tracing::warn!("call result {}: {e}", call.result);
        None
    })
}

#[repr(C, align(64))]
struct InlineBuf([u8; INLINE_MAX]);

/// Serialises `v` into `buf` if it is small enough to travel inline and holds no refs.
fn small_value<T: Value>(v: &T, buf: &mut [u8]) -> Result<Option<usize>> {
    let len = codec::archived_len(v)?;
    if len > buf.len() {
        return Ok(None);
    }
    let (written, refs) = codec::collect_refs(|| codec::serialize_into(v, &mut buf[..len]));
    // Refs inside a result need the store to keep them alive: those results are stored.
    Ok((written? == len && refs.is_empty()).then_some(len))
}

fn failed(
    client: &StoreClient,
    call: &Call,
    msg: &str,
) -> std::result::Result<Option<Deferred>, StoreError> {
    let report = message::failure_bytes(Failure::TaskFailed, msg);
    if report.len() <= INLINE_MAX {
        return finish(client, call, Finish::Bytes(&report, true));
    }
    let report = call.put_owed(client, &call.debt(), || {
        message::report_failure(client, call.result, call.reply_to, Failure::TaskFailed, msg)
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
/// (noted in `call.debts`) from before its frame is queued until it is written.
fn finish(
    client: &StoreClient,
    call: &Call,
    what: Finish,
) -> std::result::Result<Option<Deferred>, StoreError> {
    let rec = call.record;
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
            Some(n) => call.debts.set_debt(n, &d, NOT_QUEUED),
            None => evict_debt = call.owe(client, &d, NOT_QUEUED),
        }
    });
    let claimed = match claim {
        Claim::Ok(evicted) => {
            match evicted {
                Some(ev) => {
                    let id = ObjectId(ev.result);
                    let stored = call.pay_with(client, evict_debt, || {
                        message::store_result(client, id, ev.reply_to, &ev.bytes, ev.error)
                    });
                    if let Err(e) = stored {
                        tracing::warn!("evicting result {id}: {e}");
                        let msg = format!("result lost: {e}");
                        let _ = call.put_owed(client, &evicted_debt(&ev), || {
                            message::report_failure(
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
                        call.debts.set_debt_seq(n, 0);
                    }
                }
            }
            true
        }
        Claim::Unavailable => {
            if let Some(n) = evict_debt {
                call.debts.set_debt_seq(n, 0);
            }
            false
        }
    };
    let stored = match what {
        Finish::Bytes(bytes, error) => {
            if claimed
                && !rec.wants_store(call.pos)
                && rec.finish_inline(call.pos, call.result.0, call.reply_to, bytes, error)
            {
                return Ok(None);
            }
            // The record is EVICTING (the caller asked for the store) or not ours.
            match call.put_owed(client, &call.debt(), || {
                message::store_result(client, call.result, call.reply_to, bytes, error)
            }) {
                Ok((offset, len)) => (offset, len, error),
                Err(e) => {
                    if claimed {
                        rec.finish_empty(call.pos);
                    }
                    return Err(e);
                }
            }
        }
        Finish::Stored(offset, len) => (offset, len, false),
        Finish::StoredError(offset, len) => (offset, len, true),
    };
    Ok(claimed.then_some((call.pos, stored.0, stored.1, stored.2)))
}

/// The type-erased shape of a method trampoline.
type MethodFn = unsafe fn(*mut u8, &StoreClient, &[u8], &Call) -> Option<Deferred>;
type TaskFn = fn(&StoreClient, &[u8], &Call) -> Option<Deferred>;
type CtorFn = fn(&[u8]) -> std::result::Result<*mut u8, String>;

/// # Safety
/// `state` is the `Box<A>` the actor's constructor returned, used by this thread only.
unsafe fn method_trampoline<A: 'static, F: Method<A, Args>, Args: Value>(
    state: *mut u8,
    client: &StoreClient,
    args: &[u8],
    call: &Call,
) -> Option<Deferred> {
    // SAFETY: per the contract, `state` is a live, exclusively used `A`.
    let actor = unsafe { &mut *(state as *mut A) };
    run_and_report(client, args, call, |a: Args| {
        conjure::<F>().invoke(actor, a)
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
    let mut aligned = AlignedVec::<16>::with_capacity(args.len());
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

/// A mailbox object mapped in this process.
pub(crate) struct Attached {
    _view: ObjectView,
    pub(crate) mailbox: Mailbox,
}

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

/// Serialises `args`, sends the call and returns the result's ref.
pub(crate) fn send_call<Args: Value, R: ?Sized>(
    sh: &Shared,
    mailbox: &Mailbox,
    keepalive: Option<Arc<dyn Send + Sync>>,
    func: u64,
    args: &Args,
    dead: Failure,
) -> Result<ObjectRef<R>> {
    let client = &sh.client;
    // Buffers reused from call to call on this thread (a call costs well under a microsecond;
    // two allocations would be a good part of it).
    let (mut bytes, mut msg) = SCRATCH
        .with(|s| s.borrow_mut().take())
        .unwrap_or_else(|| (AlignedVec::new(), Vec::new()));
    bytes.clear();
    let (bytes, refs) =
        codec::collect_refs(|| rkyv::api::high::to_bytes_in::<_, RkyvError>(args, bytes));
    let bytes = bytes.map_err(|e| Error::Serialize {
        type_name: type_name::<Args>(),
        reason: e.to_string(),
    })?;
    let result = ObjectId::random();
    runtime::share_refs(client, &refs)?;
    // Everything the arguments refer to is held until the call has run (released with
    // `keep`, on every path out of here that does not hand it to the call's entry).
    let mut keep = Kept(Vec::new());
    for id in &refs {
        client.hold(id)?;
        keep.0.push(*id);
    }
    let mut kind = KIND_CALL;
    let args_object;
    let mut payload: &[u8] = &bytes;
    if CALL_HEADER + bytes.len() > mailbox.max_msg_len() {
        let id = ObjectId::random();
        let mut w = client.alloc_owned(id, bytes.len() as u64)?;
        w.as_mut_slice().copy_from_slice(&bytes);
        w.publish(&[])?;
        keep.0.push(id);
        kind = KIND_CALL_BY_OBJECT;
        args_object = id;
        payload = args_object.as_bytes();
    }
    let reply_to = client.pin_target();
    Message {
        kind,
        func,
        result,
        reply_to,
        args: payload,
    }
    .encode_into(&mut msg);
    client.adopt_pending(&result);
    let r = ObjectRef::adopt(result);
    let pushed = sh.push_call(mailbox, &msg);
    SCRATCH.with(|s| *s.borrow_mut() = Some((bytes, msg)));
    match pushed {
        Ok(pos) if !mailbox.is_dead() => sh.hint(result, *mailbox, pos, keep, keepalive),
        // Dead before or right after we queued it: nobody may run it, so report it ourselves
        // (if the reaper reported it first, ours is ignored). What it kept goes now.
        Ok(_) | Err(MailboxError::Dead) => {
            drop(keep);
            message::report_failure(client, result, reply_to, dead, "the process is dead")?;
        }
        Err(e) => return Err(Error::TaskFailed(format!("mailbox: {e}"))),
    }
    Ok(r)
}

thread_local! {
    /// [`send_call`]'s argument and message buffers.
    static SCRATCH: std::cell::RefCell<Option<(AlignedVec, Vec<u8>)>> =
        const { std::cell::RefCell::new(None) };
}

/// The loop of an actor or worker process: pop, run, repeat, until stopped, marked dead, or
/// the store goes away. `queue` holds the calls and their completion records; `own` is this
/// process's mailbox, where it notes the call it runs and the results it owes (the same as
/// `queue` for an actor), so that whoever reaps it can fail them if it dies.
pub(crate) fn serve(client: &StoreClient, queue: &Mailbox, own: &Mailbox, state: *mut u8) -> i32 {
    let mut buf = Vec::with_capacity(SLOT_BYTES as usize);
    // Results whose frames are queued but not yet written: recorded once they are.
    let mut done: Vec<Deferred> = Vec::new();
    // Each store frame queued while a debt is armed stamps it; each write pays the debts up
    // to it.
    let debts = *own;
    // This consumer's tag in the queue slots it holds (see `Mailbox::try_pop`).
    let tag = std::process::id();
    client.on_queued(move |seq| debts.stamp(seq));
    client.on_written(move |seq| debts.written(seq));
    let record_done = |done: &mut Vec<Deferred>| {
        for (pos, offset, len, error) in done.drain(..) {
            queue.record(pos).finish_stored(pos, offset, len, error);
        }
    };
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
        let pos = match queue.pop(tag, Duration::from_millis(100), |pos, m| {
            buf.clear();
            buf.extend_from_slice(m);
            own.set_current(pos, &m[..m.len().min(CALL_HEADER)]);
            pos
        }) {
            Ok(pos) => pos,
            Err(MailboxError::Timeout) => {
                if client.check_alive().is_err() {
                    return 0;
                }
                continue;
            }
            Err(_) => return 0,
        };
        let Some(m) = Message::decode(&buf) else {
            own.clear_current();
            continue;
        };
        if m.kind == KIND_STOP {
            own.clear_current();
            // Hand over what is done before going.
            if client.flush().is_ok() {
                record_done(&mut done);
            }
            return 0;
        }
        let call = Call {
            result: m.result,
            reply_to: m.reply_to,
            pos,
            record: queue.record(pos),
            debts: own,
        };
        let deferred = run_call(client, &m, &call, state);
        if let Some(d) = deferred {
            done.push(d);
        }
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
        m.args
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

/// A handle to an actor of type `A`: cheap to clone, can be sent inside arguments (rkyv) to
/// tasks and other actors.
pub struct ActorHandle<A> {
    inner: Arc<HandleInner>,
    _marker: PhantomData<fn() -> A>,
}

struct HandleInner {
    mailbox: ObjectRef<[u8]>,
    pid: i32,
    attached: OnceLock<std::result::Result<Attached, AttachError>>,
}

/// Why a handle cannot reach its actor (kept with the handle, so it is asked once).
#[derive(Clone)]
enum AttachError {
    Died(String),
    WrongType,
    Foreign,
}

/// The fingerprint of actor type `A` that its mailbox carries: a hash of its `TypeId` (with
/// std's fixed-key `DefaultHasher::new`), never 0 (the task queue's). A `TypeId` tells every
/// type of one program apart (a type name need not) and is the same in every process of it;
/// across programs it means nothing, which is why the mailbox's program identity is checked
/// first ([`trove_executor::process::program_id`]).
pub(crate) fn type_tag<A: 'static>() -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::any::TypeId::of::<A>().hash(&mut h);
    h.finish().max(1)
}

impl<A> Clone for ActorHandle<A> {
    fn clone(&self) -> Self {
        ActorHandle {
            inner: self.inner.clone(),
            _marker: PhantomData,
        }
    }
}

impl<A> fmt::Debug for ActorHandle<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ActorHandle<{}>(pid {}, mailbox {})",
            type_name::<A>(),
            self.inner.pid,
            self.inner.mailbox.id()
        )
    }
}

impl<A: 'static> ActorHandle<A> {
    pub(crate) fn new(mailbox: ObjectRef<[u8]>, pid: i32) -> ActorHandle<A> {
        ActorHandle {
            inner: Arc::new(HandleInner {
                mailbox,
                pid,
                attached: OnceLock::new(),
            }),
            _marker: PhantomData,
        }
    }

    /// The actor's process id.
    pub fn pid(&self) -> i32 {
        self.inner.pid
    }

    /// The id of the actor's mailbox object (names the actor).
    pub fn id(&self) -> ObjectId {
        self.inner.mailbox.id()
    }

    /// The actor's mailbox, once checked to be of this program and of type `A`.
    pub(crate) fn mailbox(&self, sh: &Shared) -> Result<&Mailbox> {
        let id = self.inner.mailbox.id();
        let attached = self.inner.attached.get_or_init(|| {
            let a = attach(&sh.client, id).map_err(|e| AttachError::Died(e.to_string()))?;
            if a.mailbox.program() != trove_executor::process::program_id() {
                Err(AttachError::Foreign)
            } else if a.mailbox.type_tag() != type_tag::<A>() {
                Err(AttachError::WrongType)
            } else {
                Ok(a)
            }
        });
        match attached {
            Ok(a) => Ok(&a.mailbox),
            Err(AttachError::Died(e)) => Err(Error::ActorDied(e.clone())),
            Err(AttachError::WrongType) => Err(Error::WrongActorType {
                id,
                expected: type_name::<A>(),
            }),
            Err(AttachError::Foreign) => Err(Error::ForeignActor(id)),
        }
    }

    /// Calls `method` with `args` (a tuple): returns the result's ref at once. Calls from one
    /// caller run in order, one at a time.
    pub fn call<M, Args>(
        &self,
        method: M,
        args: Args,
    ) -> Result<ObjectRef<<M::Output as Outcome>::Value>>
    where
        M: Method<A, Args>,
        Args: Value,
    {
        let _ = method;
        let sh = runtime::shared()?;
        let func = method_trampoline::<A, M, Args> as MethodFn as usize as u64;
        let mailbox = self.mailbox(&sh)?;
        let keepalive: Arc<dyn Send + Sync> = self.inner.clone();
        send_call(
            &sh,
            mailbox,
            Some(keepalive),
            func,
            &args,
            Failure::ActorDied,
        )
    }

    /// Whether the actor's process is known to be dead (or cannot be reached from here).
    pub fn is_dead(&self) -> bool {
        runtime::shared()
            .ok()
            .and_then(|sh| self.mailbox(&sh).ok().map(|m| m.is_dead()))
            .unwrap_or(true)
    }
}

/// Sends a task to the worker pool.
pub(crate) fn spawn_task<F, Args>(
    sh: &Shared,
    _f: F,
    args: Args,
) -> Result<ObjectRef<<F::Output as Outcome>::Value>>
where
    F: Function<Args>,
    Args: Value,
{
    let func = task_trampoline::<F, Args> as TaskFn as usize as u64;
    let queue = sh.task_queue()?;
    send_call(sh, queue, None, func, &args, Failure::TaskFailed)
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

/// The archived form of an [`ActorHandle`]: the mailbox id and the pid.
#[derive(Debug)]
#[repr(C)]
pub struct ArchivedActorHandle<A> {
    mailbox: [u8; 20],
    pid: [u8; 4],
    _marker: PhantomData<fn() -> A>,
}

// SAFETY: repr(C) over byte arrays (align 1, no padding) and a zero-sized PhantomData: the
// layout is the same everywhere and there is no interior mutability.
unsafe impl<A> Portable for ArchivedActorHandle<A> {}

// SAFETY: every bit pattern of the two byte arrays is valid (ids and pids are checked when
// used), so there is nothing to check.
unsafe impl<A, C: Fallible + ?Sized> CheckBytes<C> for ArchivedActorHandle<A> {
    unsafe fn check_bytes(
        _value: *const Self,
        _context: &mut C,
    ) -> std::result::Result<(), C::Error> {
        Ok(())
    }
}

impl<A> Archive for ActorHandle<A> {
    type Archived = ArchivedActorHandle<A>;
    type Resolver = ();
    fn resolve(&self, _resolver: (), out: Place<Self::Archived>) {
        munge!(let ArchivedActorHandle { mailbox, pid, _marker: _ } = out);
        mailbox.write(self.inner.mailbox.id().0);
        pid.write(self.inner.pid.to_le_bytes());
    }
}

impl<A, S: Fallible + ?Sized> Serialize<S> for ActorHandle<A> {
    fn serialize(&self, _s: &mut S) -> std::result::Result<(), S::Error> {
        // The mailbox is kept alive by the object this handle is serialised into.
        crate::codec::note_ref(self.inner.mailbox.id());
        Ok(())
    }
}

impl<A: 'static, D: Fallible + ?Sized> Deserialize<ActorHandle<A>, D> for ArchivedActorHandle<A>
where
    D::Error: Source,
{
    fn deserialize(&self, _d: &mut D) -> std::result::Result<ActorHandle<A>, D::Error> {
        Ok(ActorHandle::new(
            ObjectRef::from_id(ObjectId(self.mailbox)),
            i32::from_le_bytes(self.pid),
        ))
    }
}
