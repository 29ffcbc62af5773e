//! The caller's side of a call: the arguments serialised once (into the message, or straight
//! into a store object if they do not fit a mailbox slot), their refs shared and kept until
//! the call has run, the message pushed, and the call remembered in [`Calls`](crate::calls).

use std::sync::Arc;

use trove_executor::mailbox::{Mailbox, MailboxError};
use trove_executor::message::{Failure, KIND_CALL, KIND_CALL_BY_OBJECT, Message};
use trove_store::ObjectId;

use super::callee;
use super::traits::Function;
use crate::calls::Kept;
use crate::codec::{self, Value};
use crate::context::Shared;
use crate::error::{Error, Result};
use crate::object_ref::ObjectRef;
use crate::outcome::Outcome;
use crate::owned::{self, Archive, Seal};

/// Sends a call of the trampoline at `func` with `args` to `mailbox` and returns the result's
/// ref. The arguments are serialised once: straight into the message after its header, or,
/// if they do not fit a slot, straight into a store object (the counting pass and in-place
/// write a put uses). `keepalive` (the actor handle) lives as long as the call's entry.
pub(crate) fn send_call<Args: Value, R: ?Sized>(
    sh: &Shared,
    mailbox: &Mailbox,
    keepalive: Option<Arc<dyn Send + Sync>>,
    func: u64,
    args: &Args,
    dead: Failure,
) -> Result<ObjectRef<R>> {
    let client = &sh.client;
    let result = ObjectId::random();
    let reply_to = client.pin_target();
    // The message buffer is reused from call to call on this thread (a call costs well under
    // a microsecond; an allocation would be a good part of it).
    let mut msg = SCRATCH.with(|s| s.borrow_mut().take()).unwrap_or_default();
    Message {
        kind: KIND_CALL,
        func,
        result,
        reply_to,
        args: &[0; callee::ARGS_PAD],
    }
    .encode_into(&mut msg);
    let at = msg.len();
    msg.resize(mailbox.max_msg_len().max(at), 0);
    let (inline, mut refs) = codec::collect_refs(|| codec::serialize_into(args, &mut msg[at..]));
    let mut keep = Kept::default();
    match inline {
        Ok(len) => {
            msg.truncate(at + len);
            owned::share_refs(client, &refs)?;
        }
        // Too large for a slot (or not serialisable: the object path says why).
        Err(_) => {
            let id = ObjectId::random();
            // The argument object lists no refs: the call keeps them (below), like inline ones.
            let (_, met) = owned::write(client, id, &Archive(args), Seal::kept(Some(Vec::new())))?;
            refs = met;
            keep.adopt(client, id);
            Message {
                kind: KIND_CALL_BY_OBJECT,
                func,
                result,
                reply_to,
                args: id.as_bytes(),
            }
            .encode_into(&mut msg);
        }
    }
    // Everything the arguments refer to is held until the call has run (released with
    // `keep`, on every path out of here that does not hand it to the call's entry).
    for id in &refs {
        keep.hold(client, *id)?;
    }
    client.adopt_pending(&result);
    let r = ObjectRef::adopt(result);
    let pushed = sh.calls.push(client, mailbox, &msg);
    SCRATCH.with(|s| *s.borrow_mut() = Some(msg));
    match pushed {
        Ok(pos) if !mailbox.is_dead() => sh.calls.insert(result, *mailbox, pos, keep, keepalive),
        // Dead before or right after we queued it: nobody may run it, so report it ourselves
        // (if the reaper reported it first, ours is ignored). What it kept goes now.
        Ok(_) | Err(MailboxError::Dead) => {
            drop(keep);
            owned::report_failure(client, result, reply_to, dead, "the process is dead")?;
        }
        Err(e) => return Err(Error::TaskFailed(format!("mailbox: {e}"))),
    }
    Ok(r)
}

thread_local! {
    /// [`send_call`]'s message buffer.
    static SCRATCH: std::cell::RefCell<Option<Vec<u8>>> = const { std::cell::RefCell::new(None) };
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
    let func = callee::task_address::<F, Args>();
    let queue = sh.task_queue()?;
    send_call(sh, queue, None, func, &args, Failure::TaskFailed)
}
