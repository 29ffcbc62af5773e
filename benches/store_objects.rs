//! Store-level object passing: create+write+seal and get of 1 KiB .. 1 GiB objects, with a
//! memcpy of the same size beside each as the physical baseline. `Throughput::Bytes` only for
//! memcpy and put (which move every byte); a get, which reads none, counts gets.
//!
//! `cargo bench --bench store_objects` (criterion prints GiB/s for each; compare the
//! `put` line with the `memcpy` line of the same size). The daemon runs in this process on
//! a thread with a pre-faulted arena; the client is the same `StoreClient` other processes
//! use, so `get` here is the same lock-free directory lookup and pin a reader elsewhere does.

use std::hint::black_box;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use trove_store::{Daemon, DaemonConfig, ObjectId, StoreClient, Timeout};

const SIZES: &[(u64, &str)] = &[
    (1 << 10, "1KiB"),
    (1 << 20, "1MiB"),
    (64 << 20, "64MiB"),
    (1 << 30, "1GiB"),
];

struct Store {
    _dir: tempfile::TempDir,
    shutdown: trove_store::ShutdownHandle,
    thread: Option<thread::JoinHandle<()>>,
    client: StoreClient,
}

impl Store {
    fn start() -> Store {
        let dir = tempfile::Builder::new()
            .prefix("trove-bench-")
            .tempdir()
            .expect("tempdir");
        let cfg = DaemonConfig {
            prefault: true,
            ..DaemonConfig::new(dir.path().join("sock").join("troved.sock"), 3 << 30)
        };
        let daemon = Daemon::bind(&cfg).expect("bind daemon");
        let shutdown = daemon.shutdown_handle();
        let thread = thread::spawn(move || daemon.run().expect("daemon"));
        let client = StoreClient::connect(&cfg.socket).expect("connect");
        client.populate().expect("populate client page tables");
        Store {
            _dir: dir,
            shutdown,
            thread: Some(thread),
            client,
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.shutdown.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn bench_objects(c: &mut Criterion) {
    let store = Store::start();
    let client = &store.client;
    let mut group = c.benchmark_group("store");
    for &(size, name) in SIZES {
        let big = size >= 64 << 20;
        if big {
            group
                .sample_size(10)
                .measurement_time(Duration::from_secs(if size >= 1 << 30 { 20 } else { 5 }));
        } else {
            group
                .sample_size(50)
                .measurement_time(Duration::from_secs(3));
        }
        group.throughput(Throughput::Bytes(size));
        let src = vec![0x5au8; size as usize];
        let mut dst = vec![0u8; size as usize];

        group.bench_function(BenchmarkId::new("memcpy", name), |b| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&src));
                black_box(&mut dst);
            })
        });

        group.bench_function(BenchmarkId::new("put", name), |b| {
            // Only create+write+seal is timed; the delete that makes room again is not.
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let id = ObjectId::random();
                    let start = Instant::now();
                    let mut w = client.create(id, size).expect("create");
                    w.as_mut_slice().copy_from_slice(black_box(&src));
                    w.seal().expect("seal");
                    total += start.elapsed();
                    client.delete(&[id]).expect("delete");
                }
                total
            })
        });

        let id = ObjectId::random();
        client.put(id, &src).expect("put");
        // A get reads none of the bytes: counted in gets, not bytes.
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::new("get", name), |b| {
            b.iter(|| {
                let v = client.get(id, Timeout::Poll).expect("get");
                black_box(v.as_slice().as_ptr());
            })
        });
        client.delete(&[id]).expect("delete");
        drop(dst);
    }
    group.finish();
}

criterion_group!(benches, bench_objects);
criterion_main!(benches);
