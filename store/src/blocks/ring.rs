//! Lock-free single-producer single-consumer ring of fixed-size messages in shared memory.
//!
//! A ring lives in a caller-provided region (typically inside the memfd arena) that several
//! processes map at different addresses, so the region holds no pointers, only indices.
//!
//! Layout (`HEADER_SIZE` = 320 bytes, then `capacity` slots of `slot_size` bytes):
//!
//! ```text
//! 0    head  (next slot to read; written by the consumer)   128 bytes
//! 128  tail  (next slot to write; written by the producer)  128 bytes
//! 256  region header (blocks::region): magic u64 "TRN1", version u32, capacity u32,
//!      slot_size u32, reserved u32                          24 bytes
//! 280  closed u32, notify u32
//! 288  consumer's Park (blocks::park): event u32, waiters u32
//! 296  producer's Park: event u32, waiters u32
//! 304  (unused up to 320)
//! 320  slot 0: [len: u32][payload: len bytes, len <= slot_size - 4][unused]
//! ```
//!
//! `head` and `tail` are free-running `u32` counters; slot `i` is `i & (capacity - 1)` and
//! `tail - head` (wrapping) is the number of queued messages.
//!
//! # Blocking and wake-ups
//!
//! A side that has to wait spins briefly (crossbeam [`Backoff`]), then parks on its own
//! [`Park`] (a shared futex; the protocol and why no wake-up is lost are in
//! [`crate::blocks::park`]): the consumer while the ring is empty, the producer while it is
//! full. The other side, after moving `tail` (a push) or `head` (a pop), calls `notify_one`
//! on the waiting side's `Park`, which issues a `FUTEX_WAKE` only when a wait was announced,
//! so the common path (peer busy or spinning) makes no syscall. `close` and `wake_consumer`
//! change their word first and notify the same way. Each side has at most one waiter (one
//! producer, one consumer).
//!
//! Message data is ordered by Release stores of `tail` (producer, after writing a slot) and
//! `head` (consumer, after reading one), each read with Acquire by the other side.
//!
//! # Robustness
//!
//! Another process may corrupt the ring. Everything read from shared memory is validated
//! before use: the header on [`RingRef::attach`], and on every operation the `head`/`tail`
//! distance and each message length (bad values give [`RingError::Corrupt`]). Slot indices
//! are masked with the locally cached capacity, so no access can leave the region.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crossbeam_utils::Backoff;
use rustix::io::Errno;

use crate::blocks::park::{Park, ParkError};
use crate::blocks::region::{Geometry, Kind, RegionError, RegionHeader};

/// Alignment of every slot, and the granularity of `slot_size`.
pub const MSG_ALIGN: usize = 8;
/// Bytes of the `u32` length prefix at the start of each slot.
pub const LEN_PREFIX: usize = 4;
/// Size of the ring header; the slots start at this offset.
pub const HEADER_SIZE: usize = size_of::<Header>();
/// Required alignment of a ring's region.
pub const RING_ALIGN: usize = 64;
/// Largest supported capacity (keeps `tail - head` unambiguous with `u32` counters).
pub const MAX_CAPACITY: u32 = 1 << 31;

/// What a ring region is (see [`crate::blocks::region`]).
const KIND: Kind = Kind {
    name: "ring",
    magic: 0x5452_4e31, // "TRN1"
    version: 1,
    align: RING_ALIGN,
    header_len: HEADER_SIZE,
    capacity: (1, MAX_CAPACITY as u64),
    slot_size: (8, u32::MAX as u64),
    slot_align: MSG_ALIGN as u64,
    bytes: |g| {
        (g.capacity as usize)
            .checked_mul(g.slot_size as usize)?
            .checked_add(HEADER_SIZE + RING_ALIGN - 1)
            .map(|n| n / RING_ALIGN * RING_ALIGN)
    },
};

/// Errors of ring operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("ring is full")]
    Full,
    #[error("timed out")]
    Timeout,
    #[error("ring is closed")]
    Closed,
    /// [`wake_consumer`] was called while the ring was empty.
    #[error("consumer notified")]
    Notified,
    #[error("message of {len} bytes exceeds the slot maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("buffer of {have} bytes is too small for a {need}-byte message")]
    BufferTooSmall { need: usize, have: usize },
    #[error("ring corrupt: {0}")]
    Corrupt(&'static str),
    #[error("bad ring parameters: {0}")]
    BadParams(RegionError),
    #[error("futex wait failed: {0}")]
    Futex(Errno),
}

/// An index on its own 128 bytes (two cache lines, against adjacent-line prefetch).
///
/// Not `crossbeam_utils::CachePadded`: that is 128-byte *aligned* on x86_64/aarch64, and a
/// ring region is only guaranteed 64-byte alignment, so a reference to it could be misaligned.
#[repr(C, align(64))]
struct Padded {
    value: AtomicU32,
    _pad: [AtomicU32; 31],
}

