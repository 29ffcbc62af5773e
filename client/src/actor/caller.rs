//! The caller's side of a call: the arguments serialised once (into the message, or straight
//! into a store object if they do not fit a mailbox slot), their refs shared and kept until
//! the call has run, the message pushed, and the call remembered in [`Calls`](crate::calls).

use std::sync::Arc;

use trove_executor::mailbox::{Mailbox, MailboxError};
use trove_executor::message::{CALL_HEADER, Failure, KIND_CALL, KIND_CALL_BY_OBJECT, Message};
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
    let result = sh.result_ids.fresh();
    let reply_to = client.pin_target();
    // The message buffer is reused from call to call on this thread (a call costs well under
    // a microsecond; an allocation would be a good part of it).
    let mut msg = SCRATCH.with(|s| s.borrow_mut().take()).unwrap_or_default();
    let header = Message {
        kind: KIND_CALL,
        retried: false,
        func,
        result,
        reply_to,
        args: &[],
    };
    let (inline, mut refs) = encode_inline(&mut msg, mailbox.max_msg_len(), header, args);
    let mut keep = Kept::default();
    let len = match inline {
        Ok(len) => {
            owned::share_refs(client, &refs)?;
            len
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
                retried: false,
                func,
                result,
                reply_to,
                args: id.as_bytes(),
            }
            .encode_into(&mut msg);
            msg.len()
        }
    };
    // Everything the arguments refer to is held until the call has run (released with
    // `keep`, on every path out of here that does not hand it to the call's entry).
    for id in &refs {
        keep.hold(client, *id)?;
    }
    let pushed = sh.calls.push(client, &sh.locals, mailbox, &msg[..len]);
    // The callee runs meanwhile: the rest is off its critical path. The result is adopted
    // before the call is remembered (nothing here reads its record or its place until then:
    // every look at a call goes through `Calls`): as a pending local entry for a call in
    // flight, else by the store client (where a failure report will be).
    let queued = pushed.is_ok() && !mailbox.is_dead();
    if queued {
        sh.locals.adopt_pending(&result);
    } else {
        client.adopt_pending(&result);
    }
    let r = ObjectRef::adopt(result);
    SCRATCH.with(|s| *s.borrow_mut() = Some(msg));
    match pushed {
        Ok(pos) if queued => {
            sh.calls
                .insert(client, &sh.locals, result, (*mailbox, pos), keep, keepalive)
        }
        // Dead before or right after we queued it: report it ourselves (if the reaper
        // reported it first, ours is ignored). What it kept goes now. Queued before the death,
        // the consumer may have taken it and died writing its result (a created object the
        // daemon then reports lost, where our report cannot go): that loss is the failure.
        Ok(_) | Err(MailboxError::Dead) => {
            drop(keep);
            if pushed.is_ok() {
                sh.calls
                    .lost_means_failed(result, matches!(dead, Failure::TaskFailed));
            }
            owned::report_failure(client, result, reply_to, dead, "the process is dead")?;
        }
        Err(e) => return Err(Error::TaskFailed(format!("mailbox: {e}"))),
    }
    Ok(r)
}

/// Encodes the call `header` (a `KIND_CALL`) with `args` inline into the start of `msg`, in
/// at most `room` bytes: the header, `ARGS_PAD` bytes of padding (never read), then the
/// archive, serialised in place. Returns the message's length, or `Err` if it does not fit
/// (or cannot be serialised), and the refs met. `msg` keeps its length from call to call
/// (zeroed when it grows, not for each call): only the returned length of it is the message.
fn encode_inline<Args: Value>(
    msg: &mut Vec<u8>,
    room: usize,
    header: Message,
    args: &Args,
) -> (Result<usize>, Vec<ObjectId>) {
    let at = CALL_HEADER + callee::ARGS_PAD;
    let end = room.max(at);
    if msg.len() < end {
        msg.resize(end, 0);
    }
    header.write_header(msg);
    let (written, refs) = codec::collect_refs(|| codec::serialize_into(args, &mut msg[at..end]));
    (written.map(|len| at + len), refs)
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

#[cfg(test)]
mod tests {
    use super::*;
    use rkyv::util::AlignedVec;

    fn header() -> Message<'static> {
        Message {
            kind: KIND_CALL,
            retried: false,
            func: 42,
            result: ObjectId([9; 20]),
            reply_to: (3, 4),
            args: &[],
        }
    }

    /// Encodes `v` as a call, copies the message as the callee does (into its aligned
    /// buffer), and reads the arguments back in place; `None` if they did not fit `room`.
    /// The buffer it encodes into holds a longer, earlier message: what is sent is the same
    /// as when it starts empty.
    fn round_trip<T: Value + PartialEq + std::fmt::Debug>(v: &T, room: usize) -> Option<usize> {
        let mut msg = vec![0xAA; room + 16];
        let (ok, _) = encode_inline(&mut msg, room, header(), v);
        let mut fresh = Vec::new();
        let (fresh_ok, _) = encode_inline(&mut fresh, room, header(), v);
        // Inline exactly when the archive fits the room left after the header and padding.
        let fits = codec::archived_len(v).unwrap() <= room - CALL_HEADER_PADDED;
        assert_eq!(ok.is_ok(), fits);
        assert_eq!(fresh_ok.is_ok(), fits);
        let len = ok.ok()?;
        assert!(len <= room);
        assert_eq!(fresh_ok.ok(), Some(len));
        // The padding is never read; everything else is the same bytes.
        assert_eq!(msg[..CALL_HEADER], fresh[..CALL_HEADER]);
        assert_eq!(msg[CALL_HEADER_PADDED..len], fresh[CALL_HEADER_PADDED..len]);
        let mut buf = AlignedVec::<{ callee::ARGS_ALIGN }>::new();
        buf.extend_from_slice(&msg[..len]);
        let m = Message::decode(&buf).expect("a call message");
        assert_eq!((m.kind, m.func, m.reply_to), (KIND_CALL, 42, (3, 4)));
        let args = callee::inline_args(&m).expect("padded arguments");
        assert!((args.as_ptr() as usize).is_multiple_of(callee::ARGS_ALIGN));
        let archived = codec::access::<T>(m.result, args).expect("read in place");
        assert_eq!(&codec::deserialize::<T>(m.result, archived).unwrap(), v);
        Some(args.len())
    }

    #[test]
    fn inline_arguments_are_aligned_and_read_in_place() {
        let room = 240;
        assert!(round_trip(&(), room).is_some());
        assert!(round_trip(&(u128::MAX - 7, 3u8), room).is_some());
        assert!(round_trip(&(1u64, -2i32, 0.5f64, true), room).is_some());
        // Every length up to the slot's room and past it: inline while it fits, then not.
        let inline = (0..=room)
            .filter(|&n| round_trip(&("x".repeat(n), n as u128), room).is_some())
            .count();
        assert!(inline > 100 && inline < room, "{inline}");
        assert!(round_trip(&vec![7u64; 100], room).is_none());
    }

    const CALL_HEADER_PADDED: usize = CALL_HEADER + callee::ARGS_PAD;
}
