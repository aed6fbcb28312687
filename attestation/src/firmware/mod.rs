//! The AMD Secure Processor (SEV firmware) behind one trait, with two
//! implementations: the real one over `/dev/sev` ([`sev_device`]) and a
//! simulated one for hosts without SEV ([`simulated`]).
//!
//! The SNP launch order (start, update pages, finish) is enforced by types:
//! an [`SnpLaunch`] can only be updated and finished, only the
//! [`LaunchedGuest`] that finishing yields takes guest requests, and either
//! releases its ASID when dropped. Guest requests (report, extended report, derived key) go to the
//! firmware of that guest only.

pub mod channel;
pub mod guest;
pub mod launcher;
pub mod sev_device;
pub mod simulated;

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::id_block::SignedIdBlock;
use crate::measurement::{MeasurementError, PageType, PAGE_SIZE};
use crate::product::Product;
use crate::report::{FirmwareVersion, TcbVersion};

/// What the platform can do and has left, as `SNP_PLATFORM_STATUS` and the
/// host's ASID accounting report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlatformStatus {
    /// The firmware is simulated: it gives no confidentiality whatsoever.
    pub simulated: bool,
    /// The product line, when known.
    pub product: Option<Product>,
    /// SEV is enabled.
    pub sev_enabled: bool,
    /// SEV-ES is enabled.
    pub sev_es_enabled: bool,
    /// SEV-SNP is enabled.
    pub snp_enabled: bool,
    /// Firmware API version and build.
    pub firmware_version: FirmwareVersion,
    /// TCB currently running.
    pub current_tcb: TcbVersion,
    /// TCB reported in attestation reports (the VCEK's TCB).
    pub reported_tcb: TcbVersion,
    /// TCB committed (the anti-rollback floor).
    pub committed_tcb: TcbVersion,
    /// ASID accounting.
    pub asids: AsidCounts,
    /// The chip id, when the platform reveals it.
    #[serde(serialize_with = "hex_option")]
    pub chip_id: Option<Vec<u8>>,
}

fn hex_option<S: serde::Serializer>(
    bytes: &Option<Vec<u8>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match bytes {
        Some(bytes) => serializer.serialize_some(&hex::encode(bytes)),
        None => serializer.serialize_none(),
    }
}

/// Address-space identifiers: each encrypted guest holds one while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsidCounts {
    /// Every ASID the platform has.
    pub total: u32,
    /// ASIDs usable by plain SEV guests.
    pub sev_pool: u32,
    /// ASIDs usable by SEV-ES and SEV-SNP guests.
    pub sev_es_snp_pool: u32,
    /// SEV-ES/SNP ASIDs not in use now.
    pub free: u32,
}

/// A firmware operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    /// The firmware, or this implementation of it, cannot do this.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// No SEV firmware device on this host.
    #[error("no SEV firmware: {0}")]
    Unavailable(String),
    /// SNP is not enabled on the platform.
    #[error("SEV-SNP is not enabled on this platform")]
    SnpDisabled,
    /// Every SEV-ES/SNP ASID is in use.
    #[error("no free ASID: all {0} SEV-ES/SNP ASIDs are in use")]
    NoFreeAsid(u32),
    /// The guest policy is malformed or asks for something the platform
    /// refuses (the firmware's `POLICY_FAILURE`).
    #[error("guest policy {policy:#x} refused: {reason}")]
    PolicyRefused {
        /// The policy.
        policy: u64,
        /// Why.
        reason: String,
    },
    /// A page update that breaks the launch's rules.
    #[error("launch update refused: {0}")]
    BadUpdate(String),
    /// The ID block does not match the launch (`BAD_MEASUREMENT`, `BAD_SIGNATURE`).
    #[error("ID block refused: {0}")]
    IdBlock(String),
    /// A guest request with invalid parameters.
    #[error("guest request refused: {0}")]
    BadRequest(String),
    /// The launch was already finished or torn down.
    #[error("unknown launch {0}")]
    UnknownLaunch(u64),
    /// A measurement input is malformed.
    #[error(transparent)]
    Measurement(#[from] MeasurementError),
    /// The simulated platform's state cannot be read or written.
    #[error("simulated firmware state {path}: {problem}")]
    State {
        /// The state file or folder.
        path: String,
        /// What went wrong.
        problem: String,
    },
    /// The real firmware returned an error.
    #[error("SEV firmware: {0}")]
    Device(String),
    /// A cryptographic operation failed.
    #[error("crypto: {0}")]
    Crypto(#[from] openssl::error::ErrorStack),
}

/// One `SNP_LAUNCH_UPDATE`: the page type, where, and for data pages the
/// bytes (a whole number of pages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageUpdate<'a> {
    /// Measured data pages at `gpa`.
    Normal {
        /// Guest-physical address of the first page.
        gpa: u64,
        /// The pages' bytes.
        data: &'a [u8],
    },
    /// `length` bytes of zero pages.
    Zero {
        /// First page.
        gpa: u64,
        /// Bytes, a multiple of the page size.
        length: u64,
    },
    /// `length` bytes of unmeasured pages.
    Unmeasured {
        /// First page.
        gpa: u64,
        /// Bytes, a multiple of the page size.
        length: u64,
    },
    /// The secrets page the firmware fills.
    Secrets {
        /// Its address.
        gpa: u64,
    },
    /// The CPUID page the firmware checks.
    Cpuid {
        /// Its address.
        gpa: u64,
    },
    /// The VMSA (register state) of one vCPU.
    Vmsa {
        /// The page.
        page: &'a [u8; PAGE_SIZE],
    },
}

