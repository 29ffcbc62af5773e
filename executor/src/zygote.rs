//! The zygote: a single-threaded process forked at `init`, before any thread exists, that
//! forks actor and worker processes on request and reaps them.
//!
//! Every process of the tree talks to it over a private socketpair (frames of `u32 len |
//! body`): the driver over the one made at `init`, each child over its *link*, a socketpair
//! the zygote makes as it forks the child (the child finds its end at [`LINK_FD`]). So any
//! process can start actors and tasks, kill actors and cancel tasks, and the zygote knows who
//! asked: an actor is *owned* by the process that started it and dies with it unless it is
//! detached.
//!
//! The zygote never starts a thread, so each fork copies a single-threaded process. Every
//! child gets `PR_SET_PDEATHSIG(SIGKILL)` (it dies with the zygote) and the zygote gets it too
//! (it dies with the driver), so no process outlives the driver, however the driver ends.
//!
//! When a child dies the zygote fails the call it was running and, for an actor that is not
//! restarted, every queued call (the callers see `ActorDied`), and marks its mailbox dead so
//! later calls fail at once; a worker is replaced, an actor with restarts left is forked
//! again (its constructor runs again; queued calls wait for it). A call in flight at the
//! death is run again if its consumer allows retries (at least once), else failed (at most
//! once). Messages the dead child had taken but not yet noted as current are treated the
//! same way, and the queue slots it still held are freed (`Mailbox::reclaim`).
//!
//! Lifetimes: an actor started with a *token* (an owned object that exists exactly while a
//! handle to the actor exists in some process) is sent a stop message once the token is gone,
//! so it ends after its queued calls; an actor is killed when its owner dies, unless detached.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, getpid, getppid};
use trove_store::{ObjectId, ObjectView, StoreClient};

use crate::mailbox::Mailbox;
use crate::message::{Failure, KIND_STOP, Message, report_failure};
use crate::process::{ProcessError, ensure_single_threaded};

/// The entry point a child runs: the payload of its spawn request; returns the exit code.
pub type Entry = fn(&SpawnRequest) -> i32;

/// The file descriptor at which a child of the zygote finds its link to it.
pub const LINK_FD: i32 = 3;

/// How a child lives and dies (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lifetime {
    /// A task worker (of the pool: replaced when it dies) rather than an actor.
    pub worker: bool,
    /// A worker started while another waits (see [`Zygote::blocked`]): not replaced, and
    /// retires when it is no longer needed ([`Zygote::may_retire`]).
    pub extra: bool,
    /// How many times an actor is forked again after it dies: 0 never, -1 without limit.
    pub max_restarts: i32,
    /// How many times a call in flight when its consumer died is run again (0: it fails).
    pub max_retries: u32,
    /// Not killed with its owner, not stopped when its handles are gone.
    pub detached: bool,
    /// An object that exists while a handle to the actor exists (zero: not watched).
    pub token: ObjectId,
    /// An object the zygote holds while the actor lives (a named actor's entry; zero: none).
    pub keep: ObjectId,
}

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
    pub lifetime: Lifetime,
    /// More mailboxes of the child (one per extra thread of a threaded actor), in which its
    /// threads note their current calls and debts, looked at like `mailbox`'s when it dies.
    pub lanes: Vec<ObjectId>,
    pub payload: Vec<u8>,
}

impl SpawnRequest {
    fn encode(&self, op: u8) -> Vec<u8> {
        let l = &self.lifetime;
        let mut b = vec![op];
        b.extend_from_slice(&(self.entry as usize as u64).to_le_bytes());
        b.extend_from_slice(self.mailbox.as_bytes());
        b.extend_from_slice(self.queue.as_bytes());
        b.push(l.worker as u8 | (l.extra as u8) << 1 | (l.detached as u8) << 2);
        b.extend_from_slice(&l.max_restarts.to_le_bytes());
        b.extend_from_slice(&l.max_retries.to_le_bytes());
        b.extend_from_slice(l.token.as_bytes());
        b.extend_from_slice(l.keep.as_bytes());
        b.extend_from_slice(&(self.lanes.len() as u32).to_le_bytes());
        for lane in &self.lanes {
            b.extend_from_slice(lane.as_bytes());
        }
        b.extend_from_slice(&self.payload);
        b
    }

