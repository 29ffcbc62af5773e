//! [`ActorHandle`]: the caller's typed handle to an actor, and its rkyv form (the mailbox id
//! and the token id).
//!
//! A handle holds two references: to the actor's mailbox (so it can call it), and to the
//! actor's *token*, an object nothing else refers to (but the zygote, for a detached actor),
//! so that the token exists exactly while a handle exists in some process: in memory, inside
//! a stored value, or in a call's arguments. The zygote stops the actor once the token is
//! gone (see `trove_executor::zygote`).

use std::any::type_name;
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};

use rkyv::bytecheck::CheckBytes;
use rkyv::munge::munge;
use rkyv::rancor::{Fallible, Source};
use rkyv::{Archive, Deserialize, Place, Portable, Serialize};
use trove_executor::mailbox::Mailbox;
use trove_executor::message::Failure;
use trove_store::ObjectId;

use super::callee;
use super::caller;
use super::traits::Method;
use crate::codec::Value;
use crate::context::{self, Attached, Shared};
use crate::error::{Error, Result};
use crate::object_ref::ObjectRef;
use crate::outcome::Outcome;

/// A handle to an actor of type `A`: cheap to clone, can be sent inside arguments (rkyv) to
/// tasks and other actors.
pub struct ActorHandle<A> {
    inner: Arc<HandleInner>,
    _marker: PhantomData<fn() -> A>,
}

struct HandleInner {
    mailbox: ObjectRef<[u8]>,
    token: ObjectRef<[u8]>,
    attached: OnceLock<std::result::Result<Attached, AttachError>>,
}

/// Why a handle cannot reach its actor (kept with the handle, so it is asked once).
#[derive(Clone)]
enum AttachError {
    Died(String),
    WrongType,
    Foreign,
}

/// The fingerprint of actor type `A` that its mailbox carries: a hash of its `TypeId` (with
/// std's fixed-key `DefaultHasher::new`), never 0 (the task queue's). A `TypeId` tells every
/// type of one program apart (a type name need not) and is the same in every process of it;
/// across programs it means nothing, which is why the mailbox's program identity is checked
/// first ([`trove_executor::process::program_id`]).
pub(crate) fn type_tag<A: 'static>() -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::any::TypeId::of::<A>().hash(&mut h);
    h.finish().max(1)
}

impl<A> Clone for ActorHandle<A> {
    fn clone(&self) -> Self {
        ActorHandle {
            inner: self.inner.clone(),
            _marker: PhantomData,
        }
    }
}

impl<A> fmt::Debug for ActorHandle<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ActorHandle<{}>(mailbox {})",
            type_name::<A>(),
            self.inner.mailbox.id()
        )
    }
}

