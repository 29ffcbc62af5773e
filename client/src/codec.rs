//! The codec: how typed values become bytes in the arena and back (rkyv 0.8 and bytemuck).
//!
//! Two encodings:
//!
//! - [`Value`]: any rkyv-archivable type. [`archived_len`] measures the archive with a counting
//!   pass (no buffer), [`serialize_into`] writes it straight into the object's memory, and readers
//!   get a zero-copy `&T::Archived` from [`access`] (validated) or [`access_unchecked`].
//! - [`Plain`]: plain-old-data slices (`bytemuck::Pod`), stored as their raw bytes and read back
//!   with [`cast_slice`].
//!
//! The bytes [`serialize_into`] writes are exactly those `rkyv::to_bytes` produces, so any rkyv
//! reader can open an object. An archive's root lives at its *end*, so a reader must be given
//! exactly the bytes that were written (the length [`serialize_into`] returned), not a longer
//! buffer.
//!
//! While a value is serialised, every [`ObjectRef`](crate::ObjectRef) met inside it reports its
//! id; [`collect_refs`] gathers those ids so the store can keep nested objects alive.

use std::any::type_name;
use std::cell::RefCell;
use std::fmt;
use std::mem::{align_of, size_of};

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor::{self, Source};
use rkyv::ser::allocator::ArenaHandle;
use rkyv::ser::writer::Buffer;
use rkyv::ser::{Positional, Writer};
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Portable, Serialize};
use trove_store::ObjectId;

use crate::error::{Error, Result};

/// The error type used inside rkyv's serializers, validators and deserializers.
pub type RkyvError = rancor::Error;

/// A type trove can store as an rkyv archive: everything needed to serialise it with rkyv's
/// high-level serializer (arena allocator and pointer sharing, as `rkyv::to_bytes` uses), to
/// validate its archived form with bytecheck, and to deserialise that back to an owned value.
///
/// Implemented for every type that qualifies; in practice, any type that derives
/// `rkyv::{Archive, Serialize, Deserialize}` (with fields that do too, including
/// [`ObjectRef`](crate::ObjectRef)s), plus the std types rkyv supports (`Vec`, `String`,
/// `BTreeMap`, `HashMap`, `Option`, tuples, primitives, ...).
///
/// The serialisation bounds name three writers: [`Counter`] (the counting pass of
/// [`archived_len`]), rkyv's [`Buffer`] (the real pass of [`serialize_into`]) and rkyv's
/// [`AlignedVec`] (so `rkyv::to_bytes::<RkyvError>(&value)` works in generic code, e.g. for
/// small values sent inline).
pub trait Value:
    Archive<
        Archived: Portable
                      + for<'a> CheckBytes<HighValidator<'a, RkyvError>>
                      + Deserialize<Self, HighDeserializer<RkyvError>>,
    > + for<'a> Serialize<HighSerializer<Counter, ArenaHandle<'a>, RkyvError>>
    + for<'a, 'b> Serialize<HighSerializer<Buffer<'b>, ArenaHandle<'a>, RkyvError>>
    + for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, RkyvError>>
    + Sized
    + 'static
{
}

impl<T> Value for T where
    T: Archive<
            Archived: Portable
                          + for<'a> CheckBytes<HighValidator<'a, RkyvError>>
                          + Deserialize<T, HighDeserializer<RkyvError>>,
        > + for<'a> Serialize<HighSerializer<Counter, ArenaHandle<'a>, RkyvError>>
        + for<'a, 'b> Serialize<HighSerializer<Buffer<'b>, ArenaHandle<'a>, RkyvError>>
        + for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, RkyvError>>
        + Sized
        + 'static
{
}

/// An rkyv writer that stores nothing and only counts the bytes written to it: serialising into
/// it gives an archive's exact length.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    len: usize,
}

impl Counter {
    /// A counter at zero.
    pub fn new() -> Counter {
        Counter::default()
    }

    /// The number of bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Positional for Counter {
    #[inline]
    fn pos(&self) -> usize {
        self.len
    }
}

#[derive(Debug)]
struct LengthOverflow;

impl fmt::Display for LengthOverflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("archive length overflows usize")
    }
}

impl std::error::Error for LengthOverflow {}

impl<E: Source> Writer<E> for Counter {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), E> {
        match self.len.checked_add(bytes.len()) {
            Some(len) => {
                self.len = len;
                Ok(())
            }
            None => Err(E::new(LengthOverflow)),
        }
    }
}

fn serialize_error<T>(e: RkyvError) -> Error {
    Error::Serialize {
        type_name: type_name::<T>(),
        reason: e.to_string(),
    }
}

