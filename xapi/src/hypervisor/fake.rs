//! [`FakeDriver`]: VMs that exist only in this process's memory.
//!
//! For tests of everything above the hypervisor (the daemon's lifecycle,
//! the API, the CLI) and for pool scale runs of many hosts, where a guest
//! would only cost time. It implements the whole trait, deterministically:
//! VM numbers count from 1, a "boot" writes one console line, nothing is
//! random and nothing waits. A VM costs one small map entry and its
//! console file.
//!
//! What it cannot do, it says with [`DriverError::Unsupported`]:
//! - SEV, SEV-ES and SEV-SNP launches (there is no guest to protect; the
//!   simulated Secure Processor's launches are accepted, as they need no
//!   SEV hardware, but no guest ever talks on their channel);
//! - adoption after a daemon restart: its VMs live in the daemon's
//!   process and end with it, so [`HypervisorDriver::adopt`] of a runtime
//!   it does not hold is `Unsupported`.
//!
//! [`FakeDriver::crash`] and [`FakeDriver::power_off_from_guest`] play
//! what a real guest or VMM would do on its own.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::qemu::argv;
use super::{
    probe, Accelerator, ConfidentialLaunch, DriverCapabilities, DriverError, ExitReason,
    HypervisorDriver, LaunchSpec, RuntimeState, SevSupport, StopMode, StopOutcome,
};
use crate::model::{PortForward, VmRuntime};

const NAME: &str = "fake";

/// How the fake host presents itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FakeHost {
    /// CPUs it claims.
    pub cpus: u32,
    /// Memory it claims, MiB.
    pub memory_mib: u64,
}

impl Default for FakeHost {
    fn default() -> Self {
        FakeHost {
            cpus: 64,
            memory_mib: 256 * 1024,
        }
    }
}

/// One fake VM.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FakeVm {
    state: RuntimeState,
    boots: u32,
    run_dir: PathBuf,
}

/// The fake engine.
#[derive(Debug)]
pub struct FakeDriver {
    host: FakeHost,
    next: AtomicU64,
    vms: Mutex<HashMap<String, FakeVm>>,
}

impl Default for FakeDriver {
    fn default() -> Self {
        Self::new(FakeHost::default())
    }
}

impl FakeDriver {
    /// A fake host of `host`'s size, with no VM.
    pub fn new(host: FakeHost) -> Self {
        FakeDriver {
            host,
            next: AtomicU64::new(1),
            vms: Mutex::new(HashMap::new()),
        }
    }

    /// The VMM "crashes": the VM is over, as a killed process would be.
    pub fn crash(&self, runtime: &VmRuntime) -> Result<(), DriverError> {
        self.set_exited(
            runtime,
            ExitReason::ProcessExited {
                detail: "the fake VMM crashed".to_owned(),
            },
        )
    }

    /// The guest powers itself off.
    pub fn power_off_from_guest(&self, runtime: &VmRuntime) -> Result<(), DriverError> {
        self.set_exited(runtime, ExitReason::GuestShutdown)
    }

    /// How many times the VM booted (starts and reboots).
    pub fn boots(&self, runtime: &VmRuntime) -> Option<u32> {
        let key = runtime.domain.as_deref()?;
        self.vms().get(key).map(|vm| vm.boots)
    }

    /// How many VMs it holds (running or over but not stopped).
    pub fn len(&self) -> usize {
        self.vms().len()
    }

    /// It holds no VM.
    pub fn is_empty(&self) -> bool {
        self.vms().is_empty()
    }

    fn set_exited(&self, runtime: &VmRuntime, reason: ExitReason) -> Result<(), DriverError> {
        let key = self.key(runtime)?;
        let mut vms = self.vms();
        let vm = vms.get_mut(key).ok_or_else(|| gone(key))?;
        vm.state = RuntimeState::Exited(reason);
        Ok(())
    }

    fn vms(&self) -> MutexGuard<'_, HashMap<String, FakeVm>> {
        self.vms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn key<'a>(&self, runtime: &'a VmRuntime) -> Result<&'a str, DriverError> {
        if runtime.driver != NAME {
            return Err(DriverError::NotOurs {
                pid: runtime.pid,
                reason: format!(
                    "the VM was started by the {} driver, this is the fake driver",
                    runtime.driver
                ),
            });
        }
        runtime
            .domain
            .as_deref()
            .ok_or_else(|| DriverError::NotOurs {
                pid: runtime.pid,
                reason: "the runtime names no fake VM".to_owned(),
            })
    }

    /// The state of `key`: what the map holds, or over with why not.
    fn state_of(&self, key: &str) -> RuntimeState {
        self.vms().get(key).map_or_else(
            || RuntimeState::Exited(gone_reason(key)),
            |vm| vm.state.clone(),
        )
    }
}

fn gone_reason(key: &str) -> ExitReason {
    ExitReason::ProcessExited {
        detail: format!(
            "fake VM {key} is not in this process (fake VMs end with the daemon that started them)"
        ),
    }
}

fn gone(key: &str) -> DriverError {
    DriverError::NotRunning(gone_reason(key))
}

/// Appends one line to the console log.
fn console_line(path: &Path, line: &str) -> Result<(), DriverError> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|error| DriverError::io(format!("opening {}", path.display()), error))?;
    writeln!(file, "{line}")
        .map_err(|error| DriverError::io(format!("writing {}", path.display()), error))
}

