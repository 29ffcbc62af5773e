//! The control-plane protocol between clients and the daemon.
//!
//! A frame is a little-endian `u32` body length followed by the body: `u8` opcode, `u64` request
//! id, then the opcode's fields. Request id 0 means "no reply wanted" (notices). Replies echo the
//! request id; events pushed to subscribers use request id 0. Every decoder checks lengths and
//! values and returns [`StoreError::Protocol`] on anything malformed: it never panics and never
//! allocates more than the frame holds.

use std::io::{self, Read, Write};
use std::time::Duration;

use crate::blocks::id::{ID_LEN, ObjectId};
use crate::error::{Result, StoreError};

/// Protocol version, checked in the welcome.
pub const PROTOCOL_VERSION: u32 = 4;
/// Largest request body the daemon accepts.
pub const MAX_REQUEST: usize = 1 << 20;
/// Largest reply body a client accepts (a `List` of a million objects fits).
pub const MAX_REPLY: usize = 256 << 20;
/// Most ids in one `Wait` or `Delete`.
pub const MAX_IDS: usize = 1 << 14;

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Allocate `size` bytes for a new object, in state "creating", owned by this client.
    Create {
        id: ObjectId,
        size: u64,
    },
    Seal {
        id: ObjectId,
    },
    Abort {
        id: ObjectId,
    },
    /// Gives up an id that nobody is creating and that is not sealed (a call's result its
    /// consumer could not store): the store reports it lost to its waiters.
    GiveUp {
        id: ObjectId,
    },
    /// Reply when every id is sealed, or when the timeout passes (`None`: wait forever).
    Wait {
        ids: Vec<ObjectId>,
        timeout: Option<Duration>,
    },
    Contains {
        id: ObjectId,
    },
    Delete {
        ids: Vec<ObjectId>,
    },
    List,
    /// Evict at least `bytes` of unpinned objects, least recently used first.
    Evict {
        bytes: u64,
    },
    /// From now on, push [`Event`]s for seals and deletions on this connection.
    Subscribe,
    /// A notice: this client dropped the last pin of a delete-pending object.
    Release {
        id: ObjectId,
    },
    Stats,
    /// Grant this client a slab of `size` bytes to place small objects in (see `PutSmall`).
    /// The client's previous slab is retired: it is freed once its last object is.
    Slab {
        size: u64,
    },
    /// A sealed, reference-counted object the client wrote into its current slab at
    /// `offset`. The creator holds the first reference; `contained` are ids referenced from
    /// inside the object, kept alive while it lives. Usually a notice (request id 0).
    PutSmall {
        id: ObjectId,
        offset: u64,
        size: u64,
        owned: Owned,
    },
    /// Seals an object this client created, as a reference-counted object (freed when the
    /// last reference goes, not kept for LRU).
    SealOwned {
        id: ObjectId,
        owned: Owned,
    },
    /// A notice: this client holds a reference to `id`, which may not be sealed yet. The
    /// daemon sets the client's pin bit for it now or when it is sealed.
    Hold {
        id: ObjectId,
    },
    /// A notice: drop the reference taken by `Hold` (or by `PutSmall`/`SealOwned`).
    Unhold {
        id: ObjectId,
    },
    /// A notice: push a notification into this client's ring when each id is sealed (now, if
    /// it already is) or lost (aborted, or its creator died).
    Watch {
        ids: Vec<ObjectId>,
    },
    /// A notice: the client drained its notification ring; push what did not fit.
    Flush,
    /// Pin `id` for this client if it is sealed (and not delete-pending), answered with
    /// [`Reply::Pinned`], else `NotFound`: how an *overflow client* (one without a pin bit of
    /// its own, see `shm::PIN_CLIENTS`) pins, a view or a reference alike. The daemon keeps
    /// one pin per client and object, whatever the number of `Pin`s and `Hold`s; `Unhold`
    /// drops it.
    Pin {
        id: ObjectId,
    },
}

/// How an owned (reference-counted) object is published.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Owned {
    /// Ids referenced from inside the object, kept alive while it lives.
    pub contained: Vec<ObjectId>,
    /// The creator keeps the first reference (else it holds none once published).
    pub keep: bool,
    /// The object is an error report (a failed call), not a value: see `FLAG_ERROR`.
    pub error: bool,
    /// Another client (index, pid) gets a reference at seal: the caller a result is for.
    /// Ignored if that client has gone, or has already dropped its reference (`Unhold`).
    pub pin_for: Option<(u32, u32)>,
    /// Part of a runtime's own machinery (an actor's mailbox, a task queue), not a user's
    /// value: a full store says how much of it is so.
    pub internal: bool,
}

