//! What the store helper roles do (`StoreRole`, whose variants document their arguments).
//! Each prints `READY`/`DONE`-style lines for the parent.

use std::path::Path;
use std::time::Duration;

use trove_store::{StoreClient, Timeout};

use crate::role::StoreRole;
use crate::util::{pattern, say};

pub fn helper_role(role: StoreRole, socket: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let client = StoreClient::connect(socket)?;
    match role {
        StoreRole::Put {
            id,
            len,
            seed,
            delay_ms,
        } => {
            std::thread::sleep(Duration::from_millis(delay_ms));
            client.put(id, &pattern(seed, len))?;
            say("DONE");
        }
        StoreRole::Pin { id } => {
            let view = client.get(id, Duration::from_secs(20))?;
            say(&format!("PINNED {}", view.len()));
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        StoreRole::CreateHold { id, len } => {
            let mut w = client.create(id, len)?;
            w.as_mut_slice().fill(0xAB);
            say("CREATED");
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        StoreRole::GetCheck { id, len, seed } => {
            let view = client.get(id, Duration::from_secs(20))?;
            let want = pattern(seed, len);
            if view.as_slice() != want.as_slice() {
                return Err("object bytes differ".into());
            }
            say("OK");
        }
        StoreRole::WaitForever { id } => {
            say("WAITING");
            match client.get(id, Timeout::Forever) {
                Ok(_) => say("GOT"),
                Err(e) => say(&format!("FAILED {e:?}")),
            }
        }
    }
    Ok(())
}
