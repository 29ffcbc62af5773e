//! One client's misbehaviour or slowness never harms another: a cut-off client keeps what it
//! may still read until its process is gone, a slow reader stalls nobody, a rejected small put
//! is an error, per-client daemon state is bounded, and owned objects are deleted by their
//! owners only.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use trove_store::protocol::Request;
use trove_store::{DeleteOutcome, ObjectId, ObjectState, StoreClient, StoreError, Timeout};

use crate::harness::register;
use crate::role::{PinStopMode, Role};
use crate::util::{Helper, TestStore, pattern, raw_connection, wait_until};

const T: Duration = Duration::from_secs(30);

/// A `troved` with extra environment (the daemon's test knobs).
pub fn start_store_env(memory: &str, envs: &[(&str, &str)]) -> TestStore {
    TestStore::start_with_env(memory, &[], envs)
}

/// Ids a stopped helper watches so that the daemon's notices to it pile up.
pub fn flood_ids(n: u64) -> Vec<ObjectId> {
    (0..n).map(|i| ObjectId::from_parts([9; 12], i)).collect()
}

/// The used bytes the live objects account for (each rounded to the 64-byte granule).
fn live_bytes(c: &StoreClient) -> u64 {
    c.list()
        .unwrap()
        .iter()
        .map(|o| o.size.max(1).next_multiple_of(64))
        .sum()
}

/// A cut-off client (its notices overflowed while it was stopped) keeps its pins and its client
/// index until its process is gone: its view still reads the right bytes, a delete of its
/// pinned object is deferred, a new client gets another index, and its next verb is
/// `Disconnected`.
pub fn store_cut_off_client_keeps_its_pins_and_index_while_alive() {
    let store = start_store_env("64MiB", &[("TROVE_STORE_MAX_BACKLOG", "16")]);
    cut_off_case(&store, PinStopMode::Watch, 2048 + 64);
}
register!(store_cut_off_client_keeps_its_pins_and_index_while_alive);

/// The same for a client stopped while the daemon writes it a reply larger than the socket
/// buffers: past the client timeout (here 300 ms, 5 s by default) it is cut off, and keeps
/// what it may read until its process is gone.
pub fn store_client_stopped_past_the_write_timeout_keeps_its_pins() {
    let store = start_store_env("64MiB", &[("TROVE_STORE_CLIENT_TIMEOUT_MS", "300")]);
    cut_off_case(&store, PinStopMode::List, 10_000);
}
register!(store_client_stopped_past_the_write_timeout_keeps_its_pins);

/// A helper pins an object, is stopped, and is cut off: by notices it does not read
/// (`watch`: `n` of them overflow its ring and backlog) or by a `List` reply of `n` objects
/// that the daemon cannot finish writing (`list`).
fn cut_off_case(store: &TestStore, mode: PinStopMode, n: u64) {
    let c = store.client();
    let p = ObjectId::random();
    let len = 100_000;
    c.put(p, &pattern(3, len)).unwrap();
    if mode == PinStopMode::List {
        for id in flood_ids(n) {
            c.put(id, &[1u8; 64]).unwrap();
        }
    }
    let go = store.dir.path().join("go");
    let mut h = Helper::start(Role::PinStop {
        socket: store.socket.clone(),
        mode: mode.clone(),
        id: p,
        len,
        seed: 3,
        n,
        go: go.clone(),
    });
    let line = h.expect_line("PINNED", T);
    let index: u32 = line.split(' ').nth(1).unwrap().parse().unwrap();
    h.expect_line("WATCHING", T);
    wait_until(T, "two clients", || c.stats().unwrap().clients == 2);
    kill(h.pid(), Signal::SIGSTOP).unwrap();
    if mode == PinStopMode::Watch {
        // Every seal notifies the stopped helper: its ring fills, then its backlog overflows.
        for id in flood_ids(n) {
            c.put(id, &[1u8; 64]).unwrap();
        }
    }
    if mode == PinStopMode::List {
        // The stop may land between two `List`s (a reply read, the next not sent): then the
        // daemon has nothing to write to it. Let it run a moment and stop it again, until a
        // stop lands while a reply is being written (most of its time goes there).
        let until = Instant::now() + T;
        while c.stats().unwrap().clients != 1 {
            assert!(
                Instant::now() < until,
                "the stopped helper was never cut off"
            );
            let wait = Instant::now() + Duration::from_secs(1);
            while c.stats().unwrap().clients != 1 && Instant::now() < wait {
                std::thread::sleep(Duration::from_millis(10));
            }
            if c.stats().unwrap().clients != 1 {
                kill(h.pid(), Signal::SIGCONT).unwrap();
                std::thread::sleep(Duration::from_millis(20));
                kill(h.pid(), Signal::SIGSTOP).unwrap();
            }
        }
    }
    wait_until(T, "the stopped helper to be cut off", || {
        c.stats().unwrap().clients == 1
    });
    // Its pin still holds: a delete is deferred, the bytes stay where they are.
    assert_eq!(c.delete(&[p]).unwrap(), vec![DeleteOutcome::Deferred]);
    let q = ObjectId::random();
    c.put(q, &pattern(4, len)).unwrap();
    // Its index is not given to anyone else while the process lives.
    let d = store.client();
    assert_ne!(d.client_index(), index, "index of a live process reused");
    std::fs::write(&go, b"").unwrap();
    kill(h.pid(), Signal::SIGCONT).unwrap();
    h.expect_line("BYTES OK", T);
    let get = h.expect_line("GET", T);
    assert!(get.contains("Disconnected"), "{get}");
    let verb = h.expect_line("VERB", T);
    assert!(verb.contains("Disconnected"), "{verb}");
    assert!(h.wait(T).success());
    // Once it is gone, its pin goes and the deferred delete completes; used bytes are the
    // live objects' sizes (checked with this process's clients alive).
    wait_until(T, "the deferred delete to complete", || {
        !c.list().unwrap().iter().any(|o| o.id == p)
    });
    let s = c.stats().unwrap();
    assert_eq!(s.objects, n + 1, "{s:?}");
    assert_eq!(s.used, live_bytes(&c), "{s:?}");
    assert_eq!(s.pinned, 0, "{s:?}");
    let mut ids = flood_ids(n);
    ids.push(q);
    c.delete(&ids).unwrap();
    let s = c.stats().unwrap();
    assert_eq!((s.objects, s.used), (0, 0), "{s:?}");
}