fn invalid<T: ?Sized>(id: ObjectId, reason: impl Into<String>) -> Error {
    Error::Invalid {
        id,
        type_name: type_name::<T>(),
        reason: reason.into(),
    }
}

/// The exact length of `value`'s archive, found by a counting pass that allocates no buffer for
/// the archive (rkyv's scratch arena is still used for temporaries).
///
/// [`ObjectRef`](crate::ObjectRef)s met during this pass are *not* reported to [`collect_refs`]:
/// only the real pass, [`serialize_into`], reports them.
pub fn archived_len<T: Value>(value: &T) -> Result<usize> {
    let _quiet = SuppressRefs::new();
    let counter = rkyv::api::high::to_bytes_in::<_, RkyvError>(value, Counter::new())
        .map_err(serialize_error::<T>)?;
    Ok(counter.len())
}

/// [`archived_len`], also returning the refs inside `value` (so that they can be made shareable
/// before the object that will contain them is allocated).
pub fn archived_len_and_refs<T: Value>(value: &T) -> Result<(usize, Vec<ObjectId>)> {
    let (counter, refs) =
        collect_refs(|| rkyv::api::high::to_bytes_in::<_, RkyvError>(value, Counter::new()));
    Ok((counter.map_err(serialize_error::<T>)?.len(), refs))
}

/// Serialises `value` straight into `buf` and returns the number of bytes written: the same bytes
/// `rkyv::to_bytes` produces, at the start of `buf`.
///
/// `buf` should be exactly [`archived_len`] long; if it is too small this returns
/// [`Error::Serialize`] (never panics). Readers must be given exactly the `len` bytes written
/// (the archive's root is at its end); callers that sized `buf` with [`archived_len`] should
/// check the returned length equals it. To read the archive in place, `buf` must be aligned for
/// `T::Archived` (the arena's 64-byte alignment always is); the bytes written do not depend on
/// `buf`'s address.
pub fn serialize_into<T: Value>(value: &T, buf: &mut [u8]) -> Result<usize> {
    let written = rkyv::api::high::to_bytes_in::<_, RkyvError>(value, Buffer::from(buf))
        .map_err(serialize_error::<T>)?;
    Ok(written.len())
}

/// Validates `bytes` as an archived `T` and returns a zero-copy reference to it.
///
/// `bytes` must be exactly the archive (its root is at the end) and aligned for `T::Archived`.
/// Anything else (empty, too short, misaligned, the wrong type, corrupt) is
/// [`Error::Invalid`] naming `id` and `T`; validation never panics.
pub fn access<T: Value>(id: ObjectId, bytes: &[u8]) -> Result<&T::Archived> {
    let root_size = size_of::<T::Archived>();
    let align = align_of::<T::Archived>();
    if bytes.len() < root_size {
        return Err(invalid::<T>(
            id,
            format!(
                "{} bytes is shorter than the {root_size}-byte archived root",
                bytes.len()
            ),
        ));
    }
    // rkyv's validator checks bounds and alignment too; checking first gives clearer reasons.
    let root_addr = (bytes.as_ptr() as usize).wrapping_add(bytes.len() - root_size);
    if !root_addr.is_multiple_of(align) {
        return Err(invalid::<T>(
            id,
            format!("archived root at {root_addr:#x} is not aligned to {align} bytes"),
        ));
    }
    rkyv::api::high::access::<T::Archived, RkyvError>(bytes)
        .map_err(|e| invalid::<T>(id, e.to_string()))
}

/// Returns a reference to the archived `T` in `bytes` without validating it.
///
/// # Safety
///
/// `bytes` must be exactly an archive of a `T` produced by this crate's (or rkyv's default
/// high-level) serialisation with the same rkyv format, unchanged since (and not changed while the
/// returned reference lives), and aligned for `T::Archived`. Typically: an object this process
/// or another trove client wrote with [`serialize_into`] and that has been sealed, or bytes
/// previously accepted by [`access`] with the same `T`.
pub unsafe fn access_unchecked<T: Value>(bytes: &[u8]) -> &T::Archived {
    // SAFETY: the caller guarantees `bytes` is an unchanged, aligned archive of a `T`, which is
    // exactly `rkyv::access_unchecked`'s contract for `T::Archived` at the root position.
    unsafe { rkyv::access_unchecked::<T::Archived>(bytes) }
}

/// Deserialises an archived `T` into an owned `T`. Any [`ObjectRef`](crate::ObjectRef) inside
/// takes its own reference in this process. Errors are [`Error::Invalid`] naming `id`.
pub fn deserialize<T: Value>(id: ObjectId, archived: &T::Archived) -> Result<T> {
    rkyv::api::high::deserialize::<T, RkyvError>(archived)
        .map_err(|e| invalid::<T>(id, e.to_string()))
}

