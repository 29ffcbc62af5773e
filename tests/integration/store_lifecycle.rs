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
        }) => {
            assert_eq!((requested, capacity), (KIB300 as u64, 1 << 20));
            assert_eq!(pinned, 3 * KIB300 as u64);
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
