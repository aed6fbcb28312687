//! Cold migration and host evacuation. A VM moves by being stopped, its
//! disks copied to the target (local storage; shared storage moves nothing),
//! and started there as a new launch: a new attestation, and the disk key
//! released to that launch only. SEV and SNP guests cannot live-migrate
//! (upstream SEV has no migration of encrypted memory), so live migration
//! is refused with the reason.
//!
//! A migration is recorded before anything moves; its commit point is one
//! store transaction that gives the VM to the target. Before it the VM is
//! the source's and a failure undoes the copy; after it the VM is the
//! target's and what is left is the source's copy to remove. A coordinator
//! that dies half-way finds the record at start and finishes or undoes it:
//! a VM is never both here and there, and never neither.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{add_load, load_of, lock, remove_load, Coordinator};
use crate::daemon::auth::Caller;
use crate::daemon::error::OpError;
use crate::model::{ConfidentialMode, VmRecord, VmState};
use crate::pool::Progress;

/// Where VMs' disks live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// Each host's own folder: a migration copies the disks.
    #[default]
    Local,
    /// One folder every host mounts at the same path (NFS, CephFS): a
    /// migration moves no data.
    Shared,
}

/// What an evacuation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evacuation {
    /// VMs moved, and where.
    pub moved: Vec<(String, String)>,
    /// VMs that could not move, and why.
    pub stuck: Vec<(String, String)>,
}

impl Coordinator {
    /// Cold-migrates `vm` to `to` (or where placement sends it).
    pub fn migrate(
        &self,
        caller: &Caller,
        vm: &str,
        to: Option<&str>,
        live: bool,
        progress: Progress<'_>,
    ) -> Result<VmRecord, OpError> {
        let record = self.get(caller, vm)?;
        if live {
            return Err(OpError::precondition(
                if record.spec.mode == ConfidentialMode::None {
                    "live migration is not offered: migrate cold (a short stop, the disks moved, \
                 a new start)"
                        .to_owned()
                } else {
                    format!(
                        "VM {} is {}: SEV and SNP guests cannot live-migrate (their memory is \
                     encrypted with a key the host's Secure Processor holds); migrate cold: it \
                     stops, its disks move, and it starts there as a new, attested launch",
                        record.spec.name, record.spec.mode
                    )
                },
            ));
        }
        let guard = self.lock_vm(&record.id);
        let _held = lock(&guard);
        let record = self.get(caller, &record.id.0)?;
        self.migrate_locked(&record, to, progress)?;
        self.get(caller, &record.id.0)
    }

