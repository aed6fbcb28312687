//! A VM's launch on this host: through the simulated Secure Processor over
//! exactly the artifacts QEMU is given, with the owner's ID block, and the
//! SNP kernel-hashes page QEMU is handed. What a launch must measure is
//! [`crate::launch`]'s, shared with the tenant's CLI.

use std::path::Path;
use std::sync::Arc;

use hsev_attestation::firmware::launcher::{launch_snp_guest, GuestArtifacts};
use hsev_attestation::firmware::{LaunchFinish, LaunchedGuest, SevFirmware};
use hsev_attestation::measurement::{self, OvmfImage, SectionType, SevHashes};

use crate::daemon::error::OpError;
use crate::hypervisor::KernelHashesPage;
use crate::launch::{host_data, vcpu_sig, ImageBytes};
use crate::model::{VmId, VmSpec};

fn measurement_error(error: measurement::MeasurementError) -> OpError {
    OpError::precondition(format!("the image cannot be measured: {error}"))
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
        vcpu_sig: vcpu_sig(&spec.vcpu_type)?,
        guest_features: 1,
    };
    let finish = LaunchFinish {
        id_block: spec
            .id_block
            .as_ref()
            .map(|id_block| id_block.signed.clone()),
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
