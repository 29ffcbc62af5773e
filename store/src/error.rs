//! The store's typed errors, shared by the daemon (as protocol error codes) and the client.

use crate::blocks::id::ObjectId;

/// Everything a store operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not fit even after evicting every unpinned object.
    #[error(
        "store full: {requested} bytes requested, capacity {capacity} bytes, {pinned} bytes pinned or being created ({detail}); a larger store: Config::memory, TROVE_MEMORY or troved --memory"
    )]
    StoreFull {
        requested: u64,
        capacity: u64,
        pinned: u64,
        /// What cannot be evicted, and whose: the bytes used, trove's own machinery
        /// (mailboxes, queues), objects being created, the processes pinning the rest.
        detail: String,
    },
    /// The object directory has no free slot left (too many live objects).
    #[error("object directory full: {capacity} objects")]
    DirectoryFull { capacity: u64 },
    #[error("object {0} not found")]
    NotFound(ObjectId),
    #[error("object {0} already exists")]
    AlreadyExists(ObjectId),
    #[error("object {0} is already sealed")]
    AlreadySealed(ObjectId),
    #[error("object {0} is not sealed yet")]
    NotSealed(ObjectId),
    /// Seal or abort of an object another client is creating.
    #[error("object {0} is being created by another client")]
    NotOwner(ObjectId),
    /// A small object put without a round trip (`PutSmall`) was refused by the daemon (its id
    /// exists, or its place is not in the free part of this client's slab): it does not exist
    /// as this client wrote it.
    #[error("the put of object {id} was rejected by the store: {reason}")]
    PutRejected { id: ObjectId, reason: String },
    /// A client asked the daemon to remember more ids that do not exist yet (`Hold`, `Watch`,
    /// `Unhold` of unsealed ids) than its bound.
    #[error("too many pending ids for one client: {what} over the bound of {limit}")]
    TooManyPending { what: &'static str, limit: usize },
    #[error("timed out waiting for {0} object(s)")]
    Timeout(usize),
    /// The daemon went away (closed the socket, died, or was never there).
    #[error("disconnected from the store: {0}")]
    Disconnected(String),
    /// A message or a shared structure failed validation.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The request was well-formed but makes no sense (a bad size, an empty id list, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The store has as many clients as it may have at once (`DaemonConfig::max_clients`,
    /// `troved --max-clients`): the connection was refused.
    #[error(
        "the store has its maximum of {limit} clients connected (a larger limit: troved --max-clients)"
    )]
    TooManyClients { limit: u32 },
    /// The daemon refused the connection (uid mismatch, version).
    #[error("connection refused by the store: {0}")]
    Refused(String),
    #[error("another store is already running at {0}")]
    AlreadyRunning(String),
    /// Huge pages were asked for and this machine offers none for the arena.
    #[error("no huge pages for the arena: {0}")]
    NoHugePages(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<nix::Error> for StoreError {
    fn from(e: nix::Error) -> Self {
        StoreError::Io(std::io::Error::from(e))
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
