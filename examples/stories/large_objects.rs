//! Large objects, zero-copy: a 256 MiB `Vec<f64>` put once into shared memory, viewed in
//! place by the driver and summed in place by an actor in another process.

use std::io::Write;
use std::time::Instant;

use anyhow::bail;
use trove::ObjectRef;

pub struct Summer;

impl Summer {
    pub fn new() -> Summer {
        Summer
    }
    pub fn sum(&mut self, data: ObjectRef<Vec<f64>>) -> trove::Result<f64> {
        let view = data.get()?; // the same pages the driver wrote: no copy
        Ok(view.iter().map(|x| x.to_native()).sum())
    }
}

/// Runs the story, writing each step's time to `out`. Needs a store of more than 256 MiB.
pub fn run(rt: &trove::Runtime, out: &mut dyn Write) -> anyhow::Result<()> {
    let summer = rt.actor(Summer::new)?;
    let n = 32 << 20; // 32 Mi f64 = 256 MiB
    let data = vec![1.0f64; n];
    let t = Instant::now();
    let big: ObjectRef<Vec<f64>> = rt.put(&data)?;
    writeln!(out, "  put 256 MiB: {:.2?}", t.elapsed())?;
    drop(data);
    let t = Instant::now();
    let view = big.get()?;
    writeln!(
        out,
        "  get: {:.2?} (a pinned view, no copy); {} values",
        t.elapsed(),
        view.len()
    )?;
    let t = Instant::now();
    let local: f64 = view.iter().map(|x| x.to_native()).sum();
    writeln!(out, "  local sum {local}: {:.2?}", t.elapsed())?;
    let t = Instant::now();
    let remote = summer.call(Summer::sum, (big.clone(),))?.deserialize()?;
    writeln!(
        out,
        "  actor sum {remote}: {:.2?} (another process, same pages)",
        t.elapsed()
    )?;
    rt.kill(&summer)?;
    if local != remote || remote != n as f64 {
        bail!(
            "sums differ: local {local}, actor {remote}, expected {}",
            n as f64
        );
    }
    Ok(())
}
