//! Performance as users meet it: each figure measured on the path a user takes, cold figures in
//! a fresh process, each beside the reference it is judged against (measured in the same run).
//!
//! `cargo bench --bench user_paths [-- --quick] [-- --json]`. A plain program, not criterion:
//! the driver re-executes itself once per figure group (`TROVE_USER_PATH_FIGURE` names it), so
//! every group starts from a fresh process that calls `trove::init(Config::default())` first
//! thing (init forks, so it runs before any thread). A child prints `@ name value` lines; the
//! driver prints one line per figure, `name value unit (goal ..., ratio ...)`, or with
//! `--json` one JSON object per line.
//!
//! The cold put and the actor's sum are measured again with `Config::hugepages` where the
//! machine has huge pages (`huge_pages_<group>` says which: 1 the pool, 2 transparent ones,
//! 0 none); where it has none, those figures are missing and the run says why.
//!
//! References measured in the same run: a memcpy of 1 GiB (to fresh pages, and warm), the
//! kernel's rate of fresh pages for a memfd (populating 1 GiB of a new arena), a local
//! sum of 256 MiB (in the actor-sum process), a spinning and a futex ping-pong between two
//! forked processes over a shared page, run right before the call figures judged against them.
//! CPU per 1,000 sync calls (and per second of idling) adds the driver's and the actor's
//! utime + stime (`/proc/<pid>/stat`), so spinning shows; the store daemon's is shown apart.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::io::{BufRead, BufReader, Write};
use std::num::NonZeroUsize;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use trove::{Config, ObjectRef};

const FIGURE_ENV: &str = "TROVE_USER_PATH_FIGURE";
const QUICK_ENV: &str = "TROVE_USER_PATH_QUICK";
const GIB: usize = 1 << 30;
/// 256 MiB of f64.
const SUM_LEN: usize = 32 << 20;
/// `TROVE_MEMORY` for the groups that store a 1 GiB object.
const BIG_STORE: &str = "1536MiB";
/// A child that takes longer than this is killed and its figures are missing.
const CHILD_LIMIT: Duration = Duration::from_secs(120);

/// The figure groups, in the order they run; each runs in its own fresh process.
const GROUPS: &[&str] = &[
    "memcpy",
    "put",
    "put_fits",
    "get_other",
    "actor_sum",
    // With `Config::hugepages` (the pool, else transparent huge pages), where the machine
    // has them.
    "put_huge",
    "actor_sum_huge",
    "create",
    // The ping-pongs run right before the figures judged against them.
    "pingpong",
    "sync",
    "sync_oversub",
    "async",
    "one_to_n",
    "futex_pingpong",
    "round_robin",
    "tasks",
    "actors_many",
];

// ---- the actor and the task functions ----

/// The actor of the call figures (`trove bench`'s best cases use it too): one cheap method,
/// and a sum over an object.
#[derive(Default)]
pub struct Worker {
    n: u64,
}

impl Worker {
    pub fn inc(&mut self) -> u64 {
        self.n += 1;
        self.n
    }
    pub fn sum(&mut self, data: ObjectRef<Vec<f64>>) -> trove::Result<f64> {
        Ok(data.get()?.iter().map(|x| x.to_native()).sum())
    }
}

fn add_one(x: u64) -> u64 {
    x + 1
}

/// Times `get()` of `data` in this process (which did not create it): the first get, then
/// the median of `n` more, in nanoseconds.
fn time_get(data: ObjectRef<[u8]>, n: u64) -> trove::Result<Vec<u64>> {
    let t = Instant::now();
    black_box(data.get()?.len());
    let first = t.elapsed().as_nanos() as u64;
    let mut v = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let t = Instant::now();
        black_box(data.get()?.len());
        v.push(t.elapsed().as_nanos() as u64);
    }
    v.sort_unstable();
    Ok(vec![first, v[v.len() / 2]])
}

// ---- helpers ----

struct Knobs {
    quick: bool,
    /// Repetitions of a once-per-figure measurement.
    reps: usize,
    /// How long a rate is measured.
    span: Duration,
}

fn emit(name: &str, value: f64) {
    println!("@ {name} {value}");
}

/// The median of `v` (its upper middle for an even length).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The median rate, in GB/s, of `reps` copies of `src` into `dst` (pages already touched).
pub fn warm_memcpy_gbps(src: &[u8], dst: &mut [u8], reps: usize) -> f64 {
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                dst.copy_from_slice(black_box(src));
                black_box(&dst);
                src.len() as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .collect(),
    )
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// utime + stime of a process (all its threads), in seconds.
fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("stat format")? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15.
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    Ok(ticks as f64 / hz)
}

