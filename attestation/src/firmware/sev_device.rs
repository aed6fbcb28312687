//! The real AMD Secure Processor of an SEV-SNP host, through `/dev/sev`
//! and KVM.
//!
//! # What it does
//!
//! - [`SevFirmware::status`]: `SNP_PLATFORM_STATUS` and the legacy
//!   `PLATFORM_STATUS` through the `sev` crate, `GET_ID` for the chip id,
//!   the product from the host's CPUID, the ASID split from CPUID leaf
//!   `0x8000_001F` and the ASIDs in use from the misc cgroup.
//! - The SNP launch, as upstream KVM (Linux 6.11 and later) runs it: an
//!   SNP VM (`KVM_X86_SNP_VM`), `KVM_SEV_INIT2` and `SNP_LAUNCH_START`
//!   through [`sev::launch::snp::Launcher`], guest memory backed by
//!   `guest_memfd` memory slots (2 MiB at a time, added as updates reach
//!   them), `SNP_LAUNCH_UPDATE` through `Launcher::update_data`, and
//!   `SNP_LAUNCH_FINISH` through `kvm-ioctls`' `encrypt_op_sev`.
//!   Dropping the launch (decommission) closes the VM, which makes KVM
//!   decommission the guest and free its ASID.
//!
//! # What it cannot do, and says so
//!
//! - **No launch digest without an ID block.** Neither the firmware's
//!   `SNP_LAUNCH_FINISH` nor KVM hands the launch digest back to the host:
//!   only the guest's attestation report carries it. With an ID block the
//!   firmware refuses any launch whose digest differs from the block's, so
//!   a successful finish proves the block's digest and that is what
//!   [`SevFirmware::launch_finish`] returns. Without one it returns
//!   [`FirmwareError::Unsupported`] *before* finishing, and the launch stays
//!   started.
//! - **No VMSA pages.** KVM builds and measures the VMSA of each vCPU
//!   itself at `SNP_LAUNCH_FINISH`, from the vCPU's register state; its
//!   `KVM_SEV_SNP_LAUNCH_UPDATE` refuses the VMSA page type. A
//!   [`PageUpdate::Vmsa`] is therefore [`FirmwareError::Unsupported`], and
//!   the VM this module launches has no vCPU: it proves a measured launch
//!   of memory, it does not run a guest.
//! - **CPUID page contents.** [`PageUpdate::Cpuid`] carries no table, so
//!   the page is whatever guest memory holds at that address (zeros unless
//!   written before); the firmware checks that table.
//! - **`sev` 8.0's `Launcher::finish` is not used**: its `LaunchFinish`
//!   struct predates the upstream ABI (no `vcek_disabled`, 56 bytes where
//!   the kernel reads 88), which would shift the host data by one byte,
//!   and it sets `auth_key_en` whenever an ID authentication structure is
//!   given, so an ID block signed without an author key could not pass.
//!   The upstream struct from `kvm-bindings` is used instead.
//! - **Status commands open `/dev/sev` only**: the `sev` crate hard-codes
//!   the path, so a device opened with [`SevDevice::open_at`] elsewhere
//!   launches through that path but answers `status` with `Unsupported`.
//! - **Committed TCB**: `SNP_PLATFORM_STATUS` does not carry it (only the
//!   guest's report does). `committed_tcb` is filled with the reported
//!   TCB, the closest value the host can read.
//!
//! # Safety
//!
//! Three items need `unsafe`, each with its reason beside it: the CPUID
//! instruction (unsafe before Rust 1.87, the workspace's minimum is 1.85),
//! registering a `guest_memfd` memory slot, and lending guest memory to
//! the launch update as a byte slice.

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use sev::error::{FirmwareError as SevFirmwareError, SevError};

use super::{
    AsidCounts, FirmwareError, GuestRequest, GuestResponse, LaunchFinish, LaunchHandle, PageUpdate,
    PlatformStatus, SevFirmware,
};
use crate::measurement::PAGE_SIZE;
use crate::product::{Product, TcbLayout};
use crate::report::{FirmwareVersion, GuestPolicy, TcbVersion};

/// Where the host's SEV firmware device lives.
pub const DEFAULT_SEV_PATH: &str = "/dev/sev";
/// The cgroup v2 root, where the misc controller counts SEV ASIDs.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Module parameters saying whether KVM enabled SEV, SEV-ES and SEV-SNP.
const KVM_AMD_PARAMETERS: &str = "/sys/module/kvm_amd/parameters";
/// `PAGE_SIZE` as a guest-physical length.
const PAGE_BYTES: u64 = PAGE_SIZE as u64;

/// The real SEV firmware of this host.
pub struct SevDevice {
    path: PathBuf,
    launches: Mutex<HashMap<u64, Launch>>,
    next_launch: AtomicU64,
}

impl fmt::Debug for SevDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // try_lock: formatting under the lock (a log line) must not deadlock.
        let launches = self.launches.try_lock().map(|launches| launches.len());
        f.debug_struct("SevDevice")
            .field("path", &self.path)
            .field("launches", &launches.ok())
            .finish_non_exhaustive()
    }
}

impl SevDevice {
    /// The firmware at [`DEFAULT_SEV_PATH`].
    pub fn open() -> Result<Self, FirmwareError> {
        Self::open_at(DEFAULT_SEV_PATH)
    }

    /// The firmware device at `path`. It must open for reading and
    /// writing, as every command needs.
    pub fn open_at(path: impl AsRef<Path>) -> Result<Self, FirmwareError> {
        let path = path.as_ref().to_path_buf();
        open_device(&path)?;
        Ok(SevDevice {
            path,
            launches: Mutex::new(HashMap::new()),
            next_launch: AtomicU64::new(1),
        })
    }

    /// Where the device is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Launch>> {
        // A panic under the lock leaves the map itself consistent.
        self.launches.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The `sev` crate's host handle, which always opens `/dev/sev`.
    fn sev_host(&self) -> Result<sev::firmware::host::Firmware, FirmwareError> {
        if self.path != Path::new(DEFAULT_SEV_PATH) {
            return Err(FirmwareError::Unsupported(format!(
                "the sev crate's status commands open {DEFAULT_SEV_PATH} only, \
                 and this device is {}",
                self.path.display()
            )));
        }
        sev::firmware::host::Firmware::open().map_err(|error| unavailable(&self.path, &error))
    }
}

