//! AMD certificate chains: the embedded roots (ARK, ASK, ASVK per product),
//! the VCEK and VLEK leaves with AMD's TCB and hwID extensions, revocation
//! lists, and the verification of a leaf up to a root.
//!
//! The roots a chain ends in always come from a [`TrustStore`]: certificates
//! that travel with evidence are never trusted as roots.

mod anchor;
mod builtin;
mod chain;
mod crl;
mod der;
mod endorsement;
mod table;

pub use anchor::{RootOrigin, TrustAnchor, TrustStore};
pub use chain::{CertValidity, ChainError, TrustedKey};
pub use crl::RevocationList;
pub use endorsement::{EndorsementKey, EndorsementKind};
pub use table::{encode_certificate_table, parse_certificate_table, CertTableError};

/// Why a certificate or revocation list cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Neither DER nor PEM of an X.509 certificate.
    #[error("not an X.509 certificate: {0}")]
    Parse(String),
    /// Not a CRL.
    #[error("not a certificate revocation list: {0}")]
    CrlParse(String),
    /// A certificate without AMD's extensions, or with malformed ones.
    #[error("certificate extension {oid}: {problem}")]
    Extension {
        /// The extension OID.
        oid: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A certificate that is not an SNP endorsement key.
    #[error("{0}")]
    NotEndorsementKey(String),
    /// A root bundle that lacks a certificate or holds a stranger.
    #[error("root bundle for {product}: {problem}")]
    RootBundle {
        /// Product the bundle is for.
        product: crate::Product,
        /// What is wrong.
        problem: String,
    },
    /// An OpenSSL operation failed.
    #[error("openssl: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
}

/// Parses one certificate from DER, or from PEM when it starts like PEM.
pub fn parse_certificate(bytes: &[u8]) -> Result<openssl::x509::X509, CertError> {
    let parsed = if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        openssl::x509::X509::from_pem(bytes)
    } else {
        openssl::x509::X509::from_der(bytes)
    };
    parsed.map_err(|error| CertError::Parse(error.to_string()))
}

/// The common name of an X.509 name, if it has one.
pub(crate) fn common_name(name: &openssl::x509::X509NameRef) -> Option<String> {
    name.entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()
        .and_then(|entry| entry.data().to_string().ok())
}
