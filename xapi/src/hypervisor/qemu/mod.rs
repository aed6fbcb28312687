//! The QEMU driver: QEMU processes driven over QMP.
//!
//! - [`argv`]: the command line, a pure function of the launch spec;
//! - [`qmp`]: a small blocking QMP client;
//! - [`process`]: detached spawning and process identity;
//! - [`disk`]: qcow2 creation and wiping.
//!
//! Each VM has a run dir holding `qmp.sock`, `console.log` (the serial
//! console) and `qemu.log` (QEMU's own output, with one `hsevd:` header
//! line per start). QMP serves one client at a time, so the driver opens a
//! short connection per operation and checks, through the socket's peer
//! credentials, that the process answering is the recorded pid.

pub mod argv;
pub mod disk;
pub mod process;
pub mod qmp;

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use self::argv::{HostParams, RunPaths};
use self::process::{Liveness, ProcessIdentity};
use self::qmp::{QmpClient, QmpError};
use super::{
    probe, AcceleratorSetting, ConfidentialLaunch, DriverCapabilities, DriverError, ExitReason,
    HypervisorDriver, LaunchSpec, RuntimeState, StopMode, StopOutcome,
};
use crate::model::{PortForward, VmRuntime};

/// How QEMU is found and run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    /// `qemu-system-x86_64` (a bare name is looked up in `PATH`).
    pub binary: PathBuf,
    /// `qemu-img`.
    pub qemu_img: PathBuf,
    /// Which accelerator VMs get.
    pub accelerator: AcceleratorSetting,
    /// The KVM device.
    pub kvm_device: PathBuf,
    /// The SEV firmware device.
    pub sev_device: PathBuf,
    /// How long a start may take until QMP answers `running`, ms.
    pub start_timeout_ms: u64,
    /// How long one QMP exchange may take, ms.
    pub qmp_timeout_ms: u64,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            binary: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            qemu_img: PathBuf::from("/usr/bin/qemu-img"),
            accelerator: AcceleratorSetting::Auto,
            kvm_device: PathBuf::from("/dev/kvm"),
            sev_device: PathBuf::from("/dev/sev"),
            start_timeout_ms: 30_000,
            qmp_timeout_ms: 5_000,
        }
    }
}

impl QemuConfig {
    /// Checks the values; names the bad field.
    pub fn validate(&self) -> Result<(), DriverError> {
        let invalid = |field, reason: &str| DriverError::InvalidSpec {
            field,
            reason: reason.to_owned(),
        };
        if self.binary.as_os_str().is_empty() {
            return Err(invalid("qemu.binary", "is empty"));
        }
        if self.start_timeout_ms == 0 {
            return Err(invalid("qemu.start_timeout_ms", "must be positive"));
        }
        if self.qmp_timeout_ms == 0 {
            return Err(invalid("qemu.qmp_timeout_ms", "must be positive"));
        }
        Ok(())
    }

    fn qmp_timeout(&self) -> Duration {
        Duration::from_millis(self.qmp_timeout_ms)
    }
}

/// Where the time of one start went, each measured from the start call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartTimings {
    /// The probe (cached after the first), the command line, the run dir.
    pub prepared: Duration,
    /// `fork`/`exec` of QEMU returned.
    pub spawned: Duration,
    /// QMP greeted and accepted `qmp_capabilities`.
    pub qmp_ready: Duration,
    /// `query-status` answered `running`.
    pub running: Duration,
}

/// The QEMU engine.
#[derive(Debug)]
pub struct QemuDriver {
    config: QemuConfig,
    capabilities: Mutex<Option<Arc<DriverCapabilities>>>,
    /// QEMU processes this driver object spawned, to reap them (and read
    /// their exit status). Adopted ones are not children: init reaps them.
    children: Mutex<HashMap<u32, Child>>,
}

impl QemuDriver {
    /// A driver with `config`; nothing is probed yet.
    pub fn new(config: QemuConfig) -> Result<Self, DriverError> {
        config.validate()?;
        Ok(QemuDriver {
            config,
            capabilities: Mutex::new(None),
            children: Mutex::new(HashMap::new()),
        })
    }