fn unavailable(path: &Path, error: &io::Error) -> FirmwareError {
    if error.kind() == io::ErrorKind::NotFound {
        FirmwareError::Unavailable(format!("no {}: {error}", path.display()))
    } else {
        FirmwareError::Unavailable(format!("cannot open {}: {error}", path.display()))
    }
}

fn open_device(path: &Path) -> Result<File, FirmwareError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|error| unavailable(path, &error))
}

impl SevFirmware for SevDevice {
    fn status(&self) -> Result<PlatformStatus, FirmwareError> {
        let mut firmware = self.sev_host()?;
        let snp = firmware
            .snp_platform_status()
            .map_err(|error| FirmwareError::Device(format!("SNP_PLATFORM_STATUS: {error}")))?;
        // The legacy status answers only when SEV itself is usable.
        let legacy = firmware.platform_status().ok();
        let chip_id = if snp.platform_policy.mask_chip_id() {
            None
        } else {
            firmware.get_identifier().ok().map(Vec::from)
        };

        let cpu = host_cpu();
        let product = cpu.and_then(|cpu| Product::from_cpuid(cpu.family, cpu.model));
        let layout = product.map(Product::tcb_layout);
        let current_tcb = tcb_from_sev(&snp.platform_tcb_version, layout)?;
        let reported_tcb = tcb_from_sev(&snp.reported_tcb_version, layout)?;
        let module = |name: &str| {
            std::fs::read_to_string(Path::new(KVM_AMD_PARAMETERS).join(name))
                .ok()
                .and_then(|text| parse_module_flag(&text))
        };
        let enabled_in_kvm = |name: &str| module(name) != Some(false);

        let layout_of_asids = cpu.and_then(|cpu| cpu.asids);
        let asids = asid_counts(
            layout_of_asids,
            &MiscCounts::read(Path::new(CGROUP_ROOT)),
            snp.guest_count,
        );
        Ok(PlatformStatus {
            simulated: false,
            product,
            sev_enabled: legacy.is_some() && enabled_in_kvm("sev"),
            sev_es_enabled: legacy.as_ref().is_some_and(|status| {
                status
                    .flags
                    .contains(sev::firmware::host::PlatformStatusFlags::ENCRYPTED_STATE)
            }) && enabled_in_kvm("sev_es"),
            snp_enabled: snp.is_rmp_init.is_rmp_init() && enabled_in_kvm("sev_snp"),
            firmware_version: FirmwareVersion {
                major: snp.version.0,
                minor: snp.version.1,
                // Reports carry the build's low byte only.
                build: snp.build_id.to_le_bytes()[0],
            },
            current_tcb,
            reported_tcb,
            committed_tcb: reported_tcb,
            asids,
            chip_id,
        })
    }

    fn launch_start(&self, policy: u64) -> Result<LaunchHandle, FirmwareError> {
        GuestPolicy::new(policy).map_err(|error| FirmwareError::PolicyRefused {
            policy,
            reason: error.to_string(),
        })?;
        let asid_pool = host_cpu()
            .and_then(|cpu| cpu.asids)
            .map_or(0, |asids| asids.sev_es_snp_pool());
        let launch = Launch::start(&self.path, policy, asid_pool)?;
        let id = self.next_launch.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, launch);
        Ok(LaunchHandle(id))
    }

    fn launch_update(
        &self,
        launch: &LaunchHandle,
        update: PageUpdate<'_>,
    ) -> Result<(), FirmwareError> {
        let range = PageRange::of(&update)?;
        let mut launches = self.lock();
        let state = launches
            .get_mut(&launch.0)
            .ok_or(FirmwareError::UnknownLaunch(launch.0))?;
        state.update(&range, &update)
    }

    fn launch_finish(
        &self,
        launch: &LaunchHandle,
        finish: &LaunchFinish,
    ) -> Result<[u8; 48], FirmwareError> {
        let Some(id_block) = &finish.id_block else {
            return Err(FirmwareError::Unsupported(
                "SEV hardware does not return the launch digest to the host: it reports it \
                 only in the guest's attestation report. Give an ID block: the firmware then \
                 refuses any other digest, and the launch is left started until then"
                    .to_owned(),
            ));
        };
        // The owner's signatures, checked here so that a bad ID block is
        // refused with a reason before the firmware answers with a bare
        // status code (it checks them again). The host cannot know the
        // launch digest: the firmware compares that one.
        let block = &id_block.block;
        id_block
            .check(&block.launch_digest, block.policy)
            .map_err(|refusal| FirmwareError::IdBlock(refusal.to_string()))?;
        let mut launches = self.lock();
        let state = launches
            .get_mut(&launch.0)
            .ok_or(FirmwareError::UnknownLaunch(launch.0))?;
        if block.policy != state.policy {
            return Err(FirmwareError::IdBlock(format!(
                "POLICY_FAILURE: the ID block's policy {:#x} is not the launch's {:#x}",
                block.policy, state.policy
            )));
        }
        state.finish(&block.to_bytes(), id_block.auth_bytes(), &finish.host_data)?;
        Ok(block.launch_digest)
    }

    fn guest_request(
        &self,
        _launch: &LaunchHandle,
        _request: &GuestRequest,
    ) -> Result<GuestResponse, FirmwareError> {
        Err(FirmwareError::Unsupported(
            "on SEV hardware the guest asks its own Secure Processor through /dev/sev-guest; \
             the host relays nothing"
                .to_owned(),
        ))
    }

    fn decommission(&self, launch: &LaunchHandle) {
        // Closing the VM makes KVM decommission the guest and free its ASID.
        drop(self.lock().remove(&launch.0));
    }
}

// ---------------------------------------------------------------------------
// Platform status: CPUID, the misc cgroup, module parameters, TCBs.

/// What the host CPU says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HostCpu {
    family: u8,
    model: u8,
    asids: Option<AsidLayout>,
}

/// CPUID `0x8000_001F`: ECX is the number of encrypted guests the CPU
/// runs at once (the highest ASID), EDX the lowest ASID of plain SEV
/// guests. SEV-ES and SEV-SNP guests use ASIDs `1..EDX`, plain SEV guests
/// `EDX..=ECX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AsidLayout {
    max_asid: u32,
    min_sev_asid: u32,
}

