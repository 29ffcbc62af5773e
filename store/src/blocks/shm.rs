//! The shared arena: one memfd mapped by the daemon and by every client, and the object
//! directory that lives at its start.
//!
//! ```text
//! 0        4096                                             heap_offset (2 MiB aligned)
//! | Header | directory: dir_slots x Slot | rings: max_clients x RING_STRIDE | heap | total_len
//! ```
//!
//! The directory is an open-addressing hash table (linear probing) of [`Slot`]s keyed by
//! [`ObjectId`]. The daemon is its only writer, under its table lock, except for the pin bits,
//! which each client below [`PIN_CLIENTS`] sets and clears for its own client index. Clients
//! read it lock-free: a slot's `word` (generation, state, flags) works as a sequence lock
//! around its other fields, and pinning is a Dekker-style handshake with the daemon's removal
//! (see [`Directory::try_pin`] and [`Directory::try_remove`]). A client with a higher index
//! (an *overflow client*) has no bit: it pins through the daemon, which counts those pins per
//! object and keeps [`OVERFLOW_BIT`] set while there is one, under its table lock, so every
//! removal check sees them as it sees a bit. This is the module that holds the unsafe code for
//! mapping.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use memmap2::{Advice, MmapOptions, MmapRaw};
use nix::fcntl::{FallocateFlags, FcntlArg, SealFlag, fallocate, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};

use crate::blocks::id::{ID_LEN, ObjectId};
use crate::blocks::ring::RingRef;
use crate::blocks::sync::{AtomicU32, AtomicU64, Backoff, Ordering, fence};
use crate::error::{Result, StoreError};

const MAGIC: u64 = u64::from_le_bytes(*b"troveAR1");
/// Layout version; a client refuses an arena of another version.
pub const LAYOUT_VERSION: u32 = 4;
/// Client indices below this have their own bit in a slot's pin mask, which they set and
/// clear themselves (the lock-free pin). Clients with a higher index are *overflow clients*:
/// the daemon keeps their pins (per object, how many of them pin it) and keeps
/// [`OVERFLOW_BIT`] set while any of them does, so every removal check sees them.
pub const PIN_CLIENTS: u32 = 127;
/// The pin-mask bit the daemon sets while at least one overflow client pins the object.
pub const OVERFLOW_BIT: u32 = 127;
/// Most clients at once unless configured (`DaemonConfig::max_clients`): each has a
/// notification ring (address space only until used; see [`RING_STRIDE`]). Every trove
/// process is a client, and tasks that wait for tasks start extra workers: a depth-10
/// recursion of tasks on two workers has over a thousand processes at once.
pub const DEFAULT_MAX_CLIENTS: u32 = 4096;
/// The largest `max_clients` an arena may have (rings for 64 Ki clients are ~4 GiB of address
/// space in the memfd, sparse until used).
pub const MAX_MAX_CLIENTS: u32 = 1 << 16;
const HEADER_LEN: u64 = 4096;
const HEAP_ALIGN: u64 = 2 << 20;

/// Slot states (low 8 bits of the word).
pub mod state {
    pub const EMPTY: u8 = 0;
    pub const CREATING: u8 = 1;
    pub const SEALED: u8 = 2;
    pub const TOMBSTONE: u8 = 3;
    /// The daemon is deciding whether a sealed object can be removed (a few instructions).
    pub const BUSY: u8 = 4;
}
/// The object was deleted while pinned: not gettable any more, freed when the last pin goes.
pub const FLAG_DELETE_PENDING: u64 = 1 << 8;
/// The object is reference counted: freed (not kept for LRU) when no client pins it and no
/// other object contains a reference to it; the last client to unpin tells the daemon.
pub const FLAG_REFCOUNTED: u64 = 1 << 9;
/// An owned object that reports a failure (a call that failed) instead of holding a value.
pub const FLAG_ERROR: u64 = 1 << 10;

/// Notification rings: one per client index up to the arena's `max_clients`, between the
/// directory and the heap. A ring's pages cost memory only once touched (its header when the
/// index is given out, its slots as notices are pushed), and the pre-fault only populates the
/// heap.
pub const RING_CAPACITY: u32 = 2048;
/// Bytes per notification: length prefix, kind, id (see `protocol::Notice`).
pub const RING_SLOT: u32 = 32;
/// Bytes between two clients' rings.
pub const RING_STRIDE: u64 =
    (crate::blocks::ring::ring_bytes(RING_CAPACITY, RING_SLOT) as u64).next_multiple_of(4096);

fn word_state(w: u64) -> u8 {
    w as u8
}
fn word_gen(w: u64) -> u32 {
    (w >> 32) as u32
}
fn make_word(generation: u32, state: u8, flags: u64) -> u64 {
    ((generation as u64) << 32) | flags | state as u64
}

/// Where things are in the arena. Written into the header by the daemon, validated by clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub total_len: u64,
    pub dir_offset: u64,
    pub dir_slots: u64,
    pub heap_offset: u64,
    pub heap_len: u64,
    /// Most clients at once: one notification ring per client index below it.
    pub max_clients: u32,
    /// Client indices below this have their own pin bit; the others are overflow clients
    /// (at most [`PIN_CLIENTS`]; lower only to exercise overflow clients in tests).
    pub pin_clients: u32,
}

impl Layout {
    /// A layout with `heap_len` bytes of object space and room for `max_objects` live objects
    /// (the directory gets twice that many slots, a power of two, to keep probes short), and
    /// [`DEFAULT_MAX_CLIENTS`] clients.
    pub fn new(heap_len: u64, max_objects: u64) -> Result<Layout> {
        Layout::with_clients(heap_len, max_objects, DEFAULT_MAX_CLIENTS)
    }

    /// [`Layout::new`] with room for `max_clients` clients at once (1 to
    /// [`MAX_MAX_CLIENTS`]).
    pub fn with_clients(heap_len: u64, max_objects: u64, max_clients: u32) -> Result<Layout> {
        if !(1..=MAX_MAX_CLIENTS).contains(&max_clients) {
            return Err(StoreError::InvalidRequest(format!(
                "max_clients {max_clients} (1 to {MAX_MAX_CLIENTS})"
            )));
        }
        if heap_len < 4096 {
            return Err(StoreError::InvalidRequest(format!(
                "arena of {heap_len} bytes is too small (at least 4096)"
            )));
        }
        let dir_slots = max_objects
            .clamp(64, 1 << 24)
            .checked_mul(2)
            .and_then(u64::checked_next_power_of_two)
            .expect("bounded");
        let dir_offset = HEADER_LEN;
        let dir_end = dir_offset + dir_slots * SLOT_LEN as u64;
        let rings_end = rings_offset(dir_end) + RING_STRIDE * max_clients as u64;
        let heap_offset = rings_end.div_ceil(HEAP_ALIGN) * HEAP_ALIGN;
        let heap_len = heap_len.div_ceil(64) * 64;
        let total_len = heap_offset
            .checked_add(heap_len)
            .ok_or_else(|| StoreError::InvalidRequest("arena size overflows".into()))?;
        Ok(Layout {
            total_len,
            dir_offset,
            dir_slots,
            heap_offset,
            heap_len,
            max_clients,
            pin_clients: PIN_CLIENTS.min(max_clients),
        })
    }

    /// This layout with only client indices below `n` (at most [`PIN_CLIENTS`]) pinning with
    /// their own bit: the others are overflow clients. Lowered by tests (the daemon's
    /// `TROVE_STORE_PIN_CLIENTS`) to exercise overflow clients with few connections.
    pub fn with_pin_clients(mut self, n: u32) -> Layout {
        self.pin_clients = n.min(PIN_CLIENTS);
        self
    }

    /// Whether client `index` is an overflow client (its pins are kept by the daemon).
    pub fn is_overflow_client(&self, index: u32) -> bool {
        index >= self.pin_clients
    }

    /// Offset and length of client `index`'s notification ring.
    pub fn ring_region(&self, index: u32) -> Option<(u64, u64)> {
        (index < self.max_clients).then(|| {
            let start = rings_offset(self.dir_offset + self.dir_slots * SLOT_LEN as u64);
            (
                start + index as u64 * RING_STRIDE,
                crate::blocks::ring::ring_bytes(RING_CAPACITY, RING_SLOT) as u64,
            )
        })
    }

