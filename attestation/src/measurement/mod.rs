//! Launch-measurement calculator for AMD SEV, SEV-ES and SEV-SNP guests.
//!
//! A faithful port of the reference Python tool
//! [sev-snp-measure](https://github.com/virtee/sev-snp-measure) 0.0.13: for
//! the same inputs it computes byte-identical digests, and `hsev measure`
//! wraps it with the same flags and output.
//!
//! - [`Gctx`]: the SEV-SNP guest-context launch digest, extended page by page
//!   (`digest = SHA-384(PAGE_INFO)`); the simulated AMD Secure Processor
//!   drives it the same way a real `SNP_LAUNCH_UPDATE` would.
//! - [`OvmfImage`] / [`SvsmImage`]: the firmware's OVMF footer table and SEV
//!   metadata.
//! - [`snp_launch_digest`], [`snp_ovmf_hash`], [`svsm_launch_digest`],
//!   [`seves_launch_digest`], [`sev_launch_digest`]: the whole-launch
//!   calculations of the reference's `guest.py`.
//!
//! Everything works on bytes, never on paths: the caller (the CLI, or the
//! simulated Secure Processor, which must measure exactly the bytes it is
//! given) reads the files. No input makes this module panic: malformed
//! firmware, impossible GPAs and sizes are [`MeasurementError`]s.
//!
//! One deliberate divergence from the reference: firmware without the OVMF
//! footer table or without SEV metadata (e.g. Debian's `OVMF_CODE_4M.fd`) is
//! refused in the SNP modes, where the reference prints a digest that no SNP
//! launch of that firmware can produce.
//!
//! Why not the `sev` crate's `measurement` module, also a port of the same
//! tool: it only takes file paths, it lacks the `snp:svsm` mode and the GCE
//! VMM type, and it panics (`assert_eq!`) on malformed firmware.

mod gctx;
mod ovmf;
mod sev_hashes;
mod vcpu_types;
mod vmsa;

use openssl::sha::Sha256;

pub use gctx::{Gctx, PageType, LAUNCH_DIGEST_SIZE, PAGE_INFO_LEN, PAGE_SIZE};
pub use ovmf::{
    Guid, MetadataSection, OvmfImage, SectionType, SvsmImage, FOUR_GB, OVMF_SEV_META_DATA_GUID,
    OVMF_TABLE_FOOTER_GUID, SEV_ES_RESET_BLOCK_GUID, SEV_HASH_TABLE_RV_GUID, SVSM_INFO_GUID,
};
pub use sev_hashes::{DirectBoot, SevHashes, PADDED_TABLE_SIZE};
pub use vcpu_types::{cpu_sig, vcpu_sig_for_type, CPU_SIGS};
pub use vmsa::{VmsaPage, VmsaPages, BSP_EIP, VMSA_PAGE_SIZE};

