//! Ray's "Exercise 4": stateful actors in parallel. Two `Foo` actors, each in its own process;
//! five increments each, 500 ms apiece, run in parallel: about 2.5 s in all (5 s serially).

use std::io::Write;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::bail;

#[derive(Default)]
pub struct Foo {
    counter: u64,
}

impl Foo {
    pub fn reset(&mut self) {
        self.counter = 0;
    }
    pub fn increment(&mut self) -> u64 {
        sleep(Duration::from_millis(500));
        self.counter += 1;
        self.counter
    }
}

/// Runs the story, writing its progress to `out`; returns the seconds the ten calls took.
pub fn run(rt: &trove::Runtime, out: &mut dyn Write) -> anyhow::Result<f64> {
    let f1 = rt.actor(Foo::default)?;
    let f2 = rt.actor(Foo::default)?;
    f1.call(Foo::reset, ())?;
    f2.call(Foo::reset, ())?;
    let start = Instant::now();
    let mut refs = Vec::new();
    for _ in 0..5 {
        refs.push(f1.call(Foo::increment, ())?);
        refs.push(f2.call(Foo::increment, ())?);
    }
    writeln!(
        out,
        "  10 calls sent in {:.2?}; each takes 500 ms in its actor",
        start.elapsed()
    )?;
    let mut results = Vec::new();
    for r in &refs {
        results.push(r.deserialize()?);
        writeln!(
            out,
            "  {:>6.0?}  results so far {results:?}",
            start.elapsed()
        )?;
    }
    let took = start.elapsed().as_secs_f64();
    rt.kill(&f1)?;
    rt.kill(&f2)?;
    if results != [1, 1, 2, 2, 3, 3, 4, 4, 5, 5] {
        bail!("exercise 4 gave {results:?}");
    }
    writeln!(out, "  done in {took:.2} s (serially it would take 5 s)")?;
    Ok(took)
}
