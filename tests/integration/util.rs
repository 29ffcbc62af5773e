//! Shared test helpers: a daemon per test in a private temp directory, helper processes, and
//! bounded waits.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use trove_store::{StoreClient, StoreError};

use crate::role::{ROLE_ENV, Role};

/// A `troved` started for one test; stopped (SIGTERM, then SIGKILL) and cleaned up on drop.
pub struct TestStore {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl TestStore {
    pub fn start(memory: &str) -> TestStore {
        Self::start_with(memory, &[])
    }

    pub fn start_with(memory: &str, extra: &[&str]) -> TestStore {
        Self::start_with_env(memory, extra, &[])
    }

    /// A `troved` with extra arguments and environment (the daemon's test knobs).
    pub fn start_with_env(memory: &str, extra: &[&str], envs: &[(&str, &str)]) -> TestStore {
        let dir = tempfile::Builder::new()
            .prefix("trove-test-")
            .tempdir()
            .expect("tempdir");
        let socket = dir.path().join("sock").join("troved.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_troved"))
            .arg("--socket")
            .arg(&socket)
            .arg("--memory")
            .arg(memory)
            .args(extra)
            .envs(envs.iter().copied())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn troved");
        let store = TestStore {
            child: Some(child),
            dir,
            socket,
        };
        wait_until(Duration::from_secs(20), "troved to listen", || {
            StoreClient::connect(&store.socket).is_ok()
        });
        store
    }

    pub fn client(&self) -> StoreClient {
        StoreClient::connect(&self.socket).expect("connect")
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    /// Stops the daemon with SIGTERM and returns its exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        wait_child(&mut child, Duration::from_secs(10))
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let _ = wait_child_opt(&mut c, Duration::from_secs(5));
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `cond` every few milliseconds until it holds; panics after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_child_opt(c: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for a child with a bound; kills it and panics if it does not exit in time.
pub fn wait_child(c: &mut Child, limit: Duration) -> ExitStatus {
    match wait_child_opt(c, limit) {
        Some(s) => s,
        None => {
            let _ = c.kill();
            let _ = c.wait();
            panic!("child {} did not exit within {limit:?}", c.id());
        }
    }
}

/// Waits for a child that leads its own process group (`process_group(0)`) with a bound;
/// past it, SIGKILLs the whole group (a `trove` CLI's store, zygote, actors, workers) and
/// returns `None`.
pub fn wait_group(c: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let status = wait_child_opt(c, limit);
    if status.is_none() {
        let _ = kill(Pid::from_raw(-(c.id() as i32)), Signal::SIGKILL);
        let _ = c.wait();
    }
    status
}

/// A helper process: this test binary re-executed in a role. Killed on drop.
pub struct Helper {
    pub child: Child,
    lines: Receiver<String>,
}

impl Helper {
    /// Starts this test binary in `role`: the one place a helper process is started.
    pub fn start(role: Role) -> Helper {
        let line = role.encode();
        // The helper reads back exactly this role.
        assert_eq!(Role::decode(&line).as_ref(), Ok(&role), "{line}");
        let mut child = Command::new(std::env::current_exe().expect("current_exe"))
            .env(ROLE_ENV, line)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn helper");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Helper { child, lines }
    }

    /// The lines printed so far and not yet read (does not wait).
    pub fn take_lines(&mut self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// Waits for a line that starts with `prefix` (helpers print `READY ...` lines). Panics if
    /// the helper exits first or `limit` passes.
    pub fn expect_line(&mut self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(line) if line.starts_with("ERROR") => panic!("helper failed: {line}"),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    panic!("helper did not print {prefix:?} within {limit:?}")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("helper exited before printing {prefix:?}")
                }
            }
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn kill9(&mut self) {
        let _ = kill(self.pid(), Signal::SIGKILL);
        let _ = wait_child(&mut self.child, Duration::from_secs(10));
    }

    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        wait_child(&mut self.child, limit)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Waits (bounded) until every thread of process `pid` is asleep (state `S` or `D` in
/// /proc), twice in a row 20 ms apart: a reader that printed it is about to wait is then
/// really parked in its wait, not still on its way there.
pub fn wait_until_blocked(pid: Pid, limit: Duration) {
    let asleep = || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        let mut any = false;
        for t in tasks.flatten() {
            let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
                return false;
            };
            let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start());
            if !state.is_some_and(|r| r.starts_with('S') || r.starts_with('D')) {
                return false;
            }
            any = true;
        }
        any
    };
    wait_until(limit, "the process to block", || {
        asleep() && {
            std::thread::sleep(Duration::from_millis(20));
            asleep()
        }
    });
}

/// Runs the helper role encoded in the environment ([`ROLE_ENV`]), then exits the process.
/// Called first thing in `main`, so the role runs before any thread exists. The one dispatch
/// of a role to its body, in its area's file.
pub fn run_helper_if_asked() {
    use crate::{
        client_init, client_lifetimes, client_roles, executor_lifetime_roles, executor_roles,
        fault_kills, load_clients, roles, security_access, store_fuzz, store_isolation,
    };
    let Ok(line) = std::env::var(ROLE_ENV) else {
        return;
    };
    let role = match Role::decode(&line) {
        Ok(role) => role,
        Err(e) => {
            println!("ERROR bad role {line:?}: {e}");
            std::process::exit(1);
        }
    };
    let result = match role {
        Role::Store { socket, role } => roles::helper_role(role, &socket),
        Role::PinStop {
            socket,
            mode,
            id,
            len,
            seed,
            n,
            go,
        } => store_isolation::pin_stop_role(&socket, mode, id, len, seed, n, &go),
        Role::FuzzHostile { socket } => store_fuzz::hostile_role(&socket),
        Role::Trove { socket, role } => client_roles::helper_role(role, &socket),
        Role::TroveEmbedded { hold } => client_roles::embedded(hold),
        Role::Lifetimes { scenario } => client_lifetimes::helper_role(scenario),
        Role::Reinit => client_init::reinit_role(),
        Role::DefaultStore => client_init::default_store_role(),
        Role::HugePages => client_init::huge_pages_role(),
        Role::Exec { role } => executor_roles::helper_role(role),
        Role::Life { role } => executor_lifetime_roles::helper_role(role),
        Role::SecOtherUid { socket } => security_access::other_uid_role(&socket),
        Role::SecStall { socket, n } => security_access::stall_role(&socket, n),
        Role::HugetlbLimited { socket, cgroup } => {
            crate::store_lifecycle::hugetlb_limited_role(&socket, &cgroup)
        }
        Role::LoadClient {
            socket,
            seed,
            millis,
        } => load_clients::load_role(&socket, seed, millis),
        Role::FaultDriver { socket } => fault_kills::driver_role(&socket),
    };
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            println!("ERROR {e}");
            1
        }
    };
    std::process::exit(code);
}

