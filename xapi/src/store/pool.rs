//! The pool's membership records: single-use join tokens (kept by the
//! SHA-256 of their secret, never the secret), revoked certificates, and
//! cold migrations in flight.

use rusqlite::OptionalExtension;
use time::OffsetDateTime;

use super::codec;
use super::hosts::{found, not_found};
use super::{Entity, Result, SqliteStore, StoreError};
use crate::model::{HostRecord, VmId};

/// Why a join token cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No token has this secret.
    Unknown,
    /// It expired at this time.
    Expired(OffsetDateTime),
    /// This host used it already.
    Used(String),
}

/// A cold migration in flight.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigrationRecord {
    /// The VM.
    pub vm: VmId,
    /// The host it leaves.
    pub from_host: String,
    /// The host it goes to.
    pub to_host: String,
    /// `copying` (still `from_host`'s) or `moved` (`to_host`'s).
    pub phase: String,
    /// Whether the VM ran before it left (it starts where it ends up).
    pub restart: bool,
}

impl SqliteStore {
    /// Records a join token by its secret's SHA-256 (hex).
    ///
    /// # Errors
    ///
    /// [`StoreError::Conflict`] for a secret already recorded.
    pub fn insert_join_token(
        &self,
        secret_sha256: &str,
        created_by: &str,
        expires_at: OffsetDateTime,
    ) -> Result<()> {
        let op = "record the join token";
        self.connection()
            .execute(
                "INSERT INTO join_token (secret_sha256, created_by, expires_at) VALUES (?1, ?2, ?3)",
                (
                    secret_sha256,
                    created_by,
                    codec::nanos(expires_at, "token expiry")?,
                ),
            )
            .map_err(|error| {
                if super::error::is_unique_violation(&error) {
                    StoreError::Conflict {
                        entity: Entity::JoinToken,
                        key: "its secret".to_owned(),
                    }
                } else {
                    StoreError::sql(op)(error)
                }
            })?;
        Ok(())
    }

    /// Spends the token whose secret hashes to `secret_sha256` on `host`,
    /// and records the host, in one transaction: the token is used exactly
    /// when the host joins, never one without the other.
    ///
    /// # Errors
    ///
    /// [`StoreError::Conflict`] for a host name already in the pool (the
    /// token stays unused); [`StoreError::Sqlite`].
    pub fn join_host(
        &self,
        secret_sha256: &str,
        host: &HostRecord,
        now: OffsetDateTime,
    ) -> Result<std::result::Result<(), TokenRefusal>> {
        let op = "join the host";
        self.write(op, |transaction| {
            let row: Option<(i64, String)> = transaction
                .query_row(
                    "SELECT expires_at, used_by FROM join_token WHERE secret_sha256 = ?1",
                    [secret_sha256],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()
                .map_err(StoreError::sql(op))?;
            let Some((expires_at, used_by)) = row else {
                return Ok(Err(TokenRefusal::Unknown));
            };
            if !used_by.is_empty() {
                return Ok(Err(TokenRefusal::Used(used_by)));
            }
            let expires = OffsetDateTime::from_unix_timestamp_nanos(i128::from(expires_at))
                .unwrap_or(OffsetDateTime::UNIX_EPOCH);
            if expires <= now {
                return Ok(Err(TokenRefusal::Expired(expires)));
            }
            let taken: bool = transaction
                .query_row(
                    "SELECT count(*) > 0 FROM host WHERE name = ?1",
                    [&host.name],
                    |row| row.get(0),
                )
                .map_err(StoreError::sql(op))?;
            if taken {
                return Err(StoreError::Conflict {
                    entity: Entity::Host,
                    key: host.name.clone(),
                });
            }
            transaction
                .execute(
                    "INSERT INTO host (name, status, capabilities, probed_at, address, cert_fingerprint)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    (
                        &host.name,
                        &host.status,
                        &host.capabilities_json,
                        codec::nanos(host.probed_at, "host probe time")?,
                        &host.address,
                        &host.cert_fingerprint,
                    ),
                )
                .map_err(StoreError::sql(op))?;
            transaction
                .execute(
                    "UPDATE join_token SET used_by = ?2, used_at = ?3 WHERE secret_sha256 = ?1",
                    (secret_sha256, &host.name, codec::nanos(now, "token use")?),
                )
                .map_err(StoreError::sql(op))?;
            Ok(Ok(()))
        })
    }

