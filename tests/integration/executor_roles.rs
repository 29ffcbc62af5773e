//! Helper roles for the executor tests (`ExecRole`): each is a driver process that calls
//! `trove::init` on its main thread, exercises actors and tasks, and prints what it saw.

use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use trove::{ActorHandle, Config, Error, ObjectRef};

use crate::role::ExecRole;
use crate::story_actors::{self, Foo};
use crate::story_logging;
use crate::util::{check, say, store_back_to};

type Res = Result<(), Box<dyn std::error::Error>>;

const T: Duration = Duration::from_secs(30);
/// How long a result of a dead actor may take to be known (it should be well under 1 s).
const BOUND: Duration = Duration::from_secs(5);

/// An actor for the rest: a log of numbers, a sum over an object, failures on demand.
#[derive(Default)]
pub struct Worker {
    seen: Vec<u64>,
}

impl Worker {
    fn new(start: u64) -> Worker {
        Worker { seen: vec![start] }
    }
    fn push(&mut self, x: u64) {
        self.seen.push(x);
    }
    fn seen(&mut self) -> Vec<u64> {
        self.seen.clone()
    }
    fn sum(&mut self, data: ObjectRef<Vec<f64>>) -> trove::Result<f64> {
        Ok(data.get()?.iter().map(|x| x.to_native()).sum())
    }
    fn boom(&mut self, what: String) -> u64 {
        panic!("boom: {what}");
    }
    fn refuse(&mut self, n: u64) -> Result<u64, String> {
        if n > 10 {
            Err(format!("{n} is too many"))
        } else {
            Ok(n * 2)
        }
    }
    fn slow(&mut self, ms: u64) -> u64 {
        sleep(Duration::from_millis(ms));
        ms
    }
    fn add(&mut self, a: u64, b: u64, c: u64, d: u64, e: u64, f: u64) -> u64 {
        a + b + c + d + e + f
    }
    fn echo(&mut self, x: u64) -> u64 {
        x
    }
    /// A result (64 KiB) created through the daemon, not a slab.
    fn big(&mut self, n: u64) -> Vec<u8> {
        vec![n as u8; 64 << 10]
    }
    fn fail_long(&mut self, n: usize) -> Result<u64, String> {
        Err("x".repeat(n))
    }
    fn double_ref(&mut self, r: ObjectRef<u64>) -> trove::Result<u64> {
        Ok(r.get()?.to_native() * 2)
    }
    /// A result too large to travel inline: it goes through the store.
    fn text(&mut self, i: u64) -> String {
        format!("{i:>1000}")
    }
    /// SIGKILLs this actor's own process.
    fn die(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Reads `n` results with `get(i)` (each bounded): each is right or `ActorDied`, none hangs.
/// Returns how many died.
fn each_value_or_died(
    n: usize,
    get: impl Fn(usize) -> trove::Result<bool>,
    what: &str,
) -> Result<usize, Box<dyn std::error::Error>> {
    let mut died = 0;
    for i in 0..n {
        match get(i) {
            Ok(right) => check(right, &format!("{what}: wrong value for call {i}"))?,
            Err(Error::ActorDied(_)) => died += 1,
            Err(e) => return Err(format!("{what}: call {i} gave {e}").into()),
        }
    }
    Ok(died)
}

/// A task that reads the refs inside an object.
fn sum_refs(v: ObjectRef<Vec<ObjectRef<u64>>>) -> trove::Result<u64> {
    let o = v.get()?;
    let mut sum = 0;
    for r in o.iter() {
        sum += r.to_ref().get()?.to_native();
    }
    Ok(sum)
}

fn second_hop(h: ActorHandle<Worker>, x: u64) -> trove::Result<u64> {
    h.call(Worker::push, (x,))?.deserialize()?;
    let seen = h.call(Worker::seen, ())?.deserialize()?;
    Ok(*seen.last().unwrap_or(&0))
}

fn first_hop(h: ActorHandle<Worker>, x: u64) -> trove::Result<u64> {
    trove::runtime()?
        .spawn(second_hop, (h, x + 1))?
        .deserialize()
}

/// A task whose result is too large to travel inline.
fn text_task(i: u64) -> String {
    format!("{i:>1000}")
}

/// A task that SIGKILLs the worker running it.
fn kill_worker() {
    let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
}

fn named_hop(x: u64) -> trove::Result<u64> {
    let h: ActorHandle<Worker> = trove::runtime()?.get_actor("named-worker")?;
    h.call(Worker::push, (x,))?.deserialize()?;
    Ok(h.call(Worker::seen, ())?.deserialize()?.len() as u64)
}

/// Calls a Worker's handle read back as a `Foo` handle (in a worker process): `true` if that
/// is refused with `WrongActorType`.
fn wrong_type_hop(stored: ObjectRef<ActorHandle<Worker>>) -> trove::Result<bool> {
    let wrong: ActorHandle<Foo> =
        ObjectRef::<ActorHandle<Foo>>::from_id(stored.id()).deserialize()?;
    Ok(matches!(
        wrong.call(Foo::increment, ()),
        Err(Error::WrongActorType { .. })
    ))
}

/// A task with a small result.
fn double(x: u64) -> u64 {
    2 * x
}

/// A task whose result (64 KiB) is created through the daemon, not a slab.
fn big_task(n: u64) -> Vec<u8> {
    vec![n as u8; 64 << 10]
}

/// Fail points armed through files, so that a test kills one consumer at exactly one window:
/// `<dir>/<point>` holds `<target> <n>`, and the `n`-th time (counted from arming) a process
/// that is `target` (a pid, or `child`: any consumer, i.e. any process but the driver and
/// the zygote) passes `point`, it renames the file to `<point>.taken` and SIGKILLs itself.
/// Configured before `init`, so every process of the tree inherits the callbacks.
struct Kills {
    dir: tempfile::TempDir,
}

impl Kills {
    const POINTS: [&str; 4] = [
        "trove::claimed",
        "trove::claim_held",
        "trove::owing",
        "trove::writing",
    ];

    fn new() -> Result<Kills, Box<dyn std::error::Error>> {
        use nix::unistd::{getpid, getppid};
        let dir = tempfile::Builder::new().prefix("trove-kills-").tempdir()?;
        let driver = getpid().as_raw();
        for point in Self::POINTS {
            let path = Self::file(dir.path(), point);
            // This process's count of hits since the current arming (by the file's contents).
            let seen = std::sync::Mutex::new((String::new(), 0u64));
            fail::cfg_callback(point, move || {
                let Ok(armed) = std::fs::read_to_string(&path) else {
                    return;
                };
                let mut words = armed.split_whitespace();
                let (Some(target), Some(Ok(n))) =
                    (words.next(), words.next().map(str::parse::<u64>))
                else {
                    return;
                };
                let me = getpid().as_raw();
                let mine = match target {
                    "child" => me != driver && getppid().as_raw() != driver,
                    pid => pid.parse() == Ok(me),
                };
                if !mine {
                    return;
                }
                let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                if seen.0 != armed {
                    *seen = (armed.clone(), 0);
                }
                seen.1 += 1;
                if seen.1 == n && std::fs::rename(&path, path.with_extension("taken")).is_ok() {
                    let _ = nix::sys::signal::kill(getpid(), nix::sys::signal::Signal::SIGKILL);
                }
            })?;
        }
        Ok(Kills { dir })
    }

    fn file(dir: &Path, point: &str) -> std::path::PathBuf {
        dir.join(point.replace("::", "-"))
    }

    /// Arms `point` for `target` (a pid, or "child") at its `n`-th pass.
    fn arm(&self, point: &str, target: &str, n: u64) -> Res {
        let path = Self::file(self.dir.path(), point);
        let _ = std::fs::remove_file(path.with_extension("taken"));
        std::fs::write(&path, format!("{target} {n}"))?;
        Ok(())
    }

    /// Whether a process died at `point` since it was armed.
    fn hit(&self, point: &str) -> bool {
        Self::file(self.dir.path(), point)
            .with_extension("taken")
            .exists()
    }
}

pub fn helper_role(role: ExecRole) -> Res {
    // A session of our own: the test finds every process of this tree by its session id.
    let _ = nix::unistd::setsid();
    // Before init: the zygote, actors and workers inherit the fail-point callbacks (only
    // roles that kill at fail points have them, and the directory they arm through).
    let kills = match role {
        ExecRole::LostCall { .. } | ExecRole::DieOwing | ExecRole::LostResult => {
            Some(Kills::new()?)
        }
        _ => None,
    };
    let kills = || kills.as_ref().ok_or("this role has no fail points");
    let mut cfg = Config::default().memory(512 << 20).num_cpus(2);
    if let ExecRole::NsOwner { socket, .. } | ExecRole::NsOtherProgram { socket, .. } = &role {
        // A driver of its own on the test's shared troved.
        cfg = cfg.store(socket);
    }
    if let ExecRole::NsOtherProgram { .. } = role {
        // Play another program (a test-only hook of the `failpoints` build).
        // SAFETY: single-threaded (before init, which checks it), nobody reads the environment
        // concurrently.
        unsafe { std::env::set_var("TROVE_TEST_PROGRAM_ID", "12345") };
    }
    let rt = trove::init(cfg)?;
    match role {
        ExecRole::SeedActors => {
            // The story checks the results; the test checks they ran in parallel.
            let took = Duration::from_secs_f64(story_actors::run(&rt, &mut std::io::sink())?);
            check(
                took > Duration::from_millis(2500) && took < Duration::from_secs(3),
                &format!("took {took:?}"),
            )?;
            say(&format!("OK {}", took.as_millis()));
        }
        ExecRole::SeedLogging => {
            // The story checks the final logs; the test checks that reads made while the
            // tasks ran saw the logs grow.
            let counts =
                story_logging::run(&rt, 3, Duration::from_millis(400), &mut std::io::sink())?;
            let growing = counts.windows(2).filter(|w| w[1] > w[0]).count();
            check(
                counts.len() >= 3 && growing >= 2 && counts.windows(2).all(|w| w[1] >= w[0]),
                &format!("counts {counts:?}"),
            )?;
            say(&format!("OK {counts:?}"));
        }
        ExecRole::Large => {
            let w = rt.actor_with(Worker::new, (0u64,))?;
            let big: ObjectRef<Vec<f64>> = rt.put(&vec![0.5; 4 << 20])?;
            let sum = w
                .call(Worker::sum, (big.clone(),))?
                .get_timeout(T)?
                .deserialize()?;
            check(sum == (2 << 20) as f64, &format!("sum {sum}"))?;
            say("OK");
        }
        ExecRole::Failures => {
            let w = rt.actor(Worker::default)?;
            match w
                .call(Worker::boom, ("bad input".to_string(),))?
                .get_timeout(T)
            {
                Err(Error::TaskFailed(m)) => check(m.contains("boom: bad input"), &m)?,
                other => return Err(format!("panic gave {other:?}").into()),
            }
            match w.call(Worker::refuse, (11,))?.get_timeout(T) {
                Err(Error::TaskFailed(m)) => check(m.contains("11 is too many"), &m)?,
                other => return Err(format!("Err gave {other:?}").into()),
            }
            // The actor lives on, with its state.
            check(
                *w.call(Worker::refuse, (4,))?.get_timeout(T)? == 8,
                "refuse(4)",
            )?;
            w.call(Worker::push, (7,))?;
            check(
                w.call(Worker::seen, ())?.deserialize()? == [7],
                "state kept",
            )?;
            check(
                *w.call(Worker::add, (1, 2, 3, 4, 5, 6))?.get_timeout(T)? == 21,
                "six args",
            )?;
            say("OK");
        }
        ExecRole::Kill => {
            let w = rt.actor(Worker::default)?;
            check(*w.call(Worker::slow, (1,))?.get_timeout(T)? == 1, "warm up")?;
            let running = w.call(Worker::slow, (10_000,))?;
            let queued: Vec<_> = (0..3)
                .map(|i| w.call(Worker::push, (i,)))
                .collect::<Result<_, _>>()?;
            sleep(Duration::from_millis(200));
            let t = Instant::now();
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(w.pid()),
                nix::sys::signal::Signal::SIGKILL,
            )?;
            match running.get_timeout(T) {
                Err(Error::ActorDied(_)) => {}
                other => return Err(format!("running call gave {other:?}").into()),
            }
            for q in &queued {
                match q.get_timeout(T) {
                    Err(Error::ActorDied(_)) => {}
                    other => return Err(format!("queued call gave {other:?}").into()),
                }
            }
            let took = t.elapsed();
            check(
                took < Duration::from_secs(1),
                &format!("ActorDied after {took:?}"),
            )?;
            match w.call(Worker::push, (9,))?.get_timeout(T) {
                Err(Error::ActorDied(_)) => {}
                other => return Err(format!("later call gave {other:?}").into()),
            }
            // kill() of another actor: the same.
            let v = rt.actor(Worker::default)?;
            rt.kill(&v)?;
            match v.call(Worker::seen, ())?.get_timeout(T) {
                Err(Error::ActorDied(_)) => {}
                other => return Err(format!("call after kill gave {other:?}").into()),
            }
            say(&format!("OK {}", took.as_millis()));
        }
        ExecRole::TwoHops => {
            let w = rt.actor_with(Worker::new, (100u64,))?;
            let r = rt.spawn(first_hop, (w.clone(), 41))?;
            check(r.get_timeout(T)?.deserialize()? == 42, "two hops")?;
            check(
                w.call(Worker::seen, ())?.deserialize()? == [100, 42],
                "the actor saw it",
            )?;
            // Named actors: found by name here and from a task; a taken name is refused.
            let named = rt.actor_named("named-worker", Worker::default)?;
            check(
                rt.actor_named("named-worker", Worker::default).is_err(),
                "name taken",
            )?;
            let found: ActorHandle<Worker> = trove::runtime()?.get_actor("named-worker")?;
            check(found.pid() == named.pid(), "same actor")?;
            check(
                rt.spawn(named_hop, (5,))?.get_timeout(T)?.deserialize()? == 1,
                "task found it",
            )?;
            check(
                matches!(
                    trove::runtime()?.get_actor::<Worker>("nobody"),
                    Err(Error::NotFound(_))
                ),
                "unknown name",
            )?;
            say("OK");
        }
        ExecRole::Inline => {
            let w = rt.actor(Worker::default)?;
            let w2 = rt.actor(Worker::default)?;
            check(
                w.call(Worker::echo, (1,))?.get_timeout(T)?.to_native() == 1,
                "warm",
            )?;
            check(
                w2.call(Worker::echo, (1,))?.get_timeout(T)?.to_native() == 1,
                "warm",
            )?;
            let base = rt.stats()?;
            // Small results come back through the completion records, never the store.
            for i in 0..1000u64 {
                check(
                    w.call(Worker::echo, (i,))?.get_timeout(T)?.to_native() == i,
                    "sync",
                )?;
            }
            let refs: Vec<_> = (0..1000u64)
                .map(|i| w.call(Worker::echo, (i,)))
                .collect::<Result<_, _>>()?;
            check(
                rt.get_all_timeout(&refs, T)? == (0..1000).collect::<Vec<u64>>(),
                "async values",
            )?;
            let (ready, _) = rt.wait(&refs, refs.len(), Some(T))?;
            check(ready.len() == refs.len(), "wait on inline results")?;
            // A get asks for the store only after polling the record for a while, which a
            // callee descheduled on a loaded machine can outlast: a few may be stored, and
            // are correct too (checked above). On an idle machine this is 0.
            let stored = rt.stats()?.objects.saturating_sub(base.objects);
            check(
                stored < refs.len() as u64 / 10,
                &format!("{stored} of {} small results went to the store", refs.len()),
            )?;
            drop((refs, ready));
            // More results than records, none read until the end: each record is reused
            // several times, so most results are moved to the store; all read back right.
            let refs: Vec<_> = (0..5000u64)
                .map(|i| w.call(Worker::echo, (i,)))
                .collect::<Result<_, _>>()?;
            for (i, r) in refs.iter().enumerate().rev() {
                check(r.get_timeout(T)?.to_native() == i as u64, "reused records")?;
            }
            drop(refs);
            store_back_to(&rt, &base, "after record reuse")?;
            // A get_all over small results mixed with what is not one (a stored object, a
            // running call, a value read before), across its lookup batches: in order. A
            // failure among them is the get_all's error.
            let put = rt.put(&7u64)?;
            let mut mixed: Vec<ObjectRef<u64>> = (0..100u64)
                .map(|i| w.call(Worker::echo, (i,)))
                .collect::<Result<_, _>>()?;
            mixed[40] = put.clone();
            mixed[41] = w.call(Worker::slow, (30,))?;
            check(mixed[3].get_timeout(T)?.to_native() == 3, "read before")?;
            let mut want: Vec<u64> = (0..100).collect();
            (want[40], want[41]) = (7, 30);
            check(rt.get_all_timeout(&mixed, T)? == want, "a mixed get_all")?;
            mixed[70] = w.call(Worker::refuse, (11,))?;
            match rt.get_all_timeout(&mixed, T) {
                Err(Error::TaskFailed(m)) => check(m.contains("11 is too many"), &m)?,
                other => return Err(format!("a get_all with a failure gave {other:?}").into()),
            }
            drop((put, mixed));
            store_back_to(&rt, &base, "after a mixed get_all")?;
            // Refs escaping into an object: one already read (local), one still running.
            let done = w.call(Worker::echo, (40,))?;
            check(done.get_timeout(T)?.to_native() == 40, "done")?;
            let running = w.call(Worker::slow, (300,))?;
            let both = rt.put(&vec![done.clone(), running.clone()])?;
            let sum = rt.spawn(sum_refs, (both.clone(),))?;
            check(sum.get_timeout(T)?.to_native() == 340, "sum through a task")?;
            // A running call's ref as another actor's argument.
            let later = w.call(Worker::slow, (200,))?;
            let doubled = w2.call(Worker::double_ref, (later.clone(),))?;
            check(
                doubled.get_timeout(T)?.to_native() == 400,
                "ref as argument",
            )?;
            check(
                later.get_timeout(T)?.to_native() == 200,
                "the caller still reads it",
            )?;
            drop((done, running, both, sum, later, doubled));
            // Refs dropped before their calls finish.
            for _ in 0..50 {
                w.call(Worker::slow, (2,))?;
            }
            w.call(Worker::echo, (0,))?.get_timeout(T)?;
            // The last handle to an actor dropped before a running call's ref: dropping the
            // ref lets go of the call, which held the handle (and its mailbox ref).
            let v = rt.actor(Worker::default)?;
            let pid = nix::unistd::Pid::from_raw(v.pid());
            let running = v.call(Worker::slow, (50,))?;
            drop(v);
            drop(running);
            // (Actors live until killed, handles or not.)
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?;
            // Failures: a short message inline, a long one through the store.
            match w.call(Worker::fail_long, (10,))?.get_timeout(T) {
                Err(Error::TaskFailed(m)) => check(m == "x".repeat(10), &m)?,
                other => return Err(format!("short failure gave {other:?}").into()),
            }
            match w.call(Worker::fail_long, (1000,))?.get_timeout(T) {
                Err(Error::TaskFailed(m)) => check(m == "x".repeat(1000), "long failure")?,
                other => return Err(format!("long failure gave {other:?}").into()),
            }
            store_back_to(&rt, &base, "at the end")?;
            say("OK");
        }
        ExecRole::DieOwing => {
            let base = rt.stats()?;
            // Stored results: the actor is busy while the calls queue up, then runs them
            // back to back (its store frames batched) and dies while it owes the 100th (its
            // debt noted, its frame queued, not written).
            let w = rt.actor(Worker::default)?;
            check(*w.call(Worker::echo, (1,))?.get_timeout(T)? == 1, "warm up")?;
            let busy = w.call(Worker::slow, (200,))?;
            kills()?.arm("trove::owing", &w.pid().to_string(), 100)?;
            let texts: Vec<_> = (0..200u64)
                .map(|i| w.call(Worker::text, (i,)))
                .collect::<Result<_, _>>()?;
            let died_stored = each_value_or_died(
                texts.len(),
                |i| Ok(texts[i].get_timeout(BOUND)?.as_str() == format!("{i:>1000}")),
                "stored results",
            )?;
            check(kills()?.hit("trove::owing"), "the actor died owing")?;
            // The one it died owing was failed (only its debt names it), and so was each
            // later one.
            for (i, t) in texts.iter().enumerate().skip(99) {
                match t.get_timeout(BOUND) {
                    Err(Error::ActorDied(_)) => {}
                    other => return Err(format!("stored result {i} gave {other:?}").into()),
                }
            }
            check(*busy.get_timeout(T)? == 200, "the call before")?;
            // Inline results the caller leaves in the records (a slow call in front stops it
            // harvesting): the actor moves them to the store as it reuses the records, then
            // kills itself with some of those moves unsent.
            let slow = rt.actor(Worker::default)?;
            let a = rt.actor(Worker::default)?;
            check(*a.call(Worker::echo, (1,))?.get_timeout(T)? == 1, "warm up")?;
            let front = slow.call(Worker::slow, (300,))?;
            let echoes: Vec<_> = (0..1500u64)
                .map(|i| a.call(Worker::echo, (i,)))
                .collect::<Result<_, _>>()?;
            // (Its ref dropped at once: fire and forget.)
            a.call(Worker::die, ())?;
            let died_evicted = each_value_or_died(
                echoes.len(),
                |i| Ok(echoes[i].get_timeout(BOUND)?.to_native() == i as u64),
                "evicted results",
            )?;
            check(*front.get_timeout(T)? == 300, "slow call")?;
            // Tasks: a worker kills itself with results of earlier tasks in its batch; each
            // task gets its value or `TaskFailed`, and the replaced pool runs the next ones.
            let mut tasks: Vec<_> = (0..300u64)
                .map(|i| rt.spawn(text_task, (i,)))
                .collect::<Result<_, _>>()?;
            // (A worker dies owing its 50th result.)
            kills()?.arm("trove::owing", "child", 50)?;
            let killer = rt.spawn(kill_worker, ())?;
            tasks.extend(
                (300..400u64)
                    .map(|i| rt.spawn(text_task, (i,)))
                    .collect::<Result<Vec<_>, _>>()?,
            );
            let mut died_tasks = 0;
            for (i, t) in tasks.iter().enumerate() {
                match t.get_timeout(BOUND) {
                    Ok(v) => check(v.as_str() == format!("{i:>1000}"), "task value")?,
                    Err(Error::TaskFailed(m)) if m.contains("died") => died_tasks += 1,
                    Err(e) => return Err(format!("task {i} gave {e}").into()),
                }
            }
            check(
                matches!(killer.get_timeout(BOUND), Err(Error::TaskFailed(_))),
                "the task that killed its worker",
            )?;
            check(
                rt.spawn(text_task, (7,))?.get_timeout(T)?.as_str() == format!("{:>1000}", 7),
                "the pool after a death",
            )?;
            drop((tasks, killer));
            check(kills()?.hit("trove::owing"), "a worker died owing")?;
            check(died_tasks >= 1, "a worker died owing a task's result")?;
            rt.kill(&slow)?;
            drop((texts, echoes, front, w, a, slow, busy));
            store_back_to(&rt, &base, "after the deaths")?;
            say(&format!("OK {died_stored} {died_evicted} {died_tasks}"));
        }
        ExecRole::LostResult => {
            let w = rt.actor(Worker::default)?;
            check(*w.call(Worker::echo, (1,))?.get_timeout(T)? == 1, "warm up")?;
            check(
                rt.spawn(big_task, (1,))?.get_timeout(T)?.len() == 64 << 10,
                "warm up",
            )?;
            let base = rt.stats()?;
            // The actor dies with its large result created and written, not sealed: the
            // daemon loses the object with it, and the caller learns the actor died.
            kills()?.arm("trove::writing", &w.pid().to_string(), 1)?;
            match w.call(Worker::big, (7,))?.get_timeout(BOUND) {
                Err(Error::ActorDied(_)) => {}
                other => return Err(format!("the lost result gave {other:?}").into()),
            }
            check(kills()?.hit("trove::writing"), "the actor died writing")?;
            // A worker, the same: the task failed.
            kills()?.arm("trove::writing", "child", 1)?;
            match rt.spawn(big_task, (8,))?.get_timeout(BOUND) {
                Err(Error::TaskFailed(m)) if m.contains("died") => {}
                other => return Err(format!("the lost task result gave {other:?}").into()),
            }
            check(kills()?.hit("trove::writing"), "the worker died writing")?;
            // The same when the caller comes late, after the reaper has abandoned the call's
            // record (the caller then finds it gone, not pending: it gave `ObjectLost`).
            kills()?.arm("trove::writing", "child", 1)?;
            let late = rt.spawn(big_task, (10,))?;
            let t = Instant::now();
            while !kills()?.hit("trove::writing") {
                check(
                    t.elapsed() < BOUND,
                    "the worker never reached the fail point",
                )?;
                std::thread::sleep(Duration::from_millis(5));
            }
            // The reaper looks every 20 ms.
            std::thread::sleep(Duration::from_millis(200));
            match late.get_timeout(BOUND) {
                Err(Error::TaskFailed(m)) if m.contains("died") => {}
                other => return Err(format!("a late get of the lost task gave {other:?}").into()),
            }
            // The pool runs on; nothing is left behind (no failure report pinned for us).
            check(
                rt.spawn(big_task, (9,))?.get_timeout(T)?[0] == 9,
                "the pool runs on",
            )?;
            store_back_to(&rt, &base, "after the lost results")?;
            say("OK");
        }
        ExecRole::LostCall { point } => {
            // `point` is the window: a consumer dies there with one call in hand.
            let point = point.as_str();
            let w = rt.actor(Worker::default)?;
            let other = rt.actor(Worker::default)?;
            check(*w.call(Worker::echo, (1,))?.get_timeout(T)? == 1, "warm up")?;
            check(
                *other.call(Worker::echo, (1,))?.get_timeout(T)? == 1,
                "warm up",
            )?;
            check(*rt.spawn(double, (1,))?.get_timeout(T)? == 2, "warm up")?;
            let base = rt.stats()?;
            // An actor: its next call is lost with it, and `get` (no timeout) says so.
            kills()?.arm(point, &w.pid().to_string(), 1)?;
            let t = Instant::now();
            let lost_call = w.call(Worker::echo, (5,))?;
            match lost_call.get() {
                Err(Error::ActorDied(_)) => {}
                other => return Err(format!("the lost call gave {other:?}").into()),
            }
            let took = t.elapsed();
            check(kills()?.hit(point), "the actor died at the fail point")?;
            check(took < BOUND, &format!("ActorDied after {took:?}"))?;
            match w.call(Worker::echo, (6,))?.get_timeout(BOUND) {
                Err(Error::ActorDied(_)) => {}
                other => return Err(format!("a later call gave {other:?}").into()),
            }
            check(
                *other.call(Worker::echo, (3,))?.get_timeout(T)? == 3,
                "another actor",
            )?;
            // A worker: its task fails, and the pool runs on, through more tasks than the
            // queue has slots (so the dead worker's slot is reused).
            kills()?.arm(point, "child", 1)?;
            let t = Instant::now();
            let lost_task = rt.spawn(double, (21,))?;
            match lost_task.get() {
                Err(Error::TaskFailed(m)) if m.contains("died") => {}
                other => return Err(format!("the lost task gave {other:?}").into()),
            }
            let took_task = t.elapsed();
            check(kills()?.hit(point), "a worker died at the fail point")?;
            check(
                took_task < BOUND,
                &format!("TaskFailed after {took_task:?}"),
            )?;
            let refs: Vec<_> = (0..5000u64)
                .map(|i| rt.spawn(double, (i,)))
                .collect::<Result<_, _>>()?;
            check(
                rt.get_all_timeout(&refs, T)? == (0..5000).map(|i| 2 * i).collect::<Vec<_>>(),
                "the pool after the death",
            )?;
            drop((lost_call, lost_task, refs));
            store_back_to(&rt, &base, "after the lost calls")?;
            say(&format!(
                "OK {} {}",
                took.as_millis(),
                took_task.as_millis()
            ));
        }
        ExecRole::ActorTypes => {
            let w = rt.actor_with(Worker::new, (3u64,))?;
            // A handle deserialised as another actor type: nothing is sent.
            let stored = rt.put(&w)?;
            let wrong: ActorHandle<Foo> =
                ObjectRef::<ActorHandle<Foo>>::from_id(stored.id()).deserialize()?;
            match wrong.call(Foo::reset, ()) {
                Err(Error::WrongActorType { id, expected }) => check(
                    id == w.id() && expected.ends_with("Foo"),
                    &format!("{id} {expected}"),
                )?,
                other => return Err(format!("a Worker called as Foo gave {other:?}").into()),
            }
            // Looked up by name as another type: refused at once; as its own type: found.
            let named = rt.actor_named("typed", Worker::default)?;
            match trove::runtime()?.get_actor::<Foo>("typed") {
                Err(Error::WrongActorType { id, .. }) => check(id == named.id(), "named id")?,
                other => return Err(format!("get_actor as Foo gave {other:?}").into()),
            }
            let found: ActorHandle<Worker> = trove::runtime()?.get_actor("typed")?;
            check(found.pid() == named.pid(), "found as Worker")?;
            // The same through a task (a handle deserialised in another process).
            check(
                rt.spawn(wrong_type_hop, (stored.clone(),))?
                    .get_timeout(T)?
                    .deserialize()?,
                "a task's wrongly typed handle",
            )?;
            // Both actors were left alone.
            check(
                w.call(Worker::seen, ())?.get_timeout(T)?.deserialize()? == [3],
                "state untouched",
            )?;
            say("OK");
        }
        ExecRole::NsOwner { done, .. } => {
            // Owns a named actor in its own (default) namespace, then waits for the test.
            let w = rt.actor_with(Worker::new, (7u64,))?;
            let _named = rt.actor_named("shared-name", Worker::default)?;
            check(
                trove::runtime()?.get_actor::<Worker>("shared-name").is_ok(),
                "found in its own namespace",
            )?;
            say(&format!("READY {}", rt.namespace()));
            let until = Instant::now() + T;
            while !done.exists() && Instant::now() < until {
                sleep(Duration::from_millis(10));
            }
            // It still serves.
            check(*w.call(Worker::echo, (5,))?.get_timeout(T)? == 5, "owner")?;
            say("OK");
        }
        ExecRole::NsOtherProgram { namespace, .. } => {
            check(rt.namespace() != namespace, "a namespace of its own")?;
            match trove::runtime()?.get_actor::<Worker>("shared-name") {
                Err(Error::NotFound(_)) => {}
                other => return Err(format!("another driver's name gave {other:?}").into()),
            }
            // The same name in its own namespace is free.
            let mine = rt.actor_named("shared-name", Worker::default)?;
            check(
                trove::runtime()?.get_actor::<Worker>("shared-name")?.pid() == mine.pid(),
                "its own",
            )?;
            // Naming the owner's namespace: an actor of another program, refused.
            match trove::runtime()?.get_actor_in::<Worker>(&namespace, "shared-name") {
                Err(Error::ForeignActor(_)) => {}
                other => return Err(format!("the other program's actor gave {other:?}").into()),
            }
            say("OK");
        }
        ExecRole::Order { n } => {
            let w = rt.actor(Worker::default)?;
            let refs: Vec<_> = (0..n)
                .map(|i| w.call(Worker::push, (i,)))
                .collect::<Result<_, _>>()?;
            let seen = w.call(Worker::seen, ())?.get_timeout(T)?.deserialize()?;
            check(seen == (0..n).collect::<Vec<_>>(), "order")?;
            drop(refs);
            say("OK");
        }
        ExecRole::Exit { leave } => {
            let a = rt.actor(Worker::default)?;
            let b = rt.actor(Worker::default)?;
            a.call(Worker::push, (1,))?.get_timeout(T)?;
            b.call(Worker::slow, (60_000,))?;
            say("RUNNING");
            if leave {
                // Leave (after the test has looked) without shutting down: every child must
                // still go.
                sleep(Duration::from_millis(1500));
                std::process::exit(0);
            }
            loop {
                sleep(Duration::from_secs(60));
            }
        }
    }
    drop(rt);
    Ok(())
}
