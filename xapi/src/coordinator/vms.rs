//! The VM operations of the API, as the coordinator carries them out:
//! create (validate, place, reserve, record, have the host prepare the
//! disks), start, stop, reboot, delete, wait, attest, the owner's ID block,
//! the console. Blocking code: the gRPC layer calls it from
//! `spawn_blocking`, with a progress callback.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hsev_attestation::tenant_attest::{AttestAnswer, NONCE_LEN};
use time::OffsetDateTime;

use super::validate::{self, check_id_block_digest, check_id_block_signatures_and_policy};
use super::{add_load, load_of, lock, remove_load, Coordinator};
use crate::daemon::auth::Caller;
use crate::daemon::error::{Kind, OpError};
use crate::daemon::images;
use crate::hypervisor::StopMode;
use crate::launch::{self, ImageBytes};
use crate::model::{
    check_labels, Attestation, ConfidentialMode, DiskRecord, ImageRecord, OwnerIdBlock, VmId,
    VmRecord, VmSpec, VmState, ENCRYPTED_DISK_NAME,
};
use crate::placement::{Decision, Request};
use crate::pool::{ConsoleChunk, LaunchImage, LaunchRequest, Progress};
use crate::store::VmFilter;

/// The event kind a placement decision is recorded under.
pub const PLACED_EVENT: &str = "placed";

impl Coordinator {
    pub(super) fn lock_vm(&self, vm: &VmId) -> Arc<Mutex<()>> {
        Arc::clone(lock(&self.locks).entry(vm.clone()).or_default())
    }

