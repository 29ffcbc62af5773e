//! How tests are found: each test file registers its tests next to their definitions,
//!
//! ```ignore
//! pub fn store_get_timeout_and_poll() { ... }
//! register!(store_get_timeout_and_poll);
//! ```
//!
//! and `main` collects every registered test ([`trials`]), named `module::function` (the
//! names CI logs and `cargo test --test integration -- <filter>` see).
//!
//! Why this way: the registrations are gathered with the `inventory` crate (dtolnay's, well
//! kept): each `register!` is one plain macro call that adds a static to a list before `main`
//! (a constructor that only links a node: no thread exists when a helper role starts). A
//! test's registration sits beside it, there is nothing to keep in another file, and a test
//! that is *not* registered does not compile: the binary is `#![deny(dead_code)]`, and a test
//! function that nothing registers is dead code. `linkme` would gather them as well, but each
//! `#[distributed_slice]` entry is an attributed static that needs a name of its own, more
//! than a one-line `macro_rules!` call; an attribute macro (`#[trove_test]`) would need a
//! proc-macro crate of our own for the same thing.
//!
//! A test that needs root (it switches uid) is registered as `register!(root: name)`: it is
//! reported as ignored, with the reason as its kind, unless the tests run as root, so that it
//! never counts as a pass that checked nothing.
//!
//! A test that fills the machine (a thousand processes) is registered as
//! `register!(alone: name)`: it runs while no other test does (it takes a lock the others
//! share), so that it cannot push a timing-sensitive test (the seed exercise's 2.5-3 s
//! window) out of its bounds.

use libtest_mimic::{Failed, Trial};

/// One registered test.
pub struct Test {
    /// `module_path!()` where it was registered: `integration::<module>`.
    pub module: &'static str,
    pub name: &'static str,
    pub run: fn(),
    /// Ignored unless the tests run as root.
    pub root: bool,
    /// Runs while no other test runs.
    pub alone: bool,
}

/// Shared by every test while it runs; held alone by an `alone` test.
static RUNNING: std::sync::RwLock<()> = std::sync::RwLock::new(());

inventory::collect!(Test);

/// Registers test functions of the current module: `register!(a);` or, for a test that must
/// run as root, `register!(root: a);`.
macro_rules! register {
    (root: $f:ident) => {
        $crate::harness::register!(@ $f, true, false);
    };
    (alone: $f:ident) => {
        $crate::harness::register!(@ $f, false, true);
    };
    ($f:ident) => {
        $crate::harness::register!(@ $f, false, false);
    };
    (@ $f:ident, $root:expr, $alone:expr) => {
        inventory::submit! {
            $crate::harness::Test {
                module: module_path!(),
                name: stringify!($f),
                run: $f,
                root: $root,
                alone: $alone,
            }
        }
    };
}
pub(crate) use register;

impl Test {
    /// `module::function`, without the crate's name.
    pub fn path(&self) -> String {
        let module = self.module.split_once("::").map_or(self.module, |(_, m)| m);
        format!("{module}::{}", self.name)
    }

    fn trial(&self) -> Trial {
        let run = self.run;
        let alone = self.alone;
        let trial = Trial::test(self.path(), move || {
            let _running = if alone {
                (
                    None,
                    Some(RUNNING.write().unwrap_or_else(|p| p.into_inner())),
                )
            } else {
                (
                    Some(RUNNING.read().unwrap_or_else(|p| p.into_inner())),
                    None,
                )
            };
            std::panic::catch_unwind(run).map_err(|p| {
                Failed::from(
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panicked".into()),
                )
            })
        });
        if self.root && !nix::unistd::geteuid().is_root() {
            trial
                .with_ignored_flag(true)
                .with_kind("ignored: needs root to switch uid")
        } else {
            trial
        }
    }
}

/// Every registered test, sorted by name; a name registered twice is a bug of the tests.
pub fn trials() -> Vec<Trial> {
    let mut tests: Vec<&Test> = inventory::iter::<Test>.into_iter().collect();
    tests.sort_by_key(|t| t.path());
    for pair in tests.windows(2) {
        assert!(
            pair[0].path() != pair[1].path(),
            "{} is registered twice",
            pair[0].path()
        );
    }
    tests.into_iter().map(Test::trial).collect()
}