impl PageUpdate<'_> {
    /// The SNP page type of this update.
    pub fn page_type(&self) -> PageType {
        match self {
            PageUpdate::Normal { .. } => PageType::Normal,
            PageUpdate::Zero { .. } => PageType::Zero,
            PageUpdate::Unmeasured { .. } => PageType::Unmeasured,
            PageUpdate::Secrets { .. } => PageType::Secrets,
            PageUpdate::Cpuid { .. } => PageType::Cpuid,
            PageUpdate::Vmsa { .. } => PageType::Vmsa,
        }
    }
}

/// What `SNP_LAUNCH_FINISH` takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchFinish {
    /// An optional ID block and its authentication, signed by the guest
    /// owner (the firmware refuses a launch that does not match it).
    pub id_block: Option<SignedIdBlock>,
    /// 32 bytes of host data bound into every report (HyperSEV binds the
    /// VM id here).
    pub host_data: [u8; 32],
}

/// Which key a derived key comes from (`MSG_KEY_REQ.ROOT_KEY_SELECT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootKey {
    /// The chip's VCEK secret.
    Vcek,
    /// The VM root key.
    Vmrk,
}

/// A `MSG_KEY_REQ`: a key bound to chosen guest fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DerivedKeyRequest {
    /// The root the key derives from.
    pub root_key: RootKey,
    /// Bit mask of guest fields mixed in: 0 policy, 1 image id, 2 family
    /// id, 3 measurement, 4 guest SVN, 5 TCB version.
    pub guest_field_select: u64,
    /// The VMPL the key is bound to (at least the requester's).
    pub vmpl: u32,
    /// Guest SVN to mix in (at most the guest's).
    pub guest_svn: u32,
    /// TCB to mix in (at most the current TCB).
    pub tcb_version: u64,
}

/// A message from a guest to its firmware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestRequest {
    /// `MSG_REPORT_REQ`.
    Report {
        /// Data bound into the report.
        report_data: [u8; 64],
        /// The VMPL to report.
        vmpl: u32,
    },
    /// `MSG_REPORT_REQ` with the host's certificate table.
    ExtendedReport {
        /// Data bound into the report.
        report_data: [u8; 64],
        /// The VMPL to report.
        vmpl: u32,
    },
    /// `MSG_KEY_REQ`.
    DerivedKey(DerivedKeyRequest),
}

/// The firmware's answer to a [`GuestRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestResponse {
    /// A signed report, raw.
    Report(Vec<u8>),
    /// A signed report and the certificate table
    /// ([`crate::certs::parse_certificate_table`]).
    ExtendedReport {
        /// The raw report.
        report: Vec<u8>,
        /// The certificate table.
        certificates: Vec<u8>,
    },
    /// A 32-byte derived key.
    DerivedKey([u8; 32]),
}

/// Identifies one launch inside one firmware. Only firmware
/// implementations of this crate create them, so the trait is sealed.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct LaunchHandle(pub(crate) u64);

impl fmt::Display for LaunchHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "launch {}", self.0)
    }
}

