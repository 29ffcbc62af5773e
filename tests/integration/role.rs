//! Every helper role and its arguments, in one place.
//!
//! A helper process is this test binary re-executed with [`ROLE_ENV`] set to one encoded
//! [`Role`]; `util::run_helper_if_asked` decodes it in `main`, before any thread exists, and
//! dispatches it with one `match` to the role's body, which stays in its area's file. Roles
//! that share a setup (a store connection, a `trove::init`, an executor driver) are one
//! `Role` variant holding that area's enum, so each area's body matches its own roles
//! exhaustively.
//!
//! The encoding is ours (no serde): one line of words, a role's name followed by its fields
//! in order as `key=value` (a nested enum is its own name and fields), values %-escaped, e.g.
//! `store socket=/tmp/trove-test-x/sock/troved.sock put id=... len=4096 seed=3 delay_ms=300`.
//! It is readable in `ps e` and a role can be run by hand. Decoding checks each key, so a
//! field added to a variant cannot be read in the wrong place.
//!
//! Adding a role: a variant here (in its area's enum, with typed fields and a doc comment
//! saying what it prints), its arm in the area's body (the compiler asks for it), and, for a
//! new area, one arm in `util::run_helper_if_asked`.

use std::path::{Path, PathBuf};
use std::str::SplitAsciiWhitespace;

use trove_store::ObjectId;

/// The environment variable that holds a helper's encoded [`Role`].
pub const ROLE_ENV: &str = "TROVE_TEST_ROLE";

type Words<'a> = SplitAsciiWhitespace<'a>;

/// A value in a role line: one `key=value` word, or (an enum) its name and fields.
pub trait Arg: Sized {
    fn encode(&self, key: &str, out: &mut Vec<String>);
    fn decode(key: &str, words: &mut Words<'_>) -> Result<Self, String>;
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            ' ' => out.push_str("%20"),
            '\t' => out.push_str("%09"),
            '\n' => out.push_str("%0A"),
            '\r' => out.push_str("%0D"),
            c => out.push(c),
        }
    }
    out
}

fn unescape(s: &str) -> Result<String, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next(), bytes.next()];
            let [Some(h), Some(l)] = hex else {
                return Err(format!("truncated escape in {s:?}"));
            };
            let hex = std::str::from_utf8(&[h, l])
                .ok()
                .and_then(|x| u8::from_str_radix(x, 16).ok())
                .ok_or_else(|| format!("bad escape in {s:?}"))?;
            out.push(hex);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).map_err(|_| format!("not UTF-8: {s:?}"))
}

/// The unescaped value of the next word, which must be `key=...`.
fn value(key: &str, words: &mut Words<'_>) -> Result<String, String> {
    let word = words.next().ok_or_else(|| format!("missing {key}"))?;
    let v = word
        .strip_prefix(key)
        .and_then(|r| r.strip_prefix('='))
        .ok_or_else(|| format!("expected {key}=..., got {word:?}"))?;
    unescape(v)
}

/// Scalars: `Display` out, `FromStr` in.
macro_rules! scalar_args {
    ($($t:ty),*) => {$(
        impl Arg for $t {
            fn encode(&self, key: &str, out: &mut Vec<String>) {
                out.push(format!("{key}={}", escape(&self.to_string())));
            }
            fn decode(key: &str, words: &mut Words<'_>) -> Result<Self, String> {
                let v = value(key, words)?;
                v.parse().map_err(|e| format!("{key}={v:?}: {e}"))
            }
        }
    )*};
}

scalar_args!(u64, usize, bool, String, ObjectId);

/// Paths must be UTF-8 (the tests' temp directories are).
impl Arg for PathBuf {
    fn encode(&self, key: &str, out: &mut Vec<String>) {
        let s = self.to_str().expect("helper paths are UTF-8");
        out.push(format!("{key}={}", escape(s)));
    }
    fn decode(key: &str, words: &mut Words<'_>) -> Result<Self, String> {
        value(key, words).map(PathBuf::from)
    }
}

