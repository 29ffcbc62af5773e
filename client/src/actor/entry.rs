//! Actor and worker processes: what the driver asks the zygote to fork, and the entry points
//! the forked children run (join the tree, then serve).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use trove_executor::{Lifetime, SpawnRequest, Zygote};
use trove_store::{ObjectId, StoreClient};

use super::callee;
use crate::context::{self, Shared};
use crate::error::{Error, Result};
use crate::object_ref::ObjectRef;
use crate::owned::{self, NewMailbox, Seal};

/// What a forked actor or worker needs to join the tree, beyond its spawn request (its own
/// mailbox, its lanes, whether it is an extra worker): the request's payload.
struct ChildSpec {
    socket: PathBuf,
    namespace: String,
    task_queue: ObjectId,
    /// How many times a task is run again after its worker died.
    task_retries: u32,
    ctor: u64,
    ctor_args: Vec<u8>,
}

impl ChildSpec {
    fn encode(&self) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt;
        let sock = self.socket.as_os_str().as_bytes();
        let mut b = Vec::new();
        b.extend_from_slice(self.task_queue.as_bytes());
        b.extend_from_slice(&self.ctor.to_le_bytes());
        b.extend_from_slice(&self.task_retries.to_le_bytes());
        b.extend_from_slice(&(sock.len() as u32).to_le_bytes());
        b.extend_from_slice(sock);
        b.extend_from_slice(&(self.namespace.len() as u32).to_le_bytes());
        b.extend_from_slice(self.namespace.as_bytes());
        b.extend_from_slice(&self.ctor_args);
        b
    }
    fn decode(b: &[u8]) -> Option<ChildSpec> {
        use std::os::unix::ffi::OsStrExt;
        let task_queue = ObjectId(b.get(..20)?.try_into().ok()?);
        let ctor = u64::from_le_bytes(b.get(20..28)?.try_into().ok()?);
        let task_retries = u32::from_le_bytes(b.get(28..32)?.try_into().ok()?);
        let n = u32::from_le_bytes(b.get(32..36)?.try_into().ok()?) as usize;
        let socket = PathBuf::from(std::ffi::OsStr::from_bytes(b.get(36..36 + n)?));
        let at = 36 + n;
        let k = u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize;
        let namespace = String::from_utf8(b.get(at + 4..at + 4 + k)?.to_vec()).ok()?;
        Some(ChildSpec {
            socket,
            namespace,
            task_queue,
            task_retries,
            ctor,
            ctor_args: b.get(at + 4 + k..)?.to_vec(),
        })
    }

    fn of(sh: &Shared, ctor: u64, ctor_args: Vec<u8>) -> ChildSpec {
        ChildSpec {
            socket: sh.client.socket_path().to_path_buf(),
            namespace: sh.namespace.clone(),
            task_queue: sh.task_queue_id,
            task_retries: sh.task_retries,
            ctor,
            ctor_args,
        }
    }
}

/// Creates a mailbox object for consumers of type `type_tag` (see
/// [`trove_executor::mailbox::Mailbox::init`]); the returned ref holds it.
pub(crate) fn new_mailbox(
    client: &StoreClient,
    slots: u64,
    slot_bytes: u64,
    type_tag: u64,
) -> Result<ObjectRef<[u8]>> {
    let id = ObjectId::random();
    let content = NewMailbox {
        slots,
        slot_bytes,
        type_tag,
    };
    let seal = Seal {
        by_daemon: true,
        internal: true,
        ..Seal::kept(None)
    };
    owned::write(client, id, &content, seal)?;
    Ok(ObjectRef::adopt(id))
}

/// A worker's own mailbox: no calls, only its current call (a whole message, for retries)
/// and its debts.
pub(crate) fn worker_mailbox(client: &StoreClient) -> Result<ObjectRef<[u8]>> {
    new_mailbox(client, 2, 64, 0)
}

/// Has the zygote fork an actor process serving `mailbox`, built by the constructor at
/// `ctor` from `ctor_args` (an rkyv archive), living as `lifetime` says, with a thread per
/// lane beside its main one (a threaded actor); returns its pid.
pub(crate) fn start_actor(
    sh: &Shared,
    mailbox: ObjectId,
    ctor: u64,
    ctor_args: Vec<u8>,
    lifetime: Lifetime,
    lanes: Vec<ObjectId>,
) -> Result<i32> {
    sh.zygote()?
        .spawn(&SpawnRequest {
            entry: actor_entry,
            mailbox,
            queue: mailbox,
            lifetime,
            lanes,
            payload: ChildSpec::of(sh, ctor, ctor_args).encode(),
        })
        .map_err(|e| Error::Init(e.to_string()))
}

