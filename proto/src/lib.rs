//! The HyperSEV API, package `hsev.v1`, generated from `proto/hsev/v1/`.
//! The `.proto` files are the contract; this crate only carries their code.

/// Version 1 of the API.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/hsev.v1.rs"));
}
