//! The `trove` client API across processes: typed objects, waiting, lifetimes, failures.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use trove_store::ObjectId;

use crate::harness::register;
use crate::role::{Role, TroveRole};
use crate::util::{Helper, TestStore, wait_until, wait_until_blocked};

const T: Duration = Duration::from_secs(30);

fn id_of(line: &str) -> ObjectId {
    line.split_whitespace()
        .nth(1)
        .expect("an id")
        .parse()
        .expect("an id")
}

pub fn client_init_refuses_a_threaded_process() {
    // The test harness runs this on one of its threads: init must refuse, not fork.
    match trove::init(trove::Config::default().memory(16 << 20)) {
        Err(trove::Error::Init(msg)) => assert!(msg.contains("threads"), "{msg}"),
        other => panic!("expected Error::Init, got {other:?}"),
    }
}
register!(client_init_refuses_a_threaded_process);

pub fn client_get_waits_for_an_object_sealed_later() {
    let store = TestStore::start("64MiB");
    let ack = ObjectId::random();
    let mut producer = Helper::start(Role::trove(
        &store.socket,
        TroveRole::CreateLater {
            n: 5000,
            delay_ms: 400,
            ack,
        },
    ));
    let id = id_of(&producer.expect_line("ID", T));
    let started = Instant::now();
    let mut reader = Helper::start(Role::trove(
        &store.socket,
        TroveRole::GetU64s { id, n: 5000 },
    ));
    reader.expect_line("OK", T);
    // The reader started before the seal and had to wait for it.
    assert!(started.elapsed() >= Duration::from_millis(300));
    store.client().put(ack, b"ack").unwrap();
    producer.expect_line("DONE", T);
    assert!(producer.wait(T).success());
    assert!(reader.wait(T).success());
    let c = store.client();
    c.delete(&[ack]).unwrap();
    wait_until(T, "used bytes back to zero", || {
        c.stats().unwrap().used == 0
    });
}
register!(client_get_waits_for_an_object_sealed_later);

pub fn client_timeouts_and_wait() {
    let store = TestStore::start("16MiB");
    let mut h = Helper::start(Role::trove(&store.socket, TroveRole::Timeouts));
    h.expect_line("OK", T);
    assert!(h.wait(T).success());
}
register!(client_timeouts_and_wait);

pub fn client_wrong_type_is_invalid() {
    let store = TestStore::start("16MiB");
    let mut h = Helper::start(Role::trove(&store.socket, TroveRole::WrongType));
    h.expect_line("OK", T);
    assert!(h.wait(T).success());
    let c = store.client();
    wait_until(T, "used bytes back to zero", || {
        c.stats().unwrap().used == 0
    });
}
register!(client_wrong_type_is_invalid);

pub fn client_ten_thousand_objects_passed_and_dropped_free_everything() {
    let store = TestStore::start("256MiB");
    let c = store.client();
    let ack = ObjectId::random();
    let mut producer = Helper::start(Role::trove(
        &store.socket,
        TroveRole::Produce { count: 10000, ack },
    ));
    let container = id_of(&producer.expect_line("ID", T));
    let objects = c.stats().unwrap().objects;
    // 10,000 + 4 large + the container, plus the mailboxes of the producer's task workers.
    assert!(objects > 10_000 + 4, "{objects} objects");
    let mut consumer = Helper::start(Role::trove(
        &store.socket,
        TroveRole::Consume {
            container,
            count: 10000,
            ack,
        },
    ));
    // The producer drops its last reference once the consumer holds the objects.
    producer.expect_line("DONE", T);
    assert!(producer.wait(T).success());
    consumer.expect_line("DONE", T);
    assert!(consumer.wait(T).success());
    c.delete(&[ack]).unwrap();
    wait_until(T, "used bytes back to zero", || {
        let s = c.stats().unwrap();
        s.used == 0 && s.objects == 0
    });
    assert_eq!(c.stats().unwrap().pinned, 0);
}
register!(client_ten_thousand_objects_passed_and_dropped_free_everything);

pub fn client_creator_killed_while_a_reader_waits_is_lost() {
    let store = TestStore::start("16MiB");
    let mut creator = Helper::start(Role::trove(
        &store.socket,
        TroveRole::CreateHold { n: 1000 },
    ));
    let id = id_of(&creator.expect_line("ID", T));
    let mut reader = Helper::start(Role::trove(&store.socket, TroveRole::WaitForever { id }));
    reader.expect_line("WAITING", T);
    wait_until_blocked(reader.pid(), T);
    creator.kill9();
    let line = reader.expect_line("FAILED", Duration::from_secs(5));
    assert!(line.contains("ObjectLost"), "{line}");
    assert!(reader.wait(T).success());
    let c = store.client();
    wait_until(T, "used bytes back to zero", || {
        c.stats().unwrap().used == 0
    });
}
register!(client_creator_killed_while_a_reader_waits_is_lost);

pub fn client_daemon_killed_gives_disconnected() {
    let store = TestStore::start("16MiB");
    let mut reader = Helper::start(Role::trove(
        &store.socket,
        TroveRole::WaitForever {
            id: ObjectId::random(),
        },
    ));
    reader.expect_line("WAITING", T);
    wait_until_blocked(reader.pid(), T);
    kill(store.pid(), Signal::SIGKILL).unwrap();
    let line = reader.expect_line("FAILED", Duration::from_secs(5));
    assert!(line.contains("Disconnected"), "{line}");
    assert!(reader.wait(T).success());
}
register!(client_daemon_killed_gives_disconnected);

fn alive(pid: i32) -> bool {
    // Zombies count as gone: /proc/PID/stat's state is Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn store_line(line: &str) -> (i32, std::path::PathBuf) {
    let mut parts = line.split_whitespace().skip(1);
    let pid = parts.next().expect("pid").parse().expect("pid");
    let socket = parts.next().expect("socket").into();
    (pid, socket)
}

pub fn client_embedded_store_is_cleaned_up() {
    // A clean shutdown stops the store and removes its directory.
    let mut h = Helper::start(Role::TroveEmbedded { hold: false });
    let (pid, socket) = store_line(&h.expect_line("STORE", T));
    h.expect_line("DONE", T);
    assert!(h.wait(T).success());
    assert!(!alive(pid), "embedded store {pid} still running");
    assert!(!socket.parent().unwrap().exists(), "{socket:?} left behind");
    // The driver killed: the store dies with it and cleans up.
    let mut h = Helper::start(Role::TroveEmbedded { hold: true });
    let (pid, socket) = store_line(&h.expect_line("STORE", T));
    h.expect_line("HOLDING", T);
    h.kill9();
    wait_until(T, "the orphaned store to exit", || !alive(pid));
    wait_until(T, "its directory to go", || {
        !socket.parent().unwrap().exists()
    });
    let _ = kill(Pid::from_raw(pid), None);
}
register!(client_embedded_store_is_cleaned_up);
