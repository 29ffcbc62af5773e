//! Object ids: 20 opaque bytes, as in Plasma.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

/// Length of an [`ObjectId`] in bytes.
pub const ID_LEN: usize = 20;

/// The 20-byte name of an object. Chosen by whoever creates the object (random, or a caller's
/// prefix plus a counter); the store only requires that live objects have distinct ids.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ObjectId(pub [u8; ID_LEN]);

impl ObjectId {
    /// A fresh id: 12 random bytes fixed per process, then a per-process counter.
    /// Unique across processes with overwhelming probability and cheap (no syscall per id;
    /// a thread takes its counters a block at a time, so most ids cost no shared write).
    pub fn random() -> ObjectId {
        thread_local! {
            /// The prefix, with the fork generation it was drawn in.
            static PREFIX: std::cell::Cell<Option<(u64, [u8; 12])>> =
                const { std::cell::Cell::new(None) };
            static BLOCK: std::cell::Cell<CounterBlock> =
                const { std::cell::Cell::new(CounterBlock::EMPTY) };
        }
        static SHARED: std::sync::Mutex<Option<(u64, [u8; 12])>> = std::sync::Mutex::new(None);
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let generation = fork_generation();
        let prefix = match PREFIX.get() {
            Some((seeded, prefix)) if seeded == generation => prefix,
            _ => {
                // One prefix per process (threads share it; the counter keeps them apart),
                // drawn again in a forked child so that parent and child never collide.
                let mut p = SHARED.lock().unwrap_or_else(|e| e.into_inner());
                let prefix = match *p {
                    Some((seeded, prefix)) if seeded == generation => prefix,
                    _ => {
                        let prefix = random_prefix();
                        *p = Some((generation, prefix));
                        prefix
                    }
                };
                PREFIX.set(Some((generation, prefix)));
                prefix
            }
        };
        // A new prefix (a forked child's) starts a new block.
        let n = CounterBlock::take(&BLOCK, prefix, &COUNTER, 1024);
        ObjectId::from_parts(prefix, n)
    }

    /// A fresh 12-byte prefix for [`ObjectId::from_parts`], drawn at random (not the one
    /// [`ObjectId::random`] uses): a namer of its own ids, with its own counter, never collides
    /// with them.
    pub fn random_prefix() -> [u8; 12] {
        random_prefix()
    }

    /// The counter of an id built by [`ObjectId::from_parts`] with `prefix`; `None` for an id
    /// of another prefix.
    #[inline]
    pub fn counter_if(&self, prefix: &[u8; 12]) -> Option<u64> {
        let (head, tail) = self.0.split_at(12);
        (head == prefix).then(|| u64::from_le_bytes(tail.try_into().expect("8 bytes")))
    }

    /// Builds an id from a 12-byte prefix and a counter: how callers name return values.
    pub fn from_parts(prefix: [u8; 12], counter: u64) -> ObjectId {
        let mut b = [0u8; ID_LEN];
        b[..12].copy_from_slice(&prefix);
        b[12..].copy_from_slice(&counter.to_le_bytes());
        ObjectId(b)
    }

    pub fn as_bytes(&self) -> &[u8; ID_LEN] {
        &self.0
    }

    /// A well-mixed 64-bit hash of all 20 bytes (ids are often sequential, so no byte range
    /// alone is a good hash).
    pub fn hash64(&self) -> u64 {
        let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
        for chunk in [&self.0[0..8], &self.0[8..16], &self.0[16..20]] {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            h = mix(h ^ u64::from_le_bytes(w));
        }
        h
    }
}

/// A thread's block of counters for the ids of one prefix, taken from a counter that the
/// process's threads share: one shared write per block, not per id. Used by
/// [`ObjectId::random`] and by the namers of calls' results.
#[derive(Clone, Copy)]
pub struct CounterBlock {
    prefix: [u8; 12],
    next: u64,
    end: u64,
}

impl CounterBlock {
    /// No counters yet.
    pub const EMPTY: CounterBlock = CounterBlock {
        prefix: [0; 12],
        next: 0,
        end: 0,
    };

