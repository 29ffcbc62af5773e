//! Actors and tasks: typed calls over the executor's mailboxes.
//!
//! A call carries the address of a *trampoline*, a function monomorphised for the method (or
//! task) type, its argument tuple and its return type. Every process of a trove tree is a fork
//! of the driver, so the address means the same function everywhere. Methods and tasks must be
//! fn items or closures without captures: they are zero-sized, so the callee conjures the value
//! from its type alone (a capture is rejected at compile time).
//!
//! - `traits`: [`Method`], [`Function`], [`Constructor`] and their arities.
//! - `handle`: [`ActorHandle`], what callers hold.
//! - `options`: [`ActorOptions`], how an actor lives (names, detached, restarts, retries).
//! - `caller`: sending a call (arguments serialised once, refs kept until it has run).
//! - `callee`: the serving loop and trampolines of actor and worker processes.
//! - `entry`: starting actor and worker processes, and their entry points.

mod callee;
mod caller;
pub(crate) mod entry;
mod handle;
mod options;
mod traits;

pub(crate) use callee::ctor_address;
pub(crate) use caller::spawn_task;
pub(crate) use handle::type_tag;
pub use handle::{ActorHandle, ArchivedActorHandle};
pub use options::ActorOptions;
pub use traits::{Constructor, Exclusive, Function, Method, Shared};
