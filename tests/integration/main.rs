//! Integration tests across real processes: the daemon binary, and helper processes that are
//! this test binary re-executed in a role. One binary, shared helpers.
//!
//! The harness is our own (libtest-mimic, same command line as libtest) so that a helper role
//! runs on the main thread before any other thread exists: `trove::init` forks, and refuses to
//! in a process that has threads.

mod cli_commands;
mod client_lifetimes;
mod client_objects;
mod client_roles;
mod executor_actor_types;
mod executor_actors;
mod executor_lost_calls;
mod executor_roles;
mod fault_kills;
mod load_clients;
mod roles;
mod security_access;
mod util;

mod store_errors;
mod store_faults;
mod store_fuzz;
mod store_isolation;
mod store_lifecycle;
mod store_verbs;

use std::process::ExitCode;

use libtest_mimic::{Arguments, Failed, Trial};

/// `module::function` paths of the tests, registered under those names.
macro_rules! trials {
    ($($module:ident :: $test:ident),* $(,)?) => {
        vec![$(
            Trial::test(concat!(stringify!($module), "::", stringify!($test)), || {
                std::panic::catch_unwind($module::$test).map_err(|p| {
                    Failed::from(
                        p.downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "panicked".into()),
                    )
                })
            })
        ),*]
    };
}

fn main() -> ExitCode {
    // A helper process runs its role and exits here, single-threaded.
    util::run_helper_if_asked();
    let args = Arguments::from_args();
    let tests = trials![
        store_errors::store_double_seal_unknown_ids_and_duplicates,
        store_errors::store_other_clients_object_cannot_be_sealed_or_aborted,
        store_errors::store_oversize_create_is_store_full_at_once,
        store_faults::store_client_killed_while_pinning_releases_its_pins,
        store_faults::store_client_killed_while_creating_is_aborted,
        store_faults::store_daemon_killed_gives_disconnected_not_a_hang,
        store_faults::store_sigterm_removes_the_socket_and_a_second_daemon_is_refused,
        store_faults::store_socket_directory_is_private,
        store_fuzz::store_random_and_truncated_frames_leave_the_daemon_serving,
        store_fuzz::store_stateful_protocol_fuzz,
        store_isolation::store_cut_off_client_keeps_its_pins_and_index_while_alive,
        store_isolation::store_client_stopped_past_the_write_timeout_keeps_its_pins,
        store_isolation::store_a_client_that_does_not_read_replies_stalls_nobody,
        store_isolation::store_rejected_small_put_is_an_error,
        store_isolation::store_holds_and_watches_of_absent_ids_are_bounded,
        store_isolation::store_owned_objects_are_deleted_by_their_owner_only,
        store_lifecycle::store_lru_eviction_order,
        store_lifecycle::store_full_when_everything_is_pinned,
        store_lifecycle::store_delete_is_deferred_while_pinned,
        store_lifecycle::store_last_unpin_frees_a_deferred_delete,
        store_verbs::store_small_puts_from_many_threads_all_land,
        store_verbs::store_verbs_across_processes,
        store_verbs::store_get_blocks_until_another_process_seals,
        store_verbs::store_get_timeout_and_poll,
        store_verbs::store_get_many_returns_what_is_ready,
        store_verbs::store_subscribe_sees_seals_and_deletes,
        store_verbs::store_evict_verb_and_zero_size_and_abort,
        client_lifetimes::client_call_arguments_are_freed_while_running,
        client_lifetimes::client_refs_inside_arguments_are_freed_while_running,
        client_lifetimes::client_dropped_and_unread_results_free_their_arguments,
        client_lifetimes::client_pending_results_as_arguments_are_freed,
        client_lifetimes::client_nested_calls_and_handles_in_tasks_free_everything,
        client_objects::client_init_refuses_a_threaded_process,
        client_objects::client_get_waits_for_an_object_sealed_later,
        client_objects::client_timeouts_and_wait,
        client_objects::client_wrong_type_is_invalid,
        client_objects::client_ten_thousand_objects_passed_and_dropped_free_everything,
        client_objects::client_creator_killed_while_a_reader_waits_is_lost,
        client_objects::client_daemon_killed_gives_disconnected,
        client_objects::client_embedded_store_is_cleaned_up,
        executor_actors::executor_seed_actors_in_parallel,
        executor_actors::executor_seed_logging_actor_shared_by_three_tasks,
        executor_actors::executor_large_object_summed_by_an_actor,
        executor_actors::executor_panics_and_errors_fail_the_call_and_the_actor_lives,
        executor_actors::executor_killed_actor_fails_pending_and_later_calls,
        executor_actors::executor_actor_killed_owing_results_fails_them_all,
        executor_actors::executor_handle_passed_through_two_tasks,
        executor_actors::executor_ten_thousand_calls_run_in_order,
        executor_actors::executor_small_results_inline_escape_and_survive_record_reuse,
        executor_actors::executor_driver_exit_leaves_no_process,
        executor_lost_calls::executor_consumer_killed_after_taking_a_call_fails_it,
        executor_lost_calls::executor_consumer_killed_holding_a_queue_slot_frees_it,
        executor_actor_types::executor_wrong_actor_type_is_a_typed_error,
        executor_actor_types::executor_named_actors_are_scoped_by_namespace_and_program,
        cli_commands::cli_put_get_status,
        cli_commands::cli_stress_runs_kills_and_prints_its_table,
        security_access::security_another_uid_cannot_connect,
        security_access::security_arena_has_no_name,
        security_access::security_a_client_that_stops_reading_cannot_stall_others,
        load_clients::load_many_clients_put_get_and_call_with_every_value_checked,
        fault_kills::fault_sigkill_actors_workers_clients_then_the_daemon,
    ];
    let tests = tests.into_iter().map(security_access::needs_root).collect();
    libtest_mimic::run(&args, tests).exit_code()
}
