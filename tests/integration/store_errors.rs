//! Misuse gets a clear typed error and changes nothing.

use std::time::Duration;

use trove_store::{DeleteOutcome, ObjectId, StoreError, Timeout};

use crate::harness::register;
use crate::role::{Role, StoreRole};
use crate::util::{Helper, TestStore};

pub fn store_double_seal_unknown_ids_and_duplicates() {
    let store = TestStore::start("16MiB");
    let c = store.client();
    let id = ObjectId::random();
    c.put(id, b"x").unwrap();
    assert!(matches!(c.seal(id), Err(StoreError::AlreadySealed(i)) if i == id));
    assert!(matches!(c.abort(id), Err(StoreError::AlreadySealed(_))));
    assert!(matches!(c.create(id, 1), Err(StoreError::AlreadyExists(_))));
    let unknown = ObjectId::random();
    assert!(matches!(c.seal(unknown), Err(StoreError::NotFound(i)) if i == unknown));
    assert!(matches!(c.abort(unknown), Err(StoreError::NotFound(_))));
    // The table is unchanged by all of that.
    assert_eq!(c.stats().unwrap().objects, 1);
    assert_eq!(c.get(id, Timeout::Poll).unwrap().as_slice(), b"x");
}
register!(store_double_seal_unknown_ids_and_duplicates);

pub fn store_other_clients_object_cannot_be_sealed_or_aborted() {
    let store = TestStore::start("16MiB");
    let c = store.client();
    let id = ObjectId::random();
    let mut h = Helper::start(Role::store(
        &store.socket,
        StoreRole::CreateHold { id, len: 4096 },
    ));
    h.expect_line("CREATED", Duration::from_secs(20));
    assert!(matches!(c.abort(id), Err(StoreError::NotOwner(_))));
    assert!(matches!(c.seal(id), Err(StoreError::NotOwner(_))));
    assert_eq!(c.delete(&[id]).unwrap(), vec![DeleteOutcome::NotSealed]);
    assert!(!c.contains(id).unwrap());
    assert_eq!(c.stats().unwrap().objects, 1);
}
register!(store_other_clients_object_cannot_be_sealed_or_aborted);

pub fn store_oversize_create_is_store_full_at_once() {
    let store = TestStore::start("16MiB");
    let c = store.client();
    match c.create(ObjectId::random(), 1 << 40) {
        Err(StoreError::StoreFull {
            requested,
            capacity,
            pinned,
            detail,
        }) => {
            assert_eq!(requested, 1 << 40);
            assert_eq!(capacity, 16 << 20);
            assert_eq!(pinned, 0);
            assert!(detail.contains("no object pinned by a process"), "{detail}");
        }
        other => panic!("expected StoreFull, got {:?}", other.map(|w| w.id())),
    }
    assert!(matches!(
        c.create(ObjectId::random(), u64::MAX),
        Err(StoreError::StoreFull { .. })
    ));
    assert_eq!(c.stats().unwrap().used, 0);
}
register!(store_oversize_create_is_store_full_at_once);
