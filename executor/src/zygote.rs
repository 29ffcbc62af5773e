//! The zygote: a single-threaded process forked at `init`, before any thread exists, that
//! forks actor and worker processes on request and reaps them.
//!
//! The driver talks to it over a private socketpair (frames of `u32 len | body`). The zygote
//! never starts a thread, so each fork copies a single-threaded process. Every child gets
//! `PR_SET_PDEATHSIG(SIGKILL)` (it dies with the zygote) and the zygote gets it too (it dies
//! with the driver), so no process outlives the driver, however the driver ends. When a child
//! dies the zygote fails the call it was running and, for an actor, every queued call (the
//! callers see `ActorDied`), and marks its mailbox dead so later calls fail at once; a worker
//! is replaced. Messages the dead child had taken but not yet noted as current are failed
//! too, and the queue slots it still held are freed (`Mailbox::reclaim`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, getpid, getppid};
use trove_store::{ObjectId, ObjectView, StoreClient};

use crate::mailbox::Mailbox;
use crate::message::{Failure, KIND_STOP, Message, report_failure};
use crate::process::{ProcessError, ensure_single_threaded};

/// The entry point a child runs: the payload of its spawn request; returns the exit code.
pub type Entry = fn(&[u8]) -> i32;

/// What to fork.
#[derive(Debug, Clone)]
pub struct SpawnRequest {
    pub entry: Entry,
    /// The child's mailbox (a store object): its current call and debts are failed when it
    /// dies; an actor's is marked dead and its queued calls failed too.
    pub mailbox: ObjectId,
    /// The mailbox whose calls the child runs and whose completion records it fills: the
    /// actor's own, or the task queue for a worker.
    pub queue: ObjectId,
    /// Fork a replacement when it dies (workers).
    pub respawn: bool,
    pub payload: Vec<u8>,
}

const OP_SPAWN: u8 = 1;
const OP_KILL: u8 = 2;

/// The driver's handle on the zygote.
#[derive(Debug)]
pub struct Zygote {
    pid: Pid,
    cmd: Mutex<UnixStream>,
}

impl Zygote {
    /// Forks the zygote. The caller must be single-threaded; `socket` is the store's.
    pub fn start(socket: &Path) -> Result<Zygote, ProcessError> {
        ensure_single_threaded()?;
        let (ours, theirs) = UnixStream::pair()?;
        let parent = getpid();
        // SAFETY: single-threaded (checked above): the child is a consistent copy and runs
        // only `zygote_main`, then exits.
        match unsafe { fork() }? {
            ForkResult::Child => {
                drop(ours);
                let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    zygote_main(theirs, parent, socket)
                }))
                .unwrap_or(101);
                // SAFETY: ends the process without running the driver's atexit handlers.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => {
                drop(theirs);
                let z = Zygote {
                    pid: child,
                    cmd: Mutex::new(ours),
                };
                // The zygote answers an empty kill once it is connected to the store.
                z.request(&[OP_KILL, 0, 0, 0, 0])?;
                Ok(z)
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    fn request(&self, body: &[u8]) -> Result<Vec<u8>, ProcessError> {
        let mut s = self.cmd.lock().unwrap_or_else(|p| p.into_inner());
        s.write_all(&(body.len() as u32).to_le_bytes())?;
        s.write_all(body)?;
        let reply = read_frame(&mut s)?
            .ok_or_else(|| ProcessError::StoreStart("the zygote exited".into()))?;
        match reply.first() {
            Some(1) => Ok(reply[1..].to_vec()),
            _ => Err(ProcessError::StoreStart(
                String::from_utf8_lossy(reply.get(1..).unwrap_or(&[])).into_owned(),
            )),
        }
    }

    /// Forks a child running `req.entry(req.payload)`; returns its pid.
    pub fn spawn(&self, req: &SpawnRequest) -> Result<i32, ProcessError> {
        let mut body = vec![OP_SPAWN];
        body.extend_from_slice(&(req.entry as usize as u64).to_le_bytes());
        body.extend_from_slice(req.mailbox.as_bytes());
        body.extend_from_slice(req.queue.as_bytes());
        body.push(req.respawn as u8);
        body.extend_from_slice(&req.payload);
        let r = self.request(&body)?;
        Ok(i32::from_le_bytes(
            r.get(..4)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| ProcessError::StoreStart("short spawn reply".into()))?,
        ))
    }

    /// SIGKILLs a child of the zygote (an actor); its calls fail with `ActorDied`.
    pub fn kill(&self, pid: i32) -> Result<(), ProcessError> {
        let mut body = vec![OP_KILL];
        body.extend_from_slice(&pid.to_le_bytes());
        self.request(&body).map(|_| ())
    }

    /// Stops the zygote and with it every child (it kills them and reaps them first).
    pub fn stop(&self) {
        {
            let s = self.cmd.lock().unwrap_or_else(|p| p.into_inner());
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if !crate::process::reap(self.pid, Duration::from_secs(5)) {
            let _ = kill(self.pid, Signal::SIGKILL);
            crate::process::reap(self.pid, Duration::from_secs(5));
        }
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        self.stop();
    }
}

