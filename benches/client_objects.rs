//! The trove client's object verbs: small put and get rates, and put/get of a 1 GiB object
//! against a memcpy of the same size in the same run.
//!
//! `cargo bench --bench client_objects`. `trove::init` runs first thing in `main` (it forks the
//! embedded store, pre-faulted), then criterion measures. Puts are measured until the daemon
//! has handled them (a round trip at the end of each batch), not just until the client has
//! queued them; the references are dropped outside the timed part.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use trove::{Config, ObjectRef};

/// A small value: ~100 bytes archived.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Small {
    id: u64,
    name: String,
    samples: Vec<u32>,
}

fn small(i: u64) -> Small {
    Small {
        id: i,
        name: format!("sample number {i:>16}"),
        samples: (0..8).map(|k| (i as u32).wrapping_add(k)).collect(),
    }
}

const GIB: usize = 1 << 30;

fn main() {
    let rt = trove::init(Config::default().memory(5 << 29).prefault(true)).expect("init");
    rt.store().populate().expect("populate page tables");
    let mut c = Criterion::default().configure_from_args();

    {
        let mut g = c.benchmark_group("client_small");
        g.sample_size(30).measurement_time(Duration::from_secs(4));
        g.throughput(Throughput::Elements(1));
        g.bench_function("put", |b| {
            b.iter_custom(|iters| {
                let mut refs: Vec<ObjectRef<Small>> = Vec::with_capacity(iters as usize);
                let values: Vec<Small> = (0..iters).map(small).collect();
                let t = Instant::now();
                for v in &values {
                    refs.push(rt.put(v).expect("put"));
                }
                rt.store().stats().expect("sync with the daemon");
                let elapsed = t.elapsed();
                drop(refs);
                rt.store().stats().expect("sync");
                elapsed
            })
        });
        let r = rt.put(&small(7)).expect("put");
        rt.store().stats().expect("sync");
        g.bench_function("get", |b| {
            b.iter(|| {
                let o = r.get().expect("get");
                black_box(o.id.to_native())
            })
        });
        g.finish();
    }

    {
        let src = vec![0x5au8; GIB];
        let mut dst = vec![0u8; GIB];
        dst.copy_from_slice(&src); // fault the pages in
        let mut g = c.benchmark_group("client_1GiB");
        g.sample_size(10).measurement_time(Duration::from_secs(20));
        g.throughput(Throughput::Bytes(GIB as u64));
        g.bench_function("memcpy", |b| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&src));
                black_box(&dst);
            })
        });
        g.bench_function("put", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let r = rt.put_slice(black_box(&src[..])).expect("put 1 GiB");
                    total += t.elapsed();
                    drop(r);
                }
                total
            })
        });
        drop(dst);
        let r = rt.put_slice(&src[..]).expect("put 1 GiB");
        drop(src);
        g.throughput(Throughput::Elements(1));
        g.sample_size(30).measurement_time(Duration::from_secs(3));
        g.bench_function("get", |b| {
            b.iter(|| {
                let o = r.get().expect("get");
                black_box(o.len())
            })
        });
        g.finish();
    }
    c.final_summary();
}
