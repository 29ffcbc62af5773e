//! A consumer (actor or worker) SIGKILLed at each window where it holds a call that is neither
//! queued nor finished (fail points, see `Kills` in executor_roles.rs): the call fails with
//! `ActorDied` / `TaskFailed` within a bound (a `get` without a timeout ends), later calls and
//! the pool still run, and the store is back at its baseline while everything still runs.

use crate::executor_actors::run;
use crate::harness::register;
use crate::role::ExecRole;

/// Dies after taking the call from the queue, before noting it as current.
pub fn executor_consumer_killed_after_taking_a_call_fails_it() {
    let line = run(ExecRole::LostCall {
        point: "trove::claimed".into(),
    });
    eprintln!("exec-lost-call claimed: {line}");
}
register!(executor_consumer_killed_after_taking_a_call_fails_it);

/// Dies with the call noted but its queue slot not yet freed (a task-queue slot would stay
/// blocked for good).
pub fn executor_consumer_killed_holding_a_queue_slot_frees_it() {
    let line = run(ExecRole::LostCall {
        point: "trove::claim_held".into(),
    });
    eprintln!("exec-lost-call claim_held: {line}");
}
register!(executor_consumer_killed_holding_a_queue_slot_frees_it);

/// Dies with a large result created and written but not sealed: the daemon loses it with its
/// creator, and the caller gets `ActorDied` / `TaskFailed` (it got `ObjectLost`, and a late
/// failure report stayed pinned for it).
pub fn executor_consumer_killed_writing_a_large_result_fails_the_call() {
    let line = run(ExecRole::LostResult);
    eprintln!("exec-lost-result: {line}");
}
register!(executor_consumer_killed_writing_a_large_result_fails_the_call);
