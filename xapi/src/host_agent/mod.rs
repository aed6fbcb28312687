//! The host agent, which every host of the pool runs: it owns this host's
//! hypervisor driver, its SEV firmware (real or simulated), the VM
//! processes and their files, and each guest's channels (the simulated
//! Secure Processor's relay, the guest agent's status and attestation
//! ports). It carries out the coordinator's commands ([`HostClient`]) and
//! reports what happens on its own ([`PoolSink`]).
//!
//! It must never decide where a VM goes and never reads or writes the
//! pool's store: what it knows of a VM is what the coordinator sent it, what
//! runs here, and the small record of each running VMM it keeps in the VM's
//! folder (`runtime.json`), by which it adopts its VMs after a restart.

mod channels;
mod launch;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use hsev_attestation::firmware::simulated::SimulatedFirmware;
use hsev_attestation::firmware::{channel, LaunchedGuest, SevFirmware};
use hsev_attestation::tenant_attest::{AttestAnswer, NONCE_LEN};

use crate::daemon::error::OpError;
use crate::daemon::host::{self, HostCapabilities};
use crate::daemon::images::{self, ImageBoot};
use crate::hypervisor::{
    Boot, ConfidentialLaunch, Disk, DiskFormat, ExitReason, HypervisorDriver, LaunchSpec,
    RuntimeState, StopMode, StopOutcome,
};
use crate::launch::{guest_cmdline, host_data, ImageBytes};
use crate::model::{ConfidentialMode, DiskRecord, HaPolicy, VmId, VmRuntime, ENCRYPTED_DISK_NAME};
use crate::pool::host_service::Membership;
use crate::pool::{
    disk_copy, ConsoleChunk, HostClient, ImageSource, LaunchRequest, Launched, PoolSink, Progress,
    Recovered,
};

/// The SEV firmware this host launches with.
#[derive(Debug, Clone)]
pub enum Firmware {
    /// No SEV on this host.
    None,
    /// `/dev/sev`: QEMU launches SEV guests itself.
    Real(Arc<dyn SevFirmware>),
    /// The simulated Secure Processor: this host launches through it and
    /// relays its guests' requests.
    Simulated(Arc<SimulatedFirmware>),
}

impl Firmware {
    fn as_dyn(&self) -> Option<&dyn SevFirmware> {
        match self {
            Firmware::None => None,
            Firmware::Real(device) => Some(device.as_ref()),
            Firmware::Simulated(simulated) => Some(simulated.as_ref()),
        }
    }
}

/// The file in a VM's folder that records its running VMM.
const RUNTIME_FILE: &str = "runtime.json";

/// The file in a VM's folder present while it runs as an HA VM: what
/// [`HostAgent::fence`] stops.
const HA_FILE: &str = "ha-restart";

/// The file in a VM's folder left by [`HostAgent::fence`], saying why: the
/// coordinator learns of the fenced VM when this host is back.
const FENCED_FILE: &str = "fenced";

/// A VM that runs here.
#[derive(Debug)]
struct Running {
    runtime: VmRuntime,
    /// Its simulated launch, held for as long as the VM runs: dropping it
    /// decommissions the launch and frees its ASID.
    _simulated: Option<Arc<LaunchedGuest>>,
}

/// What [`HostAgent::new`] takes.
#[derive(Debug)]
pub struct HostAgentParts {
    /// This host's name in the pool.
    pub name: String,
    /// The hypervisor driver.
    pub driver: Arc<dyn HypervisorDriver>,
    /// The SEV firmware.
    pub firmware: Firmware,
    /// Where VM folders go.
    pub vms_dir: PathBuf,
    /// Where VMs' disks go when the pool's storage is shared (the same
    /// path on every host); without it, in each VM's folder.
    pub shared_dir: Option<PathBuf>,
    /// Where images are kept, one folder per image id.
    pub images_dir: PathBuf,
    /// Accept guest policies with DEBUG set.
    pub allow_debug_policy: bool,
    /// What the driver's probe found.
    pub driver_capabilities: crate::hypervisor::DriverCapabilities,
    /// This host's labels, for placement.
    pub labels: Vec<String>,
}

