//! Model tests (loom) of the directory's lock-free protocols, run on the real `Directory`
//! code over a small arena whose slots hold loom atomics:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p trove-store --release --lib loom -- --nocapture
//! ```
//!
//! - the pin/remove handshake (a client sets its pin bit then re-reads the state word; the
//!   daemon moves the word to BUSY then reads the pin bits): never both "pinned" and
//!   "removed", and a delete deferred by a pin is reported by the last unpin;
//! - the lookup seqlock against a remove and a re-insert of the same id in the same slot: a
//!   reader never pairs one incarnation's word with the other's offset or size, and never
//!   pins the incarnation that was removed.

use std::sync::Arc;

use loom::thread;

use super::*;
use crate::blocks::sync::explore;

const CLIENT: u32 = 3;
const OLD: (u64, u64) = (4096, 100);
const NEW: (u64, u64) = (8192, 200);

impl Slot {
    fn for_model() -> Slot {
        Slot {
            word: AtomicU64::new(0),
            pins: [AtomicU64::new(0), AtomicU64::new(0)],
            id: std::array::from_fn(|_| AtomicU32::new(0)),
            owner: AtomicU32::new(0),
            offset: AtomicU64::new(0),
            size: AtomicU64::new(0),
            last_use: AtomicU64::new(0),
        }
    }
}

impl Arena {
    /// A small arena for a model: an anonymous mapping whose directory slots hold loom
    /// atomics (the header, rings and heap are not used by the directory code).
    fn for_model() -> Arena {
        let layout = Layout::new(4096, 1).expect("layout");
        let fd = memfd_create("trove-loom", MFdFlags::MFD_CLOEXEC).expect("memfd");
        let map = MmapRaw::from(
            MmapOptions::new()
                .len(layout.total_len as usize)
                .map_anon()
                .expect("anonymous mapping"),
        );
        for i in 0..layout.dir_slots {
            let at = (layout.dir_offset + i * SLOT_LEN as u64) as usize;
            // SAFETY: slot `i` lies inside the mapping (the layout puts the directory there),
            // 128-byte aligned (the mapping is page aligned, dir_offset a multiple of 4096),
            // and nothing references it yet; a loom Slot fits in SLOT_LEN (asserted above).
            unsafe { (map.as_mut_ptr().add(at) as *mut Slot).write(Slot::for_model()) };
        }
        Arena {
            map,
            fd,
            layout,
            populated: Populated::new(layout.total_len),
            populated_read: Populated::new(layout.total_len),
        }
    }
}

fn id() -> ObjectId {
    ObjectId([7; ID_LEN])
}

/// A client looks the object up and pins it while the daemon removes it (deferring the delete
/// to the last unpin when `mark_pending`): never pinned and removed at once, and a deferred
/// delete is reported by the client's unpin (the one inside a failed `try_pin` runs
/// concurrently with the removal; the one after a successful pin runs once it is decided).
fn pin_races_remove(mark_pending: bool) -> usize {
    explore("pin_races_remove", 3, move || {
        let arena = Arc::new(Arena::for_model());
        let d = arena.directory();
        let i = d.insert(&id(), OLD.0, OLD.1, 0).expect("insert");
        d.seal(i);
        let client = {
            let arena = Arc::clone(&arena);
            thread::spawn(move || {
                let d = arena.directory();
                let Lookup::Sealed(e) = d.lookup(&id()) else {
                    return None;
                };
                assert_eq!((e.offset, e.size), OLD);
                Some((e, d.try_pin(&e, CLIENT)))
            })
        };
        let removal = d.try_remove(i, mark_pending);
        let (pinned, tell) = match client.join().expect("client") {
            None => (false, false),
            Some((e, (true, tell))) => (true, tell || d.unpin(e.slot, CLIENT)),
            Some((_, (false, tell))) => (false, tell),
        };
        assert!(
            !(pinned && removal == Removal::Removed),
            "the object was removed while the client pinned it"
        );
        match removal {
            Removal::Removed => assert!(!tell, "a removed object reported again"),
            Removal::Pinned if mark_pending => assert!(tell, "a deferred delete never reported"),
            Removal::Pinned => assert!(!tell, "nothing was deferred"),
        }
        assert!(!d.is_pinned(i), "the client left its pin bit");
    })
}

#[test]
fn loom_pin_races_remove() {
    assert!(pin_races_remove(false) > 1);
}

#[test]
fn loom_pin_races_deferred_remove() {
    assert!(pin_races_remove(true) > 1);
}

/// The lookup seqlock and the pin against a remove followed by a re-insert of the same id
/// (same slot, next generation, other offset and size).
#[test]
fn loom_lookup_and_pin_race_remove_and_reinsert() {
    let n = explore("lookup_and_pin_race_remove_and_reinsert", 2, || {
        let arena = Arc::new(Arena::for_model());
        let d = arena.directory();
        let i = d.insert(&id(), OLD.0, OLD.1, 0).expect("insert");
        d.seal(i);
        let old_gen = word_gen(d.slot(i).word.load(Ordering::Relaxed));
        let client = {
            let arena = Arc::clone(&arena);
            thread::spawn(move || {
                let d = arena.directory();
                let Lookup::Sealed(e) = d.lookup(&id()) else {
                    return None;
                };
                let fields = if word_gen(e.word) == old_gen {
                    OLD
                } else {
                    NEW
                };
                assert_eq!(
                    (e.offset, e.size),
                    fields,
                    "a lookup mixed two incarnations"
                );
                let (pinned, _) = d.try_pin(&e, CLIENT);
                Some((word_gen(e.word) == old_gen, pinned))
            })
        };
        let removal = d.try_remove(i, false);
        if removal == Removal::Removed {
            let j = d.insert(&id(), NEW.0, NEW.1, 0).expect("re-insert");
            assert_eq!(j, i, "the same id takes the same slot again");
            d.seal(j);
        }
        if let Some((old, pinned)) = client.join().expect("client") {
            assert!(
                !(old && pinned && removal == Removal::Removed),
                "the client pinned the incarnation that was removed"
            );
        }
    });
    assert!(n > 1);
}