/// Error codes carried by [`Reply::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    StoreFull = 1,
    DirectoryFull = 2,
    NotFound = 3,
    AlreadyExists = 4,
    AlreadySealed = 5,
    NotSealed = 6,
    NotOwner = 7,
    InvalidRequest = 8,
    Protocol = 9,
    Refused = 10,
    TooManyPending = 11,
    TooManyClients = 12,
    NoHugePages = 13,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match v {
            1 => StoreFull,
            2 => DirectoryFull,
            3 => NotFound,
            4 => AlreadyExists,
            5 => AlreadySealed,
            6 => NotSealed,
            7 => NotOwner,
            8 => InvalidRequest,
            9 => Protocol,
            10 => Refused,
            11 => TooManyPending,
            12 => TooManyClients,
            13 => NoHugePages,
            _ => return None,
        })
    }
}

/// One entry of a `List` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub id: ObjectId,
    pub size: u64,
    pub state: ObjectState,
    /// Clients holding a pin.
    pub pins: u32,
    pub age: Duration,
    /// Client index of the creator.
    pub owner: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectState {
    Creating = 1,
    Sealed = 2,
    /// Deleted while pinned: freed when the last pin goes.
    DeletePending = 3,
}

/// What `Delete` did to one id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted = 0,
    /// Pinned: deleted when the last pin is released; no longer gettable.
    Deferred = 1,
    NotFound = 2,
    /// Still being created: abort it instead.
    NotSealed = 3,
    /// A reference-counted object of another (live) client: only its owner may delete it.
    /// Nothing was changed.
    NotOwner = 4,
}

/// Store-wide figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub capacity: u64,
    pub used: u64,
    pub pinned: u64,
    pub objects: u64,
    pub sealed: u64,
    pub clients: u64,
    pub evictions: u64,
    /// Bytes set aside for client slabs and notification rings (not counted in `used`).
    pub reserved: u64,
}

/// What subscribers are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Sealed { id: ObjectId, size: u64 },
    Deleted { id: ObjectId },
}

/// The daemon's answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Error {
        code: ErrorCode,
        /// Numbers that go with the code (StoreFull: requested, capacity, pinned).
        nums: [u64; 3],
        message: String,
    },
    Created {
        offset: u64,
    },
    /// One flag per requested id: sealed (true) or not (timed out).
    Waited {
        ready: Vec<bool>,
    },
    Bool(bool),
    Deleted {
        outcomes: Vec<DeleteOutcome>,
    },
    Listed {
        objects: Vec<ObjectInfo>,
    },
    Evicted {
        count: u64,
        bytes: u64,
    },
    Stats(Stats),
    /// Sent once right after connecting, together with the arena fd.
    Welcome {
        version: u32,
        client_index: u32,
        /// This client's notification ring in the arena.
        ring_offset: u64,
        ring_len: u64,
    },
    Event(Event),
    Slab {
        offset: u64,
        len: u64,
    },
    /// A `Pin` succeeded: where the object is, and whether it reports a failure
    /// (`FLAG_ERROR`). The client checks the place against the heap bounds.
    Pinned {
        offset: u64,
        size: u64,
        error: bool,
    },
}

mod op {
    pub const CREATE: u8 = 1;
    pub const SEAL: u8 = 2;
    pub const ABORT: u8 = 3;
    pub const WAIT: u8 = 4;
    pub const CONTAINS: u8 = 5;
    pub const DELETE: u8 = 6;
    pub const LIST: u8 = 7;
    pub const EVICT: u8 = 8;
    pub const SUBSCRIBE: u8 = 9;
    pub const RELEASE: u8 = 10;
    pub const STATS: u8 = 11;
    pub const SLAB: u8 = 12;
    pub const PUT_SMALL: u8 = 13;
    pub const SEAL_OWNED: u8 = 14;
    pub const HOLD: u8 = 15;
    pub const UNHOLD: u8 = 16;
    pub const WATCH: u8 = 17;
    pub const FLUSH: u8 = 18;
    pub const PIN: u8 = 19;
    pub const GIVE_UP: u8 = 20;

