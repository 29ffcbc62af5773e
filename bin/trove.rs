//! `trove`: the driver CLI. `demo`, `bench` and `stress` run on an embedded store (forked by
//! `trove::init`); `status`, `put` and `get` talk to a running `troved`.

mod stress;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::io::Write;
use std::path::PathBuf;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use trove::{ActorHandle, Config, ObjectRef};
use trove_store::{ObjectId, StoreClient, Timeout};

/// trove: a zero-copy shared-memory object store and actor executor.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// A running troved's socket (default for status/put/get: $TROVE_STORE, then the default
    /// socket path). demo and bench start an embedded store unless this is given.
    #[arg(long, global = true, env = "TROVE_STORE")]
    store: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the three stories of DESIGN.md and shows what happens as it happens.
    Demo,
    /// Measures the figures of the README; prints a table (or JSON lines).
    Bench {
        /// A shorter run (fewer repetitions).
        #[arg(long)]
        quick: bool,
        /// One JSON object per line: {"name": ..., "value": ..., "unit": ...}.
        #[arg(long)]
        json: bool,
    },
    /// A mixed workload under seeded SIGKILLs of actors, workers and client processes; every
    /// value checked, every wait bounded, the store's live leak measured after each round.
    /// Exits non-zero on any hang, wrong value or leak.
    Stress {
        /// How long to run (whole rounds; at least one).
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// The seed of the kill schedule and the workload (default: from the clock; printed).
        #[arg(long)]
        seed: Option<u64>,
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// Size of the embedded store.
        #[arg(long, default_value = "1GiB", value_parser = trove_store::size::parse_size)]
        memory: u64,
        /// Task workers.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Only these operations (comma-separated): put, put_slice, add, sum, bundle, make,
        /// echo, relay_add, relay_sum, task_make, task_sum, task_call. Default: all.
        #[arg(long, value_parser = stress::Op::parse_list)]
        ops: Option<std::vec::Vec<stress::Op>>,
        /// What to SIGKILL: actors,workers,clients (any subset) or none.
        #[arg(long, default_value = "actors,workers,clients", value_parser = stress::KillKind::parse_list)]
        kill: std::vec::Vec<stress::KillKind>,
        /// Only large values (256 KiB-1 MiB) in the driver's workload.
        #[arg(long)]
        large: bool,
    },
    /// A client process of `stress` (started by it).
    #[command(hide = true)]
    StressClient {
        #[arg(long)]
        seed: u64,
    },
    /// A running store's capacity, used and pinned bytes, objects and clients.
    Status {
        /// List the objects too (id, size, state, pins, age).
        #[arg(long)]
        objects: bool,
    },
    /// Stores a file as an object in a running store; prints its id.
    Put { file: PathBuf },
    /// Writes an object of a running store to stdout or a file.
    Get {
        id: String,
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    // No thread may exist before trove::init (it forks): parse, then init, then log.
    let args = Args::parse();
    match args.command {
        Command::Demo => {
            // Four workers, so that the three logging tasks run at once on any machine.
            let rt = init(args.store, 1 << 30, 4)?;
            logging();
            demo(&rt)
        }
        Command::Bench { quick, json } => {
            let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
            let rt = init(args.store, 5 << 29, cpus)?;
            logging();
            bench(&rt, quick, json)
        }
        Command::Stress {
            seconds,
            seed,
            json,
            memory,
            workers,
            ops,
            kill,
            large,
        } => {
            let workers = workers.max(1);
            let rt = init(args.store, memory, workers)?;
            logging();
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
            let opts = stress::Options {
                seconds,
                seed,
                json,
                workers,
                ops: ops.unwrap_or_else(|| stress::Op::ALL.iter().map(|(_, op)| *op).collect()),
                kill,
                large,
            };
            if !stress::run(&rt, &opts)? {
                bail!("stress (seed {seed}) saw hangs, wrong values or leaks");
            }
            Ok(())
        }
        Command::StressClient { seed } => {
            let socket = args
                .store
                .context("stress-client needs --store (the driver's socket)")?;
            stress::client_main(socket, seed)
        }
        Command::Status { objects } => status(&connect(args.store)?, objects),
        Command::Put { file } => {
            let c = connect(args.store)?;
            let data =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let id = ObjectId::random();
            c.put(id, &data)?;
            println!("{id}");
            Ok(())
        }
        Command::Get { id, output } => {
            let c = connect(args.store)?;
            let id: ObjectId = id.parse().map_err(|e| anyhow::anyhow!("bad id: {e}"))?;
            let view = c.get(id, Timeout::Poll)?;
            match output {
                Some(p) => std::fs::write(&p, &*view)
                    .with_context(|| format!("writing {}", p.display()))?,
                None => std::io::stdout().write_all(&view)?,
            }
            Ok(())
        }
    }
}