    /// Decodes a request's body after its op byte.
    fn decode(b: &[u8]) -> Option<SpawnRequest> {
        let id = |at: usize| Some(ObjectId(b.get(at..at + 20)?.try_into().ok()?));
        let entry_addr = u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize;
        // SAFETY: the address was taken from an `Entry` fn item by a process of this tree, a
        // fork of the same binary (same layout), and only processes of the tree can write to
        // the zygote's private sockets.
        let entry: Entry = unsafe { std::mem::transmute::<usize, Entry>(entry_addr) };
        let flags = *b.get(48)?;
        let lanes = u32::from_le_bytes(b.get(97..101)?.try_into().ok()?) as usize;
        if lanes > 4096 {
            return None;
        }
        let lanes = (0..lanes)
            .map(|i| id(101 + 20 * i))
            .collect::<Option<Vec<_>>>()?;
        let payload_at = 101 + 20 * lanes.len();
        Some(SpawnRequest {
            entry,
            mailbox: id(8)?,
            queue: id(28)?,
            lifetime: Lifetime {
                worker: flags & 1 != 0,
                extra: flags & 2 != 0,
                detached: flags & 4 != 0,
                max_restarts: i32::from_le_bytes(b.get(49..53)?.try_into().ok()?),
                max_retries: u32::from_le_bytes(b.get(53..57)?.try_into().ok()?),
                token: id(57)?,
                keep: id(77)?,
            },
            lanes,
            payload: b.get(payload_at..)?.to_vec(),
        })
    }
}

const OP_PING: u8 = 0;
const OP_SPAWN: u8 = 1;
const OP_KILL: u8 = 2;
const OP_CANCEL: u8 = 3;
const OP_BLOCKED: u8 = 4;
const OP_UNBLOCKED: u8 = 5;
const OP_RETIRE: u8 = 6;

