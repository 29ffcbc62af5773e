//! Large objects, zero-copy: a 256 MiB `Vec<f64>` put once into shared memory, viewed in
//! place by the driver and summed in place by an actor in another process.
//!
//! `cargo run --release --example large_objects`

use std::time::Instant;

use trove::ObjectRef;

struct Summer;

impl Summer {
    fn new() -> Summer {
        Summer
    }
    fn sum(&mut self, data: ObjectRef<Vec<f64>>) -> trove::Result<f64> {
        let view = data.get()?; // the same pages the driver wrote: no copy
        Ok(view.iter().map(|x| x.to_native()).sum())
    }
}

fn main() -> trove::Result<()> {
    let rt = trove::init(trove::Config::default().memory(1 << 30))?;
    let summer = rt.actor(Summer::new)?;
    let n = 32 << 20; // 32 Mi f64 = 256 MiB
    let t = Instant::now();
    let big: ObjectRef<Vec<f64>> = rt.put(&vec![1.0; n])?;
    println!("put 256 MiB in {:.2?}", t.elapsed());
    let t = Instant::now();
    let view = big.get()?;
    println!(
        "get: {} values in {:.2?} (zero-copy view)",
        view.len(),
        t.elapsed()
    );
    let t = Instant::now();
    let local: f64 = view.iter().map(|x| x.to_native()).sum();
    println!("local sum {local} in {:.2?}", t.elapsed());
    let t = Instant::now();
    let remote = summer.call(Summer::sum, (big.clone(),))?.deserialize()?;
    println!("actor sum {remote} in {:.2?}", t.elapsed());
    assert_eq!(local, remote);
    assert_eq!(remote, n as f64);
    Ok(())
}
