//! Completion records: where the consumer of a mailbox leaves each call's result for its
//! caller, either the place of a store object or, for a small value, the value itself.
//!
//! A mailbox has one record per slot; the call at position `p` uses record `p % capacity`, so
//! a record is reused `capacity` calls later. Its first word, `state`, is `p << 3 | tag`:
//!
//! | tag        | meaning for position `p`                                              |
//! | ---------- | --------------------------------------------------------------------- |
//! | `EMPTY`    | nothing recorded                                                      |
//! | `WRITING`  | a consumer is filling the record                                      |
//! | `STORED`   | the result is a store object at (`a`, `b`): read it in place           |
//! | `INLINE`   | the result's bytes are in the record: the caller may take them         |
//! | `TAKEN`    | the caller took the inline bytes; the record is free                   |
//! | `EVICTING` | the consumer is moving the inline bytes to the store (then `STORED`)  |
//!
//! Inline bytes have exactly one owner, decided by a compare-and-swap out of `INLINE`: the
//! caller (`INLINE -> TAKEN`, it keeps the value in its own memory), or a consumer that needs
//! the record for a later position or was asked to store the value (`INLINE -> WRITING` or
//! `EVICTING`, it puts the value in the store for the caller). A caller that sees the record
//! reused (a later position) or `STORED` finds its result in the store.
//!
//! A caller that needs the result in the store (its ref escapes into an object or another
//! call) raises `want` to at least `p + 1` and then looks at the state; a consumer checks
//! `want` before it records a value inline and again after (both sides `SeqCst`), so either
//! the caller sees the inline value (and takes it, to store it itself) or the consumer sees
//! the wish (and stores it).
//!
//! Everything here is atomics on shared memory: a peer that scribbles on a record can make a
//! caller read a wrong value for its own call, never make anybody access outside the region.

#[cfg(not(loom))]
use std::time::{Duration, Instant};

use crate::sync::{AtomicU64, Backoff, Ordering, fence};

/// Bytes of a record.
pub const RECORD_LEN: usize = 256;
const WORDS: usize = RECORD_LEN / 8;
/// Words before the inline data: state, want, a, b. The data starts on the state's cache
/// line, so that a caller reads a small value (up to 32 bytes) with the one line it polls.
const DATA_WORD: usize = 4;
/// The reply-to word, then the result id (3 words): the record's last four words, on a line
/// the caller never reads (only a consumer evicting an untaken value does).
const REPLY_WORD: usize = WORDS - 4;
const ID_WORD: usize = WORDS - 3;
/// Largest value recorded inline.
pub const INLINE_MAX: usize = (REPLY_WORD - DATA_WORD) * 8;
// A value of up to 32 bytes shares the state's line; the id and reply-to share none of its.
const _: () = assert!(DATA_WORD * 8 + 32 <= 64 && REPLY_WORD * 8 >= RECORD_LEN - 64);

const EMPTY: u64 = 0;
const WRITING: u64 = 1;
const STORED: u64 = 2;
const INLINE: u64 = 3;
const TAKEN: u64 = 4;
const EVICTING: u64 = 5;

const ERROR_BIT: u64 = 1 << 63;
/// How long a consumer waits for another consumer that is filling the same record.
#[cfg(not(loom))]
const BUSY_WAIT: Duration = Duration::from_micros(200);

/// A consumer's patience with another consumer filling the same record: [`BUSY_WAIT`] of
/// real time; under loom a few of loom's yields, so that a model explores both outcomes
/// (the other finishes first, or the wait gives up) deterministically.
struct Patience {
    #[cfg(not(loom))]
    until: Instant,
    #[cfg(loom)]
    left: u32,
}

impl Patience {
    fn new() -> Patience {
        Patience {
            #[cfg(not(loom))]
            until: Instant::now() + BUSY_WAIT,
            #[cfg(loom)]
            left: 3,
        }
    }

    #[cfg(not(loom))]
    fn exhausted(&mut self) -> bool {
        Instant::now() >= self.until
    }

    #[cfg(loom)]
    fn exhausted(&mut self) -> bool {
        self.left = self.left.saturating_sub(1);
        self.left == 0
    }
}

fn state(pos: u64, tag: u64) -> u64 {
    pos << 3 | tag
}

fn split(s: u64) -> (u64, u64) {
    (s >> 3, s & 7)
}

/// One completion record, in shared memory.
#[repr(C, align(64))]
pub struct Record {
    words: [AtomicU64; WORDS],
}