/// The SEV firmware of one host. Use [`SnpLaunch`] to launch; its
/// low-level methods below are what the launch states call.
pub trait SevFirmware: fmt::Debug + Send + Sync {
    /// Platform status, TCB and ASIDs.
    fn status(&self) -> Result<PlatformStatus, FirmwareError>;
    /// `SNP_LAUNCH_START`: takes an ASID.
    fn launch_start(&self, policy: u64) -> Result<LaunchHandle, FirmwareError>;
    /// `SNP_LAUNCH_UPDATE`.
    fn launch_update(
        &self,
        launch: &LaunchHandle,
        update: PageUpdate<'_>,
    ) -> Result<(), FirmwareError>;
    /// `SNP_LAUNCH_FINISH`: yields the launch digest.
    fn launch_finish(
        &self,
        launch: &LaunchHandle,
        finish: &LaunchFinish,
    ) -> Result<[u8; 48], FirmwareError>;
    /// A guest message from the launched guest `launch`.
    fn guest_request(
        &self,
        launch: &LaunchHandle,
        request: &GuestRequest,
    ) -> Result<GuestResponse, FirmwareError>;
    /// `SNP_DECOMMISSION`: frees the ASID. Never fails.
    fn decommission(&self, launch: &LaunchHandle);
}

/// An SNP launch between `SNP_LAUNCH_START` and `SNP_LAUNCH_FINISH`: pages
/// can be added, reports cannot be asked for yet. Finishing consumes it and
/// yields a [`LaunchedGuest`]; dropping it instead decommissions the guest.
#[derive(Debug)]
pub struct SnpLaunch {
    firmware: Arc<dyn SevFirmware>,
    handle: Option<LaunchHandle>,
    policy: u64,
}

impl SnpLaunch {
    /// `SNP_LAUNCH_START` with a guest policy.
    pub fn start(firmware: Arc<dyn SevFirmware>, policy: u64) -> Result<Self, FirmwareError> {
        let handle = firmware.launch_start(policy)?;
        Ok(SnpLaunch {
            firmware,
            handle: Some(handle),
            policy,
        })
    }

    fn handle(&self) -> Result<&LaunchHandle, FirmwareError> {
        self.handle.as_ref().ok_or(FirmwareError::UnknownLaunch(0))
    }

    /// `SNP_LAUNCH_UPDATE` of one update.
    pub fn update(&mut self, update: PageUpdate<'_>) -> Result<(), FirmwareError> {
        self.firmware.launch_update(self.handle()?, update)
    }

    /// `SNP_LAUNCH_FINISH`: the guest may now run.
    pub fn finish(mut self, finish: &LaunchFinish) -> Result<LaunchedGuest, FirmwareError> {
        let launch_digest = self.firmware.launch_finish(self.handle()?, finish)?;
        let handle = self.handle.take().ok_or(FirmwareError::UnknownLaunch(0))?;
        Ok(LaunchedGuest {
            firmware: Arc::clone(&self.firmware),
            handle,
            launch_digest,
            policy: self.policy,
            host_data: finish.host_data,
        })
    }
}

impl Drop for SnpLaunch {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            self.firmware.decommission(&handle);
        }
    }
}

/// A launched SNP guest: its launch digest, and the channel to its
/// firmware for guest requests. Dropping it decommissions the guest and
/// frees its ASID.
#[derive(Debug)]
pub struct LaunchedGuest {
    firmware: Arc<dyn SevFirmware>,
    handle: LaunchHandle,
    launch_digest: [u8; 48],
    policy: u64,
    host_data: [u8; 32],
}

impl LaunchedGuest {
    /// The launch's id inside its firmware (what a restarted host adopts).
    pub fn id(&self) -> u64 {
        self.handle.0
    }

    /// The launch digest the firmware computed.
    pub fn launch_digest(&self) -> [u8; 48] {
        self.launch_digest
    }

    /// The guest policy it was launched with.
    pub fn policy(&self) -> u64 {
        self.policy
    }

    /// The host data bound at launch.
    pub fn host_data(&self) -> [u8; 32] {
        self.host_data
    }

    /// Relays a guest message to this guest's firmware.
    pub fn request(&self, request: &GuestRequest) -> Result<GuestResponse, FirmwareError> {
        self.firmware.guest_request(&self.handle, request)
    }
}

impl Drop for LaunchedGuest {
    fn drop(&mut self) {
        self.firmware.decommission(&self.handle);
    }
}
