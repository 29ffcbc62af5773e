//! Forked processes: the embedded store daemon (and, with the executor, the zygote).
//!
//! `fork` is only sound here because the caller is single-threaded at that moment (checked by
//! [`thread_count`]): the child starts with a consistent copy of every lock and allocator.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigHandler, SigSet, Signal, kill, signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, getpid, getppid};
use trove_store::{Daemon, DaemonConfig, StoreError};

/// Errors of process management.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// `fork` is refused: the process already has other threads.
    #[error(
        "this process already has {0} threads; call trove::init first thing in main, before \
         any thread exists (forking a multi-threaded process is unsound)"
    )]
    Threaded(usize),
    #[error("the embedded store did not start: {0}")]
    StoreStart(String),
    /// The embedded store was asked for huge pages and the machine offers none for its arena
    /// (what to set is in the message); starting without them works.
    #[error("the embedded store did not start: no huge pages for the arena: {0}")]
    NoHugePages(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<nix::Error> for ProcessError {
    fn from(e: nix::Error) -> Self {
        ProcessError::Io(std::io::Error::from(e))
    }
}

/// How many threads this process has (from `/proc/self/task`).
pub fn thread_count() -> std::io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// Fails unless this process has exactly one thread.
pub fn ensure_single_threaded() -> Result<(), ProcessError> {
    match thread_count()? {
        1 => Ok(()),
        n => Err(ProcessError::Threaded(n)),
    }
}

/// A store daemon running in a child process, in a private temporary directory. Stopped, and
/// its directory removed, by [`EmbeddedStore::stop`] or drop; it also dies with its parent.
#[derive(Debug)]
pub struct EmbeddedStore {
    pid: Option<Pid>,
    dir: PathBuf,
    socket: PathBuf,
}

/// How the embedded store is set up (each as in [`DaemonConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedConfig {
    /// Bytes of object space.
    pub memory: u64,
    /// Pre-fault the whole arena before it serves.
    pub prefault: bool,
    /// Back the arena with huge pages (an error if the machine has none).
    pub hugepages: bool,
}

/// How long the embedded store may take to start or to stop before it is killed.
const START_LIMIT: Duration = Duration::from_secs(30);
const STOP_LIMIT: Duration = Duration::from_secs(5);

impl EmbeddedStore {
    /// Forks a daemon set up as `store` says. The caller must be single-threaded.
    pub fn start(store: EmbeddedConfig) -> Result<EmbeddedStore, ProcessError> {
        ensure_single_threaded()?;
        let dir = tempfile::Builder::new().prefix("trove-").tempdir()?.keep();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let socket = dir.join("store.sock");
        let cfg = DaemonConfig {
            socket: socket.clone(),
            memory: store.memory,
            prefault: store.prefault,
            max_objects: None,
            hugepages: store.hugepages,
            max_clients: trove_store::shm::DEFAULT_MAX_CLIENTS,
        };
        let (rd, wr) = nix::unistd::pipe()?;
        let parent = getpid();
        // SAFETY: this process has one thread (checked above), so the child gets a consistent
        // copy of the heap, locks and stdio; it runs only the daemon and then exits.
        match unsafe { fork() } {
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e.into())
            }
            Ok(ForkResult::Child) => {
                drop(rd);
                let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    daemon_child(&cfg, parent, wr, &dir)
                }))
                .unwrap_or(101);
                // SAFETY: _exit ends the process at once, without running the parent's atexit
                // handlers or flushing stdio buffers copied from it; nothing is left to do.
                unsafe { libc::_exit(code) }
            }
            Ok(ForkResult::Parent { child }) => {
                drop(wr);
                let mut store = EmbeddedStore {
                    pid: Some(child),
                    dir,
                    socket,
                };
                match read_status(rd, START_LIMIT) {
                    Ok(()) => Ok(store),
                    Err(e) => {
                        store.stop();
                        Err(e)
                    }
                }
            }
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> Option<i32> {
        self.pid.map(|p| p.as_raw())
    }

    /// Stops the daemon (SIGTERM, then SIGKILL after a bound), reaps it and removes its
    /// directory. Idempotent.
    pub fn stop(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = kill(pid, Signal::SIGTERM);
            if !reap(pid, STOP_LIMIT) {
                let _ = kill(pid, Signal::SIGKILL);
                reap(pid, STOP_LIMIT);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits for `pid` to exit, at most `limit`. True if it was reaped.
pub(crate) fn reap(pid: Pid, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(_) => return true,
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return true, // not our child any more (already reaped)
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// How the child's start-up status says "no huge pages" (then the detail), so that the
/// parent returns [`ProcessError::NoHugePages`], which a caller can answer by starting
/// without them.
const NO_HUGE_PAGES: &str = "no-huge-pages:";

/// Reads the child's start-up status: "ok" or an error message, bounded by `limit`.
fn read_status(rd: OwnedFd, limit: Duration) -> Result<(), ProcessError> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let deadline = Instant::now() + limit;
    let mut buf = Vec::new();
    let mut file = std::fs::File::from(rd);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ProcessError::StoreStart(format!(
                "no answer within {limit:?}"
            )));
        }
        let ts = Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: left.subsec_nanos() as i64,
        };
        let mut fds = [PollFd::new(&file, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(std::io::Error::from(e).into()),
        }
        let mut chunk = [0u8; 512];
        let n = file.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    match std::str::from_utf8(&buf).unwrap_or("?").trim() {
        "ok" => Ok(()),
        "" => Err(ProcessError::StoreStart("the daemon exited".into())),
        msg => match msg.strip_prefix(NO_HUGE_PAGES) {
            Some(detail) => Err(ProcessError::NoHugePages(detail.into())),
            None => Err(ProcessError::StoreStart(msg.into())),
        },
    }
}