/// This host's agent.
pub struct HostAgent {
    name: String,
    driver: Arc<dyn HypervisorDriver>,
    firmware: Firmware,
    vms_dir: PathBuf,
    /// The shared folder disks go to, if the pool's storage is shared.
    shared_dir: Option<PathBuf>,
    images_dir: PathBuf,
    allow_debug_policy: bool,
    labels: Vec<String>,
    capabilities: RwLock<HostCapabilities>,
    running: Mutex<HashMap<VmId, Running>>,
    /// One lock per VM: a stop and the monitor never act on a VM at once.
    locks: Mutex<HashMap<VmId, Arc<Mutex<()>>>>,
    sink: OnceLock<Arc<dyn PoolSink>>,
    /// Its pool identity and the runtime its calls to other hosts run on,
    /// when it is a member of a pool of several hosts.
    membership: OnceLock<(Membership, tokio::runtime::Handle)>,
    /// Where it gets the images it does not hold (a member's coordinator).
    images: OnceLock<Arc<dyn ImageSource>>,
}

impl std::fmt::Debug for HostAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostAgent")
            .field("name", &self.name)
            .field("driver", &self.driver.name())
            .finish_non_exhaustive()
    }
}

/// `capabilities` with what this host's configuration adds: its labels and
/// its shared folder.
fn with_own_settings(
    mut capabilities: HostCapabilities,
    labels: &[String],
    shared_dir: Option<&Path>,
) -> HostCapabilities {
    capabilities.labels = labels.to_vec();
    capabilities.shared_dir = shared_dir.map(|dir| dir.display().to_string());
    capabilities
}

fn io_error(what: &str, path: &Path, error: &std::io::Error) -> OpError {
    OpError::internal(format!("cannot {what} {}: {error}", path.display()))
}

impl HostAgent {
    /// A host agent over `parts`.
    pub fn new(parts: HostAgentParts) -> Self {
        let capabilities = with_own_settings(
            host::capabilities(
                &parts.driver_capabilities,
                parts.firmware.as_dyn(),
                parts.allow_debug_policy,
            ),
            &parts.labels,
            parts.shared_dir.as_deref(),
        );
        HostAgent {
            name: parts.name,
            driver: parts.driver,
            firmware: parts.firmware,
            shared_dir: parts.shared_dir,
            vms_dir: parts.vms_dir,
            images_dir: parts.images_dir,
            allow_debug_policy: parts.allow_debug_policy,
            labels: parts.labels,
            capabilities: RwLock::new(capabilities),
            running: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            sink: OnceLock::new(),
            membership: OnceLock::new(),
            images: OnceLock::new(),
        }
    }

    /// Where this host reports what happens on its own: set once, before
    /// anything runs.
    pub fn report_to(&self, sink: Arc<dyn PoolSink>) {
        let _ = self.sink.set(sink);
    }

    /// Its pool identity, for calls to other hosts (disk copies): set once.
    pub fn join_pool(&self, membership: Membership, runtime: tokio::runtime::Handle) {
        let _ = self.membership.set((membership, runtime));
    }

    /// Where it fetches the images it does not hold: set once.
    pub fn fetch_images_from(&self, source: Arc<dyn ImageSource>) {
        let _ = self.images.set(source);
    }

    /// The VMs that run here.
    pub fn running_vms(&self) -> Vec<VmId> {
        self.running().keys().cloned().collect()
    }

