//! Ray's "Exercise 4": stateful actors in parallel. Two `Foo` actors, each in its own process;
//! five increments each, 500 ms apiece, run in parallel: about 2.5 s in all.
//!
//! `cargo run --release --example actors`

use std::thread::sleep;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Foo {
    counter: u64,
}

impl Foo {
    fn reset(&mut self) {
        self.counter = 0;
    }
    fn increment(&mut self) -> u64 {
        sleep(Duration::from_millis(500));
        self.counter += 1;
        self.counter
    }
}

fn main() -> trove::Result<()> {
    let rt = trove::init(trove::Config::default().num_cpus(4))?;
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
    let results: Vec<u64> = rt.get_all(&refs)?;
    let took = start.elapsed();
    println!("results {results:?} in {took:.2?}");
    assert_eq!(results, [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]);
    assert!(took > Duration::from_millis(2500) && took < Duration::from_secs(3));
    Ok(())
}