/// The ring header. `repr(C)`, only atomics: other processes write it concurrently.
#[repr(C, align(64))]
struct Header {
    head: Padded,
    tail: Padded,
    region: RegionHeader,
    closed: AtomicU32,
    /// Set by [`wake_consumer`]; consumed by the consumer as [`RingError::Notified`].
    notify: AtomicU32,
    /// The consumer parks here (empty ring).
    consumer_park: Park,
    /// The producer parks here (full ring).
    producer_park: Park,
}

const _: () = assert!(size_of::<Padded>() == 128);
#[cfg(not(loom))]
const _: () = assert!(size_of::<Header>() == 320 && align_of::<Header>() == RING_ALIGN);
#[cfg(not(loom))]
const _: () = assert!(std::mem::offset_of!(Header, region) == 256);
#[cfg(not(loom))]
const _: () = assert!(std::mem::offset_of!(Header, consumer_park) == 288);
#[cfg(not(loom))]
const _: () = assert!(std::mem::offset_of!(Header, producer_park) == 296);

/// Bytes a ring of `capacity` slots (a power of two) of `slot_size` bytes (a multiple of
/// [`MSG_ALIGN`], at least 8) needs, rounded up to 64.
pub const fn ring_bytes(capacity: u32, slot_size: u32) -> usize {
    (HEADER_SIZE + capacity as usize * slot_size as usize).next_multiple_of(RING_ALIGN)
}

fn check_params(capacity: u32, slot_size: u32) -> Result<usize, RingError> {
    KIND.check(geometry(capacity, slot_size))
        .map_err(RingError::BadParams)
}

fn geometry(capacity: u32, slot_size: u32) -> Geometry {
    Geometry {
        capacity: capacity.into(),
        slot_size: slot_size.into(),
    }
}

/// A view of a ring in this process's mapping. Cheap to copy; `Send + Sync`.
///
/// Capacity and slot size are cached here (validated once), so later corruption of the
/// header cannot redirect accesses outside the region.
#[derive(Debug, Clone, Copy)]
pub struct RingRef {
    ptr: NonNull<u8>,
    capacity: u32,
    slot_size: u32,
}

// SAFETY: a RingRef only points at shared memory that is accessed through atomics (header)
// or under the SPSC protocol (slots); the init/attach contract keeps it mapped while any
// RingRef lives, from whichever thread.
unsafe impl Send for RingRef {}
// SAFETY: as above; all methods taking `&self` only touch atomics.
unsafe impl Sync for RingRef {}

impl RingRef {
    /// Initialises a ring in `region` (writes the header) and returns a view of it.
    ///
    /// # Safety
    /// `region` is valid for reads and writes of `ring_bytes(capacity, slot_size)` bytes,
    /// 64-byte aligned, stays mapped while any `RingRef` to it lives, and nobody else uses it
    /// during `init`.
    pub unsafe fn init(
        region: *mut u8,
        capacity: u32,
        slot_size: u32,
    ) -> Result<RingRef, RingError> {
        let len = check_params(capacity, slot_size)?;
        let ring = Self::view(region, capacity, slot_size, len)?;
        let h = ring.header();
        for field in [&h.head.value, &h.tail.value, &h.closed, &h.notify] {
            field.store(0, Ordering::Relaxed);
        }
        h.consumer_park.reset();
        h.producer_park.reset();
        // Published last: an `attach` that sees the magic (Acquire) sees the fields above.
        h.region.publish(&KIND, geometry(capacity, slot_size));
        Ok(ring)
    }

    /// Attaches to a ring initialised (possibly by another process) in `region`.
    ///
    /// The header is validated against `region_len`: a corrupt header gives an error.
    ///
    /// # Safety
    /// `region` is valid for reads and writes of `region_len` bytes and stays mapped while
    /// any `RingRef` to it lives.
    pub unsafe fn attach(region: *mut u8, region_len: usize) -> Result<RingRef, RingError> {
        let probe = Self::view(region, 1, 8, region_len)?;
        let g = probe
            .header()
            .region
            .read(&KIND, region_len)
            .map_err(|e| RingError::Corrupt(e.reason()))?;
        // In range: `read` checked the geometry against KIND, whose bounds fit a u32.
        Self::view(region, g.capacity as u32, g.slot_size as u32, region_len)
    }

    /// A view of `region` (checked: not null, aligned, at least a header of `len` bytes).
    fn view(
        region: *mut u8,
        capacity: u32,
        slot_size: u32,
        len: usize,
    ) -> Result<RingRef, RingError> {
        let ptr = KIND
            .check_region(region, len)
            .map_err(RingError::BadParams)?;
        Ok(RingRef {
            ptr,
            capacity,
            slot_size,
        })
    }

    fn header(&self) -> &Header {
        // SAFETY: the region is 64-aligned (checked) and at least HEADER_SIZE bytes (init/attach
        // contract and check); Header is only atomics, valid for any bit pattern, and shared
        // mutation through `&Header` goes through those atomics.
        unsafe { self.ptr.cast::<Header>().as_ref() }
    }