/// Runs `batch` (which does `per_batch` operations) until `span` has passed (at least twice);
/// returns operations per second.
fn rate(
    span: Duration,
    per_batch: u64,
    mut batch: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut done = 0u64;
    while done < 2 * per_batch || t.elapsed() < span {
        batch()?;
        done += per_batch;
    }
    Ok(done as f64 / t.elapsed().as_secs_f64())
}

fn warm_up(a: &trove::ActorHandle<Worker>) -> anyhow::Result<()> {
    for _ in 0..2 {
        let refs: Vec<_> = (0..10_000)
            .map(|_| a.call(Worker::inc, ()))
            .collect::<Result<_, _>>()?;
        refs.last().expect("10,000").get()?;
    }
    Ok(())
}

// ---- the figure groups (each in a fresh process) ----

fn child(group: &str, k: &Knobs) -> anyhow::Result<()> {
    match group {
        "memcpy" => memcpy(k),
        "pingpong" => pingpong(k, &[(false, "spin_pingpong"), (true, "futex_pingpong")]),
        "futex_pingpong" => pingpong(k, &[(true, "futex_pingpong_rr")]),
        _ => {
            // The user's path: init with the default config, first thing.
            let cfg = match group {
                "sync_oversub" => Config::default().num_cpus(2 * cores()),
                "put_huge" | "actor_sum_huge" => Config::default().hugepages(true),
                _ => Config::default(),
            };
            let rt = match trove::init(cfg) {
                Ok(rt) => rt,
                // Huge pages where the machine has them: else the figures are not measured,
                // and the driver says why.
                Err(trove::Error::Store(trove::store::StoreError::NoHugePages(why))) => {
                    emit(&format!("huge_pages_{group}"), 0.0);
                    eprintln!(
                        "\r\x1b[K  {group}: not measured: no huge pages for the store: {why}"
                    );
                    return Ok(());
                }
                Err(e) => return Err(e).context("trove::init"),
            };
            if group.ends_with("_huge") {
                emit(
                    &format!("huge_pages_{group}"),
                    rt.store().arena().pages() as u8 as f64,
                );
            }
            match group {
                "put_fits" => put_fits(&rt),
                "put" => put(&rt, k, ""),
                "put_huge" => put(&rt, k, "_huge"),
                "get_other" => get_other(&rt, k),
                "actor_sum" => actor_sum(&rt, k, ""),
                "actor_sum_huge" => actor_sum(&rt, k, "_huge"),
                "create" => create(&rt, k),
                "sync" => sync(&rt, k, "sync"),
                "sync_oversub" => sync(&rt, k, "sync_oversub"),
                "async" => async_calls(&rt, k),
                "one_to_n" => one_to_n(&rt, k),
                "round_robin" => round_robin(&rt, k),
                "tasks" => tasks(&rt, k),
                "actors_many" => actors_many(&rt, k),
                other => bail!("unknown figure group {other}"),
            }
        }
    }
}

fn memcpy(k: &Knobs) -> anyhow::Result<()> {
    let src = vec![0x5au8; GIB];
    // Fresh zero pages (calloc of a large block maps them untouched): the copy faults them in.
    let mut dst = vec![0u8; GIB];
    let t = Instant::now();
    dst.copy_from_slice(black_box(&src));
    black_box(&dst);
    emit("memcpy_cold", GIB as f64 / t.elapsed().as_secs_f64() / 1e9);
    emit("memcpy_warm", warm_memcpy_gbps(&src, &mut dst, k.reps));
    drop((src, dst));
    // What a cold put cannot beat: the kernel allocating (and zeroing) 1 GiB of fresh pages
    // of a memfd, on the threads a put populates with. Base pages, as the default config's
    // store has (with `TROVE_HUGEPAGES=1` the put's store has huge pages and this does not).
    use trove_store::shm::{Arena, Layout, populate_threads};
    let arena = Arena::create(Layout::new(GIB as u64, 64)?)?;
    let t = Instant::now();
    arena.populate_once_with(arena.layout().heap_offset, GIB as u64, populate_threads())?;
    emit(
        "populate_cold",
        GIB as f64 / t.elapsed().as_secs_f64() / 1e9,
    );
    Ok(())
}