    pub const OK: u8 = 128;
    pub const ERROR: u8 = 129;
    pub const CREATED: u8 = 130;
    pub const WAITED: u8 = 131;
    pub const BOOL: u8 = 132;
    pub const DELETED: u8 = 133;
    pub const LISTED: u8 = 134;
    pub const EVICTED: u8 = 135;
    pub const STATS_REPLY: u8 = 136;
    pub const WELCOME: u8 = 137;
    pub const EVENT: u8 = 138;
    pub const SLAB_REPLY: u8 = 139;
    pub const PINNED: u8 = 140;
}

// ---------- encoding ----------

struct Enc(Vec<u8>);

impl Enc {
    fn new(opcode: u8, req: u64) -> Enc {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&[0; 4]);
        v.push(opcode);
        v.extend_from_slice(&req.to_le_bytes());
        Enc(v)
    }
    fn u8(&mut self, x: u8) -> &mut Self {
        self.0.push(x);
        self
    }
    fn u16(&mut self, x: u16) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u32(&mut self, x: u32) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u64(&mut self, x: u64) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn id(&mut self, id: &ObjectId) -> &mut Self {
        self.0.extend_from_slice(&id.0);
        self
    }
    fn ids(&mut self, ids: &[ObjectId]) -> &mut Self {
        self.u32(ids.len() as u32);
        for id in ids {
            self.id(id);
        }
        self
    }
    fn owned(&mut self, o: &Owned) -> &mut Self {
        self.ids(&o.contained);
        self.u8(o.keep as u8 | (o.error as u8) << 1 | (o.internal as u8) << 2);
        let (index, pid) = o.pin_for.unwrap_or((u32::MAX, 0));
        self.u32(index).u32(pid)
    }
    fn finish(mut self) -> Vec<u8> {
        let body = (self.0.len() - 4) as u32;
        self.0[..4].copy_from_slice(&body.to_le_bytes());
        self.0
    }
}

/// Timeout on the wire: milliseconds, `u64::MAX` for "forever".
fn enc_timeout(t: Option<Duration>) -> u64 {
    t.map_or(u64::MAX, |d| d.as_millis().min(u64::MAX as u128 - 1) as u64)
}

impl Request {
    /// The whole frame (length prefix included).
    pub fn encode(&self, req: u64) -> Vec<u8> {
        match self {
            Request::Create { id, size } => {
                let mut e = Enc::new(op::CREATE, req);
                e.id(id).u64(*size);
                e.finish()
            }
            Request::Seal { id } => Self::one(op::SEAL, req, id),
            Request::Abort { id } => Self::one(op::ABORT, req, id),
            Request::GiveUp { id } => Self::one(op::GIVE_UP, req, id),
            Request::Wait { ids, timeout } => {
                let mut e = Enc::new(op::WAIT, req);
                e.u64(enc_timeout(*timeout)).ids(ids);
                e.finish()
            }
            Request::Contains { id } => Self::one(op::CONTAINS, req, id),
            Request::Delete { ids } => {
                let mut e = Enc::new(op::DELETE, req);
                e.ids(ids);
                e.finish()
            }
            Request::List => Enc::new(op::LIST, req).finish(),
            Request::Evict { bytes } => {
                let mut e = Enc::new(op::EVICT, req);
                e.u64(*bytes);
                e.finish()
            }
            Request::Subscribe => Enc::new(op::SUBSCRIBE, req).finish(),
            Request::Release { id } => Self::one(op::RELEASE, req, id),
            Request::Stats => Enc::new(op::STATS, req).finish(),
            Request::Slab { size } => {
                let mut e = Enc::new(op::SLAB, req);
                e.u64(*size);
                e.finish()
            }
            Request::PutSmall {
                id,
                offset,
                size,
                owned,
            } => {
                let mut e = Enc::new(op::PUT_SMALL, req);
                e.id(id).u64(*offset).u64(*size).owned(owned);
                e.finish()
            }
            Request::SealOwned { id, owned } => {
                let mut e = Enc::new(op::SEAL_OWNED, req);
                e.id(id).owned(owned);
                e.finish()
            }
            Request::Hold { id } => Self::one(op::HOLD, req, id),
            Request::Unhold { id } => Self::one(op::UNHOLD, req, id),
            Request::Watch { ids } => {
                let mut e = Enc::new(op::WATCH, req);
                e.ids(ids);
                e.finish()
            }
            Request::Flush => Enc::new(op::FLUSH, req).finish(),
            Request::Pin { id } => Self::one(op::PIN, req, id),
        }
    }

    fn one(opcode: u8, req: u64, id: &ObjectId) -> Vec<u8> {
        let mut e = Enc::new(opcode, req);
        e.id(id);
        e.finish()
    }

