//! The etcd v3 backend of the pool store.
//!
//! What it owns: the layout of the pool's records under one key prefix
//! ([`keys`]), their JSON encoding, the transactions that keep the same
//! integrity the SQLite schema enforces (uniqueness, references, cascades),
//! and the leader guard: once [`EtcdStore::set_leader_guard`] is given the
//! coordinator's election key, every write carries, in its own
//! transaction, the comparison that this key still exists with the
//! revision it was created at, so a deposed leader's write fails
//! ([`StoreError::NotLeader`]) instead of landing.
//!
//! What it must never do: decide policy, hold key material, or block the
//! caller's async runtime: its methods are synchronous like SQLite's, and
//! run their requests on a runtime of its own.
//!
//! Serialisation: every record write compares and bumps one serial key, so
//! that the reads a write was decided on are still true when it commits
//! (another writer in between makes the comparison fail, and the write is
//! decided again on fresh reads). Events are appended outside the serial
//! (they never conflict) and take the revision etcd gives them as their
//! sequence number.

mod coordinators;
mod keys;
mod records;
#[cfg(test)]
pub(crate) mod test_server;

use std::fmt;
use std::future::Future;
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use super::{Result, StoreConfig, StoreError};
pub(crate) use records::EtcdKv;

/// The election key a coordinator holds while it leads: its writes are
/// valid only while this key exists with this creation revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderGuard {
    /// The key etcd's election API made for this leader.
    pub key: Vec<u8>,
    /// Its creation revision.
    pub revision: i64,
    /// When this leader stops writing on its own, whatever etcd says: its
    /// last lease renewal plus the TTL less the step-down margin (see
    /// `coordinator::election`). `None`: no local limit.
    pub valid_until: Option<std::time::Instant>,
}

impl LeaderGuard {
    /// The guard of a coordinator that does not lead: every write refused.
    pub fn not_leading() -> LeaderGuard {
        LeaderGuard {
            key: Vec::new(),
            revision: 0,
            valid_until: Some(std::time::Instant::now()),
        }
    }
}

