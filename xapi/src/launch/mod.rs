//! What a VM's launch measures, computed alike by the host (hsevd's expected
//! measurement, the simulated launch) and by the tenant's own CLI from its
//! own copy of the image (the release policy it pins, the ID block it
//! signs): the artifacts' bytes, the guest's kernel command line, the host
//! data that names the VM, and the expected launch measurement.
//!
//! Pure computation over bytes and files: it never starts anything, never
//! touches the store or the network. The two sides agree because they run
//! this same code; neither has to trust the other's number.

pub mod manifest;

use std::path::{Path, PathBuf};

use hsev_attestation::measurement::{
    self, vcpu_sig_for_type, DirectBoot, OvmfImage, SevEsLaunch, SnpLaunch, VmmType,
};

use crate::model::{ConfidentialMode, VmId, VmSpec};

/// Why a launch cannot be computed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// An artifact cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The artifact.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The vCPU type has no known signature.
    #[error("unknown vCPU type {0:?}")]
    UnknownVcpuType(String),
    /// The firmware cannot be measured (no SEV metadata, ...).
    #[error("the image cannot be measured: {0}")]
    Measurement(#[from] measurement::MeasurementError),
}

/// Where an image's artifacts are.
#[derive(Debug, Clone)]
pub struct ArtifactPaths {
    /// The OVMF firmware.
    pub firmware: PathBuf,
    /// The kernel, for a direct boot.
    pub kernel: Option<PathBuf>,
    /// The initrd, for a direct boot.
    pub initrd: Option<PathBuf>,
}

/// The bytes of an image's artifacts and the command line its guest gets.
#[derive(Debug)]
pub struct ImageBytes {
    /// The firmware.
    pub firmware: Vec<u8>,
    kernel: Vec<u8>,
    initrd: Vec<u8>,
    cmdline: String,
    measured_direct_boot: bool,
}

impl ImageBytes {
    /// Reads an image's artifacts; `cmdline` is the guest's whole command
    /// line ([`guest_cmdline`]), `measured_direct_boot` whether the
    /// firmware measures the kernel, initrd and command line.
    pub fn read(
        paths: &ArtifactPaths,
        cmdline: &str,
        measured_direct_boot: bool,
    ) -> Result<Self, LaunchError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| LaunchError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        Ok(ImageBytes {
            firmware: read(&paths.firmware)?,
            kernel: paths
                .kernel
                .as_deref()
                .map(read)
                .transpose()?
                .unwrap_or_default(),
            initrd: paths
                .initrd
                .as_deref()
                .map(read)
                .transpose()?
                .unwrap_or_default(),
            cmdline: cmdline.to_owned(),
            measured_direct_boot,
        })
    }

    /// The direct boot, when the firmware measures it.
    pub fn direct_boot(&self) -> Option<DirectBoot<'_>> {
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

/// The kernel command line of `vm`'s guest: the image's, then what its agent
/// needs to reach its tenant's key broker. Measured with the kernel, so a
/// host that points the guest at another broker (or another pin) changes
/// the measurement.
pub fn guest_cmdline(image_cmdline: &str, vm: &VmId, spec: &VmSpec) -> String {
    match &spec.key_broker {
        Some(binding) => format!("{image_cmdline} {}", binding.cmdline_options(vm)),
        None => image_cmdline.to_owned(),
    }
}

/// The CPUID signature of `vcpu_type`.
pub fn vcpu_sig(vcpu_type: &str) -> Result<u64, LaunchError> {
    vcpu_sig_for_type(vcpu_type)
        .map(u64::from)
        .ok_or_else(|| LaunchError::UnknownVcpuType(vcpu_type.to_owned()))
}

/// The launch measurement a VM of `spec` booting `image` must show: 48
/// bytes for SEV-SNP, 32 for SEV and SEV-ES, none for ordinary VMs.
pub fn expected_measurement(spec: &VmSpec, image: &ImageBytes) -> Result<Vec<u8>, LaunchError> {
    if spec.mode == ConfidentialMode::None {
        return Ok(Vec::new());
    }
    let ovmf = OvmfImage::parse(&image.firmware)?;
    let vcpus = spec.vcpus as usize;
    Ok(match spec.mode {
        ConfidentialMode::SevSnp => measurement::snp_launch_digest(&SnpLaunch {
            ovmf: &ovmf,
            vcpus,
            vcpu_sig: vcpu_sig(&spec.vcpu_type)?,
            guest_features: 1,
            vmm: VmmType::Qemu,
            direct_boot: image.direct_boot(),
            ovmf_hash: None,
        })?
        .launch_digest
        .to_vec(),
        ConfidentialMode::SevEs => measurement::seves_launch_digest(&SevEsLaunch {
            ovmf: &ovmf,
            vcpus,
            vcpu_sig: vcpu_sig(&spec.vcpu_type)?,
            vmm: VmmType::Qemu,
            direct_boot: image.direct_boot(),
        })?
        .launch_digest
        .to_vec(),
        ConfidentialMode::Sev => {
            measurement::sev_launch_digest(&ovmf, image.direct_boot().as_ref())?.to_vec()
        }
        ConfidentialMode::None => Vec::new(),
    })
}
