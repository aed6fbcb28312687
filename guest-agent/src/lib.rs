//! `hsev-agent`, the HyperSEV agent inside a confidential guest.
//!
//! It owns the guest side of attestation: asking the platform for an SEV-SNP
//! report bound to data of the guest's choosing, and packaging it as
//! evidence a verifier or key broker accepts. It never holds a host secret
//! and never writes key material to disk.

pub mod tsm;
