//! `trove stress`: a mixed workload under seeded SIGKILLs, every value checked, every wait
//! bounded, the store's live excess over its baseline measured after every round.
//!
//! The driver runs on an embedded store (or `--store`). Each round it starts actors (some
//! "outer" actors hold an `ActorHandle` of an "inner" one and call it), runs a workload from a
//! few threads (puts small and large, calls with small args, `ObjectRef` args and refs inside
//! args, small and large results, a ref inside a result, tasks, tasks that call actors), and
//! starts client processes (this binary re-executed through /proc/self/exe as `trove
//! stress-client`, connected to the driver's store by its socket path,
//! `StoreClient::socket_path`, with `trove::Config::store`). A killer thread SIGKILLs
//! actors, task workers (children of the zygote that are not actors) and client processes at
//! moments drawn from the seed. After the round everything the round made is dropped, its
//! actors are killed, and the store's used bytes and object count are compared with the
//! baseline taken after `init`, while the driver, the zygote and the workers all still run.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use trove::{ActorHandle, Error, ObjectId, ObjectRef, Runtime};

/// A get that takes longer than this in the driver is a hang.
const GET_BOUND: Duration = Duration::from_secs(15);
/// Gets inside actors and tasks (shorter, so that an inner hang surfaces as a failed call
/// saying "timed out" before the driver's own bound).
const INNER_BOUND: Duration = Duration::from_secs(5);
/// How long the workload of a round runs; kills fall inside it.
const ROUND_WORK: Duration = Duration::from_millis(2000);
/// How long the store may take to come back to its baseline after a round.
const SETTLE: Duration = Duration::from_secs(5);
/// ... or until it has not changed for this long (it will not come back by itself).
const STABLE: Duration = Duration::from_secs(1);
const INNER_ACTORS: usize = 4;
const OUTER_ACTORS: usize = 2;
const ACTOR_KILLS: usize = 3;
const WORKER_KILLS: usize = 2;
const CLIENTS: usize = 2;
const THREADS: usize = 2;
const BATCH: usize = 6;
/// How many hang / wrong-value descriptions are kept for the report.
const KEEP_NOTES: usize = 20;

// ---- values with known contents ----

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Element `i` of the value named `key`.
fn elem(key: u64, i: u64) -> u64 {
    mix(key ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

fn pattern(key: u64, n: u64) -> Vec<u64> {
    (0..n).map(|i| elem(key, i)).collect()
}

/// An order-sensitive checksum.
fn checksum(values: impl Iterator<Item = u64>) -> u64 {
    values.fold(0x5EED, |acc, x| {
        (acc.rotate_left(7) ^ x).wrapping_mul(0x100_0000_01B3)
    })
}

fn expect_sum(key: u64, n: u64) -> u64 {
    checksum((0..n).map(|i| elem(key, i)))
}

fn add_value(a: u64, b: u64) -> u64 {
    a.wrapping_mul(31).wrapping_add(b ^ 0xA5A5)
}

struct Rng(u64, bool);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(mix(seed) | 1, false)
    }
    /// Only large values from [`Rng::len`] (`--large`).
    fn large_only(mut self, yes: bool) -> Rng {
        self.1 = yes;
        self
    }
    fn next(&mut self) -> u64 {
        self.0 = mix(self.0);
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// Element counts: mostly small (an inline result), some medium (KiBs), a few large
    /// (256-512 KiB); with `large_only`, 256 KiB-1 MiB.
    fn len(&mut self) -> u64 {
        if self.1 {
            return (32 << 10) + self.below(96 << 10);
        }
        match self.below(40) {
            0..=19 => 1 + self.below(20),
            20..=38 => 100 + self.below(2000),
            _ => (32 << 10) + self.below(32 << 10),
        }
    }
}

// ---- actors and tasks ----

/// A bundle of refs inside an argument.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Bundle {
    parts: Vec<ObjectRef<[u64]>>,
    salt: u64,
}

#[derive(Default)]
pub struct Inner {
    calls: u64,
}

impl Inner {
    fn add(&mut self, a: u64, b: u64) -> u64 {
        self.calls += 1;
        add_value(a, b)
    }
    fn sum(&mut self, data: ObjectRef<Vec<u64>>) -> trove::Result<u64> {
        self.calls += 1;
        Ok(checksum(
            data.get_timeout(INNER_BOUND)?.iter().map(|x| x.to_native()),
        ))
    }
    fn sum_bundle(&mut self, b: Bundle) -> trove::Result<u64> {
        self.calls += 1;
        let mut sums = vec![b.salt];
        for p in &b.parts {
            sums.push(checksum(p.get_timeout(INNER_BOUND)?.iter().copied()));
        }
        Ok(checksum(sums.into_iter()))
    }
    fn make(&mut self, key: u64, n: u64) -> Vec<u64> {
        self.calls += 1;
        pattern(key, n)
    }
    fn echo(&mut self, data: ObjectRef<Vec<u64>>) -> ObjectRef<Vec<u64>> {
        self.calls += 1;
        data
    }
}

