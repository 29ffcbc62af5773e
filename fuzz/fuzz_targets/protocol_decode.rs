//! The daemon's protocol decoder on arbitrary bytes: it must return a request or an error,
//! never panic, and a decoded request must encode back to a frame that decodes to itself.
//!
//! `cargo +nightly fuzz run protocol_decode` (from the repository root).
#![no_main]

use libfuzzer_sys::fuzz_target;
use trove_store::protocol::{Reply, Request};

fuzz_target!(|body: &[u8]| {
    if let Ok((req, r)) = Request::decode(body) {
        let frame = r.encode(req);
        let (req2, r2) = Request::decode(&frame[4..]).expect("re-decode");
        assert_eq!((req, r), (req2, r2));
    }
    let _ = Reply::decode(body);
});