/// Plain old data: stored as its raw bytes, read back zero-copy with [`cast_slice`].
/// Implemented for every `bytemuck::Pod` type (numbers, arrays of them, `#[derive(Pod)]` structs).
pub trait Plain: bytemuck::Pod {}

impl<T: bytemuck::Pod> Plain for T {}

/// Views `bytes` as a slice of `T`. Empty input gives an empty slice; a length that is not a
/// multiple of `size_of::<T>()`, a misaligned start or a zero-sized `T` (with non-empty input)
/// is [`Error::Invalid`] naming `id`.
pub fn cast_slice<T: Plain>(id: ObjectId, bytes: &[u8]) -> Result<&[T]> {
    if bytes.is_empty() {
        return Ok(&[]);
    }
    let size = size_of::<T>();
    if size == 0 {
        return Err(invalid::<[T]>(
            id,
            format!("{} bytes cannot hold zero-sized elements", bytes.len()),
        ));
    }
    if !bytes.len().is_multiple_of(size) {
        return Err(invalid::<[T]>(
            id,
            format!(
                "{} bytes is not a whole number of {size}-byte elements",
                bytes.len()
            ),
        ));
    }
    bytemuck::try_cast_slice(bytes).map_err(|e| {
        invalid::<[T]>(
            id,
            format!(
                "{e} (start {:p}, element alignment {})",
                bytes.as_ptr(),
                align_of::<T>()
            ),
        )
    })
}

/// The raw bytes of a plain-data slice (the inverse of [`cast_slice`]).
pub fn as_bytes<T: Plain>(values: &[T]) -> &[u8] {
    bytemuck::cast_slice(values)
}

// ---- collecting the object ids met while serialising ----

/// The ids met by this thread's active [`collect_refs`] calls: each owns the tail of `refs`
/// from where it started, and a nested one takes its tail before it returns, so the outer
/// one's part stays contiguous. Plain fields in one cell: a collection that meets no ref
/// costs a few loads and stores, and allocates nothing.
struct Collector {
    /// How many collections are active (refs are recorded only while > 0).
    depth: usize,
    /// How many counting passes are under way in the innermost collection (refs are not
    /// recorded while > 0).
    suppressed: usize,
    refs: Vec<ObjectId>,
}

thread_local! {
    static COLLECTOR: RefCell<Collector> = const {
        RefCell::new(Collector { depth: 0, suppressed: 0, refs: Vec::new() })
    };
}

/// Runs `f` and returns its result with the ids of every [`ObjectRef`](crate::ObjectRef)
/// serialised on this thread meanwhile, in the order met (duplicates kept).
///
/// Wrap the real serialisation ([`serialize_into`]; [`archived_len`] never reports refs). Calls
/// nest: an inner `collect_refs` gets the refs met during its own `f`, and those are *not* also
/// reported to the outer one (they belong to the inner object). The previous state is restored
/// even if `f` panics.
pub fn collect_refs<R>(f: impl FnOnce() -> R) -> (R, Vec<ObjectId>) {
    /// Ends this collection (also when `f` panics): the outer one's state comes back.
    struct Scope {
        start: usize,
        outer_suppressed: usize,
    }
    impl Drop for Scope {
        fn drop(&mut self) {
            let _ = COLLECTOR.try_with(|c| {
                if let Ok(mut c) = c.try_borrow_mut() {
                    c.depth -= 1;
                    c.suppressed = self.outer_suppressed;
                    c.refs.truncate(self.start);
                }
            });
        }
    }

    let scope = COLLECTOR.with(|c| {
        let mut c = c.borrow_mut();
        c.depth += 1;
        Scope {
            start: c.refs.len(),
            outer_suppressed: std::mem::replace(&mut c.suppressed, 0),
        }
    });
    let result = f();
    let mine = COLLECTOR.with(|c| {
        let mut c = c.borrow_mut();
        match scope.start {
            _ if c.refs.len() == scope.start => Vec::new(),
            0 => std::mem::take(&mut c.refs),
            start => c.refs.split_off(start),
        }
    });
    drop(scope);
    (result, mine)
}

/// Records that an [`ObjectRef`](crate::ObjectRef) to `id` is being serialised. A no-op unless
/// a [`collect_refs`] is active on this thread and no counting pass is under way.
pub(crate) fn note_ref(id: ObjectId) {
    let _ = COLLECTOR.try_with(|c| {
        if let Ok(mut c) = c.try_borrow_mut()
            && c.depth > 0
            && c.suppressed == 0
        {
            c.refs.push(id);
        }
    });
}

