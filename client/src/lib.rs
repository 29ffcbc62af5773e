//! trove: the public API. Until the client issue lands it re-exports the store client.
#![deny(unsafe_op_in_unsafe_fn)]
pub use trove_store as store;
