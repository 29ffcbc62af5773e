//! Ray's "Exercise 5/8": one logging actor shared by three tasks. The driver reads the logs
//! while the tasks still run; each read shows more lines.
//!
//! `cargo run --release --example logging [ITERATIONS]` (default 60, one per second).

use std::collections::BTreeMap;
use std::thread::sleep;
use std::time::Duration;

use trove::ActorHandle;

#[derive(Default)]
struct LoggingActor {
    logs: BTreeMap<u32, Vec<String>>,
}

impl LoggingActor {
    fn log(&mut self, index: u32, message: String) {
        self.logs.entry(index).or_default().push(message);
    }
    fn get_logs(&mut self) -> BTreeMap<u32, Vec<String>> {
        self.logs.clone()
    }
}

fn run_experiment(
    index: u32,
    iterations: u32,
    logger: ActorHandle<LoggingActor>,
) -> trove::Result<()> {
    for i in 0..iterations {
        sleep(Duration::from_secs(1));
        logger.call(LoggingActor::log, (index, format!("On iteration {i}")))?;
    }
    Ok(())
}

fn main() -> trove::Result<()> {
    let rt = trove::init(trove::Config::default().num_cpus(3))?;
    let iterations: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(60);
    let logger = rt.actor(LoggingActor::default)?;
    let experiments = (0..3)
        .map(|i| rt.spawn(run_experiment, (i, iterations, logger.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    let mut last = 0;
    while !experiments.iter().all(|e| e.is_ready()) {
        sleep(Duration::from_millis(1500));
        let logs = logger.call(LoggingActor::get_logs, ())?.deserialize()?;
        let lines: usize = logs.values().map(Vec::len).sum();
        println!(
            "{lines} log lines (+{}): {:?}",
            lines - last,
            logs.values().map(|v| v.last()).collect::<Vec<_>>()
        );
        last = lines;
    }
    for e in &experiments {
        e.deserialize()?;
    }
    let logs = logger.call(LoggingActor::get_logs, ())?.deserialize()?;
    assert_eq!(
        logs.values().map(Vec::len).sum::<usize>(),
        3 * iterations as usize
    );
    println!("done: {} lines", 3 * iterations);
    Ok(())
}
