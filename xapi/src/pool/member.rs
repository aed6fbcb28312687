//! A host's side of its membership in a pool: joining (its key made here,
//! its certificate issued by the pool's CA from its request, the CA itself
//! accepted by the join token's fingerprint), what it keeps in
//! `<state_dir>/pool/`, its heartbeats, its reports, the images it fetches
//! from the coordinator, and the forwarding of the public API to the
//! coordinator, so that a client may use any host.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hsev_proto::internal::coordinator_client::CoordinatorClient;
use hsev_proto::internal::{Heartbeat, HostReport, ImageRef, JoinRequest};
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;
use tonic::transport::Endpoint;

use super::host_service::Membership;
use super::leader_channel::LeaderChannel;
use super::pki::{host_request, Identity, COORDINATOR_NAME};
use super::tls::{client_config, fetch_pool_ca, joining_config};
use super::wire::{op_error, PoolReport};
use super::{LaunchImage, PoolSink};
use crate::coordinator::ha::FenceTiming;
use crate::coordinator::JoinTokenContents;
use crate::daemon::error::OpError;
use crate::host_agent::HostAgent;
use crate::model::{Attestation, VmId};

/// What a member keeps of its membership (`<state_dir>/pool/member.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberState {
    /// The pool's name.
    pub pool: String,
    /// This host's name in it.
    pub name: String,
    /// The coordinator's pool address.
    pub coordinator: String,
    /// Where this host's agent listens.
    pub listen: String,
    /// Every coordinator's pool address, as the leader last told it (a
    /// pool on etcd has several): where to look for the next leader.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub coordinators: Vec<String>,
}

/// The folder of a state directory that holds the pool's identity files.
pub fn pool_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("pool")
}

impl MemberState {
    fn path(state_dir: &Path) -> PathBuf {
        pool_dir(state_dir).join("member.json")
    }

    /// This host's membership, if it joined a pool.
    pub fn load(state_dir: &Path) -> Result<Option<Self>, OpError> {
        let path = Self::path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|error| OpError::internal(format!("{}: {error}", path.display()))),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(OpError::internal(format!("{}: {error}", path.display()))),
        }
    }

    /// Keeps it in `<state_dir>/pool/member.json`.
    pub fn save(&self, state_dir: &Path) -> Result<(), OpError> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|error| OpError::internal(error.to_string()))?;
        std::fs::write(Self::path(state_dir), json)
            .map_err(|error| OpError::internal(format!("saving the membership: {error}")))
    }

    /// Where to look for the leading coordinator: the one joined first,
    /// then the others the leader told of.
    pub fn coordinator_addresses(&self) -> Vec<String> {
        let mut addresses = vec![self.coordinator.clone()];
        addresses.extend(
            self.coordinators
                .iter()
                .filter(|address| **address != self.coordinator)
                .cloned(),
        );
        addresses
    }

    /// Its identity and the pool's CA.
    pub fn membership(state_dir: &Path) -> Result<Membership, OpError> {
        let dir = pool_dir(state_dir);
        let identity = Identity::load(&dir, "host")
            .map_err(|error| OpError::internal(format!("this host's pool identity: {error}")))?;
        let ca_pem = std::fs::read_to_string(dir.join("ca.pem"))
            .map_err(|error| OpError::internal(format!("the pool's CA: {error}")))?;
        Ok(Membership {
            identity,
            ca_pem,
            revoked: Arc::default(),
        })
    }
}

/// Joins the pool a token names, as `name`, this host's agent listening at
/// `listen`; keeps what it got in `<state_dir>/pool/`.
pub async fn join(
    state_dir: &Path,
    token: &str,
    name: &str,
    listen: &str,
) -> Result<MemberState, OpError> {
    if MemberState::load(state_dir)?.is_some() {
        return Err(OpError::precondition(format!(
            "this host already joined a pool ({}): its state folder {} is a member's",
            MemberState::path(state_dir).display(),
            state_dir.display()
        )));
    }
    let token = JoinTokenContents::parse(token).map_err(OpError::invalid)?;
    let secret = STANDARD
        .decode(&token.secret)
        .map_err(|_| OpError::invalid("the join token is damaged"))?;
    let ca_pem = fetch_pool_ca(&token.address, &token.ca)
        .await
        .map_err(|error| {
            OpError::new(
                crate::daemon::error::Kind::PermissionDenied,
                error.to_string(),
            )
        })?;
    let (key_pem, csr_pem) =
        host_request(name).map_err(|error| OpError::internal(error.to_string()))?;
    let channel = Endpoint::from_shared(format!("https://{}", token.address))
        .and_then(|endpoint| endpoint.tls_config(joining_config(&ca_pem)))
        .map_err(|error| OpError::invalid(format!("coordinator {}: {error}", token.address)))?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|error| {
            OpError::unavailable(format!(
                "cannot reach the coordinator at {}: {error}",
                token.address
            ))
        })?;
    let answer = CoordinatorClient::new(channel)
        .join(JoinRequest {
            secret,
            host: name.to_owned(),
            csr_pem,
            address: listen.to_owned(),
        })
        .await
        .map_err(|status| op_error(&status))?
        .into_inner();
    let dir = pool_dir(state_dir);
    Identity {
        cert_pem: answer.cert_pem,
        key_pem,
    }
    .save(&dir, "host")
    .map_err(|error| OpError::internal(error.to_string()))?;
    std::fs::write(dir.join("ca.pem"), &answer.ca_pem)
        .map_err(|error| OpError::internal(format!("saving the pool's CA: {error}")))?;
    let state = MemberState {
        pool: answer.pool,
        name: name.to_owned(),
        coordinator: token.address,
        listen: listen.to_owned(),
        coordinators: Vec::new(),
    };
    state.save(state_dir)?;
    Ok(state)
}

