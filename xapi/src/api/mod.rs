//! Translation between the domain types and the `hsev.v1` API messages.
//! Services and the CLI speak the messages; the domain never sees them.

pub mod attestation;
pub mod vm;

/// The response header that says an answer was read from one etcd
/// member's copy of the pool, which may be behind (the cluster has no
/// quorum); its value says why. hsevd sets it, `hsev` prints it as a
/// warning.
pub const STALE_HEADER: &str = "hsev-stale";
