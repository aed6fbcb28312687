//! Hypervisor drivers: how `hsevd` starts, watches, stops and re-adopts the
//! VMM processes of its VMs.
//!
//! One object-safe trait, [`HypervisorDriver`], one implementation per
//! engine, chosen at start-up by [`select::driver`] from the configuration
//! (the one place that knows every engine), never by `if` chains elsewhere:
//! - [`QemuDriver`]: QEMU processes of hsevd's own, driven over QMP (the
//!   default);
//! - [`libvirt`]: domains of a libvirt daemon (`virt` crate, behind the
//!   `libvirt` cargo feature), for hosts whose operators run libvirt;
//! - [`FakeDriver`]: VMs that exist only in memory, for tests and pool
//!   scale runs that need no guest.
//!
//! What this layer owns:
//! - the VMM's configuration (QEMU's command line, libvirt's domain XML),
//!   built as a pure function of a [`LaunchSpec`] and what the host probe
//!   found (unit-tested without a process);
//! - the VMM process: detached from the daemon so that it outlives it, and
//!   recognised afterwards (pid *and* start time for QEMU, the domain's
//!   UUID and metadata for libvirt), so a recycled pid or a stranger's
//!   domain is never mistaken for a VM;
//! - disk files (qcow2 creation, wiping before removal).
//!
//! What it must never do: decide placement or policy, touch the store, hold
//! key material (nothing secret ever appears on a VMM command line or in a
//! domain XML: SEV `host-data` is a public binding), or run async code.
//! Every method blocks; the daemon calls them from `spawn_blocking`.
//!
//! Something an engine cannot do is a [`DriverError::Unsupported`] naming
//! what is missing, never a panic and never a silent degradation.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{PortForward, VmId, VmRuntime};

pub mod fake;
pub mod libvirt;
pub mod probe;
pub mod qemu;
pub mod select;

pub use fake::FakeDriver;
pub use qemu::{QemuConfig, QemuDriver, StartTimings};

/// A hypervisor engine as the daemon sees it.
///
/// Implementations are cheap to share (`Arc<dyn HypervisorDriver>`) and
/// keep no per-VM state that a restarted daemon would miss: everything
/// needed to find a VM again is in its [`VmRuntime`].
pub trait HypervisorDriver: Send + Sync + fmt::Debug {
    /// The engine's name (`qemu`, `libvirt`, `fake`).
    fn name(&self) -> &'static str;

    /// What this host and engine can run. Runs at daemon start; the answer
    /// is cached by the driver and used by [`HypervisorDriver::start`].
    fn probe(&self) -> Result<DriverCapabilities, DriverError>;

    /// Creates an empty disk of `size_mib` MiB at `path` (qcow2). Refuses to
    /// overwrite an existing file.
    fn create_disk(&self, path: &Path, size_mib: u64) -> Result<(), DriverError>;

    /// Overwrites the whole file at `path` with zeros and syncs it. The
    /// caller removes the file afterwards; the VM using it must be stopped.
    fn wipe_disk(&self, path: &Path) -> Result<(), DriverError>;

    /// Starts the VMM, detached from the daemon, and returns once its
    /// control channel answers and the VM runs (guest boot not included).
    fn start(&self, spec: &LaunchSpec) -> Result<VmRuntime, DriverError>;

    /// Stops a VM and waits for its process to end.
    fn stop(&self, runtime: &VmRuntime, mode: StopMode) -> Result<StopOutcome, DriverError>;

    /// Resets the VM (a hard reset, as the reset button does).
    fn reboot(&self, runtime: &VmRuntime) -> Result<(), DriverError>;

    /// Where the VM stands now.
    fn state(&self, runtime: &VmRuntime) -> Result<RuntimeState, DriverError>;

    /// Re-attaches to a VM after a daemon restart: checks that the process
    /// is the one recorded (pid, start time, and the control socket served
    /// by that pid) and returns its state.
    fn adopt(&self, runtime: &VmRuntime) -> Result<RuntimeState, DriverError>;

