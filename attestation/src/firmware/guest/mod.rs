//! The guest side: how a guest asks its AMD Secure Processor for reports
//! and keys. One trait, three ways:
//!
//! - [`sev_guest::SevGuestDevice`]: `/dev/sev-guest`, through the `sev` crate;
//! - [`tsm::ConfigFsTsm`]: the kernel's configfs-tsm report interface;
//! - [`super::channel::SimulatedChannel`]: the simulated Secure Processor,
//!   reached over a host<->guest channel that the host relays.

pub mod sev_guest;
pub mod tsm;

use super::{FirmwareError, GuestRequest, GuestResponse};

/// A guest's way to its Secure Processor.
pub trait GuestReporter: std::fmt::Debug + Send {
    /// Sends one guest request and waits for the answer.
    fn request(&mut self, request: &GuestRequest) -> Result<GuestResponse, FirmwareError>;
}
