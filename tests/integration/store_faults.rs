//! Processes that die: clients holding pins or creating, waiters, and the daemon itself.

use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use trove_store::{ObjectId, StoreClient, StoreError, Timeout};

use crate::harness::register;
use crate::role::{Role, StoreRole};
use crate::util::{Helper, TestStore, pattern, wait_until, wait_until_blocked};

const T: Duration = Duration::from_secs(20);

pub fn store_client_killed_while_pinning_releases_its_pins() {
    let store = TestStore::start("4MiB");
    let c = store.client();
    let id = ObjectId::random();
    c.put(id, &pattern(5, 3 << 20)).unwrap();
    let mut h = Helper::start(Role::store(&store.socket, StoreRole::Pin { id }));
    h.expect_line("PINNED", T);
    assert_eq!(c.stats().unwrap().pinned, 3 << 20);
    // Pinned: a 3 MiB create cannot evict it.
    assert!(matches!(
        c.create(ObjectId::random(), 3 << 20),
        Err(StoreError::StoreFull { .. })
    ));
    h.kill9();
    wait_until(T, "pins of the killed client to go", || {
        c.stats().unwrap().pinned == 0
    });
    // The memory is reusable: the old object is evicted for a new one of the same size.
    c.put(ObjectId::random(), &pattern(6, 3 << 20)).unwrap();
    assert!(!c.contains(id).unwrap());
}
register!(store_client_killed_while_pinning_releases_its_pins);

pub fn store_client_killed_while_creating_is_aborted() {
    let store = TestStore::start("4MiB");
    let c = store.client();
    let id = ObjectId::random();
    let mut h = Helper::start(Role::store(
        &store.socket,
        StoreRole::CreateHold { id, len: 3 << 20 },
    ));
    h.expect_line("CREATED", T);
    assert_eq!(c.stats().unwrap().objects, 1);
    h.kill9();
    wait_until(T, "the unsealed object to be aborted", || {
        c.stats().unwrap().objects == 0
    });
    assert_eq!(c.stats().unwrap().used, 0);
    c.put(id, &pattern(1, 3 << 20)).unwrap();
    assert_eq!(
        c.get(id, Timeout::Poll).unwrap().as_slice(),
        pattern(1, 3 << 20).as_slice()
    );
}
register!(store_client_killed_while_creating_is_aborted);

pub fn store_daemon_killed_gives_disconnected_not_a_hang() {
    let store = TestStore::start("16MiB");
    let c = store.client();
    let id = ObjectId::random();
    c.put(id, b"still readable").unwrap();
    let view = c.get(id, Timeout::Poll).unwrap();
    let (tx, rx) = mpsc::channel();
    let waiter = c.clone();
    std::thread::spawn(move || {
        let r = waiter.get(ObjectId::random(), Timeout::Forever);
        let _ = tx.send(r.err().map(|e| format!("{e:?}")));
    });
    let mut h = Helper::start(Role::store(
        &store.socket,
        StoreRole::WaitForever {
            id: ObjectId::random(),
        },
    ));
    h.expect_line("WAITING", T);
    // The helper is parked in its get. (This process's own waiter gets `Disconnected`
    // whether or not it is parked yet: its connection is up before the thread starts.)
    wait_until_blocked(h.pid(), T);
    kill(store.pid(), Signal::SIGKILL).unwrap();
    let got = rx
        .recv_timeout(T)
        .expect("a blocked get must return when the daemon dies");
    assert!(got.unwrap().starts_with("Disconnected"));
    let line = h.expect_line("FAILED", T);
    assert!(line.contains("Disconnected"), "{line}");
    assert!(matches!(c.stats(), Err(StoreError::Disconnected(_))));
    assert!(matches!(
        c.create(ObjectId::random(), 1),
        Err(StoreError::Disconnected(_))
    ));
    // The mapping outlives the daemon: a view taken before stays readable.
    assert_eq!(view.as_slice(), b"still readable");
}
register!(store_daemon_killed_gives_disconnected_not_a_hang);

pub fn store_sigterm_removes_the_socket_and_a_second_daemon_is_refused() {
    let mut store = TestStore::start("16MiB");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_troved"))
        .arg("--socket")
        .arg(&store.socket)
        .args(["--memory", "16MiB"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running"), "{err}");
    // The first daemon still serves.
    let c = store.client();
    c.put(ObjectId::random(), b"x").unwrap();
    let status = store.stop();
    assert!(status.success(), "{status:?}");
    assert!(!store.socket.exists(), "socket removed on SIGTERM");
    assert!(matches!(c.stats(), Err(StoreError::Disconnected(_))));
    assert!(StoreClient::connect(&store.socket).is_err());
}
register!(store_sigterm_removes_the_socket_and_a_second_daemon_is_refused);

pub fn store_socket_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let store = TestStore::start("16MiB");
    let dir = store.socket.parent().unwrap();
    let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    // A daemon refuses a directory that others can enter.
    let open = store.dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_troved"))
        .arg("--socket")
        .arg(open.join("s.sock"))
        .args(["--memory", "1MiB"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be 0700"));
}
register!(store_socket_directory_is_private);