    /// The default directory size for a heap: one slot pair per 8 KiB, between 16 Ki and 1 Mi
    /// objects. Every lookup of an id is a random access into the directory, so a large one
    /// costs calls cache and TLB misses (with the 30% default store, a 2 Mi-slot directory, 1:1
    /// sync calls measured ~15% slower than with a 1 GiB store here).
    pub fn default_max_objects(heap_len: u64) -> u64 {
        (heap_len / 8192).clamp(16 << 10, 1 << 20)
    }

    fn validate(&self, file_len: u64) -> Result<()> {
        let bad = |what: &str| Err(StoreError::Protocol(format!("arena header: {what}")));
        if self.total_len != file_len {
            return bad("length does not match the memfd");
        }
        if self.dir_offset < HEADER_LEN || !self.dir_slots.is_power_of_two() {
            return bad("directory placement");
        }
        if !(1..=MAX_MAX_CLIENTS).contains(&self.max_clients) || self.pin_clients > PIN_CLIENTS {
            return bad("client counts");
        }
        let dir_end = self
            .dir_slots
            .checked_mul(SLOT_LEN as u64)
            .and_then(|n| n.checked_add(self.dir_offset));
        match dir_end {
            Some(end)
                if rings_offset(end) + RING_STRIDE * self.max_clients as u64
                    <= self.heap_offset => {}
            _ => return bad("directory or rings overlap the heap"),
        }
        match self.heap_offset.checked_add(self.heap_len) {
            Some(end) if end <= self.total_len && self.heap_offset.is_multiple_of(64) => Ok(()),
            _ => bad("heap out of bounds"),
        }
    }
}

fn rings_offset(dir_end: u64) -> u64 {
    dir_end.next_multiple_of(4096)
}

#[repr(C)]
struct Header {
    magic: AtomicU64,
    version: AtomicU32,
    max_clients: AtomicU32,
    total_len: AtomicU64,
    dir_offset: AtomicU64,
    dir_slots: AtomicU64,
    heap_offset: AtomicU64,
    heap_len: AtomicU64,
    /// The arena's [`Pages`] (its `as u32`): every mapping follows it.
    pages: AtomicU32,
    /// [`Layout::pin_clients`].
    pin_clients: AtomicU32,
}

/// What backs an arena's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pages {
    /// Base pages (4 KiB): a page fault per 4 KiB on first touch in each process.
    #[default]
    Base = 0,
    /// Pages of the huge page pool (`MFD_HUGETLB`): reserved by the administrator
    /// (`vm.nr_hugepages`), never swapped.
    HugeTlb = 1,
    /// Transparent huge pages for shared memory: each mapping asks for them
    /// (`MADV_HUGEPAGE`), which the kernel honours when
    /// `/sys/kernel/mm/transparent_hugepage/shmem_enabled` is `advise`, `within_size` or
    /// `always`.
    Transparent = 2,
}

/// Where the kernel's transparent huge page settings are.
const THP: &str = "/sys/kernel/mm/transparent_hugepage";

/// The size of a huge page.
pub const HUGE_PAGE: u64 = 2 << 20;

impl Pages {
    fn from_u32(v: u32) -> Option<Pages> {
        [Pages::Base, Pages::HugeTlb, Pages::Transparent]
            .into_iter()
            .find(|p| *p as u32 == v)
    }

    /// The huge pages this machine offers for an arena of `total_len` bytes: the huge page
    /// pool if it has that many 2 MiB pages free and not reserved by other mappings
    /// (`HugePages_Free - HugePages_Rsvd`: another store's untouched pages count as free),
    /// else transparent huge pages if shared memory may use them; else an error that says
    /// how to get either.
    pub fn huge_for(total_len: u64) -> Result<Pages> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |name: &str| -> u64 {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(name)?.trim().split(' ').next()?.parse().ok())
                .unwrap_or(0)
        };
        let free = field("HugePages_Free:").saturating_sub(field("HugePages_Rsvd:"));
        if field("Hugepagesize:") * 1024 == HUGE_PAGE && free * HUGE_PAGE >= total_len {
            return Ok(Pages::HugeTlb);
        }
        let (thp_ok, top) = Pages::transparent_allowed();
        if thp_ok {
            return Ok(Pages::Transparent);
        }
        Err(StoreError::NoHugePages(format!(
            "{free} free in the huge page pool ({} needed; reserve them with `sysctl \
             vm.nr_hugepages=N`), and shared memory may not use transparent huge pages \
             ({THP}/shmem_enabled is {top}; `advise` allows them)",
            total_len.div_ceil(HUGE_PAGE),
        )))
    }

    /// Whether shared memory may use transparent huge pages, and the top-level
    /// `shmem_enabled` mode (for messages).
    fn transparent_allowed() -> (bool, String) {
        // The mode in brackets, e.g. "always within_size advise [never] deny force"; a
        // per-size setting (newer kernels) of "inherit" defers to it.
        let mode = |path: &str| -> Option<String> {
            let s = std::fs::read_to_string(path).ok()?;
            let start = s.find('[')?;
            let end = s[start..].find(']')?;
            Some(s[start + 1..start + end].to_string())
        };
        let top = mode(&format!("{THP}/shmem_enabled"));
        let sized = mode(&format!("{THP}/hugepages-2048kB/shmem_enabled"));
        let usable = |m: &str| matches!(m, "always" | "within_size" | "advise" | "force");
        let ok = match sized.as_deref() {
            Some("inherit") | None => top.as_deref().is_some_and(usable),
            Some(m) => usable(m),
        };
        (ok, top.unwrap_or_else(|| "absent".into()))
    }
}

const SLOT_LEN: usize = 128;

/// One directory entry. Only atomics: it is read and written by several processes at once.
#[repr(C, align(128))]
pub struct Slot {
    /// generation (high 32 bits) | flags (bits 8..32) | state (low 8 bits).
    word: AtomicU64,
    /// Bit `c` is set while client index `c` (below [`PIN_CLIENTS`]) holds at least one pin
    /// on this object; bit [`OVERFLOW_BIT`] while at least one overflow client does (set and
    /// cleared by the daemon only).
    pins: [AtomicU64; 2],
    id: [AtomicU32; ID_LEN / 4],
    owner: AtomicU32,
    offset: AtomicU64,
    size: AtomicU64,
    /// CLOCK_MONOTONIC nanoseconds of the last pin (for LRU), written by clients.
    last_use: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Slot>() == SLOT_LEN);
const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_LEN as usize);

impl Slot {
    fn load_id(&self) -> ObjectId {
        let mut b = [0u8; ID_LEN];
        for (i, part) in self.id.iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&part.load(Ordering::Relaxed).to_le_bytes());
        }
        ObjectId(b)
    }
    fn store_id(&self, id: &ObjectId) {
        for (i, part) in self.id.iter().enumerate() {
            let v = u32::from_le_bytes(id.0[4 * i..4 * i + 4].try_into().expect("4 bytes"));
            part.store(v, Ordering::Relaxed);
        }
    }
    fn pinned(&self) -> bool {
        self.pins.iter().any(|p| p.load(Ordering::SeqCst) != 0)
    }
}

/// A consistent snapshot of a sealed object's directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedEntry {
    pub slot: u64,
    pub word: u64,
    pub offset: u64,
    pub size: u64,
}

/// What a lock-free lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Sealed(SealedEntry),
    /// Present but not sealed yet (or being deleted): wait for it.
    NotReady,
    Absent,
}

/// What [`Directory::try_remove`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Removed,
    /// Some client holds a pin: left in place (flagged delete-pending if asked).
    Pinned,
}

/// The mapped arena. Clone-free; share it behind an `Arc`.
pub struct Arena {
    map: MmapRaw,
    fd: OwnedFd,
    layout: Layout,
    /// Which chunks of this process's mapping have their page tables filled.
    populated: Populated,
    /// Which chunks have been claimed for filling them for reading
    /// ([`Arena::claim_unpopulated`], then [`Arena::populate_read`]).
    populated_read: Populated,
}

