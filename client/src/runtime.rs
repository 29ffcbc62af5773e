//! The process-global runtime (stub: filled in by the client issue).

use trove_store::ObjectId;

/// Takes one more reference to `id` in this process.
pub(crate) fn hold(_id: &ObjectId) {}

/// Drops one reference to `id` in this process.
pub(crate) fn release(_id: &ObjectId) {}
