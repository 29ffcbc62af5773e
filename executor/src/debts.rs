//! Debts: the results a consumer owes its callers, and how a dead consumer's are failed.
//!
//! A consumer (an actor or a worker) hands most results back inline in the call's completion
//! record ([`crate::record`]); a result that goes through the store instead is written into
//! the arena and *published by a one-way frame* batched in the consumer's store client. From
//! the moment the result leaves the record until that frame is written to the socket, the
//! result exists only in the consumer's memory: if the consumer dies then, its caller would
//! wait for an object nobody will ever create. So the consumer notes such a result as a
//! **debt** in its own mailbox's header (shared memory that outlives it), and whoever reaps
//! it fails every debt that was not paid.
//!
//! The protocol, in four steps, all in this file:
//!
//! 1. **Owe** ([`Ledger::owe`]): before it tries to store a result, the consumer records the
//!    debt (position, result id, reply-to) with the sequence number [`NOT_QUEUED`], so there
//!    is no moment when the result is neither in its record, nor owed, nor in the store.
//! 2. **Stamp** ([`Ledger::pay_with`]): while the store write runs, the debt is *armed* for
//!    the calling thread; the store client tells the ledger (a [`FrameObserver`]) the number
//!    of each publishing frame that thread queues, under the client's writer lock and so
//!    before the frame can be written; the armed debt takes that number. A failed write
//!    cancels the debt (sequence 0).
//! 3. **Pay**: after each socket write the store client reports the last frame written; the
//!    header keeps that number, and every debt whose frame is at or below it is paid (the
//!    daemon has the frame and handles it whatever happens to the consumer).
//! 4. **Fail** ([`Unsettled`]): the reaper (the zygote, which waits for its children) lists a
//!    dead consumer's debts; each unpaid one gets a failure report under the result's id
//!    (the store turns it into `ActorDied`/`TaskFailed` for the caller), then every debt is
//!    forgiven so a respawned consumer starts clean.
//!
//! A debt slot is reused only once its debt is paid ([`Ledger::owe`] writes the queued
//! frames when all [`DEBTS`] slots are unpaid). A slot is rewritten with its sequence word
//! at 0 (nothing owed) first, so a consumer that dies half-way leaves no debt with mixed
//! fields. An *evicted* debt is an earlier caller's untaken inline result that the consumer
//! is moving from the record into the store: it is owed only if the record has moved past
//! it (else its caller has it, or can still take it).
//!
//! Architecture invariant: this is the only place that reads or writes debts. The store
//! client knows nothing of them: it numbers frames and tells a [`FrameObserver`].

use std::cell::Cell;
use std::ptr::NonNull;

use trove_store::{FrameObserver, ObjectId, StoreClient};

use crate::record::Record;
use crate::sync::{AtomicU64, Ordering, fence};

/// Debts a consumer can have outstanding (see [`Ledger::owe`]).
pub const DEBTS: u64 = 128;
/// A debt's sequence number while its frame is not even queued yet.
pub const NOT_QUEUED: u64 = u64::MAX >> 1;
const EVICTED_BIT: u64 = 1 << 63;

/// A result a consumer owes a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Debt {
    /// The position of the call (its record is `record(pos)`).
    pub pos: u64,
    /// The result's object id.
    pub result: [u8; 20],
    /// The caller's store client (index, pid), named in the result's seal.
    pub reply_to: (u32, u32),
    /// An inline result the consumer is taking out of its record to store it: owed only if
    /// the record has moved past `pos` (else its caller has it, or can still take it).
    pub evicted: bool,
}

/// All of [`DEBTS`] debts are unpaid: write the queued frames first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebtsFull;

/// The number of a debt noted by [`Ledger::owe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owed(u64);

#[repr(C, align(64))]
struct Line<T>(T);

