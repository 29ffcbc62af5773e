//! Eviction order, pins and deferred deletion.

use std::time::Duration;

use trove_store::{DeleteOutcome, ObjectId, StoreError, Timeout};

use crate::harness::register;
use crate::role::{Role, StoreRole};
use crate::util::{Helper, TestStore, pattern, wait_until};

const T: Duration = Duration::from_secs(20);
const KIB300: usize = 300 << 10;

pub fn store_lru_eviction_order() {
    // 1 MiB of object space holds three 300 KiB objects.
    let store = TestStore::start("1MiB");
    let c = store.client();
    let [a, b, cc, d, e] = [(); 5].map(|_| ObjectId::random());
    for (n, id) in [a, b, cc].iter().enumerate() {
        c.put(*id, &pattern(n as u64, KIB300)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    // Touch `a`: now b is the least recently used, then cc, then a.
    drop(c.get(a, Timeout::Poll).unwrap());
    c.put(d, &pattern(3, KIB300)).unwrap();
    assert!(!c.contains(b).unwrap(), "b was least recently used");
    assert!(c.contains(a).unwrap() && c.contains(cc).unwrap());
    c.put(e, &pattern(4, KIB300)).unwrap();
    assert!(!c.contains(cc).unwrap(), "then cc");
    assert!(c.contains(a).unwrap() && c.contains(d).unwrap() && c.contains(e).unwrap());
    assert_eq!(c.stats().unwrap().evictions, 2);
    // Contents of the survivors are intact.
    assert_eq!(
        c.get(a, Timeout::Poll).unwrap().as_slice(),
        pattern(0, KIB300).as_slice()
    );
}
register!(store_lru_eviction_order);

pub fn store_full_when_everything_is_pinned() {
    let store = TestStore::start("1MiB");
    let c = store.client();
    let ids = [(); 3].map(|_| ObjectId::random());
    let mut pinners = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        c.put(*id, &pattern(n as u64, KIB300)).unwrap();
        let mut h = Helper::start(Role::store(&store.socket, StoreRole::Pin { id: *id }));
        h.expect_line("PINNED", T);
        pinners.push(h);
    }
    match c.create(ObjectId::random(), KIB300 as u64) {
        Err(StoreError::StoreFull {
            requested,
            capacity,
            pinned,
            detail,
        }) => {
            assert_eq!((requested, capacity), (KIB300 as u64, 1 << 20));
            assert_eq!(pinned, 3 * KIB300 as u64);
            // Whose: each pinning process by its pid; none of it trove's machinery.
            for h in &pinners {
                assert!(
                    detail.contains(&format!("pid {} 300.0 KiB", h.pid())),
                    "{detail}"
                );
            }
            assert!(
                detail.contains("mailboxes and queues 0 B in 0 objects"),
                "{detail}"
            );
            let e = StoreError::StoreFull {
                requested,
                capacity,
                pinned,
                detail,
            };
            assert!(e.to_string().contains("TROVE_MEMORY"), "{e}");
        }
        other => panic!("expected StoreFull, got {:?}", other.map(|w| w.id())),
    }
    // Nothing was evicted and nothing leaked.
    assert_eq!(c.stats().unwrap().objects, 3);
    // One pinner exits: its object becomes evictable and the create succeeds.
    pinners.remove(1).kill9();
    wait_until(T, "the dead pinner's pins to be released", || {
        c.stats().unwrap().pinned == 2 * KIB300 as u64
    });
    c.put(ObjectId::random(), &pattern(9, KIB300)).unwrap();
    assert!(!c.contains(ids[1]).unwrap());
}
register!(store_full_when_everything_is_pinned);

pub fn store_delete_is_deferred_while_pinned() {
    let store = TestStore::start("16MiB");
    let c = store.client();
    let id = ObjectId::random();
    c.put(id, &pattern(1, 5000)).unwrap();
    let mut h = Helper::start(Role::store(&store.socket, StoreRole::Pin { id }));
    h.expect_line("PINNED", T);
    let mine = c.get(id, Timeout::Poll).unwrap();
    assert_eq!(c.delete(&[id]).unwrap(), vec![DeleteOutcome::Deferred]);
    // Not gettable any more, but the pinned bytes stay valid.
    assert!(!c.contains(id).unwrap());
    assert!(matches!(
        c.get(id, Timeout::Poll),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(mine.as_slice(), pattern(1, 5000).as_slice());
    assert_eq!(c.stats().unwrap().objects, 1);
    drop(mine);
    assert_eq!(c.stats().unwrap().objects, 1, "the helper still pins it");
    h.kill9();
    wait_until(T, "the deferred delete", || c.stats().unwrap().objects == 0);
    assert_eq!(c.stats().unwrap().used, 0);
}
register!(store_delete_is_deferred_while_pinned);

pub fn store_last_unpin_frees_a_deferred_delete() {
    let store = TestStore::start("16MiB");
    let c = store.client();
    let other = store.client();
    let id = ObjectId::random();
    c.put(id, b"payload").unwrap();
    let v = other.get(id, Timeout::Poll).unwrap();
    assert_eq!(c.delete(&[id]).unwrap(), vec![DeleteOutcome::Deferred]);
    drop(v);
    wait_until(T, "the release notice", || c.stats().unwrap().objects == 0);
}
register!(store_last_unpin_frees_a_deferred_delete);

/// `troved --hugepages` backs the arena with huge pages when the machine has them (the pool,
/// else transparent ones), and otherwise refuses to start with a message that says how to
/// get them: which of the two a machine gives depends on its settings, so both are checked.
pub fn store_hugepages_are_used_or_refused_saying_how_to_get_them() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let dir = tempfile::Builder::new()
        .prefix("trove-test-")
        .tempdir()
        .unwrap();
    let socket = dir.path().join("sock").join("troved.sock");
    let mut child = crate::util::Reaped(
        Command::new(env!("CARGO_BIN_EXE_troved"))
            .args(["--memory", "16MiB", "--hugepages", "--socket"])
            .arg(&socket)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut exited = None;
    wait_until(T, "troved to listen or exit", || {
        exited = child.0.try_wait().unwrap();
        exited.is_some() || trove_store::StoreClient::connect(&socket).is_ok()
    });
    match exited {
        Some(status) => {
            let mut err = String::new();
            child
                .0
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            assert!(!status.success());
            assert!(
                crate::util::refusal_expected(),
                "refused where huge pages were set up: {err}"
            );
            for says in ["no huge pages", "vm.nr_hugepages", "shmem_enabled"] {
                assert!(err.contains(says), "{says:?} not in {err}");
            }
        }
        None => {
            let a = trove_store::StoreClient::connect(&socket).unwrap();
            let b = trove_store::StoreClient::connect(&socket).unwrap();
            assert_ne!(a.arena().pages(), trove_store::shm::Pages::Base);
            if let Some(want) = crate::util::expected_pages() {
                assert_eq!(format!("{:?}", a.arena().pages()), want);
            }
            assert_eq!(
                a.arena().layout().total_len % trove_store::shm::HUGE_PAGE,
                0
            );
            let id = ObjectId::random();
            let base = a.stats().unwrap();
            a.put(id, &pattern(7, 4 << 20)).unwrap();
            assert_eq!(
                b.get(id, Timeout::Poll).unwrap().as_slice(),
                pattern(7, 4 << 20)
            );
            a.delete(&[id]).unwrap();
            crate::store_many_clients::back_to(&a, &base, "with both clients connected");

            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.0.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            crate::util::wait_child(&mut child.0, T);
        }
    }
}
register!(store_hugepages_are_used_or_refused_saying_how_to_get_them);

/// A client in a container that may have no huge pages (a hugetlb cgroup limit of 0) creates
/// objects in a store on pool pages: the store, which reserved those pages, allocates them
/// (a client's first touch would be charged to its own cgroup: a SIGBUS). Needs such a cgroup
/// and room in the pool, which `.ci/run` sets up (`TROVE_TEST_HUGETLB_LIMITED`); elsewhere it
/// checks nothing and says so.
pub fn store_hugepages_of_the_pool_are_allocated_by_the_store_for_a_limited_client() {
    let Some(cgroup) = crate::util::hugetlb_limited_cgroup() else {
        eprintln!("no hugetlb cgroup with a limit of 0 was set up: nothing to check");
        return;
    };
    // 512 MiB: an object beyond the 256 MiB the background pre-fault does ahead at first.
    let store = TestStore::start_with("512MiB", &["--hugepages"]);
    let a = store.client();
    assert_eq!(a.arena().pages(), trove_store::shm::Pages::HugeTlb);
    let base = a.stats().unwrap();
    let mut h = Helper::start(Role::HugetlbLimited {
        socket: store.socket.clone(),
        cgroup,
    });
    h.expect_line("OK", Duration::from_secs(60));
    assert!(h.wait(T).success());
    crate::store_many_clients::back_to(&a, &base, "after the limited client's objects");
}
register!(store_hugepages_of_the_pool_are_allocated_by_the_store_for_a_limited_client);

/// A store whose own hugetlb cgroup runs out (a limit above 0 but below its arena) refuses a
/// create it cannot allocate, with `NoHugePages`, and takes the block back: no client gets a
/// block whose pages do not exist (its first touch would be a SIGBUS), and the store is back
/// at its baseline. Needs a hugetlb cgroup hierarchy, which `.ci/run` sets up
/// (`TROVE_TEST_HUGETLB_LIMITED`, next to which this makes its own cgroup); elsewhere it
/// checks nothing and says so.
pub fn store_hugepages_a_block_the_store_cannot_allocate_is_refused_and_given_back() {
    use std::process::{Command, Stdio};
    let Some(limited) = crate::util::hugetlb_limited_cgroup() else {
        eprintln!("no hugetlb cgroup was set up: nothing to check");
        return;
    };
    let cg = limited
        .parent()
        .expect("a cgroup has a parent")
        .join(format!("trove-test-{}", std::process::id()));
    std::fs::create_dir(&cg).unwrap();
    // Removed last (declared first): once the store in it is gone.
    struct Removed(std::path::PathBuf);
    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _removed = Removed(cg.clone());
    let (usage, limit) = if cg.join("hugetlb.2MB.max").exists() {
        ("hugetlb.2MB.current", "hugetlb.2MB.max")
    } else {
        ("hugetlb.2MB.usage_in_bytes", "hugetlb.2MB.limit_in_bytes")
    };
    let charged = || -> u64 {
        std::fs::read_to_string(cg.join(usage))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let dir = tempfile::Builder::new()
        .prefix("trove-test-")
        .tempdir()
        .unwrap();
    let socket = dir.path().join("sock").join("troved.sock");
    // The store joins the cgroup before it starts (its pages are charged there).
    let _store = crate::util::Reaped(
        Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ >"$1/cgroup.procs" && exec "$2" --memory 512MiB --hugepages --socket "$3""#)
            .arg("sh")
            .arg(&cg)
            .arg(env!("CARGO_BIN_EXE_troved"))
            .arg(&socket)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until(T, "troved to listen", || {
        trove_store::StoreClient::connect(&socket).is_ok()
    });
    let c = trove_store::StoreClient::connect(&socket).unwrap();
    if c.arena().pages() != trove_store::shm::Pages::HugeTlb {
        eprintln!("the store is not on pool pages here: nothing to check");
        return;
    }
    // Its background pre-fault takes the first 256 MiB of the heap: let it finish, then allow
    // the store nothing more.
    let mut last = (charged(), std::time::Instant::now());
    wait_until(T, "the store's pre-fault to settle", || {
        let now = charged();
        if now != last.0 {
            last = (now, std::time::Instant::now());
        }
        last.1.elapsed() > Duration::from_millis(300)
    });
    std::fs::write(cg.join(limit), charged().to_string()).unwrap();
    let base = c.stats().unwrap();
    // 300 MiB: beyond what exists.
    match c.put(ObjectId::random(), &pattern(3, 300 << 20)) {
        Err(StoreError::NoHugePages(why)) => {
            assert!(why.contains("could not be allocated"), "{why}")
        }
        other => panic!("a create the store cannot allocate gave {other:?}"),
    }
    crate::store_many_clients::back_to(&c, &base, "after the refused create");
    // What exists still serves.
    let id = ObjectId::random();
    c.put(id, &pattern(4, 64 << 10)).unwrap();
    assert_eq!(
        c.get(id, Timeout::Poll).unwrap().as_slice(),
        pattern(4, 64 << 10)
    );
    c.delete(&[id]).unwrap();
    crate::store_many_clients::back_to(&c, &base, "after the small object");
}
register!(store_hugepages_a_block_the_store_cannot_allocate_is_refused_and_given_back);

/// Role `HugetlbLimited`: joins `cgroup` (a hugetlb limit of 0), then puts a small object and
/// one of 400 MiB (beyond the background pre-fault, and above the size whose creator would
/// populate it on base pages) in the store at `socket`, reads them back and deletes them,
/// then looks for ids nobody made.
pub fn hugetlb_limited_role(
    socket: &std::path::Path,
    cgroup: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())?;
    let c = trove_store::StoreClient::connect(socket)?;
    let base = c.stats()?;
    for (i, len) in [(1u64, 4096usize), (2, 400 << 20)] {
        let id = ObjectId::random();
        let data = pattern(i, len);
        let mut w = c.create(id, len as u64)?;
        // Its end first: beyond what the background pre-fault has reached, so that this is
        // the page's first touch unless the store allocated it before it replied.
        w.as_mut_slice()[len - 1] = data[len - 1];
        w.as_mut_slice().copy_from_slice(&data);
        w.seal()?;
        crate::util::check(
            c.get(id, Timeout::Poll)?.as_slice() == data,
            &format!("{len} bytes read back"),
        )?;
        c.delete(&[id])?;
    }
    // Looks for ids nobody made: the lock-free lookup reads directory slots all over the
    // directory, most of them on pages no object ever used.
    for _ in 0..256 {
        crate::util::check(
            c.get(ObjectId::random(), Timeout::Poll).is_err(),
            "an id nobody made is not found",
        )?;
    }
    // Back at the baseline with this client still connected (its exit would free all anyway).
    crate::store_many_clients::back_to(&c, &base, "after the limited client's objects");
    crate::util::say("OK");
    Ok(())
}
