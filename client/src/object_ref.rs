//! [`ObjectRef`]: a typed, counted reference to an object in the store.
//!
//! An `ObjectRef<T>` owns one reference to its object in this process: cloning takes another,
//! dropping gives one back (through the runtime), so the object stays alive while any
//! `ObjectRef` to it does.
//!
//! `ObjectRef`s can be fields of rkyv types (`#[derive(Archive, Serialize, Deserialize)]`): the
//! archive stores just the 20-byte id ([`ArchivedObjectRef`]), serialising reports the id to
//! [`codec::collect_refs`] so the store can keep the nested object
//! alive, and deserialising makes a new `ObjectRef` that takes its own reference.

use std::any::type_name;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;

use rkyv::bytecheck::CheckBytes;
use rkyv::munge::munge;
use rkyv::rancor::Fallible;
use rkyv::{Archive, Deserialize, Place, Portable, Serialize};
use trove_store::ObjectId;
use trove_store::id::ID_LEN;

use crate::codec;

/// A typed reference to an object in the store holding a `T` (an rkyv archive of a sized `T`,
/// or plain data for a slice type such as `[f32]`).
///
/// Holds one reference to the object in this process: [`Clone`] takes another and [`Drop`]
/// releases it. Equality, ordering and hashing are by id. `Send + Sync + Unpin` whatever `T`.
pub struct ObjectRef<T: ?Sized> {
    id: ObjectId,
    _marker: PhantomData<fn() -> Box<T>>,
}

impl<T: ?Sized> ObjectRef<T> {
    /// The object's id.
    pub fn id(&self) -> ObjectId {
        self.id
    }

    /// A new reference to the object `id`, received out of band (a log line, a file, another
    /// protocol). Nothing is checked here: `get` validates that the object holds a `T`.
    pub fn from_id(id: ObjectId) -> ObjectRef<T> {
        ObjectRef::new_held(id)
    }

    /// Wraps `id`, whose reference in this process has already been taken (no `hold`).
    pub(crate) fn adopt(id: ObjectId) -> ObjectRef<T> {
        ObjectRef {
            id,
            _marker: PhantomData,
        }
    }

    /// Takes a new reference to `id` in this process and wraps it.
    pub(crate) fn new_held(id: ObjectId) -> ObjectRef<T> {
        crate::context::hold(&id);
        ObjectRef {
            id,
            _marker: PhantomData,
        }
    }
}

impl<T: ?Sized> Clone for ObjectRef<T> {
    fn clone(&self) -> Self {
        ObjectRef::new_held(self.id)
    }
}

impl<T: ?Sized> Drop for ObjectRef<T> {
    fn drop(&mut self) {
        crate::context::release(&self.id);
    }
}

impl<T: ?Sized> fmt::Debug for ObjectRef<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectRef<{}>({})", type_name::<T>(), self.id)
    }
}

impl<T: ?Sized> PartialEq for ObjectRef<T> {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl<T: ?Sized> Eq for ObjectRef<T> {}

impl<T: ?Sized> PartialOrd for ObjectRef<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T: ?Sized> Ord for ObjectRef<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.id.cmp(&other.id)
    }
}

impl<T: ?Sized> Hash for ObjectRef<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

/// The archived form of an [`ObjectRef<T>`]: the object's 20 id bytes. Any 20 bytes are valid.
#[repr(transparent)]
pub struct ArchivedObjectRef<T: ?Sized> {
    id: [u8; ID_LEN],
    _marker: PhantomData<fn() -> Box<T>>,
}

impl<T: ?Sized> ArchivedObjectRef<T> {
    /// The referenced object's id.
    pub fn id(&self) -> ObjectId {
        ObjectId(self.id)
    }

    /// A new [`ObjectRef`] to the referenced object, taking its own reference in this process.
    pub fn to_ref(&self) -> ObjectRef<T> {
        ObjectRef::new_held(self.id())
    }
}

impl<T: ?Sized> fmt::Debug for ArchivedObjectRef<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ArchivedObjectRef<{}>({})", type_name::<T>(), self.id())
    }
}

impl<T: ?Sized> PartialEq for ArchivedObjectRef<T> {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl<T: ?Sized> Eq for ArchivedObjectRef<T> {}

impl<T: ?Sized> Hash for ArchivedObjectRef<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id().hash(state);
    }
}

