//! The daemon's end of one client connection: its write side. A reply may block its own
//! thread (bounded by the client timeout); a push from another client never waits: it is
//! queued behind a reply in progress, bounded, or the client is cut off.

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::debug;

use super::lock;
use crate::sock;

/// Frames pushed to a client while its own reply is being written wait in a queue this long at
/// most; beyond it the client (which does not read) is cut off.
const MAX_PUSH_QUEUE: usize = 4 << 20;

/// The daemon's end of one client connection (its write side).
pub(crate) struct Conn {
    pub(super) stream: UnixStream,
    out: Mutex<ConnOut>,
    /// The daemon ended this connection (the client did not close it itself).
    pub(super) cut: AtomicBool,
}

#[derive(Default)]
struct ConnOut {
    /// The client's own thread is writing a reply (a blocking write, bounded by the client
    /// timeout): pushes are queued behind it instead of waiting for it.
    replying: bool,
    /// Frames pushed meanwhile, written by the replying thread after its reply.
    queue: Vec<u8>,
}

impl Conn {
    pub(crate) fn new(stream: UnixStream) -> Conn {
        Conn {
            stream,
            out: Mutex::new(ConnOut::default()),
            cut: AtomicBool::new(false),
        }
    }

    /// A reply to this connection's own request, from its own thread: may block (bounded by
    /// the client timeout), and never while holding a lock that a push takes.
    pub(super) fn reply(&self, frame: &[u8]) -> std::io::Result<()> {
        lock(&self.out).replying = true;
        let mut r = (&self.stream).write_all(frame);
        loop {
            let mut o = lock(&self.out);
            if o.queue.is_empty() || r.is_err() {
                o.replying = false;
                o.queue = Vec::new();
                return r;
            }
            let queued = std::mem::take(&mut o.queue);
            drop(o);
            r = (&self.stream).write_all(&queued);
        }
    }

    /// A push caused by another client (wake-up, event): never blocks. While this client's
    /// own reply is being written it is queued behind it (bounded); a client that does not
    /// read its socket is cut off.
    pub(crate) fn push(&self, frame: &[u8]) {
        let mut o = lock(&self.out);
        if o.replying {
            if o.queue.len() + frame.len() > MAX_PUSH_QUEUE {
                drop(o);
                debug!("cutting off a client that does not read its socket");
                self.cut_off(None);
            } else {
                o.queue.extend_from_slice(frame);
            }
            return;
        }
        if let Err(e) = sock::send_nonblocking(&self.stream, frame) {
            drop(o);
            debug!("cutting off a client that does not read its socket: {e}");
            self.cut_off(None);
        }
    }

    /// Ends the connection for misbehaviour, after `why` (an error frame, sent if it fits
    /// without blocking). The client's next verb gets `Disconnected`; what its process may
    /// still read is kept until it is gone (see `Table::depart`).
    pub(crate) fn cut_off(&self, why: Option<&[u8]>) {
        self.cut.store(true, Ordering::SeqCst);
        if let Some(frame) = why {
            let o = lock(&self.out);
            if !o.replying {
                let _ = sock::send_nonblocking(&self.stream, frame);
            }
        }
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}
