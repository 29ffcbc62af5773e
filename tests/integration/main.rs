//! Integration tests across real processes: the daemon binary, and helper processes that are
//! this test binary re-executed in a role (see `util::helper`). One binary, shared helpers.

mod roles;
mod util;

mod store_errors;
mod store_faults;
mod store_fuzz;
mod store_lifecycle;
mod store_verbs;

/// Entry point of helper processes: does nothing in a normal test run.
#[test]
fn helper_entry() {
    util::run_helper_if_asked();
}
