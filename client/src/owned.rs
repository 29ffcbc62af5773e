//! Writing an owned (reference-counted) object: the one path every writer of the crate takes
//! (puts, call arguments passed as an object, call results and failure reports, evicted
//! inline results, mailboxes, named-actor entries; and, split in two because the user fills
//! it in between, [`begin`] and [`finish`] for `Runtime::create`).
//!
//! Refs inside the content are made shareable first ([`share_refs`]: sharing one may put it
//! in this client's slab, which must happen before the new object takes its place there,
//! since small objects are published in slab order); then the object is allocated at its
//! exact length (a counting pass for values), written in place, and sealed as [`Seal`] says.

use trove_executor::mailbox::{Mailbox, mailbox_bytes};
use trove_executor::message::{self, Failure};
use trove_store::OwnedWriter;
use trove_store::protocol::Owned;
use trove_store::{ObjectId, StoreClient, StoreError};

use crate::codec::{self, Value};
use crate::context;
use crate::error::{Error, Result};

/// What an owned object holds.
pub(crate) trait Content {
    /// The exact length, and the refs inside (made shareable before allocating).
    fn measure(&self) -> Result<(usize, Vec<ObjectId>)>;
    /// Writes the content into `buf` (exactly the measured length); returns the refs met.
    fn write(&self, buf: &mut [u8]) -> Result<Vec<ObjectId>>;
}

/// A value, serialised once, straight into the object.
pub(crate) struct Archive<'a, T>(pub(crate) &'a T);

impl<T: Value> Content for Archive<'_, T> {
    fn measure(&self) -> Result<(usize, Vec<ObjectId>)> {
        codec::archived_len_and_refs(self.0)
    }
    fn write(&self, buf: &mut [u8]) -> Result<Vec<ObjectId>> {
        let len = buf.len();
        let (written, refs) = codec::collect_refs(|| codec::serialize_into(self.0, buf));
        let written = written?;
        if written != len {
            return Err(Error::Serialize {
                type_name: std::any::type_name::<T>(),
                reason: format!("archive was {written} bytes, {len} expected"),
            });
        }
        Ok(refs)
    }
}

/// Raw bytes, copied in.
impl Content for [u8] {
    fn measure(&self) -> Result<(usize, Vec<ObjectId>)> {
        Ok((self.len(), Vec::new()))
    }
    fn write(&self, buf: &mut [u8]) -> Result<Vec<ObjectId>> {
        buf.copy_from_slice(self);
        Ok(Vec::new())
    }
}

/// An empty mailbox of `slots` slots of `slot_bytes` for consumers of type `type_tag` (see
/// [`Mailbox::init`]).
pub(crate) struct NewMailbox {
    pub(crate) slots: u64,
    pub(crate) slot_bytes: u64,
    pub(crate) type_tag: u64,
}

impl Content for NewMailbox {
    fn measure(&self) -> Result<(usize, Vec<ObjectId>)> {
        Ok((mailbox_bytes(self.slots, self.slot_bytes), Vec::new()))
    }
    fn write(&self, buf: &mut [u8]) -> Result<Vec<ObjectId>> {
        // SAFETY: `buf` is the writer's block of the arena, `mailbox_bytes` long (measured),
        // 64-byte aligned, ours until published, and stays mapped while this process is
        // connected; init only writes it.
        unsafe { Mailbox::init(buf.as_mut_ptr(), self.slots, self.slot_bytes, self.type_tag) }
            .map_err(|e| Error::Init(format!("mailbox: {e}")))?;
        Ok(Vec::new())
    }
}