/// An actor that calls another ("nested").
pub struct Outer {
    inner: ActorHandle<Inner>,
}

impl Outer {
    fn new(inner: ActorHandle<Inner>) -> Outer {
        Outer { inner }
    }
    fn relay_add(&mut self, a: u64, b: u64) -> trove::Result<u64> {
        Ok(self
            .inner
            .call(Inner::add, (a, b))?
            .get_timeout(INNER_BOUND)?
            .to_native())
    }
    fn relay_sum(&mut self, data: ObjectRef<Vec<u64>>) -> trove::Result<u64> {
        Ok(self
            .inner
            .call(Inner::sum, (data,))?
            .get_timeout(INNER_BOUND)?
            .to_native())
    }
}

fn task_make(key: u64, n: u64) -> Vec<u64> {
    pattern(key, n)
}

fn task_sum(data: ObjectRef<[u64]>) -> trove::Result<u64> {
    Ok(checksum(data.get_timeout(INNER_BOUND)?.iter().copied()))
}

fn task_call(h: ActorHandle<Inner>, a: u64, b: u64) -> trove::Result<u64> {
    Ok(h.call(Inner::add, (a, b))?
        .get_timeout(INNER_BOUND)?
        .to_native())
}

// ---- kills ----

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KillKind {
    Actor,
    Worker,
    Client,
}

impl KillKind {
    /// Parses `actors,workers,clients` (any subset) or `none`.
    pub fn parse_list(s: &str) -> Result<Vec<KillKind>, String> {
        if s.trim() == "none" {
            return Ok(Vec::new());
        }
        s.split(',')
            .map(|k| match k.trim() {
                "actors" => Ok(KillKind::Actor),
                "workers" => Ok(KillKind::Worker),
                "clients" => Ok(KillKind::Client),
                other => Err(format!(
                    "unknown kill kind {other:?} (actors, workers, clients or none)"
                )),
            })
            .collect()
    }
}

/// What the killer thread did, read by the workload threads when they judge an error.
struct Kills {
    /// Per actor of the round (inner actors first, then outer): set before its SIGKILL.
    actor_killed: Vec<AtomicBool>,
    /// Worker kills begun (counted before the signal) and done (after it).
    worker_begun: AtomicU64,
    worker_done: AtomicU64,
    log: Mutex<Vec<(Duration, KillKind, i32)>>,
}

/// The pid's parent and state, from /proc/<pid>/stat.
fn ppid_state(pid: i32) -> Option<(i32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Live (not zombie) children of `parent`, by scanning /proc (this kernel may not have
/// /proc/<pid>/task/<tid>/children).
fn children(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Some((pp, st)) = ppid_state(pid)
            && pp == parent
            && st != 'Z'
            && st != 'X'
        {
            out.push(pid);
        }
    }
    out
}

// ---- the tally ----

#[derive(Default)]
struct Tally {
    kills_actor: u64,
    kills_worker: u64,
    kills_client: u64,
    calls: u64,
    tasks: u64,
    puts: u64,
    checked: u64,
    expected_failures: u64,
    hangs: u64,
    wrong: u64,
    notes: Vec<String>,
}

impl Tally {
    fn note(&mut self, s: String) {
        if self.notes.len() < KEEP_NOTES {
            self.notes.push(s);
        }
    }
}

/// Whom an operation's answer depends on.
#[derive(Clone, Copy)]
enum Target {
    Driver,
    Actor(usize),
    /// Outer actor index (in the round's list), its inner actor index.
    Nested(usize, usize),
    Task,
    TaskCalling(usize),
}

enum Fail {
    Wrong(String),
    Err(Error),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::Err(e)
    }
}

type Check = Box<dyn FnOnce() -> Result<u64, Fail>>;

struct Pending {
    what: &'static str,
    target: Target,
    /// Worker kills done when the operation was issued.
    workers_done: u64,
    check: Check,
}

fn check_vec(v: &[rkyv::rend::u64_le], key: u64, n: u64) -> Result<u64, Fail> {
    if v.len() as u64 != n {
        return Err(Fail::Wrong(format!("{} elements, {n} expected", v.len())));
    }
    for (i, x) in v.iter().enumerate() {
        if x.to_native() != elem(key, i as u64) {
            return Err(Fail::Wrong(format!("element {i} of {n} differs")));
        }
    }
    Ok(1)
}

fn check_slice(v: &[u64], key: u64, n: u64) -> Result<u64, Fail> {
    if v.len() as u64 != n {
        return Err(Fail::Wrong(format!("{} elements, {n} expected", v.len())));
    }
    for (i, x) in v.iter().enumerate() {
        if *x != elem(key, i as u64) {
            return Err(Fail::Wrong(format!("element {i} of {n} differs")));
        }
    }
    Ok(1)
}

fn check_u64(r: ObjectRef<u64>, want: u64) -> Check {
    Box::new(move || {
        let got = r.get_timeout(GET_BOUND)?.to_native();
        if got == want {
            Ok(1)
        } else {
            Err(Fail::Wrong(format!("got {got:#x}, expected {want:#x}")))
        }
    })
}