fn logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

fn init(store: Option<PathBuf>, memory: u64, cpus: usize) -> anyhow::Result<trove::Runtime> {
    let mut cfg = Config::default()
        .memory(memory)
        .prefault(true)
        .num_cpus(cpus);
    if let Some(s) = store {
        cfg = cfg.store(s);
    }
    Ok(trove::init(cfg)?)
}

fn connect(store: Option<PathBuf>) -> anyhow::Result<StoreClient> {
    let socket = store.unwrap_or_else(trove_store::default_socket_path);
    StoreClient::connect(&socket).with_context(|| {
        format!(
            "no store at {} (start one with `troved`, or pass --store)",
            socket.display()
        )
    })
}

fn status(c: &StoreClient, objects: bool) -> anyhow::Result<()> {
    let s = c.stats()?;
    let size = trove_store::size::format_size;
    println!("store      {}", c.socket_path().display());
    println!("capacity   {}", size(s.capacity));
    println!(
        "used       {} ({:.1}%)",
        size(s.used),
        100.0 * s.used as f64 / s.capacity.max(1) as f64
    );
    println!("pinned     {}", size(s.pinned));
    println!("reserved   {} (client slabs)", size(s.reserved));
    println!("objects    {} ({} sealed)", s.objects, s.sealed);
    println!("clients    {} (this one included)", s.clients);
    println!("evictions  {}", s.evictions);
    if objects {
        println!();
        println!(
            "{:<40} {:>10} {:<9} {:>4} {:>8}",
            "id", "size", "state", "pins", "age"
        );
        for o in c.list()? {
            println!(
                "{:<40} {:>10} {:<9} {:>4} {:>7.1}s",
                o.id.to_string(),
                size(o.size),
                format!("{:?}", o.state),
                o.pins,
                o.age.as_secs_f64()
            );
        }
    }
    Ok(())
}

// ---- the stories ----

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

#[derive(Default)]
struct LoggingActor {
    logs: BTreeMap<u32, Vec<String>>,
}

impl LoggingActor {
    fn log(&mut self, index: u32, message: String) {
        self.logs.entry(index).or_default().push(message);
    }
    fn get_logs(&mut self) -> BTreeMap<u32, Vec<String>> {
        self.logs.clone()
    }
}

fn run_experiment(
    index: u32,
    iterations: u32,
    logger: ActorHandle<LoggingActor>,
) -> trove::Result<()> {
    for i in 0..iterations {
        sleep(Duration::from_secs(1));
        logger.call(LoggingActor::log, (index, format!("On iteration {i}")))?;
    }
    Ok(())
}

#[derive(Default)]
struct Summer {
    calls: u64,
}

impl Summer {
    fn sum(&mut self, data: ObjectRef<Vec<f64>>) -> trove::Result<f64> {
        self.calls += 1;
        Ok(data.get()?.iter().map(|x| x.to_native()).sum())
    }
    fn inc(&mut self) -> u64 {
        self.calls += 1;
        self.calls
    }
}

/// Exercise 4: two actors, five 500 ms increments each, in parallel. Returns the seconds.
fn exercise4(rt: &trove::Runtime, verbose: bool) -> anyhow::Result<f64> {
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
    if verbose {
        println!(
            "  10 calls sent in {:.2?}; each takes 500 ms in its actor",
            start.elapsed()
        );
    }
    let mut results = Vec::new();
    for r in &refs {
        results.push(r.deserialize()?);
        if verbose {
            println!("  {:>6.0?}  results so far {results:?}", start.elapsed());
        }
    }
    let took = start.elapsed();
    rt.kill(&f1)?;
    rt.kill(&f2)?;
    if results != [1, 1, 2, 2, 3, 3, 4, 4, 5, 5] {
        bail!("exercise 4 gave {results:?}");
    }
    Ok(took.as_secs_f64())
}

