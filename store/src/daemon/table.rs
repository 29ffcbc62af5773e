//! The object table: the daemon's state machine (objects, LRU, waits, slabs, references,
//! per-client state), behind the daemon's one mutex. Everything here is synchronous and
//! never blocks: frames for other clients go to an [`Outbox`] sent after the lock is released,
//! notices to a client's ring are non-blocking pushes.
//!
//! Pins of overflow clients (indices past `Layout::pin_clients`, which have no pin bit of their
//! own) are kept here: per object a count (`Entry::overflow_pins`), per client the objects it
//! pins (`ClientState::pins`), and the slot's `OVERFLOW_BIT` set while the count is not 0;
//! `Table::pin` and `Table::unpin` route a client's pin to its bit or to these. Nothing on a
//! request's path is O(clients): departed clients and subscribers are kept in their own sets.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::Conn;
use crate::blocks::alloc::Allocator;
use crate::blocks::id::ObjectId;
use crate::blocks::ring::{Producer, RingError};
use crate::blocks::shm::{
    Arena, FLAG_ERROR, FLAG_REFCOUNTED, OVERFLOW_BIT, POPULATE_MIN, Pages, Removal,
};
use crate::error::{Result, StoreError};
use crate::protocol::{
    DeleteOutcome, Event, NOTICE_LEN, NOTICE_LOST, NOTICE_READY, NOTICE_REJECTED, ObjectInfo,
    ObjectState, Owned, Reply, Request, Stats, encode_notice,
};

/// Bounds of a client slab.
const MIN_SLAB: u64 = 64 << 10;
const MAX_SLAB: u64 = 64 << 20;
/// Client slabs together may take at most this fraction of the heap (1/SLAB_SHARE).
const SLAB_SHARE: u64 = 4;
/// Ids remembered as lost (aborted unsealed), so a late `Watch` still learns of the loss.
const LOST_MEMORY: usize = 1 << 16;

/// The daemon's per-client bounds. Defaults, overridable for tests through the environment
/// (`TROVE_STORE_CLIENT_TIMEOUT_MS`, `TROVE_STORE_MAX_BACKLOG`, `TROVE_STORE_MAX_PENDING`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long a blocking reply write to a client may take before the client is cut off.
    pub client_timeout: Duration,
    /// Notices kept for a client whose ring is full; beyond this it is cut off.
    pub max_backlog: usize,
    /// Ids a client may have the daemon remember before they exist (pending `Hold`s,
    /// `Watch`es and early `Unhold`s, each counted); beyond this it gets `TooManyPending`.
    pub max_pending: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            client_timeout: Duration::from_secs(5),
            max_backlog: 1 << 20,
            max_pending: 1 << 18,
        }
    }
}

impl Limits {
    /// The defaults, with any of the environment overrides that parse.
    pub fn from_env() -> Limits {
        let var = |name: &str| std::env::var(name).ok()?.parse::<u64>().ok();
        let mut l = Limits::default();
        if let Some(ms) = var("TROVE_STORE_CLIENT_TIMEOUT_MS") {
            l.client_timeout = Duration::from_millis(ms.max(1));
        }
        if let Some(n) = var("TROVE_STORE_MAX_BACKLOG") {
            l.max_backlog = n as usize;
        }
        if let Some(n) = var("TROVE_STORE_MAX_PENDING") {
            l.max_pending = n as usize;
        }
        l
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EntryState {
    Creating,
    Sealed,
    DeletePending,
}

pub(super) struct Entry {
    pub(super) slot: u64,
    pub(super) offset: u64,
    size: u64,
    /// Bytes the allocator gave (size rounded up).
    pub(super) alloc_len: u64,
    pub(super) state: EntryState,
    owner: u32,
    /// The connection (`ClientState::session`) that created it: its owner.
    session: u64,
    created: Instant,
    /// The LRU key under which a sealed object sits in `Table::lru`.
    lru_key: u64,
    /// Freed when unreferenced instead of being kept for LRU (see `FLAG_REFCOUNTED`).
    refcounted: bool,
    /// How many live objects contain a reference to this one.
    holders: u32,
    /// Objects this one references (each counted in their `holders`).
    contains: Vec<ObjectId>,
    /// The client slab this object lives in (its memory is the slab's), if any.
    slab: Option<u64>,
    /// How many overflow clients pin it (each lists it in its `ClientState::pins`); the
    /// slot's `OVERFLOW_BIT` is set while this is not 0.
    overflow_pins: u32,
    /// Published as part of a runtime's machinery (`Owned::internal`).
    internal: bool,
}

impl Entry {
    /// A new entry in state CREATING; `slab` for a small object placed in a client slab
    /// (those are always reference-counted).
    #[allow(clippy::too_many_arguments)]
    fn creating(
        slot: u64,
        offset: u64,
        size: u64,
        alloc_len: u64,
        owner: u32,
        session: u64,
        slab: Option<u64>,
    ) -> Entry {
        Entry {
            slot,
            offset,
            size,
            alloc_len,
            state: EntryState::Creating,
            owner,
            session,
            created: Instant::now(),
            lru_key: 0,
            refcounted: slab.is_some(),
            holders: 0,
            contains: Vec::new(),
            slab,
            overflow_pins: 0,
            internal: false,
        }
    }
}

/// A block of the heap granted to one client, which places small objects in it itself.
struct Slab {
    owner: u32,
    len: u64,
    /// One bit per 64-byte granule already given to an object: a granule is used once, so
    /// objects never overlap, whatever order a client's threads publish them in.
    used: Vec<u64>,
    /// Live objects in it, plus the rejected puts it keeps for a client that may still read
    /// them (`ClientState::rejected`).
    live: u32,
    /// The client moved on to another slab (or left): freed when `live` reaches 0.
    retired: bool,
}

pub(super) struct ClientState {
    pub(super) conn: Arc<Conn>,
    pub(super) pid: i32,
    /// The peer process (from its pid at accept): tells when it is gone. `None` if it was
    /// gone already.
    pub(super) pidfd: Option<OwnedFd>,
    /// A number no other connection of this daemon's life has.
    session: u64,
    /// False once its connection has closed: what it may still read (its pins, its creating
    /// objects, its slabs) and its index are kept until its process no longer maps the arena.
    pub(super) connected: bool,
    creating: HashSet<ObjectId>,
    subscribed: bool,
    /// The producer end of this client's notification ring.
    ring: Producer,
    /// Notifications that did not fit in the ring, pushed on `Flush`.
    backlog: VecDeque<[u8; NOTICE_LEN]>,
    max_backlog: usize,
    /// The slab this client currently places small objects in.
    slab: Option<u64>,
    /// Slabs holding a rejected put of this client (one entry per put): their granules are
    /// kept (not counted as used) until the client is gone, since it may have read them.
    rejected: Vec<u64>,
    /// Its entries in `holds`, `watchers` and `early_unholds` (bounded by `max_pending`).
    pending: usize,
    /// The objects this client pins, if it is an overflow client (one without a pin bit of
    /// its own): one pin per object, as a bit would be.
    pins: HashSet<ObjectId>,
}

impl ClientState {
    fn notify(&mut self, kind: u8, id: &ObjectId) {
        if !self.connected {
            return;
        }
        let msg = encode_notice(kind, id);
        if self.backlog.is_empty() {
            match self.ring.try_push(&msg) {
                Ok(()) => return,
                Err(RingError::Full) => {}
                Err(e) => {
                    debug!("notification ring of pid {}: {e}", self.pid);
                    return;
                }
            }
        }
        if self.backlog.len() >= self.max_backlog {
            warn!(
                "pid {} does not read its notifications: disconnecting it",
                self.pid
            );
            self.backlog.clear();
            self.conn.cut_off(None);
            return;
        }
        self.backlog.push_back(msg);
        self.ring.ring().wake_consumer();
    }

    fn flush(&mut self) {
        while let Some(msg) = self.backlog.front() {
            if self.ring.try_push(msg).is_err() {
                self.ring.ring().wake_consumer();
                return;
            }
            self.backlog.pop_front();
        }
    }
}

struct Waiter {
    client: u32,
    req: u64,
    ids: Vec<ObjectId>,
    ready: Vec<bool>,
    remaining: usize,
    deadline: Option<Instant>,
}

pub(super) struct Table {
    alloc: Allocator,
    pub(super) objects: HashMap<ObjectId, Entry>,
    /// Sealed, not delete-pending objects by (last use as last seen, id).
    lru: BTreeSet<(u64, ObjectId)>,
    pending_delete: HashSet<ObjectId>,
    pub(super) clients: HashMap<u32, ClientState>,
    /// Client indices free to give out, lowest first (so pin-bit indices are preferred).
    free_indices: BTreeSet<u32>,
    /// Client indices below this pin with their own bit; the others are overflow clients
    /// whose pins this table keeps (`Entry::overflow_pins`, `ClientState::pins`).
    pin_clients: u32,
    /// Clients whose connection has closed, not removed yet (see [`Table::departed`]).
    departed: BTreeSet<u32>,
    /// Clients that asked for events.
    subscribers: BTreeSet<u32>,
    next_session: u64,
    waiters: HashMap<u64, Waiter>,
    waiting_on: HashMap<ObjectId, Vec<u64>>,
    pub(super) deadlines: BTreeSet<(Instant, u64)>,
    next_waiter: u64,
    evictions: u64,
    max_objects: u64,
    pub(super) limits: Limits,
    slabs: HashMap<u64, Slab>,
    /// Bytes of live slabs, and of the objects in them.
    slab_bytes: u64,
    slab_object_bytes: u64,
    /// `Hold`s of ids not sealed yet: the pin bits are set at seal.
    holds: HashMap<ObjectId, Vec<u32>>,
    /// Clients to notify when an id is sealed or lost.
    watchers: HashMap<ObjectId, Vec<u32>>,
    lost: VecDeque<ObjectId>,
    lost_set: HashSet<ObjectId>,
    /// References from live objects to ids that were not sealed when those objects were:
    /// they become the id's `holders` when it is sealed.
    pending_holders: HashMap<ObjectId, u32>,
    /// Clients that dropped their reference to an id before it was sealed: a `pin_for`
    /// naming them at seal is ignored.
    early_unholds: HashMap<ObjectId, Vec<u32>>,
}

/// Frames to send once the table lock is released.
#[derive(Default)]
pub(super) struct Outbox(pub(super) Vec<(Arc<Conn>, Vec<u8>)>);

impl Outbox {
    pub(super) fn flush(self) {
        for (conn, frame) in self.0 {
            conn.push(&frame);
        }
    }
}

/// The granules of `offset..offset+size` in slab `s` (at `slab_off`) if that range lies in the
/// slab, 64-byte aligned, and none of them was used before.
fn slab_granules(
    slab_off: u64,
    s: &Slab,
    offset: u64,
    size: u64,
) -> Option<std::ops::Range<usize>> {
    let alloc_len = size.max(1).next_multiple_of(64);
    let fits = offset.is_multiple_of(64)
        && offset >= slab_off
        && offset
            .checked_add(alloc_len)
            .is_some_and(|end| end <= slab_off + s.len);
    if !fits {
        return None;
    }
    let first = ((offset - slab_off) / 64) as usize;
    let granules = first..first + (alloc_len / 64) as usize;
    let bit = |g: usize| (s.used[g / 64] >> (g % 64)) & 1 == 1;
    (!granules.clone().any(bit)).then_some(granules)
}

/// One overflow client fewer pins `e` (the caller has taken it out of that client's pins):
/// the last one clears `OVERFLOW_BIT`.
fn drop_overflow_pin(arena: &Arena, e: &mut Entry) {
    e.overflow_pins = e.overflow_pins.saturating_sub(1);
    if e.overflow_pins == 0 {
        arena.directory().unpin_for(e.slot, OVERFLOW_BIT);
    }
}

fn to_reply(r: Result<()>) -> Reply {
    match r {
        Ok(()) => Reply::Ok,
        Err(e) => Reply::error(&e),
    }
}

/// A block just handed out by a create or a slab grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fresh {
    pub(super) offset: u64,
    pub(super) len: u64,
    /// Whether the daemon populates it (else its creator does, a large object on base pages).
    pub(super) daemon_populates: bool,
    pub(super) of: FreshOf,
}

/// What a [`Fresh`] block is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FreshOf {
    Object(ObjectId),
    Slab,
}

