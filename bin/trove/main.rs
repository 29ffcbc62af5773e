//! `trove`: the driver CLI. `demo`, `bench` and `stress` run on an embedded store (forked by
//! `trove::init`); `status`, `put` and `get` talk to a running `troved`.
//!
//! - `cli`: the arguments and the dispatch to the subcommands;
//! - `demo`: the stories of DESIGN.md, the same code as the examples (`examples/stories/`);
//! - `bench`: the README's figures;
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

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if cli::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trove: {e:#}");
            ExitCode::FAILURE
        }
    }
}