/// An enum of roles (or of a role's modes) and its encoding: each variant is its name (a
/// string literal) and then its fields, in order.
macro_rules! roles {
    (
        $(#[$m:meta])*
        pub enum $E:ident {
            $(
                $(#[$vm:meta])*
                $V:ident $({ $($(#[$fm:meta])* $f:ident : $t:ty),* $(,)? })? = $name:literal
            ),* $(,)?
        }
    ) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum $E {
            $( $(#[$vm])* $V $({ $($(#[$fm])* $f: $t),* })? ),*
        }

        impl Arg for $E {
            fn encode(&self, _key: &str, out: &mut Vec<String>) {
                match self {
                    $( $E::$V $({ $($f),* })? => {
                        out.push($name.to_string());
                        $($( Arg::encode($f, stringify!($f), out); )*)?
                    } )*
                }
            }
            fn decode(_key: &str, words: &mut Words<'_>) -> Result<Self, String> {
                match words.next() {
                    $(
                        Some($name) => Ok($E::$V $({
                            $($f: Arg::decode(stringify!($f), words)?),*
                        })?),
                    )*
                    other => Err(format!("unknown {} {other:?}", stringify!($E))),
                }
            }
        }
    };
}

roles! {
    /// What a helper process does. Each role prints `READY`/`DONE`-style lines for the test
    /// (and `ERROR ...` if its body fails).
    pub enum Role {
        /// A `StoreClient` on `socket` doing one store verb (roles.rs).
        Store { socket: PathBuf, role: StoreRole } = "store",
        /// Pin `id` (`len` bytes of `pattern(seed)`), watch `n` ids or list in a loop, then
        /// (stopped and resumed by the test) wait for `go`, check the bytes and try two verbs
        /// (store_isolation.rs).
        PinStop {
            socket: PathBuf,
            mode: PinStopMode,
            id: ObjectId,
            len: usize,
            seed: u64,
            n: u64,
            go: PathBuf,
        } = "pin-stop",
        /// Hostile frames on raw connections; prints `SENT n` (store_fuzz.rs).
        FuzzHostile { socket: PathBuf } = "fuzz-hostile",
        /// A `trove` runtime on the store at `socket` (client_roles.rs).
        Trove { socket: PathBuf, role: TroveRole } = "trove",
        /// A `trove` runtime with an embedded store: reports it, uses it, then holds (until
        /// killed) or shuts down (client_roles.rs).
        TroveEmbedded { hold: bool } = "trove-embedded",
        /// A driver with its own embedded store running one lifetime scenario
        /// (client_lifetimes.rs).
        Lifetimes { scenario: Scenario } = "live-lifetimes",
        /// `init` twice, with and without `ignore_reinit_error`, in a driver and in a task
        /// (client_init.rs).
        Reinit = "reinit",
        /// `Config::default()` with `TROVE_MEMORY` unset: the store's size by Ray's rule, and
        /// a 1 GiB object in it (client_init.rs).
        DefaultStore = "default-store",
        /// `Config::hugepages`: the store on huge pages where the machine has them, else a
        /// typed refusal and a fallback to base pages; a large object either way
        /// (client_init.rs).
        HugePages = "huge-pages",
        /// An executor driver (executor_roles.rs).
        Exec { role: ExecRole } = "exec",
        /// A driver of actors' and tasks' lifetimes (executor_lifetime_roles.rs).
        Life { role: LifeRole } = "life",
        /// Become uid/gid 65534, then try to connect (security_access.rs).
        SecOtherUid { socket: PathBuf } = "sec-other-uid",
        /// Watch `n` ids, then never read the notification ring (security_access.rs).
        SecStall { socket: PathBuf, n: u64 } = "sec-stall",
        /// Join the hugetlb cgroup `cgroup` (its limit 0), then create, write and read back
        /// objects in the huge-page store at `socket` (store_lifecycle.rs).
        HugetlbLimited { socket: PathBuf, cgroup: PathBuf } = "hugetlb-limited",
        /// Put, get, call and drop for `millis` with a seeded generator (load_clients.rs).
        LoadClient { socket: PathBuf, seed: u64, millis: u64 } = "load-client",
        /// A workload until the test creates `quiet` beside the socket's directory
        /// (fault_kills.rs).
        FaultDriver { socket: PathBuf } = "fault-driver",
    }
}

roles! {
    /// Store roles (roles.rs), each on one `StoreClient`.
    pub enum StoreRole {
        /// Create and seal `len` bytes of `pattern(seed)` as `id` after `delay_ms`; `DONE`.
        Put { id: ObjectId, len: usize, seed: u64, delay_ms: u64 } = "put",
        /// Pin `id` and hold it until killed; `PINNED <len>`.
        Pin { id: ObjectId } = "pin",
        /// Create `id` of `len` bytes, write it, never seal; `CREATED`, hold until killed.
        CreateHold { id: ObjectId, len: u64 } = "create-hold",
        /// Get `id` (waiting) and check it is `len` bytes of `pattern(seed)`; `OK`.
        GetCheck { id: ObjectId, len: usize, seed: u64 } = "get-check",
        /// `WAITING`, wait forever for `id`, then `GOT` or `FAILED <error>`.
        WaitForever { id: ObjectId } = "wait-forever",
    }
}

roles! {
    /// How the `pin-stop` helper gets cut off.
    pub enum PinStopMode {
        /// Watches `n` ids whose notices it never reads.
        Watch = "watch",
        /// Lists the store in a loop on another thread.
        List = "list",
    }
}

roles! {
    /// `trove` API roles (client_roles.rs), each on a runtime attached to the test's store.
    pub enum TroveRole {
        /// `ID <id>` of an in-place object of `n` u64s, filled and sealed after `delay_ms`,
        /// kept until `ack` exists; `DONE`.
        CreateLater { n: usize, delay_ms: u64, ack: ObjectId } = "create-later",
        /// `ID <id>` of an in-place object of `n` u64s never sealed (killed by the test).
        CreateHold { n: usize } = "create-hold",
        /// Get `id`, `n` u64s written by `CreateLater`, and check it; `OK`.
        GetU64s { id: ObjectId, n: usize } = "get-u64s",
        /// `WAITING`, wait for `id` without a timeout, then `GOT` or `FAILED <error>`.
        WaitForever { id: ObjectId } = "wait-forever",
        /// Timeouts of `get` and `wait`; `OK`.
        Timeouts = "timeouts",
        /// Objects read as the wrong type; `OK`.
        WrongType = "wrong-type",
        /// Put `count` objects and a container of refs to them; `ID <container>`, keep it
        /// until `ack` exists; `DONE`.
        Produce { count: u64, ack: ObjectId } = "produce",
        /// Read everything through `container` (`count` objects), put `ack`, check; `DONE`.
        Consume { container: ObjectId, count: u64, ack: ObjectId } = "consume",
    }
}

roles! {
    /// The scenarios of the `live-lifetimes` driver (client_lifetimes.rs).
    pub enum Scenario {
        ArgsLoop = "args-loop",
        RefsInside = "refs-inside",
        DroppedResults = "dropped-results",
        Chained = "chained",
        Nested = "nested",
    }
}

roles! {
    /// Executor drivers (executor_roles.rs): each calls `trove::init` on its main thread in a
    /// session of its own, exercises actors and tasks, and prints what it saw (`OK ...`).
    pub enum ExecRole {
        SeedActors = "seed-actors",
        SeedLogging = "seed-logging",
        Large = "large",
        Failures = "failures",
        Kill = "kill",
        TwoHops = "two-hops",
        Inline = "inline",
        /// Actors and workers killed (fail points) while they owe results.
        DieOwing = "die-owing",
        /// A consumer killed at fail point `point` with one call in hand.
        LostCall { point: String } = "lost-call",
        /// An actor and a worker killed while writing a large result (fail point
        /// `trove::writing`): their callers get `ActorDied` / `TaskFailed`.
        LostResult = "lost-result",
        ActorTypes = "actor-types",
        /// Owns a named actor on the store at `socket`; `READY <namespace>`, then waits for
        /// the file `done`.
        NsOwner { socket: PathBuf, done: PathBuf } = "ns-owner",
        /// Plays another program on the store at `socket`, next to the owner's `namespace`.
        NsOtherProgram { socket: PathBuf, namespace: String } = "ns-other-program",
        /// `n` calls to one actor, run in order.
        Order { n: u64 } = "order",
        /// `RUNNING` with two actors; then `leave` (exit without shutting down) or hold until
        /// killed.
        Exit { leave: bool } = "exit",
    }
}

roles! {
    /// Drivers of the runtime in every process and of actors' lifetimes
    /// (executor_lifetime_roles.rs): each calls `trove::init` in a session of its own and
    /// prints `OK ...`.
    pub enum LifeRole {
        /// Tasks put, wait and start an actor; an actor starts a named actor a task finds.
        Everywhere = "everywhere",
        /// An actor stops once its last handle (in another process) is gone.
        LastHandle = "last-handle",
        /// A detached named actor outlives its creator; an owned one dies with it.
        Detached = "detached",
        /// Restarts and retries of actors and tasks.
        Restarts = "restarts",
        /// Cancel before start, forced while running, after the end.
        Cancel = "cancel",
        /// A threaded actor: `&self` calls overlap, `&mut self` calls run alone.
        Threaded = "threaded",
        /// A store filled with the user's objects beside actors: `StoreFull` tells them apart.
        Full = "full",
        /// `n` actors alive at once, each answering; then their handles dropped: all gone.
        Many { n: u64 } = "many",
        /// Tasks that spawn two tasks and get both, `depth` deep, on `cpus` workers.
        Recursive { depth: u64, cpus: u64 } = "recursive",
    }
}

impl Role {
    /// A store role on the store at `socket`.
    pub fn store(socket: &Path, role: StoreRole) -> Role {
        Role::Store {
            socket: socket.to_path_buf(),
            role,
        }
    }

    /// A `trove` role on the store at `socket`.
    pub fn trove(socket: &Path, role: TroveRole) -> Role {
        Role::Trove {
            socket: socket.to_path_buf(),
            role,
        }
    }

    /// The line passed in [`ROLE_ENV`].
    pub fn encode(&self) -> String {
        let mut words = Vec::new();
        Arg::encode(self, "", &mut words);
        words.join(" ")
    }

    /// Reads a line made by [`Role::encode`]; every word must be used.
    pub fn decode(line: &str) -> Result<Role, String> {
        let mut words = line.split_ascii_whitespace();
        let role = <Role as Arg>::decode("", &mut words)?;
        match words.next() {
            None => Ok(role),
            Some(w) => Err(format!("unexpected {w:?} after the role in {line:?}")),
        }
    }
}
