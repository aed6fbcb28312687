//! What a VM boots and must measure, from its image and spec: the expected
//! launch measurement at creation, and at start the launch itself through
//! the simulated Secure Processor with the SNP kernel-hashes page QEMU is
//! given.

use std::path::Path;
use std::sync::Arc;

use hsev_attestation::firmware::launcher::{launch_snp_guest, GuestArtifacts};
use hsev_attestation::firmware::{LaunchFinish, LaunchedGuest, SevFirmware};
use hsev_attestation::measurement::{
    self, vcpu_sig_for_type, DirectBoot, OvmfImage, SectionType, SevEsLaunch, SevHashes, SnpLaunch,
    VmmType,
};

use super::error::OpError;
use super::images::{ImageBoot, ImageFiles};
use crate::hypervisor::KernelHashesPage;
use crate::model::{ConfidentialMode, VmId, VmSpec};

/// The bytes of an image's artifacts.
pub struct ImageBytes {
    firmware: Vec<u8>,
    kernel: Vec<u8>,
    initrd: Vec<u8>,
    cmdline: String,
    measured_direct_boot: bool,
}

impl ImageBytes {
    /// Reads an image's artifacts.
    pub fn read(
        files: &ImageFiles,
        cmdline: &str,
        measured_direct_boot: bool,
    ) -> Result<Self, OpError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|error| {
                OpError::internal(format!("cannot read {}: {error}", path.display()))
            })
        };
        Ok(ImageBytes {
            firmware: read(&files.firmware)?,
            kernel: match &files.boot {
                ImageBoot::Direct { kernel, .. } => read(kernel)?,
                ImageBoot::Disk { .. } => Vec::new(),
            },
            initrd: match &files.boot {
                ImageBoot::Direct {
                    initrd: Some(initrd),
                    ..
                } => read(initrd)?,
                _ => Vec::new(),
            },
            cmdline: cmdline.to_owned(),
            measured_direct_boot,
        })
    }

    /// The direct boot, when the firmware measures it.
    fn direct_boot(&self) -> Option<DirectBoot<'_>> {
        (self.measured_direct_boot && !self.kernel.is_empty()).then(|| DirectBoot {
            kernel: &self.kernel,
            initrd: (!self.initrd.is_empty()).then_some(self.initrd.as_slice()),
            append: Some(&self.cmdline),
        })
    }
}

/// The host data a VM's launch binds: SHA-256 of its id, so a report names
/// the VM it comes from.
pub fn host_data(vm: &VmId) -> [u8; 32] {
    openssl::sha::sha256(vm.0.as_bytes())
}

fn vcpu_sig(spec: &VmSpec) -> Result<u64, OpError> {
    vcpu_sig_for_type(&spec.vcpu_type)
        .map(u64::from)
        .ok_or_else(|| OpError::invalid(format!("unknown vCPU type {:?}", spec.vcpu_type)))
}

fn measurement_error(error: measurement::MeasurementError) -> OpError {
    OpError::precondition(format!("the image cannot be measured: {error}"))
}

/// The launch measurement a VM of `spec` booting `image` must show: 48
/// bytes for SEV-SNP, 32 for SEV and SEV-ES, none for ordinary VMs.
pub fn expected_measurement(spec: &VmSpec, image: &ImageBytes) -> Result<Vec<u8>, OpError> {
    if spec.mode == ConfidentialMode::None {
        return Ok(Vec::new());
    }
    let ovmf = OvmfImage::parse(&image.firmware).map_err(measurement_error)?;
    let vcpus = spec.vcpus as usize;
    Ok(match spec.mode {
        ConfidentialMode::SevSnp => measurement::snp_launch_digest(&SnpLaunch {
            ovmf: &ovmf,
            vcpus,
            vcpu_sig: vcpu_sig(spec)?,
            guest_features: 1,
            vmm: VmmType::Qemu,
            direct_boot: image.direct_boot(),
            ovmf_hash: None,
        })
        .map_err(measurement_error)?
        .launch_digest
        .to_vec(),
        ConfidentialMode::SevEs => measurement::seves_launch_digest(&SevEsLaunch {
            ovmf: &ovmf,
            vcpus,
            vcpu_sig: vcpu_sig(spec)?,
            vmm: VmmType::Qemu,
            direct_boot: image.direct_boot(),
        })
        .map_err(measurement_error)?
        .launch_digest
        .to_vec(),
        ConfidentialMode::Sev => {
            measurement::sev_launch_digest(&ovmf, image.direct_boot().as_ref())
                .map_err(measurement_error)?
                .to_vec()
        }
        ConfidentialMode::None => Vec::new(),
    })
}

/// Launches `vm` through the simulated Secure Processor over exactly the
/// artifacts QEMU will be given.
pub fn simulated_launch(
    firmware: Arc<dyn SevFirmware>,
    vm: &VmId,
    spec: &VmSpec,
    image: &ImageBytes,
) -> Result<LaunchedGuest, OpError> {
    let artifacts = GuestArtifacts {
        ovmf: &image.firmware,
        direct_boot: image.direct_boot(),
        vcpus: spec.vcpus as usize,
        vcpu_sig: vcpu_sig(spec)?,
        guest_features: 1,
    };
    let finish = LaunchFinish {
        id_block: None,
        host_data: host_data(vm),
    };
    Ok(launch_snp_guest(
        firmware,
        &artifacts,
        spec.guest_policy,
        &finish,
    )?)
}

/// Writes the SNP kernel-hashes page QEMU would write on SEV hardware into
/// `run_dir`, and says where it goes in guest memory; `None` when the
/// firmware does not measure a direct boot.
pub fn kernel_hashes_page(
    image: &ImageBytes,
    run_dir: &Path,
) -> Result<Option<KernelHashesPage>, OpError> {
    let Some(boot) = image.direct_boot() else {
        return Ok(None);
    };
    let ovmf = OvmfImage::parse(&image.firmware).map_err(measurement_error)?;
    let table_gpa = ovmf.sev_hashes_table_gpa().map_err(measurement_error)?;
    let mut section_gpa = None;
    for section in ovmf.metadata_items() {
        if section.section_type().map_err(measurement_error)? == SectionType::SnpKernelHashes {
            section_gpa = Some(u64::from(section.gpa));
        }
    }
    let gpa = section_gpa
        .ok_or_else(|| OpError::precondition("the firmware has no SNP_KERNEL_HASHES section"))?;
    let page = SevHashes::new(&boot)
        .construct_page((table_gpa & 0xfff) as usize)
        .map_err(measurement_error)?;
    let path = run_dir.join("sev-hashes.page");
    std::fs::write(&path, page.as_slice())
        .map_err(|error| OpError::internal(format!("cannot write {}: {error}", path.display())))?;
    Ok(Some(KernelHashesPage { path, gpa }))
}