/// The debts part of a consumer's mailbox header, in shared memory: only atomics.
#[repr(C, align(64))]
pub(crate) struct Book {
    /// Sequence number of the consumer's last store frame known written (written by its
    /// store client's flushing thread: a line of its own).
    written: Line<AtomicU64>,
    /// Debts recorded so far: debt `n` is in `entries[n % DEBTS]`.
    made: AtomicU64,
    /// Per debt: position, result id (3 words), reply-to, and the frame's sequence number
    /// with [`EVICTED_BIT`] (0: nothing owed).
    entries: [[AtomicU64; 6]; DEBTS as usize],
}

impl Book {
    /// An empty book (for tests, and regions built in place by the loom models).
    #[cfg(test)]
    pub(crate) fn new() -> Book {
        Book {
            written: Line(AtomicU64::new(0)),
            made: AtomicU64::new(0),
            entries: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }

    /// Forgets every debt (a new mailbox, or the reaper once it has failed them).
    pub(crate) fn reset(&self) {
        for e in &self.entries {
            e[5].store(0, Ordering::Relaxed);
        }
        self.made.store(0, Ordering::Relaxed);
        self.written.0.store(0, Ordering::Release);
    }

    fn owe(&self, d: &Debt, seq: u64) -> Result<u64, DebtsFull> {
        let n = self.made.load(Ordering::Relaxed);
        let old = self.entries[(n % DEBTS) as usize][5].load(Ordering::Relaxed) & !EVICTED_BIT;
        if old > self.written.0.load(Ordering::Relaxed) {
            return Err(DebtsFull);
        }
        self.set(n, d, seq);
        self.made.store(n + 1, Ordering::Release);
        Ok(n)
    }

    fn set(&self, n: u64, d: &Debt, seq: u64) {
        let w = &self.entries[(n % DEBTS) as usize];
        // Paid (nothing owed) while the fields change: a consumer that dies half-way leaves
        // no debt with mixed fields for the reaper to fail.
        w[5].store(0, Ordering::Release);
        fence(Ordering::Release);
        let mut id = [0u8; 24];
        id[..20].copy_from_slice(&d.result);
        w[0].store(d.pos, Ordering::Relaxed);
        for (i, c) in id.chunks(8).enumerate() {
            w[1 + i].store(
                u64::from_le_bytes(c.try_into().expect("8 bytes")),
                Ordering::Relaxed,
            );
        }
        w[4].store(
            (d.reply_to.0 as u64) << 32 | d.reply_to.1 as u64,
            Ordering::Relaxed,
        );
        let flag = if d.evicted { EVICTED_BIT } else { 0 };
        w[5].store(seq.min(NOT_QUEUED) | flag, Ordering::Release);
    }

    fn set_seq(&self, n: u64, seq: u64) {
        let w = &self.entries[(n % DEBTS) as usize][5];
        let flag = w.load(Ordering::Relaxed) & EVICTED_BIT;
        w.store(seq.min(NOT_QUEUED) | flag, Ordering::Release);
    }

    fn written(&self, seq: u64) {
        self.written.0.fetch_max(seq, Ordering::AcqRel);
    }

    /// The last debts (not cancelled), each with whether it was paid.
    fn list(&self) -> Vec<(Debt, bool)> {
        let written = self.written.0.load(Ordering::Acquire);
        let made = self.made.load(Ordering::Acquire);
        let mut out = Vec::new();
        for n in made.saturating_sub(DEBTS)..made {
            let w = &self.entries[(n % DEBTS) as usize];
            let seq_word = w[5].load(Ordering::Acquire);
            let seq = seq_word & !EVICTED_BIT;
            if seq == 0 {
                continue;
            }
            let mut id = [0u8; 24];
            for (i, c) in id.chunks_mut(8).enumerate() {
                c.copy_from_slice(&w[1 + i].load(Ordering::Relaxed).to_le_bytes());
            }
            let r = w[4].load(Ordering::Relaxed);
            let debt = Debt {
                pos: w[0].load(Ordering::Relaxed),
                result: id[..20].try_into().expect("20 bytes"),
                reply_to: ((r >> 32) as u32, r as u32),
                evicted: seq_word & EVICTED_BIT != 0,
            };
            out.push((debt, seq <= written));
        }
        out
    }
}

/// The debts of one consumer, in its mailbox (see [`crate::Mailbox::debts`]). Cheap to copy.
#[derive(Debug, Clone, Copy)]
pub struct Debts {
    book: NonNull<Book>,
}

// SAFETY: `Debts` points at shared memory accessed only through atomics; the mailbox's
// init/attach contract keeps the region mapped while any copy lives.
unsafe impl Send for Debts {}
// SAFETY: as above; every method takes `&self` and synchronises through atomics.
unsafe impl Sync for Debts {}

impl Debts {
    /// # Safety
    /// `book` stays mapped while any copy of the returned value lives.
    pub(crate) unsafe fn new(book: &Book) -> Debts {
        Debts {
            book: NonNull::from(book),
        }
    }

