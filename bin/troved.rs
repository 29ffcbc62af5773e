//! `troved`: the trove store daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use trove_store::shm::{DEFAULT_MAX_CLIENTS, MAX_MAX_CLIENTS};
use trove_store::{Daemon, DaemonConfig};

/// The trove object store daemon: one shared-memory arena served over a Unix socket.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Socket path (its directory is created with mode 0700).
    /// Default: $XDG_RUNTIME_DIR/trove/troved.sock or /tmp/trove-$UID/troved.sock.
    #[arg(long, env = "TROVE_STORE")]
    socket: Option<PathBuf>,
    /// Object space, e.g. 512MiB, 4GiB. Default: 30% of the machine's memory, capped by what
    /// /dev/shm has free, at least 64 MiB (committed as objects use it).
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Pre-fault the whole arena at start-up instead of in the background.
    #[arg(long)]
    prefault: bool,
    /// Most live objects (default: one per 8 KiB of memory, 16 Ki to 1 Mi).
    #[arg(long)]
    max_objects: Option<u64>,
    /// Back the arena with huge pages: the huge page pool if it has room (`vm.nr_hugepages`),
    /// else transparent huge pages if shared memory may use them; an error if neither.
    #[arg(long)]
    hugepages: bool,
    /// Most clients connected at once (each process of a trove program is one); one more is
    /// refused with a "too many clients" error. Each costs a ~68 KiB notification ring in
    /// the arena (memory only once used) and a thread in the daemon.
    #[arg(long, default_value_t = DEFAULT_MAX_CLIENTS,
          value_parser = clap::value_parser!(u32).range(1..=MAX_MAX_CLIENTS as i64))]
    max_clients: u32,
}

fn parse_size(s: &str) -> Result<u64, String> {
    trove_store::size::parse_size(s)
}

/// Errors print as one line with their causes (no backtrace), and the status is 1.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("troved: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // Block the stop signals before any thread exists, so that every thread inherits the mask
    // and only the waiting thread below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGHUP);
    signals.thread_block().context("blocking signals")?;
    let cfg = DaemonConfig {
        socket: args.socket.unwrap_or_else(trove_store::default_socket_path),
        memory: args.memory.unwrap_or_else(DaemonConfig::default_memory),
        prefault: args.prefault,
        max_objects: args.max_objects,
        hugepages: args.hugepages,
        max_clients: args.max_clients,
    };
    let daemon = Daemon::bind(&cfg)
        .with_context(|| format!("starting the store at {}", cfg.socket.display()))?;
    let stop = daemon.shutdown_handle();
    std::thread::Builder::new()
        .name("troved-signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                tracing::info!("{sig:?}: shutting down");
            }
            stop.shutdown();
        })?;
    daemon.run()?;
    Ok(())
}
