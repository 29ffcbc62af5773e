//! Helper roles for the runtime in every process and for actors' lifetimes (`LifeRole`):
//! each is a driver that calls `trove::init` on its main thread, in a session of its own, and
//! prints `OK ...` once everything it checked held (the store back at its baseline with its
//! processes alive included).

use std::path::PathBuf;
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use trove::{ActorHandle, ActorOptions, Config, Error, ObjectRef};

use crate::role::LifeRole;
use crate::util::{check, say, store_back_to};

type Res = Result<(), Box<dyn std::error::Error>>;

const T: Duration = Duration::from_secs(30);

/// Whether process `pid` is running (not gone, not a zombie waiting to be reaped).
pub fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

/// Waits (at most `limit`) for process `pid` to stop running; how long it took.
fn gone_within(pid: i32, limit: Duration, what: &str) -> Result<Duration, String> {
    let t = Instant::now();
    while running(pid) {
        if t.elapsed() > limit {
            return Err(format!("{what} (pid {pid}) still runs after {limit:?}"));
        }
        sleep(Duration::from_millis(5));
    }
    Ok(t.elapsed())
}

/// A marker file for calls that crash their process the first time only.
fn marker(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("trove-life-{}-{name}", std::process::id()))
}

/// An actor that counts, sleeps, keeps handles, starts actors of its own, and crashes on
/// demand.
#[derive(Default)]
pub struct Counter {
    n: u64,
    held: Vec<ActorHandle<Counter>>,
}

impl Counter {
    fn incr(&mut self) -> u64 {
        self.n += 1;
        self.n
    }
    fn pid(&mut self) -> i32 {
        std::process::id() as i32
    }
    /// Whether this process's link to the zygote (fd 3) is closed on exec: a program the
    /// actor runs must not inherit it.
    fn link_closes_on_exec(&mut self) -> bool {
        std::fs::read_to_string("/proc/self/fdinfo/3")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            })
            .is_some_and(|flags| flags & 0o2000000 != 0)
    }
    fn slow(&mut self, ms: u64) -> u64 {
        sleep(Duration::from_millis(ms));
        ms
    }
    /// `len` bytes after `ms`: a result that must go through the store.
    fn bytes_after(&mut self, ms: u64, len: u64) -> Vec<u8> {
        sleep(Duration::from_millis(ms));
        vec![1; len as usize]
    }
    fn keep(&mut self, h: ActorHandle<Counter>) {
        self.held.push(h);
    }
    fn drop_all(&mut self) {
        self.held.clear();
    }
    /// Starts an actor named `name` (owned by this process; `detached` if asked), keeps its
    /// handle, and returns its pid.
    fn start_named(&mut self, name: String, detached: bool) -> trove::Result<i32> {
        let rt = trove::runtime()?;
        let h = rt.actor_options(
            &ActorOptions::new().name(name).detached(detached),
            Counter::default,
            (),
        )?;
        let pid = h.call(Counter::pid, ())?.get_timeout(T)?.deserialize()?;
        self.held.push(h);
        Ok(pid)
    }
    /// Aborts its process the first time it is called with `path` absent, else returns 7.
    fn crash_once(&mut self, path: String) -> u64 {
        crash_once_at(&path)
    }
}

fn crash_once_at(path: &str) -> u64 {
    if std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .is_ok()
    {
        std::process::abort();
    }
    7
}

/// A threaded actor's state: `Send + Sync`.
#[derive(Default)]
pub struct Pool {
    naps: std::sync::atomic::AtomicU64,
    log: Vec<u64>,
}

impl Pool {
    fn nap(&self, ms: u64) -> u64 {
        self.naps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        sleep(Duration::from_millis(ms));
        ms
    }
    fn note(&mut self, x: u64) {
        self.log.push(x);
    }
    fn log(&self) -> Vec<u64> {
        self.log.clone()
    }
    fn pid(&self) -> i32 {
        std::process::id() as i32
    }
}

