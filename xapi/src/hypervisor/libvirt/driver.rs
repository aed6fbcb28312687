//! [`LibvirtDriver`]: the [`HypervisorDriver`] over one libvirt connection.
//!
//! The connection is opened at the first use and again whenever libvirt
//! reports it dead (a restarted daemon), re-subscribing to lifecycle
//! events; the event log starts empty on each new connection, and states
//! are then read from libvirt until events come.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;
use virt::sys;

use super::capabilities::{self, LibvirtVersion};
use super::events::{self, EventLog, Meaning, Subscription};
use super::xml::{self, DomainHost, DomainIdentity, DomainPaths, METADATA_NAMESPACE};
use super::LibvirtConfig;
use crate::hypervisor::qemu::{disk, remove_stale_socket, resolve_port_forwards};
use crate::hypervisor::{
    probe, Accelerator, ConfidentialLaunch, DriverCapabilities, DriverError, ExitReason,
    HypervisorDriver, LaunchSpec, RuntimeState, StopMode, StopOutcome,
};
use crate::model::VmRuntime;

/// The name this driver records in the runtimes it starts.
const NAME: &str = "libvirt";

/// The libvirt engine.
#[derive(Debug)]
pub struct LibvirtDriver {
    config: LibvirtConfig,
    session: Mutex<Option<Arc<Session>>>,
    probed: Mutex<Option<Arc<Probed>>>,
}

/// One open connection and its event subscription.
#[derive(Debug)]
struct Session {
    connection: Connect,
    events: Arc<EventLog>,
    _subscription: Subscription,
}

/// What the probe found, in both forms.
#[derive(Debug)]
struct Probed {
    capabilities: DriverCapabilities,
    host: DomainHost,
}

fn libvirt_error(what: impl Into<String>) -> impl FnOnce(virt::error::Error) -> DriverError {
    let what = what.into();
    move |error| DriverError::Libvirt {
        what,
        message: error.message().to_owned(),
    }
}

fn is_no_domain(error: &virt::error::Error) -> bool {
    matches!(
        error.code(),
        Enum::Known(virt::error::ErrorNumber::NoDomain)
    )
}

impl LibvirtDriver {
    /// A driver with `config`; nothing is connected or probed yet.
    pub fn new(config: LibvirtConfig) -> Result<Self, DriverError> {
        config.validate()?;
        Ok(LibvirtDriver {
            config,
            session: Mutex::new(None),
            probed: Mutex::new(None),
        })
    }

    /// Its configuration.
    pub fn config(&self) -> &LibvirtConfig {
        &self.config
    }

    /// The open session, opening (or reopening) it when needed.
    fn session(&self) -> Result<Arc<Session>, DriverError> {
        let mut slot = lock(&self.session);
        if let Some(session) = slot.as_ref() {
            if session.connection.is_alive().unwrap_or(false) {
                return Ok(Arc::clone(session));
            }
            tracing::warn!(uri = %self.config.uri, "the libvirt connection is dead: reconnecting");
        }
        events::start_loop()?;
        let connection =
            Connect::open(Some(&self.config.uri)).map_err(|error| DriverError::Libvirt {
                what: format!("connecting to {}", self.config.uri),
                message: format!(
                    "{} (is libvirtd running? `make deps` installs it; the tests start their own)",
                    error.message()
                ),
            })?;
        // Keep-alives notice a daemon that went away between calls.
        let _ = connection.set_keep_alive(5, 3);
        let log = Arc::new(EventLog::default());
        let subscription = events::subscribe(&connection, Arc::clone(&log))?;
        let session = Arc::new(Session {
            connection,
            events: log,
            _subscription: subscription,
        });
        *slot = Some(Arc::clone(&session));
        Ok(session)
    }

    fn probed(&self) -> Result<Arc<Probed>, DriverError> {
        if let Some(probed) = lock(&self.probed).as_ref() {
            return Ok(Arc::clone(probed));
        }
        self.probe_and_cache()
    }

