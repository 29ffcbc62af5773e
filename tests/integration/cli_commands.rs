//! The `trove` CLI: put, get, status against a running store; `stress` on its own.

use std::process::Command;

use crate::harness::register;
use crate::util::TestStore;

fn trove(store: &TestStore, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_trove"))
        .arg("--store")
        .arg(&store.socket)
        .args(args)
        .output()
        .expect("run trove")
}

pub fn cli_put_get_status() {
    let store = TestStore::start("16MiB");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.bin");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    std::fs::write(&input, &data).unwrap();
    let out = trove(&store, &["put", input.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let output = dir.path().join("out.bin");
    let out = trove(&store, &["get", &id, "-o", output.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&output).unwrap(), data);
    let out = trove(&store, &["status", "--objects"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert!(text.contains("objects    1 (1 sealed)"), "{text}");
    assert!(text.contains(&id), "{text}");
    // An unknown id is a clear error, not a panic.
    let out = trove(
        &store,
        &["get", &trove_store::ObjectId::random().to_string()],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}
register!(cli_put_get_status);

/// Live (not zombie) processes of process group `pgid`.
/// Waits (10 s at most) until nothing of process group `pgid` is left, or fails naming what is.
fn assert_group_gone(pgid: i32) {
    let start = std::time::Instant::now();
    while !group_members(pgid).is_empty() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "processes left: {:?}",
            group_members(pgid)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn group_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after "comm)": state ppid pgrp ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 2 && f[0] != "Z" && f[2] == pgid.to_string() {
            out.push(pid);
        }
    }
    out
}

/// `trove stress --seconds 3`: it runs its rounds, kills actors, workers and clients, checks
/// values and prints its table, within a bound, and leaves no process behind.
///
/// Under those kills every call gets its value or a death its kill explains, no get hangs,
/// and the store is back at its baseline after every round with the driver, zygote and
/// workers alive: the table is clean and the exit status 0.
pub fn cli_stress_runs_kills_and_prints_its_table() {
    use std::os::unix::process::CommandExt;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_trove"))
        .args(["stress", "--seconds", "3", "--seed", "20261129"])
        .args(["--memory", "512MiB"])
        .env_remove("TROVE_STORE")
        .env("RUST_BACKTRACE", "0")
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("run trove stress");
    let pgid = child.id() as i32;
    // Past the bound the whole tree (store, zygote, actors, workers, clients) goes.
    let status = crate::util::wait_group(&mut child, Duration::from_secs(120));
    let out = std::fs::read_to_string(&out_path).unwrap();
    let err = std::fs::read_to_string(&err_path).unwrap();
    let status = status.unwrap_or_else(|| panic!("trove stress did not end in 120 s\n{err}"));
    // It ended by itself: not by a signal, and with its table (even when it reports a leak).
    assert!(
        status.code().is_some(),
        "killed by a signal: {status:?}\n{err}"
    );
    let field = |name: &str| -> u64 {
        let line = out
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name:?} line in the table:\n{out}\n{err}"));
        line[name.len()..]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad {name:?} line: {line}"))
    };
    assert!(out.starts_with("trove stress: seed 20261129"), "{out}");
    assert!(field("kills") > 0, "nothing was killed:\n{out}\n{err}");
    assert!(field("calls") > 0, "no calls:\n{out}\n{err}");
    assert!(
        field("objects checked") > 0,
        "nothing checked:\n{out}\n{err}"
    );
    for name in ["hangs", "wrong values", "max live leak", "stray processes"] {
        field(name);
    }
    assert!(err.contains("round    1"), "no progress line:\n{err}");
    // Exit status 0 exactly when the table shows no hang, wrong value, leak or stray process.
    let clean = field("hangs") == 0
        && field("wrong values") == 0
        && field("max live leak") == 0
        && field("stray processes") == 0;
    assert_eq!(status.success(), clean, "exit status {status:?} for\n{out}");
    assert!(
        clean,
        "hangs, wrong values, a live leak or stray processes:\n{out}\n{err}"
    );
    assert_group_gone(pgid);
}
register!(cli_stress_runs_kills_and_prints_its_table);

/// `trove status --objects | head -1`: a reader that closes stdout after one line ends the CLI
/// quietly (exit status 0, nothing on stderr), not with a panic on the broken pipe. The
/// listing is made longer than a pipe's buffer, so `trove` is still writing when it closes.
pub fn cli_closed_stdout_ends_quietly() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let store = TestStore::start("16MiB");
    let c = store.client();
    // About 75 bytes a line: 2,000 objects are ~150 KB, well over a 64 KiB pipe buffer.
    for i in 0..2_000u32 {
        c.put(trove_store::ObjectId::random(), &i.to_le_bytes())
            .unwrap();
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_trove"))
        .arg("--store")
        .arg(&store.socket)
        .args(["status", "--objects"])
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run trove");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // The reader is dropped here: the pipe's read end is closed.
    assert!(first.starts_with("store "), "{first}");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("trove status did not end in 30 s after its reader closed");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "exit status {status:?}, stderr:\n{err}");
    assert!(err.is_empty(), "stderr:\n{err}");
    drop(c);
}
register!(cli_closed_stdout_ends_quietly);

/// An error is one line on stderr, `trove: ` and the error with its causes, exit status 1:
/// no backtrace even with `RUST_BACKTRACE=1`.
pub fn cli_error_is_one_line() {
    let store = TestStore::start("16MiB");
    let err = one_line_error(
        &store.socket,
        &["get", &trove_store::ObjectId::random().to_string()],
    );
    assert!(err.starts_with("trove: "), "{err}");
    assert!(err.contains("not found"), "{err}");
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
    // A missing store: the message and its cause (the socket error) on the one line.
    let dir = tempfile::tempdir().unwrap();
    let err = one_line_error(&dir.path().join("none.sock"), &["status"]);
    assert!(err.starts_with("trove: no store at "), "{err}");
    assert!(err.contains(": "), "{err}");
}
register!(cli_error_is_one_line);

/// Runs `trove --store <socket> <args>` with `RUST_BACKTRACE=1`; checks it exits 1 with one
/// line on stderr, and returns that line.
fn one_line_error(socket: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_trove"))
        .arg("--store")
        .arg(socket)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run trove");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "stderr:\n{err}");
    err
}

/// Ray's `ray microbenchmark` lines (python/ray/_private/ray_perf.py and its Ray Client
/// part), in Ray's order, and whether trove expresses each (`false`: printed as n/a).
const RAY_LINES: &[(&str, bool)] = &[
    ("single client get calls (Plasma Store)", true),
    ("single client put calls (Plasma Store)", true),
    ("multi client put calls (Plasma Store)", true),
    ("single client put gigabytes", true),
    ("single client tasks and get batch", true),
    ("multi client put gigabytes", true),
    ("single client get object containing 10k refs", true),
    (
        "single client object out-of-scope callback registration",
        false,
    ),
    ("object out-of-scope callback fire 1k batch", false),
    ("single client wait 1k refs", true),
    ("single client tasks sync", true),
    ("single client tasks async", true),
    ("multi client tasks async", true),
    ("1:1 actor calls sync", true),
    ("1:1 actor calls async", true),
    ("1:1 actor calls concurrent", true),
    ("1:n actor calls async", true),
    ("n:n actor calls async", true),
    ("n:n actor calls with arg async", true),
    ("1:1 async-actor calls sync", false),
    ("1:1 async-actor calls async", false),
    ("1:1 async-actor calls with args async", false),
    ("1:n async-actor calls async", false),
    ("n:n async-actor calls async", false),
    ("placement group create/removal", false),
    ("client: get calls", false),
    ("client: put calls", false),
    ("client: remote put calls", false),
    ("client: 1:1 actor calls sync", false),
    ("client: 1:1 actor calls async", false),
    ("client: 1:1 actor calls concurrent", false),
];

/// The lines issue 16 gives Ray's figure for: printed with that figure and the ratio.
const RAY_REFERENCED: &[&str] = &[
    "single client get calls (Plasma Store)",
    "single client put calls (Plasma Store)",
    "single client put gigabytes",
    "single client tasks sync",
    "single client tasks async",
    "1:1 actor calls sync",
    "1:1 actor calls async",
    "1:n actor calls async",
    "n:n actor calls async",
];

/// `trove bench --ray --quick`: every line of Ray's microbenchmark is printed under Ray's
/// name, in Ray's order, with Ray's unit: a positive rate and its spread for the lines trove
/// expresses (Ray's figure and the ratio beside those issue 16 gives), "n/a" and a reason for
/// the others; it exits 0 within a bound and leaves no process behind. (Behaviour, not speed.)
pub fn cli_bench_ray_prints_every_ray_line() {
    use std::os::unix::process::CommandExt;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_trove"))
        .args(["bench", "--ray", "--quick"])
        .env_remove("TROVE_STORE")
        .env_remove("TESTS_TO_RUN")
        .env_remove("TESTS_TO_SKIP")
        .env("RUST_BACKTRACE", "0")
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("run trove bench --ray");
    let pgid = child.id() as i32;
    let status = crate::util::wait_group(&mut child, Duration::from_secs(300));
    let out = std::fs::read_to_string(&out_path).unwrap();
    let err = std::fs::read_to_string(&err_path).unwrap();
    let status = status.unwrap_or_else(|| panic!("trove bench --ray did not end in 300 s\n{err}"));
    assert!(status.success(), "exit status {status:?}\n{out}\n{err}");

    let mut at = 0;
    for (name, expressed) in RAY_LINES {
        // Each line once, after the one before it (Ray's order).
        let (i, line) = out
            .lines()
            .enumerate()
            .find(|(_, l)| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with("  "))
            })
            .unwrap_or_else(|| panic!("no {name:?} line:\n{out}"));
        assert!(i > at, "{name:?} out of Ray's order:\n{out}");
        at = i;
        let rest = line[name.len()..].trim_start();
        let (value, rest) = rest.split_once(' ').unwrap();
        let unit = if name.contains("gigabytes") {
            "GB/s"
        } else {
            "per second"
        };
        let note = rest
            .trim_start()
            .strip_prefix(unit)
            .unwrap_or_else(|| panic!("not in {unit:?}: {line}"))
            .trim();
        if *expressed {
            let v: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("no number: {line}"));
            assert!(v.is_finite() && v > 0.0, "{line}");
            assert!(note.starts_with("± "), "no spread: {line}");
            if RAY_REFERENCED.contains(name) {
                // The spread, Ray's figure, then "<ratio> x".
                let ratio = note.strip_suffix(" x").unwrap_or_else(|| panic!("{line}"));
                let ratio: f64 = ratio.rsplit(' ').next().unwrap().parse().unwrap();
                assert!(ratio > 0.0, "{line}");
            } else {
                assert!(!note.ends_with(" x"), "a ratio to no figure: {line}");
            }
        } else {
            assert_eq!(value, "n/a", "{line}");
            assert!(note.len() > 10, "n/a without a reason: {line}");
        }
    }
    assert_group_gone(pgid);
}
register!(cli_bench_ray_prints_every_ray_line);
