//! Lifetimes under live use: objects passed to calls and tasks, refs inside arguments, results
//! dropped before they are ready, fire-and-forget calls, actors calling actors. Every scenario
//! checks the store back at its baseline (used bytes and objects) *while every process of the
//! program still runs*: a check after exit would prove nothing, since a disconnect frees all
//! that a process held.

use std::thread::sleep;
use std::time::Duration;

use trove::{ActorHandle, Config, ObjectRef};

use crate::harness::register;
use crate::role::{Role, Scenario};
use crate::util::{Helper, check, say, store_back_to};

type Res = Result<(), Box<dyn std::error::Error>>;

const T: Duration = Duration::from_secs(30);
/// 8 MiB of `f64`.
const CHUNK: usize = 1 << 20;

fn run(scenario: Scenario) {
    let mut h = Helper::start(Role::Lifetimes {
        scenario: scenario.clone(),
    });
    let line = h.expect_line("OK", Duration::from_secs(120));
    assert!(line.starts_with("OK"), "{scenario:?}: {line}");
    assert!(h.wait(T).success(), "{scenario:?}: driver failed");
}

/// The loop: 1,000 calls, each with a fresh 8 MiB object as its argument, every ref
/// dropped each iteration. The store never holds more than a few chunks.
pub fn client_call_arguments_are_freed_while_running() {
    run(Scenario::ArgsLoop);
}
register!(client_call_arguments_are_freed_while_running);

/// Refs inside arguments (a `Vec<ObjectRef>` and a tuple of refs), to actors and tasks.
pub fn client_refs_inside_arguments_are_freed_while_running() {
    run(Scenario::RefsInside);
}
register!(client_refs_inside_arguments_are_freed_while_running);

/// Results dropped before they are ready, and calls whose results nobody ever reads.
pub fn client_dropped_and_unread_results_free_their_arguments() {
    run(Scenario::DroppedResults);
}
register!(client_dropped_and_unread_results_free_their_arguments);

/// A call's pending result passed as another call's argument, then everything dropped.
pub fn client_pending_results_as_arguments_are_freed() {
    run(Scenario::Chained);
}
register!(client_pending_results_as_arguments_are_freed);

/// Actors calling actors and handles passed to tasks, with objects as arguments all along.
pub fn client_nested_calls_and_handles_in_tasks_free_everything() {
    run(Scenario::Nested);
}
register!(client_nested_calls_and_handles_in_tasks_free_everything);

#[derive(Default)]
pub struct Summer {
    calls: u64,
}

impl Summer {
    fn sum(&mut self, v: ObjectRef<[f64]>) -> trove::Result<f64> {
        self.calls += 1;
        Ok(v.get()?.iter().sum())
    }
    fn sum_all(&mut self, vs: Vec<ObjectRef<[f64]>>) -> trove::Result<f64> {
        let mut s = 0.0;
        for v in &vs {
            s += v.get()?.iter().sum::<f64>();
        }
        Ok(s)
    }
    fn sum_pair(&mut self, a: ObjectRef<u64>, b: (u64, ObjectRef<u64>)) -> trove::Result<u64> {
        Ok(a.get()?.to_native() + b.0 + b.1.get()?.to_native())
    }
    fn slow_sum(&mut self, ms: u64, v: ObjectRef<[f64]>) -> trove::Result<f64> {
        self.calls += 1;
        sleep(Duration::from_millis(ms));
        Ok(v.get()?.iter().sum())
    }
    /// Hands its argument back inside its result: the result object then holds the ref.
    fn echo(&mut self, v: ObjectRef<[f64]>) -> ObjectRef<[f64]> {
        v
    }
    fn twice(&mut self, x: u64) -> u64 {
        2 * x
    }
    fn read(&mut self, r: ObjectRef<u64>) -> trove::Result<u64> {
        Ok(r.get()?.to_native())
    }
    /// Calls another actor with the object it was given: the actors' own calls keep and
    /// release arguments too.
    fn forward(&mut self, to: ActorHandle<Summer>, v: ObjectRef<[f64]>) -> trove::Result<f64> {
        to.call(Summer::sum, (v,))?.get_timeout(T)?.deserialize()
    }
    fn count(&mut self) -> u64 {
        self.calls
    }
}