    fn probe_and_cache(&self) -> Result<Arc<Probed>, DriverError> {
        let session = self.session()?;
        let connection = &session.connection;
        let libvirt = LibvirtVersion(
            connection
                .lib_version()
                .map_err(libvirt_error("reading libvirt's version"))?,
        );
        let qemu = LibvirtVersion(
            connection
                .hyp_version()
                .map_err(libvirt_error("reading QEMU's version"))?,
        );
        let kvm = probe::kvm_facts(&self.config.kvm_device);
        let (accelerator, accelerator_reason) =
            probe::choose_accelerator(self.config.accelerator, &kvm)?;
        let virttype = match accelerator {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "qemu",
        };
        let domcapabilities = connection
            .domain_capabilities(None, Some("x86_64"), Some("q35"), Some(virttype), 0)
            .map_err(libvirt_error(format!("domcapabilities ({virttype}, q35)")))?;
        let domain_capabilities = capabilities::parse(&domcapabilities)?;
        let node = connection
            .node_info()
            .map_err(libvirt_error("reading the node's CPUs and memory"))?;
        let free_bytes = connection.free_memory().unwrap_or(0);
        let capabilities = DriverCapabilities {
            driver: NAME.to_owned(),
            binary: PathBuf::from(&domain_capabilities.emulator),
            version: format!("libvirt {libvirt}, QEMU {qemu}"),
            accelerator,
            accelerator_reason,
            kvm,
            sev: domain_capabilities.sev.clone(),
            simulated_snp: true,
            host_cpus: node.cpus,
            host_memory_mib: node.memory / 1024,
            host_memory_available_mib: free_bytes / (1024 * 1024),
        };
        tracing::info!(
            uri = %self.config.uri,
            version = %capabilities.version,
            accelerator = %capabilities.accelerator,
            sev = %capabilities.sev.reason,
            "libvirt driver probed"
        );
        let probed = Arc::new(Probed {
            capabilities,
            host: DomainHost {
                accelerator,
                libvirt,
                capabilities: domain_capabilities,
            },
        });
        *lock(&self.probed) = Some(Arc::clone(&probed));
        Ok(probed)
    }

    /// The domain XML `spec` would start (host port 0 shown resolved to a
    /// port free now; a start picks its own).
    pub fn domain_xml(&self, spec: &LaunchSpec) -> Result<String, DriverError> {
        let probed = self.probed()?;
        let mut shown = spec.clone();
        shown.port_forwards = resolve_port_forwards(&spec.port_forwards)?;
        xml::build(
            &shown,
            &DomainIdentity::of(spec, &self.config.domain_prefix),
            &probed.host,
        )
    }

