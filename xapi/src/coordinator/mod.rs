//! The pool coordinator, which one hsevd of the pool runs: it owns the
//! pool's store, the hosts' registry and what is allocated on each, and
//! placement; it serves the `hsev.v1` API's semantics (who may do what, in
//! which state) and turns each call into commands to the host agent that
//! holds the VM ([`crate::pool::HostClient`]); it records what hosts
//! report on their own ([`crate::pool::PoolSink`]).
//!
//! It must never touch a hypervisor, a VM's files or the SEV firmware: only
//! host agents do. What it knows of a running VM is what its host reported.

pub mod election;
pub mod ha;
mod hosts;
mod migration;
mod validate;
mod vms;

pub use hosts::{IssuedToken, JoinTokenContents, Joined, PoolAuthority};
pub use migration::{Evacuation, StorageKind};
pub use vms::PLACED_EVENT;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Instant;

use crate::daemon::error::OpError;
use crate::daemon::host::HostCapabilities;
use crate::daemon::metrics::{Metrics, StateLabels};
use crate::model::{Attestation, ConfidentialMode, HostRecord, VmId, VmSpec, VmState};
use crate::placement::{Candidate, HostLoad, HostState, HostView, PoolPolicy};
use crate::pool::{HostClient, PoolSink, Recovered};
use crate::store::{Store, VmFilter};

pub use validate::validate;

/// What an expected measurement depends on besides the image's bytes:
/// image id, mode, vCPUs, vCPU type.
type MeasurementKey = (String, ConfidentialMode, u32, String);