    /// Its configuration.
    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    /// The cached probe, probing once if needed.
    pub fn capabilities(&self) -> Result<Arc<DriverCapabilities>, DriverError> {
        if let Some(capabilities) = lock(&self.capabilities).as_ref() {
            return Ok(Arc::clone(capabilities));
        }
        self.probe_and_cache()
    }

    /// Probes and caches the answer (only a successful one: a QEMU
    /// installed later is found by the next call).
    fn probe_and_cache(&self) -> Result<Arc<DriverCapabilities>, DriverError> {
        let capabilities = Arc::new(probe_host(&self.config)?);
        tracing::info!(
            version = %capabilities.version,
            accelerator = %capabilities.accelerator,
            reason = %capabilities.accelerator_reason,
            sev = %capabilities.sev.reason,
            "QEMU driver probed"
        );
        *lock(&self.capabilities) = Some(Arc::clone(&capabilities));
        Ok(capabilities)
    }

    /// The command line `spec` would start QEMU with (binary first). A host
    /// port 0 is shown resolved to a port free now; a start picks its own.
    pub fn command_line(&self, spec: &LaunchSpec) -> Result<Vec<String>, DriverError> {
        let capabilities = self.capabilities()?;
        let mut shown = spec.clone();
        shown.port_forwards = resolve_port_forwards(&spec.port_forwards)?;
        let mut argv = vec![capabilities.binary.display().to_string()];
        argv.extend(argv::build(
            &shown,
            &host_params(&capabilities),
            &RunPaths::new(&spec.run_dir),
        )?);
        Ok(argv)
    }

    /// [`HypervisorDriver::start`], with where the time went.
    pub fn start_timed(&self, spec: &LaunchSpec) -> Result<(VmRuntime, StartTimings), DriverError> {
        let begun = Instant::now();
        let capabilities = self.capabilities()?;
        let mut spec = spec.clone();
        spec.port_forwards = resolve_port_forwards(&spec.port_forwards)?;
        let paths = RunPaths::new(&spec.run_dir);
        let argv = argv::build(&spec, &host_params(&capabilities), &paths)?;
        fs::create_dir_all(&spec.run_dir).map_err(|error| {
            DriverError::io(format!("creating {}", spec.run_dir.display()), error)
        })?;
        // Never take the run dir of a VMM that still answers.
        if std::os::unix::net::UnixStream::connect(&paths.qmp_socket).is_ok() {
            return Err(DriverError::InvalidSpec {
                field: "run_dir",
                reason: format!(
                    "a running VMM already serves {}",
                    paths.qmp_socket.display()
                ),
            });
        }
        remove_stale_socket(&paths.qmp_socket)?;
        if let ConfidentialLaunch::SimulatedSnp { channel_socket, .. } = &spec.confidential {
            remove_stale_socket(channel_socket)?;
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.vmm_log)
            .map_err(|error| {
                DriverError::io(format!("opening {}", paths.vmm_log.display()), error)
            })?;
        writeln!(
            log,
            "{LOG_HEADER} starting {} ({}): {} {}",
            spec.name,
            spec.vm_id,
            capabilities.binary.display(),
            argv.join(" ")
        )
        .map_err(|error| DriverError::io(format!("writing {}", paths.vmm_log.display()), error))?;
        let prepared = begun.elapsed();

        let child = process::spawn_detached(&capabilities.binary, &argv, log).map_err(|error| {
            DriverError::io(format!("spawning {}", capabilities.binary.display()), error)
        })?;
        let pid = child.id();
        let identity = match ProcessIdentity::of(pid) {
            Ok(identity) => identity,
            Err(error) => {
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                return Err(DriverError::io(format!("reading /proc/{pid}/stat"), error));
            }
        };
        lock(&self.children).insert(pid, child);
        let spawned = begun.elapsed();

        let runtime = VmRuntime {
            driver: "qemu".to_owned(),
            domain: None,
            pid,
            start_ticks: identity.start_ticks,
            qmp_socket: paths.qmp_socket.clone(),
            console_log: paths.console_log.clone(),
            sim_channel: match &spec.confidential {
                ConfidentialLaunch::SimulatedSnp { channel_socket, .. } => {
                    Some(channel_socket.clone())
                }
                _ => None,
            },
            sim_launch_id: None,
            port_forwards: spec.port_forwards.clone(),
            agent_channel: spec.agent_channel.clone(),
            attest_channel: spec.attest_channel.clone(),
        };
        match self.await_running(&runtime, &paths, begun) {
            Ok((qmp_ready, running)) => {
                let timings = StartTimings {
                    prepared,
                    spawned,
                    qmp_ready,
                    running,
                };
                tracing::info!(
                    vm = %spec.vm_id,
                    pid,
                    accelerator = %capabilities.accelerator,
                    ?timings,
                    "QEMU running"
                );
                Ok((runtime, timings))
            }
            Err(error) => {
                tracing::warn!(vm = %spec.vm_id, pid, %error, "QEMU start failed");
                let _ = identity.kill();
                let _ = identity.wait_exit(Duration::from_secs(5));
                self.reap(pid);
                Err(error)
            }
        }
    }