/// The granule of [`Arena::populate_once`]: one bit per 2 MiB of the mapping.
const POPULATE_CHUNK: u64 = 2 << 20;

/// Objects this large have their range populated by their creator before it writes them
/// (see [`Arena::populate_once`]); below it a few page faults cost less than the call. The
/// daemon leaves such a range to its creator, so that the memfd's pages are allocated and the
/// creator's page tables filled in one pass. (A first read of a large object is helped
/// from 32 MiB on, by the client's read-behind helper.)
pub const POPULATE_MIN: u64 = 1 << 20;

/// The least a thread of [`Arena::populate_once_with`] is given: below it, starting a
/// thread costs more than the faults it would share.
const POPULATE_SPLIT_MIN: u64 = 32 << 20;

/// How many threads a client populates a large object's range on at its create (see
/// [`Arena::populate_once_with`]): the cores this process may run on, at most 4 (page
/// allocation stops scaling there).
pub fn populate_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get().min(4))
            .unwrap_or(1)
    })
}

/// What a thread of [`Arena::populate_once_with`] takes at a time.
const POPULATE_PIECE: u64 = 8 << 20;

/// One bit per [`POPULATE_CHUNK`] of a mapping: set once this process has filled the page
/// tables of that chunk. Process-local (plain `std` atomics, not shared memory), and valid
/// only in the process that mapped the arena: a forked child starts with empty page tables
/// for a shared mapping, so it does not trust its parent's bits.
struct Populated {
    pid: u32,
    bits: Box<[std::sync::atomic::AtomicU64]>,
}

impl Populated {
    fn new(total_len: u64) -> Populated {
        let chunks = total_len.div_ceil(POPULATE_CHUNK);
        Populated {
            pid: std::process::id(),
            bits: (0..chunks.div_ceil(64))
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        }
    }

    fn is_set(&self, chunk: u64) -> bool {
        let w = &self.bits[(chunk / 64) as usize];
        w.load(std::sync::atomic::Ordering::Relaxed) & 1 << (chunk % 64) != 0
    }

    /// Whether every chunk in `first..=last` is set: a word at a time.
    fn all_set(&self, first: u64, last: u64) -> bool {
        Self::all_set_in_either(self, self, first, last)
    }

    /// Whether every chunk in `first..=last` is set in `a` or in `b`.
    fn all_set_in_either(a: &Populated, b: &Populated, first: u64, last: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        (first / 64..=last / 64).all(|w| {
            let lo = if w == first / 64 { first % 64 } else { 0 };
            let hi = if w == last / 64 { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            (a.bits[w as usize].load(Relaxed) | b.bits[w as usize].load(Relaxed)) & mask == mask
        })
    }

    /// Sets the bit of `chunk`; `true` if this call set it.
    fn claim(&self, chunk: u64) -> bool {
        let w = &self.bits[(chunk / 64) as usize];
        let bit = 1 << (chunk % 64);
        w.fetch_or(bit, std::sync::atomic::Ordering::Relaxed) & bit == 0
    }

    fn set(&self, chunk: u64) {
        self.claim(chunk);
    }
}

// SAFETY: the mapping is plain shared memory; every access to shared fields goes through
// atomics, and object bytes are handed out only under the rules documented on the accessors.
unsafe impl Send for Arena {}
// SAFETY: as above: no interior state besides the mapping, which is accessed atomically.
unsafe impl Sync for Arena {}

impl Arena {
    /// Creates the memfd (sealed against shrinking and growing), maps it and writes the header.
    pub fn create(layout: Layout) -> Result<Arena> {
        Arena::create_with(layout, Pages::Base)
    }

    /// [`Arena::create_with`] on the huge pages this machine offers ([`Pages::huge_for`]).
    ///
    /// The pool's count is only a look: another process may reserve those pages before this
    /// mapping does. The kernel reserves a shared mapping's pool pages from the global pool
    /// when the mapping is made, so a pool that ran short fails the mapping (`ENOMEM`).
    /// Reserved is not yet charged: a hugetlb cgroup limit (a container that asked for no
    /// huge pages has a limit of 0) is charged on first touch, which fails as a `SIGBUS`;
    /// [`Arena::create_with`] therefore allocates every page before the heap (header,
    /// directory, rings) before it touches one, so such a limit fails here (`ENOSPC`) too. Either way transparent huge pages are used
    /// if shared memory may use them, else the error is `NoHugePages`. (A limit above zero
    /// but below the arena's size fails later, as a create or slab the daemon cannot allocate:
    /// [`Arena::allocate_pool_pages`].)
    pub fn create_huge(layout: Layout) -> Result<Arena> {
        let pages = Pages::huge_for(layout.total_len)?;
        let errno = |e: &io::Error| e.raw_os_error().map(nix::errno::Errno::from_raw);
        match Arena::create_with(layout, pages) {
            Err(StoreError::Io(e))
                if pages == Pages::HugeTlb
                    && matches!(
                        errno(&e),
                        Some(nix::errno::Errno::ENOMEM | nix::errno::Errno::ENOSPC)
                    ) =>
            {
                let (thp_ok, top) = Pages::transparent_allowed();
                if thp_ok {
                    return Arena::create_with(layout, Pages::Transparent);
                }
                let what = if errno(&e) == Some(nix::errno::Errno::ENOMEM) {
                    "the huge page pool had them when looked at, not when the arena was \
                     mapped (another process reserved them meanwhile)"
                } else {
                    "the pool's pages before the heap (header, directory, rings) could not be \
                     allocated (a hugetlb cgroup limit?)"
                };
                Err(StoreError::NoHugePages(format!(
                    "{} pages needed: {what}; reserve more with `sysctl vm.nr_hugepages=N`, \
                     or let shared memory use transparent huge pages ({THP}/shmem_enabled is \
                     {top}; `advise` allows them)",
                    layout.total_len.div_ceil(HUGE_PAGE),
                )))
            }
            other => other,
        }
    }

