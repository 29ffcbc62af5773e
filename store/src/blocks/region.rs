//! The header every fixed-geometry structure in shared memory starts its identity with: which
//! kind of region it is (a magic number), which layout of it (a version), and its geometry
//! (slot count and slot size), validated in one place when a region is initialised and when
//! another process attaches to it.
//!
//! Layout (`RegionHeader`, 24 bytes, 8-byte aligned; its place inside each structure's header
//! is given in that structure's layout diagram):
//!
//! ```text
//! 0   magic      u64  the kind of region (each structure keeps its own value)
//! 8   version    u32  the layout version of that kind
//! 12  capacity   u32  number of slots, a power of two
//! 16  slot_size  u32  bytes per slot
//! 20  reserved   u32  zero
//! ```
//!
//! The magic is published last with a Release store (after the whole structure is
//! initialised), and read first with Acquire on attach, so an attacher that sees the magic
//! sees every field written before it. An attacher validates everything it reads against the
//! structure's [`Kind`] (a power-of-two capacity and a slot size within bounds, the whole
//! structure inside the region it was given) and keeps its own copy of the geometry: later
//! corruption of the header by another process cannot redirect an access outside the region.

use std::ptr::NonNull;

use crate::blocks::sync::{AtomicU32, AtomicU64, Ordering};

/// What a kind of region accepts, and how many bytes a given geometry needs.
#[derive(Debug)]
pub struct Kind {
    /// For messages ("ring", "mailbox").
    pub name: &'static str,
    pub magic: u64,
    /// The layout version this build reads and writes.
    pub version: u32,
    /// Required alignment of the region (a power of two).
    pub align: usize,
    /// Bytes of the structure's header (the region is at least this long).
    pub header_len: usize,
    /// Smallest and largest capacity (each a power of two).
    pub capacity: (u64, u64),
    /// Smallest and largest slot size.
    pub slot_size: (u64, u64),
    /// The slot size is a multiple of this.
    pub slot_align: u64,
    /// Bytes a region of this geometry needs (already validated against the bounds above;
    /// `None` if that overflows).
    pub bytes: fn(Geometry) -> Option<usize>,
}

/// The geometry words of a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub capacity: u64,
    pub slot_size: u64,
}

/// A region or its header is not what its kind accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    #[error("null region")]
    Null,
    #[error("{kind} region at {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        kind: &'static str,
        addr: usize,
        align: usize,
    },
    #[error("{kind} region of {len} bytes is smaller than its {need}-byte header")]
    ShortHeader {
        kind: &'static str,
        len: usize,
        need: usize,
    },
    #[error("not a {kind}: magic {found:#x}, expected {expected:#x}")]
    BadMagic {
        kind: &'static str,
        found: u64,
        expected: u64,
    },
    #[error("{kind} layout version {found}, this build knows {expected}")]
    BadVersion {
        kind: &'static str,
        found: u32,
        expected: u32,
    },
    #[error("{kind} capacity {capacity}: must be a power of two in {min}..={max}")]
    BadCapacity {
        kind: &'static str,
        capacity: u64,
        min: u64,
        max: u64,
    },
    #[error("{kind} slot size {slot_size}: must be a multiple of {align} in {min}..={max}")]
    BadSlotSize {
        kind: &'static str,
        slot_size: u64,
        align: u64,
        min: u64,
        max: u64,
    },
    #[error("{kind} size overflows usize")]
    Overflow { kind: &'static str },
    #[error("{kind} of {need} bytes does not fit its region of {len} bytes")]
    TooLarge {
        kind: &'static str,
        need: usize,
        len: usize,
    },
}

impl RegionError {
    /// A fixed description of the error (without its numbers).
    pub fn reason(&self) -> &'static str {
        match self {
            RegionError::Null => "null region",
            RegionError::Misaligned { .. } => "region misaligned",
            RegionError::ShortHeader { .. } => "region smaller than the header",
            RegionError::BadMagic { .. } => "bad magic",
            RegionError::BadVersion { .. } => "unknown layout version",
            RegionError::BadCapacity { .. } => "bad capacity in header",
            RegionError::BadSlotSize { .. } => "bad slot size in header",
            RegionError::Overflow { .. } => "size overflows usize",
            RegionError::TooLarge { .. } => "structure larger than its region",
        }
    }

    /// Whether the error is about the region the caller passed (null, misaligned, shorter
    /// than a header) rather than about what the header says.
    pub fn is_region(&self) -> bool {
        matches!(
            self,
            RegionError::Null | RegionError::Misaligned { .. } | RegionError::ShortHeader { .. }
        )
    }
}