    /// The file the VM's serial console is written to.
    fn console_log(&self, runtime: &VmRuntime) -> Result<PathBuf, DriverError>;
}

/// Which accelerator a VM runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's dynamic translator: slow, runs anywhere, no SEV.
    Tcg,
}

impl Accelerator {
    /// The name QEMU's `-accel` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the configuration asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AcceleratorSetting {
    /// KVM where the probe shows a guest can really run on it, else TCG.
    #[default]
    Auto,
    /// KVM, whatever the probe says (it still needs `/dev/kvm` to open).
    Kvm,
    /// TCG.
    Tcg,
}

/// What SEV the driver can hand to guests on this host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SevSupport {
    /// `sev-guest` objects (SEV) can be passed.
    pub sev: bool,
    /// `sev-guest` objects with the ES policy bit can be passed.
    pub sev_es: bool,
    /// `sev-snp-guest` objects can be passed.
    pub sev_snp: bool,
    /// The C-bit position (CPUID 0x8000001F EBX\[5:0\]), when SEV exists.
    pub cbitpos: Option<u32>,
    /// Physical address bits lost to encryption (CPUID 0x8000001F EBX\[11:6\]).
    pub reduced_phys_bits: Option<u32>,
    /// How many SEV guests can run at once (libvirt's `maxGuests`), when
    /// the engine says.
    #[serde(default)]
    pub max_guests: Option<u32>,
    /// How many SEV-ES (and SNP) guests can run at once (`maxESGuests`).
    #[serde(default)]
    pub max_es_guests: Option<u32>,
    /// Why (not): which check decided.
    pub reason: String,
}

/// What a driver found on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverCapabilities {
    /// The engine ([`HypervisorDriver::name`]).
    pub driver: String,
    /// The VMM binary.
    pub binary: PathBuf,
    /// Its version line (`QEMU emulator version 10.0.2 (...)`; through
    /// libvirt: `libvirt 11.3.0, QEMU 10.0.2`).
    pub version: String,
    /// The accelerator VMs get.
    pub accelerator: Accelerator,
    /// Why that one: each check that decided.
    pub accelerator_reason: String,
    /// What KVM looked like, whatever was chosen.
    pub kvm: probe::KvmFacts,
    /// SEV objects the driver can pass.
    pub sev: SevSupport,
    /// The simulated Secure Processor's virtio-serial channel can be passed
    /// (any QEMU with `virtio-serial-pci`).
    pub simulated_snp: bool,
    /// Host CPUs usable by this process.
    pub host_cpus: u32,
    /// Host memory (`MemTotal`), MiB.
    pub host_memory_mib: u64,
    /// Host memory available now (`MemAvailable`), MiB.
    pub host_memory_available_mib: u64,
}

/// How to start one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    /// The VM's id.
    pub vm_id: VmId,
    /// Its name (shown in process listings as QEMU's `-name`).
    pub name: String,
    /// A folder owned by this VM: QMP socket, console log, VMM log.
    pub run_dir: PathBuf,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// The vCPU model (`EPYC-v4`, which an SNP measurement depends on);
    /// `None`: `max` on TCG, `host` on KVM.
    pub cpu_model: Option<String>,
    /// What boots.
    pub boot: Boot,
    /// Data disks, attached in order after the boot disk (virtio-blk).
    pub disks: Vec<Disk>,
    /// Host ports (on 127.0.0.1) forwarded to guest TCP ports over QEMU's
    /// user-mode network; host port 0 picks a free one. Every VM gets one
    /// user-mode NIC, through which it also reaches host services at
    /// 10.0.2.2 (the key broker, for one).
    pub port_forwards: Vec<PortForward>,
    /// Memory protection.
    pub confidential: ConfidentialLaunch,
    /// A Unix socket QEMU listens on for the guest agent's status port
    /// ([`hsev_attestation::agent_status::PORT_NAME`], virtio-serial); `None`:
    /// no such port.
    pub agent_channel: Option<PathBuf>,
    /// A Unix socket QEMU listens on for the port the guest agent answers
    /// its tenant's attestation requests on
    /// ([`hsev_attestation::tenant_attest::PORT_NAME`]); `None`: none.
    pub attest_channel: Option<PathBuf>,
}