    /// Runs `operation` holding the VM's lock, on the record read under it:
    /// another operation may have changed the VM before the lock was had.
    pub(super) fn locked<T>(
        &self,
        caller: &Caller,
        vm: &str,
        operation: impl FnOnce(VmRecord) -> Result<T, OpError>,
    ) -> Result<T, OpError> {
        let id = self.get(caller, vm)?.id;
        let guard = self.lock_vm(&id);
        let _held = lock(&guard);
        operation(self.get(caller, &id.0)?)
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

    /// The last placement decision recorded for a VM.
    pub fn placement_explanation(&self, vm: &VmId) -> Option<String> {
        self.store
            .events(Some(vm), 1000)
            .ok()?
            .into_iter()
            .rev()
            .find(|event| event.kind == PLACED_EVENT)
            .map(|event| event.detail)
    }

    /// Where placement would put a VM of `spec` now, and why, without
    /// creating or reserving anything.
    pub fn plan(&self, spec: VmSpec) -> Result<Decision, OpError> {
        let spec = validate::validate(spec, &self.default_vcpu_type)?;
        let allocations = lock(&self.allocations);
        Ok(self.decide(&spec, &allocations, &BTreeSet::new()))
    }

    /// Creates a VM; starts it when asked. With a `request_id`, a create
    /// retried with the same id is applied once: the retry answers the VM
    /// the first attempt made.
    pub fn create(
        &self,
        caller: &Caller,
        spec: VmSpec,
        start: bool,
        request_id: Option<&str>,
        progress: Progress<'_>,
    ) -> Result<VmRecord, OpError> {
        // Scoped by caller: one tenant's ids never find another's VMs.
        let request = request_id.map(|id| format!("{}/{id}", caller.name));
        if let Some(request) = &request {
            if let Some(made) = self.store.vm_for_request(request)? {
                progress("done", "created already by this request", 100);
                return self.get(caller, &made.0);
            }
        }
        progress("validate", "checking the spec", 5);
        let mut spec = validate::validate(spec, &self.default_vcpu_type)?;
        self.check_ha_storage(&spec)?;
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
        let disks = disk_records(&id, &spec);
        let guard = self.lock_vm(&id);
        let _held = lock(&guard);
        // Placement and reservation are one step: under the allocation lock
        // no other create sees the host before this VM is counted on it.
        let (record, decision) = {
            let mut allocations = lock(&self.allocations);
            progress("placement", "choosing a host", 20);
            let decision = self.decide(&spec, &allocations, &BTreeSet::new());
            let Some(host) = decision.chosen.clone() else {
                return Err(OpError::precondition(decision.explain()));
            };
            let now = OffsetDateTime::now_utc();
            let record = VmRecord {
                id: id.clone(),
                owner: caller.name.clone(),
                spec: spec.clone(),
                state: VmState::Creating,
                state_reason: String::new(),
                host: host.clone(),
                expected_measurement,
                launch_digest: Vec::new(),
                attestation: Attestation::initial(spec.mode),
                runtime: None,
                created_at: now,
                updated_at: now,
            };
            self.check_ha_plan(&record, &allocations, false)?;
            match &request {
                Some(request) => self.store.insert_vm_once(request, &record, &disks),
                None => self.store.insert_vm(&record, &disks),
            }?;
            add_load(allocations.entry(host).or_default(), &load_of(&spec));
            (record, decision)
        };
        self.event(&id, PLACED_EVENT, &decision.explain());
        let prepared = self
            .host(&record.host)
            .and_then(|host| host.prepare(&id, &disks, progress));
        if let Err(error) = prepared {
            // Nothing is left behind: no record, no reservation.
            let _ = self.store.delete_vm(&id);
            if let Some(load) = lock(&self.allocations).get_mut(&record.host) {
                remove_load(load, &load_of(&record.spec));
            }
            return Err(error);
        }
        self.store
            .update_vm_state(&id, VmState::Stopped, "created")?;
        self.event(
            &id,
            "created",
            &format!("{} by {} on {}", record.spec.name, caller.name, record.host),
        );
        tracing::info!(vm = %id, name = %record.spec.name, owner = %caller.name, mode = %record.spec.mode, host = %record.host, "created");
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
        if let Some(measurement) = lock(&self.measurements).get(&key).cloned() {
            return Ok(measurement);
        }
        let bytes = ImageBytes::read(&files, &image.cmdline, image.measured_direct_boot)?;
        let measurement = launch::expected_measurement(spec, &bytes)?;
        lock(&self.measurements).insert(key, measurement.clone());
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
            self.start_locked(&record, progress)?;
            progress("done", "running", 100);
            self.get(caller, &record.id.0)
        })
    }

    /// Starts `record` (its lock held).
    pub(super) fn start_locked(
        &self,
        record: &VmRecord,
        progress: Progress<'_>,
    ) -> Result<(), OpError> {
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
        if record.spec.key_broker.is_some() {
            // A new boot attests anew.
            self.store
                .set_attestation(&record.id, &Attestation::Pending)?;
        }
        let request = LaunchRequest {
            vm: record.id.clone(),
            spec: record.spec.clone(),
            image: LaunchImage::from(&self.store.get_image(&record.spec.image)?),
            disks: self.store.disks(&record.id)?,
        };
        let launched = self
            .host(&record.host)
            .and_then(|host| host.launch(&request, progress));
        match launched {
            Ok(launched) => {
                self.metrics
                    .start_seconds
                    .observe(started_at.elapsed().as_secs_f64());
                if let Some(digest) = &launched.launch_digest {
                    self.store.set_launch_digest(&record.id, digest)?;
                }
                self.store
                    .set_vm_runtime(&record.id, Some(&launched.runtime))?;
                self.store
                    .update_vm_state(&record.id, VmState::Running, "running")?;
                self.event(&record.id, "started", &launched.runtime.vmm());
                tracing::info!(vm = %record.id, vmm = %launched.runtime.vmm(), elapsed_ms = started_at.elapsed().as_millis() as u64, "started");
                Ok(())
            }
            Err(error) => {
                self.store
                    .update_vm_state(&record.id, VmState::Failed, &error.message)?;
                self.event(&record.id, "start-failed", &error.message);
                Err(error)
            }
        }
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

    /// Stops `record` (its lock held).
    pub(super) fn stop_locked(
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
        let reason = self
            .host(&record.host)
            .and_then(|host| host.stop(&record.id, &runtime, mode))?;
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
        self.locked(caller, vm, |record| {
            if record.state != VmState::Running {
                return Err(OpError::precondition(format!(
                    "VM {} is {}: only running VMs reboot",
                    record.spec.name, record.state
                )));
            }
            match (&record.runtime, record.spec.mode) {
                (Some(runtime), ConfidentialMode::None) => {
                    progress("reboot", "resetting the guest", 50);
                    self.host(&record.host)
                        .and_then(|host| host.reset(&record.id, runtime))?;
                    self.event(&record.id, "rebooted", "system reset");
                }
                _ => {
                    self.stop_locked(&record, false, Duration::from_secs(30), progress)?;
                    let record = self.get(caller, &record.id.0)?;
                    self.start_locked(&record, progress)?;
                }
            }
            progress("done", "running", 100);
            self.get(caller, &record.id.0)
        })
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
            self.host(&record.host)
                .and_then(|host| host.destroy(&record.id, &disks, wipe, progress))?;
            {
                let mut allocations = lock(&self.allocations);
                self.store.delete_vm(&record.id)?;
                if let Some(load) = allocations.get_mut(&record.host) {
                    remove_load(load, &load_of(&record.spec));
                }
            }
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
    /// answer back: neither the coordinator nor the host makes or judges
    /// the evidence, and the guest binds the nonce so that the relay cannot
    /// choose what it signs ([`hsev_attestation::tenant_attest`]).
    pub fn attest(
        &self,
        caller: &Caller,
        vm: &str,
        nonce: &[u8; NONCE_LEN],
    ) -> Result<serde_json::Value, OpError> {
        let record = self.get(caller, vm)?;
        let runtime = match (&record.runtime, record.state) {
            (Some(runtime), VmState::Running) => runtime.clone(),
            _ => {
                return Err(OpError::precondition(format!(
                    "VM {} is {}: only a running sev-snp guest attests",
                    record.spec.name, record.state
                )))
            }
        };
        let answer = self
            .host(&record.host)
            .and_then(|host| host.attest(&record.id, &runtime, nonce))?;
        self.event(&record.id, "attested", "evidence relayed to its tenant");
        match answer {
            AttestAnswer::Evidence(evidence) => Ok(evidence),
            AttestAnswer::Error(reason) => Err(OpError::precondition(format!(
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

    /// Up to `max` bytes of a VM's console from `offset`, and whether it
    /// may still grow.
    pub fn read_console(
        &self,
        caller: &Caller,
        vm: &str,
        offset: u64,
        max: usize,
    ) -> Result<(ConsoleChunk, bool), OpError> {
        let record = self.get(caller, vm)?;
        let chunk = self
            .host(&record.host)
            .and_then(|host| host.read_console(&record.id, offset, max))?;
        let live = matches!(record.state, VmState::Running | VmState::Starting);
        Ok((chunk, live))
    }
}

/// The files of `spec`'s disks, relative to the VMs' folder of its host.
fn disk_records(id: &VmId, spec: &VmSpec) -> Vec<DiskRecord> {
    let folder = PathBuf::from(&id.0);
    let mut disks: Vec<DiskRecord> = spec
        .disks
        .iter()
        .map(|disk| DiskRecord {
            vm: id.clone(),
            name: disk.name.clone(),
            path: folder.join(format!("disk-{}.qcow2", disk.name)),
            size_mib: disk.size_mib,
        })
        .collect();
    if spec.encrypted_disk_mib > 0 {
        disks.push(DiskRecord {
            vm: id.clone(),
            name: ENCRYPTED_DISK_NAME.to_owned(),
            path: folder.join(format!("disk-{ENCRYPTED_DISK_NAME}.raw")),
            size_mib: spec.encrypted_disk_mib,
        });
    }
    disks
}

/// The placement request of `spec`.
pub(super) fn request_of(spec: &VmSpec, excluded: &BTreeSet<String>) -> Request {
    Request {
        mode: Some(spec.mode),
        debug_policy: validate::allows_debugging(spec),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        minimum_tcb: spec.placement.minimum_tcb,
        labels: spec.placement.labels.iter().cloned().collect(),
        driver: spec.placement.driver.clone(),
        anti_affinity: spec.placement.anti_affinity.clone(),
        affinity: spec.placement.affinity.clone(),
        pinned: spec.placement.host.clone(),
        excluded: excluded.clone(),
    }
}

/// Labels as `key=value` pairs, for the event log.
fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}
