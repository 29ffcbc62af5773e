//! `trove::init` a second time: an error by default; with `ignore_reinit_error` a handle to
//! the running runtime, in the driver and inside a task, that stops nothing when dropped.

use std::time::Duration;

use trove::{Config, Error, ObjectRef};

use crate::harness::register;
use crate::role::Role;
use crate::util::{Helper, check, say};

type Res = Result<(), Box<dyn std::error::Error>>;

const T: Duration = Duration::from_secs(30);

pub fn client_second_init_is_an_error_unless_ignored() {
    let mut h = Helper::start(Role::Reinit);
    h.expect_line("OK", Duration::from_secs(60));
    assert!(h.wait(T).success());
}
register!(client_second_init_is_an_error_unless_ignored);

pub fn client_default_store_is_sized_by_memory_and_holds_1_gib() {
    let mut h = Helper::start(Role::DefaultStore);
    h.expect_line("OK", Duration::from_secs(120));
    assert!(h.wait(T).success());
}
register!(client_default_store_is_sized_by_memory_and_holds_1_gib);

/// `Config::hugepages` on any machine: huge pages where it has them (the pool or transparent
/// ones), else a typed refusal that says how to get them, after which `init` without them
/// works. Either way a large object made by the driver reads right in a task.
pub fn client_hugepages_are_used_or_refused_with_a_typed_error_then_base_pages_work() {
    let mut h = Helper::start(Role::HugePages);
    h.expect_line("OK", Duration::from_secs(120));
    assert!(h.wait(T).success());
}
register!(client_hugepages_are_used_or_refused_with_a_typed_error_then_base_pages_work);

/// The page kind of the store's arena, as a task sees it, and a checksum of the object.
fn pages_and_sum(r: ObjectRef<[u8]>) -> trove::Result<(u8, u64)> {
    let pages = trove::runtime()?.store().arena().pages() as u8;
    let sum = r.get()?.iter().map(|&b| b as u64).sum();
    Ok((pages, sum))
}

pub fn huge_pages_role() -> Res {
    use trove::store::StoreError;
    use trove::store::shm::Pages;
    let _ = nix::unistd::setsid();
    // SAFETY: single-threaded (before init, which checks it); nobody reads the environment
    // concurrently.
    unsafe {
        std::env::remove_var("TROVE_STORE");
        std::env::remove_var("TROVE_HUGEPAGES");
    }
    let cfg = || Config::default().memory(256 << 20).num_cpus(1);
    let rt = match trove::init(cfg().hugepages(true)) {
        Ok(rt) => {
            let pages = rt.store().arena().pages();
            check(pages != Pages::Base, "a store on huge pages")?;
            if let Some(want) = crate::util::expected_pages() {
                check(
                    format!("{pages:?}") == want,
                    &format!("{pages:?} where {want} was set up"),
                )?;
            }
            say(&format!("huge pages: {pages:?}"));
            rt
        }
        Err(Error::Store(StoreError::NoHugePages(why))) => {
            check(
                crate::util::refusal_expected(),
                &format!("refused where huge pages were set up: {why}"),
            )?;
            for says in ["vm.nr_hugepages", "shmem_enabled"] {
                check(why.contains(says), &format!("{says:?} not in {why:?}"))?;
            }
            say(&format!("no huge pages here ({why}): base pages"));
            // The refusal started nothing: init without huge pages works.
            let rt = trove::init(cfg())?;
            check(
                rt.store().arena().pages() == Pages::Base,
                "the fallback's store on base pages",
            )?;
            rt
        }
        Err(e) => return Err(e.into()),
    };
    let base = rt.stats()?;
    // 96 MiB: populated by the driver on several threads (the cold path of a large put).
    let len = 96 << 20;
    let data = crate::util::pattern(11, len);
    let want: u64 = data.iter().map(|&b| b as u64).sum();
    let mut b = rt.create::<u8>(len)?;
    b.copy_from_slice(&data);
    let r = b.seal()?;
    let (pages, sum) = rt
        .spawn(pages_and_sum, (r.clone(),))?
        .get_timeout(T)?
        .deserialize()?;
    check(
        pages == rt.store().arena().pages() as u8,
        "the task's arena on the driver's kind of pages",
    )?;
    check(
        sum == want,
        &format!("sum {sum} read in a task, {want} put"),
    )?;
    drop(r);
    crate::util::store_back_to(&rt, &base, "after the large object")?;
    say("OK");
    Ok(())
}

/// A task in another process reads a few bytes of a large object.
fn sample(r: ObjectRef<[u8]>, at: Vec<u64>) -> trove::Result<Vec<u8>> {
    let v = r.get()?;
    Ok(at.iter().map(|&i| v[i as usize]).collect())
}