/// Why a measurement cannot be calculated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeasurementError {
    /// The image cannot even hold the footer table's closing entry.
    #[error("firmware image of {size} bytes is too small to hold an OVMF footer table entry")]
    FirmwareTooSmall {
        /// Image size in bytes.
        size: usize,
    },
    /// A footer table entry declares a size below its own header.
    #[error("invalid OVMF footer table entry size {size} (an entry header alone is 18 bytes)")]
    InvalidFooterEntrySize {
        /// The declared entry size.
        size: u16,
    },
    /// The SEV metadata offset points outside the image.
    #[error(
        "SEV metadata header at {offset_from_end:#x} bytes from the end lies outside the \
         {image_size}-byte firmware image"
    )]
    MetadataOutOfBounds {
        /// Offset of the header from the end of the image.
        offset_from_end: u32,
        /// Image size in bytes.
        image_size: usize,
    },
    /// The SEV metadata header does not start with `ASEV`.
    #[error("wrong SEV metadata signature \"{}\" (expected \"ASEV\")", .signature.escape_ascii())]
    BadMetadataSignature {
        /// The four bytes found.
        signature: [u8; 4],
    },
    /// The SEV metadata version is not 1.
    #[error("wrong SEV metadata version {version} (expected 1)")]
    BadMetadataVersion {
        /// The version found.
        version: u32,
    },
    /// The SEV metadata declares more sections than its bytes hold.
    #[error("SEV metadata declares {declared} sections but its size covers only {available}")]
    MetadataItemsTruncated {
        /// Number of sections declared.
        declared: u32,
        /// Number of complete sections present.
        available: usize,
    },
    /// The firmware has no OVMF footer table at all.
    #[error(
        "firmware carries no OVMF footer table (GUID 96b582de-1fb2-45f7-baea-a366c55a082d \
         32 bytes before its end): it was not built for SEV-SNP"
    )]
    NoFooterTable,
    /// The footer table does not point to SEV metadata.
    #[error(
        "firmware carries no SEV metadata (no dc886566-984a-4798-a75e-5585a7bf67cc entry in \
         its OVMF footer table): it was not built for SEV-SNP"
    )]
    NoSevMetadata,
    /// No SEV-ES reset block entry in the footer table.
    #[error(
        "firmware has no SEV-ES reset block (no 00f771de-1a7e-4fcb-890e-68c77e2fb44e entry in \
         its OVMF footer table)"
    )]
    MissingResetBlock,
    /// No SEV hash table entry in the footer table.
    #[error(
        "firmware has no SEV hashes table entry (no 7255371f-3a3b-4b04-927b-1da6efa8d454 entry \
         in its OVMF footer table)"
    )]
    MissingSevHashTable,
    /// No SVSM information entry in the SVSM image's footer table.
    #[error(
        "SVSM image has no SVSM_INFO entry (a789a612-0597-4c4b-a49f-cbb1fe9d1ddd) in its \
         footer table"
    )]
    MissingSvsmInfo,
    /// A metadata section has a type this calculator does not know.
    #[error("unknown OVMF metadata section type {type_code:#x}")]
    UnknownSectionType {
        /// The raw type code.
        type_code: u32,
    },
    /// A size that must be a whole number of pages is not.
    #[error("{what} size {size:#x} is not a multiple of 4096 bytes")]
    UnalignedSize {
        /// What has the size.
        what: &'static str,
        /// The size in bytes.
        size: u64,
    },
    /// A guest physical address falls outside the 64-bit range.
    #[error("guest physical address of a {what} is out of range (below 0 or above 2^64)")]
    GpaOutOfRange {
        /// What has the address.
        what: &'static str,
    },
    /// The SEV hashes table would cross the end of its page.
    #[error("SEV hashes table at page offset {offset:#x} does not fit in its 4096-byte page")]
    HashesTableDoesNotFit {
        /// Offset of the table in its page.
        offset: usize,
    },
    /// The kernel hashes section is not exactly one page.
    #[error("SNP_KERNEL_HASHES section is {size:#x} bytes, expected exactly one 4096-byte page")]
    KernelHashesSectionSize {
        /// Section size in bytes.
        size: u32,
    },
    /// SEV/SEV-ES direct boot with firmware that has no hashes table.
    #[error("kernel specified but OVMF doesn't support kernel/initrd/cmdline measurement")]
    KernelHashesUnsupported,
    /// SNP direct boot with firmware that has no kernel hashes section.
    #[error("kernel specified but OVMF metadata doesn't include SNP_KERNEL_HASHES section")]
    NoKernelHashesSection,
    /// More than one vCPU but the firmware's AP reset address is 0.
    #[error(
        "firmware's SEV-ES reset block gives AP reset address 0: cannot start more than one vCPU"
    )]
    ZeroApResetEip,
}

/// The VMM launching the guest; each sets slightly different initial
/// register state and pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum VmmType {
    /// QEMU/KVM.
    #[default]
    Qemu,
    /// Amazon EC2.
    Ec2,
    /// Google Compute Engine.
    Gce,
}

impl VmmType {
    /// The reference's name: `QEMU`, `ec2` or `gce`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Qemu => "QEMU",
            Self::Ec2 => "ec2",
            Self::Gce => "gce",
        }
    }

    /// The type of a reference name (case-sensitive, as in the reference).
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Qemu, Self::Ec2, Self::Gce]
            .into_iter()
            .find(|vmm| vmm.name() == name)
    }
}

/// A launch digest and the VMSA pages it measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measured<const N: usize> {
    /// The launch digest (48 bytes for SNP, 32 for SEV-ES).
    pub launch_digest: [u8; N],
    /// The VMSA pages measured, one per vCPU.
    pub vmsas: VmsaPages,
}