    /// Pointer to the slot of counter value `index` (masked, so always inside the region).
    fn slot(&self, index: u32) -> *mut u8 {
        let offset = HEADER_SIZE + (index & (self.capacity - 1)) as usize * self.slot_size as usize;
        // SAFETY: offset + slot_size <= ring_bytes(capacity, slot_size), validated to lie
        // inside the region.
        unsafe { self.ptr.as_ptr().add(offset) }
    }

    /// Length prefix of the slot at `slot` (8-aligned, inside the region).
    fn len_word<'a>(slot: *mut u8) -> &'a AtomicU32 {
        // SAFETY: `slot` is 8-aligned (region 64-aligned, HEADER_SIZE and slot_size multiples
        // of 8) and valid while the RingRef lives; the prefix is only ever accessed atomically.
        unsafe { AtomicU32::from_ptr(slot.cast()) }
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn slot_size(&self) -> u32 {
        self.slot_size
    }

    /// Largest message a slot holds: `slot_size - 4`.
    pub fn max_msg_len(&self) -> usize {
        self.slot_size as usize - LEN_PREFIX
    }

    pub fn is_closed(&self) -> bool {
        self.header().closed.load(Ordering::Acquire) != 0
    }

    /// The producer end. The caller guarantees at most one `Producer` per ring exists at a
    /// time, across all processes (a second one would corrupt the ring).
    pub fn producer(&self) -> Producer {
        let h = self.header();
        Producer {
            ring: *self,
            tail: h.tail.value.load(Ordering::Acquire),
            head_cache: h.head.value.load(Ordering::Acquire),
        }
    }

    /// The consumer end. The caller guarantees at most one `Consumer` per ring exists at a
    /// time, across all processes.
    pub fn consumer(&self) -> Consumer {
        let h = self.header();
        Consumer {
            ring: *self,
            head: h.head.value.load(Ordering::Acquire),
            tail_cache: h.tail.value.load(Ordering::Acquire),
        }
    }

    /// Marks the ring closed and wakes both ends. Pushes then fail with `Closed`; the
    /// consumer drains what was pushed before, then gets `Closed`. Any party may call this.
    pub fn close(&self) {
        let h = self.header();
        h.closed.store(1, Ordering::Release);
        h.consumer_park.notify_one();
        h.producer_park.notify_one();
    }

    /// Makes the consumer's current or next wait on an empty ring return
    /// [`RingError::Notified`] (once), waking it if parked. For third parties, e.g. to report
    /// the death of a peer.
    pub fn wake_consumer(&self) {
        let h = self.header();
        h.notify.store(1, Ordering::Release);
        h.consumer_park.notify_one();
    }
}

/// Standalone form of [`RingRef::wake_consumer`].
pub fn wake_consumer(ring: &RingRef) {
    ring.wake_consumer();
}

/// Parks on `park` while `blocked` (see [`Park::wait`]).
fn park(
    park: &Park,
    deadline: Option<Instant>,
    blocked: impl FnOnce() -> bool,
) -> Result<(), RingError> {
    park.wait(deadline, blocked).map_err(|e| match e {
        ParkError::Timeout => RingError::Timeout,
        ParkError::Futex(e) => RingError::Futex(e),
    })
}

fn deadline_after(timeout: Option<Duration>) -> Option<Instant> {
    timeout.and_then(|t| Instant::now().checked_add(t))
}

/// The producer end of a ring (see [`RingRef::producer`]).
#[derive(Debug)]
pub struct Producer {
    ring: RingRef,
    /// Our `tail` (we are its only writer).
    tail: u32,
    /// Last `head` seen; refreshed only when the ring looks full.
    head_cache: u32,
}

impl Producer {
    /// Copies `msg` (at most `slot_size - 4` bytes) into the next slot; never blocks.
    pub fn try_push(&mut self, msg: &[u8]) -> Result<(), RingError> {
        let max = self.ring.max_msg_len();
        if msg.len() > max {
            return Err(RingError::TooLarge {
                len: msg.len(),
                max,
            });
        }
        let h = self.ring.header();
        if h.closed.load(Ordering::Relaxed) != 0 {
            return Err(RingError::Closed);
        }
        if self.tail.wrapping_sub(self.head_cache) >= self.ring.capacity {
            // Acquire: the consumer's reads of the slot we are about to reuse are done.
            self.head_cache = h.head.value.load(Ordering::Acquire);
            let used = self.tail.wrapping_sub(self.head_cache);
            if used > self.ring.capacity {
                return Err(RingError::Corrupt("head is ahead of tail"));
            }
            if used == self.ring.capacity {
                return Err(RingError::Full);
            }
        }
        let slot = self.ring.slot(self.tail);
        RingRef::len_word(slot).store(msg.len() as u32, Ordering::Relaxed);
        // SAFETY: the payload area `slot + 4 .. slot + 4 + msg.len()` lies inside the slot
        // (msg.len() <= slot_size - 4) and, the slot being free, the consumer does not read it
        // until we publish `tail` below; `msg` is local memory, so they do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), slot.add(LEN_PREFIX), msg.len()) };
        self.tail = self.tail.wrapping_add(1);
        // Release: the slot contents are visible to a consumer that Acquire-loads this tail.
        h.tail.value.store(self.tail, Ordering::Release);
        h.consumer_park.notify_one();
        Ok(())
    }

