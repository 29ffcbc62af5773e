//! Actors and tasks across processes: the seed exercises, failures, ordering, and that no
//! process outlives the driver.

use std::time::Duration;

use crate::harness::register;
use crate::role::{ExecRole, Role};
use crate::util::{Helper, wait_until};

const T: Duration = Duration::from_secs(120);

pub fn run(role: ExecRole) -> String {
    run_driver(Role::Exec { role })
}

/// Runs a driver role that prints `OK ...` and exits; then checks that every process of its
/// tree (its session) is gone. Returns the `OK` line.
pub fn run_driver(role: Role) -> String {
    let mut h = Helper::start(role);
    let line = h.expect_line("OK", T);
    assert!(h.wait(T).success());
    let sid = h.pid().as_raw();
    wait_until(
        Duration::from_secs(10),
        "every process of the tree to exit",
        || session_members(sid).is_empty(),
    );
    line
}

/// Processes (not zombies) whose session id is `sid`.
pub fn session_members(sid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after "comm)": state ppid pgrp session ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 3 && f[0] != "Z" && f[3] == sid.to_string() {
            out.push(pid);
        }
    }
    out
}

pub fn executor_seed_actors_in_parallel() {
    run(ExecRole::SeedActors);
}
register!(executor_seed_actors_in_parallel);

pub fn executor_seed_logging_actor_shared_by_three_tasks() {
    run(ExecRole::SeedLogging);
}
register!(executor_seed_logging_actor_shared_by_three_tasks);

pub fn executor_large_object_summed_by_an_actor() {
    run(ExecRole::Large);
}
register!(executor_large_object_summed_by_an_actor);

pub fn executor_panics_and_errors_fail_the_call_and_the_actor_lives() {
    run(ExecRole::Failures);
}
register!(executor_panics_and_errors_fail_the_call_and_the_actor_lives);

pub fn executor_killed_actor_fails_pending_and_later_calls() {
    run(ExecRole::Kill);
}
register!(executor_killed_actor_fails_pending_and_later_calls);

pub fn executor_handle_passed_through_two_tasks() {
    run(ExecRole::TwoHops);
}
register!(executor_handle_passed_through_two_tasks);

pub fn executor_small_results_inline_escape_and_survive_record_reuse() {
    run(ExecRole::Inline);
}
register!(executor_small_results_inline_escape_and_survive_record_reuse);

pub fn executor_actor_killed_owing_results_fails_them_all() {
    let line = run(ExecRole::DieOwing);
    eprintln!("exec-die-owing: {line}");
}
register!(executor_actor_killed_owing_results_fails_them_all);

pub fn executor_ten_thousand_calls_run_in_order() {
    run(ExecRole::Order { n: 10000 });
}
register!(executor_ten_thousand_calls_run_in_order);

pub fn executor_driver_exit_leaves_no_process() {
    for how in ["exit", "kill"] {
        let mut h = Helper::start(Role::Exec {
            role: ExecRole::Exit {
                leave: how == "exit",
            },
        });
        h.expect_line("RUNNING", T);
        let sid = h.pid().as_raw();
        let members = session_members(sid);
        assert!(
            members.len() >= 7,
            "driver, store, zygote, 2 workers, 2 actors: {members:?}"
        );
        if how == "kill" {
            h.kill9();
        } else {
            h.wait(T);
        }
        wait_until(
            Duration::from_secs(10),
            "every process of the tree to exit",
            || session_members(sid).is_empty(),
        );
    }
}
register!(executor_driver_exit_leaves_no_process);
