//! [`Outcome`]: what a method or task may return, and how it becomes the call's result.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Display;
use std::hash::Hash;

use crate::codec::Value;
use crate::object_ref::ObjectRef;

/// A method's or task's return type: either a value (stored as the call's result) or a
/// `Result<T, E>` whose `Err` fails the call with `Error::TaskFailed` carrying `E`'s message.
///
/// Implemented for the std types rkyv supports and for `Result`. For your own result type, add
/// `trove::outcome!(MyType);` (it must be an rkyv value).
pub trait Outcome {
    /// What the result object holds.
    type Value: Value;
    /// The value, or the failure's message.
    fn into_outcome(self) -> Result<Self::Value, String>;
}

impl<T: Value, E: Display> Outcome for Result<T, E> {
    type Value = T;
    fn into_outcome(self) -> Result<T, String> {
        self.map_err(|e| e.to_string())
    }
}

/// Declares types whose values are returned as they are (see [`Outcome`]).
#[macro_export]
macro_rules! outcome {
    ($($t:ty),* $(,)?) => {
        $(impl $crate::Outcome for $t {
            type Value = $t;
            fn into_outcome(self) -> ::std::result::Result<$t, ::std::string::String> {
                Ok(self)
            }
        })*
    };
}

outcome!(
    (),
    bool,
    char,
    u8,
    u16,
    u32,
    u64,
    u128,
    usize,
    i8,
    i16,
    i32,
    i64,
    i128,
    isize,
    f32,
    f64,
    String
);

macro_rules! generic_outcome {
    ($(<$($g:ident),*> $t:ty where [$($b:tt)*]);* $(;)?) => {
        $(impl<$($g),*> Outcome for $t where $t: Value, $($b)* {
            type Value = $t;
            fn into_outcome(self) -> Result<$t, String> {
                Ok(self)
            }
        })*
    };
}

generic_outcome!(
    <T> Vec<T> where [T: Value];
    <T> Option<T> where [T: Value];
    <T> Box<T> where [T: Value];
    <K, V> BTreeMap<K, V> where [K: Value + Ord, V: Value];
    <K, V> HashMap<K, V> where [K: Value + Hash + Eq, V: Value];
    <T> BTreeSet<T> where [T: Value + Ord];
    <T> HashSet<T> where [T: Value + Hash + Eq];
    <A, B> (A, B) where [A: Value, B: Value];
    <A, B, C> (A, B, C) where [A: Value, B: Value, C: Value];
    <A, B, C, D> (A, B, C, D) where [A: Value, B: Value, C: Value, D: Value];
    <T> ObjectRef<T> where [T: ?Sized + 'static];
);