impl AsidLayout {
    fn sev_es_snp_pool(self) -> u32 {
        self.min_sev_asid.saturating_sub(1).min(self.max_asid)
    }

    fn sev_pool(self) -> u32 {
        let first = self.min_sev_asid.max(1);
        if first > self.max_asid {
            0
        } else {
            self.max_asid - first + 1
        }
    }
}

/// Family and model from CPUID leaf 1's EAX (extended fields folded in).
fn family_model(eax: u32) -> (u8, u8) {
    let [stepping_model, family_byte, extended_model_family, extended_family_high] =
        eax.to_le_bytes();
    let base_model = stepping_model >> 4;
    let base_family = family_byte & 0x0f;
    let extended_model = extended_model_family & 0x0f;
    let extended_family = (extended_model_family >> 4) | ((extended_family_high & 0x0f) << 4);
    let family = if base_family == 0x0f {
        base_family.saturating_add(extended_family)
    } else {
        base_family
    };
    let model = if base_family == 0x0f || base_family == 0x06 {
        (extended_model << 4) | base_model
    } else {
        base_model
    };
    (family, model)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code, unused_unsafe)]
fn cpuid(leaf: u32) -> core::arch::x86_64::CpuidResult {
    // SAFETY: CPUID exists on every x86_64 CPU and only reads registers;
    // `__cpuid` is a safe function from Rust 1.87 on, this block keeps the
    // workspace's minimum Rust version (1.85) compiling.
    unsafe { core::arch::x86_64::__cpuid(leaf) }
}

#[cfg(target_arch = "x86_64")]
fn host_cpu() -> Option<HostCpu> {
    let (family, model) = family_model(cpuid(1).eax);
    let max_extended = cpuid(0x8000_0000).eax;
    let asids = (max_extended >= 0x8000_001f).then(|| {
        let leaf = cpuid(0x8000_001f);
        AsidLayout {
            max_asid: leaf.ecx,
            min_sev_asid: leaf.edx,
        }
    });
    Some(HostCpu {
        family,
        model,
        asids,
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn host_cpu() -> Option<HostCpu> {
    None
}

/// A `kvm_amd` boolean module parameter (`Y`/`N`, or `1`/`0`).
fn parse_module_flag(text: &str) -> Option<bool> {
    match text.trim() {
        "Y" | "y" | "1" => Some(true),
        "N" | "n" | "0" => Some(false),
        _ => None,
    }
}

/// A value of a flat-keyed cgroup file (`key value` lines), as in
/// `misc.capacity` and `misc.current`. `max` and absent keys are `None`.
fn flat_keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next() == Some(key))
            .then(|| fields.next())
            .flatten()
            .and_then(|value| value.parse().ok())
    })
}

/// The misc cgroup's SEV-ES/SNP ASID counts (key `sev_es`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct MiscCounts {
    capacity: Option<u64>,
    current: Option<u64>,
}

impl MiscCounts {
    fn parse(capacity: Option<&str>, current: Option<&str>) -> Self {
        MiscCounts {
            capacity: capacity.and_then(|text| flat_keyed_value(text, "sev_es")),
            current: current.and_then(|text| flat_keyed_value(text, "sev_es")),
        }
    }

    /// Reads the cgroup v2 root, or the v1 misc hierarchy below it.
    fn read(root: &Path) -> Self {
        for folder in [root.to_path_buf(), root.join("misc")] {
            let capacity = std::fs::read_to_string(folder.join("misc.capacity")).ok();
            if capacity.is_some() {
                let current = std::fs::read_to_string(folder.join("misc.current")).ok();
                return Self::parse(capacity.as_deref(), current.as_deref());
            }
        }
        MiscCounts::default()
    }
}

/// The ASID accounting: pools from CPUID, the free count from the misc
/// cgroup, or failing that from the firmware's count of SNP guests (which
/// misses SEV-ES guests).
fn asid_counts(layout: Option<AsidLayout>, misc: &MiscCounts, snp_guests: u32) -> AsidCounts {
    let (total, sev_pool, sev_es_snp_pool) = layout.map_or((0, 0, 0), |layout| {
        (layout.max_asid, layout.sev_pool(), layout.sev_es_snp_pool())
    });
    let free = match (misc.capacity, misc.current) {
        (Some(capacity), Some(current)) => {
            u32::try_from(capacity.saturating_sub(current)).unwrap_or(u32::MAX)
        }
        _ => sev_es_snp_pool.saturating_sub(snp_guests),
    };
    AsidCounts {
        total,
        sev_pool,
        sev_es_snp_pool,
        free: free.min(sev_es_snp_pool),
    }
}

/// A TCB the `sev` crate decoded, checked against the product's layout.
fn tcb_from_sev(
    tcb: &sev::firmware::host::TcbVersion,
    layout: Option<TcbLayout>,
) -> Result<TcbVersion, FirmwareError> {
    match (layout, tcb.fmc) {
        (Some(TcbLayout::Legacy), Some(_)) | (Some(TcbLayout::Turin), None) => {
            Err(FirmwareError::Device(format!(
                "the sev crate decoded a TCB {} fmc, which the {:?} layout {}",
                if tcb.fmc.is_some() { "with" } else { "without" },
                layout,
                if tcb.fmc.is_some() {
                    "does not have"
                } else {
                    "requires"
                },
            )))
        }
        _ => Ok(TcbVersion {
            fmc: tcb.fmc,
            bootloader: tcb.bootloader,
            tee: tcb.tee,
            snp: tcb.snp,
            microcode: tcb.microcode,
        }),
    }
}

// ---------------------------------------------------------------------------
// Launch requests, checked before anything reaches KVM.

/// The guest-physical range of one update, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PageRange {
    gpa: u64,
    length: u64,
    page_type: sev::launch::snp::PageType,
}

