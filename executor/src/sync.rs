//! The atomics the mailbox and completion records use: `std`'s in a normal build, loom's under
//! `--cfg loom` (see `trove_store::sync`). Parking (the futex, and its loom stand-in) is
//! `trove_store::blocks::park`'s.

pub(crate) use trove_store::sync::{AtomicU32, AtomicU64, Backoff, Ordering, fence};