/// The etcd backend. See the [module documentation](self).
pub struct EtcdStore {
    runtime: Option<tokio::runtime::Runtime>,
    kv: EtcdKv,
    client: Client,
    endpoints: Vec<String>,
    prefix: String,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to the cluster `config` names (reading its TLS files) and
    /// checks that it answers.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] for a TLS file that cannot be read;
    /// [`StoreError::Unavailable`] if no endpoint answers within
    /// `timeout_ms`.
    pub fn connect(config: &StoreConfig) -> Result<EtcdStore> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("hsev-etcd")
            .enable_all()
            .build()
            .map_err(|error| StoreError::Unavailable {
                op: "start the etcd client",
                reason: error.to_string(),
            })?;
        let timeout = Duration::from_millis(config.timeout_ms);
        let mut member_options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_keep_alive(Duration::from_secs(1), timeout);
        if let Some(tls) = tls_options(config)? {
            member_options = member_options.with_tls(tls);
        }
        let options = member_options.clone().with_require_leader(true);
        // The records' requests are bounded; the election's are not (a
        // campaign waits for as long as another coordinator leads), so it
        // has a client of its own.
        let records_options = options.clone().with_timeout(timeout);
        let endpoints = config.endpoints.clone();
        let connect = async {
            let mut client = Client::connect(&endpoints, Some(records_options))
                .await
                .map_err(records::classify("connect to etcd"))?;
            client
                .status()
                .await
                .map_err(records::classify("connect to etcd"))?;
            let election = Client::connect(&endpoints, Some(options))
                .await
                .map_err(records::classify("connect to etcd"))?;
            let member = Client::connect(&endpoints, Some(member_options.with_timeout(timeout)))
                .await
                .map_err(records::classify("connect to etcd"))?;
            Ok::<_, StoreError>((client, election, member))
        };
        let (client, election, member) = run_on(&runtime, connect)?;
        Ok(EtcdStore {
            kv: EtcdKv::new(client, member, &config.prefix, timeout),
            runtime: Some(runtime),
            client: election,
            endpoints: config.endpoints.clone(),
            prefix: config.prefix.clone(),
        })
    }

    /// A client of the same cluster without a request timeout, for the
    /// election and the leases.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The runtime the client's connections live on, for tasks that use
    /// [`EtcdStore::client`].
    pub fn runtime(&self) -> Option<tokio::runtime::Handle> {
        self.runtime
            .as_ref()
            .map(|runtime| runtime.handle().clone())
    }

    /// The key prefix of this pool's records.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Guards every later write with `guard` (the leader's election key),
    /// or, with `None`, writes unguarded again (a store that no
    /// coordinator leads, such as `hsev pool migrate-store`'s).
    pub fn set_leader_guard(&self, guard: Option<LeaderGuard>) {
        *self
            .kv
            .guard
            .write()
            .unwrap_or_else(PoisonError::into_inner) = guard;
    }

    /// Whether records were written since this process last wrote one:
    /// a coordinator that stopped leading and leads again may trust what it
    /// keeps in memory only if nobody else did.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`].
    pub fn written_by_others(&self) -> Result<bool> {
        self.block(self.kv.written_by_others())
    }

    /// Why reads are answered from one member's copy of the pool, which
    /// may be behind, rather than the quorum's: the cluster has no quorum
    /// now. `None` while the quorum answers.
    pub fn staleness(&self) -> Option<String> {
        self.kv.staleness()
    }

    /// The guard writes carry now.
    pub fn leader_guard(&self) -> Option<LeaderGuard> {
        self.kv.guard()
    }

    pub(super) fn kv(&self) -> &EtcdKv {
        &self.kv
    }

    pub(super) fn description(&self) -> String {
        format!("etcd {} under {}", self.endpoints.join(","), self.prefix)
    }

    /// Runs one of the store's requests to completion.
    pub(super) fn block<T: Send>(
        &self,
        request: impl Future<Output = Result<T>> + Send,
    ) -> Result<T> {
        match &self.runtime {
            Some(runtime) => run_on(runtime, request),
            None => Err(StoreError::Unavailable {
                op: "use the store",
                reason: "the etcd client is shut down".to_owned(),
            }),
        }
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which async code may not do.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Drives `future` on `runtime` from synchronous code, even when called
/// from a task of another runtime (which may not block on one): it then
/// waits on a scoped thread, which is not inside any runtime.
fn run_on<T: Send>(runtime: &tokio::runtime::Runtime, future: impl Future<Output = T> + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return runtime.block_on(future);
    }
    std::thread::scope(
        |scope| match scope.spawn(|| runtime.block_on(future)).join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        },
    )
}

/// The TLS settings of `config`, if it asks for TLS.
fn tls_options(config: &StoreConfig) -> Result<Option<TlsOptions>> {
    let Some(ca) = &config.ca else {
        return Ok(None);
    };
    let read = |field: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|error| StoreError::Invalid {
            field,
            reason: format!("cannot read {}: {error}", path.display()),
        })
    };
    let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read("store.ca", ca)?));
    if let (Some(cert), Some(key)) = (&config.cert, &config.key) {
        tls = tls.identity(Identity::from_pem(
            read("store.cert", cert)?,
            read("store.key", key)?,
        ));
    }
    Ok(Some(tls))
}