/// A result moved out of a record: its bytes and whom it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineResult {
    pub pos: u64,
    pub result: [u8; 20],
    pub reply_to: (u32, u32),
    pub error: bool,
    pub bytes: Vec<u8>,
}

/// What a consumer got when it claimed a record.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The record is the consumer's to fill for this position. If it held an untaken inline
    /// result of an earlier position, that result is now the consumer's to store.
    Ok(Option<InlineResult>),
    /// A later position already uses the record (or another consumer never finished it):
    /// store the result without recording it.
    Unavailable,
}

/// What a caller sees in a record for its position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not done yet (or being written).
    Pending,
    /// A store object at `offset`, `len` bytes.
    Stored { offset: u64, len: u64, error: bool },
    /// The value is in the record (take it with [`Record::take_inline`]).
    Inline,
    /// The record no longer speaks for this position: the result is (or will be) in the
    /// store, or was taken.
    Gone,
}

/// What [`Record::take_inline`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Took {
    /// The first `len` bytes are now the caller's; `error` if they are a failure report.
    Value { error: bool, len: usize },
    /// Not inline (any more): look again with [`Record::seen`].
    No,
}

impl Record {
    fn w(&self, i: usize) -> &AtomicU64 {
        &self.words[i]
    }

    /// Puts the record in its initial state (nothing for any position).
    pub fn reset(&self) {
        for w in &self.words {
            w.store(0, Ordering::Relaxed);
        }
    }

    // ---- consumer side ----

    /// Claims the record to complete position `pos`.
    pub fn claim(&self, pos: u64) -> Claim {
        self.claim_with(pos, |_| {})
    }

    /// [`Record::claim`], calling `before_evict` with an untaken inline result of an earlier
    /// position before trying to take it (the consumer records that it may owe it; it owes it
    /// if the claim returns it).
    pub fn claim_with(&self, pos: u64, mut before_evict: impl FnMut(&InlineResult)) -> Claim {
        // Started at the first wait only: the clock is not read on the common path.
        let mut patience: Option<Patience> = None;
        let backoff = Backoff::new();
        loop {
            let s = self.w(0).load(Ordering::Acquire);
            let (p, tag) = split(s);
            if p > pos || (p == pos && tag != EMPTY) {
                return Claim::Unavailable;
            }
            if tag == WRITING || tag == EVICTING {
                // Another consumer (of an earlier position) is filling it: a few instructions,
                // unless it died there.
                if patience.get_or_insert_with(Patience::new).exhausted() {
                    return Claim::Unavailable;
                }
                backoff.snooze();
                continue;
            }
            let evicted = (tag == INLINE).then(|| self.read_inline(p));
            if let Some(ev) = &evicted {
                before_evict(ev);
            }
            if self
                .w(0)
                .compare_exchange(s, state(pos, WRITING), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                // The seqlock writer's fence: the fields written from now on (place, length,
                // inline bytes) must not become visible before WRITING does, or a caller
                // reading the old `STORED` place (`seen`) could take the new offset or length
                // as its own and pass its re-check of the state. The CAS's release half only
                // orders what came before it (x86 never reorders stores; ARM and POWER do).
                fence(Ordering::Release);
                return Claim::Ok(evicted);
            }
        }
    }