    /// Pushes `msg`, waiting while the ring is full: spins briefly, then parks on the futex,
    /// for at most `timeout` (`None`: forever). `Err(Timeout)` or `Err(Closed)`.
    pub fn push(&mut self, msg: &[u8], timeout: Option<Duration>) -> Result<(), RingError> {
        let deadline = deadline_after(timeout);
        let backoff = Backoff::new();
        loop {
            match self.try_push(msg) {
                Err(RingError::Full) => {}
                result => return result,
            }
            if !backoff.is_completed() {
                backoff.snooze();
                continue;
            }
            let h = self.ring.header();
            let full_head = self.tail.wrapping_sub(self.ring.capacity);
            park(&h.producer_park, deadline, || {
                h.head.value.load(Ordering::Acquire) == full_head
                    && h.closed.load(Ordering::Relaxed) == 0
            })?;
        }
    }

    /// Marks the ring closed and wakes the consumer, which sees `Closed` once it has drained
    /// the ring.
    pub fn close(&self) {
        self.ring.close();
    }

    pub fn ring(&self) -> &RingRef {
        &self.ring
    }
}

/// The consumer end of a ring (see [`RingRef::consumer`]).
#[derive(Debug)]
pub struct Consumer {
    ring: RingRef,
    /// Our `head` (we are its only writer).
    head: u32,
    /// Last `tail` seen; refreshed only when the ring looks empty.
    tail_cache: u32,
}

impl Consumer {
    /// Pops one message into `buf` and returns its length; `Ok(None)` if the ring is empty,
    /// `Err(Closed)` if it is empty and closed. If `buf` is too small the message stays queued
    /// (`Err(BufferTooSmall)`).
    pub fn try_pop(&mut self, buf: &mut [u8]) -> Result<Option<usize>, RingError> {
        let Some((payload, len)) = self.front()? else {
            return Ok(None);
        };
        if len > buf.len() {
            return Err(RingError::BufferTooSmall {
                need: len,
                have: buf.len(),
            });
        }
        // SAFETY: `payload .. payload + len` is inside the front slot, which the producer does
        // not touch until we advance `head`; `buf` is local memory, at least `len` bytes.
        unsafe { std::ptr::copy_nonoverlapping(payload, buf.as_mut_ptr(), len) };
        self.advance();
        Ok(Some(len))
    }

    /// Zero-copy pop: calls `f` on the front message in place, then releases its slot.
    /// `Ok(None)` if empty, `Err(Closed)` if empty and closed.
    pub fn try_pop_with<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> Result<Option<R>, RingError> {
        let Some((payload, len)) = self.front()? else {
            return Ok(None);
        };
        // SAFETY: `payload .. payload + len` is inside the front slot, which the producer does
        // not write until we advance `head` (after `f` returns and the borrow ends).
        let result = f(unsafe { std::slice::from_raw_parts(payload, len) });
        self.advance();
        Ok(Some(result))
    }

    /// Pops one message into `buf`, waiting for one for at most `timeout` (`None`: forever).
    /// `Err(Timeout)`, `Err(Closed)` (closed and drained), or `Err(Notified)`
    /// ([`wake_consumer`] was called while the ring was empty).
    pub fn pop(&mut self, buf: &mut [u8], timeout: Option<Duration>) -> Result<usize, RingError> {
        self.wait_ready(timeout)?;
        self.try_pop(buf)?
            .ok_or(RingError::Corrupt("queued message vanished"))
    }

