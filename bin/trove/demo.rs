//! `trove demo`: the three stories of DESIGN.md, printed as they happen. The stories are the
//! examples' code (`examples/stories/`, included by `main.rs`): one copy of each.

use std::io::Write;
use std::time::Duration;

use crate::stories::{actors, large_objects, logging};

pub fn run(rt: &trove::Runtime, out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(
        out,
        "1. Stateful actors in parallel (Ray Exercise 4): two Foo actors, 5 increments each"
    )?;
    actors::run(rt, out)?;
    writeln!(out)?;

    writeln!(
        out,
        "2. A logging actor shared by three tasks; the driver reads the logs as they grow"
    )?;
    logging::run(rt, 5, Duration::from_millis(1200), out)?;
    writeln!(out)?;

    writeln!(
        out,
        "3. Large objects, zero-copy: 256 MiB of f64 put once, summed in place by an actor"
    )?;
    large_objects::run(rt, out)?;
    out.flush()?;
    Ok(())
}
