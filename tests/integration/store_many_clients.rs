//! More clients than pin bits: a thousand clients on one store, each able to do what any
//! client does. The first `shm::PIN_CLIENTS` pin with a bit of their own; the others are
//! *overflow clients*, whose pins the daemon keeps (see ARCHITECTURE.md, "the directory").

use std::io::Write;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use trove_store::protocol::{ErrorCode, MAX_REPLY, Owned, Reply, Request, read_frame};
use trove_store::shm::PIN_CLIENTS;
use trove_store::{DeleteOutcome, ObjectId, Readiness, Stats, StoreClient, StoreError, Timeout};

use crate::harness::register;
use crate::role::{Role, StoreRole};
use crate::util::{Helper, TestStore, pattern, raw_connection, wait_until};

const T: Duration = Duration::from_secs(30);

/// Waits (bounded) until the store is back at `base` (objects and used bytes), and says
/// what is left if it is not.
pub(crate) fn back_to(c: &StoreClient, base: &Stats, what: &str) {
    let until = Instant::now() + T;
    loop {
        let s = c.stats().unwrap();
        if (s.objects, s.used) == (base.objects, base.used) {
            return;
        }
        if Instant::now() > until {
            let left: Vec<String> = c
                .list()
                .unwrap()
                .iter()
                .take(20)
                .map(|o| format!("{} ({} bytes, {} pins)", o.id, o.size, o.pins))
                .collect();
            panic!(
                "{what}: store at {} objects / {} bytes, baseline {} / {}: {left:?}",
                s.objects, s.used, base.objects, base.used
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Connects `n` clients, with this process's open files limit raised for them (each holds
/// its socket twice and the arena's memfd), once the store has no other client (the probe
/// `TestStore::start` made), so that they get the indices `0..n`.
fn connect_many(store: &TestStore, n: usize) -> Vec<StoreClient> {
    let limit = trove_store::raise_fd_limit();
    assert!(
        limit >= 3 * n as u64 + 512,
        "{n} clients need about {} open files; this process may have {limit} \
         (raise the hard limit, ulimit -Hn)",
        3 * n + 512
    );
    let first = store.client();
    wait_until(T, "the store's probe client to go", || {
        first.stats().unwrap().clients == 1
    });
    let mut all = vec![first];
    all.extend((1..n).map(|_| store.client()));
    let mut indices: Vec<u32> = all.iter().map(|c| c.client_index()).collect();
    indices.sort();
    assert_eq!(
        indices,
        (0..n as u32).collect::<Vec<_>>(),
        "lowest free index first"
    );
    all
}

/// A thousand clients connected to one daemon at once: the overflow clients put small and
/// large objects, read others' objects in place, hold and release owned objects, are the
/// `pin_for` target of results, wait and are notified of an object sealed later; one that
/// disconnects while pinning and one process killed while pinning lose their pins (deferred
/// deletes complete); the store is back at its baseline while the clients are connected.
pub fn store_a_thousand_clients_do_everything_a_client_does() {
    const N: usize = 1000;
    let start = Instant::now();
    let store = TestStore::start("128MiB");
    let mut clients = connect_many(&store, N);
    let first = clients[0].clone();
    let first = &first;
    let base = first.stats().unwrap();
    assert_eq!(base.clients, N as u64, "{base:?}");
    assert_eq!((base.objects, base.used), (0, 0));
    // `PIN_CLIENTS` of them have a pin bit (fewer under the TROVE_STORE_PIN_CLIENTS knob).
    let pin_clients = first.arena().layout().pin_clients;
    assert!(pin_clients <= PIN_CLIENTS);
    for c in &clients {
        assert_eq!(c.is_overflow_client(), c.client_index() >= pin_clients);
    }
    let overflow = clients.iter().filter(|c| c.is_overflow_client()).count();
    assert_eq!(overflow, N - pin_clients as usize);

    // Puts: a small plain object from every client, a large one from every 100th.
    let small: Vec<ObjectId> = (0..N).map(|_| ObjectId::random()).collect();
    for (i, c) in clients.iter().enumerate() {
        c.put(small[i], &pattern(i as u64, 100 + i % 300)).unwrap();
    }
    let large: Vec<(usize, ObjectId)> = (0..N)
        .step_by(100)
        .map(|i| (i + 50, ObjectId::random()))
        .collect();
    for &(i, id) in &large {
        clients[i].put(id, &pattern(7 + i as u64, 2 << 20)).unwrap();
    }

    // Gets: every client views another's small object in place (overflow clients through
    // the daemon's `Pin`); every view of one object is at the same place in the arena.
    let mut views = Vec::with_capacity(N);
    for (i, c) in clients.iter().enumerate() {
        let j = (i + 1) % N;
        let v = c.get(small[j], Timeout::Poll).unwrap();
        assert_eq!(v.as_slice(), pattern(j as u64, 100 + j % 300).as_slice());
        views.push(v);
    }
    for (n, &(i, id)) in large.iter().enumerate() {
        let reader = &clients[N - 1 - n];
        assert!(reader.is_overflow_client());
        let v = reader.get(id, Timeout::Poll).unwrap();
        let again = clients[0].get(id, Timeout::Poll).unwrap();
        assert_eq!(v.offset(), again.offset(), "read in place");
        assert_eq!(v.as_slice(), pattern(7 + i as u64, 2 << 20).as_slice());
        views.push(v);
    }
    // A delete waits for the readers' pins (bit and overflow alike).
    let pinned = first.stats().unwrap();
    assert_eq!(
        pinned.pinned, pinned.used,
        "every object is viewed: {pinned:?}"
    );
    drop(views);

    // Owned objects: every 50th overflow client publishes one in its slab (a small put
    // without a round trip); the next 3 overflow clients hold it, the creator lets go; the
    // object lives exactly as long as a holder does.
    let creators: Vec<usize> = (PIN_CLIENTS as usize..N - 3).step_by(50).collect();
    let mut owned = Vec::new();
    for &i in &creators {
        let id = ObjectId::random();
        let mut w = clients[i].alloc_owned(id, 200).unwrap();
        w.as_mut_slice().copy_from_slice(&pattern(i as u64, 200));
        w.publish(&[]).unwrap();
        clients[i].stats().unwrap(); // its put handled
        for h in &clients[i + 1..i + 4] {
            h.hold(&id).unwrap();
            h.stats().unwrap(); // its `Hold` handled
        }
        assert!(clients[i].release(&id));
        owned.push((i, id));
    }
    for &(i, id) in &owned {
        clients[i].stats().unwrap(); // the creator's `Unhold` handled
        let v = clients[i + 3].get(id, Timeout::Poll).unwrap();
        assert_eq!(v.as_slice(), pattern(i as u64, 200).as_slice());
        drop(v);
        for h in &clients[i + 1..i + 3] {
            assert!(h.release(&id));
            h.stats().unwrap();
        }
        assert!(first.contains(id).unwrap(), "one holder is left");
        assert!(clients[i + 3].release(&id));
        clients[i + 3].stats().unwrap();
        assert!(
            !first.contains(id).unwrap(),
            "the last holder let go: freed"
        );
    }

    // `pin_for`: results made for an overflow client (the `reply_to` of a call) by a client
    // with a pin bit and by another overflow client; read in place, then released.
    for (maker, target) in [(3, 900), (400, 999), (998, 500)] {
        let id = ObjectId::random();
        clients[target].adopt_pending(&id);
        let mut w = clients[maker].alloc_owned(id, 64).unwrap();
        w.as_mut_slice().copy_from_slice(&pattern(maker as u64, 64));
        w.publish_with(Owned {
            pin_for: Some(clients[target].pin_target()),
            ..Owned::default()
        })
        .unwrap();
        clients[maker].flush().unwrap();
        let v = clients[target].get(id, T).unwrap();
        assert_eq!(v.as_slice(), pattern(maker as u64, 64).as_slice());
        drop(v);
        assert!(clients[target].release(&id));
        clients[target].stats().unwrap();
        assert!(!first.contains(id).unwrap(), "its one reference went");
    }

    // Waits: 200 overflow clients wait for an object created now and sealed later, half
    // notified on their ring (`wait_ready`), half by the daemon's reply (`get`).
    let late = ObjectId::random();
    let payload = pattern(42, 5000);
    let mut w = first.create(late, payload.len() as u64).unwrap();
    w.as_mut_slice().copy_from_slice(&payload);
    let waiters = &clients[N - 200..];
    let ready = Barrier::new(waiters.len() + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = waiters
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let ready = &ready;
                let payload = &payload;
                s.spawn(move || {
                    ready.wait();
                    let v = if k % 2 == 0 {
                        let got = c.wait_ready(&[late], 1, Some(Instant::now() + T)).unwrap();
                        assert_eq!(got, vec![Readiness::Ready]);
                        c.get(late, Timeout::Poll).unwrap()
                    } else {
                        c.get(late, T).unwrap()
                    };
                    assert_eq!(v.as_slice(), payload.as_slice());
                })
            })
            .collect();
        ready.wait();
        // Not a bound: lets most waiters park before the seal (either way they must see it).
        std::thread::sleep(Duration::from_millis(200));
        w.seal().unwrap();
        for h in handles {
            h.join().unwrap();
        }
    });

    // A client that disconnects while pinning: its pin goes with it (a deferred delete
    // completes). It pins with a `Hold`, as a reference does.
    let quitter = clients.pop().unwrap();
    assert!(quitter.is_overflow_client());
    quitter.hold(&small[0]).unwrap();
    quitter.stats().unwrap();
    assert_eq!(
        first.delete(&[small[0]]).unwrap(),
        vec![DeleteOutcome::Deferred]
    );
    drop(quitter);
    wait_until(T, "the quitter's pin to go", || {
        !first.list().unwrap().iter().any(|o| o.id == small[0])
    });

    // A process killed while pinning (an overflow client too: every index below it is
    // taken): its pin goes, the deferred delete completes.
    let doomed = small[1];
    let mut pinner = Helper::start(Role::store(&store.socket, StoreRole::Pin { id: doomed }));
    pinner.expect_line("PINNED", T);
    assert_eq!(first.stats().unwrap().clients, N as u64);
    let listed = first.list().unwrap();
    let entry = listed.iter().find(|o| o.id == doomed).unwrap();
    assert_eq!(entry.pins, 1, "the helper's pin");
    assert_eq!(
        first.delete(&[doomed]).unwrap(),
        vec![DeleteOutcome::Deferred]
    );
    pinner.kill9();
    wait_until(T, "the killed pinner's pin to go", || {
        !first.list().unwrap().iter().any(|o| o.id == doomed)
    });

    // Everything let go: back at the baseline with the clients still connected.
    let mut plain: Vec<ObjectId> = small[2..].to_vec();
    plain.extend(large.iter().map(|&(_, id)| id));
    plain.push(late);
    let outcomes = first.delete(&plain).unwrap();
    assert!(
        outcomes.iter().all(|o| *o == DeleteOutcome::Deleted),
        "{outcomes:?}"
    );
    back_to(first, &base, "after a thousand clients");
    let s = first.stats().unwrap();
    assert_eq!((s.pinned, s.clients), (0, N as u64 - 1), "{s:?}");
    eprintln!(
        "{N} clients ({overflow} overflow clients) in {:?}",
        start.elapsed()
    );
    drop(clients);
}
register!(alone: store_a_thousand_clients_do_everything_a_client_does);

/// `troved --max-clients`: one client past it is refused with `TooManyClients`; a free index
/// is given again, lowest first.
pub fn store_clients_past_max_clients_are_refused_with_a_typed_error() {
    const MAX: usize = PIN_CLIENTS as usize + 3;
    let store = TestStore::start_with("16MiB", &["--max-clients", &MAX.to_string()]);
    let mut clients = connect_many(&store, MAX);
    match StoreClient::connect(&store.socket) {
        Err(StoreError::TooManyClients { limit }) => assert_eq!(limit as usize, MAX),
        other => panic!("expected TooManyClients, got {other:?}"),
    }
    assert!(clients[MAX - 1].is_overflow_client());
    // One leaves: the next client gets its index back, the lowest free one.
    let gone = clients.swap_remove(5).client_index();
    wait_until(T, "the departure", || {
        clients[0].stats().unwrap().clients == MAX as u64 - 1
    });
    let again = store.client();
    assert_eq!(again.client_index(), gone);
    assert_eq!(
        again.is_overflow_client(),
        gone >= again.arena().layout().pin_clients
    );
}
register!(store_clients_past_max_clients_are_refused_with_a_typed_error);

/// `Pin` frames from connections speaking the protocol directly (all overflow clients here):
/// for ids that do not exist, one-way, truncated, with trailing bytes, followed by `Unhold`s
/// of what they never pinned. The daemon answers or closes that connection only; a pin it
/// took is dropped when the connection goes, and the store is back at its baseline.
pub fn store_hostile_pin_frames_change_nothing_once_their_sender_is_gone() {
    let store = TestStore::start_with_env("16MiB", &[], &[("TROVE_STORE_PIN_CLIENTS", "0")]);
    let good = store.client();
    assert!(good.is_overflow_client());
    let base = good.stats().unwrap();
    let id = ObjectId::random();
    good.put(id, &pattern(3, 1000)).unwrap();
    let frame = |body: &[u8]| {
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(body);
        f
    };
    let pin = Request::Pin { id }.encode(1);
    for round in 0..20u64 {
        let mut s = raw_connection(&store.socket);
        // A pin of a live object, answered and then one-way; pins of unknown ids.
        s.write_all(&pin).unwrap();
        s.write_all(&Request::Pin { id }.encode(0)).unwrap();
        for n in 0..5 {
            let other = ObjectId::from_parts([round as u8; 12], n);
            s.write_all(&Request::Pin { id: other }.encode(2 + n))
                .unwrap();
            s.write_all(&Request::Unhold { id: other }.encode(0))
                .unwrap();
        }
        // Malformed bodies (framing intact): a short id, trailing bytes.
        s.write_all(&frame(&pin[4..pin.len() - 3])).unwrap();
        let mut long = pin[4..].to_vec();
        long.push(0);
        s.write_all(&frame(&long)).unwrap();
        // A few connections let go of their pin first; the others keep it until they close.
        if round % 3 == 0 {
            s.write_all(&Request::Unhold { id }.encode(0)).unwrap();
            s.write_all(&Request::Unhold { id }.encode(0)).unwrap();
        }
        s.write_all(&Request::Stats.encode(99)).unwrap();
        // Every reply read (a reply the daemon cannot write cuts the connection off, which
        // keeps its pins while this process lives), up to the last one.
        loop {
            let body = read_frame(&mut s, MAX_REPLY).unwrap().expect("a reply");
            match Reply::decode(&body).unwrap() {
                (99, Reply::Stats(_)) => break,
                (1, Reply::Pinned { size, .. }) => assert_eq!(size, 1000),
                (_, Reply::Error { code, .. }) => {
                    assert!(
                        matches!(code, ErrorCode::NotFound | ErrorCode::Protocol),
                        "{code:?}"
                    )
                }
                other => panic!("{other:?}"),
            }
        }
        if round % 5 == 0 {
            // Truncated: the length promises more than is sent before the client goes.
            s.write_all(&pin[..pin.len() - 4]).unwrap();
        }
        drop(s);
    }
    // Still serving; once the raw connections are gone, only `good` is left.
    wait_until(T, "the raw connections to go", || {
        good.stats().unwrap().clients == 1
    });
    assert_eq!(
        good.get(id, Timeout::Poll).unwrap().as_slice(),
        pattern(3, 1000).as_slice()
    );
    assert_eq!(good.list().unwrap()[0].pins, 0, "no pin left behind");
    assert_eq!(good.delete(&[id]).unwrap(), vec![DeleteOutcome::Deleted]);
    back_to(&good, &base, "after hostile pins");
}
register!(store_hostile_pin_frames_change_nothing_once_their_sender_is_gone);

/// Clients come and go, each leaving one small object that another client keeps (a task's
/// 8-byte result, an extra worker's mailbox): a slab is freed only once every object in it
/// is gone, so each of them would hold a whole slab. Client slabs stay within their share of
/// the store; past it the daemon places small objects itself. The store, nearly empty, still
/// takes a large object and more small ones, and is back at its baseline once they go.
pub fn store_small_objects_left_by_many_clients_do_not_fill_it_with_slabs() {
    const CLIENTS: usize = 200;
    let store = TestStore::start("64MiB");
    let keeper = store.client();
    let base = keeper.stats().unwrap();
    let mut kept = Vec::new();
    for i in 0..CLIENTS {
        let c = store.client();
        let id = ObjectId::random();
        let mut w = c
            .alloc_owned(id, 8)
            .unwrap_or_else(|e| panic!("client {i}'s small object: {e}"));
        w.as_mut_slice().copy_from_slice(&(i as u64).to_le_bytes());
        w.publish(&[]).unwrap();
        c.flush().unwrap();
        // Sealed once the keeper sees it; the keeper's reference then pins it at once.
        let v = keeper.get(id, T).unwrap();
        keeper.hold(&id).unwrap();
        drop(v);
        kept.push(id);
        // Its own reference goes with it.
        drop(c);
    }
    let s = keeper.stats().unwrap();
    assert!(
        s.used < base.used + (1 << 20),
        "{CLIENTS} objects of 8 bytes use {} bytes",
        s.used - base.used
    );
    // Each is readable by the keeper.
    for (i, id) in kept.iter().enumerate() {
        let v = keeper.get(*id, Timeout::Poll).unwrap();
        assert_eq!(&v[..], &(i as u64).to_le_bytes());
    }
    // Room for a large object and more small ones.
    let big = ObjectId::random();
    keeper
        .put(big, &vec![7u8; 16 << 20])
        .expect("a 16 MiB object in a 64 MiB store holding 1.6 KiB");
    // The first asks for a slab (refused past the budget, placed by the daemon); the next
    // ones go straight to the daemon.
    let small: Vec<ObjectId> = (0..3u8)
        .map(|i| {
            let id = ObjectId::random();
            let mut w = keeper.alloc_owned(id, 100).unwrap();
            w.as_mut_slice().fill(i);
            w.publish(&[]).unwrap();
            id
        })
        .collect();
    for (i, id) in small.iter().enumerate() {
        let v = keeper.get(*id, T).unwrap();
        assert!(v.iter().all(|&b| b == i as u8));
    }
    keeper.delete(&[big]).unwrap();
    for id in &small {
        keeper.release(id);
    }
    for id in &kept {
        keeper.release(id);
    }
    back_to(&keeper, &base, "after the kept objects go");
}
register!(store_small_objects_left_by_many_clients_do_not_fill_it_with_slabs);

/// Threads of this process named `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name)
                })
                .count()
        })
        .unwrap_or(0)
}