/// The workload's operations (`--ops` picks some; default all, equally often).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Op {
    Put,
    PutSlice,
    Add,
    Sum,
    Bundle,
    Make,
    Echo,
    RelayAdd,
    RelaySum,
    TaskMake,
    TaskSum,
    TaskCall,
}

impl Op {
    pub const ALL: [(&'static str, Op); 12] = [
        ("put", Op::Put),
        ("put_slice", Op::PutSlice),
        ("add", Op::Add),
        ("sum", Op::Sum),
        ("bundle", Op::Bundle),
        ("make", Op::Make),
        ("echo", Op::Echo),
        ("relay_add", Op::RelayAdd),
        ("relay_sum", Op::RelaySum),
        ("task_make", Op::TaskMake),
        ("task_sum", Op::TaskSum),
        ("task_call", Op::TaskCall),
    ];

    /// Parses a comma-separated list of operation names.
    pub fn parse_list(s: &str) -> Result<Vec<Op>, String> {
        s.split(',')
            .map(|name| {
                Op::ALL
                    .iter()
                    .find(|(n, _)| *n == name.trim())
                    .map(|(_, op)| *op)
                    .ok_or_else(|| {
                        let names: Vec<&str> = Op::ALL.iter().map(|(n, _)| *n).collect();
                        format!("unknown operation {name:?} (one of {})", names.join(", "))
                    })
            })
            .collect()
    }
}

struct Round<'a> {
    ops: &'a [Op],
    large: bool,
    rt: &'a Runtime,
    inner: &'a [ActorHandle<Inner>],
    outer: &'a [(ActorHandle<Outer>, usize)],
    pids: &'a [i32],
    kills: &'a Kills,
    start: Instant,
    number: u64,
}