impl PageRange {
    fn of(update: &PageUpdate<'_>) -> Result<Self, FirmwareError> {
        use sev::launch::snp::PageType;
        let (gpa, length, page_type) = match *update {
            PageUpdate::Normal { gpa, data } => (
                gpa,
                u64::try_from(data.len()).unwrap_or(u64::MAX),
                PageType::Normal,
            ),
            PageUpdate::Zero { gpa, length } => (gpa, length, PageType::Zero),
            PageUpdate::Unmeasured { gpa, length } => (gpa, length, PageType::Unmeasured),
            PageUpdate::Secrets { gpa } => (gpa, PAGE_BYTES, PageType::Secrets),
            PageUpdate::Cpuid { gpa } => (gpa, PAGE_BYTES, PageType::Cpuid),
            PageUpdate::Vmsa { .. } => {
                return Err(FirmwareError::Unsupported(
                    "KVM measures each vCPU's VMSA itself at SNP_LAUNCH_FINISH, built from \
                     the vCPU's registers; KVM_SEV_SNP_LAUNCH_UPDATE refuses VMSA pages"
                        .to_owned(),
                ))
            }
        };
        if gpa % PAGE_BYTES != 0 {
            return Err(FirmwareError::BadUpdate(format!(
                "GPA {gpa:#x} is not page aligned"
            )));
        }
        if length == 0 || length % PAGE_BYTES != 0 {
            return Err(FirmwareError::BadUpdate(format!(
                "length {length:#x} is not a positive whole number of pages"
            )));
        }
        if gpa.checked_add(length).is_none() {
            return Err(FirmwareError::BadUpdate(format!(
                "{length:#x} bytes at {gpa:#x} run past the address space"
            )));
        }
        Ok(PageRange {
            gpa,
            length,
            page_type,
        })
    }
}

/// Which launch command failed, for error messages and mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LaunchStep {
    Init,
    Start,
    Update,
    Finish,
}

impl fmt::Display for LaunchStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LaunchStep::Init => "KVM_SEV_INIT2",
            LaunchStep::Start => "SNP_LAUNCH_START",
            LaunchStep::Update => "SNP_LAUNCH_UPDATE",
            LaunchStep::Finish => "SNP_LAUNCH_FINISH",
        })
    }
}

/// Maps a failed launch command to the trait's error.
fn launch_error(
    step: LaunchStep,
    policy: u64,
    asid_pool: u32,
    error: SevFirmwareError,
) -> FirmwareError {
    match (step, error) {
        (_, SevFirmwareError::KnownSevError(SevError::PolicyFailure)) => {
            FirmwareError::PolicyRefused {
                policy,
                reason: format!("{step}: the firmware's POLICY_FAILURE"),
            }
        }
        (
            LaunchStep::Finish,
            SevFirmwareError::KnownSevError(
                error
                @ (SevError::BadMeasurement | SevError::BadSignature | SevError::InvalidParam),
            ),
        ) => FirmwareError::IdBlock(format!("{step}: {error}")),
        (LaunchStep::Update, SevFirmwareError::KnownSevError(error)) => {
            FirmwareError::BadUpdate(format!("{step}: {error}"))
        }
        (LaunchStep::Init, SevFirmwareError::IoError(error))
            if error.kind() == io::ErrorKind::ResourceBusy =>
        {
            FirmwareError::NoFreeAsid(asid_pool)
        }
        (LaunchStep::Start, SevFirmwareError::IoError(error))
            if error.kind() == io::ErrorKind::InvalidInput =>
        {
            FirmwareError::PolicyRefused {
                policy,
                reason: format!(
                    "KVM refused it ({error}): KVM accepts only the policy bits it knows, \
                     and refuses SINGLE_SOCKET (bit 20)"
                ),
            }
        }
        (LaunchStep::Update, SevFirmwareError::IoError(error))
            if error.kind() == io::ErrorKind::InvalidInput =>
        {
            FirmwareError::BadUpdate(format!("{step}: {error}"))
        }
        (step, error) => FirmwareError::Device(format!("{step}: {error}")),
    }
}

// ---------------------------------------------------------------------------
// The launch through KVM.

#[cfg(target_arch = "x86_64")]
use kvm_launch::Launch;

#[cfg(target_arch = "x86_64")]
mod kvm_launch {
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::path::Path;
    use std::sync::Arc;

    use kvm_bindings::{
        kvm_create_guest_memfd, kvm_sev_cmd, kvm_sev_snp_launch_finish,
        kvm_userspace_memory_region2, sev_cmd_id_KVM_SEV_SNP_LAUNCH_FINISH, KVM_MEM_GUEST_MEMFD,
        KVM_X86_SNP_VM,
    };
    use kvm_ioctls::{Kvm, VmFd};
    use sev::error::FirmwareError as SevFirmwareError;
    use sev::launch::snp::{Launcher, Start, Started, Update};
    use vm_memory::{
        Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
        GuestRegionMmap, MemoryRegionAddress,
    };

    use super::{launch_error, open_device, LaunchStep, PageRange, PAGE_BYTES};
    use crate::firmware::{FirmwareError, PageUpdate};

    /// Guest memory is added in aligned chunks of this size, each its own
    /// `guest_memfd` memory slot.
    const CHUNK: u64 = 2 << 20;

    fn kvm_error(what: &str, error: &kvm_ioctls::Error) -> FirmwareError {
        FirmwareError::Device(format!("{what}: {error}"))
    }

    /// One SNP launch: the VM, its guest memory and its state.
    pub(super) struct Launch {
        // Field order is drop order: the VM closes (and KVM decommissions
        // the guest) before its guest memory is unmapped.
        launcher: Launcher<Started, VmFd, File>,
        sev: File,
        guest_memfds: Vec<OwnedFd>,
        memory: GuestMemoryMmap,
        pub(super) policy: u64,
        asid_pool: u32,
        finished: bool,
    }

    impl Launch {
        /// `KVM_CREATE_VM` of the SNP type, `KVM_SEV_INIT2`, `SNP_LAUNCH_START`.
        pub(super) fn start(
            sev_path: &Path,
            policy: u64,
            asid_pool: u32,
        ) -> Result<Self, FirmwareError> {
            let kvm = Kvm::new()
                .map_err(|error| FirmwareError::Unavailable(format!("no /dev/kvm: {error}")))?;
            let vm = kvm
                .create_vm_with_type(u64::from(KVM_X86_SNP_VM))
                .map_err(|error| {
                    if error.errno() == 22 {
                        // EINVAL: this KVM has no SNP VM type.
                        FirmwareError::SnpDisabled
                    } else {
                        kvm_error("KVM_CREATE_VM (SNP)", &error)
                    }
                })?;
            let sev = open_device(sev_path)?;
            let launcher_sev = sev
                .try_clone()
                .map_err(|error| FirmwareError::Device(format!("dup of the SEV fd: {error}")))?;
            let step = |step, error| launch_error(step, policy, asid_pool, error);
            let launcher = Launcher::new(vm, launcher_sev)
                .map_err(|error| step(LaunchStep::Init, error))?
                .start(Start::new(policy.into(), [0; 16]))
                .map_err(|error| step(LaunchStep::Start, error))?;
            Ok(Launch {
                launcher,
                sev,
                guest_memfds: Vec::new(),
                memory: GuestMemoryMmap::new(),
                policy,
                asid_pool,
                finished: false,
            })
        }

