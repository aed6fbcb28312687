//! The store's one interface, [`StoreBackend`], what chooses a backend
//! ([`StoreConfig`], `[store]` in hsevd.toml), and [`Store`], the handle
//! the coordinator holds whatever the backend.
//!
//! The interface is declared once, in [`store_interface!`], which also
//! writes each backend's side of it: SQLite's methods are synchronous
//! already; etcd's are async and run to completion on the etcd backend's
//! own runtime. Every backend keeps the same promises (the same errors for
//! the same refusals, all-or-nothing multi-record changes, tenant scoping):
//! the store tests run the same cases on both.

use std::fmt;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use time::OffsetDateTime;

use super::etcd::EtcdStore;
use super::{
    HostAllocation, MigrationRecord, PoolInfo, Result, SqliteStore, StoreError, TokenRefusal,
    VmFilter,
};
use crate::model::{
    Attestation, DiskRecord, EventRecord, HostRecord, ImageRecord, VmId, VmRecord, VmRuntime,
    VmSpec, VmState,
};

/// Declares [`StoreBackend`] and implements it for both backends from one
/// list of signatures, so that the two can never drift apart.
macro_rules! store_interface {
    ($($(#[$doc:meta])* fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        /// What every store backend offers. The documentation of each method
        /// is the SQLite backend's (see [`SqliteStore`]); the etcd backend
        /// keeps the same contract.
        pub trait StoreBackend: Send + Sync + fmt::Debug {
            $($(#[$doc])* fn $name(&self $(, $arg: $ty)*) -> $ret;)*

            /// Which backend this is and where its data lives, for logs and
            /// `hsev pool show`.
            fn describe(&self) -> String;

            /// The etcd backend, for leader election and leases.
            fn as_etcd(&self) -> Option<&EtcdStore> {
                None
            }

            /// Why reads may be stale now (see [`EtcdStore::staleness`]);
            /// `None` for a backend whose reads never are.
            fn staleness(&self) -> Option<String> {
                self.as_etcd().and_then(EtcdStore::staleness)
            }
        }

        impl StoreBackend for SqliteStore {
            $(fn $name(&self $(, $arg: $ty)*) -> $ret {
                SqliteStore::$name(self $(, $arg)*)
            })*

            fn describe(&self) -> String {
                format!("SQLite {}", self.path().display())
            }
        }

        impl StoreBackend for EtcdStore {
            $(fn $name(&self $(, $arg: $ty)*) -> $ret {
                self.block(self.kv().$name($($arg),*))
            })*

            fn describe(&self) -> String {
                self.description()
            }

            fn as_etcd(&self) -> Option<&EtcdStore> {
                Some(self)
            }
        }
    };
}

store_interface! {
    /// Initialises the pool, or returns it if it has that name.
    fn init_pool(&self, name: &str) -> Result<PoolInfo>;
    /// The pool.
    fn pool(&self) -> Result<PoolInfo>;
    /// The pool's name.
    fn pool_name(&self) -> Result<String>;
    /// Adds or replaces a host.
    fn upsert_host(&self, host: &HostRecord) -> Result<()>;
    /// Sets a host's status.
    fn set_host_status(&self, name: &str, status: &str) -> Result<()>;
    /// One host.
    fn get_host(&self, name: &str) -> Result<HostRecord>;
    /// Every host, by name.
    fn list_hosts(&self) -> Result<Vec<HostRecord>>;
    /// Removes a host no VM is placed on.
    fn delete_host(&self, name: &str) -> Result<()>;
    /// What is placed on each host.
    fn host_allocations(&self) -> Result<Vec<HostAllocation>>;
    /// Records a join token by its secret's SHA-256.
    fn insert_join_token(&self, secret_sha256: &str, created_by: &str, expires_at: OffsetDateTime) -> Result<()>;
    /// Spends a join token on a host and records the host, atomically.
    fn join_host(&self, secret_sha256: &str, host: &HostRecord, now: OffsetDateTime) -> Result<std::result::Result<(), TokenRefusal>>;
    /// Revokes a certificate.
    fn revoke_certificate(&self, fingerprint: &str, host: &str) -> Result<()>;
    /// Every revoked certificate's fingerprint.
    fn revoked_certificates(&self) -> Result<Vec<String>>;
    /// Records a migration's start.
    fn begin_migration(&self, vm: &VmId, from_host: &str, to_host: &str, restart: bool) -> Result<()>;
    /// The commit point of a migration.
    fn commit_migration(&self, vm: &VmId) -> Result<()>;
    /// Forgets a migration.
    fn end_migration(&self, vm: &VmId) -> Result<()>;
    /// Records that an interrupted migration's VM runs again.
    fn migration_restarted(&self, vm: &VmId) -> Result<()>;
    /// Every migration in flight.
    fn migrations(&self) -> Result<Vec<MigrationRecord>>;
    /// Records an imported image.
    fn insert_image(&self, image: &ImageRecord) -> Result<()>;
    /// One image, by id or name.
    fn get_image(&self, id_or_name: &str) -> Result<ImageRecord>;
    /// Every image, by name.
    fn list_images(&self) -> Result<Vec<ImageRecord>>;
    /// Removes an image no VM uses.
    fn delete_image(&self, id_or_name: &str) -> Result<ImageRecord>;
    /// Appends an event.
    fn append_event(&self, vm: Option<&VmId>, kind: &str, detail: &str) -> Result<EventRecord>;
    /// Appends an event as it was recorded elsewhere (its time kept, a new
    /// sequence number given), when a pool moves between stores.
    fn import_event(&self, event: &EventRecord) -> Result<()>;
    /// The last `limit` events of a VM or of the pool, oldest first.
    fn events(&self, vm: Option<&VmId>, limit: usize) -> Result<Vec<EventRecord>>;
    /// Up to `limit` events after the sequence number `after`.
    fn events_after(&self, after: i64, limit: usize) -> Result<Vec<EventRecord>>;
    /// Records a new VM and its disks, atomically.
    fn insert_vm(&self, vm: &VmRecord, disks: &[DiskRecord]) -> Result<()>;
    /// Records a new VM and the create request that made it, atomically.
    fn insert_vm_once(&self, request: &str, vm: &VmRecord, disks: &[DiskRecord]) -> Result<()>;
    /// The VM a create request made, if one did.
    fn vm_for_request(&self, request: &str) -> Result<Option<VmId>>;
    /// One VM, by id or else by name, scoped to an owner if given.
    fn get_vm(&self, id_or_name: &str, owner: Option<&str>) -> Result<VmRecord>;
    /// The VMs matching a filter, by owner then name.
    fn list_vms(&self, filter: VmFilter<'_>) -> Result<Vec<VmRecord>>;
    /// How many VMs are in each state.
    fn count_vms_by_state(&self) -> Result<Vec<(VmState, u64)>>;
    /// Sets a VM's state and why.
    fn update_vm_state(&self, id: &VmId, state: VmState, reason: &str) -> Result<()>;
    /// Compare-and-set of a VM's state.
    fn transition_vm_state(&self, id: &VmId, from: &[VmState], to: VmState, reason: &str) -> Result<VmState>;
    /// Records or forgets the VM's running process.
    fn set_vm_runtime(&self, id: &VmId, runtime: Option<&VmRuntime>) -> Result<()>;
    /// Replaces the VM's spec.
    fn set_vm_spec(&self, id: &VmId, spec: &VmSpec) -> Result<()>;
    /// Replaces the VM's labels (in its spec).
    fn set_vm_labels(&self, id: &VmId, labels: &std::collections::BTreeMap<String, String>) -> Result<()>;
    /// Records the VM's expected launch measurement.
    fn set_expected_measurement(&self, id: &VmId, measurement: &[u8]) -> Result<()>;
    /// Records the launch digest of the VM's last start.
    fn set_launch_digest(&self, id: &VmId, digest: &[u8]) -> Result<()>;
    /// Records where the VM's attestation stands.
    fn set_attestation(&self, id: &VmId, attestation: &Attestation) -> Result<()>;
    /// Moves the VM to another host.
    fn set_vm_host(&self, id: &VmId, host: &str) -> Result<()>;
    /// Removes a VM and its disks' records.
    fn delete_vm(&self, id: &VmId) -> Result<()>;
    /// A VM's disks, by name.
    fn disks(&self, vm: &VmId) -> Result<Vec<DiskRecord>>;
}

/// Which backend keeps the pool state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// An embedded SQLite database in the state directory.
    #[default]
    Sqlite,
    /// An etcd v3 cluster.
    Etcd,
}

/// `[store]` in hsevd.toml.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite` (default) or `etcd`.
    pub kind: StoreKind,
    /// etcd: the cluster's client URLs (`http://` or, with `ca`, `https://`).
    pub endpoints: Vec<String>,
    /// etcd: the key prefix this pool's records live under.
    pub prefix: String,
    /// etcd: the CA that signed the members' certificates (turns TLS on).
    pub ca: Option<PathBuf>,
    /// etcd: this client's certificate, for clusters that ask for one.
    pub cert: Option<PathBuf>,
    /// etcd: this client's private key.
    pub key: Option<PathBuf>,
    /// etcd: the TTL of the coordinator's election lease and of each host's
    /// liveness lease, in seconds.
    pub lease_ttl_s: u64,
    /// etcd: how long one request may take before the store is declared
    /// unavailable, in milliseconds.
    pub timeout_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Sqlite,
            endpoints: Vec::new(),
            prefix: "/hsev/".to_owned(),
            ca: None,
            cert: None,
            key: None,
            lease_ttl_s: 10,
            timeout_ms: 3000,
        }
    }
}

impl StoreConfig {
    /// An etcd configuration for these endpoints, with the defaults.
    pub fn etcd(endpoints: impl IntoIterator<Item = impl Into<String>>, prefix: &str) -> Self {
        StoreConfig {
            kind: StoreKind::Etcd,
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: prefix.to_owned(),
            ..StoreConfig::default()
        }
    }

    /// Checks the fields the chosen backend uses.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.kind == StoreKind::Sqlite {
            return Ok(());
        }
        let invalid = |field, reason: String| Err(StoreError::Invalid { field, reason });
        if self.endpoints.is_empty() {
            return invalid(
                "store.endpoints",
                "kind = \"etcd\" needs at least one endpoint".to_owned(),
            );
        }
        let scheme = if self.ca.is_some() {
            "https://"
        } else {
            "http://"
        };
        if let Some(bad) = self.endpoints.iter().find(|e| !e.starts_with(scheme)) {
            return invalid(
                "store.endpoints",
                format!(
                    "{bad} does not start with {scheme} ({})",
                    if self.ca.is_some() {
                        "store.ca is set"
                    } else {
                        "set store.ca for TLS"
                    }
                ),
            );
        }
        if self.cert.is_some() != self.key.is_some() {
            return invalid(
                "store.cert",
                "store.cert and store.key go together".to_owned(),
            );
        }
        if self.cert.is_some() && self.ca.is_none() {
            return invalid(
                "store.cert",
                "a client certificate needs store.ca (TLS)".to_owned(),
            );
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            return invalid(
                "store.prefix",
                format!("{:?} must start and end with /", self.prefix),
            );
        }
        if self.lease_ttl_s < 2 {
            return invalid(
                "store.lease_ttl_s",
                format!("{} s is too short: 2 s at least", self.lease_ttl_s),
            );
        }
        if self.timeout_ms == 0 || self.timeout_ms >= self.lease_ttl_s * 1000 {
            return invalid(
                "store.timeout_ms",
                format!(
                    "{} ms must be above 0 and below the lease TTL ({} s)",
                    self.timeout_ms, self.lease_ttl_s
                ),
            );
        }
        Ok(())
    }
}

