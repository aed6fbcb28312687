//! The pool row, hosts, and what is placed on each host.

use rusqlite::{named_params, OptionalExtension};
use time::OffsetDateTime;

use super::codec::{self, HOST_COLUMNS};
use super::{Entity, Result, SqliteStore, StoreError};
use crate::model::HostRecord;

/// The pool a database describes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolInfo {
    /// Its name.
    pub name: String,
    /// When it was initialised.
    pub created_at: OffsetDateTime,
}

/// What a set of VMs takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allocation {
    /// How many VMs.
    pub vms: u64,
    /// Their vCPUs.
    pub vcpus: u64,
    /// Their memory in MiB.
    pub memory_mib: u64,
}

/// What is placed on one host, for placement decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAllocation {
    /// The host.
    pub host: String,
    /// Every VM placed on it, whatever its state (their disks live there).
    pub placed: Allocation,
    /// Those that hold, or are about to hold, its CPUs and memory:
    /// `starting`, `running` and `stopping`.
    pub active: Allocation,
}

impl SqliteStore {
    /// Initialises the pool as `name`, or returns it as it is if it already
    /// has that name.
    ///
    /// # Errors
    ///
    /// [`StoreError::Conflict`] (with the existing name) if the database
    /// already holds a pool of another name; [`StoreError::Constraint`] for
    /// an empty name.
    pub fn init_pool(&self, name: &str) -> Result<PoolInfo> {
        let op = "initialise the pool";
        self.write(op, |transaction| {
            match pool_in(transaction) {
                Ok(pool) if pool.name == name => return Ok(pool),
                Ok(pool) => {
                    return Err(StoreError::Conflict {
                        entity: Entity::Pool,
                        key: pool.name,
                    })
                }
                Err(StoreError::NoPool) => {}
                Err(error) => return Err(error),
            }
            let created_at = codec::now();
            transaction
                .execute(
                    "INSERT INTO pool (id, name, created_at) VALUES (1, ?1, ?2)",
                    (name, codec::nanos(created_at, "pool creation time")?),
                )
                .map_err(StoreError::sql(op))?;
            pool_in(transaction)
        })
    }

    /// The pool.
    ///
    /// # Errors
    ///
    /// [`StoreError::NoPool`] before [`Store::init_pool`].
    pub fn pool(&self) -> Result<PoolInfo> {
        pool_in(&self.connection())
    }

    /// The pool's name.
    ///
    /// # Errors
    ///
    /// [`StoreError::NoPool`] before [`Store::init_pool`].
    pub fn pool_name(&self) -> Result<String> {
        self.pool().map(|pool| pool.name)
    }

    /// Adds a host, or replaces its status, capabilities, probe time,
    /// address and certificate.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] if the capabilities are not JSON;
    /// [`StoreError::Constraint`] for an empty name.
    pub fn upsert_host(&self, host: &HostRecord) -> Result<()> {
        let op = "record the host";
        if let Err(error) = serde_json::from_str::<serde::de::IgnoredAny>(&host.capabilities_json) {
            return Err(StoreError::Invalid {
                field: "host capabilities",
                reason: error.to_string(),
            });
        }
        let probed_at = codec::nanos(host.probed_at, "host probe time")?;
        self.connection()
            .prepare_cached(
                "INSERT INTO host (name, status, capabilities, probed_at, address, cert_fingerprint)
                 VALUES (:name, :status, :capabilities, :probed_at, :address, :fingerprint)
                 ON CONFLICT (name) DO UPDATE SET
                     status = excluded.status,
                     capabilities = excluded.capabilities,
                     probed_at = excluded.probed_at,
                     address = excluded.address,
                     cert_fingerprint = excluded.cert_fingerprint",
            )
            .and_then(|mut statement| {
                statement.execute(named_params! {
                    ":name": host.name,
                    ":status": host.status,
                    ":capabilities": host.capabilities_json,
                    ":probed_at": probed_at,
                    ":address": host.address,
                    ":fingerprint": host.cert_fingerprint,
                })
            })
            .map_err(StoreError::sql(op))?;
        Ok(())
    }

    /// Sets a host's status (`up`, `down`), keeping the rest.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`].
    pub fn set_host_status(&self, name: &str, status: &str) -> Result<()> {
        let changed = self
            .connection()
            .prepare_cached("UPDATE host SET status = ?2 WHERE name = ?1")
            .and_then(|mut statement| statement.execute((name, status)))
            .map_err(StoreError::sql("set the host status"))?;
        found(changed, Entity::Host, name)
    }