/// Whether a 1 GiB object fits the store of `Config::default()` (`TROVE_MEMORY` unset).
fn put_fits(rt: &trove::Runtime) -> anyhow::Result<()> {
    let src = vec![0x5au8; GIB];
    match rt.put_slice(&src[..]) {
        Ok(_) => emit("put_1GiB_fits_default", 1.0),
        Err(e) => {
            eprintln!("user_paths: a 1 GiB put with the default config: {e}");
            emit("put_1GiB_fits_default", 0.0);
        }
    }
    Ok(())
}

fn put(rt: &trove::Runtime, k: &Knobs, sfx: &str) -> anyhow::Result<()> {
    let src = vec![0x5au8; GIB];
    let t = Instant::now();
    let r = rt
        .put_slice(black_box(&src[..]))
        .context("cold put of 1 GiB")?;
    emit(
        &format!("put_cold{sfx}"),
        GIB as f64 / t.elapsed().as_secs_f64() / 1e9,
    );
    drop(r);
    rt.store().stats()?; // the daemon has freed it
    let mut v = Vec::new();
    for _ in 0..k.reps {
        let t = Instant::now();
        let r = rt
            .put_slice(black_box(&src[..]))
            .context("warm put of 1 GiB")?;
        v.push(GIB as f64 / t.elapsed().as_secs_f64() / 1e9);
        drop(r);
        rt.store().stats()?;
    }
    emit(&format!("put_warm{sfx}"), median(v));
    Ok(())
}

fn get_other(rt: &trove::Runtime, k: &Knobs) -> anyhow::Result<()> {
    let r = rt
        .put_slice(&vec![0x5au8; GIB][..])
        .context("put of 1 GiB")?;
    let n = if k.quick { 1_000 } else { 10_000 };
    // A task runs in a worker process, which did not create the object.
    let t = rt.spawn(time_get, (r.clone(), n))?.get()?;
    emit("get_other_first", t[0].to_native() as f64 / 1e3);
    emit("get_other", t[1].to_native() as f64 / 1e3);
    Ok(())
}

fn actor_sum(rt: &trove::Runtime, k: &Knobs, sfx: &str) -> anyhow::Result<()> {
    let big: ObjectRef<Vec<f64>> = rt.put(&vec![1.0f64; SUM_LEN])?;
    let local_sum = || -> anyhow::Result<f64> {
        let t = Instant::now();
        black_box(big.get()?.iter().map(|x| x.to_native()).sum::<f64>());
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let actor_sum = |a: &trove::ActorHandle<Worker>| -> anyhow::Result<f64> {
        let t = Instant::now();
        black_box(*a.call(Worker::sum, (big.clone(),))?.get()?);
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    // A fresh actor, up (one trivial call answered), that has not touched the data yet.
    let a = rt.actor(Worker::default)?;
    a.call(Worker::inc, ())?.get()?;
    let mut local = vec![local_sum()?];
    let first = actor_sum(&a)?;
    local.push(local_sum()?);
    // Steady state: local and actor sums interleaved, so both see the same machine.
    let mut steady = Vec::new();
    for _ in 0..k.reps {
        local.push(local_sum()?);
        steady.push(actor_sum(&a)?);
    }
    emit(&format!("sum_local{sfx}"), median(local));
    emit(&format!("actor_sum_first{sfx}"), first);
    emit(&format!("actor_sum_steady{sfx}"), median(steady));
    rt.kill(&a)?;
    Ok(())
}

fn create(rt: &trove::Runtime, k: &Knobs) -> anyhow::Result<()> {
    let n = if k.quick { 5 } else { 20 };
    let mut v = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let a = rt.actor(Worker::default)?;
        a.call(Worker::inc, ())?.get()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
        rt.kill(&a)?;
    }
    emit("actor_create_first_call", median(v));
    Ok(())
}

/// Memory of process `pid` that no other process shares (Private_Clean + Private_Dirty of
/// `/proc/<pid>/smaps_rollup`), and its proportional share (Pss), in MiB.
fn unique_memory(pid: i32) -> anyhow::Result<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let kib = |key: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let uss = kib("Private_Clean:") + kib("Private_Dirty:");
    Ok((uss / 1024.0, kib("Pss:") / 1024.0))
}