/// The child side: binds the daemon, reports, serves until told to stop or the parent dies.
fn daemon_child(cfg: &DaemonConfig, parent: Pid, status: OwnedFd, dir: &Path) -> i32 {
    let report = |msg: &str| {
        let mut f = std::fs::File::from(status.as_fd().try_clone_to_owned().expect("dup"));
        let _ = f.write_all(msg.as_bytes());
    };
    // Die with the parent: SIGTERM lets the daemon clean up. Checked again after setting it
    // in case the parent died in between.
    if nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).is_err() || getppid() != parent {
        return 1;
    }
    // A terminal's Ctrl-C goes to the whole process group: let the parent decide.
    // SAFETY: SIG_IGN installs no handler code; the process is single-threaded here.
    let _ = unsafe { signal(Signal::SIGINT, SigHandler::SigIgn) };
    // Stdout may be a pipe someone reads to its end: do not hold it open.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(null);
    }
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGHUP);
    if signals.thread_block().is_err() {
        report("cannot block signals");
        return 1;
    }
    let daemon = match Daemon::bind(cfg) {
        Ok(d) => d,
        Err(StoreError::NoHugePages(detail)) => {
            report(&format!("{NO_HUGE_PAGES}{detail}"));
            return 1;
        }
        Err(e) => {
            report(&e.to_string());
            return 1;
        }
    };
    let stop = daemon.shutdown_handle();
    let waiter = std::thread::Builder::new()
        .name("troved-signals".into())
        .spawn(move || {
            let _ = signals.wait();
            stop.shutdown();
        });
    if waiter.is_err() {
        report("cannot start the signal thread");
        return 1;
    }
    report("ok");
    drop(status);
    let code = match daemon.run() {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("embedded store: {e}");
            1
        }
    };
    let _ = std::fs::remove_dir_all(dir);
    code
}

/// This program's identity: a 64-bit hash of the executable's GNU build id (read from the
/// running image's `PT_NOTE` segments through `dl_iterate_phdr`: no file is read) or, for an
/// executable linked without one, of `/proc/self/exe`'s device, inode, size and modification
/// time; and of the address the executable is loaded at. Computed once per process. Two
/// processes share it exactly when they run the same executable at the same addresses (a
/// process and its forks; two runs of one binary differ under ASLR), which is when a function
/// address sent from one means the same function in the other.
///
/// With the `failpoints` feature (test builds only), `TROVE_TEST_PROGRAM_ID` (a number)
/// replaces it, so a test can play "another program" with the same binary.
pub fn program_id() -> u64 {
    static ID: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        #[cfg(feature = "failpoints")]
        if let Some(id) = std::env::var("TROVE_TEST_PROGRAM_ID")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            return id;
        }
        let (id, base) = build_id();
        let base = base.to_le_bytes();
        match id {
            Some(id) => fnv1a(&[&id[..], &base].concat()),
            None => {
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::metadata("/proc/self/exe").ok();
                let words = m.map_or([0; 4], |m| {
                    [
                        m.dev(),
                        m.ino(),
                        m.size(),
                        m.mtime_nsec() as u64 ^ m.mtime() as u64,
                    ]
                });
                fnv1a(&[&words.map(u64::to_le_bytes).concat()[..], &base].concat())
            }
        }
    })
}