/// The pool store the coordinator holds: one backend behind
/// [`StoreBackend`]'s methods, which it derefs to.
#[derive(Debug)]
pub struct Store {
    backend: Box<dyn StoreBackend>,
}

impl Store {
    /// Opens the SQLite store at `path` (see [`SqliteStore::open`]).
    ///
    /// # Errors
    ///
    /// As [`SqliteStore::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<Store> {
        Ok(Store::from(SqliteStore::open(path)?))
    }

    /// Opens the store `config` chooses: SQLite at `sqlite_path`, or etcd.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] for a bad configuration; as
    /// [`SqliteStore::open`] or [`EtcdStore::connect`].
    pub fn open_configured(config: &StoreConfig, sqlite_path: &Path) -> Result<Store> {
        config.validate()?;
        match config.kind {
            StoreKind::Sqlite => Store::open(sqlite_path),
            StoreKind::Etcd => Ok(Store::from(EtcdStore::connect(config)?)),
        }
    }
}

impl From<SqliteStore> for Store {
    fn from(backend: SqliteStore) -> Self {
        Store {
            backend: Box::new(backend),
        }
    }
}

impl From<EtcdStore> for Store {
    fn from(backend: EtcdStore) -> Self {
        Store {
            backend: Box::new(backend),
        }
    }
}

impl Deref for Store {
    type Target = dyn StoreBackend;

    fn deref(&self) -> &Self::Target {
        self.backend.as_ref()
    }
}
