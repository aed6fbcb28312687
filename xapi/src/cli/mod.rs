//! The `hsev` command line: one module per command group, and the output
//! conventions they share. `attest`, `measure` and `firmware` work offline;
//! `vm`, `host` and `image` talk to hsevd through `client`; `slapos`
//! runs the SlapOS compute-node connector.

pub mod attest;
pub mod client;
pub mod completions;
pub mod firmware;
pub mod host;
pub mod image;
pub mod measure;
pub mod output;
pub mod slapos;
pub mod vm;
pub mod vm_apply;
pub mod vm_spec;
pub mod vm_status;
