//! The host agent's side of the pool protocol: the `HostAgent` gRPC
//! service over this host's [`HostAgent`], served on the host's pool
//! listener. Only the coordinator may command it; other members of the pool
//! may read a disk from it (`SendDisk`, for a cold migration); a revoked
//! certificate may do nothing.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use hsev_proto::internal::host_agent_client::HostAgentClient;
use hsev_proto::internal::host_agent_server::HostAgent as HostAgentRpc;
use hsev_proto::internal::{ConsoleChunk, ConsoleRead, DiskRef, Empty, FileChunk, Json};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::pki::{Identity, COORDINATOR_NAME};
use super::tls::{client_config, peer};
use super::wire::{
    from_json, stream_steps, to_json, DestroyArgs, FetchDisksArgs, PrepareArgs, StepStream,
    StopArgs, VmAndRuntime,
};
use super::HostClient;
use crate::daemon::error::OpError;
use crate::host_agent::HostAgent;
use crate::model::DiskRecord;

/// How much of a disk one chunk carries.
pub const CHUNK: usize = 1 << 20;

/// This member's pool identity: what it presents and whom it trusts.
#[derive(Debug, Clone)]
pub struct Membership {
    /// Its certificate and key.
    pub identity: Identity,
    /// The pool's CA, PEM.
    pub ca_pem: String,
    /// Certificates the pool revoked (fingerprints), as the coordinator
    /// last said.
    pub revoked: Arc<RwLock<HashSet<String>>>,
}

impl Membership {
    fn refuses(&self, fingerprint: &str) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(fingerprint)
    }
}

/// The `HostAgent` service of this host.
#[derive(Debug, Clone)]
pub struct HostService {
    agent: Arc<HostAgent>,
    membership: Membership,
}

fn internal(error: OpError) -> Status {
    Status::from(error)
}

impl HostService {
    /// The service over `agent`.
    pub fn new(agent: Arc<HostAgent>, membership: Membership) -> Self {
        HostService { agent, membership }
    }

    /// Only the coordinator's certificate, unrevoked.
    fn from_coordinator<T>(&self, request: &Request<T>) -> Result<(), Status> {
        match peer(request) {
            Some(peer)
                if peer.name == COORDINATOR_NAME && !self.membership.refuses(&peer.fingerprint) =>
            {
                Ok(())
            }
            Some(peer) => Err(Status::permission_denied(format!(
                "{} may not command this host: only the pool's coordinator may",
                peer.name
            ))),
            None => Err(Status::unauthenticated("a pool certificate is required")),
        }
    }

    /// Any member of the pool, unrevoked.
    fn from_member<T>(&self, request: &Request<T>) -> Result<(), Status> {
        match peer(request) {
            Some(peer) if !self.membership.refuses(&peer.fingerprint) => Ok(()),
            Some(peer) => Err(Status::permission_denied(format!(
                "the certificate of {} is revoked",
                peer.name
            ))),
            None => Err(Status::unauthenticated("a pool certificate is required")),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&HostAgent) -> Result<T, OpError> + Send + 'static,
    ) -> Result<T, Status> {
        let agent = Arc::clone(&self.agent);
        tokio::task::spawn_blocking(move || call(&agent))
            .await
            .map_err(|error| Status::internal(format!("the command panicked: {error}")))?
            .map_err(internal)
    }
}

fn json(bytes: Vec<u8>) -> Response<Json> {
    Response::new(Json { json: bytes })
}

/// Streams `disk` of this host from `offset`, then its SHA-256 (of the
/// whole file, the part already sent included).
fn send_disk(path: PathBuf, offset: u64) -> Pin<Box<dyn Stream<Item = Result<FileChunk, Status>> + Send>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let send = |item| sender.blocking_send(item).is_ok();
        let result = (|| -> std::io::Result<()> {
            let mut file = std::fs::File::open(&path)?;
            let size = file.metadata()?.len();
            let mut hasher = openssl::sha::Sha256::new();
            let mut buffer = vec![0u8; CHUNK];
            let mut at = 0u64;
            // The part the receiver has goes into the checksum only.
            while at < offset.min(size) {
                let want = usize::try_from((offset.min(size) - at).min(CHUNK as u64)).unwrap_or(CHUNK);
                file.read_exact(&mut buffer[..want])?;
                hasher.update(&buffer[..want]);
                at += want as u64;
            }
            file.seek(SeekFrom::Start(at))?;
            let mut first = true;
            loop {
                let read = file.read(&mut buffer)?;
                if read == 0 {
                    break;
                }
                hasher.update(&buffer[..read]);
                let chunk = FileChunk {
                    offset: at,
                    data: buffer[..read].to_vec(),
                    size: if first { size } else { 0 },
                    sha256: Vec::new(),
                };
                first = false;
                at += read as u64;
                if !send(Ok(chunk)) {
                    return Ok(());
                }
            }
            send(Ok(FileChunk {
                offset: at,
                data: Vec::new(),
                size: if first { size } else { 0 },
                sha256: hasher.finish().to_vec(),
            }));
            Ok(())
        })();
        if let Err(error) = result {
            let _ = sender.blocking_send(Err(Status::internal(format!(
                "reading {}: {error}",
                path.display()
            ))));
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))
}

