//! `trove`: the driver CLI. `demo`, `bench` and `stress` run on an embedded store (forked by
//! `trove::init`); `status`, `put` and `get` talk to a running `troved`.
//!
//! - `cli`: the arguments and the dispatch to the subcommands;
//! - `demo`: the stories of DESIGN.md, the same code as the examples (`examples/stories/`);
//! - `user_paths` (the file of `cargo bench --bench user_paths`): the figures as users meet
//!   them, each group in a fresh process of this binary with the default config;
//! - `bench`: the best cases beside them (warm, pre-faulted);
//! - `ray_bench`: `bench --ray`, the lines of Ray's `ray microbenchmark` under Ray's names;
//! - `status`: `status`, `put` and `get` against a running store;
//! - `stress`: the mixed workload under seeded kills.
//!
//! Everything a subcommand prints to stdout goes through a `Write` whose errors it returns:
//! a closed stdout (`trove status --objects | head -1`) ends the CLI quietly with status 0
//! ([`cli::is_broken_pipe`]). An error prints as one line, `trove: ` and the error with its
//! causes, exit status 1 (never anyhow's report with a backtrace).

mod bench;
mod cli;
mod demo;
mod ray_bench;
mod status;
#[path = "../../examples/stories/mod.rs"]
mod stories;
mod stress;
#[path = "../../benches/user_paths.rs"]
mod user_paths;

use std::process::ExitCode;

fn main() -> ExitCode {
    // `trove bench` re-executes this binary once per figure group: measure it and exit.
    user_paths::run_group_if_asked();
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if cli::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trove: {e:#}");
            ExitCode::FAILURE
        }
    }
}