/// The inputs of an SEV-SNP launch booting OVMF.
#[derive(Debug, Clone, Copy)]
pub struct SnpLaunch<'a> {
    /// The firmware.
    pub ovmf: &'a OvmfImage<'a>,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// The vCPU signature QEMU puts in RDX (ignored by EC2 and GCE).
    pub vcpu_sig: u64,
    /// The guest's `SEV_FEATURES` (0x1 is SNP alone).
    pub guest_features: u64,
    /// The VMM.
    pub vmm: VmmType,
    /// A kernel booted directly, measured through the firmware's
    /// `SNP_KERNEL_HASHES` page.
    pub direct_boot: Option<DirectBoot<'a>>,
    /// A precalculated [`snp_ovmf_hash`] to start from instead of hashing
    /// the firmware's pages.
    pub ovmf_hash: Option<[u8; LAUNCH_DIGEST_SIZE]>,
}

/// The SEV-SNP launch digest of an OVMF guest (`--mode snp`).
///
/// ```no_run
/// use hsev_attestation::measurement::{snp_launch_digest, OvmfImage, SnpLaunch, VmmType};
///
/// let firmware = std::fs::read("/usr/share/ovmf/OVMF.fd")?;
/// let ovmf = OvmfImage::parse(&firmware)?;
/// let measured = snp_launch_digest(&SnpLaunch {
///     ovmf: &ovmf,
///     vcpus: 4,
///     vcpu_sig: 0x0080_0f12, // EPYC-v4
///     guest_features: 0x1,
///     vmm: VmmType::Qemu,
///     direct_boot: None,
///     ovmf_hash: None,
/// })?;
/// println!("{}", hex::encode(measured.launch_digest));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn snp_launch_digest(
    launch: &SnpLaunch<'_>,
) -> Result<Measured<LAUNCH_DIGEST_SIZE>, MeasurementError> {
    let mut gctx = match launch.ovmf_hash {
        Some(seed) => Gctx::with_seed(seed),
        None => Gctx::new(),
    };
    let vmsas = snp_launch_pages(launch, &mut gctx)?;
    Ok(Measured {
        launch_digest: gctx.launch_digest(),
        vmsas,
    })
}

/// Where the pages of an SNP launch go, in launch order: a [`Gctx`] that
/// computes the digest, or a Secure Processor that performs the launch.
pub trait LaunchSink {
    /// What a failed update reports.
    type Error: From<MeasurementError>;
    /// Measured data, a whole number of pages, from `gpa` on.
    fn normal_pages(&mut self, gpa: u64, data: &[u8]) -> Result<(), Self::Error>;
    /// `length` bytes of zero pages.
    fn zero_pages(&mut self, gpa: u64, length: u64) -> Result<(), Self::Error>;
    /// `length` bytes of unmeasured pages.
    fn unmeasured_pages(&mut self, gpa: u64, length: u64) -> Result<(), Self::Error>;
    /// The secrets page.
    fn secrets_page(&mut self, gpa: u64) -> Result<(), Self::Error>;
    /// The CPUID page.
    fn cpuid_page(&mut self, gpa: u64) -> Result<(), Self::Error>;
    /// One vCPU's VMSA.
    fn vmsa_page(&mut self, page: &[u8; PAGE_SIZE]) -> Result<(), Self::Error>;
}

impl LaunchSink for Gctx {
    type Error = MeasurementError;

    fn normal_pages(&mut self, gpa: u64, data: &[u8]) -> Result<(), MeasurementError> {
        self.update_normal_pages(gpa, data)
    }

    fn zero_pages(&mut self, gpa: u64, length: u64) -> Result<(), MeasurementError> {
        self.update_zero_pages(gpa, length)
    }

    fn unmeasured_pages(&mut self, gpa: u64, length: u64) -> Result<(), MeasurementError> {
        self.update_unmeasured_pages(gpa, length)
    }

    fn secrets_page(&mut self, gpa: u64) -> Result<(), MeasurementError> {
        self.update_secrets_page(gpa);
        Ok(())
    }

