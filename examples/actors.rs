//! Ray's "Exercise 4": stateful actors in parallel (the story: `stories/actors.rs`, which
//! `trove demo` runs too).
//!
//! `cargo run --release --example actors`

#[path = "stories/actors.rs"]
mod actors;

fn main() -> anyhow::Result<()> {
    let rt = trove::init(trove::Config::default().num_cpus(4))?;
    actors::run(&rt, &mut std::io::stdout()).map(drop)
}
