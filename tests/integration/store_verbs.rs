//! Every store verb, across processes.

use std::time::{Duration, Instant};

use trove_store::{DeleteOutcome, Event, ObjectId, ObjectState, StoreError, Timeout};

use crate::harness::register;
use crate::role::{Role, StoreRole};
use crate::util::{Helper, TestStore, is_timeout, pattern};

const T: Duration = Duration::from_secs(20);

pub fn store_verbs_across_processes() {
    let store = TestStore::start("64MiB");
    let c = store.client();
    let id = ObjectId::random();
    let mut h = Helper::start(Role::store(
        &store.socket,
        StoreRole::Put {
            id,
            len: 100000,
            seed: 7,
            delay_ms: 0,
        },
    ));
    h.expect_line("DONE", T);
    assert!(h.wait(T).success());

    assert!(c.contains(id).unwrap());
    let view = c.get(id, Timeout::Poll).unwrap();
    assert_eq!(view.as_slice(), pattern(7, 100_000).as_slice());
    let listed = c.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, id);
    assert_eq!(listed[0].state, ObjectState::Sealed);
    assert_eq!(listed[0].pins, 1, "our view pins it");
    let s = c.stats().unwrap();
    assert_eq!((s.objects, s.sealed), (1, 1));
    assert!(s.used >= 100_000);
    assert!(s.pinned >= 100_000);
    // A second reader process sees the same bytes.
    let mut r = Helper::start(Role::store(
        &store.socket,
        StoreRole::GetCheck {
            id,
            len: 100000,
            seed: 7,
        },
    ));
    r.expect_line("OK", T);
    assert!(r.wait(T).success());
    drop(view);
    assert_eq!(c.stats().unwrap().pinned, 0);

    assert_eq!(c.delete(&[id]).unwrap(), vec![DeleteOutcome::Deleted]);
    assert!(!c.contains(id).unwrap());
    assert!(matches!(
        c.get(id, Timeout::Poll),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(c.delete(&[id]).unwrap(), vec![DeleteOutcome::NotFound]);
    assert_eq!(c.stats().unwrap().used, 0);
}
register!(store_verbs_across_processes);

pub fn store_get_blocks_until_another_process_seals() {
    let store = TestStore::start("64MiB");
    let c = store.client();
    let id = ObjectId::random();
    let start = Instant::now();
    let _h = Helper::start(Role::store(
        &store.socket,
        StoreRole::Put {
            id,
            len: 4096,
            seed: 3,
            delay_ms: 300,
        },
    ));
    let view = c.get(id, T).unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(view.as_slice(), pattern(3, 4096).as_slice());
}
register!(store_get_blocks_until_another_process_seals);

pub fn store_get_timeout_and_poll() {
    let store = TestStore::start("64MiB");
    let c = store.client();
    let id = ObjectId::random();
    let start = Instant::now();
    let e = c
        .get(id, Duration::from_millis(300))
        .err()
        .expect("nothing to get");
    assert!(is_timeout(&e), "{e:?}");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(matches!(
        c.get(id, Timeout::Poll),
        Err(StoreError::NotFound(_))
    ));
    // An object being created is not gettable yet: polling it is a timeout, not NotFound.
    let w = c.create(id, 10).unwrap();
    assert!(matches!(
        c.get(id, Timeout::Poll),
        Err(StoreError::Timeout(_))
    ));
    let deadline = Instant::now() + Duration::from_millis(100);
    assert!(is_timeout(
        &c.get(id, Timeout::Until(deadline)).err().unwrap()
    ));
    w.seal().unwrap();
    assert_eq!(c.get(id, Timeout::Poll).unwrap().len(), 10);
}
register!(store_get_timeout_and_poll);

pub fn store_get_many_returns_what_is_ready() {
    let store = TestStore::start("64MiB");
    let c = store.client();
    let a = ObjectId::random();
    let b = ObjectId::random();
    let missing = ObjectId::random();
    c.put(a, b"alpha").unwrap();
    let _h = Helper::start(Role::store(
        &store.socket,
        StoreRole::Put {
            id: b,
            len: 64,
            seed: 1,
            delay_ms: 200,
        },
    ));
    let got = c
        .get_many(&[a, b, missing, a], Timeout::After(Duration::from_secs(2)))
        .unwrap();
    assert_eq!(got[0].as_deref(), Some(&b"alpha"[..]));
    assert_eq!(got[1].as_deref(), Some(pattern(1, 64).as_slice()));
    assert!(got[2].is_none());
    assert_eq!(got[3].as_deref(), Some(&b"alpha"[..]));
    // Two views of one object are one pin for this client.
    assert_eq!(
        c.list().unwrap().iter().find(|o| o.id == a).unwrap().pins,
        1
    );
}
register!(store_get_many_returns_what_is_ready);

pub fn store_subscribe_sees_seals_and_deletes() {
    let store = TestStore::start("64MiB");
    let c = store.client();
    let mut sub = c.subscribe().unwrap();
    assert_eq!(sub.next(Duration::from_millis(50)).unwrap(), None);
    let id = ObjectId::random();
    let mut h = Helper::start(Role::store(
        &store.socket,
        StoreRole::Put {
            id,
            len: 777,
            seed: 1,
            delay_ms: 0,
        },
    ));
    h.expect_line("DONE", T);
    assert_eq!(sub.next(T).unwrap(), Some(Event::Sealed { id, size: 777 }));
    c.delete(&[id]).unwrap();
    assert_eq!(sub.next(T).unwrap(), Some(Event::Deleted { id }));
}
register!(store_subscribe_sees_seals_and_deletes);

pub fn store_evict_verb_and_zero_size_and_abort() {
    let store = TestStore::start("64MiB");
    let c = store.client();
    let ids: Vec<_> = (0..3).map(|_| ObjectId::random()).collect();
    for (n, id) in ids.iter().enumerate() {
        c.put(*id, &pattern(n as u64, 1000)).unwrap();
    }
    assert_eq!(c.evict(1).unwrap(), (1, 1024));
    assert!(
        !c.contains(ids[0]).unwrap(),
        "the least recently used goes first"
    );
    assert!(c.contains(ids[1]).unwrap() && c.contains(ids[2]).unwrap());

    let z = ObjectId::random();
    c.put(z, &[]).unwrap();
    assert_eq!(c.get(z, Timeout::Poll).unwrap().len(), 0);

    let gone = ObjectId::random();
    let w = c.create(gone, 4096).unwrap();
    drop(w); // an unsealed writer that is dropped aborts
    assert!(matches!(
        c.get(gone, Timeout::Poll),
        Err(StoreError::NotFound(_))
    ));
    let explicit = ObjectId::random();
    c.create(explicit, 64).unwrap().abort().unwrap();
    assert_eq!(c.stats().unwrap().objects, 3);
}
register!(store_evict_verb_and_zero_size_and_abort);

/// Small owned puts from four threads of one client, racing each other through several slabs
/// (published out of allocation order, some while the slab is being replaced): every object
/// lands, with its bytes, and another connection reads them all.
pub fn store_small_puts_from_many_threads_all_land() {
    let store = TestStore::start("128MiB");
    let c = store.client();
    let ids: Vec<Vec<(ObjectId, usize)>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4u8)
            .map(|t| {
                let c = c.clone();
                s.spawn(move || {
                    (0..3000usize)
                        .map(|i| {
                            let id = ObjectId::random();
                            let len = 100 + (i * 37 + t as usize * 11) % 3000;
                            let mut w = c.alloc_owned(id, len as u64).unwrap();
                            w.as_mut_slice().copy_from_slice(&pattern(t as u64, len));
                            if i % 7 == 0 {
                                std::thread::yield_now();
                            }
                            w.publish(&[]).unwrap();
                            (id, len)
                        })
                        .collect()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(c.stats().unwrap().objects, 12_000);
    let reader = store.client();
    for (t, list) in ids.iter().enumerate() {
        for (id, len) in list {
            let v = reader.get(*id, Timeout::Poll).unwrap();
            assert_eq!(v.as_slice(), pattern(t as u64, *len).as_slice());
        }
    }
}
register!(store_small_puts_from_many_threads_all_land);
