//! Ray's "Exercise 5/8": one logging actor shared by three tasks (the story:
//! `stories/logging.rs`, which `trove demo` runs too, with 5 iterations).
//!
//! `cargo run --release --example logging [ITERATIONS]` (default 60, one per second).

#[path = "stories/logging.rs"]
mod logging;

fn main() -> anyhow::Result<()> {
    let rt = trove::init(trove::Config::default().num_cpus(3))?;
    let iterations = std::env::args().nth(1).map_or(Ok(60), |a| a.parse())?;
    logging::run(&rt, iterations, &mut std::io::stdout())
}