fn square(x: u64) -> u64 {
    x * x
}

fn sleepy(ms: u64) -> u64 {
    sleep(Duration::from_millis(ms));
    ms
}

fn crash_task_once(path: String) -> u64 {
    crash_once_at(&path)
}

/// A task that puts `n` objects, spawns `n` tasks, waits for all of them and sums
/// everything.
fn put_and_wait(n: u64) -> trove::Result<u64> {
    let rt = trove::runtime()?;
    let objects = (0..n)
        .map(|i| rt.put(&i))
        .collect::<trove::Result<Vec<ObjectRef<u64>>>>()?;
    let tasks = (0..n)
        .map(|i| rt.spawn(square, (i,)))
        .collect::<trove::Result<Vec<_>>>()?;
    let (ready, pending) = rt.wait(&tasks, tasks.len(), Some(T))?;
    if ready.len() != tasks.len() || !pending.is_empty() {
        return Err(Error::TaskFailed(format!(
            "wait: {} ready, {} pending",
            ready.len(),
            pending.len()
        )));
    }
    Ok(rt.get_all(&objects)?.iter().sum::<u64>() + rt.get_all(&tasks)?.iter().sum::<u64>())
}

/// A task that starts an actor (owned by its worker), calls it once and hands it back.
fn start_actor_in_task() -> trove::Result<ActorHandle<Counter>> {
    let h = trove::runtime()?.actor(Counter::default)?;
    h.call(Counter::incr, ())?.get_timeout(T)?;
    Ok(h)
}

/// A task that kills an actor it was handed.
fn kill_in_task(h: ActorHandle<Counter>) -> trove::Result<()> {
    trove::runtime()?.kill(&h)
}

/// A task that finds the actor named `name` and calls it.
fn find_and_call(name: String) -> trove::Result<u64> {
    let h: ActorHandle<Counter> = trove::runtime()?.get_actor(&name)?;
    h.call(Counter::incr, ())?.get_timeout(T)?.deserialize()
}

/// Spawns two tasks one level down and gets both: 2^depth leaves.
fn tree_task(depth: u32) -> trove::Result<u64> {
    if depth == 0 {
        return Ok(1);
    }
    let rt = trove::runtime()?;
    let a = rt.spawn(tree_task, (depth - 1,))?;
    let b = rt.spawn(tree_task, (depth - 1,))?;
    Ok(a.deserialize()? + b.deserialize()?)
}