    /// [`Arena::create`] backed by `pages`. With huge pages the heap grows to end on a huge
    /// page boundary.
    pub fn create_with(mut layout: Layout, pages: Pages) -> Result<Arena> {
        let mut flags = MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING;
        if pages != Pages::Base {
            layout.heap_len = layout.total_len.next_multiple_of(HUGE_PAGE) - layout.heap_offset;
            layout.total_len = layout.heap_offset + layout.heap_len;
        }
        if pages == Pages::HugeTlb {
            flags |= MFdFlags::MFD_HUGETLB;
        }
        let fd = memfd_create("trove-arena", flags)?;
        let file = File::from(fd);
        file.set_len(layout.total_len)?;
        let fd = OwnedFd::from(file);
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
            ),
        )?;
        let map = MmapOptions::new()
            .len(layout.total_len as usize)
            .map_raw(&fd)?;
        advise_pages(&map, pages)?;
        if pages == Pages::HugeTlb {
            // Allocate every page before the heap (header, directory, rings) now, before the
            // first write: a pool page that cannot be charged (a hugetlb cgroup limit) is an
            // error here (`ENOSPC`), where a write would be a SIGBUS; and no client ever
            // touches one of them first (a lookup reads directory slots anywhere; a first
            // touch is charged to the toucher's cgroup, maybe 0 in a client's container).
            let meta = layout
                .heap_offset
                .next_multiple_of(HUGE_PAGE)
                .min(layout.total_len);
            allocate_pool_range(&fd, 0, meta)?;
        }
        let arena = Arena {
            map,
            fd,
            layout,
            populated: Populated::new(layout.total_len),
            populated_read: Populated::new(layout.total_len),
        };
        let h = arena.header();
        h.version.store(LAYOUT_VERSION, Ordering::Relaxed);
        h.max_clients.store(layout.max_clients, Ordering::Relaxed);
        h.pin_clients.store(layout.pin_clients, Ordering::Relaxed);
        h.total_len.store(layout.total_len, Ordering::Relaxed);
        h.dir_offset.store(layout.dir_offset, Ordering::Relaxed);
        h.dir_slots.store(layout.dir_slots, Ordering::Relaxed);
        h.heap_offset.store(layout.heap_offset, Ordering::Relaxed);
        h.heap_len.store(layout.heap_len, Ordering::Relaxed);
        h.pages.store(pages as u32, Ordering::Relaxed);
        h.magic.store(MAGIC, Ordering::Release);
        Ok(arena)
    }

    /// Maps an arena received from the daemon and validates its header and seals, so that a
    /// bad fd gives an error instead of out-of-bounds accesses or SIGBUS later.
    pub fn attach(fd: OwnedFd) -> Result<Arena> {
        let seals = fcntl(&fd, FcntlArg::F_GET_SEALS)?;
        let need = SealFlag::F_SEAL_SHRINK.bits();
        if seals & need != need {
            return Err(StoreError::Protocol(
                "arena memfd is not sealed against shrinking".into(),
            ));
        }
        let file_len = nix::sys::stat::fstat(&fd)?.st_size as u64;
        if file_len < HEADER_LEN {
            return Err(StoreError::Protocol(
                "arena is smaller than its header".into(),
            ));
        }
        let map = MmapOptions::new().len(file_len as usize).map_raw(&fd)?;
        // SAFETY: the mapping is at least HEADER_LEN bytes and page aligned; Header is only atomics.
        let h = unsafe { &*(map.as_ptr() as *const Header) };
        if h.magic.load(Ordering::Acquire) != MAGIC {
            return Err(StoreError::Protocol("arena has a bad magic number".into()));
        }
        if h.version.load(Ordering::Relaxed) != LAYOUT_VERSION {
            return Err(StoreError::Protocol("arena layout version mismatch".into()));
        }
        let layout = Layout {
            total_len: h.total_len.load(Ordering::Relaxed),
            dir_offset: h.dir_offset.load(Ordering::Relaxed),
            dir_slots: h.dir_slots.load(Ordering::Relaxed),
            heap_offset: h.heap_offset.load(Ordering::Relaxed),
            heap_len: h.heap_len.load(Ordering::Relaxed),
            max_clients: h.max_clients.load(Ordering::Relaxed),
            pin_clients: h.pin_clients.load(Ordering::Relaxed),
        };
        layout.validate(file_len)?;
        let pages = Pages::from_u32(h.pages.load(Ordering::Relaxed))
            .ok_or_else(|| StoreError::Protocol("arena header: unknown page kind".into()))?;
        advise_pages(&map, pages)?;
        Ok(Arena {
            map,
            fd,
            layout,
            populated: Populated::new(layout.total_len),
            populated_read: Populated::new(layout.total_len),
        })
    }

    /// What backs this arena's memory.
    pub fn pages(&self) -> Pages {
        Pages::from_u32(self.header().pages.load(Ordering::Relaxed)).unwrap_or_default()
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is at least HEADER_LEN bytes (validated or created so) and page
        // aligned; Header is only atomics, valid for any bit pattern.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    /// The directory view.
    pub fn directory(&self) -> Directory<'_> {
        Directory { arena: self }
    }

    /// Whether `[offset, offset+len)` lies inside the heap.
    pub fn in_heap(&self, offset: u64, len: u64) -> bool {
        let l = &self.layout;
        offset >= l.heap_offset
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= l.heap_offset + l.heap_len)
    }

    /// A pointer to `len` heap bytes at `offset`, or None when out of bounds.
    pub fn ptr(&self, offset: u64, len: u64) -> Option<*mut u8> {
        if !self.in_heap(offset, len) {
            return None;
        }
        // SAFETY: offset is within the mapping (checked above).
        Some(unsafe { self.map.as_mut_ptr().add(offset as usize) })
    }

    /// Client `index`'s notification ring region (inside the mapping, 4096-aligned).
    pub fn ring_ptr(&self, index: u32) -> Option<*mut u8> {
        let (offset, len) = self.layout.ring_region(index)?;
        if offset.checked_add(len)? > self.layout.heap_offset {
            return None;
        }
        // SAFETY: offset + len lies before the heap, inside the mapping (validated layout).
        Some(unsafe { self.map.as_mut_ptr().add(offset as usize) })
    }

    /// Initialises client `index`'s notification ring (daemon side, when the index is given
    /// to a new client). The ring stays valid while this `Arena` lives.
    pub fn init_ring(&self, index: u32) -> Result<RingRef> {
        let p = self.ring_ptr(index).ok_or_else(|| {
            StoreError::InvalidRequest(format!("no ring for client index {index}"))
        })?;
        // SAFETY: the region is inside the mapping, 4096-aligned, ring_bytes long, and the
        // mapping lives as long as `self`; the index was just assigned, so its previous owner
        // is gone and nobody else uses the region during init.
        unsafe { RingRef::init(p, RING_CAPACITY, RING_SLOT) }
            .map_err(|e| StoreError::Protocol(format!("notification ring: {e}")))
    }

    /// Attaches to client `index`'s notification ring (client side). The ring stays valid
    /// while this `Arena` lives; its header is validated.
    pub fn attach_ring(&self, index: u32) -> Result<RingRef> {
        let (_, len) = self
            .layout
            .ring_region(index)
            .ok_or_else(|| StoreError::Protocol(format!("no ring for client index {index}")))?;
        let p = self
            .ring_ptr(index)
            .ok_or_else(|| StoreError::Protocol("ring outside the arena".into()))?;
        // SAFETY: the region is inside the mapping (ring_ptr checks it) and `len` bytes long;
        // the mapping lives as long as `self`.
        unsafe { RingRef::attach(p, len as usize) }
            .map_err(|e| StoreError::Protocol(format!("notification ring: {e}")))
    }

    /// The bytes of a sealed object.
    ///
    /// # Safety
    /// The caller holds a pin on the object (so the range is not freed or reused while the
    /// slice lives) and the object is sealed (so nobody writes to it).
    pub unsafe fn sealed_bytes(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let p = self.ptr(offset, len)?;
        // SAFETY: in bounds (checked by ptr), immutable and kept alive per the caller's contract.
        Some(unsafe { std::slice::from_raw_parts(p, len as usize) })
    }

    /// On an arena of pool pages: makes sure the pages of `[offset, offset+len)` exist,
    /// allocating any that do not (see [`allocate_pool_range`]); an error if one cannot be
    /// had. A no-op on other arenas. The daemon calls it for a block it hands out beyond its
    /// pre-fault whose populate failed, so that no client is the first to touch a pool page
    /// (a client's first touch is charged to its own hugetlb cgroup, which may allow none: a
    /// `SIGBUS`).
    pub fn allocate_pool_pages(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.pages() != Pages::HugeTlb {
            return Ok(());
        }
        let end = offset.saturating_add(len).min(self.layout.total_len);
        allocate_pool_range(&self.fd, offset, end)
    }

    /// Pre-faults `[offset, offset+len)` of this process's mapping for writing
    /// (MADV_POPULATE_WRITE): allocates the memfd's pages if needed and fills the page tables,
    /// without changing any byte. Safe to run while others use the range.
    pub fn populate(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut end = offset.saturating_add(len).min(self.layout.total_len);
        let mut offset = offset;
        if self.pages() != Pages::Base {
            // Whole huge pages (the arena's length is a multiple of one).
            offset -= offset % HUGE_PAGE;
            end = end.next_multiple_of(HUGE_PAGE).min(self.layout.total_len);
        }
        if offset >= end {
            return Ok(());
        }
        self.map.advise_range(
            Advice::PopulateWrite,
            offset as usize,
            (end - offset) as usize,
        )
    }
}

/// Allocates the memfd's pages of `[start, end)` (whole huge pages) without mapping them
/// (`fallocate`): for an arena of pool pages. A page that cannot be had (the pool, or the
/// caller's hugetlb cgroup, has none left) is an error (`ENOSPC`), where a first touch would
/// be a `SIGBUS`; pages already allocated cost a look each.
fn allocate_pool_range(fd: &OwnedFd, start: u64, end: u64) -> io::Result<()> {
    let start = start - start % HUGE_PAGE;
    let end = end.next_multiple_of(HUGE_PAGE);
    if start >= end {
        return Ok(());
    }
    fallocate(
        fd,
        FallocateFlags::empty(),
        start as i64,
        (end - start) as i64,
    )?;
    Ok(())
}