    fn book(&self) -> &Book {
        // SAFETY: mapped while self lives (see `new`); only atomics inside.
        unsafe { self.book.as_ref() }
    }

    /// The consumer's side: from now on `client` (this process's store client, the one that
    /// stores its results) reports its frames to the returned ledger. One call per process
    /// (it replaces the client's observer); a process of several consumer threads, each with
    /// its own book, opens them together ([`Debts::open_all`]).
    pub fn open(self, client: &StoreClient) -> Ledger {
        Debts::open_all(vec![self], client)
            .pop()
            .expect("one ledger per book")
    }

    /// [`Debts::open`] for several consumers of one process (threads, each with its own
    /// book, sharing `client`): a ledger each, in order.
    pub fn open_all(books: Vec<Debts>, client: &StoreClient) -> Vec<Ledger> {
        let ledgers = books
            .iter()
            .enumerate()
            .map(|(index, debts)| Ledger {
                debts: *debts,
                index: index as u32,
            })
            .collect();
        client.observe_frames(Stamper(books));
        ledgers
    }

    /// The reaper's side: a dead consumer's last debts.
    pub fn unsettled(self) -> Unsettled {
        Unsettled {
            debts: self,
            list: self.book().list(),
        }
    }
}

thread_local! {
    /// `(book, n + 1)` while debt `n` of the process's book `book` is armed in this thread:
    /// the publishing frames it queues stamp that debt (`n + 1 == 0`: none).
    static ARMED: Cell<(u32, u64)> = const { Cell::new((0, 0)) };
}

/// The store client's observer: stamps the armed debt in its book, and tells every book
/// what is written.
struct Stamper(Vec<Debts>);

impl FrameObserver for Stamper {
    fn publishing(&self, seq: u64) {
        let (book, armed) = ARMED.get();
        if armed != 0
            && let Some(debts) = self.0.get(book as usize)
        {
            debts.book().set_seq(armed - 1, seq);
            crate::fail_point!("trove::owing");
        }
    }

    fn written(&self, seq: u64) {
        for debts in &self.0 {
            debts.book().written(seq);
        }
    }
}

/// A consumer's own debts: where it notes the results it owes while it stores them.
#[derive(Debug)]
pub struct Ledger {
    debts: Debts,
    /// Its book's place in the process's [`Stamper`].
    index: u32,
}

impl Ledger {
    /// Notes that the result of `d` is owed, before its frame is queued; `None` if that
    /// cannot be noted (every slot is unpaid and the store is gone, so the queued frames
    /// cannot be written to pay them).
    pub fn owe(&self, client: &StoreClient, d: &Debt) -> Option<Owed> {
        let book = self.debts.book();
        match book.owe(d, NOT_QUEUED) {
            Ok(n) => Some(Owed(n)),
            // Every slot is unpaid: writing the queued frames pays them.
            Err(DebtsFull) => client
                .flush()
                .ok()
                .and_then(|_| book.owe(d, NOT_QUEUED).ok())
                .map(Owed),
        }
    }