/// Copies `disk` from the host at `address` into `target`, resuming a
/// partial copy, and checks the whole file's SHA-256 before it takes the
/// disk's name.
async fn fetch_disk(
    membership: &Membership,
    from: &str,
    address: &str,
    disk: &DiskRecord,
    target: PathBuf,
    progress: &(dyn Fn(&str, &str, u32) + Sync),
) -> Result<u64, OpError> {
    let partial = target.with_extension("partial");
    if let Some(parent) = partial.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|error| OpError::internal(format!("cannot create {}: {error}", parent.display())))?;
    }
    let offset = std::fs::metadata(&partial).map(|metadata| metadata.len()).unwrap_or(0);
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{address}"))
        .and_then(|endpoint| endpoint.tls_config(client_config(&membership.identity, &membership.ca_pem, from)))
        .map_err(|error| OpError::internal(format!("host {from} at {address}: {error}")))?
        .connect()
        .await
        .map_err(|error| OpError::unavailable(format!("cannot reach host {from} at {address}: {error}")))?;
    let mut stream = HostAgentClient::new(channel)
        .send_disk(DiskRef {
            vm: disk.vm.0.clone(),
            disk: disk.name.clone(),
            offset,
        })
        .await
        .map_err(|status| super::wire::op_error(&status))?
        .into_inner();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&partial)
        .map_err(|error| OpError::internal(format!("cannot write {}: {error}", partial.display())))?;
    let mut size = 0;
    let mut copied = offset;
    let mut reported = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|status| super::wire::op_error(&status))?;
        if chunk.size > 0 {
            size = chunk.size;
        }
        if !chunk.sha256.is_empty() {
            drop(file);
            let local = sha256_file(&partial)?;
            if local != chunk.sha256 {
                let _ = std::fs::remove_file(&partial);
                return Err(OpError::internal(format!(
                    "disk {} of VM {}: the copy's SHA-256 {} is not the source's {}: the copy is \
                     dropped, a new migration starts it again",
                    disk.name,
                    disk.vm,
                    hex::encode(local),
                    hex::encode(&chunk.sha256)
                )));
            }
            std::fs::rename(&partial, &target).map_err(|error| {
                OpError::internal(format!("cannot rename {}: {error}", partial.display()))
            })?;
            return Ok(copied);
        }
        if chunk.offset != copied {
            return Err(OpError::internal(format!(
                "disk {}: a chunk at {} where {} was expected",
                disk.name, chunk.offset, copied
            )));
        }
        file.write_all(&chunk.data)
            .map_err(|error| OpError::internal(format!("cannot write {}: {error}", partial.display())))?;
        copied += chunk.data.len() as u64;
        let percent = (copied * 100).checked_div(size).unwrap_or(100);
        if percent >= reported + 10 {
            reported = percent;
            progress(
                "copy",
                &format!("disk {}: {} of {} MiB", disk.name, copied >> 20, size >> 20),
                u32::try_from(percent).unwrap_or(100),
            );
        }
    }
    Err(OpError::unavailable(format!(
        "the copy of disk {} from {from} was cut off at {copied} bytes; it resumes from there",
        disk.name
    )))
}

fn sha256_file(path: &std::path::Path) -> Result<Vec<u8>, OpError> {
    let mut file = std::fs::File::open(path)
        .map_err(|error| OpError::internal(format!("cannot read {}: {error}", path.display())))?;
    let mut hasher = openssl::sha::Sha256::new();
    let mut buffer = vec![0u8; CHUNK];
    loop {
        let read = file
            .read(&mut buffer)
            .map_err(|error| OpError::internal(format!("cannot read {}: {error}", path.display())))?;
        if read == 0 {
            return Ok(hasher.finish().to_vec());
        }
        hasher.update(&buffer[..read]);
    }
}

#[tonic::async_trait]
impl HostAgentRpc for HostService {
    type PrepareStream = StepStream;
    type LaunchStream = StepStream;
    type DestroyStream = StepStream;
    type SendDiskStream = Pin<Box<dyn Stream<Item = Result<FileChunk, Status>> + Send>>;
    type FetchDisksStream = StepStream;

