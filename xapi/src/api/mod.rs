//! Translation between the domain types and the `hsev.v1` API messages.
//! Services and the CLI speak the messages; the domain never sees them.

pub mod attestation;
pub mod vm;