    fn cpuid_page(&mut self, gpa: u64) -> Result<(), MeasurementError> {
        self.update_cpuid_page(gpa);
        Ok(())
    }

    fn vmsa_page(&mut self, page: &[u8; PAGE_SIZE]) -> Result<(), MeasurementError> {
        self.update_vmsa_page(page);
        Ok(())
    }
}

/// Sends every page of an SNP launch booting OVMF to `sink`, in the order
/// QEMU adds them: the firmware (unless [`SnpLaunch::ovmf_hash`] stands for
/// it), the SEV metadata sections with the kernel-hashes page of a direct
/// boot, then one VMSA per vCPU. Returns the VMSAs.
pub fn snp_launch_pages<S: LaunchSink>(
    launch: &SnpLaunch<'_>,
    sink: &mut S,
) -> Result<VmsaPages, S::Error> {
    let ovmf = launch.ovmf;
    ovmf.require_sev_metadata()?;
    if launch.ovmf_hash.is_none() {
        update_firmware_pages(sink, ovmf, "firmware image")?;
    }
    let sev_hashes = launch.direct_boot.as_ref().map(SevHashes::new);
    snp_update_metadata_pages(sink, ovmf, sev_hashes.as_ref(), launch.vmm)?;
    let vmsas = VmsaPages::ovmf(
        launch.vcpus,
        ovmf.sev_es_reset_eip()?,
        launch.vcpu_sig,
        launch.guest_features,
        launch.vmm,
    )?;
    for page in vmsas.iter() {
        sink.vmsa_page(page)?;
    }
    Ok(vmsas)
}

/// The launch digest after the firmware pages alone (`--mode snp:ovmf-hash`),
/// to seed [`SnpLaunch::ovmf_hash`].
pub fn snp_ovmf_hash(ovmf: &OvmfImage<'_>) -> Result<[u8; LAUNCH_DIGEST_SIZE], MeasurementError> {
    ovmf.require_sev_metadata()?;
    let mut gctx = Gctx::new();
    update_firmware_pages(&mut gctx, ovmf, "firmware image")?;
    Ok(gctx.launch_digest())
}

/// The inputs of an SEV-SNP launch of Coconut-SVSM with OVMF.
#[derive(Debug, Clone, Copy)]
pub struct SvsmLaunch<'a> {
    /// The OVMF image (measured, but its metadata is not used).
    pub ovmf: &'a OvmfImage<'a>,
    /// The SVSM image, parsed relative to `ovmf` and its variable store.
    pub svsm: &'a SvsmImage<'a>,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// The vCPU signature.
    pub vcpu_sig: u64,
}

/// The SEV-SNP launch digest of a Coconut-SVSM guest (`--mode snp:svsm`,
/// QEMU only).
pub fn svsm_launch_digest(
    launch: &SvsmLaunch<'_>,
) -> Result<Measured<LAUNCH_DIGEST_SIZE>, MeasurementError> {
    let svsm = launch.svsm.image();
    svsm.require_sev_metadata()?;
    let eip = launch.svsm.sev_es_reset_eip()?;
    let mut gctx = Gctx::new();
    update_firmware_pages(&mut gctx, launch.ovmf, "firmware image")?;
    update_firmware_pages(&mut gctx, svsm, "SVSM image")?;
    snp_update_metadata_pages(&mut gctx, svsm, None, VmmType::Qemu)?;
    let vmsas = VmsaPages::svsm(launch.vcpus, eip, launch.vcpu_sig);
    for page in vmsas.iter() {
        gctx.update_vmsa_page(page);
    }
    Ok(Measured {
        launch_digest: gctx.launch_digest(),
        vmsas,
    })
}

/// The inputs of an SEV-ES launch.
#[derive(Debug, Clone, Copy)]
pub struct SevEsLaunch<'a> {
    /// The firmware.
    pub ovmf: &'a OvmfImage<'a>,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// The vCPU signature QEMU puts in RDX (ignored by EC2 and GCE).
    pub vcpu_sig: u64,
    /// The VMM.
    pub vmm: VmmType,
    /// A kernel booted directly, measured through the SEV hashes table.
    pub direct_boot: Option<DirectBoot<'a>>,
}

