//! The `hsev` command line: one module per command group, and the output
//! conventions they share.

pub mod attest;
pub mod firmware;
pub mod measure;
pub mod output;
