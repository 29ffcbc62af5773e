//! Helper roles that use the `trove` client API (`TroveRole`, `Role::TroveEmbedded`). They run
//! on the main thread of a fresh process, before any other thread exists, so `trove::init` may
//! fork.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use trove::{Config, Error, ObjectId, ObjectRef};

use crate::role::TroveRole;
use crate::util::say;

type Res = Result<(), Box<dyn std::error::Error>>;

const T: Duration = Duration::from_secs(30);

/// The value the producer stores as object `i`.
pub fn produced(i: u64) -> Vec<u64> {
    (0..i % 50).map(|k| i * 1000 + k).collect()
}

pub fn helper_role(role: TroveRole, socket: &Path) -> Res {
    let rt = trove::init(Config::default().store(socket))?;
    match role {
        // Announce an in-place object, fill and seal it after a delay, keep it until the ack
        // object exists.
        TroveRole::CreateLater { n, delay_ms, ack } => {
            let mut b = rt.create::<u64>(n)?;
            say(&format!("ID {}", b.id()));
            std::thread::sleep(Duration::from_millis(delay_ms));
            for (i, x) in b.iter_mut().enumerate() {
                *x = i as u64 * 3;
            }
            let r = b.seal()?;
            rt.store().get(ack, T)?;
            drop(r);
            say("DONE");
        }
        // Announce an in-place object and never seal it (killed by the test).
        TroveRole::CreateHold { n } => {
            let b = rt.create::<u64>(n)?;
            say(&format!("ID {}", b.id()));
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        // Get an object of n u64s written by create-later and check it.
        TroveRole::GetU64s { id, n } => {
            let r = ObjectRef::<[u64]>::from_id(id);
            let v = r.get_timeout(T)?;
            if v.len() != n || v.iter().enumerate().any(|(i, x)| *x != i as u64 * 3) {
                return Err("wrong contents".into());
            }
            say("OK");
        }
        // Wait without a timeout; report how it ended.
        TroveRole::WaitForever { id } => {
            let r = ObjectRef::<[u64]>::from_id(id);
            say("WAITING");
            match r.get() {
                Ok(_) => say("GOT"),
                Err(e) => say(&format!("FAILED {e:?}")),
            }
        }
        TroveRole::Timeouts => timeouts(&rt)?,
        TroveRole::WrongType => wrong_type(&rt)?,
        // Put `count` objects and one holding refs to them all.
        TroveRole::Produce { count, ack } => {
            let mut refs = Vec::new();
            for i in 0..count {
                refs.push(rt.put(&produced(i))?);
            }
            // Some large objects too (created by the daemon, not in a slab).
            let big: Vec<ObjectRef<[u8]>> = (0..4)
                .map(|i| rt.put_bytes(&vec![i as u8; 100_000]))
                .collect::<Result<_, _>>()?;
            let container = rt.put(&(refs, big))?;
            say(&format!("ID {}", container.id()));
            rt.store().get(ack, T)?;
            drop(container);
            say("DONE");
        }
        // Read everything through the container, then ack and drop.
        TroveRole::Consume {
            container,
            count,
            ack,
        } => {
            type Payload = (Vec<ObjectRef<Vec<u64>>>, Vec<ObjectRef<[u8]>>);
            let container = ObjectRef::<Payload>::from_id(container);
            let (refs, big) = container.get_timeout(T)?.deserialize()?;
            drop(container);
            if refs.len() as u64 != count || big.len() != 4 {
                return Err("wrong container".into());
            }
            rt.store().put(ack, b"ack")?;
            for (i, r) in refs.iter().enumerate() {
                let v = r.get_timeout(T)?;
                let want = produced(i as u64);
                if v.len() != want.len() || v.iter().zip(&want).any(|(a, b)| a.to_native() != *b) {
                    return Err(format!("object {i} differs").into());
                }
            }
            for (i, b) in big.iter().enumerate() {
                let v = b.get_timeout(T)?;
                if v.len() != 100_000 || v.iter().any(|x| *x != i as u8) {
                    return Err(format!("large object {i} differs").into());
                }
            }
            say("DONE");
        }
    }
    Ok(())
}

fn timeouts(rt: &trove::Runtime) -> Res {
    let a = rt.put(&7u32)?;
    let never = ObjectRef::<u32>::from_id(ObjectId::random());
    let t = Instant::now();
    match never.get_timeout(Duration::from_millis(200)) {
        Err(Error::Timeout(i)) if i == never.id() => {}
        other => return Err(format!("expected Timeout, got {other:?}").into()),
    }
    if t.elapsed() < Duration::from_millis(200) {
        return Err("timed out early".into());
    }
    let refs = [a.clone(), never.clone()];
    let (ready, pending) = rt.wait(&refs, 1, Some(Duration::from_secs(5)))?;
    if ready != [a.clone()] || pending != [never.clone()] {
        return Err("wait(1) wrong".into());
    }
    let t = Instant::now();
    let (ready, pending) = rt.wait(&refs, 2, Some(Duration::from_millis(150)))?;
    if ready.len() != 1 || pending.len() != 1 || t.elapsed() < Duration::from_millis(150) {
        return Err("wait(2) with a timeout wrong".into());
    }
    let (ready, pending) = rt.wait(&refs, 0, None)?;
    if !ready.is_empty() || pending.len() != 2 {
        return Err("wait(0) wrong".into());
    }
    if *a.get()? != 7 {
        return Err("value".into());
    }
    say("OK");
    Ok(())
}

fn wrong_type(rt: &trove::Runtime) -> Res {
    let s = rt.put(&"hello".to_string())?;
    match ObjectRef::<Vec<u64>>::from_id(s.id()).get() {
        Err(Error::Invalid { id, .. }) if id == s.id() => {}
        other => return Err(format!("String as Vec<u64>: {other:?}").into()),
    }
    let b = rt.put_bytes(&[1, 2, 3, 4, 5, 6, 7])?;
    match ObjectRef::<[u64]>::from_id(b.id()).get() {
        Err(Error::Invalid { .. }) => {}
        other => return Err(format!("7 bytes as [u64]: {other:?}").into()),
    }
    // Random bytes written at the store level, read as a map.
    let raw = ObjectId::random();
    let junk: Vec<u8> = (0..256u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    rt.store().put(raw, &junk)?;
    match ObjectRef::<BTreeMap<String, Vec<u32>>>::from_id(raw).get() {
        Err(Error::Invalid { .. }) => {}
        other => return Err(format!("junk as a map: {other:?}").into()),
    }
    // And the right type still reads.
    if ObjectRef::<String>::from_id(s.id()).get()?.as_str() != "hello" {
        return Err("String".into());
    }
    rt.store().delete(&[raw])?;
    say("OK");
    Ok(())
}

/// An embedded store: report it, use it, then hold (`hold`) or shut down.
pub fn embedded(hold: bool) -> Res {
    let rt = trove::init(Config::default().memory(32 << 20))?;
    let pid = rt.embedded_store_pid().ok_or("no embedded store")?;
    let socket = rt.store().socket_path().to_path_buf();
    say(&format!("STORE {pid} {}", socket.display()));
    let r = rt.put(&vec![1u32, 2, 3])?;
    if r.get()?.iter().map(|x| x.to_native()).sum::<u32>() != 6 {
        return Err("sum".into());
    }
    if hold {
        say("HOLDING");
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    }
    drop(r);
    rt.shutdown();
    say("DONE");
    Ok(())
}