/// How an owned object is sealed.
#[derive(Default)]
pub(crate) struct Seal {
    /// The ids the object keeps alive: the refs met while writing it (`None`), or these.
    pub(crate) contained: Option<Vec<ObjectId>>,
    /// This process keeps the first reference.
    pub(crate) keep: bool,
    /// A failure report, not a value.
    pub(crate) error: bool,
    /// The caller a result is for: it gets the only reference.
    pub(crate) pin_for: Option<(u32, u32)>,
    /// Created by the daemon whatever its size (its id is known to the store, and to waiters,
    /// from the start, and reported lost if this process dies before sealing it).
    pub(crate) by_daemon: bool,
    /// Part of trove's machinery (a mailbox, an actor's token or name), not a user's value.
    pub(crate) internal: bool,
}

impl Seal {
    /// Kept by this process (one reference), holding `contained` (`None`: its own refs).
    pub(crate) fn kept(contained: Option<Vec<ObjectId>>) -> Seal {
        Seal {
            contained,
            keep: true,
            ..Seal::default()
        }
    }

    /// A call's result for the caller `reply_to` (which gets the only reference).
    pub(crate) fn for_caller(reply_to: (u32, u32), error: bool) -> Seal {
        Seal {
            error,
            pin_for: Some(reply_to),
            ..Seal::default()
        }
    }
}

/// Where an object is in the arena: (offset, length).
pub(crate) type Place = (u64, u64);

/// Writes `content` as the owned object `id` and seals it as `seal` says. Returns where it is
/// and the refs inside it.
pub(crate) fn write<C: Content + ?Sized>(
    client: &StoreClient,
    id: ObjectId,
    content: &C,
    seal: Seal,
) -> Result<(Place, Vec<ObjectId>)> {
    let (len, refs) = content.measure()?;
    share_refs(client, &refs)?;
    let mut w = if seal.by_daemon {
        begin(client, id, len)?
    } else {
        client.alloc_owned(id, len as u64)?
    };
    let met = content.write(w.as_mut_slice())?;
    // A consumer may die here: a large object is then still being created (the daemon loses
    // it with its creator), a small one was never published.
    #[cfg(feature = "failpoints")]
    fail::fail_point!("trove::writing");
    let place = (w.offset(), len as u64);
    let contained = match seal.contained {
        Some(ids) => ids,
        None => met.clone(),
    };
    w.publish_with(Owned {
        contained,
        keep: seal.keep,
        error: seal.error,
        pin_for: seal.pin_for,
        internal: seal.internal,
    })?;
    Ok((place, met))
}

/// Starts an owned object of `len` bytes that the caller fills in place before [`finish`]
/// ([`Runtime::create`](crate::Runtime::create)): created by the daemon, so its id is known
/// to the store, and to waiters, at once.
pub(crate) fn begin(client: &StoreClient, id: ObjectId, len: usize) -> Result<OwnedWriter> {
    Ok(client.create_owned(id, len as u64)?)
}

/// Seals an object started with [`begin`]; this process keeps one reference.
pub(crate) fn finish(w: OwnedWriter) -> Result<()> {
    w.publish(&[])?;
    Ok(())
}

/// Leaves a failure report as the call result `result` for the caller `reply_to`. A report
/// that already exists (two processes reporting the same death) is not an error (`None`).
pub(crate) fn report_failure(
    client: &StoreClient,
    result: ObjectId,
    reply_to: (u32, u32),
    failure: Failure,
    msg: &str,
) -> Result<Option<Place>> {
    let bytes = message::failure_bytes(failure, msg);
    match write(client, result, &bytes[..], Seal::for_caller(reply_to, true)) {
        Ok((place, _)) => Ok(Some(place)),
        Err(Error::Store(StoreError::AlreadyExists(_))) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Makes the objects `refs` readable by other processes before their ids escape into an
/// object or a call: results of calls in flight are asked for in the store, and results held
/// only in this process's memory are put there.
pub(crate) fn share_refs(client: &StoreClient, refs: &[ObjectId]) -> Result<()> {
    if refs.is_empty() {
        return Ok(());
    }
    let Some(sh) = context::current() else {
        // Without a context there are no calls in flight and no local values.
        return Ok(());
    };
    for id in refs {
        sh.force_store(id);
        sh.locals.promote(client, id)?;
    }
    Ok(())
}