/// Asks for transparent huge pages on a mapping of an arena that uses them.
fn advise_pages(map: &MmapRaw, pages: Pages) -> io::Result<()> {
    if pages == Pages::Transparent {
        map.advise(Advice::HugePage)?;
    }
    Ok(())
}

impl Arena {
    /// Fills this process's page tables for the 2 MiB chunks that `[offset, offset+len)`
    /// touches and that this process has not filled before (MADV_POPULATE_WRITE, whole
    /// chunks; allocates the memfd's pages where the daemon has not yet). One system call
    /// instead of a page fault per 4 KiB on the first touch of a large object, and nothing
    /// (a bit test per chunk) once done: populating an already mapped range still walks its
    /// page tables, a good part of a copy's cost. Safe while others use the range (no byte
    /// changes).
    pub fn populate_once(&self, offset: u64, len: u64) -> io::Result<()> {
        self.populate_once_with(offset, len, 1)
    }

    /// [`Arena::populate_once`] on up to `threads` threads (the caller's and scoped ones it
    /// starts), each given at least 32 MiB. Allocating the memfd's pages is most of a fresh
    /// range's cost (the kernel zeroes each page), and it scales with cores: a store's first
    /// large put waits for it. A thread that cannot be started leaves its part to the caller.
    pub fn populate_once_with(&self, offset: u64, len: u64, threads: usize) -> io::Result<()> {
        let end = offset.saturating_add(len).min(self.layout.total_len);
        if offset >= end {
            return Ok(());
        }
        if self.populated.pid != std::process::id() {
            // A forked copy of another process's arena: its bits say nothing of ours, and a
            // forked child starts no thread of its own.
            return self.populate(offset, end - offset);
        }
        let (first, last) = (offset / POPULATE_CHUNK, (end - 1) / POPULATE_CHUNK);
        if self.populated.all_set(first, last) {
            return Ok(());
        }
        let mut chunk = first;
        while chunk <= last {
            if self.populated.is_set(chunk) {
                chunk += 1;
                continue;
            }
            // A run of chunks not done yet: one call.
            let run = chunk;
            while chunk <= last && !self.populated.is_set(chunk) {
                chunk += 1;
            }
            self.populate_split(
                run * POPULATE_CHUNK,
                (chunk - run) * POPULATE_CHUNK,
                threads,
            )?;
            (run..chunk).for_each(|c| self.populated.set(c));
        }
        Ok(())
    }

    /// [`Arena::populate`] of `[offset, offset+len)` on up to `threads` threads, this one
    /// and scoped helpers, each for at least [`POPULATE_SPLIT_MIN`]; the first error. The
    /// threads take pieces of [`POPULATE_PIECE`] in turn from the front, so that they finish
    /// together where parts of the range cost more than others (pages already allocated
    /// cost only their page tables). Helpers are counted across the process: several large
    /// creates at once share `threads - 1` of them (page allocation does not scale further).
    fn populate_split(&self, offset: u64, len: u64, threads: usize) -> io::Result<()> {
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        /// Helper threads of this process populating now.
        static HELPERS: AtomicUsize = AtomicUsize::new(0);
        let wanted = (len / POPULATE_SPLIT_MIN).clamp(1, threads.max(1) as u64) as usize - 1;
        let cap = threads.saturating_sub(1);
        let reserve = |n: usize| (wanted > 0 && n < cap).then(|| wanted.min(cap - n));
        let helpers = HELPERS
            .fetch_update(Relaxed, Relaxed, |n| reserve(n).map(|k| n + k))
            .ok()
            .and_then(reserve)
            .unwrap_or(0);
        if helpers == 0 {
            return self.populate(offset, len);
        }
        /// Gives the reserved helpers back however the scope ends.
        struct Reserved(usize);
        impl Drop for Reserved {
            fn drop(&mut self) {
                HELPERS.fetch_sub(self.0, Relaxed);
            }
        }
        let _reserved = Reserved(helpers);
        let end = offset + len;
        let next = std::sync::atomic::AtomicU64::new(offset);
        let work = || -> io::Result<()> {
            loop {
                let start = next.fetch_add(POPULATE_PIECE, Relaxed);
                if start >= end {
                    return Ok(());
                }
                self.populate(start, POPULATE_PIECE.min(end - start))?;
            }
        };
        std::thread::scope(|s| {
            let started: Vec<_> = (0..helpers)
                .filter_map(|_| {
                    std::thread::Builder::new()
                        .name("trove-prefill".into())
                        .spawn_scoped(s, work)
                        .ok()
                })
                .collect();
            // A piece a helper failed on (or panicked in) is not retried: populating is only
            // a speed-up, and the error is returned.
            started.into_iter().fold(work(), |r, h| {
                r.and(
                    h.join()
                        .unwrap_or_else(|_| Err(io::Error::other("populate panicked"))),
                )
            })
        })
    }
}

impl Arena {
    /// The 2 MiB chunks of `[offset, offset+len)` (clipped to it) whose page tables this
    /// process has not filled, nor claimed for filling, before; claims them all for the
    /// caller, who fills those returned with [`Arena::populate_read`]. None are returned in a
    /// forked copy of another process's arena (its other bits say nothing of ours).
    pub fn claim_unpopulated(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let end = offset.saturating_add(len).min(self.layout.total_len);
        if offset >= end {
            return Vec::new();
        }
        let (first, last) = (offset / POPULATE_CHUNK, (end - 1) / POPULATE_CHUNK);
        let ours = self.populated.pid == std::process::id();
        (first..=last)
            .filter(|c| self.populated_read.claim(*c) && ours && !self.populated.is_set(*c))
            .map(|c| {
                let start = (c * POPULATE_CHUNK).max(offset);
                (start, ((c + 1) * POPULATE_CHUNK).min(end) - start)
            })
            .collect()
    }

    /// Whether every chunk of `[offset, offset+len)` has been filled for writing
    /// ([`Arena::populate_once`]) or claimed for reading ([`Arena::claim_unpopulated`]) in
    /// this process: a few loads, no system call.
    pub fn read_populated(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len).min(self.layout.total_len);
        offset >= end
            || Populated::all_set_in_either(
                &self.populated,
                &self.populated_read,
                offset / POPULATE_CHUNK,
                (end - 1) / POPULATE_CHUNK,
            )
    }

    /// Fills this process's page tables for reading the given ranges (MADV_POPULATE_READ),
    /// from the last backwards: run beside a reader going forwards, the two meet in the
    /// middle and the reader takes about half the page faults. Changes no byte and allocates
    /// nothing (a sealed object's pages exist). A chunk at an object's ends counts as done
    /// for the whole chunk: another object sharing it takes at most 2 MiB of faults.
    pub fn populate_read(&self, ranges: &[(u64, u64)]) -> io::Result<()> {
        for (start, len) in ranges.iter().rev() {
            self.map
                .advise_range(Advice::PopulateRead, *start as usize, *len as usize)?;
        }
        Ok(())
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process, for LRU times.
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The object directory in the arena.
#[derive(Clone, Copy)]
pub struct Directory<'a> {
    arena: &'a Arena,
}

impl<'a> Directory<'a> {
    pub fn slots(&self) -> u64 {
        self.arena.layout.dir_slots
    }