/// The SEV-ES launch digest (`--mode seves`): SHA-256 over the firmware, the
/// hashes table of a direct boot, and the VMSAs.
pub fn seves_launch_digest(launch: &SevEsLaunch<'_>) -> Result<Measured<32>, MeasurementError> {
    let mut hasher = sev_hasher(launch.ovmf, launch.direct_boot.as_ref())?;
    let vmsas = VmsaPages::ovmf(
        launch.vcpus,
        launch.ovmf.sev_es_reset_eip()?,
        launch.vcpu_sig,
        0,
        launch.vmm,
    )?;
    for page in vmsas.iter() {
        hasher.update(page);
    }
    Ok(Measured {
        launch_digest: hasher.finish(),
        vmsas,
    })
}

/// The SEV launch digest (`--mode sev`): SHA-256 over the firmware and the
/// hashes table of a direct boot.
pub fn sev_launch_digest(
    ovmf: &OvmfImage<'_>,
    direct_boot: Option<&DirectBoot<'_>>,
) -> Result<[u8; 32], MeasurementError> {
    Ok(sev_hasher(ovmf, direct_boot)?.finish())
}

fn sev_hasher(
    ovmf: &OvmfImage<'_>,
    direct_boot: Option<&DirectBoot<'_>>,
) -> Result<Sha256, MeasurementError> {
    let mut hasher = Sha256::new();
    hasher.update(ovmf.data());
    if let Some(boot) = direct_boot {
        if !ovmf.is_sev_hashes_table_supported() {
            return Err(MeasurementError::KernelHashesUnsupported);
        }
        hasher.update(&SevHashes::new(boot).construct_table());
    }
    Ok(hasher)
}

/// Measures a whole firmware image as normal pages at its GPA.
fn update_firmware_pages<S: LaunchSink>(
    sink: &mut S,
    image: &OvmfImage<'_>,
    what: &'static str,
) -> Result<(), S::Error> {
    let size = image.size();
    if !size.is_multiple_of(PAGE_SIZE) {
        return Err(MeasurementError::UnalignedSize {
            what,
            size: u64::try_from(size).unwrap_or(u64::MAX),
        }
        .into());
    }
    sink.normal_pages(image.gpa()?, image.data())
}

/// Measures the pages the SEV metadata declares, in the reference's order.
fn snp_update_metadata_pages<S: LaunchSink>(
    sink: &mut S,
    image: &OvmfImage<'_>,
    sev_hashes: Option<&SevHashes>,
    vmm: VmmType,
) -> Result<(), S::Error> {
    for section in image.metadata_items() {
        let gpa = u64::from(section.gpa);
        let size = u64::from(section.size);
        match section.section_type()? {
            SectionType::SnpSecMem if vmm == VmmType::Gce => sink.unmeasured_pages(gpa, size)?,
            SectionType::SnpSecMem | SectionType::SvsmCaa => sink.zero_pages(gpa, size)?,
            SectionType::SnpSecrets => sink.secrets_page(gpa)?,
            // EC2 adds the CPUID pages after every other section.
            SectionType::Cpuid if vmm == VmmType::Ec2 => {}
            SectionType::Cpuid => sink.cpuid_page(gpa)?,
            SectionType::SnpKernelHashes => match sev_hashes {
                Some(hashes) => {
                    let table_gpa = image.sev_hashes_table_gpa()?;
                    // The mask keeps the value below 4096.
                    let offset_in_page = (table_gpa & 0xfff) as usize;
                    let page = hashes.construct_page(offset_in_page)?;
                    if section.size != 4096 {
                        return Err(MeasurementError::KernelHashesSectionSize {
                            size: section.size,
                        }
                        .into());
                    }
                    sink.normal_pages(gpa, page.as_slice())?;
                }
                None => sink.zero_pages(gpa, size)?,
            },
        }
    }
    if vmm == VmmType::Ec2 {
        for section in image.metadata_items() {
            if section.section_type()? == SectionType::Cpuid {
                sink.cpuid_page(u64::from(section.gpa))?;
            }
        }
    }
    if sev_hashes.is_some() && !image.has_metadata_section(SectionType::SnpKernelHashes)? {
        return Err(MeasurementError::NoKernelHashesSection.into());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failing unwrap is a failing test.
mod tests;