fn worker_request(sh: &Shared, own: ObjectId, extra: bool) -> SpawnRequest {
    SpawnRequest {
        entry: worker_entry,
        mailbox: own,
        queue: sh.task_queue_id,
        lifetime: Lifetime {
            worker: true,
            extra,
            max_retries: sh.task_retries,
            ..Lifetime::default()
        },
        lanes: Vec::new(),
        payload: ChildSpec::of(sh, 0, Vec::new()).encode(),
    }
}

/// Has the zygote fork a task worker of the pool (replaced if it dies) whose own mailbox is
/// `own`.
pub(crate) fn start_worker(sh: &Shared, own: ObjectId) -> Result<()> {
    sh.zygote()?
        .spawn(&worker_request(sh, own, false))
        .map_err(|e| Error::Init(e.to_string()))?;
    Ok(())
}

/// While a task waits for something (in a worker), another worker may run: see [`lend`].
pub(crate) struct Lent(Arc<Shared>);

impl Drop for Lent {
    fn drop(&mut self) {
        if let Ok(z) = self.0.zygote() {
            let _ = z.unblocked();
        }
    }
}

/// A worker's task is about to wait (in a get or a wait): its CPU is lent to the pool,
/// which starts an extra worker unless one is idle already, until the returned guard goes.
/// `None` outside a worker.
pub(crate) fn lend(sh: &Arc<Shared>) -> Option<Lent> {
    if !sh.worker {
        return None;
    }
    let z = sh.zygote().ok()?;
    let own = worker_mailbox(&sh.client).ok()?;
    // The zygote pins the mailbox while the extra worker lives; ours goes with `own`.
    match z.blocked(&worker_request(sh, own.id(), true)) {
        Ok(_) => Some(Lent(sh.clone())),
        Err(e) => {
            tracing::warn!("lending a blocked worker's CPU: {e}");
            None
        }
    }
}

/// A forked child's context, installed while this lives.
struct Joined(Arc<Shared>);

impl Drop for Joined {
    fn drop(&mut self) {
        context::uninstall(&self.0);
    }
}

/// Joins the tree in a forked child: connects and installs the process-global context, with
/// the link to the zygote it inherited.
fn init_child(spec: &ChildSpec, worker: bool) -> Option<Joined> {
    let client = StoreClient::connect(&spec.socket).ok()?;
    let mut sh = Shared::new(
        client,
        Zygote::inherited(),
        spec.task_queue,
        spec.namespace.clone(),
    );
    sh.worker = worker;
    sh.task_retries = spec.task_retries;
    let sh = Arc::new(sh);
    context::install_child(&sh);
    context::start_flusher(&sh);
    Some(Joined(sh))
}

/// Entry of an actor process (run by the zygote's child).
fn actor_entry(req: &SpawnRequest) -> i32 {
    let Some(spec) = ChildSpec::decode(&req.payload) else {
        return 2;
    };
    let Some(rt) = init_child(&spec, false) else {
        return 3;
    };
    let Ok(own) = context::attach(&rt.0.client, req.mailbox) else {
        return 4;
    };
    // A threaded actor's other threads' mailboxes.
    let Ok(lanes) = req
        .lanes
        .iter()
        .map(|id| context::attach(&rt.0.client, *id))
        .collect::<Result<Vec<_>>>()
    else {
        return 4;
    };
    let state = match callee::construct(spec.ctor, &spec.ctor_args) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("actor constructor failed: {e}");
            return 5;
        }
    };
    let owns: Vec<_> = std::iter::once(own.mailbox)
        .chain(lanes.iter().map(|l| l.mailbox))
        .collect();
    callee::serve_all(&rt.0.client, &own.mailbox, &owns, state, &|_| false)
}

/// How long an extra worker waits idle before it asks to retire, counted from its first
/// empty wait for a call (100 ms after its last call): about 300 ms in all.
const EXTRA_IDLE: Duration = Duration::from_millis(200);

/// Entry of a task worker.
fn worker_entry(req: &SpawnRequest) -> i32 {
    let Some(spec) = ChildSpec::decode(&req.payload) else {
        return 2;
    };
    let Some(rt) = init_child(&spec, true) else {
        return 3;
    };
    let (Ok(own), Ok(queue)) = (
        context::attach(&rt.0.client, req.mailbox),
        rt.0.task_queue(),
    ) else {
        return 4;
    };
    // An extra worker (started while another's task waits) retires once idle and no longer
    // needed (the zygote decides); the pool's own workers stay.
    let sh = rt.0.clone();
    let extra = req.lifetime.extra;
    let on_idle = move |idle: Duration| {
        extra && idle >= EXTRA_IDLE && sh.zygote().is_ok_and(|z| z.may_retire().unwrap_or(false))
    };
    callee::serve_all(
        &rt.0.client,
        queue,
        &[own.mailbox],
        std::ptr::null_mut(),
        &on_idle,
    )
}
