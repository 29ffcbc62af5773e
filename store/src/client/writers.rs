//! Writers: `ObjectWriter` (a created object, sealed or aborted), `OwnedWriter` (an owned,
//! reference-counted object: bump-allocated in this client's slab when small, `alloc_owned`,
//! or created by the daemon, `create_owned`; `publish` seals it).

use std::sync::atomic::Ordering;

use super::holds::Held;
use super::{StoreClient, lock, reply_error};
use crate::blocks::id::ObjectId;
use crate::error::{Result, StoreError};
use crate::protocol::{self, Owned, Reply, Request};

/// The slab this client bump-allocates small objects from.
pub(super) struct ClientSlab {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) next: u64,
    /// Writers placed in this slab and not yet published or dropped. The daemon frees a slab
    /// this client has moved on from once its objects are gone, so the client only moves on
    /// when none is outstanding (others go to the daemon meanwhile).
    pub(super) outstanding: u32,
}

/// Objects up to this size are placed in the client's slab without a round trip.
pub const SMALL_OBJECT_MAX: u64 = 32 << 10;
/// Size of the slabs a client asks for.
pub(super) const SLAB_LEN: u64 = 1 << 20;
/// After a refused slab, how long the client places small objects through the daemon before
/// it asks for a slab again.
const SLAB_RETRY_NS: u64 = 100_000_000;
impl StoreClient {
    /// Starts an owned (reference-counted) object of `size` bytes: small ones are placed in
    /// this client's slab without a round trip, larger ones are created by the daemon. Write
    /// it, then [`OwnedWriter::publish`] it.
    pub fn alloc_owned(&self, id: ObjectId, size: u64) -> Result<OwnedWriter> {
        if size > SMALL_OBJECT_MAX {
            return self.create_owned(id, size);
        }
        let step = size.max(1).next_multiple_of(64);
        let mut slab = lock(&self.inner.slab);
        let offset = match &mut *slab {
            Some(s) if s.next + step <= s.end => {
                let o = s.next;
                s.next += step;
                s.outstanding += 1;
                o
            }
            Some(s) if s.outstanding > 0 => {
                // Full, and another thread is still writing into it: not ours to give up yet.
                drop(slab);
                return self.create_owned(id, size);
            }
            _ if crate::shm::monotonic_ns()
                < self.inner.slab_refused_until.load(Ordering::Relaxed) =>
            {
                // Refused a moment ago: no round trip for another refusal.
                drop(slab);
                return self.create_owned(id, size);
            }
            _ => {
                let (offset, len) = match self.call(&Request::Slab { size: SLAB_LEN })? {
                    Reply::Slab { offset, len } => (offset, len),
                    other => match reply_error(other, id) {
                        // No slab to spare (client slabs are at their share of the store):
                        // the daemon places this object.
                        StoreError::StoreFull { .. } => {
                            self.inner.slab_refused_until.store(
                                crate::shm::monotonic_ns() + SLAB_RETRY_NS,
                                Ordering::Relaxed,
                            );
                            drop(slab);
                            return self.create_owned(id, size);
                        }
                        e => return Err(e),
                    },
                };
                if len < step || self.inner.arena.ptr(offset, len).is_none() {
                    return Err(StoreError::Protocol(format!(
                        "daemon granted a bad slab {offset}+{len}"
                    )));
                }
                *slab = Some(ClientSlab {
                    start: offset,
                    end: offset + len,
                    next: offset + step,
                    outstanding: 1,
                });
                offset
            }
        };
        drop(slab);
        let ptr = self
            .inner
            .arena
            .ptr(offset, size)
            .ok_or_else(|| StoreError::Protocol("slab outside the heap".into()))?;
        Ok(OwnedWriter {
            client: self.clone(),
            id,
            offset,
            ptr,
            len: size as usize,
            small: true,
            done: false,
        })
    }

    /// Like [`StoreClient::alloc_owned`] but always created by the daemon, whatever the size:
    /// the id is known to the store (and to waiters) from now on, and is reported lost if this
    /// process dies before publishing it.
    pub fn create_owned(&self, id: ObjectId, size: u64) -> Result<OwnedWriter> {
        let offset = self.create_raw(id, size)?;
        let ptr = self.inner.arena.ptr(offset, size).ok_or_else(|| {
            StoreError::Protocol(format!("daemon gave an out-of-bounds offset {offset}"))
        })?;
        Ok(OwnedWriter {
            client: self.clone(),
            id,
            offset,
            ptr,
            len: size as usize,
            small: false,
            done: false,
        })
    }
}

/// A writable buffer for an object being created. `seal` publishes it; drop aborts it.
pub struct ObjectWriter {
    pub(super) client: StoreClient,
    pub(super) id: ObjectId,
    pub(super) ptr: *mut u8,
    pub(super) len: usize,
    pub(super) done: bool,
}