/// This member's channel to the leading coordinator (its pool
/// listener), made inside the tokio runtime.
pub fn coordinator_channel(
    state: &MemberState,
    membership: &Membership,
) -> Result<LeaderChannel, OpError> {
    LeaderChannel::new(
        state.coordinator_addresses(),
        client_config(&membership.identity, &membership.ca_pem, COORDINATOR_NAME),
    )
}

/// Tells the coordinator, every `interval`, that this host is alive, with
/// its capabilities and the VMs it runs; keeps the pool's revocations the
/// coordinator answers. An outage is logged once, its end once.
///
/// A heartbeat that goes unanswered moves the channel on to the next
/// coordinator the leader told of (only the leader answers), and the
/// addresses each answer lists are kept, in `state`'s file under
/// `state_dir` too, for the next start.
///
/// The heartbeat is this host's liveness lease: a watchdog thread of its
/// own (it needs neither the runtime nor the coordinator) hard-stops the
/// VMs it launched as HA once no heartbeat has been answered for
/// `fence_after`, measured from when the last answered one was sent. Why
/// that is soon enough is argued in `coordinator::ha`.
pub async fn heartbeats(
    channel: LeaderChannel,
    (state_dir, mut state): (PathBuf, MemberState),
    agent: Arc<HostAgent>,
    membership: Membership,
    interval: Duration,
    fence_after: Duration,
) {
    let answered = Arc::new(Mutex::new(Instant::now()));
    watchdog(Arc::clone(&agent), Arc::clone(&answered), fence_after);
    let mut client = CoordinatorClient::new(channel.clone());
    let mut ticker = tokio::time::interval(interval);
    let mut out_since: Option<Instant> = None;
    loop {
        ticker.tick().await;
        let capabilities = serde_json::to_vec(&agent.capabilities()).unwrap_or_default();
        let running = serde_json::to_vec(&agent.running_vms()).unwrap_or_default();
        let sent = Instant::now();
        let beat = client.beat(Heartbeat {
            capabilities,
            running,
        });
        let outcome = match tokio::time::timeout(interval * 2, beat).await {
            Ok(outcome) => outcome,
            Err(_) => Err(tonic::Status::deadline_exceeded("no answer in time")),
        };
        match outcome {
            Ok(reply) => {
                {
                    let mut last = answered.lock().unwrap_or_else(PoisonError::into_inner);
                    *last = (*last).max(sent);
                }
                if let Some(since) = out_since.take() {
                    tracing::info!(
                        after_s = since.elapsed().as_secs(),
                        "the coordinator answers again"
                    );
                }
                let reply = reply.into_inner();
                *membership
                    .revoked
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = reply.revoked.into_iter().collect();
                if channel.learn(&reply.coordinators) {
                    state.coordinators = channel.addresses();
                    if let Err(error) = state.save(&state_dir) {
                        tracing::warn!(%error, "the coordinators' addresses are not kept");
                    }
                }
            }
            Err(status) => {
                if out_since.is_none() {
                    out_since = Some(Instant::now());
                    tracing::warn!(error = %status.message(), coordinator = %channel.address(), "the coordinator does not answer; its VMs run on");
                }
                if let Some(next) = channel.move_on() {
                    tracing::info!(coordinator = %next, "looking for the leading coordinator");
                }
            }
        }
    }
}

/// Fences this host's HA VMs while its last answered heartbeat is older
/// than `fence_after`; checks every [`FenceTiming::WATCHDOG_PERIOD`].
fn watchdog(agent: Arc<HostAgent>, answered: Arc<Mutex<Instant>>, fence_after: Duration) {
    std::thread::spawn(move || {
        let mut fenced = false;
        loop {
            std::thread::sleep(FenceTiming::WATCHDOG_PERIOD);
            let silent = answered
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .elapsed();
            if silent <= fence_after {
                fenced = false;
                continue;
            }
            let stopped = agent.fence(&format!(
                "no heartbeat answered for {} ms (fence_after_ms {})",
                silent.as_millis(),
                fence_after.as_millis()
            ));
            if !fenced {
                fenced = true;
                tracing::warn!(
                    silent_ms = silent.as_millis() as u64,
                    stopped,
                    "the pool is out of reach: this host's HA VMs are stopped"
                );
            }
        }
    });
}