    /// Decodes a frame body (without the length prefix). Returns the request id too.
    pub fn decode(body: &[u8]) -> Result<(u64, Request)> {
        let mut d = Dec::new(body);
        let opcode = d.u8()?;
        let req = d.u64()?;
        let r = match opcode {
            op::CREATE => Request::Create {
                id: d.id()?,
                size: d.u64()?,
            },
            op::SEAL => Request::Seal { id: d.id()? },
            op::ABORT => Request::Abort { id: d.id()? },
            op::GIVE_UP => Request::GiveUp { id: d.id()? },
            op::WAIT => {
                let t = d.u64()?;
                Request::Wait {
                    timeout: (t != u64::MAX).then(|| Duration::from_millis(t)),
                    ids: d.ids()?,
                }
            }
            op::CONTAINS => Request::Contains { id: d.id()? },
            op::DELETE => Request::Delete { ids: d.ids()? },
            op::LIST => Request::List,
            op::EVICT => Request::Evict { bytes: d.u64()? },
            op::SUBSCRIBE => Request::Subscribe,
            op::RELEASE => Request::Release { id: d.id()? },
            op::STATS => Request::Stats,
            op::SLAB => Request::Slab { size: d.u64()? },
            op::PUT_SMALL => Request::PutSmall {
                id: d.id()?,
                offset: d.u64()?,
                size: d.u64()?,
                owned: d.owned()?,
            },
            op::SEAL_OWNED => Request::SealOwned {
                id: d.id()?,
                owned: d.owned()?,
            },
            op::HOLD => Request::Hold { id: d.id()? },
            op::UNHOLD => Request::Unhold { id: d.id()? },
            op::WATCH => Request::Watch { ids: d.ids()? },
            op::FLUSH => Request::Flush,
            op::PIN => Request::Pin { id: d.id()? },
            other => return Err(proto(format!("unknown request opcode {other}"))),
        };
        d.end()?;
        Ok((req, r))
    }
}

impl Reply {
    pub fn encode(&self, req: u64) -> Vec<u8> {
        match self {
            Reply::Ok => Enc::new(op::OK, req).finish(),
            Reply::Error {
                code,
                nums,
                message,
            } => {
                let mut e = Enc::new(op::ERROR, req);
                e.u16(*code as u16);
                for n in nums {
                    e.u64(*n);
                }
                let m = &message.as_bytes()[..message.len().min(4096)];
                e.u32(m.len() as u32);
                e.0.extend_from_slice(m);
                e.finish()
            }
            Reply::Created { offset } => {
                let mut e = Enc::new(op::CREATED, req);
                e.u64(*offset);
                e.finish()
            }
            Reply::Waited { ready } => {
                let mut e = Enc::new(op::WAITED, req);
                e.u32(ready.len() as u32);
                for r in ready {
                    e.u8(*r as u8);
                }
                e.finish()
            }
            Reply::Bool(b) => {
                let mut e = Enc::new(op::BOOL, req);
                e.u8(*b as u8);
                e.finish()
            }
            Reply::Deleted { outcomes } => {
                let mut e = Enc::new(op::DELETED, req);
                e.u32(outcomes.len() as u32);
                for o in outcomes {
                    e.u8(*o as u8);
                }
                e.finish()
            }
            Reply::Listed { objects } => {
                let mut e = Enc::new(op::LISTED, req);
                e.u32(objects.len() as u32);
                for o in objects {
                    e.id(&o.id)
                        .u64(o.size)
                        .u8(o.state as u8)
                        .u32(o.pins)
                        .u64(o.age.as_millis() as u64)
                        .u32(o.owner);
                }
                e.finish()
            }
            Reply::Evicted { count, bytes } => {
                let mut e = Enc::new(op::EVICTED, req);
                e.u64(*count).u64(*bytes);
                e.finish()
            }
            Reply::Stats(s) => {
                let mut e = Enc::new(op::STATS_REPLY, req);
                e.u64(s.capacity)
                    .u64(s.used)
                    .u64(s.pinned)
                    .u64(s.objects)
                    .u64(s.sealed)
                    .u64(s.clients)
                    .u64(s.evictions)
                    .u64(s.reserved);
                e.finish()
            }
            Reply::Welcome {
                version,
                client_index,
                ring_offset,
                ring_len,
            } => {
                let mut e = Enc::new(op::WELCOME, req);
                e.u32(*version)
                    .u32(*client_index)
                    .u64(*ring_offset)
                    .u64(*ring_len);
                e.finish()
            }
            Reply::Slab { offset, len } => {
                let mut e = Enc::new(op::SLAB_REPLY, req);
                e.u64(*offset).u64(*len);
                e.finish()
            }
            Reply::Pinned {
                offset,
                size,
                error,
            } => {
                let mut e = Enc::new(op::PINNED, req);
                e.u64(*offset).u64(*size).u8(*error as u8);
                e.finish()
            }
            Reply::Event(ev) => {
                let mut e = Enc::new(op::EVENT, req);
                match ev {
                    Event::Sealed { id, size } => e.u8(1).id(id).u64(*size),
                    Event::Deleted { id } => e.u8(2).id(id).u64(0),
                };
                e.finish()
            }
        }
    }

