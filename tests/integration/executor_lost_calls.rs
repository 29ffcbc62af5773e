//! A consumer (actor or worker) SIGKILLed at each window where it holds a call that is neither
//! queued nor finished (fail points, see `Kills` in executor_roles.rs): the call fails with
//! `ActorDied` / `TaskFailed` within a bound (a `get` without a timeout ends), later calls and
//! the pool still run, and the store is back at its baseline while everything still runs.

use crate::executor_actors::run;

/// Dies after taking the call from the queue, before noting it as current.
pub fn executor_consumer_killed_after_taking_a_call_fails_it() {
    let line = run("exec-lost-call", "trove::claimed");
    eprintln!("exec-lost-call claimed: {line}");
}

/// Dies with the call noted but its queue slot not yet freed (a task-queue slot would stay
/// blocked for good).
pub fn executor_consumer_killed_holding_a_queue_slot_frees_it() {
    let line = run("exec-lost-call", "trove::claim_held");
    eprintln!("exec-lost-call claim_held: {line}");
}
