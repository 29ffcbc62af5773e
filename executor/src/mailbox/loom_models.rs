//! Model tests (loom) of the mailbox's claim loop (Vyukov's per-slot sequence numbers; push
//! and pop share [`Mailbox::claim`]), run on the real `try_push`/`try_pop` over a heap region
//! whose atomics are loom's:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p trove-executor --release --lib loom -- --nocapture
//! ```
//!
//! Every message is popped exactly once, in order per producer, with its own bytes; a full or
//! empty answer is only given when the queue was full or empty. The payload is copied as
//! plain bytes, which loom does not track, so each message also has its own length: the
//! length word is an atomic that loom does track, and reading a stale one would show.
//! The parking in `pop` is `trove_store::blocks::park`'s, modelled there (`park::loom_models`:
//! no lost wake-up with one or two waiters, `notify_one` and `notify_all`).

use std::sync::Arc;

use loom::thread;
use trove_store::sync::explore;

use super::*;

const SLOT_SIZE: u64 = 32;
/// Messages per producer in `loom_two_producers_one_consumer`.
const MSGS: [u8; 2] = [2, 1];
/// Messages in `loom_one_producer_two_consumers`.
const ONE_TO_TWO: u64 = 3;
/// How often a thread that may have to wait for another tries before it gives up.
const TRIES: usize = 2;

#[repr(C, align(64))]
struct Chunk([u8; 64]);

/// A mailbox in a heap region whose atomics are loom's (created inside the model).
struct ModelMailbox {
    m: Mailbox,
    _region: Vec<Chunk>,
}

impl ModelMailbox {
    fn new(capacity: u64) -> Arc<ModelMailbox> {
        let len = mailbox_bytes(capacity, SLOT_SIZE);
        let mut region: Vec<Chunk> = (0..len.div_ceil(64)).map(|_| Chunk([0; 64])).collect();
        let base = region.as_mut_ptr() as *mut u8;
        let view = Mailbox {
            base: NonNull::new(base).expect("non-null"),
            capacity,
            slot_size: SLOT_SIZE,
        };
        let header = Header {
            head: Line(AtomicU64::new(0)),
            tail: Line(AtomicU64::new(0)),
            park: Line(Park::new()),
            region: RegionHeader::new(),
            program: AtomicU64::new(0),
            type_tag: AtomicU64::new(0),
            cancels: AtomicU64::new(0),
            consumer_pid: AtomicU64::new(0),
            dead: AtomicU32::new(0),
            current: Line(Current {
                set: AtomicU32::new(0),
                pos: AtomicU64::new(0),
                words: std::array::from_fn(|_| AtomicU64::new(0)),
            }),
            debts: crate::debts::Book::new(),
            replies: Line(Park::new()),
        };
        // SAFETY: the region is `mailbox_bytes` long and 64-byte aligned, nothing references
        // it yet, and each write below puts an atomic where the mailbox code will find one:
        // the header at the start, each slot's sequence (8-aligned) and length word (at
        // offset 8; a loom atomic is 8 bytes, inside the 16-byte slot header), each record
        // after the slots (64-aligned, RECORD_LEN bytes).
        unsafe {
            (base as *mut Header).write(header);
            for i in 0..capacity {
                (view.slot(i) as *mut AtomicU64).write(AtomicU64::new(0));
                (view.slot(i).add(8) as *mut AtomicU32).write(AtomicU32::new(0));
                (base.add(records_offset(capacity, SLOT_SIZE) + i as usize * RECORD_LEN)
                    as *mut Record)
                    .write(Record::for_model());
            }
        }
        // SAFETY: as above; the region lives as long as the returned value, which every
        // thread of the model holds while it uses the mailbox.
        let m = unsafe { Mailbox::init(base, capacity, SLOT_SIZE, 0) }.expect("init");
        Arc::new(ModelMailbox { m, _region: region })
    }
}

/// The claim tags (a consumer's pid in production) of the models' consumers.
const CONSUMER: u32 = 1;
const OTHER: u32 = 2;

/// Message `k` of producer `p`: its own bytes and its own length (1..=8).
fn message(p: u8, k: u8) -> Vec<u8> {
    vec![p * 16 + k; 1 + (p * 4 + k) as usize]
}

fn push(m: &Mailbox, msg: &[u8]) -> u64 {
    loop {
        match m.try_push(msg).expect("push") {
            Some(pos) => return pos,
            None => thread::yield_now(),
        }
    }
}