    async fn probe(&self, request: Request<Empty>) -> Result<Response<Json>, Status> {
        self.from_coordinator(&request)?;
        let capabilities = self.blocking(|agent| agent.probe()).await?;
        Ok(json(to_json(&capabilities)?))
    }

    async fn prepare(&self, request: Request<Json>) -> Result<Response<StepStream>, Status> {
        self.from_coordinator(&request)?;
        let args: PrepareArgs = from_json(&request.into_inner().json)?;
        let agent = Arc::clone(&self.agent);
        Ok(Response::new(stream_steps(move |progress| {
            agent.prepare(&args.vm, &args.disks, progress)
        })))
    }

    async fn launch(&self, request: Request<Json>) -> Result<Response<StepStream>, Status> {
        self.from_coordinator(&request)?;
        let launch: super::LaunchRequest = from_json(&request.into_inner().json)?;
        let agent = Arc::clone(&self.agent);
        Ok(Response::new(stream_steps(move |progress| {
            agent.launch(&launch, progress)
        })))
    }

    async fn stop(&self, request: Request<Json>) -> Result<Response<Json>, Status> {
        self.from_coordinator(&request)?;
        let args: StopArgs = from_json(&request.into_inner().json)?;
        let reason = self
            .blocking(move |agent| agent.stop(&args.vm, &args.runtime, args.mode.into()))
            .await?;
        Ok(json(to_json(&reason)?))
    }

    async fn reset(&self, request: Request<Json>) -> Result<Response<Empty>, Status> {
        self.from_coordinator(&request)?;
        let args: VmAndRuntime = from_json(&request.into_inner().json)?;
        self.blocking(move |agent| agent.reset(&args.vm, &args.runtime))
            .await?;
        Ok(Response::new(Empty {}))
    }

    async fn destroy(&self, request: Request<Json>) -> Result<Response<StepStream>, Status> {
        self.from_coordinator(&request)?;
        let args: DestroyArgs = from_json(&request.into_inner().json)?;
        let agent = Arc::clone(&self.agent);
        Ok(Response::new(stream_steps(move |progress| {
            agent.destroy(&args.vm, &args.disks, args.wipe, progress)
        })))
    }

    async fn attest(&self, request: Request<Json>) -> Result<Response<Json>, Status> {
        self.from_coordinator(&request)?;
        let args: VmAndRuntime = from_json(&request.into_inner().json)?;
        let nonce: [u8; hsev_attestation::tenant_attest::NONCE_LEN] = hex::decode(&args.nonce)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| Status::invalid_argument("the nonce is not 128 hex digits"))?;
        let answer = self
            .blocking(move |agent| agent.attest(&args.vm, &args.runtime, &nonce))
            .await?;
        Ok(json(to_json(&answer)?))
    }

    async fn read_console(
        &self,
        request: Request<ConsoleRead>,
    ) -> Result<Response<ConsoleChunk>, Status> {
        self.from_coordinator(&request)?;
        let read = request.into_inner();
        let vm = crate::model::VmId(read.vm);
        let max = usize::try_from(read.max).unwrap_or(CHUNK).min(CHUNK);
        let chunk = self
            .blocking(move |agent| agent.read_console(&vm, read.offset, max))
            .await?;
        Ok(Response::new(ConsoleChunk {
            data: chunk.data,
            length: chunk.length,
        }))
    }

    async fn recover(&self, request: Request<Empty>) -> Result<Response<Json>, Status> {
        self.from_coordinator(&request)?;
        let found = self.blocking(|agent| agent.recover()).await?;
        Ok(json(to_json(&found)?))
    }

    async fn send_disk(
        &self,
        request: Request<DiskRef>,
    ) -> Result<Response<Self::SendDiskStream>, Status> {
        self.from_member(&request)?;
        let wanted = request.into_inner();
        let path = self
            .agent
            .disk_file_of(&crate::model::VmId(wanted.vm.clone()), &wanted.disk)
            .ok_or_else(|| {
                Status::not_found(format!("VM {} has no disk {} here", wanted.vm, wanted.disk))
            })?;
        Ok(Response::new(send_disk(path, wanted.offset)))
    }

    async fn fetch_disks(&self, request: Request<Json>) -> Result<Response<StepStream>, Status> {
        self.from_coordinator(&request)?;
        let args: FetchDisksArgs = from_json(&request.into_inner().json)?;
        let membership = self.membership.clone();
        let agent = Arc::clone(&self.agent);
        let handle = tokio::runtime::Handle::current();
        Ok(Response::new(stream_steps(move |progress| {
            let mut copied = 0;
            for disk in &args.disks {
                let target = agent.disk_file(disk);
                copied += handle.block_on(fetch_disk(
                    &membership,
                    &args.from,
                    &args.from_address,
                    disk,
                    target,
                    progress,
                ))?;
            }
            Ok(copied)
        })))
    }
}
