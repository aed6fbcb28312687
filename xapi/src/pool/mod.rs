//! The contract between the pool's coordinator and its host agents.
//!
//! [`HostClient`] is what the coordinator asks of a host (prepare a VM's
//! disks, launch it, stop it, relay its guest's attestation, ...);
//! [`PoolSink`] is what a host tells the coordinator on its own (a VM
//! exited, the guest agent reported). Both have an in-process side (the
//! host agent of the coordinator's own host) and a remote one over the
//! pool's mTLS channel. This module owns those shapes and nothing else: it
//! decides nothing and keeps no state.

pub mod coordinator_service;
pub mod disk_copy;
pub mod host_service;
pub mod leader_channel;
pub mod member;
pub mod pki;
pub mod remote_host;
pub mod tls;
pub mod wire;

use hsev_attestation::tenant_attest::{AttestAnswer, NONCE_LEN};
use serde::{Deserialize, Serialize};

use crate::daemon::error::OpError;
use crate::daemon::host::HostCapabilities;
use crate::hypervisor::StopMode;
use crate::model::{Attestation, DiskRecord, ImageRecord, VmId, VmRuntime, VmSpec};

/// The image a launch boots, as any host can find it: by id in its own
/// image folder (`<images>/<id>/`), each artifact checked by its sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchImage {
    /// Its id (the manifest's sha256).
    pub id: String,
    /// Its kernel command line.
    pub cmdline: String,
    /// The firmware measures the direct boot.
    pub measured_direct_boot: bool,
    /// sha256 by role (`firmware`, `kernel`, `initrd`, `disk`, `disk-raw`).
    pub sha256: Vec<(String, String)>,
}

impl From<&ImageRecord> for LaunchImage {
    fn from(image: &ImageRecord) -> Self {
        LaunchImage {
            id: image.id.clone(),
            cmdline: image.cmdline.clone(),
            measured_direct_boot: image.measured_direct_boot,
            sha256: image.sha256.clone(),
        }
    }
}

/// Reports a step of a long operation: (step, detail, percent).
pub type Progress<'a> = &'a (dyn Fn(&str, &str, u32) + Sync);

/// Everything a host needs to launch a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchRequest {
    /// The VM.
    pub vm: VmId,
    /// What it is made of.
    pub spec: VmSpec,
    /// The image it boots (the host holds or fetches its artifacts).
    pub image: LaunchImage,
    /// Its disks.
    pub disks: Vec<DiskRecord>,
}

/// What a launch produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launched {
    /// The running VMM.
    pub runtime: VmRuntime,
    /// The launch digest, when this host's Secure Processor reports it to
    /// the host (the simulated one does; real SEV hardware reports it only
    /// in the guest's reports).
    pub launch_digest: Option<Vec<u8>>,
}

/// What a host found of one of its VMs after it restarted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Recovered {
    /// Its VMM still runs and was adopted.
    Running(VmRuntime),
    /// It is gone, and why.
    Gone(String),
}

/// A part of a console log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsoleChunk {
    /// The bytes from the offset asked for.
    pub data: Vec<u8>,
    /// The log's length when read.
    pub length: u64,
}

/// What the coordinator asks of one host.
pub trait HostClient: Send + Sync + std::fmt::Debug {
    /// The host's name.
    fn name(&self) -> &str;

    /// Probes the hypervisor and the firmware again.
    fn probe(&self) -> Result<HostCapabilities, OpError>;

    /// Creates `vm`'s run folder and its empty disks.
    fn prepare(
        &self,
        vm: &VmId,
        disks: &[DiskRecord],
        progress: Progress<'_>,
    ) -> Result<(), OpError>;

    /// Launches a VM.
    fn launch(&self, request: &LaunchRequest, progress: Progress<'_>) -> Result<Launched, OpError>;

    /// Stops a VM; answers why it ended.
    fn stop(&self, vm: &VmId, runtime: &VmRuntime, mode: StopMode) -> Result<String, OpError>;

    /// Resets an ordinary (not confidential) VM in place.
    fn reset(&self, vm: &VmId, runtime: &VmRuntime) -> Result<(), OpError>;

    /// Removes `vm`'s files, overwriting its disks first when `wipe`.
    fn destroy(
        &self,
        vm: &VmId,
        disks: &[DiskRecord],
        wipe: bool,
        progress: Progress<'_>,
    ) -> Result<(), OpError>;

    /// Relays a tenant's nonce to the guest agent and its answer back.
    fn attest(
        &self,
        vm: &VmId,
        runtime: &VmRuntime,
        nonce: &[u8; NONCE_LEN],
    ) -> Result<AttestAnswer, OpError>;

    /// Up to `max` bytes of `vm`'s console log from `offset`.
    fn read_console(&self, vm: &VmId, offset: u64, max: usize) -> Result<ConsoleChunk, OpError>;

    /// The VMs this host runs, adopting those that survived a restart of
    /// its agent, and what became of the others it knew.
    fn recover(&self) -> Result<Vec<(VmId, Recovered)>, OpError>;

    /// Copies `vm`'s disks from the host `from` (its agent at
    /// `from_address`), resuming a copy cut off before, each disk checked
    /// end to end; answers the bytes copied.
    fn fetch_disks(
        &self,
        vm: &VmId,
        disks: &[DiskRecord],
        from: &str,
        from_address: &str,
        progress: Progress<'_>,
    ) -> Result<u64, OpError>;
}

/// Where a host gets the images it does not hold.
pub trait ImageSource: Send + Sync + std::fmt::Debug {
    /// Fetches `image`'s artifacts into `dir` (`<images>/<id>`), each
    /// checked by its sha256.
    fn fetch(&self, image: &LaunchImage, dir: &std::path::Path) -> Result<(), OpError>;
}

/// What a host tells the coordinator on its own.
pub trait PoolSink: Send + Sync + std::fmt::Debug {
    /// A VM's VMM ended without being asked: the guest powered off
    /// (`clean`), or it crashed.
    fn vm_exited(&self, vm: &VmId, clean: bool, reason: &str);

    /// The guest agent moved the attestation state.
    fn attestation(&self, vm: &VmId, attestation: &Attestation);

    /// Something worth keeping in the VM's events.
    fn event(&self, vm: &VmId, kind: &str, detail: &str);
}
