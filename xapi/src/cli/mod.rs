//! The `hsev` command line: one module per command group, and the output
//! conventions they share. `attest`, `measure`, `firmware` and `idkey` work
//! offline; `vm`, `host` and `image` talk to hsevd through `client`;
//! `tenant` is what a tenant computes on its own machine, and `kbs` what it
//! pins at its own key broker; `slapos` runs the SlapOS compute-node
//! connector.

pub mod attest;
pub mod client;
pub mod completions;
pub mod firmware;
pub mod host;
pub mod idkey;
pub mod image;
pub mod kbs;
pub mod measure;
pub mod output;
pub mod pool;
pub mod slapos;
pub mod tenant;
pub mod vm;
pub mod vm_apply;
pub mod vm_spec;
pub mod vm_status;