impl Round<'_> {
    /// Issues one operation (puts happen here; gets are in the returned check).
    fn issue(&self, rng: &mut Rng, tally: &mut Tally) -> Result<Pending, Error> {
        let rt = self.rt;
        let workers_done = self.kills.worker_done.load(Ordering::SeqCst);
        let key = rng.next();
        let n = rng.len();
        let ia = rng.below(self.inner.len() as u64) as usize;
        let a = &self.inner[ia];
        let pending = |what, target, check| Pending {
            what,
            target,
            workers_done,
            check,
        };
        let op = self.ops[rng.below(self.ops.len() as u64) as usize];
        Ok(match op {
            Op::Put => {
                tally.puts += 1;
                let r = rt.put(&pattern(key, n))?;
                pending(
                    "put Vec<u64> + get",
                    Target::Driver,
                    Box::new(move || check_vec(&r.get_timeout(GET_BOUND)?, key, n)),
                )
            }
            Op::PutSlice => {
                tally.puts += 1;
                let r = rt.put_slice(&pattern(key, n))?;
                pending(
                    "put_slice + get",
                    Target::Driver,
                    Box::new(move || check_slice(&r.get_timeout(GET_BOUND)?, key, n)),
                )
            }
            Op::Add => {
                tally.calls += 1;
                let (x, y) = (rng.next(), rng.next());
                let r = a.call(Inner::add, (x, y))?;
                pending(
                    "Inner::add (small args)",
                    Target::Actor(ia),
                    check_u64(r, add_value(x, y)),
                )
            }
            Op::Sum => {
                tally.puts += 1;
                tally.calls += 1;
                let data = rt.put(&pattern(key, n))?;
                let r = a.call(Inner::sum, (data,))?;
                pending(
                    "Inner::sum (ObjectRef arg)",
                    Target::Actor(ia),
                    check_u64(r, expect_sum(key, n)),
                )
            }
            Op::Bundle => {
                let parts = 1 + rng.below(3);
                let salt = rng.next();
                let mut refs = Vec::new();
                let mut sums = vec![salt];
                for j in 0..parts {
                    let m = rng.len();
                    tally.puts += 1;
                    refs.push(rt.put_slice(&pattern(key ^ j, m))?);
                    sums.push(expect_sum(key ^ j, m));
                }
                tally.calls += 1;
                let r = a.call(Inner::sum_bundle, (Bundle { parts: refs, salt },))?;
                pending(
                    "Inner::sum_bundle (refs inside args)",
                    Target::Actor(ia),
                    check_u64(r, checksum(sums.into_iter())),
                )
            }
            Op::Make => {
                tally.calls += 1;
                let r = a.call(Inner::make, (key, n))?;
                pending(
                    "Inner::make (result)",
                    Target::Actor(ia),
                    Box::new(move || check_vec(&r.get_timeout(GET_BOUND)?, key, n)),
                )
            }
            Op::Echo => {
                tally.puts += 1;
                tally.calls += 1;
                let data = rt.put(&pattern(key, n))?;
                let r = a.call(Inner::echo, (data,))?;
                pending(
                    "Inner::echo (ref inside a result)",
                    Target::Actor(ia),
                    Box::new(move || {
                        let inner: ObjectRef<Vec<u64>> = r.get_timeout(GET_BOUND)?.deserialize()?;
                        Ok(1 + check_vec(&inner.get_timeout(GET_BOUND)?, key, n)?)
                    }),
                )
            }
            Op::RelayAdd | Op::RelaySum => {
                let io = rng.below(self.outer.len() as u64) as usize;
                let (o, inner_index) = &self.outer[io];
                tally.calls += 1;
                if op == Op::RelayAdd {
                    let (x, y) = (rng.next(), rng.next());
                    let r = o.call(Outer::relay_add, (x, y))?;
                    pending(
                        "Outer::relay_add (nested)",
                        Target::Nested(io, *inner_index),
                        check_u64(r, add_value(x, y)),
                    )
                } else {
                    tally.puts += 1;
                    let data = rt.put(&pattern(key, n))?;
                    let r = o.call(Outer::relay_sum, (data,))?;
                    pending(
                        "Outer::relay_sum (nested, ObjectRef arg)",
                        Target::Nested(io, *inner_index),
                        check_u64(r, expect_sum(key, n)),
                    )
                }
            }
            Op::TaskMake => {
                tally.tasks += 1;
                let r = rt.spawn(task_make, (key, n))?;
                pending(
                    "task_make (task result)",
                    Target::Task,
                    Box::new(move || check_vec(&r.get_timeout(GET_BOUND)?, key, n)),
                )
            }
            Op::TaskSum => {
                tally.puts += 1;
                tally.tasks += 1;
                let data = rt.put_slice(&pattern(key, n))?;
                let r = rt.spawn(task_sum, (data,))?;
                pending(
                    "task_sum (ObjectRef arg)",
                    Target::Task,
                    check_u64(r, expect_sum(key, n)),
                )
            }
            Op::TaskCall => {
                tally.tasks += 1;
                let (x, y) = (rng.next(), rng.next());
                let r = rt.spawn(task_call, (a.clone(), x, y))?;
                pending(
                    "task_call (a task calling an actor)",
                    Target::TaskCalling(ia),
                    check_u64(r, add_value(x, y)),
                )
            }
        })
    }

    fn killed(&self, actor: usize) -> bool {
        self.kills.actor_killed[actor].load(Ordering::SeqCst)
    }

    fn describe(&self, target: Target) -> String {
        let actor = |i: usize| {
            format!(
                "actor #{i} pid {}{}",
                self.pids[i],
                if self.killed(i) { " (killed)" } else { "" }
            )
        };
        match target {
            Target::Driver => "the driver's own object".into(),
            Target::Actor(i) => actor(i),
            Target::Nested(o, i) => format!(
                "outer {} calling inner {}",
                actor(self.inner.len() + o),
                actor(i)
            ),
            Target::Task => "a task".into(),
            Target::TaskCalling(i) => format!("a task calling {}", actor(i)),
        }
    }

    /// Judges one answer: a right value, an error the kills explain, a hang, or wrong.
    fn judge(&self, p: Pending, tally: &mut Tally) {
        let what = p.what;
        let target = p.target;
        let workers_done = p.workers_done;
        let outcome = (p.check)();
        let worker_killed_since = || self.kills.worker_begun.load(Ordering::SeqCst) > workers_done;
        let at = self.start.elapsed().as_secs_f64();
        match outcome {
            Ok(n) => tally.checked += n,
            Err(Fail::Err(Error::Timeout(id))) => {
                tally.hangs += 1;
                let d = self.describe(target);
                tally.note(format!(
                    "HANG round {} +{at:.2}s: {what} on {d}: no answer in {GET_BOUND:?} ({id})",
                    self.number
                ));
            }
            Err(Fail::Err(Error::TaskFailed(m))) if m.contains("timed out") => {
                tally.hangs += 1;
                let d = self.describe(target);
                tally.note(format!(
                    "HANG round {} +{at:.2}s: {what} on {d}: an inner get timed out: {m}",
                    self.number
                ));
            }
            Err(Fail::Err(e)) => {
                let explained = match (&e, target) {
                    (Error::ActorDied(_), Target::Actor(i)) => self.killed(i),
                    (Error::ActorDied(_), Target::Nested(o, _)) => {
                        self.killed(self.inner.len() + o)
                    }
                    (Error::TaskFailed(m), Target::Nested(_, i)) => {
                        self.killed(i) && m.contains("died")
                    }
                    (Error::TaskFailed(_), Target::Task) => worker_killed_since(),
                    (Error::TaskFailed(m), Target::TaskCalling(i)) => {
                        worker_killed_since() || (self.killed(i) && m.contains("died"))
                    }
                    _ => false,
                };
                if explained {
                    tally.expected_failures += 1;
                } else {
                    tally.wrong += 1;
                    let d = self.describe(target);
                    tally.note(format!(
                        "WRONG round {} +{at:.2}s: {what} on {d}: unexpected error {e:?}",
                        self.number
                    ));
                }
            }
            Err(Fail::Wrong(m)) => {
                tally.wrong += 1;
                let d = self.describe(target);
                tally.note(format!(
                    "WRONG round {} +{at:.2}s: {what} on {d}: {m}",
                    self.number
                ));
            }
        }
    }

    /// One workload thread: batches of operations until the round's work time is over.
    fn work(&self, seed: u64) -> Tally {
        let mut rng = Rng::new(seed).large_only(self.large);
        let mut tally = Tally::default();
        while self.start.elapsed() < ROUND_WORK {
            let mut batch = Vec::with_capacity(BATCH);
            for _ in 0..BATCH {
                match self.issue(&mut rng, &mut tally) {
                    Ok(p) => batch.push(p),
                    Err(e) => {
                        tally.wrong += 1;
                        tally.note(format!(
                            "WRONG round {} +{:.2}s: issuing an operation failed: {e:?}",
                            self.number,
                            self.start.elapsed().as_secs_f64()
                        ));
                    }
                }
            }
            for p in batch {
                self.judge(p, &mut tally);
            }
        }
        tally
    }
}