    pub fn decode(body: &[u8]) -> Result<(u64, Reply)> {
        let mut d = Dec::new(body);
        let opcode = d.u8()?;
        let req = d.u64()?;
        let r = match opcode {
            op::OK => Reply::Ok,
            op::ERROR => {
                let code = d.u16()?;
                let code = ErrorCode::from_u16(code)
                    .ok_or_else(|| proto(format!("unknown error code {code}")))?;
                let nums = [d.u64()?, d.u64()?, d.u64()?];
                let n = d.u32()? as usize;
                let message = String::from_utf8_lossy(d.bytes(n)?).into_owned();
                Reply::Error {
                    code,
                    nums,
                    message,
                }
            }
            op::CREATED => Reply::Created { offset: d.u64()? },
            op::WAITED => {
                let n = d.count(1)?;
                let ready = (0..n).map(|_| d.bool()).collect::<Result<_>>()?;
                Reply::Waited { ready }
            }
            op::BOOL => Reply::Bool(d.bool()?),
            op::DELETED => {
                let n = d.count(1)?;
                let outcomes = (0..n)
                    .map(|_| {
                        Ok(match d.u8()? {
                            0 => DeleteOutcome::Deleted,
                            1 => DeleteOutcome::Deferred,
                            2 => DeleteOutcome::NotFound,
                            3 => DeleteOutcome::NotSealed,
                            4 => DeleteOutcome::NotOwner,
                            x => return Err(proto(format!("bad delete outcome {x}"))),
                        })
                    })
                    .collect::<Result<_>>()?;
                Reply::Deleted { outcomes }
            }
            op::LISTED => {
                let n = d.count(ID_LEN + 8 + 1 + 4 + 8 + 4)?;
                let objects = (0..n)
                    .map(|_| {
                        Ok(ObjectInfo {
                            id: d.id()?,
                            size: d.u64()?,
                            state: match d.u8()? {
                                1 => ObjectState::Creating,
                                2 => ObjectState::Sealed,
                                3 => ObjectState::DeletePending,
                                x => return Err(proto(format!("bad object state {x}"))),
                            },
                            pins: d.u32()?,
                            age: Duration::from_millis(d.u64()?),
                            owner: d.u32()?,
                        })
                    })
                    .collect::<Result<_>>()?;
                Reply::Listed { objects }
            }
            op::EVICTED => Reply::Evicted {
                count: d.u64()?,
                bytes: d.u64()?,
            },
            op::STATS_REPLY => Reply::Stats(Stats {
                capacity: d.u64()?,
                used: d.u64()?,
                pinned: d.u64()?,
                objects: d.u64()?,
                sealed: d.u64()?,
                clients: d.u64()?,
                evictions: d.u64()?,
                reserved: d.u64()?,
            }),
            op::WELCOME => Reply::Welcome {
                version: d.u32()?,
                client_index: d.u32()?,
                ring_offset: d.u64()?,
                ring_len: d.u64()?,
            },
            op::SLAB_REPLY => Reply::Slab {
                offset: d.u64()?,
                len: d.u64()?,
            },
            op::PINNED => Reply::Pinned {
                offset: d.u64()?,
                size: d.u64()?,
                error: d.bool()?,
            },
            op::EVENT => {
                let kind = d.u8()?;
                let id = d.id()?;
                let size = d.u64()?;
                Reply::Event(match kind {
                    1 => Event::Sealed { id, size },
                    2 => Event::Deleted { id },
                    x => return Err(proto(format!("bad event kind {x}"))),
                })
            }
            other => return Err(proto(format!("unknown reply opcode {other}"))),
        };
        d.end()?;
        Ok((req, r))
    }
}

