//! The bytes that travel in mailboxes, and the failure reports left in the store for calls
//! that did not produce a value.

use trove_store::OwnedWriter;
use trove_store::protocol::Owned;
use trove_store::{ObjectId, StoreClient, StoreError};

/// A call whose arguments follow inline.
pub const KIND_CALL: u8 = 1;
/// A call whose arguments are in a store object (the 20-byte id follows).
pub const KIND_CALL_BY_OBJECT: u8 = 2;
/// Stop the consumer after the messages before this one.
pub const KIND_STOP: u8 = 3;
/// A bit of the kind byte: the call is run again after its consumer died (a retry). Its
/// result always goes to the store: its caller may be watching another record.
pub const FLAG_RETRIED: u8 = 0x80;

/// Bytes before the arguments: kind, function, result id, reply-to index and pid.
pub const CALL_HEADER: usize = 1 + 8 + 20 + 4 + 4;

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: u8,
    /// A retry ([`FLAG_RETRIED`]).
    pub retried: bool,
    /// The address of the trampoline to run (same binary in every process of the tree).
    pub func: u64,
    /// Where the result goes.
    pub result: ObjectId,
    /// The caller: (client index, pid) for `Owned::pin_for`.
    pub reply_to: (u32, u32),
    pub args: &'a [u8],
}

impl<'a> Message<'a> {
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.clear();
        out.resize(CALL_HEADER, 0);
        self.write_header(out);
        out.extend_from_slice(self.args);
    }

    /// Writes the header (all but `args`) over the first [`CALL_HEADER`] bytes of `out`.
    ///
    /// # Panics
    /// If `out` is shorter than that.
    pub fn write_header(&self, out: &mut [u8]) {
        let out = &mut out[..CALL_HEADER];
        out[0] = self.kind | if self.retried { FLAG_RETRIED } else { 0 };
        out[1..9].copy_from_slice(&self.func.to_le_bytes());
        out[9..29].copy_from_slice(self.result.as_bytes());
        out[29..33].copy_from_slice(&self.reply_to.0.to_le_bytes());
        out[33..37].copy_from_slice(&self.reply_to.1.to_le_bytes());
    }

    /// Decodes a message or its header (the `current` record); `None` if malformed.
    pub fn decode(b: &'a [u8]) -> Option<Message<'a>> {
        let kind = b.first()? & !FLAG_RETRIED;
        if b.len() < CALL_HEADER || !matches!(kind, KIND_CALL | KIND_CALL_BY_OBJECT | KIND_STOP) {
            return None;
        }
        Some(Message {
            kind,
            retried: b[0] & FLAG_RETRIED != 0,
            func: u64::from_le_bytes(b[1..9].try_into().ok()?),
            result: ObjectId(b[9..29].try_into().ok()?),
            reply_to: (
                u32::from_le_bytes(b[29..33].try_into().ok()?),
                u32::from_le_bytes(b[33..37].try_into().ok()?),
            ),
            args: &b[CALL_HEADER..],
        })
    }
}

/// Why a call has no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Failure {
    /// The method returned an error or panicked.
    TaskFailed = 1,
    /// The actor's process died.
    ActorDied = 2,
    /// The call was cancelled before it ran (or, forced, while it ran).
    Cancelled = 3,
}

/// Stores `bytes` as the call result `result` for the caller `reply_to`, which gets the only
/// reference (`Owned::pin_for`); `error` if they are a failure report. Returns where it is
/// (offset, length).
pub fn store_result(
    client: &StoreClient,
    result: ObjectId,
    reply_to: (u32, u32),
    bytes: &[u8],
    error: bool,
) -> Result<(u64, u64), StoreError> {
    let mut w: OwnedWriter = client.alloc_owned(result, bytes.len() as u64)?;
    w.as_mut_slice().copy_from_slice(bytes);
    let place = (w.offset(), bytes.len() as u64);
    w.publish_with(Owned {
        error,
        pin_for: Some(reply_to),
        ..Owned::default()
    })?;
    Ok(place)
}

/// Leaves a failure report as the call's result object, for the caller `reply_to`; returns
/// where it is (offset, length). A report that already exists (two processes reporting the
/// same death) is not an error (`Ok(None)`).
pub fn report_failure(
    client: &StoreClient,
    result: ObjectId,
    reply_to: (u32, u32),
    failure: Failure,
    message: &str,
) -> Result<Option<(u64, u64)>, StoreError> {
    match store_result(
        client,
        result,
        reply_to,
        &failure_bytes(failure, message),
        true,
    ) {
        Ok(place) => Ok(Some(place)),
        Err(StoreError::AlreadyExists(_)) => Ok(None),
        Err(e) => {
            // Not even the report fits (a full store): the id is given up, so that its caller
            // learns it is lost rather than waiting for it.
            let _ = client.give_up(result);
            Err(e)
        }
    }
}

/// A failure report's bytes: the kind, then the message.
pub fn failure_bytes(failure: Failure, message: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(1 + message.len());
    bytes.push(failure as u8);
    bytes.extend_from_slice(message.as_bytes());
    bytes
}

/// Decodes a failure report's bytes.
pub fn decode_failure(bytes: &[u8]) -> (Failure, String) {
    let kind = match bytes.first() {
        Some(2) => Failure::ActorDied,
        Some(3) => Failure::Cancelled,
        _ => Failure::TaskFailed,
    };
    let msg = String::from_utf8_lossy(bytes.get(1..).unwrap_or(&[])).into_owned();
    (kind, msg)
}