/// What [`Coordinator::new`] takes.
#[derive(Debug)]
pub struct CoordinatorParts {
    /// The pool's store.
    pub store: Arc<Store>,
    /// Placement settings.
    pub policy: PoolPolicy,
    /// Where VMs' disks live.
    pub storage: StorageKind,
    /// vCPU model when a spec names none.
    pub default_vcpu_type: String,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// The pool coordinator.
pub struct Coordinator {
    store: Arc<Store>,
    policy: PoolPolicy,
    storage: StorageKind,
    default_vcpu_type: String,
    metrics: Arc<Metrics>,
    hosts: RwLock<BTreeMap<String, Arc<dyn HostClient>>>,
    /// What is placed on each host, kept with the store under this lock:
    /// a placement and its reservation happen as one step.
    allocations: Mutex<HashMap<String, HostLoad>>,
    /// Expected measurements already computed: hashing an image's artifacts
    /// once serves every VM alike.
    measurements: Mutex<HashMap<MeasurementKey, Vec<u8>>>,
    /// One lock per VM: lifecycle operations on a VM never overlap.
    locks: Mutex<HashMap<VmId, Arc<Mutex<()>>>>,
    /// What lets hosts join, when this coordinator has a pool listener.
    authority: OnceLock<PoolAuthority>,
    /// When each remote host was last heard from.
    liveness: Mutex<HashMap<String, Instant>>,
    /// Every host as placement sees it, kept beside the store so that a
    /// placement reads no row and parses nothing.
    known: RwLock<BTreeMap<String, KnownHost>>,
    /// When this coordinator started: a host it has not heard from yet
    /// counts as last heard from then.
    started: Instant,
}

/// A host as the coordinator keeps it in memory.
#[derive(Debug, Clone)]
struct KnownHost {
    /// What placement filters on (its state as recorded).
    view: HostView,
    /// Reached over the pool (so it can be down); the coordinator's own
    /// host is not.
    remote: bool,
    /// Declared failed, not back yet.
    failed: bool,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("hosts", &self.hosts().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A VM's share of its host, as placement counts it.
fn load_of(spec: &VmSpec) -> HostLoad {
    let mut load = HostLoad {
        vcpus: u64::from(spec.vcpus),
        memory_mib: spec.memory_mib,
        vms: 1,
        ..HostLoad::default()
    };
    match spec.mode {
        ConfidentialMode::Sev => load.sev_asids = 1,
        ConfidentialMode::SevEs | ConfidentialMode::SevSnp => load.es_snp_asids = 1,
        ConfidentialMode::None => {}
    }
    for group in spec
        .placement
        .anti_affinity
        .iter()
        .chain(&spec.placement.affinity)
    {
        *load.groups.entry(group.clone()).or_default() += 1;
    }
    load
}

fn add_load(total: &mut HostLoad, vm: &HostLoad) {
    total.vcpus += vm.vcpus;
    total.memory_mib += vm.memory_mib;
    total.vms += vm.vms;
    total.sev_asids += vm.sev_asids;
    total.es_snp_asids += vm.es_snp_asids;
    for (group, count) in &vm.groups {
        *total.groups.entry(group.clone()).or_default() += count;
    }
}

fn remove_load(total: &mut HostLoad, vm: &HostLoad) {
    total.vcpus = total.vcpus.saturating_sub(vm.vcpus);
    total.memory_mib = total.memory_mib.saturating_sub(vm.memory_mib);
    total.vms = total.vms.saturating_sub(vm.vms);
    total.sev_asids = total.sev_asids.saturating_sub(vm.sev_asids);
    total.es_snp_asids = total.es_snp_asids.saturating_sub(vm.es_snp_asids);
    for (group, count) in &vm.groups {
        if let Some(held) = total.groups.get_mut(group) {
            *held = held.saturating_sub(*count);
            if *held == 0 {
                total.groups.remove(group);
            }
        }
    }
}

impl Coordinator {
    /// A coordinator over `parts`, its allocations read from the store.
    pub fn new(parts: CoordinatorParts) -> Result<Self, OpError> {
        let coordinator = Coordinator {
            store: parts.store,
            policy: parts.policy,
            storage: parts.storage,
            default_vcpu_type: parts.default_vcpu_type,
            metrics: parts.metrics,
            hosts: RwLock::new(BTreeMap::new()),
            allocations: Mutex::new(HashMap::new()),
            measurements: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            authority: OnceLock::new(),
            liveness: Mutex::new(HashMap::new()),
            known: RwLock::new(BTreeMap::new()),
            started: Instant::now(),
        };
        for record in coordinator.store.list_hosts()? {
            coordinator.remember_host(&record);
        }
        coordinator.recount_allocations()?;
        Ok(coordinator)
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The ASIDs the VMs placed on `host` hold, as placement counts them.
    pub fn asids_held(&self, host: &str) -> u32 {
        lock(&self.allocations)
            .get(host)
            .map_or(0, |load| load.sev_asids + load.es_snp_asids)
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn hosts(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<dyn HostClient>>> {
        self.hosts
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The host agent of `name`.
    fn host(&self, name: &str) -> Result<Arc<dyn HostClient>, OpError> {
        self.hosts().get(name).cloned().ok_or_else(|| {
            OpError::unavailable(format!("host {name} is not connected to the pool"))
        })
    }

    /// Reads every VM's share of its host again.
    fn recount_allocations(&self) -> Result<(), OpError> {
        let mut allocations: HashMap<String, HostLoad> = HashMap::new();
        for vm in self.store.list_vms(VmFilter::all())? {
            add_load(
                allocations.entry(vm.host.clone()).or_default(),
                &load_of(&vm.spec),
            );
        }
        *lock(&self.allocations) = allocations;
        Ok(())
    }

    /// Adds a host agent to the pool: its capabilities are recorded, and
    /// what it runs is reconciled with the store.
    pub fn attach_host(&self, client: Arc<dyn HostClient>) -> Result<(), OpError> {
        let name = client.name().to_owned();
        let capabilities = client.probe()?;
        let status = self
            .store
            .get_host(&name)
            .map(|known| known.status)
            .unwrap_or_else(|_| "up".to_owned());
        self.record_host(&name, &status, &capabilities)?;
        self.hosts
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.clone(), Arc::clone(&client));
        self.reconcile(&name, client.recover()?)?;
        self.update_gauges();
        Ok(())
    }

    /// Records a host's capabilities and status.
    fn record_host(
        &self,
        name: &str,
        status: &str,
        capabilities: &HostCapabilities,
    ) -> Result<(), OpError> {
        // Its address and certificate stay as the join recorded them.
        let (address, cert_fingerprint) = match self.store.get_host(name) {
            Ok(known) => (known.address, known.cert_fingerprint),
            Err(_) => (String::new(), String::new()),
        };
        let record = HostRecord {
            name: name.to_owned(),
            status: status.to_owned(),
            capabilities_json: serde_json::to_string(capabilities)
                .map_err(|error| OpError::internal(error.to_string()))?,
            probed_at: time::OffsetDateTime::now_utc(),
            address,
            cert_fingerprint,
        };
        self.store.upsert_host(&record)?;
        self.remember_host(&record);
        Ok(())
    }

    /// Keeps `record`, as now stored, in memory for placement.
    fn remember_host(&self, record: &HostRecord) {
        self.known
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                record.name.clone(),
                KnownHost {
                    view: host_view(record),
                    remote: !record.address.is_empty(),
                    failed: record.status == ha::FAILED,
                },
            );
    }

    /// Re-reads `name`'s stored record into memory (gone if it is gone).
    fn refresh_host(&self, name: &str) {
        match self.store.get_host(name) {
            Ok(record) => self.remember_host(&record),
            Err(_) => {
                self.known
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(name);
            }
        }
    }

    /// Probes a host again and records what it found.
    pub fn probe_host(&self, name: &str) -> Result<(), OpError> {
        let host = self.host(name)?;
        let capabilities = host.probe()?;
        let status = self.store.get_host(name)?.status;
        self.record_host(name, &status, &capabilities)
    }

    /// Makes the store agree with what `host` found running after its
    /// agent (re)started: adopted VMs run, the others are marked with why.
    fn reconcile(&self, host: &str, recovered: Vec<(VmId, Recovered)>) -> Result<(), OpError> {
        let mut found: HashMap<VmId, Recovered> = recovered.into_iter().collect();
        for record in self.store.list_vms(VmFilter {
            owner: None,
            state: None,
            host: Some(host),
        })? {
            match (found.remove(&record.id), record.state) {
                (Some(Recovered::Running(runtime)), _) => {
                    self.store.set_vm_runtime(&record.id, Some(&runtime))?;
                    if record.state != VmState::Running {
                        self.store
                            .update_vm_state(&record.id, VmState::Running, "adopted")?;
                    }
                    self.event(&record.id, "adopted", &runtime.vmm());
                }
                // Reported again after it was recorded (a fenced VM's folder).
                (Some(Recovered::Gone(_)), VmState::Stopped | VmState::Failed) => {}
                (Some(Recovered::Gone(reason)), _) => self.mark_dead(&record.id, &reason),
                (None, VmState::Running | VmState::Stopping) => self.mark_dead(
                    &record.id,
                    &format!("its VMM is no longer running on {host} after a restart"),
                ),
                (None, VmState::Creating | VmState::Starting | VmState::Deleting) => {
                    self.store.update_vm_state(
                        &record.id,
                        VmState::Failed,
                        "interrupted by a daemon restart",
                    )?;
                }
                (None, VmState::Lost) => self.store.update_vm_state(
                    &record.id,
                    VmState::Failed,
                    &format!("{host} came back without it"),
                )?,
                (None, VmState::Stopped | VmState::Failed) => {}
            }
        }
        for (vm, what) in found {
            self.remove_orphan(host, &vm, what);
        }
        Ok(())
    }

    /// What `host` holds of a VM the pool places elsewhere (restarted there
    /// after `host` failed) goes: its VMM is stopped, its copy removed. A VM
    /// the pool has no record of is left alone and reported.
    fn remove_orphan(&self, host: &str, vm: &VmId, what: Recovered) {
        let record = match self.store.get_vm(&vm.0, None) {
            Ok(record) => record,
            Err(_) => {
                tracing::warn!(vm = %vm, host, "a VM the pool does not know runs on this host");
                return;
            }
        };
        let Ok(client) = self.host(host) else {
            return;
        };
        let progress = |_: &str, _: &str, _: u32| {};
        if let Recovered::Running(runtime) = &what {
            if let Err(error) = client.stop(vm, runtime, crate::hypervisor::StopMode::Force) {
                tracing::error!(vm = %vm, host, %error, "cannot stop an orphan VMM");
                return;
            }
        }
        let disks = self.store.disks(vm).unwrap_or_default();
        let removed = client.destroy(vm, self.disks_to_remove(&disks), false, &progress);
        let detail = match (&what, &removed) {
            (_, Err(error)) => format!("{host}'s old copy could not be removed: {}", error.message),
            (Recovered::Running(runtime), Ok(())) => format!(
                "{host} came back still running an old instance ({}): stopped and removed; the \
                 VM is on {}",
                runtime.vmm(),
                record.host
            ),
            (Recovered::Gone(_), Ok(())) => format!(
                "{host} came back: its old copy removed; the VM is on {}",
                record.host
            ),
        };
        self.event(vm, "orphan-removed", &detail);
        tracing::info!(vm = %vm, host, "{detail}");
    }

    /// Records that a VM's VMM is gone.
    fn mark_dead(&self, vm: &VmId, reason: &str) {
        self.metrics.vm_crashes.inc();
        let result = self
            .store
            .set_vm_runtime(vm, None)
            .and_then(|()| self.store.update_vm_state(vm, VmState::Failed, reason));
        if let Err(error) = result {
            tracing::error!(vm = %vm, %error, "cannot record a dead VM");
        }
        self.event(vm, "died", reason);
        tracing::warn!(vm = %vm, reason, "VM died");
    }

    fn event(&self, vm: &VmId, kind: &str, detail: &str) {
        if let Err(error) = self.store.append_event(Some(vm), kind, detail) {
            tracing::warn!(vm = %vm, %error, "cannot record an event");
        }
    }

    /// Refreshes the per-state VM gauges from the store.
    pub fn update_gauges(&self) {
        let Ok(counts) = self.store.count_vms_by_state() else {
            return;
        };
        for state in VmState::ALL {
            let count = counts
                .iter()
                .find(|(counted, _)| *counted == state)
                .map_or(0, |(_, count)| *count);
            self.metrics
                .vms
                .get_or_create(&StateLabels {
                    state: state.as_str().to_owned(),
                })
                .set(count as i64);
        }
    }

    /// Places `spec` on the hosts as now known, with their loads from
    /// `allocations` (the caller holds the allocation lock when it
    /// reserves), leaving out `excluded`. Reads no store row and copies no
    /// host.
    fn decide(
        &self,
        spec: &VmSpec,
        allocations: &HashMap<String, HostLoad>,
        excluded: &BTreeSet<String>,
    ) -> crate::placement::Decision {
        let known = self
            .known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let connected = self.hosts();
        let liveness = lock(&self.liveness);
        let down_after = self.down_after();
        let idle = HostLoad::default();
        // A host this coordinator has no client for (another coordinator's
        // own host, on a shared store) cannot be commanded: down. Both maps
        // are ordered by name, so one pass over each finds which are
        // connected: the cost stays linear in the host count.
        let mut clients = connected.keys().peekable();
        let candidates: Vec<Candidate<'_>> = known
            .iter()
            .map(|(name, host)| {
                while clients.next_if(|client| *client < name).is_some() {}
                let has_client = clients.next_if_eq(&name).is_some();
                Candidate {
                    host: &host.view,
                    load: allocations.get(name).unwrap_or(&idle),
                    down: !has_client
                        || (host.remote
                            && liveness
                                .get(name)
                                .is_none_or(|last| last.elapsed() > down_after)),
                }
            })
            .collect();
        crate::placement::place(&vms::request_of(spec, excluded), &candidates, &self.policy)
    }

    /// Whether any host's Secure Processor is simulated.
    pub fn simulated_firmware(&self, host: &str) -> bool {
        self.store
            .get_host(host)
            .ok()
            .and_then(|record| {
                serde_json::from_str::<HostCapabilities>(&record.capabilities_json).ok()
            })
            .is_some_and(|capabilities| capabilities.sev.simulated)
    }
}

/// A stored host as placement sees it.
fn host_view(record: &HostRecord) -> HostView {
    let capabilities: Option<HostCapabilities> =
        serde_json::from_str(&record.capabilities_json).ok();
    let state = match record.status.as_str() {
        "up" => HostState::Up,
        "disabled" => HostState::Disabled,
        "maintenance" => HostState::Maintenance,
        _ => HostState::Down,
    };
    match capabilities {
        Some(capabilities) => HostView {
            name: record.name.clone(),
            state,
            labels: capabilities.labels.iter().cloned().collect::<BTreeSet<_>>(),
            driver: capabilities.driver.clone(),
            cpus: capabilities.cpus,
            memory_mib: capabilities.memory_mib,
            sev: capabilities.sev.sev,
            sev_es: capabilities.sev.sev_es,
            snp: capabilities.sev.snp,
            simulated: capabilities.sev.simulated,
            sev_asids: capabilities.sev.sev_asids,
            es_snp_asids: capabilities.sev.es_snp_asids,
            tcb: capabilities.sev.tcb,
            debug_policy_allowed: capabilities.debug_policy_allowed,
            shared_dir: capabilities.shared_dir.clone(),
        },
        // A host whose capabilities cannot be read takes nothing.
        None => HostView {
            name: record.name.clone(),
            state: HostState::Down,
            labels: BTreeSet::new(),
            driver: String::new(),
            cpus: 0,
            memory_mib: 0,
            sev: false,
            sev_es: false,
            snp: false,
            simulated: false,
            sev_asids: 0,
            es_snp_asids: 0,
            tcb: None,
            debug_policy_allowed: false,
            shared_dir: None,
        },
    }
}

impl PoolSink for Coordinator {
    fn vm_exited(&self, vm: &VmId, clean: bool, reason: &str) {
        if !clean {
            self.mark_dead(vm, reason);
            return;
        }
        let result = self
            .store
            .set_vm_runtime(vm, None)
            .and_then(|()| self.store.update_vm_state(vm, VmState::Stopped, reason));
        if let Err(error) = result {
            tracing::error!(vm = %vm, %error, "cannot record a stopped VM");
        }
        self.event(vm, "stopped", reason);
    }

    fn attestation(&self, vm: &VmId, attestation: &Attestation) {
        if let Err(error) = self.store.set_attestation(vm, attestation) {
            tracing::warn!(vm = %vm, %error, "cannot record the attestation state");
        }
    }

    fn event(&self, vm: &VmId, kind: &str, detail: &str) {
        Coordinator::event(self, vm, kind, detail);
    }
}
