//! The JSON arguments of the pool protocol's commands, their errors on the
//! wire (an [`OpError`] travels as a gRPC status of its own code and comes
//! back as the same kind), and the streaming of a long command's steps.

use std::pin::Pin;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_stream::Stream;
use tonic::Status;

use crate::daemon::error::{Kind, OpError};
use crate::hypervisor::StopMode;
use crate::model::{Attestation, DiskRecord, VmId, VmRuntime};
use hsev_proto::internal::Step;

/// A stream of steps.
pub type StepStream = Pin<Box<dyn Stream<Item = Result<Step, Status>> + Send>>;

/// `Prepare`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PrepareArgs {
    /// The VM.
    pub vm: VmId,
    /// Its disks.
    pub disks: Vec<DiskRecord>,
}

/// How to stop, on the wire.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireStopMode {
    /// ACPI, then force after this many milliseconds.
    Graceful {
        /// Milliseconds.
        timeout_ms: u64,
    },
    /// At once.
    Force,
}

impl From<StopMode> for WireStopMode {
    fn from(mode: StopMode) -> Self {
        match mode {
            StopMode::Graceful { timeout } => WireStopMode::Graceful {
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            },
            StopMode::Force => WireStopMode::Force,
        }
    }
}

impl From<WireStopMode> for StopMode {
    fn from(mode: WireStopMode) -> Self {
        match mode {
            WireStopMode::Graceful { timeout_ms } => StopMode::Graceful {
                timeout: std::time::Duration::from_millis(timeout_ms),
            },
            WireStopMode::Force => StopMode::Force,
        }
    }
}

/// `Stop`.
#[derive(Debug, Serialize, Deserialize)]
pub struct StopArgs {
    /// The VM.
    pub vm: VmId,
    /// Its VMM.
    pub runtime: VmRuntime,
    /// How.
    pub mode: WireStopMode,
}

/// `Reset`, `Attest`.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmAndRuntime {
    /// The VM.
    pub vm: VmId,
    /// Its VMM.
    pub runtime: VmRuntime,
    /// The tenant's nonce, hex (`Attest` only).
    #[serde(default)]
    pub nonce: String,
}

/// `Destroy`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DestroyArgs {
    /// The VM.
    pub vm: VmId,
    /// Its disks.
    pub disks: Vec<DiskRecord>,
    /// Overwrite them first.
    pub wipe: bool,
}

/// `FetchDisks`: copy a VM's disks from another host.
#[derive(Debug, Serialize, Deserialize)]
pub struct FetchDisksArgs {
    /// The VM.
    pub vm: VmId,
    /// Its disks.
    pub disks: Vec<DiskRecord>,
    /// The host that has them, and where its agent listens.
    pub from: String,
    /// Its agent's address.
    pub from_address: String,
}

/// What a host reports on its own (`Report`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolReport {
    /// A VMM ended without being asked.
    Exited {
        /// The VM.
        vm: VmId,
        /// The guest powered off.
        clean: bool,
        /// Why.
        reason: String,
    },
    /// The guest agent moved the attestation state.
    Attestation {
        /// The VM.
        vm: VmId,
        /// The state.
        attestation: Attestation,
    },
    /// An event for the VM's record.
    Event {
        /// The VM.
        vm: VmId,
        /// Its kind.
        kind: String,
        /// Its detail.
        detail: String,
    },
}

/// `value` as the JSON bytes of a message.
pub fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, Status> {
    serde_json::to_vec(value).map_err(|error| Status::internal(format!("encoding: {error}")))
}

/// A JSON payload, or INVALID_ARGUMENT naming what is wrong.
pub fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(bytes)
        .map_err(|error| Status::invalid_argument(format!("an unreadable payload: {error}")))
}

/// A status from a peer, as the operation error it was.
pub fn op_error(status: &Status) -> OpError {
    let kind = match status.code() {
        tonic::Code::InvalidArgument => Kind::InvalidArgument,
        tonic::Code::NotFound => Kind::NotFound,
        tonic::Code::AlreadyExists => Kind::AlreadyExists,
        tonic::Code::FailedPrecondition => Kind::FailedPrecondition,
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => Kind::PermissionDenied,
        tonic::Code::DeadlineExceeded => Kind::DeadlineExceeded,
        tonic::Code::Unavailable => Kind::Unavailable,
        _ => Kind::Internal,
    };
    OpError::new(kind, status.message())
}

/// The result of a step stream, forwarding every step to `progress`.
pub async fn follow_steps<T: DeserializeOwned>(
    mut stream: tonic::Streaming<Step>,
    progress: &(dyn Fn(&str, &str, u32) + Sync),
) -> Result<T, OpError> {
    while let Some(step) = stream.message().await.map_err(|status| op_error(&status))? {
        if !step.result.is_empty() {
            return serde_json::from_slice(&step.result)
                .map_err(|error| OpError::internal(format!("an unreadable result: {error}")));
        }
        progress(&step.step, &step.detail, step.percent);
    }
    Err(OpError::internal(
        "the host ended the command without a result",
    ))
}

/// Runs `call` off the runtime, streaming its progress as steps and its
/// result (or error) last.
pub fn stream_steps<T: Serialize + Send + 'static>(
    call: impl FnOnce(&(dyn Fn(&str, &str, u32) + Sync)) -> Result<T, OpError> + Send + 'static,
) -> StepStream {
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::task::spawn_blocking(move || {
        let progress_sender = sender.clone();
        let progress = move |step: &str, detail: &str, percent: u32| {
            let _ = progress_sender.send(Ok(Step {
                step: step.to_owned(),
                detail: detail.to_owned(),
                percent,
                result: Vec::new(),
            }));
        };
        let last = call(&progress)
            .map_err(Status::from)
            .and_then(|value| to_json(&value))
            .map(|result| Step {
                step: "done".to_owned(),
                detail: String::new(),
                percent: 100,
                result,
            });
        let _ = sender.send(last);
    });
    Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(
        receiver,
    ))
}
