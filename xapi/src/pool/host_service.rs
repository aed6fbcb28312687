//! The host agent's side of the pool protocol: the `HostAgent` gRPC
//! service over this host's [`HostAgent`], served on the host's pool
//! listener. Only the coordinator may command it; other members of the pool
//! may read a disk from it (`SendDisk`, for a cold migration); a revoked
//! certificate may do nothing.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use hsev_proto::internal::host_agent_server::HostAgent as HostAgentRpc;
use hsev_proto::internal::{ConsoleChunk, ConsoleRead, DiskRef, Empty, FileChunk, Json};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::pki::{Identity, COORDINATOR_NAME};
use super::tls::peer;
use super::wire::{
    from_json, stream_steps, to_json, DestroyArgs, FetchDisksArgs, PrepareArgs, StepStream,
    StopArgs, VmAndRuntime,
};
use super::HostClient;
use crate::daemon::error::OpError;
use crate::host_agent::HostAgent;

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
    fn require_coordinator<T>(&self, request: &Request<T>) -> Result<(), Status> {
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
    fn require_member<T>(&self, request: &Request<T>) -> Result<(), Status> {
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

#[tonic::async_trait]
impl HostAgentRpc for HostService {
    type PrepareStream = StepStream;
    type LaunchStream = StepStream;
    type DestroyStream = StepStream;
    type SendDiskStream = Pin<Box<dyn Stream<Item = Result<FileChunk, Status>> + Send>>;
    type FetchDisksStream = StepStream;

    async fn probe(&self, request: Request<Empty>) -> Result<Response<Json>, Status> {
        self.require_coordinator(&request)?;
        let capabilities = self.blocking(|agent| agent.probe()).await?;
        Ok(json(to_json(&capabilities)?))
    }

    async fn prepare(&self, request: Request<Json>) -> Result<Response<StepStream>, Status> {
        self.require_coordinator(&request)?;
        let args: PrepareArgs = from_json(&request.into_inner().json)?;
        let agent = Arc::clone(&self.agent);
        Ok(Response::new(stream_steps(move |progress| {
            agent.prepare(&args.vm, &args.disks, progress)
        })))
    }

    async fn launch(&self, request: Request<Json>) -> Result<Response<StepStream>, Status> {
        self.require_coordinator(&request)?;
        let launch: super::LaunchRequest = from_json(&request.into_inner().json)?;
        let agent = Arc::clone(&self.agent);
        Ok(Response::new(stream_steps(move |progress| {
            agent.launch(&launch, progress)
        })))
    }

    async fn stop(&self, request: Request<Json>) -> Result<Response<Json>, Status> {
        self.require_coordinator(&request)?;
        let args: StopArgs = from_json(&request.into_inner().json)?;
        let reason = self
            .blocking(move |agent| agent.stop(&args.vm, &args.runtime, args.mode.into()))
            .await?;
        Ok(json(to_json(&reason)?))
    }

    async fn reset(&self, request: Request<Json>) -> Result<Response<Empty>, Status> {
        self.require_coordinator(&request)?;
        let args: VmAndRuntime = from_json(&request.into_inner().json)?;
        self.blocking(move |agent| agent.reset(&args.vm, &args.runtime))
            .await?;
        Ok(Response::new(Empty {}))
    }

    async fn destroy(&self, request: Request<Json>) -> Result<Response<StepStream>, Status> {
        self.require_coordinator(&request)?;
        let args: DestroyArgs = from_json(&request.into_inner().json)?;
        let agent = Arc::clone(&self.agent);
        Ok(Response::new(stream_steps(move |progress| {
            agent.destroy(&args.vm, &args.disks, args.wipe, progress)
        })))
    }

    async fn attest(&self, request: Request<Json>) -> Result<Response<Json>, Status> {
        self.require_coordinator(&request)?;
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
        self.require_coordinator(&request)?;
        let read = request.into_inner();
        let vm = crate::model::VmId(read.vm);
        let max = usize::try_from(read.max)
            .unwrap_or(super::disk_copy::CHUNK)
            .min(super::disk_copy::CHUNK);
        let chunk = self
            .blocking(move |agent| agent.read_console(&vm, read.offset, max))
            .await?;
        Ok(Response::new(ConsoleChunk {
            data: chunk.data,
            length: chunk.length,
        }))
    }

    async fn recover(&self, request: Request<Empty>) -> Result<Response<Json>, Status> {
        self.require_coordinator(&request)?;
        let found = self.blocking(|agent| agent.recover()).await?;
        Ok(json(to_json(&found)?))
    }

    async fn send_disk(
        &self,
        request: Request<DiskRef>,
    ) -> Result<Response<Self::SendDiskStream>, Status> {
        self.require_member(&request)?;
        let wanted = request.into_inner();
        let path = self
            .agent
            .disk_file_of(&crate::model::VmId(wanted.vm.clone()), &wanted.disk)
            .ok_or_else(|| {
                Status::not_found(format!("VM {} has no disk {} here", wanted.vm, wanted.disk))
            })?;
        Ok(Response::new(super::disk_copy::send_file(
            path,
            wanted.offset,
        )))
    }

    async fn fetch_disks(&self, request: Request<Json>) -> Result<Response<StepStream>, Status> {
        self.require_coordinator(&request)?;
        let args: FetchDisksArgs = from_json(&request.into_inner().json)?;
        let agent = Arc::clone(&self.agent);
        Ok(Response::new(stream_steps(move |progress| {
            agent.fetch_disks(
                &args.vm,
                &args.disks,
                &args.from,
                &args.from_address,
                progress,
            )
        })))
    }
}
