//! Random, truncated and hostile frames leave the daemon serving correctly.

use std::io::Write;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use trove_store::{DeleteOutcome, ObjectId, StoreError, Timeout};

use trove_store::protocol::Request;

use crate::harness::register;
use crate::util::{TestStore, pattern, raw_connection};

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// Role `FuzzHostile`: hostile frames on 60 raw connections; prints `SENT n`.
pub fn hostile_role(socket: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = StdRng::seed_from_u64(0x7A0E);
    let mut sent = 0;
    for conn in 0..60 {
        let mut s = raw_connection(socket);
        for _ in 0..50 {
            let kind = rng.random_range(0..8);
            let bytes = match kind {
                // Random body with a valid length prefix.
                0 => {
                    let n = rng.random_range(1..64);
                    frame(&(0..n).map(|_| rng.random::<u8>()).collect::<Vec<_>>())
                }
                // A known opcode with a random, usually wrong, payload.
                1 => {
                    let mut b = vec![rng.random_range(1..20u8)];
                    b.extend_from_slice(&rng.random::<u64>().to_le_bytes());
                    let n = rng.random_range(0..48);
                    b.extend((0..n).map(|_| rng.random::<u8>()));
                    frame(&b)
                }
                // Hostile but well-formed: creates that fit (left unsealed), or absurd sizes,
                // bogus releases.
                2 => {
                    let size = if rng.random_range(0..4) == 0 {
                        rng.random::<u64>()
                    } else {
                        rng.random_range(0..1 << 20)
                    };
                    Request::Create {
                        id: ObjectId::random(),
                        size,
                    }
                    .encode(9)
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
                // Well-formed requests of every kind, with random ids, sizes and places.
                _ => well_formed(&mut rng).encode(rng.random_range(0..3)),
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
    crate::util::say(&format!("SENT {sent}"));
    Ok(())
}

/// A random but decodable request (hostile in content: unknown ids, places not granted).
fn well_formed(rng: &mut StdRng) -> Request {
    let id = ObjectId::random();
    let ids = |rng: &mut StdRng| {
        (0..rng.random_range(1..8))
            .map(|_| ObjectId::random())
            .collect()
    };
    match rng.random_range(0..14) {
        0 => Request::Seal { id },
        13 => Request::GiveUp { id },
        1 => Request::Abort { id },
        2 => Request::Wait {
            ids: ids(rng),
            timeout: Some(Duration::from_millis(rng.random_range(0..20))),
        },
        3 => Request::Delete { ids: ids(rng) },
        4 => Request::Hold { id },
        5 => Request::Unhold { id },
        6 => Request::Watch { ids: ids(rng) },
        7 => Request::Slab {
            size: rng.random_range(0..4 << 20),
        },
        8 => Request::PutSmall {
            id,
            offset: rng.random_range(0..16 << 20),
            size: rng.random_range(0..64 << 10),
            owned: Default::default(),
        },
        9 => Request::Release { id },
        10 => Request::Stats,
        11 => Request::Pin { id },
        _ => Request::Evict {
            bytes: rng.random_range(0..1 << 20),
        },
    }
}

pub fn store_random_and_truncated_frames_leave_the_daemon_serving() {
    let store = TestStore::start("16MiB");
    let good = store.client();
    let keep = ObjectId::random();
    good.put(keep, &pattern(1, 10_000)).unwrap();
    // Hostile creates may evict unpinned objects (that is the cache doing its job): pin `keep`.
    let kept = good.get(keep, Timeout::Poll).unwrap();
    // The hostile connections come from another process: connections the daemon cuts off
    // keep what they created until their process is gone.
    let mut h = crate::util::Helper::start(crate::role::Role::FuzzHostile {
        socket: store.socket.clone(),
    });
    let line = h.expect_line("SENT", Duration::from_secs(60));
    assert!(h.wait(Duration::from_secs(30)).success());
    let sent: u64 = line[5..].parse().unwrap();
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
register!(store_random_and_truncated_frames_leave_the_daemon_serving);

/// The model of what the store must hold, kept by the stateful fuzz.
#[derive(Default)]
struct Model {
    /// Plain objects: id -> size.
    plain: std::collections::HashMap<ObjectId, u64>,
    /// Owned objects: id -> (creating connection slot, references per connection slot).
    owned: std::collections::HashMap<ObjectId, (usize, Vec<u64>)>,
}

/// Used bytes the listed objects account for, and their ids.
fn listed(c: &trove_store::StoreClient) -> (u64, std::collections::HashSet<ObjectId>) {
    let l = c.list().unwrap();
    (
        l.iter().map(|o| o.size.max(1).next_multiple_of(64)).sum(),
        l.iter().map(|o| o.id).collect(),
    )
}

/// Well-formed sequences of requests from several connections against a live daemon, seeded
/// (`TROVE_FUZZ_SEED`; the seed is printed) and bounded in steps and time. After each step:
/// the daemon answers, used bytes equal the live objects' sizes, owned objects live exactly
/// while a connection references them, and plain objects stay until deleted (or evicted).
pub fn store_stateful_protocol_fuzz() {
    let seed = std::env::var("TROVE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    eprintln!("stateful fuzz: TROVE_FUZZ_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    // Two clients with a pin bit, the rest overflow clients (their pins kept by the daemon).
    let store = TestStore::start_with_env("32MiB", &[], &[("TROVE_STORE_PIN_CLIENTS", "2")]);
    const CONNS: usize = 4;
    let mut conns: Vec<trove_store::StoreClient> = (0..CONNS).map(|_| store.client()).collect();
    let mut views: Vec<Vec<trove_store::ObjectView>> = (0..CONNS).map(|_| Vec::new()).collect();
    let mut m = Model::default();
    let start = std::time::Instant::now();
    let mut steps = 0;
    let pick = |rng: &mut StdRng, ids: Vec<ObjectId>| -> Option<ObjectId> {
        (!ids.is_empty()).then(|| ids[rng.random_range(0..ids.len())])
    };
    while steps < 3000 && start.elapsed() < Duration::from_secs(30) {
        steps += 1;
        let i = rng.random_range(0..CONNS);
        let c = conns[i].clone();
        let op = rng.random_range(0..12);
        match op {
            // Create a plain object, then seal it (or abort it).
            0 | 1 => {
                let id = ObjectId::random();
                let size = rng.random_range(0..256 << 10);
                let mut w = c.create(id, size).unwrap();
                w.as_mut_slice().fill(size as u8);
                if rng.random_range(0..5) == 0 {
                    w.abort().unwrap();
                } else {
                    w.seal().unwrap();
                    m.plain.insert(id, size);
                }
            }
            // An owned object: small ones in the slab (PutSmall), larger ones created.
            2 | 3 => {
                let id = ObjectId::random();
                let size = if op == 2 {
                    rng.random_range(1..=32 << 10)
                } else {
                    rng.random_range((32 << 10) + 1..256 << 10)
                };
                let mut w = c.alloc_owned(id, size).unwrap();
                w.as_mut_slice().fill(7);
                w.publish(&[]).unwrap();
                let mut refs = vec![0; CONNS];
                refs[i] = 1;
                m.owned.insert(id, (i, refs));
            }
            // Hold an owned object from this connection.
            4 => {
                let live: Vec<ObjectId> = m
                    .owned
                    .iter()
                    .filter(|(_, (_, r))| r.iter().sum::<u64>() > 0)
                    .map(|(id, _)| *id)
                    .collect();
                if let Some(id) = pick(&mut rng, live) {
                    c.hold(&id).unwrap();
                    m.owned.get_mut(&id).unwrap().1[i] += 1;
                }
            }
            // Release one of this connection's references.
            5 => {
                let mine: Vec<ObjectId> = m
                    .owned
                    .iter()
                    .filter(|(_, (_, r))| r[i] > 0)
                    .map(|(id, _)| *id)
                    .collect();
                if let Some(id) = pick(&mut rng, mine) {
                    c.release(&id);
                    m.owned.get_mut(&id).unwrap().1[i] -= 1;
                }
            }
            // Hold and unhold an id that never exists; watch ids, some never existing.
            6 => {
                let id = ObjectId::random();
                c.hold(&id).unwrap();
                c.release(&id);
                let mut ids: Vec<ObjectId> = (0..rng.random_range(1..20))
                    .map(|_| ObjectId::random())
                    .collect();
                ids.extend(m.plain.keys().take(3));
                c.wait_ready(&ids, ids.len(), Some(std::time::Instant::now()))
                    .unwrap();
            }
            // Delete: a plain object (anyone may), or an owned one (only its owner may).
            7 => {
                let plain: Vec<ObjectId> = m.plain.keys().copied().collect();
                if let Some(id) = pick(&mut rng, plain) {
                    let out = c.delete(&[id]).unwrap()[0];
                    assert!(
                        matches!(
                            out,
                            DeleteOutcome::Deleted
                                | DeleteOutcome::Deferred
                                | DeleteOutcome::NotFound
                        ),
                        "{out:?}"
                    );
                    m.plain.remove(&id);
                }
                let others: Vec<ObjectId> = m
                    .owned
                    .iter()
                    .filter(|(_, (owner, r))| *owner != i && r.iter().sum::<u64>() > 0)
                    .map(|(id, _)| *id)
                    .collect();
                if let Some(id) = pick(&mut rng, others) {
                    assert_eq!(c.delete(&[id]).unwrap(), vec![DeleteOutcome::NotOwner]);
                }
            }
            // Pin a plain object with a view; drop views.
            8 => {
                let plain: Vec<ObjectId> = m.plain.keys().copied().collect();
                if let Some(id) = pick(&mut rng, plain)
                    && let Ok(v) = c.get(id, Timeout::Poll)
                {
                    assert_eq!(v.len() as u64, m.plain[&id]);
                    views[i].push(v);
                }
                if rng.random_range(0..3) == 0 {
                    views[i].clear();
                }
            }
            // A small put under an id that exists: rejected, and an error on get.
            9 => {
                let plain: Vec<ObjectId> = m.plain.keys().copied().collect();
                if let Some(id) = pick(&mut rng, plain) {
                    let mut w = c.alloc_owned(id, 16).unwrap();
                    w.as_mut_slice().fill(1);
                    w.publish(&[]).unwrap();
                    c.stats().unwrap();
                    let r = c.get(id, Timeout::Poll);
                    assert!(
                        matches!(r, Err(StoreError::PutRejected { .. })),
                        "{:?}",
                        r.map(|v| v.len())
                    );
                    c.release(&id);
                }
            }
            // Evict a little.
            10 => {
                c.evict(rng.random_range(0..1 << 20)).unwrap();
            }
            // Disconnect: the connection's references and pins go with it.
            _ => {
                views[i].clear();
                drop(c);
                conns[i] = store.client();
                for (_, r) in m.owned.values_mut() {
                    r[i] = 0;
                }
                let c = conns[(i + 1) % CONNS].clone();
                crate::util::wait_until(Duration::from_secs(20), "the departure", || {
                    c.stats().unwrap().clients == CONNS as u64
                });
            }
        }
        // The acting connection's reply proves its frames handled.
        let c = &conns[i];
        let s = c.stats().unwrap();
        let (used, ids) = listed(c);
        // Owned objects live exactly while referenced; a departure is applied asynchronously.
        let settled = || {
            let (_, ids) = listed(c);
            m.owned
                .iter()
                .all(|(id, (_, r))| ids.contains(id) == (r.iter().sum::<u64>() > 0))
        };
        crate::util::wait_until(Duration::from_secs(20), "owned objects to match", settled);
        assert_eq!(s.used, used, "step {steps} (op {op}), seed {seed}: {s:?}");
        assert_eq!(s.objects as usize, ids.len(), "step {steps}, seed {seed}");
        if s.evictions == 0 {
            for id in m.plain.keys() {
                assert!(
                    ids.contains(id),
                    "step {steps}, seed {seed}: plain {id} lost"
                );
            }
        } else {
            m.plain.retain(|id, _| ids.contains(id));
        }
        m.owned.retain(|_, (_, r)| r.iter().sum::<u64>() > 0);
    }
    eprintln!("stateful fuzz: {steps} steps in {:?}", start.elapsed());
    // Everything let go: the store is empty, with every connection alive.
    for v in &mut views {
        v.clear();
    }
    for (id, (_, r)) in &m.owned {
        for (i, n) in r.iter().enumerate() {
            for _ in 0..*n {
                conns[i].release(id);
            }
        }
    }
    let ids: Vec<ObjectId> = m.plain.keys().copied().collect();
    if !ids.is_empty() {
        conns[0].delete(&ids).unwrap();
    }
    for c in &conns {
        c.stats().unwrap();
    }
    crate::util::wait_until(Duration::from_secs(20), "an empty store", || {
        let s = conns[0].stats().unwrap();
        (s.objects, s.used, s.pinned) == (0, 0, 0)
    });
}
register!(store_stateful_protocol_fuzz);
