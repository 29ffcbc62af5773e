//! [`Obj`]: a pinned, zero-copy view of a stored value, and [`Stored`]: what can be viewed.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;

use trove_store::{ObjectId, ObjectView};

use crate::codec::{self, Plain, Value};
use crate::error::{Error, Result};
use crate::local::Local;

/// A type an object can hold, and how its bytes are viewed in place.
///
/// Implemented for every rkyv [`Value`] (viewed as its `Archived` form, validated with
/// bytecheck) and for slices of [`Plain`] data (`[f64]`, `[u8]`, ...; viewed as the slice).
pub trait Stored {
    /// What an [`Obj`] of this type derefs to.
    type Target: ?Sized;
    /// Checks `bytes` (an object's exact bytes) and returns the view.
    fn view(id: ObjectId, bytes: &[u8]) -> Result<&Self::Target>;
    /// Returns the view without checking.
    ///
    /// # Safety
    /// `bytes` is a valid encoding of `Self` as written by trove (see
    /// [`codec::access_unchecked`]), and suitably aligned.
    unsafe fn view_unchecked(bytes: &[u8]) -> &Self::Target;
}

impl<T: Value> Stored for T {
    type Target = T::Archived;
    fn view(id: ObjectId, bytes: &[u8]) -> Result<&T::Archived> {
        codec::access::<T>(id, bytes)
    }
    unsafe fn view_unchecked(bytes: &[u8]) -> &T::Archived {
        // SAFETY: forwarded from the caller.
        unsafe { codec::access_unchecked::<T>(bytes) }
    }
}

impl<T: Plain> Stored for [T] {
    type Target = [T];
    fn view(id: ObjectId, bytes: &[u8]) -> Result<&[T]> {
        codec::cast_slice::<T>(id, bytes)
    }
    unsafe fn view_unchecked(bytes: &[u8]) -> &[T] {
        // Plain data has no invalid bit patterns: the checked cast is as fast and always sound
        // for aligned input; misaligned input is a broken caller contract, so panic loudly.
        codec::cast_slice::<T>(ObjectId::default(), bytes).expect("aligned plain data")
    }
}

/// What an [`Obj`] reads: a store object pinned in place, or a local value (a call's small
/// result in this process's memory, see [`crate::local`]). A store view holds one reference
/// to the object, as an `ObjectRef` does (the pin keeps its bytes in place); a local view
/// holds the value's bytes themselves, and no count: nothing else of the value can go away.
#[derive(Clone)]
pub(crate) enum View {
    Store(ObjectView),
    Local(LocalView),
}

/// A view of a local value: its id and its bytes (kept by the `Arc` even if the value is
/// promoted to the store, or its last ref dropped, meanwhile).
#[derive(Clone)]
pub(crate) struct LocalView {
    pub(crate) id: ObjectId,
    pub(crate) value: Arc<Local>,
}

impl View {
    #[inline]
    fn id(&self) -> ObjectId {
        match self {
            View::Store(v) => v.id(),
            View::Local(l) => l.id,
        }
    }

    #[inline]
    fn bytes(&self) -> &[u8] {
        match self {
            View::Store(v) => v.as_slice(),
            View::Local(l) => l.value.bytes(),
        }
    }

    #[inline]
    fn is_error(&self) -> bool {
        match self {
            View::Store(v) => v.is_error(),
            View::Local(l) => l.value.is_error(),
        }
    }
}

/// A zero-copy view of a stored `T`: derefs to `T::Archived` (or to `[T]` for plain slices).
/// The object is pinned in memory while this lives; it reads the shared pages in place (a
/// call's small result, which came back inline, is read in this process's memory).
pub struct Obj<T: Stored + ?Sized> {
    view: View,
    target: *const T::Target,
    _marker: PhantomData<fn() -> Box<T>>,
}

// SAFETY: an Obj is a shared reference to immutable, pinned shared memory; sending it is like
// sending `&T::Target`, which needs `T::Target: Sync`.
unsafe impl<T: Stored + ?Sized> Send for Obj<T> where T::Target: Sync {}
// SAFETY: as above.
unsafe impl<T: Stored + ?Sized> Sync for Obj<T> where T::Target: Sync {}

impl<T: Stored + ?Sized> Obj<T> {
    /// Validates the view's bytes as a `T`.
    pub(crate) fn new(view: View) -> Result<Obj<T>> {
        check_failure(&view)?;
        let target: *const T::Target = T::view(view.id(), view.bytes())?;
        Ok(Obj {
            view,
            target,
            _marker: PhantomData,
        })
    }

    /// # Safety
    /// See [`Stored::view_unchecked`].
    pub(crate) unsafe fn new_unchecked(view: View) -> Result<Obj<T>> {
        check_failure(&view)?;
        // SAFETY: forwarded from the caller.
        let target: *const T::Target = unsafe { T::view_unchecked(view.bytes()) };
        Ok(Obj {
            view,
            target,
            _marker: PhantomData,
        })
    }

    /// The object's id.
    pub fn id(&self) -> ObjectId {
        self.view.id()
    }

    /// The object's raw bytes.
    pub fn bytes(&self) -> &[u8] {
        self.view.bytes()
    }
}

/// A call's result that reports a failure instead of a value.
fn check_failure(view: &View) -> Result<()> {
    check_failure_bytes(view.bytes(), view.is_error())
}

/// [`check_failure`] of a value's `bytes`; `error`: they are a failure report.
fn check_failure_bytes(bytes: &[u8], error: bool) -> Result<()> {
    if !error {
        return Ok(());
    }
    let (kind, msg) = trove_executor::message::decode_failure(bytes);
    Err(match kind {
        trove_executor::message::Failure::ActorDied => Error::ActorDied(msg),
        trove_executor::message::Failure::TaskFailed => Error::TaskFailed(msg),
        trove_executor::message::Failure::Cancelled => Error::Cancelled,
    })
}

/// Validates and deserialises a `T` from a copy of a local value's `bytes` (16-byte aligned),
/// as [`Obj::new`] and [`Obj::deserialize`] do from a view; `error`: they are a failure report.
pub(crate) fn deserialize_copy<T: Value>(id: ObjectId, bytes: &[u8], error: bool) -> Result<T> {
    check_failure_bytes(bytes, error)?;
    codec::deserialize::<T>(id, T::view(id, bytes)?)
}

impl<T: Value> Obj<T> {
    /// An owned copy of the value. `ObjectRef`s inside take their own references.
    pub fn deserialize(&self) -> Result<T> {
        codec::deserialize::<T>(self.id(), self)
    }
}

impl<T: Stored + ?Sized> Deref for Obj<T> {
    type Target = T::Target;
    fn deref(&self) -> &T::Target {
        // SAFETY: `target` points into the view's bytes, which stay mapped, sealed and pinned
        // (a local value's: immutable, in the `Arc` the view keeps) for as long as `self.view`
        // lives; it was produced by `Stored::view` from them.
        unsafe { &*self.target }
    }
}

impl<T: Stored + ?Sized> Clone for Obj<T> {
    fn clone(&self) -> Self {
        Obj {
            view: self.view.clone(),
            target: self.target,
            _marker: PhantomData,
        }
    }
}

impl<T: Stored + ?Sized> fmt::Debug for Obj<T>
where
    T::Target: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}
