//! A bounded multi-producer multi-consumer queue of small messages in shared memory: actor
//! mailboxes (any process pushes, the actor pops) and the task queue (any process pushes, any
//! worker pops).
//!
//! The algorithm is Dmitry Vyukov's bounded MPMC queue: each slot carries a sequence number;
//! a producer claims position `p` by CAS on `tail` when slot `p`'s sequence is `p`, writes, then
//! publishes with sequence `p + 1`; a consumer claims `p` when the sequence is `p + 1`, reads,
//! then frees the slot with sequence `p + capacity`. Indices are free-running `u64`s, so they
//! never wrap in practice.
//!
//! A consumer claims a slot by a CAS on the slot's *sequence* (from `p + 1` to
//! [`CLAIMED`]` | tag`, its tag being its pid) and only then moves `head` past it (any consumer
//! that finds the head slot claimed helps move it). So the slot itself says which consumer
//! holds it, from the claim to the free: if that consumer dies in between, its reaper finds
//! the slot ([`Mailbox::reclaim`]), fails the message in it (unless the consumer had noted it
//! as current) and frees it, so no call is lost and no slot stays blocked.
//!
//! Consumers park on the header's [`Park`] (an eventcount on a shared futex; the protocol and
//! why no wake-up is lost are in [`trove_store::blocks::park`]): a consumer that found the
//! queue empty (after a spin) waits while it is still empty and not dead; a producer, after
//! publishing, notifies one waiter, and [`Mailbox::set_dead`] notifies all of them. A notifier
//! makes no syscall unless a consumer announced a wait.
//!
//! Layout (the header is `HEADER_LEN` bytes; slots and records follow):
//!
//! ```text
//! 0    head u64                                                     64 bytes
//! 64   tail u64                                                     64 bytes
//! 128  park (blocks::park): event u32, waiters u32                  64 bytes
//! 192  region header (blocks::region): magic u64 "TROVEMBX", version u32, capacity u32,
//!      slot_size u32, reserved u32                                  24 bytes
//! 216  program u64, type_tag u64, cancels u64, consumer_pid u64, dead u32 (read by producers
//!      on every push: no field the consumer writes per message shares this line)
//! 256  current: set u32 (0, or the current message's length + 1), pos u64, [u64; 32]
//!      then (64-aligned) the consumer's debts (see below), then (64-aligned) the park of
//!      callers waiting for results: event u32, waiters u32
//! HEADER_LEN                 slot i: [seq u64][len u32][pad][payload], slot_size bytes
//! records_offset(..)         record i (crate::record), RECORD_LEN bytes
//! ```
//!
//! The region holds no pointers and everything read from it is checked (message lengths), so
//! a corrupt or hostile peer cannot make an access leave the region. A producer that dies
//! between claiming and publishing a slot stalls consumers at that slot; the window is a few
//! instructions and the executor treats a mailbox whose owner died as dead anyway.
//!
//! The header also holds a `dead` flag (set by whoever learns the consumer died; producers
//! check it), the consumer's *current* message and its *debts* (the results it has made but
//! not yet handed over; [`crate::debts`] owns that protocol), so that the process that reaps
//! a dead consumer can fail the call it was running and every result it still owed.

use std::ptr::NonNull;
use std::time::{Duration, Instant};

use trove_store::blocks::park::{Park, ParkError};
use trove_store::blocks::region::{Geometry, Kind, RegionError, RegionHeader};

use crate::debts::{Book, Debts};
use crate::record::{RECORD_LEN, Record};
use crate::sync::{AtomicU32, AtomicU64, Backoff, Ordering};