/// Actors at scale: how long it takes to start 1,000 actors (each until its first call
/// returned), how many could live at once, and what one idle actor costs in memory.
fn actors_many(rt: &trove::Runtime, k: &Knobs) -> anyhow::Result<()> {
    let n = if k.quick { 100 } else { 1000 };
    let t = Instant::now();
    let mut actors = Vec::with_capacity(n);
    let mut first = Vec::with_capacity(n);
    for _ in 0..n {
        match rt.actor(Worker::default).and_then(|a| {
            let r = a.call(Worker::inc, ())?;
            Ok((a, r))
        }) {
            Ok((a, r)) => {
                actors.push(a);
                first.push(r);
            }
            Err(e) => {
                eprintln!("actor {} of {n}: {e}", actors.len() + 1);
                break;
            }
        }
    }
    let mut answered = 0;
    for r in &first {
        if r.get_timeout(Duration::from_secs(60)).is_ok() {
            answered += 1;
        }
    }
    let took = t.elapsed().as_secs_f64();
    emit("actors_alive", answered as f64);
    if answered == n {
        emit("actors_1000_start_s", took * 1000.0 / n as f64);
    }
    emit("actor_start_each_ms", took * 1e3 / answered.max(1) as f64);
    // Idle for a moment (their first page faults done), then a sample's own memory.
    std::thread::sleep(Duration::from_millis(300));
    let sample: Vec<(f64, f64)> = actors
        .iter()
        .step_by((actors.len() / 20).max(1))
        .filter_map(|a| unique_memory(a.pid()).ok())
        .collect();
    emit(
        "actor_idle_uss",
        median(sample.iter().map(|m| m.0).collect()),
    );
    emit(
        "actor_idle_pss",
        median(sample.iter().map(|m| m.1).collect()),
    );
    drop(first);
    drop(actors);
    Ok(())
}

fn sync(rt: &trove::Runtime, k: &Knobs, name: &str) -> anyhow::Result<()> {
    let a = rt.actor(Worker::default)?;
    warm_up(&a)?;
    let actor_pid = a.pid().to_string();
    let store = rt.embedded_store_pid().map(|p| p.to_string());
    if name == "sync" {
        // Idle: what driver + actor (and the store) burn while nothing is asked of them.
        let idle = Duration::from_millis(500);
        let (d0, a0) = (cpu_seconds("self")?, cpu_seconds(&actor_pid)?);
        let s0 = store.as_deref().map(cpu_seconds).transpose()?;
        std::thread::sleep(idle);
        let (d1, a1) = (cpu_seconds("self")?, cpu_seconds(&actor_pid)?);
        emit(
            "idle_cpu_per_s",
            (d1 - d0 + a1 - a0) * 1e3 / idle.as_secs_f64(),
        );
        if let (Some(s0), Some(pid)) = (s0, store.as_deref()) {
            emit(
                "idle_store_cpu_per_s",
                (cpu_seconds(pid)? - s0) * 1e3 / idle.as_secs_f64(),
            );
        }
    }
    let (d0, a0) = (cpu_seconds("self")?, cpu_seconds(&actor_pid)?);
    let s0 = store.as_deref().map(cpu_seconds).transpose()?;
    let t = Instant::now();
    let mut n = 0u64;
    while n < 1_000 || t.elapsed() < k.span {
        for _ in 0..1_000 {
            black_box(*a.call(Worker::inc, ())?.get()?);
        }
        n += 1_000;
    }
    let wall = t.elapsed().as_secs_f64();
    let (d1, a1) = (cpu_seconds("self")?, cpu_seconds(&actor_pid)?);
    emit(name, n as f64 / wall);
    if name == "sync" {
        let per_k = 1_000.0 / n as f64;
        emit("sync_cpu_per_1k", (d1 - d0 + a1 - a0) * 1e3 * per_k);
        emit("sync_wall_per_1k", wall * 1e3 * per_k);
        if let (Some(s0), Some(pid)) = (s0, store.as_deref()) {
            emit(
                "sync_store_cpu_per_1k",
                (cpu_seconds(pid)? - s0) * 1e3 * per_k,
            );
        }
    }
    rt.kill(&a)?;
    Ok(())
}

fn async_calls(rt: &trove::Runtime, k: &Knobs) -> anyhow::Result<()> {
    let a = rt.actor(Worker::default)?;
    warm_up(&a)?;
    let r = rate(k.span, 10_000, || {
        let refs: Vec<_> = (0..10_000)
            .map(|_| a.call(Worker::inc, ()))
            .collect::<Result<_, _>>()?;
        black_box(rt.get_all(&refs)?);
        Ok(())
    })?;
    emit("async_get_all", r);
    rt.kill(&a)?;
    Ok(())
}