        /// `SNP_LAUNCH_UPDATE` of a checked range.
        pub(super) fn update(
            &mut self,
            range: &PageRange,
            update: &PageUpdate<'_>,
        ) -> Result<(), FirmwareError> {
            if self.finished {
                return Err(FirmwareError::BadUpdate(
                    "the launch is already finished".to_owned(),
                ));
            }
            self.ensure_memory(range.gpa, range.length)?;
            if let PageUpdate::Normal { gpa, data } = update {
                self.memory
                    .write_slice(data, GuestAddress(*gpa))
                    .map_err(|error| FirmwareError::Device(format!("guest memory: {error}")))?;
            }
            let (policy, asid_pool) = (self.policy, self.asid_pool);
            let end = range.gpa + range.length;
            let mut at = range.gpa;
            // One update per memory slot: each is contiguous host memory.
            while at < end {
                let piece_end = end.min((at / CHUNK + 1) * CHUNK);
                let length = piece_end - at;
                let source = guest_bytes(&self.memory, at, length)?;
                self.launcher
                    .update_data(
                        Update::new(at / PAGE_BYTES, source, range.page_type),
                        at,
                        length,
                    )
                    .map_err(|error| launch_error(LaunchStep::Update, policy, asid_pool, error))?;
                at = piece_end;
            }
            Ok(())
        }

        /// Adds the memory slots that `gpa..gpa + length` reaches.
        fn ensure_memory(&mut self, gpa: u64, length: u64) -> Result<(), FirmwareError> {
            let last = gpa + length - 1;
            for chunk in gpa / CHUNK..=last / CHUNK {
                let base = GuestAddress(chunk * CHUNK);
                if self.memory.find_region(base).is_some() {
                    continue;
                }
                let region = GuestRegionMmap::<()>::from_range(base, CHUNK as usize, None)
                    .map_err(|error| FirmwareError::Device(format!("guest memory: {error}")))?;
                let slot = u32::try_from(self.guest_memfds.len()).map_err(|_| {
                    FirmwareError::BadUpdate("too many guest memory slots".to_owned())
                })?;
                let guest_memfd = add_private_slot(self.launcher.as_ref(), slot, &region)?;
                self.memory = self
                    .memory
                    .insert_region(Arc::new(region))
                    .map_err(|error| FirmwareError::Device(format!("guest memory: {error}")))?;
                self.guest_memfds.push(guest_memfd);
            }
            Ok(())
        }

        /// `SNP_LAUNCH_FINISH` with an ID block and its authentication
        /// structure, through the upstream ABI struct.
        pub(super) fn finish(
            &mut self,
            id_block: &[u8; 0x60],
            id_auth: &[u8],
            host_data: &[u8; 32],
        ) -> Result<(), FirmwareError> {
            if self.finished {
                return Err(FirmwareError::BadUpdate(
                    "the launch is already finished".to_owned(),
                ));
            }
            let mut params = kvm_sev_snp_launch_finish {
                id_block_uaddr: id_block.as_ptr() as u64,
                id_auth_uaddr: id_auth.as_ptr() as u64,
                id_block_en: 1,
                auth_key_en: 0,
                host_data: *host_data,
                ..Default::default()
            };
            let mut command = kvm_sev_cmd {
                id: sev_cmd_id_KVM_SEV_SNP_LAUNCH_FINISH,
                data: std::ptr::addr_of_mut!(params) as u64,
                sev_fd: u32::try_from(self.sev.as_raw_fd()).unwrap_or(u32::MAX),
                ..Default::default()
            };
            self.launcher
                .as_ref()
                .encrypt_op_sev(&mut command)
                .map_err(|error| {
                    let error = if command.error == 0 {
                        SevFirmwareError::IoError(std::io::Error::from_raw_os_error(error.errno()))
                    } else {
                        SevFirmwareError::from(command.error)
                    };
                    launch_error(LaunchStep::Finish, self.policy, self.asid_pool, error)
                })?;
            self.finished = true;
            Ok(())
        }
    }

    /// Creates a `guest_memfd` for `region` and registers both as memory
    /// slot `slot` of `vm`.
    #[allow(unsafe_code)]
    fn add_private_slot(
        vm: &VmFd,
        slot: u32,
        region: &GuestRegionMmap,
    ) -> Result<OwnedFd, FirmwareError> {
        let size = region.len();
        let raw = vm
            .create_guest_memfd(kvm_create_guest_memfd {
                size,
                ..Default::default()
            })
            .map_err(|error| kvm_error("KVM_CREATE_GUEST_MEMFD", &error))?;
        // SAFETY: `raw` was just returned by KVM_CREATE_GUEST_MEMFD and is
        // owned by nobody else; the OwnedFd closes it exactly once.
        let guest_memfd = unsafe { OwnedFd::from_raw_fd(raw) };
        let userspace_addr = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|error| FirmwareError::Device(format!("guest memory: {error}")))?
            as u64;
        let memory_slot = kvm_userspace_memory_region2 {
            slot,
            flags: KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: region.start_addr().0,
            memory_size: size,
            userspace_addr,
            guest_memfd_offset: 0,
            guest_memfd: u32::try_from(guest_memfd.as_raw_fd()).unwrap_or(u32::MAX),
            ..Default::default()
        };
        // SAFETY: the slot points at `region`'s mapping of exactly `size`
        // bytes; the mapping lives in the launch's GuestMemoryMmap, which
        // is dropped after the VM (field order of `Launch`). Rust code
        // touches that memory only through vm-memory's volatile accessors
        // or `guest_bytes` while no vCPU exists to write it.
        unsafe { vm.set_user_memory_region2(memory_slot) }
            .map_err(|error| kvm_error("KVM_SET_USER_MEMORY_REGION2", &error))?;
        Ok(guest_memfd)
    }

    /// Guest memory at `gpa`, `length` bytes inside one region, as the
    /// byte slice `Launcher::update_data` takes as its source address.
    #[allow(unsafe_code)]
    fn guest_bytes(
        memory: &GuestMemoryMmap,
        gpa: u64,
        length: u64,
    ) -> Result<&[u8], FirmwareError> {
        let length = usize::try_from(length)
            .map_err(|_| FirmwareError::BadUpdate(format!("length {length:#x} too large")))?;
        let slice = memory
            .get_slice(GuestAddress(gpa), length)
            .map_err(|error| FirmwareError::Device(format!("guest memory: {error}")))?;
        let pointer = slice.ptr_guard().as_ptr();
        // SAFETY: `get_slice` checked that `length` bytes from `pointer`
        // lie inside one live mapping, which `memory` keeps mapped for the
        // returned lifetime. The VM has no vCPU, so the guest cannot write
        // it; the only other writer is the kernel, which copies the
        // firmware's corrected table back over a refused CPUID page inside
        // the update ioctl, an opaque call after which this slice is no
        // longer used.
        Ok(unsafe { std::slice::from_raw_parts(pointer, length) })
    }
}

