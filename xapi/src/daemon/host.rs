//! This host's capabilities: what the hypervisor driver and the SEV
//! firmware offer, probed at start and on request, kept in the store as
//! JSON so the pool can place VMs.

use serde::{Deserialize, Serialize};

use hsev_attestation::firmware::{PlatformStatus, SevFirmware};

use crate::hypervisor::DriverCapabilities;

/// What the host's SEV firmware offers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SevCapabilities {
    /// The firmware is simulated: no confidentiality.
    pub simulated: bool,
    /// SEV.
    pub sev: bool,
    /// SEV-ES.
    pub sev_es: bool,
    /// SEV-SNP.
    pub snp: bool,
    /// Product name, when known.
    pub product: String,
    /// Firmware version.
    pub firmware_version: String,
    /// Reported TCB.
    pub reported_tcb: String,
    /// ASIDs.
    pub asids_total: u32,
    /// Free ASIDs.
    pub asids_free: u32,
    /// Chip id, hex.
    pub chip_id: String,
    /// ASIDs of the SEV pool (plain SEV guests).
    #[serde(default)]
    pub sev_asids: u32,
    /// ASIDs of the SEV-ES / SNP pool.
    #[serde(default)]
    pub es_snp_asids: u32,
    /// The reported TCB, by component, for placement's TCB floors.
    #[serde(default)]
    pub tcb: Option<hsev_attestation::report::TcbVersion>,
}

/// What a host can run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCapabilities {
    /// Host CPUs.
    pub cpus: u32,
    /// Host memory, MiB.
    pub memory_mib: u64,
    /// `kvm` or `tcg`.
    pub accelerator: String,
    /// Why.
    pub accelerator_reason: String,
    /// The driver.
    pub driver: String,
    /// Its version.
    pub driver_version: String,
    /// The SEV firmware.
    pub sev: SevCapabilities,
    /// Whether guest policies with DEBUG are accepted.
    pub debug_policy_allowed: bool,
    /// The host's labels, for placement (`zone=a`, ...).
    #[serde(default)]
    pub labels: Vec<String>,
    /// The shared folder it keeps disks in (`[pool] shared_dir`), if any.
    #[serde(default)]
    pub shared_dir: Option<String>,
}

/// The SEV part from a firmware status.
pub fn sev_capabilities(status: &PlatformStatus) -> SevCapabilities {
    let version = status.firmware_version;
    SevCapabilities {
        simulated: status.simulated,
        sev: status.sev_enabled,
        sev_es: status.sev_es_enabled,
        snp: status.snp_enabled,
        product: status
            .product
            .map(|product| product.to_string())
            .unwrap_or_default(),
        firmware_version: format!(
            "{}.{} build {}",
            version.major, version.minor, version.build
        ),
        reported_tcb: status.reported_tcb.to_string(),
        asids_total: status.asids.sev_es_snp_pool + status.asids.sev_pool,
        asids_free: status.asids.free,
        sev_asids: status.asids.sev_pool,
        es_snp_asids: status.asids.sev_es_snp_pool,
        tcb: Some(status.reported_tcb),
        chip_id: status
            .chip_id
            .as_deref()
            .map(hex::encode)
            .unwrap_or_default(),
    }
}

/// Combines the driver's probe and the firmware's status.
pub fn capabilities(
    driver: &DriverCapabilities,
    firmware: Option<&dyn SevFirmware>,
    debug_policy_allowed: bool,
) -> HostCapabilities {
    let sev = firmware
        .and_then(|firmware| firmware.status().ok())
        .map(|status| sev_capabilities(&status))
        .unwrap_or_default();
    HostCapabilities {
        cpus: driver.host_cpus,
        memory_mib: driver.host_memory_mib,
        accelerator: driver.accelerator.as_str().to_owned(),
        accelerator_reason: driver.accelerator_reason.clone(),
        driver: driver.driver.clone(),
        driver_version: driver.version.clone(),
        sev,
        debug_policy_allowed,
        labels: Vec::new(),
        shared_dir: None,
    }
}
