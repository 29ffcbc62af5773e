//! Load: more client processes than cores putting, getting and calling at once for a bounded
//! time, every value checked, the store back to its baseline while every client still runs,
//! and back to empty once they have gone.

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use trove::{Config, ObjectRef};

use crate::harness::register;
use crate::role::Role;
use crate::util::{Helper, TestStore, say, wait_until};

const T: Duration = Duration::from_secs(60);

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Blob {
    data: Vec<u8>,
    sum: u64,
}

fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

pub struct Checker;

impl Checker {
    fn new() -> Checker {
        Checker
    }
    fn check(&mut self, blob: ObjectRef<Blob>) -> trove::Result<bool> {
        let b = blob.get()?;
        Ok(checksum(&b.data) == b.sum.to_native())
    }
}

/// Waits (bounded) for the file `path` to exist: the test's barrier between phases.
fn await_file(path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let until = Instant::now() + T;
    while !path.exists() {
        if Instant::now() > until {
            return Err(format!("{} never appeared", path.display()).into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The barrier files, beside the store's socket directory.
fn barrier(socket: &Path, name: &str) -> std::path::PathBuf {
    socket
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("/nonexistent"))
        .join(name)
}

/// Role `LoadClient`: put, get, call, drop, until the time is up. Says
/// `READY` once its runtime and actor exist and waits for the `start` file; says `DONE`
/// once it has let everything go and waits for the `end` file, so that the test sees the
/// store back at its baseline while every client still runs.
pub fn load_role(socket: &Path, seed: u64, millis: u64) -> Result<(), Box<dyn std::error::Error>> {
    let mut x: u64 = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let rt = trove::init(Config::default().store(socket).num_cpus(1))?;
    let checker = rt.actor(Checker::new)?;
    say("READY");
    await_file(&barrier(socket, "start"))?;
    let until = Instant::now() + Duration::from_millis(millis);
    let mut live: VecDeque<ObjectRef<Blob>> = VecDeque::new();
    let (mut checked, mut calls) = (0u64, 0u64);
    while Instant::now() < until {
        let len = (next() % (48 << 10)) as usize;
        let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let sum = checksum(&data);
        let r = rt.put(&Blob { data, sum })?;
        let v = r.get_timeout(T)?;
        if checksum(&v.data) != v.sum.to_native() || v.sum.to_native() != sum {
            return Err("checksum mismatch on get".into());
        }
        checked += 1;
        if next() % 4 == 0 {
            if !*checker.call(Checker::check, (r.clone(),))?.get_timeout(T)? {
                return Err("checksum mismatch in the actor".into());
            }
            calls += 1;
        }
        live.push_back(r);
        if live.len() > 32 {
            live.pop_front();
        }
    }
    // Re-check what is still held, then let everything go.
    for r in &live {
        let v = r.get_timeout(T)?;
        if checksum(&v.data) != v.sum.to_native() {
            return Err("checksum mismatch at the end".into());
        }
        checked += 1;
    }
    drop(live);
    say(&format!("DONE {checked} {calls}"));
    await_file(&barrier(socket, "end"))?;
    Ok(())
}

pub fn load_many_clients_put_get_and_call_with_every_value_checked() {
    let store = TestStore::start("128MiB");
    let c = store.client();
    let procs = 2 * std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2);
    let mut helpers: Vec<Helper> = (0..procs)
        .map(|i| {
            Helper::start(Role::LoadClient {
                socket: store.socket.clone(),
                seed: i as u64 + 1,
                millis: 2000,
            })
        })
        .collect();
    for h in &mut helpers {
        h.expect_line("READY", T);
    }
    // Every client's runtime, pool and actor exist: this is what the store holds at rest.
    let base = c.stats().unwrap();
    std::fs::write(store.dir.path().join("start"), b"").unwrap();
    let start = Instant::now();
    let mut peak = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        let s = c.stats().unwrap();
        assert!(s.used + s.reserved <= s.capacity, "over capacity: {s:?}");
        peak = peak.max(s.used);
        std::thread::sleep(Duration::from_millis(50));
    }
    let (mut checked, mut calls) = (0u64, 0u64);
    for h in &mut helpers {
        let line = h.expect_line("DONE", T);
        let mut f = line.split_whitespace().skip(1);
        checked += f.next().unwrap().parse::<u64>().unwrap();
        calls += f.next().unwrap().parse::<u64>().unwrap();
    }
    // Everything each client made is dropped, and every client still runs.
    wait_until(
        T,
        "the store back at its baseline with every client alive",
        || {
            let s = c.stats().unwrap();
            s.used == base.used && s.objects == base.objects
        },
    );
    std::fs::write(store.dir.path().join("end"), b"").unwrap();
    for h in &mut helpers {
        assert!(h.wait(T).success());
    }
    assert!(peak > base.used && checked > 0 && calls > 0);
    eprintln!("load: {procs} processes, {checked} objects checked, {calls} actor checks");
    wait_until(T, "used bytes back to zero", || {
        let s = c.stats().unwrap();
        s.used == 0 && s.objects == 0 && s.pinned == 0
    });
}
register!(load_many_clients_put_get_and_call_with_every_value_checked);
