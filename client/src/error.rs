//! The one error type users match on.

use trove_store::{ObjectId, StoreError};

/// `Result` with trove's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a trove call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A create did not fit even after evicting every unpinned object.
    #[error(
        "store full: {requested} bytes requested, capacity {capacity}, {pinned} pinned or being \
         created ({detail}); a larger store: Config::memory, TROVE_MEMORY or troved --memory"
    )]
    StoreFull {
        /// Bytes asked for.
        requested: u64,
        /// The store's object space.
        capacity: u64,
        /// Bytes pinned or being created (not evictable) at the time.
        pinned: u64,
        /// What that is, and whose: the bytes used, trove's own mailboxes and queues apart
        /// from the user's objects, objects being created, the processes (pids) pinning
        /// the rest.
        detail: String,
    },
    /// The wait ended before the object(s) were ready.
    #[error("timed out waiting for {0}")]
    Timeout(ObjectId),
    /// The bytes are not a valid archive of the requested type (wrong type or corruption).
    #[error("object {id} is not a valid {type_name}: {reason}")]
    Invalid {
        /// The object.
        id: ObjectId,
        /// The type it was read as.
        type_name: &'static str,
        /// What the validator found.
        reason: String,
    },
    /// Serialising a value failed.
    #[error("could not serialise a {type_name}: {reason}")]
    Serialize {
        /// The type being serialised.
        type_name: &'static str,
        /// What rkyv said.
        reason: String,
    },
    /// The object does not exist and nobody is creating it.
    #[error("object {0} not found")]
    NotFound(ObjectId),
    /// The object's creator died or aborted it before sealing.
    #[error("object {0} was lost: its creator aborted or died before sealing it")]
    ObjectLost(ObjectId),
    /// The store daemon went away.
    #[error("disconnected from the store")]
    Disconnected,
    /// The actor's process died.
    #[error("actor {0} died")]
    ActorDied(String),
    /// A handle or name that leads to an actor of another type than the one asked for (its
    /// methods would run on another type's state): nothing was sent.
    #[error("actor {id} is not a {expected}")]
    WrongActorType {
        /// The actor's mailbox.
        id: ObjectId,
        /// The actor type asked for.
        expected: &'static str,
    },
    /// An actor started by another program (another executable, sharing the store): the
    /// function addresses a call carries mean nothing there, so nothing was sent.
    #[error("actor {0} belongs to another program")]
    ForeignActor(ObjectId),
    /// The call or task was cancelled ([`Runtime::cancel`](crate::Runtime::cancel)).
    #[error("cancelled")]
    Cancelled,
    /// Options that cannot go together (e.g. a detached actor without a name).
    #[error("invalid options: {0}")]
    Options(String),
    /// The task or method failed (an `Err` result or a panic).
    #[error("task failed: {0}")]
    TaskFailed(String),
    /// `init` was called twice, or in a process that already has threads.
    #[error("cannot initialise trove: {0}")]
    Init(String),
    /// trove was used before `init`, or after shutdown.
    #[error("trove is not initialised in this process")]
    NotInitialized,
    /// Any other store error.
    #[error(transparent)]
    Store(StoreError),
    /// An I/O error while starting or reaching trove's processes.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        match e {
            StoreError::StoreFull {
                requested,
                capacity,
                pinned,
                detail,
            } => Error::StoreFull {
                requested,
                capacity,
                pinned,
                detail,
            },
            StoreError::Disconnected(_) => Error::Disconnected,
            StoreError::NotFound(id) => Error::NotFound(id),
            other => Error::Store(other),
        }
    }
}
