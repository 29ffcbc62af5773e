//! trove-executor: processes trove forks (the embedded store daemon; the zygote, actors and
//! workers come with the executor issue).
#![deny(unsafe_op_in_unsafe_fn)]

pub mod process;

pub use process::{EmbeddedStore, ProcessError, ensure_single_threaded, thread_count};
