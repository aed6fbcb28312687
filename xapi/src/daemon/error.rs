//! What a daemon operation reports when it fails: a precise kind that maps
//! to one gRPC code, and a message for the caller. Internal details (paths,
//! OS errors) stay in the log.

use hsev_attestation::firmware::FirmwareError;

use crate::hypervisor::DriverError;
use crate::store::StoreError;

/// The kinds of failure, one per gRPC code the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request is malformed (a field out of range, an unknown image).
    InvalidArgument,
    /// No such VM, image or host (or not the caller's).
    NotFound,
    /// The name is taken.
    AlreadyExists,
    /// Valid, but not now or not here (wrong state, host cannot do it).
    FailedPrecondition,
    /// The caller's role may not do this.
    PermissionDenied,
    /// A wait ran out.
    DeadlineExceeded,
    /// A service this host depends on (the key broker) cannot be reached;
    /// retrying later may work.
    Unavailable,
    /// Something on the host failed.
    Internal,
}

/// A failed operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    /// Its kind.
    pub kind: Kind,
    /// What the caller reads.
    pub message: String,
}

impl OpError {
    /// An error of `kind`.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        OpError {
            kind,
            message: message.into(),
        }
    }

    /// INVALID_ARGUMENT.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Kind::InvalidArgument, message)
    }

    /// FAILED_PRECONDITION.
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(Kind::FailedPrecondition, message)
    }

    /// UNAVAILABLE.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Kind::Unavailable, message)
    }

    /// INTERNAL.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Kind::Internal, message)
    }
}

impl From<StoreError> for OpError {
    fn from(error: StoreError) -> Self {
        let kind = match &error {
            StoreError::NotFound { .. } => Kind::NotFound,
            StoreError::Conflict { .. } => Kind::AlreadyExists,
            StoreError::InUse { .. } | StoreError::WrongState { .. } => Kind::FailedPrecondition,
            StoreError::Ambiguous { .. } | StoreError::Invalid { .. } => Kind::InvalidArgument,
            StoreError::Busy { .. }
            | StoreError::Unavailable { .. }
            | StoreError::Unconfirmed { .. }
            | StoreError::NotLeader { .. }
            | StoreError::Contended { .. } => Kind::Unavailable,
            _ => Kind::Internal,
        };
        OpError::new(kind, error.to_string())
    }
}

impl From<crate::launch::LaunchError> for OpError {
    fn from(error: crate::launch::LaunchError) -> Self {
        match error {
            crate::launch::LaunchError::UnknownVcpuType(_) => OpError::invalid(error.to_string()),
            crate::launch::LaunchError::Measurement(_) => OpError::precondition(error.to_string()),
            crate::launch::LaunchError::Read { .. } => OpError::internal(error.to_string()),
        }
    }
}

impl From<DriverError> for OpError {
    fn from(error: DriverError) -> Self {
        OpError::internal(error.to_string())
    }
}

impl From<FirmwareError> for OpError {
    fn from(error: FirmwareError) -> Self {
        let kind = match &error {
            FirmwareError::PolicyRefused { .. } => Kind::InvalidArgument,
            FirmwareError::NoFreeAsid(_)
            | FirmwareError::IdBlock(_)
            | FirmwareError::SnpDisabled
            | FirmwareError::Unsupported(_) => Kind::FailedPrecondition,
            _ => Kind::Internal,
        };
        OpError::new(kind, error.to_string())
    }
}

impl From<OpError> for tonic::Status {
    fn from(error: OpError) -> Self {
        let code = match error.kind {
            Kind::InvalidArgument => tonic::Code::InvalidArgument,
            Kind::NotFound => tonic::Code::NotFound,
            Kind::AlreadyExists => tonic::Code::AlreadyExists,
            Kind::FailedPrecondition => tonic::Code::FailedPrecondition,
            Kind::PermissionDenied => tonic::Code::PermissionDenied,
            Kind::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            Kind::Unavailable => tonic::Code::Unavailable,
            Kind::Internal => tonic::Code::Internal,
        };
        tonic::Status::new(code, error.message)
    }
}
