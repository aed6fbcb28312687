//! The SlapOS compute-node connector (`hsev slapos node`): HyperSEV as a
//! compute node of a SlapOS master. It owns the node's side of the
//! master's JSON-RPC API (registering one partition per VM slot,
//! reporting HyperSEV's software release, reading each instance placed
//! here, publishing connection parameters, reporting started, stopped,
//! destroyed, error and bang), the checking of instance parameters, and
//! the partition <-> VM mapping, which it keeps in HyperSEV itself as VM
//! names ([`naming`]). It talks to hsevd only through the public `hsev.v1`
//! API with its own token, like any client; it must never reach into
//! hsevd's store, folders or processes, touch a VM that is not named as
//! one of its own, start a VM whose request failed a check, hold a disk
//! key, or set a release policy (the requesters' key broker is only read,
//! with a reader token, [`encrypted_disk`]).

pub mod availability;
pub mod config;
mod converge;
pub mod encrypted_disk;
pub mod hosts;
pub mod ledger;
pub mod master;
pub mod naming;
pub mod node;
pub mod parameters;
pub mod pool;
pub mod publish;
pub mod spec;

pub use config::Config;
pub use node::Node;
