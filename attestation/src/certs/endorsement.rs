//! VCEK and VLEK certificates: the P-384 keys that sign reports, with the
//! TCB they were derived for and (VCEK) the chip they belong to.

use openssl::ec::EcKey;
use openssl::nid::Nid;
use openssl::pkey::Public;
use openssl::x509::X509;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{common_name, der, parse_certificate, CertError};
use crate::report::TcbVersion;

/// AMD's certificate extension OIDs (SEV-SNP VCEK specification).
mod oid {
    pub const PRODUCT_NAME: &str = "1.3.6.1.4.1.3704.1.2";
    pub const BOOTLOADER: &str = "1.3.6.1.4.1.3704.1.3.1";
    pub const TEE: &str = "1.3.6.1.4.1.3704.1.3.2";
    pub const SNP: &str = "1.3.6.1.4.1.3704.1.3.3";
    pub const MICROCODE: &str = "1.3.6.1.4.1.3704.1.3.8";
    pub const FMC: &str = "1.3.6.1.4.1.3704.1.3.9";
    pub const HW_ID: &str = "1.3.6.1.4.1.3704.1.4";
    pub const CSP_ID: &str = "1.3.6.1.4.1.3704.1.5";
}

/// Which kind of endorsement key a certificate holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndorsementKind {
    /// Versioned Chip Endorsement Key, signed by the ASK.
    Vcek,
    /// Versioned Loaded Endorsement Key, signed by the ASVK.
    Vlek,
}

impl std::fmt::Display for EndorsementKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EndorsementKind::Vcek => "VCEK",
            EndorsementKind::Vlek => "VLEK",
        })
    }
}

/// A parsed VCEK or VLEK certificate. Not trusted yet: see
/// [`super::TrustStore::verify`].
#[derive(Debug, Clone)]
pub struct EndorsementKey {
    pub(crate) x509: X509,
    pub(crate) public_key: EcKey<Public>,
    /// VCEK or VLEK.
    pub kind: EndorsementKind,
    /// The TCB the key was derived for.
    pub tcb: TcbVersion,
    /// The chip id the key belongs to (VCEK only; 8 bytes on Turin).
    pub hw_id: Option<Vec<u8>>,
    /// AMD's product name extension, e.g. `Milan-B0`.
    pub product_name: Option<String>,
    /// The cloud provider a VLEK was issued to.
    pub csp_id: Option<String>,
    /// Common name of the issuer (`SEV-Milan`, `SEV-VLEK-Genoa`, ...).
    pub issuer_common_name: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

fn extension_error(oid: &'static str, problem: impl Into<String>) -> CertError {
    CertError::Extension {
        oid,
        problem: problem.into(),
    }
}

fn timestamp(time: x509_parser::time::ASN1Time) -> OffsetDateTime {
    time.to_datetime()
}

impl EndorsementKey {
    /// Parses a VCEK or VLEK certificate (DER or PEM).
    pub fn parse(bytes: &[u8]) -> Result<Self, CertError> {
        let x509 = parse_certificate(bytes)?;
        let der = x509.to_der()?;
        let (_, parsed) =
            X509Certificate::from_der(&der).map_err(|error| CertError::Parse(error.to_string()))?;

        let subject = common_name(x509.subject_name()).unwrap_or_default();
        let kind = match subject.as_str() {
            "SEV-VCEK" => EndorsementKind::Vcek,
            "SEV-VLEK" => EndorsementKind::Vlek,
            other => {
                return Err(CertError::NotEndorsementKey(format!(
                    "certificate subject {other:?} is neither SEV-VCEK nor SEV-VLEK"
                )))
            }
        };

        let mut extensions = std::collections::HashMap::new();
        for extension in parsed.extensions() {
            extensions.insert(extension.oid.to_id_string(), extension.value);
        }
        let integer = |oid: &'static str| -> Result<Option<u8>, CertError> {
            extensions
                .get(oid)
                .map(|value| {
                    der::small_integer(value).map_err(|problem| extension_error(oid, problem))
                })
                .transpose()
        };
        let required = |oid: &'static str| -> Result<u8, CertError> {
            integer(oid)?.ok_or_else(|| extension_error(oid, "missing"))
        };
        let tcb = TcbVersion {
            fmc: integer(oid::FMC)?,
            bootloader: required(oid::BOOTLOADER)?,
            tee: required(oid::TEE)?,
            snp: required(oid::SNP)?,
            microcode: required(oid::MICROCODE)?,
        };
        let hw_id = extensions.get(oid::HW_ID).map(|value| value.to_vec());
        if kind == EndorsementKind::Vcek && hw_id.is_none() {
            return Err(extension_error(
                oid::HW_ID,
                "a VCEK must carry its chip's hwID",
            ));
        }
        let product_name = extensions
            .get(oid::PRODUCT_NAME)
            .map(|value| {
                der::ia5_string(value)
                    .map_err(|problem| extension_error(oid::PRODUCT_NAME, problem))
            })
            .transpose()?;
        let csp_id = extensions
            .get(oid::CSP_ID)
            .map(|value| {
                der::ia5_string(value).map_err(|problem| extension_error(oid::CSP_ID, problem))
            })
            .transpose()?;

        let public_key = x509
            .public_key()?
            .ec_key()
            .map_err(|_| CertError::NotEndorsementKey("endorsement key is not an EC key".into()))?;
        if public_key.group().curve_name() != Some(Nid::SECP384R1) {
            return Err(CertError::NotEndorsementKey(
                "endorsement key is not on curve P-384".into(),
            ));
        }

        Ok(EndorsementKey {
            public_key,
            kind,
            tcb,
            hw_id,
            product_name,
            csp_id,
            issuer_common_name: common_name(x509.issuer_name()).unwrap_or_default(),
            not_before: timestamp(parsed.validity().not_before),
            not_after: timestamp(parsed.validity().not_after),
            x509,
        })
    }

    /// The certificate in DER.
    pub fn to_der(&self) -> Result<Vec<u8>, CertError> {
        Ok(self.x509.to_der()?)
    }
}