    fn slot(&self, i: u64) -> &'a Slot {
        let l = &self.arena.layout;
        let i = i & (l.dir_slots - 1);
        // SAFETY: i < dir_slots and the directory lies inside the mapping (validated layout);
        // slots are 128-byte aligned because dir_offset is a multiple of 4096. Slot is only
        // atomics, valid for any bit pattern, and shared access to atomics is sound.
        unsafe {
            &*(self
                .arena
                .map
                .as_ptr()
                .add((l.dir_offset + i * SLOT_LEN as u64) as usize) as *const Slot)
        }
    }

    /// Lock-free lookup of a sealed object (any process).
    pub fn lookup(&self, id: &ObjectId) -> Lookup {
        let mask = self.slots() - 1;
        let backoff = Backoff::new();
        'retry: for _ in 0..1000 {
            let mut i = id.hash64() & mask;
            for _ in 0..self.slots() {
                let s = self.slot(i);
                let w = s.word.load(Ordering::Acquire);
                match word_state(w) {
                    state::EMPTY => return Lookup::Absent,
                    state::TOMBSTONE => {}
                    st => {
                        let sid = s.load_id();
                        let offset = s.offset.load(Ordering::Relaxed);
                        let size = s.size.load(Ordering::Relaxed);
                        fence(Ordering::Acquire);
                        if s.word.load(Ordering::Relaxed) != w {
                            backoff.snooze();
                            continue 'retry;
                        }
                        if sid == *id {
                            return match st {
                                state::SEALED if w & FLAG_DELETE_PENDING == 0 => {
                                    Lookup::Sealed(SealedEntry {
                                        slot: i,
                                        word: w,
                                        offset,
                                        size,
                                    })
                                }
                                state::BUSY => {
                                    backoff.snooze();
                                    continue 'retry;
                                }
                                state::SEALED => Lookup::Absent,
                                _ => Lookup::NotReady,
                            };
                        }
                    }
                }
                i = (i + 1) & mask;
            }
            return Lookup::Absent;
        }
        Lookup::NotReady
    }

    /// Pins a sealed entry for client `client`: sets the client's pin bit, then checks that
    /// the entry did not change. Pairs with [`Directory::try_remove`]: both sides do a SeqCst
    /// store then a SeqCst load of the other's word, so either the daemon sees the pin bit or
    /// this sees the daemon's BUSY state. Returns false if the entry changed, having cleared
    /// the bit only if this call set it (a bit already set, another reference of this process,
    /// is never cleared here); the second value says whether the daemon must be told (see
    /// [`Directory::unpin`]).
    ///
    /// Only for a client with its own pin bit (below [`PIN_CLIENTS`]); an overflow client
    /// pins through the daemon.
    pub fn try_pin(&self, e: &SealedEntry, client: u32) -> (bool, bool) {
        debug_assert!(client < PIN_CLIENTS, "client {client} has no pin bit");
        let s = self.slot(e.slot);
        let (word, bit) = pin_bit(client);
        let before = s.pins[word].fetch_or(bit, Ordering::SeqCst);
        if s.word.load(Ordering::SeqCst) == e.word {
            s.last_use.store(monotonic_ns(), Ordering::Relaxed);
            (true, false)
        } else if before & bit != 0 {
            // The bit was set before this call (another reference of this process, or a
            // `Hold` the daemon applied): not ours to clear.
            (false, false)
        } else {
            (false, self.unpin(e.slot, client))
        }
    }

    /// Clears client `client`'s pin bit on `slot`. Returns true when the object is
    /// delete-pending and no pin is left, i.e. the daemon should be told to free it now.
    pub fn unpin(&self, slot: u64, client: u32) -> bool {
        debug_assert!(client < PIN_CLIENTS, "client {client} has no pin bit");
        let s = self.slot(slot);
        let (word, bit) = pin_bit(client);
        s.pins[word].fetch_and(!bit, Ordering::SeqCst);
        let backoff = Backoff::new();
        let w = loop {
            let w = s.word.load(Ordering::SeqCst);
            if word_state(w) != state::BUSY {
                break w;
            }
            // The daemon holds BUSY for a few instructions under its lock.
            if backoff.is_completed() {
                std::thread::yield_now();
            } else {
                backoff.snooze();
            }
        };
        w & (FLAG_DELETE_PENDING | FLAG_REFCOUNTED) != 0 && !s.pinned()
    }

    /// Whether pin bit `client` is set on `slot` (a client index below [`PIN_CLIENTS`], or
    /// [`OVERFLOW_BIT`]).
    pub fn has_pin(&self, slot: u64, client: u32) -> bool {
        let (word, bit) = pin_bit(client);
        self.slot(slot).pins[word].load(Ordering::SeqCst) & bit != 0
    }

    /// Refreshes the LRU time of a slot (a process that already holds a pin got it again).
    pub fn touch(&self, slot: u64) {
        self.slot(slot)
            .last_use
            .store(monotonic_ns(), Ordering::Relaxed);
    }

    // ---- daemon side: called only by the daemon, under its table lock ----

    /// Inserts a new object in state CREATING. The caller has checked that `id` is not live
    /// and that the table is below its load limit. Returns the slot index.
    pub fn insert(&self, id: &ObjectId, offset: u64, size: u64, owner: u32) -> Option<u64> {
        let mask = self.slots() - 1;
        let mut i = id.hash64() & mask;
        for _ in 0..self.slots() {
            let s = self.slot(i);
            let w = s.word.load(Ordering::Relaxed);
            if matches!(word_state(w), state::EMPTY | state::TOMBSTONE) {
                // The previous state store (TOMBSTONE/EMPTY) was followed by a release fence,
                // so readers that see the new fields also see the slot was not live.
                s.store_id(id);
                // A client that died in the middle of a failed pin may have left its bit on a
                // free slot: a new entry starts with none.
                for p in &s.pins {
                    p.store(0, Ordering::SeqCst);
                }
                s.owner.store(owner, Ordering::Relaxed);
                s.offset.store(offset, Ordering::Relaxed);
                s.size.store(size, Ordering::Relaxed);
                s.last_use.store(monotonic_ns(), Ordering::Relaxed);
                s.word.store(
                    make_word(word_gen(w).wrapping_add(1), state::CREATING, 0),
                    Ordering::Release,
                );
                return Some(i);
            }
            i = (i + 1) & mask;
        }
        None
    }

    /// Marks an entry invisible before its fields are rewritten or its memory reused.
    fn retire(&self, i: u64, w: u64) {
        let s = self.slot(i);
        s.word.store(
            make_word(word_gen(w), state::TOMBSTONE, 0),
            Ordering::SeqCst,
        );
        fence(Ordering::Release);
        // Turn trailing tombstones back into EMPTY so probes stay short: a tombstone followed by
        // an EMPTY slot ends no probe chain that could reach a live entry.
        let mask = self.slots() - 1;
        if word_state(self.slot((i + 1) & mask).word.load(Ordering::Relaxed)) != state::EMPTY {
            return;
        }
        let mut j = i;
        loop {
            let sj = self.slot(j);
            let wj = sj.word.load(Ordering::Relaxed);
            if word_state(wj) != state::TOMBSTONE {
                break;
            }
            sj.word
                .store(make_word(word_gen(wj), state::EMPTY, 0), Ordering::Release);
            j = j.wrapping_sub(1) & mask;
            if j == i {
                break;
            }
        }
    }

    pub fn seal(&self, i: u64) {
        self.seal_with(i, 0, &[]);
    }

    /// Seals with `flags` (e.g. [`FLAG_REFCOUNTED`]), with the pin bits of `pinned_for` set
    /// before the object becomes visible.
    pub fn seal_with(&self, i: u64, flags: u64, pinned_for: &[u32]) {
        let s = self.slot(i);
        let w = s.word.load(Ordering::Relaxed);
        debug_assert_eq!(word_state(w), state::CREATING);
        for &c in pinned_for {
            self.pin_for(i, c);
        }
        s.last_use.store(monotonic_ns(), Ordering::Relaxed);
        s.word.store(
            make_word(word_gen(w), state::SEALED, flags),
            Ordering::Release,
        );
    }

    /// Sets pin bit `client` on behalf of that client (a `Hold`), or [`OVERFLOW_BIT`] for the
    /// overflow clients (the daemon counts their pins).
    pub fn pin_for(&self, i: u64, client: u32) {
        let (word, bit) = pin_bit(client);
        self.slot(i).pins[word].fetch_or(bit, Ordering::SeqCst);
    }

    /// Clears pin bit `client` on behalf of that client (an `Unhold`), or [`OVERFLOW_BIT`]
    /// once no overflow client pins the object.
    pub fn unpin_for(&self, i: u64, client: u32) {
        let (word, bit) = pin_bit(client);
        self.slot(i).pins[word].fetch_and(!bit, Ordering::SeqCst);
    }

    /// Whether a slot holds a sealed reference-counted object.
    pub fn is_refcounted(&self, i: u64) -> bool {
        self.slot(i).word.load(Ordering::Relaxed) & FLAG_REFCOUNTED != 0
    }

    /// Whether a slot holds a sealed object that reports a failure ([`FLAG_ERROR`]).
    pub fn is_error(&self, i: u64) -> bool {
        self.slot(i).word.load(Ordering::Relaxed) & FLAG_ERROR != 0
    }

    /// Removes an object that is being created (no client can pin it).
    pub fn remove_unsealed(&self, i: u64) {
        let w = self.slot(i).word.load(Ordering::Relaxed);
        debug_assert_eq!(word_state(w), state::CREATING);
        self.retire(i, w);
    }

    /// Removes a sealed object unless pinned. With `mark_pending`, a pinned object is flagged
    /// delete-pending (no new pins; the last unpin tells the daemon).
    pub fn try_remove(&self, i: u64, mark_pending: bool) -> Removal {
        let s = self.slot(i);
        let w = s.word.load(Ordering::Relaxed);
        debug_assert_eq!(word_state(w), state::SEALED);
        s.word
            .store(make_word(word_gen(w), state::BUSY, 0), Ordering::SeqCst);
        if s.pinned() {
            let restored = if mark_pending {
                w | FLAG_DELETE_PENDING
            } else {
                w
            };
            s.word.store(restored, Ordering::SeqCst);
            return Removal::Pinned;
        }
        self.retire(i, w);
        Removal::Removed
    }

    pub fn is_pinned(&self, i: u64) -> bool {
        self.slot(i).pinned()
    }

    /// The client indices whose pin bit is set on a slot ([`OVERFLOW_BIT`] among them if
    /// overflow clients pin it).
    pub fn pinners(&self, i: u64) -> Vec<u32> {
        let s = self.slot(i);
        let mut out = Vec::new();
        for (w, p) in s.pins.iter().enumerate() {
            let mut bits = p.load(Ordering::SeqCst);
            while bits != 0 {
                out.push(w as u32 * 64 + bits.trailing_zeros());
                bits &= bits - 1;
            }
        }
        out
    }

    /// How many pin bits are set on a slot ([`OVERFLOW_BIT`] counts as one).
    pub fn pin_count(&self, i: u64) -> u32 {
        self.slot(i)
            .pins
            .iter()
            .map(|p| p.load(Ordering::SeqCst).count_ones())
            .sum()
    }

    pub fn last_use(&self, i: u64) -> u64 {
        self.slot(i).last_use.load(Ordering::Relaxed)
    }

    /// Clears a departed client's pin bits everywhere (before its index is reused).
    pub fn clear_client(&self, client: u32) {
        let (word, bit) = pin_bit(client);
        for i in 0..self.slots() {
            self.slot(i).pins[word].fetch_and(!bit, Ordering::SeqCst);
        }
    }
}

