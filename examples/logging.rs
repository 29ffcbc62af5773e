//! Ray's "Exercise 5/8": one logging actor shared by three tasks (the story:
//! `stories/logging.rs`, which `trove demo` runs too, with 5 iterations).
//!
//! `cargo run --release --example logging [ITERATIONS]` (default 60, one per second).

use std::time::Duration;

use anyhow::Context;

#[path = "stories/logging.rs"]
mod logging;

fn main() -> anyhow::Result<()> {
    let rt = trove::init(trove::Config::default().num_cpus(3))?;
    let iterations = match std::env::args().nth(1) {
        Some(a) => a.parse().context("ITERATIONS: a whole number")?,
        None => 60,
    };
    logging::run(
        &rt,
        iterations,
        Duration::from_millis(1200),
        &mut std::io::stdout(),
    )?;
    Ok(())
}
