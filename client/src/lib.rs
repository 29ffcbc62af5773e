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

pub mod actor;
pub mod codec;
pub mod error;
pub mod obj;
pub mod object_ref;
pub mod outcome;
mod runtime;

pub use actor::{ActorHandle, Constructor, Function, Method};
pub use error::{Error, Result};
pub use obj::{Obj, Stored};
pub use object_ref::ObjectRef;
pub use outcome::Outcome;
pub use runtime::{
    Builder, Config, DEFAULT_MEMORY, Runtime, Waited, get_actor, get_actor_in, init, spawn,
};
pub use trove_store as store;
pub use trove_store::ObjectId;
pub use trove_store::Stats;