/// A client's first views of large objects hand them to one read-behind helper thread (it
/// fills the page tables from the object's end while the reader starts at its beginning);
/// the bytes read are the object's, and the helper goes with its client. Run alone: other
/// tests' clients start helpers of their own.
pub fn store_read_behind_helper_is_one_per_client_and_goes_with_it() {
    let store = TestStore::start("256MiB");
    let writer = store.client();
    let base = writer.stats().unwrap();
    let ids: Vec<ObjectId> = (0..3u8)
        .map(|i| {
            let id = ObjectId::random();
            writer.put(id, &vec![i + 1; 40 << 20]).unwrap();
            id
        })
        .collect();
    let before = threads_named("trove-populate");
    let reader = store.client();
    for (i, id) in ids.iter().enumerate() {
        let v = reader.get(*id, T).unwrap();
        let want = i as u8 + 1;
        assert!(v.iter().all(|&b| b == want), "object {i} reads right");
    }
    assert_eq!(threads_named("trove-populate"), before + 1, "one helper");
    drop(reader);
    wait_until(T, "the helper to go with its client", || {
        threads_named("trove-populate") == before
    });
    writer.delete(&ids).unwrap();
    back_to(&writer, &base, "after the large objects go");
}
register!(alone: store_read_behind_helper_is_one_per_client_and_goes_with_it);