fn sum_task(v: ObjectRef<[f64]>) -> trove::Result<f64> {
    Ok(v.get()?.iter().sum())
}

fn sum_refs_task(vs: Vec<ObjectRef<u64>>) -> trove::Result<u64> {
    vs.iter().map(|r| Ok(r.get()?.to_native())).sum()
}

fn task_calls_actor(h: ActorHandle<Summer>, v: ObjectRef<[f64]>) -> trove::Result<f64> {
    h.call(Summer::sum, (v,))?.get_timeout(T)?.deserialize()
}

/// Bytes of at most `n` chunks above the baseline, with room for small objects.
fn at_most_chunks(rt: &trove::Runtime, base: &trove_store::Stats, n: u64, what: &str) -> Res {
    let st = rt.stats()?;
    let limit = base.used + n * (CHUNK as u64 * 8) + (1 << 20);
    check(
        st.used <= limit,
        &format!(
            "{what}: {} bytes used in {} objects, more than {n} chunks above the baseline {}",
            st.used, st.objects, base.used
        ),
    )
}

pub fn helper_role(scenario: Scenario) -> Res {
    let _ = nix::unistd::setsid();
    let rt = trove::init(Config::default().memory(512 << 20).num_cpus(2))?;
    let a = rt.actor(Summer::default)?;
    let b = rt.actor(Summer::default)?;
    // Warm up: both actors answer, the pool runs a task.
    a.call(Summer::twice, (1,))?.get_timeout(T)?;
    b.call(Summer::twice, (1,))?.get_timeout(T)?;
    rt.spawn(sum_refs_task, (Vec::new(),))?.get_timeout(T)?;
    let base = rt.stats()?;
    match scenario {
        Scenario::ArgsLoop => {
            let ones = vec![1.0f64; CHUNK];
            for i in 0..1000u64 {
                let chunk = rt.put_slice(&ones)?;
                let s = a
                    .call(Summer::sum, (chunk,))?
                    .get_timeout(T)?
                    .deserialize()?;
                check(s == CHUNK as f64, &format!("iteration {i}: sum {s}"))?;
                if i % 50 == 49 {
                    at_most_chunks(&rt, &base, 4, &format!("after {} iterations", i + 1))?;
                }
            }
            check(
                a.call(Summer::count, ())?.get_timeout(T)?.deserialize()? == 1000,
                "the actor ran 1,000 sums",
            )?;
            store_back_to(&rt, &base, "after 1,000 calls")?;
            // The same through the pool.
            for i in 0..100u64 {
                let chunk = rt.put_slice(&ones)?;
                let s = rt
                    .spawn(sum_task, (chunk,))?
                    .get_timeout(T)?
                    .deserialize()?;
                check(s == CHUNK as f64, &format!("task {i}: sum {s}"))?;
                if i % 20 == 19 {
                    at_most_chunks(&rt, &base, 4, &format!("after {} tasks", i + 1))?;
                }
            }
            store_back_to(&rt, &base, "after 100 tasks")?;
        }
        Scenario::RefsInside => {
            let ones = vec![1.0f64; 1024];
            for i in 0..200u64 {
                let vs: Vec<_> = (0..4)
                    .map(|_| rt.put_slice(&ones))
                    .collect::<Result<_, _>>()?;
                let s = a
                    .call(Summer::sum_all, (vs,))?
                    .get_timeout(T)?
                    .deserialize()?;
                check(s == 4096.0, &format!("call {i}: sum {s}"))?;
                let x = rt.put(&i)?;
                let y = rt.put(&(i + 1))?;
                let s = b
                    .call(Summer::sum_pair, (x, (7, y)))?
                    .get_timeout(T)?
                    .deserialize()?;
                check(s == 2 * i + 8, &format!("pair {i}: {s}"))?;
                let refs: Vec<_> = (0..5).map(|k| rt.put(&k)).collect::<Result<_, _>>()?;
                let s = rt
                    .spawn(sum_refs_task, (refs,))?
                    .get_timeout(T)?
                    .deserialize()?;
                check(s == 10, &format!("task {i}: {s}"))?;
            }
            store_back_to(&rt, &base, "after refs inside arguments")?;
            // An argument handed back inside the result: the caller's own reference is gone
            // when the call has run, the result object's one must take over in time.
            for i in 0..2000u64 {
                let v = rt.put_slice(&ones[..(i % 64 + 1) as usize])?;
                let back = a.call(Summer::echo, (v,))?.get_timeout(T)?.deserialize()?;
                let got = back.get_timeout(T)?;
                check(got.len() == (i % 64 + 1) as usize, &format!("echo {i}"))?;
            }
            store_back_to(&rt, &base, "after arguments returned in results")?;
            // Arguments too large for a mailbox slot travel as an object of their own.
            let many: Vec<_> = (0..100u64).map(|k| rt.put(&k)).collect::<Result<_, _>>()?;
            let s = rt
                .spawn(sum_refs_task, (many,))?
                .get_timeout(T)?
                .deserialize()?;
            check(s == 4950, &format!("100 refs: {s}"))?;
            store_back_to(&rt, &base, "after an argument object")?;
        }
        Scenario::DroppedResults => {
            let ones = vec![1.0f64; 1024];
            // Dropped while the call still runs.
            for _ in 0..20 {
                let v = rt.put_slice(&ones)?;
                drop(a.call(Summer::slow_sum, (5, v))?);
            }
            // Never read, not even waited for: fire and forget.
            for _ in 0..300 {
                let v = rt.put_slice(&ones)?;
                drop(b.call(Summer::sum, (v,))?);
                let v = rt.put_slice(&ones)?;
                drop(rt.spawn(sum_task, (v,))?);
            }
            // Held, then dropped unread after they are done.
            let mut held = Vec::new();
            for _ in 0..300 {
                let v = rt.put_slice(&ones)?;
                held.push(a.call(Summer::sum, (v,))?);
            }
            check(
                a.call(Summer::count, ())?.get_timeout(T)?.deserialize()? == 320,
                "every call ran",
            )?;
            drop(held);
            // Every call has run once these answer (one caller, in order).
            b.call(Summer::twice, (1,))?.get_timeout(T)?;
            store_back_to(&rt, &base, "after dropped and unread results")?;
        }
        Scenario::Chained => {
            for i in 0..200u64 {
                let x = rt.put(&i)?;
                // `b.read` gets `a.read`'s result while it may still be running.
                let first = a.call(Summer::read, (x,))?;
                let second = b.call(Summer::read, (first,))?;
                check(
                    second.get_timeout(T)?.deserialize()? == i,
                    &format!("chain {i}"),
                )?;
            }
            // And dropped before anything is read.
            for i in 0..200u64 {
                let x = rt.put(&i)?;
                let first = a.call(Summer::read, (x,))?;
                drop(b.call(Summer::read, (first,))?);
            }
            a.call(Summer::twice, (1,))?.get_timeout(T)?;
            b.call(Summer::twice, (1,))?.get_timeout(T)?;
            store_back_to(&rt, &base, "after chained calls")?;
        }
        Scenario::Nested => {
            let ones = vec![1.0f64; 4096];
            for i in 0..100u64 {
                let v = rt.put_slice(&ones)?;
                let s = a
                    .call(Summer::forward, (b.clone(), v))?
                    .get_timeout(T)?
                    .deserialize()?;
                check(s == 4096.0, &format!("forward {i}: {s}"))?;
                let v = rt.put_slice(&ones)?;
                let s = rt
                    .spawn(task_calls_actor, (b.clone(), v))?
                    .get_timeout(T)?
                    .deserialize()?;
                check(s == 4096.0, &format!("task {i}: {s}"))?;
            }
            store_back_to(&rt, &base, "after nested calls")?;
        }
    }
    // The actors are still alive: the check above ran with every process running.
    check(
        a.call(Summer::twice, (21,))?
            .get_timeout(T)?
            .deserialize()?
            == 42,
        "a lives",
    )?;
    check(
        b.call(Summer::twice, (21,))?
            .get_timeout(T)?
            .deserialize()?
            == 42,
        "b lives",
    )?;
    say("OK");
    Ok(())
}
