//! The ids of this process's calls' results, and a map keyed by them that needs no hashing.
//!
//! A call's result id is this process's prefix (drawn at random when its context is made) and
//! a counter ([`ResultIds`]): the counter of a result is its place in the order calls were
//! made. The tables of calls in flight ([`crate::calls`]) and of local values
//! ([`crate::local`]) are keyed by such ids; a [`ResultMap`] keeps their entries in a deque
//! indexed by the counter, so that finding one is an index, not a hash probe, and a burst of
//! calls sits together in memory in the order it is read back (a hash map of ten thousand
//! calls in flight made each lookup a cache miss). Entries that stay long while many later
//! ones come and go, and ids of another prefix, move to a hash map aside.

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;

use rustc_hash::FxHashMap;
use trove_store::ObjectId;
use trove_store::id::CounterBlock;

/// Names the results of this process's calls: its prefix and a counter.
pub(crate) struct ResultIds {
    prefix: [u8; 12],
    next: AtomicU64,
}

impl ResultIds {
    /// A new prefix, drawn at random (see [`ObjectId::random_prefix`]).
    pub(crate) fn new() -> ResultIds {
        ResultIds {
            prefix: ObjectId::random_prefix(),
            next: AtomicU64::new(0),
        }
    }

    /// The prefix, for the maps keyed by these ids.
    pub(crate) fn prefix(&self) -> [u8; 12] {
        self.prefix
    }

    /// A fresh result id. A thread takes counters [`BLOCK`] at a time from the one its
    /// process's threads share (one shared write per block, not per call; the maps' deques
    /// stay dense within a small factor of the threads calling).
    pub(crate) fn fresh(&self) -> ObjectId {
        std::thread_local! {
            static NEXT: std::cell::Cell<CounterBlock> =
                const { std::cell::Cell::new(CounterBlock::EMPTY) };
        }
        let counter = CounterBlock::take(&NEXT, self.prefix, &self.next, BLOCK);
        ObjectId::from_parts(self.prefix, counter)
    }
}

/// Counters a thread takes at once (see [`ResultIds::fresh`]).
const BLOCK: u64 = 64;

/// A map from object ids to `E`, dense for result ids of its prefix (see the module docs).
pub(crate) struct ResultMap<E> {
    prefix: [u8; 12],
    /// Entry `k` is the result whose counter is `base + k`; `None` if there is none.
    slots: VecDeque<Option<E>>,
    base: u64,
    /// How many of `slots` are `Some`.
    live: usize,
    /// Entries outside `slots`: ids of another prefix, and counters before `base` (moved aside
    /// as the deque compacts or restarts further on, or inserted late). An id is in at most
    /// one of the two places.
    aside: FxHashMap<ObjectId, E>,
}

impl<E> ResultMap<E> {
    pub(crate) fn new(prefix: [u8; 12]) -> ResultMap<E> {
        ResultMap {
            prefix,
            slots: VecDeque::new(),
            base: 0,
            live: 0,
            aside: FxHashMap::default(),
        }
    }

    /// The index in `slots` of `id` (whether or not it is there), if it is of this prefix
    /// and within `slots`.
    #[inline]
    fn index(&self, id: &ObjectId) -> Option<usize> {
        let n = id.counter_if(&self.prefix)?.checked_sub(self.base)?;
        (n < self.slots.len() as u64).then_some(n as usize)
    }