/// What boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// The VMM loads a kernel and initrd itself (fw_cfg).
    Direct {
        /// Firmware; `None`: QEMU's default BIOS (fastest, no SEV).
        firmware: Option<PathBuf>,
        /// The kernel (bzImage).
        kernel: PathBuf,
        /// The initrd.
        initrd: Option<PathBuf>,
        /// The kernel command line.
        cmdline: String,
    },
    /// Firmware (OVMF) boots from a disk, or stops in its shell without one.
    Firmware {
        /// The OVMF image, passed with `-bios` (SEV-SNP needs `-bios`).
        ovmf: PathBuf,
        /// The boot disk.
        disk: Option<Disk>,
    },
}

/// A disk file attached to a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The file.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// The guest may not write to it.
    pub read_only: bool,
    /// The serial number the guest sees (`/sys/block/vdX/serial`), by which
    /// it finds a disk of a known role.
    pub serial: Option<String>,
}

impl Disk {
    /// A writable qcow2 disk.
    pub fn qcow2(path: impl Into<PathBuf>) -> Self {
        Disk {
            path: path.into(),
            format: DiskFormat::Qcow2,
            read_only: false,
            serial: None,
        }
    }
}

/// A disk file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// qcow2.
    Qcow2,
    /// Raw bytes.
    Raw,
}

impl DiskFormat {
    /// The name QEMU takes.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// How a VM's memory is protected, with what the VMM needs for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfidentialLaunch {
    /// An ordinary VM.
    None,
    /// AMD SEV, or SEV-ES when the policy has its ES bit (0x4): a
    /// `sev-guest` object. Needs KVM on an SEV host, and firmware.
    Sev {
        /// The SEV guest policy.
        policy: u32,
        /// QEMU adds the kernel, initrd and command line hashes to the
        /// measured firmware (`kernel-hashes=on`; direct boot only).
        kernel_hashes: bool,
    },
    /// AMD SEV-SNP: a `sev-snp-guest` object. Needs KVM on an SNP host, and
    /// firmware.
    SevSnp {
        /// The SNP guest policy.
        policy: u64,
        /// Bound into the launch and every report (`HOST_DATA`).
        host_data: [u8; 32],
        /// As for SEV (`kernel-hashes=on`).
        kernel_hashes: bool,
        /// The owner's ID block, which the firmware checks at
        /// `SNP_LAUNCH_FINISH` (QEMU's `id-block` / `id-auth`).
        id_block: Option<hsev_attestation::id_block::SignedIdBlock>,
    },
    /// No SEV object: the simulated Secure Processor is reached by the guest
    /// over a virtio-serial port named
    /// [`hsev_attestation::firmware::channel::PORT_NAME`], backed by a Unix
    /// socket QEMU listens on; the daemon connects and relays. It gives no
    /// confidentiality.
    SimulatedSnp {
        /// The socket QEMU creates for the channel.
        channel_socket: PathBuf,
        /// The SNP kernel-hashes page, loaded where a real SNP launch would
        /// have QEMU write it, so that firmware built with kernel-hashes
        /// support verifies the kernel, initrd and command line as it would
        /// on SEV hardware. `None` for firmware without that check.
        kernel_hashes_page: Option<KernelHashesPage>,
    },
}

/// A prebuilt SNP kernel-hashes page and where it goes in guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelHashesPage {
    /// The 4 KiB page.
    pub path: PathBuf,
    /// Its guest-physical address (from the firmware's SEV metadata).
    pub gpa: u64,
}

/// How to stop a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Press the ACPI power button; if the guest has not powered off within
    /// `timeout`, force.
    Graceful {
        /// How long the guest gets.
        timeout: Duration,
    },
    /// Quit the VMM now (QMP `quit`, then SIGKILL if it does not end).
    Force,
}