pub fn helper_role(role: LifeRole) -> Res {
    let _ = nix::unistd::setsid();
    let mut cfg = Config::default().memory(512 << 20).num_cpus(2);
    match role {
        // A mailbox is 512 KiB of the store.
        LifeRole::Many { n } => cfg = cfg.memory((256 << 20) + n * (1 << 20)),
        LifeRole::Restarts => cfg = cfg.task_max_retries(1),
        LifeRole::Cancel => cfg = cfg.num_cpus(1),
        LifeRole::Full => cfg = cfg.memory(64 << 20),
        LifeRole::Recursive { cpus, .. } => cfg = cfg.num_cpus(cpus as usize),
        _ => {}
    }
    let rt = trove::init(cfg)?;
    let base = rt.stats()?;
    match role {
        LifeRole::Everywhere => {
            // Tasks put, spawn tasks and wait.
            let n = 20;
            let got = rt
                .spawn(put_and_wait, (n,))?
                .get_timeout(T)?
                .deserialize()?;
            let want: u64 = (0..n).sum::<u64>() + (0..n).map(|i| i * i).sum::<u64>();
            check(got == want, &format!("a task's puts and waits gave {got}"))?;
            // A task starts an actor and hands its handle back here.
            let h = rt
                .spawn(start_actor_in_task, ())?
                .get_timeout(T)?
                .deserialize()?;
            let n = h.call(Counter::incr, ())?.get_timeout(T)?.deserialize()?;
            check(n == 2, &format!("the task's actor counted {n}"))?;
            // An actor starts a named actor; a task finds it by name.
            let c = rt.actor(Counter::default)?;
            check(
                c.call(Counter::link_closes_on_exec, ())?
                    .get_timeout(T)?
                    .deserialize()?,
                "the zygote link is inherited by programs an actor runs",
            )?;
            c.call(Counter::start_named, ("found-by-task".to_string(), false))?
                .get_timeout(T)?;
            let n = rt
                .spawn(find_and_call, ("found-by-task".to_string(),))?
                .get_timeout(T)?
                .deserialize()?;
            check(n == 1, &format!("the named actor counted {n}"))?;
            let found: ActorHandle<Counter> = rt.get_actor("found-by-task")?;
            check(
                found
                    .call(Counter::incr, ())?
                    .get_timeout(T)?
                    .deserialize()?
                    == 2,
                "the driver found the named actor",
            )?;
            // `wait` over calls' results: the first ready ones, in input order.
            let (slow_actor, fast_actor) =
                (rt.actor(Counter::default)?, rt.actor(Counter::default)?);
            let slow = slow_actor.call(Counter::slow, (300,))?;
            let fast1 = fast_actor.call(Counter::slow, (1,))?;
            let fast2 = fast_actor.call(Counter::slow, (2,))?;
            let refs = [slow.clone(), fast1.clone(), fast2.clone()];
            let (ready, pending) = rt.wait(&refs, 1, Some(T))?;
            check(
                ready.iter().map(|r| r.id()).eq([fast1.id()])
                    && pending.iter().map(|r| r.id()).eq([slow.id(), fast2.id()]),
                "wait(1) over calls",
            )?;
            // (The first pair goes now: shadowed, it would live to the end of the block.)
            drop((ready, pending));
            let (ready, pending) = rt.wait(&refs, 3, Some(T))?;
            check(ready.len() == 3 && pending.is_empty(), "wait(3) over calls")?;
            check(
                rt.get_all(&refs)? == [300, 1, 2],
                "the waited calls' values",
            )?;
            drop((
                slow_actor, fast_actor, slow, fast1, fast2, refs, ready, pending,
            ));
            // A task kills an actor.
            let doomed = rt.actor(Counter::default)?;
            let doomed_pid = doomed
                .call(Counter::pid, ())?
                .get_timeout(T)?
                .deserialize()?;
            rt.spawn(kill_in_task, (doomed.clone(),))?.get_timeout(T)?;
            gone_within(
                doomed_pid,
                Duration::from_secs(5),
                "the actor a task killed",
            )?;
            match doomed.call(Counter::incr, ())?.get_timeout(T) {
                Err(Error::ActorDied(_)) => {}
                other => return Err(format!("a call after a task's kill: {other:?}").into()),
            }
            drop((h, c, found, doomed));
            store_back_to(&rt, &base, "after the runtime in tasks and actors")?;
            say("OK");
        }
        LifeRole::LastHandle => {
            let a = rt.actor(Counter::default)?;
            let b = rt.actor(Counter::default)?;
            let a_pid = a.call(Counter::pid, ())?.get_timeout(T)?.deserialize()?;
            // Another process holds a handle: dropping ours leaves the actor running.
            b.call(Counter::keep, (a.clone(),))?.get_timeout(T)?;
            let queued = a.call(Counter::slow, (200,))?;
            drop(a);
            sleep(Duration::from_millis(300));
            check(running(a_pid), "the actor stopped while a handle was left")?;
            // Its queued call still runs and answers.
            check(
                queued.get_timeout(T)?.deserialize()? == 200,
                "the queued call",
            )?;
            drop(queued);
            // The last handle goes, in the other process.
            b.call(Counter::drop_all, ())?.get_timeout(T)?;
            let took = gone_within(a_pid, Duration::from_secs(1), "the unreferenced actor")?;
            // A handle inside a stored object counts too.
            let c = rt.actor(Counter::default)?;
            let c_pid = c.call(Counter::pid, ())?.get_timeout(T)?.deserialize()?;
            let stored = rt.put(&c)?;
            drop(c);
            sleep(Duration::from_millis(300));
            check(
                running(c_pid),
                "an actor whose handle is in an object stopped",
            )?;
            let back: ActorHandle<Counter> = stored.deserialize()?;
            check(
                back.call(Counter::incr, ())?
                    .get_timeout(T)?
                    .deserialize()?
                    == 1,
                "the handle read back from the object",
            )?;
            drop((stored, back));
            gone_within(c_pid, Duration::from_secs(1), "the actor whose object went")?;
            // A dead process's handles count as dropped.
            let e = rt.actor(Counter::default)?;
            let e_pid = e.call(Counter::pid, ())?.get_timeout(T)?.deserialize()?;
            b.call(Counter::keep, (e,))?.get_timeout(T)?;
            sleep(Duration::from_millis(300));
            check(running(e_pid), "the actor stopped while a handle was left")?;
            let b_pid = b.call(Counter::pid, ())?.get_timeout(T)?.deserialize()?;
            kill(Pid::from_raw(b_pid), Signal::SIGKILL)?;
            gone_within(e_pid, Duration::from_secs(2), "the actor whose holder died")?;
            drop(b);
            store_back_to(&rt, &base, "after the actors stopped")?;
            say(&format!("OK {}", took.as_millis()));
        }
        LifeRole::Detached => {
            let owner = rt.actor(Counter::default)?;
            let det_pid = owner
                .call(Counter::start_named, ("kept".to_string(), true))?
                .get_timeout(T)?
                .deserialize()?;
            let att_pid = owner
                .call(Counter::start_named, ("owned".to_string(), false))?
                .get_timeout(T)?
                .deserialize()?;
            // A detached actor without a name is refused.
            match rt.actor_options(&ActorOptions::new().detached(true), Counter::default, ()) {
                Err(Error::Options(_)) => {}
                other => return Err(format!("a nameless detached actor: {other:?}").into()),
            }
            // A name is taken while its actor lives.
            match rt.actor_named("kept", Counter::default) {
                Err(Error::Store(trove::store::StoreError::AlreadyExists(_))) => {}
                other => return Err(format!("a taken name: {other:?}").into()),
            }
            rt.kill(&owner)?;
            drop(owner);
            // The owner's own actor dies with it; the detached one lives on.
            gone_within(att_pid, Duration::from_secs(5), "the owned actor")?;
            check(running(det_pid), "the detached actor died with its owner")?;
            let kept: ActorHandle<Counter> = rt.get_actor("kept")?;
            check(
                kept.call(Counter::incr, ())?
                    .get_timeout(T)?
                    .deserialize()?
                    == 1,
                "the detached actor answers",
            )?;
            check(
                rt.spawn(find_and_call, ("kept".to_string(),))?
                    .get_timeout(T)?
                    .deserialize()?
                    == 2,
                "a task finds the detached actor",
            )?;
            // With no handle left anywhere, it still lives (and is found by name).
            drop(kept);
            sleep(Duration::from_millis(300));
            check(
                running(det_pid),
                "the detached actor stopped without handles",
            )?;
            let kept: ActorHandle<Counter> = rt.get_actor("kept")?;
            // The owned actor's name is free again.
            let t = Instant::now();
            while !matches!(rt.get_actor::<Counter>("owned"), Err(Error::NotFound(_))) {
                check(t.elapsed() < T, "the dead actor's name stayed taken")?;
                sleep(Duration::from_millis(10));
            }
            let again = rt.actor_named("owned", Counter::default)?;
            rt.kill(&kept)?;
            gone_within(det_pid, Duration::from_secs(5), "the killed detached actor")?;
            let t = Instant::now();
            while !matches!(rt.get_actor::<Counter>("kept"), Err(Error::NotFound(_))) {
                check(t.elapsed() < T, "the killed actor's name stayed taken")?;
                sleep(Duration::from_millis(10));
            }
            drop((kept, again));
            store_back_to(&rt, &base, "after the detached actor was killed")?;
            say("OK");
        }
        LifeRole::Restarts => {
            let kill9 = |pid: i32| kill(Pid::from_raw(pid), Signal::SIGKILL);
            let a = rt.actor_options(&ActorOptions::new().max_restarts(2), Counter::default, ())?;
            let mut pids = Vec::new();
            for round in 0..3 {
                let n = a.call(Counter::incr, ())?.get_timeout(T)?.deserialize()?;
                check(
                    n == 1,
                    &format!("round {round}: a fresh instance counted {n}"),
                )?;
                let pid = a.call(Counter::pid, ())?.get_timeout(T)?.deserialize()?;
                check(a.pid() == pid, "the handle names the running process")?;
                pids.push(pid);
                kill9(pid)?;
                gone_within(pid, Duration::from_secs(5), "the SIGKILLed actor")?;
            }
            check(
                pids[0] != pids[1] && pids[1] != pids[2],
                "each restart a new process",
            )?;
            // Restarts are used up: the third death is final.
            match a.call(Counter::incr, ())?.get_timeout(T) {
                Err(Error::ActorDied(_)) => {}
                other => return Err(format!("after the third kill: {other:?}").into()),
            }
            // A call in flight at a death runs again on the next instance (at least once).
            let m = marker("actor-retry");
            let r = rt.actor_options(
                &ActorOptions::new().max_restarts(1).max_task_retries(1),
                Counter::default,
                (),
            )?;
            let seven = r
                .call(Counter::crash_once, (m.display().to_string(),))?
                .get_timeout(T)?
                .deserialize()?;
            check(seven == 7, "the retried call's value")?;
            let _ = std::fs::remove_file(&m);
            // Without retries it fails (at most once), and the restarted actor serves on.
            let m = marker("actor-no-retry");
            let n = rt.actor_options(&ActorOptions::new().max_restarts(1), Counter::default, ())?;
            match n
                .call(Counter::crash_once, (m.display().to_string(),))?
                .get_timeout(T)
            {
                Err(Error::ActorDied(_)) => {}
                other => return Err(format!("a call without retries: {other:?}").into()),
            }
            let _ = std::fs::remove_file(&m);
            check(
                n.call(Counter::incr, ())?.get_timeout(T)?.deserialize()? == 1,
                "the restarted actor after a failed call",
            )?;
            // Tasks: this driver runs them again once (`task_max_retries(1)`).
            let m = marker("task-retry");
            let seven = rt
                .spawn(crash_task_once, (m.display().to_string(),))?
                .get_timeout(T)?
                .deserialize()?;
            let _ = std::fs::remove_file(&m);
            check(seven == 7, "the retried task's value")?;
            drop((a, r, n));
            store_back_to(&rt, &base, "after restarts and retries")?;
            say("OK");
        }
        LifeRole::Cancel => {
            // An actor's queued call, cancelled: never runs, fails with Cancelled.
            let a = rt.actor(Counter::default)?;
            let busy = a.call(Counter::slow, (500,))?;
            let queued = a.call(Counter::incr, ())?;
            check(rt.cancel(&queued, false)?, "cancel of a queued call")?;
            check(
                busy.get_timeout(T)?.deserialize()? == 500,
                "the running call",
            )?;
            match queued.get_timeout(T) {
                Err(Error::Cancelled) => {}
                other => return Err(format!("a cancelled call gave {other:?}").into()),
            }
            check(
                a.call(Counter::incr, ())?.get_timeout(T)?.deserialize()? == 1,
                "the cancelled call never ran",
            )?;
            // Tasks on one worker: a queued one cancelled; the running one cancelled by force.
            let running_task = rt.spawn(sleepy, (5_000,))?;
            sleep(Duration::from_millis(300));
            let waiting = rt.spawn(square, (3,))?;
            check(rt.cancel(&waiting, false)?, "cancel of a queued task")?;
            let t = Instant::now();
            check(rt.cancel(&running_task, true)?, "forced cancel")?;
            match running_task.get_timeout(T) {
                Err(Error::Cancelled) => {}
                other => return Err(format!("a force-cancelled task gave {other:?}").into()),
            }
            let took = t.elapsed();
            check(
                took < Duration::from_secs(3),
                &format!("the forced cancel took {took:?} (the task sleeps 5 s)"),
            )?;
            match waiting.get_timeout(T) {
                Err(Error::Cancelled) => {}
                other => return Err(format!("a cancelled task gave {other:?}").into()),
            }
            // Its worker was killed and replaced: a task runs at once (the one worker would
            // otherwise sleep for 5 s still).
            let done = rt.spawn(square, (4,))?;
            check(
                done.get_timeout(Duration::from_secs(3))?.deserialize()? == 16,
                "a task after the forced cancel",
            )?;
            // A finished call is not cancelled.
            check(!rt.cancel(&done, true)?, "cancel of a finished task")?;
            check(done.get_timeout(T)?.deserialize()? == 16, "its value stays")?;
            drop((a, busy, queued, running_task, waiting, done));
            store_back_to(&rt, &base, "after cancels")?;
            say(&format!("OK {}", took.as_millis()));
        }
        LifeRole::Threaded => {
            let p = rt.threaded_actor(&ActorOptions::new(), 8, Pool::default, ())?;
            let pid = p.call(Pool::pid, ())?.get_timeout(T)?.deserialize()?;
            // Eight `&self` calls of 100 ms each overlap.
            let t = Instant::now();
            let naps = (0..8)
                .map(|_| p.call(Pool::nap, (100,)))
                .collect::<trove::Result<Vec<_>>>()?;
            check(
                rt.get_all_timeout(&naps, T)?.iter().all(|ms| *ms == 100),
                "the naps' values",
            )?;
            let took = t.elapsed();
            check(
                took < Duration::from_millis(500),
                &format!("8 calls of 100 ms took {took:?} on 8 threads"),
            )?;
            // `&mut self` calls run one at a time: none is lost.
            let notes = (0..200)
                .map(|i| p.call(Pool::note, (i,)))
                .collect::<trove::Result<Vec<_>>>()?;
            rt.get_all_timeout(&notes, T)?;
            let mut log = p.call(Pool::log, ())?.get_timeout(T)?.deserialize()?;
            log.sort_unstable();
            check(log == (0..200).collect::<Vec<u64>>(), "every note, once")?;
            // Its handles gone, every thread stops and the process ends.
            drop((p, naps, notes));
            gone_within(pid, Duration::from_secs(1), "the threaded actor")?;
            store_back_to(&rt, &base, "after the threaded actor")?;
            say(&format!("OK {}", took.as_millis()));
        }
        LifeRole::Full => {
            let actors = (0..4)
                .map(|_| rt.actor(Counter::default))
                .collect::<trove::Result<Vec<_>>>()?;
            for a in &actors {
                a.call(Counter::incr, ())?.get_timeout(T)?;
            }
            let mut kept = Vec::new();
            let detail = loop {
                match rt.put_slice(&vec![7u8; 8 << 20]) {
                    Ok(r) => kept.push(r),
                    Err(Error::StoreFull { detail, .. }) => break detail,
                    Err(e) => return Err(e.into()),
                }
                check(kept.len() < 64, "a 64 MiB store never filled")?;
            };
            // trove's mailboxes apart, then the user's objects by the process pinning them.
            let me = std::process::id();
            check(
                detail.contains("trove's mailboxes and queues")
                    && !detail.contains("mailboxes and queues 0 B"),
                &format!("no mailboxes counted: {detail}"),
            )?;
            check(
                detail.contains(&format!("pinned by pid {me} {}.0 MiB", kept.len() * 8)),
                &format!("the driver's objects: {detail}"),
            )?;
            // The rest filled too, down to 64 bytes: a result that cannot be stored, nor a
            // report of that, fails its call (its caller waiting in the store meanwhile)
            // instead of leaving the caller waiting for good.
            let mut size = 4 << 20;
            while size >= 64 {
                match rt.put_slice(&vec![7u8; size]) {
                    Ok(r) => kept.push(r),
                    Err(Error::StoreFull { .. }) => size /= 2,
                    Err(e) => return Err(e.into()),
                }
            }
            let failed = actors[0]
                .call(Counter::bytes_after, (50, 64 << 10))?
                .get_timeout(T);
            check(
                matches!(&failed, Err(Error::ActorDied(m) | Error::TaskFailed(m))
                    if m.contains("store") || m.contains("could not store")),
                &format!("a result that does not fit: {:?}", failed.map(|_| ())),
            )?;
            // The actor lives on, and answers once there is room.
            drop(kept);
            let n = actors[0]
                .call(Counter::incr, ())?
                .get_timeout(T)?
                .deserialize()?;
            check(n == 2, &format!("the actor counted {n} after"))?;
            drop(actors);
            store_back_to(&rt, &base, "after the full store")?;
            say(&format!("OK {detail}"));
        }
        LifeRole::Many { n } => {
            let t = Instant::now();
            let actors = (0..n)
                .map(|_| rt.actor(Counter::default))
                .collect::<trove::Result<Vec<_>>>()?;
            let pid_refs = actors
                .iter()
                .map(|a| a.call(Counter::pid, ()))
                .collect::<trove::Result<Vec<_>>>()?;
            let pids = rt.get_all_timeout(&pid_refs, T)?;
            drop(pid_refs);
            let started = t.elapsed();
            check(
                pids.iter().all(|p| running(*p)),
                "every actor's process runs",
            )?;
            // All alive at once, each answering (its own state).
            let counts = actors
                .iter()
                .map(|a| a.call(Counter::incr, ()))
                .collect::<trove::Result<Vec<_>>>()?;
            check(
                rt.get_all_timeout(&counts, T)?.iter().all(|c| *c == 1),
                "every actor counted once",
            )?;
            drop((actors, counts));
            let t = Instant::now();
            for p in &pids {
                gone_within(*p, Duration::from_secs(20), "an actor without handles")?;
            }
            let stopped = t.elapsed();
            store_back_to(&rt, &base, "after the actors stopped")?;
            say(&format!(
                "OK started {} ms, stopped {} ms",
                started.as_millis(),
                stopped.as_millis()
            ));
        }
        LifeRole::Recursive { depth, cpus } => {
            // This driver's tree: itself, the store, the zygote and the pool.
            let me = std::process::id() as i32;
            let tree = || crate::executor_actors::session_members(me).len() as u64;
            let before = tree();
            check(before == 3 + cpus, &format!("{before} processes before"))?;
            let t = Instant::now();
            let leaves = rt
                .spawn(tree_task, (depth as u32,))?
                .get_timeout(T)?
                .deserialize()?;
            check(leaves == 1 << depth, &format!("{leaves} leaves"))?;
            let took = t.elapsed();
            // The extra workers retire once idle: the pool shrinks back.
            let t = Instant::now();
            while tree() > before {
                check(
                    t.elapsed() < T,
                    &format!("{} processes left of {before}", tree()),
                )?;
                sleep(Duration::from_millis(20));
            }
            store_back_to(&rt, &base, "after the recursive tasks")?;
            say(&format!("OK {}", took.as_millis()));
        }
    }
    Ok(())
}
