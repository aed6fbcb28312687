//! The store's operations on etcd: reads, and writes decided on reads and
//! committed in one transaction that compares the serial key (and the
//! leader guard) first. See the [backend's documentation](super).

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, GetResponse, KeyValue, KvClient, SortOrder, SortTarget,
    Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::keys::Keys;
use super::{GuardCell, LeaderGuard};
use crate::model::{
    Attestation, DiskRecord, EventRecord, HostRecord, ImageRecord, VmId, VmRecord, VmRuntime,
    VmSpec, VmState,
};
use crate::store::{
    Allocation, Entity, HostAllocation, MigrationRecord, PoolInfo, Result, StoreError,
    TokenRefusal, VmFilter,
};

/// How many times a write is decided again after another writer changed
/// the pool under it, before it gives up.
const WRITE_ATTEMPTS: u32 = 50;

/// A write's plan: what to do, and what to return once it is done.
type Plan<T> = (Vec<TxnOp>, T);

/// A future a write's planner returns.
type Planned<'a, T> = Pin<Box<dyn Future<Output = Result<Plan<T>>> + Send + 'a>>;

/// A VM as etcd keeps it: the record and its disks, in one value, so that
/// they change together.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmDoc {
    vm: VmRecord,
    disks: Vec<DiskRecord>,
    /// The request id of the create that made it, if it had one.
    #[serde(default)]
    request: Option<String>,
}

/// A join token.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenDoc {
    created_by: String,
    expires_at: OffsetDateTime,
    used_by: String,
    used_at: Option<OffsetDateTime>,
}

/// A revoked certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RevokedDoc {
    host: String,
    revoked_at: OffsetDateTime,
}

/// An event (its sequence number is its key's create revision).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EventDoc {
    vm: Option<VmId>,
    kind: String,
    detail: String,
    at: OffsetDateTime,
}

/// What etcd or the transport said, for an error that comes from the
/// cluster's availability (rather than from the request itself).
fn availability_reason(error: &etcd_client::Error) -> Option<String> {
    match error {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            Some(error.to_string())
        }
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
        )
        .then(|| status.message().to_owned()),
        _ => None,
    }
}

/// Turns the error of a read (or of connecting) into the store's: what
/// cannot reach a quorum in time is [`StoreError::Unavailable`].
pub(crate) fn classify(op: &'static str) -> impl FnOnce(etcd_client::Error) -> StoreError {
    move |source| match availability_reason(&source) {
        Some(reason) => StoreError::Unavailable { op, reason },
        None => StoreError::Etcd { op, source },
    }
}

/// Turns the error of a write into the store's. Only a write etcd refused
/// before proposing it is [`StoreError::Unavailable`] (nothing changed);
/// one that reached a leader which then lost its quorum may still be
/// committed by raft later, so it is [`StoreError::Unconfirmed`].
fn classify_write(op: &'static str) -> impl FnOnce(etcd_client::Error) -> StoreError {
    move |source| match availability_reason(&source) {
        Some(reason) if never_sent(&source) || no_leader(&source) => {
            StoreError::Unavailable { op, reason }
        }
        Some(reason) => StoreError::Unconfirmed { op, reason },
        None => StoreError::Etcd { op, source },
    }
}

/// Whether the request failed before reaching any member (it may be sent
/// again without being applied twice).
fn never_sent(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::Unavailable
                && (status.message().contains("connect") || status.message() == "transport error")
        }
        _ => false,
    }
}

/// Whether the member refused the request because it knows no leader (the
/// client requires one): it proposed nothing.
fn no_leader(error: &etcd_client::Error) -> bool {
    matches!(
        error,
        etcd_client::Error::GRpcStatus(status)
            if status.code() == tonic::Code::Unavailable
                && status.message() == "etcdserver: no leader"
    )
}

fn encode<T: Serialize>(value: &T, field: &'static str) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode { field, source })
}

fn decode<T: DeserializeOwned>(op: &'static str, kv: &KeyValue) -> Result<T> {
    serde_json::from_slice(kv.value()).map_err(|source| StoreError::Undecodable {
        op,
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        source,
    })
}

fn not_found(entity: Entity, key: &str) -> StoreError {
    StoreError::NotFound {
        entity,
        key: key.to_owned(),
    }
}

fn required(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(StoreError::Invalid {
            field,
            reason: "it is empty".to_owned(),
        });
    }
    if value.contains('\0') {
        return Err(StoreError::Invalid {
            field,
            reason: "it contains a NUL character".to_owned(),
        });
    }
    Ok(())
}

fn put(key: String, value: Vec<u8>) -> TxnOp {
    TxnOp::put(key, value, None)
}

fn delete(key: String) -> TxnOp {
    TxnOp::delete(key, None)
}

tokio::task_local! {
    /// Set while a write decides what to do: its reads must be the
    /// quorum's, never a member's possibly stale copy.
    static DECIDING: ();
}

/// The etcd side of the store's operations.
pub(crate) struct EtcdKv {
    client: Client,
    /// A client that does not require a leader, for the reads answered
    /// from one member's copy when the cluster has no quorum.
    member_client: Client,
    /// Why reads are answered from one member's copy now: set when a
    /// quorum read fails for availability and a member answers instead;
    /// cleared by the next request the quorum answers.
    stale: std::sync::Mutex<Option<String>>,
    /// How long a request may keep failing to reach any member.
    timeout: Duration,
    keys: Keys,
    /// The serial key's last known revision; held for the whole of a write
    /// so that this process's writes never race each other.
    serial: tokio::sync::Mutex<i64>,
    pub(super) guard: GuardCell,
}

