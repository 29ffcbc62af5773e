//! Integration tests across real processes: the daemon binary, and helper processes that are
//! this test binary re-executed in a role. One binary, shared helpers.
//!
//! The harness is our own (libtest-mimic, same command line as libtest) so that a helper role
//! runs on the main thread before any other thread exists: `trove::init` forks, and refuses to
//! in a process that has threads.
//!
//! Tests register themselves next to their definitions (`register!(name)`, see `harness`); a
//! test function nobody registers is dead code, which this binary refuses. Helper roles are
//! one typed `Role` (see `role`), started by `util::Helper::start` and run by
//! `util::run_helper_if_asked`.

// An unregistered test must not build (see `harness`).
#![deny(dead_code)]

mod harness;
mod role;

// Two stories of DESIGN.md, the examples' own code (`examples/stories/`), run by the seed tests.
#[path = "../../examples/stories/actors.rs"]
mod story_actors;
#[path = "../../examples/stories/logging.rs"]
mod story_logging;

mod cli_commands;
mod client_init;
mod client_lifetimes;
mod client_objects;
mod client_roles;
mod executor_actor_types;
mod executor_actors;
mod executor_lifetime_roles;
mod executor_lifetimes;
mod executor_lost_calls;
mod executor_roles;
mod fault_kills;
mod load_clients;
mod roles;
mod security_access;
mod util;

mod store_errors;
mod store_faults;
mod store_fuzz;
mod store_isolation;
mod store_lifecycle;
mod store_many_clients;
mod store_verbs;

use std::process::ExitCode;

use libtest_mimic::Arguments;

fn main() -> ExitCode {
    // A helper process runs its role and exits here, single-threaded.
    util::run_helper_if_asked();
    let args = Arguments::from_args();
    libtest_mimic::run(&args, harness::trials()).exit_code()
}