    /// Rewrites the debt `n` as `d`, not yet queued.
    pub fn renote(&self, n: Owed, d: &Debt) {
        self.debts.book().set(n.0, d, NOT_QUEUED);
    }

    /// Nothing is owed for `n` after all (its result stayed in its record).
    pub fn cancel(&self, n: Owed) {
        self.debts.book().set_seq(n.0, 0);
    }

    /// Runs `put`, which stores the result of debt `n` (noted before, so that there is no
    /// moment when the result is neither owed nor in the store): the publishing frames it
    /// queues stamp the debt, which is paid once they are written. A failed put cancels it.
    pub fn pay_with<R, E>(
        &self,
        n: Option<Owed>,
        put: impl FnOnce() -> Result<R, E>,
    ) -> Result<R, E> {
        struct Disarm;
        impl Drop for Disarm {
            fn drop(&mut self) {
                ARMED.set((0, 0));
            }
        }
        let r = {
            let _disarm = Disarm;
            if let Some(Owed(n)) = n {
                ARMED.set((self.index, n + 1));
            }
            put()
        };
        if let (Some(n), Err(_)) = (n, &r) {
            self.cancel(n);
        }
        r
    }

    /// [`Ledger::owe`] `d`, then [`Ledger::pay_with`].
    pub fn put_owed<R, E>(
        &self,
        client: &StoreClient,
        d: &Debt,
        put: impl FnOnce() -> Result<R, E>,
    ) -> Result<R, E> {
        let n = self.owe(client, d);
        self.pay_with(n, put)
    }
}

/// A dead consumer's last debts, read by its reaper (see [`Debts::unsettled`]).
#[derive(Debug)]
pub struct Unsettled {
    debts: Debts,
    list: Vec<(Debt, bool)>,
}

impl Unsettled {
    /// Whether the consumer owed the result `id` (its frame may or may not have left).
    pub fn owes(&self, id: &ObjectId) -> bool {
        self.list.iter().any(|(d, _)| d.result == id.0)
    }

