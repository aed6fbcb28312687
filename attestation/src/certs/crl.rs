//! Certificate revocation lists, as AMD's KDS publishes them per product
//! (signed by the ARK, listing revoked ASKs and ASVKs).

use openssl::x509::{CrlStatus, X509Crl, X509};

use super::CertError;

/// A parsed CRL. Its signature is checked against an ARK when used.
pub struct RevocationList {
    pub(crate) crl: X509Crl,
}

impl std::fmt::Debug for RevocationList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationList")
            .field("issuer", &super::common_name(self.crl.issuer_name()))
            .finish_non_exhaustive()
    }
}

impl RevocationList {
    /// Parses a CRL from DER, or PEM when it starts like PEM.
    pub fn parse(bytes: &[u8]) -> Result<Self, CertError> {
        let crl = if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
            X509Crl::from_pem(bytes)
        } else {
            X509Crl::from_der(bytes)
        };
        crl.map(|crl| RevocationList { crl })
            .map_err(|error| CertError::CrlParse(error.to_string()))
    }

    /// Whether the list names `certificate` (by issuer and serial).
    pub(crate) fn revokes(&self, certificate: &X509) -> bool {
        !matches!(self.crl.get_by_cert(certificate), CrlStatus::NotRevoked)
    }

    /// The CRL in DER.
    pub fn to_der(&self) -> Result<Vec<u8>, CertError> {
        Ok(self.crl.to_der()?)
    }
}