    /// Moves `record` (its lock held).
    fn migrate_locked(
        &self,
        record: &VmRecord,
        to: Option<&str>,
        progress: Progress<'_>,
    ) -> Result<String, OpError> {
        if !matches!(
            record.state,
            VmState::Running | VmState::Stopped | VmState::Failed
        ) {
            return Err(OpError::precondition(format!(
                "VM {} is {}: only running, stopped or failed VMs migrate",
                record.spec.name, record.state
            )));
        }
        let from = record.host.clone();
        if to == Some(from.as_str()) {
            return Err(OpError::invalid(format!(
                "VM {} is already on {from}",
                record.spec.name
            )));
        }
        // Place it elsewhere and reserve the target at once.
        let target = {
            let mut allocations = lock(&self.allocations);

            let mut spec = record.spec.clone();
            if let Some(to) = to {
                spec.placement.host = Some(to.to_owned());
            }
            let decision = self.decide(&spec, &allocations, &BTreeSet::from([from.clone()]));
            let Some(target) = decision.chosen.clone() else {
                return Err(OpError::precondition(format!(
                    "VM {} cannot move: {}",
                    record.spec.name,
                    decision.explain()
                )));
            };
            add_load(
                allocations.entry(target.clone()).or_default(),
                &load_of(&record.spec),
            );
            self.event(&record.id, super::PLACED_EVENT, &decision.explain());
            target
        };
        let release_target = || {
            if let Some(load) = lock(&self.allocations).get_mut(&target) {
                remove_load(load, &load_of(&record.spec));
            }
        };
        progress(
            "migrate",
            &format!("{} from {from} to {target}", record.spec.name),
            5,
        );
        let was_running = record.state == VmState::Running;
        // Recorded before the VM stops: a coordinator that dies from here
        // on finds the record and starts the VM where it ends up.
        if let Err(error) = self
            .store
            .begin_migration(&record.id, &from, &target, was_running)
        {
            release_target();
            return Err(error.into());
        }
        let restart_here = |error: OpError| {
            release_target();
            let _ = self.store.end_migration(&record.id);
            if was_running {
                if let Ok(now) = self.store.get_vm(&record.id.0, None) {
                    if now.state != VmState::Running {
                        let _ = self.start_locked(&now, progress);
                    }
                }
            }
            Err(error)
        };
        if was_running {
            if let Err(error) = self.stop_locked(record, false, Duration::from_secs(30), progress) {
                return restart_here(error);
            }
        }
        let disks = self.store.disks(&record.id)?;
        if self.storage == StorageKind::Local && !disks.is_empty() {
            progress(
                "copy",
                &format!("copying {} disks to {target}", disks.len()),
                20,
            );
            let source_address = self.store.get_host(&from)?.address;
            let source_address = if source_address.is_empty() {
                self.authority()?.address.clone()
            } else {
                source_address
            };
            let copied = self.host(&target).and_then(|host| {
                host.fetch_disks(&record.id, &disks, &from, &source_address, progress)
            });
            if let Err(error) = copied {
                // The partial copy goes; the VM stays where it was.
                if let Ok(host) = self.host(&target) {
                    let _ = host.destroy(&record.id, &disks, false, progress);
                }
                return restart_here(OpError::new(
                    error.kind,
                    format!(
                        "VM {} stays on {from}: copying its disks to {target} failed: {}",
                        record.spec.name, error.message
                    ),
                ));
            }
        }
        // The commit point: from here the VM is the target's.
        self.store.commit_migration(&record.id)?;
        if let Some(load) = lock(&self.allocations).get_mut(&from) {
            remove_load(load, &load_of(&record.spec));
        }
        self.event(
            &record.id,
            "migrated",
            &format!("cold, from {from} to {target}"),
        );
        // Started before the record goes: a coordinator that dies in
        // between still starts it.
        let started = if was_running {
            progress("start", &format!("starting on {target}: a new launch"), 80);
            self.store
                .get_vm(&record.id.0, None)
                .map_err(OpError::from)
                .and_then(|moved| self.start_locked(&moved, progress).map(|_| ()))
        } else {
            Ok(())
        };
        self.finish_moved(&record.id, &from, &disks, progress);
        started?;
        progress("done", &format!("on {target}"), 100);
        Ok(target)
    }