/// What a mailbox region is (see [`trove_store::blocks::region`]). One slot cannot tell
/// "published for p" from "free for p + 1": at least two.
const KIND: Kind = Kind {
    name: "mailbox",
    magic: 0x5452_4f56_454d_4258, // "TROVEMBX"
    version: 4,
    align: 64,
    header_len: HEADER_LEN,
    capacity: (2, 1 << 20),
    slot_size: (32, 1 << 16),
    slot_align: 16,
    bytes: |g| Some(mailbox_bytes(g.capacity, g.slot_size)),
};
/// Bytes of a slot's header: sequence (8) and length (4), padded to 16.
const SLOT_HEADER: usize = 16;
std::thread_local! {
    /// Whether this thread's last wait for a message ended quickly (see `sync::Spin`).
    static POP_QUICK: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// How long a consumer spins (yielding) on an empty queue before it parks.
const SPIN_BEFORE_PARK: Duration = Duration::from_micros(100);
/// Bytes of the current-message record in the header: a whole message of a 256-byte slot,
/// so that a call can be run again after its consumer died (a retry).
pub const CURRENT_LEN: usize = 256;
/// A slot's sequence while a consumer holds it: this bit, the low 31 bits of the position
/// (so a holder of the same slot a lap before is told apart) and the consumer's tag (its pid).
pub const CLAIMED: u64 = 1 << 63;

/// The sequence word of a slot that consumer `tag` holds for position `pos`.
const fn claimed(pos: u64, tag: u32) -> u64 {
    CLAIMED | (pos & 0x7fff_ffff) << 32 | tag as u64
}

#[repr(C, align(64))]
struct Line<T>(T);

#[repr(C, align(64))]
struct Header {
    head: Line<AtomicU64>,
    tail: Line<AtomicU64>,
    /// Consumers park here while the queue is empty.
    park: Line<Park>,
    /// Magic, layout version, capacity and slot size. This line and the fields after it up
    /// to `current` are read by producers on every push and written rarely: nothing the
    /// consumer writes per message shares their cache line.
    region: RegionHeader,
    /// The creator's program identity ([`crate::process::program_id`]): function addresses
    /// in messages mean something only to consumers of the same program.
    program: AtomicU64,
    /// What the consumer is (an actor type's fingerprint; 0 for the task queue and workers).
    type_tag: AtomicU64,
    /// How many calls callers have cancelled (see [`Mailbox::note_cancel`]).
    cancels: AtomicU64,
    /// The process serving the mailbox now (set by whoever forks it; 0 before).
    consumer_pid: AtomicU64,
    dead: AtomicU32,
    /// The message the consumer is running, written by it for every message.
    current: Line<Current>,
    /// The results the consumer owes (see [`crate::debts`]).
    debts: Book,
    /// Callers that waited long for a result park here (see [`Mailbox::wait_for_result`]);
    /// consumers notify after every call.
    replies: Line<Park>,
}

/// The message a consumer is running (see [`Mailbox::set_current`]).
#[repr(C)]
struct Current {
    /// Non-zero while `words` holds the message the consumer is running: its length + 1.
    set: AtomicU32,
    /// The position `words` was popped from.
    pos: AtomicU64,
    words: [AtomicU64; CURRENT_LEN / 8],
}

const HEADER_LEN: usize = size_of::<Header>().next_multiple_of(64);
#[cfg(not(loom))]
const _: () = assert!(
    std::mem::offset_of!(Header, park) == 128
        && std::mem::offset_of!(Header, region) == 192
        && std::mem::offset_of!(Header, program) == 216
        && std::mem::offset_of!(Header, dead) == 248
        && std::mem::offset_of!(Header, current) == 256
);

/// Errors of mailbox operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MailboxError {
    #[error("the mailbox's owner is dead")]
    Dead,
    #[error("timed out")]
    Timeout,
    #[error("message of {0} bytes is too large for a slot")]
    TooLarge(usize),
    #[error("mailbox corrupt: {0}")]
    Corrupt(&'static str),
    #[error("bad mailbox parameters: {0}")]
    BadParams(RegionError),
}

/// Where the completion records start: after the slots, 64-byte aligned.
const fn records_offset(capacity: u64, slot_size: u64) -> usize {
    (HEADER_LEN + (capacity * slot_size) as usize).next_multiple_of(64)
}

/// Bytes a mailbox of `capacity` slots (a power of two) of `slot_size` bytes needs: the
/// header, the slots, and one completion record per slot (see [`crate::record`]).
pub const fn mailbox_bytes(capacity: u64, slot_size: u64) -> usize {
    records_offset(capacity, slot_size) + capacity as usize * RECORD_LEN
}

/// A view of a mailbox in this process's mapping. Cheap to copy.
#[derive(Debug, Clone, Copy)]
pub struct Mailbox {
    base: NonNull<u8>,
    capacity: u64,
    slot_size: u64,
}

// SAFETY: a Mailbox only points at shared memory accessed through atomics (header, slot
// sequence and length) or under the slot protocol (payloads); the init/attach contract keeps
// the region mapped while any copy lives.
unsafe impl Send for Mailbox {}
// SAFETY: as above; every method takes `&self` and synchronises through atomics.
unsafe impl Sync for Mailbox {}

impl Mailbox {
    /// Initialises a mailbox in `region` for consumers of type `type_tag` (an actor type's
    /// fingerprint, 0 for tasks), stamped with this program's identity.
    ///
    /// # Safety
    /// `region` is valid for reads and writes of `mailbox_bytes(capacity, slot_size)` bytes,
    /// 64-byte aligned, stays mapped while any `Mailbox` to it lives, and nobody else uses it
    /// during `init`.
    pub unsafe fn init(
        region: *mut u8,
        capacity: u64,
        slot_size: u64,
        type_tag: u64,
    ) -> Result<Mailbox, MailboxError> {
        let geometry = Geometry {
            capacity,
            slot_size,
        };
        let len = KIND.check(geometry).map_err(MailboxError::BadParams)?;
        let base = KIND
            .check_region(region, len)
            .map_err(MailboxError::BadParams)?;
        let m = Mailbox {
            base,
            capacity,
            slot_size,
        };
        let h = m.header();
        h.head.0.store(0, Ordering::Relaxed);
        h.tail.0.store(0, Ordering::Relaxed);
        h.park.0.reset();
        h.program
            .store(crate::process::program_id(), Ordering::Relaxed);
        h.type_tag.store(type_tag, Ordering::Relaxed);
        h.dead.store(0, Ordering::Relaxed);
        h.current.0.set.store(0, Ordering::Relaxed);
        h.cancels.store(0, Ordering::Relaxed);
        h.consumer_pid.store(0, Ordering::Relaxed);
        h.debts.reset();
        h.replies.0.reset();
        for i in 0..capacity {
            m.seq(i).store(i, Ordering::Relaxed);
            m.record(i).reset();
        }
        // Published last: an `attach` that sees the magic (Acquire) sees everything above.
        h.region.publish(&KIND, geometry);
        Ok(m)
    }

    /// Attaches to a mailbox another process initialised in `region` of `len` bytes.
    ///
    /// # Safety
    /// `region` is valid for reads and writes of `len` bytes, 64-byte aligned, and stays
    /// mapped while any `Mailbox` to it lives.
    pub unsafe fn attach(region: *mut u8, len: usize) -> Result<Mailbox, MailboxError> {
        let base = KIND.check_region(region, len).map_err(|e| match e {
            RegionError::Null => MailboxError::BadParams(e),
            _ => MailboxError::Corrupt(e.reason()),
        })?;
        // SAFETY: the region holds at least a header, aligned, and the header is only atomics.
        let h = unsafe { base.cast::<Header>().as_ref() };
        let g = h
            .region
            .read(&KIND, len)
            .map_err(|e| MailboxError::Corrupt(e.reason()))?;
        Ok(Mailbox {
            base,
            capacity: g.capacity,
            slot_size: g.slot_size,
        })
    }

    fn header(&self) -> &Header {
        // SAFETY: the region starts with a Header (init/attach), aligned, only atomics, and
        // stays mapped while self lives.
        unsafe { &*(self.base.as_ptr() as *const Header) }
    }

    fn slot(&self, pos: u64) -> *mut u8 {
        let i = pos & (self.capacity - 1);
        // SAFETY: i < capacity, so the slot lies inside the region (checked at init/attach).
        unsafe {
            self.base
                .as_ptr()
                .add(HEADER_LEN + (i * self.slot_size) as usize)
        }
    }

    /// Vyukov's claim for producers: takes the position `index` (tail) points at once its
    /// slot's sequence is that position plus `ready` (0: free). `None` if the queue is full.
    fn claim(&self, index: &AtomicU64, ready: u64) -> Option<u64> {
        let mut pos = index.load(Ordering::Relaxed);
        loop {
            let seq = self.seq(pos).load(Ordering::Acquire);
            if seq & CLAIMED != 0 {
                // A consumer still holds the slot from the lap before: full. (As a difference
                // the claimed word would read as "ahead", and a producer would spin until
                // the consumer let go: forever, if it died holding it, until the reaper
                // reclaims it.)
                return None;
            }
            let diff = seq.wrapping_sub(pos + ready) as i64;
            if diff == 0 {
                match index.compare_exchange_weak(pos, pos + 1, Ordering::SeqCst, Ordering::Relaxed)
                {
                    Ok(_) => return Some(pos),
                    Err(p) => pos = p,
                }
            } else if diff < 0 {
                return None;
            } else {
                pos = index.load(Ordering::Relaxed);
            }
        }
    }

    fn seq(&self, pos: u64) -> &AtomicU64 {
        // SAFETY: a slot starts with an 8-aligned u64 (slots are 16-byte multiples after a
        // 64-aligned header), accessed only atomically.
        unsafe { &*(self.slot(pos) as *const AtomicU64) }
    }

    fn len_word(&self, pos: u64) -> &AtomicU32 {
        // SAFETY: bytes 8..12 of the slot, 4-aligned, accessed only atomically.
        unsafe { &*(self.slot(pos).add(8) as *const AtomicU32) }
    }

    /// The identity of the program that created the mailbox (see [`Mailbox::init`]).
    pub fn program(&self) -> u64 {
        self.header().program.load(Ordering::Relaxed)
    }

    /// The type of consumer the mailbox was made for (see [`Mailbox::init`]).
    pub fn type_tag(&self) -> u64 {
        self.header().type_tag.load(Ordering::Relaxed)
    }

    /// The largest message a slot holds.
    pub fn max_msg_len(&self) -> usize {
        self.slot_size as usize - SLOT_HEADER
    }

    pub fn is_dead(&self) -> bool {
        self.header().dead.load(Ordering::SeqCst) != 0
    }

    /// Marks the consumer dead and wakes every parked consumer, producer and caller.
    pub fn set_dead(&self) {
        let h = self.header();
        h.dead.store(1, Ordering::SeqCst);
        h.park.0.notify_all();
        h.replies.0.notify_all();
    }

    /// Tells callers parked in [`Mailbox::wait_for_result`] that a record may have changed
    /// (a consumer, after each call; a canceller). Costs a fence and a load while nobody is
    /// parked.
    pub fn result_changed(&self) {
        self.header().replies.0.notify_all();
    }

    /// Parks the calling thread while `pending()` (a record it waits on has not changed) and
    /// the consumer is alive, until `deadline`: for a caller that has spun long enough (its
    /// consumer is not running: more runnable processes than cores, or the call is long).
    /// Returns whether it is still pending (`false` once the consumer is dead: nothing will
    /// change then; the caller looks in the store).
    pub fn wait_for_result(&self, deadline: Instant, pending: impl Fn() -> bool) -> bool {
        let replies = &self.header().replies.0;
        loop {
            if !pending() || self.is_dead() {
                return false;
            }
            match replies.wait(Some(deadline), || pending() && !self.is_dead()) {
                Ok(()) => {}
                Err(ParkError::Timeout) => return pending(),
                Err(ParkError::Futex(_)) => std::thread::sleep(Duration::from_micros(100)),
            }
        }
    }

    /// Pushes a message without waiting: its position, or `Ok(None)` if the queue is full.
    pub fn try_push(&self, msg: &[u8]) -> Result<Option<u64>, MailboxError> {
        if msg.len() > self.max_msg_len() {
            return Err(MailboxError::TooLarge(msg.len()));
        }
        let h = self.header();
        let Some(pos) = self.claim(&h.tail.0, 0) else {
            return Ok(None);
        };
        // SAFETY: we own slot `pos` until we publish it: the payload area is inside the slot
        // (len <= max_msg_len) and no consumer reads it before the Release store below.
        unsafe {
            std::ptr::copy_nonoverlapping(msg.as_ptr(), self.slot(pos).add(SLOT_HEADER), msg.len())
        };
        self.len_word(pos)
            .store(msg.len() as u32, Ordering::Relaxed);
        self.seq(pos).store(pos + 1, Ordering::Release);
        h.park.0.notify_one();
        Ok(Some(pos))
    }

    /// Pushes a message, waiting while the queue is full (backoff, then short sleeps) until
    /// `deadline`. Fails with `Dead` if the consumer is marked dead.
    pub fn push(&self, msg: &[u8], deadline: Option<Instant>) -> Result<u64, MailboxError> {
        let backoff = Backoff::new();
        loop {
            if self.is_dead() {
                return Err(MailboxError::Dead);
            }
            if let Some(pos) = self.try_push(msg)? {
                return Ok(pos);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(MailboxError::Timeout);
            }
            if backoff.is_completed() {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                backoff.snooze();
            }
        }
    }

    /// A consumer's claim: takes the position at `head` once its slot is published, by a CAS
    /// of the slot's sequence to `CLAIMED | tag` (so the slot names its holder until it is
    /// freed), then moves `head` on. `None` if the queue is empty.
    fn claim_for_consumer(&self, tag: u32) -> Option<u64> {
        let head = &self.header().head.0;
        // Retries wait for another consumer's step (a claim, a move of `head`): spin a little
        // between them (under loom: let the others run).
        let backoff = Backoff::new();
        let mut pos = head.load(Ordering::Relaxed);
        loop {
            let seq = self.seq(pos).load(Ordering::Acquire);
            if seq & CLAIMED != 0 {
                // Held: for `pos` by a consumer that has not moved `head` past it yet (help),
                // or for the position a lap before (the queue is full up to there), or `pos`
                // is stale.
                if seq >> 32 == claimed(pos, 0) >> 32 {
                    let _ =
                        head.compare_exchange(pos, pos + 1, Ordering::SeqCst, Ordering::Relaxed);
                } else if head.load(Ordering::Relaxed) == pos {
                    return None;
                }
                backoff.spin();
                pos = head.load(Ordering::Relaxed);
                continue;
            }
            let diff = seq.wrapping_sub(pos + 1) as i64;
            if diff == 0 {
                if self
                    .seq(pos)
                    .compare_exchange(seq, claimed(pos, tag), Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
                {
                    let _ =
                        head.compare_exchange(pos, pos + 1, Ordering::SeqCst, Ordering::Relaxed);
                    return Some(pos);
                }
                // Another consumer took it: the next look sees it claimed.
            } else if diff < 0 {
                return None;
            } else {
                backoff.spin();
                pos = head.load(Ordering::Relaxed);
            }
        }
    }

    /// Pops one message into `f` (with its position) without waiting; `Ok(None)` if empty.
    /// `tag` names the consumer (its pid) in the slot while it holds it: `f` runs then, so a
    /// consumer that notes the message as its current one in `f` leaves no moment when a
    /// message it took is neither named by its slot nor by its current record.
    pub fn try_pop<R>(
        &self,
        tag: u32,
        f: impl FnOnce(u64, &[u8]) -> R,
    ) -> Result<Option<R>, MailboxError> {
        let Some(pos) = self.claim_for_consumer(tag) else {
            return Ok(None);
        };
        crate::fail_point!("trove::claimed");
        let len = self.len_word(pos).load(Ordering::Relaxed) as usize;
        let result = if len > self.max_msg_len() {
            Err(MailboxError::Corrupt("message length"))
        } else {
            // SAFETY: we hold slot `pos` until we free it below; `len` was checked to lie
            // within the payload area; the producer's Release store of the sequence (read by
            // our claim's CAS) ordered its writes before our reads.
            let bytes = unsafe { std::slice::from_raw_parts(self.slot(pos).add(SLOT_HEADER), len) };
            Ok(Some(f(pos, bytes)))
        };
        crate::fail_point!("trove::claim_held");
        self.seq(pos).store(pos + self.capacity, Ordering::Release);
        result
    }

    /// A hint for a consumer about to wait at the head: has this core fetch, for writing,
    /// the completion record the next message will use (last written by the caller that read
    /// it a lap ago), so that claiming it does not wait for another core's cache then: its
    /// first line (state and a small value) and its last (the result's id and reply-to).
    pub fn prefetch_for_consumer(&self) {
        let pos = self.header().head.0.load(Ordering::Relaxed);
        let record = self.record(pos) as *const Record as *const u8;
        prefetch_write(record);
        prefetch_write(record.wrapping_add(RECORD_LEN - 64));
    }

    /// A hint for a producer waiting for a reply: has this core fetch, for writing, the slot
    /// its next push will fill (last written by the consumer that freed it).
    pub fn prefetch_for_producer(&self) {
        let pos = self.header().tail.0.load(Ordering::Relaxed);
        prefetch_write(self.slot(pos));
    }

    /// Frees every slot the consumer `tag` holds (it died between a claim and its free),
    /// calling `f` with each one's position and message first, oldest first.
    pub fn reclaim(&self, tag: u32, mut f: impl FnMut(u64, &[u8])) {
        let head = &self.header().head.0;
        // Move `head` past claimed slots, so that every held position lies below it.
        loop {
            let pos = head.load(Ordering::SeqCst);
            if self.seq(pos).load(Ordering::Acquire) != claimed(pos, tag) {
                break;
            }
            let _ = head.compare_exchange(pos, pos + 1, Ordering::SeqCst, Ordering::Relaxed);
        }
        let h = head.load(Ordering::SeqCst);
        let mut held = Vec::new();
        for i in 0..self.capacity.min(h) {
            // The slot's position is the last one below `head` that maps to it (`head` is at
            // most `capacity` past a held position: the slot after it is not free).
            let pos = (h - 1) - ((h - 1 - i) & (self.capacity - 1));
            if self.seq(i).load(Ordering::Acquire) == claimed(pos, tag) {
                held.push(pos);
            }
        }
        held.sort_unstable();
        for pos in held {
            let len = self.len_word(pos).load(Ordering::Relaxed) as usize;
            if len <= self.max_msg_len() {
                // SAFETY: the slot is held by a dead consumer, so nobody writes it until we
                // free it below; `len` lies within the payload area.
                let bytes =
                    unsafe { std::slice::from_raw_parts(self.slot(pos).add(SLOT_HEADER), len) };
                f(pos, bytes);
            }
            let _ = self.seq(pos).compare_exchange(
                claimed(pos, tag),
                pos + self.capacity,
                Ordering::SeqCst,
                Ordering::Relaxed,
            );
        }
    }

    /// Pops one message, spinning briefly and then parking on the futex, for at most
    /// `timeout`. `Err(Timeout)` if nothing came; `Err(Dead)` once the mailbox is marked dead
    /// and empty.
    pub fn pop<R>(
        &self,
        tag: u32,
        timeout: Duration,
        mut f: impl FnMut(u64, &[u8]) -> R,
    ) -> Result<R, MailboxError> {
        if let Some(r) = self.try_pop(tag, &mut f)? {
            return Ok(r);
        }
        let start = Instant::now();
        let deadline = start + timeout;
        let spin_until = start + SPIN_BEFORE_PARK.min(timeout);
        let mut spin = crate::sync::Spin::new(start, POP_QUICK.get());
        let h = self.header();
        self.prefetch_for_consumer();
        loop {
            if let Some(r) = self.try_pop(tag, &mut f)? {
                POP_QUICK.set(spin.learn());
                return Ok(r);
            }
            if self.is_dead() {
                return Err(MailboxError::Dead);
            }
            // Spin for a while before parking: a futex wake-up costs tens of microseconds on
            // a virtual machine, more than a typical call.
            if spin.go_on(spin_until) {
                continue;
            }
            match h
                .park
                .0
                .wait(Some(deadline), || self.is_empty() && !self.is_dead())
            {
                Ok(()) => {}
                Err(ParkError::Timeout) => return Err(MailboxError::Timeout),
                Err(ParkError::Futex(_)) => std::thread::sleep(Duration::from_micros(100)),
            }
        }
    }

    /// The completion record of the message at `pos` (shared with the messages `capacity`
    /// positions before and after it).
    pub fn record(&self, pos: u64) -> &Record {
        let i = (pos & (self.capacity - 1)) as usize;
        // SAFETY: record i < capacity lies after the slots, inside the region (mailbox_bytes
        // counts it; checked at init/attach), 64-byte aligned (records_offset rounds up and
        // RECORD_LEN is a multiple of 64); a Record is only atomics.
        unsafe {
            &*(self
                .base
                .as_ptr()
                .add(records_offset(self.capacity, self.slot_size) + i * RECORD_LEN)
                as *const Record)
        }
    }

    /// Whether no message is published at the head now (a head slot claimed by a consumer
    /// that has not moved `head` on yet counts as not empty: a consumer will help).
    pub fn is_empty(&self) -> bool {
        let pos = self.header().head.0.load(Ordering::SeqCst);
        let seq = self.seq(pos).load(Ordering::SeqCst);
        seq != pos + 1 && seq >> 32 != claimed(pos, 0) >> 32
    }

    /// Records the message the consumer popped from `pos` and is about to run (its first
    /// `CURRENT_LEN` bytes: all of a slot's message).
    pub fn set_current(&self, pos: u64, message: &[u8]) {
        let h = self.header();
        let len = message.len().min(CURRENT_LEN);
        let c = &h.current.0;
        c.pos.store(pos, Ordering::Relaxed);
        for (w, chunk) in c.words.iter().zip(message[..len].chunks(8)) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            w.store(u64::from_le_bytes(word), Ordering::Relaxed);
        }
        c.set.store(len as u32 + 1, Ordering::Release);
    }

    pub fn clear_current(&self) {
        self.header().current.0.set.store(0, Ordering::Release);
    }

    /// The position and bytes of the message the consumer was running, if any (read after
    /// it died, or by a restarted consumer asked to run it again).
    pub fn current(&self) -> Option<(u64, Vec<u8>)> {
        let h = self.header();
        let c = &h.current.0;
        let set = c.set.load(Ordering::Acquire) as usize;
        if set == 0 {
            return None;
        }
        let len = (set - 1).min(CURRENT_LEN);
        let mut out = Vec::with_capacity(CURRENT_LEN);
        for w in &c.words {
            out.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        out.truncate(len);
        Some((c.pos.load(Ordering::Relaxed), out))
    }

    /// Notes that a caller cancelled a call queued here (its result already reported as
    /// cancelled): consumers look for such results only once this is non-zero.
    pub fn note_cancel(&self) {
        self.header().cancels.fetch_add(1, Ordering::SeqCst);
    }

    /// Notes the process that serves the mailbox now (an actor restarted runs in another).
    pub fn set_consumer_pid(&self, pid: i32) {
        self.header()
            .consumer_pid
            .store(pid as u32 as u64, Ordering::Release);
    }

    /// The process that serves the mailbox now, if it was noted.
    pub fn consumer_pid(&self) -> Option<i32> {
        match self.header().consumer_pid.load(Ordering::Acquire) {
            0 => None,
            p => Some(p as u32 as i32),
        }
    }

    /// Whether any call queued here was ever cancelled.
    pub fn has_cancels(&self) -> bool {
        self.header().cancels.load(Ordering::Relaxed) != 0
    }

    /// The consumer's debts (see [`crate::debts`]).
    pub fn debts(&self) -> Debts {
        // SAFETY: the header stays mapped while this mailbox and its copies live, the same
        // contract `Debts` asks for.
        unsafe { Debts::new(&self.header().debts) }
    }
}

/// Asks the CPU to bring the cache line at `p` into this core's cache, ready for writing. A
/// hint only: nothing is read or written.
#[inline]
fn prefetch_write(p: *const u8) {
    #[cfg(all(target_arch = "x86_64", not(loom)))]
    // SAFETY: a prefetch is a hint that never faults and changes no memory, whatever the
    // address; SSE (which declares it) is part of the x86_64 baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_ET0 }>(p as *const i8)
    };
    #[cfg(not(all(target_arch = "x86_64", not(loom))))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Claim, Seen};

    #[repr(C, align(64))]
    struct Region([u8; 64]);

    fn region(capacity: u64, slot: u64) -> Vec<Region> {
        let n = mailbox_bytes(capacity, slot).div_ceil(64);
        (0..n).map(|_| Region([0; 64])).collect()
    }

    #[test]
    fn a_mailbox_needs_two_slots_at_least() {
        let mut r = region(2, 64);
        // SAFETY: the Vec is big enough for two slots, 64-aligned, and outlives the calls.
        let one = unsafe { Mailbox::init(r.as_mut_ptr() as *mut u8, 1, 64, 0) };
        assert!(matches!(one, Err(MailboxError::BadParams(_))));
        // SAFETY: as above.
        let two = unsafe { Mailbox::init(r.as_mut_ptr() as *mut u8, 2, 64, 0) };
        assert!(two.is_ok());
    }

    /// A caller parked for a result wakes when the consumer has recorded it and says so, and
    /// when the mailbox dies; with neither, it sleeps until its deadline.
    #[test]
    fn a_caller_parked_for_a_result_wakes_on_the_record_and_on_death() {
        let mut r = region(4, 64);
        // SAFETY: the Vec is big enough, 64-aligned, and outlives `m` and the thread below.
        let m = unsafe { Mailbox::init(r.as_mut_ptr() as *mut u8, 4, 64, 0) }.unwrap();
        let pos = m.try_push(b"call").unwrap().unwrap();
        let _ = m.try_pop(1, |p, _| p).unwrap().unwrap();
        let pending = || m.record(pos).seen(pos) == Seen::Pending;
        // Nobody answers: pending at the deadline.
        let t = Instant::now();
        assert!(m.wait_for_result(t + Duration::from_millis(30), pending));
        assert!(t.elapsed() >= Duration::from_millis(30));
        let far = Instant::now() + Duration::from_secs(20);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                assert_eq!(m.record(pos).claim(pos), Claim::Ok(None));
                m.record(pos).finish_stored(pos, 64, 8, false);
                m.result_changed();
            });
            let t = Instant::now();
            assert!(!m.wait_for_result(far, pending), "recorded");
            assert!(t.elapsed() < Duration::from_secs(10));
        });
        let pos = m.try_push(b"call").unwrap().unwrap();
        let pending = || m.record(pos).seen(pos) == Seen::Pending;
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                m.set_dead();
            });
            let t = Instant::now();
            assert!(!m.wait_for_result(far, pending), "dead");
            assert!(t.elapsed() < Duration::from_secs(10));
        });
    }

    #[test]
    fn fifo_full_and_lengths() {
        let mut r = region(4, 64);
        // SAFETY: the Vec is big enough, 64-aligned, and outlives `m`.
        let m = unsafe { Mailbox::init(r.as_mut_ptr() as *mut u8, 4, 64, 0) }.unwrap();
        for i in 0..4u8 {
            assert_eq!(
                m.try_push(&[i; 10][..i as usize + 1]).unwrap(),
                Some(i as u64)
            );
        }
        assert_eq!(m.try_push(b"x").unwrap(), None, "full");
        for i in 0..4u8 {
            let (pos, got) = m.try_pop(1, |p, b| (p, b.to_vec())).unwrap().unwrap();
            assert_eq!((pos, got), (i as u64, vec![i; i as usize + 1]));
            assert_eq!(m.record(pos).seen(pos), Seen::Pending);
            assert_eq!(m.record(pos).claim(pos), Claim::Ok(None));
            m.record(pos).finish_stored(pos, 64, pos, false);
            assert_eq!(
                m.record(pos).seen(pos),
                Seen::Stored {
                    offset: 64,
                    len: pos,
                    error: false
                }
            );
        }
        // Position 4 reuses record 0: the old one does not answer for it.
        assert_eq!(m.record(4).seen(4), Seen::Pending);
        assert_eq!(
            m.record(4).seen(0),
            Seen::Stored {
                offset: 64,
                len: 0,
                error: false
            }
        );
        assert_eq!(m.try_pop(1, |_, b| b.len()).unwrap(), None);
        assert_eq!(m.try_push(&[0; 49]), Err(MailboxError::TooLarge(49)));
        assert_eq!(
            m.pop(1, Duration::from_millis(20), |_, b| b.len()),
            Err(MailboxError::Timeout)
        );
        m.set_dead();
        assert_eq!(m.push(b"x", None), Err(MailboxError::Dead));
    }

    #[test]
    fn many_producers_many_consumers_lose_nothing() {
        let mut r = region(64, 32);
        // SAFETY: as above; the threads are joined before `r` drops.
        let m = unsafe { Mailbox::init(r.as_mut_ptr() as *mut u8, 64, 32, 0) }.unwrap();
        const PER: u64 = 20_000;
        let sums: Vec<u64> = std::thread::scope(|s| {
            for p in 0..3u64 {
                s.spawn(move || {
                    for i in 0..PER {
                        m.push(&(p * PER + i).to_le_bytes(), None).unwrap();
                    }
                });
            }
            let consumers: Vec<_> = (0..2)
                .map(|c| {
                    s.spawn(move || {
                        let mut sum = 0u64;
                        loop {
                            match m.pop(c, Duration::from_millis(500), |_, b| {
                                u64::from_le_bytes(b.try_into().unwrap())
                            }) {
                                Ok(v) => sum += v + 1,
                                Err(MailboxError::Timeout) => return sum,
                                Err(e) => panic!("{e}"),
                            }
                        }
                    })
                })
                .collect();
            consumers.into_iter().map(|c| c.join().unwrap()).collect()
        });
        let n = 3 * PER;
        assert_eq!(sums.iter().sum::<u64>(), n * (n + 1) / 2);
    }

    #[test]
    fn a_dead_consumers_held_slots_are_reclaimed_in_order() {
        let mut r = region(4, 32);
        // SAFETY: as above.
        let m = unsafe { Mailbox::init(r.as_mut_ptr() as *mut u8, 4, 32, 0) }.unwrap();
        let mut pos = 0;
        // Several laps, so that positions and slot indices differ.
        for lap in 0..3u64 {
            for i in 0..4u8 {
                assert_eq!(m.try_push(&[i]).unwrap(), Some(pos + i as u64));
            }
            assert_eq!(m.try_push(b"x").unwrap(), None, "full");
            // Consumer 8 takes one normally; consumer 7 takes the next two and dies holding
            // them (claimed, never freed).
            assert_eq!(m.try_pop(8, |p, b| (p, b[0])).unwrap(), Some((pos, 0)));
            for _ in 0..2 {
                m.claim_for_consumer(7).unwrap();
            }
            assert_eq!(m.try_push(b"y").unwrap(), Some(pos + 4), "its slot is free");
            assert_eq!(m.try_push(b"z").unwrap(), None, "the dead one's are not");
            let mut got = Vec::new();
            m.reclaim(8, |p, b| got.push((p, b.to_vec())));
            assert!(got.is_empty(), "consumer 8 holds nothing");
            m.reclaim(7, |p, b| got.push((p, b.to_vec())));
            assert_eq!(
                got,
                vec![(pos + 1, vec![1]), (pos + 2, vec![2])],
                "lap {lap}"
            );
            assert_eq!(m.try_push(b"z").unwrap(), Some(pos + 5));
            assert_eq!(m.try_push(b"w").unwrap(), Some(pos + 6));
            // Drain: the reclaimed messages are not popped again.
            let mut rest = Vec::new();
            while let Some(p) = m.try_pop(8, |p, _| p).unwrap() {
                rest.push(p);
            }
            assert_eq!(rest, vec![pos + 3, pos + 4, pos + 5, pos + 6]);
            pos += 7;
        }
        // A consumer that dies between its claim and moving `head`: others help.
        m.try_push(b"a").unwrap();
        m.try_push(b"b").unwrap();
        let p = m.header().head.0.load(Ordering::Relaxed);
        m.seq(p).store(claimed(p, 9), Ordering::SeqCst);
        assert!(!m.is_empty(), "a stuck head is not empty");
        assert_eq!(m.try_pop(8, |p, b| (p, b[0])).unwrap(), Some((p + 1, b'b')));
        let mut got = Vec::new();
        m.reclaim(9, |p, b| got.push((p, b[0])));
        assert_eq!(got, vec![(p, b'a')]);
        assert!(m.is_empty());
    }

    #[test]
    fn current_record_round_trips() {
        let mut r = region(2, 32);
        // SAFETY: as above.
        let m = unsafe { Mailbox::init(r.as_mut_ptr() as *mut u8, 2, 32, 0) }.unwrap();
        assert_eq!(m.current(), None);
        m.set_current(9, &[7; 40]);
        let (pos, c) = m.current().unwrap();
        assert_eq!(pos, 9);
        assert_eq!(c, vec![7; 40]);
        // A whole slot's message, of any length, comes back as it was.
        let long: Vec<u8> = (0..CURRENT_LEN as u32 + 9).map(|i| i as u8).collect();
        for n in [0, 1, 7, 8, 9, 63, 64, 65, 239, CURRENT_LEN] {
            m.set_current(n as u64, &long[..n]);
            assert_eq!(m.current(), Some((n as u64, long[..n].to_vec())));
        }
        m.clear_current();
        assert_eq!(m.current(), None);
        // SAFETY: as above.
        let again = unsafe { Mailbox::attach(r.as_mut_ptr() as *mut u8, r.len() * 64) }.unwrap();
        assert_eq!(again.max_msg_len(), 16);
    }

    #[test]
    fn attach_validates_the_region_header() {
        let mut r = region(4, 64);
        let len = r.len() * 64;
        let base = r.as_mut_ptr() as *mut u8;
        // SAFETY: the Vec is big enough, 64-aligned, and outlives `m` and every attach below.
        let m = unsafe { Mailbox::init(base, 4, 64, 0) }.unwrap();
        // SAFETY: as above, for every length passed.
        let attach = |len| unsafe { Mailbox::attach(base, len) };
        let again = attach(len).unwrap();
        assert_eq!((again.capacity, again.slot_size), (4, 64));
        assert!(matches!(attach(len - 64), Err(MailboxError::Corrupt(_))));
        assert!(matches!(attach(100), Err(MailboxError::Corrupt(_))));
        // SAFETY: never dereferenced: the alignment is checked first.
        let misaligned = unsafe { Mailbox::attach(base.wrapping_add(16), len - 64) };
        assert!(matches!(misaligned, Err(MailboxError::Corrupt(_))));
        // SAFETY: null is refused before any access.
        let null = unsafe { Mailbox::attach(std::ptr::null_mut(), len) };
        assert_eq!(
            null.unwrap_err(),
            MailboxError::BadParams(RegionError::Null)
        );
        let (magic, [version, capacity, slot_size]) = m.header().region.words();
        let good = magic.swap(0x5452_4e31, Ordering::Relaxed); // a ring's magic
        assert!(matches!(attach(len), Err(MailboxError::Corrupt(_))));
        magic.store(good, Ordering::Relaxed);
        for (word, bad) in [
            (version, 1),
            (capacity, 1),
            (capacity, 3),
            (capacity, 1 << 21),
            (capacity, 64),
            (slot_size, 40),
            (slot_size, 1 << 17),
        ] {
            let good = word.swap(bad, Ordering::Relaxed);
            assert!(
                matches!(attach(len), Err(MailboxError::Corrupt(_))),
                "{bad}"
            );
            word.store(good, Ordering::Relaxed);
        }
        assert!(attach(len).is_ok());
        // A mailbox is not a ring, and a ring is not a mailbox: their magics differ.
        // SAFETY: the region is valid for `len` bytes.
        let ring = unsafe { trove_store::ring::RingRef::attach(base, len) };
        assert!(matches!(
            ring,
            Err(trove_store::ring::RingError::Corrupt(_))
        ));
    }

    #[test]
    fn init_rejects_bad_geometry_and_regions() {
        let mut r = region(4, 64);
        let base = r.as_mut_ptr() as *mut u8;
        for (capacity, slot_size) in [
            (0, 64),
            (3, 64),
            (1 << 21, 64),
            (4, 16),
            (4, 40),
            (4, 1 << 17),
        ] {
            // SAFETY: validation fails before the region is touched.
            let m = unsafe { Mailbox::init(base, capacity, slot_size, 0) };
            assert!(
                matches!(m, Err(MailboxError::BadParams(_))),
                "{capacity} {slot_size}"
            );
        }
        // SAFETY: never dereferenced: the alignment is checked first.
        let m = unsafe { Mailbox::init(base.wrapping_add(16), 4, 64, 0) };
        assert!(matches!(
            m,
            Err(MailboxError::BadParams(RegionError::Misaligned { .. }))
        ));
    }

    /// Waits (bounded) until a consumer has announced a wait on the mailbox's futex.
    fn wait_for_sleeper(m: &Mailbox) {
        let start = Instant::now();
        while m.header().park.0.waiters() == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "consumer never parked"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_parked_consumer_is_woken_by_a_push_and_by_death() {
        let mut r = region(4, 64);
        // SAFETY: as above; the threads are joined before `r` drops.
        let m = unsafe { Mailbox::init(r.as_mut_ptr() as *mut u8, 4, 64, 0) }.unwrap();
        std::thread::scope(|s| {
            let consumer = s.spawn(|| {
                let got = m.pop(1, Duration::from_secs(30), |p, b| (p, b.to_vec()));
                (got, Instant::now())
            });
            wait_for_sleeper(&m);
            let pushed = Instant::now();
            assert_eq!(m.try_push(b"hi").unwrap(), Some(0));
            let (got, woken) = consumer.join().unwrap();
            assert_eq!(got, Ok((0, b"hi".to_vec())));
            assert!(woken.duration_since(pushed) < Duration::from_secs(5));
        });
        std::thread::scope(|s| {
            let consumers: Vec<_> = (0..2)
                .map(|c| s.spawn(move || m.pop(c, Duration::from_secs(30), |_, _| ())))
                .collect();
            let start = Instant::now();
            while m.header().park.0.waiters() < 2 {
                assert!(start.elapsed() < Duration::from_secs(10), "never parked");
                std::thread::sleep(Duration::from_millis(1));
            }
            let dead = Instant::now();
            m.set_dead();
            for c in consumers {
                assert_eq!(c.join().unwrap(), Err(MailboxError::Dead));
            }
            // Every parked consumer is woken, not only one (the others would sleep until
            // their deadline).
            assert!(
                dead.elapsed() < Duration::from_secs(5),
                "{:?}",
                dead.elapsed()
            );
        });
        assert_eq!(m.header().park.0.waiters(), 0);
    }
}

#[cfg(all(test, loom))]
mod loom_models;