    /// Waiting form of [`Consumer::try_pop_with`]; errors as for [`Consumer::pop`].
    pub fn pop_with<R>(
        &mut self,
        timeout: Option<Duration>,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, RingError> {
        self.wait_ready(timeout)?;
        self.try_pop_with(f)?
            .ok_or(RingError::Corrupt("queued message vanished"))
    }

    pub fn ring(&self) -> &RingRef {
        &self.ring
    }

    /// Waits until a message is queued (only we can dequeue it, so it stays).
    fn wait_ready(&mut self, timeout: Option<Duration>) -> Result<(), RingError> {
        let deadline = deadline_after(timeout);
        let ring = self.ring;
        let h = ring.header();
        let backoff = Backoff::new();
        loop {
            if self.front()?.is_some() {
                return Ok(());
            }
            if h.notify.load(Ordering::Relaxed) != 0 && h.notify.swap(0, Ordering::Acquire) != 0 {
                return Err(RingError::Notified);
            }
            // Bounded spin: ~127 spin hints then a few yields, microseconds in all.
            if !backoff.is_completed() {
                backoff.snooze();
                continue;
            }
            let head = self.head;
            park(&h.consumer_park, deadline, || {
                h.tail.value.load(Ordering::Acquire) == head
                    && h.closed.load(Ordering::Relaxed) == 0
                    && h.notify.load(Ordering::Relaxed) == 0
            })?;
        }
    }

    /// The front message as (payload pointer, validated length), if any.
    fn front(&mut self) -> Result<Option<(*const u8, usize)>, RingError> {
        let h = self.ring.header();
        if self.head == self.tail_cache {
            // Acquire: the slot contents written before this tail are visible.
            self.tail_cache = h.tail.value.load(Ordering::Acquire);
            if self.head == self.tail_cache {
                if h.closed.load(Ordering::Acquire) == 0 {
                    return Ok(None);
                }
                // `closed` was stored (Release) after the last push: reload to see that push.
                self.tail_cache = h.tail.value.load(Ordering::Acquire);
                if self.head == self.tail_cache {
                    return Err(RingError::Closed);
                }
            }
        }
        if self.tail_cache.wrapping_sub(self.head) > self.ring.capacity {
            return Err(RingError::Corrupt(
                "tail is more than capacity ahead of head",
            ));
        }
        let slot = self.ring.slot(self.head);
        let len = RingRef::len_word(slot).load(Ordering::Relaxed) as usize;
        if len > self.ring.max_msg_len() {
            return Err(RingError::Corrupt("message length exceeds slot size"));
        }
        // SAFETY: LEN_PREFIX < slot_size, so the payload start is inside the slot.
        Ok(Some((unsafe { slot.add(LEN_PREFIX) }, len)))
    }

    /// Releases the front slot to the producer.
    fn advance(&mut self) {
        let h = self.ring.header();
        self.head = self.head.wrapping_add(1);
        // Release: our reads of the slot happen before the producer's reuse of it.
        h.head.value.store(self.head, Ordering::Release);
        h.producer_park.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{Layout, alloc_zeroed, dealloc};
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd, RawFd};
    use std::process::{Child, Command, Stdio};
    use std::thread;

    const LONG: Option<Duration> = Some(Duration::from_secs(30));

    /// A zeroed, 64-aligned heap region standing in for the shared arena.
    struct Region {
        ptr: NonNull<u8>,
        layout: Layout,
    }

    impl Region {
        fn new(len: usize) -> Region {
            let layout = Layout::from_size_align(len, RING_ALIGN).unwrap();
            // SAFETY: len > 0 in all tests.
            let ptr = NonNull::new(unsafe { alloc_zeroed(layout) }).expect("alloc");
            Region { ptr, layout }
        }

        fn ptr(&self) -> *mut u8 {
            self.ptr.as_ptr()
        }
    }

    impl Drop for Region {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout.
            unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
        }
    }

    fn new_ring(capacity: u32, slot_size: u32) -> (Region, RingRef) {
        let region = Region::new(ring_bytes(capacity, slot_size));
        // SAFETY: fresh region of the right size, 64-aligned, outlives the RingRef in tests.
        let ring = unsafe { RingRef::init(region.ptr(), capacity, slot_size) }.unwrap();
        (region, ring)
    }

    /// Message `seq`: its sequence number then a length and content derived from it.
    fn message(seq: u64, max: usize) -> Vec<u8> {
        let extra = (seq % (max as u64 - 7)) as usize;
        let mut m = seq.to_le_bytes().to_vec();
        m.extend((0..extra).map(|j| (seq as u8).wrapping_mul(31).wrapping_add(j as u8)));
        m
    }

    fn wait_for(park: &Park) {
        let start = Instant::now();
        while park.waiters() == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "peer never parked"
            );
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn layout_and_sizes() {
        assert_eq!(HEADER_SIZE, 320);
        assert_eq!(ring_bytes(4, 16), 384);
        assert_eq!(ring_bytes(1, 8), 384);
        assert_eq!(ring_bytes(2, 40), 448);
    }

    #[test]
    fn push_pop_wraparound() {
        let (_region, ring) = new_ring(4, 16);
        let (mut p, mut c) = (ring.producer(), ring.consumer());
        let mut buf = [0u8; 12];
        for i in 0..100u32 {
            let msg = &i.to_le_bytes().repeat(3)[..(i % 13) as usize];
            p.try_push(msg).unwrap();
            if i % 3 == 0 {
                assert_eq!(
                    c.try_pop_with(|m| m.to_vec()).unwrap().as_deref(),
                    Some(msg)
                );
            } else {
                let n = c.try_pop(&mut buf).unwrap().unwrap();
                assert_eq!(&buf[..n], msg);
            }
        }
        assert_eq!(c.try_pop(&mut buf), Ok(None));
        // The counters wrap u32 correctly too.
        let region = Region::new(ring_bytes(4, 16));
        // SAFETY: fresh region of the right size.
        let ring = unsafe { RingRef::init(region.ptr(), 4, 16) }.unwrap();
        ring.header()
            .head
            .value
            .store(u32::MAX - 1, Ordering::Relaxed);
        ring.header()
            .tail
            .value
            .store(u32::MAX - 1, Ordering::Relaxed);
        let (mut p, mut c) = (ring.producer(), ring.consumer());
        for i in 0..10u8 {
            p.try_push(&[i; 3]).unwrap();
            p.try_push(&[i; 5]).unwrap();
            assert_eq!(c.try_pop(&mut buf), Ok(Some(3)));
            assert_eq!(c.try_pop(&mut buf), Ok(Some(5)));
            assert_eq!(buf[..5], [i; 5]);
        }
    }