impl EtcdKv {
    fn guard(&self) -> Option<LeaderGuard> {
        self.guard
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The guard's lock type (kept here so that [`records`] needs no import).
pub(crate) type GuardCell = RwLock<Option<LeaderGuard>>;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests

    use super::test_server::EtcdServer;
    use super::*;
    use crate::store::{copy_pool, Store, StoreBackend, StoreKind};

    #[test]
    fn a_deposed_leaders_write_fails_and_lands_nowhere() {
        let server = EtcdServer::shared();
        let store = server.store();
        store.init_pool("guarded").unwrap();
        let mut client = store.client();
        let leader_key = format!("{}election/leader-a", store.prefix());
        let revision = store
            .block(async {
                let response = client.put(leader_key.as_str(), "a", None).await.unwrap();
                Ok(response.header().unwrap().revision())
            })
            .unwrap();
        store.set_leader_guard(Some(LeaderGuard {
            key: leader_key.clone().into_bytes(),
            revision,
            valid_until: None,
        }));
        store.upsert_host(&host("h1")).unwrap();
        store.append_event(None, "pool", "led by a").unwrap();

        // Its election key goes (its lease lapsed): it no longer leads.
        store
            .block(async {
                client.delete(leader_key.as_str(), None).await.unwrap();
                Ok(())
            })
            .unwrap();
        assert!(matches!(
            store.upsert_host(&host("h2")),
            Err(StoreError::NotLeader { .. })
        ));
        assert!(matches!(
            store.append_event(None, "pool", "late"),
            Err(StoreError::NotLeader { .. })
        ));
        // Another key of the same name is another leader's, not a revival.
        store
            .block(async {
                client.put(leader_key.as_str(), "b", None).await.unwrap();
                Ok(())
            })
            .unwrap();
        assert!(matches!(
            store.set_host_status("h1", "down"),
            Err(StoreError::NotLeader { .. })
        ));
        store.set_leader_guard(None);
        let hosts = store.list_hosts().unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].status, "up");
        assert_eq!(store.events(None, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_stopped_cluster_is_unavailable_not_an_error_of_the_records() {
        let mut server = EtcdServer::start();
        let store = server.store();
        store.init_pool("p").unwrap();
        server.stop();
        let started = std::time::Instant::now();
        match store.list_hosts() {
            Err(error @ StoreError::Unavailable { .. }) => {
                assert!(
                    error.to_string().contains("etcd cluster is unavailable"),
                    "{error}"
                );
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert!(matches!(
            store.upsert_host(&host("h1")),
            Err(StoreError::Unavailable { .. })
        ));
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }

    #[test]
    fn a_sqlite_pool_moves_to_etcd_without_losing_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = Store::open(dir.path().join("pool.db")).unwrap();
        sqlite.init_pool("lab").unwrap();
        for name in ["h1", "h2"] {
            sqlite.upsert_host(&host(name)).unwrap();
        }
        sqlite
            .insert_image(&crate::store::tests::image("img-1", "debian"))
            .unwrap();
        for n in 0..5 {
            let record =
                crate::store::tests::vm(&format!("vm-{n}"), "alice", &format!("web{n}"), "h1");
            let disk = crate::store::tests::disk(&record, "data");
            sqlite.insert_vm(&record, &[disk]).unwrap();
            sqlite
                .append_event(Some(&record.id), "created", "")
                .unwrap();
        }
        sqlite.revoke_certificate("ab:cd", "h3").unwrap();
        sqlite
            .begin_migration(&crate::model::VmId("vm-0".into()), "h1", "h2", true)
            .unwrap();
        sqlite
            .append_event(None, "pool", "host h3 ejected")
            .unwrap();

        let server = EtcdServer::shared();
        let etcd = Store::from(server.store());
        let report = copy_pool(&sqlite, &etcd).unwrap();
        assert_eq!(
            (
                report.hosts,
                report.images,
                report.vms,
                report.disks,
                report.events
            ),
            (2, 1, 5, 5, 6)
        );
        assert_eq!((report.revoked, report.migrations), (1, 1));
        assert_eq!(etcd.pool_name().unwrap(), "lab");
        assert_eq!(
            etcd.list_vms(crate::store::VmFilter::all()).unwrap(),
            sqlite.list_vms(crate::store::VmFilter::all()).unwrap()
        );
        // A second copy into a store that holds a pool is refused.
        assert!(matches!(
            copy_pool(&sqlite, &etcd),
            Err(StoreError::Conflict { .. })
        ));
        assert!(etcd.describe().starts_with("etcd http://127.0.0.1:"));
        assert_eq!(StoreKind::default(), StoreKind::Sqlite);
    }

    fn host(name: &str) -> crate::model::HostRecord {
        crate::store::tests::host(name)
    }
}
