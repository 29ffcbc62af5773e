//! The connection: request/reply with ids over the Unix socket (any thread may read replies
//! for the others), one-way frames batched and numbered (`frames_sent`, `sync_through`), the
//! [`FrameObserver`] told those numbers as frames are queued and written, the handshake, and
//! `Subscription` (events on a connection of its own).

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{StoreClient, lock, reply_error};
use crate::blocks::id::ObjectId;
use crate::error::{Result, StoreError};
use crate::protocol::{self, ErrorCode, Event, MAX_REPLY, PROTOCOL_VERSION, Reply, Request};
use crate::sock;

pub(super) struct ReadState {
    pub(super) reader: Option<BufReader<UnixStream>>,
    /// Replies that arrived for other threads' requests.
    pub(super) replies: HashMap<u64, Reply>,
    /// Set when the connection broke: every call fails with this from then on.
    pub(super) broken: Option<String>,
}

/// The socket half of a client: request/reply with ids, any thread may read for the others.
pub(super) struct Conn {
    pub(super) writer: Mutex<Writer>,
    /// Signalled when a frame is queued into an empty batch while a flusher waits for one
    /// (see [`StoreClient::wait_for_frames`]).
    pub(super) queued: Condvar,
    pub(super) read: Mutex<ReadState>,
    pub(super) cv: Condvar,
    pub(super) next_req: AtomicU64,
    /// Sequence number of the last frame written (under the writer lock).
    pub(super) sent: AtomicU64,
    /// Every frame up to this sequence number has been handled by the daemon: it serves one
    /// connection in order, so the reply to a request vouches for all frames sent before it.
    pub(super) synced: AtomicU64,
}

/// The socket's write side: one-way frames are batched here and written by [`Conn::flush`]
/// (before any request, before a wait parks, when the batch is large, and by the runtime's
/// flusher every millisecond), so that a burst of notices costs one system call.
pub(super) struct Writer {
    pub(super) stream: UnixStream,
    pub(super) batch: Vec<u8>,
    /// Off by default: every frame is written at once. The `trove` runtime turns it on (it
    /// runs a flusher).
    pub(super) batching: bool,
    /// Sequence number of the last frame in `batch`.
    pub(super) last: u64,
    /// Told the numbers of frames publishing objects as they are queued, and of the last
    /// frame written after each write (see [`StoreClient::observe_frames`]).
    pub(super) observer: Option<Box<dyn FrameObserver>>,
    /// A flusher waits for a frame to be queued (see [`StoreClient::wait_for_frames`]).
    pub(super) flusher_waiting: bool,
}

/// Told the sequence numbers of a client's frames (numbered from 1 in the order they are
/// queued) as they are queued and written: what a process needs to know which of its frames
/// are already in the daemon's hands should it die. Called under the client's writer lock,
/// so each call must be quick and must not use the client.
pub trait FrameObserver: Send {
    /// The calling thread has just queued frame `seq`, which publishes an object (a small
    /// put or an owned seal); it cannot be written before this returns.
    fn publishing(&self, seq: u64);
    /// Every frame up to `seq` has been written to the socket: the daemon handles them even
    /// if this process dies now.
    fn written(&self, seq: u64);
}

/// A batch this large is written at once.
pub(super) const BATCH_LIMIT: usize = 32 << 10;

impl Writer {
    pub(super) fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let r = self.stream.write_all(&self.batch);
        self.batch.clear();
        r.map_err(|e| StoreError::Disconnected(format!("write to the store failed: {e}")))?;
        if let Some(o) = &self.observer {
            o.written(self.last);
        }
        Ok(())
    }
}

impl Conn {
    /// Queues one frame (written now if `req != 0`, a request awaiting its reply); returns
    /// its sequence number.
    pub(super) fn send(&self, req: u64, r: &Request) -> Result<u64> {
        let frame = r.encode(req);
        let mut w = lock(&self.writer);
        w.batch.extend_from_slice(&frame);
        let seq = self.sent.fetch_add(1, Ordering::AcqRel) + 1;
        w.last = seq;
        if let Some(o) = &w.observer
            && matches!(r, Request::PutSmall { .. } | Request::SealOwned { .. })
        {
            o.publishing(seq);
        }
        if req != 0 || !w.batching || w.batch.len() >= BATCH_LIMIT {
            w.flush()?;
        } else if w.flusher_waiting {
            w.flusher_waiting = false;
            self.queued.notify_one();
        }
        Ok(seq)
    }

    pub(super) fn flush(&self) -> Result<()> {
        lock(&self.writer).flush()
    }

    /// Sends a request and waits for its reply.
    pub(super) fn call(&self, r: &Request) -> Result<Reply> {
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let seq = match self.send(req, r) {
            Ok(seq) => seq,
            // The daemon closed the connection: it may have said why first (a client cut off
            // for misbehaviour is sent the error); read up to its end for that reason.
            Err(StoreError::Disconnected(_)) => {
                return Err(self
                    .wait_reply(|_| None::<()>)
                    .expect_err("only a broken connection ends this wait"));
            }
            Err(e) => return Err(e),
        };
        let reply = self.wait_reply(|st| st.replies.remove(&req))?;
        self.synced.fetch_max(seq, Ordering::AcqRel);
        Ok(reply)
    }

