//! The arguments (clap) and the dispatch to the subcommands.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use trove::Config;
use trove_store::StoreClient;

use crate::{bench, demo, ray_bench, status, stress, user_paths};

/// trove: a zero-copy shared-memory object store and actor executor.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// A running troved's socket (default for status/put/get: $TROVE_STORE, then the default
    /// socket path). demo and bench start an embedded store unless this is given.
    #[arg(long, global = true, env = "TROVE_STORE")]
    store: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the three stories of DESIGN.md and shows what happens as it happens.
    Demo,
    /// Measures the figures of the README: as users meet them (a fresh process each, the
    /// default config; each beside its goal), then the best cases; a table (or JSON lines).
    Bench {
        /// A shorter run (fewer repetitions).
        #[arg(long)]
        quick: bool,
        /// One JSON object per line: {"name": ..., "value": ..., "unit": ...}.
        #[arg(long)]
        json: bool,
        /// Ray's `ray microbenchmark` lines instead, under Ray's names, beside Ray's figures
        /// from a 2-core VM (n/a where trove cannot express a line).
        #[arg(long)]
        ray: bool,
        /// Only the best cases (to compare with an earlier `trove bench`, which had only those).
        #[arg(long, conflicts_with = "ray")]
        best_cases: bool,
    },
    /// A mixed workload under seeded SIGKILLs of actors, workers and client processes; every
    /// value checked, every wait bounded, the store's live leak measured after each round.
    /// Exits non-zero on any hang, wrong value or leak.
    Stress {
        /// How long to run (whole rounds; at least one).
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// The seed of the kill schedule and the workload (default: from the clock; printed).
        #[arg(long)]
        seed: Option<u64>,
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// Size of the embedded store.
        #[arg(long, default_value = "1GiB", value_parser = trove_store::size::parse_size)]
        memory: u64,
        /// Task workers.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Only these operations (comma-separated): put, put_slice, add, sum, bundle, make,
        /// echo, relay_add, relay_sum, task_make, task_sum, task_call. Default: all.
        #[arg(long, value_parser = stress::Op::parse_list)]
        ops: Option<std::vec::Vec<stress::Op>>,
        /// What to SIGKILL: actors,workers,clients (any subset) or none.
        #[arg(long, default_value = "actors,workers,clients", value_parser = stress::KillKind::parse_list)]
        kill: std::vec::Vec<stress::KillKind>,
        /// Only large values (256 KiB-1 MiB) in the driver's workload.
        #[arg(long)]
        large: bool,
    },
    /// A client process of `stress` (started by it).
    #[command(hide = true)]
    StressClient {
        #[arg(long)]
        seed: u64,
    },
    /// A running store's capacity, used and pinned bytes, objects and clients.
    Status {
        /// List the objects too (id, size, state, pins, age).
        #[arg(long)]
        objects: bool,
    },
    /// Stores a file as an object in a running store; prints its id.
    Put { file: PathBuf },
    /// Writes an object of a running store to stdout or a file.
    Get {
        id: String,
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

/// Parses the arguments and runs the subcommand.
pub fn run() -> anyhow::Result<()> {
    // No thread may exist before trove::init (it forks): parse, then init, then log.
    let args = Args::parse();
    let mut out = std::io::stdout().lock();
    match args.command {
        Command::Demo => {
            // Four workers, so that the three logging tasks run at once on any machine.
            let rt = init(args.store, 1 << 30, 4, true)?;
            logging();
            demo::run(&rt, &mut out)
        }
        Command::Bench {
            quick,
            json,
            ray,
            best_cases,
        } => {
            let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
            if !ray && !best_cases {
                // First the figures as users meet them: each group in a fresh process of this
                // binary with the default config (no thread of ours exists yet: the groups'
                // watchdogs are joined before `init` below).
                if !json {
                    writeln!(
                        out,
                        "As users meet it (a fresh process each, Config::default()):"
                    )?;
                }
                user_paths::run(quick, json, &mut out)?;
                if !json {
                    writeln!(
                        out,
                        "\nBest cases (warm, pre-faulted store, page tables filled):"
                    )?;
                }
            }
            // Ray's lines meet the store as a user's default config starts it (not pre-faulted).
            let rt = init(args.store, 5 << 29, cpus, !ray)?;
            logging();
            if ray {
                ray_bench::run(&rt, quick, json, &mut out)
            } else {
                bench::run(&rt, quick, json, &mut out)
            }
        }
        Command::Stress {
            seconds,
            seed,
            json,
            memory,
            workers,
            ops,
            kill,
            large,
        } => {
            let workers = workers.max(1);
            let rt = init(args.store, memory, workers, true)?;
            logging();
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
            let opts = stress::Options {
                seconds,
                seed,
                json,
                workers,
                ops: ops.unwrap_or_else(|| stress::Op::ALL.iter().map(|(_, op)| *op).collect()),
                kill,
                large,
            };
            if !stress::run(&rt, &opts, &mut out)? {
                bail!("stress (seed {seed}) saw hangs, wrong values or leaks");
            }
            Ok(())
        }
        Command::StressClient { seed } => {
            let socket = args
                .store
                .context("stress-client needs --store (the driver's socket)")?;
            stress::client_main(socket, seed)
        }
        Command::Status { objects } => status::status(&connect(args.store)?, objects, &mut out),
        Command::Put { file } => status::put(&connect(args.store)?, &file, &mut out),
        Command::Get { id, output } => {
            status::get(&connect(args.store)?, &id, output.as_deref(), &mut out)
        }
    }
}

/// Whether `e` is (caused by) a write to a closed pipe: the reader of stdout went away, which
/// ends the CLI quietly. Rust ignores SIGPIPE, so such a write is an `EPIPE` error; we do not
/// restore SIGPIPE's default instead, because `trove::init` forks the embedded store and the
/// workers from this process and they would inherit it: a write to a peer that went away must
/// be an error there, not the death of the store.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

fn init(
    store: Option<PathBuf>,
    memory: u64,
    cpus: usize,
    prefault: bool,
) -> anyhow::Result<trove::Runtime> {
    let mut cfg = Config::default()
        .memory(memory)
        .prefault(prefault)
        .num_cpus(cpus);
    if let Some(s) = store {
        cfg = cfg.store(s);
    }
    Ok(trove::init(cfg)?)
}

fn connect(store: Option<PathBuf>) -> anyhow::Result<StoreClient> {
    let socket = store.unwrap_or_else(trove_store::default_socket_path);
    StoreClient::connect(&socket).with_context(|| {
        format!(
            "no store at {} (start one with `troved`, or pass --store)",
            socket.display()
        )
    })
}
