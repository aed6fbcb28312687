//! VMs and their disks.

use std::collections::{BTreeMap, HashSet};

use rusqlite::types::ToSql;
use rusqlite::{named_params, OptionalExtension, Params};

use super::codec::{self, DISK_COLUMNS, VM_COLUMNS};
use super::error::is_unique_violation;
use super::hosts::{found, not_found};
use super::{Entity, Result, SqliteStore, StoreError};
use crate::model::{Attestation, DiskRecord, VmId, VmRecord, VmRuntime, VmSpec, VmState};

/// Which VMs [`Store::list_vms`] returns: those matching every field set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmFilter<'a> {
    /// Only this tenant's (a tenant's listing always sets it).
    pub owner: Option<&'a str>,
    /// Only VMs in this state.
    pub state: Option<VmState>,
    /// Only VMs placed on this host.
    pub host: Option<&'a str>,
}

impl<'a> VmFilter<'a> {
    /// Every VM of the pool (an admin's view).
    pub fn all() -> VmFilter<'a> {
        VmFilter::default()
    }

    /// Every VM of one tenant.
    pub fn owner(owner: &'a str) -> VmFilter<'a> {
        VmFilter {
            owner: Some(owner),
            ..VmFilter::default()
        }
    }
}

impl SqliteStore {
    /// Records a new VM and its disks, in one transaction.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] if its host or its image (`spec.image`, an
    /// image id) is not in the store; [`StoreError::Conflict`] if its id, its
    /// name for that owner, a disk name or a disk path is taken;
    /// [`StoreError::Invalid`] for a disk of another VM, a memory size past
    /// `i64::MAX`, or a path that is not UTF-8; [`StoreError::Constraint`]
    /// for an empty id, owner or name.
    pub fn insert_vm(&self, vm: &VmRecord, disks: &[DiskRecord]) -> Result<()> {
        self.insert_vm_with(None, vm, disks)
    }

    /// Records a new VM as [`SqliteStore::insert_vm`] does, and `request`
    /// (a create's request id, scoped by its caller) as having made it, in
    /// the same transaction.
    ///
    /// # Errors
    ///
    /// As [`SqliteStore::insert_vm`]; [`StoreError::Conflict`] with
    /// [`Entity::Request`] if `request` made a VM already.
    pub fn insert_vm_once(&self, request: &str, vm: &VmRecord, disks: &[DiskRecord]) -> Result<()> {
        self.insert_vm_with(Some(request), vm, disks)
    }

