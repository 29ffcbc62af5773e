//! Model tests (loom) of the parking protocol ([`Park`]), run on the real code with the
//! futex replaced by its loom stand-in (a wait blocks until a wake, whatever its deadline):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p trove-store --release --lib loom -- --nocapture
//! ```
//!
//! A lost wake-up leaves a waiter blocked for ever, which loom reports as a deadlock. So each
//! model passing means: in every interleaving (and every weak-memory outcome loom explores),
//! every waiter whose condition is made true by a notifier wakes up. A negative control shows
//! the model finds the lost wake-up when the notifier leaves out its fence.

use std::sync::Arc;

use loom::thread;

use super::*;
use crate::blocks::sync::{AtomicU32, explore};

/// Waits (untimed) until `ready` is non-zero, as a ring side or a mailbox consumer does:
/// re-check, park, repeat.
fn wait_until_set(p: &Park, ready: &AtomicU32) {
    while ready.load(Ordering::Acquire) == 0 {
        p.wait(None, || ready.load(Ordering::Acquire) == 0)
            .expect("untimed wait");
    }
}

/// Takes one token (a queued message), parking while there is none.
fn take_token(p: &Park, tokens: &AtomicU32) {
    loop {
        let n = tokens.load(Ordering::Acquire);
        if n != 0 {
            if tokens
                .compare_exchange(n, n - 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return;
            }
            continue;
        }
        p.wait(None, || tokens.load(Ordering::Acquire) == 0)
            .expect("untimed wait");
    }
}

/// One waiter, one notifier (a ring side: the consumer waiting for a push): the waiter always
/// wakes.
#[test]
fn loom_park_one_waiter_is_never_lost() {
    let n = explore("park_one_waiter", 3, || {
        let park = Arc::new(Park::new());
        let ready = Arc::new(AtomicU32::new(0));
        let notifier = {
            let (park, ready) = (Arc::clone(&park), Arc::clone(&ready));
            thread::spawn(move || {
                ready.store(1, Ordering::Release);
                park.notify_one();
            })
        };
        wait_until_set(&park, &ready);
        notifier.join().expect("notifier");
        assert_eq!(park.waiters(), 0);
    });
    assert!(n > 1);
}

/// Two waiters, two notifications of one item each (mailbox consumers, `notify_one` per
/// push): both waiters get an item; neither sleeps through a notification meant for it.
#[test]
fn loom_park_notify_one_per_item_wakes_enough_waiters() {
    let n = explore("park_two_waiters_two_items", 2, || {
        let park = Arc::new(Park::new());
        let tokens = Arc::new(AtomicU32::new(0));
        let waiter = {
            let (park, tokens) = (Arc::clone(&park), Arc::clone(&tokens));
            thread::spawn(move || take_token(&park, &tokens))
        };
        let notifier = {
            let (park, tokens) = (Arc::clone(&park), Arc::clone(&tokens));
            thread::spawn(move || {
                for _ in 0..2 {
                    tokens.fetch_add(1, Ordering::Release);
                    park.notify_one();
                }
            })
        };
        take_token(&park, &tokens);
        waiter.join().expect("waiter");
        notifier.join().expect("notifier");
        assert_eq!(tokens.load(Ordering::Relaxed), 0);
    });
    assert!(n > 1);
}

/// Two waiters, one `notify_all` (a mailbox marked dead, a ring closed): both wake.
#[test]
fn loom_park_notify_all_wakes_every_waiter() {
    let n = explore("park_notify_all", 2, || {
        let park = Arc::new(Park::new());
        let dead = Arc::new(AtomicU32::new(0));
        let waiter = {
            let (park, dead) = (Arc::clone(&park), Arc::clone(&dead));
            thread::spawn(move || wait_until_set(&park, &dead))
        };
        let notifier = {
            let (park, dead) = (Arc::clone(&park), Arc::clone(&dead));
            thread::spawn(move || {
                dead.store(1, Ordering::SeqCst);
                park.notify_all();
            })
        };
        wait_until_set(&park, &dead);
        waiter.join().expect("waiter");
        notifier.join().expect("notifier");
    });
    assert!(n > 1);
}

/// The negative control: without the notifier's fence, the store of the condition and the
/// load of `waiters` may both miss the waiter's announcement and re-check (store buffering),
/// and the waiter sleeps for ever. Loom must find that.
#[test]
fn loom_park_without_the_notifiers_fence_loses_a_wake_up() {
    let lost = std::panic::catch_unwind(|| {
        explore("park_unfenced_notifier", 3, || {
            let park = Arc::new(Park::new());
            let ready = Arc::new(AtomicU32::new(0));
            let notifier = {
                let (park, ready) = (Arc::clone(&park), Arc::clone(&ready));
                thread::spawn(move || {
                    ready.store(1, Ordering::Release);
                    park.notify_one_unfenced();
                })
            };
            wait_until_set(&park, &ready);
            notifier.join().expect("notifier");
        });
    })
    .is_err();
    println!("expected: loom finds a deadlock (a lost wake-up) without the notifier's fence");
    assert!(lost, "loom found no lost wake-up without the fence");
}