    /// One host.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`].
    pub fn get_host(&self, name: &str) -> Result<HostRecord> {
        self.connection()
            .prepare_cached(&format!("SELECT {HOST_COLUMNS} FROM host WHERE name = ?1"))
            .and_then(|mut statement| statement.query_row([name], codec::host_from_row).optional())
            .map_err(StoreError::sql("read the host"))?
            .ok_or_else(|| not_found(Entity::Host, name))
    }

    /// Every host, by name.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`], [`StoreError::Corrupt`].
    pub fn list_hosts(&self) -> Result<Vec<HostRecord>> {
        self.connection()
            .prepare_cached(&format!("SELECT {HOST_COLUMNS} FROM host ORDER BY name"))
            .and_then(|mut statement| {
                statement
                    .query_map([], codec::host_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(StoreError::sql("list the hosts"))
    }

    /// Removes a host that no VM is placed on.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`]; [`StoreError::InUse`] while VMs are placed
    /// on it.
    pub fn delete_host(&self, name: &str) -> Result<()> {
        let op = "delete the host";
        self.write(op, |transaction| {
            let users: u64 = transaction
                .query_row("SELECT count(*) FROM vm WHERE host = ?1", [name], |row| {
                    codec::total_at(row, 0)
                })
                .map_err(StoreError::sql(op))?;
            if users > 0 {
                return Err(StoreError::InUse {
                    entity: Entity::Host,
                    key: name.to_owned(),
                    users,
                });
            }
            let changed = transaction
                .execute("DELETE FROM host WHERE name = ?1", [name])
                .map_err(StoreError::sql(op))?;
            found(changed, Entity::Host, name)
        })
    }

    /// What is placed on each host (every host, by name, including those
    /// without VMs), for placement.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`], [`StoreError::Corrupt`].
    pub fn host_allocations(&self) -> Result<Vec<HostAllocation>> {
        // The active states are VmState::{Starting, Running, Stopping}.
        self.connection()
            .prepare_cached(
                "SELECT h.name,
                        count(v.id),
                        coalesce(sum(v.vcpus), 0),
                        coalesce(sum(v.memory_mib), 0),
                        coalesce(sum(v.state IN ('starting', 'running', 'stopping')), 0),
                        coalesce(sum(iif(v.state IN ('starting', 'running', 'stopping'),
                                         v.vcpus, 0)), 0),
                        coalesce(sum(iif(v.state IN ('starting', 'running', 'stopping'),
                                         v.memory_mib, 0)), 0)
                 FROM host AS h LEFT JOIN vm AS v ON v.host = h.name
                 GROUP BY h.name
                 ORDER BY h.name",
            )
            .and_then(|mut statement| {
                statement
                    .query_map([], |row| {
                        Ok(HostAllocation {
                            host: row.get(0)?,
                            placed: Allocation {
                                vms: codec::total_at(row, 1)?,
                                vcpus: codec::total_at(row, 2)?,
                                memory_mib: codec::total_at(row, 3)?,
                            },
                            active: Allocation {
                                vms: codec::total_at(row, 4)?,
                                vcpus: codec::total_at(row, 5)?,
                                memory_mib: codec::total_at(row, 6)?,
                            },
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(StoreError::sql("sum the allocations per host"))
    }
}

/// The pool, through any connection or transaction.
fn pool_in(connection: &rusqlite::Connection) -> Result<PoolInfo> {
    connection
        .query_row(
            "SELECT name, created_at FROM pool WHERE id = 1",
            [],
            |row| {
                Ok(PoolInfo {
                    name: row.get(0)?,
                    created_at: codec::time_at(row, 1)?,
                })
            },
        )
        .optional()
        .map_err(StoreError::sql("read the pool"))?
        .ok_or(StoreError::NoPool)
}

/// `NotFound` unless an UPDATE or DELETE changed a row.
pub(super) fn found(changed: usize, entity: Entity, key: &str) -> Result<()> {
    if changed == 0 {
        Err(not_found(entity, key))
    } else {
        Ok(())
    }
}

/// A [`StoreError::NotFound`].
pub(super) fn not_found(entity: Entity, key: &str) -> StoreError {
    StoreError::NotFound {
        entity,
        key: key.to_owned(),
    }
}