impl Reply {
    pub fn error(e: &StoreError) -> Reply {
        let (code, nums) = match e {
            StoreError::StoreFull {
                requested,
                capacity,
                pinned,
                ..
            } => (ErrorCode::StoreFull, [*requested, *capacity, *pinned]),
            StoreError::DirectoryFull { capacity } => (ErrorCode::DirectoryFull, [*capacity, 0, 0]),
            StoreError::NotFound(_) => (ErrorCode::NotFound, [0; 3]),
            StoreError::AlreadyExists(_) => (ErrorCode::AlreadyExists, [0; 3]),
            StoreError::AlreadySealed(_) => (ErrorCode::AlreadySealed, [0; 3]),
            StoreError::NotSealed(_) => (ErrorCode::NotSealed, [0; 3]),
            StoreError::NotOwner(_) => (ErrorCode::NotOwner, [0; 3]),
            StoreError::Refused(_) => (ErrorCode::Refused, [0; 3]),
            StoreError::Protocol(_) => (ErrorCode::Protocol, [0; 3]),
            StoreError::TooManyPending { limit, .. } => {
                (ErrorCode::TooManyPending, [*limit as u64, 0, 0])
            }
            StoreError::TooManyClients { limit } => {
                (ErrorCode::TooManyClients, [*limit as u64, 0, 0])
            }
            StoreError::NoHugePages(_) => (ErrorCode::NoHugePages, [0; 3]),
            _ => (ErrorCode::InvalidRequest, [0; 3]),
        };
        let message = match e {
            // What is not evictable, and whose: the typed error carries it.
            StoreError::StoreFull { detail, .. } => detail.clone(),
            StoreError::NoHugePages(detail) => detail.clone(),
            other => other.to_string(),
        };
        Reply::Error {
            code,
            nums,
            message,
        }
    }

    /// Turns an error reply back into the typed error (`id` names the object it was about).
    pub fn into_error(
        code: ErrorCode,
        nums: [u64; 3],
        message: String,
        id: ObjectId,
    ) -> StoreError {
        match code {
            ErrorCode::StoreFull => StoreError::StoreFull {
                requested: nums[0],
                capacity: nums[1],
                pinned: nums[2],
                detail: message,
            },
            ErrorCode::DirectoryFull => StoreError::DirectoryFull { capacity: nums[0] },
            ErrorCode::NotFound => StoreError::NotFound(id),
            ErrorCode::AlreadyExists => StoreError::AlreadyExists(id),
            ErrorCode::AlreadySealed => StoreError::AlreadySealed(id),
            ErrorCode::NotSealed => StoreError::NotSealed(id),
            ErrorCode::NotOwner => StoreError::NotOwner(id),
            ErrorCode::InvalidRequest => StoreError::InvalidRequest(message),
            ErrorCode::Protocol => StoreError::Protocol(message),
            ErrorCode::Refused => StoreError::Refused(message),
            ErrorCode::TooManyPending => StoreError::TooManyPending {
                what: "ids",
                limit: nums[0] as usize,
            },
            ErrorCode::TooManyClients => StoreError::TooManyClients {
                limit: nums[0].min(u32::MAX as u64) as u32,
            },
            ErrorCode::NoHugePages => StoreError::NoHugePages(message),
        }
    }
}

fn proto(msg: String) -> StoreError {
    StoreError::Protocol(msg)
}

struct Dec<'a> {
    buf: &'a [u8],
}

impl<'a> Dec<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Dec { buf }
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(proto("truncated message".into()));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.bytes(N)?.try_into().expect("length checked"))
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.arr::<1>()?[0])
    }
    fn bool(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            x => Err(proto(format!("bad boolean {x}"))),
        }
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn id(&mut self) -> Result<ObjectId> {
        Ok(ObjectId(self.arr()?))
    }
    /// A count of items of `item_len` bytes each that must fit in what is left.
    fn count(&mut self, item_len: usize) -> Result<usize> {
        let n = self.u32()? as usize;
        if n.saturating_mul(item_len) > self.buf.len() {
            return Err(proto(format!("count {n} exceeds the message")));
        }
        Ok(n)
    }
    fn ids(&mut self) -> Result<Vec<ObjectId>> {
        let n = self.count(ID_LEN)?;
        if n == 0 || n > MAX_IDS {
            return Err(proto(format!("id list of {n} (1 to {MAX_IDS})")));
        }
        (0..n).map(|_| self.id()).collect()
    }
    fn owned(&mut self) -> Result<Owned> {
        let contained = self.ids_or_none()?;
        let flags = self.u8()?;
        if flags > 7 {
            return Err(proto(format!("unknown publish flags {flags:#x}")));
        }
        let (index, pid) = (self.u32()?, self.u32()?);
        Ok(Owned {
            contained,
            keep: flags & 1 != 0,
            error: flags & 2 != 0,
            internal: flags & 4 != 0,
            pin_for: (index != u32::MAX).then_some((index, pid)),
        })
    }
    /// An id list that may be empty (the objects an object references).
    fn ids_or_none(&mut self) -> Result<Vec<ObjectId>> {
        let n = self.count(ID_LEN)?;
        if n > MAX_IDS {
            return Err(proto(format!("id list of {n} (at most {MAX_IDS})")));
        }
        (0..n).map(|_| self.id()).collect()
    }
    fn end(&self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(proto(format!("{} trailing bytes", self.buf.len())))
        }
    }
}

