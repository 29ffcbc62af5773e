//! Ray's "Exercise 5/8": one logging actor shared by three tasks. The driver reads the logs
//! while the tasks still run; each read shows more lines.

use std::collections::BTreeMap;
use std::io::Write;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::bail;
use trove::ActorHandle;

#[derive(Default)]
pub struct LoggingActor {
    logs: BTreeMap<u32, Vec<String>>,
}

impl LoggingActor {
    pub fn log(&mut self, index: u32, message: String) {
        self.logs.entry(index).or_default().push(message);
    }
    pub fn get_logs(&mut self) -> BTreeMap<u32, Vec<String>> {
        self.logs.clone()
    }
}

/// One task: `iterations` log lines, one a second.
pub fn run_experiment(
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

/// Runs the story (three tasks of `iterations` lines each), writing what the driver reads to
/// `out` every `poll` while the tasks run; returns the number of lines each of those reads
/// saw. Needs three task workers to run the tasks at once.
pub fn run(
    rt: &trove::Runtime,
    iterations: u32,
    poll: Duration,
    out: &mut dyn Write,
) -> anyhow::Result<Vec<usize>> {
    let logger = rt.actor(LoggingActor::default)?;
    let tasks = (0..3)
        .map(|i| rt.spawn(run_experiment, (i, iterations, logger.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    let start = Instant::now();
    let mut seen = Vec::new();
    while !tasks.iter().all(|t| t.is_ready()) {
        sleep(poll);
        let logs = logger.call(LoggingActor::get_logs, ())?.deserialize()?;
        let lines: usize = logs.values().map(Vec::len).sum();
        seen.push(lines);
        let last: Vec<&str> = logs
            .values()
            .filter_map(|v| v.last().map(String::as_str))
            .collect();
        writeln!(
            out,
            "  {:>5.1?}  {lines:>2} lines; latest {last:?}",
            start.elapsed()
        )?;
    }
    for t in &tasks {
        t.deserialize()?;
    }
    let logs = logger.call(LoggingActor::get_logs, ())?.deserialize()?;
    rt.kill(&logger)?;
    let lines: usize = logs.values().map(Vec::len).sum();
    if lines != 3 * iterations as usize {
        bail!("{lines} log lines, expected {}", 3 * iterations);
    }
    writeln!(out, "  done: {lines} lines")?;
    Ok(seen)
}