impl Kind {
    /// Checks a geometry against the bounds; returns the bytes a region of it needs.
    pub fn check(&self, g: Geometry) -> Result<usize, RegionError> {
        let (min, max) = self.capacity;
        if !g.capacity.is_power_of_two() || g.capacity < min || g.capacity > max {
            return Err(RegionError::BadCapacity {
                kind: self.name,
                capacity: g.capacity,
                min,
                max,
            });
        }
        let (min, max) = self.slot_size;
        if g.slot_size < min || g.slot_size > max || !g.slot_size.is_multiple_of(self.slot_align) {
            return Err(RegionError::BadSlotSize {
                kind: self.name,
                slot_size: g.slot_size,
                align: self.slot_align,
                min,
                max,
            });
        }
        (self.bytes)(g).ok_or(RegionError::Overflow { kind: self.name })
    }

    /// Checks the region a caller passes: not null, aligned, and at least a header long.
    pub fn check_region(&self, region: *mut u8, len: usize) -> Result<NonNull<u8>, RegionError> {
        let ptr = NonNull::new(region).ok_or(RegionError::Null)?;
        if !region.addr().is_multiple_of(self.align) {
            return Err(RegionError::Misaligned {
                kind: self.name,
                addr: region.addr(),
                align: self.align,
            });
        }
        if len < self.header_len {
            return Err(RegionError::ShortHeader {
                kind: self.name,
                len,
                need: self.header_len,
            });
        }
        Ok(ptr)
    }
}

/// The identity and geometry words at a fixed place in a structure's header. `repr(C)`, only
/// atomics: other processes may read (or corrupt) it concurrently.
#[repr(C)]
#[derive(Debug)]
pub struct RegionHeader {
    magic: AtomicU64,
    version: AtomicU32,
    capacity: AtomicU32,
    slot_size: AtomicU32,
    reserved: AtomicU32,
}

#[cfg(not(loom))]
const _: () = assert!(size_of::<RegionHeader>() == 24 && align_of::<RegionHeader>() == 8);

impl Default for RegionHeader {
    fn default() -> Self {
        Self::new()
    }
}

impl RegionHeader {
    /// A zeroed header (no kind yet), for headers built in local memory (models, tests).
    pub fn new() -> RegionHeader {
        RegionHeader {
            magic: AtomicU64::new(0),
            version: AtomicU32::new(0),
            capacity: AtomicU32::new(0),
            slot_size: AtomicU32::new(0),
            reserved: AtomicU32::new(0),
        }
    }

    /// Writes the geometry and version, then the magic with Release: call it last in the
    /// structure's initialisation, so that whoever sees the magic sees everything before it.
    /// `g` must have passed [`Kind::check`] (so both words fit in a `u32`).
    pub fn publish(&self, kind: &Kind, g: Geometry) {
        debug_assert!(kind.check(g).is_ok());
        self.capacity.store(g.capacity as u32, Ordering::Relaxed);
        self.slot_size.store(g.slot_size as u32, Ordering::Relaxed);
        self.version.store(kind.version, Ordering::Relaxed);
        self.reserved.store(0, Ordering::Relaxed);
        self.magic.store(kind.magic, Ordering::Release);
    }