/// What handling one request gave.
#[derive(Debug, Default)]
pub(super) struct Handled {
    /// The reply, if one is due now (a parked wait or a one-way frame has none).
    pub(super) reply: Option<Reply>,
    /// A block just handed out: the daemon pre-faults it if the background thread has not
    /// reached it yet, unless its creator does, and moves the background pre-fault ahead of it.
    pub(super) fresh: Option<Fresh>,
    /// A wait was parked: the timer thread must learn its deadline.
    pub(super) parked: bool,
}

impl Table {
    pub(super) fn new(arena: &Arena, limits: Limits) -> Table {
        let layout = arena.layout();
        Table {
            alloc: Allocator::new(layout.heap_offset, layout.heap_len),
            objects: HashMap::new(),
            lru: BTreeSet::new(),
            pending_delete: HashSet::new(),
            clients: HashMap::new(),
            free_indices: (0..layout.max_clients).collect(),
            pin_clients: layout.pin_clients,
            departed: BTreeSet::new(),
            subscribers: BTreeSet::new(),
            next_session: 1,
            waiters: HashMap::new(),
            waiting_on: HashMap::new(),
            deadlines: BTreeSet::new(),
            next_waiter: 1,
            evictions: 0,
            max_objects: layout.dir_slots / 2,
            limits,
            slabs: HashMap::new(),
            slab_bytes: 0,
            slab_object_bytes: 0,
            holds: HashMap::new(),
            watchers: HashMap::new(),
            lost: VecDeque::new(),
            lost_set: HashSet::new(),
            pending_holders: HashMap::new(),
            early_unholds: HashMap::new(),
        }
    }

    /// A free client index, if any (given back with [`Table::give_back_index`] if the
    /// client never gets added).
    pub(super) fn take_index(&mut self) -> Option<u32> {
        self.free_indices.pop_first()
    }

    pub(super) fn give_back_index(&mut self, index: u32) {
        self.free_indices.insert(index);
    }

    /// Registers a connected client under an index from [`Table::take_index`].
    pub(super) fn add_client(
        &mut self,
        index: u32,
        conn: Arc<Conn>,
        pid: i32,
        pidfd: Option<OwnedFd>,
        ring: Producer,
    ) {
        let session = self.next_session;
        self.next_session += 1;
        self.clients.insert(
            index,
            ClientState {
                conn,
                pid,
                pidfd,
                session,
                connected: true,
                creating: HashSet::new(),
                subscribed: false,
                ring,
                backlog: VecDeque::new(),
                max_backlog: self.limits.max_backlog,
                slab: None,
                rejected: Vec::new(),
                pending: 0,
                pins: HashSet::new(),
            },
        );
    }

    /// Pins sealed object `id` for `client`: its own pin bit, or for an overflow client an
    /// entry in its pins, counted in the object's, with `OVERFLOW_BIT` set while any is.
    /// Idempotent, as a bit is. False (nothing done) for an unknown object or client.
    fn pin(&mut self, arena: &Arena, client: u32, id: &ObjectId) -> bool {
        let Some(e) = self.objects.get_mut(id) else {
            return false;
        };
        if client < self.pin_clients {
            arena.directory().pin_for(e.slot, client);
            return true;
        }
        let Some(c) = self.clients.get_mut(&client) else {
            return false;
        };
        if c.pins.insert(*id) {
            e.overflow_pins += 1;
            if e.overflow_pins == 1 {
                arena.directory().pin_for(e.slot, OVERFLOW_BIT);
            }
        }
        true
    }

    /// Drops `client`'s pin on `id` (its bit, or its entry among the overflow pins; the last
    /// of those clears `OVERFLOW_BIT`). Whether the object may be freed now is the caller's
    /// to check ([`Table::release`]).
    fn unpin(&mut self, arena: &Arena, client: u32, id: &ObjectId) {
        let Some(e) = self.objects.get_mut(id) else {
            return;
        };
        if client < self.pin_clients {
            arena.directory().unpin_for(e.slot, client);
            return;
        }
        if self
            .clients
            .get_mut(&client)
            .is_some_and(|c| c.pins.remove(id))
        {
            drop_overflow_pin(arena, e);
        }
    }

    /// Handles one request of `client`.
    pub(super) fn request(
        &mut self,
        arena: &Arena,
        client: u32,
        req: u64,
        request: Request,
        out: &mut Outbox,
    ) -> Handled {
        let mut h = Handled::default();
        // A one-way frame gets no reply: an error there is a client's misbehaviour (or, for
        // `PutSmall`, reported on its notification ring).
        let one_way = req == 0;
        let reply = match request {
            Request::Create { id, size } => Some(match self.create(arena, client, id, size, out) {
                Ok((offset, len)) => {
                    // A large object's creator populates it in its own mapping (see
                    // `StoreClient::create_raw`): its pages are allocated there, in the pass
                    // that fills its page tables, rather than here first. Not pool pages:
                    // they are charged to the hugetlb cgroup of whoever touches them first,
                    // and a limited one (a container that asked for none has 0) makes that
                    // touch a SIGBUS; the store reserved them, so the store allocates them.
                    let creator = size >= POPULATE_MIN && arena.pages() != Pages::HugeTlb;
                    h.fresh = Some(Fresh {
                        offset,
                        len,
                        daemon_populates: !creator,
                        of: FreshOf::Object(id),
                    });
                    Reply::Created { offset }
                }
                Err(e) => Reply::error(&e),
            }),
            Request::Seal { id } => Some(to_reply(self.seal(arena, client, id, out))),
            Request::Abort { id } => Some(to_reply(self.abort(arena, client, id))),
            Request::GiveUp { id } => Some(to_reply(self.give_up(id))),
            Request::Wait { ids, timeout } => {
                let r = self.wait(client, req, ids, timeout);
                h.parked = r.is_none();
                r
            }
            Request::Contains { id } => Some(Reply::Bool(
                self.objects
                    .get(&id)
                    .is_some_and(|e| e.state == EntryState::Sealed),
            )),
            Request::Delete { ids } => Some(Reply::Deleted {
                outcomes: ids
                    .iter()
                    .map(|id| self.delete(arena, client, *id, out))
                    .collect(),
            }),
            Request::List => Some(Reply::Listed {
                objects: self.list(arena),
            }),
            Request::Evict { bytes } => {
                let (count, bytes) = self.evict(arena, bytes, out);
                Some(Reply::Evicted { count, bytes })
            }
            Request::Subscribe => {
                if let Some(c) = self.clients.get_mut(&client) {
                    c.subscribed = true;
                    self.subscribers.insert(client);
                }
                Some(Reply::Ok)
            }
            Request::Release { id } => {
                self.release(arena, id, out);
                Some(Reply::Ok)
            }
            Request::Stats => Some(Reply::Stats(self.stats(arena))),
            Request::Slab { size } => Some(match self.slab(arena, client, size, out) {
                Ok((offset, len)) => {
                    h.fresh = Some(Fresh {
                        offset,
                        len,
                        daemon_populates: true,
                        of: FreshOf::Slab,
                    });
                    Reply::Slab { offset, len }
                }
                Err(e) => Reply::error(&e),
            }),
            Request::PutSmall {
                id,
                offset,
                size,
                owned,
            } => {
                let r = self.put_small(arena, client, id, offset, size, &owned, out);
                if let Err(e) = &r
                    && one_way
                {
                    // The sender trusts the place it wrote: tell it (its ring), and keep the
                    // granules from reuse while it may read them.
                    debug!("client {client}: put of {id} rejected: {e}");
                    self.reject_put(client, id, offset, size);
                }
                Some(to_reply(r))
            }
            Request::SealOwned { id, owned } => {
                Some(to_reply(self.seal_owned(arena, client, id, &owned, out)))
            }
            Request::Hold { id } => Some(to_reply(self.hold(arena, client, id))),
            Request::Unhold { id } => Some(to_reply(self.unhold(arena, client, id, out))),
            Request::Watch { ids } => Some(to_reply(self.watch(client, &ids))),
            Request::Flush => {
                if let Some(c) = self.clients.get_mut(&client) {
                    c.flush();
                }
                Some(Reply::Ok)
            }
            Request::Pin { id } => Some(self.pin_request(arena, client, id)),
        };
        if one_way {
            if let Err(e) = self.bound_error(&reply) {
                // Past a bound on a one-way frame: the client cannot be answered, so it is
                // cut off, told why.
                warn!("client {client}: {e}: cutting it off");
                if let Some(c) = self.clients.get(&client) {
                    c.conn.cut_off(Some(&Reply::error(&e).encode(0)));
                }
            }
            h.reply = None;
        } else {
            h.reply = reply;
        }
        h
    }

    /// The error a reply carries if it is a per-client bound (`TooManyPending`).
    fn bound_error(&self, reply: &Option<Reply>) -> Result<()> {
        match reply {
            Some(Reply::Error {
                code: crate::protocol::ErrorCode::TooManyPending,
                nums,
                ..
            }) => Err(StoreError::TooManyPending {
                what: "ids",
                limit: nums[0] as usize,
            }),
            _ => Ok(()),
        }
    }

