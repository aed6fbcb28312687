//! The pool store: the coordinator's durable state (the pool, its hosts,
//! images, VMs with their disks, and the event log), behind one interface
//! ([`StoreBackend`]) with two backends: an embedded SQLite database in the
//! daemon's state directory ([`SqliteStore`], the default: one coordinator,
//! nothing to install) and an etcd v3 cluster ([`EtcdStore`]: the pool
//! survives the loss of a host, and several coordinators can take turns).
//! [`Store`] holds either; callers never see which.
//!
//! What it owns: the schema and its migrations, the integrity of the
//! records (uniqueness, references, cascades), atomic multi-row changes, and
//! tenant scoping of VM look-ups ([`StoreBackend::get_vm`] and [`StoreBackend::list_vms`]
//! with an owner never see another owner's VMs).
//!
//! What it must never do: decide policy (placement, which state changes
//! are allowed, who may act: the services do, the store only offers a
//! compare-and-set [`StoreBackend::transition_vm_state`]), touch anything but its
//! database files, or hold key material (the key broker does).
//!
//! SQLite durability: write-ahead log with `synchronous=FULL`, so a change is on
//! disk when its method returns and survives `kill -9` and power loss.
//! Every change of more than one row runs in one `IMMEDIATE` transaction.
//!
//! Concurrency: a [`SqliteStore`] is `Send + Sync`; share it in an `Arc`. Its
//! methods are synchronous and short (well under a millisecond for one
//! record, a few milliseconds to list a thousand VMs), and serialise on one
//! connection. From async code, call them directly for single records and
//! through `spawn_blocking` for large lists if latency matters. Another
//! process may open the same file: SQLite's locks and the busy timeout
//! serialise them.
//!
//! The schema ([`SCHEMA_VERSION`], `schema_v1.sql` to `schema_v4.sql`) is
//! migrated by SQLite's
//! `user_version`: each entry of the migration list takes the database one
//! version up, inside one transaction with the version bump.

mod backend;
mod codec;
mod error;
pub mod etcd;
mod events;
mod hosts;
mod images;
mod migrate;
mod pool;
mod vms;

#[cfg(test)]
pub(crate) mod tests;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};

pub use backend::{Store, StoreBackend, StoreConfig, StoreKind};
pub use error::{Entity, StoreError};
pub use etcd::{EtcdStore, LeaderGuard};
pub use hosts::{Allocation, HostAllocation, PoolInfo};
pub use migrate::{copy_pool, CopyReport};
pub use pool::{MigrationRecord, TokenRefusal};
pub use vms::VmFilter;

/// The store's result type.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The migrations: entry `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    include_str!("schema_v1.sql"),
    include_str!("schema_v2.sql"),
    include_str!("schema_v3.sql"),
    include_str!("schema_v4.sql"),
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// The oldest SQLite the schema runs on: STRICT tables came in 3.37
/// (`json_valid` is built in since 3.38 and enabled in distribution builds
/// before that). Debian 12 has 3.40, Ubuntu 22.04 3.37.
const SQLITE_OLDEST: (i32, &str) = (3_037_000, "3.37.0");

/// How long a statement waits for another process's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The SQLite backend. See the [module documentation](self).
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    connection: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed, mode 0600) the database at `path`,
    /// switches it to write-ahead logging with full fsync, turns foreign
    /// keys on, and migrates its schema to [`SCHEMA_VERSION`].
    ///
    /// Opening the same file again, in this process or another, is safe:
    /// migrations that already ran are skipped.
    ///
    /// # Errors
    ///
    /// [`StoreError::SqliteTooOld`], [`StoreError::CreateDir`],
    /// [`StoreError::CreateFile`], [`StoreError::Open`],
    /// [`StoreError::NoWal`], [`StoreError::UnknownSchema`] (a newer
    /// build's database), [`StoreError::Migrate`].
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore> {
        let path = path.as_ref();
        if rusqlite::version_number() < SQLITE_OLDEST.0 {
            return Err(StoreError::SqliteTooOld {
                found: rusqlite::version(),
                needed: SQLITE_OLDEST.1,
            });
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|source| StoreError::CreateDir {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        // Create the file private before SQLite does: SQLite gives the
        // write-ahead log and its index the database file's mode.
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|source| StoreError::CreateFile {
                path: path.to_path_buf(),
                source,
            })?;
        let open_error = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut connection = Connection::open(path).map_err(open_error)?;
        connection.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;
        let mode: String = connection
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(open_error)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NoWal {
                path: path.to_path_buf(),
                mode,
            });
        }
        connection
            .pragma_update(None, "synchronous", "FULL")
            .and_then(|()| connection.pragma_update(None, "foreign_keys", "ON"))
            .map_err(open_error)?;
        migrate(&mut connection)?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            connection: Mutex::new(connection),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the database (after [`SqliteStore::open`]:
    /// [`SCHEMA_VERSION`]).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn schema_version(&self) -> Result<i64> {
        self.connection()
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(StoreError::sql("read the schema version"))
    }

    /// The connection, even if a thread panicked while holding it: a
    /// transaction it had open was rolled back when it unwound.
    fn connection(&self) -> MutexGuard<'_, Connection> {
        self.connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `change` in an `IMMEDIATE` transaction (the write lock is taken
    /// at once, so it never fails half-way on a lock upgrade) and commits it
    /// if `change` succeeds; rolls back otherwise.
    fn write<T>(
        &self,
        op: &'static str,
        change: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut connection = self.connection();
        let transaction = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::sql(op))?;
        let value = change(&transaction)?;
        transaction.commit().map_err(StoreError::sql(op))?;
        Ok(value)
    }
}

/// Brings the schema to [`SCHEMA_VERSION`], in one transaction.
fn migrate(connection: &mut Connection) -> Result<()> {
    let op = "migrate the schema";
    let transaction = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(StoreError::sql(op))?;
    let found: i64 = transaction
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(StoreError::sql(op))?;
    let done = usize::try_from(found)
        .ok()
        .filter(|done| *done <= MIGRATIONS.len())
        .ok_or(StoreError::UnknownSchema {
            found,
            known: SCHEMA_VERSION,
        })?;
    for (version, sql) in (1..).zip(MIGRATIONS).skip(done) {
        transaction
            .execute_batch(sql)
            .and_then(|()| transaction.pragma_update(None, "user_version", version))
            .map_err(|source| StoreError::Migrate { version, source })?;
    }
    transaction.commit().map_err(StoreError::sql(op))
}