    /// The next counter of `prefix` from this thread's block in `cell`, which takes `size`
    /// more from `shared` when it is spent or was of another prefix. Falls back to one
    /// counter from `shared` if the thread's cell is gone (the thread is exiting).
    #[inline]
    pub fn take(
        cell: &'static std::thread::LocalKey<std::cell::Cell<CounterBlock>>,
        prefix: [u8; 12],
        shared: &AtomicU64,
        size: u64,
    ) -> u64 {
        cell.try_with(|c| {
            let mut b = c.get();
            if b.prefix != prefix || b.next == b.end {
                let n = shared.fetch_add(size, Ordering::Relaxed);
                b = CounterBlock {
                    prefix,
                    next: n,
                    end: n + size,
                };
            }
            let n = b.next;
            b.next += 1;
            c.set(b);
            n
        })
        .unwrap_or_else(|_| shared.fetch_add(1, Ordering::Relaxed))
    }
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Counts the forks this process descends from since it first asked (a `pthread_atfork` child
/// handler bumps it), so that a forked child draws a new id prefix without a `getpid` system
/// call per id.
fn fork_generation() -> u64 {
    static FORKS: AtomicU64 = AtomicU64::new(0);
    static REGISTER: std::sync::Once = std::sync::Once::new();
    extern "C" fn in_child() {
        FORKS.fetch_add(1, Ordering::Relaxed);
    }
    REGISTER.call_once(|| {
        // SAFETY: registers a handler that only touches an atomic (async-signal-safe, as a
        // fork child handler must be); nothing is unregistered, the function lives forever.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        assert_eq!(rc, 0, "pthread_atfork failed");
    });
    FORKS.load(Ordering::Relaxed)
}

fn random_prefix() -> [u8; 12] {
    let mut p = [0u8; 12];
    if rustix::rand::getrandom(&mut p, rustix::rand::GetRandomFlags::empty()).is_err() {
        // getrandom cannot fail on Linux >= 3.17 with a small buffer; fall back to time and pid.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        p[..8].copy_from_slice(&mix(t).to_le_bytes());
        p[8..].copy_from_slice(&std::process::id().to_le_bytes());
    }
    p
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({self})")
    }
}

/// Error parsing an [`ObjectId`] from hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an object id is 40 hex digits, got {0:?}")]
pub struct ParseIdError(pub String);

impl FromStr for ObjectId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseIdError(s.chars().take(64).collect());
        if s.len() != ID_LEN * 2 || !s.is_ascii() {
            return Err(err());
        }
        let mut b = [0u8; ID_LEN];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| err())?;
        }
        Ok(ObjectId(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = ObjectId::random();
        let s = id.to_string();
        assert_eq!(s.len(), 40);
        assert_eq!(s.parse::<ObjectId>().unwrap(), id);
        assert!("xyz".parse::<ObjectId>().is_err());
        assert!("zz".repeat(20).parse::<ObjectId>().is_err());
    }

    #[test]
    fn ids_from_parts_give_their_counter_back_to_their_prefix_only() {
        let (p, q) = (ObjectId::random_prefix(), ObjectId::random_prefix());
        assert_ne!(p, q);
        assert_ne!(p[..], ObjectId::random().0[..12]);
        for n in [0, 1, 255, 256, u64::MAX] {
            let id = ObjectId::from_parts(p, n);
            assert_eq!(id.counter_if(&p), Some(n));
            assert_eq!(id.counter_if(&q), None);
        }
    }

    #[test]
    fn random_ids_are_distinct_and_hash_spreads() {
        let ids: Vec<_> = (0..1000).map(|_| ObjectId::random()).collect();
        let set: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(set.len(), ids.len());
        let buckets: std::collections::HashSet<_> = ids.iter().map(|i| i.hash64() & 1023).collect();
        assert!(
            buckets.len() > 500,
            "sequential ids must spread: {}",
            buckets.len()
        );
    }

    /// Threads take their counters in blocks: ids made on many threads at once, across
    /// several blocks each, are all distinct and share the process's prefix.
    #[test]
    fn ids_made_on_many_threads_at_once_are_distinct() {
        let per = 3000;
        let ids: Vec<ObjectId> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(move || (0..per).map(|_| ObjectId::random()).collect::<Vec<_>>()))
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let set: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(set.len(), 8 * per);
        assert!(ids.iter().all(|id| id.0[..12] == ids[0].0[..12]));
    }
}
