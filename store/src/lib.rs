//! trove-store: the shared-memory object store.
//!
//! One daemon (`troved`, or an embedded one forked by `trove::init`) owns a memfd arena, the
//! allocator, the object directory and per-client state. Clients connect over a Unix socket,
//! receive the arena fd by SCM_RIGHTS, map it, and read sealed objects in place.
//! See ARCHITECTURE.md for the layout and the invariants.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod blocks;
mod client;
mod daemon;
mod error;
pub mod protocol;
mod sock;

// The building blocks keep their old paths (`trove_store::shm`, `trove_store::sync`, ...).
pub use blocks::{alloc, id, ring, shm, size, sync};

// The API: the two ends and their types (the modules themselves are private).
pub use client::{
    FrameObserver, ObjectView, ObjectWriter, OwnedWriter, POPULATE_MIN, Readiness,
    SMALL_OBJECT_MAX, StoreClient, Subscription, Timeout, shrink_if_sparse,
};
pub use daemon::{Daemon, DaemonConfig, Limits, ShutdownHandle, raise_fd_limit};
pub use error::{Result, StoreError};
pub use id::ObjectId;
pub use protocol::{DeleteOutcome, Event, ObjectInfo, ObjectState, Stats};
pub use sock::{default_socket_path, ensure_private_dir};