    /// Waits until QMP answers and the VM runs; returns when each happened.
    fn await_running(
        &self,
        runtime: &VmRuntime,
        paths: &RunPaths,
        begun: Instant,
    ) -> Result<(Duration, Duration), DriverError> {
        let deadline = begun + Duration::from_millis(self.config.start_timeout_ms);
        let qmp_error = |error| DriverError::Qmp {
            socket: paths.qmp_socket.clone(),
            error,
        };
        let mut client = loop {
            match self.connect(runtime) {
                Ok(client) => break client,
                Err(DriverError::Qmp { error, .. })
                    if error.is_not_listening() || matches!(error, QmpError::Closed) => {}
                Err(error) => return Err(self.start_failure(runtime, paths).unwrap_or(error)),
            }
            if let Some(failure) = self.start_failure(runtime, paths) {
                return Err(failure);
            }
            if Instant::now() >= deadline {
                return Err(DriverError::Timeout {
                    what: format!("QEMU's QMP socket {}", paths.qmp_socket.display()),
                    after: Duration::from_millis(self.config.start_timeout_ms),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let qmp_ready = begun.elapsed();
        loop {
            let status = match client.query_status() {
                Ok(status) => status,
                Err(error) => {
                    return Err(self
                        .start_failure(runtime, paths)
                        .unwrap_or_else(|| qmp_error(error)))
                }
            };
            match status.as_str() {
                "running" => return Ok((qmp_ready, begun.elapsed())),
                "prelaunch" | "inmigrate" | "restore-vm" => {}
                other => {
                    return Err(DriverError::StartFailed {
                        status: format!("QEMU runs but the VM is {other}"),
                        log_tail: log_tail(&paths.vmm_log),
                    })
                }
            }
            if Instant::now() >= deadline {
                return Err(DriverError::Timeout {
                    what: "the VM reaching state running".to_owned(),
                    after: Duration::from_millis(self.config.start_timeout_ms),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// If the QEMU being started has already exited: why.
    fn start_failure(&self, runtime: &VmRuntime, paths: &RunPaths) -> Option<DriverError> {
        let status = lock(&self.children)
            .get_mut(&runtime.pid)
            .and_then(|child| child.try_wait().ok().flatten())?;
        self.reap(runtime.pid);
        Some(DriverError::StartFailed {
            status: status.to_string(),
            log_tail: log_tail(&paths.vmm_log),
        })
    }

    /// Connects to the VM's QMP and checks that the recorded pid serves it.
    fn connect(&self, runtime: &VmRuntime) -> Result<QmpClient, DriverError> {
        let qmp_error = |error| DriverError::Qmp {
            socket: runtime.qmp_socket.clone(),
            error,
        };
        let client = QmpClient::connect(&runtime.qmp_socket, self.config.qmp_timeout())
            .map_err(qmp_error)?;
        let peer = rustix::net::sockopt::socket_peercred(client.stream())
            .map_err(|error| DriverError::io("SO_PEERCRED of the QMP socket", error.into()))?;
        let peer_pid = peer.pid.as_raw_nonzero().get();
        if u32::try_from(peer_pid).ok() != Some(runtime.pid) {
            return Err(DriverError::NotOurs {
                pid: runtime.pid,
                reason: format!(
                    "{} is served by pid {peer_pid}",
                    runtime.qmp_socket.display()
                ),
            });
        }
        Ok(client)
    }

    /// Why the VM's process is over, or `None` while it lives.
    fn exit_reason(&self, runtime: &VmRuntime) -> Result<Option<ExitReason>, DriverError> {
        let identity = identity(runtime);
        let liveness = identity.liveness().map_err(|error| {
            DriverError::io(format!("reading /proc/{}/stat", runtime.pid), error)
        })?;
        let vmm_log = vmm_log_of(runtime);
        let last_line = || {
            let line = last_log_line(&vmm_log);
            if line.is_empty() {
                String::new()
            } else {
                format!("; its log ends with: {line}")
            }
        };
        Ok(match liveness {
            Liveness::Alive => None,
            Liveness::Recycled => {
                lock(&self.children).remove(&runtime.pid);
                Some(ExitReason::PidReused { pid: runtime.pid })
            }
            Liveness::Zombie | Liveness::Gone => {
                // A multi-threaded process shows `Z` as soon as its main
                // thread exits, but can be reaped only once every thread
                // has: wait for that (the pidfd turns readable) if it is
                // our child.
                if lock(&self.children).contains_key(&runtime.pid) {
                    let _ = identity.wait_exit(Duration::from_secs(5));
                }
                let status = self.reap(runtime.pid);
                let how = status.map_or_else(
                    || "exit status unknown (not a child of this daemon)".to_owned(),
                    |status| status.to_string(),
                );
                Some(ExitReason::ProcessExited {
                    detail: format!("pid {}: {how}{}", runtime.pid, last_line()),
                })
            }
        })
    }

    /// Reaps a child of this driver that has ended; its exit status.
    fn reap(&self, pid: u32) -> Option<std::process::ExitStatus> {
        let mut children = lock(&self.children);
        let status = children.get_mut(&pid)?.try_wait().ok().flatten()?;
        children.remove(&pid);
        Some(status)
    }

    /// QMP `quit`, then SIGKILL if QEMU has not ended; waits for the end.
    fn terminate(&self, runtime: &VmRuntime) -> Result<(), DriverError> {
        let identity = identity(runtime);
        let short = Duration::from_secs(1).min(self.config.qmp_timeout());
        if let Ok(mut client) = QmpClient::connect(&runtime.qmp_socket, short) {
            // Closed: QEMU went away before answering, as it may on quit.
            let _ = client.execute_within("quit", None, short);
        }
        let waited = |timeout| {
            identity
                .wait_exit(timeout)
                .map_err(|error| DriverError::io(format!("waiting for pid {}", runtime.pid), error))
        };
        if !waited(Duration::from_secs(3))? {
            identity
                .kill()
                .map_err(|error| DriverError::io(format!("killing pid {}", runtime.pid), error))?;
            if !waited(Duration::from_secs(10))? {
                return Err(DriverError::Timeout {
                    what: format!("pid {} ending after SIGKILL", runtime.pid),
                    after: Duration::from_secs(10),
                });
            }
        }
        self.reap(runtime.pid);
        let _ = remove_stale_socket(&runtime.qmp_socket);
        Ok(())
    }

    /// Presses the power button; `true` once the guest has powered off.
    fn power_down(&self, runtime: &VmRuntime, timeout: Duration) -> Result<bool, DriverError> {
        let qmp_error = |error| DriverError::Qmp {
            socket: runtime.qmp_socket.clone(),
            error,
        };
        let mut client = self.connect(runtime)?;
        if client.query_status().map_err(qmp_error)? == "shutdown" {
            return Ok(true);
        }
        client
            .execute("system_powerdown", None)
            .map_err(qmp_error)?;
        match client.wait_event("SHUTDOWN", timeout) {
            Ok(_) => Ok(true),
            Err(QmpError::Timeout(_)) => Ok(false),
            // QEMU ended while the guest shut down.
            Err(QmpError::Closed) => Ok(self.exit_reason(runtime)?.is_some()),
            Err(error) => Err(qmp_error(error)),
        }
    }

    fn state_of(&self, runtime: &VmRuntime) -> Result<RuntimeState, DriverError> {
        if let Some(reason) = self.exit_reason(runtime)? {
            return Ok(RuntimeState::Exited(reason));
        }
        let status = self.connect(runtime).and_then(|mut client| {
            client.query_status().map_err(|error| DriverError::Qmp {
                socket: runtime.qmp_socket.clone(),
                error,
            })
        });
        match status {
            Ok(status) => Ok(classify_status(&status)),
            // The process may have ended in between.
            Err(error) => match self.exit_reason(runtime)? {
                Some(reason) => Ok(RuntimeState::Exited(reason)),
                None => Err(error),
            },
        }
    }
}

impl HypervisorDriver for QemuDriver {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn probe(&self) -> Result<DriverCapabilities, DriverError> {
        self.probe_and_cache()
            .map(|capabilities| (*capabilities).clone())
    }

    fn create_disk(&self, path: &Path, size_mib: u64) -> Result<(), DriverError> {
        let qemu_img = probe::resolve_binary(&self.config.qemu_img).ok_or_else(|| {
            DriverError::VmmMissing {
                binary: self.config.qemu_img.clone(),
            }
        })?;
        disk::create_qcow2(&qemu_img, path, size_mib)
    }

    fn wipe_disk(&self, path: &Path) -> Result<(), DriverError> {
        disk::wipe(path).map(drop)
    }

    fn start(&self, spec: &LaunchSpec) -> Result<VmRuntime, DriverError> {
        self.start_timed(spec).map(|(runtime, _)| runtime)
    }

    fn stop(&self, runtime: &VmRuntime, mode: StopMode) -> Result<StopOutcome, DriverError> {
        if let Some(reason) = self.exit_reason(runtime)? {
            let _ = remove_stale_socket(&runtime.qmp_socket);
            return Ok(StopOutcome::AlreadyExited(reason));
        }
        let outcome = match mode {
            StopMode::Force => StopOutcome::Forced {
                reason: "forced stop".to_owned(),
            },
            StopMode::Graceful { timeout } => match self.power_down(runtime, timeout) {
                Ok(true) => StopOutcome::Graceful,
                Ok(false) => StopOutcome::Forced {
                    reason: format!("the guest did not power off within {timeout:?}"),
                },
                Err(error) => StopOutcome::Forced {
                    reason: format!("the power button could not be pressed: {error}"),
                },
            },
        };
        self.terminate(runtime)?;
        tracing::info!(pid = runtime.pid, ?outcome, "QEMU stopped");
        Ok(outcome)
    }

    fn reboot(&self, runtime: &VmRuntime) -> Result<(), DriverError> {
        if let Some(reason) = self.exit_reason(runtime)? {
            return Err(DriverError::NotRunning(reason));
        }
        let qmp_error = |error| DriverError::Qmp {
            socket: runtime.qmp_socket.clone(),
            error,
        };
        let mut client = self.connect(runtime)?;
        let status = client.query_status().map_err(qmp_error)?;
        client.execute("system_reset", None).map_err(qmp_error)?;
        // A guest that powered off, panicked or hit an internal error is
        // paused by QEMU (-no-shutdown); after the reset it must continue.
        if matches!(
            status.as_str(),
            "shutdown" | "guest-panicked" | "internal-error"
        ) {
            client.execute("cont", None).map_err(qmp_error)?;
        }
        tracing::info!(pid = runtime.pid, from = %status, "VM reset");
        Ok(())
    }

    fn state(&self, runtime: &VmRuntime) -> Result<RuntimeState, DriverError> {
        self.state_of(runtime)
    }

    fn adopt(&self, runtime: &VmRuntime) -> Result<RuntimeState, DriverError> {
        if runtime.driver != "qemu" {
            return Err(DriverError::NotOurs {
                pid: runtime.pid,
                reason: format!(
                    "the VM was started by the {} driver, this is the QEMU driver",
                    runtime.driver
                ),
            });
        }
        if let Some(reason) = self.exit_reason(runtime)? {
            return Ok(RuntimeState::Exited(reason));
        }
        // The live process with this pid and start time must be the QEMU
        // that owns this QMP socket.
        let cmdline = fs::read(format!("/proc/{}/cmdline", runtime.pid)).map_err(|error| {
            DriverError::io(format!("reading /proc/{}/cmdline", runtime.pid), error)
        })?;
        let socket = runtime.qmp_socket.to_string_lossy();
        let owns_socket = cmdline
            .split(|byte| *byte == 0)
            .any(|arg| String::from_utf8_lossy(arg).contains(socket.as_ref()));
        if !owns_socket {
            return Err(DriverError::NotOurs {
                pid: runtime.pid,
                reason: format!("its command line does not name {socket}"),
            });
        }
        let state = self.state_of(runtime)?;
        tracing::info!(pid = runtime.pid, ?state, "QEMU adopted");
        Ok(state)
    }

    fn console_log(&self, runtime: &VmRuntime) -> Result<PathBuf, DriverError> {
        fs::metadata(&runtime.console_log).map_err(|error| {
            DriverError::io(
                format!("console log {}", runtime.console_log.display()),
                error,
            )
        })?;
        Ok(runtime.console_log.clone())
    }
}

/// Runs the whole probe.
pub fn probe_host(config: &QemuConfig) -> Result<DriverCapabilities, DriverError> {
    let qemu = probe::qemu_facts(&config.binary)?;
    let kvm = probe::kvm_facts(&config.kvm_device);
    let (accelerator, accelerator_reason) = probe::choose_accelerator(config.accelerator, &kvm)?;
    let sev_facts = probe::sev_facts(&config.sev_device, kvm.vm_types, qemu.sev_objects);
    let sev = probe::sev_support(accelerator, &sev_facts);
    let (host_memory_mib, host_memory_available_mib) = probe::host_memory_mib();
    Ok(DriverCapabilities {
        driver: "qemu".to_owned(),
        binary: qemu.binary,
        version: qemu.version,
        accelerator,
        accelerator_reason,
        kvm,
        sev,
        simulated_snp: true,
        host_cpus: probe::host_cpus(),
        host_memory_mib,
        host_memory_available_mib,
    })
}

fn host_params(capabilities: &DriverCapabilities) -> HostParams {
    HostParams {
        accelerator: capabilities.accelerator,
        sev: capabilities.sev.clone(),
    }
}

/// QEMU's run state as a [`RuntimeState`].
pub fn classify_status(status: &str) -> RuntimeState {
    match status {
        "running" => RuntimeState::Running,
        "shutdown" => RuntimeState::Exited(ExitReason::GuestShutdown),
        "guest-panicked" => RuntimeState::Exited(ExitReason::GuestPanicked),
        "internal-error" => RuntimeState::Exited(ExitReason::InternalError),
        other => RuntimeState::Paused {
            status: other.to_owned(),
        },
    }
}

/// Host port 0 becomes a free port on 127.0.0.1. The listeners are held
/// until all are picked (so no two forwards get the same port) and then
/// closed for QEMU to bind; another process could take one in between, in
/// which case QEMU fails to start and says so.
pub(crate) fn resolve_port_forwards(
    forwards: &[PortForward],
) -> Result<Vec<PortForward>, DriverError> {
    let mut held = Vec::new();
    let mut resolved = Vec::with_capacity(forwards.len());
    for forward in forwards {
        let mut forward = *forward;
        if forward.host_port == 0 {
            let listener = TcpListener::bind(("127.0.0.1", 0))
                .map_err(|error| DriverError::io("picking a free port on 127.0.0.1", error))?;
            forward.host_port = listener
                .local_addr()
                .map_err(|error| DriverError::io("picking a free port on 127.0.0.1", error))?
                .port();
            held.push(listener);
        }
        resolved.push(forward);
    }
    drop(held);
    Ok(resolved)
}

pub(crate) fn remove_stale_socket(path: &Path) -> Result<(), DriverError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
        Err(error) => Err(DriverError::io(
            format!("removing the stale socket {}", path.display()),
            error,
        )),
    }
}

fn identity(runtime: &VmRuntime) -> ProcessIdentity {
    ProcessIdentity {
        pid: runtime.pid,
        start_ticks: runtime.start_ticks,
    }
}

/// The header line the driver writes to `qemu.log` before each start.
const LOG_HEADER: &str = "hsevd:";

fn vmm_log_of(runtime: &VmRuntime) -> PathBuf {
    runtime
        .qmp_socket
        .parent()
        .map_or_else(|| PathBuf::from("qemu.log"), |dir| dir.join("qemu.log"))
}

/// What QEMU wrote since the last start header (at most 4 KiB from the end).
fn log_tail(path: &Path) -> String {
    // A leading newline lets a header on the first line be found too.
    let text = format!("\n{}", read_end(path, 4096));
    let since_start = text
        .rfind(&format!("\n{LOG_HEADER}"))
        .map_or(text.as_str(), |at| &text[at + 1..]);
    since_start
        .lines()
        .filter(|line| !line.starts_with(LOG_HEADER))
        .collect::<Vec<_>>()
        .join(" | ")
        .trim()
        .to_owned()
}

fn last_log_line(path: &Path) -> String {
    read_end(path, 1024)
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .filter(|line| !line.starts_with(LOG_HEADER))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn read_end(path: &Path, max: u64) -> String {
    let Ok(mut file) = fs::File::open(path) else {
        return String::new();
    };
    let length = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(length.saturating_sub(max)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if length > max {
        // Drop the partial first line.
        text = text
            .split_once('\n')
            .map_or(text.clone(), |(_, rest)| rest.to_owned());
    }
    text
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypervisor_classifies_qemu_run_states() {
        assert_eq!(classify_status("running"), RuntimeState::Running);
        assert_eq!(
            classify_status("shutdown"),
            RuntimeState::Exited(ExitReason::GuestShutdown)
        );
        assert_eq!(
            classify_status("guest-panicked"),
            RuntimeState::Exited(ExitReason::GuestPanicked)
        );
        assert_eq!(
            classify_status("internal-error"),
            RuntimeState::Exited(ExitReason::InternalError)
        );
        assert_eq!(
            classify_status("paused"),
            RuntimeState::Paused {
                status: "paused".into()
            }
        );
    }

    #[test]
    fn hypervisor_resolves_port_zero_to_distinct_free_ports() {
        let forwards = [
            PortForward {
                host_port: 0,
                guest_port: 22,
            },
            PortForward {
                host_port: 0,
                guest_port: 80,
            },
            PortForward {
                host_port: 4000,
                guest_port: 443,
            },
        ];
        let resolved = resolve_port_forwards(&forwards).expect("resolved");
        assert_ne!(resolved[0].host_port, 0);
        assert_ne!(resolved[1].host_port, 0);
        assert_ne!(resolved[0].host_port, resolved[1].host_port);
        assert_eq!(resolved[2], forwards[2]);
        assert_eq!(resolved[1].guest_port, 80);
    }

    #[test]
    fn hypervisor_log_tail_is_this_start_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qemu.log");
        fs::write(
            &path,
            "hsevd: starting a (1): qemu ...\nold error\nhsevd: starting a (1): qemu ...\n\
             qemu-system-x86_64: -accel kvm: vm-type SEV-SNP not supported by KVM\n",
        )
        .expect("write");
        assert_eq!(
            log_tail(&path),
            "qemu-system-x86_64: -accel kvm: vm-type SEV-SNP not supported by KVM"
        );
        assert_eq!(
            last_log_line(&path),
            "qemu-system-x86_64: -accel kvm: vm-type SEV-SNP not supported by KVM"
        );
        fs::write(&path, "hsevd: starting a (1): qemu ...\n").expect("write");
        assert_eq!(log_tail(&path), "");
        assert_eq!(last_log_line(&path), "");
        assert_eq!(log_tail(&dir.path().join("absent")), "");
    }

    #[test]
    fn hypervisor_config_defaults_and_validation() {
        let config: QemuConfig = serde_json::from_str(r#"{"accelerator": "tcg"}"#).expect("parses");
        assert_eq!(config.accelerator, AcceleratorSetting::Tcg);
        assert_eq!(config.binary, PathBuf::from("/usr/bin/qemu-system-x86_64"));
        assert!(serde_json::from_str::<QemuConfig>(r#"{"acelerator": "tcg"}"#).is_err());
        let config = QemuConfig {
            qmp_timeout_ms: 0,
            ..QemuConfig::default()
        };
        let error = QemuDriver::new(config).expect_err("invalid");
        assert!(error.to_string().contains("qemu.qmp_timeout_ms"), "{error}");
    }

    #[test]
    fn hypervisor_missing_qemu_is_named() {
        let driver = QemuDriver::new(QemuConfig {
            binary: PathBuf::from("/nonexistent/qemu-system-x86_64"),
            ..QemuConfig::default()
        })
        .expect("driver");
        let error = driver.probe().expect_err("no QEMU");
        let message = error.to_string();
        assert!(
            message.contains("/nonexistent/qemu-system-x86_64") && message.contains("make deps"),
            "{message}"
        );
    }
}