    /// [`Record::claim`] and [`Record::finish_inline`] in one go, for the common case: the
    /// record holds no untaken inline result of an earlier position, and nobody else is
    /// filling it. Its caller polls the record's first line meanwhile, so each pause between
    /// the claim and the bytes costs that line a trip to the caller's core and back; here the
    /// stores follow the claim at once. `None` (nothing done) when the case is not the common
    /// one: claim with [`Record::claim_with`] then.
    pub fn claim_finish_inline(
        &self,
        pos: u64,
        result: [u8; 20],
        reply_to: (u32, u32),
        bytes: &[u8],
        error: bool,
    ) -> Option<bool> {
        let s = self.w(0).load(Ordering::Acquire);
        let (p, tag) = split(s);
        if p > pos || (p == pos && tag != EMPTY) || matches!(tag, WRITING | EVICTING | INLINE) {
            return None;
        }
        self.w(0)
            .compare_exchange(s, state(pos, WRITING), Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        // As in `claim_with`: nothing written from here on becomes visible before WRITING.
        fence(Ordering::Release);
        Some(self.finish_inline(pos, result, reply_to, bytes, error))
    }

    /// Whether the caller of `pos` asked for its result in the store.
    pub fn wants_store(&self, pos: u64) -> bool {
        self.w(1).load(Ordering::SeqCst) > pos
    }

    /// Records `bytes` (at most [`INLINE_MAX`]) as the result of `pos`, claimed with
    /// [`Record::claim`]. Returns `false` if the caller asked for the store meanwhile: then the
    /// record is `EVICTING` and the consumer must store the value and call
    /// [`Record::finish_stored`].
    #[inline]
    pub fn finish_inline(
        &self,
        pos: u64,
        result: [u8; 20],
        reply_to: (u32, u32),
        bytes: &[u8],
        error: bool,
    ) -> bool {
        assert!(bytes.len() <= INLINE_MAX, "inline result too large");
        let mut id = [0u8; 24];
        id[..20].copy_from_slice(&result);
        for (i, c) in id.chunks(8).enumerate() {
            self.w(ID_WORD + i).store(
                u64::from_le_bytes(c.try_into().expect("8")),
                Ordering::Relaxed,
            );
        }
        self.w(REPLY_WORD).store(
            (reply_to.0 as u64) << 32 | reply_to.1 as u64,
            Ordering::Relaxed,
        );
        for (i, c) in bytes.chunks(8).enumerate() {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            self.w(DATA_WORD + i)
                .store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        let len = bytes.len() as u64 | if error { ERROR_BIT } else { 0 };
        self.w(3).store(len, Ordering::Relaxed);
        self.w(0).store(state(pos, INLINE), Ordering::SeqCst);
        if !self.wants_store(pos) {
            return true;
        }
        // The caller wants it stored: whoever wins the CAS out of INLINE owns the bytes.
        self.w(0)
            .compare_exchange(
                state(pos, INLINE),
                state(pos, EVICTING),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
    }

    /// Records that the result of `pos` is a store object at `offset` (claimed, or
    /// `EVICTING` after [`Record::finish_inline`] returned `false`).
    pub fn finish_stored(&self, pos: u64, offset: u64, len: u64, error: bool) {
        self.w(2).store(offset, Ordering::Relaxed);
        self.w(3)
            .store(len | if error { ERROR_BIT } else { 0 }, Ordering::Relaxed);
        self.w(0).store(state(pos, STORED), Ordering::Release);
    }

    /// Gives up a claimed record without recording a result for `pos` (its caller falls back
    /// to the store's notifications).
    pub fn finish_empty(&self, pos: u64) {
        self.w(0).store(state(pos, EMPTY), Ordering::Release);
    }

    /// Lets go of a record whose consumer died while filling it for `pos` (`WRITING` or
    /// `EVICTING`): its caller then looks for the result in the store. `true` if it did.
    pub fn abandon(&self, pos: u64) -> bool {
        [WRITING, EVICTING].into_iter().any(|tag| {
            self.w(0)
                .compare_exchange(
                    state(pos, tag),
                    state(pos, TAKEN),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        })
    }

    /// The position the record last spoke for, and whether its result reached the caller or
    /// the store (`STORED`, `INLINE` or `TAKEN`).
    pub fn status(&self) -> (u64, bool) {
        let (p, tag) = split(self.w(0).load(Ordering::Acquire));
        (p, matches!(tag, STORED | INLINE | TAKEN))
    }

    fn read_inline(&self, pos: u64) -> InlineResult {
        let len_word = self.w(3).load(Ordering::Relaxed);
        let len = ((len_word & !ERROR_BIT) as usize).min(INLINE_MAX);
        let mut bytes = Vec::with_capacity(len);
        self.copy_data(len, &mut bytes);
        let mut id = [0u8; 24];
        for (i, c) in id.chunks_mut(8).enumerate() {
            c.copy_from_slice(&self.w(ID_WORD + i).load(Ordering::Relaxed).to_le_bytes());
        }
        let r = self.w(REPLY_WORD).load(Ordering::Relaxed);
        InlineResult {
            pos,
            result: id[..20].try_into().expect("20"),
            reply_to: ((r >> 32) as u32, r as u32),
            error: len_word & ERROR_BIT != 0,
            bytes,
        }
    }

    fn copy_data(&self, len: usize, out: &mut Vec<u8>) {
        for i in 0..len.div_ceil(8) {
            let b = self.w(DATA_WORD + i).load(Ordering::Relaxed).to_le_bytes();
            let n = (len - 8 * i).min(8);
            out.extend_from_slice(&b[..n]);
        }
    }

    // ---- caller side ----

    /// What the record says about position `pos`.
    pub fn seen(&self, pos: u64) -> Seen {
        let s = self.w(0).load(Ordering::Acquire);
        let (p, tag) = split(s);
        if p < pos {
            return Seen::Pending;
        }
        if p > pos {
            return Seen::Gone;
        }
        match tag {
            STORED => {
                let offset = self.w(2).load(Ordering::Relaxed);
                let b = self.w(3).load(Ordering::Relaxed);
                fence(Ordering::Acquire);
                if self.w(0).load(Ordering::Relaxed) != s {
                    return Seen::Gone;
                }
                Seen::Stored {
                    offset,
                    len: b & !ERROR_BIT,
                    error: b & ERROR_BIT != 0,
                }
            }
            INLINE => Seen::Inline,
            TAKEN => Seen::Gone,
            _ => Seen::Pending,
        }
    }

    /// Takes the inline result of `pos` into `out`.
    pub fn take_inline(&self, pos: u64, out: &mut [u8; INLINE_MAX]) -> Took {
        let s = state(pos, INLINE);
        if self.w(0).load(Ordering::Acquire) != s {
            return Took::No;
        }
        let len_word = self.w(3).load(Ordering::Relaxed);
        let len = ((len_word & !ERROR_BIT) as usize).min(INLINE_MAX);
        for (i, chunk) in out[..len.next_multiple_of(8)]
            .chunks_exact_mut(8)
            .enumerate()
        {
            chunk.copy_from_slice(&self.w(DATA_WORD + i).load(Ordering::Relaxed).to_le_bytes());
        }
        // The CAS proves nobody changed the bytes while we copied (they only change after the
        // state leaves INLINE) and makes them ours.
        if self
            .w(0)
            .compare_exchange(s, state(pos, TAKEN), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            Took::Value {
                error: len_word & ERROR_BIT != 0,
                len,
            }
        } else {
            Took::No
        }
    }

    /// Asks the consumer to put the result of `pos` in the store rather than inline. Look at
    /// the record afterwards: an inline value already there must be taken (and stored) by the
    /// caller.
    pub fn want_store(&self, pos: u64) {
        self.w(1).fetch_max(pos + 1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn record() -> Box<Record> {
        let r = Box::new(Record {
            words: std::array::from_fn(|_| AtomicU64::new(0)),
        });
        r.reset();
        r
    }

    fn id(n: u8) -> [u8; 20] {
        [n; 20]
    }

    #[test]
    fn inline_then_taken_by_the_caller() {
        let r = record();
        assert_eq!(r.seen(0), Seen::Pending);
        assert_eq!(r.claim(0), Claim::Ok(None));
        assert_eq!(r.seen(0), Seen::Pending);
        assert!(r.finish_inline(0, id(1), (3, 77), b"hello, world", false));
        assert_eq!(r.seen(0), Seen::Inline);
        let mut out = [0u8; INLINE_MAX];
        assert_eq!(
            r.take_inline(0, &mut out),
            Took::Value {
                error: false,
                len: 12
            }
        );
        assert_eq!(&out[..12], b"hello, world");
        assert_eq!(r.seen(0), Seen::Gone);
        assert_eq!(r.take_inline(0, &mut out), Took::No);
        // The next lap: nothing to evict.
        assert_eq!(r.claim(4), Claim::Ok(None));
        r.finish_stored(4, 4096, 100, true);
        assert_eq!(
            r.seen(4),
            Seen::Stored {
                offset: 4096,
                len: 100,
                error: true
            }
        );
        assert_eq!(r.seen(0), Seen::Gone);
        assert_eq!(r.seen(8), Seen::Pending);
        // An earlier position can no longer claim it.
        assert_eq!(r.claim(0), Claim::Unavailable);
        assert_eq!(r.claim(4), Claim::Unavailable);
    }

    /// The fast path claims and fills a record in one go after a taken or stored position,
    /// and refuses (changing nothing) one that holds an untaken value, is being written, or
    /// speaks for a later position; a wish for the store leaves the record `EVICTING`, ours.
    #[test]
    fn claim_finish_inline_takes_the_common_case_only() {
        let r = record();
        let mut out = [0u8; INLINE_MAX];
        assert_eq!(
            r.claim_finish_inline(0, id(1), (3, 7), b"first", false),
            Some(true)
        );
        assert_eq!(r.seen(0), Seen::Inline);
        // Untaken: refused; `claim_with` evicts it.
        assert_eq!(
            r.claim_finish_inline(4, id(2), (3, 7), b"second", false),
            None
        );
        assert_eq!(r.seen(0), Seen::Inline);
        assert_eq!(
            r.take_inline(0, &mut out),
            Took::Value {
                error: false,
                len: 5
            }
        );
        assert_eq!(&out[..5], b"first");
        assert_eq!(
            r.claim_finish_inline(4, id(2), (3, 7), b"second", true),
            Some(true)
        );
        assert_eq!(
            r.take_inline(4, &mut out),
            Took::Value {
                error: true,
                len: 6
            }
        );
        // After a stored position too; not for an earlier position, nor one being written.
        assert_eq!(r.claim(8), Claim::Ok(None));
        assert_eq!(r.claim_finish_inline(12, id(3), (3, 7), b"x", false), None);
        r.finish_stored(8, 4096, 100, false);
        assert_eq!(r.claim_finish_inline(4, id(3), (3, 7), b"x", false), None);
        assert_eq!(
            r.seen(8),
            Seen::Stored {
                offset: 4096,
                len: 100,
                error: false
            }
        );
        // The caller asked for the store before: claimed, then EVICTING, the consumer's.
        r.want_store(12);
        assert_eq!(
            r.claim_finish_inline(12, id(3), (3, 7), b"x", false),
            Some(false)
        );
        assert_eq!(r.seen(12), Seen::Pending);
        r.finish_stored(12, 8192, 1, false);
        assert_eq!(
            r.seen(12),
            Seen::Stored {
                offset: 8192,
                len: 1,
                error: false
            }
        );
    }

    /// Every inline length, taken by the caller or evicted a lap later, reads back whole, and
    /// the id and reply-to (on the record's last line, after the value's words) stay intact.
    #[test]
    fn every_inline_length_reads_back_whole_when_taken_or_evicted() {
        let r = record();
        for len in 0..=INLINE_MAX {
            let value: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let (taken, evicted) = (2 * len as u64, 2 * len as u64 + 1);
            let mut out = [0xEEu8; INLINE_MAX];
            assert_eq!(r.claim(taken), Claim::Ok(None));
            assert!(r.finish_inline(taken, id(len as u8), (7, len as u32), &value, false));
            assert_eq!(
                r.take_inline(taken, &mut out),
                Took::Value { error: false, len }
            );
            assert_eq!(&out[..len], &value[..], "taken, {len} bytes");
            assert_eq!(r.claim(evicted), Claim::Ok(None));
            assert!(r.finish_inline(evicted, id(len as u8), (7, len as u32), &value, true));
            let Claim::Ok(Some(ev)) = r.claim(evicted + 1) else {
                panic!("expected an eviction of {len} bytes")
            };
            assert_eq!(
                (ev.pos, ev.result, ev.reply_to, ev.error, &ev.bytes[..]),
                (evicted, id(len as u8), (7, len as u32), true, &value[..]),
            );
            r.finish_empty(evicted + 1);
        }
    }

    #[test]
    fn an_untaken_inline_result_is_evicted_by_the_next_lap() {
        let r = record();
        assert_eq!(r.claim(2), Claim::Ok(None));
        let value: Vec<u8> = (0..INLINE_MAX as u8).collect();
        assert!(r.finish_inline(2, id(9), (1, 2), &value, true));
        let Claim::Ok(Some(ev)) = r.claim(6) else {
            panic!("expected an eviction")
        };
        assert_eq!(
            ev,
            InlineResult {
                pos: 2,
                result: id(9),
                reply_to: (1, 2),
                error: true,
                bytes: value,
            }
        );
        assert_eq!(r.seen(2), Seen::Gone);
        let mut out = [0u8; INLINE_MAX];
        assert_eq!(r.take_inline(2, &mut out), Took::No);
        r.finish_empty(6);
        assert_eq!(r.seen(6), Seen::Pending);
        assert_eq!(r.claim(6), Claim::Ok(None));
    }

    #[test]
    fn the_eviction_hook_sees_the_result_before_it_is_taken_and_dead_writers_are_abandoned() {
        let r = record();
        assert_eq!(r.claim(1), Claim::Ok(None));
        assert!(r.finish_inline(1, id(5), (4, 8), b"v", false));
        assert_eq!(r.status(), (1, true));
        let mut seen = Vec::new();
        let Claim::Ok(Some(ev)) = r.claim_with(5, |ev| {
            // Still the caller's here: the record speaks for position 1.
            assert_eq!(r.seen(1), Seen::Inline);
            seen.push(ev.clone());
        }) else {
            panic!("expected an eviction")
        };
        assert_eq!(seen, vec![ev]);
        // Its consumer dies while writing position 5: the record is let go, once.
        assert_eq!(r.status(), (5, false));
        assert!(!r.abandon(1));
        assert!(r.abandon(5));
        assert!(!r.abandon(5));
        assert_eq!(r.seen(5), Seen::Gone);
        assert_eq!(r.status(), (5, true));
        // The next lap claims it as usual; a result in place is never abandoned.
        assert_eq!(r.claim(9), Claim::Ok(None));
        r.finish_stored(9, 64, 8, false);
        assert!(!r.abandon(9));
        assert_eq!(r.status(), (9, true));
    }

    #[test]
    fn a_wish_for_the_store_before_or_after_the_result() {
        let r = record();
        // Before: the consumer sees it and stores.
        r.want_store(0);
        assert_eq!(r.claim(0), Claim::Ok(None));
        assert!(r.wants_store(0));
        assert!(!r.wants_store(1));
        r.finish_stored(0, 64, 8, false);
        // After: an inline value is there; the caller takes it (and would store it).
        assert_eq!(r.claim(1), Claim::Ok(None));
        assert!(r.finish_inline(1, id(1), (0, 0), b"abc", false));
        r.want_store(1);
        let mut out = [0u8; INLINE_MAX];
        assert_eq!(
            r.take_inline(1, &mut out),
            Took::Value {
                error: false,
                len: 3
            }
        );
        assert_eq!(&out[..3], b"abc");
    }

    /// A caller wishing for the store races a consumer finishing inline: exactly one of them
    /// ends up owning the bytes, every time.
    #[test]
    fn want_store_races_finish_inline_with_exactly_one_owner() {
        let r = record();
        let owners = AtomicUsize::new(0);
        for pos in 0..5_000u64 {
            assert_eq!(r.claim(pos), Claim::Ok(None));
            let (consumer_owns, caller_owns) = std::thread::scope(|s| {
                let c = s.spawn(|| !r.finish_inline(pos, id(1), (0, 0), b"v", false));
                let caller = s.spawn(|| {
                    r.want_store(pos);
                    let mut out = [0u8; INLINE_MAX];
                    loop {
                        match r.seen(pos) {
                            Seen::Inline => {
                                if let Took::Value { .. } = r.take_inline(pos, &mut out) {
                                    return true;
                                }
                            }
                            Seen::Pending => {
                                // Not inline yet, or being evicted: the consumer saw the wish
                                // or will.
                                if r.w(0).load(Ordering::SeqCst) == state(pos, EVICTING) {
                                    return false;
                                }
                                std::hint::spin_loop();
                            }
                            Seen::Stored { .. } | Seen::Gone => return false,
                        }
                    }
                });
                (c.join().unwrap(), caller.join().unwrap())
            });
            assert!(
                consumer_owns ^ caller_owns,
                "pos {pos}: consumer {consumer_owns}, caller {caller_owns}"
            );
            if consumer_owns {
                r.finish_stored(pos, 0, 1, false);
            }
            owners.fetch_add(1, Ordering::Relaxed);
        }
        assert_eq!(owners.load(Ordering::Relaxed), 5_000);
    }

    /// A caller taking while the next lap's consumer evicts: exactly one owner.
    #[test]
    fn take_races_eviction_with_exactly_one_owner() {
        let r = record();
        for lap in 0..5_000u64 {
            let pos = lap * 2;
            assert!(matches!(r.claim(pos), Claim::Ok(_)));
            assert!(r.finish_inline(pos, id(2), (0, 0), b"value", false));
            let (evicted, taken) = std::thread::scope(|s| {
                let c = s.spawn(|| match r.claim(pos + 1) {
                    Claim::Ok(ev) => ev.is_some(),
                    Claim::Unavailable => panic!("unavailable"),
                });
                let t = s.spawn(|| {
                    let mut out = [0u8; INLINE_MAX];
                    matches!(r.take_inline(pos, &mut out), Took::Value { .. })
                });
                (c.join().unwrap(), t.join().unwrap())
            });
            assert!(
                evicted ^ taken,
                "lap {lap}: evicted {evicted}, taken {taken}"
            );
            r.finish_empty(pos + 1);
        }
    }
}

#[cfg(all(test, loom))]
mod loom_models;
