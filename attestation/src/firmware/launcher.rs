//! Performs an SNP launch from the artifacts a VM boots, page by page, as
//! QEMU does with `sev-snp-guest` and `kernel-hashes=on`: the OVMF image,
//! its SEV metadata sections (with the kernel-hashes page of a direct boot
//! of kernel, initrd and command line), then one VMSA per vCPU. The digest
//! the Secure Processor computes over them is the guest's measurement.

use std::sync::Arc;

use super::{FirmwareError, LaunchFinish, LaunchedGuest, PageUpdate, SevFirmware, SnpLaunch};
use crate::measurement::{self, DirectBoot, LaunchSink, OvmfImage, VmmType, PAGE_SIZE};

impl LaunchSink for SnpLaunch {
    type Error = FirmwareError;

    fn normal_pages(&mut self, gpa: u64, data: &[u8]) -> Result<(), FirmwareError> {
        self.update(PageUpdate::Normal { gpa, data })
    }

    fn zero_pages(&mut self, gpa: u64, length: u64) -> Result<(), FirmwareError> {
        self.update(PageUpdate::Zero { gpa, length })
    }

    fn unmeasured_pages(&mut self, gpa: u64, length: u64) -> Result<(), FirmwareError> {
        self.update(PageUpdate::Unmeasured { gpa, length })
    }

    fn secrets_page(&mut self, gpa: u64) -> Result<(), FirmwareError> {
        self.update(PageUpdate::Secrets { gpa })
    }

    fn cpuid_page(&mut self, gpa: u64) -> Result<(), FirmwareError> {
        self.update(PageUpdate::Cpuid { gpa })
    }

    fn vmsa_page(&mut self, page: &[u8; PAGE_SIZE]) -> Result<(), FirmwareError> {
        self.update(PageUpdate::Vmsa { page })
    }
}

/// The artifacts of an SNP guest, as handed to the VMM.
#[derive(Debug, Clone, Copy)]
pub struct GuestArtifacts<'a> {
    /// The OVMF firmware image.
    pub ovmf: &'a [u8],
    /// A kernel booted directly, with its initrd and command line.
    pub direct_boot: Option<DirectBoot<'a>>,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// The vCPU signature (CPUID 1 EAX) of the vCPU model.
    pub vcpu_sig: u64,
    /// SEV_FEATURES of the guest (0x1: SNP alone).
    pub guest_features: u64,
}

/// Launches an SNP guest from `artifacts` with `policy`, finishing with
/// `finish`. Any failure tears the launch down and frees its ASID.
pub fn launch_snp_guest(
    firmware: Arc<dyn SevFirmware>,
    artifacts: &GuestArtifacts<'_>,
    policy: u64,
    finish: &LaunchFinish,
) -> Result<LaunchedGuest, FirmwareError> {
    let ovmf = OvmfImage::parse(artifacts.ovmf)?;
    let plan = measurement::SnpLaunch {
        ovmf: &ovmf,
        vcpus: artifacts.vcpus,
        vcpu_sig: artifacts.vcpu_sig,
        guest_features: artifacts.guest_features,
        vmm: VmmType::Qemu,
        direct_boot: artifacts.direct_boot,
        ovmf_hash: None,
    };
    let mut launch = SnpLaunch::start(firmware, policy)?;
    measurement::snp_launch_pages(&plan, &mut launch)?;
    launch.finish(finish)
}
