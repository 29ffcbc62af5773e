//! trove-executor: the processes trove forks (the embedded store daemon, the zygote, actors and
//! workers), the shared-memory mailboxes calls travel in, and the completion records results
//! come back in.
#![deny(unsafe_op_in_unsafe_fn)]

/// A named fail point (the `fail` crate): compiled in only with the `failpoints` feature (the
/// crash tests), nothing at all otherwise. The names are listed in [`FAIL_POINTS`].
macro_rules! fail_point {
    ($name:expr) => {
        #[cfg(feature = "failpoints")]
        ::fail::fail_point!($name);
    };
}
pub(crate) use fail_point;

/// The executor's fail points: where a consumer can be made to die in the windows its reaper
/// must cover.
pub const FAIL_POINTS: [&str; 3] = [
    // A consumer has taken a message (its slot claimed) and not yet noted it as current.
    "trove::claimed",
    // A consumer has noted the message as current and not yet freed its slot.
    "trove::claim_held",
    // A consumer owes a result: the debt is noted and its frame queued, not yet written.
    "trove::owing",
];

pub mod debts;
pub mod mailbox;
pub mod message;
pub mod process;
pub mod record;
mod sync;
pub mod zygote;

pub use mailbox::{Mailbox, MailboxError, mailbox_bytes};
pub use process::{
    EmbeddedConfig, EmbeddedStore, ProcessError, ensure_single_threaded, thread_count,
};
pub use sync::Spin;
pub use zygote::{Entry, LINK_FD, Lifetime, SpawnRequest, Zygote};