/// A large put is populated by its creator, on several threads where there are cores, and not
/// by the daemon first: the bytes another client reads are the bytes put, an object of another
/// size placed after it reads right too, and the store is back at its baseline once they are
/// deleted, with both clients connected.
pub fn store_large_puts_populated_by_their_creator_read_right_elsewhere() {
    let store = TestStore::start("256MiB");
    let writer = store.client();
    let reader = store.client();
    let base = writer.stats().unwrap();
    // 96 MiB: split between threads (at least 32 MiB each); 40 MiB + 1: one thread, and a
    // length that is not a whole number of pages.
    let sizes = [96usize << 20, (40 << 20) + 1];
    let ids: Vec<(ObjectId, Vec<u8>)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let id = ObjectId::random();
            let data = pattern(i as u64 + 7, len);
            writer.put(id, &data).unwrap();
            (id, data)
        })
        .collect();
    for (id, data) in &ids {
        let v = reader.get(*id, T).unwrap();
        assert!(
            v[..] == data[..],
            "{} bytes read elsewhere as put",
            data.len()
        );
    }
    let all: Vec<ObjectId> = ids.iter().map(|(id, _)| *id).collect();
    writer.delete(&all).unwrap();
    back_to(&writer, &base, "after the large objects go");
    drop(reader);
}
register!(store_large_puts_populated_by_their_creator_read_right_elsewhere);