impl EtcdKv {
    pub(super) fn new(
        client: Client,
        member_client: Client,
        prefix: &str,
        timeout: Duration,
    ) -> EtcdKv {
        EtcdKv {
            client,
            member_client,
            stale: std::sync::Mutex::new(None),
            timeout,
            keys: Keys::new(prefix),
            serial: tokio::sync::Mutex::new(0),
            guard: GuardCell::new(None),
        }
    }

    // ---- requests ------------------------------------------------------

    /// Sends `request`, again to the next member while it reaches none (a
    /// dead member's endpoint refuses the connection: the request was not
    /// sent, so sending it again cannot apply it twice), for at most the
    /// configured timeout.
    async fn call<T, F, Fut>(
        &self,
        client: &Client,
        request: F,
    ) -> std::result::Result<T, etcd_client::Error>
    where
        F: Fn(KvClient) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let start = Instant::now();
        loop {
            match request(client.kv_client()).await {
                Err(error) if never_sent(&error) && start.elapsed() < self.timeout => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                result => return result,
            }
        }
    }

    async fn txn(&self, op: &'static str, txn: Txn) -> Result<TxnResponse> {
        let response = self
            .call(&self.client, |mut kv| {
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            })
            .await
            .map_err(classify_write(op))?;
        self.set_stale(None);
        Ok(response)
    }

    /// A read the quorum answers; when it cannot (no quorum, no leader)
    /// and no write is deciding on it, one member's own copy, which may be
    /// behind: [`EtcdKv::staleness`] then says so until the quorum answers
    /// again.
    async fn get_with(
        &self,
        op: &'static str,
        key: &str,
        options: Option<GetOptions>,
    ) -> Result<GetResponse> {
        let error = match self
            .get_on(&self.client, key, options.clone())
            .await
            .map_err(classify(op))
        {
            Ok(response) => {
                self.set_stale(None);
                return Ok(response);
            }
            Err(error) => error,
        };
        let StoreError::Unavailable { reason, .. } = &error else {
            return Err(error);
        };
        if DECIDING.try_with(|()| ()).is_ok() {
            return Err(error);
        }
        let serializable = options.unwrap_or_default().with_serializable();
        match self
            .get_on(&self.member_client, key, Some(serializable))
            .await
        {
            Ok(response) => {
                self.set_stale(Some(reason.clone()));
                Ok(response)
            }
            Err(_) => Err(error),
        }
    }

    async fn get_on(
        &self,
        client: &Client,
        key: &str,
        options: Option<GetOptions>,
    ) -> std::result::Result<GetResponse, etcd_client::Error> {
        self.call(client, |mut kv| {
            let options = options.clone();
            async move { kv.get(key, options).await }
        })
        .await
    }

    fn set_stale(&self, reason: Option<String>) {
        *self
            .stale
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = reason;
    }

    /// Why the last reads came from one member's copy rather than the
    /// quorum's, while they do.
    pub(crate) fn staleness(&self) -> Option<String> {
        self.stale
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    // ---- reads ---------------------------------------------------------

    async fn get_kv(&self, op: &'static str, key: &str) -> Result<Option<KeyValue>> {
        let mut response = self.get_with(op, key, None).await?;
        Ok(response.take_kvs().into_iter().next())
    }

    async fn get<T: DeserializeOwned>(&self, op: &'static str, key: &str) -> Result<Option<T>> {
        self.get_kv(op, key)
            .await?
            .map(|kv| decode(op, &kv))
            .transpose()
    }

    async fn exists(&self, op: &'static str, key: &str) -> Result<bool> {
        let response = self
            .get_with(op, key, Some(GetOptions::new().with_count_only()))
            .await?;
        Ok(response.count() > 0)
    }

    async fn range(
        &self,
        op: &'static str,
        prefix: &str,
        options: GetOptions,
    ) -> Result<Vec<KeyValue>> {
        let mut response = self
            .get_with(op, prefix, Some(options.with_prefix()))
            .await?;
        Ok(response.take_kvs())
    }

    async fn list<T: DeserializeOwned>(&self, op: &'static str, prefix: &str) -> Result<Vec<T>> {
        self.range(op, prefix, GetOptions::new())
            .await?
            .iter()
            .map(|kv| decode(op, kv))
            .collect()
    }

    async fn all_vms(&self, op: &'static str) -> Result<Vec<VmDoc>> {
        self.list(op, &self.keys.vms()).await
    }

    // ---- writes --------------------------------------------------------

    /// Decides a write with `plan` and commits it, deciding again on fresh
    /// reads while other writers change the pool under it. A plan with no
    /// operation returns its value without a transaction.
    async fn write<'a, T: Send + 'a>(
        &'a self,
        op: &'static str,
        mut plan: impl FnMut() -> Planned<'a, T> + Send + 'a,
    ) -> Result<T> {
        let mut serial = self.serial.lock().await;
        for _ in 0..WRITE_ATTEMPTS {
            let (operations, value) = DECIDING.scope((), plan()).await?;
            if operations.is_empty() {
                return Ok(value);
            }
            if self.commit(op, &mut serial, operations).await? {
                return Ok(value);
            }
        }
        Err(StoreError::Contended {
            op,
            attempts: WRITE_ATTEMPTS,
        })
    }

    /// Whether a record was written since this process's last write (the
    /// serial key moved on): another coordinator led in between.
    pub(crate) async fn written_by_others(&self) -> Result<bool> {
        let known = *self.serial.lock().await;
        let now = self
            .get_kv("read the serial key", &self.keys.serial())
            .await?
            .map_or(0, |kv| kv.mod_revision());
        Ok(now != known)
    }

    /// One transaction: `operations` and a bump of the serial key, if the
    /// serial key is still at `serial` and the leader guard holds. Returns
    /// whether it committed; on a stale serial, `serial` is refreshed.
    async fn commit(
        &self,
        op: &'static str,
        serial: &mut i64,
        mut operations: Vec<TxnOp>,
    ) -> Result<bool> {
        let serial_key = self.keys.serial();
        let guard = self.guard();
        refuse_if_expired(op, guard.as_ref())?;
        let mut compares = vec![Compare::mod_revision(
            serial_key.clone(),
            CompareOp::Equal,
            *serial,
        )];
        let mut otherwise = vec![TxnOp::get(serial_key.clone(), None)];
        if let Some(guard) = &guard {
            compares.push(guard_compare(guard));
            otherwise.push(TxnOp::get(guard.key.clone(), None));
        }
        operations.push(put(serial_key, Vec::new()));
        let response = self
            .txn(
                op,
                Txn::new()
                    .when(compares)
                    .and_then(operations)
                    .or_else(otherwise),
            )
            .await?;
        if response.succeeded() {
            *serial = response.header().map_or(0, |header| header.revision());
            return Ok(true);
        }
        let mut answers = response.op_responses().into_iter();
        if let Some(TxnOpResponse::Get(found)) = answers.next() {
            *serial = found.kvs().first().map_or(0, KeyValue::mod_revision);
        }
        if let Some(guard) = &guard {
            let holds = matches!(
                answers.next(),
                Some(TxnOpResponse::Get(found))
                    if found.kvs().first().map(KeyValue::create_revision) == Some(guard.revision)
            );
            if !holds {
                return Err(StoreError::NotLeader { op });
            }
        }
        Ok(false)
    }

    /// A transaction outside the serial (events), still under the guard.
    async fn commit_unserialised(&self, op: &'static str, operations: Vec<TxnOp>) -> Result<i64> {
        let guard = self.guard();
        refuse_if_expired(op, guard.as_ref())?;
        let compares: Vec<Compare> = guard.iter().map(guard_compare).collect();
        let txn = Txn::new().when(compares).and_then(operations);
        let response = self.txn(op, txn).await?;
        if !response.succeeded() {
            return Err(StoreError::NotLeader { op });
        }
        Ok(response.header().map_or(0, |header| header.revision()))
    }

    /// Changes one VM's document with `change`.
    async fn update_vm<T: Send>(
        &self,
        op: &'static str,
        id: &VmId,
        change: impl Fn(&mut VmDoc) -> Result<T> + Send + Sync,
    ) -> Result<T> {
        let change = &change;
        self.write(op, move || {
            Box::pin(async move {
                let key = self.keys.vm(&id.0);
                let mut doc: VmDoc = self
                    .get(op, &key)
                    .await?
                    .ok_or_else(|| not_found(Entity::Vm, &id.0))?;
                let value = change(&mut doc)?;
                Ok((vec![put(key, encode(&doc, "VM")?)], value))
            })
        })
        .await
    }

    // ---- the pool and its hosts ----------------------------------------

    pub(crate) async fn init_pool(&self, name: &str) -> Result<PoolInfo> {
        let op = "initialise the pool";
        required("pool name", name)?;
        self.write(op, move || {
            Box::pin(async move {
                match self.get::<PoolInfo>(op, &self.keys.pool()).await? {
                    Some(pool) if pool.name == name => Ok((Vec::new(), pool)),
                    Some(pool) => Err(StoreError::Conflict {
                        entity: Entity::Pool,
                        key: pool.name,
                    }),
                    None => {
                        let pool = PoolInfo {
                            name: name.to_owned(),
                            created_at: OffsetDateTime::now_utc(),
                        };
                        Ok((vec![put(self.keys.pool(), encode(&pool, "pool")?)], pool))
                    }
                }
            })
        })
        .await
    }

    pub(crate) async fn pool(&self) -> Result<PoolInfo> {
        self.get(op_pool(), &self.keys.pool())
            .await?
            .ok_or(StoreError::NoPool)
    }

    pub(crate) async fn pool_name(&self) -> Result<String> {
        self.pool().await.map(|pool| pool.name)
    }

    pub(crate) async fn upsert_host(&self, host: &HostRecord) -> Result<()> {
        let op = "record the host";
        required("host name", &host.name)?;
        if let Err(error) = serde_json::from_str::<serde::de::IgnoredAny>(&host.capabilities_json) {
            return Err(StoreError::Invalid {
                field: "host capabilities",
                reason: error.to_string(),
            });
        }
        let value = encode(host, "host")?;
        self.write(op, move || {
            let value = value.clone();
            Box::pin(async move { Ok((vec![put(self.keys.host(&host.name), value)], ())) })
        })
        .await
    }

    pub(crate) async fn set_host_status(&self, name: &str, status: &str) -> Result<()> {
        let op = "set the host status";
        self.write(op, move || {
            Box::pin(async move {
                let mut host: HostRecord = self
                    .get(op, &self.keys.host(name))
                    .await?
                    .ok_or_else(|| not_found(Entity::Host, name))?;
                status.clone_into(&mut host.status);
                Ok((vec![put(self.keys.host(name), encode(&host, "host")?)], ()))
            })
        })
        .await
    }

    pub(crate) async fn get_host(&self, name: &str) -> Result<HostRecord> {
        self.get("read the host", &self.keys.host(name))
            .await?
            .ok_or_else(|| not_found(Entity::Host, name))
    }

    pub(crate) async fn list_hosts(&self) -> Result<Vec<HostRecord>> {
        self.list("list the hosts", &self.keys.hosts()).await
    }

    pub(crate) async fn delete_host(&self, name: &str) -> Result<()> {
        let op = "delete the host";
        self.write(op, move || {
            Box::pin(async move {
                let users = self
                    .all_vms(op)
                    .await?
                    .iter()
                    .filter(|doc| doc.vm.host == name)
                    .count() as u64;
                if users > 0 {
                    return Err(StoreError::InUse {
                        entity: Entity::Host,
                        key: name.to_owned(),
                        users,
                    });
                }
                if !self.exists(op, &self.keys.host(name)).await? {
                    return Err(not_found(Entity::Host, name));
                }
                Ok((vec![delete(self.keys.host(name))], ()))
            })
        })
        .await
    }

    pub(crate) async fn host_allocations(&self) -> Result<Vec<HostAllocation>> {
        let op = "sum the allocations per host";
        let mut per_host: BTreeMap<String, HostAllocation> = self
            .list_hosts()
            .await?
            .into_iter()
            .map(|host| {
                let allocation = HostAllocation {
                    host: host.name.clone(),
                    placed: Allocation::default(),
                    active: Allocation::default(),
                };
                (host.name, allocation)
            })
            .collect();
        for doc in self.all_vms(op).await? {
            let Some(entry) = per_host.get_mut(&doc.vm.host) else {
                continue;
            };
            let add = |allocation: &mut Allocation| {
                allocation.vms += 1;
                allocation.vcpus += u64::from(doc.vm.spec.vcpus);
                allocation.memory_mib += doc.vm.spec.memory_mib;
            };
            add(&mut entry.placed);
            if matches!(
                doc.vm.state,
                VmState::Starting | VmState::Running | VmState::Stopping
            ) {
                add(&mut entry.active);
            }
        }
        Ok(per_host.into_values().collect())
    }

    // ---- what the coordinators share (outside the serial and the guard) -

    pub(crate) async fn pool_ca_fingerprint(&self, mine: &str) -> Result<String> {
        let op = "record the pool CA's fingerprint";
        let key = self.keys.pool_ca();
        let first = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([put(key.clone(), encode(&mine, "pool CA fingerprint")?)]);
        if self.txn(op, first).await?.succeeded() {
            return Ok(mine.to_owned());
        }
        Ok(self
            .get::<String>(op, &key)
            .await?
            .unwrap_or_else(|| mine.to_owned()))
    }

    pub(crate) async fn recorded_pool_ca_fingerprint(&self) -> Result<Option<String>> {
        self.get("read the pool CA's fingerprint", &self.keys.pool_ca())
            .await
    }

    pub(crate) async fn announce_coordinator(&self, name: &str, address: &str) -> Result<()> {
        let op = "announce this coordinator";
        let value = encode(&address, "coordinator address")?;
        let txn = Txn::new().and_then([put(self.keys.coordinator(name), value)]);
        self.txn(op, txn).await.map(drop)
    }

    pub(crate) async fn coordinator_addresses(&self) -> Result<Vec<String>> {
        self.list("list the coordinators", &self.keys.coordinators())
            .await
    }

    // ---- membership ----------------------------------------------------

    pub(crate) async fn insert_join_token(
        &self,
        secret_sha256: &str,
        created_by: &str,
        expires_at: OffsetDateTime,
    ) -> Result<()> {
        let op = "record the join token";
        required("token secret", secret_sha256)?;
        let doc = encode(
            &TokenDoc {
                created_by: created_by.to_owned(),
                expires_at,
                used_by: String::new(),
                used_at: None,
            },
            "join token",
        )?;
        self.write(op, move || {
            let doc = doc.clone();
            Box::pin(async move {
                let key = self.keys.token(secret_sha256);
                if self.exists(op, &key).await? {
                    return Err(StoreError::Conflict {
                        entity: Entity::JoinToken,
                        key: "its secret".to_owned(),
                    });
                }
                Ok((vec![put(key, doc)], ()))
            })
        })
        .await
    }

    pub(crate) async fn join_host(
        &self,
        secret_sha256: &str,
        host: &HostRecord,
        now: OffsetDateTime,
    ) -> Result<std::result::Result<(), TokenRefusal>> {
        let op = "join the host";
        required("host name", &host.name)?;
        self.write(op, move || {
            Box::pin(async move {
                let key = self.keys.token(secret_sha256);
                let Some(mut token) = self.get::<TokenDoc>(op, &key).await? else {
                    return Ok((Vec::new(), Err(TokenRefusal::Unknown)));
                };
                if !token.used_by.is_empty() {
                    return Ok((Vec::new(), Err(TokenRefusal::Used(token.used_by))));
                }
                if token.expires_at <= now {
                    return Ok((Vec::new(), Err(TokenRefusal::Expired(token.expires_at))));
                }
                if self.exists(op, &self.keys.host(&host.name)).await? {
                    return Err(StoreError::Conflict {
                        entity: Entity::Host,
                        key: host.name.clone(),
                    });
                }
                host.name.clone_into(&mut token.used_by);
                token.used_at = Some(now);
                Ok((
                    vec![
                        put(self.keys.host(&host.name), encode(host, "host")?),
                        put(key, encode(&token, "join token")?),
                    ],
                    Ok(()),
                ))
            })
        })
        .await
    }

    pub(crate) async fn revoke_certificate(&self, fingerprint: &str, host: &str) -> Result<()> {
        let op = "revoke the certificate";
        let doc = encode(
            &RevokedDoc {
                host: host.to_owned(),
                revoked_at: OffsetDateTime::now_utc(),
            },
            "revocation",
        )?;
        self.write(op, move || {
            let doc = doc.clone();
            Box::pin(async move {
                let key = self.keys.revoked(fingerprint);
                if self.exists(op, &key).await? {
                    return Ok((Vec::new(), ()));
                }
                Ok((vec![put(key, doc)], ()))
            })
        })
        .await
    }

    pub(crate) async fn revoked_certificates(&self) -> Result<Vec<String>> {
        let prefix = self.keys.revoked_all();
        Ok(self
            .range(
                "list the revoked certificates",
                &prefix,
                GetOptions::new().with_keys_only(),
            )
            .await?
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned())
            .collect())
    }

    pub(crate) async fn begin_migration(
        &self,
        vm: &VmId,
        from_host: &str,
        to_host: &str,
        restart: bool,
    ) -> Result<()> {
        let op = "record the migration";
        let record = MigrationRecord {
            vm: vm.clone(),
            from_host: from_host.to_owned(),
            to_host: to_host.to_owned(),
            phase: "copying".to_owned(),
            restart,
        };
        let doc = encode(&record, "migration")?;
        self.write(op, move || {
            let doc = doc.clone();
            Box::pin(async move {
                let key = self.keys.migration(&vm.0);
                if self.exists(op, &key).await? {
                    return Err(StoreError::Conflict {
                        entity: Entity::Migration,
                        key: vm.0.clone(),
                    });
                }
                Ok((vec![put(key, doc)], ()))
            })
        })
        .await
    }

    pub(crate) async fn commit_migration(&self, vm: &VmId) -> Result<()> {
        let op = "commit the migration";
        self.write(op, move || {
            Box::pin(async move {
                let key = self.keys.migration(&vm.0);
                let mut migration = self
                    .get::<MigrationRecord>(op, &key)
                    .await?
                    .filter(|migration| migration.phase == "copying")
                    .ok_or_else(|| not_found(Entity::Migration, &vm.0))?;
                "moved".clone_into(&mut migration.phase);
                let mut operations = vec![put(key, encode(&migration, "migration")?)];
                let vm_key = self.keys.vm(&vm.0);
                if let Some(mut doc) = self.get::<VmDoc>(op, &vm_key).await? {
                    doc.vm.host.clone_from(&migration.to_host);
                    doc.vm.updated_at = OffsetDateTime::now_utc();
                    operations.push(put(vm_key, encode(&doc, "VM")?));
                }
                Ok((operations, ()))
            })
        })
        .await
    }

    pub(crate) async fn end_migration(&self, vm: &VmId) -> Result<()> {
        let op = "end the migration";
        self.write(op, move || {
            Box::pin(async move { Ok((vec![delete(self.keys.migration(&vm.0))], ())) })
        })
        .await
    }

    pub(crate) async fn migration_restarted(&self, vm: &VmId) -> Result<()> {
        let op = "record the VM's restart";
        self.write(op, move || {
            Box::pin(async move {
                let key = self.keys.migration(&vm.0);
                let Some(mut migration) = self.get::<MigrationRecord>(op, &key).await? else {
                    return Ok((Vec::new(), ()));
                };
                migration.restart = false;
                Ok((vec![put(key, encode(&migration, "migration")?)], ()))
            })
        })
        .await
    }

    pub(crate) async fn migrations(&self) -> Result<Vec<MigrationRecord>> {
        self.list("list the migrations", &self.keys.migrations())
            .await
    }

    // ---- images --------------------------------------------------------

    pub(crate) async fn insert_image(&self, image: &ImageRecord) -> Result<()> {
        let op = "record the image";
        required("image id", &image.id)?;
        required("image name", &image.name)?;
        let doc = encode(image, "image")?;
        self.write(op, move || {
            let doc = doc.clone();
            Box::pin(async move {
                if self.exists(op, &self.keys.image(&image.id)).await? {
                    return Err(StoreError::Conflict {
                        entity: Entity::Image,
                        key: image.id.clone(),
                    });
                }
                if self.exists(op, &self.keys.image_name(&image.name)).await? {
                    return Err(StoreError::Conflict {
                        entity: Entity::Image,
                        key: image.name.clone(),
                    });
                }
                Ok((
                    vec![
                        put(self.keys.image(&image.id), doc),
                        put(
                            self.keys.image_name(&image.name),
                            image.id.clone().into_bytes(),
                        ),
                    ],
                    (),
                ))
            })
        })
        .await
    }

    pub(crate) async fn get_image(&self, id_or_name: &str) -> Result<ImageRecord> {
        let op = "read the image";
        if let Some(image) = self.get(op, &self.keys.image(id_or_name)).await? {
            return Ok(image);
        }
        if let Some(id) = self.get_kv(op, &self.keys.image_name(id_or_name)).await? {
            let id = String::from_utf8_lossy(id.value()).into_owned();
            if let Some(image) = self.get(op, &self.keys.image(&id)).await? {
                return Ok(image);
            }
        }
        Err(not_found(Entity::Image, id_or_name))
    }

    pub(crate) async fn list_images(&self) -> Result<Vec<ImageRecord>> {
        let mut images: Vec<ImageRecord> =
            self.list("list the images", &self.keys.images()).await?;
        images.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(images)
    }

    pub(crate) async fn delete_image(&self, id_or_name: &str) -> Result<ImageRecord> {
        let op = "delete the image";
        self.write(op, move || {
            Box::pin(async move {
                let image = self.get_image(id_or_name).await?;
                let users = self
                    .all_vms(op)
                    .await?
                    .iter()
                    .filter(|doc| doc.vm.spec.image == image.id)
                    .count() as u64;
                if users > 0 {
                    return Err(StoreError::InUse {
                        entity: Entity::Image,
                        key: image.name,
                        users,
                    });
                }
                Ok((
                    vec![
                        delete(self.keys.image(&image.id)),
                        delete(self.keys.image_name(&image.name)),
                    ],
                    image,
                ))
            })
        })
        .await
    }

    // ---- events --------------------------------------------------------

    pub(crate) async fn append_event(
        &self,
        vm: Option<&VmId>,
        kind: &str,
        detail: &str,
    ) -> Result<EventRecord> {
        let op = "record the event";
        required("event kind", kind)?;
        let doc = EventDoc {
            vm: vm.cloned(),
            kind: kind.to_owned(),
            detail: detail.to_owned(),
            at: OffsetDateTime::now_utc(),
        };
        let value = encode(&doc, "event")?;
        let id = uuid::Uuid::new_v4().to_string();
        let mut operations = vec![put(self.keys.event(&id), value.clone())];
        if let Some(vm) = vm {
            operations.push(put(self.keys.vm_event(&vm.0, &id), value));
        }
        let seq = self.commit_unserialised(op, operations).await?;
        Ok(EventRecord {
            seq,
            vm: doc.vm,
            kind: doc.kind,
            detail: doc.detail,
            at: doc.at,
        })
    }

    pub(crate) async fn import_event(&self, event: &EventRecord) -> Result<()> {
        let op = "import the event";
        required("event kind", &event.kind)?;
        let value = encode(
            &EventDoc {
                vm: event.vm.clone(),
                kind: event.kind.clone(),
                detail: event.detail.clone(),
                at: event.at,
            },
            "event",
        )?;
        let id = uuid::Uuid::new_v4().to_string();
        let mut operations = vec![put(self.keys.event(&id), value.clone())];
        if let Some(vm) = &event.vm {
            operations.push(put(self.keys.vm_event(&vm.0, &id), value));
        }
        self.commit_unserialised(op, operations).await.map(drop)
    }

    async fn event_range(
        &self,
        op: &'static str,
        prefix: &str,
        options: GetOptions,
    ) -> Result<Vec<EventRecord>> {
        self.range(op, prefix, options)
            .await?
            .iter()
            .map(|kv| {
                let doc: EventDoc = decode(op, kv)?;
                Ok(EventRecord {
                    seq: kv.create_revision(),
                    vm: doc.vm,
                    kind: doc.kind,
                    detail: doc.detail,
                    at: doc.at,
                })
            })
            .collect()
    }

    pub(crate) async fn events(&self, vm: Option<&VmId>, limit: usize) -> Result<Vec<EventRecord>> {
        let prefix = match vm {
            Some(vm) => self.keys.vm_events(&vm.0),
            None => self.keys.events(),
        };
        let options = GetOptions::new()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        let mut events = self
            .event_range("list the events", &prefix, options)
            .await?;
        events.reverse();
        Ok(events)
    }

    pub(crate) async fn events_after(&self, after: i64, limit: usize) -> Result<Vec<EventRecord>> {
        let options = GetOptions::new()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_min_create_revision(after.saturating_add(1))
            .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        self.event_range("follow the events", &self.keys.events(), options)
            .await
    }

    // ---- VMs -----------------------------------------------------------

    pub(crate) async fn insert_vm(&self, vm: &VmRecord, disks: &[DiskRecord]) -> Result<()> {
        self.insert_vm_with(None, vm, disks).await
    }

    pub(crate) async fn insert_vm_once(
        &self,
        request: &str,
        vm: &VmRecord,
        disks: &[DiskRecord],
    ) -> Result<()> {
        required("create request id", request)?;
        self.insert_vm_with(Some(request), vm, disks).await
    }

    pub(crate) async fn vm_for_request(&self, request: &str) -> Result<Option<VmId>> {
        Ok(self
            .get_kv("read the create request", &self.keys.request(request))
            .await?
            .map(|kv| VmId(String::from_utf8_lossy(kv.value()).into_owned())))
    }

    async fn insert_vm_with(
        &self,
        request: Option<&str>,
        vm: &VmRecord,
        disks: &[DiskRecord],
    ) -> Result<()> {
        let op = "record the VM";
        required("VM id", &vm.id.0)?;
        required("VM owner", &vm.owner)?;
        required("VM name", &vm.spec.name)?;
        if i64::try_from(vm.spec.memory_mib).is_err() {
            return Err(StoreError::Invalid {
                field: "VM memory",
                reason: format!("{} is larger than {}", vm.spec.memory_mib, i64::MAX),
            });
        }
        let mut names = HashSet::new();
        let mut paths = Vec::with_capacity(disks.len());
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
            let path = disk.path.to_str().ok_or_else(|| StoreError::Invalid {
                field: "disk path",
                reason: format!("{} is not UTF-8", disk.path.display()),
            })?;
            paths.push(path);
        }
        let mut sorted = disks.to_vec();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let doc = encode(
            &VmDoc {
                vm: vm.clone(),
                disks: sorted,
                request: request.map(str::to_owned),
            },
            "VM",
        )?;
        let paths = &paths;
        self.write(op, move || {
            let doc = doc.clone();
            Box::pin(async move {
                if !self.exists(op, &self.keys.host(&vm.host)).await? {
                    return Err(not_found(Entity::Host, &vm.host));
                }
                if !self.exists(op, &self.keys.image(&vm.spec.image)).await? {
                    return Err(not_found(Entity::Image, &vm.spec.image));
                }
                if self.exists(op, &self.keys.vm(&vm.id.0)).await? {
                    return Err(StoreError::Conflict {
                        entity: Entity::Vm,
                        key: vm.id.0.clone(),
                    });
                }
                if let Some(request) = request {
                    if self.exists(op, &self.keys.request(request)).await? {
                        return Err(StoreError::Conflict {
                            entity: Entity::Request,
                            key: request.to_owned(),
                        });
                    }
                }
                let name_key = self.keys.vm_name(&vm.owner, &vm.spec.name);
                if self.exists(op, &name_key).await? {
                    return Err(StoreError::Conflict {
                        entity: Entity::Vm,
                        key: format!("{}/{}", vm.owner, vm.spec.name),
                    });
                }
                let mut operations = vec![
                    put(self.keys.vm(&vm.id.0), doc),
                    put(name_key, vm.id.0.clone().into_bytes()),
                ];
                for path in paths {
                    let key = self.keys.disk_path(path);
                    if self.exists(op, &key).await? {
                        return Err(StoreError::Conflict {
                            entity: Entity::Disk,
                            key: (*path).to_owned(),
                        });
                    }
                    operations.push(put(key, vm.id.0.clone().into_bytes()));
                }
                if let Some(request) = request {
                    operations.push(put(
                        self.keys.request(request),
                        vm.id.0.clone().into_bytes(),
                    ));
                }
                Ok((operations, ()))
            })
        })
        .await
    }

    pub(crate) async fn get_vm(&self, id_or_name: &str, owner: Option<&str>) -> Result<VmRecord> {
        let op = "read the VM";
        if let Some(doc) = self.get::<VmDoc>(op, &self.keys.vm(id_or_name)).await? {
            if owner.is_none_or(|owner| doc.vm.owner == owner) {
                return Ok(doc.vm);
            }
        }
        let ids: Vec<String> = match owner {
            Some(owner) => self
                .get_kv(op, &self.keys.vm_name(owner, id_or_name))
                .await?
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                .into_iter()
                .collect(),
            None => {
                let suffix = format!("\0{id_or_name}");
                self.range(op, &self.keys.vm_names(), GetOptions::new())
                    .await?
                    .iter()
                    .filter(|kv| kv.key().ends_with(suffix.as_bytes()))
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                    .collect()
            }
        };
        match ids.as_slice() {
            [] => Err(not_found(Entity::Vm, id_or_name)),
            [id] => self
                .get::<VmDoc>(op, &self.keys.vm(id))
                .await?
                .map(|doc| doc.vm)
                .ok_or_else(|| not_found(Entity::Vm, id_or_name)),
            _ => Err(StoreError::Ambiguous {
                key: id_or_name.to_owned(),
            }),
        }
    }

    pub(crate) async fn list_vms(&self, filter: VmFilter<'_>) -> Result<Vec<VmRecord>> {
        let mut vms: Vec<VmRecord> = self
            .all_vms("list the VMs")
            .await?
            .into_iter()
            .map(|doc| doc.vm)
            .filter(|vm| {
                filter.owner.is_none_or(|owner| vm.owner == owner)
                    && filter.state.is_none_or(|state| vm.state == state)
                    && filter.host.is_none_or(|host| vm.host == host)
            })
            .collect();
        vms.sort_by(|a, b| (&a.owner, &a.spec.name).cmp(&(&b.owner, &b.spec.name)));
        Ok(vms)
    }

    pub(crate) async fn count_vms_by_state(&self) -> Result<Vec<(VmState, u64)>> {
        let mut counts: BTreeMap<&'static str, (VmState, u64)> = BTreeMap::new();
        for doc in self.all_vms("count the VMs").await? {
            counts
                .entry(doc.vm.state.as_str())
                .or_insert((doc.vm.state, 0))
                .1 += 1;
        }
        Ok(counts.into_values().collect())
    }

    pub(crate) async fn update_vm_state(
        &self,
        id: &VmId,
        state: VmState,
        reason: &str,
    ) -> Result<()> {
        self.update_vm("set the VM state", id, |doc| {
            doc.vm.state = state;
            reason.clone_into(&mut doc.vm.state_reason);
            doc.vm.updated_at = OffsetDateTime::now_utc();
            Ok(())
        })
        .await
    }

    pub(crate) async fn transition_vm_state(
        &self,
        id: &VmId,
        from: &[VmState],
        to: VmState,
        reason: &str,
    ) -> Result<VmState> {
        self.update_vm("change the VM state", id, |doc| {
            let current = doc.vm.state;
            if !from.contains(&current) {
                return Err(StoreError::WrongState {
                    id: id.clone(),
                    state: current,
                });
            }
            doc.vm.state = to;
            reason.clone_into(&mut doc.vm.state_reason);
            doc.vm.updated_at = OffsetDateTime::now_utc();
            Ok(current)
        })
        .await
    }

    pub(crate) async fn set_vm_runtime(
        &self,
        id: &VmId,
        runtime: Option<&VmRuntime>,
    ) -> Result<()> {
        self.update_vm("record the VM runtime", id, |doc| {
            doc.vm.runtime = runtime.cloned();
            Ok(())
        })
        .await
    }

    pub(crate) async fn set_vm_spec(&self, id: &VmId, spec: &VmSpec) -> Result<()> {
        self.update_vm("record the VM spec", id, |doc| {
            doc.vm.spec = spec.clone();
            Ok(())
        })
        .await
    }

    pub(crate) async fn set_vm_labels(
        &self,
        id: &VmId,
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        self.update_vm("record the VM labels", id, |doc| {
            doc.vm.spec.labels = labels.clone();
            doc.vm.updated_at = OffsetDateTime::now_utc();
            Ok(())
        })
        .await
    }

    pub(crate) async fn set_expected_measurement(
        &self,
        id: &VmId,
        measurement: &[u8],
    ) -> Result<()> {
        self.update_vm("record the expected measurement", id, |doc| {
            doc.vm.expected_measurement = measurement.to_vec();
            Ok(())
        })
        .await
    }

    pub(crate) async fn set_launch_digest(&self, id: &VmId, digest: &[u8]) -> Result<()> {
        self.update_vm("record the launch digest", id, |doc| {
            doc.vm.launch_digest = digest.to_vec();
            Ok(())
        })
        .await
    }

    pub(crate) async fn set_attestation(&self, id: &VmId, attestation: &Attestation) -> Result<()> {
        self.update_vm("record the attestation", id, |doc| {
            doc.vm.attestation = attestation.clone();
            Ok(())
        })
        .await
    }

    pub(crate) async fn set_vm_host(&self, id: &VmId, host: &str) -> Result<()> {
        let op = "move the VM";
        if !self.exists(op, &self.keys.host(host)).await? {
            return Err(not_found(Entity::Host, host));
        }
        self.update_vm(op, id, |doc| {
            host.clone_into(&mut doc.vm.host);
            Ok(())
        })
        .await
    }

    pub(crate) async fn delete_vm(&self, id: &VmId) -> Result<()> {
        let op = "delete the VM";
        self.write(op, move || {
            Box::pin(async move {
                let doc: VmDoc = self
                    .get(op, &self.keys.vm(&id.0))
                    .await?
                    .ok_or_else(|| not_found(Entity::Vm, &id.0))?;
                let mut operations = vec![
                    delete(self.keys.vm(&id.0)),
                    delete(self.keys.vm_name(&doc.vm.owner, &doc.vm.spec.name)),
                ];
                for disk in &doc.disks {
                    if let Some(path) = disk.path.to_str() {
                        operations.push(delete(self.keys.disk_path(path)));
                    }
                }
                if let Some(request) = &doc.request {
                    operations.push(delete(self.keys.request(request)));
                }
                Ok((operations, ()))
            })
        })
        .await
    }

    pub(crate) async fn disks(&self, vm: &VmId) -> Result<Vec<DiskRecord>> {
        Ok(self
            .get::<VmDoc>("list the disks", &self.keys.vm(&vm.0))
            .await?
            .map(|doc| doc.disks)
            .unwrap_or_default())
    }
}

/// Refuses a write of a leader past its own step-down time: its lease may
/// still live in etcd, but it can no longer prove it renewed in time.
fn refuse_if_expired(op: &'static str, guard: Option<&LeaderGuard>) -> Result<()> {
    match guard.and_then(|guard| guard.valid_until) {
        Some(until) if Instant::now() >= until => Err(StoreError::NotLeader { op }),
        _ => Ok(()),
    }
}

/// The comparison that `guard`'s election key still exists, created at
/// its revision (a new leader's key has another).
fn guard_compare(guard: &LeaderGuard) -> Compare {
    Compare::create_revision(guard.key.clone(), CompareOp::Equal, guard.revision)
}

const fn op_pool() -> &'static str {
    "read the pool"
}