    /// A client's connection has closed. What it can no longer be answered about (waits,
    /// watches, pending holds, subscriptions) is forgotten now; what it may still read (its
    /// pins, the objects it is creating, its slabs, its ring and index) stays until
    /// [`Table::remove_client`], once its process no longer maps the arena.
    pub(super) fn depart(&mut self, index: u32) {
        let Some(c) = self.clients.get_mut(&index) else {
            return;
        };
        c.connected = false;
        c.subscribed = false;
        self.subscribers.remove(&index);
        self.departed.insert(index);
        // Its gets see the connection has ended (the ring is set up afresh for the next
        // client at this index).
        c.ring.ring().close();
        c.backlog.clear();
        c.pending = 0;
        let mine: Vec<u64> = self
            .waiters
            .iter()
            .filter(|(_, w)| w.client == index)
            .map(|(k, _)| *k)
            .collect();
        for w in mine {
            self.drop_waiter(w);
        }
        for list in self.holds.values_mut() {
            list.retain(|c| *c != index);
        }
        self.holds.retain(|_, l| !l.is_empty());
        for list in self.watchers.values_mut() {
            list.retain(|c| *c != index);
        }
        self.watchers.retain(|_, l| !l.is_empty());
        for list in self.early_unholds.values_mut() {
            list.retain(|c| *c != index);
        }
        self.early_unholds.retain(|_, l| !l.is_empty());
    }

    /// Clients whose connection has closed and that are not removed yet.
    pub(super) fn departed(&self) -> impl Iterator<Item = (u32, &ClientState)> {
        self.departed
            .iter()
            .filter_map(|i| Some((*i, self.clients.get(i)?)))
    }

    /// Forgets a departed client whose process no longer maps the arena: aborts what it was
    /// creating, drops its pins (pending deletes and unreferenced objects are freed), retires
    /// its slabs and frees its index.
    pub(super) fn remove_client(&mut self, arena: &Arena, index: u32, out: &mut Outbox) {
        self.depart(index);
        self.departed.remove(&index);
        let Some(c) = self.clients.remove(&index) else {
            return;
        };
        for id in c.creating {
            let _ = self.abort(arena, index, id);
        }
        if index >= self.pin_clients {
            // An overflow client: its pins are the ones it lists, O(its pins).
            for id in &c.pins {
                if let Some(e) = self.objects.get_mut(id) {
                    drop_overflow_pin(arena, e);
                }
            }
            for id in c.pins {
                self.release(arena, id, out);
            }
        } else {
            // A client's pin bits can only sit on live entries (a pin on an entry being
            // removed makes the removal fail), so clearing them there is enough: O(objects),
            // not O(directory slots), under the table lock.
            let dir = arena.directory();
            for e in self.objects.values() {
                dir.unpin_for(e.slot, index);
            }
            let pending: Vec<ObjectId> = self.pending_delete.iter().copied().collect();
            for id in pending {
                self.release(arena, id, out);
            }
            let refcounted: Vec<ObjectId> = self
                .objects
                .iter()
                .filter(|(_, e)| e.refcounted)
                .map(|(id, _)| *id)
                .collect();
            for id in refcounted {
                self.check_free(arena, id, out);
            }
        }
        for off in c.rejected {
            if let Some(s) = self.slabs.get_mut(&off) {
                s.live -= 1;
            }
        }
        let mine: Vec<u64> = self
            .slabs
            .iter()
            .filter(|(_, s)| s.owner == index)
            .map(|(o, _)| *o)
            .collect();
        for off in mine {
            self.retire_slab(off);
        }
        self.free_indices.insert(index);
        debug!("client {index} (pid {}) removed", c.pid);
    }

    /// A `Pin`: `client` pins `id` if it is sealed (not delete-pending) and is told where it
    /// is; `NotFound` otherwise, with nothing changed.
    fn pin_request(&mut self, arena: &Arena, client: u32, id: ObjectId) -> Reply {
        let (offset, size, slot) = match self.objects.get(&id) {
            Some(e) if e.state == EntryState::Sealed => (e.offset, e.size, e.slot),
            _ => return Reply::error(&StoreError::NotFound(id)),
        };
        if !self.pin(arena, client, &id) {
            return Reply::error(&StoreError::InvalidRequest("unknown client".into()));
        }
        let dir = arena.directory();
        // A pin refreshes the object's last use, as a client's own pin does.
        dir.touch(slot);
        Reply::Pinned {
            offset,
            size,
            error: dir.is_error(slot),
        }
    }

    /// Whether `client` may have `n` more pending entries.
    fn check_pending(&self, client: u32, n: usize) -> Result<()> {
        let limit = self.limits.max_pending;
        let c = self
            .clients
            .get(&client)
            .ok_or_else(|| StoreError::InvalidRequest("unknown client".into()))?;
        if c.pending + n > limit {
            return Err(StoreError::TooManyPending {
                what: "ids held, watched or unheld before they exist",
                limit,
            });
        }
        Ok(())
    }

    /// Counts new pending entries of `client` against its bound.
    fn count_pending(&mut self, client: u32, n: usize) -> Result<()> {
        self.check_pending(client, n)?;
        if let Some(c) = self.clients.get_mut(&client) {
            c.pending += n;
        }
        Ok(())
    }

    /// Pending entries of these clients went away (one per element).
    fn uncount_pending(&mut self, clients: &[u32]) {
        for i in clients {
            if let Some(c) = self.clients.get_mut(i) {
                c.pending = c.pending.saturating_sub(1);
            }
        }
    }

    /// A `PutSmall` of `client` was refused: its ring says so, and if the range was a free
    /// part of its current slab, those granules are kept from reuse until the client is gone.
    fn reject_put(&mut self, client: u32, id: ObjectId, offset: u64, size: u64) {
        let Some(c) = self.clients.get_mut(&client) else {
            return;
        };
        c.notify(NOTICE_REJECTED, &id);
        let Some(slab_off) = c.slab else {
            return;
        };
        let Some(s) = self.slabs.get_mut(&slab_off) else {
            return;
        };
        let Some(granules) = slab_granules(slab_off, s, offset, size) else {
            return;
        };
        for g in granules {
            s.used[g / 64] |= 1 << (g % 64);
        }
        s.live += 1;
        c.rejected.push(slab_off);
    }

    fn create(
        &mut self,
        arena: &Arena,
        client: u32,
        id: ObjectId,
        size: u64,
        out: &mut Outbox,
    ) -> Result<(u64, u64)> {
        if self.objects.contains_key(&id) {
            return Err(StoreError::AlreadyExists(id));
        }
        let session = self
            .clients
            .get(&client)
            .ok_or_else(|| StoreError::InvalidRequest("unknown client".into()))?
            .session;
        self.make_room_in_directory(arena, out)?;
        let offset = self.allocate(arena, size, out)?;
        let alloc_len = self.alloc.block_len(offset).unwrap_or(size);
        let Some(slot) = arena.directory().insert(&id, offset, size, client) else {
            self.alloc.free(offset);
            return Err(StoreError::DirectoryFull {
                capacity: self.max_objects,
            });
        };
        self.objects.insert(
            id,
            Entry::creating(slot, offset, size, alloc_len, client, session, None),
        );
        if let Some(c) = self.clients.get_mut(&client) {
            c.creating.insert(id);
        }
        Ok((offset, alloc_len))
    }

    fn make_room_in_directory(&mut self, arena: &Arena, out: &mut Outbox) -> Result<()> {
        while self.objects.len() as u64 >= self.max_objects {
            if self.evict_one(arena, out, &mut Vec::new()).is_none() {
                return Err(StoreError::DirectoryFull {
                    capacity: self.max_objects,
                });
            }
        }
        Ok(())
    }

    /// Allocates `size` heap bytes, evicting unpinned LRU objects if needed.
    fn allocate(&mut self, arena: &Arena, size: u64, out: &mut Outbox) -> Result<u64> {
        let capacity = self.alloc.capacity();
        if size > capacity {
            return Err(StoreError::StoreFull {
                requested: size,
                capacity,
                pinned: self.pinned_bytes(arena),
                detail: self.full_detail(arena),
            });
        }
        let mut skipped = Vec::new();
        let offset = loop {
            if let Some(off) = self.alloc.alloc(size) {
                break Some(off);
            }
            if self.evict_one(arena, out, &mut skipped).is_none() {
                break None;
            }
        };
        for k in skipped {
            self.lru.insert(k);
        }
        offset.ok_or_else(|| StoreError::StoreFull {
            requested: size,
            capacity,
            pinned: self.pinned_bytes(arena),
            detail: self.full_detail(arena),
        })
    }

    fn seal(&mut self, arena: &Arena, client: u32, id: ObjectId, out: &mut Outbox) -> Result<()> {
        self.check_sealable(client, id)?;
        self.publish(arena, client, id, None, out);
        Ok(())
    }

    fn seal_owned(
        &mut self,
        arena: &Arena,
        client: u32,
        id: ObjectId,
        owned: &Owned,
        out: &mut Outbox,
    ) -> Result<()> {
        self.check_sealable(client, id)?;
        if self.late_report(&id, owned) {
            self.abort(arena, client, id)?;
            return Err(StoreError::AlreadyExists(id));
        }
        self.publish(arena, client, id, Some(owned), out);
        Ok(())
    }

    /// A failure report (a call's result saying its consumer died) for an id that has been
    /// published and freed, or lost, already: the real result, or the caller's `ObjectLost`,
    /// came first. Accepting it would pin an object for a caller that has let go of that id.
    fn late_report(&self, id: &ObjectId, owned: &Owned) -> bool {
        owned.error && owned.pin_for.is_some() && self.lost_set.contains(id)
    }

    fn check_sealable(&self, client: u32, id: ObjectId) -> Result<()> {
        let e = self.objects.get(&id).ok_or(StoreError::NotFound(id))?;
        if e.state != EntryState::Creating {
            return Err(StoreError::AlreadySealed(id));
        }
        if e.owner != client {
            return Err(StoreError::NotOwner(id));
        }
        Ok(())
    }

