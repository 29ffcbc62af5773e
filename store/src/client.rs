//! `StoreClient`: a connection to the daemon plus the mapped arena.
//!
//! Gets of sealed objects are served from shared memory without asking the daemon: a lock-free
//! directory lookup, then a pin (this client's bit in the slot's pin mask). Everything that
//! changes the table (create, seal, abort, delete, evict) and every wait goes over the socket.
//! The socket is shared by the threads of a process: requests carry ids, and whichever thread
//! is waiting reads replies for everybody (see `Conn::call`).

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Result, StoreError};
use crate::id::ObjectId;
use crate::protocol::{
    self, DeleteOutcome, Event, MAX_REPLY, ObjectInfo, PROTOCOL_VERSION, Reply, Request, Stats,
};
use crate::shm::{Arena, Lookup, SealedEntry};
use crate::sock;

/// How long a get may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// Do not wait: only what is sealed now.
    Poll,
    /// Wait at most this long.
    After(Duration),
    /// Wait until this instant.
    Until(Instant),
    Forever,
}

impl Timeout {
    fn deadline(self) -> Option<Instant> {
        match self {
            Timeout::Poll => Some(Instant::now()),
            Timeout::After(d) => Some(Instant::now() + d),
            Timeout::Until(t) => Some(t),
            Timeout::Forever => None,
        }
    }
}

