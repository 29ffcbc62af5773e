//! Actor handles and names are typed and scoped: a handle or name of an actor of another
//! type gives `WrongActorType`, an actor of another program `ForeignActor` (never a call run
//! on the wrong state or at a meaningless address), and named actors are found only within
//! their driver's namespace.

use std::time::Duration;

use crate::executor_actors::run;
use crate::harness::register;
use crate::role::{ExecRole, Role};
use crate::util::{Helper, TestStore};

const T: Duration = Duration::from_secs(60);

pub fn executor_wrong_actor_type_is_a_typed_error() {
    run(ExecRole::ActorTypes);
}
register!(executor_wrong_actor_type_is_a_typed_error);

/// Two drivers (processes) on one troved: the second does not see the first's names by
/// default, and, as another program (its identity replaced through the test-only hook),
/// naming the first's namespace gives `ForeignActor`.
pub fn executor_named_actors_are_scoped_by_namespace_and_program() {
    let store = TestStore::start("256MiB");
    let done = store.dir.path().join("done");
    let mut owner = Helper::start(Role::Exec {
        role: ExecRole::NsOwner {
            socket: store.socket.clone(),
            done: done.clone(),
        },
    });
    let line = owner.expect_line("READY", T);
    let namespace = line
        .split_whitespace()
        .nth(1)
        .expect("a namespace")
        .to_string();
    let mut other = Helper::start(Role::Exec {
        role: ExecRole::NsOtherProgram {
            socket: store.socket.clone(),
            namespace,
        },
    });
    other.expect_line("OK", T);
    assert!(other.wait(T).success());
    std::fs::write(&done, b"").expect("done file");
    owner.expect_line("OK", T);
    assert!(owner.wait(T).success());
}
register!(executor_named_actors_are_scoped_by_namespace_and_program);
