//! What helper processes do. Each role prints `READY`/`DONE`-style lines for the parent.

use std::path::Path;
use std::time::Duration;

use trove_store::{ObjectId, StoreClient, Timeout};

use crate::util::{pattern, say};

fn parts(arg: &str) -> Vec<&str> {
    arg.split(':').collect()
}

fn id(s: &str) -> ObjectId {
    s.parse().expect("object id")
}

pub fn helper_role(role: &str, socket: &Path, arg: &str) -> Result<(), Box<dyn std::error::Error>> {
    // Roles that make their own connections.
    match role {
        "pin-stop" => return crate::store_isolation::pin_stop_role(socket, arg),
        "fuzz-hostile" => return crate::store_fuzz::hostile_role(socket),
        _ => {}
    }
    let client = StoreClient::connect(socket)?;
    let p = parts(arg);
    match role {
        // id:len:seed:delay_ms — create and seal a patterned object after a delay.
        "put" => {
            std::thread::sleep(Duration::from_millis(p[3].parse()?));
            let len: usize = p[1].parse()?;
            client.put(id(p[0]), &pattern(p[2].parse()?, len))?;
            say("DONE");
        }
        // id — pin an object and hold it until killed.
        "pin" => {
            let view = client.get(id(p[0]), Duration::from_secs(20))?;
            say(&format!("PINNED {}", view.len()));
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        // id:len — create an object, write it, never seal; hold until killed.
        "create-hold" => {
            let mut w = client.create(id(p[0]), p[1].parse()?)?;
            w.as_mut_slice().fill(0xAB);
            say("CREATED");
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        // id:len:seed — get an object (waiting) and check its bytes.
        "get-check" => {
            let view = client.get(id(p[0]), Duration::from_secs(20))?;
            let want = pattern(p[2].parse()?, p[1].parse()?);
            if view.as_slice() != want.as_slice() {
                return Err("object bytes differ".into());
            }
            say("OK");
        }
        // id — wait forever for an object; report how it ended.
        "wait-forever" => {
            say("WAITING");
            match client.get(id(p[0]), Timeout::Forever) {
                Ok(_) => say("GOT"),
                Err(e) => say(&format!("FAILED {e:?}")),
            }
        }
        other => return Err(format!("unknown role {other}").into()),
    }
    Ok(())
}
