//! The store's error type.

use std::fmt;
use std::path::PathBuf;

use rusqlite::ffi;

use crate::model::{VmId, VmState};

/// What kind of record an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entity {
    /// The pool.
    Pool,
    /// A host.
    Host,
    /// An image.
    Image,
    /// A VM.
    Vm,
    /// A VM's disk.
    Disk,
    /// A join token.
    JoinToken,
    /// A migration in flight.
    Migration,
    /// A create's request id.
    Request,
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Entity::Pool => "pool",
            Entity::Host => "host",
            Entity::Image => "image",
            Entity::Vm => "VM",
            Entity::Disk => "disk",
            Entity::JoinToken => "join token",
            Entity::Migration => "migration",
            Entity::Request => "create request",
        })
    }
}

/// A store operation that failed.
///
/// For the gRPC layer: [`StoreError::NotFound`] and [`StoreError::NoPool`]
/// are `NotFound`; [`StoreError::Conflict`] is `AlreadyExists`;
/// [`StoreError::InUse`], [`StoreError::WrongState`] and
/// [`StoreError::Ambiguous`] are `FailedPrecondition`;
/// [`StoreError::Invalid`] and [`StoreError::Constraint`] are
/// `InvalidArgument`; [`StoreError::Busy`], [`StoreError::Unavailable`],
/// [`StoreError::Unconfirmed`], [`StoreError::NotLeader`] and
/// [`StoreError::Contended`] are `Unavailable` (retry, through the
/// leader); the rest are `Internal`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The linked SQLite library is older than the schema needs.
    #[error("SQLite {found} is too old: the store needs {needed} or newer")]
    SqliteTooOld {
        /// The version linked.
        found: &'static str,
        /// The oldest version that works.
        needed: &'static str,
    },
    /// The state directory could not be created.
    #[error("cannot create the state directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The database file could not be created.
    #[error("cannot create the database {path}")]
    CreateFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// SQLite could not open or configure the database.
    #[error("cannot open the database {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
    /// The database could not be switched to write-ahead logging (a file
    /// system without shared memory or locks, such as some network mounts).
    #[error("the database {path} cannot use a write-ahead log (journal mode stays {mode})")]
    NoWal {
        /// The file.
        path: PathBuf,
        /// The journal mode SQLite kept.
        mode: String,
    },
    /// The database has a schema version this build does not know (written
    /// by a newer `hsevd`, or not a HyperSEV database).
    #[error("the database has schema version {found}; this build knows versions 0 to {known}")]
    UnknownSchema {
        /// The database's `user_version`.
        found: i64,
        /// The newest version this build knows.
        known: u32,
    },
    /// A schema migration failed; the database stays at the version before.
    #[error("cannot migrate the database to schema v{version}")]
    Migrate {
        /// The version being migrated to.
        version: u32,
        /// Why.
        source: rusqlite::Error,
    },
    /// The pool has not been initialised in this database.
    #[error("the pool is not initialised")]
    NoPool,
    /// No such record (or, for a tenant, not one of theirs).
    #[error("{entity} {key} not found")]
    NotFound {
        /// What was looked for.
        entity: Entity,
        /// The id or name looked for.
        key: String,
    },
    /// A record with that id or name already exists.
    #[error("{entity} {key} already exists")]
    Conflict {
        /// The kind of record.
        entity: Entity,
        /// The id or name that is taken.
        key: String,
    },
    /// The record cannot be deleted while VMs use it.
    #[error("{entity} {key} is used by {users} VM(s)")]
    InUse {
        /// The kind of record.
        entity: Entity,
        /// Its id or name.
        key: String,
        /// How many VMs use it.
        users: u64,
    },
    /// An admin looked a VM up by a name that several owners use.
    #[error("several owners have a VM named {key}: use its id")]
    Ambiguous {
        /// The name.
        key: String,
    },
    /// A conditional state change found the VM in another state.
    #[error("VM {id} is {state}")]
    WrongState {
        /// The VM.
        id: VmId,
        /// Its current state.
        state: VmState,
    },
    /// A value the store cannot keep.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A value could not be encoded as JSON.
    #[error("cannot encode {field} as JSON")]
    Encode {
        /// The field.
        field: &'static str,
        /// Why.
        source: serde_json::Error,
    },
    /// The database refused a change that breaks one of its constraints.
    #[error("cannot {op}: a constraint of the database refuses it")]
    Constraint {
        /// The operation.
        op: &'static str,
        /// The constraint that failed.
        source: rusqlite::Error,
    },
    /// A stored value could not be decoded.
    #[error("cannot {op}: the database holds a value this build cannot read")]
    Corrupt {
        /// The operation.
        op: &'static str,
        /// What could not be decoded.
        source: rusqlite::Error,
    },
    /// Another process kept the database locked past the busy timeout.
    #[error("cannot {op}: the database stayed locked")]
    Busy {
        /// The operation.
        op: &'static str,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The etcd cluster refused the request before applying anything (no
    /// endpoint reachable, or no leader): nothing was changed.
    #[error("cannot {op}: the etcd cluster is unavailable ({reason})")]
    Unavailable {
        /// The operation.
        op: &'static str,
        /// What etcd or the transport said.
        reason: String,
    },
    /// A write reached the cluster but was not confirmed in time (the
    /// quorum went away while it was in flight). Raft may still commit it
    /// once a quorum is back, so it is reported as neither done nor undone.
    #[error(
        "cannot confirm that the pool did {op}: the etcd cluster did not answer in time \
         ({reason}); the write may still take effect once a quorum of members is back"
    )]
    Unconfirmed {
        /// The operation.
        op: &'static str,
        /// What etcd or the transport said.
        reason: String,
    },
    /// A write of a coordinator whose leadership ended: it did not land.
    #[error(
        "cannot {op}: this coordinator does not lead the pool now (it could not renew its \
         lease with etcd in time, or another coordinator leads)"
    )]
    NotLeader {
        /// The operation.
        op: &'static str,
    },
    /// Other writers kept changing the records a write was decided on.
    #[error("cannot {op}: the pool kept changing under it ({attempts} attempts)")]
    Contended {
        /// The operation.
        op: &'static str,
        /// How many times it was decided.
        attempts: u32,
    },
    /// etcd refused a request for another reason than availability.
    #[error("cannot {op}: etcd refused it")]
    Etcd {
        /// The operation.
        op: &'static str,
        /// The client's error.
        source: etcd_client::Error,
    },
    /// A value in etcd that this build cannot decode.
    #[error("cannot {op}: etcd holds a value at {key} this build cannot read")]
    Undecodable {
        /// The operation.
        op: &'static str,
        /// The key.
        key: String,
        /// Why.
        source: serde_json::Error,
    },
    /// Any other SQLite failure.
    #[error("cannot {op}")]
    Sqlite {
        /// The operation.
        op: &'static str,
        /// SQLite's error.
        source: rusqlite::Error,
    },
}

impl StoreError {
    /// Classifies a SQLite error raised while doing `op`.
    pub(crate) fn sql(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
        move |source| match &source {
            rusqlite::Error::SqliteFailure(failure, _) => match failure.code {
                ffi::ErrorCode::DatabaseBusy | ffi::ErrorCode::DatabaseLocked => {
                    StoreError::Busy { op, source }
                }
                ffi::ErrorCode::ConstraintViolation => StoreError::Constraint { op, source },
                _ => StoreError::Sqlite { op, source },
            },
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::Utf8Error(..) => StoreError::Corrupt { op, source },
            _ => StoreError::Sqlite { op, source },
        }
    }
}

/// Whether `error` is the violation of a UNIQUE or PRIMARY KEY constraint.
pub(crate) fn is_unique_violation(error: &rusqlite::Error) -> bool {
    matches!(
        error,
        rusqlite::Error::SqliteFailure(failure, _)
            if failure.extended_code == ffi::SQLITE_CONSTRAINT_UNIQUE
                || failure.extended_code == ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}