    /// Seals a CREATING object: plain (kept for LRU) when `owned` is None, reference
    /// counted otherwise, with the pins of its first holders (the creator if it keeps one, the
    /// client it is for, pending `Hold`s) set before it becomes visible.
    fn publish(
        &mut self,
        arena: &Arena,
        client: u32,
        id: ObjectId,
        owned: Option<&Owned>,
        out: &mut Outbox,
    ) {
        let mut pins = self.holds.remove(&id).unwrap_or_default();
        self.uncount_pending(&pins);
        let early = self.early_unholds.remove(&id).unwrap_or_default();
        self.uncount_pending(&early);
        let mut contains = Vec::new();
        let mut flags = 0;
        let internal = owned.is_some_and(|o| o.internal);
        if let Some(o) = owned {
            flags |= FLAG_REFCOUNTED;
            if o.error {
                flags |= FLAG_ERROR;
            }
            if o.keep {
                pins.push(client);
            }
            if let Some((index, pid)) = o.pin_for
                && self
                    .clients
                    .get(&index)
                    .is_some_and(|c| c.connected && c.pid as u32 == pid)
                && !early.contains(&index)
            {
                pins.push(index);
            }
            for i in &o.contained {
                match self.objects.get_mut(i) {
                    Some(ie) if ie.state == EntryState::Sealed && ie.refcounted => {
                        ie.holders += 1;
                        contains.push(*i);
                    }
                    Some(ie) if ie.state == EntryState::Sealed => {}
                    // Not sealed yet (a result still being computed, say): counted when it is.
                    _ if !self.lost_set.contains(i) => {
                        *self.pending_holders.entry(*i).or_default() += 1;
                        contains.push(*i);
                    }
                    _ => {}
                }
            }
        }
        let refcounted = owned.is_some();
        let Some(e) = self.objects.get_mut(&id) else {
            return;
        };
        // Overflow clients' pins are counted here, and stand as `OVERFLOW_BIT` in the slot.
        let pin_clients = self.pin_clients;
        let mut bits: Vec<u32> = Vec::with_capacity(pins.len() + 1);
        for c in pins {
            if c < pin_clients {
                bits.push(c);
            } else if self
                .clients
                .get_mut(&c)
                .is_some_and(|cs| cs.pins.insert(id))
            {
                e.overflow_pins += 1;
            }
        }
        if e.overflow_pins > 0 {
            bits.push(OVERFLOW_BIT);
        }
        arena.directory().seal_with(e.slot, flags, &bits);
        e.state = EntryState::Sealed;
        e.refcounted = refcounted;
        e.internal = internal;
        e.contains = contains;
        e.holders = self.pending_holders.remove(&id).unwrap_or(0);
        e.lru_key = arena.directory().last_use(e.slot);
        let (key, size) = ((e.lru_key, id), e.size);
        if !refcounted {
            self.lru.insert(key);
        }
        if let Some(c) = self.clients.get_mut(&client) {
            c.creating.remove(&id);
        }
        if let Some(ws) = self.watchers.remove(&id) {
            self.uncount_pending(&ws);
            for w in ws {
                if let Some(c) = self.clients.get_mut(&w) {
                    c.notify(NOTICE_READY, &id);
                }
            }
        }
        if let Some(ws) = self.waiting_on.remove(&id) {
            for w in ws {
                let done = match self.waiters.get_mut(&w) {
                    Some(waiter) => {
                        for (i, wid) in waiter.ids.iter().enumerate() {
                            if *wid == id && !waiter.ready[i] {
                                waiter.ready[i] = true;
                                waiter.remaining -= 1;
                            }
                        }
                        waiter.remaining == 0
                    }
                    None => false,
                };
                if done {
                    self.finish_waiter(w, out);
                }
            }
        }
        self.event(Event::Sealed { id, size }, out);
        if refcounted {
            // Nobody may hold it (a result whose caller is gone): free it now.
            self.check_free(arena, id, out);
        }
    }

    /// An id nobody is creating, given up (a call's result its consumer could not store): it
    /// is lost, so its waiters learn that it will never be sealed. An object that exists is
    /// left alone.
    fn give_up(&mut self, id: ObjectId) -> Result<()> {
        match self.objects.get(&id) {
            Some(e) if e.state == EntryState::Sealed => Err(StoreError::AlreadySealed(id)),
            Some(_) => Err(StoreError::AlreadyExists(id)),
            None => {
                self.lost(id);
                Ok(())
            }
        }
    }

    fn abort(&mut self, arena: &Arena, client: u32, id: ObjectId) -> Result<()> {
        let e = self.objects.get(&id).ok_or(StoreError::NotFound(id))?;
        if e.state != EntryState::Creating {
            return Err(StoreError::AlreadySealed(id));
        }
        if e.owner != client {
            return Err(StoreError::NotOwner(id));
        }
        arena.directory().remove_unsealed(e.slot);
        self.alloc.free(e.offset);
        self.objects.remove(&id);
        if let Some(c) = self.clients.get_mut(&client) {
            c.creating.remove(&id);
        }
        self.lost(id);
        Ok(())
    }

    /// Records that `id` will never be sealed and tells its watchers.
    fn lost(&mut self, id: ObjectId) {
        if let Some(list) = self.early_unholds.remove(&id) {
            self.uncount_pending(&list);
        }
        if let Some(list) = self.holds.remove(&id) {
            self.uncount_pending(&list);
        }
        if self.lost_set.insert(id) {
            self.lost.push_back(id);
            if self.lost.len() > LOST_MEMORY
                && let Some(old) = self.lost.pop_front()
            {
                self.lost_set.remove(&old);
            }
        }
        if let Some(ws) = self.watchers.remove(&id) {
            self.uncount_pending(&ws);
            for w in ws {
                if let Some(c) = self.clients.get_mut(&w) {
                    c.notify(NOTICE_LOST, &id);
                }
            }
        }
    }