    /// The capabilities last probed.
    pub fn capabilities(&self) -> HostCapabilities {
        self.capabilities
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether this host's Secure Processor is simulated.
    pub fn simulated_firmware(&self) -> bool {
        matches!(self.firmware, Firmware::Simulated(_))
    }

    fn sink(&self) -> Option<&Arc<dyn PoolSink>> {
        self.sink.get()
    }

    fn lock(&self, vm: &VmId) -> Arc<Mutex<()>> {
        let mut locks = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(locks.entry(vm.clone()).or_default())
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, Running>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn run_dir(&self, vm: &VmId) -> PathBuf {
        self.vms_dir.join(&vm.0)
    }

    /// Disk paths are relative to the shared folder, or to the VMs' one.
    fn disk_path(&self, disk: &DiskRecord) -> PathBuf {
        self.shared_dir
            .as_deref()
            .unwrap_or(&self.vms_dir)
            .join(&disk.path)
    }

    /// Where `disk` is (or goes) on this host.
    pub fn disk_file(&self, disk: &DiskRecord) -> PathBuf {
        self.disk_path(disk)
    }

    /// The file of `vm`'s disk named `name` on this host, if it has it.
    /// Names that could leave the VM's folder find nothing.
    pub fn disk_file_of(&self, vm: &VmId, name: &str) -> Option<PathBuf> {
        let plain = |text: &str| {
            !text.is_empty()
                && text
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
        };
        if !plain(&vm.0) || !plain(name) {
            return None;
        }
        ["qcow2", "raw"]
            .iter()
            .map(|extension| self.run_dir(vm).join(format!("disk-{name}.{extension}")))
            .find(|path| path.is_file())
    }

    /// Records `vm`'s VMM in its folder, so a restarted agent adopts it.
    fn remember(&self, vm: &VmId, runtime: &VmRuntime) -> Result<(), OpError> {
        let path = self.run_dir(vm).join(RUNTIME_FILE);
        let partial = path.with_extension("json.partial");
        let text = serde_json::to_vec_pretty(runtime)
            .map_err(|error| OpError::internal(error.to_string()))?;
        std::fs::write(&partial, text).map_err(|error| io_error("write", &partial, &error))?;
        std::fs::rename(&partial, &path).map_err(|error| io_error("write", &path, &error))
    }

    fn forget(&self, vm: &VmId) {
        self.running().remove(vm);
        let _ = std::fs::remove_file(self.run_dir(vm).join(RUNTIME_FILE));
    }

    /// Relays the guest's requests from the VMM's channel socket to its
    /// launch, reconnecting after a broken frame, until the VMM is gone.
    fn relay(vm: VmId, guest: Arc<LaunchedGuest>, socket: PathBuf) {
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

    /// Takes over a running VM's channels: its simulated launch's relay and
    /// its agent's status port.
    fn attach(&self, vm: &VmId, runtime: &VmRuntime, simulated: Option<Arc<LaunchedGuest>>) {
        if let (Some(guest), Some(socket)) = (&simulated, &runtime.sim_channel) {
            Self::relay(vm.clone(), Arc::clone(guest), socket.clone());
        }
        if let (Some(socket), Some(sink)) = (&runtime.agent_channel, self.sink()) {
            channels::follow(Arc::clone(sink), vm.clone(), socket.clone());
        }
        self.running().insert(
            vm.clone(),
            Running {
                runtime: runtime.clone(),
                _simulated: simulated,
            },
        );
    }

    /// The simulated launch a runtime names, adopted (its ASID stays held
    /// while the result lives).
    fn adopt_simulated(&self, vm: &VmId, runtime: &VmRuntime) -> Option<Arc<LaunchedGuest>> {
        let (Firmware::Simulated(firmware), Some(launch)) = (&self.firmware, runtime.sim_launch_id)
        else {
            return None;
        };
        match SimulatedFirmware::adopt(firmware, launch) {
            Ok(guest) => Some(Arc::new(guest)),
            Err(error) => {
                tracing::warn!(vm = %vm, %error, "cannot adopt its simulated launch");
                None
            }
        }
    }

    /// Builds what the driver starts, and launches through the simulated
    /// Secure Processor first when this host has one.
    fn prepare_launch(
        &self,
        request: &LaunchRequest,
        progress: Progress<'_>,
    ) -> Result<(LaunchSpec, Option<LaunchedGuest>), OpError> {
        let vm = &request.vm;
        let spec = &request.spec;
        let image_dir = self.images_dir.join(&request.image.id);
        if !image_dir.is_dir() {
            let source = self.images.get().ok_or_else(|| {
                OpError::precondition(format!(
                    "image {} is not on host {}",
                    request.image.id, self.name
                ))
            })?;
            progress(
                "image",
                &format!("fetching image {} from the coordinator", request.image.id),
                10,
            );
            source.fetch(&request.image, &image_dir)?;
        }
        let files = images::files_in(&image_dir, &request.image.sha256);
        let run_dir = self.run_dir(vm);
        std::fs::create_dir_all(&run_dir).map_err(|error| io_error("create", &run_dir, &error))?;
        let disks: Vec<Disk> = request
            .disks
            .iter()
            .map(|disk| {
                let path = self.disk_path(disk);
                if disk.name == ENCRYPTED_DISK_NAME {
                    Disk {
                        path,
                        format: DiskFormat::Raw,
                        read_only: false,
                        serial: Some(ENCRYPTED_DISK_NAME.to_owned()),
                    }
                } else {
                    Disk::qcow2(path)
                }
            })
            .collect();
        let cmdline = guest_cmdline(&request.image.cmdline, vm, spec);
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
                    &cmdline,
                    request.image.measured_direct_boot,
                )?;
                let shared: Arc<dyn SevFirmware> = Arc::clone(firmware) as Arc<dyn SevFirmware>;
                let guest = launch::simulated_launch(shared, vm, spec, &bytes)?;
                let page = launch::kernel_hashes_page(&bytes, &run_dir)?;
                simulated_guest = Some(guest);
                ConfidentialLaunch::SimulatedSnp {
                    channel_socket: run_dir.join("sim-sp.sock"),
                    kernel_hashes_page: page,
                }
            }
            (ConfidentialMode::SevSnp, _) => ConfidentialLaunch::SevSnp {
                policy: spec.guest_policy,
                host_data: host_data(vm),
                id_block: spec
                    .id_block
                    .as_ref()
                    .map(|id_block| id_block.signed.clone()),
                kernel_hashes: request.image.measured_direct_boot,
            },
            (ConfidentialMode::Sev | ConfidentialMode::SevEs, _) => ConfidentialLaunch::Sev {
                policy: u32::try_from(spec.guest_policy)
                    .map_err(|_| OpError::invalid("an SEV policy is 32 bits"))?,
                kernel_hashes: request.image.measured_direct_boot,
            },
        };
        let boot = match &files.boot {
            // An ordinary VM boots its kernel with QEMU's BIOS, the fastest way.
            ImageBoot::Direct { kernel, initrd } => Boot::Direct {
                firmware: (spec.mode != ConfidentialMode::None).then(|| files.firmware.clone()),
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline,
            },
            ImageBoot::Disk { path, format } => Boot::Firmware {
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
            vm_id: vm.clone(),
            name: spec.name.clone(),
            run_dir: run_dir.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            cpu_model: (spec.mode != ConfidentialMode::None).then(|| spec.vcpu_type.clone()),
            boot,
            disks,
            port_forwards: spec.port_forwards.clone(),
            confidential,
            agent_channel: spec.key_broker.as_ref().map(|_| run_dir.join("agent.sock")),
            // Every SNP guest answers its tenant's attestation requests.
            attest_channel: (spec.mode == ConfidentialMode::SevSnp)
                .then(|| run_dir.join("attest.sock")),
        };
        Ok((launch, simulated_guest))
    }

    /// Hard-stops every VM this host launched as HA, as a watchdog would:
    /// the pool may start them elsewhere soon (see `coordinator::ha`).
    /// Answers how many it stopped.
    pub fn fence(&self, reason: &str) -> usize {
        let vms: Vec<(VmId, VmRuntime)> = self
            .running()
            .iter()
            .filter(|(vm, _)| self.run_dir(vm).join(HA_FILE).is_file())
            .map(|(vm, running)| (vm.clone(), running.runtime.clone()))
            .collect();
        for (vm, runtime) in &vms {
            let guard = self.lock(vm);
            let _held = guard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(error) = self.driver.stop(runtime, StopMode::Force) {
                tracing::error!(vm = %vm, %error, "cannot fence an HA VM");
                continue;
            }
            let fenced = self.run_dir(vm).join(FENCED_FILE);
            if let Err(error) = std::fs::write(&fenced, reason) {
                tracing::error!(vm = %vm, %error, "cannot record a fenced VM");
            }
            self.forget(vm);
            tracing::warn!(vm = %vm, reason, "HA VM fenced");
            if let Some(sink) = self.sink() {
                sink.vm_exited(vm, false, &format!("fenced by its host: {reason}"));
            }
        }
        vms.len()
    }

    /// One pass of the monitor: every VMM that runs here is checked, and
    /// one that ended on its own is reported.
    pub fn monitor_tick(&self) {
        let vms: Vec<(VmId, VmRuntime)> = self
            .running()
            .iter()
            .map(|(vm, running)| (vm.clone(), running.runtime.clone()))
            .collect();
        for (vm, runtime) in vms {
            let guard = self.lock(&vm);
            let Ok(_held) = guard.try_lock() else {
                continue;
            };
            // A stop that held the lock may have ended it already.
            if !self.running().contains_key(&vm) {
                continue;
            }
            let (clean, reason) = match self.driver.state(&runtime) {
                Ok(RuntimeState::Exited(ExitReason::GuestShutdown)) => {
                    (true, "the guest powered off".to_owned())
                }
                Ok(RuntimeState::Exited(reason)) => (false, reason.to_string()),
                Ok(_) => continue,
                Err(error) => {
                    tracing::debug!(vm = %vm, %error, "cannot read the VM's state");
                    continue;
                }
            };
            let _ = self.driver.stop(&runtime, StopMode::Force);
            self.forget(&vm);
            if let Some(sink) = self.sink() {
                sink.vm_exited(&vm, clean, &reason);
            }
        }
    }
}

impl HostClient for HostAgent {
    fn name(&self) -> &str {
        &self.name
    }