// ---- client processes ----

/// What a client process reported (cumulative).
#[derive(Default)]
struct ClientReport {
    checked: u64,
    tasks: u64,
    puts: u64,
    hangs: u64,
    wrong: u64,
    notes: Vec<String>,
}

struct ClientProc {
    child: Child,
    reader: std::thread::JoinHandle<ClientReport>,
}

fn start_client(socket: &Path, seed: u64) -> anyhow::Result<ClientProc> {
    // This very binary, even if the file was replaced since (a rebuild during a long run).
    let mut child = Command::new("/proc/self/exe")
        .arg("--store")
        .arg(socket)
        .arg("stress-client")
        .arg("--seed")
        .arg(seed.to_string())
        .env_remove("TROVE_STORE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting a stress client")?;
    let out = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut r = ClientReport::default();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let mut f = line.split_whitespace();
            match f.next() {
                Some("COUNT") => {
                    let v: Vec<u64> = f.filter_map(|x| x.parse().ok()).collect();
                    if let [checked, tasks, puts] = v[..] {
                        r.checked = checked;
                        r.tasks = tasks;
                        r.puts = puts;
                    }
                }
                Some("HANG") => {
                    r.hangs += 1;
                    r.notes.push(format!("client: {line}"));
                }
                Some("WRONG") => {
                    r.wrong += 1;
                    r.notes.push(format!("client: {line}"));
                }
                _ => {}
            }
        }
        r
    });
    Ok(ClientProc { child, reader })
}

/// `trove stress-client`: a separate client process of the driver's store. Puts values, reads
/// them back, has its own worker sum them; reports counts on stdout until it is killed.
pub fn client_main(socket: PathBuf, seed: u64) -> anyhow::Result<()> {
    // Die with the driver, even if it is SIGKILLed.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
    let rt = trove::init(trove::Config::default().store(socket).num_cpus(1))?;
    let mut rng = Rng::new(seed);
    let (mut checked, mut tasks, mut puts) = (0u64, 0u64, 0u64);
    let mut held: Vec<(ObjectRef<[u64]>, u64, u64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let (key, n) = (rng.next(), rng.len());
        let r = rt.put_slice(&pattern(key, n))?;
        puts += 1;
        match r.get_timeout(GET_BOUND) {
            Ok(v) => match check_slice(&v, key, n) {
                Ok(_) => checked += 1,
                Err(_) => println!("WRONG put {n} elements read back differently"),
            },
            Err(Error::Timeout(_)) => println!("HANG get of its own put of {n} elements"),
            Err(e) => println!("WRONG get of its own put: {e:?}"),
        }
        if rng.below(3) == 0 {
            tasks += 1;
            match rt
                .spawn(task_sum, (r.clone(),))
                .and_then(|t| t.get_timeout(GET_BOUND).map(|v| v.to_native()))
            {
                Ok(s) if s == expect_sum(key, n) => checked += 1,
                Ok(s) => println!("WRONG task_sum gave {s:#x}"),
                Err(Error::Timeout(_)) => println!("HANG task_sum of {n} elements"),
                Err(e) => println!("WRONG task_sum: {e:?}"),
            }
        }
        // Keep a few objects held, so that the kill finds some.
        held.push((r, key, n));
        if held.len() > 8 {
            let (old, key, n) = held.remove(0);
            match old.get_timeout(GET_BOUND) {
                Ok(v) if check_slice(&v, key, n).is_ok() => checked += 1,
                Ok(_) => println!("WRONG held object changed"),
                Err(e) => println!("WRONG held object: {e:?}"),
            }
        }
        println!("COUNT {checked} {tasks} {puts}");
    }
    Ok(())
}

// ---- the driver ----

pub struct Options {
    pub seconds: u64,
    pub seed: u64,
    pub json: bool,
    pub workers: usize,
    /// The operations of the workload (all by default).
    pub ops: Vec<Op>,
    /// What the killer kills (all kinds by default; no client processes without `Client`).
    pub kill: Vec<KillKind>,
    /// Only large values (256 KiB-1 MiB) in the driver's workload.
    pub large: bool,
}

#[derive(Default)]
struct Totals {
    tally: Tally,
    client_checked: u64,
    client_tasks: u64,
    client_puts: u64,
    rounds: u64,
    max_leak_bytes: i64,
    max_leak_objects: i64,
    max_leak_round: u64,
    last_leak_bytes: i64,
    last_leak_objects: i64,
    stray: u64,
    leaked_examples: Vec<String>,
}