    /// Reads and validates the header of a region of `len` bytes as a `kind`: magic (Acquire,
    /// first), version, geometry bounds, and that the structure fits in `len` bytes.
    pub fn read(&self, kind: &Kind, len: usize) -> Result<Geometry, RegionError> {
        let magic = self.magic.load(Ordering::Acquire);
        if magic != kind.magic {
            return Err(RegionError::BadMagic {
                kind: kind.name,
                found: magic,
                expected: kind.magic,
            });
        }
        let version = self.version.load(Ordering::Relaxed);
        if version != kind.version {
            return Err(RegionError::BadVersion {
                kind: kind.name,
                found: version,
                expected: kind.version,
            });
        }
        let g = Geometry {
            capacity: self.capacity.load(Ordering::Relaxed).into(),
            slot_size: self.slot_size.load(Ordering::Relaxed).into(),
        };
        let need = kind.check(g)?;
        if need > len {
            return Err(RegionError::TooLarge {
                kind: kind.name,
                need,
                len,
            });
        }
        Ok(g)
    }

    /// The raw words (magic; version, capacity, slot size), for tests that corrupt them.
    #[doc(hidden)]
    pub fn words(&self) -> (&AtomicU64, [&AtomicU32; 3]) {
        (
            &self.magic,
            [&self.version, &self.capacity, &self.slot_size],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIND: Kind = Kind {
        name: "test",
        magic: 0x1234_5678_9abc_def0,
        version: 3,
        align: 64,
        header_len: 64,
        capacity: (2, 1 << 10),
        slot_size: (16, 1 << 12),
        slot_align: 16,
        bytes: |g| {
            (g.capacity as usize)
                .checked_mul(g.slot_size as usize)?
                .checked_add(64)
        },
    };

    #[repr(C, align(64))]
    struct Buf([u8; 256]);

    #[test]
    fn geometry_bounds_are_checked() {
        let g = |capacity, slot_size| Geometry {
            capacity,
            slot_size,
        };
        assert_eq!(KIND.check(g(4, 32)), Ok(64 + 128));
        for (c, s) in [(0, 32), (1, 32), (3, 32), (2048, 32), (u64::MAX, 32)] {
            assert!(
                matches!(KIND.check(g(c, s)), Err(RegionError::BadCapacity { .. })),
                "{c}"
            );
        }
        for s in [0, 8, 24, 4096 + 16, u64::MAX] {
            assert!(
                matches!(KIND.check(g(4, s)), Err(RegionError::BadSlotSize { .. })),
                "{s}"
            );
        }
    }

    #[test]
    fn the_region_is_checked() {
        let mut buf = Buf([0; 256]);
        let p = buf.0.as_mut_ptr();
        assert_eq!(
            KIND.check_region(std::ptr::null_mut(), 256),
            Err(RegionError::Null)
        );
        assert!(matches!(
            KIND.check_region(p.wrapping_add(8), 256),
            Err(RegionError::Misaligned { align: 64, .. })
        ));
        assert!(matches!(
            KIND.check_region(p, 63),
            Err(RegionError::ShortHeader { need: 64, .. })
        ));
        assert_eq!(KIND.check_region(p, 64), Ok(NonNull::new(p).unwrap()));
        assert!(RegionError::Null.is_region());
        assert!(!RegionError::Overflow { kind: "x" }.is_region());
    }

    #[test]
    fn a_published_header_reads_back_and_corruption_is_refused() {
        let h = RegionHeader::new();
        let g = Geometry {
            capacity: 8,
            slot_size: 16,
        };
        assert!(matches!(
            h.read(&KIND, 1024),
            Err(RegionError::BadMagic { found: 0, .. })
        ));
        h.publish(&KIND, g);
        assert_eq!(h.read(&KIND, 1024), Ok(g));
        assert!(matches!(
            h.read(&KIND, 64 + 127),
            Err(RegionError::TooLarge { need: 192, .. })
        ));
        let (magic, [version, capacity, slot_size]) = h.words();
        let corruptions: [(&AtomicU32, u32); 5] = [
            (version, 4),
            (capacity, 3),
            (capacity, 0),
            (slot_size, 24),
            (slot_size, u32::MAX),
        ];
        for (word, bad) in corruptions {
            let good = word.swap(bad, Ordering::Relaxed);
            let err = h.read(&KIND, 1 << 20).unwrap_err();
            assert!(!err.is_region(), "{err}");
            word.store(good, Ordering::Relaxed);
        }
        magic.store(1, Ordering::Relaxed);
        assert!(matches!(
            h.read(&KIND, 1024),
            Err(RegionError::BadMagic { .. })
        ));
    }
}