    /// The counter's id.
    fn id_at(&self, counter: u64) -> ObjectId {
        ObjectId::from_parts(self.prefix, counter)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.live + self.aside.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    pub(crate) fn get(&self, id: &ObjectId) -> Option<&E> {
        if let Some(e) = self.index(id).and_then(|k| self.slots[k].as_ref()) {
            return Some(e);
        }
        if self.aside.is_empty() {
            return None;
        }
        self.aside.get(id)
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, id: &ObjectId) -> Option<&mut E> {
        if let Some(k) = self.index(id)
            && self.slots[k].is_some()
        {
            return self.slots[k].as_mut();
        }
        if self.aside.is_empty() {
            return None;
        }
        self.aside.get_mut(id)
    }

    #[inline]
    pub(crate) fn contains(&self, id: &ObjectId) -> bool {
        self.get(id).is_some()
    }

    /// Keeps `e` under `id`; returns the entry it replaces.
    pub(crate) fn insert(&mut self, id: ObjectId, e: E) -> Option<E> {
        let old = if self.aside.is_empty() {
            None
        } else {
            self.aside.remove(&id)
        };
        let Some(counter) = id.counter_if(&self.prefix) else {
            return self.aside.insert(id, e).or(old);
        };
        if self.slots.is_empty() {
            // Nothing in the deque: it starts here.
            self.base = counter;
        }
        let Some(n) = counter.checked_sub(self.base) else {
            // Before the deque's start (a call remembered late, or put back).
            return self.aside.insert(id, e).or(old);
        };
        if n >= self.slots.len() as u64 && n >= self.bound() as u64 {
            // So far ahead that the deque would be mostly holes (an old entry at its front,
            // ids from a thread's old block of counters): it restarts here, its entries
            // moved aside (each at most once), rather than growing by more than it holds.
            self.restart_at(counter);
        }
        let n = (counter - self.base) as usize;
        if n >= self.slots.len() {
            self.slots.resize_with(n + 1, || None);
        }
        let prev = self.slots[n].replace(e);
        if prev.is_none() {
            self.live += 1;
        }
        self.compact();
        prev.or(old)
    }

    /// Takes `id`'s entry out.
    pub(crate) fn remove(&mut self, id: &ObjectId) -> Option<E> {
        if let Some(k) = self.index(id)
            && let Some(e) = self.slots[k].take()
        {
            self.live -= 1;
            self.pop_empty();
            return Some(e);
        }
        if self.aside.is_empty() {
            return None;
        }
        let e = self.aside.remove(id);
        trove_store::shrink_if_sparse(&mut self.aside);
        e
    }

    /// The entry of the lowest counter in the deque (the oldest call not moved aside).
    pub(crate) fn front(&self) -> Option<(ObjectId, &E)> {
        self.slots
            .front()?
            .as_ref()
            .map(|e| (self.id_at(self.base), e))
    }

    /// How many entries are kept aside (not in the deque).
    #[cfg(test)]
    pub(crate) fn aside_len(&self) -> usize {
        self.aside.len()
    }

    /// Every entry, in no particular order.
    #[cfg(test)]
    pub(crate) fn ids(&self) -> Vec<ObjectId> {
        let mut ids: Vec<ObjectId> = (self.slots.iter().enumerate())
            .filter(|(_, e)| e.is_some())
            .map(|(k, _)| self.id_at(self.base + k as u64))
            .collect();
        ids.extend(self.aside.keys());
        ids
    }

    /// Drops the empty slots in front (and lets go of a large deque once it is empty).
    fn pop_empty(&mut self) {
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.base += 1;
        }
        if self.slots.is_empty() && self.slots.capacity() > 1 << 16 {
            self.slots.shrink_to(1 << 10);
        }
    }

    /// The most slots the deque may have for its entries: a constant factor of them.
    fn bound(&self) -> usize {
        2 * self.live + 1024
    }

    /// Moves the deque's entries aside and starts it anew at `counter`.
    fn restart_at(&mut self, counter: u64) {
        let base = self.base;
        for (k, slot) in self.slots.drain(..).enumerate() {
            if let Some(e) = slot {
                self.aside
                    .insert(ObjectId::from_parts(self.prefix, base + k as u64), e);
            }
        }
        self.live = 0;
        self.base = counter;
    }