    /// Settles every debt: `fail` is called for each unpaid one that is still owed (an
    /// evicted result is owed only if its record moved on), and each debt's completion
    /// record (`record(pos)`) is abandoned, since its caller finds the result (or the failure)
    /// in the store. Then the debts are forgiven, so a new consumer starts clean.
    pub fn settle<'r>(self, record: impl Fn(u64) -> &'r Record, mut fail: impl FnMut(&Debt)) {
        for (d, paid) in &self.list {
            let rec = record(d.pos);
            if d.evicted && rec.status().0 <= d.pos {
                continue;
            }
            if !paid {
                fail(d);
            }
            rec.abandon(d.pos);
        }
        self.debts.book().reset();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn book() -> Box<Book> {
        Box::new(Book::new())
    }

    fn debt(i: u64, evicted: bool) -> Debt {
        Debt {
            pos: i,
            result: [i as u8; 20],
            reply_to: (i as u32, 7),
            evicted,
        }
    }

    fn unpaid(b: &Book) -> Vec<Debt> {
        b.list()
            .into_iter()
            .filter(|(_, paid)| !paid)
            .map(|(d, _)| d)
            .collect()
    }

    #[test]
    fn debts_are_paid_by_written_frames_and_unpaid_slots_are_not_reused() {
        let b = book();
        assert_eq!(b.list(), vec![]);
        for i in 1..=DEBTS {
            b.owe(&debt(i, false), i).unwrap();
        }
        // Every slot holds an unpaid debt.
        assert_eq!(b.owe(&debt(0, false), 1), Err(DebtsFull));
        b.written(DEBTS - 2);
        assert_eq!(unpaid(&b), vec![debt(DEBTS - 1, false), debt(DEBTS, false)]);
        assert_eq!(b.list().len(), DEBTS as usize, "paid ones are still listed");
        // Slots of paid debts are reused; a debt waits for the frame that stamps it.
        let n = b.owe(&debt(500, true), NOT_QUEUED).unwrap();
        b.written(DEBTS);
        assert_eq!(unpaid(&b), vec![debt(500, true)]);
        // SAFETY: the box outlives `debts`.
        let debts = unsafe { Debts::new(&b) };
        let stamper = Stamper(vec![debts]);
        stamper.publishing(DEBTS + 1);
        assert_eq!(unpaid(&b), vec![debt(500, true)], "not armed: no stamp");
        let ledger = Ledger { debts, index: 0 };
        ledger
            .pay_with(Some(Owed(n)), || {
                stamper.publishing(DEBTS + 1);
                Ok::<(), ()>(())
            })
            .unwrap();
        stamper.publishing(DEBTS + 7);
        stamper.written(DEBTS + 1);
        assert_eq!(unpaid(&b), vec![], "disarmed after the put: not restamped");
        assert!(b.list().contains(&(debt(500, true), true)));
        ledger.cancel(Owed(n));
        assert!(!b.list().iter().any(|(d, _)| d.pos == 500), "cancelled");
        b.set(n, &debt(600, false), DEBTS + 5);
        assert_eq!(unpaid(&b), vec![debt(600, false)]);
        b.written(DEBTS + 5);
        assert_eq!(unpaid(&b), vec![]);
        b.owe(&debt(700, false), DEBTS + 9).unwrap();
        b.reset();
        assert_eq!(b.list(), vec![]);
        b.owe(&debt(800, false), 3).unwrap();
        assert_eq!(
            unpaid(&b),
            vec![debt(800, false)],
            "a new consumer counts from 1"
        );
    }

    #[test]
    fn a_failed_put_cancels_its_debt() {
        let b = book();
        // SAFETY: the box outlives `debts`.
        let debts = unsafe { Debts::new(&b) };
        let ledger = Ledger { debts, index: 0 };
        let n = b.owe(&debt(1, false), NOT_QUEUED).map(Owed).unwrap();
        assert_eq!(unpaid(&b), vec![debt(1, false)], "owed before the put");
        let r = ledger.pay_with(Some(n), || Err::<(), _>("store full"));
        assert_eq!(r, Err("store full"));
        assert_eq!(b.list(), vec![], "nothing owed");
        assert_eq!(ARMED.get(), (0, 0), "disarmed");
    }

    #[test]
    fn threads_stamp_their_own_books() {
        let (b0, b1) = (book(), book());
        // SAFETY: the boxes outlive the handles.
        let (d0, d1) = unsafe { (Debts::new(&b0), Debts::new(&b1)) };
        let stamper = Stamper(vec![d0, d1]);
        let (l0, l1) = (
            Ledger {
                debts: d0,
                index: 0,
            },
            Ledger {
                debts: d1,
                index: 1,
            },
        );
        let n0 = b0.owe(&debt(1, false), NOT_QUEUED).map(Owed).unwrap();
        let n1 = b1.owe(&debt(2, false), NOT_QUEUED).map(Owed).unwrap();
        l1.pay_with(Some(n1), || {
            stamper.publishing(5);
            Ok::<(), ()>(())
        })
        .unwrap();
        l0.pay_with(Some(n0), || {
            stamper.publishing(6);
            Ok::<(), ()>(())
        })
        .unwrap();
        // Each debt got its own frame's number, in its own book.
        stamper.written(5);
        assert_eq!(unpaid(&b1), vec![], "book 1 paid by frame 5");
        assert_eq!(
            unpaid(&b0),
            vec![debt(1, false)],
            "book 0 waits for frame 6"
        );
        stamper.written(6);
        assert_eq!(unpaid(&b0), vec![]);
    }
}
