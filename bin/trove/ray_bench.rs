//! `trove bench --ray`: the workloads of Ray's `ray microbenchmark`
//! (`python/ray/_private/ray_perf.py`), under Ray's own line names, so that the two can be run
//! side by side on one machine and compared line by line.
//!
//! Each line follows Ray's pattern as closely as trove allows: the same values (a small
//! integer put, a `b"ok"` returned), the same batch sizes and the same multipliers (Ray counts
//! 0.8 "gigabytes" for a put of 100 Mi `i64`s, 838.9 MB, and so does this). "Multi client"
//! means several processes: Ray's remote functions are trove tasks on the worker pool, Ray's
//! actors trove actors (both reach the runtime with `trove::runtime()`). Ray's
//! `timeit` is followed too: about a second of warm-up, then 4 rounds of at least 2 s (calls
//! in steps of a tenth of the warm-up's count), each round's rate times the multiplier, printed
//! as mean and standard deviation. Ray sleeps 10 s before each line; this waits once, before
//! the first, for the store's background pre-fault to end.
//!
//! The store is started as a user's `Config::default()` starts it (no pre-faulting; the
//! warm-up touches what the line needs, as Ray's does). A line trove cannot express is printed
//! as "n/a" with the reason, never approximated. Beside each line: the figure Ray's
//! microbenchmark gave on the 2-core VM of issue 16, and this run's ratio to it.
//!
//! As in Ray, `TESTS_TO_RUN=pattern` runs only the lines whose name contains `pattern`, and
//! `TESTS_TO_SKIP=pattern` skips those that do (the others are not printed).
//!
//! `--quick` is a smoke run, not a measurement: one warm-up call and 2 rounds of 50 ms, and
//! the lines whose multiplier counts the work (multi client put gigabytes, multi client tasks
//! async, 1:n and n:n actor calls) do a tenth of Ray's work per call; the lines that count
//! whole batches keep Ray's batch sizes.

use std::hint::black_box;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use trove::{ActorHandle, ObjectRef, Runtime};

use crate::bench::{Report, progress};

/// The runtime of the process a task or an actor method runs in (the driver's, in the driver).
fn here() -> trove::Result<Runtime> {
    trove::runtime()
}

/// Ray's `Actor`: `small_value`, `small_value_arg`, `small_value_batch`.
#[derive(Default)]
struct Actor;

impl Actor {
    fn small_value(&mut self) -> Vec<u8> {
        b"ok".to_vec()
    }

    /// `small_value` as a `&self` method: on a threaded actor, calls run beside each other
    /// (Ray's Python methods all may, under `max_concurrency`).
    fn small_value_shared(&self) -> Vec<u8> {
        b"ok".to_vec()
    }

    /// Ray resolves a ref passed as an argument before the method runs; so does this (a
    /// zero-copy get in the actor).
    fn small_value_arg(&mut self, x: ObjectRef<u64>) -> trove::Result<Vec<u8>> {
        black_box(x.get()?.to_native());
        Ok(b"ok".to_vec())
    }

    /// `n` tasks submitted from this actor, then all their values got.
    fn small_value_batch(&mut self, n: u64) -> trove::Result<()> {
        let refs = (0..n)
            .map(|_| here()?.spawn(small_value, ()))
            .collect::<trove::Result<Vec<_>>>()?;
        black_box(here()?.get_all(&refs)?);
        Ok(())
    }
}

/// Ray's `Client`: an actor that calls other actors.
struct Client {
    servers: Vec<ActorHandle<Actor>>,
}

impl Client {
    fn new(servers: Vec<ActorHandle<Actor>>) -> Client {
        Client { servers }
    }

    /// `n` calls to each server, then all their values got.
    fn small_value_batch(&mut self, n: u64) -> trove::Result<()> {
        let mut refs = Vec::with_capacity(n as usize * self.servers.len());
        for s in &self.servers {
            for _ in 0..n {
                refs.push(s.call(Actor::small_value, ())?);
            }
        }
        black_box(here()?.get_all(&refs)?);
        Ok(())
    }

