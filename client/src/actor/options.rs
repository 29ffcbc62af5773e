//! [`ActorOptions`]: how an actor lives (Ray's actor options).

use crate::error::{Error, Result};

/// How an actor lives and what happens when its process dies: Ray's `Actor.options(...)`.
/// Pass it to [`Runtime::actor_options`](crate::Runtime::actor_options).
///
/// By default an actor is anonymous, owned by the process that started it (it dies with
/// it), stopped once no handle to it is left in any process (after its queued calls), never
/// restarted, and its calls run at most once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActorOptions {
    pub(crate) name: Option<String>,
    pub(crate) detached: bool,
    pub(crate) max_restarts: i32,
    pub(crate) max_task_retries: i32,
}

impl ActorOptions {
    /// The defaults (see above).
    pub fn new() -> ActorOptions {
        ActorOptions::default()
    }

    /// Registers the actor under `name` in this tree's namespace, where
    /// [`Runtime::get_actor`](crate::Runtime::get_actor) finds it from any process. The name
    /// is taken while the actor lives (`AlreadyExists` meanwhile) and free again after.
    pub fn name(mut self, name: impl Into<String>) -> ActorOptions {
        self.name = Some(name.into());
        self
    }

    /// Ray's `lifetime="detached"`: the actor outlives the process that started it and is not
    /// stopped when its handles are gone; it lives until killed or the store stops. Needs a
    /// name (else nothing could reach it once its handles are gone).
    pub fn detached(mut self, yes: bool) -> ActorOptions {
        self.detached = yes;
        self
    }

    /// How many times the actor's process is started again (its constructor run again) after
    /// it dies: 0 never (the default), -1 without limit. Calls queued meanwhile wait for the
    /// new process; once restarts are used up, calls fail with `ActorDied`. A
    /// [`Runtime::kill`](crate::Runtime::kill) is never followed by a restart.
    pub fn max_restarts(mut self, n: i32) -> ActorOptions {
        self.max_restarts = n;
        self
    }

    /// How many times a call that was running (or taken from the queue) when the actor's
    /// process died is run again on the restarted actor: 0 (the default) fails it with
    /// `ActorDied` (at most once); above 0 it may run more than once (at least once); -1
    /// without limit. Only with restarts.
    pub fn max_task_retries(mut self, n: i32) -> ActorOptions {
        self.max_task_retries = n;
        self
    }

    /// Refuses options that cannot go together.
    pub(crate) fn check(&self) -> Result<()> {
        if self.detached && self.name.is_none() {
            return Err(Error::Options(
                "a detached actor needs a name (ActorOptions::name)".into(),
            ));
        }
        if self.max_restarts < -1 || self.max_task_retries < -1 {
            return Err(Error::Options(
                "max_restarts and max_task_retries are counts, or -1 for no limit".into(),
            ));
        }
        Ok(())
    }

    /// `max_task_retries` as the zygote counts it.
    pub(crate) fn retries(&self) -> u32 {
        match self.max_task_retries {
            -1 => u32::MAX,
            n => n.max(0) as u32,
        }
    }
}