/// A raw connection to the daemon at `socket` (bounded reads and writes), its welcome read
/// and discarded: for sending hand-made frames.
pub fn raw_connection(socket: &std::path::Path) -> std::os::unix::net::UnixStream {
    use std::io::Read;
    let s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut len = [0u8; 4];
    (&s).read_exact(&mut len).unwrap();
    let mut body = vec![0; u32::from_le_bytes(len) as usize];
    (&s).read_exact(&mut body).unwrap();
    s
}

/// Prints a line for the parent and flushes it.
/// `Ok` if `cond`, else an error saying `what` (a role's checks).
pub fn check(cond: bool, what: &str) -> Result<(), Box<dyn std::error::Error>> {
    if cond {
        Ok(())
    } else {
        Err(what.to_string().into())
    }
}

pub fn say(line: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

/// Deterministic bytes for object `n`.
/// A child process that is killed and reaped however the test ends (a failed assertion too).
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The kind of pages a huge-page test must get (`TROVE_TEST_EXPECT_PAGES`: `HugeTlb`,
/// `Transparent`, or `Refused` for a refusal; set by `.ci/run` where it set up the machine for
/// that), or `None` to accept whatever the machine gives (huge pages, or a refusal that says
/// how to get them).
pub fn expected_pages() -> Option<String> {
    std::env::var("TROVE_TEST_EXPECT_PAGES")
        .ok()
        .filter(|v| !v.is_empty())
}

/// A hugetlb cgroup whose limit is 0 (`TROVE_TEST_HUGETLB_LIMITED`, set by `.ci/run` where it
/// could make one): a client in it must still create objects in a store on pool pages.
pub fn hugetlb_limited_cgroup() -> Option<std::path::PathBuf> {
    std::env::var_os("TROVE_TEST_HUGETLB_LIMITED")
        .filter(|v| !v.is_empty())
        .map(Into::into)
}

/// Whether a refusal of huge pages is what the test expects (see [`expected_pages`]).
pub fn refusal_expected() -> bool {
    expected_pages().is_none_or(|want| want == "Refused")
}

pub fn pattern(n: u64, len: usize) -> Vec<u8> {
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn is_timeout(e: &StoreError) -> bool {
    matches!(e, StoreError::Timeout(_))
}

/// Waits (bounded) until the store is back at `base` (objects and used bytes) while the
/// program's processes all run (a check after they exit proves nothing: disconnect frees
/// everything); the error lists what is left, small objects with their bytes.
pub fn store_back_to(
    rt: &trove::Runtime,
    base: &trove_store::Stats,
    what: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let st = rt.stats()?;
        if st.objects == base.objects && st.used == base.used {
            return Ok(());
        }
        if Instant::now() > until {
            let list: Vec<String> = rt
                .store()
                .list()?
                .iter()
                .take(20)
                .map(|o| {
                    // Small ones (results, failure reports) with their bytes.
                    let bytes = match rt.store().get(o.id, Duration::from_millis(10)) {
                        Ok(v) if v.len() <= 256 => format!(" {:?}", String::from_utf8_lossy(&v)),
                        _ => String::new(),
                    };
                    format!("{} ({} bytes, {} pins){bytes}", o.id, o.size, o.pins)
                })
                .collect();
            return Err(format!(
                "{what}: store at {} objects / {} bytes, baseline {} / {}: {}",
                st.objects,
                st.used,
                base.objects,
                base.used,
                list.join(", ")
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
