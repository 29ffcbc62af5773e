//! Large objects, zero-copy (the story: `stories/large_objects.rs`, which `trove demo` runs
//! too).
//!
//! `cargo run --release --example large_objects`

#[path = "stories/large_objects.rs"]
mod large_objects;

fn main() -> anyhow::Result<()> {
    let rt = trove::init(trove::Config::default().memory(1 << 30))?;
    large_objects::run(&rt, &mut std::io::stdout())
}