fn one_to_n(rt: &trove::Runtime, k: &Knobs) -> anyhow::Result<()> {
    let actors: Vec<_> = (0..4 * cores())
        .map(|_| rt.actor(Worker::default))
        .collect::<Result<_, _>>()?;
    for a in &actors {
        warm_up(a)?;
    }
    let r = rate(k.span, 10_000, || {
        let refs: Vec<_> = (0..10_000)
            .map(|i| actors[i % actors.len()].call(Worker::inc, ()))
            .collect::<Result<_, _>>()?;
        black_box(rt.get_all(&refs)?);
        Ok(())
    })?;
    emit("one_to_n_async", r);
    for a in &actors {
        rt.kill(a)?;
    }
    Ok(())
}

fn round_robin(rt: &trove::Runtime, k: &Knobs) -> anyhow::Result<()> {
    let actors: Vec<_> = (0..8)
        .map(|_| rt.actor(Worker::default))
        .collect::<Result<_, _>>()?;
    for a in &actors {
        warm_up(a)?;
    }
    // Idle long enough for every actor to park.
    std::thread::sleep(Duration::from_millis(100));
    let r = rate(k.span, 800, || {
        for i in 0..800 {
            black_box(*actors[i % 8].call(Worker::inc, ())?.get()?);
        }
        Ok(())
    })?;
    emit("round_robin_8", r);
    for a in &actors {
        rt.kill(a)?;
    }
    Ok(())
}

fn tasks(rt: &trove::Runtime, k: &Knobs) -> anyhow::Result<()> {
    // Warm-up: every worker has run tasks.
    let refs: Vec<_> = (0..10_000u64)
        .map(|i| rt.spawn(add_one, (i,)))
        .collect::<Result<_, _>>()?;
    rt.get_all(&refs)?;
    let r = rate(k.span, 1_000, || {
        for i in 0..1_000u64 {
            black_box(*rt.spawn(add_one, (i,))?.get()?);
        }
        Ok(())
    })?;
    emit("task_sync", r);
    let r = rate(k.span, 10_000, || {
        let refs: Vec<_> = (0..10_000u64)
            .map(|i| rt.spawn(add_one, (i,)))
            .collect::<Result<_, _>>()?;
        black_box(rt.get_all(&refs)?);
        Ok(())
    })?;
    emit("task_async", r);
    Ok(())
}

/// A shared anonymous page, mapped before fork so both processes see the same memory.
struct SharedPage(std::ptr::NonNull<std::ffi::c_void>);

impl SharedPage {
    fn new() -> anyhow::Result<SharedPage> {
        use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous};
        // SAFETY: a fresh anonymous mapping at an address the kernel picks; nothing else refers
        // to it.
        let p = unsafe {
            mmap_anonymous(
                None,
                NonZeroUsize::new(4096).expect("nonzero"),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )?
        };
        Ok(SharedPage(p))
    }
    /// The `i`-th word, on its own cache line.
    fn word(&self, i: usize) -> &AtomicU32 {
        assert!(i < 4096 / 64);
        // SAFETY: the page is mapped, zero-initialised, page-aligned and lives as long as
        // `self`; offset `64 * i` is inside it and 4-aligned; it is only accessed atomically.
        unsafe { &*(self.0.as_ptr().cast::<u8>().add(64 * i).cast::<AtomicU32>()) }
    }
}

impl Drop for SharedPage {
    fn drop(&mut self) {
        // SAFETY: the mapping of `new`, no longer referenced (`word` borrows `self`).
        let _ = unsafe { nix::sys::mman::munmap(self.0, 4096) };
    }
}

