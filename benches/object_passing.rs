//! Large-object passing by size: put, get, and a round trip through an actor (the actor reads
//! one byte per page in place and returns a new ref to it), beside a memcpy of the same size.
//! `Throughput::Bytes` only for memcpy and put, which move every byte; get and the round trip
//! read none or one byte a page, so they count operations (their time by size is the figure).
//!
//! `cargo bench --bench object_passing`; criterion writes the bandwidth-by-size plots (SVG) to
//! `target/criterion/object_passing_*/report/index.html` (and `target/criterion/report/`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{AxisScale, BenchmarkId, Criterion, PlotConfiguration, Throughput};
use trove::{Config, ObjectRef};

const SIZES: &[(usize, &str)] = &[
    (4 << 10, "4KiB"),
    (64 << 10, "64KiB"),
    (1 << 20, "1MiB"),
    (16 << 20, "16MiB"),
    (256 << 20, "256MiB"),
];

struct Echo;

impl Echo {
    fn new() -> Echo {
        Echo
    }
    /// Touches every page of the object in place and hands the ref back.
    fn pass(&mut self, data: ObjectRef<[u8]>) -> trove::Result<ObjectRef<[u8]>> {
        let v = data.get()?;
        let mut x = 0u8;
        for chunk in v.chunks(4096) {
            x ^= chunk[0];
        }
        black_box(x);
        Ok(data)
    }
}

fn main() {
    let rt = trove::init(Config::default().memory(2 << 30).prefault(true)).expect("init");
    rt.store().populate().expect("populate");
    let echo = rt.actor(Echo::new).expect("actor");
    let mut c = Criterion::default().configure_from_args();
    let plot = PlotConfiguration::default().summary_scale(AxisScale::Logarithmic);
    for (group, op) in [
        ("memcpy", 0),
        ("put", 1),
        ("get", 2),
        ("actor_round_trip", 3),
    ] {
        let mut g = c.benchmark_group(format!("object_passing_{group}"));
        g.plot_config(plot.clone());
        g.sample_size(10).measurement_time(Duration::from_secs(3));
        for &(size, name) in SIZES {
            g.throughput(if op <= 1 {
                Throughput::Bytes(size as u64)
            } else {
                Throughput::Elements(1)
            });
            let src = vec![0x5au8; size];
            let mut dst = vec![0u8; size];
            let obj = rt.put_bytes(&src).expect("put");
            g.bench_with_input(BenchmarkId::from_parameter(name), &size, |b, _| match op {
                0 => b.iter(|| {
                    dst.copy_from_slice(black_box(&src));
                    black_box(&dst);
                }),
                1 => b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t = Instant::now();
                        let r = rt.put_bytes(black_box(&src)).expect("put");
                        total += t.elapsed();
                        drop(r);
                    }
                    total
                }),
                2 => b.iter(|| black_box(obj.get().expect("get").len())),
                _ => b.iter(|| {
                    let back = echo.call(Echo::pass, (obj.clone(),)).expect("call");
                    let inner = back.deserialize().expect("result");
                    black_box(inner.get().expect("get").len())
                }),
            });
        }
        g.finish();
    }
    c.final_summary();
}
