//! Who may use a store: only its uid, through a private directory; the arena has no name.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use trove_store::{StoreClient, StoreError};

use crate::harness::register;
use crate::role::Role;
use crate::util::{Helper, TestStore, say};

const T: Duration = Duration::from_secs(30);

/// Role `SecOtherUid`: become uid/gid 65534 (nobody), then try to connect.
pub fn other_uid_role(socket: &Path) -> Result<(), Box<dyn std::error::Error>> {
    nix::unistd::setgroups(&[])?;
    nix::unistd::setgid(nix::unistd::Gid::from_raw(65534))?;
    nix::unistd::setuid(nix::unistd::Uid::from_raw(65534))?;
    match StoreClient::connect(socket) {
        Ok(_) => say("CONNECTED"),
        Err(StoreError::Refused(m)) => say(&format!("REFUSED {m}")),
        Err(e) => say(&format!("FAILED {e}")),
    }
    Ok(())
}

pub fn security_another_uid_cannot_connect() {
    let store = TestStore::start("16MiB");
    let dir = store.socket.parent().unwrap().to_path_buf();
    // The directory is 0700: another uid cannot even reach the socket.
    let mut h = Helper::start(Role::SecOtherUid {
        socket: store.socket.clone(),
    });
    let line = h.expect_line("", T);
    assert!(
        line.starts_with("FAILED") && line.contains("ermission denied"),
        "{line}"
    );
    assert!(h.wait(T).success());
    // Even with the directory opened up (and the socket), the daemon refuses the peer by uid.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&store.socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut h = Helper::start(Role::SecOtherUid {
        socket: store.socket.clone(),
    });
    let line = h.expect_line("", T);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(
        line.starts_with("REFUSED") && line.contains("uid 65534"),
        "{line}"
    );
    assert!(h.wait(T).success());
    // And the store still serves its own uid.
    let c = store.client();
    assert_eq!(c.stats().unwrap().objects, 0);
}
register!(root: security_another_uid_cannot_connect);

pub fn security_arena_has_no_name() {
    let store = TestStore::start("16MiB");
    let c = store.client();
    c.put(trove_store::ObjectId::random(), b"x").unwrap();
    // Nothing in /dev/shm; the daemon's mapping is an anonymous memfd.
    let shm: Vec<_> = std::fs::read_dir("/dev/shm")
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !shm.iter().any(|n| n.to_string_lossy().contains("trove")),
        "{shm:?}"
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", store.pid())).unwrap();
    assert!(
        maps.contains("/memfd:trove"),
        "the arena is a memfd:\n{maps}"
    );
    assert!(!maps.contains("/dev/shm"), "{maps}");
}
register!(security_arena_has_no_name);

fn stall_ids(n: u64) -> Vec<trove_store::ObjectId> {
    (0..n)
        .map(|i| trove_store::ObjectId::from_parts([7; 12], i))
        .collect()
}

/// Role `SecStall`: watch `n` ids, then never read the notification ring.
pub fn stall_role(socket: &Path, n: u64) -> Result<(), Box<dyn std::error::Error>> {
    let c = StoreClient::connect(socket)?;
    c.wait_ready(&stall_ids(n), n as usize, Some(std::time::Instant::now()))?;
    c.flush()?;
    say("WATCHING");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

pub fn security_a_client_that_stops_reading_cannot_stall_others() {
    let store = TestStore::start("64MiB");
    let n = 6000; // about three times what the stalled client's ring holds
    let mut stalled = Helper::start(Role::SecStall {
        socket: store.socket.clone(),
        n,
    });
    stalled.expect_line("WATCHING", T);
    let c = store.client();
    // Every seal notifies the stalled client: its ring fills, the rest is kept aside, and the
    // daemon goes on serving everybody else.
    for id in stall_ids(n) {
        c.put(id, &[1u8; 64]).unwrap();
    }
    let other = store.client();
    let probe = trove_store::ObjectId::random();
    other.put(probe, b"still served").unwrap();
    assert_eq!(&*other.get(probe, T).unwrap(), b"still served");
    assert_eq!(c.stats().unwrap().objects, n + 1);
    stalled.kill9();
    let mut ids = stall_ids(n);
    ids.push(probe);
    c.delete(&ids).unwrap();
    crate::util::wait_until(T, "used bytes back to zero", || {
        c.stats().unwrap().used == 0
    });
}
register!(security_a_client_that_stops_reading_cannot_stall_others);