/// A notice on a client's notification ring (the daemon pushes, the client pops): kind, then
/// the id.
pub const NOTICE_LEN: usize = 1 + ID_LEN;
/// The object was sealed.
pub const NOTICE_READY: u8 = 1;
/// The object was aborted before it was sealed (or its creator died).
pub const NOTICE_LOST: u8 = 2;
/// A `PutSmall` of this client was rejected: the object does not exist as it wrote it.
pub const NOTICE_REJECTED: u8 = 3;

/// The ring message for a notice of `kind` about `id`.
pub fn encode_notice(kind: u8, id: &ObjectId) -> [u8; NOTICE_LEN] {
    let mut msg = [0u8; NOTICE_LEN];
    msg[0] = kind;
    msg[1..].copy_from_slice(id.as_bytes());
    msg
}

/// A notice's kind and id, or `None` if `m` is not a notice (wrong length).
pub fn decode_notice(m: &[u8]) -> Option<(u8, ObjectId)> {
    if m.len() != NOTICE_LEN {
        return None;
    }
    let id = <[u8; ID_LEN]>::try_from(&m[1..]).ok()?;
    Some((m[0], ObjectId(id)))
}

/// Reads one frame body. `Ok(None)` on a clean end of stream before a frame starts.
pub fn read_frame(r: &mut impl Read, max: usize) -> Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > max {
        return Err(proto(format!("frame length {len} (1 to {max})")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(body))
}

pub fn write_frame(w: &mut impl Write, frame: &[u8]) -> io::Result<()> {
    w.write_all(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip_request(r: Request) {
        let f = r.encode(7);
        let (req, back) = Request::decode(&f[4..]).unwrap();
        assert_eq!((req, back), (7, r));
    }

    #[test]
    fn notices_round_trip_and_reject_wrong_lengths() {
        let id = ObjectId::from_parts([3; 12], 9);
        for kind in [NOTICE_READY, NOTICE_LOST, NOTICE_REJECTED] {
            let m = encode_notice(kind, &id);
            assert_eq!(decode_notice(&m), Some((kind, id)));
            assert_eq!(decode_notice(&m[..NOTICE_LEN - 1]), None);
        }
        assert_eq!(decode_notice(&[0u8; NOTICE_LEN + 1]), None);
        assert_eq!(decode_notice(&[]), None);
    }

    #[test]
    fn requests_round_trip() {
        let id = ObjectId::random();
        for r in [
            Request::Create { id, size: 99 },
            Request::Seal { id },
            Request::Abort { id },
            Request::GiveUp { id },
            Request::Wait {
                ids: vec![id, ObjectId::random()],
                timeout: Some(Duration::from_millis(1500)),
            },
            Request::Wait {
                ids: vec![id],
                timeout: None,
            },
            Request::Contains { id },
            Request::Delete { ids: vec![id] },
            Request::List,
            Request::Evict { bytes: 1 << 30 },
            Request::Subscribe,
            Request::Release { id },
            Request::Stats,
            Request::Slab { size: 1 << 20 },
            Request::PutSmall {
                id,
                offset: 4096,
                size: 8,
                owned: Owned {
                    contained: vec![id],
                    keep: true,
                    error: false,
                    pin_for: Some((3, 4242)),
                    internal: true,
                },
            },
            Request::SealOwned {
                id,
                owned: Owned {
                    error: true,
                    ..Owned::default()
                },
            },
            Request::Hold { id },
            Request::Unhold { id },
            Request::Watch { ids: vec![id, id] },
            Request::Flush,
            Request::Pin { id },
        ] {
            round_trip_request(r);
        }
    }

    #[test]
    fn replies_round_trip() {
        let id = ObjectId::random();
        for r in [
            Reply::Ok,
            Reply::error(&StoreError::StoreFull {
                requested: 1,
                capacity: 2,
                pinned: 3,
                detail: "pinned by pid 7: 3 B".into(),
            }),
            Reply::Created { offset: 4096 },
            Reply::Waited {
                ready: vec![true, false],
            },
            Reply::Bool(true),
            Reply::Deleted {
                outcomes: vec![DeleteOutcome::Deferred, DeleteOutcome::NotFound],
            },
            Reply::Listed {
                objects: vec![ObjectInfo {
                    id,
                    size: 5,
                    state: ObjectState::Sealed,
                    pins: 2,
                    age: Duration::from_millis(10),
                    owner: 1,
                }],
            },
            Reply::Evicted { count: 1, bytes: 2 },
            Reply::Stats(Stats {
                capacity: 1,
                used: 2,
                pinned: 3,
                objects: 4,
                sealed: 5,
                clients: 6,
                evictions: 7,
                reserved: 8,
            }),
            Reply::Welcome {
                version: 1,
                client_index: 3,
                ring_offset: 1 << 21,
                ring_len: 4096,
            },
            Reply::Slab {
                offset: 1 << 22,
                len: 1 << 20,
            },
            Reply::Event(Event::Sealed { id, size: 9 }),
            Reply::Event(Event::Deleted { id }),
            Reply::Pinned {
                offset: 1 << 22,
                size: 77,
                error: true,
            },
            Reply::Pinned {
                offset: 4096,
                size: 0,
                error: false,
            },
            Reply::error(&StoreError::TooManyClients { limit: 1024 }),
        ] {
            let f = r.encode(3);
            assert_eq!(Reply::decode(&f[4..]).unwrap(), (3, r));
        }
    }

    #[test]
    fn malformed_requests_are_errors() {
        let f = Request::Create {
            id: ObjectId::random(),
            size: 1,
        }
        .encode(1);
        for cut in 0..f.len() - 4 {
            assert!(Request::decode(&f[4..4 + cut]).is_err(), "cut at {cut}");
        }
        let mut extra = f[4..].to_vec();
        extra.push(0);
        assert!(Request::decode(&extra).is_err());
        // A huge id count in a tiny frame.
        let mut w = Enc::new(op::DELETE, 1);
        w.u32(u32::MAX);
        assert!(Request::decode(&w.finish()[4..]).is_err());
        assert!(Request::decode(&[200, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn pin_frames_are_strict() {
        let id = ObjectId::random();
        let f = Request::Pin { id }.encode(5);
        for cut in 0..f.len() - 4 {
            assert!(Request::decode(&f[4..4 + cut]).is_err(), "cut at {cut}");
        }
        let mut extra = f[4..].to_vec();
        extra.push(0);
        assert!(Request::decode(&extra).is_err());
        let r = Reply::Pinned {
            offset: 8192,
            size: 3,
            error: false,
        }
        .encode(5);
        let mut bad = r[4..].to_vec();
        *bad.last_mut().unwrap() = 2;
        assert!(Reply::decode(&bad).is_err(), "a flag is 0 or 1");
        assert!(Reply::decode(&r[4..r.len() - 1]).is_err());
        // The typed error survives the wire.
        let Reply::Error {
            code,
            nums,
            message,
        } = Reply::error(&StoreError::TooManyClients { limit: 1024 })
        else {
            panic!("an error reply")
        };
        assert!(matches!(
            Reply::into_error(code, nums, message, id),
            StoreError::TooManyClients { limit: 1024 }
        ));
        // A refusal of huge pages keeps its type and its words (once, not prefixed twice).
        let Reply::Error {
            code,
            nums,
            message,
        } = Reply::error(&StoreError::NoHugePages("none left".into()))
        else {
            panic!("an error reply")
        };
        let e = Reply::into_error(code, nums, message, id);
        assert!(
            matches!(&e, StoreError::NoHugePages(d) if d == "none left"),
            "{e:?}"
        );
        assert_eq!(e.to_string(), "no huge pages for the arena: none left");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x1234_5678;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 64) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (x >> (i % 8 * 8)) as u8).collect();
            let _ = Request::decode(&bytes);
            let _ = Reply::decode(&bytes);
        }
    }
}