/// Non-x86 hosts have no SEV-SNP: every launch is refused.
#[cfg(not(target_arch = "x86_64"))]
mod no_launch {
    use std::path::Path;

    use super::PageRange;
    use crate::firmware::{FirmwareError, PageUpdate};

    pub(super) struct Launch {
        pub(super) policy: u64,
    }

    impl Launch {
        pub(super) fn start(_: &Path, _: u64, _: u32) -> Result<Self, FirmwareError> {
            Err(FirmwareError::Unsupported(
                "SEV-SNP launches need an x86_64 host".to_owned(),
            ))
        }

        pub(super) fn update(
            &mut self,
            _: &PageRange,
            _: &PageUpdate<'_>,
        ) -> Result<(), FirmwareError> {
            Err(FirmwareError::UnknownLaunch(0))
        }

        pub(super) fn finish(
            &mut self,
            _: &[u8; 0x60],
            _: &[u8],
            _: &[u8; 32],
        ) -> Result<(), FirmwareError> {
            Err(FirmwareError::UnknownLaunch(0))
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
use no_launch::Launch;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openssl::ec::{EcGroup, EcKey};
    use openssl::nid::Nid;

    use super::*;
    use crate::firmware::{LaunchedGuest, SnpLaunch};
    use crate::id_block::{IdBlock, SignedIdBlock};
    use crate::measurement::Gctx;

    /// A device over `/dev/null`: enough to reach every check made before
    /// KVM or the firmware is asked.
    fn null_device() -> SevDevice {
        SevDevice::open_at("/dev/null").expect("/dev/null opens")
    }

    fn signed_id_block(launch_digest: [u8; 48], policy: u64) -> SignedIdBlock {
        let key = EcKey::generate(&EcGroup::from_curve_name(Nid::SECP384R1).expect("curve"))
            .expect("key");
        let block = IdBlock {
            launch_digest,
            family_id: [1; 16],
            image_id: [2; 16],
            guest_svn: 3,
            policy,
        };
        SignedIdBlock::sign(block, &key, None).expect("signs")
    }

    #[test]
    fn a_missing_device_is_unavailable_and_named() {
        let error = SevDevice::open_at("/nonexistent/sev").expect_err("absent");
        assert!(
            matches!(&error, FirmwareError::Unavailable(reason) if reason.starts_with("no /nonexistent/sev:")),
            "{error}"
        );
    }

    #[test]
    fn the_default_device_is_dev_sev() {
        match SevDevice::open() {
            Ok(device) => assert_eq!(device.path(), Path::new("/dev/sev")),
            Err(FirmwareError::Unavailable(reason)) => {
                assert!(reason.contains("/dev/sev"), "{reason}");
            }
            Err(error) => panic!("unexpected {error}"),
        }
    }

    #[test]
    fn status_elsewhere_than_dev_sev_is_unsupported() {
        let error = null_device().status().expect_err("not /dev/sev");
        assert!(
            matches!(&error, FirmwareError::Unsupported(reason) if reason.contains("/dev/null")),
            "{error}"
        );
    }

    #[test]
    fn family_and_model_fold_the_extended_fields() {
        assert_eq!(family_model(0x00a0_0f11), (0x19, 0x01)); // Milan
        assert_eq!(family_model(0x00a1_0f11), (0x19, 0x11)); // Genoa
        assert_eq!(family_model(0x00aa_0f02), (0x19, 0xa0)); // Siena
        assert_eq!(family_model(0x00b0_0f21), (0x1a, 0x02)); // Turin
        assert_eq!(family_model(0x0083_0f10), (0x17, 0x31)); // Rome
        assert_eq!(family_model(0x0000_0f4a), (0x0f, 0x04)); // no extension
        assert_eq!(family_model(0x0005_0654), (0x06, 0x55)); // Intel family 6
        let (family, model) = family_model(0x00a0_0f11);
        assert_eq!(Product::from_cpuid(family, model), Some(Product::Milan));
        let (family, model) = family_model(0x00b0_0f21);
        assert_eq!(Product::from_cpuid(family, model), Some(Product::Turin));
    }

    #[test]
    fn asid_pools_split_at_the_minimum_sev_asid() {
        // A Milan with 509 ASIDs, 100 of them for SEV-ES/SNP.
        let layout = AsidLayout {
            max_asid: 509,
            min_sev_asid: 101,
        };
        assert_eq!(layout.sev_es_snp_pool(), 100);
        assert_eq!(layout.sev_pool(), 409);
        // Every ASID for SEV-ES/SNP.
        let all_es = AsidLayout {
            max_asid: 1006,
            min_sev_asid: 1007,
        };
        assert_eq!((all_es.sev_es_snp_pool(), all_es.sev_pool()), (1006, 0));
        // No ES split at all.
        let no_es = AsidLayout {
            max_asid: 15,
            min_sev_asid: 1,
        };
        assert_eq!((no_es.sev_es_snp_pool(), no_es.sev_pool()), (0, 15));
        let zero = AsidLayout {
            max_asid: 0,
            min_sev_asid: 0,
        };
        assert_eq!((zero.sev_es_snp_pool(), zero.sev_pool()), (0, 0));
    }

    #[test]
    fn misc_cgroup_files_parse() {
        let capacity = "sev 409\nsev_es 100\n";
        let current = "sev 3\nsev_es 7\n";
        assert_eq!(flat_keyed_value(capacity, "sev"), Some(409));
        assert_eq!(flat_keyed_value(capacity, "sev_es"), Some(100));
        assert_eq!(flat_keyed_value(current, "sev_es"), Some(7));
        assert_eq!(flat_keyed_value("res_a 1\n", "sev_es"), None);
        assert_eq!(flat_keyed_value("sev_es max\n", "sev_es"), None);
        assert_eq!(flat_keyed_value("sev_esx 4\nsev_es 5\n", "sev_es"), Some(5));
        assert_eq!(flat_keyed_value("", "sev"), None);
        assert_eq!(
            MiscCounts::parse(Some(capacity), Some(current)),
            MiscCounts {
                capacity: Some(100),
                current: Some(7)
            }
        );
        assert_eq!(MiscCounts::parse(None, None), MiscCounts::default());
    }

    #[test]
    fn misc_cgroup_files_are_read_from_v2_or_v1_folders() {
        let root = tempfile::tempdir().expect("tempdir");
        assert_eq!(MiscCounts::read(root.path()), MiscCounts::default());
        let v1 = root.path().join("misc");
        std::fs::create_dir(&v1).expect("mkdir");
        std::fs::write(v1.join("misc.capacity"), "sev 10\nsev_es 5\n").expect("write");
        assert_eq!(
            MiscCounts::read(root.path()),
            MiscCounts {
                capacity: Some(5),
                current: None
            }
        );
        std::fs::write(root.path().join("misc.capacity"), "sev_es 99\n").expect("write");
        std::fs::write(root.path().join("misc.current"), "sev_es 9\n").expect("write");
        assert_eq!(
            MiscCounts::read(root.path()),
            MiscCounts {
                capacity: Some(99),
                current: Some(9)
            }
        );
    }

    #[test]
    fn free_asids_come_from_the_cgroup_or_the_snp_guest_count() {
        let layout = Some(AsidLayout {
            max_asid: 509,
            min_sev_asid: 101,
        });
        let misc = MiscCounts {
            capacity: Some(100),
            current: Some(7),
        };
        assert_eq!(
            asid_counts(layout, &misc, 2),
            AsidCounts {
                total: 509,
                sev_pool: 409,
                sev_es_snp_pool: 100,
                free: 93
            }
        );
        let no_current = MiscCounts {
            capacity: Some(100),
            current: None,
        };
        assert_eq!(asid_counts(layout, &no_current, 2).free, 98);
        // Never more free than the pool, never negative.
        let odd = MiscCounts {
            capacity: Some(500),
            current: Some(0),
        };
        assert_eq!(asid_counts(layout, &odd, 0).free, 100);
        assert_eq!(asid_counts(layout, &MiscCounts::default(), 300).free, 0);
        assert_eq!(
            asid_counts(None, &misc, 0),
            AsidCounts {
                total: 0,
                sev_pool: 0,
                sev_es_snp_pool: 0,
                free: 0
            }
        );
    }

    #[test]
    fn module_flags_parse() {
        assert_eq!(parse_module_flag("Y\n"), Some(true));
        assert_eq!(parse_module_flag("1"), Some(true));
        assert_eq!(parse_module_flag("N\n"), Some(false));
        assert_eq!(parse_module_flag("0\n"), Some(false));
        assert_eq!(parse_module_flag("maybe"), None);
    }

    #[test]
    fn tcbs_follow_the_product_layout() {
        use sev::firmware::host::TcbVersion as SevTcb;
        let legacy = SevTcb::new(None, 3, 0, 8, 115);
        let turin = SevTcb::new(Some(1), 3, 0, 8, 115);
        assert_eq!(
            tcb_from_sev(&legacy, Some(TcbLayout::Legacy)).expect("legacy"),
            TcbVersion {
                fmc: None,
                bootloader: 3,
                tee: 0,
                snp: 8,
                microcode: 115
            }
        );
        assert_eq!(
            tcb_from_sev(&turin, Some(TcbLayout::Turin))
                .expect("turin")
                .fmc,
            Some(1)
        );
        assert!(tcb_from_sev(&turin, Some(TcbLayout::Legacy)).is_err());
        assert!(tcb_from_sev(&legacy, Some(TcbLayout::Turin)).is_err());
        assert!(tcb_from_sev(&turin, None).is_ok());
    }

    #[test]
    fn updates_are_checked_before_kvm() {
        let page = [0u8; PAGE_SIZE];
        let range = PageRange::of(&PageUpdate::Normal {
            gpa: 0x1000,
            data: &[0; 2 * PAGE_SIZE],
        })
        .expect("two pages");
        assert_eq!((range.gpa, range.length), (0x1000, 0x2000));
        assert_eq!(range.page_type, sev::launch::snp::PageType::Normal);
        assert_eq!(
            PageRange::of(&PageUpdate::Secrets { gpa: 0x8000 })
                .expect("secrets")
                .length,
            PAGE_BYTES
        );
        for (update, problem) in [
            (
                PageUpdate::Normal {
                    gpa: 0x10,
                    data: &page,
                },
                "page aligned",
            ),
            (
                PageUpdate::Normal {
                    gpa: 0,
                    data: &page[..100],
                },
                "whole number",
            ),
            (PageUpdate::Zero { gpa: 0, length: 0 }, "whole number"),
            (
                PageUpdate::Unmeasured {
                    gpa: 0,
                    length: 0x1001,
                },
                "whole number",
            ),
            (
                PageUpdate::Zero {
                    gpa: u64::MAX - 0xfff,
                    length: 0x2000,
                },
                "past the address space",
            ),
        ] {
            let error = PageRange::of(&update).expect_err("refused");
            assert!(
                matches!(&error, FirmwareError::BadUpdate(reason) if reason.contains(problem)),
                "{update:?}: {error}"
            );
        }
        let error = PageRange::of(&PageUpdate::Vmsa { page: &page }).expect_err("VMSA");
        assert!(
            matches!(&error, FirmwareError::Unsupported(reason) if reason.contains("VMSA")),
            "{error}"
        );
    }

    #[test]
    fn launches_refuse_what_they_cannot_do_before_touching_kvm() {
        let device = null_device();
        let unknown = LaunchHandle(77);
        assert!(matches!(
            device.launch_update(&unknown, PageUpdate::Secrets { gpa: 0 }),
            Err(FirmwareError::UnknownLaunch(77))
        ));
        let error = device
            .launch_finish(&unknown, &LaunchFinish::default())
            .expect_err("no ID block");
        assert!(
            matches!(&error, FirmwareError::Unsupported(reason) if reason.contains("attestation report")),
            "{error}"
        );
        let id_block = signed_id_block([7; 48], 0x30000);
        let finish = LaunchFinish {
            id_block: Some(id_block),
            host_data: [0; 32],
        };
        assert!(matches!(
            device.launch_finish(&unknown, &finish),
            Err(FirmwareError::UnknownLaunch(77))
        ));
        let error = device
            .guest_request(
                &unknown,
                &GuestRequest::Report {
                    report_data: [0; 64],
                    vmpl: 0,
                },
            )
            .expect_err("host relays nothing");
        assert!(
            matches!(&error, FirmwareError::Unsupported(reason) if reason.contains("/dev/sev-guest")),
            "{error}"
        );
        device.decommission(&unknown);
        let error = device.launch_start(0).expect_err("bit 17 clear");
        assert!(
            matches!(error, FirmwareError::PolicyRefused { policy: 0, .. }),
            "{error}"
        );
    }

    /// Here KVM exists but has no SNP VM type: the start must fail cleanly.
    /// On an SNP host it fails too, at KVM_SEV_INIT2, since `/dev/null` is
    /// not the SEV device.
    #[test]
    fn a_launch_without_snp_fails_cleanly() {
        let error = null_device()
            .launch_start(0x30000)
            .expect_err("no SNP here");
        assert!(
            matches!(
                error,
                FirmwareError::SnpDisabled
                    | FirmwareError::Unavailable(_)
                    | FirmwareError::Device(_)
                    | FirmwareError::Unsupported(_)
            ),
            "{error}"
        );
        println!("launch start without SNP: {error}");
    }

    #[test]
    fn bad_id_blocks_are_refused_before_the_firmware() {
        let signed = signed_id_block([9; 48], 0x30000);
        let mut block = signed.block.to_bytes();
        block[0x54] ^= 1;
        let tampered = SignedIdBlock::from_bytes(&block, signed.auth_bytes()).expect("parses");
        let finish = LaunchFinish {
            id_block: Some(tampered),
            host_data: [0; 32],
        };
        let error = null_device()
            .launch_finish(&LaunchHandle(1), &finish)
            .expect_err("tampered");
        assert!(
            matches!(&error, FirmwareError::IdBlock(reason) if reason.starts_with("BAD_SIGNATURE")),
            "{error}"
        );
    }

    #[test]
    fn firmware_errors_map_to_precise_variants() {
        let known = SevFirmwareError::KnownSevError;
        let io_error = |kind| SevFirmwareError::IoError(io::Error::from(kind));
        assert!(matches!(
            launch_error(
                LaunchStep::Start,
                0x30000,
                100,
                known(SevError::PolicyFailure)
            ),
            FirmwareError::PolicyRefused {
                policy: 0x30000,
                ..
            }
        ));
        assert!(matches!(
            launch_error(
                LaunchStep::Start,
                0x130000,
                100,
                io_error(io::ErrorKind::InvalidInput)
            ),
            FirmwareError::PolicyRefused { .. }
        ));
        assert!(matches!(
            launch_error(LaunchStep::Finish, 0, 100, known(SevError::BadMeasurement)),
            FirmwareError::IdBlock(_)
        ));
        assert!(matches!(
            launch_error(LaunchStep::Finish, 0, 100, known(SevError::BadSignature)),
            FirmwareError::IdBlock(_)
        ));
        assert!(matches!(
            launch_error(LaunchStep::Update, 0, 100, known(SevError::InvalidParam)),
            FirmwareError::BadUpdate(_)
        ));
        assert!(matches!(
            launch_error(
                LaunchStep::Update,
                0,
                100,
                io_error(io::ErrorKind::InvalidInput)
            ),
            FirmwareError::BadUpdate(_)
        ));
        assert!(matches!(
            launch_error(
                LaunchStep::Init,
                0,
                100,
                io_error(io::ErrorKind::ResourceBusy)
            ),
            FirmwareError::NoFreeAsid(100)
        ));
        let error = launch_error(
            LaunchStep::Init,
            0,
            100,
            known(SevError::InvalidPlatformState),
        );
        assert!(
            matches!(&error, FirmwareError::Device(reason) if reason.starts_with("KVM_SEV_INIT2")),
            "{error}"
        );
    }

    /// A real SNP launch of one data page, pinned by an ID block. Runs only
    /// on an SEV-SNP host; elsewhere it says why it did not.
    #[test]
    fn a_real_launch_finishes_with_the_id_block_digest() {
        let device = match SevDevice::open() {
            Ok(device) => Arc::new(device),
            Err(FirmwareError::Unavailable(reason)) => {
                println!("skipped: {reason}");
                return;
            }
            Err(error) => panic!("{error}"),
        };
        let status = device.status().expect("status on an SEV host");
        assert!(!status.simulated);
        assert!(status.asids.free <= status.asids.sev_es_snp_pool);
        assert!(status.asids.sev_es_snp_pool + status.asids.sev_pool <= status.asids.total);
        if !status.snp_enabled {
            println!("skipped: SEV-SNP is not enabled on this host");
            return;
        }
        let policy = 0x30000;
        let page = [0x5a; PAGE_SIZE];
        let gpa = 0x10_0000;
        let mut gctx = Gctx::new();
        gctx.update_normal_page(gpa, &page);
        let digest = gctx.launch_digest();

        let mut launch =
            SnpLaunch::start(Arc::clone(&device) as Arc<dyn SevFirmware>, policy).expect("start");
        launch
            .update(PageUpdate::Normal { gpa, data: &page })
            .expect("update");
        let guest: LaunchedGuest = launch
            .finish(&LaunchFinish {
                id_block: Some(signed_id_block(digest, policy)),
                host_data: [0x11; 32],
            })
            .expect("finish");
        assert_eq!(guest.launch_digest(), digest);
    }
}