    /// Whether the daemon has handled the frame with sequence number `seq`.
    pub(super) fn is_synced(&self, seq: u64) -> bool {
        self.synced.load(Ordering::Acquire) >= seq
    }

    pub(super) fn broken(&self) -> Option<String> {
        lock(&self.read).broken.clone()
    }

    /// Waits until `take` finds something, reading frames for everybody meanwhile.
    pub(super) fn wait_reply<T>(
        &self,
        mut take: impl FnMut(&mut ReadState) -> Option<T>,
    ) -> Result<T> {
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

impl StoreClient {
    pub(super) fn call(&self, r: &Request) -> Result<Reply> {
        self.inner.conn.call(r)
    }

    pub(super) fn expect_ok(&self, r: &Request, id: ObjectId) -> Result<()> {
        match self.call(r)? {
            Reply::Ok => Ok(()),
            other => Err(reply_error(other, id)),
        }
    }

    /// Makes sure the daemon has handled every frame sent so far.
    pub(super) fn sync(&self) -> Result<()> {
        match self.call(&Request::Flush)? {
            Reply::Ok => Ok(()),
            other => Err(reply_error(other, ObjectId::default())),
        }
    }

    /// The sequence number of the last one-way frame or request queued on this connection.
    pub fn frames_sent(&self) -> u64 {
        self.inner.conn.sent.load(Ordering::Acquire)
    }

    /// Makes sure the daemon has handled every frame up to sequence number `seq` (one round
    /// trip, unless a reply already vouches for it).
    pub fn sync_through(&self, seq: u64) -> Result<()> {
        if self.inner.conn.is_synced(seq) {
            return Ok(());
        }
        self.sync()
    }

    /// Batch one-way frames (releases, holds, small puts, watches) until [`StoreClient::flush`],
    /// the next request, a wait that parks, or 32 KiB. Whoever turns this on must flush
    /// periodically (the `trove` runtime runs a flusher thread).
    pub fn set_batching(&self, on: bool) -> Result<()> {
        let mut w = lock(&self.inner.conn.writer);
        w.batching = on;
        w.flush()
    }

    /// Writes the one-way frames queued so far (releases, holds, small puts, watches).
    pub fn flush(&self) -> Result<()> {
        self.inner.conn.flush()
    }

    /// For a flusher: waits until a one-way frame is queued in the batch (at most `timeout`);
    /// whether one is. So an idle process's flusher sleeps instead of waking every
    /// millisecond (a thousand idle actors would otherwise keep the machine busy).
    pub fn wait_for_frames(&self, timeout: Duration) -> bool {
        let conn = &self.inner.conn;
        let mut w = lock(&conn.writer);
        let deadline = Instant::now() + timeout;
        // Cleared by whoever wakes us: a frame queued, or `wake_flusher`.
        w.flusher_waiting = true;
        let queued = loop {
            if !w.batch.is_empty() {
                break true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !w.flusher_waiting || left.is_zero() {
                break false;
            }
            w = conn
                .queued
                .wait_timeout(w, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        w.flusher_waiting = false;
        queued
    }

    /// Ends a [`StoreClient::wait_for_frames`] at once (its process is shutting trove down).
    pub fn wake_flusher(&self) {
        let conn = &self.inner.conn;
        let mut w = lock(&conn.writer);
        if w.flusher_waiting {
            w.flusher_waiting = false;
            conn.queued.notify_all();
        }
    }

    /// From now on tells `observer` the numbers of the frames this client queues and writes
    /// (see [`FrameObserver`]). Replaces an earlier observer.
    pub fn observe_frames(&self, observer: impl FrameObserver + 'static) {
        lock(&self.inner.conn.writer).observer = Some(Box::new(observer));
    }

    /// `Disconnected` if the daemon has gone (its end of the socket is closed).
    pub fn check_alive(&self) -> Result<()> {
        if let Some(why) = self.inner.conn.broken() {
            return Err(StoreError::Disconnected(why));
        }
        use rustix::event::{PollFd, PollFlags, Timespec};
        let w = lock(&self.inner.conn.writer);
        let mut fds = [PollFd::new(&w.stream, PollFlags::RDHUP)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let n = rustix::event::poll(&mut fds, Some(&zero)).map_err(std::io::Error::from)?;
        let gone = n > 0
            && fds[0]
                .revents()
                .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR);
        drop(w);
        if gone {
            return Err(StoreError::Disconnected(
                "the store closed the connection".into(),
            ));
        }
        Ok(())
    }
}

/// A stream of seal and delete events on a connection of its own.
pub struct Subscription {
    pub(super) reader: BufReader<UnixStream>,
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

    pub(super) fn read(&mut self) -> Result<Option<(u64, Reply)>> {
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
pub(super) fn handshake(socket: &Path) -> Result<(UnixStream, u32, std::os::fd::OwnedFd)> {
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
            ..
        } if version == PROTOCOL_VERSION => client_index,
        Reply::Welcome { version, .. } => {
            return Err(StoreError::Refused(format!(
                "protocol version {version}, this client speaks {PROTOCOL_VERSION}"
            )));
        }
        Reply::Error {
            code: code @ ErrorCode::TooManyClients,
            nums,
            message,
        } => return Err(Reply::into_error(code, nums, message, ObjectId::default())),
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