    fn probe(&self) -> Result<HostCapabilities, OpError> {
        let driver = self.driver.probe()?;
        let capabilities = with_own_settings(
            host::capabilities(&driver, self.firmware.as_dyn(), self.allow_debug_policy),
            &self.labels,
            self.shared_dir.as_deref(),
        );
        *self
            .capabilities
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = capabilities.clone();
        Ok(capabilities)
    }

    fn prepare(
        &self,
        vm: &VmId,
        disks: &[DiskRecord],
        progress: Progress<'_>,
    ) -> Result<(), OpError> {
        let run_dir = self.run_dir(vm);
        std::fs::create_dir_all(&run_dir).map_err(|error| io_error("create", &run_dir, &error))?;
        let created = (|| {
            for (index, disk) in disks.iter().enumerate() {
                let path = self.disk_path(disk);
                // A shared folder's disks are outside the run folder.
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|error| io_error("create", parent, &error))?;
                }
                if disk.name == ENCRYPTED_DISK_NAME {
                    progress(
                        "disks",
                        &format!(
                            "creating the encrypted disk ({} MiB) empty: the guest formats it \
                             with the key its tenant's broker releases to it, which this host \
                             never sees",
                            disk.size_mib
                        ),
                        60,
                    );
                    create_empty_disk(&path, disk.size_mib)?;
                } else {
                    progress(
                        "disks",
                        &format!("creating data disk {} ({} MiB)", disk.name, disk.size_mib),
                        30 + 30 * index as u32 / disks.len().max(1) as u32,
                    );
                    self.driver.create_disk(&path, disk.size_mib)?;
                }
            }
            Ok(())
        })();
        if created.is_err() {
            // Nothing is left behind.
            let _ = self.destroy(vm, disks, false, progress);
        }
        created
    }

    fn launch(&self, request: &LaunchRequest, progress: Progress<'_>) -> Result<Launched, OpError> {
        let guard = self.lock(&request.vm);
        let _held = guard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (spec, simulated) = self.prepare_launch(request, progress)?;
        let launch_digest = simulated
            .as_ref()
            .map(|guest| guest.launch_digest().to_vec());
        progress("qemu", "starting the VMM", 60);
        let mut runtime = self.driver.start(&spec)?;
        runtime.sim_launch_id = simulated.as_ref().map(LaunchedGuest::id);
        let _ = std::fs::remove_file(self.run_dir(&request.vm).join(FENCED_FILE));
        let ha_file = self.run_dir(&request.vm).join(HA_FILE);
        let marked = if request.spec.ha == HaPolicy::Restart {
            std::fs::write(&ha_file, b"").map_err(|error| io_error("write", &ha_file, &error))
        } else {
            match std::fs::remove_file(&ha_file) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    Err(io_error("remove", &ha_file, &error))
                }
                _ => Ok(()),
            }
        };
        if let Err(error) = marked.and_then(|()| self.remember(&request.vm, &runtime)) {
            let _ = self.driver.stop(&runtime, StopMode::Force);
            return Err(error);
        }
        self.attach(&request.vm, &runtime, simulated.map(Arc::new));
        Ok(Launched {
            runtime,
            launch_digest,
        })
    }

    fn stop(&self, vm: &VmId, runtime: &VmRuntime, mode: StopMode) -> Result<String, OpError> {
        let guard = self.lock(vm);
        let _held = guard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let outcome = self.driver.stop(runtime, mode)?;
        self.forget(vm);
        Ok(match outcome {
            StopOutcome::Graceful => "the guest powered off".to_owned(),
            StopOutcome::Forced { reason } => reason,
            StopOutcome::AlreadyExited(reason) => reason.to_string(),
        })
    }

    fn reset(&self, _vm: &VmId, runtime: &VmRuntime) -> Result<(), OpError> {
        Ok(self.driver.reboot(runtime)?)
    }

    fn destroy(
        &self,
        vm: &VmId,
        disks: &[DiskRecord],
        wipe: bool,
        progress: Progress<'_>,
    ) -> Result<(), OpError> {
        if wipe {
            for disk in disks {
                let path = self.disk_path(disk);
                if path.exists() {
                    progress("wipe", &format!("wiping disk {}", disk.name), 50);
                    self.driver.wipe_disk(&path)?;
                }
            }
        }
        progress("remove", "removing files", 80);
        let run_dir = self.run_dir(vm);
        if run_dir.exists() {
            std::fs::remove_dir_all(&run_dir)
                .map_err(|error| io_error("remove", &run_dir, &error))?;
        }
        // Disks in a shared folder are outside the VM's folder.
        for disk in disks {
            let path = self.disk_path(disk);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    if let Some(parent) = path.parent() {
                        let _ = std::fs::remove_dir(parent);
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(io_error("remove", &path, &error)),
            }
        }
        Ok(())
    }

    fn attest(
        &self,
        vm: &VmId,
        runtime: &VmRuntime,
        nonce: &[u8; NONCE_LEN],
    ) -> Result<AttestAnswer, OpError> {
        let socket = runtime.attest_channel.as_ref().ok_or_else(|| {
            OpError::precondition(format!(
                "VM {vm} has no attestation port (only sev-snp guests have one)"
            ))
        })?;
        channels::ask_attestation(socket, nonce).map_err(|error| {
            OpError::unavailable(format!(
                "the guest agent of VM {vm} did not answer: {error}"
            ))
        })
    }

    fn read_console(&self, vm: &VmId, offset: u64, max: usize) -> Result<ConsoleChunk, OpError> {
        let path = self
            .running()
            .get(vm)
            .map(|running| running.runtime.console_log.clone())
            .unwrap_or_else(|| self.run_dir(vm).join("console.log"));
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ConsoleChunk::default())
            }
            Err(error) => return Err(io_error("read", &path, &error)),
        };
        let length = file
            .metadata()
            .map_err(|error| io_error("read", &path, &error))?
            .len();
        let mut data = Vec::new();
        if offset < length {
            file.seek(SeekFrom::Start(offset))
                .and_then(|_| file.take(max as u64).read_to_end(&mut data))
                .map_err(|error| io_error("read", &path, &error))?;
        }
        Ok(ConsoleChunk { data, length })
    }

    fn recover(&self) -> Result<Vec<(VmId, Recovered)>, OpError> {
        let mut found = Vec::new();
        let entries = match std::fs::read_dir(&self.vms_dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(found),
            Err(error) => return Err(io_error("read", &self.vms_dir, &error)),
        };
        for entry in entries.flatten() {
            let vm = VmId(entry.file_name().to_string_lossy().into_owned());
            let record = entry.path().join(RUNTIME_FILE);
            let Ok(text) = std::fs::read(&record) else {
                if let Ok(reason) = std::fs::read_to_string(entry.path().join(FENCED_FILE)) {
                    found.push((vm, Recovered::Gone(format!("fenced by its host: {reason}"))));
                }
                continue;
            };
            let runtime: VmRuntime = match serde_json::from_slice(&text) {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = std::fs::remove_file(&record);
                    found.push((
                        vm,
                        Recovered::Gone(format!("its runtime record is unreadable: {error}")),
                    ));
                    continue;
                }
            };
            let outcome = match self.driver.adopt(&runtime) {
                Ok(RuntimeState::Running | RuntimeState::Paused { .. }) => {
                    let simulated = self.adopt_simulated(&vm, &runtime);
                    self.attach(&vm, &runtime, simulated);
                    tracing::info!(vm = %vm, vmm = %runtime.vmm(), "adopted a running VM");
                    Recovered::Running(runtime)
                }
                Ok(RuntimeState::Exited(reason)) => {
                    self.release(&vm, &runtime);
                    Recovered::Gone(format!("while hsevd was down: {reason}"))
                }
                Err(error) => {
                    self.release(&vm, &runtime);
                    Recovered::Gone(format!("cannot adopt: {error}"))
                }
            };
            found.push((vm, outcome));
        }
        Ok(found)
    }

    fn fetch_disks(
        &self,
        vm: &VmId,
        disks: &[DiskRecord],
        from: &str,
        from_address: &str,
        progress: Progress<'_>,
    ) -> Result<u64, OpError> {
        let (membership, runtime) = self.membership.get().ok_or_else(|| {
            OpError::precondition(format!(
                "host {} is not a member of a pool of several hosts: it has no disk to fetch",
                self.name
            ))
        })?;
        let run_dir = self.run_dir(vm);
        std::fs::create_dir_all(&run_dir).map_err(|error| io_error("create", &run_dir, &error))?;
        let mut copied = 0;
        for disk in disks {
            progress("copy", &format!("disk {} from {from}", disk.name), 0);
            copied += runtime.block_on(disk_copy::fetch_disk(
                membership,
                from,
                from_address,
                disk,
                self.disk_path(disk),
                progress,
            ))?;
        }
        Ok(copied)
    }
}

impl HostAgent {
    /// What a VMM that ended while this agent was down still held: its
    /// simulated launch (an ASID) and its record.
    fn release(&self, vm: &VmId, runtime: &VmRuntime) {
        // Adopting and dropping decommissions the launch: its ASID is free.
        drop(self.adopt_simulated(vm, runtime));
        self.forget(vm);
    }
}

/// Creates the empty (sparse) disk a guest encrypts itself.
fn create_empty_disk(path: &Path, size_mib: u64) -> Result<(), OpError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|error| io_error("create", path, &error))?;
    file.set_len(size_mib * 1024 * 1024)
        .map_err(|error| io_error("size", path, &error))
}
