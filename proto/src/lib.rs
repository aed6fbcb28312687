//! The HyperSEV API, package `hsev.v1`, generated from `proto/hsev/v1/`:
//! messages, gRPC clients and servers; and the pool's internal protocol
//! between coordinator and host agents, `hsev.internal.v1`. The `.proto`
//! files are the contract; this crate only carries their code.

/// Version 1 of the API.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("hsev.v1");

    /// The encoded file descriptor set of every `hsev.v1` file, for gRPC
    /// server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("hsev_v1_descriptor");
}

/// The pool's internal protocol (coordinator <-> host agents).
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod internal {
    tonic::include_proto!("hsev.internal.v1");
}
