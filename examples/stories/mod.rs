//! The three stories of DESIGN.md, one copy each: the examples (`examples/actors.rs`,
//! `logging.rs`, `large_objects.rs`) each include their story with `#[path]`, and `trove demo`
//! includes this module (`bin/trove/main.rs`). Each story writes what happens to `out` as it
//! happens and fails (an `Err`) if a result is wrong.

pub mod actors;
pub mod large_objects;
pub mod logging;
