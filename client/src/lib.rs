//! trove: typed zero-copy objects over a shared-memory store.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod codec;
pub mod error;
pub mod object_ref;
mod runtime;

pub use error::{Error, Result};
pub use object_ref::ObjectRef;
pub use trove_store as store;
pub use trove_store::ObjectId;
