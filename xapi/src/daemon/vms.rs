//! The VM lifecycle: create, start, stop, reboot, delete, and keeping the
//! store true to what runs (adoption after a restart, a monitor that
//! notices dead VMMs). Blocking code: the gRPC layer calls it from
//! `spawn_blocking`, with a progress callback.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hsev_attestation::firmware::simulated::SimulatedFirmware;
use hsev_attestation::firmware::{channel, LaunchedGuest, SevFirmware};
use hsev_attestation::report::GuestPolicy;
use hsev_attestation::tenant_attest;
use time::OffsetDateTime;

use super::agent_link;
use super::artifacts;
use super::auth::Caller;
use super::error::{Kind, OpError};
use super::host::HostCapabilities;
use super::images;
use super::metrics::{Metrics, StateLabels};
use crate::hypervisor::{
    Boot, ConfidentialLaunch, Disk, DiskFormat, ExitReason, HypervisorDriver, LaunchSpec,
    RuntimeState, StopMode, StopOutcome,
};
use crate::launch::{self, ImageBytes};
use crate::model::{
    check_labels, Attestation, ConfidentialMode, DiskRecord, ImageRecord, OwnerIdBlock, VmId,
    VmRecord, VmRuntime, VmSpec, VmState, ENCRYPTED_DISK_NAME,
};
use crate::store::{Store, VmFilter};

/// Reports a step of a long operation: (step, detail, percent).
pub type Progress<'a> = &'a (dyn Fn(&str, &str, u32) + Sync);

/// The SEV firmware this host launches with.
#[derive(Debug, Clone)]
pub enum Firmware {
    /// No SEV on this host.
    None,
    /// `/dev/sev`: QEMU launches SEV guests itself.
    Real(Arc<dyn SevFirmware>),
    /// The simulated Secure Processor: this daemon launches through it and
    /// relays its guests' requests.
    Simulated(Arc<SimulatedFirmware>),
}

/// What an expected measurement depends on besides the image's bytes:
/// image id, mode, vCPUs, vCPU type.
type MeasurementKey = (String, ConfidentialMode, u32, String);

/// Everything the lifecycle needs.
pub struct VmManager {
    store: Arc<Store>,
    driver: Arc<dyn HypervisorDriver>,
    firmware: Firmware,
    host_name: String,
    vms_dir: PathBuf,
    allow_debug_policy: bool,
    default_vcpu_type: String,
    capabilities: RwLock<HostCapabilities>,
    /// Simulated launches of running VMs: dropping one frees its ASID.
    simulated: Mutex<HashMap<VmId, Arc<LaunchedGuest>>>,
    /// Expected measurements already computed, by image, mode, vCPUs and
    /// vCPU type: hashing an image's artifacts once serves every VM alike.
    measurements: Mutex<HashMap<MeasurementKey, Vec<u8>>>,
    /// One lock per VM: lifecycle operations on a VM never overlap.
    locks: Mutex<HashMap<VmId, Arc<Mutex<()>>>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for VmManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmManager")
            .field("host", &self.host_name)
            .finish_non_exhaustive()
    }
}