/// The reference ping-pongs between two processes (this one has no threads: no trove here).
/// The spinning one busy-waits on a shared word; the futex one always sleeps in the kernel.
fn pingpong(k: &Knobs, which: &[(bool, &str)]) -> anyhow::Result<()> {
    use nix::sys::wait::waitpid;
    use nix::unistd::{ForkResult, fork};
    use rustix::thread::futex;

    for &(futexes, name) in which {
        let page = SharedPage::new()?;
        let (seq, stop) = (page.word(0), page.word(1));
        let timeout = futex::Timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        // SAFETY: this figure's process is single-threaded (it never calls trove::init nor
        // starts a thread), so the child may run anything.
        match unsafe { fork() }? {
            ForkResult::Child => {
                // Answers every odd value with the next even one until told to stop.
                loop {
                    if stop.load(Ordering::Acquire) != 0 {
                        std::process::exit(0);
                    }
                    let v = seq.load(Ordering::Acquire);
                    if v % 2 == 1 {
                        seq.store(v + 1, Ordering::Release);
                        if futexes {
                            let _ = futex::wake(seq, futex::Flags::empty(), 1);
                        }
                    } else if futexes {
                        let _ = futex::wait(seq, futex::Flags::empty(), v, Some(&timeout));
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
            ForkResult::Parent { child } => {
                let t = Instant::now();
                let mut n = 0u32;
                let mut failed = false;
                while n < 1_000 || t.elapsed() < k.span {
                    for _ in 0..256 {
                        let odd = 2 * n + 1;
                        seq.store(odd, Ordering::Release);
                        if futexes {
                            let _ = futex::wake(seq, futex::Flags::empty(), 1);
                        }
                        let t1 = Instant::now();
                        while seq.load(Ordering::Acquire) == odd {
                            if t1.elapsed() > Duration::from_secs(5) {
                                failed = true;
                                break;
                            }
                            if futexes {
                                let _ =
                                    futex::wait(seq, futex::Flags::empty(), odd, Some(&timeout));
                            } else {
                                std::hint::spin_loop();
                            }
                        }
                        n += 1;
                    }
                    if failed {
                        break;
                    }
                }
                let per_s = n as f64 / t.elapsed().as_secs_f64();
                stop.store(1, Ordering::Release);
                seq.store(u32::MAX, Ordering::Release);
                let _ = futex::wake(seq, futex::Flags::empty(), 1);
                waitpid(child, None)?;
                if failed {
                    bail!("the ping-pong partner stopped answering");
                }
                emit(name, per_s);
            }
        }
    }
    Ok(())
}

// ---- the driver ----

/// How a figure is judged.
enum Goal {
    /// A reference figure (no goal of its own).
    Reference,
    /// Informational.
    None,
    /// No goal; shown as a ratio of the named figure.
    RatioOf(&'static str),
    /// At least this many units.
    AtLeast(f64),
    /// At most this many units.
    AtMost(f64),
    /// At least `factor` x the named reference figure.
    AtLeastOf(f64, &'static str),
    /// At most `factor` x the named reference figure.
    AtMostOf(f64, &'static str),
}

/// Every figure: name, unit, goal, in print order.
const FIGURES: &[(&str, &str, Goal)] = &[
    ("memcpy_cold", "GB/s", Goal::Reference),
    ("memcpy_warm", "GB/s", Goal::Reference),
    ("populate_cold", "GB/s", Goal::Reference),
    ("put_1GiB_fits_default", "bool", Goal::AtLeast(1.0)),
    ("put_cold", "GB/s", Goal::AtLeastOf(0.5, "memcpy_warm")),
    ("put_cold", "GB/s", Goal::RatioOf("populate_cold")),
    ("put_warm", "GB/s", Goal::AtLeastOf(0.9, "memcpy_warm")),
    ("get_other_first", "us", Goal::None),
    ("get_other", "us", Goal::AtMost(1.0)),
    ("sum_local", "ms", Goal::Reference),
    ("actor_sum_first", "ms", Goal::AtMostOf(1.2, "sum_local")),
    ("actor_sum_steady", "ms", Goal::AtMostOf(1.05, "sum_local")),
    ("actor_create_first_call", "ms", Goal::None),
    // 0: the machine has no huge pages (not measured); 1: the pool; 2: transparent ones.
    ("huge_pages_put_huge", "kind", Goal::None),
    ("huge_pages_actor_sum_huge", "kind", Goal::None),
    ("put_cold_huge", "GB/s", Goal::AtLeastOf(0.5, "memcpy_warm")),
    ("put_warm_huge", "GB/s", Goal::AtLeastOf(0.9, "memcpy_warm")),
    ("sum_local_huge", "ms", Goal::Reference),
    (
        "actor_sum_first_huge",
        "ms",
        Goal::AtMostOf(1.2, "sum_local_huge"),
    ),
    (
        "actor_sum_steady_huge",
        "ms",
        Goal::AtMostOf(1.05, "sum_local_huge"),
    ),
    ("spin_pingpong", "1/s", Goal::Reference),
    ("futex_pingpong", "1/s", Goal::Reference),
    ("sync", "1/s", Goal::AtLeast(1.5e6)),
    ("sync", "1/s", Goal::AtLeastOf(0.5, "spin_pingpong")),
    // CPU (driver + actor) over wall time: ~1 when the two hand off, ~2 when both spin.
    ("sync_cpu_per_1k", "ms", Goal::RatioOf("sync_wall_per_1k")),
    ("sync_wall_per_1k", "ms", Goal::Reference),
    ("sync_store_cpu_per_1k", "ms", Goal::None),
    ("idle_cpu_per_s", "ms/s", Goal::None),
    ("idle_store_cpu_per_s", "ms/s", Goal::None),
    ("sync_oversub", "1/s", Goal::AtLeast(0.5e6)),
    ("async_get_all", "1/s", Goal::AtLeast(2e6)),
    ("one_to_n_async", "1/s", Goal::AtLeast(1e6)),
    ("futex_pingpong_rr", "1/s", Goal::Reference),
    (
        "round_robin_8",
        "1/s",
        Goal::AtLeastOf(0.8, "futex_pingpong_rr"),
    ),
    ("task_sync", "1/s", Goal::AtLeast(300e3)),
    ("task_async", "1/s", Goal::AtLeast(1e6)),
    ("actors_alive", "actors", Goal::AtLeast(1000.0)),
    ("actors_1000_start_s", "s", Goal::None),
    ("actor_start_each_ms", "ms", Goal::None),
    ("actor_idle_uss", "MiB", Goal::AtMost(2.0)),
    ("actor_idle_pss", "MiB", Goal::None),
];

/// Runs one figure group in a fresh process; returns its figures.
fn run_group(group: &str, quick: bool) -> anyhow::Result<Vec<(String, f64)>> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.env(FIGURE_ENV, group)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    if quick {
        cmd.env(QUICK_ENV, "1");
    }
    match group {
        // The plain default (`trove::default_memory()` unless TROVE_MEMORY says): does a 1 GiB
        // object fit?
        "put_fits" => {
            cmd.env_remove("TROVE_MEMORY");
        }
        // A 1 GiB object needs a store larger than 1 GiB: still `Config::default()`, sized the
        // way a user sizes it (TROVE_MEMORY), unless the caller set it. On huge pages the whole
        // store comes from the pool (or is transparent huge pages), so those groups are sized
        // the same: 937 pool pages for the arena, not 30% of the machine's memory.
        "put" | "get_other" | "put_huge" | "actor_sum_huge"
            if std::env::var_os("TROVE_MEMORY").is_none() =>
        {
            cmd.env("TROVE_MEMORY", BIG_STORE);
        }
        _ => {}
    }
    // Its own process group: its store, zygote and actors inherit it, so that the next group
    // starts once all of them are gone (see `settle`).
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let pid = child.id();
    // Bound the child: a watchdog thread kills it (by its pid) past the limit.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(CHILD_LIMIT).is_err() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    });
    let mut figures = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let mut w = line.split_whitespace();
        if w.next() == Some("@")
            && let (Some(name), Some(v)) = (w.next(), w.next())
        {
            figures.push((name.to_string(), v.parse::<f64>()?));
        }
    }
    let status = child.wait()?;
    let _ = done_tx.send(());
    let _ = watchdog.join();
    settle(pid);
    if !status.success() {
        bail!("figure group {group} failed ({status})");
    }
    Ok(figures)
}

/// Waits (at most 10 s) until no process of the group `pgid` is left: a group's store frees
/// its arena as it exits, and the next group measured meanwhile would share the cores with
/// that (1:n async right after another group: 0.82-0.94 M/s; 3 s later: 0.94-1.07 M/s).
fn settle(pgid: u32) {
    let group = nix::unistd::Pid::from_raw(-(pgid as i32));
    let until = Instant::now() + Duration::from_secs(10);
    while nix::sys::signal::kill(group, None).is_ok() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn fmt_value(v: f64) -> String {
    if v.abs() >= 1e5 {
        format!("{v:.3e}")
    } else {
        format!("{v:.3}")
    }
}

/// In a figure group's process (the program re-executed with `TROVE_USER_PATH_FIGURE`):
/// measures the group, prints its `@ name value` lines and exits. Otherwise returns at once.
/// Call it first thing in `main`, before any thread (the group calls `trove::init`).
pub fn run_group_if_asked() {
    let Ok(group) = std::env::var(FIGURE_ENV) else {
        return;
    };
    let quick = std::env::var_os(QUICK_ENV).is_some();
    let k = Knobs {
        quick,
        reps: if quick { 3 } else { 7 },
        span: Duration::from_millis(if quick { 300 } else { 2_000 }),
    };
    if let Err(e) = child(&group, &k) {
        eprintln!("user_paths: figure group {group}: {e:#}");
        std::process::exit(1);
    }
    std::process::exit(0);
}

/// Runs every figure group, each in a fresh process of this program, and writes one line per
/// figure to `out` (`name value unit (goal, ratio, met)`, or JSON objects with `json`).
pub fn run(quick: bool, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut got: BTreeMap<String, f64> = BTreeMap::new();
    let mut failed = Vec::new();
    for group in GROUPS {
        if !json {
            eprint!("\r\x1b[K  running {group} ...");
        }
        match run_group(group, quick) {
            Ok(f) => got.extend(f),
            Err(e) => {
                eprintln!("\r\x1b[K  {e:#}");
                failed.push(*group);
            }
        }
    }
    if !json {
        eprintln!("\r\x1b[K");
    }
    for (name, unit, goal) in FIGURES {
        let Some(&v) = got.get(*name) else {
            continue;
        };
        let judged = |limit: f64, at_least: bool, text: String| {
            let ratio = v / limit;
            let met = if at_least { v >= limit } else { v <= limit };
            (Some(text), Some(ratio), Some(met))
        };
        let (goal_text, ratio, met) = match goal {
            Goal::Reference => (Some("reference".to_string()), None, None),
            Goal::None => (None, None, None),
            Goal::RatioOf(r) => (None, got.get(*r).map(|rv| v / rv), None),
            Goal::AtLeast(g) => judged(*g, true, format!(">= {}", fmt_value(*g))),
            Goal::AtMost(g) => judged(*g, false, format!("<= {}", fmt_value(*g))),
            Goal::AtLeastOf(f, r) | Goal::AtMostOf(f, r) => match got.get(*r) {
                Some(&rv) => {
                    let at_least = matches!(goal, Goal::AtLeastOf(..));
                    let (g, ratio, met) = judged(
                        f * rv,
                        at_least,
                        format!("{} {f} x {r}", if at_least { ">=" } else { "<=" }),
                    );
                    // The ratio against the reference itself, as the goals state it.
                    (g, ratio.map(|x| x * f), met)
                }
                None => (Some(format!("{f} x {r} (missing)")), None, None),
            },
        };
        if json {
            let s = |o: Option<String>| o.map_or("null".into(), |s| format!("\"{s}\""));
            let n = |o: Option<f64>| o.map_or("null".into(), |x| format!("{x}"));
            let b = |o: Option<bool>| o.map_or("null".into(), |x| x.to_string());
            writeln!(
                out,
                "{{\"name\": \"{name}\", \"value\": {v}, \"unit\": \"{unit}\", \"goal\": {}, \
                 \"ratio\": {}, \"met\": {}}}",
                s(goal_text),
                n(ratio),
                b(met)
            )?;
        } else {
            let mut extra = Vec::new();
            if let Some(g) = goal_text {
                extra.push(format!("goal {g}"));
            }
            if let Some(r) = ratio {
                extra.push(format!("ratio {r:.3}"));
            }
            if let Some(m) = met {
                extra.push(if m { "met".into() } else { "MISSED".into() });
            }
            let extra = if extra.is_empty() {
                String::new()
            } else {
                format!("({})", extra.join(", "))
            };
            writeln!(out, "{name:<26} {:>12} {unit:<5} {extra}", fmt_value(v))?;
        }
    }
    if !json
        && ["huge_pages_put_huge", "huge_pages_actor_sum_huge"]
            .iter()
            .any(|k| got.get(*k) == Some(&0.0))
    {
        writeln!(
            out,
            "(a huge_pages_* of 0: that group's figures were not measured, the machine had no \
             huge pages for its store; `sysctl vm.nr_hugepages=N`, or shared memory THP in \
             `advise` mode)"
        )?;
    }
    if !json {
        eprintln!(
            "  {} groups in {:.1} s{}",
            GROUPS.len(),
            started.elapsed().as_secs_f64(),
            if failed.is_empty() {
                String::new()
            } else {
                format!("; failed: {}", failed.join(", "))
            }
        );
    }
    if !failed.is_empty() {
        bail!("figure groups failed: {}", failed.join(", "));
    }
    Ok(())
}

/// `cargo bench --bench user_paths [-- --quick] [-- --json]` (`trove bench` runs the same).
#[allow(dead_code)] // In the `trove` binary, which includes this file, `trove bench` calls `run`.
fn main() {
    run_group_if_asked();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let quick = args.iter().any(|a| a == "--quick");
    if let Err(e) = run(quick, json, &mut std::io::stdout().lock()) {
        eprintln!("user_paths: {e:#}");
        std::process::exit(1);
    }
}
