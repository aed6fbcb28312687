//! The broker's refusals and failures: one variant per reason, each with
//! the Trustee error type it is answered as and its HTTP status.
//!
//! The guest protocol answers as Trustee's KBS does: 401 for every
//! authentication, attestation, token or policy refusal, 404 for a path
//! that names nothing. The admin API is this broker's own: its bad request
//! bodies answer 400. A failure of the broker itself (store, audit log,
//! encryption) answers 500, and a full session table 503, so that a client
//! knows a retry can help; Trustee answers those 401 too. So does a
//! single-instance resource another live launch holds (503 `PolicyDeny`):
//! waiting for that lease to lapse can help. A valid admin
//! token outside its scope answers 403 (`AdminAuthAccess`, as Trustee names
//! every admin refusal).
//!
//! An error's message is its RFC 7807 `detail`: it names what is wrong and
//! never carries a secret.

use crate::kbs::protocol::ErrorKind;

/// A refusal or failure of a broker command.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// `/auth` or `/attest` refused: the request, the protocol version or
    /// TEE, the session, the key, the init-data or the evidence.
    #[error("{0}")]
    Attestation(String),
    /// A resource request with neither an attested session nor a token.
    #[error("{0}")]
    NoToken(String),
    /// A bearer token this broker did not issue, or no longer honours.
    #[error("{0}")]
    BadToken(String),
    /// The resource's release policy refuses the guest (each failed check
    /// named).
    #[error("{0}")]
    PolicyDeny(String),
    /// A path that names nothing: malformed, or no such resource or
    /// reference-value set.
    #[error("{0}")]
    NotFound(String),
    /// An endpoint this broker does not serve.
    #[error("{0}")]
    NoEndpoint(String),
    /// The admin API's bearer token is missing or unknown.
    #[error("{0}")]
    AdminAuth(String),
    /// A valid admin token whose scope does not cover the call (another
    /// tenant's repository, or anything but an announcement for the
    /// operator).
    #[error("{0}")]
    Forbidden(String),
    /// An admin request body that does not deserialize or make sense.
    #[error("{0}")]
    InvalidBody(String),
    /// A release policy that does not parse or cannot be used.
    #[error("{0}")]
    InvalidPolicy(String),
    /// Reference values that cannot be registered or named.
    #[error("{0}")]
    InvalidReferenceValues(String),
    /// Too many sessions at once: retry later.
    #[error("{0}")]
    Busy(String),
    /// A single-instance resource another live launch holds: retry once
    /// its lease may have lapsed.
    #[error("{0}")]
    Held(String),
    /// The resource could not be encrypted to the guest's key.
    #[error("{0}")]
    Jwe(String),
    /// The broker failed (store, audit log): nothing was released.
    #[error("{0}")]
    Internal(String),
}

impl BrokerError {
    /// The Trustee error type it is answered as.
    pub fn kind(&self) -> ErrorKind {
        match self {
            BrokerError::Attestation(_) | BrokerError::Busy(_) => ErrorKind::AttestationError,
            BrokerError::NoToken(_) => ErrorKind::TokenNotFound,
            BrokerError::BadToken(_) => ErrorKind::TokenVerifierError,
            BrokerError::PolicyDeny(_) | BrokerError::Held(_) => ErrorKind::PolicyDeny,
            BrokerError::NotFound(_) => ErrorKind::InvalidRequestPath,
            BrokerError::NoEndpoint(_) => ErrorKind::PluginNotFound,
            BrokerError::AdminAuth(_) | BrokerError::Forbidden(_) => ErrorKind::AdminAuthAccess,
            BrokerError::InvalidBody(_) => ErrorKind::SerdeError,
            BrokerError::InvalidPolicy(_) => ErrorKind::ParsePolicyError,
            BrokerError::InvalidReferenceValues(_) => ErrorKind::RvpsError,
            BrokerError::Jwe(_) => ErrorKind::JweError,
            BrokerError::Internal(_) => ErrorKind::PluginInternalError,
        }
    }

    /// The HTTP status it is answered with (see the module documentation).
    pub fn status(&self) -> u16 {
        match self {
            BrokerError::InvalidBody(_)
            | BrokerError::InvalidPolicy(_)
            | BrokerError::InvalidReferenceValues(_) => 400,
            BrokerError::Forbidden(_) => 403,
            BrokerError::Busy(_) | BrokerError::Held(_) => 503,
            BrokerError::Jwe(_) | BrokerError::Internal(_) => 500,
            other => other.kind().trustee_status(),
        }
    }

    /// Whether the broker failed, rather than refused.
    pub fn is_failure(&self) -> bool {
        self.status() >= 500 && !matches!(self, BrokerError::Held(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_protocol_answers_as_trustee() {
        for (error, status, name) in [
            (
                BrokerError::Attestation(String::new()),
                401,
                "AttestationError",
            ),
            (BrokerError::NoToken(String::new()), 401, "TokenNotFound"),
            (
                BrokerError::BadToken(String::new()),
                401,
                "TokenVerifierError",
            ),
            (BrokerError::PolicyDeny(String::new()), 401, "PolicyDeny"),
            (
                BrokerError::NotFound(String::new()),
                404,
                "InvalidRequestPath",
            ),
            (
                BrokerError::NoEndpoint(String::new()),
                404,
                "PluginNotFound",
            ),
            (
                BrokerError::AdminAuth(String::new()),
                401,
                "AdminAuthAccess",
            ),
        ] {
            assert_eq!(error.status(), status, "{name}");
            assert_eq!(error.kind().name(), name);
            assert_eq!(error.kind().trustee_status(), status, "{name}");
        }
        assert_eq!(BrokerError::InvalidBody(String::new()).status(), 400);
        let forbidden = BrokerError::Forbidden(String::new());
        assert_eq!(forbidden.status(), 403);
        assert_eq!(forbidden.kind().name(), "AdminAuthAccess");
        assert!(BrokerError::Internal(String::new()).is_failure());
        assert!(BrokerError::Busy(String::new()).is_failure());
        assert!(!BrokerError::PolicyDeny(String::new()).is_failure());
        let held = BrokerError::Held(String::new());
        assert_eq!((held.status(), held.kind().name()), (503, "PolicyDeny"));
        assert!(!held.is_failure());
    }
}