    #[test]
    fn full_and_empty() {
        let (_region, ring) = new_ring(4, 8);
        let (mut p, mut c) = (ring.producer(), ring.consumer());
        let mut buf = [0u8; 4];
        assert_eq!(c.try_pop(&mut buf), Ok(None));
        for i in 0..4u8 {
            p.try_push(&[i]).unwrap();
        }
        assert_eq!(p.try_push(&[9]), Err(RingError::Full));
        let t = Instant::now();
        assert_eq!(
            p.push(&[9], Some(Duration::from_millis(20))),
            Err(RingError::Timeout)
        );
        assert!(t.elapsed() >= Duration::from_millis(20));
        assert_eq!(c.try_pop(&mut buf), Ok(Some(1)));
        assert_eq!(buf[0], 0);
        p.try_push(&[4]).unwrap();
        assert_eq!(p.try_push(&[5]), Err(RingError::Full));
        for i in 1..5u8 {
            assert_eq!(c.try_pop(&mut buf), Ok(Some(1)));
            assert_eq!(buf[0], i);
        }
        assert_eq!(c.try_pop(&mut buf), Ok(None));
    }

    #[test]
    fn length_validation() {
        let (region, ring) = new_ring(4, 16);
        let (mut p, mut c) = (ring.producer(), ring.consumer());
        assert_eq!(ring.max_msg_len(), 12);
        assert_eq!(
            p.try_push(&[1; 13]),
            Err(RingError::TooLarge { len: 13, max: 12 })
        );
        p.try_push(&[7; 12]).unwrap();
        p.try_push(&[]).unwrap();
        let mut small = [0u8; 4];
        assert_eq!(
            c.try_pop(&mut small),
            Err(RingError::BufferTooSmall { need: 12, have: 4 })
        );
        let mut buf = [0u8; 12];
        assert_eq!(
            c.try_pop(&mut buf),
            Ok(Some(12)),
            "message kept after BufferTooSmall"
        );
        assert_eq!(buf, [7; 12]);
        assert_eq!(c.try_pop(&mut buf), Ok(Some(0)));
        // Corrupt the length prefix of the next slot (slot 2) after pushing into it.
        p.try_push(&[1, 2, 3]).unwrap();
        let prefix = region
            .ptr()
            .wrapping_add(HEADER_SIZE + 2 * 16)
            .cast::<u32>();
        // SAFETY: in bounds, aligned, no other thread uses the ring.
        unsafe { prefix.write(13) };
        assert!(matches!(c.try_pop(&mut buf), Err(RingError::Corrupt(_))));
        assert!(matches!(
            c.try_pop_with(|m| m.len()),
            Err(RingError::Corrupt(_))
        ));
        assert!(matches!(c.pop(&mut buf, LONG), Err(RingError::Corrupt(_))));
        // SAFETY: as above.
        unsafe { prefix.write(u32::MAX) };
        assert!(matches!(c.try_pop(&mut buf), Err(RingError::Corrupt(_))));
        // SAFETY: as above.
        unsafe { prefix.write(3) };
        assert_eq!(c.try_pop(&mut buf), Ok(Some(3)));
    }

    #[test]
    fn corrupt_indices() {
        let (_region, ring) = new_ring(4, 8);
        let (mut p, mut c) = (ring.producer(), ring.consumer());
        ring.header().tail.value.store(5, Ordering::Relaxed);
        let mut buf = [0u8; 4];
        assert!(matches!(c.try_pop(&mut buf), Err(RingError::Corrupt(_))));
        ring.header().tail.value.store(0, Ordering::Relaxed);
        for _ in 0..4 {
            p.try_push(&[1]).unwrap();
        }
        ring.header().head.value.store(5, Ordering::Relaxed); // ahead of tail
        assert!(matches!(p.try_push(&[1]), Err(RingError::Corrupt(_))));
    }

    #[test]
    fn init_rejects_bad_params() {
        let region = Region::new(4096);
        for (capacity, slot_size) in [(0, 8), (3, 8), (4, 0), (4, 4), (4, 12), (1 << 31 | 1, 8)] {
            // SAFETY: validation fails before the region is touched.
            let r = unsafe { RingRef::init(region.ptr(), capacity, slot_size) };
            assert!(
                matches!(r, Err(RingError::BadParams(_))),
                "{capacity} {slot_size}"
            );
        }
        // SAFETY: never dereferenced: alignment is checked first.
        let r = unsafe { RingRef::init(region.ptr().wrapping_add(8), 4, 8) };
        assert!(matches!(r, Err(RingError::BadParams(_))));
    }