    /// The VM a create with `request` made, if one did.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn vm_for_request(&self, request: &str) -> Result<Option<VmId>> {
        self.connection()
            .prepare_cached("SELECT vm FROM create_request WHERE id = ?1")
            .and_then(|mut statement| {
                statement
                    .query_row([request], |row| row.get::<_, String>(0))
                    .optional()
            })
            .map(|vm| vm.map(VmId))
            .map_err(StoreError::sql("read the create request"))
    }

    fn insert_vm_with(
        &self,
        request: Option<&str>,
        vm: &VmRecord,
        disks: &[DiskRecord],
    ) -> Result<()> {
        let op = "record the VM";
        let spec = codec::json(&vm.spec, "VM spec")?;
        let runtime = vm
            .runtime
            .as_ref()
            .map(|runtime| codec::json(runtime, "VM runtime"))
            .transpose()?;
        let memory_mib = codec::integer(vm.spec.memory_mib, "VM memory")?;
        let (attestation, attestation_reason) = codec::attestation_columns(&vm.attestation);
        let created_at = codec::nanos(vm.created_at, "VM creation time")?;
        let updated_at = codec::nanos(vm.updated_at, "VM update time")?;
        let mut names = HashSet::new();
        let mut disk_rows = Vec::with_capacity(disks.len());
        for disk in disks {
            if disk.vm != vm.id {
                return Err(StoreError::Invalid {
                    field: "disk VM",
                    reason: format!("disk {} is for VM {}, not {}", disk.name, disk.vm, vm.id),
                });
            }
            if !names.insert(disk.name.as_str()) {
                return Err(StoreError::Conflict {
                    entity: Entity::Disk,
                    key: format!("{}/{}", vm.spec.name, disk.name),
                });
            }
            disk_rows.push((
                disk,
                codec::path_text(&disk.path, "disk path")?,
                codec::integer(disk.size_mib, "disk size")?,
            ));
        }

        self.write(op, |transaction| {
            let exists = |sql: &str, key: &str| {
                transaction
                    .prepare_cached(sql)
                    .and_then(|mut statement| statement.exists([key]))
                    .map_err(StoreError::sql(op))
            };
            if let Some(request) = request {
                if exists("SELECT 1 FROM create_request WHERE id = ?1", request)? {
                    return Err(StoreError::Conflict {
                        entity: Entity::Request,
                        key: request.to_owned(),
                    });
                }
            }
            if !exists("SELECT 1 FROM host WHERE name = ?1", &vm.host)? {
                return Err(not_found(Entity::Host, &vm.host));
            }
            if !exists("SELECT 1 FROM image WHERE id = ?1", &vm.spec.image)? {
                return Err(not_found(Entity::Image, &vm.spec.image));
            }
            if exists("SELECT 1 FROM vm WHERE id = ?1", &vm.id.0)? {
                return Err(StoreError::Conflict {
                    entity: Entity::Vm,
                    key: vm.id.0.clone(),
                });
            }
            let name_taken = transaction
                .prepare_cached("SELECT 1 FROM vm WHERE owner = ?1 AND name = ?2")
                .and_then(|mut statement| statement.exists((&vm.owner, &vm.spec.name)))
                .map_err(StoreError::sql(op))?;
            if name_taken {
                return Err(StoreError::Conflict {
                    entity: Entity::Vm,
                    key: format!("{}/{}", vm.owner, vm.spec.name),
                });
            }
            transaction
                .prepare_cached(
                    "INSERT INTO vm (id, owner, name, host, image, state, state_reason, vcpus,
                                     memory_mib, mode, spec, expected_measurement,
                                     launch_digest, attestation, attestation_reason, runtime,
                                     created_at, updated_at)
                     VALUES (:id, :owner, :name, :host, :image, :state, :state_reason, :vcpus,
                             :memory_mib, :mode, :spec, :expected_measurement,
                             :launch_digest, :attestation, :attestation_reason, :runtime,
                             :created_at, :updated_at)",
                )
                .and_then(|mut statement| {
                    statement.execute(named_params! {
                        ":id": vm.id.0,
                        ":owner": vm.owner,
                        ":name": vm.spec.name,
                        ":host": vm.host,
                        ":image": vm.spec.image,
                        ":state": vm.state.as_str(),
                        ":state_reason": vm.state_reason,
                        ":vcpus": vm.spec.vcpus,
                        ":memory_mib": memory_mib,
                        ":mode": vm.spec.mode.to_string(),
                        ":spec": spec,
                        ":expected_measurement": vm.expected_measurement,
                        ":launch_digest": vm.launch_digest,
                        ":attestation": attestation,
                        ":attestation_reason": attestation_reason,
                        ":runtime": runtime,
                        ":created_at": created_at,
                        ":updated_at": updated_at,
                    })
                })
                .map_err(StoreError::sql(op))?;
            let mut insert_disk = transaction
                .prepare_cached(
                    "INSERT INTO disk (vm, name, path, size_mib) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(StoreError::sql(op))?;
            for (disk, path, size_mib) in &disk_rows {
                match insert_disk.execute((&vm.id.0, &disk.name, path, size_mib)) {
                    Ok(_) => {}
                    // The VM is new, so (vm, name) cannot clash: the path does.
                    Err(error) if is_unique_violation(&error) => {
                        return Err(StoreError::Conflict {
                            entity: Entity::Disk,
                            key: (*path).to_owned(),
                        })
                    }
                    Err(error) => return Err(StoreError::sql(op)(error)),
                }
            }
            if let Some(request) = request {
                transaction
                    .prepare_cached("INSERT INTO create_request (id, vm) VALUES (?1, ?2)")
                    .and_then(|mut statement| statement.execute((request, &vm.id.0)))
                    .map_err(StoreError::sql(op))?;
            }
            Ok(())
        })
    }

    /// One VM, by id or else by name.
    ///
    /// With an `owner` (a tenant), only that owner's VMs are seen: another
    /// tenant's VM is [`StoreError::NotFound`], exactly as a missing one.
    /// Without (an admin), any owner's; a name that several owners use is
    /// [`StoreError::Ambiguous`].
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`], [`StoreError::Ambiguous`].
    pub fn get_vm(&self, id_or_name: &str, owner: Option<&str>) -> Result<VmRecord> {
        let op = "read the VM";
        let connection = self.connection();
        let by_id = match owner {
            Some(owner) => connection
                .prepare_cached(&format!(
                    "SELECT {VM_COLUMNS} FROM vm WHERE id = ?1 AND owner = ?2"
                ))
                .and_then(|mut statement| {
                    statement
                        .query_row((id_or_name, owner), codec::vm_from_row)
                        .optional()
                }),
            None => connection
                .prepare_cached(&format!("SELECT {VM_COLUMNS} FROM vm WHERE id = ?1"))
                .and_then(|mut statement| {
                    statement
                        .query_row([id_or_name], codec::vm_from_row)
                        .optional()
                }),
        }
        .map_err(StoreError::sql(op))?;
        if let Some(vm) = by_id {
            return Ok(vm);
        }
        let mut by_name = match owner {
            Some(owner) => connection
                .prepare_cached(&format!(
                    "SELECT {VM_COLUMNS} FROM vm WHERE owner = ?2 AND name = ?1"
                ))
                .and_then(|mut statement| {
                    statement
                        .query_map((id_or_name, owner), codec::vm_from_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()
                }),
            None => connection
                .prepare_cached(&format!(
                    "SELECT {VM_COLUMNS} FROM vm WHERE name = ?1 LIMIT 2"
                ))
                .and_then(|mut statement| {
                    statement
                        .query_map([id_or_name], codec::vm_from_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()
                }),
        }
        .map_err(StoreError::sql(op))?;
        match by_name.len() {
            0 => Err(not_found(Entity::Vm, id_or_name)),
            1 => Ok(by_name.remove(0)),
            _ => Err(StoreError::Ambiguous {
                key: id_or_name.to_owned(),
            }),
        }
    }

    /// The VMs matching `filter`, by owner then name.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`], [`StoreError::Corrupt`].
    pub fn list_vms(&self, filter: VmFilter<'_>) -> Result<Vec<VmRecord>> {
        let state = filter.state.map(VmState::as_str);
        let mut conditions = Vec::new();
        let mut params: Vec<(&str, &dyn ToSql)> = Vec::new();
        if let Some(owner) = &filter.owner {
            conditions.push("owner = :owner");
            params.push((":owner", owner));
        }
        if let Some(state) = &state {
            conditions.push("state = :state");
            params.push((":state", state));
        }
        if let Some(host) = &filter.host {
            conditions.push("host = :host");
            params.push((":host", host));
        }
        let mut sql = format!("SELECT {VM_COLUMNS} FROM vm");
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        sql.push_str(" ORDER BY owner, name");
        self.connection()
            .prepare_cached(&sql)
            .and_then(|mut statement| {
                statement
                    .query_map(params.as_slice(), codec::vm_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(StoreError::sql("list the VMs"))
    }

    /// How many VMs are in each state (states with none left out).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`], [`StoreError::Corrupt`].
    pub fn count_vms_by_state(&self) -> Result<Vec<(VmState, u64)>> {
        self.connection()
            .prepare_cached("SELECT state, count(*) FROM vm GROUP BY state")
            .and_then(|mut statement| {
                statement
                    .query_map([], |row| {
                        let count: i64 = row.get(1)?;
                        Ok((codec::state_at(row, 0)?, u64::try_from(count).unwrap_or(0)))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(StoreError::sql("count the VMs"))
    }

    /// Sets a VM's state and why, and its `updated_at` to now.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`].
    pub fn update_vm_state(&self, id: &VmId, state: VmState, reason: &str) -> Result<()> {
        let updated_at = codec::nanos(codec::now(), "VM update time")?;
        self.update_vm(
            "set the VM state",
            id,
            "UPDATE vm SET state = ?2, state_reason = ?3, updated_at = ?4 WHERE id = ?1",
            (&id.0, state.as_str(), reason, updated_at),
        )
    }

    /// Sets a VM's state as [`Store::update_vm_state`] does, but only if it
    /// is in one of `from`; returns the state it was in. Two tasks racing
    /// (a stop during a start) cannot both win.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`]; [`StoreError::WrongState`] with its
    /// current state if that is not in `from`.
    pub fn transition_vm_state(
        &self,
        id: &VmId,
        from: &[VmState],
        to: VmState,
        reason: &str,
    ) -> Result<VmState> {
        let op = "change the VM state";
        let updated_at = codec::nanos(codec::now(), "VM update time")?;
        self.write(op, |transaction| {
            let current = transaction
                .prepare_cached("SELECT state FROM vm WHERE id = ?1")
                .and_then(|mut statement| {
                    statement
                        .query_row([&id.0], |row| codec::state_at(row, 0))
                        .optional()
                })
                .map_err(StoreError::sql(op))?
                .ok_or_else(|| not_found(Entity::Vm, &id.0))?;
            if !from.contains(&current) {
                return Err(StoreError::WrongState {
                    id: id.clone(),
                    state: current,
                });
            }
            transaction
                .prepare_cached(
                    "UPDATE vm SET state = ?2, state_reason = ?3, updated_at = ?4 WHERE id = ?1",
                )
                .and_then(|mut statement| {
                    statement.execute((&id.0, to.as_str(), reason, updated_at))
                })
                .map_err(StoreError::sql(op))?;
            Ok(current)
        })
    }

    /// Records (or, with `None`, forgets) the VM's running process.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`]; [`StoreError::Encode`] for a path that is
    /// not UTF-8.
    pub fn set_vm_runtime(&self, id: &VmId, runtime: Option<&VmRuntime>) -> Result<()> {
        let runtime = runtime
            .map(|runtime| codec::json(runtime, "VM runtime"))
            .transpose()?;
        self.update_vm(
            "record the VM runtime",
            id,
            "UPDATE vm SET runtime = ?2 WHERE id = ?1",
            (&id.0, runtime),
        )
    }

    /// Replaces the VM's spec (the parts that may change while it is
    /// stopped, such as its owner's ID block).
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`].
    pub fn set_vm_spec(&self, id: &VmId, spec: &VmSpec) -> Result<()> {
        let spec = codec::json(spec, "VM spec")?;
        self.update_vm(
            "record the VM spec",
            id,
            "UPDATE vm SET spec = ?2 WHERE id = ?1",
            (&id.0, spec),
        )
    }

    /// Records the VM's expected launch measurement.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`].
    pub fn set_expected_measurement(&self, id: &VmId, measurement: &[u8]) -> Result<()> {
        self.update_vm(
            "record the expected measurement",
            id,
            "UPDATE vm SET expected_measurement = ?2 WHERE id = ?1",
            (&id.0, measurement),
        )
    }

    /// Records the launch digest of the VM's last start.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`].
    pub fn set_launch_digest(&self, id: &VmId, digest: &[u8]) -> Result<()> {
        self.update_vm(
            "record the launch digest",
            id,
            "UPDATE vm SET launch_digest = ?2 WHERE id = ?1",
            (&id.0, digest),
        )
    }

    /// Records where the VM's attestation stands.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`].
    pub fn set_attestation(&self, id: &VmId, attestation: &Attestation) -> Result<()> {
        let (state, reason) = codec::attestation_columns(attestation);
        self.update_vm(
            "record the attestation",
            id,
            "UPDATE vm SET attestation = ?2, attestation_reason = ?3 WHERE id = ?1",
            (&id.0, state, reason),
        )
    }

    /// Replaces the VM's labels (in its spec), and sets its `updated_at`
    /// to now.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`]; [`StoreError::Encode`] if they cannot be
    /// encoded.
    pub fn set_vm_labels(&self, id: &VmId, labels: &BTreeMap<String, String>) -> Result<()> {
        let labels = codec::json(labels, "VM labels")?;
        let updated_at = codec::nanos(codec::now(), "VM update time")?;
        self.update_vm(
            "record the VM labels",
            id,
            "UPDATE vm SET spec = json_set(spec, '$.labels', json(?2)), updated_at = ?3 \
             WHERE id = ?1",
            (&id.0, labels, updated_at),
        )
    }

    /// Moves the VM to another host (cold migration, restart elsewhere).
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] for the VM or the host.
    pub fn set_vm_host(&self, id: &VmId, host: &str) -> Result<()> {
        let op = "move the VM";
        self.write(op, |transaction| {
            let host_known = transaction
                .prepare_cached("SELECT 1 FROM host WHERE name = ?1")
                .and_then(|mut statement| statement.exists([host]))
                .map_err(StoreError::sql(op))?;
            if !host_known {
                return Err(not_found(Entity::Host, host));
            }
            let changed = transaction
                .prepare_cached("UPDATE vm SET host = ?2 WHERE id = ?1")
                .and_then(|mut statement| statement.execute((&id.0, host)))
                .map_err(StoreError::sql(op))?;
            found(changed, Entity::Vm, &id.0)
        })
    }

    /// Removes a VM and its disks' records (the files are the caller's).
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`].
    pub fn delete_vm(&self, id: &VmId) -> Result<()> {
        // One statement: the disks go with it by ON DELETE CASCADE, in the
        // same implicit transaction.
        self.update_vm("delete the VM", id, "DELETE FROM vm WHERE id = ?1", [&id.0])
    }

    /// A VM's disks, by name (none for an unknown VM).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`], [`StoreError::Corrupt`].
    pub fn disks(&self, vm: &VmId) -> Result<Vec<DiskRecord>> {
        self.connection()
            .prepare_cached(&format!(
                "SELECT {DISK_COLUMNS} FROM disk WHERE vm = ?1 ORDER BY name"
            ))
            .and_then(|mut statement| {
                statement
                    .query_map([&vm.0], codec::disk_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(StoreError::sql("list the disks"))
    }

    /// Runs one statement that changes the VM `id`; `NotFound` if it
    /// changed nothing.
    fn update_vm(&self, op: &'static str, id: &VmId, sql: &str, params: impl Params) -> Result<()> {
        let changed = self
            .connection()
            .prepare_cached(sql)
            .and_then(|mut statement| statement.execute(params))
            .map_err(StoreError::sql(op))?;
        found(changed, Entity::Vm, &id.0)
    }
}
