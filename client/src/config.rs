//! [`Config`]: how [`init`](crate::init) sets trove up.

use std::path::PathBuf;

use trove_store::ObjectId;

/// Bytes of object space of the embedded store when neither [`Config::memory`] nor
/// `TROVE_MEMORY` says: 30% of the machine's memory, capped by what `/dev/shm` has free, at
/// least 64 MiB (Ray's rule). Memory is committed as objects use it, not up front.
pub fn default_memory() -> u64 {
    trove_store::DaemonConfig::default_memory()
}

/// How [`init`](crate::init) sets trove up.
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) store: Option<PathBuf>,
    /// `None`: [`default_memory`], worked out only if `init` starts an embedded store (a task
    /// or actor reaching its runtime never needs it).
    pub(crate) memory: Option<u64>,
    pub(crate) prefault: bool,
    pub(crate) hugepages: bool,
    pub(crate) num_cpus: usize,
    pub(crate) namespace: Option<String>,
    pub(crate) ignore_reinit_error: bool,
    pub(crate) task_max_retries: u32,
}

impl Default for Config {
    /// An embedded store of `TROVE_MEMORY` bytes (default: [`default_memory`]), or the running
    /// store named by `TROVE_STORE`.
    fn default() -> Config {
        let memory = std::env::var("TROVE_MEMORY")
            .ok()
            .and_then(|s| trove_store::size::parse_size(&s).ok());
        Config {
            store: std::env::var_os("TROVE_STORE").map(PathBuf::from),
            memory,
            prefault: false,
            hugepages: std::env::var_os("TROVE_HUGEPAGES").is_some_and(|v| v == "1"),
            num_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            namespace: None,
            ignore_reinit_error: false,
            task_max_retries: 0,
        }
    }
}

impl Config {
    /// Connect to the running `troved` at this socket instead of starting one.
    pub fn store(mut self, socket: impl Into<PathBuf>) -> Config {
        self.store = Some(socket.into());
        self
    }
    /// Bytes of object space of the embedded store.
    pub fn memory(mut self, bytes: u64) -> Config {
        self.memory = Some(bytes);
        self
    }
    /// Pre-fault the embedded store's memory before `init` returns (else in the background).
    pub fn prefault(mut self, yes: bool) -> Config {
        self.prefault = yes;
        self
    }
    /// Back the embedded store with huge pages (default: `TROVE_HUGEPAGES=1`): the huge page
    /// pool if it has room (`vm.nr_hugepages`), else transparent huge pages if shared memory
    /// may use them (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` set to `advise`).
    /// A 2 MiB page takes one fault where 4 KiB pages take 512, so a fresh process's first
    /// touch of a large object costs far less. The pool must hold the whole arena: the
    /// store's [`Config::memory`] plus its directory and the clients' rings (about 290 MiB
    /// more with the default 4,096 clients; the refusal says how many pages). If the machine
    /// has neither, `init` fails with `Error::Store(StoreError::NoHugePages(..))`, saying how
    /// to get them, and starts nothing: calling `init` again without huge pages falls back to
    /// base pages. (This is the embedded store's setting; an external store is started with
    /// `troved --hugepages`.)
    ///
    /// ```no_run
    /// use trove::{Config, Error, store::StoreError};
    /// let rt = match trove::init(Config::default().hugepages(true)) {
    ///     Err(Error::Store(StoreError::NoHugePages(why))) => {
    ///         eprintln!("base pages: {why}");
    ///         trove::init(Config::default().hugepages(false))?
    ///     }
    ///     other => other?,
    /// };
    /// # Ok::<(), trove::Error>(())
    /// ```
    pub fn hugepages(mut self, yes: bool) -> Config {
        self.hugepages = yes;
        self
    }
    /// Number of task workers (the executor's pool).
    pub fn num_cpus(mut self, n: usize) -> Config {
        self.num_cpus = n.max(1);
        self
    }
    /// How many task workers `init` will start (set by [`Config::num_cpus`]).
    pub fn worker_count(&self) -> usize {
        self.num_cpus
    }
    /// The namespace of this driver's named actors (Ray's `namespace`): names are found only
    /// within it. By default each driver has its own (unique per `init`), so two programs
    /// sharing a `troved` never see each other's names unless both name one namespace.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Config {
        self.namespace = Some(namespace.into());
        self
    }

    /// Whether a second [`init`](crate::init) in a process that already has a runtime returns
    /// a handle to that runtime (Ray's `ignore_reinit_error`) instead of failing with
    /// `Error::Init`. The handle does not own the runtime: dropping it stops nothing,
    /// and the rest of this config is ignored. In a task or an actor it is a handle to that
    /// process's runtime, like [`runtime`](fn@crate::runtime).
    pub fn ignore_reinit_error(mut self, yes: bool) -> Config {
        self.ignore_reinit_error = yes;
        self
    }

    /// How many times a task is run again when its worker process dies while running it
    /// (killed, crashed, out of memory), like Ray's `max_retries`: at least once with a value
    /// above 0. Default 0: a task runs at most once, and its ref fails with
    /// `Error::TaskFailed` if its worker dies (Ray retries 3 times by default; trove does not,
    /// because a task with side effects would run them twice). A task whose function returns
    /// an error or panics is never retried.
    pub fn task_max_retries(mut self, n: u32) -> Config {
        self.task_max_retries = n;
        self
    }

    /// The namespace set, or one no other driver has: this process's pid and a random id.
    pub(crate) fn namespace_or_unique(&self) -> String {
        self.namespace.clone().unwrap_or_else(|| {
            let r = ObjectId::random();
            let hex: String = r.0[..8].iter().map(|b| format!("{b:02x}")).collect();
            format!("driver-{}-{hex}", std::process::id())
        })
    }
}