    #[test]
    fn attach_validates_header() {
        let len = ring_bytes(8, 16);
        let (region, ring) = new_ring(8, 16);
        // SAFETY: region valid for `len` bytes.
        let attached = unsafe { RingRef::attach(region.ptr(), len) }.unwrap();
        assert_eq!((attached.capacity(), attached.slot_size()), (8, 16));
        let attach = |l| {
            // SAFETY: the region is valid for at least every length passed below.
            unsafe { RingRef::attach(region.ptr(), l) }
        };
        assert!(matches!(attach(len - 64), Err(RingError::Corrupt(_))));
        assert!(matches!(attach(100), Err(RingError::BadParams(_))));
        let (magic, [version, capacity, slot_size]) = ring.header().region.words();
        let good = magic.swap(0xdead_beef, Ordering::Relaxed);
        assert!(matches!(attach(len), Err(RingError::Corrupt(_))), "magic");
        magic.store(good, Ordering::Relaxed);
        // The region header's words are the sync shim's atomics (std's here, loom's under loom).
        let corruptions = [
            (version, 2),
            (capacity, 3),
            (capacity, 1 << 20),
            (capacity, 0),
            (slot_size, 12),
            (slot_size, u32::MAX - 7),
        ];
        for (field, bad) in corruptions {
            let good = field.swap(bad, Ordering::Relaxed);
            assert!(matches!(attach(len), Err(RingError::Corrupt(_))), "{bad}");
            field.store(good, Ordering::Relaxed);
        }
        assert!(attach(len).is_ok());
    }

    #[test]
    fn two_threads_million_messages() {
        const N: u64 = 1_000_000;
        let (_region, ring) = new_ring(256, 64);
        let max = ring.max_msg_len();
        thread::scope(|s| {
            s.spawn(|| {
                let mut p = ring.producer();
                for seq in 0..N {
                    p.push(&message(seq, max), LONG).unwrap();
                }
                p.close();
            });
            let mut c = ring.consumer();
            for seq in 0..N {
                let ok = c.pop_with(LONG, |m| m == message(seq, max)).unwrap();
                assert!(ok, "message {seq} mismatched");
            }
            assert_eq!(c.pop(&mut [0; 64], LONG), Err(RingError::Closed));
        });
    }

    #[test]
    fn consumer_parks_and_is_woken_promptly() {
        let (_region, ring) = new_ring(8, 16);
        thread::scope(|s| {
            let consumer = s.spawn(|| {
                let mut buf = [0u8; 12];
                let n = ring.consumer().pop(&mut buf, LONG).unwrap();
                (buf[..n].to_vec(), Instant::now())
            });
            thread::sleep(Duration::from_millis(50));
            wait_for(&ring.header().consumer_park);
            let pushed = Instant::now();
            ring.producer().try_push(b"hello").unwrap();
            let (msg, received) = consumer.join().unwrap();
            assert_eq!(msg, b"hello");
            let latency = received.duration_since(pushed);
            assert!(
                latency < Duration::from_millis(500),
                "woken after {latency:?}"
            );
        });
    }

    #[test]
    fn producer_parks_and_is_woken_promptly() {
        let (_region, ring) = new_ring(2, 8);
        let mut p = ring.producer();
        p.try_push(&[1]).unwrap();
        p.try_push(&[2]).unwrap();
        thread::scope(|s| {
            let producer = s.spawn(move || {
                let r = p.push(&[3], LONG);
                (r, Instant::now())
            });
            thread::sleep(Duration::from_millis(50));
            wait_for(&ring.header().producer_park);
            let mut c = ring.consumer();
            let popped = Instant::now();
            assert_eq!(c.try_pop(&mut [0; 4]), Ok(Some(1)));
            let (r, pushed) = producer.join().unwrap();
            assert_eq!(r, Ok(()));
            assert!(pushed.duration_since(popped) < Duration::from_millis(500));
            let mut buf = [0u8; 4];
            assert_eq!(c.try_pop(&mut buf), Ok(Some(1)));
            assert_eq!(c.try_pop(&mut buf), Ok(Some(1)));
            assert_eq!(buf[0], 3);
        });
    }

    #[test]
    fn pop_timeout() {
        let (_region, ring) = new_ring(4, 8);
        let mut c = ring.consumer();
        let mut buf = [0u8; 4];
        for ms in [0, 1, 100] {
            let t = Instant::now();
            assert_eq!(
                c.pop(&mut buf, Some(Duration::from_millis(ms))),
                Err(RingError::Timeout)
            );
            let elapsed = t.elapsed();
            assert!(elapsed >= Duration::from_millis(ms), "{elapsed:?}");
            assert!(elapsed < Duration::from_millis(ms + 1000), "{elapsed:?}");
        }
        assert_eq!(ring.header().consumer_park.waiters(), 0);
    }