/// A process's handle on the zygote: the driver's (which started it and stops it), or a
/// child's link.
#[derive(Debug)]
pub struct Zygote {
    pid: Pid,
    cmd: Mutex<UnixStream>,
    /// The driver's: dropping it stops the zygote and every child.
    owner: bool,
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
                    owner: true,
                };
                // The zygote answers once it is connected to the store.
                z.request(&[OP_PING])?;
                Ok(z)
            }
        }
    }

    /// In a child of the zygote: its link, inherited at [`LINK_FD`] (`None` if there is none,
    /// e.g. in a process the zygote did not fork). Take it once.
    pub fn inherited() -> Option<Zygote> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat only writes the buffer it is given (of the right type), and fails
        // harmlessly on a closed fd.
        if unsafe { libc::fstat(LINK_FD, st.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: fstat succeeded, so it filled the buffer.
        let st = unsafe { st.assume_init() };
        if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return None;
        }
        // SAFETY: the fd is open (fstat succeeded) and is the link the zygote left there for
        // this process (`fork_child`); nothing else in the process owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(LINK_FD) };
        Some(Zygote {
            pid: getppid(),
            cmd: Mutex::new(UnixStream::from(fd)),
            owner: false,
        })
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

    /// Forks a child running `req.entry(req)`; returns its pid.
    pub fn spawn(&self, req: &SpawnRequest) -> Result<i32, ProcessError> {
        let r = self.request(&req.encode(OP_SPAWN))?;
        pid_of(&r)
    }

    /// SIGKILLs the actor serving `mailbox`, and does not restart it; its calls fail with
    /// `ActorDied`. Unknown mailboxes (an actor already gone) are not an error.
    pub fn kill(&self, mailbox: ObjectId) -> Result<(), ProcessError> {
        let mut body = vec![OP_KILL];
        body.extend_from_slice(mailbox.as_bytes());
        self.request(&body).map(|_| ())
    }

    /// Kills the worker running the task whose result is `result` (it is replaced; the task
    /// is not retried, and fails with `Cancelled`). Whether one was running it.
    pub fn cancel_running(&self, result: ObjectId) -> Result<bool, ProcessError> {
        let mut body = vec![OP_CANCEL];
        body.extend_from_slice(result.as_bytes());
        Ok(self.request(&body)?.first() == Some(&1))
    }

    /// A worker's task waits for another: the zygote starts `extra` (a worker whose own
    /// mailbox the caller made) unless enough extra workers run already; returns its pid if
    /// it was started. Call [`Zygote::unblocked`] when the wait ends.
    pub fn blocked(&self, extra: &SpawnRequest) -> Result<Option<i32>, ProcessError> {
        let r = self.request(&extra.encode(OP_BLOCKED))?;
        if r.is_empty() {
            return Ok(None);
        }
        pid_of(&r).map(Some)
    }

    /// The wait [`Zygote::blocked`] announced is over.
    pub fn unblocked(&self) -> Result<(), ProcessError> {
        self.request(&[OP_UNBLOCKED]).map(|_| ())
    }

    /// Asked by an idle extra worker: whether it may exit (more extra workers run than
    /// tasks wait). If so the zygote counts it gone already.
    pub fn may_retire(&self) -> Result<bool, ProcessError> {
        Ok(self.request(&[OP_RETIRE])?.first() == Some(&1))
    }

    /// Stops the zygote and with it every child (it kills them and reaps them first). A
    /// child's link only closes.
    pub fn stop(&self) {
        {
            let s = self.cmd.lock().unwrap_or_else(|p| p.into_inner());
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if !self.owner {
            return;
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

fn pid_of(r: &[u8]) -> Result<i32, ProcessError> {
    Ok(i32::from_le_bytes(
        r.get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| ProcessError::StoreStart("short zygote reply".into()))?,
    ))
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
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.extend_from_slice(&(body.len() as u32 + 1).to_le_bytes());
    frame.push(ok as u8);
    frame.extend_from_slice(body);
    s.write_all(&frame)
}

struct Child {
    req: SpawnRequest,
    /// Pin the mailbox and queue objects while the child lives.
    _views: (ObjectView, Option<ObjectView>),
    /// The objects held for the actor: its name's entry, and a detached actor's token.
    _keep: (Option<ObjectView>, Option<ObjectView>),
    mailbox: Mailbox,
    queue: Mailbox,
    /// The child's other threads' mailboxes (see [`SpawnRequest::lanes`]), pinned.
    lanes: Vec<(ObjectView, Mailbox)>,
    /// The zygote's end of the child's link.
    link: Option<UnixStream>,
    /// The process that asked for it (`None`: the driver).
    owner: Option<i32>,
    restarts_left: i32,
    /// Killed on request: not restarted.
    killed: bool,
    /// Sent a stop message (no handle left): not restarted.
    stopping: bool,
    /// How many times each call in flight was run again (actors).
    attempts: HashMap<ObjectId, u32>,
    /// The task it was killed for by a forced cancel.
    cancelled: Option<ObjectId>,
    /// Its token was not found at the last look (see [`Zyg::stop_unreferenced`]).
    missed: bool,
    /// An extra worker counted gone already (it asked to retire).
    retired: bool,
    /// Its tasks' waits announced and not yet over ([`Zygote::blocked`]): forgotten with it
    /// if it dies waiting, so that the pool does not keep extra workers for it.
    blocked: u32,
}

/// The zygote's state.
struct Zyg {
    client: StoreClient,
    me: Pid,
    children: HashMap<i32, Child>,
    /// Workers' tasks waiting for something, and extra workers started for them.
    blocked: u32,
    extras: u32,
    /// How many times each task was run again (bounded: see `note_attempt`).
    task_attempts: HashMap<ObjectId, u32>,
    /// The stop message sent to an actor no handle refers to any more.
    stop: Vec<u8>,
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

/// Raises this process's open-file limit to its hard limit: the zygote holds a link per
/// child, and its children inherit the limit (a thousand processes need more than the
/// usual 1,024).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn zygote_main(mut cmd: UnixStream, driver: Pid, socket: &Path) -> i32 {
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() || getppid() != driver {
        return 1;
    }
    raise_fd_limit();
    let client = match StoreClient::connect(socket) {
        Ok(c) => c,
        Err(e) => {
            let _ = read_frame(&mut cmd);
            let _ = reply(&mut cmd, false, format!("zygote: {e}").as_bytes());
            return 1;
        }
    };
    // It forks: no thread may ever start in it.
    client.forbid_threads();
    let mut z = Zyg {
        client,
        me: getpid(),
        children: HashMap::new(),
        blocked: 0,
        extras: 0,
        task_attempts: HashMap::new(),
        stop: {
            let mut b = Vec::new();
            Message {
                kind: KIND_STOP,
                retried: false,
                func: 0,
                result: ObjectId::default(),
                reply_to: (0, 0),
                args: &[],
            }
            .encode_into(&mut b);
            b
        },
    };
    let mut last_watch = Instant::now();
    'serve: loop {
        // Requests from the driver and every child, with a short timeout so deaths are
        // noticed within ~20 ms.
        let mut ready: Vec<Option<i32>> = Vec::new();
        {
            use rustix::event::{PollFd, PollFlags, Timespec};
            let pids: Vec<i32> = z
                .children
                .iter()
                .filter(|(_, c)| c.link.is_some())
                .map(|(p, _)| *p)
                .collect();
            let mut fds = Vec::with_capacity(pids.len() + 1);
            fds.push(PollFd::new(&cmd, PollFlags::IN));
            for p in &pids {
                if let Some(l) = &z.children[p].link {
                    fds.push(PollFd::new(l, PollFlags::IN));
                }
            }
            let ts = Timespec {
                tv_sec: 0,
                tv_nsec: 20_000_000,
            };
            if matches!(rustix::event::poll(&mut fds, Some(&ts)), Ok(n) if n > 0) {
                for (i, fd) in fds.iter().enumerate() {
                    if !fd.revents().is_empty() {
                        ready.push(if i == 0 { None } else { Some(pids[i - 1]) });
                    }
                }
            }
        }
        for who in ready {
            match who {
                None => match read_frame(&mut cmd) {
                    Ok(Some(body)) => {
                        let (ok, out) = z.handle(&body, None);
                        if reply(&mut cmd, ok, &out).is_err() {
                            break 'serve;
                        }
                    }
                    _ => break 'serve, // the driver is gone or closed us: stop everything
                },
                Some(pid) => z.serve_link(pid),
            }
        }
        z.reap();
        if last_watch.elapsed() >= Duration::from_millis(50) {
            last_watch = Instant::now();
            z.stop_unreferenced();
        }
    }
    for pid in z.children.keys() {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    for pid in z.children.keys() {
        crate::process::reap(Pid::from_raw(*pid), Duration::from_secs(5));
    }
    0
}

impl Zyg {
    /// Answers one request on child `pid`'s link (or forgets a closed link).
    fn serve_link(&mut self, pid: i32) {
        let Some(mut link) = self.children.get_mut(&pid).and_then(|c| c.link.take()) else {
            return;
        };
        // A short bound: a child writes a whole frame at once, and a stuck one must not stall
        // the zygote.
        let _ = link.set_read_timeout(Some(Duration::from_secs(1)));
        let keep = match read_frame(&mut link) {
            Ok(Some(body)) => {
                let (ok, out) = self.handle(&body, Some(pid));
                let _ = link.set_write_timeout(Some(Duration::from_secs(1)));
                reply(&mut link, ok, &out).is_ok()
            }
            _ => false,
        };
        if keep && let Some(c) = self.children.get_mut(&pid) {
            c.link = Some(link);
        }
    }

    fn handle(&mut self, body: &[u8], from: Option<i32>) -> (bool, Vec<u8>) {
        match body.first() {
            Some(&OP_PING) => (true, Vec::new()),
            Some(&OP_SPAWN) => match SpawnRequest::decode(&body[1..]) {
                Some(req) => match self.spawn(req, from) {
                    Ok(pid) => (true, pid.to_le_bytes().to_vec()),
                    Err(e) => (false, e.into_bytes()),
                },
                None => (false, b"malformed spawn request".to_vec()),
            },
            Some(&OP_KILL) if body.len() == 21 => {
                let mailbox = ObjectId(body[1..21].try_into().expect("20 bytes"));
                for (pid, c) in self.children.iter_mut() {
                    if c.req.mailbox == mailbox && !c.req.lifetime.worker {
                        c.killed = true;
                        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
                    }
                }
                (true, Vec::new())
            }
            Some(&OP_CANCEL) if body.len() == 21 => {
                let result = ObjectId(body[1..21].try_into().expect("20 bytes"));
                let mut found = false;
                for (pid, c) in self.children.iter_mut() {
                    let running = c.req.lifetime.worker
                        && c.mailbox.current().is_some_and(|(_, m)| {
                            Message::decode(&m).is_some_and(|m| m.result == result)
                        });
                    if running {
                        c.cancelled = Some(result);
                        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
                        found = true;
                    }
                }
                (true, vec![found as u8])
            }
            Some(&OP_BLOCKED) => match SpawnRequest::decode(&body[1..]) {
                Some(req) => {
                    self.blocked += 1;
                    if let Some(c) = from.and_then(|p| self.children.get_mut(&p)) {
                        c.blocked += 1;
                    }
                    if self.extras >= self.blocked {
                        return (true, Vec::new());
                    }
                    // Nobody's: an extra worker outlives the task that waited.
                    match self.spawn(req, None) {
                        Ok(pid) => {
                            self.extras += 1;
                            (true, pid.to_le_bytes().to_vec())
                        }
                        Err(e) => {
                            // The asker lends nothing, so it will not say the wait is over.
                            self.blocked -= 1;
                            if let Some(c) = from.and_then(|p| self.children.get_mut(&p)) {
                                c.blocked = c.blocked.saturating_sub(1);
                            }
                            (false, e.into_bytes())
                        }
                    }
                }
                None => (false, b"malformed spawn request".to_vec()),
            },
            Some(&OP_UNBLOCKED) => {
                self.blocked = self.blocked.saturating_sub(1);
                if let Some(c) = from.and_then(|p| self.children.get_mut(&p)) {
                    c.blocked = c.blocked.saturating_sub(1);
                }
                (true, Vec::new())
            }
            Some(&OP_RETIRE) => {
                let extra = from
                    .and_then(|p| self.children.get(&p))
                    .is_some_and(|c| c.req.lifetime.extra && !c.retired);
                // A worker that owns actors (started by its tasks) stays: they would die with
                // it.
                let owns = self
                    .children
                    .values()
                    .any(|c| c.owner.is_some() && c.owner == from && !c.req.lifetime.detached);
                let retire = extra && !owns && self.extras > self.blocked;
                if retire {
                    self.extras -= 1;
                    if let Some(c) = from.and_then(|p| self.children.get_mut(&p)) {
                        c.retired = true;
                    }
                }
                (true, vec![retire as u8])
            }
            _ => (false, b"malformed zygote request".to_vec()),
        }
    }

    /// Attaches what a child needs and forks it.
    fn spawn(&mut self, req: SpawnRequest, owner: Option<i32>) -> Result<i32, String> {
        let (view, mailbox) = attach(&self.client, req.mailbox)?;
        let (queue_view, queue) = if req.queue == req.mailbox {
            (None, mailbox)
        } else {
            let (v, q) = attach(&self.client, req.queue)?;
            (Some(v), q)
        };
        // The token must exist before the actor is watched (it is written just before the
        // request, possibly by a one-way frame not yet handled).
        // A detached actor's token is held here, so that its name finds it with no handle
        // left anywhere.
        let token = if req.lifetime.token != ObjectId::default() {
            let v = self
                .client
                .get(req.lifetime.token, Duration::from_secs(5))
                .map_err(|e| format!("token {}: {e}", req.lifetime.token))?;
            req.lifetime.detached.then_some(v)
        } else {
            None
        };
        let keep = if req.lifetime.keep == ObjectId::default() {
            None
        } else {
            Some(
                self.client
                    .get(req.lifetime.keep, Duration::from_secs(5))
                    .map_err(|e| format!("entry {}: {e}", req.lifetime.keep))?,
            )
        };
        let lanes = req
            .lanes
            .iter()
            .map(|id| attach(&self.client, *id))
            .collect::<Result<Vec<_>, String>>()?;
        let (pid, link) = fork_child(&req, self.me)?;
        mailbox.set_consumer_pid(pid);
        let restarts_left = req.lifetime.max_restarts;
        self.children.insert(
            pid,
            Child {
                req,
                _views: (view, queue_view),
                _keep: (keep, token),
                mailbox,
                queue,
                lanes,
                link: Some(link),
                owner,
                restarts_left,
                killed: false,
                stopping: false,
                attempts: HashMap::new(),
                cancelled: None,
                missed: false,
                retired: false,
                blocked: 0,
            },
        );
        Ok(pid)
    }

    /// Sends a stop message to every watched actor whose token is gone (no handle left).
    fn stop_unreferenced(&mut self) {
        let stop = &self.stop;
        for c in self.children.values_mut() {
            let l = &c.req.lifetime;
            if l.worker || l.detached || c.stopping || c.killed || l.token == ObjectId::default() {
                continue;
            }
            // Seen in place (lock-free), the common case; a miss is asked of the daemon, and
            // acted on only if two looks in a row miss it.
            let gone = self.client.try_get(&l.token).is_none()
                && self.client.contains(l.token).is_ok_and(|b| !b);
            if !gone {
                c.missed = false;
                continue;
            }
            if !c.missed {
                c.missed = true;
                continue;
            }
            // Behind every call queued so far; a full queue is tried again next time.
            if let Ok(Some(_)) = c.mailbox.try_push(stop) {
                c.stopping = true;
            }
        }
    }

    /// Whether the call for `result` may run again (and counts the attempt).
    fn note_attempt(attempts: &mut HashMap<ObjectId, u32>, result: ObjectId, max: u32) -> bool {
        if max == 0 {
            return false;
        }
        if attempts.len() > 100_000 {
            attempts.clear();
        }
        let n = attempts.entry(result).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    /// Reaps dead children: fails or retries their calls, restarts or replaces them, and
    /// kills the actors they owned.
    fn reap(&mut self) {
        loop {
            let pid = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, _)) | Ok(WaitStatus::Signaled(pid, _, _)) => pid,
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            let Some(child) = self.children.remove(&pid.as_raw()) else {
                continue;
            };
            // What it owned dies with it (Ray: an actor's lifetime follows its owner's).
            for (p, c) in self.children.iter_mut() {
                if c.owner == Some(pid.as_raw()) && !c.req.lifetime.detached {
                    c.killed = true;
                    let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
                }
            }
            self.bury(pid, child);
            // The reports are one-way frames: send them now (no flusher thread here).
            let _ = self.client.flush();
        }
    }

    fn bury(&mut self, pid: Pid, mut child: Child) {
        // Its waits end with it (a worker killed while a task of it waited).
        self.blocked = self.blocked.saturating_sub(child.blocked);
        child.blocked = 0;
        let client = &self.client;
        let why = format!("process {pid} died");
        let l = child.req.lifetime;
        let restart = if l.worker {
            !l.extra
        } else {
            !child.killed && !child.stopping && child.restarts_left != 0
        };
        let retries = if restart { l.max_retries } else { 0 };
        let failure = if l.worker {
            Failure::TaskFailed
        } else {
            Failure::ActorDied
        };
        if !restart && !l.worker {
            // Producers see it first, so nothing new is queued behind what is failed below.
            child.mailbox.set_dead();
        }
        let fail = |m: &Message, failure| {
            if m.kind != KIND_STOP {
                let _ = report_failure(client, m.result, m.reply_to, failure, &why);
            }
        };
        let attempts = if l.worker {
            &mut self.task_attempts
        } else {
            &mut child.attempts
        };
        let mut again: Vec<Vec<u8>> = Vec::new();
        // Where its threads noted their calls and debts: its mailbox, and one lane per extra
        // thread of a threaded actor.
        let owns: Vec<Mailbox> = std::iter::once(child.mailbox)
            .chain(child.lanes.iter().map(|(_, m)| *m))
            .collect();
        let currents: Vec<_> = owns.iter().map(|o| o.current()).collect();
        // Messages it had taken and still held in their queue slots: each one it had not yet
        // noted as current is run again or failed here (the current ones are looked at
        // below, with their records and debts); every such slot is freed, so the queue is not
        // blocked.
        let is_current = |pos: u64| currents.iter().flatten().any(|(p, _)| *p == pos);
        child.queue.reclaim(pid.as_raw() as u32, |pos, m| {
            if !is_current(pos) {
                if let Some(msg) = Message::decode(m) {
                    if Self::note_attempt(attempts, msg.result, retries) {
                        again.push(retried(&msg));
                    } else {
                        fail(&msg, failure);
                    }
                }
                child.queue.record(pos).abandon(pos);
            }
        });
        for (own, current) in owns.iter().zip(&currents) {
            // Results it made and was handing to its store client (see `crate::debts`).
            let debts = own.debts().unsettled();
            // The call it was running, unless its result is in its record already or owed.
            let mut rerun_in_place = false;
            if let Some((pos, rec)) = current
                && let Some(m) = Message::decode(rec)
            {
                let (at, delivered) = child.queue.record(*pos).status();
                let owed = debts.owes(&m.result);
                let in_record = at == *pos && delivered;
                if !in_record && !owed {
                    child.queue.record(*pos).abandon(*pos);
                    if child.cancelled == Some(m.result) {
                        fail(&m, Failure::Cancelled);
                    } else if Self::note_attempt(attempts, m.result, retries) {
                        if l.worker {
                            again.push(retried(&m));
                        } else {
                            // The thread's next instance runs it first, so calls keep their
                            // order.
                            rerun_in_place = true;
                        }
                    } else {
                        fail(&m, failure);
                    }
                }
            }
            if !rerun_in_place {
                own.clear_current();
            }
            debts.settle(
                |pos| child.queue.record(pos),
                |d| {
                    let _ = report_failure(client, ObjectId(d.result), d.reply_to, failure, &why);
                },
            );
        }
        for m in again {
            if !matches!(child.queue.try_push(&m), Ok(Some(_)))
                && let Some(m) = Message::decode(&m)
            {
                fail(&m, failure);
            }
        }
        // Callers parked on records abandoned above read the store now.
        let _ = client.flush();
        child.queue.result_changed();
        if l.extra && !child.retired {
            self.extras = self.extras.saturating_sub(1);
        }
        if restart {
            if !l.worker && child.restarts_left > 0 {
                child.restarts_left -= 1;
            }
            let _ = client.flush();
            match fork_child(&child.req, self.me) {
                Ok((new, link)) => {
                    child.mailbox.set_consumer_pid(new);
                    child.link = Some(link);
                    child.cancelled = None;
                    self.children.insert(new, child);
                    return;
                }
                Err(e) => {
                    tracing::warn!("restarting process {pid}: {e}");
                    for own in &owns {
                        own.clear_current();
                    }
                    if l.worker {
                        return;
                    }
                    child.mailbox.set_dead();
                }
            }
        }
        if !l.worker {
            while let Ok(Some(())) = child.mailbox.try_pop(self.me.as_raw() as u32, |_, m| {
                if let Some(m) = Message::decode(m) {
                    fail(&m, Failure::ActorDied)
                }
            }) {}
        }
        drop(child);
    }
}

/// `m` marked as a retry: run again, its result to the store.
fn retried(m: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    Message {
        retried: true,
        ..m.clone()
    }
    .encode_into(&mut out);
    out
}

/// Forks a child running `req`'s entry, with a link to the zygote at [`LINK_FD`]; returns its
/// pid and the zygote's end of the link.
fn fork_child(req: &SpawnRequest, me: Pid) -> Result<(i32, UnixStream), String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    // SAFETY: the zygote is single-threaded (it never starts a thread), so the child is a
    // consistent copy; it drops the zygote's connections and runs only the entry.
    match unsafe { fork() } {
        Err(e) => Err(format!("fork: {e}")),
        Ok(ForkResult::Parent { child }) => {
            drop(theirs);
            Ok((child.as_raw(), ours))
        }
        Ok(ForkResult::Child) => {
            // The link goes to LINK_FD; every other fd inherited from the zygote (its store
            // connection, its own links, the command socket) is closed: the objects owning
            // them in the copied stack are never used or dropped again (the child ends with
            // _exit), and the entry opens its own.
            // SAFETY: plain syscalls on fds of this process; after them, no live object in
            // the child uses a closed fd again (`ours` and the zygote's state are never
            // touched, and `Zygote::inherited` takes LINK_FD).
            unsafe {
                if theirs.as_raw_fd() != LINK_FD {
                    libc::dup2(theirs.as_raw_fd(), LINK_FD);
                }
                // Not inherited by programs the child executes (dup2 clears the flag).
                libc::fcntl(LINK_FD, libc::F_SETFD, libc::FD_CLOEXEC);
                libc::syscall(libc::SYS_close_range, LINK_FD as u32 + 1, u32::MAX, 0u32);
            }
            std::mem::forget(theirs);
            std::mem::forget(ours);
            let code =
                if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() || getppid() != me {
                    1
                } else {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (req.entry)(req)))
                        .unwrap_or(101)
                };
            // SAFETY: ends the child without running atexit handlers copied from the driver.
            unsafe { libc::_exit(code) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(_: &SpawnRequest) -> i32 {
        0
    }

    #[test]
    fn spawn_requests_round_trip() {
        let req = SpawnRequest {
            entry,
            mailbox: ObjectId([1; 20]),
            queue: ObjectId([2; 20]),
            lifetime: Lifetime {
                worker: false,
                extra: true,
                max_restarts: -1,
                max_retries: 7,
                detached: true,
                token: ObjectId([3; 20]),
                keep: ObjectId([4; 20]),
            },
            lanes: vec![ObjectId([5; 20]), ObjectId([6; 20])],
            payload: b"payload".to_vec(),
        };
        let b = req.encode(OP_SPAWN);
        let back = SpawnRequest::decode(&b[1..]).expect("decodes");
        assert_eq!(back.entry as usize, entry as Entry as usize);
        assert_eq!((back.mailbox, back.queue), (req.mailbox, req.queue));
        assert_eq!(back.lifetime, req.lifetime);
        assert_eq!(back.lanes, req.lanes);
        assert_eq!(back.payload, req.payload);
        // Every truncation is refused, never a panic.
        for n in 1..b.len() - req.payload.len() {
            assert!(SpawnRequest::decode(&b[1..n]).is_none(), "{n}");
        }
    }
}
