//! Objects passed as call arguments, freed as the calls run: a fresh 8 MiB object per call,
//! every ref dropped, and the store's used bytes printed as it goes (they stay at the
//! baseline: the store holds only the arguments of calls in flight).
//!
//! `cargo run --release --example argument_loop`

use trove::{Config, ObjectRef};

#[derive(Default)]
struct Summer;
impl Summer {
    fn sum(&mut self, v: ObjectRef<[f64]>) -> trove::Result<f64> {
        Ok(v.get()?.iter().sum())
    }
}

fn main() -> trove::Result<()> {
    let rt = trove::init(Config::default())?;
    let a = rt.actor(|| Summer)?;
    let base = rt.stats()?;
    println!(
        "baseline: used {} MiB, objects {}",
        base.used >> 20,
        base.objects
    );
    for i in 1..=40 {
        let chunk = rt.put_slice(&vec![1.0f64; 1 << 20])?;
        let s = *a.call(Summer::sum, (chunk,))?.get()?;
        assert_eq!(s, (1 << 20) as f64);
        if i % 5 == 0 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let st = rt.stats()?;
            println!(
                "after {i:>2}: used {:>4} MiB, objects {}",
                st.used >> 20,
                st.objects
            );
        }
    }
    Ok(())
}
