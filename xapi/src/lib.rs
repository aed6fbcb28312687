//! The HyperSEV toolstack: the domain model, the store, the hypervisor
//! drivers, the `hsevd` host agent and pool coordinator, and the `hsev`
//! command-line interface, and the SlapOS compute-node connector.

pub mod api;
pub mod cli;
pub mod coordinator;
pub mod daemon;
pub mod host_agent;
pub mod hypervisor;
pub mod launch;
pub mod model;
pub mod placement;
pub mod pool;
pub mod slapos;
pub mod store;