    /// As `small_value_batch`, each call passed a ref to one small object put first.
    fn small_value_batch_arg(&mut self, n: u64) -> trove::Result<()> {
        let rt = here()?;
        let x = rt.put(&0u64)?;
        let mut refs = Vec::with_capacity(n as usize * self.servers.len());
        for s in &self.servers {
            for _ in 0..n {
                refs.push(s.call(Actor::small_value_arg, (x.clone(),))?);
            }
        }
        black_box(rt.get_all(&refs)?);
        Ok(())
    }
}

/// Ray's remote `small_value`.
fn small_value() -> Vec<u8> {
    b"ok".to_vec()
}

/// Ray's `do_put_small` (`puts` small puts from a task; 100 in Ray).
fn do_put_small(puts: u64) -> trove::Result<()> {
    let rt = here()?;
    for _ in 0..puts {
        black_box(rt.put(&0u64)?);
    }
    Ok(())
}

/// Ray's `do_put` (`puts` puts of a fresh zeroed array of 10 Mi `i64`s, 80 MiB; 10 in Ray).
fn do_put(puts: u64) -> trove::Result<()> {
    let rt = here()?;
    for _ in 0..puts {
        black_box(rt.put_slice(&vec![0i64; 10 << 20])?);
    }
    Ok(())
}

/// Ray's `create_object_containing_ref`: `n` small objects put, their refs returned.
fn create_object_containing_ref(n: u64) -> trove::Result<Vec<ObjectRef<u64>>> {
    let rt = here()?;
    (0..n).map(|_| rt.put(&1u64)).collect()
}

/// Ray's `work` of "n:n actor calls async": `n` calls spread round robin over `actors`, then
/// all their values got.
fn work(actors: Vec<ActorHandle<Actor>>, n: u64) -> trove::Result<()> {
    let refs = (0..n as usize)
        .map(|i| actors[i % actors.len()].call(Actor::small_value, ()))
        .collect::<trove::Result<Vec<_>>>()?;
    black_box(here()?.get_all(&refs)?);
    Ok(())
}

/// Ray's figures on the 2-core VM of issue 16 (per second; GB/s for gigabytes).
fn ray_reference(line: &str) -> Option<f64> {
    Some(match line {
        "single client get calls (Plasma Store)" => 10_300.0,
        "single client put calls (Plasma Store)" => 2_000.0,
        "single client put gigabytes" => 2.2,
        "single client tasks sync" => 520.0,
        "single client tasks async" => 1_800.0,
        "1:1 actor calls sync" => 1_100.0,
        "1:1 actor calls async" => 4_700.0,
        "1:n actor calls async" => 3_900.0,
        "n:n actor calls async" => 4_600.0,
        _ => return None,
    })
}

const PER_SECOND: &str = "per second";
const GBPS: &str = "GB/s";

const NO_ASYNC_ACTORS: &str = "trove has no async actors";
const NO_RAY_CLIENT: &str = "Ray Client (a remote driver over gRPC): trove has no remote driver";

/// How long each line runs (Ray's `timeit`).
struct Timing {
    /// At least one call, then calls until this has passed.
    warmup: Duration,
    rounds: usize,
    /// Each round runs steps of calls until this has passed.
    round: Duration,
}

struct Lines<'r, 'o> {
    report: &'r mut Report<'o>,
    json: bool,
    timing: Timing,
    /// Ray's `TESTS_TO_RUN` and `TESTS_TO_SKIP` (empty: no filter).
    run_only: String,
    skip: String,
}

impl Lines<'_, '_> {
    /// Whether the line `name` is to run (Ray's filters).
    fn wanted(&self, name: &str) -> bool {
        (self.run_only.is_empty() || name.contains(&self.run_only))
            && (self.skip.is_empty() || !name.contains(&self.skip))
    }