/// The word and bit of pin bit `client` in a slot's mask (a client index below
/// [`PIN_CLIENTS`], or [`OVERFLOW_BIT`]).
fn pin_bit(client: u32) -> (usize, u64) {
    debug_assert!(
        client <= OVERFLOW_BIT,
        "pin bit {client} is not in the mask"
    );
    ((client / 64) as usize % 2, 1 << (client % 64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arena() -> Arena {
        Arena::create(Layout::new(1 << 20, 64).unwrap()).unwrap()
    }

    #[test]
    fn populated_chunks_are_tested_across_words() {
        let p = Populated::new(200 * POPULATE_CHUNK);
        (60..70).for_each(|c| p.set(c));
        assert!(p.all_set(60, 69) && p.all_set(63, 64) && p.all_set(65, 65));
        assert!(!p.all_set(59, 69) && !p.all_set(60, 70) && !p.all_set(0, 199));
        (0..200).for_each(|c| p.set(c));
        assert!(p.all_set(0, 199) && p.all_set(127, 128));
    }

    #[test]
    fn populate_once_fills_whole_chunks_once_and_changes_no_byte() {
        let a = Arena::create(Layout::new(8 << 20, 64).unwrap()).unwrap();
        let l = *a.layout();
        let p = a.ptr(l.heap_offset, 4096).unwrap();
        // SAFETY: 4096 bytes inside the heap, nobody else uses this test's arena.
        unsafe { std::ptr::write_bytes(p, 0xab, 4096) };
        let b = Arena::attach(a.fd().try_clone_to_owned().unwrap()).unwrap();
        let first = l.heap_offset / POPULATE_CHUNK;
        assert!(!b.populated.is_set(first));
        // 1 byte past a chunk boundary: two chunks.
        b.populate_once(l.heap_offset, POPULATE_CHUNK + 1).unwrap();
        assert!(b.populated.is_set(first) && b.populated.is_set(first + 1));
        assert!(!b.populated.is_set(first + 2), "only the chunks touched");
        assert!(b.populated.all_set(first, first + 1) && !b.populated.all_set(first, first + 2));
        assert!(!a.populated.is_set(first), "per mapping");
        let q = b.ptr(l.heap_offset, 4096).unwrap();
        // SAFETY: in bounds; written above, read only here.
        let got = unsafe { std::slice::from_raw_parts(q, 4096) };
        assert!(got.iter().all(|&x| x == 0xab), "no byte changed");
        // Already done: nothing to do; past the end: clipped.
        b.populate_once(l.heap_offset, 4096).unwrap();
        b.populate_once(l.total_len - 1, 1 << 40).unwrap();
        b.populate_once(l.total_len, 10).unwrap();
        assert!(b.populated.is_set((l.total_len - 1) / POPULATE_CHUNK));
    }

    #[test]
    fn populate_once_on_threads_allocates_every_page_once_and_changes_no_byte() {
        use std::os::unix::fs::MetadataExt;
        let a = Arena::create(Layout::new(200 << 20, 64).unwrap()).unwrap();
        let l = *a.layout();
        let allocated = || {
            let f = File::from(a.fd().try_clone_to_owned().unwrap());
            f.metadata().unwrap().blocks() * 512
        };
        let before = allocated();
        // A marker every MiB of the range, written through the creator's mapping.
        let len: u64 = 150 << 20;
        let marks: Vec<u64> = (0..len)
            .step_by(1 << 20)
            .map(|o| l.heap_offset + o)
            .collect();
        for (i, &o) in marks.iter().enumerate() {
            let p = a.ptr(o, 1).unwrap();
            // SAFETY: one byte inside the heap; nobody else uses this test's arena.
            unsafe { p.write(i as u8) };
        }
        let b = Arena::attach(a.fd().try_clone_to_owned().unwrap()).unwrap();
        // 150 MiB on up to 4 threads: 4 of them, taking 8 MiB pieces in turn.
        b.populate_once_with(l.heap_offset, len, 4).unwrap();
        let (first, last) = (
            l.heap_offset / POPULATE_CHUNK,
            (l.heap_offset + len - 1) / POPULATE_CHUNK,
        );
        assert!(
            b.populated.all_set(first, last),
            "every chunk of the range is done"
        );
        assert!(!b.populated.is_set(last + 1), "and none past it");
        assert!(
            allocated() >= before + len,
            "the memfd's pages are allocated: {} bytes, {} before",
            allocated(),
            before
        );
        for (i, &o) in marks.iter().enumerate() {
            let q = b.ptr(o, 1).unwrap();
            // SAFETY: in bounds; written above, only read here.
            assert_eq!(unsafe { q.read() }, i as u8, "no byte changed at {o}");
        }
        // Done already: a second call populates nothing (bits only); the split itself on 2
        // threads, over pages that exist, succeeds.
        b.populate_once_with(l.heap_offset, len, 4).unwrap();
        b.populate_split(l.heap_offset, len, 2).unwrap();
    }

    #[test]
    fn chunks_are_claimed_for_reading_once_and_no_byte_changes() {
        let a = Arena::create(Layout::new(8 << 20, 64).unwrap()).unwrap();
        let l = *a.layout();
        let p = a.ptr(l.heap_offset, 4096).unwrap();
        // SAFETY: 4096 bytes inside the heap, nobody else uses this test's arena.
        unsafe { std::ptr::write_bytes(p, 0xcd, 4096) };
        let b = Arena::attach(a.fd().try_clone_to_owned().unwrap()).unwrap();
        let (off, len) = (l.heap_offset + 100, POPULATE_CHUNK + 1);
        assert!(!b.read_populated(off, len));
        let ranges = b.claim_unpopulated(off, len);
        // Clipped to the range, in chunk order, covering it exactly.
        assert_eq!(ranges.first().map(|r| r.0), Some(off));
        assert_eq!(ranges.iter().map(|r| r.1).sum::<u64>(), len);
        assert!(b.read_populated(off, len), "claimed at once");
        assert!(b.claim_unpopulated(off, len).is_empty(), "claimed once");
        b.populate_read(&ranges).unwrap();
        let q = b.ptr(l.heap_offset, 4096).unwrap();
        // SAFETY: in bounds; written above, read only here.
        let got = unsafe { std::slice::from_raw_parts(q, 4096) };
        assert!(got.iter().all(|&x| x == 0xcd), "no byte changed");
        // Chunks populated for writing count as done for reading.
        let w = l.total_len - POPULATE_CHUNK;
        assert!(!b.read_populated(w, POPULATE_CHUNK));
        b.populate_once(w, POPULATE_CHUNK).unwrap();
        assert!(b.read_populated(w, POPULATE_CHUNK));
        assert!(b.claim_unpopulated(w, POPULATE_CHUNK).is_empty());
        assert!(!a.read_populated(off, len), "per mapping");
    }

    #[test]
    fn layout_is_validated_on_attach() {
        let a = arena();
        let fd = a.fd().try_clone_to_owned().unwrap();
        let b = Arena::attach(fd).unwrap();
        assert_eq!(a.layout(), b.layout());
        assert_eq!(b.layout().heap_offset % HEAP_ALIGN, 0);
        // A plain unsealed memfd is refused.
        let fd = memfd_create("x", MFdFlags::MFD_CLOEXEC).unwrap();
        assert!(Arena::attach(fd).is_err());
    }

    #[test]
    fn insert_seal_lookup_pin_remove() {
        let a = arena();
        let d = a.directory();
        let id = ObjectId::random();
        assert_eq!(d.lookup(&id), Lookup::Absent);
        let off = a.layout().heap_offset;
        let i = d.insert(&id, off, 100, 3).unwrap();
        assert_eq!(d.lookup(&id), Lookup::NotReady);
        d.seal(i);
        let Lookup::Sealed(e) = d.lookup(&id) else {
            panic!("sealed object not found")
        };
        assert_eq!((e.offset, e.size), (off, 100));
        assert_eq!(d.try_pin(&e, 5), (true, false));
        assert_eq!(d.try_remove(i, true), Removal::Pinned);
        assert_eq!(
            d.lookup(&id),
            Lookup::Absent,
            "delete-pending is not gettable"
        );
        assert!(
            d.unpin(i, 5),
            "last unpin of a delete-pending object asks for a free"
        );
        assert_eq!(d.try_remove(i, true), Removal::Removed);
        assert_eq!(d.lookup(&id), Lookup::Absent);
        // A stale entry cannot be pinned.
        assert!(!d.try_pin(&e, 5).0);
        assert!(!d.is_pinned(i));
    }

    #[test]
    fn a_failed_try_pin_keeps_a_pin_it_did_not_set() {
        let a = arena();
        let d = a.directory();
        let id = ObjectId::random();
        let i = d.insert(&id, a.layout().heap_offset, 10, 0).unwrap();
        d.seal(i);
        let Lookup::Sealed(stale) = d.lookup(&id) else {
            panic!("sealed object not found")
        };
        // Client 5 already holds a pin (a reference of another thread of its process).
        d.pin_for(i, 5);
        // A delete marks it pending, so the entry seen above is stale now.
        assert_eq!(d.try_remove(i, true), Removal::Pinned);
        assert_eq!(d.try_pin(&stale, 5), (false, false));
        assert!(
            d.has_pin(i, 5),
            "the existing pin must survive a failed try_pin"
        );
        // A failed try_pin that set the bit itself clears it again.
        assert_eq!(d.try_pin(&stale, 6), (false, false));
        assert!(!d.has_pin(i, 6));
    }

    #[test]
    fn rings_for_every_client_index_up_to_max_clients() {
        assert_eq!(
            Layout::new(1 << 20, 64).unwrap().max_clients,
            DEFAULT_MAX_CLIENTS
        );
        assert!(Layout::with_clients(1 << 20, 64, 0).is_err());
        assert!(Layout::with_clients(1 << 20, 64, MAX_MAX_CLIENTS + 1).is_err());
        let l = Layout::with_clients(1 << 20, 64, 300)
            .unwrap()
            .with_pin_clients(5);
        let (last, len) = l.ring_region(299).unwrap();
        assert!(last + len <= l.heap_offset, "rings before the heap");
        assert_eq!(l.ring_region(300), None);
        assert!(!l.is_overflow_client(4) && l.is_overflow_client(5));
        assert_eq!(Layout::new(1 << 20, 64).unwrap().pin_clients, PIN_CLIENTS);
        assert_eq!(
            l.with_pin_clients(1000).pin_clients,
            PIN_CLIENTS,
            "at most 127"
        );
        let a = Arena::create(l).unwrap();
        a.init_ring(299).unwrap();
        assert!(a.init_ring(300).is_err());
        // The counts travel in the header; an attached arena has the same rings.
        let b = Arena::attach(a.fd().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!(b.layout(), a.layout());
        assert_eq!((b.layout().max_clients, b.layout().pin_clients), (300, 5));
        b.attach_ring(299).unwrap();
        assert!(b.attach_ring(300).is_err());
        // A header claiming more rings than fit before the heap is refused.
        a.header()
            .max_clients
            .store(MAX_MAX_CLIENTS, Ordering::Relaxed);
        assert!(Arena::attach(a.fd().try_clone_to_owned().unwrap()).is_err());
        a.header().max_clients.store(300, Ordering::Relaxed);
        a.header()
            .pin_clients
            .store(PIN_CLIENTS + 1, Ordering::Relaxed);
        assert!(Arena::attach(a.fd().try_clone_to_owned().unwrap()).is_err());
    }

    #[test]
    fn the_overflow_bit_pins_like_a_client_bit() {
        let a = arena();
        let d = a.directory();
        let id = ObjectId::random();
        let i = d.insert(&id, a.layout().heap_offset, 10, 0).unwrap();
        d.seal_with(i, FLAG_REFCOUNTED, &[3, OVERFLOW_BIT]);
        assert!(d.has_pin(i, OVERFLOW_BIT) && d.has_pin(i, 3));
        assert_eq!(d.pin_count(i), 2);
        // A client's last unpin does not ask for a free while overflow clients pin it.
        assert!(!d.unpin(i, 3));
        assert_eq!(d.try_remove(i, true), Removal::Pinned);
        d.unpin_for(i, OVERFLOW_BIT);
        assert!(!d.is_pinned(i));
        assert_eq!(d.try_remove(i, true), Removal::Removed);
    }

    #[test]
    fn probing_and_tombstones() {
        let a = arena();
        let d = a.directory();
        let ids: Vec<_> = (0..64).map(|_| ObjectId::random()).collect();
        let slots: Vec<_> = ids
            .iter()
            .map(|id| {
                let i = d.insert(id, a.layout().heap_offset, 1, 0).unwrap();
                d.seal(i);
                i
            })
            .collect();
        for &slot in slots.iter().step_by(2) {
            assert_eq!(d.try_remove(slot, false), Removal::Removed);
        }
        for (n, id) in ids.iter().enumerate() {
            let found = matches!(d.lookup(id), Lookup::Sealed(_));
            assert_eq!(found, n % 2 == 1, "object {n}");
        }
        for &slot in slots.iter().skip(1).step_by(2) {
            assert_eq!(d.try_remove(slot, false), Removal::Removed);
        }
        // Everything removed: every slot is EMPTY again (tombstones were cleaned up).
        for i in 0..d.slots() {
            assert_eq!(
                word_state(d.slot(i).word.load(Ordering::Relaxed)),
                state::EMPTY
            );
        }
    }
}

#[cfg(all(test, loom))]
mod loom_models;