impl HypervisorDriver for FakeDriver {
    fn name(&self) -> &'static str {
        NAME
    }

    fn probe(&self) -> Result<DriverCapabilities, DriverError> {
        Ok(DriverCapabilities {
            driver: NAME.to_owned(),
            binary: PathBuf::from("(in-process)"),
            version: format!("hsevd {} fake driver", env!("CARGO_PKG_VERSION")),
            accelerator: Accelerator::Tcg,
            accelerator_reason: "the fake driver runs no guest".to_owned(),
            kvm: probe::KvmFacts {
                device: PathBuf::new(),
                open_error: Some("not probed by the fake driver".to_owned()),
                api_version: None,
                modules: Vec::new(),
                cpu_flag: None,
                test_guest: probe::TestGuest::NotRun,
                max_vcpus: None,
                vm_types: 0,
            },
            sev: SevSupport {
                reason: "the fake driver runs no guest, so it protects none".to_owned(),
                ..SevSupport::default()
            },
            simulated_snp: true,
            host_cpus: self.host.cpus,
            host_memory_mib: self.host.memory_mib,
            host_memory_available_mib: self.host.memory_mib,
        })
    }

    fn create_disk(&self, path: &Path, size_mib: u64) -> Result<(), DriverError> {
        if size_mib == 0 {
            return Err(DriverError::InvalidSpec {
                field: "size_mib",
                reason: "a disk needs at least 1 MiB".to_owned(),
            });
        }
        // A sparse file of the size: cheap, and real enough to wipe.
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|error| DriverError::io(format!("creating {}", path.display()), error))?;
        file.set_len(size_mib << 20)
            .map_err(|error| DriverError::io(format!("sizing {}", path.display()), error))
    }

    fn wipe_disk(&self, path: &Path) -> Result<(), DriverError> {
        super::qemu::disk::wipe(path).map(drop)
    }

    fn start(&self, spec: &LaunchSpec) -> Result<VmRuntime, DriverError> {
        let mut checked = spec.clone();
        // Host port 0 becomes a deterministic stand-in; nothing listens.
        let mut next_port = 40_000u16;
        checked.port_forwards = spec
            .port_forwards
            .iter()
            .map(|forward| {
                let host_port = if forward.host_port == 0 {
                    next_port += 1;
                    next_port
                } else {
                    forward.host_port
                };
                PortForward {
                    host_port,
                    guest_port: forward.guest_port,
                }
            })
            .collect();
        argv::validate(&checked)?;
        if let ConfidentialLaunch::Sev { .. } | ConfidentialLaunch::SevSnp { .. } =
            spec.confidential
        {
            return Err(DriverError::Unsupported(
                "the fake driver runs no guest, so it launches no SEV, SEV-ES or SEV-SNP guest"
                    .to_owned(),
            ));
        }
        let in_use = self
            .vms()
            .values()
            .any(|vm| vm.run_dir == spec.run_dir && !matches!(vm.state, RuntimeState::Exited(_)));
        if in_use {
            return Err(DriverError::InvalidSpec {
                field: "run_dir",
                reason: format!("a running fake VM already uses {}", spec.run_dir.display()),
            });
        }
        fs::create_dir_all(&spec.run_dir).map_err(|error| {
            DriverError::io(format!("creating {}", spec.run_dir.display()), error)
        })?;
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let key = format!("fake-{number}");
        let console_log = spec.run_dir.join("console.log");
        console_line(
            &console_log,
            &format!("fake VM {} ({}) boot 1", spec.name, spec.vm_id),
        )?;
        self.vms().insert(
            key.clone(),
            FakeVm {
                state: RuntimeState::Running,
                boots: 1,
                run_dir: spec.run_dir.clone(),
            },
        );
        Ok(VmRuntime {
            driver: NAME.to_owned(),
            domain: Some(key),
            pid: 0,
            start_ticks: 0,
            qmp_socket: PathBuf::new(),
            console_log,
            sim_channel: None,
            sim_launch_id: None,
            port_forwards: checked.port_forwards,
            agent_channel: None,
            attest_channel: None,
        })
    }

    fn stop(&self, runtime: &VmRuntime, mode: StopMode) -> Result<StopOutcome, DriverError> {
        let key = self.key(runtime)?;
        let Some(vm) = self.vms().remove(key) else {
            return Ok(StopOutcome::AlreadyExited(gone_reason(key)));
        };
        Ok(match (vm.state, mode) {
            // The guest powered off by itself: as graceful as it gets.
            (RuntimeState::Exited(ExitReason::GuestShutdown), _) => StopOutcome::Graceful,
            (RuntimeState::Exited(reason), _) => StopOutcome::AlreadyExited(reason),
            (_, StopMode::Force) => StopOutcome::Forced {
                reason: "forced stop".to_owned(),
            },
            // A fake guest honours the power button at once.
            (_, StopMode::Graceful { .. }) => StopOutcome::Graceful,
        })
    }

    fn reboot(&self, runtime: &VmRuntime) -> Result<(), DriverError> {
        let key = self.key(runtime)?;
        let boots = {
            let mut vms = self.vms();
            let vm = vms.get_mut(key).ok_or_else(|| gone(key))?;
            if let RuntimeState::Exited(reason) = &vm.state {
                return Err(DriverError::NotRunning(reason.clone()));
            }
            vm.boots += 1;
            vm.boots
        };
        console_line(&runtime.console_log, &format!("fake VM {key} boot {boots}"))
    }

    fn state(&self, runtime: &VmRuntime) -> Result<RuntimeState, DriverError> {
        Ok(self.state_of(self.key(runtime)?))
    }

    fn adopt(&self, runtime: &VmRuntime) -> Result<RuntimeState, DriverError> {
        let key = self.key(runtime)?;
        if !self.vms().contains_key(key) {
            return Err(DriverError::Unsupported(format!(
                "the fake driver cannot adopt {key}: fake VMs live in the daemon's process and \
                 end with it"
            )));
        }
        Ok(self.state_of(key))
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