pub fn default_store_role() -> Res {
    let _ = nix::unistd::setsid();
    // SAFETY: single-threaded (before init, which checks it); nobody reads the environment
    // concurrently.
    unsafe {
        std::env::remove_var("TROVE_MEMORY");
        std::env::remove_var("TROVE_STORE");
    }
    let rt = trove::init(Config::default().num_cpus(1))?;
    let base = rt.stats()?;
    let want = trove::default_memory();
    check(
        base.capacity == want,
        &format!("capacity {} for a default of {want}", base.capacity),
    )?;
    // Ray's rule, 30% of the machine's memory (or /dev/shm's free space if less).
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or("no MemTotal")?;
    check(
        want <= total_kib * 1024 / 10 * 3 && want >= 64 << 20,
        &format!("default {want} for {total_kib} KiB of memory"),
    )?;
    const GIB: usize = 1 << 30;
    if want < (GIB as u64) + (64 << 20) {
        // A machine this small gets a store too small for 1 GiB by the rule itself.
        say(&format!(
            "a store of {want} bytes by default: no room for 1 GiB"
        ));
        say("OK");
        return Ok(());
    }
    let mut b = rt.create::<u8>(GIB)?;
    for (i, page) in b.chunks_mut(4096).enumerate() {
        page[0] = i as u8;
    }
    let r = b.seal()?;
    let at = vec![0, 4096 * 7, (GIB - 4096) as u64];
    let got = rt
        .spawn(sample, (r.clone(), at))?
        .get_timeout(T)?
        .deserialize()?;
    check(
        got == [0, 7, ((GIB / 4096 - 1) % 256) as u8],
        &format!("read back {got:?}"),
    )?;
    drop(r);
    crate::util::store_back_to(&rt, &base, "after the 1 GiB object")?;
    say("OK");
    Ok(())
}

#[derive(Default)]
pub struct Echo;

impl Echo {
    fn echo(&mut self, x: u64) -> u64 {
        x
    }
}

/// A task that reaches its process's runtime through `init` and puts an object there, and
/// starts an actor from there (the zygote forks it, as for the driver).
fn put_in_task(x: u64) -> trove::Result<ObjectRef<u64>> {
    let rt = trove::init(Config::default().ignore_reinit_error(true))?;
    let r = rt.put(&(x * 3))?;
    let echo = rt.actor(Echo::default)?;
    assert_eq!(
        echo.call(Echo::echo, (x,))?.get_timeout(T)?.deserialize()?,
        x
    );
    Ok(r)
}

pub fn reinit_role() -> Res {
    let _ = nix::unistd::setsid();
    let rt = trove::init(Config::default().memory(64 << 20).num_cpus(1))?;
    let a = rt.actor(Echo::default)?;
    check(
        a.call(Echo::echo, (1,))?.get_timeout(T)?.deserialize()? == 1,
        "warm up",
    )?;
    let base = rt.stats()?;
    // By default a second init is refused and changes nothing.
    match trove::init(Config::default()) {
        Err(Error::Init(m)) => check(m.contains("ignore_reinit_error"), &m)?,
        other => return Err(format!("a second init gave {other:?}").into()),
    }
    // With the flag: the running runtime. Its objects are the first handle's.
    let again = trove::init(Config::default().memory(1 << 20).ignore_reinit_error(true))?;
    let r = again.put(&41u64)?;
    check(
        rt.get(&r)?.deserialize()? == 41,
        "an object put through the second handle",
    )?;
    check(
        again.store().socket_path() == rt.store().socket_path(),
        "the same store",
    )?;
    drop(again);
    // Dropping it stopped nothing: the actor, the pool and the store all still answer.
    check(
        a.call(Echo::echo, (7,))?.get_timeout(T)?.deserialize()? == 7,
        "the actor after the second handle went",
    )?;
    let from_task = rt.spawn(put_in_task, (5,))?.get_timeout(T)?.deserialize()?;
    check(
        from_task.get_timeout(T)?.deserialize()? == 15,
        "an object put in a task",
    )?;
    check(
        rt.get(&r)?.deserialize()? == 41,
        "the object outlives the handle",
    )?;
    // Everything put through either handle, in the driver and in the task, goes once its
    // refs do, while the driver, its pool and its actor all still run.
    drop((r, from_task));
    crate::util::store_back_to(&rt, &base, "after the objects of both handles")?;
    check(
        a.call(Echo::echo, (8,))?.get_timeout(T)?.deserialize()? == 8,
        "the actor at the end",
    )?;
    // A thread that used the runtime and outlives it finds it gone, as this one does: a
    // thread's copy of the context neither survives the shutdown nor keeps it.
    let kept = rt.put(&9u64)?;
    let theirs = kept.clone();
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let (told, answer) = std::sync::mpsc::channel::<bool>();
    let t = std::thread::spawn(move || {
        let _ = told.send(theirs.get().is_ok_and(|v| *v == 9));
        let _ = wait.recv_timeout(T);
        let _ = told.send(matches!(theirs.get(), Err(Error::NotInitialized)));
    });
    check(
        answer.recv_timeout(T)?,
        "the thread read the object while the runtime ran",
    )?;
    check(*kept.get()? == 9, "the kept object")?;
    drop((a, rt));
    let _ = go.send(());
    check(answer.recv_timeout(T)?, "the thread found the runtime gone")?;
    t.join().map_err(|_| "the thread panicked")?;
    check(
        matches!(kept.get(), Err(Error::NotInitialized)),
        "this thread found the runtime gone",
    )?;
    drop(kept);
    say("OK");
    Ok(())
}