    /// Revokes a certificate.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn revoke_certificate(&self, fingerprint: &str, host: &str) -> Result<()> {
        self.connection()
            .execute(
                "INSERT INTO revoked_cert (fingerprint, host, revoked_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (fingerprint) DO NOTHING",
                (
                    fingerprint,
                    host,
                    codec::nanos(codec::now(), "revocation time")?,
                ),
            )
            .map_err(StoreError::sql("revoke the certificate"))?;
        Ok(())
    }

    /// Every revoked certificate's fingerprint.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn revoked_certificates(&self) -> Result<Vec<String>> {
        self.connection()
            .prepare_cached("SELECT fingerprint FROM revoked_cert ORDER BY fingerprint")
            .and_then(|mut statement| {
                statement
                    .query_map([], |row| row.get(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()
            })
            .map_err(StoreError::sql("list the revoked certificates"))
    }

    /// Records a migration's start (phase `copying`).
    ///
    /// # Errors
    ///
    /// [`StoreError::Conflict`] while the VM already migrates.
    pub fn begin_migration(
        &self,
        vm: &VmId,
        from_host: &str,
        to_host: &str,
        restart: bool,
    ) -> Result<()> {
        let op = "record the migration";
        self.connection()
            .execute(
                "INSERT INTO migration (vm, from_host, to_host, phase, restart, started_at)
                 VALUES (?1, ?2, ?3, 'copying', ?4, ?5)",
                (
                    &vm.0,
                    from_host,
                    to_host,
                    restart,
                    codec::nanos(codec::now(), "migration start")?,
                ),
            )
            .map_err(|error| {
                if super::error::is_unique_violation(&error) {
                    StoreError::Conflict {
                        entity: Entity::Migration,
                        key: vm.0.clone(),
                    }
                } else {
                    StoreError::sql(op)(error)
                }
            })?;
        Ok(())
    }

    /// The commit point of a migration: the VM becomes `to_host`'s and the
    /// migration `moved`, in one transaction.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] without a migration of that VM.
    pub fn commit_migration(&self, vm: &VmId) -> Result<()> {
        let op = "commit the migration";
        self.write(op, |transaction| {
            let to_host: Option<String> = transaction
                .query_row(
                    "SELECT to_host FROM migration WHERE vm = ?1 AND phase = 'copying'",
                    [&vm.0],
                    |row| row.get(0),
                )
                .optional()
                .map_err(StoreError::sql(op))?;
            let to_host = to_host.ok_or_else(|| not_found(Entity::Migration, &vm.0))?;
            transaction
                .execute(
                    "UPDATE vm SET host = ?2, updated_at = ?3 WHERE id = ?1",
                    (&vm.0, &to_host, codec::nanos(codec::now(), "VM update")?),
                )
                .map_err(StoreError::sql(op))?;
            let changed = transaction
                .execute(
                    "UPDATE migration SET phase = 'moved' WHERE vm = ?1",
                    [&vm.0],
                )
                .map_err(StoreError::sql(op))?;
            found(changed, Entity::Migration, &vm.0)
        })
    }

    /// Forgets a migration, finished or undone.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn end_migration(&self, vm: &VmId) -> Result<()> {
        self.connection()
            .execute("DELETE FROM migration WHERE vm = ?1", [&vm.0])
            .map_err(StoreError::sql("end the migration"))?;
        Ok(())
    }

    /// Records that an interrupted migration's VM runs again.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn migration_restarted(&self, vm: &VmId) -> Result<()> {
        self.connection()
            .execute("UPDATE migration SET restart = 0 WHERE vm = ?1", [&vm.0])
            .map_err(StoreError::sql("record the VM's restart"))?;
        Ok(())
    }

    /// Every migration in flight.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn migrations(&self) -> Result<Vec<MigrationRecord>> {
        self.connection()
            .prepare_cached(
                "SELECT vm, from_host, to_host, phase, restart FROM migration ORDER BY vm",
            )
            .and_then(|mut statement| {
                statement
                    .query_map([], |row| {
                        Ok(MigrationRecord {
                            vm: VmId(row.get(0)?),
                            from_host: row.get(1)?,
                            to_host: row.get(2)?,
                            phase: row.get(3)?,
                            restart: row.get(4)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(StoreError::sql("list the migrations"))
    }
}
