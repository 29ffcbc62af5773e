//! trove: typed zero-copy objects over a shared-memory store.
//!
//! ```no_run
//! let rt = trove::init(trove::Config::default())?; // first thing in main
//! let r = rt.put(&vec![1u64, 2, 3])?;              // one copy, into shared memory
//! let v = r.get()?;                                 // zero-copy: derefs to the archived Vec
//! assert_eq!(v.iter().map(|x| x.to_native()).sum::<u64>(), 6);
//! # Ok::<(), trove::Error>(())
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(missing_docs)]

mod actor;
mod calls;
pub mod codec;
mod config;
mod context;
mod error;
mod get;
mod local;
mod obj;
mod object_ref;
mod outcome;
mod owned;
mod result_map;
mod runtime;

pub use actor::{
    ActorHandle, ActorOptions, ArchivedActorHandle, Constructor, Exclusive, Function, Method,
    Shared,
};
pub use codec::{Plain, Value};
pub use config::{Config, default_memory};
pub use error::{Error, Result};
pub use obj::{Obj, Stored};
pub use object_ref::{ArchivedObjectRef, ObjectRef};
pub use outcome::Outcome;
pub use runtime::{Builder, Runtime, Waited, init, runtime};
pub use trove_store as store;
pub use trove_store::ObjectId;
pub use trove_store::Stats;