/// Role `PinStop`: pin object `id`, then watch `n` ids (`Watch`) or list the store in a loop
/// on another thread (`List`); then (stopped and resumed by the test) wait for the file `go`,
/// check the view's bytes (`len` bytes of `pattern(seed)`) and try two verbs.
pub fn pin_stop_role(
    socket: &std::path::Path,
    mode: PinStopMode,
    id: ObjectId,
    len: usize,
    seed: u64,
    n: u64,
    go: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let c = StoreClient::connect(socket)?;
    let view = c.get(id, Duration::from_secs(20))?;
    crate::util::say(&format!("PINNED {}", c.client_index()));
    if mode == PinStopMode::Watch {
        c.wait_ready(&flood_ids(n), n as usize, Some(std::time::Instant::now()))?;
        c.flush()?;
    } else {
        c.list()?;
        let lister = c.clone();
        std::thread::spawn(move || while lister.list().is_ok() {});
    }
    crate::util::say("WATCHING");
    let start = std::time::Instant::now();
    while !go.exists() {
        if start.elapsed() > Duration::from_secs(120) {
            return Err("never told to go".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let want = pattern(seed, len);
    crate::util::say(if view.as_slice() == want.as_slice() {
        "BYTES OK"
    } else {
        "BYTES BAD"
    });
    // Its next verbs, a lock-free get as much as a round trip, are `Disconnected`.
    match c.get(id, Timeout::Poll) {
        Ok(_) => crate::util::say("GET Ok"),
        Err(e) => crate::util::say(&format!("GET {e:?}")),
    }
    match c.stats() {
        Ok(_) => crate::util::say("VERB Ok"),
        Err(e) => crate::util::say(&format!("VERB {e:?}")),
    }
    Ok(())
}

/// Bytes waiting to be read on `s` (up to 4 MiB), without consuming them.
fn queued(s: &UnixStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; 4 << 20];
    nix::sys::socket::recv(
        s.as_raw_fd(),
        &mut buf,
        nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
    )
    .unwrap_or(0)
}

/// A client whose daemon thread is blocked writing it a reply (it does not read) does not
/// stall another client whose seal must wake it.
pub fn store_a_client_that_does_not_read_replies_stalls_nobody() {
    // A long write bound: a stall would last it out.
    let store = start_store_env("64MiB", &[("TROVE_STORE_CLIENT_TIMEOUT_MS", "60000")]);
    let c = store.client();
    // Enough objects that a `List` reply is larger than the socket buffers.
    for i in 0..3000u64 {
        c.put(ObjectId::from_parts([5; 12], i), b"x").unwrap();
    }
    let x = ObjectId::random();
    let mut a = raw_connection(&store.socket);
    // A wait on `x` that parks, then `List`s it never reads.
    let wait = Request::Wait {
        ids: vec![x],
        timeout: Some(Duration::from_secs(60)),
    };
    a.write_all(&wait.encode(1)).unwrap();
    for req in 2..40 {
        a.write_all(&Request::List.encode(req)).unwrap();
    }
    // The daemon has filled `a`'s socket and blocks writing the next reply.
    wait_until(T, "the daemon to fill the reader's socket", || {
        queued(&a) > 100_000
    });
    let mut last = queued(&a);
    wait_until(T, "the reader's socket to stay full", || {
        std::thread::sleep(Duration::from_millis(100));
        let now = queued(&a);
        let same = now == last;
        last = now;
        same
    });
    // Another client seals `x`, which wakes `a`'s wait: it must not wait for `a`.
    let b = store.client();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let r = b.put(x, b"wake");
        let _ = tx.send(r.is_ok());
    });
    let done = rx.recv_timeout(Duration::from_secs(10));
    drop(a);
    t.join().unwrap();
    assert_eq!(
        done,
        Ok(true),
        "a seal was stalled by a client that does not read"
    );
    assert_eq!(&*c.get(x, Timeout::Poll).unwrap(), b"wake");
}
register!(store_a_client_that_does_not_read_replies_stalls_nobody);

