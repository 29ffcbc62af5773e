//! Model tests (loom) of the completion record's state machine, run on the real [`Record`]
//! code with loom atomics:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p trove-executor --release --lib loom -- --nocapture
//! ```
//!
//! Positions 0 and 1 stand for a call and the call a lap (`capacity` positions) later, which
//! uses the same record.

use std::sync::Arc;

use loom::thread;
use trove_store::sync::explore;

use super::*;

const VALUE: &[u8] = b"a small value";
const FIRST: (u64, u64) = (4096, 100);
const SECOND: (u64, u64) = (8192, 200);

impl Record {
    /// A record on the heap (loom atomics must be created inside the model).
    pub(crate) fn for_model() -> Record {
        Record {
            words: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn tag(&self) -> (u64, u64) {
        split(self.w(0).load(Ordering::SeqCst))
    }
}

fn id(n: u8) -> [u8; 20] {
    [n; 20]
}

/// A record holding `VALUE` inline for position 0.
fn inline_record() -> Arc<Record> {
    let r = Arc::new(Record::for_model());
    assert_eq!(r.claim(0), Claim::Ok(None));
    assert!(r.finish_inline(0, id(1), (2, 3), VALUE, false));
    r
}

fn take(r: &Record, pos: u64) -> Option<Vec<u8>> {
    let mut out = [0u8; INLINE_MAX];
    match r.take_inline(pos, &mut out) {
        Took::Value { error, len } => {
            assert!(!error);
            Some(out[..len].to_vec())
        }
        Took::No => None,
    }
}

/// The caller takes its inline value while the next lap's consumer claims the record (and so
/// evicts the value): exactly one of them owns it, with the right bytes, and afterwards the
/// caller reads the record as "gone" (look in the store) unless it took the value.
#[test]
fn loom_take_races_eviction() {
    let n = explore("take_races_eviction", 3, || {
        let r = inline_record();
        let caller = {
            let r = Arc::clone(&r);
            thread::spawn(move || take(&r, 0))
        };
        let evicted = match r.claim(1) {
            Claim::Ok(ev) => ev,
            Claim::Unavailable => panic!("the record was not busy"),
        };
        let taken = caller.join().expect("caller");
        assert!(
            taken.is_some() != evicted.is_some(),
            "owners: caller {taken:?}, consumer {evicted:?}"
        );
        if let Some(v) = &taken {
            assert_eq!(v, VALUE);
        }
        if let Some(ev) = &evicted {
            assert_eq!((ev.pos, ev.result, ev.reply_to), (0, id(1), (2, 3)));
            assert_eq!(ev.bytes, VALUE);
        }
        r.finish_stored(1, SECOND.0, SECOND.1, false);
        assert_eq!(r.seen(0), Seen::Gone);
        assert_eq!(take(&r, 0), None);
    });
    assert!(n > 1);
}

/// The caller asks for the store (`want`) and looks once, while the consumer finishes inline:
/// exactly one of them owns the value (the caller took it to store it, or the consumer saw
/// the wish and stores it), and a wanted value never stays inline.
#[test]
fn loom_want_races_finish_inline() {
    let n = explore("want_races_finish_inline", 3, || {
        let r = Arc::new(Record::for_model());
        assert_eq!(r.claim(0), Claim::Ok(None));
        let consumer = {
            let r = Arc::clone(&r);
            thread::spawn(move || {
                if r.finish_inline(0, id(1), (2, 3), VALUE, false) {
                    return false;
                }
                r.finish_stored(0, FIRST.0, FIRST.1, false);
                true
            })
        };
        r.want_store(0);
        let caller_owns = match r.seen(0) {
            Seen::Inline => take(&r, 0).inspect(|v| assert_eq!(v, VALUE)).is_some(),
            _ => false,
        };
        let consumer_owns = consumer.join().expect("consumer");
        assert!(
            caller_owns != consumer_owns,
            "owners: caller {caller_owns}, consumer {consumer_owns}"
        );
        assert_ne!(r.seen(0), Seen::Inline, "a wanted value stayed inline");
        if consumer_owns {
            assert_eq!(
                r.seen(0),
                Seen::Stored {
                    offset: FIRST.0,
                    len: FIRST.1,
                    error: false
                }
            );
        }
    });
    assert!(n > 1);
}

/// What a caller read for position 0, stored at `FIRST`, while the record was reused: its
/// own place, or "gone"; never the next call's offset or length.
fn own_place_or_gone(seen: Seen) {
    match seen {
        Seen::Stored { offset, len, error } => assert_eq!(
            (offset, len, error),
            (FIRST.0, FIRST.1, false),
            "the caller read the next call's place as its own"
        ),
        Seen::Gone => {}
        other => panic!("position 0 was {other:?}"),
    }
}

/// A caller reads a stored result's place (the seqlock in `seen`) while the next lap's
/// consumer claims the record and records its own place: the caller gets its own place or
/// "gone", never the next call's offset or length.
#[test]
fn loom_stored_place_read_races_reuse() {
    let n = explore("stored_place_read_races_reuse", 3, || {
        let r = Arc::new(Record::for_model());
        assert_eq!(r.claim(0), Claim::Ok(None));
        r.finish_stored(0, FIRST.0, FIRST.1, false);
        let caller = {
            let r = Arc::clone(&r);
            thread::spawn(move || r.seen(0))
        };
        assert_eq!(r.claim(1), Claim::Ok(None));
        r.finish_stored(1, SECOND.0, SECOND.1, true);
        own_place_or_gone(caller.join().expect("caller"));
    });
    assert!(n > 1);
}

/// `loom_want_races_finish_inline` with the consumer's fast path (`claim_finish_inline`, the
/// claim and the bytes in one go): exactly one owner still.
#[test]
fn loom_want_races_claim_finish_inline() {
    let n = explore("want_races_claim_finish_inline", 3, || {
        let r = Arc::new(Record::for_model());
        let consumer = {
            let r = Arc::clone(&r);
            thread::spawn(
                move || match r.claim_finish_inline(0, id(1), (2, 3), VALUE, false) {
                    Some(true) => false,
                    Some(false) => {
                        r.finish_stored(0, FIRST.0, FIRST.1, false);
                        true
                    }
                    None => panic!("an empty record refused the fast path"),
                },
            )
        };
        r.want_store(0);
        let caller_owns = match r.seen(0) {
            Seen::Inline => take(&r, 0).inspect(|v| assert_eq!(v, VALUE)).is_some(),
            _ => false,
        };
        let consumer_owns = consumer.join().expect("consumer");
        assert!(
            caller_owns != consumer_owns,
            "owners: caller {caller_owns}, consumer {consumer_owns}"
        );
        assert_ne!(r.seen(0), Seen::Inline, "a wanted value stayed inline");
    });
    assert!(n > 1);
}

/// The fast path reuses a record whose stored place a caller is reading, and whose next
/// lap's value another caller takes: the first caller reads its own place or "gone", never
/// the next value's length as its own; the fast path refuses a record that holds an untaken
/// value (that one is evicted by `claim_with`).
#[test]
fn loom_stored_place_read_races_fast_reuse() {
    let n = explore("stored_place_read_races_fast_reuse", 3, || {
        let r = Arc::new(Record::for_model());
        assert_eq!(r.claim(0), Claim::Ok(None));
        r.finish_stored(0, FIRST.0, FIRST.1, false);
        let caller = {
            let r = Arc::clone(&r);
            thread::spawn(move || r.seen(0))
        };
        assert_eq!(
            r.claim_finish_inline(1, id(2), (2, 3), VALUE, false),
            Some(true)
        );
        own_place_or_gone(caller.join().expect("caller"));
        // Position 1's value is untaken: a later lap may not overwrite it on the fast path.
        assert_eq!(r.claim_finish_inline(2, id(3), (2, 3), VALUE, false), None);
        assert_eq!(take(&r, 1).as_deref(), Some(VALUE));
        assert_eq!(
            r.claim_finish_inline(2, id(3), (2, 3), VALUE, false),
            Some(true)
        );
    });
    assert!(n > 1);
}

/// A consumer dies while filling the record (`WRITING`, or `EVICTING` after the caller asked
/// for the store); the reaper abandons the record while the caller polls it and the next
/// lap's consumer tries to claim it: the abandon succeeds once, the caller ends up reading
/// "gone" (look in the store) and never a value, and the next lap claims the record or gives
/// up (its caller falls back to the store too).
fn abandon_races_caller_and_next_lap(evicting: bool) -> usize {
    explore("abandon_races_caller_and_next_lap", 2, move || {
        let r = Arc::new(Record::for_model());
        if evicting {
            r.want_store(0);
        }
        assert_eq!(r.claim(0), Claim::Ok(None));
        if evicting {
            assert!(!r.finish_inline(0, id(1), (2, 3), VALUE, false));
            assert_eq!(r.tag(), (0, EVICTING));
        }
        // The consumer dies here.
        let reaper = {
            let r = Arc::clone(&r);
            thread::spawn(move || r.abandon(0))
        };
        let caller = {
            let r = Arc::clone(&r);
            thread::spawn(move || {
                for _ in 0..3 {
                    match r.seen(0) {
                        Seen::Pending => thread::yield_now(),
                        seen => return seen,
                    }
                }
                Seen::Pending
            })
        };
        let next = r.claim(1);
        if next == Claim::Ok(None) {
            r.finish_stored(1, SECOND.0, SECOND.1, false);
        } else {
            assert_eq!(next, Claim::Unavailable);
        }
        assert!(reaper.join().expect("reaper"), "abandon failed");
        let seen = caller.join().expect("caller");
        assert!(
            matches!(seen, Seen::Gone | Seen::Pending),
            "the caller of a dead writer's record saw {seen:?}"
        );
        assert_eq!(r.seen(0), Seen::Gone);
        assert!(!r.abandon(0), "abandoned twice");
    })
}

#[test]
fn loom_abandon_after_a_dead_writer() {
    assert!(abandon_races_caller_and_next_lap(false) > 1);
}

#[test]
fn loom_abandon_after_a_dead_evicting_writer() {
    assert!(abandon_races_caller_and_next_lap(true) > 1);
}