    /// Ray's `timeit(name, fn, multiplier)`: the line's rate is `multiplier` per call of `f`.
    fn timeit(
        &mut self,
        name: &str,
        unit: &'static str,
        multiplier: f64,
        mut f: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        if !self.wanted(name) {
            return Ok(());
        }
        progress(self.json, name);
        let mut call = || f().with_context(|| format!("\"{name}\""));
        let start = Instant::now();
        let mut count = 0u64;
        loop {
            call()?;
            count += 1;
            if start.elapsed() >= self.timing.warmup {
                break;
            }
        }
        let step = count / 10 + 1;
        let mut stats = Vec::with_capacity(self.timing.rounds);
        for _ in 0..self.timing.rounds {
            let t = Instant::now();
            let mut calls = 0u64;
            while t.elapsed() < self.timing.round {
                for _ in 0..step {
                    call()?;
                }
                calls += step;
            }
            stats.push(multiplier * calls as f64 / t.elapsed().as_secs_f64());
        }
        let mean = stats.iter().sum::<f64>() / stats.len() as f64;
        // numpy's std (population), as Ray prints it.
        let sd =
            (stats.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / stats.len() as f64).sqrt();
        let ray = ray_reference(name);
        let mut extra = vec![("sd", sd)];
        if let Some(ray) = ray {
            extra.extend([("ray", ray), ("ratio", mean / ray)]);
        }
        let note = note(
            &format!("± {sd:.2}"),
            &ray.map_or(String::new(), |r| human(r, unit)),
            &ray.map_or(String::new(), |r| format!("{:.1} x", mean / r)),
        );
        self.report
            .add_row(name, Some(mean), unit, note, &extra)
            .map_err(Into::into)
    }

    /// A line trove cannot express: "n/a" and the reason.
    fn na(&mut self, name: &str, reason: &str) -> anyhow::Result<()> {
        if !self.wanted(name) {
            return Ok(());
        }
        let unit = if name.contains("gigabytes") {
            GBPS
        } else {
            PER_SECOND
        };
        self.report
            .add_row(name, None, unit, reason.to_string(), &[])
            .map_err(Into::into)
    }
}

/// The last column: the spread, Ray's figure, the ratio (aligned with [`TITLE`]).
fn note(sd: &str, ray: &str, ratio: &str) -> String {
    format!("{sd:<14} {ray:>10} {ratio:>10}")
        .trim_end()
        .to_string()
}

/// Ray's figure as issue 16 gives it: "2.0 k" per second, "520", "2.2" GB/s.
fn human(v: f64, unit: &str) -> String {
    if unit == GBPS {
        format!("{v:.1}")
    } else if v >= 1_000.0 {
        format!("{:.1} k", v / 1_000.0)
    } else {
        format!("{v:.0}")
    }
}