fn read_frame(s: &mut UnixStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > 16 << 20 {
        return Err(std::io::Error::other("oversize zygote frame"));
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body)?;
    Ok(Some(body))
}

fn reply(s: &mut UnixStream, ok: bool, body: &[u8]) -> std::io::Result<()> {
    s.write_all(&(body.len() as u32 + 1).to_le_bytes())?;
    s.write_all(&[ok as u8])?;
    s.write_all(body)
}

struct Child {
    req: SpawnRequest,
    /// Pin the mailbox and queue objects while the child lives.
    _views: (ObjectView, Option<ObjectView>),
    mailbox: Mailbox,
    queue: Mailbox,
}

fn attach(client: &StoreClient, id: ObjectId) -> Result<(ObjectView, Mailbox), String> {
    let view = client
        .get(id, Duration::from_secs(5))
        .map_err(|e| format!("mailbox {id}: {e}"))?;
    let ptr = view
        .shared_ptr()
        .ok_or_else(|| format!("mailbox {id}: not in shared memory"))?;
    // SAFETY: the pointer comes from the raw shared mapping (writes through it are allowed);
    // the view pins the object's bytes, which stay mapped while it lives; the mailbox is
    // stored next to the view and dropped with it.
    let mailbox =
        unsafe { Mailbox::attach(ptr, view.len()) }.map_err(|e| format!("mailbox {id}: {e}"))?;
    Ok((view, mailbox))
}

fn zygote_main(mut cmd: UnixStream, driver: Pid, socket: &Path) -> i32 {
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() || getppid() != driver {
        return 1;
    }
    let client = match StoreClient::connect(socket) {
        Ok(c) => c,
        Err(e) => {
            let _ = read_frame(&mut cmd);
            let _ = reply(&mut cmd, false, format!("zygote: {e}").as_bytes());
            return 1;
        }
    };
    let me = getpid();
    let mut children: HashMap<i32, Child> = HashMap::new();
    loop {
        // Commands, with a short timeout so deaths are noticed within ~20 ms.
        let readable = {
            use rustix::event::{PollFd, PollFlags, Timespec};
            let mut fds = [PollFd::new(&cmd, PollFlags::IN)];
            let ts = Timespec {
                tv_sec: 0,
                tv_nsec: 20_000_000,
            };
            matches!(rustix::event::poll(&mut fds, Some(&ts)), Ok(n) if n > 0)
        };
        if readable {
            match read_frame(&mut cmd) {
                Ok(Some(body)) => {
                    let (ok, out) = handle(&client, &body, &mut children, me);
                    if reply(&mut cmd, ok, &out).is_err() {
                        break;
                    }
                }
                _ => break, // the driver is gone or closed us: stop everything
            }
        }
        reap(&client, &mut children, me);
    }
    for pid in children.keys() {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    for pid in children.keys() {
        crate::process::reap(Pid::from_raw(*pid), Duration::from_secs(5));
    }
    0
}

fn handle(
    client: &StoreClient,
    body: &[u8],
    children: &mut HashMap<i32, Child>,
    me: Pid,
) -> (bool, Vec<u8>) {
    match body.first() {
        Some(&OP_SPAWN) if body.len() >= 50 => {
            let entry_addr = u64::from_le_bytes(body[1..9].try_into().expect("8 bytes")) as usize;
            // SAFETY: the address was taken from an `Entry` fn item by the driver, which this
            // process is a fork of (same binary, same layout), and only the driver can write to
            // this private socketpair.
            let entry: Entry = unsafe { std::mem::transmute::<usize, Entry>(entry_addr) };
            let req = SpawnRequest {
                entry,
                mailbox: ObjectId(body[9..29].try_into().expect("20 bytes")),
                queue: ObjectId(body[29..49].try_into().expect("20 bytes")),
                respawn: body[49] != 0,
                payload: body[50..].to_vec(),
            };
            let (view, mailbox) = match attach(client, req.mailbox) {
                Ok(x) => x,
                Err(e) => return (false, e.into_bytes()),
            };
            let (queue_view, queue) = if req.queue == req.mailbox {
                (None, mailbox)
            } else {
                match attach(client, req.queue) {
                    Ok((v, q)) => (Some(v), q),
                    Err(e) => return (false, e.into_bytes()),
                }
            };
            match fork_child(&req, me) {
                Ok(pid) => {
                    let views = (view, queue_view);
                    children.insert(
                        pid,
                        Child {
                            req,
                            _views: views,
                            mailbox,
                            queue,
                        },
                    );
                    (true, pid.to_le_bytes().to_vec())
                }
                Err(e) => (false, e.into_bytes()),
            }
        }
        Some(&OP_KILL) if body.len() == 5 => {
            let pid = i32::from_le_bytes(body[1..5].try_into().expect("4 bytes"));
            if children.contains_key(&pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            (true, Vec::new())
        }
        _ => (false, b"malformed zygote request".to_vec()),
    }
}

fn fork_child(req: &SpawnRequest, me: Pid) -> Result<i32, String> {
    // SAFETY: the zygote is single-threaded (it never starts a thread), so the child is a
    // consistent copy; it drops the zygote's connection and runs only the entry.
    match unsafe { fork() } {
        Err(e) => Err(format!("fork: {e}")),
        Ok(ForkResult::Parent { child }) => Ok(child.as_raw()),
        Ok(ForkResult::Child) => {
            // Close every fd inherited from the zygote (its store connection, the command
            // socket): the objects owning them in the copied stack are never used or dropped
            // again (the child ends with _exit), and the entry opens its own.
            // SAFETY: a plain syscall; no live object in the child uses these fds again.
            unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
            let code = if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err()
                || getppid() != me
            {
                1
            } else {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (req.entry)(&req.payload)))
                    .unwrap_or(101)
            };
            // SAFETY: ends the child without running atexit handlers copied from the driver.
            unsafe { libc::_exit(code) }
        }
    }
}