    /// Keeps the deque within a constant factor of the entries in it (amortised O(1) per
    /// insert): the oldest entries, there while many later ones came and went, move aside.
    fn compact(&mut self) {
        while self.slots.len() > self.bound() {
            if let Some(Some(e)) = self.slots.pop_front() {
                let id = self.id_at(self.base);
                self.aside.insert(id, e);
                self.live -= 1;
            }
            self.base += 1;
            self.pop_empty();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads take counters in blocks: ids made on many threads at once are distinct, of the
    /// prefix, and dense (no counter is skipped beyond the blocks still being used).
    #[test]
    fn result_ids_made_on_many_threads_are_distinct_and_dense() {
        let names = ResultIds::new();
        let per = 1000;
        let mut counters: Vec<u64> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..per).map(|_| names.fresh()).collect::<Vec<_>>()))
                .collect();
            hs.into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        })
        .into_iter()
        .map(|id| id.counter_if(&names.prefix()).expect("of the prefix"))
        .collect();
        counters.sort();
        counters.dedup();
        assert_eq!(counters.len(), 4 * per);
        assert!(*counters.last().unwrap() < (4 * per) as u64 + 4 * BLOCK);
        // Another prefix on the same thread starts from its own counter.
        let other = ResultIds::new();
        assert_eq!(other.fresh().counter_if(&other.prefix()), Some(0));
        let blocks = 4 * (per as u64).div_ceil(BLOCK);
        assert_eq!(
            names.fresh().counter_if(&names.prefix()),
            Some(blocks * BLOCK)
        );
    }

    /// Entries removed in any order are found by id until then, and their slots go.
    #[test]
    fn results_are_found_by_id_until_removed_in_any_order() {
        let names = ResultIds::new();
        let mut m = ResultMap::<u32>::new(names.prefix());
        let ids: Vec<ObjectId> = (0..100).map(|_| names.fresh()).collect();
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(m.insert(*id, i as u32), None);
        }
        assert!(m.aside.is_empty(), "all in the deque");
        assert_eq!(m.front(), Some((ids[0], &0)));
        // Every third first, then the rest from the back.
        for (i, id) in ids.iter().enumerate().filter(|(i, _)| i % 3 == 1) {
            assert_eq!(m.remove(id), Some(i as u32));
            assert!(!m.contains(id));
            assert_eq!(m.get(id), None);
            assert_eq!(m.remove(id), None, "once");
        }
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(m.get(id).is_some(), i % 3 != 1, "{i}");
        }
        *m.get_mut(&ids[0]).unwrap() += 1000;
        assert_eq!(m.remove(&ids[0]), Some(1000));
        for (i, id) in ids
            .iter()
            .enumerate()
            .rev()
            .filter(|(i, _)| i % 3 != 1 && *i > 0)
        {
            assert_eq!(m.remove(id), Some(i as u32));
        }
        assert!(m.is_empty() && m.slots.is_empty() && m.aside.is_empty());
        assert_eq!(m.front(), None);
        // An id kept twice: the newer entry answers, the older one is handed back.
        let id = names.fresh();
        assert_eq!(m.insert(id, 1), None);
        assert_eq!(m.insert(id, 2), Some(1));
        assert_eq!(m.get(&id), Some(&2));
        assert_eq!(m.len(), 1);
        assert_eq!(m.remove(&id), Some(2));
        assert!(m.is_empty());
    }

    /// Ids of another prefix, ids inserted late (before the deque's start) and ids far ahead
    /// are kept aside and found there; nothing is in two places.
    #[test]
    fn ids_the_deque_cannot_hold_are_kept_aside() {
        let names = ResultIds::new();
        let mut m = ResultMap::<u32>::new(names.prefix());
        let early = names.fresh();
        let ids: Vec<ObjectId> = (0..10).map(|_| names.fresh()).collect();
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(m.insert(*id, i as u32), None);
        }
        let foreign = ObjectId::random();
        let far = ObjectId::from_parts(names.prefix(), u64::MAX - 3);
        assert_eq!(m.insert(early, 100), None);
        assert_eq!(m.insert(foreign, 101), None);
        assert_eq!(m.aside.len(), 2);
        // Far ahead: the deque restarts there, its entries moved aside.
        assert_eq!(m.insert(far, 102), None);
        assert_eq!(m.aside.len(), 12);
        assert_eq!(m.front(), Some((far, &102)));
        assert_eq!(
            (m.get(&early), m.get(&foreign), m.get(&far)),
            (Some(&100), Some(&101), Some(&102))
        );
        assert_eq!(m.len(), 13);
        // Replaced where they are.
        assert_eq!(m.insert(early, 200), Some(100));
        assert_eq!(m.insert(ids[3], 203), Some(3));
        assert_eq!(m.len(), 13);
        let mut all = m.ids();
        all.sort();
        let mut want: Vec<ObjectId> = ids.iter().copied().chain([early, foreign, far]).collect();
        want.sort();
        assert_eq!(all, want);
        for id in want {
            assert!(m.remove(&id).is_some());
        }
        assert!(m.is_empty() && m.slots.is_empty() && m.aside.is_empty());
    }

    /// An old entry kept while a thread's counters moved far on (another thread made many
    /// calls): the deque restarts at the new counters instead of growing to reach them, so
    /// they are kept in order (and found by index) and the old one waits aside. Inserts that
    /// jump back and forth never grow the deque beyond its bound.
    #[test]
    fn an_old_entry_does_not_keep_later_ids_out_of_the_deque() {
        let names = ResultIds::new();
        let mut m = ResultMap::<u32>::new(names.prefix());
        let at = |n: u64| ObjectId::from_parts(names.prefix(), n);
        assert_eq!(m.insert(at(5), 5), None);
        for n in 100_000..105_000u64 {
            assert_eq!(m.insert(at(n), n as u32), None);
            assert!(
                m.slots.len() <= m.bound(),
                "{} for {}",
                m.slots.len(),
                m.live
            );
        }
        assert_eq!(m.aside.len(), 1, "only the old entry aside");
        assert_eq!(m.front(), Some((at(100_000), &100_000)));
        assert_eq!(m.get(&at(5)), Some(&5));
        for n in 100_000..105_000u64 {
            assert_eq!(m.remove(&at(n)), Some(n as u32));
        }
        assert_eq!(m.remove(&at(5)), Some(5));
        assert!(m.is_empty() && m.slots.is_empty() && m.aside.is_empty());
        // Back and forth, far apart: bounded every time.
        for k in 0..200u64 {
            let (a, b) = (at(k), at(k + 60_000));
            assert_eq!(m.insert(a, 1), None);
            assert_eq!(m.insert(b, 2), None);
            assert!(m.slots.len() <= m.bound());
            assert_eq!((m.remove(&a), m.remove(&b)), (Some(1), Some(2)));
        }
        assert!(m.is_empty());
    }

    /// One long entry in front while many later ones come and go: the deque stays within a
    /// constant factor of its entries, and the long one is still found (moved aside).
    #[test]
    fn a_long_entry_in_front_does_not_keep_every_later_slot() {
        let names = ResultIds::new();
        let mut m = ResultMap::<u32>::new(names.prefix());
        let long = names.fresh();
        assert_eq!(m.insert(long, 7), None);
        let mut kept = Vec::new();
        for i in 0..20_000u32 {
            let id = names.fresh();
            assert_eq!(m.insert(id, i), None);
            assert!(
                m.slots.len() <= 2 * m.live + 1024,
                "{} for {}",
                m.slots.len(),
                m.live
            );
            if i % 100 == 0 {
                kept.push((id, i));
            } else {
                assert_eq!(m.remove(&id), Some(i));
            }
        }
        assert_eq!(m.get(&long), Some(&7));
        assert!(m.aside.contains_key(&long), "moved aside");
        for (id, i) in &kept {
            assert_eq!(m.get(id), Some(i));
        }
        assert_eq!(m.remove(&long), Some(7));
        for (id, i) in kept {
            assert_eq!(m.remove(&id), Some(i));
        }
        assert!(m.is_empty() && m.slots.is_empty() && m.aside.is_empty());
    }
}
