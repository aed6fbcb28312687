//! The coordinator's side of the pool protocol: the `Coordinator` gRPC
//! service, served on the coordinator's pool listener. `Join` is the one
//! call a host makes before it has a certificate (its token is its
//! credential); every other call needs a member's unrevoked certificate.

use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};

use hsev_proto::internal::coordinator_server::Coordinator as CoordinatorRpc;
use hsev_proto::internal::{
    Empty, FileChunk, Heartbeat, HeartbeatReply, HostReport, ImageRef, JoinRequest, JoinResponse,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::tls::{peer, Peer};
use super::wire::{from_json, PoolReport};
use crate::coordinator::Coordinator;
use crate::daemon::error::OpError;
use crate::daemon::host::HostCapabilities;
use crate::model::VmId;

/// The `Coordinator` service.
#[derive(Debug, Clone)]
pub struct CoordinatorService {
    coordinator: Arc<Coordinator>,
    coordinators: Arc<RwLock<Vec<String>>>,
}

impl CoordinatorService {
    /// The service over `coordinator`; heartbeats are answered with
    /// `coordinators`, every coordinator's pool address (kept up to date
    /// by the caller), this one's first.
    pub fn new(coordinator: Arc<Coordinator>, coordinators: Arc<RwLock<Vec<String>>>) -> Self {
        CoordinatorService {
            coordinator,
            coordinators,
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&Coordinator) -> Result<T, OpError> + Send + 'static,
    ) -> Result<T, Status> {
        let coordinator = Arc::clone(&self.coordinator);
        tokio::task::spawn_blocking(move || call(&coordinator))
            .await
            .map_err(|error| Status::internal(format!("the call panicked: {error}")))?
            .map_err(Status::from)
    }
}

fn member<T>(request: &Request<T>) -> Result<Peer, Status> {
    peer(request).ok_or_else(|| Status::unauthenticated("a pool certificate is required"))
}

/// The file of an image artifact by role, in the coordinator's image store.
fn artifact_file(dir: &std::path::Path, role: &str) -> Option<std::path::PathBuf> {
    let name = match role {
        "firmware" => "firmware.fd",
        "kernel" => "vmlinuz",
        "initrd" => "initrd.img",
        "disk" => "disk.img",
        "manifest" => "manifest.json",
        _ => return None,
    };
    Some(dir.join(name))
}

#[tonic::async_trait]
impl CoordinatorRpc for CoordinatorService {
    type FetchImageStream = Pin<Box<dyn Stream<Item = Result<FileChunk, Status>> + Send>>;

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let join = request.into_inner();
        let joined = self
            .blocking(move |coordinator| {
                coordinator.join(&join.secret, &join.host, &join.csr_pem, &join.address)
            })
            .await?;
        Ok(Response::new(JoinResponse {
            cert_pem: joined.cert_pem,
            ca_pem: joined.ca_pem,
            pool: joined.pool,
        }))
    }

    async fn beat(&self, request: Request<Heartbeat>) -> Result<Response<HeartbeatReply>, Status> {
        let peer = member(&request)?;
        let beat = request.into_inner();
        let capabilities: HostCapabilities = from_json(&beat.capabilities)?;
        let running: Vec<VmId> = from_json(&beat.running)?;
        let revoked = self
            .blocking(move |coordinator| coordinator.beat(&peer, &capabilities, &running))
            .await?;
        let coordinators = self
            .coordinators
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Ok(Response::new(HeartbeatReply {
            revoked,
            coordinators,
        }))
    }

    async fn report(&self, request: Request<HostReport>) -> Result<Response<Empty>, Status> {
        let peer = member(&request)?;
        let report: PoolReport = from_json(&request.into_inner().json)?;
        self.blocking(move |coordinator| coordinator.report(&peer, report))
            .await?;
        Ok(Response::new(Empty {}))
    }

    async fn fetch_image(
        &self,
        request: Request<ImageRef>,
    ) -> Result<Response<Self::FetchImageStream>, Status> {
        let peer = member(&request)?;
        let wanted = request.into_inner();
        let image = wanted.image.clone();
        let dir = self
            .blocking(move |coordinator| {
                coordinator.member_may_read(&peer)?;
                Ok(coordinator.store().get_image(&image)?.dir)
            })
            .await?;
        let path = artifact_file(&dir, &wanted.role).ok_or_else(|| {
            Status::invalid_argument(format!("no artifact role {:?}", wanted.role))
        })?;
        Ok(Response::new(super::disk_copy::send_file(path, 0)))
    }
}