/// Two producers race to claim positions in a two-slot mailbox (one pushes two messages, the
/// other one, so a slot is reused and a push may find it full) while one consumer pops: every
/// message pushed arrives once, with its bytes, in order per producer, at consecutive
/// positions. (Every side gives up after a few tries, since two threads polling could yield
/// to each other forever in the model; what is left is drained at the end.)
#[test]
fn loom_two_producers_one_consumer() {
    let n = explore("two_producers_one_consumer", 2, || {
        let mb = ModelMailbox::new(2);
        let producers: Vec<_> = (0..2u8)
            .map(|p| {
                let mb = Arc::clone(&mb);
                thread::spawn(move || {
                    let mut claimed = Vec::new();
                    let mut tries = 0;
                    while claimed.len() < MSGS[p as usize] as usize && tries < TRIES {
                        let msg = message(p, claimed.len() as u8);
                        match mb.m.try_push(&msg).expect("push") {
                            Some(pos) => claimed.push(pos),
                            None => {
                                tries += 1;
                                thread::yield_now();
                            }
                        }
                    }
                    claimed
                })
            })
            .collect();
        let mut got = Vec::new();
        for _ in 0..TRIES {
            match mb
                .m
                .try_pop(CONSUMER, |pos, b| (pos, b.to_vec()))
                .expect("pop")
            {
                Some(x) => got.push(x),
                None => thread::yield_now(),
            }
        }
        let claimed: Vec<Vec<u64>> = producers
            .into_iter()
            .map(|p| p.join().expect("producer"))
            .collect();
        while let Some(x) =
            mb.m.try_pop(CONSUMER, |pos, b| (pos, b.to_vec()))
                .expect("pop")
        {
            got.push(x);
        }
        let total: usize = claimed.iter().map(Vec::len).sum();
        let positions: Vec<u64> = got.iter().map(|(pos, _)| *pos).collect();
        assert_eq!(
            positions,
            (0..total as u64).collect::<Vec<_>>(),
            "lost or duplicated"
        );
        for (p, mine) in claimed.iter().enumerate() {
            assert!(
                mine.windows(2).all(|w| w[0] < w[1]),
                "producer {p}: {mine:?}"
            );
            for (k, &pos) in mine.iter().enumerate() {
                assert_eq!(
                    got[pos as usize].1,
                    message(p as u8, k as u8),
                    "producer {p}"
                );
            }
        }
    });
    assert!(n > 1);
}

/// One producer pushes three messages through a two-slot mailbox (so a slot is reused) while
/// two consumers pop (one of them only a few times: two consumers polling an empty queue
/// could yield to each other forever in the model): each message is popped exactly once,
/// each consumer sees its messages in order, and nothing is left.
#[test]
fn loom_one_producer_two_consumers() {
    let n = explore("one_producer_two_consumers", 2, || {
        let mb = ModelMailbox::new(2);
        let consume = {
            let mb = Arc::clone(&mb);
            move |tag: u32| {
                let mut got = Vec::new();
                for _ in 0..TRIES {
                    match mb.m.try_pop(tag, |pos, b| (pos, b.to_vec())).expect("pop") {
                        Some(x) => got.push(x),
                        None => thread::yield_now(),
                    }
                }
                got
            }
        };
        let producer = {
            let mb = Arc::clone(&mb);
            thread::spawn(move || {
                for k in 0..ONE_TO_TWO as u8 {
                    assert_eq!(push(&mb.m, &message(0, k)), k as u64);
                }
            })
        };
        let other = thread::spawn({
            let consume = consume.clone();
            move || consume(OTHER)
        });
        let mine = consume(CONSUMER);
        let theirs = other.join().expect("consumer");
        for got in [&mine, &theirs] {
            assert!(
                got.windows(2).all(|w| w[0].0 < w[1].0),
                "out of order: {got:?}"
            );
        }
        let mut all: Vec<(u64, Vec<u8>)> = mine.into_iter().chain(theirs).collect();
        while all.len() < ONE_TO_TWO as usize {
            match mb
                .m
                .try_pop(CONSUMER, |pos, b| (pos, b.to_vec()))
                .expect("pop")
            {
                Some(x) => all.push(x),
                None => thread::yield_now(),
            }
        }
        producer.join().expect("producer");
        assert_eq!(mb.m.try_pop(CONSUMER, |_, _| ()).expect("pop"), None);
        all.sort();
        let expected: Vec<(u64, Vec<u8>)> = (0..ONE_TO_TWO as u8)
            .map(|k| (k as u64, message(0, k)))
            .collect();
        assert_eq!(all, expected, "lost or duplicated");
    });
    assert!(n > 1);
}

/// One producer, one consumer, a two-slot mailbox, three messages: `try_push` says full only
/// when two messages are in it, and `try_pop` says empty only when none is. (What each side
/// counts it has seen done by the other happens before its own attempt, so the answer must
/// account for it.)
#[test]
fn loom_full_and_empty_are_reported_right() {
    let n = explore("full_and_empty_are_reported_right", 3, || {
        let mb = ModelMailbox::new(2);
        let pushed = Arc::new(AtomicU64::new(0));
        let popped = Arc::new(AtomicU64::new(0));
        let producer = {
            let (mb, pushed, popped) = (Arc::clone(&mb), Arc::clone(&pushed), Arc::clone(&popped));
            thread::spawn(move || {
                let mut k = 0;
                while k < 3 {
                    let out = popped.load(Ordering::SeqCst);
                    match mb.m.try_push(&message(0, k as u8)).expect("push") {
                        Some(pos) => {
                            assert_eq!(pos, k);
                            k += 1;
                            pushed.store(k, Ordering::SeqCst);
                        }
                        None => {
                            assert!(k - out >= 2, "full with {} messages in it", k - out);
                            thread::yield_now();
                        }
                    }
                }
            })
        };
        let mut j = 0;
        while j < 3 {
            let ready = pushed.load(Ordering::SeqCst);
            match mb
                .m
                .try_pop(CONSUMER, |pos, b| (pos, b.to_vec()))
                .expect("pop")
            {
                Some((pos, b)) => {
                    assert_eq!((pos, b), (j, message(0, j as u8)));
                    j += 1;
                    popped.store(j, Ordering::SeqCst);
                }
                None => {
                    assert!(ready <= j, "empty with {} messages in it", ready - j);
                    thread::yield_now();
                }
            }
        }
        producer.join().expect("producer");
    });
    assert!(n > 1);
}