/// Reaps dead children: fails their calls, and replaces workers.
fn reap(client: &StoreClient, children: &mut HashMap<i32, Child>, me: Pid) {
    loop {
        let pid = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, _)) | Ok(WaitStatus::Signaled(pid, _, _)) => pid,
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => continue,
        };
        let Some(child) = children.remove(&pid.as_raw()) else {
            continue;
        };
        let why = format!("process {pid} died");
        let fail = |rec: &[u8], failure| {
            if let Some(m) = Message::decode(rec)
                && m.kind != KIND_STOP
            {
                let _ = report_failure(client, m.result, m.reply_to, failure, &why);
            }
        };
        let failure = if child.req.respawn {
            Failure::TaskFailed
        } else {
            // Producers see it first, so nothing new is queued behind what is failed below.
            child.mailbox.set_dead();
            Failure::ActorDied
        };
        // Messages it had taken and still held in their queue slots: each one it had not yet
        // noted as current is failed here (the current one is looked at below, with its
        // record and its debts); every such slot is freed, so the queue is not blocked.
        let current_pos = child.mailbox.current().map(|(pos, _)| pos);
        child.queue.reclaim(pid.as_raw() as u32, |pos, m| {
            if current_pos != Some(pos) {
                fail(m, failure);
                child.queue.record(pos).abandon(pos);
            }
        });
        // Results it made and was handing to its store client (see `crate::debts`).
        let debts = child.mailbox.debts().unsettled();
        // The call it was running, unless its result is in its record already or owed.
        if let Some((pos, rec)) = child.mailbox.current() {
            let (at, delivered) = child.queue.record(pos).status();
            let owed = Message::decode(&rec).is_some_and(|m| debts.owes(&m.result));
            let in_record = at == pos && delivered;
            if !in_record && !owed {
                fail(&rec, failure);
                child.queue.record(pos).abandon(pos);
            }
        }
        child.mailbox.clear_current();
        debts.settle(
            |pos| child.queue.record(pos),
            |d| {
                let _ = report_failure(client, ObjectId(d.result), d.reply_to, failure, &why);
            },
        );
        if child.req.respawn {
            let _ = client.flush();
            if let Ok(new) = fork_child(&child.req, me) {
                children.insert(new, child);
            }
            continue;
        }
        while let Ok(Some(())) = child
            .mailbox
            .try_pop(me.as_raw() as u32, |_, m| fail(m, Failure::ActorDied))
        {}
        drop(child);
        // The reports are one-way frames: send them now (the zygote has no flusher thread).
        let _ = client.flush();
    }
}