impl<T: ?Sized> PartialEq<ObjectRef<T>> for ArchivedObjectRef<T> {
    fn eq(&self, other: &ObjectRef<T>) -> bool {
        self.id() == other.id
    }
}

impl<T: ?Sized> PartialEq<ArchivedObjectRef<T>> for ObjectRef<T> {
    fn eq(&self, other: &ArchivedObjectRef<T>) -> bool {
        self.id == other.id()
    }
}

// SAFETY: `ArchivedObjectRef` is `repr(transparent)` over `[u8; 20]` (its other field is a
// zero-sized, align-1 `PhantomData`), so its layout is the same on every platform, and it has no
// interior mutability.
unsafe impl<T: ?Sized> Portable for ArchivedObjectRef<T> {}

// SAFETY: every bit pattern of `[u8; 20]` is a valid id, and the `PhantomData` has no bytes, so
// any pointer the caller guarantees is aligned and points to 20 readable bytes is a valid
// `ArchivedObjectRef`: there is nothing to check.
unsafe impl<T: ?Sized, C: Fallible + ?Sized> CheckBytes<C> for ArchivedObjectRef<T> {
    unsafe fn check_bytes(_value: *const Self, _context: &mut C) -> Result<(), C::Error> {
        Ok(())
    }
}

impl<T: ?Sized> Archive for ObjectRef<T> {
    type Archived = ArchivedObjectRef<T>;
    type Resolver = ();

    fn resolve(&self, _resolver: (), out: Place<Self::Archived>) {
        munge!(let ArchivedObjectRef { id, _marker: _ } = out);
        id.write(self.id.0);
    }
}

impl<T: ?Sized, S: Fallible + ?Sized> Serialize<S> for ObjectRef<T> {
    /// Writes nothing out of line; reports the id to an active
    /// [`collect_refs`](crate::codec::collect_refs).
    fn serialize(&self, _serializer: &mut S) -> Result<(), S::Error> {
        codec::note_ref(self.id);
        Ok(())
    }
}