impl From<Duration> for Timeout {
    fn from(d: Duration) -> Self {
        Timeout::After(d)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct ReadState {
    reader: Option<BufReader<UnixStream>>,
    /// Replies that arrived for other threads' requests.
    replies: HashMap<u64, Reply>,
    /// Set when the connection broke: every call fails with this from then on.
    broken: Option<String>,
}

/// The socket half of a client: request/reply with ids, any thread may read for the others.
struct Conn {
    writer: Mutex<UnixStream>,
    read: Mutex<ReadState>,
    cv: Condvar,
    next_req: AtomicU64,
}

impl Conn {
    fn send(&self, req: u64, r: &Request) -> Result<()> {
        let frame = r.encode(req);
        let mut w = lock(&self.writer);
        w.write_all(&frame)
            .map_err(|e| StoreError::Disconnected(format!("write to the store failed: {e}")))
    }

    /// Sends a request and waits for its reply.
    fn call(&self, r: &Request) -> Result<Reply> {
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        self.send(req, r)?;
        self.wait_reply(|st| st.replies.remove(&req))
    }

    /// Waits until `take` finds something, reading frames for everybody meanwhile.
    fn wait_reply<T>(&self, mut take: impl FnMut(&mut ReadState) -> Option<T>) -> Result<T> {
        let mut st = lock(&self.read);
        loop {
            if let Some(v) = take(&mut st) {
                return Ok(v);
            }
            if let Some(why) = &st.broken {
                return Err(StoreError::Disconnected(why.clone()));
            }
            match st.reader.take() {
                // Nobody is reading: this thread reads one frame for everybody.
                Some(mut reader) => {
                    drop(st);
                    let frame = protocol::read_frame(&mut reader, MAX_REPLY);
                    st = lock(&self.read);
                    st.reader = Some(reader);
                    match frame.and_then(|f| match f {
                        Some(body) => Reply::decode(&body).map(Some),
                        None => Ok(None),
                    }) {
                        Ok(Some((_, Reply::Event(_)))) => {}
                        Ok(Some((req, reply))) => {
                            if req == 0 {
                                // An unsolicited error (the daemon is closing us).
                                st.broken = Some(format!("store closed the connection: {reply:?}"));
                            } else {
                                st.replies.insert(req, reply);
                            }
                        }
                        Ok(None) => st.broken = Some("the store closed the connection".into()),
                        Err(e) => st.broken = Some(format!("reading from the store: {e}")),
                    }
                    self.cv.notify_all();
                }
                None => st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

struct Inner {
    arena: Arena,
    conn: Conn,
    index: u32,
    socket: PathBuf,
    /// This process's pins: slot -> (entry word, count).
    pins: Mutex<HashMap<u64, (u64, u64)>>,
}

/// A connection to a store daemon with the arena mapped. Cheap to clone (shared).
#[derive(Clone)]
pub struct StoreClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StoreClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreClient")
            .field("socket", &self.inner.socket)
            .field("client_index", &self.inner.index)
            .finish()
    }
}

impl StoreClient {
    /// Connects to the daemon at `socket` and maps its arena.
    pub fn connect(socket: impl AsRef<Path>) -> Result<StoreClient> {
        let socket = socket.as_ref();
        let (stream, index, fd) = handshake(socket)?;
        let arena = Arena::attach(fd)?;
        let reader = BufReader::with_capacity(64 << 10, stream.try_clone()?);
        Ok(StoreClient {
            inner: Arc::new(Inner {
                arena,
                conn: Conn {
                    writer: Mutex::new(stream),
                    read: Mutex::new(ReadState {
                        reader: Some(reader),
                        replies: HashMap::new(),
                        broken: None,
                    }),
                    cv: Condvar::new(),
                    next_req: AtomicU64::new(1),
                },
                index,
                socket: socket.to_path_buf(),
                pins: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// This client's index (its bit in the pin masks).
    pub fn client_index(&self) -> u32 {
        self.inner.index
    }

    pub fn socket_path(&self) -> &Path {
        &self.inner.socket
    }

    pub fn arena(&self) -> &Arena {
        &self.inner.arena
    }

    /// Pre-faults this process's page tables for the whole heap (the daemon allocates the
    /// pages; each process still pays a minor fault per page on first touch of its mapping).
    pub fn populate(&self) -> std::io::Result<()> {
        let l = *self.inner.arena.layout();
        self.inner.arena.populate(l.heap_offset, l.heap_len)
    }

    fn call(&self, r: &Request) -> Result<Reply> {
        self.inner.conn.call(r)
    }

    fn expect_ok(&self, r: &Request, id: ObjectId) -> Result<()> {
        match self.call(r)? {
            Reply::Ok => Ok(()),
            other => Err(reply_error(other, id)),
        }
    }

    /// Creates an object of `size` bytes: a writable buffer in shared memory. Seal it to make
    /// it visible; dropping it unsealed aborts it.
    pub fn create(&self, id: ObjectId, size: u64) -> Result<ObjectWriter> {
        let offset = self.create_raw(id, size)?;
        let ptr = self.inner.arena.ptr(offset, size).ok_or_else(|| {
            StoreError::Protocol(format!("daemon gave an out-of-bounds offset {offset}"))
        })?;
        Ok(ObjectWriter {
            client: self.clone(),
            id,
            ptr,
            len: size as usize,
            done: false,
        })
    }

    /// The verb alone: allocates and returns the arena offset. Prefer [`StoreClient::create`].
    pub fn create_raw(&self, id: ObjectId, size: u64) -> Result<u64> {
        match self.call(&Request::Create { id, size })? {
            Reply::Created { offset } => Ok(offset),
            other => Err(reply_error(other, id)),
        }
    }

    /// Seals an object this client created.
    pub fn seal(&self, id: ObjectId) -> Result<()> {
        self.expect_ok(&Request::Seal { id }, id)
    }

    /// Aborts an object this client is creating: its memory is freed.
    pub fn abort(&self, id: ObjectId) -> Result<()> {
        self.expect_ok(&Request::Abort { id }, id)
    }

    /// Creates, fills and seals an object in one go.
    pub fn put(&self, id: ObjectId, data: &[u8]) -> Result<()> {
        let mut w = self.create(id, data.len() as u64)?;
        w.as_mut_slice().copy_from_slice(data);
        w.seal()
    }

    /// Gets one sealed object, waiting up to `timeout` for it to be sealed.
    /// `Timeout::Poll` on an id the store does not hold gives `NotFound`; a wait that ends
    /// without the object gives `Timeout`.
    pub fn get(&self, id: ObjectId, timeout: impl Into<Timeout>) -> Result<ObjectView> {
        let timeout = timeout.into();
        if let Some(v) = self.get_many(&[id], timeout)?.pop().flatten() {
            return Ok(v);
        }
        if timeout == Timeout::Poll
            && matches!(self.inner.arena.directory().lookup(&id), Lookup::Absent)
        {
            return Err(StoreError::NotFound(id));
        }
        Err(StoreError::Timeout(1))
    }

    /// Gets several objects: each entry is `Some` if it was sealed before the timeout.
    pub fn get_many(&self, ids: &[ObjectId], timeout: Timeout) -> Result<Vec<Option<ObjectView>>> {
        let deadline = timeout.deadline();
        let mut out: Vec<Option<ObjectView>> = ids.iter().map(|_| None).collect();
        loop {
            let mut missing = Vec::new();
            for (i, id) in ids.iter().enumerate() {
                if out[i].is_none() {
                    match self.try_get(id) {
                        Some(v) => out[i] = Some(v),
                        None => missing.push(*id),
                    }
                }
            }
            if missing.is_empty() {
                return Ok(out);
            }
            let now = Instant::now();
            let remaining = match deadline {
                Some(d) if d <= now => return Ok(out),
                Some(d) => Some(d - now),
                None => None,
            };
            missing.sort();
            missing.dedup();
            // Round the remaining time up so that a wait never ends before the deadline.
            let timeout = remaining.map(|r| Duration::from_millis(r.as_millis() as u64 + 1));
            for chunk in missing.chunks(protocol::MAX_IDS) {
                match self.call(&Request::Wait {
                    ids: chunk.to_vec(),
                    timeout,
                })? {
                    Reply::Waited { .. } => {}
                    other => return Err(reply_error(other, chunk[0])),
                }
            }
        }
    }

    /// A zero-copy view of a sealed object if it is sealed now (no daemon round trip).
    pub fn try_get(&self, id: &ObjectId) -> Option<ObjectView> {
        let dir = self.inner.arena.directory();
        for _ in 0..16 {
            let Lookup::Sealed(e) = dir.lookup(id) else {
                return None;
            };
            if self.pin(&e, id) {
                let ptr = self.inner.arena.ptr(e.offset, e.size)?;
                return Some(ObjectView {
                    client: self.clone(),
                    id: *id,
                    slot: e.slot,
                    offset: e.offset,
                    ptr,
                    len: e.size as usize,
                });
            }
        }
        None
    }

    fn pin(&self, e: &SealedEntry, id: &ObjectId) -> bool {
        let mut pins = lock(&self.inner.pins);
        if let Some((word, count)) = pins.get_mut(&e.slot) {
            if *word == e.word {
                *count += 1;
                self.inner.arena.directory().touch(e.slot);
                return true;
            }
            return false;
        }
        let (ok, tell) = self.inner.arena.directory().try_pin(e, self.inner.index);
        if ok {
            pins.insert(e.slot, (e.word, 1));
        }
        drop(pins);
        if tell {
            // Our failed attempt raced with a deferred delete: the daemon may be waiting for
            // this very bit to go. A Release makes it recheck its pending deletions.
            let _ = self.inner.conn.send(0, &Request::Release { id: *id });
        }
        ok
    }

    fn unpin(&self, id: &ObjectId, slot: u64) {
        let mut pins = lock(&self.inner.pins);
        let Some((_, count)) = pins.get_mut(&slot) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        pins.remove(&slot);
        let tell = self.inner.arena.directory().unpin(slot, self.inner.index);
        drop(pins);
        if tell {
            let _ = self.inner.conn.send(0, &Request::Release { id: *id });
        }
    }

    pub fn contains(&self, id: ObjectId) -> Result<bool> {
        match self.call(&Request::Contains { id })? {
            Reply::Bool(b) => Ok(b),
            other => Err(reply_error(other, id)),
        }
    }

    /// Deletes objects; pinned ones are deleted when their last pin goes.
    pub fn delete(&self, ids: &[ObjectId]) -> Result<Vec<DeleteOutcome>> {
        let mut all = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(protocol::MAX_IDS) {
            match self.call(&Request::Delete {
                ids: chunk.to_vec(),
            })? {
                Reply::Deleted { outcomes } if outcomes.len() == chunk.len() => {
                    all.extend(outcomes)
                }
                other => return Err(reply_error(other, chunk[0])),
            }
        }
        Ok(all)
    }

    pub fn list(&self) -> Result<Vec<ObjectInfo>> {
        match self.call(&Request::List)? {
            Reply::Listed { objects } => Ok(objects),
            other => Err(reply_error(other, ObjectId::default())),
        }
    }

    /// Evicts at least `bytes` of unpinned objects (LRU first). Returns (objects, bytes) freed.
    pub fn evict(&self, bytes: u64) -> Result<(u64, u64)> {
        match self.call(&Request::Evict { bytes })? {
            Reply::Evicted { count, bytes } => Ok((count, bytes)),
            other => Err(reply_error(other, ObjectId::default())),
        }
    }

    pub fn stats(&self) -> Result<Stats> {
        match self.call(&Request::Stats)? {
            Reply::Stats(s) => Ok(s),
            other => Err(reply_error(other, ObjectId::default())),
        }
    }

    /// Opens a subscription to seal and delete events (its own connection to the daemon).
    pub fn subscribe(&self) -> Result<Subscription> {
        Subscription::connect(&self.inner.socket)
    }
}

/// A stream of seal and delete events on a connection of its own.
pub struct Subscription {
    reader: BufReader<UnixStream>,
}

impl Subscription {
    pub fn connect(socket: &Path) -> Result<Subscription> {
        let (stream, _index, _fd) = handshake(socket)?;
        (&stream)
            .write_all(&Request::Subscribe.encode(1))
            .map_err(|e| StoreError::Disconnected(e.to_string()))?;
        let mut s = Subscription {
            reader: BufReader::new(stream),
        };
        match s.read()? {
            Some((1, Reply::Ok)) => Ok(s),
            other => Err(StoreError::Protocol(format!(
                "subscribe answered {other:?}"
            ))),
        }
    }

    fn read(&mut self) -> Result<Option<(u64, Reply)>> {
        match protocol::read_frame(&mut self.reader, MAX_REPLY)? {
            Some(body) => Ok(Some(Reply::decode(&body)?)),
            None => Err(StoreError::Disconnected(
                "the store closed the connection".into(),
            )),
        }
    }

    /// The next event, waiting up to `timeout`; `Ok(None)` on timeout.
    pub fn next(&mut self, timeout: Duration) -> Result<Option<Event>> {
        use std::os::fd::AsFd;
        let deadline = Instant::now() + timeout;
        loop {
            if self.reader.buffer().is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                let ms = left.as_millis().min(i32::MAX as u128) as i32;
                let mut fds = [nix::poll::PollFd::new(
                    self.reader.get_ref().as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let n = nix::poll::poll(
                    &mut fds,
                    nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX),
                )?;
                if n == 0 {
                    return Ok(None);
                }
            }
            // Frames are small and written whole: once readable, the rest follows at once.
            if let Some((_, Reply::Event(ev))) = self.read()? {
                return Ok(Some(ev));
            }
        }
    }
}

/// Connects and reads the welcome: (stream, client index, arena fd).
fn handshake(socket: &Path) -> Result<(UnixStream, u32, std::os::fd::OwnedFd)> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        StoreError::Disconnected(format!("cannot connect to {}: {e}", socket.display()))
    })?;
    let mut buf = vec![0u8; 4096];
    let (n, fd) = sock::recv_with_fd(&stream, &mut buf)?;
    if n < 4 {
        return Err(StoreError::Disconnected(
            "the store closed the connection during the handshake".into(),
        ));
    }
    let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if len + 4 != n {
        return Err(StoreError::Protocol("malformed welcome".into()));
    }
    let (_, reply) = Reply::decode(&buf[4..n])?;
    let index = match reply {
        Reply::Welcome {
            version,
            client_index,
        } if version == PROTOCOL_VERSION => client_index,
        Reply::Welcome { version, .. } => {
            return Err(StoreError::Refused(format!(
                "protocol version {version}, this client speaks {PROTOCOL_VERSION}"
            )));
        }
        Reply::Error { message, .. } => return Err(StoreError::Refused(message)),
        other => {
            return Err(StoreError::Protocol(format!(
                "expected a welcome, got {other:?}"
            )));
        }
    };
    let fd = fd.ok_or_else(|| StoreError::Protocol("welcome without the arena fd".into()))?;
    Ok((stream, index, fd))
}

fn reply_error(r: Reply, id: ObjectId) -> StoreError {
    match r {
        Reply::Error {
            code,
            nums,
            message,
        } => Reply::into_error(code, nums, message, id),
        other => StoreError::Protocol(format!("unexpected reply {other:?}")),
    }
}

/// A writable buffer for an object being created. `seal` publishes it; drop aborts it.
pub struct ObjectWriter {
    client: StoreClient,
    id: ObjectId,
    ptr: *mut u8,
    len: usize,
    done: bool,
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

/// A pinned, zero-copy view of a sealed object. The object stays in memory while this lives;
/// dropping it releases the pin.
pub struct ObjectView {
    client: StoreClient,
    id: ObjectId,
    slot: u64,
    offset: u64,
    ptr: *const u8,
    len: usize,
}

// SAFETY: a view is a read-only slice of immutable shared memory kept alive by the pin.
unsafe impl Send for ObjectView {}
// SAFETY: as above; &ObjectView only hands out shared slices.
unsafe impl Sync for ObjectView {}

impl ObjectView {
    pub fn id(&self) -> ObjectId {
        self.id
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: in bounds (checked when the view was made), sealed (immutable), and pinned
        // (not freed or reused) for as long as self lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    /// The object's offset in the arena.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

impl std::ops::Deref for ObjectView {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Clone for ObjectView {
    fn clone(&self) -> Self {
        let mut pins = lock(&self.client.inner.pins);
        if let Some((_, c)) = pins.get_mut(&self.slot) {
            *c += 1;
        }
        drop(pins);
        ObjectView {
            client: self.client.clone(),
            id: self.id,
            slot: self.slot,
            offset: self.offset,
            ptr: self.ptr,
            len: self.len,
        }
    }
}

impl Drop for ObjectView {
    fn drop(&mut self) {
        self.client.unpin(&self.id, self.slot);
    }
}