    fn watch(&mut self, client: u32, ids: &[ObjectId]) -> Result<()> {
        // Checked up front against the most it could add, so a refused `Watch` changes nothing.
        self.check_pending(client, ids.len())?;
        for id in ids {
            let kind = match self.objects.get(id) {
                Some(e) if e.state == EntryState::Sealed => Some(NOTICE_READY),
                Some(_) => None,
                None if self.lost_set.contains(id) => Some(NOTICE_LOST),
                None => None,
            };
            match kind {
                Some(k) => {
                    if let Some(c) = self.clients.get_mut(&client) {
                        c.notify(k, id);
                    }
                }
                None => {
                    let list = self.watchers.entry(*id).or_default();
                    if !list.contains(&client) {
                        list.push(client);
                        if let Some(c) = self.clients.get_mut(&client) {
                            c.pending += 1;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn hold(&mut self, arena: &Arena, client: u32, id: ObjectId) -> Result<()> {
        match self.objects.get(&id) {
            Some(e) if e.state == EntryState::Sealed => {
                self.pin(arena, client, &id);
            }
            _ if self.lost_set.contains(&id) => {}
            _ => {
                if self.holds.get(&id).is_some_and(|l| l.contains(&client)) {
                    return Ok(());
                }
                self.count_pending(client, 1)?;
                self.holds.entry(id).or_default().push(client);
            }
        }
        Ok(())
    }

    fn unhold(&mut self, arena: &Arena, client: u32, id: ObjectId, out: &mut Outbox) -> Result<()> {
        if let Some(list) = self.holds.get_mut(&id)
            && let Some(at) = list.iter().position(|c| *c == client)
        {
            list.swap_remove(at);
            if list.is_empty() {
                self.holds.remove(&id);
            }
            self.uncount_pending(&[client]);
        }
        match self.objects.get(&id) {
            Some(e) if e.state != EntryState::Creating => {
                self.unpin(arena, client, &id);
                self.release(arena, id, out);
            }
            _ if self.lost_set.contains(&id) => {}
            _ => {
                if self
                    .early_unholds
                    .get(&id)
                    .is_some_and(|l| l.contains(&client))
                {
                    return Ok(());
                }
                self.count_pending(client, 1)?;
                self.early_unholds.entry(id).or_default().push(client);
            }
        }
        Ok(())
    }

    /// Grants `client` a new slab; its previous one is retired.
    fn slab(
        &mut self,
        arena: &Arena,
        client: u32,
        size: u64,
        out: &mut Outbox,
    ) -> Result<(u64, u64)> {
        if !self.clients.contains_key(&client) {
            return Err(StoreError::InvalidRequest("unknown client".into()));
        }
        // Slabs may take at most a share of the heap, split among the connected clients: a
        // slab is freed only once every object in it is gone, so a thousand clients that each
        // leave one small object behind would otherwise hold a thousand whole slabs. Past the
        // budget the client has the daemon place its small objects (`create_owned`).
        let budget = (self.alloc.capacity() / SLAB_SHARE).max(MIN_SLAB);
        let clients = self.clients.values().filter(|c| c.connected).count().max(1) as u64;
        let fair = 1u64 << (budget / clients).max(MIN_SLAB).ilog2();
        let size = size.clamp(MIN_SLAB, MAX_SLAB).min(fair);
        if self.slab_bytes + size > budget {
            return Err(StoreError::StoreFull {
                requested: size,
                capacity: self.alloc.capacity(),
                pinned: self.pinned_bytes(arena),
                detail: format!(
                    "client slabs hold {} of their budget {}",
                    crate::blocks::size::format_size(self.slab_bytes),
                    crate::blocks::size::format_size(budget)
                ),
            });
        }
        let offset = self.allocate(arena, size, out)?;
        let len = self.alloc.block_len(offset).unwrap_or(size);
        self.slab_bytes += len;
        self.slabs.insert(
            offset,
            Slab {
                owner: client,
                len,
                used: vec![0; (len / 64).div_ceil(64) as usize],
                live: 0,
                retired: false,
            },
        );
        let c = self.clients.get_mut(&client).expect("checked above");
        if let Some(old) = c.slab.replace(offset) {
            self.retire_slab(old);
        }
        Ok((offset, len))
    }

    /// Takes back a block just handed out whose pages could not be allocated (see
    /// `Shared::handle`): the object being created is aborted, the slab retired.
    pub(super) fn give_back(&mut self, arena: &Arena, client: u32, fresh: &Fresh) {
        match fresh.of {
            FreshOf::Object(id) => {
                let _ = self.abort(arena, client, id);
            }
            FreshOf::Slab => {
                if let Some(c) = self.clients.get_mut(&client)
                    && c.slab == Some(fresh.offset)
                {
                    c.slab = None;
                }
                self.retire_slab(fresh.offset);
            }
        }
    }

    fn retire_slab(&mut self, offset: u64) {
        let Some(s) = self.slabs.get_mut(&offset) else {
            return;
        };
        s.retired = true;
        if s.live == 0 {
            let len = s.len;
            self.slabs.remove(&offset);
            self.slab_bytes -= len;
            self.alloc.free(offset);
        }
    }

    /// A small object the client wrote into its current slab: checked, then published.
    #[allow(clippy::too_many_arguments)]
    fn put_small(
        &mut self,
        arena: &Arena,
        client: u32,
        id: ObjectId,
        offset: u64,
        size: u64,
        owned: &Owned,
        out: &mut Outbox,
    ) -> Result<()> {
        if self.objects.contains_key(&id) || self.late_report(&id, owned) {
            return Err(StoreError::AlreadyExists(id));
        }
        let (slab_off, session) = self
            .clients
            .get(&client)
            .and_then(|c| Some((c.slab?, c.session)))
            .ok_or_else(|| StoreError::InvalidRequest("no slab granted".into()))?;
        let alloc_len = size.max(1).next_multiple_of(64);
        let granules = self
            .slabs
            .get(&slab_off)
            .and_then(|s| slab_granules(slab_off, s, offset, size))
            .ok_or_else(|| {
                StoreError::InvalidRequest(format!(
                    "object at {offset}+{size} is not in the free part of the client's slab"
                ))
            })?;
        self.make_room_in_directory(arena, out)?;
        let slot = arena.directory().insert(&id, offset, size, client).ok_or(
            StoreError::DirectoryFull {
                capacity: self.max_objects,
            },
        )?;
        let s = self.slabs.get_mut(&slab_off).expect("checked above");
        for g in granules {
            s.used[g / 64] |= 1 << (g % 64);
        }
        s.live += 1;
        self.slab_object_bytes += alloc_len;
        self.objects.insert(
            id,
            Entry::creating(
                slot,
                offset,
                size,
                alloc_len,
                client,
                session,
                Some(slab_off),
            ),
        );
        self.publish(arena, client, id, Some(owned), out);
        Ok(())
    }

    /// Frees a reference-counted object that nothing references any more (and, in turn,
    /// what only it referenced).
    fn check_free(&mut self, arena: &Arena, id: ObjectId, out: &mut Outbox) {
        let mut work = vec![id];
        while let Some(id) = work.pop() {
            let Some(e) = self.objects.get(&id) else {
                continue;
            };
            if !e.refcounted
                || e.state != EntryState::Sealed
                || e.holders > 0
                || arena.directory().is_pinned(e.slot)
            {
                continue;
            }
            if arena.directory().try_remove(e.slot, false) != Removal::Removed {
                continue;
            }
            let contained = self.free_entry(id, out);
            work.extend(self.unref(contained));
        }
    }

    /// Drops one holder of each id (references from an object just freed); returns the sealed
    /// ones that are left without holders.
    fn unref(&mut self, ids: Vec<ObjectId>) -> Vec<ObjectId> {
        let mut unheld = Vec::new();
        for i in ids {
            match self.objects.get_mut(&i) {
                Some(ie) if ie.state != EntryState::Creating => {
                    ie.holders = ie.holders.saturating_sub(1);
                    if ie.holders == 0 {
                        unheld.push(i);
                    }
                }
                _ => {
                    if let Some(n) = self.pending_holders.get_mut(&i) {
                        *n -= 1;
                        if *n == 0 {
                            self.pending_holders.remove(&i);
                        }
                    }
                }
            }
        }
        unheld
    }

    fn wait(
        &mut self,
        client: u32,
        req: u64,
        ids: Vec<ObjectId>,
        timeout: Option<Duration>,
    ) -> Option<Reply> {
        let ready: Vec<bool> = ids
            .iter()
            .map(|id| {
                self.objects
                    .get(id)
                    .is_some_and(|e| e.state == EntryState::Sealed)
            })
            .collect();
        let remaining = ready.iter().filter(|r| !**r).count();
        if remaining == 0 || timeout == Some(Duration::ZERO) || req == 0 {
            return Some(Reply::Waited { ready });
        }
        let w = self.next_waiter;
        self.next_waiter += 1;
        let deadline = timeout.map(|t| Instant::now() + t);
        for (id, r) in ids.iter().zip(&ready) {
            if !r {
                let list = self.waiting_on.entry(*id).or_default();
                if !list.contains(&w) {
                    list.push(w);
                }
            }
        }
        if let Some(d) = deadline {
            self.deadlines.insert((d, w));
        }
        self.waiters.insert(
            w,
            Waiter {
                client,
                req,
                ids,
                ready,
                remaining,
                deadline,
            },
        );
        None
    }

    /// Removes a waiter from every index without replying.
    fn drop_waiter(&mut self, w: u64) -> Option<Waiter> {
        let waiter = self.waiters.remove(&w)?;
        for id in &waiter.ids {
            if let Some(list) = self.waiting_on.get_mut(id) {
                list.retain(|x| *x != w);
                if list.is_empty() {
                    self.waiting_on.remove(id);
                }
            }
        }
        if let Some(d) = waiter.deadline {
            self.deadlines.remove(&(d, w));
        }
        Some(waiter)
    }

    /// Replies to a waiter with what is ready now and forgets it.
    pub(super) fn finish_waiter(&mut self, w: u64, out: &mut Outbox) {
        let Some(waiter) = self.drop_waiter(w) else {
            return;
        };
        if let Some(c) = self.clients.get(&waiter.client) {
            out.0.push((
                c.conn.clone(),
                Reply::Waited {
                    ready: waiter.ready,
                }
                .encode(waiter.req),
            ));
        }
    }

    fn delete(
        &mut self,
        arena: &Arena,
        client: u32,
        id: ObjectId,
        out: &mut Outbox,
    ) -> DeleteOutcome {
        let session = self.clients.get(&client).map(|c| c.session);
        let Some(e) = self.objects.get_mut(&id) else {
            return DeleteOutcome::NotFound;
        };
        if e.refcounted && Some(e.session) != session {
            // Its references decide its life; only its creator may cut that short.
            return DeleteOutcome::NotOwner;
        }
        match e.state {
            EntryState::Creating => DeleteOutcome::NotSealed,
            EntryState::DeletePending => DeleteOutcome::Deferred,
            EntryState::Sealed => {
                let key = (e.lru_key, id);
                match arena.directory().try_remove(e.slot, true) {
                    Removal::Removed => {
                        self.lru.remove(&key);
                        self.free_and_release(arena, id, out);
                        DeleteOutcome::Deleted
                    }
                    Removal::Pinned => {
                        e.state = EntryState::DeletePending;
                        self.lru.remove(&key);
                        self.pending_delete.insert(id);
                        DeleteOutcome::Deferred
                    }
                }
            }
        }
    }

    /// A delete-pending object may have lost its last pin: free it if so.
    fn release(&mut self, arena: &Arena, id: ObjectId, out: &mut Outbox) {
        let Some(e) = self.objects.get(&id) else {
            return;
        };
        if e.state == EntryState::Sealed && e.refcounted {
            return self.check_free(arena, id, out);
        }
        if e.state != EntryState::DeletePending || arena.directory().is_pinned(e.slot) {
            return;
        }
        if arena.directory().try_remove(e.slot, true) == Removal::Removed {
            self.pending_delete.remove(&id);
            self.free_and_release(arena, id, out);
        }
    }

    /// Frees an object, then drops its references to the objects it contained.
    fn free_and_release(&mut self, arena: &Arena, id: ObjectId, out: &mut Outbox) {
        let contained = self.free_entry(id, out);
        for i in self.unref(contained) {
            self.check_free(arena, i, out);
        }
    }

    /// Forgets an object and frees its memory; returns the ids it referenced (their
    /// `holders` are the caller's to decrement).
    fn free_entry(&mut self, id: ObjectId, out: &mut Outbox) -> Vec<ObjectId> {
        let Some(e) = self.objects.remove(&id) else {
            return Vec::new();
        };
        match e.slab {
            Some(slab) => {
                self.slab_object_bytes -= e.alloc_len;
                if let Some(s) = self.slabs.get_mut(&slab) {
                    s.live -= 1;
                    if s.retired && s.live == 0 {
                        self.retire_slab(slab);
                    }
                }
            }
            None => {
                self.alloc.free(e.offset);
            }
        }
        if e.refcounted {
            // Nobody referenced it any more; a late `Watch` learns it is gone, not to wait.
            self.lost(id);
        }
        self.event(Event::Deleted { id }, out);
        e.contains
    }

    /// Evicts the least recently used unpinned sealed object. Pinned candidates are moved to
    /// `skipped` (the caller puts them back). Returns the bytes freed, or None if nothing could go.
    fn evict_one(
        &mut self,
        arena: &Arena,
        out: &mut Outbox,
        skipped: &mut Vec<(u64, ObjectId)>,
    ) -> Option<u64> {
        let dir = arena.directory();
        while let Some((key, id)) = self.lru.pop_first() {
            let Some(e) = self.objects.get_mut(&id) else {
                continue;
            };
            // Clients refresh last_use in shared memory when they pin: honour it lazily.
            let seen = dir.last_use(e.slot);
            if seen > key {
                e.lru_key = seen;
                self.lru.insert((seen, id));
                continue;
            }
            match dir.try_remove(e.slot, false) {
                Removal::Removed => {
                    let bytes = e.alloc_len;
                    self.evictions += 1;
                    self.free_and_release(arena, id, out);
                    return Some(bytes);
                }
                Removal::Pinned => skipped.push((key, id)),
            }
        }
        None
    }

    fn evict(&mut self, arena: &Arena, bytes: u64, out: &mut Outbox) -> (u64, u64) {
        let (mut count, mut freed) = (0, 0);
        let mut skipped = Vec::new();
        while freed < bytes {
            match self.evict_one(arena, out, &mut skipped) {
                Some(b) => {
                    count += 1;
                    freed += b;
                }
                None => break,
            }
        }
        for k in skipped {
            self.lru.insert(k);
        }
        (count, freed)
    }

    /// Bytes of live objects: the heap's allocations, slabs counted by the objects in them.
    fn used_bytes(&self) -> u64 {
        self.alloc.used() - self.slab_bytes + self.slab_object_bytes
    }

    fn pinned_bytes(&self, arena: &Arena) -> u64 {
        let dir = arena.directory();
        self.objects
            .values()
            .filter(|e| e.state != EntryState::Sealed || dir.is_pinned(e.slot))
            .map(|e| e.alloc_len)
            .sum()
    }

    /// What a full store holds that cannot be evicted, and whose (for `StoreFull`): the bytes
    /// used, a runtime's own machinery (`Owned::internal`: mailboxes, queues), objects being
    /// created, and the rest by the processes that pin it (largest first; an object pinned
    /// by several counts for each), or kept only by references inside other objects.
    fn full_detail(&self, arena: &Arena) -> String {
        use crate::blocks::size::format_size as fmt_size;
        let dir = arena.directory();
        let (mut internal, mut internal_n, mut creating, mut contained) = (0u64, 0u64, 0u64, 0u64);
        let mut by_pid: HashMap<i32, u64> = HashMap::new();
        for (id, e) in &self.objects {
            if e.state != EntryState::Sealed {
                creating += e.alloc_len;
                continue;
            }
            let pinners = dir.pinners(e.slot);
            if pinners.is_empty() {
                if e.holders > 0 {
                    contained += e.alloc_len;
                }
                continue;
            }
            if e.internal {
                internal += e.alloc_len;
                internal_n += 1;
                continue;
            }
            for index in pinners {
                if index == OVERFLOW_BIT {
                    for c in self.clients.values().filter(|c| c.pins.contains(id)) {
                        *by_pid.entry(c.pid).or_default() += e.alloc_len;
                    }
                } else if let Some(c) = self.clients.get(&index) {
                    *by_pid.entry(c.pid).or_default() += e.alloc_len;
                }
            }
        }
        let mut pinners: Vec<(i32, u64)> = by_pid.into_iter().collect();
        pinners.sort_by_key(|(pid, bytes)| (std::cmp::Reverse(*bytes), *pid));
        let mut parts = vec![format!(
            "used {}; trove's mailboxes and queues {} in {internal_n} objects",
            fmt_size(self.used_bytes()),
            fmt_size(internal)
        )];
        if creating > 0 {
            parts.push(format!("being created {}", fmt_size(creating)));
        }
        if self.slab_bytes > 0 {
            parts.push(format!(
                "client slabs {} (objects in them {})",
                fmt_size(self.slab_bytes),
                fmt_size(self.slab_object_bytes)
            ));
        }
        if contained > 0 {
            parts.push(format!(
                "kept by references in other objects {}",
                fmt_size(contained)
            ));
        }
        if pinners.is_empty() {
            parts.push("no object pinned by a process".into());
        } else {
            let shown: Vec<String> = pinners
                .iter()
                .take(4)
                .map(|(pid, b)| format!("pid {pid} {}", fmt_size(*b)))
                .collect();
            let rest: u64 = pinners.iter().skip(4).map(|(_, b)| b).sum();
            let mut line = format!("pinned by {}", shown.join(", "));
            if pinners.len() > 4 {
                line.push_str(&format!(", {} more {}", pinners.len() - 4, fmt_size(rest)));
            }
            parts.push(line);
        }
        parts.join("; ")
    }

    fn list(&self, arena: &Arena) -> Vec<ObjectInfo> {
        let dir = arena.directory();
        let mut v: Vec<ObjectInfo> = self
            .objects
            .iter()
            .map(|(id, e)| ObjectInfo {
                id: *id,
                size: e.size,
                state: match e.state {
                    EntryState::Creating => ObjectState::Creating,
                    EntryState::Sealed => ObjectState::Sealed,
                    EntryState::DeletePending => ObjectState::DeletePending,
                },
                // The overflow clients' pins stand as one bit in the slot.
                pins: dir.pin_count(e.slot) - u32::from(e.overflow_pins > 0) + e.overflow_pins,
                age: e.created.elapsed(),
                owner: e.owner,
            })
            .collect();
        v.sort_by_key(|o| std::cmp::Reverse(o.age));
        v
    }

    fn stats(&self, arena: &Arena) -> Stats {
        Stats {
            capacity: self.alloc.capacity(),
            used: self.used_bytes(),
            reserved: self.slab_bytes - self.slab_object_bytes,
            pinned: self.pinned_bytes(arena),
            objects: self.objects.len() as u64,
            sealed: self
                .objects
                .values()
                .filter(|e| e.state == EntryState::Sealed)
                .count() as u64,
            clients: self.clients.len().saturating_sub(self.departed.len()) as u64,
            evictions: self.evictions,
        }
    }

    fn event(&self, ev: Event, out: &mut Outbox) {
        let mut frame = None;
        for c in self.subscribers.iter().filter_map(|i| self.clients.get(i)) {
            let f = frame.get_or_insert_with(|| Reply::Event(ev).encode(0));
            out.0.push((c.conn.clone(), f.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::blocks::shm::{Layout, Lookup};
    use crate::protocol::ErrorCode;

    /// A table over a real (in-process) arena, with clients whose far ends are kept open.
    struct Fx {
        arena: Arena,
        t: Table,
        peers: Vec<UnixStream>,
    }

    impl Fx {
        fn new(limits: Limits) -> Fx {
            Fx::with_layout(Layout::new(8 << 20, 256).unwrap(), limits)
        }

        fn with_layout(layout: Layout, limits: Limits) -> Fx {
            let arena = Arena::create(layout).unwrap();
            let t = Table::new(&arena, limits);
            Fx {
                arena,
                t,
                peers: Vec::new(),
            }
        }

        fn connect(&mut self) -> u32 {
            let (a, b) = UnixStream::pair().unwrap();
            let i = self.t.take_index().unwrap();
            let ring = self.arena.init_ring(i).unwrap().producer();
            self.t.add_client(i, Arc::new(Conn::new(a)), 1, None, ring);
            self.peers.push(b);
            i
        }

        fn req(&mut self, c: u32, r: Request) -> Reply {
            let mut out = Outbox::default();
            let h = self.t.request(&self.arena, c, 7, r, &mut out);
            h.reply.expect("a reply")
        }

        fn one_way(&mut self, c: u32, r: Request) {
            let mut out = Outbox::default();
            assert!(
                self.t
                    .request(&self.arena, c, 0, r, &mut out)
                    .reply
                    .is_none()
            );
        }

        fn stats(&mut self) -> Stats {
            match self.req(0, Request::Stats) {
                Reply::Stats(s) => s,
                r => panic!("{r:?}"),
            }
        }

        /// Used bytes equal the live objects' sizes (rounded to granules).
        fn check_used(&mut self) {
            let live: u64 = self.t.objects.values().map(|e| e.alloc_len).sum();
            let s = self.stats();
            assert_eq!(s.used, live, "{s:?}");
            assert_eq!(s.objects, self.t.objects.len() as u64);
        }

        fn put(&mut self, c: u32, id: ObjectId, size: u64) -> u64 {
            let Reply::Created { offset } = self.req(c, Request::Create { id, size }) else {
                panic!("create failed")
            };
            assert_eq!(self.req(c, Request::Seal { id }), Reply::Ok);
            offset
        }

        fn slot(&self, id: &ObjectId) -> u64 {
            match self.arena.directory().lookup(id) {
                Lookup::Sealed(e) => e.slot,
                other => panic!("{id} is {other:?}"),
            }
        }

        /// What client `c`'s ring holds: (kind, id) notices.
        fn notices(&self, c: u32) -> Vec<(u8, ObjectId)> {
            let mut consumer = self.arena.attach_ring(c).unwrap().consumer();
            let mut got = Vec::new();
            while let Ok(Some(())) = consumer.try_pop_with(|m| {
                got.push((m[0], ObjectId(m[1..].try_into().unwrap())));
            }) {}
            got
        }
    }

    fn code(r: &Reply) -> Option<ErrorCode> {
        match r {
            Reply::Error { code, .. } => Some(*code),
            _ => None,
        }
    }

    fn owned(keep: bool, contained: Vec<ObjectId>) -> Owned {
        Owned {
            contained,
            keep,
            ..Owned::default()
        }
    }

    #[test]
    fn an_id_given_up_is_lost_to_its_watchers() {
        let mut f = Fx::new(Limits::default());
        let (a, b) = (f.connect(), f.connect());
        let id = ObjectId::random();
        assert_eq!(f.req(a, Request::Watch { ids: vec![id] }), Reply::Ok);
        // A consumer gives up a result it could not store.
        assert_eq!(f.req(b, Request::GiveUp { id }), Reply::Ok);
        assert_eq!(f.notices(a), vec![(NOTICE_LOST, id)]);
        // A later watcher hears it at once; a sealed object is not given up.
        assert_eq!(f.req(b, Request::Watch { ids: vec![id] }), Reply::Ok);
        assert_eq!(f.notices(b), vec![(NOTICE_LOST, id)]);
        let other = ObjectId::random();
        f.put(a, other, 10);
        assert_eq!(
            code(&f.req(b, Request::GiveUp { id: other })),
            Some(ErrorCode::AlreadySealed)
        );
        let creating = ObjectId::random();
        f.req(
            a,
            Request::Create {
                id: creating,
                size: 10,
            },
        );
        assert_eq!(
            code(&f.req(b, Request::GiveUp { id: creating })),
            Some(ErrorCode::AlreadyExists)
        );
        f.check_used();
    }

    #[test]
    fn create_seal_abort() {
        let mut f = Fx::new(Limits::default());
        let (a, b) = (f.connect(), f.connect());
        let id = ObjectId::random();
        assert!(matches!(
            f.req(a, Request::Create { id, size: 1000 }),
            Reply::Created { .. }
        ));
        assert_eq!(
            code(&f.req(a, Request::Create { id, size: 1 })),
            Some(ErrorCode::AlreadyExists)
        );
        assert_eq!(
            code(&f.req(b, Request::Seal { id })),
            Some(ErrorCode::NotOwner)
        );
        assert_eq!(
            code(&f.req(b, Request::Abort { id })),
            Some(ErrorCode::NotOwner)
        );
        f.check_used();
        assert_eq!(f.req(a, Request::Seal { id }), Reply::Ok);
        assert_eq!(
            code(&f.req(a, Request::Seal { id })),
            Some(ErrorCode::AlreadySealed)
        );
        assert_eq!(f.req(b, Request::Contains { id }), Reply::Bool(true));
        let other = ObjectId::random();
        f.req(
            a,
            Request::Create {
                id: other,
                size: 5000,
            },
        );
        assert_eq!(f.req(a, Request::Abort { id: other }), Reply::Ok);
        assert_eq!(
            f.req(b, Request::Contains { id: other }),
            Reply::Bool(false)
        );
        f.check_used();
        assert_eq!(f.stats().objects, 1);
    }

    #[test]
    fn a_late_failure_report_for_a_freed_result_is_refused() {
        let mut f = Fx::new(Limits::default());
        let (callee, caller, reaper) = (f.connect(), f.connect(), f.connect());
        let slab = |f: &mut Fx, c| match f.req(c, Request::Slab { size: 1 << 20 }) {
            Reply::Slab { offset, .. } => offset,
            r => panic!("{r:?}"),
        };
        let (at, rat) = (slab(&mut f, callee), slab(&mut f, reaper));
        let result = |error| Owned {
            error,
            pin_for: Some((caller, 1)),
            ..Owned::default()
        };
        // The callee's result reaches its caller, who reads it and lets go: freed.
        let r = ObjectId::random();
        let put = |id, offset, error| Request::PutSmall {
            id,
            offset,
            size: 19,
            owned: result(error),
        };
        f.one_way(callee, put(r, at, false));
        assert!(f.arena.directory().has_pin(f.slot(&r), caller));
        f.one_way(caller, Request::Unhold { id: r });
        assert_eq!(f.stats().objects, 0);
        // The reaper, thinking the callee died owing it, reports a failure: refused, nothing
        // pinned for a caller that has let go.
        f.one_way(reaper, put(r, rat, true));
        assert_eq!(f.stats().objects, 0, "a late report was accepted");
        assert_eq!(f.notices(reaper), vec![(NOTICE_REJECTED, r)]);
        // A report for a result nobody made yet is the caller's answer: accepted.
        let q = ObjectId::random();
        f.one_way(reaper, put(q, rat + 64, true));
        assert!(f.arena.directory().has_pin(f.slot(&q), caller));
        f.check_used();
    }

    #[test]
    fn put_small_and_a_rejected_put() {
        let mut f = Fx::new(Limits::default());
        let (a, b) = (f.connect(), f.connect());
        let Reply::Slab { offset, len } = f.req(a, Request::Slab { size: 1 << 20 }) else {
            panic!("no slab")
        };
        assert!(len >= 1 << 20);
        let x = ObjectId::random();
        f.one_way(
            a,
            Request::PutSmall {
                id: x,
                offset,
                size: 100,
                owned: owned(true, vec![]),
            },
        );
        let slot = f.slot(&x);
        assert!(
            f.arena.directory().has_pin(slot, a),
            "the creator keeps a ref"
        );
        f.check_used();
        assert_eq!(f.stats().used, 128);
        // The same granules again, under another id: rejected, reported on the ring.
        let y = ObjectId::random();
        f.one_way(
            a,
            Request::PutSmall {
                id: y,
                offset,
                size: 10,
                owned: owned(true, vec![]),
            },
        );
        // An existing id in the free part: rejected too, and those granules are kept.
        f.one_way(
            a,
            Request::PutSmall {
                id: x,
                offset: offset + 128,
                size: 64,
                owned: owned(true, vec![]),
            },
        );
        assert_eq!(
            f.notices(a),
            vec![(NOTICE_REJECTED, y), (NOTICE_REJECTED, x)]
        );
        assert_eq!(f.t.clients[&a].rejected.len(), 1);
        f.check_used();
        // The granules of the rejected put are not given to a later put.
        let z = ObjectId::random();
        f.one_way(
            a,
            Request::PutSmall {
                id: z,
                offset: offset + 128,
                size: 64,
                owned: owned(true, vec![]),
            },
        );
        assert_eq!(f.notices(a), vec![(NOTICE_REJECTED, z)]);
        // A put with a reply gets the error itself, and no notice.
        assert_eq!(
            code(&f.req(
                b,
                Request::PutSmall {
                    id: z,
                    offset,
                    size: 1,
                    owned: owned(true, vec![]),
                }
            )),
            Some(ErrorCode::InvalidRequest)
        );
        // The creator's last pin goes: the object is freed.
        f.arena.directory().unpin(slot, a);
        f.req(a, Request::Release { id: x });
        assert_eq!(f.stats().objects, 0);
        f.check_used();
        // Departure frees the slab, the rejected put's granules with it.
        f.t.remove_client(&f.arena, a, &mut Outbox::default());
        let s = f.stats();
        assert_eq!((s.used, s.reserved), (0, 0), "{s:?}");
    }

    #[test]
    fn holds_before_seal_and_pending_holders() {
        let mut f = Fx::new(Limits::default());
        let (a, b) = (f.connect(), f.connect());
        let x = ObjectId::random();
        // B holds X before it exists; A creates it and publishes it without a ref of its own.
        f.one_way(b, Request::Hold { id: x });
        assert_eq!(f.t.clients[&b].pending, 1);
        f.req(a, Request::Create { id: x, size: 64 });
        // Y contains X while X is not sealed yet: counted when X is.
        let y = ObjectId::random();
        f.req(a, Request::Create { id: y, size: 64 });
        assert_eq!(
            f.req(
                a,
                Request::SealOwned {
                    id: y,
                    owned: owned(true, vec![x]),
                }
            ),
            Reply::Ok
        );
        assert_eq!(f.t.pending_holders.get(&x), Some(&1));
        assert_eq!(
            f.req(
                a,
                Request::SealOwned {
                    id: x,
                    owned: owned(false, vec![]),
                }
            ),
            Reply::Ok
        );
        assert_eq!(f.t.clients[&b].pending, 0);
        let sx = f.slot(&x);
        assert!(f.arena.directory().has_pin(sx, b));
        assert_eq!(f.t.objects[&x].holders, 1);
        // B lets go: X lives on, held by Y.
        f.one_way(b, Request::Unhold { id: x });
        assert_eq!(f.stats().objects, 2);
        // A lets go of Y: Y is freed, then X.
        let sy = f.slot(&y);
        f.arena.directory().unpin(sy, a);
        f.req(a, Request::Release { id: y });
        assert_eq!(f.stats().objects, 0);
        f.check_used();
        // An Unhold before the object exists: a pin_for naming B at seal is ignored.
        let z = ObjectId::random();
        f.one_way(b, Request::Unhold { id: z });
        assert_eq!(f.t.clients[&b].pending, 1);
        f.req(a, Request::Create { id: z, size: 64 });
        f.req(
            a,
            Request::SealOwned {
                id: z,
                owned: Owned {
                    pin_for: Some((b, 1)),
                    ..Owned::default()
                },
            },
        );
        assert_eq!(f.t.clients[&b].pending, 0);
        assert_eq!(f.stats().objects, 0, "nobody holds it: freed at seal");
    }

    #[test]
    fn delete_is_deferred_by_pins() {
        let mut f = Fx::new(Limits::default());
        let (a, b) = (f.connect(), f.connect());
        let x = ObjectId::random();
        f.put(a, x, 300);
        let slot = f.slot(&x);
        f.arena.directory().pin_for(slot, b);
        assert_eq!(
            f.req(a, Request::Delete { ids: vec![x] }),
            Reply::Deleted {
                outcomes: vec![DeleteOutcome::Deferred]
            }
        );
        assert_eq!(f.t.list(&f.arena)[0].state, ObjectState::DeletePending);
        assert_eq!(f.arena.directory().lookup(&x), Lookup::Absent);
        // Still there until the last pin goes.
        assert_eq!(f.stats().objects, 1);
        assert!(f.arena.directory().unpin(slot, b));
        f.req(b, Request::Release { id: x });
        assert_eq!(f.stats().objects, 0);
        f.check_used();
    }

    #[test]
    fn eviction_goes_in_lru_order_and_skips_pinned() {
        let mut f = Fx::new(Limits::default());
        let a = f.connect();
        let ids: Vec<ObjectId> = (0..4).map(|_| ObjectId::random()).collect();
        for id in &ids {
            f.put(a, *id, 1000);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // The oldest is pinned; the second is used again (a client's pin refreshes last use).
        let s0 = f.slot(&ids[0]);
        f.arena.directory().pin_for(s0, a);
        let s1 = f.slot(&ids[1]);
        f.arena.directory().touch(s1);
        assert_eq!(
            f.req(a, Request::Evict { bytes: 1 }),
            Reply::Evicted {
                count: 1,
                bytes: 1024
            }
        );
        let left: Vec<ObjectId> = f.t.list(&f.arena).iter().map(|o| o.id).collect();
        assert!(
            !left.contains(&ids[2]),
            "the least recently used unpinned goes first"
        );
        f.req(a, Request::Evict { bytes: 1 });
        let left: Vec<ObjectId> = f.t.list(&f.arena).iter().map(|o| o.id).collect();
        assert!(!left.contains(&ids[3]));
        assert!(left.contains(&ids[0]) && left.contains(&ids[1]));
        f.req(a, Request::Evict { bytes: u64::MAX });
        let left: Vec<ObjectId> = f.t.list(&f.arena).iter().map(|o| o.id).collect();
        assert_eq!(left, vec![ids[0]], "only the pinned one is left");
        f.check_used();
    }

    #[test]
    fn departure_keeps_what_a_live_process_may_read_until_removed() {
        let mut f = Fx::new(Limits::default());
        let (a, b) = (f.connect(), f.connect());
        let x = ObjectId::random();
        f.put(a, x, 100);
        let slot = f.slot(&x);
        f.arena.directory().pin_for(slot, b);
        let creating = ObjectId::random();
        f.req(
            b,
            Request::Create {
                id: creating,
                size: 100,
            },
        );
        let w = ObjectId::random();
        f.one_way(b, Request::Hold { id: w });
        f.req(a, Request::Delete { ids: vec![x] });
        // B's connection closes but its process may still read: pins, creating objects and
        // index are kept; what it asked for (holds) is forgotten.
        f.t.depart(b);
        assert_eq!(f.stats().clients, 1);
        assert!(f.arena.directory().has_pin(slot, b));
        assert_eq!(f.stats().objects, 2);
        assert!(f.t.holds.is_empty());
        assert_ne!(f.t.take_index(), Some(b), "a departed index is not reused");
        assert_eq!(f.t.departed().map(|(i, _)| i).collect::<Vec<_>>(), vec![b]);
        // Once it is gone: its pin goes (the deferred delete completes) and its creation is
        // aborted.
        f.t.remove_client(&f.arena, b, &mut Outbox::default());
        assert_eq!(f.stats().objects, 0);
        f.check_used();
        assert!(f.t.free_indices.contains(&b));
    }

    #[test]
    fn pending_ids_are_bounded_per_client() {
        let mut f = Fx::new(Limits {
            max_pending: 3,
            ..Limits::default()
        });
        let (a, b) = (f.connect(), f.connect());
        let ids: Vec<ObjectId> = (0..5).map(|_| ObjectId::random()).collect();
        for id in &ids[..2] {
            assert_eq!(f.req(a, Request::Hold { id: *id }), Reply::Ok);
        }
        // The same id again is not a new entry.
        assert_eq!(f.req(a, Request::Hold { id: ids[0] }), Reply::Ok);
        assert_eq!(f.req(a, Request::Unhold { id: ids[2] }), Reply::Ok);
        assert_eq!(f.t.clients[&a].pending, 3);
        assert_eq!(
            code(&f.req(a, Request::Hold { id: ids[3] })),
            Some(ErrorCode::TooManyPending)
        );
        // A Watch past the bound changes nothing.
        assert_eq!(
            code(&f.req(
                a,
                Request::Watch {
                    ids: vec![ids[3], ids[4]]
                }
            )),
            Some(ErrorCode::TooManyPending)
        );
        assert!(f.t.watchers.is_empty());
        // Another client has its own bound.
        assert_eq!(
            f.req(
                b,
                Request::Watch {
                    ids: ids[..3].to_vec()
                }
            ),
            Reply::Ok
        );
        // Entries go when their id is sealed or lost.
        f.req(
            b,
            Request::Create {
                id: ids[0],
                size: 1,
            },
        );
        f.req(b, Request::Abort { id: ids[0] });
        assert_eq!(f.t.clients[&a].pending, 2);
        assert_eq!(f.t.clients[&b].pending, 2);
        assert_eq!(f.notices(b), vec![(NOTICE_LOST, ids[0])]);
        f.put(b, ids[1], 1);
        assert_eq!(f.t.clients[&a].pending, 1);
        assert_eq!(f.t.clients[&b].pending, 1);
        // A one-way frame past the bound cuts the client off (its far end sees the error).
        f.one_way(a, Request::Hold { id: ids[3] });
        f.one_way(a, Request::Hold { id: ids[4] });
        f.one_way(
            a,
            Request::Hold {
                id: ObjectId::random(),
            },
        );
        let mut buf = [0u8; 256];
        let peer = &f.peers[a as usize];
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = std::io::Read::read(&mut &*peer, &mut buf).unwrap();
        let (req, reply) = Reply::decode(&buf[4..n]).unwrap();
        assert_eq!((req, code(&reply)), (0, Some(ErrorCode::TooManyPending)));
    }

    #[test]
    fn owned_objects_are_deleted_by_their_owner_only() {
        let mut f = Fx::new(Limits::default());
        let (a, b) = (f.connect(), f.connect());
        let x = ObjectId::random();
        f.req(a, Request::Create { id: x, size: 64 });
        f.req(
            a,
            Request::SealOwned {
                id: x,
                owned: owned(true, vec![]),
            },
        );
        assert_eq!(
            f.req(b, Request::Delete { ids: vec![x] }),
            Reply::Deleted {
                outcomes: vec![DeleteOutcome::NotOwner]
            }
        );
        assert_eq!(f.t.objects[&x].state, EntryState::Sealed);
        assert!(matches!(f.arena.directory().lookup(&x), Lookup::Sealed(_)));
        // A plain object is a cache entry: anyone may delete it.
        let p = ObjectId::random();
        f.put(a, p, 64);
        assert_eq!(
            f.req(b, Request::Delete { ids: vec![p] }),
            Reply::Deleted {
                outcomes: vec![DeleteOutcome::Deleted]
            }
        );
        // The owner may; its own pin defers it.
        assert_eq!(
            f.req(a, Request::Delete { ids: vec![x] }),
            Reply::Deleted {
                outcomes: vec![DeleteOutcome::Deferred]
            }
        );
        // A new client at the owner's old index is not its owner.
        f.t.remove_client(&f.arena, a, &mut Outbox::default());
        assert_eq!(f.stats().objects, 0);
        let y = ObjectId::random();
        let c = f.connect();
        f.req(c, Request::Create { id: y, size: 64 });
        f.req(
            c,
            Request::SealOwned {
                id: y,
                owned: owned(true, vec![]),
            },
        );
        let sy = f.slot(&y);
        f.arena.directory().pin_for(sy, b);
        f.t.remove_client(&f.arena, c, &mut Outbox::default());
        let d = f.connect();
        assert_eq!(d, c, "the index is free again");
        assert_eq!(
            f.req(d, Request::Delete { ids: vec![y] }),
            Reply::Deleted {
                outcomes: vec![DeleteOutcome::NotOwner]
            }
        );
        assert_eq!(f.stats().objects, 1);
        f.check_used();
    }

    /// A table whose clients 2 and up are overflow clients (no pin bit of their own).
    fn overflow_fx() -> Fx {
        let layout = Layout::with_clients(8 << 20, 256, 8)
            .unwrap()
            .with_pin_clients(2);
        Fx::with_layout(layout, Limits::default())
    }

    fn pinned(f: &mut Fx, c: u32, id: ObjectId) -> (u64, u64) {
        match f.req(c, Request::Pin { id }) {
            Reply::Pinned { offset, size, .. } => (offset, size),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn overflow_pins_are_counted_and_stand_as_one_bit() {
        let mut f = overflow_fx();
        let (a, b, c, d) = (f.connect(), f.connect(), f.connect(), f.connect());
        assert_eq!((a, b, c, d), (0, 1, 2, 3));
        let x = ObjectId::random();
        let offset = f.put(a, x, 300);
        let slot = f.slot(&x);
        // An overflow client's pin: the daemon counts it, the slot shows the overflow bit.
        assert_eq!(pinned(&mut f, c, x), (offset, 300));
        assert!(f.arena.directory().has_pin(slot, OVERFLOW_BIT));
        assert_eq!(f.t.objects[&x].overflow_pins, 1);
        // One pin per client and object, as a bit: a second `Pin` or a `Hold` adds none.
        pinned(&mut f, c, x);
        f.one_way(c, Request::Hold { id: x });
        assert_eq!(f.t.objects[&x].overflow_pins, 1);
        pinned(&mut f, d, x);
        assert_eq!(f.t.objects[&x].overflow_pins, 2);
        // A client with a bit of its own may `Pin` too: its bit.
        pinned(&mut f, b, x);
        assert!(f.arena.directory().has_pin(slot, b));
        assert_eq!(
            f.t.list(&f.arena)[0].pins,
            3,
            "two overflow pins and one bit"
        );
        f.one_way(b, Request::Unhold { id: x });
        // A delete is deferred by the overflow pins ...
        assert_eq!(
            f.req(a, Request::Delete { ids: vec![x] }),
            Reply::Deleted {
                outcomes: vec![DeleteOutcome::Deferred]
            }
        );
        // ... a deleted object cannot be pinned any more, and nothing changes ...
        assert_eq!(
            code(&f.req(b, Request::Pin { id: x })),
            Some(ErrorCode::NotFound)
        );
        f.one_way(c, Request::Unhold { id: x });
        f.one_way(c, Request::Unhold { id: x });
        assert_eq!(f.t.objects[&x].overflow_pins, 1, "one pin per client");
        assert!(f.arena.directory().has_pin(slot, OVERFLOW_BIT));
        assert_eq!(f.stats().objects, 1);
        // ... and completes with the last overflow pin.
        f.one_way(d, Request::Unhold { id: x });
        assert_eq!(f.stats().objects, 0);
        f.check_used();
        assert_eq!(
            code(&f.req(c, Request::Pin { id: x })),
            Some(ErrorCode::NotFound)
        );
        assert!(f.t.clients.values().all(|c| c.pins.is_empty()));
    }

    #[test]
    fn overflow_clients_are_pinned_for_at_seal_and_on_hold() {
        let mut f = overflow_fx();
        let (a, _b, c, d) = (f.connect(), f.connect(), f.connect(), f.connect());
        // A result for overflow client C (`pin_for`), a `Hold` of D before the seal, and the
        // creator's own reference: all set before the object is visible.
        let y = ObjectId::random();
        f.one_way(d, Request::Hold { id: y });
        f.req(a, Request::Create { id: y, size: 64 });
        f.req(
            a,
            Request::SealOwned {
                id: y,
                owned: Owned {
                    keep: true,
                    pin_for: Some((c, 1)),
                    ..Owned::default()
                },
            },
        );
        let sy = f.slot(&y);
        assert_eq!(f.t.objects[&y].overflow_pins, 2);
        assert!(f.arena.directory().has_pin(sy, a));
        assert!(f.arena.directory().has_pin(sy, OVERFLOW_BIT));
        // The creator lets go; then C: D still holds it.
        assert!(
            !f.arena.directory().unpin(sy, a),
            "the overflow bit still pins it"
        );
        f.req(a, Request::Release { id: y });
        f.one_way(c, Request::Unhold { id: y });
        assert_eq!(f.stats().objects, 1);
        // A `Hold` of a sealed object by an overflow client pins it at once.
        let z = ObjectId::random();
        f.req(a, Request::Create { id: z, size: 64 });
        f.req(
            a,
            Request::SealOwned {
                id: z,
                owned: owned(true, vec![]),
            },
        );
        f.one_way(c, Request::Hold { id: z });
        assert_eq!(f.t.objects[&z].overflow_pins, 1);
        let sz = f.slot(&z);
        f.arena.directory().unpin(sz, a);
        f.req(a, Request::Release { id: z });
        assert_eq!(f.stats().objects, 2);
        // D leaves (its process gone): its pin on Y goes, Y is freed; C's on Z stays.
        f.t.depart(d);
        assert_eq!(f.t.objects[&y].overflow_pins, 1, "kept until removed");
        f.t.remove_client(&f.arena, d, &mut Outbox::default());
        assert_eq!(f.stats().objects, 1);
        assert!(!f.t.objects.contains_key(&y));
        f.t.remove_client(&f.arena, c, &mut Outbox::default());
        assert_eq!(f.stats().objects, 0);
        f.check_used();
    }

    #[test]
    fn a_departed_overflow_client_releases_its_pins() {
        let mut f = overflow_fx();
        let (a, c) = (f.connect(), {
            f.connect();
            f.connect()
        });
        let ids: Vec<ObjectId> = (0..3).map(|_| ObjectId::random()).collect();
        for id in &ids {
            f.put(a, *id, 1000);
            pinned(&mut f, c, *id);
        }
        // Another client's bit on one of them stays.
        let s0 = f.slot(&ids[0]);
        f.arena.directory().pin_for(s0, a);
        f.req(a, Request::Delete { ids: ids.clone() });
        assert_eq!(f.stats().objects, 3, "all deferred");
        f.t.depart(c);
        f.t.remove_client(&f.arena, c, &mut Outbox::default());
        assert_eq!(f.stats().objects, 1, "the deferred deletes completed");
        assert!(!f.arena.directory().has_pin(s0, OVERFLOW_BIT));
        assert!(f.arena.directory().unpin(s0, a));
        f.req(a, Request::Release { id: ids[0] });
        assert_eq!(f.stats().objects, 0);
        f.check_used();
    }

    #[test]
    fn client_indices_are_given_lowest_first_up_to_max_clients() {
        let mut f = overflow_fx();
        let all: Vec<u32> = (0..8).map(|_| f.connect()).collect();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
        assert_eq!(f.t.take_index(), None, "max_clients reached");
        assert_eq!(f.stats().clients, 8);
        f.t.depart(5);
        f.t.depart(1);
        assert_eq!(f.stats().clients, 6);
        assert_eq!(f.t.take_index(), None, "departed indices are not reused");
        assert_eq!(
            f.t.departed().map(|(i, _)| i).collect::<Vec<_>>(),
            vec![1, 5]
        );
        f.t.remove_client(&f.arena, 5, &mut Outbox::default());
        f.t.remove_client(&f.arena, 1, &mut Outbox::default());
        assert_eq!(f.t.departed().count(), 0);
        assert_eq!(f.connect(), 1, "the lowest free index: one with a pin bit");
        assert_eq!(f.connect(), 5);
        assert_eq!(f.stats().clients, 8);
    }
}