impl<A: 'static> ActorHandle<A> {
    pub(crate) fn new(mailbox: ObjectRef<[u8]>, token: ObjectRef<[u8]>) -> ActorHandle<A> {
        ActorHandle {
            inner: Arc::new(HandleInner {
                mailbox,
                token,
                attached: OnceLock::new(),
            }),
            _marker: PhantomData,
        }
    }

    /// The id of the process serving the actor now (a restarted actor runs in a new one);
    /// 0 if the actor cannot be reached from here.
    pub fn pid(&self) -> i32 {
        context::shared()
            .ok()
            .and_then(|sh| self.mailbox(&sh).ok().and_then(|m| m.consumer_pid()))
            .unwrap_or(0)
    }

    /// The id of the actor's mailbox object (names the actor).
    pub fn id(&self) -> ObjectId {
        self.inner.mailbox.id()
    }

    /// The actor's mailbox, once checked to be of this program and of type `A`.
    pub(crate) fn mailbox(&self, sh: &Shared) -> Result<&Mailbox> {
        let id = self.inner.mailbox.id();
        let attached = self.inner.attached.get_or_init(|| {
            let a =
                context::attach(&sh.client, id).map_err(|e| AttachError::Died(e.to_string()))?;
            if a.mailbox.program() != trove_executor::process::program_id() {
                Err(AttachError::Foreign)
            } else if a.mailbox.type_tag() != type_tag::<A>() {
                Err(AttachError::WrongType)
            } else {
                Ok(a)
            }
        });
        match attached {
            Ok(a) => Ok(&a.mailbox),
            Err(AttachError::Died(e)) => Err(Error::ActorDied(e.clone())),
            Err(AttachError::WrongType) => Err(Error::WrongActorType {
                id,
                expected: type_name::<A>(),
            }),
            Err(AttachError::Foreign) => Err(Error::ForeignActor(id)),
        }
    }

    /// Calls `method` with `args` (a tuple): returns the result's ref at once. Calls from one
    /// caller run in order, one at a time (on a threaded actor, up to its `max_concurrency`
    /// at once: see [`Runtime::threaded_actor`](crate::Runtime::threaded_actor)).
    pub fn call<M, Args, K>(
        &self,
        method: M,
        args: Args,
    ) -> Result<ObjectRef<<M::Output as Outcome>::Value>>
    where
        M: Method<A, Args, K>,
        Args: Value,
        K: 'static,
    {
        let _ = method;
        let sh = context::shared()?;
        let func = callee::method_address::<A, M, Args, K>();
        let mailbox = self.mailbox(&sh)?;
        let keepalive: Arc<dyn Send + Sync> = self.inner.clone();
        caller::send_call(
            &sh,
            mailbox,
            Some(keepalive),
            func,
            &args,
            Failure::ActorDied,
        )
    }

    /// Whether the actor's process is known to be dead (or cannot be reached from here).
    pub fn is_dead(&self) -> bool {
        context::shared()
            .ok()
            .and_then(|sh| self.mailbox(&sh).ok().map(|m| m.is_dead()))
            .unwrap_or(true)
    }
}

/// The archived form of an [`ActorHandle`]: the mailbox id and the token id.
#[derive(Debug)]
#[repr(C)]
pub struct ArchivedActorHandle<A> {
    mailbox: [u8; 20],
    token: [u8; 20],
    _marker: PhantomData<fn() -> A>,
}

// SAFETY: repr(C) over byte arrays (align 1, no padding) and a zero-sized PhantomData: the
// layout is the same everywhere and there is no interior mutability.
unsafe impl<A> Portable for ArchivedActorHandle<A> {}

// SAFETY: every bit pattern of the two byte arrays is valid (ids are checked when used), so
// there is nothing to check.
unsafe impl<A, C: Fallible + ?Sized> CheckBytes<C> for ArchivedActorHandle<A> {
    unsafe fn check_bytes(
        _value: *const Self,
        _context: &mut C,
    ) -> std::result::Result<(), C::Error> {
        Ok(())
    }
}

impl<A> Archive for ActorHandle<A> {
    type Archived = ArchivedActorHandle<A>;
    type Resolver = ();
    fn resolve(&self, _resolver: (), out: Place<Self::Archived>) {
        munge!(let ArchivedActorHandle { mailbox, token, _marker: _ } = out);
        mailbox.write(self.inner.mailbox.id().0);
        token.write(self.inner.token.id().0);
    }
}

impl<A, S: Fallible + ?Sized> Serialize<S> for ActorHandle<A> {
    fn serialize(&self, _s: &mut S) -> std::result::Result<(), S::Error> {
        // The mailbox and the token are kept alive by the object (or the call) this handle
        // is serialised into, so the handle counts while it travels.
        crate::codec::note_ref(self.inner.mailbox.id());
        crate::codec::note_ref(self.inner.token.id());
        Ok(())
    }
}

impl<A: 'static, D: Fallible + ?Sized> Deserialize<ActorHandle<A>, D> for ArchivedActorHandle<A>
where
    D::Error: Source,
{
    fn deserialize(&self, _d: &mut D) -> std::result::Result<ActorHandle<A>, D::Error> {
        Ok(ActorHandle::new(
            ObjectRef::from_id(ObjectId(self.mailbox)),
            ObjectRef::from_id(ObjectId(self.token)),
        ))
    }
}