/// A `PutSmall` the daemon rejects (the id exists) is reported to its sender: a get of that
/// id by the sender is an error, not its own unaccounted bytes; the existing object is
/// unchanged and used bytes are only the live objects'.
pub fn store_rejected_small_put_is_an_error() {
    let store = TestStore::start("16MiB");
    let a = store.client();
    let b = store.client();
    let x = ObjectId::random();
    a.put(x, &pattern(1, 500)).unwrap();
    let mut w = b.alloc_owned(x, 300).unwrap();
    w.as_mut_slice().copy_from_slice(&pattern(2, 300));
    w.publish(&[]).unwrap();
    // Any round trip: the daemon has handled the put by its reply.
    b.stats().unwrap();
    let got = b.get(x, Timeout::Poll);
    assert!(
        matches!(got, Err(StoreError::PutRejected { id, .. }) if id == x),
        "{:?}",
        got.map(|v| v.len())
    );
    assert_eq!(
        &*a.get(x, Timeout::Poll).unwrap(),
        pattern(1, 500).as_slice()
    );
    let s = a.stats().unwrap();
    assert_eq!((s.objects, s.used), (1, live_bytes(&a)), "{s:?}");
    // The sender's next small put works.
    let y = ObjectId::random();
    let mut w = b.alloc_owned(y, 10).unwrap();
    w.as_mut_slice().copy_from_slice(b"0123456789");
    w.publish(&[]).unwrap();
    assert_eq!(&*a.get(y, T).unwrap(), b"0123456789");
    b.release(&y);
}
register!(store_rejected_small_put_is_an_error);

/// `Hold`s of ids that never exist are bounded per client: past the bound the client gets an
/// error (it is cut off), and the daemon's memory for it is freed.
pub fn store_holds_and_watches_of_absent_ids_are_bounded() {
    let store = start_store_env("16MiB", &[("TROVE_STORE_MAX_PENDING", "1000")]);
    let c = store.client();
    let b = store.client();
    for i in 0..1000u64 {
        b.hold(&ObjectId::from_parts([3; 12], i)).unwrap();
    }
    // At the bound: still served.
    b.stats().unwrap();
    b.hold(&ObjectId::random()).unwrap();
    let e = b.stats().unwrap_err();
    let told = matches!(&e, StoreError::Disconnected(m) if m.contains("TooManyPending"));
    assert!(told, "{e:?}");
    // Watches are bounded the same way.
    let w = store.client();
    let ids: Vec<ObjectId> = (0..1001u64)
        .map(|i| ObjectId::from_parts([4; 12], i))
        .collect();
    let r = w.wait_ready(
        &ids,
        1,
        Some(std::time::Instant::now() + Duration::from_secs(5)),
    );
    assert!(matches!(r, Err(StoreError::Disconnected(_))), "{r:?}");
    drop((b, w));
    wait_until(T, "the bounded clients to be gone", || {
        c.stats().unwrap().clients == 1
    });
}
register!(store_holds_and_watches_of_absent_ids_are_bounded);

/// A reference-counted object is deleted only by the client that created it: another
/// client's delete is refused and changes nothing.
pub fn store_owned_objects_are_deleted_by_their_owner_only() {
    let store = TestStore::start("16MiB");
    let a = store.client();
    let b = store.client();
    let small = ObjectId::random();
    let mut w = a.alloc_owned(small, 8).unwrap();
    w.as_mut_slice().copy_from_slice(b"mailbox!");
    w.publish(&[]).unwrap();
    let large = ObjectId::random();
    let mut w = a.create_owned(large, 100_000).unwrap();
    w.as_mut_slice().fill(7);
    w.publish(&[]).unwrap();
    let before = b.list().unwrap();
    assert_eq!(
        b.delete(&[small, large]).unwrap(),
        vec![DeleteOutcome::NotOwner, DeleteOutcome::NotOwner]
    );
    let after = b.list().unwrap();
    assert_eq!(after.len(), before.len());
    assert!(
        after.iter().all(|o| o.state == ObjectState::Sealed),
        "{after:?}"
    );
    assert_eq!(&*b.get(small, Timeout::Poll).unwrap(), b"mailbox!");
    // The owner may delete it (deferred while it holds its own reference).
    assert_eq!(a.delete(&[small]).unwrap(), vec![DeleteOutcome::Deferred]);
    a.release(&small);
    a.release(&large);
    wait_until(T, "the owned objects to be freed", || {
        a.stats().unwrap().objects == 0
    });
}
register!(store_owned_objects_are_deleted_by_their_owner_only);
