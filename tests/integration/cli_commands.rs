//! The `trove` CLI against a running store: put, get, status.

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