/// How a stop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// The guest powered off by itself.
    Graceful,
    /// The VMM was made to quit.
    Forced {
        /// Why: asked for, or the guest ignored the power button.
        reason: String,
    },
    /// There was nothing to stop.
    AlreadyExited(ExitReason),
}

/// Where a VM stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeState {
    /// The guest runs.
    Running,
    /// The VMM runs but the guest does not execute (QMP status `paused`,
    /// `prelaunch`, `suspended`, ...).
    Paused {
        /// QEMU's run state.
        status: String,
    },
    /// The VM is over; its process may linger (paused) until stopped.
    Exited(ExitReason),
}

/// Why a VM is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The VMM process ended.
    ProcessExited {
        /// How, when known: exit status or signal, the last line of its log.
        detail: String,
    },
    /// The recorded pid now belongs to a process started later: ours ended.
    PidReused {
        /// The pid.
        pid: u32,
    },
    /// The guest powered off (the VMM stays, paused, until stopped).
    GuestShutdown,
    /// The guest reported a panic (pvpanic; the VMM stays until stopped).
    GuestPanicked,
    /// The VMM stopped the guest on an internal error, such as a KVM
    /// emulation failure (QMP status `internal-error`).
    InternalError,
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::ProcessExited { detail } => write!(f, "the VMM process ended: {detail}"),
            ExitReason::PidReused { pid } => write!(
                f,
                "the VMM process ended (pid {pid} now belongs to a newer process)"
            ),
            ExitReason::GuestShutdown => f.write_str("the guest powered off"),
            ExitReason::GuestPanicked => f.write_str("the guest panicked"),
            ExitReason::InternalError => {
                f.write_str("the VMM stopped the guest on an internal error (see its log)")
            }
        }
    }
}

/// A driver operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The VMM binary is not where the configuration says.
    #[error("{binary} is missing: install QEMU (`make deps`) or configure its path", binary = .binary.display())]
    VmmMissing {
        /// The path looked at.
        binary: PathBuf,
    },
    /// The host probe failed.
    #[error("probe: {0}")]
    Probe(String),
    /// The launch spec is malformed; names the field.
    #[error("launch spec {field}: {reason}")]
    InvalidSpec {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The host or engine cannot do this.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A file or process operation failed.
    #[error("{what}: {error}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// The VMM ended before it answered.
    #[error("the VMM exited during start ({status}): {log_tail}")]
    StartFailed {
        /// Its exit status.
        status: String,
        /// The end of its log (its error message).
        log_tail: String,
    },
    /// Something did not happen in time.
    #[error("{what}: no answer within {after:?}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        after: Duration,
    },
    /// The VMM's control channel failed.
    #[error("QMP {socket}: {error}", socket = .socket.display())]
    Qmp {
        /// Its socket.
        socket: PathBuf,
        /// What failed.
        error: qemu::qmp::QmpError,
    },
    /// The VM is not running, so the operation has nothing to act on.
    #[error("the VM is not running: {0}")]
    NotRunning(ExitReason),
    /// The recorded runtime does not describe this process.
    #[error("cannot adopt pid {pid}: {reason}")]
    NotOurs {
        /// The pid.
        pid: u32,
        /// Which identity check failed.
        reason: String,
    },
    /// The libvirt daemon refused or failed a call.
    #[error("libvirt: {what}: {message}")]
    Libvirt {
        /// What was asked.
        what: String,
        /// libvirt's own message.
        message: String,
    },
    /// A helper tool (`qemu-img`) failed.
    #[error("{tool}: {detail}")]
    Tool {
        /// The tool.
        tool: String,
        /// Its message.
        detail: String,
    },
}

impl DriverError {
    pub(crate) fn io(what: impl Into<String>, error: std::io::Error) -> Self {
        DriverError::Io {
            what: what.into(),
            error,
        }
    }
}
