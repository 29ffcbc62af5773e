//! A runtime in every trove process, and actors that live and die as Ray users expect:
//! started from tasks and actors, stopped once their last handle is gone, detached, restarted,
//! retried, cancelled; tasks that wait for tasks deeper than the pool. Each test is a driver
//! process (`LifeRole`, executor_lifetime_roles.rs) that checks what it saw, the store back at
//! its baseline while its processes run included; the test then checks every process of its
//! tree is gone.

use crate::executor_actors::run_driver;
use crate::harness::register;
use crate::role::{LifeRole, Role};

fn run(role: LifeRole) -> String {
    run_driver(Role::Life { role })
}

/// Tasks put, spawn and wait; a task starts an actor and hands it to the driver; an actor
/// starts a named actor that a task finds.
pub fn executor_tasks_and_actors_have_the_drivers_runtime() {
    run(LifeRole::Everywhere);
}
register!(executor_tasks_and_actors_have_the_drivers_runtime);

/// An actor is stopped within 1 s of its last handle going (in another process), after its
/// queued calls; a handle inside a stored object keeps it.
pub fn executor_actor_stops_when_its_last_handle_is_dropped() {
    let line = run(LifeRole::LastHandle);
    eprintln!("life last-handle: {line}");
}
register!(executor_actor_stops_when_its_last_handle_is_dropped);

/// A detached named actor outlives its creator and its handles; an owned one dies with its
/// owner, and its name is free again.
pub fn executor_detached_actor_outlives_its_creator() {
    run(LifeRole::Detached);
}
register!(executor_detached_actor_outlives_its_creator);

/// `max_restarts = 2`: two SIGKILLs, and it answers; the third, `ActorDied`.
/// `max_task_retries` and `task_max_retries` run a call in flight again.
pub fn executor_actors_restart_and_calls_retry() {
    run(LifeRole::Restarts);
}
register!(executor_actors_restart_and_calls_retry);

/// Cancel of a queued call and task (never run, `Cancelled`), forced cancel of a running task
/// (its worker replaced), and of a finished one (nothing).
pub fn executor_cancel_before_start_and_forced_while_running() {
    let line = run(LifeRole::Cancel);
    eprintln!("life cancel: {line}");
}
register!(executor_cancel_before_start_and_forced_while_running);

/// A threaded actor (`max_concurrency` 8): eight `&self` calls of 100 ms each finish in well
/// under 800 ms; `&mut self` calls run alone, none lost; it stops as a whole.
pub fn executor_threaded_actor_runs_calls_at_once() {
    let line = run(LifeRole::Threaded);
    eprintln!("life threaded: {line}");
}
register!(executor_threaded_actor_runs_calls_at_once);

/// A full store says what is trove's (mailboxes, queues) and what is the user's, by pid; a
/// call whose result does not fit fails (its caller does not wait for good), and the actor
/// answers once there is room.
pub fn executor_store_full_tells_mailboxes_from_objects_and_pinners() {
    let line = run(LifeRole::Full);
    eprintln!("life full: {line}");
}
register!(executor_store_full_tells_mailboxes_from_objects_and_pinners);

/// A thousand actors alive at once, each answering, then all gone once their handles drop.
pub fn executor_many_actors_live_at_once_then_go() {
    let line = run(LifeRole::Many { n: 1000 });
    eprintln!("life many: {line}");
}
register!(alone: executor_many_actors_live_at_once_then_go);

/// Tasks that spawn two tasks and get both, deeper than the pool has workers: a waiting
/// task lends its worker's CPU, so they finish.
pub fn executor_recursive_tasks_deeper_than_the_pool_finish() {
    let line = run(LifeRole::Recursive { depth: 10, cpus: 2 });
    eprintln!("life recursive: {line}");
}
register!(alone: executor_recursive_tasks_deeper_than_the_pool_finish);