/// Runs the stress program; returns whether it was clean (no hang, wrong value or leak).
pub fn run(rt: &Runtime, opts: &Options, out: &mut dyn Write) -> anyhow::Result<bool> {
    let me = std::process::id() as i32;
    let store_pid = rt.embedded_store_pid();
    let zygotes: Vec<i32> = children(me)
        .into_iter()
        .filter(|p| Some(*p) != store_pid)
        .collect();
    let [zygote] = zygotes[..] else {
        bail!("expected one zygote among this process's children, found {zygotes:?}");
    };
    let socket = rt.store().socket_path().to_path_buf();
    // The pool is up when every worker has connected: wait for it, then take the baseline.
    let t = Instant::now();
    while children(zygote).len() < opts.workers && t.elapsed() < SETTLE {
        sleep(Duration::from_millis(20));
    }
    sleep(Duration::from_millis(200));
    let base = rt.stats()?;
    let base_ids: HashSet<ObjectId> = rt.store().list()?.into_iter().map(|o| o.id).collect();
    if !opts.json {
        eprintln!(
            "stress: seed {}, {} s, store {} (embedded: {}), baseline {} B in {} objects, {} clients",
            opts.seed,
            opts.seconds,
            socket.display(),
            store_pid.is_some(),
            base.used,
            base.objects,
            base.clients
        );
    }
    let mut all_actor_pids: HashSet<i32> = HashSet::new();
    // Leaked ids already shown (a leak stays from round to round).
    let mut leaked_seen: HashSet<ObjectId> = HashSet::new();
    let mut totals = Totals::default();
    let started = Instant::now();
    let mut prev_leak = (0i64, 0i64);
    while started.elapsed() < Duration::from_secs(opts.seconds) || totals.rounds == 0 {
        totals.rounds += 1;
        let number = totals.rounds;
        let mut rng = Rng::new(opts.seed ^ number.wrapping_mul(0x2545_F491_4F6C_DD1D));
        // Actors: inner ones, then outer ones each holding an inner one's handle.
        let mut inner = Vec::new();
        for _ in 0..INNER_ACTORS {
            inner.push(rt.actor(Inner::default)?);
        }
        let mut outer = Vec::new();
        for _ in 0..OUTER_ACTORS {
            let i = rng.below(INNER_ACTORS as u64) as usize;
            outer.push((rt.actor_with(Outer::new, (inner[i].clone(),))?, i));
        }
        let pids: Vec<i32> = inner
            .iter()
            .map(|h| h.pid())
            .chain(outer.iter().map(|(h, _)| h.pid()))
            .collect();
        all_actor_pids.extend(&pids);
        let kills = Kills {
            actor_killed: pids.iter().map(|_| AtomicBool::new(false)).collect(),
            worker_begun: AtomicU64::new(0),
            worker_done: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
        };
        let kill_actors = opts.kill.contains(&KillKind::Actor);
        let kill_workers = opts.kill.contains(&KillKind::Worker);
        let n_clients = if opts.kill.contains(&KillKind::Client) {
            CLIENTS
        } else {
            0
        };
        let clients = (0..n_clients)
            .map(|_| start_client(&socket, rng.next()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let client_pids: Vec<i32> = clients.iter().map(|c| c.child.id() as i32).collect();
        // The kill schedule: (moment, kind, which).
        let mut schedule = Vec::new();
        let mut victims: Vec<usize> = (0..pids.len()).collect();
        for _ in 0..if kill_actors { ACTOR_KILLS } else { 0 } {
            let v = victims.swap_remove(rng.below(victims.len() as u64) as usize);
            schedule.push((rng.below(ROUND_WORK.as_millis() as u64), KillKind::Actor, v));
        }
        for _ in 0..if kill_workers { WORKER_KILLS } else { 0 } {
            schedule.push((
                rng.below(ROUND_WORK.as_millis() as u64),
                KillKind::Worker,
                0,
            ));
        }
        for c in 0..n_clients {
            schedule.push((
                200 + rng.below(ROUND_WORK.as_millis() as u64 - 200),
                KillKind::Client,
                c,
            ));
        }
        schedule.sort_by_key(|(at, _, which)| (*at, *which));
        let worker_seed = rng.next();
        let round = Round {
            ops: &opts.ops,
            large: opts.large,
            rt,
            inner: &inner,
            outer: &outer,
            pids: &pids,
            kills: &kills,
            start: Instant::now(),
            number,
        };
        let tallies: Vec<Tally> = std::thread::scope(|s| {
            let killer = s.spawn(|| {
                let mut kr = Rng::new(worker_seed);
                for (at, kind, which) in &schedule {
                    let at = Duration::from_millis(*at);
                    if let Some(wait) = at.checked_sub(round.start.elapsed()) {
                        sleep(wait);
                    }
                    let pid = match kind {
                        KillKind::Actor => {
                            kills.actor_killed[*which].store(true, Ordering::SeqCst);
                            Some(pids[*which])
                        }
                        KillKind::Client => Some(client_pids[*which]),
                        KillKind::Worker => {
                            let workers: Vec<i32> = children(zygote)
                                .into_iter()
                                .filter(|p| !all_actor_pids.contains(p))
                                .collect();
                            if workers.is_empty() {
                                None
                            } else {
                                kills.worker_begun.fetch_add(1, Ordering::SeqCst);
                                Some(workers[kr.below(workers.len() as u64) as usize])
                            }
                        }
                    };
                    if let Some(pid) = pid {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                        if *kind == KillKind::Worker {
                            kills.worker_done.fetch_add(1, Ordering::SeqCst);
                        }
                        kills.log.lock().unwrap_or_else(|p| p.into_inner()).push((
                            round.start.elapsed(),
                            *kind,
                            pid,
                        ));
                    }
                }
            });
            let workers: Vec<_> = (0..THREADS as u64)
                .map(|t| {
                    let round = &round;
                    s.spawn(move || round.work(worker_seed ^ mix(t + 1)))
                })
                .collect();
            let tallies = workers
                .into_iter()
                .map(|w| w.join().expect("workload thread"))
                .collect();
            killer.join().expect("killer thread");
            tallies
        });
        // The round's end: clients (all killed by now) reaped, actors killed, refs dropped.
        for mut c in clients {
            // Every client was SIGKILLed by the killer; one that exited by itself failed.
            if let Ok(Some(status)) = c.child.try_wait()
                && status.code().is_some()
            {
                totals.tally.wrong += 1;
                totals.tally.note(format!(
                    "WRONG round {number}: client pid {} exited by itself ({status}) before its kill",
                    c.child.id()
                ));
            }
            let _ = c.child.kill();
            let _ = c.child.wait();
            let r = c.reader.join().unwrap_or_default();
            totals.client_checked += r.checked;
            totals.client_tasks += r.tasks;
            totals.client_puts += r.puts;
            totals.tally.hangs += r.hangs;
            totals.tally.wrong += r.wrong;
            for n in r.notes {
                totals.tally.note(format!("round {number}: {n}"));
            }
        }
        for h in &inner {
            let _ = rt.kill(h);
        }
        for (h, _) in &outer {
            let _ = rt.kill(h);
        }
        drop(outer);
        drop(inner);
        let log = kills.log.into_inner().unwrap_or_else(|p| p.into_inner());
        let mut round_kills = [0u64; 3];
        for (_, kind, _) in &log {
            round_kills[*kind as usize] += 1;
        }
        totals.tally.kills_actor += round_kills[0];
        totals.tally.kills_worker += round_kills[1];
        totals.tally.kills_client += round_kills[2];
        let (mut calls, mut checked, mut hangs, mut wrong) = (0, 0, 0, 0);
        for t in tallies {
            calls += t.calls + t.tasks;
            checked += t.checked;
            hangs += t.hangs;
            wrong += t.wrong;
            let total = &mut totals.tally;
            total.calls += t.calls;
            total.tasks += t.tasks;
            total.puts += t.puts;
            total.checked += t.checked;
            total.expected_failures += t.expected_failures;
            total.hangs += t.hangs;
            total.wrong += t.wrong;
            for n in t.notes {
                total.note(n);
            }
        }
        // Settle: the dead are cleaned up, one-way frames flushed, the pool whole again.
        // A store that stops changing for STABLE has settled too (on a leak).
        let t = Instant::now();
        let mut last = None;
        let mut since = Instant::now();
        let (stats, stray) = loop {
            let s = rt.stats()?;
            let procs = children(zygote).len();
            let settled = s.used == base.used
                && s.objects == base.objects
                && s.clients <= base.clients
                && procs == opts.workers;
            let now = (s.used, s.objects, s.clients, procs);
            if last != Some(now) {
                last = Some(now);
                since = Instant::now();
            }
            if settled || since.elapsed() > STABLE || t.elapsed() > SETTLE {
                break (s, procs.saturating_sub(opts.workers));
            }
            sleep(Duration::from_millis(20));
        };
        totals.stray += stray as u64;
        let leak_bytes = stats.used as i64 - base.used as i64;
        let leak_objects = stats.objects as i64 - base.objects as i64;
        if leak_bytes > totals.max_leak_bytes || leak_objects > totals.max_leak_objects {
            totals.max_leak_round = number;
        }
        totals.max_leak_bytes = totals.max_leak_bytes.max(leak_bytes);
        totals.max_leak_objects = totals.max_leak_objects.max(leak_objects);
        totals.last_leak_bytes = leak_bytes;
        totals.last_leak_objects = leak_objects;
        if (leak_bytes != 0 || leak_objects != 0) && totals.leaked_examples.len() < 5 {
            for o in rt.store().list()? {
                if !base_ids.contains(&o.id)
                    && totals.leaked_examples.len() < 5
                    && leaked_seen.insert(o.id)
                {
                    totals.leaked_examples.push(format!(
                        "round {number}: {} {} B {:?} pins {} owner client {}",
                        o.id, o.size, o.state, o.pins, o.owner
                    ));
                }
            }
        }
        if !opts.json {
            eprintln!(
                "round {number:>4} +{:>6.1}s: kills a{} w{} c{}, calls {calls}, checked {checked}, \
                 hangs {hangs}, wrong {wrong}, live leak {leak_bytes:+} B {leak_objects:+} objects \
                 (round {:+} B {:+}){}",
                started.elapsed().as_secs_f64(),
                round_kills[0],
                round_kills[1],
                round_kills[2],
                leak_bytes - prev_leak.0,
                leak_objects - prev_leak.1,
                if stray > 0 {
                    format!(", {stray} stray processes")
                } else {
                    String::new()
                }
            );
        }
        prev_leak = (leak_bytes, leak_objects);
        if leak_bytes > (stats.capacity / 4) as i64 {
            let msg = format!(
                "stopping after round {number}: leaked objects hold {leak_bytes} B of the store's \
                 {} B (the next rounds would only see StoreFull)",
                stats.capacity
            );
            if !opts.json {
                eprintln!("{msg}");
            }
            totals.tally.note(msg);
            break;
        }
    }
    report(&totals, opts, started.elapsed(), out)?;
    let t = &totals.tally;
    Ok(t.hangs == 0
        && t.wrong == 0
        && totals.max_leak_bytes <= 0
        && totals.max_leak_objects <= 0
        && totals.stray == 0)
}

fn report(
    totals: &Totals,
    opts: &Options,
    took: Duration,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let t = &totals.tally;
    let kills = t.kills_actor + t.kills_worker + t.kills_client;
    if opts.json {
        let notes: Vec<String> = t
            .notes
            .iter()
            .chain(&totals.leaked_examples)
            .map(|n| format!("{n:?}"))
            .collect();
        writeln!(
            out,
            "{{\"seed\": {}, \"seconds\": {:.1}, \"rounds\": {}, \"kills\": {kills}, \
             \"kills_actor\": {}, \"kills_worker\": {}, \"kills_client\": {}, \"calls\": {}, \
             \"tasks\": {}, \"puts\": {}, \"objects_checked\": {}, \"expected_failures\": {}, \
             \"hangs\": {}, \"wrong\": {}, \"max_leak_bytes\": {}, \"max_leak_objects\": {}, \
             \"final_leak_bytes\": {}, \"final_leak_objects\": {}, \"stray_processes\": {}, \
             \"notes\": [{}]}}",
            opts.seed,
            took.as_secs_f64(),
            totals.rounds,
            t.kills_actor,
            t.kills_worker,
            t.kills_client,
            t.calls,
            t.tasks + totals.client_tasks,
            t.puts + totals.client_puts,
            t.checked + totals.client_checked,
            t.expected_failures,
            t.hangs,
            t.wrong,
            totals.max_leak_bytes,
            totals.max_leak_objects,
            totals.last_leak_bytes,
            totals.last_leak_objects,
            totals.stray,
            notes.join(", ")
        )?;
        return out.flush();
    }
    writeln!(
        out,
        "trove stress: seed {}, {:.1} s, {} rounds",
        opts.seed,
        took.as_secs_f64(),
        totals.rounds
    )?;
    writeln!(
        out,
        "{:<18} {kills} (actors {}, workers {}, clients {})",
        "kills", t.kills_actor, t.kills_worker, t.kills_client
    )?;
    writeln!(
        out,
        "{:<18} {} (actor calls {}, tasks {}: driver {}, clients {})",
        "calls",
        t.calls + t.tasks + totals.client_tasks,
        t.calls,
        t.tasks + totals.client_tasks,
        t.tasks,
        totals.client_tasks
    )?;
    writeln!(
        out,
        "{:<18} {} (driver {}, clients {})",
        "puts",
        t.puts + totals.client_puts,
        t.puts,
        totals.client_puts
    )?;
    writeln!(
        out,
        "{:<18} {} (driver {}, clients {})",
        "objects checked",
        t.checked + totals.client_checked,
        t.checked,
        totals.client_checked
    )?;
    writeln!(
        out,
        "{:<18} {} (ActorDied / TaskFailed explained by a kill)",
        "expected failures", t.expected_failures
    )?;
    writeln!(out, "{:<18} {}", "hangs", t.hangs)?;
    writeln!(out, "{:<18} {}", "wrong values", t.wrong)?;
    writeln!(
        out,
        "{:<18} {} B, {} objects{}",
        "max live leak",
        totals.max_leak_bytes,
        totals.max_leak_objects,
        if totals.max_leak_round > 0 {
            format!(" (after round {})", totals.max_leak_round)
        } else {
            String::new()
        }
    )?;
    writeln!(
        out,
        "{:<18} {} B, {} objects",
        "final live leak", totals.last_leak_bytes, totals.last_leak_objects
    )?;
    writeln!(out, "{:<18} {}", "stray processes", totals.stray)?;
    for n in t.notes.iter().chain(&totals.leaked_examples) {
        writeln!(out, "  {n}")?;
    }
    out.flush()
}