/// Runs Ray's lines in Ray's order; prints the table (or JSON lines).
pub fn run(rt: &Runtime, quick: bool, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut report = Report::new(
        out,
        json,
        ("ray microbenchmark line", note("± sd", "Ray here", "ratio")),
    );
    let timing = if quick {
        Timing {
            warmup: Duration::ZERO,
            rounds: 2,
            round: Duration::from_millis(50),
        }
    } else {
        Timing {
            warmup: Duration::from_secs(1),
            rounds: 4,
            round: Duration::from_secs(2),
        }
    };
    let mut l = Lines {
        report: &mut report,
        json,
        timing,
        run_only: std::env::var("TESTS_TO_RUN").unwrap_or_default(),
        skip: std::env::var("TESTS_TO_SKIP").unwrap_or_default(),
    };
    // The share of Ray's work the work-counting lines do per call (see the module's doc).
    let scale = if quick { 10 } else { 1 };
    // Ray's `multiprocessing.cpu_count() // 2` (at least one).
    let n_cpu = (std::thread::available_parallelism().map_or(2, |n| n.get()) / 2).max(1);

    if !quick {
        settle(rt, json);
    }
    let value = rt.put(&0u64)?;
    l.timeit(
        "single client get calls (Plasma Store)",
        PER_SECOND,
        1.0,
        || {
            black_box(value.get()?.to_native());
            Ok(())
        },
    )?;
    drop(value);

    l.timeit(
        "single client put calls (Plasma Store)",
        PER_SECOND,
        1.0,
        || {
            black_box(rt.put(&0u64)?);
            Ok(())
        },
    )?;

    l.timeit(
        "multi client put calls (Plasma Store)",
        PER_SECOND,
        1000.0,
        || {
            let refs = (0..10)
                .map(|_| rt.spawn(do_put_small, (100,)))
                .collect::<trove::Result<Vec<_>>>()?;
            rt.get_all(&refs)?;
            Ok(())
        },
    )?;

    // np.zeros(100 * 1024 * 1024, dtype=np.int64): calloc'd and never written, as numpy's
    // is, so on both sides the copy reads the kernel's shared zero page (cache-hot) and the
    // figure is the write side's bandwidth (`trove bench`'s put_1GiB reads a written source).
    let arr = vec![0i64; 100 << 20];
    l.timeit("single client put gigabytes", GBPS, 8.0 * 0.1, || {
        black_box(rt.put_slice(&arr)?);
        Ok(())
    })?;
    drop(arr);

    l.timeit("single client tasks and get batch", PER_SECOND, 1.0, || {
        let refs = (0..1000)
            .map(|_| rt.spawn(small_value, ()))
            .collect::<trove::Result<Vec<_>>>()?;
        black_box(rt.get_all(&refs)?);
        Ok(())
    })?;

    let puts = 10 / scale;
    l.timeit(
        "multi client put gigabytes",
        GBPS,
        10.0 * puts as f64 * 0.08,
        || {
            let refs = (0..10)
                .map(|_| rt.spawn(do_put, (puts,)))
                .collect::<trove::Result<Vec<_>>>()?;
            rt.get_all(&refs)?;
            Ok(())
        },
    )?;

    let containing = rt.spawn(create_object_containing_ref, (10_000,))?;
    l.timeit(
        "single client get object containing 10k refs",
        PER_SECOND,
        1.0,
        || {
            // Ray's get deserialises the list: 10k refs, each taking a reference.
            black_box(containing.deserialize()?);
            Ok(())
        },
    )?;
    drop(containing);

    l.na(
        "single client object out-of-scope callback registration",
        "trove has no out-of-scope callbacks",
    )?;
    l.na(
        "object out-of-scope callback fire 1k batch",
        "trove has no out-of-scope callbacks",
    )?;

    l.timeit("single client wait 1k refs", PER_SECOND, 1.0, || {
        let mut not_ready = (0..1000)
            .map(|_| rt.spawn(small_value, ()))
            .collect::<trove::Result<Vec<_>>>()?;
        for _ in 0..1000 {
            let (_ready, pending) = rt.wait(&not_ready, 1, None)?;
            not_ready = pending;
        }
        Ok(())
    })?;

    l.timeit("single client tasks sync", PER_SECOND, 1.0, || {
        black_box(rt.spawn(small_value, ())?.get()?);
        Ok(())
    })?;

    l.timeit("single client tasks async", PER_SECOND, 1000.0, || {
        let refs = (0..1000)
            .map(|_| rt.spawn(small_value, ()))
            .collect::<trove::Result<Vec<_>>>()?;
        black_box(rt.get_all(&refs)?);
        Ok(())
    })?;

    let (n, m) = (10_000 / scale, 4);
    let actors = (0..m)
        .map(|_| rt.actor(Actor::default))
        .collect::<trove::Result<Vec<_>>>()?;
    l.timeit(
        "multi client tasks async",
        PER_SECOND,
        (n * m) as f64,
        || {
            let refs = actors
                .iter()
                .map(|a| a.call(Actor::small_value_batch, (n,)))
                .collect::<trove::Result<Vec<_>>>()?;
            rt.get_all(&refs)?;
            Ok(())
        },
    )?;
    kill_all(rt, &actors)?;

    let a = rt.actor(Actor::default)?;
    l.timeit("1:1 actor calls sync", PER_SECOND, 1.0, || {
        black_box(a.call(Actor::small_value, ())?.get()?);
        Ok(())
    })?;
    rt.kill(&a)?;

    let a = rt.actor(Actor::default)?;
    l.timeit("1:1 actor calls async", PER_SECOND, 1000.0, || {
        let refs = (0..1000)
            .map(|_| a.call(Actor::small_value, ()))
            .collect::<trove::Result<Vec<_>>>()?;
        black_box(rt.get_all(&refs)?);
        Ok(())
    })?;
    rt.kill(&a)?;

    // Ray: `Actor.options(max_concurrency=16)`, 1,000 calls then all got.
    let a = rt.threaded_actor(&trove::ActorOptions::new(), 16, Actor::default, ())?;
    l.timeit("1:1 actor calls concurrent", PER_SECOND, 1000.0, || {
        let refs = (0..1000)
            .map(|_| a.call(Actor::small_value_shared, ()))
            .collect::<trove::Result<Vec<_>>>()?;
        black_box(rt.get_all(&refs)?);
        Ok(())
    })?;
    rt.kill(&a)?;

    let n = 5000 / scale;
    let actors = (0..n_cpu)
        .map(|_| rt.actor(Actor::default))
        .collect::<trove::Result<Vec<_>>>()?;
    let client = rt.actor_with(Client::new, (actors.clone(),))?;
    l.timeit(
        "1:n actor calls async",
        PER_SECOND,
        (n as usize * actors.len()) as f64,
        || {
            client.call(Client::small_value_batch, (n,))?.get()?;
            Ok(())
        },
    )?;
    rt.kill(&client)?;
    kill_all(rt, &actors)?;

    let actors = (0..n_cpu)
        .map(|_| rt.actor(Actor::default))
        .collect::<trove::Result<Vec<_>>>()?;
    l.timeit("n:n actor calls async", PER_SECOND, (m * n) as f64, || {
        let refs = (0..m)
            .map(|_| rt.spawn(work, (actors.clone(), n)))
            .collect::<trove::Result<Vec<_>>>()?;
        rt.get_all(&refs)?;
        Ok(())
    })?;
    kill_all(rt, &actors)?;

    let n = 1000 / scale;
    let actors = (0..n_cpu)
        .map(|_| rt.actor(Actor::default))
        .collect::<trove::Result<Vec<_>>>()?;
    let clients = actors
        .iter()
        .map(|a| rt.actor_with(Client::new, (vec![a.clone()],)))
        .collect::<trove::Result<Vec<_>>>()?;
    l.timeit(
        "n:n actor calls with arg async",
        PER_SECOND,
        (n as usize * clients.len()) as f64,
        || {
            let refs = clients
                .iter()
                .map(|c| c.call(Client::small_value_batch_arg, (n,)))
                .collect::<trove::Result<Vec<_>>>()?;
            rt.get_all(&refs)?;
            Ok(())
        },
    )?;
    kill_all(rt, &clients)?;
    kill_all(rt, &actors)?;

    for name in [
        "1:1 async-actor calls sync",
        "1:1 async-actor calls async",
        "1:1 async-actor calls with args async",
        "1:n async-actor calls async",
        "n:n async-actor calls async",
    ] {
        l.na(name, NO_ASYNC_ACTORS)?;
    }
    l.na(
        "placement group create/removal",
        "trove has no placement groups (one node, no resources)",
    )?;
    l.na("client: get calls", NO_RAY_CLIENT)?;
    l.na("client: put calls", NO_RAY_CLIENT)?;
    l.na("client: remote put calls", NO_RAY_CLIENT)?;
    l.na("client: 1:1 actor calls sync", NO_RAY_CLIENT)?;
    l.na("client: 1:1 actor calls async", NO_RAY_CLIENT)?;
    l.na("client: 1:1 actor calls concurrent", NO_RAY_CLIENT)?;

    report.table()?;
    report.footnote(&format!(
        "Ray here: `ray microbenchmark` on the 2-core VM of issue 16 (blank: no figure); \
         ratio: this run / Ray (goal: >= 100 x).{}",
        if quick {
            " --quick: a smoke run, not a measurement."
        } else {
            ""
        }
    ))?;
    Ok(())
}

/// Ray sleeps 10 s before each line "to avoid noisy neighbours"; this waits, once, for the
/// embedded store's background pre-fault (its thread, `troved-prefault`) to be done with its
/// head start and asleep (at most 60 s), so that the first lines do not share the cores with
/// it. A store given by `--store` is not looked at.
fn settle(rt: &Runtime, json: bool) {
    let Some(pid) = rt.embedded_store_pid() else {
        return;
    };
    progress(json, "waiting for the store's background pre-fault");
    // Running (or in the kernel populating pages): not asleep, not gone.
    let prefaulting = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "troved-prefault")
                    && std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
                        s.rsplit_once(')')
                            .and_then(|(_, rest)| rest.split_whitespace().next())
                            .is_some_and(|state| matches!(state, "R" | "D"))
                    })
            })
    };
    let start = Instant::now();
    while prefaulting() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill_all<A: 'static>(rt: &Runtime, actors: &[ActorHandle<A>]) -> trove::Result<()> {
    actors.iter().try_for_each(|a| rt.kill(a))
}