/// What this host reports on its own, sent to the coordinator (and retried
/// a few times: a lost report is made good by the next reconciliation).
#[derive(Debug, Clone)]
pub struct RemoteSink {
    channel: LeaderChannel,
    runtime: tokio::runtime::Handle,
}

impl RemoteSink {
    /// Reports over `channel`.
    pub fn new(channel: LeaderChannel, runtime: tokio::runtime::Handle) -> Self {
        RemoteSink { channel, runtime }
    }

    fn send(&self, report: PoolReport) {
        let Ok(json) = serde_json::to_vec(&report) else {
            return;
        };
        let mut client = CoordinatorClient::new(self.channel.clone());
        self.runtime.spawn(async move {
            for attempt in 0..5u32 {
                match client.report(HostReport { json: json.clone() }).await {
                    Ok(_) => return,
                    Err(status) if attempt == 4 => {
                        tracing::warn!(error = %status.message(), "a report to the coordinator is lost");
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(500 << attempt)).await,
                }
            }
        });
    }
}

impl PoolSink for RemoteSink {
    fn vm_exited(&self, vm: &VmId, clean: bool, reason: &str) {
        self.send(PoolReport::Exited {
            vm: vm.clone(),
            clean,
            reason: reason.to_owned(),
        });
    }

    fn attestation(&self, vm: &VmId, attestation: &Attestation) {
        self.send(PoolReport::Attestation {
            vm: vm.clone(),
            attestation: attestation.clone(),
        });
    }

    fn event(&self, vm: &VmId, kind: &str, detail: &str) {
        self.send(PoolReport::Event {
            vm: vm.clone(),
            kind: kind.to_owned(),
            detail: detail.to_owned(),
        });
    }
}

/// Images fetched from the coordinator, each artifact checked by its
/// sha256 before the image folder takes its id.
#[derive(Debug, Clone)]
pub struct CoordinatorImages {
    channel: LeaderChannel,
    runtime: tokio::runtime::Handle,
}

impl CoordinatorImages {
    /// Images over `channel`.
    pub fn new(channel: LeaderChannel, runtime: tokio::runtime::Handle) -> Self {
        CoordinatorImages { channel, runtime }
    }
}

/// Where an image's artifact of `role` goes in its folder.
fn stored_name(role: &str) -> Option<&'static str> {
    Some(match role {
        "firmware" => "firmware.fd",
        "kernel" => "vmlinuz",
        "initrd" => "initrd.img",
        "disk" => "disk.img",
        _ => return None,
    })
}

impl super::ImageSource for CoordinatorImages {
    fn fetch(&self, image: &LaunchImage, dir: &Path) -> Result<(), OpError> {
        let partial = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(|error| {
            OpError::internal(format!("cannot create {}: {error}", partial.display()))
        })?;
        for (role, sha256) in &image.sha256 {
            let Some(name) = stored_name(role) else {
                continue;
            };
            let target = partial.join(name);
            let client = CoordinatorClient::new(self.channel.clone());
            let received = self
                .runtime
                .block_on(receive(client, &image.id, role, &target))?;
            if !received.eq_ignore_ascii_case(sha256) {
                let _ = std::fs::remove_dir_all(&partial);
                return Err(OpError::internal(format!(
                    "image {} {role}: sha256 {received} is not the image's {sha256}",
                    image.id
                )));
            }
        }
        std::fs::rename(&partial, dir)
            .map_err(|error| OpError::internal(format!("cannot store image {}: {error}", image.id)))
    }
}

/// Receives one artifact into `target`; answers its sha256, hex.
async fn receive(
    mut client: CoordinatorClient<LeaderChannel>,
    image: &str,
    role: &str,
    target: &Path,
) -> Result<String, OpError> {
    use std::io::Write;
    let mut stream = client
        .fetch_image(ImageRef {
            image: image.to_owned(),
            role: role.to_owned(),
        })
        .await
        .map_err(|status| op_error(&status))?
        .into_inner();
    let mut file = std::fs::File::create(target).map_err(|error| {
        OpError::internal(format!("cannot write {}: {error}", target.display()))
    })?;
    // The caller checks the SHA-256 against the image's manifest, which
    // proves more than the stream's own checksum would.
    let mut hasher = openssl::sha::Sha256::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|status| op_error(&status))?;
        if !chunk.blake3.is_empty() {
            return Ok(hex::encode(hasher.finish()));
        }
        hasher.update(&chunk.data);
        file.write_all(&chunk.data).map_err(|error| {
            OpError::internal(format!("cannot write {}: {error}", target.display()))
        })?;
    }
    Err(OpError::unavailable(format!(
        "image {image} {role}: the transfer was cut off"
    )))
}