    /// The UUID a runtime of this driver names.
    fn uuid<'a>(&self, runtime: &'a VmRuntime) -> Result<&'a str, DriverError> {
        if runtime.driver != NAME {
            return Err(DriverError::NotOurs {
                pid: runtime.pid,
                reason: format!(
                    "the VM was started by the {} driver, this is the libvirt driver",
                    runtime.driver
                ),
            });
        }
        runtime
            .domain
            .as_deref()
            .ok_or_else(|| DriverError::NotOurs {
                pid: runtime.pid,
                reason: "the runtime names no libvirt domain".to_owned(),
            })
    }

    /// The running domain, or why there is none.
    fn domain(
        &self,
        session: &Session,
        uuid: &str,
    ) -> Result<Result<Domain, ExitReason>, DriverError> {
        match session.connection.lookup_domain_by_uuid_string(uuid) {
            Ok(domain) => Ok(Ok(domain)),
            Err(error) if is_no_domain(&error) => Ok(Err(self.ended(session, uuid))),
            Err(error) => Err(libvirt_error(format!("looking up domain {uuid}"))(error)),
        }
    }

    /// Why a domain that libvirt no longer has ended: its last event, or
    /// that it left no record.
    fn ended(&self, session: &Session, uuid: &str) -> ExitReason {
        match session.events.last(uuid).map(events::Lifecycle::meaning) {
            Some(Meaning::Ended(reason)) => reason,
            _ => ExitReason::ProcessExited {
                detail: format!(
                    "libvirt has no domain {uuid} any more (a transient domain leaves no record \
                     once it ends)"
                ),
            },
        }
    }

    fn state_of(&self, session: &Session, uuid: &str) -> Result<RuntimeState, DriverError> {
        match session.events.last(uuid).map(events::Lifecycle::meaning) {
            Some(Meaning::Running) => return Ok(RuntimeState::Running),
            Some(Meaning::Ended(reason)) => return Ok(RuntimeState::Exited(reason)),
            Some(Meaning::Paused(_) | Meaning::Nothing) | None => {}
        }
        let domain = match self.domain(session, uuid)? {
            Ok(domain) => domain,
            Err(reason) => return Ok(RuntimeState::Exited(reason)),
        };
        let info = match domain.info() {
            Ok(info) => info,
            Err(error) if is_no_domain(&error) => {
                return Ok(RuntimeState::Exited(self.ended(session, uuid)))
            }
            Err(error) => return Err(libvirt_error(format!("state of domain {uuid}"))(error)),
        };
        Ok(match info.state {
            Enum::Known(DomainState::Running | DomainState::Blocked | DomainState::Shutdown) => {
                RuntimeState::Running
            }
            Enum::Known(DomainState::Paused) => RuntimeState::Paused {
                status: "paused".to_owned(),
            },
            Enum::Known(DomainState::PMSuspended) => RuntimeState::Paused {
                status: "suspended".to_owned(),
            },
            Enum::Known(DomainState::Crashed) => RuntimeState::Exited(ExitReason::GuestPanicked),
            Enum::Known(DomainState::Shutoff) => RuntimeState::Exited(self.ended(session, uuid)),
            Enum::Known(DomainState::NoState) | Enum::Unknown(_) => RuntimeState::Paused {
                status: "no state".to_owned(),
            },
        })
    }

    /// Destroys the domain (SIGTERM, then SIGKILL) and waits until libvirt
    /// has let it go.
    fn destroy(&self, session: &Session, uuid: &str, domain: &Domain) -> Result<(), DriverError> {
        match domain.destroy() {
            Ok(()) => {}
            Err(error) if is_no_domain(&error) => return Ok(()),
            Err(error) => {
                // Already ended between the lookup and the call?
                if self.domain(session, uuid)?.is_err() {
                    return Ok(());
                }
                return Err(libvirt_error(format!("destroying domain {uuid}"))(error));
            }
        }
        Ok(())
    }

    /// Presses the power button; `true` once the domain ended by itself
    /// within `timeout`.
    fn power_down(
        &self,
        session: &Session,
        uuid: &str,
        domain: &Domain,
        timeout: Duration,
    ) -> Result<bool, DriverError> {
        domain
            .shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            .map_err(libvirt_error(format!(
                "pressing the power button of {uuid}"
            )))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let RuntimeState::Exited(_) = self.state_of(session, uuid)? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Checks that a live domain is the one this runtime recorded: its
    /// metadata names the runtime's run dir.
    fn check_ours(&self, description: &str, runtime: &VmRuntime) -> Result<(), DriverError> {
        let uuid = runtime.domain.as_deref().unwrap_or_default();
        let document =
            roxmltree::Document::parse(description).map_err(|error| DriverError::Libvirt {
                what: format!("reading the XML of domain {uuid}"),
                message: error.to_string(),
            })?;
        let run_dir = document
            .descendants()
            .find(|node| {
                node.tag_name().name() == "run-dir"
                    && node.tag_name().namespace() == Some(METADATA_NAMESPACE)
            })
            .and_then(|node| node.text())
            .map(PathBuf::from);
        let expected = runtime.console_log.parent().map(Path::to_path_buf);
        if run_dir.is_none() || run_dir != expected {
            return Err(DriverError::NotOurs {
                pid: runtime.pid,
                reason: format!(
                    "domain {uuid}'s metadata names run dir {}, the VM's is {}",
                    run_dir.map_or_else(|| "none".to_owned(), |dir| dir.display().to_string()),
                    expected.map_or_else(|| "unknown".to_owned(), |dir| dir.display().to_string())
                ),
            });
        }
        Ok(())
    }
}

