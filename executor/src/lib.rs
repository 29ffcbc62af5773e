//! trove-executor: the processes trove forks (the embedded store daemon, the zygote, actors and
//! workers), the shared-memory mailboxes calls travel in, and the completion records results
//! come back in.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod mailbox;
pub mod message;
pub mod process;
pub mod record;
mod sync;
pub mod zygote;

pub use mailbox::{Mailbox, MailboxError, mailbox_bytes};
pub use process::{EmbeddedStore, ProcessError, ensure_single_threaded, thread_count};
pub use zygote::{Entry, SpawnRequest, Zygote};
