//! Actor calls: sync round trip, async calls in batches of 10,000 (small results, and 1 KiB
//! results that go through the store), actor creation, and an actor summing a 256 MiB
//! `Vec<f64>` passed by ref against summing it locally.
//!
//! `cargo bench --bench actor_calls`. `trove::init` runs first thing in `main`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use trove::{Config, ObjectRef};

#[derive(Default)]
struct Counter {
    n: u64,
}

impl Counter {
    fn inc(&mut self) -> u64 {
        self.n += 1;
        self.n
    }
    /// A result too large to travel inline (it goes through the store).
    fn kib(&mut self) -> Vec<u8> {
        self.n += 1;
        vec![self.n as u8; 1024]
    }
    fn sum(&mut self, data: ObjectRef<Vec<f64>>) -> trove::Result<f64> {
        Ok(data.get()?.iter().map(|x| x.to_native()).sum())
    }
}

fn main() {
    let rt = trove::init(Config::default().memory(3 << 30).prefault(true)).expect("init");
    let mut c = Criterion::default().configure_from_args();
    let actor = rt.actor(Counter::default).expect("actor");
    actor.call(Counter::inc, ()).unwrap().get().unwrap();

    let mut g = c.benchmark_group("actor");
    g.sample_size(20).measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements(1));
    g.bench_function("sync_call", |b| {
        b.iter(|| black_box(*actor.call(Counter::inc, ()).unwrap().get().unwrap()))
    });
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("async_calls_10k", |b| {
        b.iter(|| {
            let refs: Vec<_> = (0..10_000)
                .map(|_| actor.call(Counter::inc, ()).unwrap())
                .collect();
            // Calls from one caller run in order: the last done means all are.
            black_box(*refs.last().unwrap().get().unwrap());
        })
    });
    g.bench_function("async_calls_10k_stored_1KiB", |b| {
        b.iter(|| {
            let refs: Vec<_> = (0..10_000)
                .map(|_| actor.call(Counter::kib, ()).unwrap())
                .collect();
            black_box(refs.last().unwrap().get().unwrap().len());
        })
    });
    g.throughput(Throughput::Elements(1));
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.bench_function("create", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let a = rt.actor(Counter::default).unwrap();
                total += t.elapsed();
                a.call(Counter::inc, ()).unwrap().get().unwrap();
                rt.kill(&a).unwrap();
            }
            total
        })
    });
    g.bench_function("create_and_first_call", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let a = rt.actor(Counter::default).unwrap();
                a.call(Counter::inc, ()).unwrap().get().unwrap();
                total += t.elapsed();
                rt.kill(&a).unwrap();
            }
            total
        })
    });
    g.finish();

    let n = 32 << 20; // 256 MiB of f64
    let big: ObjectRef<Vec<f64>> = rt.put(&vec![1.0; n]).expect("put 256 MiB");
    let mut g = c.benchmark_group("sum_256MiB");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Bytes((n * 8) as u64));
    g.bench_function("local", |b| {
        b.iter(|| {
            let v = big.get().unwrap();
            black_box(v.iter().map(|x| x.to_native()).sum::<f64>())
        })
    });
    g.bench_function("actor", |b| {
        b.iter(|| {
            black_box(
                *actor
                    .call(Counter::sum, (big.clone(),))
                    .unwrap()
                    .get()
                    .unwrap(),
            )
        })
    });
    g.finish();
    c.final_summary();
}
