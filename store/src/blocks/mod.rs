//! The building blocks: shared memory and what lives in it, with no notion of sockets,
//! objects' lifetimes or calls. The daemon, the client and the executor's mailbox and
//! completion records are built from these.
//!
//! - `shm`: the arena (memfd, `Layout`, mapping, pre-faulting) and the lock-free
//!   `Directory` with its pin protocol.
//! - `ring`: a single-producer single-consumer ring in shared memory with futex parking.
//! - `region`: the magic, layout version and geometry words every such structure's header
//!   holds (the ring's, the executor's mailboxes'), validated in one place.
//! - `park`: the futex parking protocol (an eventcount) the ring and the mailboxes share.
//! - `alloc`: the heap allocator (best fit, 64-byte granules, coalescing).
//! - `id`: `ObjectId`.
//! - `size`: `512MiB`/`4GiB` parsing and printing.
//! - `sync`: the atomics shim (`std`, or loom's under `--cfg loom`).
//!
//! Architecture invariant: nothing here imports from `daemon`, `client` or `protocol`.

pub mod alloc;
pub mod id;
pub mod park;
pub mod region;
pub mod ring;
pub mod shm;
pub mod size;
pub mod sync;