    /// The disks a host removes with the copy of a VM it no longer holds:
    /// none in a shared pool, where the one copy stays with the VM.
    pub(super) fn disks_to_remove<'a>(
        &self,
        disks: &'a [crate::model::DiskRecord],
    ) -> &'a [crate::model::DiskRecord] {
        match self.storage {
            StorageKind::Local => disks,
            StorageKind::Shared => &[],
        }
    }

    /// Removes the source's copy of a moved VM and forgets the migration;
    /// a source that cannot be reached keeps the record for later.
    fn finish_moved(
        &self,
        vm: &crate::model::VmId,
        from: &str,
        disks: &[crate::model::DiskRecord],
        progress: Progress<'_>,
    ) {
        match self
            .host(from)
            .and_then(|host| host.destroy(vm, self.disks_to_remove(disks), false, progress))
        {
            Ok(()) => {
                let _ = self.store.end_migration(vm);
            }
            Err(error) => {
                tracing::warn!(vm = %vm, host = from, %error, "the source's copy stays until it can be removed");
            }
        }
    }

    /// Finishes what migrations a previous coordinator left: an uncommitted
    /// one loses its partial copy (the VM stayed on its source), a committed
    /// one its source's copy; a VM that ran before it left is started where
    /// it now is. A migration whose VM is locked is in flight here and left
    /// alone.
    pub fn resume_migrations(&self) {
        let Ok(migrations) = self.store.migrations() else {
            return;
        };
        for migration in migrations {
            let guard = self.lock_vm(&migration.vm);
            let Ok(_held) = guard.try_lock() else {
                continue;
            };
            self.resolve_migration(&migration);
        }
    }

    /// Resolves one interrupted migration (its VM's lock held): the VM
    /// starts again where it now is if it ran before (at once: its owner
    /// need not wait for the other host), then the copy it no longer needs
    /// goes, whenever that host answers.
    fn resolve_migration(&self, migration: &crate::store::MigrationRecord) {
        let quiet = |_: &str, _: &str, _: u32| {};
        if migration.restart {
            let Ok(vm) = self.store.get_vm(&migration.vm.0, None) else {
                return;
            };
            let started = if vm.state == VmState::Running {
                Ok(())
            } else {
                self.start_locked(&vm, &quiet).map(|_| ())
            };
            match started.and_then(|()| Ok(self.store.migration_restarted(&migration.vm)?)) {
                Ok(()) => self.event(
                    &vm.id,
                    "migration-resolved",
                    &format!(
                        "started again on {} after an interrupted migration",
                        vm.host
                    ),
                ),
                Err(error) => {
                    tracing::info!(vm = %vm.id, host = %vm.host, %error, "an interrupted migration's VM waits to start again");
                }
            }
        }
        let disks = self.store.disks(&migration.vm).unwrap_or_default();
        let (host, what) = if migration.phase == "moved" {
            (migration.from_host.as_str(), "the source's copy")
        } else {
            (migration.to_host.as_str(), "the partial copy")
        };
        let removed = self.host(host).and_then(|client| {
            client.destroy(&migration.vm, self.disks_to_remove(&disks), false, &quiet)
        });
        match removed {
            Ok(()) => {
                let _ = self.store.end_migration(&migration.vm);
                self.event(
                    &migration.vm,
                    "migration-resolved",
                    &format!("{what} on {host} removed after an interrupted migration"),
                );
            }
            Err(error) => {
                tracing::info!(vm = %migration.vm, host, %error, "an interrupted migration's leftover waits for its host");
            }
        }
    }

    /// Puts `host` in maintenance and moves every VM off it; what cannot
    /// move is listed with why, and the host stays in maintenance.
    pub fn enter_maintenance(
        &self,
        host: &str,
        progress: Progress<'_>,
    ) -> Result<Evacuation, OpError> {
        self.set_host_status(host, "maintenance")?;
        let vms = self.store.list_vms(crate::store::VmFilter {
            owner: None,
            state: None,
            host: Some(host),
        })?;
        let mut evacuation = Evacuation::default();
        let total = vms.len().max(1);
        for (index, vm) in vms.into_iter().enumerate() {
            let label = format!("{}/{}", vm.owner, vm.spec.name);
            progress(
                "evacuate",
                &format!("{label} ({} of {total})", index + 1),
                u32::try_from(100 * index / total).unwrap_or(100),
            );
            let guard = self.lock_vm(&vm.id);
            let _held = lock(&guard);
            let outcome = self
                .store
                .get_vm(&vm.id.0, None)
                .map_err(OpError::from)
                .and_then(|now| self.migrate_locked(&now, None, progress));
            match outcome {
                Ok(target) => {
                    progress("evacuate", &format!("{label} moved to {target}"), 0);
                    evacuation.moved.push((label, target));
                }
                Err(error) => {
                    progress("evacuate", &format!("{label} stays: {}", error.message), 0);
                    evacuation.stuck.push((label, error.message));
                }
            }
        }
        Ok(evacuation)
    }
}