/// What [`VmManager::new`] takes.
#[derive(Debug)]
pub struct ManagerParts {
    /// The store.
    pub store: Arc<Store>,
    /// The hypervisor driver.
    pub driver: Arc<dyn HypervisorDriver>,
    /// The firmware.
    pub firmware: Firmware,
    /// This host's name.
    pub host_name: String,
    /// Where VM folders go.
    pub vms_dir: PathBuf,
    /// Accept DEBUG guest policies.
    pub allow_debug_policy: bool,
    /// vCPU model when a spec names none.
    pub default_vcpu_type: String,
    /// Probed capabilities.
    pub capabilities: HostCapabilities,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

const DEFAULT_POLICY: u64 = 0x30000;

fn valid_vm_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|first| first.is_ascii_lowercase())
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn valid_disk_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl VmManager {
    /// A manager over `parts`.
    pub fn new(parts: ManagerParts) -> Self {
        VmManager {
            store: parts.store,
            driver: parts.driver,
            firmware: parts.firmware,
            host_name: parts.host_name,
            vms_dir: parts.vms_dir,
            allow_debug_policy: parts.allow_debug_policy,
            default_vcpu_type: parts.default_vcpu_type,
            capabilities: RwLock::new(parts.capabilities),
            simulated: Mutex::new(HashMap::new()),
            measurements: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            metrics: parts.metrics,
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// This host's name.
    pub fn host_name(&self) -> &str {
        &self.host_name
    }

    /// The capabilities last probed.
    pub fn capabilities(&self) -> HostCapabilities {
        self.capabilities
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the capabilities after a new probe.
    pub fn set_capabilities(&self, capabilities: HostCapabilities) {
        *self
            .capabilities
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = capabilities;
    }

    /// Probes the hypervisor and the firmware again (free ASIDs, TCB, ...).
    pub fn reprobe(&self) -> Result<(), OpError> {
        let driver = self.driver.probe()?;
        let firmware: Option<&dyn SevFirmware> = match &self.firmware {
            Firmware::None => None,
            Firmware::Real(device) => Some(device.as_ref()),
            Firmware::Simulated(simulated) => Some(simulated.as_ref()),
        };
        self.set_capabilities(super::host::capabilities(
            &driver,
            firmware,
            self.allow_debug_policy,
        ));
        Ok(())
    }

    /// Whether this host's firmware is simulated.
    pub fn simulated_firmware(&self) -> bool {
        matches!(self.firmware, Firmware::Simulated(_))
    }

    fn lock(&self, vm: &VmId) -> Arc<Mutex<()>> {
        let mut locks = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(locks.entry(vm.clone()).or_default())
    }

    /// Runs `operation` holding the VM's lock, on the record read under it:
    /// another operation may have changed the VM before the lock was had.
    fn locked<T>(
        &self,
        caller: &Caller,
        vm: &str,
        operation: impl FnOnce(VmRecord) -> Result<T, OpError>,
    ) -> Result<T, OpError> {
        let id = self.get(caller, vm)?.id;
        let guard = self.lock(&id);
        let _held = guard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        operation(self.get(caller, &id.0)?)
    }

    fn run_dir(&self, vm: &VmId) -> PathBuf {
        self.vms_dir.join(&vm.0)
    }

    fn event(&self, vm: &VmId, kind: &str, detail: &str) {
        if let Err(error) = self.store.append_event(Some(vm), kind, detail) {
            tracing::warn!(vm = %vm, %error, "cannot record an event");
        }
    }

    /// Refreshes the per-state VM gauges from the store.
    pub fn update_gauges(&self) {
        if let Ok(vms) = self.store.list_vms(self.on_this_host(None)) {
            self.set_gauges(&vms);
        }
    }

    fn set_gauges(&self, vms: &[VmRecord]) {
        for state in VmState::ALL {
            let count = vms.iter().filter(|vm| vm.state == state).count();
            self.metrics
                .vms
                .get_or_create(&StateLabels {
                    state: state.as_str().to_owned(),
                })
                .set(count as i64);
        }
    }

    /// This host's VMs, of every owner, optionally in one state.
    fn on_this_host(&self, state: Option<VmState>) -> VmFilter<'_> {
        VmFilter {
            owner: None,
            state,
            host: Some(&self.host_name),
        }
    }

    /// A VM the caller may see.
    pub fn get(&self, caller: &Caller, vm: &str) -> Result<VmRecord, OpError> {
        Ok(self.store.get_vm(vm, caller.owner_scope())?)
    }

    /// The caller's VMs (every VM for admins), filtered.
    pub fn list(
        &self,
        caller: &Caller,
        state: Option<VmState>,
        owner: Option<&str>,
    ) -> Result<Vec<VmRecord>, OpError> {
        let owner = match caller.owner_scope() {
            Some(own) => Some(own),
            None => owner.filter(|owner| !owner.is_empty()),
        };
        Ok(self.store.list_vms(VmFilter {
            owner,
            state,
            host: None,
        })?)
    }

    /// Checks a spec against the host; fills in defaults.
    fn validate(&self, mut spec: VmSpec) -> Result<VmSpec, OpError> {
        let capabilities = self.capabilities();
        if !valid_vm_name(&spec.name) {
            return Err(OpError::invalid(format!(
                "name {:?}: 1-63 of a-z, 0-9 and '-', starting with a letter",
                spec.name
            )));
        }
        if spec.vcpus == 0 {
            return Err(OpError::invalid("vcpus must be at least 1"));
        }
        if spec.vcpus > capabilities.cpus {
            return Err(OpError::invalid(format!(
                "vcpus {} exceeds the host's {} CPUs",
                spec.vcpus, capabilities.cpus
            )));
        }
        if spec.memory_mib < 64 {
            return Err(OpError::invalid("memory_mib must be at least 64"));
        }
        if spec.memory_mib > capabilities.memory_mib {
            return Err(OpError::invalid(format!(
                "memory_mib {} exceeds the host's {} MiB",
                spec.memory_mib, capabilities.memory_mib
            )));
        }
        let mut disk_names = std::collections::HashSet::new();
        for disk in &spec.disks {
            if disk.name == ENCRYPTED_DISK_NAME {
                return Err(OpError::invalid(format!(
                    "disk name {ENCRYPTED_DISK_NAME:?} is reserved for the encrypted disk \
                     (encrypted_disk_mib)"
                )));
            }
            if !valid_disk_name(&disk.name) || !disk_names.insert(disk.name.clone()) {
                return Err(OpError::invalid(format!(
                    "disk name {:?} is invalid or repeated",
                    disk.name
                )));
            }
            if disk.size_mib == 0 {
                return Err(OpError::invalid(format!(
                    "disk {} must be at least 1 MiB",
                    disk.name
                )));
            }
        }
        if spec
            .port_forwards
            .iter()
            .any(|forward| forward.guest_port == 0)
        {
            return Err(OpError::invalid("port_forwards: guest_port must not be 0"));
        }
        check_labels(&spec.labels).map_err(OpError::invalid)?;
        if spec.vcpu_type.is_empty() {
            spec.vcpu_type = self.default_vcpu_type.clone();
        }
        if hsev_attestation::measurement::vcpu_sig_for_type(&spec.vcpu_type).is_none() {
            return Err(OpError::invalid(format!(
                "unknown vcpu_type {:?}",
                spec.vcpu_type
            )));
        }
        if spec.mode != ConfidentialMode::None {
            if spec.guest_policy == 0 {
                spec.guest_policy = DEFAULT_POLICY;
            }
            let policy = GuestPolicy::new(spec.guest_policy)
                .map_err(|error| OpError::invalid(format!("guest_policy: {error}")))?;
            if policy.debug_allowed() && !self.allow_debug_policy {
                return Err(OpError::precondition(format!(
                    "guest_policy {:#x} allows debugging (the host could read the guest), which this host forbids",
                    spec.guest_policy
                )));
            }
        }
        let sev = &capabilities.sev;
        let supported = match spec.mode {
            ConfidentialMode::None => true,
            ConfidentialMode::SevSnp => sev.snp,
            ConfidentialMode::Sev => sev.sev && !sev.simulated,
            ConfidentialMode::SevEs => sev.sev_es && !sev.simulated,
        };
        if spec.encrypted_disk_mib > 0 {
            if spec.mode != ConfidentialMode::SevSnp {
                return Err(OpError::invalid(format!(
                    "encrypted_disk_mib needs mode sev-snp (the key is released to an attested \
                     SNP guest), not {}",
                    spec.mode
                )));
            }
            if spec.key_broker.is_none() {
                return Err(OpError::invalid(
                    "encrypted_disk_mib needs key_broker: the tenant's key broker (url, pin, \
                     repository) that will hold the disk's key",
                ));
            }
        }
        if let Some(binding) = &spec.key_broker {
            validate_key_broker(binding)?;
            if spec.mode != ConfidentialMode::SevSnp {
                return Err(OpError::invalid(format!(
                    "key_broker needs mode sev-snp (the guest attests to it), not {}",
                    spec.mode
                )));
            }
        }
        if let Some(id_block) = &spec.id_block {
            check_id_block_signatures_and_policy(&spec, id_block)?;
        }
        if !supported {
            return Err(OpError::precondition(format!(
                "this host cannot run {} guests ({})",
                spec.mode,
                if sev.simulated {
                    "its simulated Secure Processor runs SEV-SNP only".to_owned()
                } else if sev.snp || sev.sev {
                    "not enabled in its firmware".to_owned()
                } else {
                    "no SEV firmware, and the simulated one is not enabled".to_owned()
                }
            )));
        }
        Ok(spec)
    }

    /// Creates a VM; starts it when asked.
    pub fn create(
        &self,
        caller: &Caller,
        spec: VmSpec,
        start: bool,
        progress: Progress<'_>,
    ) -> Result<VmRecord, OpError> {
        progress("validate", "checking the spec", 5);
        let mut spec = self.validate(spec)?;
        let image = self
            .store
            .get_image(&spec.image)
            .map_err(|error| match error {
                crate::store::StoreError::NotFound { .. } => {
                    OpError::invalid(format!("unknown image {:?}", spec.image))
                }
                other => other.into(),
            })?;
        spec.image = image.id.clone();
        let id = VmId(uuid::Uuid::new_v4().to_string());
        progress(
            "measurement",
            "computing the expected launch measurement",
            15,
        );
        let expected_measurement = self.expected_measurement(&id, &spec, &image)?;
        if let Some(id_block) = &spec.id_block {
            check_id_block_digest(&spec, id_block, &expected_measurement)?;
        }

        let spec_is_confidential = spec.mode != ConfidentialMode::None;
        let run_dir = self.run_dir(&id);
        let now = OffsetDateTime::now_utc();
        let mut disks: Vec<DiskRecord> = spec
            .disks
            .iter()
            .map(|disk| DiskRecord {
                vm: id.clone(),
                name: disk.name.clone(),
                path: run_dir.join(format!("disk-{}.qcow2", disk.name)),
                size_mib: disk.size_mib,
            })
            .collect();
        let encrypted_disk = (spec.encrypted_disk_mib > 0).then(|| DiskRecord {
            vm: id.clone(),
            name: ENCRYPTED_DISK_NAME.to_owned(),
            path: run_dir.join(format!("disk-{ENCRYPTED_DISK_NAME}.raw")),
            size_mib: spec.encrypted_disk_mib,
        });
        disks.extend(encrypted_disk.clone());
        let record = VmRecord {
            id: id.clone(),
            owner: caller.name.clone(),
            spec,
            state: VmState::Creating,
            state_reason: String::new(),
            host: self.host_name.clone(),
            expected_measurement,
            launch_digest: Vec::new(),
            attestation: if spec_is_confidential {
                Attestation::Pending
            } else {
                Attestation::NotApplicable
            },
            runtime: None,
            created_at: now,
            updated_at: now,
        };
        let guard = self.lock(&id);
        let _held = guard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.store.insert_vm(&record, &disks)?;
        let prepared = (|| -> Result<(), OpError> {
            std::fs::create_dir_all(&run_dir).map_err(|error| {
                OpError::internal(format!("cannot create {}: {error}", run_dir.display()))
            })?;
            // The encrypted disk, known by its name as at launch, is made below.
            let plain_disks = disks.iter().filter(|disk| disk.name != ENCRYPTED_DISK_NAME);
            for (index, disk) in plain_disks.enumerate() {
                progress(
                    "disks",
                    &format!("creating data disk {} ({} MiB)", disk.name, disk.size_mib),
                    30 + 30 * index as u32 / disks.len() as u32,
                );
                self.driver.create_disk(&disk.path, disk.size_mib)?;
            }
            if let Some(disk) = &encrypted_disk {
                progress(
                    "disks",
                    &format!(
                        "creating the encrypted disk ({} MiB) empty: the guest formats it with \
                         the key its tenant's broker releases to it, which this host never sees",
                        disk.size_mib
                    ),
                    60,
                );
                create_empty_disk(&disk.path, disk.size_mib)?;
            }
            Ok(())
        })();
        if let Err(error) = prepared {
            // Nothing is left behind: no record, no files.
            let _ = std::fs::remove_dir_all(&run_dir);
            let _ = self.store.delete_vm(&id);
            return Err(error);
        }
        self.store
            .update_vm_state(&id, VmState::Stopped, "created")?;
        self.event(
            &id,
            "created",
            &format!("{} by {}", record.spec.name, caller.name),
        );
        tracing::info!(vm = %id, name = %record.spec.name, owner = %caller.name, mode = %record.spec.mode, "created");
        drop(_held);
        if start {
            return self.start(caller, &id.0, progress);
        }
        progress("done", "created", 100);
        self.get(caller, &id.0)
    }

    fn expected_measurement(
        &self,
        vm: &VmId,
        spec: &VmSpec,
        image: &ImageRecord,
    ) -> Result<Vec<u8>, OpError> {
        let files = images::files(image).artifact_paths();
        if spec.key_broker.is_some() {
            // Its command line names the VM: a measurement of its own.
            let cmdline = launch::guest_cmdline(&image.cmdline, vm, spec);
            let bytes = ImageBytes::read(&files, &cmdline, image.measured_direct_boot)?;
            return Ok(launch::expected_measurement(spec, &bytes)?);
        }
        let key = (
            image.id.clone(),
            spec.mode,
            spec.vcpus,
            spec.vcpu_type.clone(),
        );
        let cached = self
            .measurements
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            .cloned();
        if let Some(measurement) = cached {
            return Ok(measurement);
        }
        let bytes = ImageBytes::read(&files, &image.cmdline, image.measured_direct_boot)?;
        let measurement = launch::expected_measurement(spec, &bytes)?;
        self.measurements
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, measurement.clone());
        Ok(measurement)
    }

    /// Sets (or with `None` removes) the owner's ID block of a stopped
    /// SEV-SNP VM. Refused, with both digests, when the block authorises
    /// another measurement than this VM's: the firmware would refuse the
    /// launch (BAD_MEASUREMENT) anyway.
    pub fn set_id_block(
        &self,
        caller: &Caller,
        vm: &str,
        id_block: Option<OwnerIdBlock>,
    ) -> Result<VmRecord, OpError> {
        self.locked(caller, vm, |record| {
            if record.spec.mode != ConfidentialMode::SevSnp {
                return Err(OpError::invalid(format!(
                    "VM {} is {}: ID blocks are for sev-snp VMs",
                    record.spec.name, record.spec.mode
                )));
            }
            if !matches!(record.state, VmState::Stopped | VmState::Failed) {
                return Err(OpError::precondition(format!(
                    "VM {} is {}: its ID block changes only while it is stopped",
                    record.spec.name, record.state
                )));
            }
            if let Some(id_block) = &id_block {
                check_id_block_signatures_and_policy(&record.spec, id_block)?;
                check_id_block_digest(&record.spec, id_block, &record.expected_measurement)?;
            }
            let mut spec = record.spec.clone();
            spec.id_block = id_block;
            self.store.set_vm_spec(&record.id, &spec)?;
            self.event(
                &record.id,
                "id-block",
                if spec.id_block.is_some() {
                    "set by the owner"
                } else {
                    "removed"
                },
            );
            self.get(caller, &record.id.0)
        })
    }

    /// Starts a stopped or failed VM.
    pub fn start(
        &self,
        caller: &Caller,
        vm: &str,
        progress: Progress<'_>,
    ) -> Result<VmRecord, OpError> {
        self.locked(caller, vm, |record| {
            self.start_locked(caller, &record, progress)
        })
    }

    fn start_locked(
        &self,
        caller: &Caller,
        record: &VmRecord,
        progress: Progress<'_>,
    ) -> Result<VmRecord, OpError> {
        let started_at = Instant::now();
        self.store
            .transition_vm_state(
                &record.id,
                &[VmState::Stopped, VmState::Failed],
                VmState::Starting,
                "starting",
            )
            .map_err(|error| match error {
                crate::store::StoreError::WrongState { state, .. } => {
                    OpError::precondition(format!(
                        "VM {} is {state}: only stopped or failed VMs start",
                        record.spec.name
                    ))
                }
                other => other.into(),
            })?;
        match self.launch(record, progress) {
            Ok(runtime) => {
                self.metrics
                    .start_seconds
                    .observe(started_at.elapsed().as_secs_f64());
                self.store.set_vm_runtime(&record.id, Some(&runtime))?;
                self.store
                    .update_vm_state(&record.id, VmState::Running, "running")?;
                self.event(&record.id, "started", &runtime.vmm());
                tracing::info!(vm = %record.id, vmm = %runtime.vmm(), elapsed_ms = started_at.elapsed().as_millis() as u64, "started");
                progress("done", "running", 100);
                self.get(caller, &record.id.0)
            }
            Err(error) => {
                self.store
                    .update_vm_state(&record.id, VmState::Failed, &error.message)?;
                self.event(&record.id, "start-failed", &error.message);
                Err(error)
            }
        }
    }

    /// Performs the launch: the simulated Secure Processor first when this
    /// host has one, then the VMM.
    fn launch(&self, record: &VmRecord, progress: Progress<'_>) -> Result<VmRuntime, OpError> {
        let image = self.store.get_image(&record.spec.image)?;
        let files = images::files(&image);
        let run_dir = self.run_dir(&record.id);
        std::fs::create_dir_all(&run_dir).map_err(|error| {
            OpError::internal(format!("cannot create {}: {error}", run_dir.display()))
        })?;
        let disks: Vec<Disk> = self
            .store
            .disks(&record.id)?
            .into_iter()
            .map(|disk| {
                if disk.name == ENCRYPTED_DISK_NAME {
                    Disk {
                        path: disk.path,
                        format: DiskFormat::Raw,
                        read_only: false,
                        serial: Some(ENCRYPTED_DISK_NAME.to_owned()),
                    }
                } else {
                    Disk::qcow2(disk.path)
                }
            })
            .collect();
        let spec = &record.spec;
        let mut simulated_guest = None;
        let confidential = match (spec.mode, &self.firmware) {
            (ConfidentialMode::None, _) => ConfidentialLaunch::None,
            (ConfidentialMode::SevSnp, Firmware::Simulated(firmware)) => {
                progress(
                    "launch",
                    "SNP launch through the simulated Secure Processor",
                    20,
                );
                let bytes = ImageBytes::read(
                    &files.artifact_paths(),
                    &launch::guest_cmdline(&image.cmdline, &record.id, spec),
                    image.measured_direct_boot,
                )?;
                let shared: Arc<dyn SevFirmware> = Arc::clone(firmware) as Arc<dyn SevFirmware>;
                let guest = artifacts::simulated_launch(shared, &record.id, spec, &bytes)?;
                self.store
                    .set_launch_digest(&record.id, &guest.launch_digest())?;
                let page = artifacts::kernel_hashes_page(&bytes, &run_dir)?;
                simulated_guest = Some(guest);
                ConfidentialLaunch::SimulatedSnp {
                    channel_socket: run_dir.join("sim-sp.sock"),
                    kernel_hashes_page: page,
                }
            }
            (ConfidentialMode::SevSnp, _) => ConfidentialLaunch::SevSnp {
                policy: spec.guest_policy,
                host_data: launch::host_data(&record.id),
                id_block: spec
                    .id_block
                    .as_ref()
                    .map(|id_block| id_block.signed.clone()),
                kernel_hashes: image.measured_direct_boot,
            },
            (ConfidentialMode::Sev | ConfidentialMode::SevEs, _) => ConfidentialLaunch::Sev {
                policy: u32::try_from(spec.guest_policy)
                    .map_err(|_| OpError::invalid("an SEV policy is 32 bits"))?,
                kernel_hashes: image.measured_direct_boot,
            },
        };
        let boot = match &files.boot {
            // An ordinary VM boots its kernel with QEMU's BIOS, the fastest way.
            images::ImageBoot::Direct { kernel, initrd } => Boot::Direct {
                firmware: (spec.mode != ConfidentialMode::None).then(|| files.firmware.clone()),
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline: launch::guest_cmdline(&image.cmdline, &record.id, spec),
            },
            images::ImageBoot::Disk { path, format } => Boot::Firmware {
                ovmf: files.firmware.clone(),
                disk: Some(Disk {
                    path: path.clone(),
                    format: *format,
                    read_only: true,
                    serial: None,
                }),
            },
        };
        let launch = LaunchSpec {
            vm_id: record.id.clone(),
            name: spec.name.clone(),
            run_dir,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            cpu_model: (spec.mode != ConfidentialMode::None).then(|| spec.vcpu_type.clone()),
            boot,
            disks,
            port_forwards: spec.port_forwards.clone(),
            confidential,
            agent_channel: spec
                .key_broker
                .as_ref()
                .map(|_| self.run_dir(&record.id).join("agent.sock")),
            // Every SNP guest answers its tenant's attestation requests.
            attest_channel: (spec.mode == ConfidentialMode::SevSnp)
                .then(|| self.run_dir(&record.id).join("attest.sock")),
        };
        progress("qemu", "starting the VMM", 60);
        if spec.key_broker.is_some() {
            // A new boot attests anew.
            self.store
                .set_attestation(&record.id, &Attestation::Pending)?;
        }
        let mut runtime = self.driver.start(&launch)?;
        if let Some(socket) = &runtime.agent_channel {
            agent_link::follow(Arc::clone(&self.store), record.id.clone(), socket.clone());
        }
        if let Some(guest) = simulated_guest {
            runtime.sim_launch_id = Some(guest.id());
            self.relay(
                record.id.clone(),
                Arc::new(guest),
                runtime.sim_channel.clone(),
            );
        }
        Ok(runtime)
    }

    /// Relays the guest's requests from the VMM's channel socket to its
    /// launch, reconnecting after a broken frame, until the VMM is gone.
    fn relay(&self, vm: VmId, guest: Arc<LaunchedGuest>, socket: Option<PathBuf>) {
        self.simulated
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(vm.clone(), Arc::clone(&guest));
        let Some(socket) = socket else { return };
        std::thread::spawn(move || loop {
            let mut stream = match UnixStream::connect(&socket) {
                Ok(stream) => stream,
                // The VMM is gone: its socket is.
                Err(_) => return,
            };
            match channel::serve(&mut stream, &guest) {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(vm = %vm, %error, "simulated Secure Processor channel reset");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
    }

    fn forget_simulated(&self, vm: &VmId) {
        self.simulated
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(vm);
    }

    /// Stops a running VM.
    pub fn stop(
        &self,
        caller: &Caller,
        vm: &str,
        force: bool,
        timeout: Duration,
        progress: Progress<'_>,
    ) -> Result<VmRecord, OpError> {
        self.locked(caller, vm, |record| {
            self.stop_locked(&record, force, timeout, progress)?;
            progress("done", "stopped", 100);
            self.get(caller, &record.id.0)
        })
    }

    fn stop_locked(
        &self,
        record: &VmRecord,
        force: bool,
        timeout: Duration,
        progress: Progress<'_>,
    ) -> Result<(), OpError> {
        if record.state == VmState::Stopped {
            return Ok(());
        }
        let Some(runtime) = record.runtime.clone() else {
            self.store
                .update_vm_state(&record.id, VmState::Stopped, "stopped")?;
            return Ok(());
        };
        self.store.transition_vm_state(
            &record.id,
            &[record.state],
            VmState::Stopping,
            "stopping",
        )?;
        progress(
            "stop",
            if force {
                "killing the VMM"
            } else {
                "ACPI shutdown"
            },
            30,
        );
        let mode = if force {
            StopMode::Force
        } else {
            StopMode::Graceful { timeout }
        };
        let outcome = self.driver.stop(&runtime, mode)?;
        let reason = match outcome {
            StopOutcome::Graceful => "the guest powered off".to_owned(),
            StopOutcome::Forced { reason } => reason,
            StopOutcome::AlreadyExited(reason) => reason.to_string(),
        };
        self.forget_simulated(&record.id);
        self.store.set_vm_runtime(&record.id, None)?;
        self.store
            .update_vm_state(&record.id, VmState::Stopped, &reason)?;
        self.event(&record.id, "stopped", &reason);
        tracing::info!(vm = %record.id, %reason, "stopped");
        Ok(())
    }

    /// Reboots a running VM. A confidential guest gets a new launch (SNP
    /// guests cannot be reset in place) and attests again.
    pub fn reboot(
        &self,
        caller: &Caller,
        vm: &str,
        progress: Progress<'_>,
    ) -> Result<VmRecord, OpError> {
        let record = self.get(caller, vm)?;
        if record.state != VmState::Running {
            return Err(OpError::precondition(format!(
                "VM {} is {}: only running VMs reboot",
                record.spec.name, record.state
            )));
        }
        if record.spec.mode == ConfidentialMode::None {
            if let Some(runtime) = &record.runtime {
                progress("reboot", "resetting the guest", 50);
                self.driver.reboot(runtime)?;
                self.event(&record.id, "rebooted", "system reset");
                progress("done", "running", 100);
                return self.get(caller, vm);
            }
        }
        {
            let guard = self.lock(&record.id);
            let _held = guard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let record = self.get(caller, &record.id.0)?;
            self.stop_locked(&record, false, Duration::from_secs(30), progress)?;
        }
        if record.spec.mode != ConfidentialMode::None {
            self.store
                .set_attestation(&record.id, &Attestation::Pending)?;
        }
        self.start(caller, vm, progress)
    }

    /// Replaces a VM's labels: the one change a spec takes after creation,
    /// since nothing in a launch depends on them.
    pub fn set_labels(
        &self,
        caller: &Caller,
        vm: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<VmRecord, OpError> {
        check_labels(&labels).map_err(OpError::invalid)?;
        self.locked(caller, vm, |record| {
            if matches!(record.state, VmState::Creating | VmState::Deleting) {
                return Err(OpError::precondition(format!(
                    "VM {} is {}: its labels change once it is not",
                    record.spec.name, record.state
                )));
            }
            if record.spec.labels != labels {
                self.store.set_vm_labels(&record.id, &labels)?;
                let text = labels_text(&labels);
                self.event(&record.id, "labelled", &text);
                tracing::info!(vm = %record.id, labels = %text, "labelled");
            }
            self.get(caller, &record.id.0)
        })
    }

    /// Deletes a VM: stops it, removes (optionally wipes) its disks.
    pub fn delete(
        &self,
        caller: &Caller,
        vm: &str,
        wipe: bool,
        progress: Progress<'_>,
    ) -> Result<VmRecord, OpError> {
        self.locked(caller, vm, |record| {
            if record.runtime.is_some() {
                self.stop_locked(&record, true, Duration::ZERO, progress)?;
            }
            self.store
                .update_vm_state(&record.id, VmState::Deleting, "deleting")?;
            let disks = self.store.disks(&record.id)?;
            if wipe {
                for disk in &disks {
                    progress("wipe", &format!("wiping disk {}", disk.name), 50);
                    self.driver.wipe_disk(&disk.path)?;
                }
            }
            progress("remove", "removing files", 80);
            let run_dir = self.run_dir(&record.id);
            if run_dir.exists() {
                std::fs::remove_dir_all(&run_dir).map_err(|error| {
                    OpError::internal(format!("cannot remove {}: {error}", run_dir.display()))
                })?;
            }
            self.store.delete_vm(&record.id)?;
            self.store
                .append_event(Some(&record.id), "deleted", &record.spec.name)
                .ok();
            tracing::info!(vm = %record.id, "deleted");
            progress("done", "deleted", 100);
            let mut deleted = record;
            deleted.state = VmState::Deleting;
            deleted.runtime = None;
            Ok(deleted)
        })
    }

    /// Relays the tenant's attestation request to `vm`'s guest agent and its
    /// answer back: the host neither makes nor judges the evidence, and the
    /// guest binds the nonce so that this relay cannot choose what it signs
    /// ([`hsev_attestation::tenant_attest`]).
    pub fn attest(
        &self,
        caller: &Caller,
        vm: &str,
        nonce: &[u8; tenant_attest::NONCE_LEN],
    ) -> Result<serde_json::Value, OpError> {
        let record = self.get(caller, vm)?;
        let socket = match (&record.runtime, record.state) {
            (Some(runtime), VmState::Running) => runtime.attest_channel.clone(),
            _ => {
                return Err(OpError::precondition(format!(
                    "VM {} is {}: only a running sev-snp guest attests",
                    record.spec.name, record.state
                )))
            }
        }
        .ok_or_else(|| {
            OpError::precondition(format!(
                "VM {} has no attestation port (only sev-snp guests have one)",
                record.spec.name
            ))
        })?;
        let answer = agent_link::ask_attestation(&socket, nonce).map_err(|error| {
            OpError::unavailable(format!(
                "the guest agent of VM {} did not answer: {error}",
                record.spec.name
            ))
        })?;
        self.event(&record.id, "attested", "evidence relayed to its tenant");
        match answer {
            tenant_attest::AttestAnswer::Evidence(evidence) => Ok(evidence),
            tenant_attest::AttestAnswer::Error(reason) => Err(OpError::precondition(format!(
                "the guest agent of VM {} has no evidence: {reason}",
                record.spec.name
            ))),
        }
    }

    /// Waits for a VM to reach `state`.
    pub fn wait(
        &self,
        caller: &Caller,
        vm: &str,
        state: VmState,
        timeout: Duration,
    ) -> Result<VmRecord, OpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let record = self.get(caller, vm)?;
            if record.state == state {
                return Ok(record);
            }
            if record.state == VmState::Failed {
                return Err(OpError::precondition(format!(
                    "VM {} failed ({}); it will not become {state}",
                    record.spec.name, record.state_reason
                )));
            }
            if Instant::now() >= deadline {
                return Err(OpError::new(
                    Kind::DeadlineExceeded,
                    format!(
                        "VM {} is still {} after {}s",
                        record.spec.name,
                        record.state,
                        timeout.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Takes back the VMs that kept running while the daemon was down, and
    /// marks the others with why they are not running.
    pub fn reconcile(&self) -> Result<(), OpError> {
        let vms = self.store.list_vms(self.on_this_host(None))?;
        for record in vms {
            match (&record.runtime, record.state) {
                (Some(runtime), _) => match self.driver.adopt(runtime) {
                    Ok(RuntimeState::Running | RuntimeState::Paused { .. }) => {
                        self.adopt_simulated(&record, runtime);
                        if let Some(socket) = &runtime.agent_channel {
                            agent_link::follow(
                                Arc::clone(&self.store),
                                record.id.clone(),
                                socket.clone(),
                            );
                        }
                        if record.state != VmState::Running {
                            self.store
                                .update_vm_state(&record.id, VmState::Running, "adopted")?;
                        }
                        self.event(&record.id, "adopted", &runtime.vmm());
                        tracing::info!(vm = %record.id, vmm = %runtime.vmm(), "adopted a running VM");
                    }
                    Ok(RuntimeState::Exited(reason)) => {
                        self.mark_dead(&record, &format!("while hsevd was down: {reason}"))
                    }
                    Err(error) => self.mark_dead(&record, &format!("cannot adopt: {error}")),
                },
                (
                    None,
                    VmState::Creating | VmState::Starting | VmState::Stopping | VmState::Deleting,
                ) => {
                    self.store.update_vm_state(
                        &record.id,
                        VmState::Failed,
                        "interrupted by a daemon restart",
                    )?;
                }
                (None, _) => {}
            }
        }
        Ok(())
    }

    fn adopt_simulated(&self, record: &VmRecord, runtime: &VmRuntime) {
        if let (Firmware::Simulated(firmware), Some(launch)) =
            (&self.firmware, runtime.sim_launch_id)
        {
            match SimulatedFirmware::adopt(firmware, launch) {
                Ok(guest) => self.relay(
                    record.id.clone(),
                    Arc::new(guest),
                    runtime.sim_channel.clone(),
                ),
                Err(error) => {
                    tracing::warn!(vm = %record.id, %error, "cannot adopt its simulated launch")
                }
            }
        }
    }

    /// Records that a VM's VMM is gone, and releases what it held.
    fn mark_dead(&self, record: &VmRecord, reason: &str) {
        self.metrics.vm_crashes.inc();
        if let (Firmware::Simulated(firmware), Some(launch)) = (
            &self.firmware,
            record
                .runtime
                .as_ref()
                .and_then(|runtime| runtime.sim_launch_id),
        ) {
            self.forget_simulated(&record.id);
            // Adopting and dropping decommissions the launch: its ASID is free.
            drop(SimulatedFirmware::adopt(firmware, launch));
        }
        let result = self.store.set_vm_runtime(&record.id, None).and_then(|()| {
            self.store
                .update_vm_state(&record.id, VmState::Failed, reason)
        });
        if let Err(error) = result {
            tracing::error!(vm = %record.id, %error, "cannot record a dead VM");
        }
        self.event(&record.id, "died", reason);
        tracing::warn!(vm = %record.id, reason, "VM died");
    }

    /// One pass of the monitor: every running VM's VMM is checked.
    pub fn monitor_tick(&self) {
        // One read serves the gauges and the check of the running VMs.
        let Ok(vms) = self.store.list_vms(self.on_this_host(None)) else {
            return;
        };
        self.set_gauges(&vms);
        for record in vms.iter().filter(|vm| vm.state == VmState::Running) {
            let Some(runtime) = &record.runtime else {
                continue;
            };
            let guard = self.lock(&record.id);
            let Ok(_held) = guard.try_lock() else {
                continue;
            };
            match self.driver.state(runtime) {
                Ok(RuntimeState::Exited(ExitReason::GuestShutdown)) => {
                    let _ = self.driver.stop(runtime, StopMode::Force);
                    self.forget_simulated(&record.id);
                    let _ = self.store.set_vm_runtime(&record.id, None);
                    let _ = self.store.update_vm_state(
                        &record.id,
                        VmState::Stopped,
                        "the guest powered off",
                    );
                    self.event(&record.id, "stopped", "the guest powered off");
                }
                Ok(RuntimeState::Exited(reason)) => {
                    let _ = self.driver.stop(runtime, StopMode::Force);
                    self.mark_dead(record, &reason.to_string());
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(vm = %record.id, %error, "cannot read the VM's state")
                }
            }
        }
    }

    /// The console log of a VM.
    pub fn console_log(&self, caller: &Caller, vm: &str) -> Result<PathBuf, OpError> {
        let record = self.get(caller, vm)?;
        Ok(match &record.runtime {
            Some(runtime) => runtime.console_log.clone(),
            None => self.run_dir(&record.id).join("console.log"),
        })
    }
}

/// Creates the empty (sparse) disk a guest encrypts itself.
fn create_empty_disk(path: &std::path::Path, size_mib: u64) -> Result<(), OpError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|error| OpError::internal(format!("cannot create {}: {error}", path.display())))?;
    file.set_len(size_mib * 1024 * 1024)
        .map_err(|error| OpError::internal(format!("cannot size {}: {error}", path.display())))
}

/// A tenant's key broker: an https URL with its key's pin (or, for a
/// development broker, plain http without one) and a repository name.
fn validate_key_broker(binding: &crate::model::KeyBrokerBinding) -> Result<(), OpError> {
    let url = &binding.guest_url;
    let https = url.starts_with("https://");
    if !https && !url.starts_with("http://") {
        return Err(OpError::invalid(format!(
            "key_broker.url {url:?}: an http(s):// URL as the guest reaches the broker"
        )));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(OpError::invalid(format!(
            "key_broker.url {url:?}: no spaces (it goes on the kernel command line)"
        )));
    }
    match (https, binding.pin.as_str()) {
        (true, "") => {
            return Err(OpError::invalid(
                "key_broker.pin: an https broker needs the pin of its public key \
                 (`hsev-kbs fingerprint`): the guest refuses any other",
            ))
        }
        (false, pin) if !pin.is_empty() => {
            return Err(OpError::invalid(
                "key_broker.pin: a plain-http (development) broker has no key to pin",
            ))
        }
        (true, pin) => {
            let hex = pin.strip_prefix("sha256:").unwrap_or_default();
            if hex.len() != 64 || !hex.bytes().all(|byte| byte.is_ascii_hexdigit()) {
                return Err(OpError::invalid(format!(
                    "key_broker.pin {pin:?}: sha256:<64 hex digits>"
                )));
            }
        }
        _ => {}
    }
    hsev_attestation::kbs::protocol::check_name(&binding.repository)
        .map_err(|error| OpError::invalid(format!("key_broker.repository: {error}")))
}

/// An ID block must be signed as it says and be for the VM's guest policy.
fn check_id_block_signatures_and_policy(
    spec: &VmSpec,
    id_block: &OwnerIdBlock,
) -> Result<(), OpError> {
    if spec.mode != ConfidentialMode::SevSnp {
        return Err(OpError::invalid(format!(
            "an ID block is for sev-snp VMs, not {}",
            spec.mode
        )));
    }
    // The owner's signatures, checked now for a clear answer (the firmware
    // checks them again at launch, whatever the host does).
    let block = &id_block.signed.block;
    id_block
        .signed
        .check(&block.launch_digest, block.policy)
        .map_err(|refusal| OpError::invalid(format!("the ID block: {refusal}")))?;
    let policy = block.policy;
    if policy != spec.guest_policy {
        return Err(OpError::invalid(format!(
            "the ID block is for guest policy {policy:#x}, the VM's is {:#x} (the firmware \
             would refuse the launch: POLICY_FAILURE)",
            spec.guest_policy
        )));
    }
    Ok(())
}

/// An ID block must authorise the measurement this VM's launch will have.
fn check_id_block_digest(
    spec: &VmSpec,
    id_block: &OwnerIdBlock,
    expected_measurement: &[u8],
) -> Result<(), OpError> {
    let authorised = id_block.signed.block.launch_digest;
    if authorised.as_slice() != expected_measurement {
        return Err(OpError::precondition(format!(
            "the ID block authorises measurement {}, and VM {} measures {} (the firmware \
             would refuse the launch: BAD_MEASUREMENT)",
            hex::encode(authorised),
            spec.name,
            hex::encode(expected_measurement)
        )));
    }
    Ok(())
}

/// Labels as `key=value` pairs, for the event log.
fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}
