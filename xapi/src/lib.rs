//! The HyperSEV toolstack: the `hsev` command-line interface and, later, the
//! host agent and pool coordinator.

pub mod api;
pub mod cli;