/// FNV-1a, 64 bits: a stable hash (the same in every build and process).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The main executable's GNU build id (if it was linked with one) and load address.
fn build_id() -> (Option<Vec<u8>>, u64) {
    unsafe extern "C" fn first(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        out: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: the loader passes a valid `dl_phdr_info` for the call; `out` is the
        // `(Option<Vec<u8>>, u64)` given to `dl_iterate_phdr` below, used by this thread only.
        let (info, (out, base)) = unsafe { (&*info, &mut *(out as *mut (Option<Vec<u8>>, u64))) };
        // (`Elf32_Addr` on 32-bit targets.)
        #[allow(clippy::unnecessary_cast)]
        let addr = info.dlpi_addr as u64;
        *base = addr;
        // SAFETY: `dlpi_phdr` points at `dlpi_phnum` program headers of the loaded object.
        let headers =
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
        for h in headers.iter().filter(|h| h.p_type == libc::PT_NOTE) {
            let start = (info.dlpi_addr as usize).wrapping_add(h.p_vaddr as usize);
            // SAFETY: a PT_NOTE segment is loaded (mapped, readable) at its address plus the
            // object's base for as long as the object is loaded (the main program: always).
            let notes =
                unsafe { std::slice::from_raw_parts(start as *const u8, h.p_memsz as usize) };
            if let Some(id) = gnu_build_id(notes) {
                *out = Some(id);
                break;
            }
        }
        // The first object is the main program: stop there.
        1
    }
    let mut out: (Option<Vec<u8>>, u64) = (None, 0);
    // SAFETY: `first` matches the callback type and only touches `out` through the pointer
    // passed here, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(first), &mut out as *mut _ as *mut libc::c_void) };
    out
}

/// Finds the `NT_GNU_BUILD_ID` note (type 3, name "GNU") in a note segment's bytes.
fn gnu_build_id(mut notes: &[u8]) -> Option<Vec<u8>> {
    let word = |b: &[u8], i: usize| -> Option<usize> {
        Some(u32::from_ne_bytes(b.get(4 * i..4 * i + 4)?.try_into().ok()?) as usize)
    };
    while notes.len() >= 12 {
        let (namesz, descsz, kind) = (word(notes, 0)?, word(notes, 1)?, word(notes, 2)?);
        let name_end = 12 + namesz.next_multiple_of(4);
        let desc_end = name_end.checked_add(descsz.next_multiple_of(4))?;
        let name = notes.get(12..12 + namesz)?;
        let desc = notes.get(name_end..name_end + descsz)?;
        if kind == 3 && name == b"GNU\0" {
            return Some(desc.to_vec());
        }
        notes = notes.get(desc_end..)?;
    }
    None
}

#[cfg(test)]
mod identity_tests {
    use super::*;

    #[test]
    fn the_program_id_is_the_build_id_and_stable() {
        let (id, base) = build_id();
        let id = id.expect("this test binary has a GNU build id");
        assert!(id.len() >= 8, "{id:?}");
        assert_eq!(
            program_id(),
            fnv1a(&[&id[..], &base.to_le_bytes()].concat())
        );
        assert_eq!(program_id(), program_id());
        // A note segment with another note first.
        let mut notes = Vec::new();
        for (name, kind, desc) in [
            (&b"XY\0"[..], 1u32, &[1u8, 2, 3][..]),
            (b"GNU\0", 3, &[9; 20]),
        ] {
            notes.extend_from_slice(&(name.len() as u32).to_ne_bytes());
            notes.extend_from_slice(&(desc.len() as u32).to_ne_bytes());
            notes.extend_from_slice(&kind.to_ne_bytes());
            notes.extend_from_slice(name);
            notes.resize(notes.len().next_multiple_of(4), 0);
            notes.extend_from_slice(desc);
            notes.resize(notes.len().next_multiple_of(4), 0);
        }
        assert_eq!(gnu_build_id(&notes), Some(vec![9; 20]));
        assert_eq!(gnu_build_id(&notes[..20]), None, "truncated");
    }
}