impl<T: ?Sized, D: Fallible + ?Sized> Deserialize<ObjectRef<T>, D> for ArchivedObjectRef<T> {
    /// A new [`ObjectRef`] that takes its own reference in this process.
    fn deserialize(&self, _deserializer: &mut D) -> Result<ObjectRef<T>, D::Error> {
        Ok(self.to_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Value, access, archived_len, collect_refs, deserialize, serialize_into};
    use crate::error::Error;
    use rkyv::util::AlignedVec;
    use std::collections::{BTreeMap, HashSet};

    fn id(n: u8) -> ObjectId {
        let mut b = [n; ID_LEN];
        b[0] = 0xF0;
        ObjectId(b)
    }

    #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq)]
    #[rkyv(compare(PartialEq))]
    struct Batch {
        name: String,
        parts: Vec<ObjectRef<Vec<f64>>>,
        floats: ObjectRef<[f32]>,
        maybe: Option<ObjectRef<String>>,
        by_key: BTreeMap<u32, ObjectRef<Batch>>,
    }

    fn batch() -> Batch {
        Batch {
            name: "batch".into(),
            parts: (1..=3).map(|n| ObjectRef::adopt(id(n))).collect(),
            floats: ObjectRef::adopt(id(10)),
            maybe: Some(ObjectRef::adopt(id(11))),
            by_key: [(5, ObjectRef::adopt(id(12))), (1, ObjectRef::adopt(id(13)))].into(),
        }
    }

    /// Serialises like a put: counting pass, then the real pass under `collect_refs`.
    fn put<T: Value>(value: &T) -> (AlignedVec<64>, Vec<ObjectId>) {
        let len = archived_len(value).unwrap();
        let mut buf = AlignedVec::<64>::with_capacity(len.max(64));
        buf.resize(len, 0);
        let (written, refs) = collect_refs(|| serialize_into(value, &mut buf).unwrap());
        assert_eq!(written, len);
        let reference = rkyv::to_bytes::<rkyv::rancor::Error>(value).unwrap();
        assert_eq!(&reference[..], &buf[..]);
        (buf, refs)
    }

    #[test]
    fn batch_round_trip_collects_refs_in_order() {
        let b = batch();
        let (bytes, refs) = put(&b);
        assert_eq!(
            refs,
            vec![id(1), id(2), id(3), id(10), id(11), id(13), id(12)]
        );
        let archived = access::<Batch>(id(99), &bytes).unwrap();
        assert!(*archived == b);
        assert_eq!(archived.parts.len(), 3);
        assert_eq!(archived.parts[1].id(), id(2));
        assert_eq!(archived.floats.id(), id(10));
        assert_eq!(archived.floats.to_ref(), b.floats);
        let back: Batch = deserialize(id(99), archived).unwrap();
        assert_eq!(back, b);
        assert_eq!(back.by_key[&5].id(), id(12));
    }

    #[test]
    fn counting_pass_records_nothing() {
        let b = batch();
        let (len, refs) = collect_refs(|| archived_len(&b).unwrap());
        assert!(len > 0);
        assert!(refs.is_empty());
        // Refs serialised inside a nested put go to the inner collection only.
        let mut buf = AlignedVec::<64>::new();
        buf.resize(len, 0);
        let ((), outer) = collect_refs(|| {
            let _ = archived_len(&b).unwrap();
            let (_, inner) = collect_refs(|| serialize_into(&b, &mut buf).unwrap());
            assert_eq!(inner.len(), 7);
            let _ = archived_len(&b).unwrap();
        });
        assert!(outer.is_empty());
        // Any other serialisation (here rkyv's own) is a real pass and reports its refs.
        let (_, direct) = collect_refs(|| rkyv::to_bytes::<rkyv::rancor::Error>(&b).unwrap());
        assert_eq!(direct.len(), 7);
    }

    #[test]
    fn root_object_ref_and_vec_of_refs() {
        let r: ObjectRef<[f32]> = ObjectRef::adopt(id(4));
        let (bytes, refs) = put(&r);
        assert_eq!(bytes.len(), ID_LEN);
        assert_eq!(refs, vec![id(4)]);
        assert_eq!(&bytes[..], id(4).as_bytes());
        let archived = access::<ObjectRef<[f32]>>(id(0), &bytes).unwrap();
        assert_eq!(archived.id(), id(4));

        let v: Vec<ObjectRef<String>> = (0..100).map(|n| ObjectRef::adopt(id(n))).collect();
        let (bytes, refs) = put(&v);
        assert_eq!(refs, (0..100).map(id).collect::<Vec<_>>());
        let back: Vec<ObjectRef<String>> = deserialize(
            id(0),
            access::<Vec<ObjectRef<String>>>(id(0), &bytes).unwrap(),
        )
        .unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn any_id_bytes_are_valid_but_the_rest_is_checked() {
        let mut buf = AlignedVec::<64>::new();
        buf.extend_from_slice(&[0xFF; ID_LEN]);
        let archived = access::<ObjectRef<Vec<u8>>>(id(0), &buf).unwrap();
        assert_eq!(archived.id(), ObjectId([0xFF; ID_LEN]));
        assert!(matches!(
            access::<ObjectRef<Vec<u8>>>(id(0), &buf[..ID_LEN - 1]),
            Err(Error::Invalid { .. })
        ));
        // Garbage as a Batch: errors, never panics.
        for fill in [0u8, 0x11, 0xFF] {
            for len in [0, 8, 64, 200] {
                let mut g = AlignedVec::<64>::new();
                g.resize(len, fill);
                assert!(access::<Batch>(id(0), &g).is_err());
            }
        }
    }

    #[test]
    fn identity_traits() {
        fn assert_auto<X: Send + Sync + Unpin>() {}
        assert_auto::<ObjectRef<[f32]>>();
        assert_auto::<ObjectRef<std::cell::Cell<u8>>>();
        assert_auto::<ObjectRef<*const u8>>();
        assert_auto::<ArchivedObjectRef<[f32]>>();
        fn assert_shared<X: Send + Sync>() {}
        assert_shared::<ArchivedBatch>(); // rkyv's archived strings are !Unpin

        let a: ObjectRef<Vec<f64>> = ObjectRef::adopt(id(1));
        let b = a.clone();
        assert_eq!(a, b);
        assert_eq!(a.id(), b.id());
        assert_ne!(a, ObjectRef::new_held(id(2)));
        let set: HashSet<_> = [a.clone(), b, ObjectRef::adopt(id(2))].into();
        assert_eq!(set.len(), 2);
        let dbg = format!("{a:?}");
        assert_eq!(dbg, format!("ObjectRef<alloc::vec::Vec<f64>>({})", id(1)));
        assert!(dbg.contains(&id(1).to_string()));
        let s: ObjectRef<str> = ObjectRef::adopt(id(3));
        assert_eq!(format!("{s:?}"), format!("ObjectRef<str>({})", id(3)));
    }
}
