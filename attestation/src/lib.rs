//! HyperSEV attestation: everything needed to decide whether an AMD SEV-SNP
//! guest is genuine and runs what it should.
//!
//! This crate owns the SNP attestation report model ([`report`]), AMD
//! certificate chains with the AMD roots embedded ([`certs`]), the appraisal
//! policy ([`policy`]), the verifier ([`verifier`]), the KDS addresses and
//! offline certificate cache ([`kds`], [`cache`]), the launch-measurement
//! calculator ([`measurement`]), the owner-signed ID blocks that pin a
//! launch ([`id_block`]), the key broker, its protocol and client
//! ([`kbs`]), the status lines a guest agent sends its host
//! ([`agent_status`]), and the tenant's own attestation of its VM
//! ([`tenant_attest`]).
//!
//! Outside [`kbs`] (the key broker, its client and server) it must never
//! touch the network; nowhere may it accept a report on doubt:
//! anything it cannot parse or check is an error or a failed check.

pub mod agent_status;
pub mod cache;
pub mod certs;
pub mod firmware;
mod hex_bytes;
pub mod id_block;
pub mod kbs;
pub mod kds;
pub mod measurement;
pub mod policy;
mod product;
pub mod report;
pub mod tenant_attest;
pub mod verifier;

pub use hex_bytes::HexBytes;
pub use product::{Product, TcbLayout, UnknownProduct};