impl HypervisorDriver for LibvirtDriver {
    fn name(&self) -> &'static str {
        NAME
    }

    fn probe(&self) -> Result<DriverCapabilities, DriverError> {
        self.probe_and_cache()
            .map(|probed| probed.capabilities.clone())
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
        let begun = Instant::now();
        let probed = self.probed()?;
        let session = self.session()?;
        let mut spec = spec.clone();
        spec.port_forwards = resolve_port_forwards(&spec.port_forwards)?;
        let identity = DomainIdentity::of(&spec, &self.config.domain_prefix);
        let description = xml::build(&spec, &identity, &probed.host)?;
        if let Ok(Ok(_running)) = self.domain(&session, &identity.uuid) {
            return Err(DriverError::InvalidSpec {
                field: "run_dir",
                reason: format!("libvirt already runs domain {}", identity.name),
            });
        }
        fs::create_dir_all(&spec.run_dir).map_err(|error| {
            DriverError::io(format!("creating {}", spec.run_dir.display()), error)
        })?;
        if let ConfidentialLaunch::SimulatedSnp { channel_socket, .. } = &spec.confidential {
            remove_stale_socket(channel_socket)?;
        }
        for socket in [&spec.agent_channel, &spec.attest_channel]
            .into_iter()
            .flatten()
        {
            remove_stale_socket(socket)?;
        }
        fs::write(spec.run_dir.join("domain.xml"), &description).map_err(|error| {
            DriverError::io(format!("writing {}", spec.run_dir.display()), error)
        })?;
        session.events.forget(&identity.uuid);
        let domain = session
            .connection
            .create_domain_xml(&description, 0)
            .map_err(|error| DriverError::StartFailed {
                status: format!("libvirt refused domain {}", identity.name),
                log_tail: error.message().to_owned(),
            })?;
        let runtime = VmRuntime {
            driver: NAME.to_owned(),
            domain: Some(identity.uuid.clone()),
            pid: 0,
            start_ticks: 0,
            qmp_socket: PathBuf::new(),
            console_log: DomainPaths::new(&spec.run_dir).console_log,
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
        match self.state_of(&session, &identity.uuid)? {
            RuntimeState::Running => {}
            other => {
                let _ = self.destroy(&session, &identity.uuid, &domain);
                return Err(DriverError::StartFailed {
                    status: format!("domain {} is {other:?} after its start", identity.name),
                    log_tail: String::new(),
                });
            }
        }
        tracing::info!(
            vm = %spec.vm_id,
            domain = %identity.name,
            elapsed_ms = begun.elapsed().as_millis() as u64,
            "libvirt domain running"
        );
        Ok(runtime)
    }

    fn stop(&self, runtime: &VmRuntime, mode: StopMode) -> Result<StopOutcome, DriverError> {
        let uuid = self.uuid(runtime)?;
        let session = self.session()?;
        let domain = match self.domain(&session, uuid)? {
            Ok(domain) => domain,
            Err(reason) => {
                session.events.forget(uuid);
                return Ok(outcome_of_ended(reason));
            }
        };
        if let RuntimeState::Exited(reason) = self.state_of(&session, uuid)? {
            self.destroy(&session, uuid, &domain)?;
            session.events.forget(uuid);
            return Ok(outcome_of_ended(reason));
        }
        let outcome = match mode {
            StopMode::Force => StopOutcome::Forced {
                reason: "forced stop".to_owned(),
            },
            StopMode::Graceful { timeout } => {
                match self.power_down(&session, uuid, &domain, timeout) {
                    Ok(true) => StopOutcome::Graceful,
                    Ok(false) => StopOutcome::Forced {
                        reason: format!("the guest did not power off within {timeout:?}"),
                    },
                    Err(error) => StopOutcome::Forced {
                        reason: format!("the power button could not be pressed: {error}"),
                    },
                }
            }
        };
        self.destroy(&session, uuid, &domain)?;
        session.events.forget(uuid);
        tracing::info!(domain = uuid, ?outcome, "libvirt domain stopped");
        Ok(outcome)
    }

    fn reboot(&self, runtime: &VmRuntime) -> Result<(), DriverError> {
        let uuid = self.uuid(runtime)?;
        let session = self.session()?;
        let domain = match self.domain(&session, uuid)? {
            Ok(domain) => domain,
            Err(reason) => return Err(DriverError::NotRunning(reason)),
        };
        if let RuntimeState::Exited(reason) = self.state_of(&session, uuid)? {
            return Err(DriverError::NotRunning(reason));
        }
        domain
            .reset()
            .map_err(libvirt_error(format!("resetting domain {uuid}")))?;
        tracing::info!(domain = uuid, "libvirt domain reset");
        Ok(())
    }

    fn state(&self, runtime: &VmRuntime) -> Result<RuntimeState, DriverError> {
        let uuid = self.uuid(runtime)?;
        let session = self.session()?;
        self.state_of(&session, uuid)
    }

    fn adopt(&self, runtime: &VmRuntime) -> Result<RuntimeState, DriverError> {
        let uuid = self.uuid(runtime)?;
        let session = self.session()?;
        let domain = match self.domain(&session, uuid)? {
            Ok(domain) => domain,
            Err(reason) => return Ok(RuntimeState::Exited(reason)),
        };
        let description = match domain.xml_desc(0) {
            Ok(description) => description,
            // It ended between the lookup and now.
            Err(error) if is_no_domain(&error) => {
                return Ok(RuntimeState::Exited(self.ended(&session, uuid)))
            }
            Err(error) => {
                return Err(libvirt_error(format!("reading the XML of domain {uuid}"))(
                    error,
                ))
            }
        };
        self.check_ours(&description, runtime)?;
        let state = self.state_of(&session, uuid)?;
        tracing::info!(domain = uuid, ?state, "libvirt domain adopted");
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

/// A stop of a domain that had already ended: graceful when the guest
/// powered off by itself (as the QEMU driver reports it), else why it ended.
fn outcome_of_ended(reason: ExitReason) -> StopOutcome {
    match reason {
        ExitReason::GuestShutdown => StopOutcome::Graceful,
        other => StopOutcome::AlreadyExited(other),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
