//! Actor and worker processes: what the driver asks the zygote to fork, and the entry points
//! the forked children run (join the tree, then serve).

use std::path::PathBuf;
use std::sync::Arc;

use trove_executor::SpawnRequest;
use trove_store::{ObjectId, StoreClient};

use super::callee;
use crate::context::{self, Shared};
use crate::error::{Error, Result};

/// What a forked actor or worker needs to join the tree.
struct ChildSpec {
    socket: PathBuf,
    namespace: String,
    task_queue: ObjectId,
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
        let n = u32::from_le_bytes(b.get(28..32)?.try_into().ok()?) as usize;
        let socket = PathBuf::from(std::ffi::OsStr::from_bytes(b.get(32..32 + n)?));
        let at = 32 + n;
        let k = u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize;
        let namespace = String::from_utf8(b.get(at + 4..at + 4 + k)?.to_vec()).ok()?;
        Some(ChildSpec {
            socket,
            namespace,
            task_queue,
            ctor,
            ctor_args: b.get(at + 4 + k..)?.to_vec(),
        })
    }

    /// The zygote's payload: the child's own mailbox id, then the spec.
    fn payload(&self, own: ObjectId) -> Vec<u8> {
        let mut payload = own.as_bytes().to_vec();
        payload.extend_from_slice(&self.encode());
        payload
    }
}

/// Has the zygote fork an actor process serving `mailbox`, built by the constructor at
/// `ctor` from `ctor_args` (an rkyv archive); returns its pid.
pub(crate) fn start_actor(
    sh: &Shared,
    mailbox: ObjectId,
    ctor: u64,
    ctor_args: Vec<u8>,
) -> Result<i32> {
    let spec = ChildSpec {
        socket: sh.client.socket_path().to_path_buf(),
        namespace: sh.namespace.clone(),
        task_queue: sh.task_queue_id,
        ctor,
        ctor_args,
    };
    sh.zygote()?
        .spawn(&SpawnRequest {
            entry: actor_entry,
            mailbox,
            queue: mailbox,
            respawn: false,
            payload: spec.payload(mailbox),
        })
        .map_err(|e| Error::Init(e.to_string()))
}

/// Has the zygote fork a task worker (replaced if it dies) whose own mailbox is `own`.
pub(crate) fn start_worker(sh: &Shared, socket: PathBuf, own: ObjectId) -> Result<()> {
    let spec = ChildSpec {
        socket,
        namespace: sh.namespace.clone(),
        task_queue: sh.task_queue_id,
        ctor: 0,
        ctor_args: Vec::new(),
    };
    sh.zygote()?
        .spawn(&SpawnRequest {
            entry: worker_entry,
            mailbox: own,
            queue: sh.task_queue_id,
            respawn: true,
            payload: spec.payload(own),
        })
        .map_err(|e| Error::Init(e.to_string()))?;
    Ok(())
}

/// A forked child's context, installed while this lives.
struct Joined(Arc<Shared>);

impl Drop for Joined {
    fn drop(&mut self) {
        context::uninstall(&self.0);
    }
}

/// Joins the tree in a forked child: connects and installs the process-global context.
fn init_child(spec: &ChildSpec) -> Option<Joined> {
    let client = StoreClient::connect(&spec.socket).ok()?;
    let sh = Arc::new(Shared::new(
        client,
        None,
        spec.task_queue,
        spec.namespace.clone(),
    ));
    context::install_child(&sh);
    context::start_flusher(&sh);
    Some(Joined(sh))
}

/// Entry of an actor process (run by the zygote's child).
fn actor_entry(payload: &[u8]) -> i32 {
    let Some(spec) = ChildSpec::decode(payload.get(20..).unwrap_or(&[])) else {
        return 2;
    };
    let mailbox_id = ObjectId(payload[..20].try_into().expect("20 bytes"));
    let Some(rt) = init_child(&spec) else {
        return 3;
    };
    let Ok(own) = context::attach(&rt.0.client, mailbox_id) else {
        return 4;
    };
    let state = match callee::construct(spec.ctor, &spec.ctor_args) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("actor constructor failed: {e}");
            return 5;
        }
    };
    callee::serve(&rt.0.client, &own.mailbox, &own.mailbox, state)
}

/// Entry of a task worker.
fn worker_entry(payload: &[u8]) -> i32 {
    let Some(spec) = ChildSpec::decode(payload.get(20..).unwrap_or(&[])) else {
        return 2;
    };
    let own_id = ObjectId(payload[..20].try_into().expect("20 bytes"));
    let Some(rt) = init_child(&spec) else {
        return 3;
    };
    let (Ok(own), Ok(queue)) = (context::attach(&rt.0.client, own_id), rt.0.task_queue()) else {
        return 4;
    };
    callee::serve(&rt.0.client, queue, &own.mailbox, std::ptr::null_mut())
}
