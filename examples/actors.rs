//! Ray's "Exercise 4": stateful actors in parallel (the story: `stories/actors.rs`, which
//! `trove demo` runs too).
//!
//! `cargo run --release --example actors`

#[path = "stories/actors.rs"]
mod actors;

fn main() -> anyhow::Result<()> {
    let rt = trove::init(trove::Config::default().num_cpus(4))?;
    let took = actors::run(&rt, &mut std::io::stdout())?;
    // Two actors, five 500 ms calls each, in parallel: 2.5 s, not 5.
    anyhow::ensure!(
        took > 2.5 && took < 3.0,
        "the ten calls took {took:.2} s, not 2.5-3 s"
    );
    Ok(())
}