fn demo(rt: &trove::Runtime) -> anyhow::Result<()> {
    println!("1. Stateful actors in parallel (Ray Exercise 4): two Foo actors, 5 increments each");
    let s = exercise4(rt, true)?;
    println!("  done in {s:.2} s (serially it would take 5 s)\n");

    println!("2. A logging actor shared by three tasks; the driver reads the logs as they grow");
    let iterations = 5;
    let logger = rt.actor(LoggingActor::default)?;
    let tasks = (0..3)
        .map(|i| rt.spawn(run_experiment, (i, iterations, logger.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    let start = Instant::now();
    while !tasks.iter().all(|t| t.is_ready()) {
        sleep(Duration::from_millis(1200));
        let logs = logger.call(LoggingActor::get_logs, ())?.deserialize()?;
        let lines: usize = logs.values().map(Vec::len).sum();
        let last: Vec<&str> = logs
            .values()
            .filter_map(|v| v.last().map(String::as_str))
            .collect();
        println!(
            "  {:>5.1?}  {lines:>2} lines; latest {last:?}",
            start.elapsed()
        );
    }
    for t in &tasks {
        t.deserialize()?;
    }
    rt.kill(&logger)?;
    println!();

    println!("3. Large objects, zero-copy: 256 MiB of f64 put once, summed in place by an actor");
    let summer = rt.actor(Summer::default)?;
    let n = 32 << 20;
    let data = vec![1.0f64; n];
    let t = Instant::now();
    let big: ObjectRef<Vec<f64>> = rt.put(&data)?;
    println!("  put 256 MiB: {:.2?}", t.elapsed());
    drop(data);
    let t = Instant::now();
    let view = big.get()?;
    println!(
        "  get: {:.2?} (a pinned view, no copy); {} values",
        t.elapsed(),
        view.len()
    );
    let t = Instant::now();
    let local: f64 = view.iter().map(|x| x.to_native()).sum();
    println!("  local sum {local}: {:.2?}", t.elapsed());
    let t = Instant::now();
    let remote = summer.call(Summer::sum, (big.clone(),))?.deserialize()?;
    println!(
        "  actor sum {remote}: {:.2?} (another process, same pages)",
        t.elapsed()
    );
    rt.kill(&summer)?;
    if local != remote {
        bail!("sums differ: {local} vs {remote}");
    }
    Ok(())
}

// ---- the benchmark ----

struct Report {
    json: bool,
    rows: Vec<(String, f64, &'static str, Option<String>)>,
}

impl Report {
    fn add(&mut self, name: &str, value: f64, unit: &'static str, baseline: Option<String>) {
        if self.json {
            println!("{{\"name\": \"{name}\", \"value\": {value}, \"unit\": \"{unit}\"}}");
        } else {
            eprint!("\r\x1b[K  measured {name}");
        }
        self.rows.push((name.to_string(), value, unit, baseline));
    }
    fn table(&self) {
        if self.json {
            return;
        }
        eprintln!("\r\x1b[K");
        println!("{:<26} {:>14} {:<8} baseline", "figure", "value", "unit");
        for (name, value, unit, base) in &self.rows {
            println!(
                "{name:<26} {value:>14.3} {unit:<8} {}",
                base.as_deref().unwrap_or("")
            );
        }
    }
}

fn progress(json: bool, what: &str) {
    if !json {
        eprint!("\r\x1b[K  running {what} ...");
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Small {
    id: u64,
    name: String,
    samples: Vec<u32>,
}

fn bench(rt: &trove::Runtime, quick: bool, json: bool) -> anyhow::Result<()> {
    let reps = if quick { 3 } else { 7 };
    let mut r = Report {
        json,
        rows: Vec::new(),
    };
    rt.store().populate()?;
    const GIB: usize = 1 << 30;

    progress(json, "memcpy 1 GiB");
    let src = vec![0x5au8; GIB];
    let mut dst = vec![0u8; GIB];
    dst.copy_from_slice(&src);
    let memcpy = median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                dst.copy_from_slice(black_box(&src));
                black_box(&dst);
                GIB as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .collect(),
    );
    drop(dst);
    r.add("memcpy_GBps", memcpy, "GB/s", None);

    progress(json, "put 1 GiB");
    let mut puts = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let o = rt.put_slice(black_box(&src[..]))?;
        puts.push(GIB as f64 / t.elapsed().as_secs_f64() / 1e9);
        drop(o);
    }
    let put = median(puts);
    r.add(
        "put_1GiB_GBps",
        put,
        "GB/s",
        Some(format!("memcpy {memcpy:.2} GB/s")),
    );
    r.add(
        "put_1GiB_ratio",
        put / memcpy,
        "x",
        Some("of memcpy".into()),
    );

    progress(json, "get 1 GiB");
    let big = rt.put_slice(&src[..])?;
    drop(src);
    let n = if quick { 20_000 } else { 200_000 };
    let t = Instant::now();
    for _ in 0..n {
        black_box(big.get()?.len());
    }
    r.add(
        "get_1GiB_us",
        t.elapsed().as_secs_f64() * 1e6 / n as f64,
        "us",
        None,
    );
    drop(big);

    progress(json, "small puts");
    let n = if quick { 20_000 } else { 200_000 };
    let values: Vec<Small> = (0..n as u64)
        .map(|i| Small {
            id: i,
            name: format!("sample number {i:>16}"),
            samples: (0..8).collect(),
        })
        .collect();
    let mut refs = Vec::with_capacity(n);
    let t = Instant::now();
    for v in &values {
        refs.push(rt.put(v)?);
    }
    rt.store().stats()?; // until the daemon has handled them all
    r.add(
        "small_put_per_s",
        n as f64 / t.elapsed().as_secs_f64(),
        "1/s",
        None,
    );

    progress(json, "small gets");
    let one = &refs[0];
    let m = if quick { 200_000 } else { 2_000_000 };
    let t = Instant::now();
    for _ in 0..m {
        black_box(one.get()?.id.to_native());
    }
    r.add(
        "small_get_per_s",
        m as f64 / t.elapsed().as_secs_f64(),
        "1/s",
        None,
    );
    drop(refs);

    progress(json, "actor calls");
    let a = rt.actor(Summer::default)?;
    // Warm-up (untimed), as the criterion benches do: the first calls grow this process's
    // maps and fault in fresh pages.
    for _ in 0..2 {
        let refs: Vec<_> = (0..10_000)
            .map(|_| a.call(Summer::inc, ()))
            .collect::<Result<_, _>>()?;
        refs.last().expect("10,000").get()?;
    }
    let n = if quick { 5_000 } else { 50_000 };
    let t = Instant::now();
    for _ in 0..n {
        black_box(*a.call(Summer::inc, ())?.get()?);
    }
    r.add(
        "actor_sync_calls_per_s",
        n as f64 / t.elapsed().as_secs_f64(),
        "1/s",
        None,
    );
    let batches = if quick { 2 } else { 10 };
    let t = Instant::now();
    for _ in 0..batches {
        let refs: Vec<_> = (0..10_000)
            .map(|_| a.call(Summer::inc, ()))
            .collect::<Result<_, _>>()?;
        black_box(*refs.last().expect("10,000").get()?);
    }
    r.add(
        "actor_async_calls_per_s",
        (batches * 10_000) as f64 / t.elapsed().as_secs_f64(),
        "1/s",
        None,
    );

    progress(json, "sum of 256 MiB");
    let big: ObjectRef<Vec<f64>> = rt.put(&vec![1.0f64; 32 << 20])?;
    let mut ratios = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        black_box(big.get()?.iter().map(|x| x.to_native()).sum::<f64>());
        let local = t.elapsed().as_secs_f64();
        let t = Instant::now();
        black_box(*a.call(Summer::sum, (big.clone(),))?.get()?);
        ratios.push(t.elapsed().as_secs_f64() / local);
    }
    r.add(
        "actor_sum_256MiB_ratio",
        median(ratios),
        "x",
        Some("of a local sum".into()),
    );
    drop(big);
    rt.kill(&a)?;

    progress(json, "actor creation");
    let n = if quick { 5 } else { 20 };
    let mut total = Duration::ZERO;
    for _ in 0..n {
        let t = Instant::now();
        let h = rt.actor(Summer::default)?;
        total += t.elapsed();
        h.call(Summer::inc, ())?.get()?;
        rt.kill(&h)?;
    }
    r.add(
        "actor_create_ms",
        total.as_secs_f64() * 1e3 / n as f64,
        "ms",
        None,
    );

    progress(json, "seed exercise 4");
    let s = exercise4(rt, false)?;
    r.add("seed_ex4_s", s, "s", Some("5 s serially".into()));
    r.table();
    Ok(())
}
