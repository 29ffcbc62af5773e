//! Random, truncated and hostile frames leave the daemon serving correctly.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use trove_store::{ObjectId, Timeout};

use crate::util::{TestStore, pattern};

/// Connects raw and reads (discards) the welcome.
fn raw(store: &TestStore) -> UnixStream {
    let s = UnixStream::connect(&store.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut len = [0u8; 4];
    (&s).read_exact(&mut len).unwrap();
    let mut body = vec![0; u32::from_le_bytes(len) as usize];
    (&s).read_exact(&mut body).unwrap();
    s
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

pub fn store_random_and_truncated_frames_leave_the_daemon_serving() {
    let store = TestStore::start("16MiB");
    let good = store.client();
    let keep = ObjectId::random();
    good.put(keep, &pattern(1, 10_000)).unwrap();
    // Hostile creates may evict unpinned objects (that is the cache doing its job): pin `keep`.
    let kept = good.get(keep, Timeout::Poll).unwrap();
    let mut rng = StdRng::seed_from_u64(0x7A0E);
    let mut sent = 0;
    for conn in 0..60 {
        let mut s = raw(&store);
        for _ in 0..50 {
            let kind = rng.random_range(0..5);
            let bytes = match kind {
                // Random body with a valid length prefix.
                0 => {
                    let n = rng.random_range(1..64);
                    frame(&(0..n).map(|_| rng.random::<u8>()).collect::<Vec<_>>())
                }
                // A known opcode with a random, usually wrong, payload.
                1 => {
                    let mut b = vec![rng.random_range(1..19u8)];
                    b.extend_from_slice(&rng.random::<u64>().to_le_bytes());
                    let n = rng.random_range(0..48);
                    b.extend((0..n).map(|_| rng.random::<u8>()));
                    frame(&b)
                }
                // Hostile but well-formed: huge creates, bogus releases, evict everything.
                2 => {
                    let mut b = vec![1u8];
                    b.extend_from_slice(&9u64.to_le_bytes());
                    b.extend_from_slice(&ObjectId::random().0);
                    b.extend_from_slice(&rng.random::<u64>().to_le_bytes());
                    frame(&b)
                }
                3 => {
                    let mut b = vec![10u8];
                    b.extend_from_slice(&0u64.to_le_bytes());
                    b.extend_from_slice(&ObjectId::random().0);
                    frame(&b)
                }
                // A Wait whose id count does not match the frame.
                4 => {
                    let mut b = vec![4u8];
                    b.extend_from_slice(&5u64.to_le_bytes());
                    b.extend_from_slice(&0u64.to_le_bytes());
                    b.extend_from_slice(&rng.random::<u32>().to_le_bytes());
                    frame(&b)
                }
                _ => unreachable!(),
            };
            sent += 1;
            if s.write_all(&bytes).is_err() {
                break;
            }
        }
        // A truncated frame: the prefix promises more than is sent, then the client goes.
        let mut f = frame(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        f.truncate(rng.random_range(1..f.len()));
        let _ = s.write_all(&f);
        sent += 1;
        // Every few connections, an absurd length prefix.
        if conn % 7 == 0 {
            let _ = s.write_all(&u32::MAX.to_le_bytes());
        }
        drop(s);
    }
    assert!(sent > 1000, "{sent}");
    eprintln!("fuzz: {sent} hostile frames on 60 connections");
    // The daemon still serves, and its table is intact: only what clients created and sealed
    // (random creates from hostile connections were aborted when those connections closed).
    let probe = ObjectId::random();
    good.put(probe, b"after the storm").unwrap();
    assert_eq!(
        good.get(probe, Timeout::Poll).unwrap().as_slice(),
        b"after the storm"
    );
    assert_eq!(kept.as_slice(), pattern(1, 10_000).as_slice());
    drop(kept);
    crate::util::wait_until(
        Duration::from_secs(20),
        "hostile clients to be gone",
        || good.stats().unwrap().clients == 1,
    );
    let s = good.stats().unwrap();
    assert_eq!((s.objects, s.sealed), (2, 2), "{s:?}");
    assert_eq!(s.pinned, 0);
}