    #[test]
    fn close_semantics() {
        let (_region, ring) = new_ring(4, 8);
        let (mut p, mut c) = (ring.producer(), ring.consumer());
        for i in 0..3u8 {
            p.try_push(&[i]).unwrap();
        }
        p.close();
        assert!(ring.is_closed());
        assert_eq!(p.try_push(&[9]), Err(RingError::Closed));
        assert_eq!(p.push(&[9], LONG), Err(RingError::Closed));
        let mut buf = [0u8; 4];
        for i in 0..3u8 {
            assert_eq!(c.pop(&mut buf, LONG), Ok(1));
            assert_eq!(buf[0], i);
        }
        assert_eq!(c.try_pop(&mut buf), Err(RingError::Closed));
        assert_eq!(c.pop(&mut buf, LONG), Err(RingError::Closed));

        // Closing wakes a parked consumer...
        let (_region, ring) = new_ring(4, 8);
        thread::scope(|s| {
            let consumer = s.spawn(|| ring.consumer().pop(&mut [0; 4], LONG));
            wait_for(&ring.header().consumer_park);
            ring.producer().close();
            assert_eq!(consumer.join().unwrap(), Err(RingError::Closed));
        });
        // ...and a producer parked on a full ring (closed by a third party).
        let (_region, ring) = new_ring(1, 8);
        thread::scope(|s| {
            let producer = s.spawn(|| {
                let mut p = ring.producer();
                p.try_push(&[1]).unwrap();
                p.push(&[2], LONG)
            });
            wait_for(&ring.header().producer_park);
            ring.close();
            assert_eq!(producer.join().unwrap(), Err(RingError::Closed));
        });
    }

    #[test]
    fn wake_consumer_notifies() {
        let (_region, ring) = new_ring(4, 8);
        thread::scope(|s| {
            let consumer = s.spawn(|| {
                let r = ring.consumer().pop(&mut [0; 4], LONG);
                (r, Instant::now())
            });
            wait_for(&ring.header().consumer_park);
            let woken = Instant::now();
            wake_consumer(&ring);
            let (r, returned) = consumer.join().unwrap();
            assert_eq!(r, Err(RingError::Notified));
            assert!(returned.duration_since(woken) < Duration::from_millis(500));
        });
        // Consumed once; a queued message takes precedence over a pending notification.
        let mut c = ring.consumer();
        let mut buf = [0u8; 4];
        assert_eq!(
            c.pop(&mut buf, Some(Duration::ZERO)),
            Err(RingError::Timeout)
        );
        ring.wake_consumer();
        ring.producer().try_push(&[5]).unwrap();
        assert_eq!(c.pop(&mut buf, LONG), Ok(1));
        assert_eq!(c.pop(&mut buf, LONG), Err(RingError::Notified));
    }

    const CHILD_FD_ENV: &str = "TROVE_RING_TEST_CHILD_FD";
    const XPROC_MSGS: u64 = 100_000;

    /// Kills (if still running) and reaps the child however the test ends.
    struct Reap(Child);

    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Parent: creates a memfd ring and re-executes this test binary filtered to this test,
    /// which then runs as the producer in another process (see `cross_process_child`).
    #[test]
    fn cross_process_memfd() {
        if let Ok(fd) = std::env::var(CHILD_FD_ENV) {
            return cross_process_child(fd.parse().unwrap());
        }
        let (capacity, slot_size) = (64, 64);
        let len = ring_bytes(capacity, slot_size);
        // No MFD_CLOEXEC: the child inherits the fd.
        let fd =
            nix::sys::memfd::memfd_create("trove-ring-test", nix::sys::memfd::MFdFlags::empty())
                .unwrap();
        let file = File::from(fd);
        file.set_len(len as u64).unwrap();
        // SAFETY: a fresh memfd only we and our child use; the mapping outlives the ring use.
        let mut map = unsafe { memmap2::MmapOptions::new().len(len).map_mut(&file) }.unwrap();
        // SAFETY: the mapping is page-aligned, `len` bytes, and not yet shared.
        let ring = unsafe { RingRef::init(map.as_mut_ptr(), capacity, slot_size) }.unwrap();

        let name = concat!(module_path!(), "::cross_process_memfd");
        let name = name.split_once("::").unwrap().1; // without the crate name
        let child = Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_FD_ENV, file.as_raw_fd().to_string())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut child = Reap(child);

        let mut c = ring.consumer();
        let mut buf = vec![0u8; ring.max_msg_len()];
        for seq in 0..XPROC_MSGS {
            let n = c
                .pop(&mut buf, LONG)
                .unwrap_or_else(|e| panic!("message {seq}: {e}"));
            assert_eq!(buf[..n], message(seq, ring.max_msg_len()), "message {seq}");
        }
        assert_eq!(c.pop(&mut buf, LONG), Err(RingError::Closed));
        let status = child.0.wait().unwrap();
        assert!(status.success(), "child failed: {status}");
    }

    /// Child: attaches to the parent's ring through the inherited memfd and produces.
    fn cross_process_child(fd: RawFd) {
        // SAFETY: the parent passed us this open memfd, which nothing else in this process owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let len = file.metadata().unwrap().len() as usize;
        // SAFETY: the memfd stays alive (we hold `file`), and the mapping outlives `ring`.
        let mut map = unsafe { memmap2::MmapOptions::new().len(len).map_mut(&file) }.unwrap();
        // SAFETY: the mapping is valid for `len` bytes for the rest of this function.
        let ring = unsafe { RingRef::attach(map.as_mut_ptr(), len) }.unwrap();
        let mut p = ring.producer();
        for seq in 0..XPROC_MSGS {
            p.push(&message(seq, ring.max_msg_len()), LONG).unwrap();
        }
        p.close();
    }
}
