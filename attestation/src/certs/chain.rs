//! Verifying an endorsement key up to a trust anchor.

use openssl::bn::BigNum;
use openssl::ec::EcKey;
use openssl::ecdsa::EcdsaSig;
use openssl::pkey::Public;
use openssl::x509::X509;
use serde::Serialize;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{EndorsementKey, EndorsementKind, RevocationList, RootOrigin, TrustAnchor, TrustStore};
use crate::product::Product;
use crate::report::{AttestationReport, TcbVersion};

/// Why an endorsement key does not chain to a trusted root.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The leaf's issuer names no known product.
    #[error("issuer {0:?} is not an AMD SEV signing key of a known product")]
    UnknownIssuer(String),
    /// The leaf belongs to another product than the report or caller says.
    #[error("the {kind} is issued for {found}, but the report is from {expected}")]
    WrongProduct {
        /// The kind of leaf.
        kind: EndorsementKind,
        /// The product the caller or report names.
        expected: Product,
        /// The product the certificate chain names.
        found: Product,
    },
    /// No trusted roots exist for the product.
    #[error("no trusted roots for {0}")]
    NoAnchor(Product),
    /// The leaf's signature does not verify with any trusted signer.
    #[error("the {kind} is not signed by the trusted {signer} of {product}")]
    BadSignature {
        /// The kind of leaf.
        kind: EndorsementKind,
        /// ASK or ASVK.
        signer: &'static str,
        /// The product.
        product: Product,
    },
    /// The CRL is not signed by the product's ARK.
    #[error("the CRL is not signed by the ARK of {0}")]
    CrlSignature(Product),
    /// The CRL revokes a certificate of the chain.
    #[error("the {0} is revoked by the CRL")]
    Revoked(&'static str),
    /// OpenSSL failed.
    #[error("openssl: {0}")]
    OpenSsl(String),
}

impl From<openssl::error::ErrorStack> for ChainError {
    fn from(error: openssl::error::ErrorStack) -> Self {
        ChainError::OpenSsl(error.to_string())
    }
}

/// The validity window of one certificate of a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertValidity {
    /// ARK, ASK, ASVK, VCEK or VLEK.
    pub certificate: &'static str,
    /// Start of validity.
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    /// End of validity.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
}

impl CertValidity {
    /// Whether `at` lies inside the window.
    pub fn contains(&self, at: OffsetDateTime) -> bool {
        self.not_before <= at && at <= self.not_after
    }
}

/// An endorsement key whose certificate chains to a trusted root. Built only
/// by [`TrustStore::verify`]; reusable for any number of reports.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    public_key: EcKey<Public>,
    /// The product of the chain.
    pub product: Product,
    /// AMD's roots or a simulated platform's.
    pub origin: RootOrigin,
    /// VCEK or VLEK.
    pub kind: EndorsementKind,
    /// The TCB the key was derived for.
    pub tcb: TcbVersion,
    /// The chip id the key belongs to (VCEK only).
    pub hw_id: Option<Vec<u8>>,
    /// Validity windows of every certificate of the chain, leaf last.
    pub validity: Vec<CertValidity>,
}

fn validity_of(certificate: &'static str, x509: &X509) -> Result<CertValidity, ChainError> {
    let der = x509.to_der()?;
    let (_, parsed) =
        X509Certificate::from_der(&der).map_err(|error| ChainError::OpenSsl(error.to_string()))?;
    Ok(CertValidity {
        certificate,
        not_before: parsed.validity().not_before.to_datetime(),
        not_after: parsed.validity().not_after.to_datetime(),
    })
}

/// The product named by an ASK or ASVK common name (`SEV-Milan`, `SEV-VLEK-Turin`).
fn issuer_product(kind: EndorsementKind, issuer: &str) -> Option<Product> {
    let name = match kind {
        EndorsementKind::Vcek => issuer.strip_prefix("SEV-")?,
        EndorsementKind::Vlek => issuer.strip_prefix("SEV-VLEK-")?,
    };
    name.parse().ok()
}

impl TrustStore {
    /// Verifies `leaf` up to a trusted root of its product. `product` is the
    /// product the caller or the report names, if any; the chain must agree.
    /// With a CRL, the CRL must be signed by the product's ARK and must not
    /// revoke the ASK or ASVK.
    pub fn verify(
        &self,
        leaf: &EndorsementKey,
        product: Option<Product>,
        crl: Option<&RevocationList>,
    ) -> Result<TrustedKey, ChainError> {
        let kind = leaf.kind;
        let chain_product = issuer_product(leaf.kind, &leaf.issuer_common_name)
            .ok_or_else(|| ChainError::UnknownIssuer(leaf.issuer_common_name.clone()))?;
        if let Some(expected) = product {
            if expected != chain_product {
                return Err(ChainError::WrongProduct {
                    kind,
                    expected,
                    found: chain_product,
                });
            }
        }
        let signer_name = match leaf.kind {
            EndorsementKind::Vcek => "ASK",
            EndorsementKind::Vlek => "ASVK",
        };
        let mut anchors = self.anchors_for(chain_product).peekable();
        if anchors.peek().is_none() {
            return Err(ChainError::NoAnchor(chain_product));
        }
        for anchor in anchors {
            let signer = match leaf.kind {
                EndorsementKind::Vcek => Some(&anchor.ask),
                EndorsementKind::Vlek => anchor.asvk.as_ref(),
            };
            let Some(signer) = signer else { continue };
            let signer_key = signer.public_key()?;
            if leaf.x509.verify(&signer_key)? {
                if let Some(crl) = crl {
                    check_revocation(anchor, signer, signer_name, crl)?;
                }
                return Ok(TrustedKey {
                    public_key: leaf.public_key.clone(),
                    product: chain_product,
                    origin: anchor.origin,
                    kind: leaf.kind,
                    tcb: leaf.tcb,
                    hw_id: leaf.hw_id.clone(),
                    validity: vec![
                        validity_of("ARK", &anchor.ark)?,
                        validity_of(signer_name, signer)?,
                        CertValidity {
                            certificate: match kind {
                                EndorsementKind::Vcek => "VCEK",
                                EndorsementKind::Vlek => "VLEK",
                            },
                            not_before: leaf.not_before,
                            not_after: leaf.not_after,
                        },
                    ],
                });
            }
        }
        Err(ChainError::BadSignature {
            kind,
            signer: signer_name,
            product: chain_product,
        })
    }
}

fn check_revocation(
    anchor: &TrustAnchor,
    signer: &X509,
    signer_name: &'static str,
    crl: &RevocationList,
) -> Result<(), ChainError> {
    let ark_key = anchor.ark.public_key()?;
    if !crl.crl.verify(&ark_key)? {
        return Err(ChainError::CrlSignature(anchor.product));
    }
    if crl.revokes(signer) {
        return Err(ChainError::Revoked(signer_name));
    }
    Ok(())
}

impl TrustedKey {
    /// Whether the report's ECDSA P-384 signature over its signed bytes
    /// verifies with this key.
    pub fn signs(&self, report: &AttestationReport) -> bool {
        let digest = openssl::sha::sha384(report.signed_bytes());
        let signature = BigNum::from_slice(&report.signature.r)
            .and_then(|r| Ok((r, BigNum::from_slice(&report.signature.s)?)))
            .and_then(|(r, s)| EcdsaSig::from_private_components(r, s));
        match signature {
            Ok(signature) => signature.verify(&digest, &self.public_key).unwrap_or(false),
            Err(_) => false,
        }
    }
}