// SAFETY: the buffer is owned by this writer alone (the daemon gave this range to this client
// for this object, and no other process reads an unsealed object), so moving it between
// threads is fine.
unsafe impl Send for ObjectWriter {}

impl ObjectWriter {
    pub fn id(&self) -> ObjectId {
        self.id
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: [ptr, ptr+len) is inside the mapping (checked at create), exclusively ours
        // until seal or abort, and the mapping outlives self (self holds the client).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }
    /// Seals the object: it becomes immutable and visible to every client.
    pub fn seal(mut self) -> Result<()> {
        self.done = true;
        self.client.seal(self.id)
    }
    /// Aborts the object explicitly (same as dropping the writer).
    pub fn abort(mut self) -> Result<()> {
        self.done = true;
        self.client.abort(self.id)
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.client.abort(self.id);
        }
    }
}

/// A writable buffer for an owned (reference-counted) object. [`OwnedWriter::publish`] seals
/// it and leaves this process holding one reference; dropping it unpublished abandons it.
pub struct OwnedWriter {
    pub(super) client: StoreClient,
    pub(super) id: ObjectId,
    pub(super) offset: u64,
    pub(super) ptr: *mut u8,
    pub(super) len: usize,
    pub(super) small: bool,
    pub(super) done: bool,
}

// SAFETY: the buffer is this writer's alone until it is published (a slab range this client
// allocated, or an object the daemon created for it), so moving it between threads is fine.
unsafe impl Send for OwnedWriter {}

impl OwnedWriter {
    pub fn id(&self) -> ObjectId {
        self.id
    }
    /// Where the object is in the arena.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: [ptr, ptr+len) is inside the heap (checked at allocation) and exclusively
        // ours until published; the mapping outlives self (self holds the client).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as for `as_mut_slice`; `&self` excludes writers through this object.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Seals the object; `contained` are ids of objects it references (kept alive while it
    /// lives). This process then holds one reference, dropped with [`StoreClient::release`].
    pub fn publish(self, contained: &[ObjectId]) -> Result<()> {
        self.publish_with(Owned {
            contained: contained.to_vec(),
            keep: true,
            ..Owned::default()
        })
    }

    /// Seals the object as `owned` says. This process holds a reference afterwards only if
    /// `owned.keep`.
    pub fn publish_with(mut self, owned: Owned) -> Result<()> {
        self.done = true;
        let c = &self.client;
        if owned.contained.len() > protocol::MAX_IDS {
            if !self.small {
                let _ = c.abort(self.id);
            }
            return Err(StoreError::InvalidRequest(format!(
                "an object may reference at most {} others, not {}",
                protocol::MAX_IDS,
                owned.contained.len()
            )));
        }
        let keep = owned.keep;
        // A one-way publish names the objects it contains: until the daemon has handled it,
        // they must not lose this process's pins by a local unpin that could overtake it (the
        // daemon would then see neither pin nor holder, and free them). Their releases go as
        // `Unhold`s queued behind it, as for an id whose own `Hold` is unhandled.
        let contained = if self.small {
            owned.contained.clone()
        } else {
            Vec::new()
        };
        let seq = if self.small {
            c.inner.conn.send(
                0,
                &Request::PutSmall {
                    id: self.id,
                    offset: self.offset,
                    size: self.len as u64,
                    owned,
                },
            )?
        } else {
            let req = c.inner.conn.next_req.fetch_add(1, Ordering::Relaxed);
            let seq = c
                .inner
                .conn
                .send(req, &Request::SealOwned { id: self.id, owned })?;
            let reply = c.inner.conn.wait_reply(|st| st.replies.remove(&req))?;
            c.inner.conn.synced.fetch_max(seq, Ordering::AcqRel);
            if !matches!(reply, Reply::Ok) {
                return Err(reply_error(reply, self.id));
            }
            seq
        };
        if !contained.is_empty() {
            let mut holds = lock(&c.inner.holds);
            for id in &contained {
                if let Some(h) = holds.map.get_mut(id) {
                    h.daemon_seq = Some(h.daemon_seq.map_or(seq, |s| s.max(seq)));
                }
            }
        }
        if !keep {
            return Ok(());
        }
        let mut holds = lock(&c.inner.holds);
        holds.unholding.remove(&self.id);
        let h = holds
            .map
            .entry(self.id)
            .or_insert_with(|| Held::by_daemon(seq));
        h.count += 1;
        h.loc = Some((self.offset, self.len as u64));
        h.daemon_seq = Some(seq);
        Ok(())
    }
}

impl Drop for OwnedWriter {
    fn drop(&mut self) {
        if self.small {
            // Published (its frame is queued: runs after `publish_with`'s send) or abandoned.
            if let Some(s) = &mut *lock(&self.client.inner.slab)
                && (s.start..s.end).contains(&self.offset)
            {
                s.outstanding = s.outstanding.saturating_sub(1);
            }
        }
        if !self.done && !self.small {
            let _ = self.client.abort(self.id);
        }
    }
}