/// Stops refs being recorded while it lives (the counting pass).
struct SuppressRefs;

impl SuppressRefs {
    fn new() -> SuppressRefs {
        let _ = COLLECTOR.try_with(|c| c.borrow_mut().suppressed += 1);
        SuppressRefs
    }
}

impl Drop for SuppressRefs {
    fn drop(&mut self) {
        let _ = COLLECTOR.try_with(|c| {
            let mut c = c.borrow_mut();
            c.suppressed = c.suppressed.saturating_sub(1);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A 64-byte aligned buffer, like an object in the arena.
    struct Arena(AlignedVec<64>);

    impl Arena {
        fn new(len: usize) -> Arena {
            let mut v = AlignedVec::<64>::with_capacity(len.max(64));
            v.resize(len, 0xAA);
            Arena(v)
        }
        fn bytes(&self) -> &[u8] {
            &self.0
        }
        fn bytes_mut(&mut self) -> &mut [u8] {
            &mut self.0
        }
    }

    fn id() -> ObjectId {
        ObjectId([7; 20])
    }

    /// Serialises through the counting pass and into an aligned buffer, checks the bytes
    /// against `rkyv::to_bytes`, then validates and deserialises.
    fn round_trip<T: Value + PartialEq + std::fmt::Debug>(value: &T) -> Arena {
        let len = archived_len(value).unwrap();
        let mut arena = Arena::new(len);
        let written = serialize_into(value, arena.bytes_mut()).unwrap();
        assert_eq!(written, len);
        let reference = rkyv::to_bytes::<RkyvError>(value).unwrap();
        assert_eq!(reference.len(), len);
        assert_eq!(&reference[..], arena.bytes());
        let archived = access::<T>(id(), arena.bytes()).unwrap();
        let back: T = deserialize(id(), archived).unwrap();
        assert_eq!(&back, value);
        arena
    }

    #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq)]
    struct Flags {
        on: bool,
        count: u32,
        name: String,
    }

    #[test]
    fn round_trips() {
        round_trip(&vec![1.5f64, -2.25, f64::MAX, 0.0]);
        round_trip(&Vec::<f64>::new());
        round_trip(&(0..10_000).map(|i| i as f64 * 0.5).collect::<Vec<f64>>());
        round_trip(&String::from("hello, trove"));
        round_trip(&String::new());
        round_trip(&"x".repeat(1000));
        let mut map = BTreeMap::new();
        for k in 0..50u32 {
            map.insert(
                k,
                (0..k % 4).map(|i| format!("v{k}.{i}")).collect::<Vec<_>>(),
            );
        }
        round_trip(&map);
        round_trip(&BTreeMap::<u32, Vec<String>>::new());
        round_trip(&Flags {
            on: true,
            count: 3,
            name: "f".into(),
        });
        round_trip(&(1u8, Some(2u64), [3i16; 5]));
        round_trip(&());
    }

    #[test]
    fn archived_vec_is_zero_copy() {
        let v: Vec<f64> = (0..100).map(f64::from).collect();
        let arena = round_trip(&v);
        let archived = access::<Vec<f64>>(id(), arena.bytes()).unwrap();
        assert_eq!(archived.len(), 100);
        assert_eq!(archived[42].to_native(), 42.0);
        // SAFETY: `arena` holds an unchanged, aligned archive of a Vec<f64>.
        let unchecked = unsafe { access_unchecked::<Vec<f64>>(arena.bytes()) };
        assert_eq!(unchecked[99].to_native(), 99.0);
    }

    #[test]
    fn wrong_type_is_invalid_not_a_panic() {
        let arena = round_trip(&String::from("definitely not a vector of u64s"));
        match access::<Vec<u64>>(id(), arena.bytes()) {
            Err(Error::Invalid {
                id: got, type_name, ..
            }) => {
                assert_eq!(got, id());
                assert!(type_name.contains("Vec<u64>"), "{type_name}");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }

        // Garbage bytes as a struct with a bool field: the bool byte 0xAA is invalid.
        let mut garbage = Arena::new(64);
        garbage.bytes_mut().fill(0xAA);
        assert!(matches!(
            access::<Flags>(id(), garbage.bytes()),
            Err(Error::Invalid { .. })
        ));
        // Every length and every byte pattern: errors, never panics.
        for len in 0..64 {
            for fill in [0u8, 0x01, 0x7F, 0xAA, 0xFF] {
                let mut a = Arena::new(len);
                a.bytes_mut().fill(fill);
                let _ = access::<Flags>(id(), a.bytes());
                let _ = access::<Vec<u64>>(id(), a.bytes());
                let _ = access::<String>(id(), a.bytes());
                let _ = access::<BTreeMap<u32, Vec<String>>>(id(), a.bytes());
            }
        }
    }

    #[test]
    fn empty_short_and_misaligned_input_is_invalid() {
        assert!(matches!(
            access::<Vec<f64>>(id(), &[]),
            Err(Error::Invalid { .. })
        ));
        let arena = round_trip(&vec![1.0f64, 2.0, 3.0]);
        let bytes = arena.bytes();
        // Truncated from the front (the root moves) or the back.
        for cut in 1..bytes.len() {
            assert!(
                access::<Vec<f64>>(id(), &bytes[cut..]).is_err(),
                "cut {cut}"
            );
            let _ = access::<Vec<f64>>(id(), &bytes[..bytes.len() - cut]);
        }
        // Misaligned: copy into an aligned buffer at offset 1.
        let mut shifted = Arena::new(bytes.len() + 1);
        shifted.bytes_mut()[1..].copy_from_slice(bytes);
        assert!(matches!(
            access::<Vec<f64>>(id(), &shifted.bytes()[1..]),
            Err(Error::Invalid { .. })
        ));
    }

    #[test]
    fn truncated_output_buffer_is_an_error() {
        let value: Vec<String> = (0..20).map(|i| format!("item {i}")).collect();
        let len = archived_len(&value).unwrap();
        for short in [0, 1, len / 2, len - 1] {
            let mut arena = Arena::new(short);
            match serialize_into(&value, arena.bytes_mut()) {
                Err(Error::Serialize { type_name, .. }) => assert!(type_name.contains("Vec")),
                other => panic!("expected Serialize error, got {other:?}"),
            }
        }
        // A larger buffer works; only the written prefix is the archive.
        let mut arena = Arena::new(len + 100);
        assert_eq!(serialize_into(&value, arena.bytes_mut()).unwrap(), len);
        let archived = access::<Vec<String>>(id(), &arena.bytes()[..len]).unwrap();
        assert_eq!(archived[19].as_str(), "item 19");
    }

    #[test]
    fn plain_slices() {
        let values: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let bytes = as_bytes(&values);
        assert_eq!(bytes.len(), 64);
        let mut arena = Arena::new(64);
        arena.bytes_mut().copy_from_slice(bytes);
        assert_eq!(cast_slice::<f32>(id(), arena.bytes()).unwrap(), &values[..]);
        assert_eq!(cast_slice::<f32>(id(), &[]).unwrap(), &[] as &[f32]);
        assert_eq!(
            cast_slice::<[u64; 2]>(id(), arena.bytes()).unwrap().len(),
            4
        );
        // Length not a multiple of the element size.
        assert!(matches!(
            cast_slice::<f32>(id(), &arena.bytes()[..63]),
            Err(Error::Invalid { .. })
        ));
        // Misaligned start.
        assert!(matches!(
            cast_slice::<f32>(id(), &arena.bytes()[1..61]),
            Err(Error::Invalid { .. })
        ));
        // Zero-sized elements.
        assert!(cast_slice::<()>(id(), arena.bytes()).is_err());
        assert_eq!(cast_slice::<()>(id(), &[]).unwrap().len(), 0);
        assert!(as_bytes::<()>(&[(), ()]).is_empty());
    }

    #[test]
    fn collect_refs_nests_and_restores() {
        note_ref(ObjectId([1; 20])); // no collection active: dropped
        let ((), outer) = collect_refs(|| {
            note_ref(ObjectId([2; 20]));
            let ((), inner) = collect_refs(|| note_ref(ObjectId([3; 20])));
            assert_eq!(inner, vec![ObjectId([3; 20])]);
            note_ref(ObjectId([4; 20]));
        });
        assert_eq!(outer, vec![ObjectId([2; 20]), ObjectId([4; 20])]);

        // A panic inside restores the outer collection.
        let ((), outer) = collect_refs(|| {
            note_ref(ObjectId([5; 20]));
            let r = std::panic::catch_unwind(|| {
                collect_refs(|| {
                    note_ref(ObjectId([6; 20]));
                    panic!("boom");
                })
            });
            assert!(r.is_err());
            note_ref(ObjectId([7; 20]));
        });
        assert_eq!(outer, vec![ObjectId([5; 20]), ObjectId([7; 20])]);
        let ((), none) = collect_refs(|| ());
        assert!(none.is_empty());
    }
}
