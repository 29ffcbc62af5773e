//! Faults: SIGKILL at seeded random moments of actors, task workers, client processes and the
//! daemon during a mixed workload. Survivors get typed errors, never a hang; the dead are
//! cleaned up; nothing is left behind.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use trove::{Config, Error, ObjectRef};

use crate::executor_actors::session_members;
use crate::harness::register;
use crate::role::{Role, StoreRole, TroveRole};
use crate::util::{Helper, TestStore, say, wait_until};

const T: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Keeper {
    seen: u64,
}

impl Keeper {
    fn keep(&mut self, data: ObjectRef<Vec<u64>>) -> trove::Result<u64> {
        let v = data.get()?;
        self.seen += 1;
        Ok(v.iter().map(|x| x.to_native()).sum())
    }
}

fn total(n: u64) -> u64 {
    n * (n - 1) / 2
}

fn sum_task(data: ObjectRef<Vec<u64>>) -> trove::Result<u64> {
    Ok(data.get()?.iter().map(|x| x.to_native()).sum())
}

/// Role `FaultDriver`: a workload of puts, actor calls and tasks until the test creates the
/// `quiet` file (or the store goes away). Prints `ACTOR <pid>` for each actor it starts and
/// counts what it saw. Once quiet, it checks the store back at its baseline while it, its
/// pool and its two current actors all still run, says `LIVE`, and waits to be killed.
pub fn driver_role(socket: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let _ = nix::unistd::setsid();
    let rt = trove::init(Config::default().store(socket).num_cpus(2))?;
    let quiet = socket
        .parent()
        .and_then(Path::parent)
        .ok_or("socket path")?
        .join("quiet");
    say("STARTED");
    let start_actor = || -> trove::Result<trove::ActorHandle<Keeper>> {
        let a = rt.actor(Keeper::default)?;
        say(&format!("ACTOR {}", a.pid()));
        Ok(a)
    };
    let mut actors = [start_actor()?, start_actor()?];
    // What the pool and two actors hold (a dead actor's mailbox goes with its last handle).
    let base = rt.stats()?;
    let (mut ok, mut died, mut task_failed) = (0u64, 0u64, 0u64);
    let mut i = 0u64;
    while !quiet.exists() {
        i += 1;
        if i.is_multiple_of(50) {
            say(&format!("STATS {ok} {died} {task_failed}"));
        }
        let n = 1 + i % 2000;
        let data = match rt.put(&(0..n).collect::<Vec<u64>>()) {
            Ok(d) => d,
            Err(Error::Disconnected) => break,
            Err(e) => return Err(format!("put: {e}").into()),
        };
        let k = (i % actors.len() as u64) as usize;
        let call = actors[k]
            .call(Keeper::keep, (data.clone(),))
            .and_then(|r| r.get_timeout(T).map(|v| *v));
        match call {
            Ok(s) if s == total(n) => ok += 1,
            Ok(s) => return Err(format!("actor summed {s}, not {}", total(n)).into()),
            Err(Error::ActorDied(_)) => {
                died += 1;
                match start_actor() {
                    Ok(a) => actors[k] = a,
                    Err(Error::Disconnected) => break,
                    Err(e) => return Err(format!("restart: {e}").into()),
                }
            }
            Err(Error::Disconnected) => break,
            Err(e) => return Err(format!("call: {e:?}").into()),
        }
        if i.is_multiple_of(5) {
            match rt
                .spawn(sum_task, (data,))
                .and_then(|r| r.get_timeout(T).map(|v| *v))
            {
                Ok(s) if s == total(n) => ok += 1,
                Ok(s) => return Err(format!("task summed {s}").into()),
                Err(Error::TaskFailed(_)) => task_failed += 1,
                Err(Error::Disconnected) => break,
                Err(e) => return Err(format!("task: {e:?}").into()),
            }
        }
    }
    if !quiet.exists() {
        say(&format!("DISCONNECTED {ok} {died} {task_failed}"));
        return Ok(());
    }
    say(&format!("STATS {ok} {died} {task_failed}"));
    let (objects, used) = (base.objects, base.used);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let st = rt.stats()?;
        if st.objects == objects && st.used == used {
            break;
        }
        if Instant::now() > until {
            return Err(format!(
                "live leak: store at {} objects / {} bytes, expected {objects} / {used}",
                st.objects, st.used
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Every actor alive still answers.
    for a in &actors {
        match a
            .call(Keeper::keep, (rt.put(&vec![1u64, 2])?,))?
            .get_timeout(T)
        {
            Ok(s) if *s == 3 => {}
            Ok(s) => return Err(format!("actor summed {}", *s).into()),
            Err(Error::ActorDied(_)) => {}
            Err(e) => return Err(format!("last call: {e}").into()),
        }
    }
    say(&format!("LIVE {objects} {used}"));
    std::thread::sleep(T);
    Ok(())
}

fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

pub fn fault_sigkill_actors_workers_clients_then_the_daemon() {
    let seed: u64 = std::env::var("TROVE_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261123);
    let mut next = rng(seed);
    let mut store = TestStore::start("256MiB");
    let c = store.client();
    let mut driver = Helper::start(Role::FaultDriver {
        socket: store.socket.clone(),
    });
    driver.expect_line("STARTED", T);
    let sid = driver.pid().as_raw();
    let mut actors: Vec<i32> = Vec::new();
    let mut faults = 0;
    let mut plain = Vec::new();
    let mut stats = String::new();
    let phase = Instant::now();
    while phase.elapsed() < Duration::from_secs(3) {
        for l in driver.take_lines() {
            if let Some(p) = l.strip_prefix("ACTOR ") {
                actors.push(p.parse().unwrap());
            }
            if l.starts_with("STATS") {
                stats = l.clone();
            }
            assert!(!l.starts_with("ERROR"), "driver failed: {l}");
        }
        std::thread::sleep(Duration::from_millis(50 + next() % 200));
        match next() % 3 {
            // An actor, mid-workload.
            0 if !actors.is_empty() => {
                let pid = actors.swap_remove((next() % actors.len() as u64) as usize);
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                faults += 1;
            }
            // A task worker (a process of the driver's session that is not a known actor, the
            // driver, or its zygote's parent chain): the zygote replaces it.
            1 => {
                let members = session_members(sid);
                let workers: Vec<i32> = members
                    .into_iter()
                    .filter(|p| *p != sid && !actors.contains(p) && is_worker(*p, sid))
                    .collect();
                if let Some(&w) = workers.get((next() % workers.len().max(1) as u64) as usize) {
                    let _ = kill(Pid::from_raw(w), Signal::SIGKILL);
                    faults += 1;
                }
            }
            // A plain client holding objects, killed while it holds them.
            _ => {
                let id = trove_store::ObjectId::random();
                c.put(id, &[3u8; 4096]).unwrap();
                plain.push(id);
                let mut h = Helper::start(Role::store(&store.socket, StoreRole::Pin { id }));
                h.expect_line("PINNED", T);
                h.kill9();
                faults += 1;
            }
        }
    }
    // Quiet: the driver stops and checks the store back at its baseline with every process
    // of its tree alive. The plain clients' objects go first: their holders were killed.
    c.delete(&plain).unwrap();
    std::fs::write(store.dir.path().join("quiet"), b"").unwrap();
    let live = driver.expect_line("LIVE", T);
    for l in driver.take_lines() {
        if l.starts_with("STATS") {
            stats = l;
        }
    }
    let f: Vec<u64> = stats
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    assert!(f.len() == 3 && f[0] > 0, "some work succeeded: {stats:?}");
    assert!(f[1] > 0, "killed actors were seen as ActorDied: {stats}");
    // The driver itself (a client with actors, workers and objects) dies: once its tree is
    // gone, nothing it held is left: the store is back to empty.
    driver.kill9();
    faults += 1;
    wait_until(
        Duration::from_secs(10),
        "every process of the driver's tree to exit",
        || session_members(sid).is_empty(),
    );
    wait_until(T, "used and pinned bytes back to zero", || {
        let s = c.stats().unwrap();
        s.used == 0 && s.pinned == 0 && s.objects == 0
    });
    // The daemon itself: a waiting survivor gets Disconnected, not a hang.
    let mut reader = Helper::start(Role::trove(
        &store.socket,
        TroveRole::WaitForever {
            id: trove_store::ObjectId::random(),
        },
    ));
    reader.expect_line("WAITING", T);
    kill(store.pid(), Signal::SIGKILL).unwrap();
    faults += 1;
    let line = reader.expect_line("FAILED", Duration::from_secs(5));
    assert!(line.contains("Disconnected"), "{line}");
    assert!(reader.wait(T).success());
    eprintln!("faults: seed {seed}, {faults} kills; the driver saw {stats}; {live}");
    let _ = store.stop();
}
register!(fault_sigkill_actors_workers_clients_then_the_daemon);

/// A worker is a grandchild of the driver (child of the zygote, which is the driver's child)
/// that is not an actor; actors are also grandchildren, so the caller filters them out.
fn is_worker(pid: i32, driver: i32) -> bool {
    let ppid = |p: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    ppid(pid).and_then(ppid) == Some(driver)
}
