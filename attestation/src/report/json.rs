//! The JSON evidence form of the Trustee KBS protocol for SEV-SNP:
//! `{"attestation_report": {...}, "cert_chain": [{"cert_type": "VCEK", "data": [...]}]}`,
//! the serde form of the virtee `sev` crate's report and certificate table.
//!
//! The JSON carries fields, not bytes: it is written back into the raw
//! layout and parsed by the same strict parser as binary reports, so the
//! signature is checked over exactly what the hardware signed.

use serde::Deserialize;

use super::{
    AttestationReport, Cpuid, FirmwareVersion, KeyInfo, ReportError, ReportWriter, TcbVersion,
    SIGNATURE_COMPONENT_LEN,
};
use crate::product::{Product, TcbLayout};

/// Why a JSON document is not SNP evidence.
#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    /// Not JSON of the expected shape.
    #[error("not SNP evidence JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A byte array field has the wrong length.
    #[error("field {field} has {actual} bytes, expected {expected}")]
    FieldLength {
        /// The field name.
        field: &'static str,
        /// Its length.
        actual: usize,
        /// The length the layout demands.
        expected: usize,
    },
    /// A field value does not fit its raw encoding.
    #[error("field {field}: {problem}")]
    FieldValue {
        /// The field name.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The fields make no valid report.
    #[error(transparent)]
    Report(#[from] ReportError),
    /// A certificate table entry type this code does not know.
    #[error("unknown cert_chain entry type {0:?}")]
    UnknownCertType(String),
}

/// A certificate carried with the evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvidenceCertificate {
    /// AMD Root Key (ignored for trust: the embedded roots decide).
    Ark(Vec<u8>),
    /// AMD SEV Key (ignored for trust: the embedded roots decide).
    Ask(Vec<u8>),
    /// The chip's VCEK.
    Vcek(Vec<u8>),
    /// The provider's VLEK.
    Vlek(Vec<u8>),
    /// A certificate revocation list.
    Crl(Vec<u8>),
}

/// SNP evidence: a report and the certificates sent with it.
#[derive(Debug, Clone)]
pub struct SnpEvidence {
    /// The report, rebuilt in its raw layout and parsed.
    pub report: AttestationReport,
    /// The certificates of the evidence's cert_chain, in order.
    pub certificates: Vec<EvidenceCertificate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEvidence {
    attestation_report: JsonReport,
    #[serde(default)]
    cert_chain: Option<Vec<JsonCertificate>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonCertificate {
    cert_type: serde_json::Value,
    data: Vec<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonTcb {
    #[serde(default)]
    fmc: Option<u8>,
    bootloader: u8,
    tee: u8,
    snp: u8,
    microcode: u8,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonVersion {
    major: u8,
    minor: u8,
    build: u8,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonSignature {
    r: Vec<u8>,
    s: Vec<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonReport {
    version: u32,
    guest_svn: u32,
    policy: u64,
    family_id: Vec<u8>,
    image_id: Vec<u8>,
    vmpl: u32,
    sig_algo: u32,
    current_tcb: JsonTcb,
    plat_info: u64,
    key_info: u32,
    report_data: Vec<u8>,
    measurement: Vec<u8>,
    host_data: Vec<u8>,
    id_key_digest: Vec<u8>,
    author_key_digest: Vec<u8>,
    report_id: Vec<u8>,
    report_id_ma: Vec<u8>,
    reported_tcb: JsonTcb,
    #[serde(default)]
    cpuid_fam_id: Option<u8>,
    #[serde(default)]
    cpuid_mod_id: Option<u8>,
    #[serde(default)]
    cpuid_step: Option<u8>,
    chip_id: Vec<u8>,
    committed_tcb: JsonTcb,
    current: JsonVersion,
    committed: JsonVersion,
    launch_tcb: JsonTcb,
    #[serde(default)]
    launch_mit_vector: Option<u64>,
    #[serde(default)]
    current_mit_vector: Option<u64>,
    signature: JsonSignature,
}

fn fixed<const N: usize>(field: &'static str, bytes: &[u8]) -> Result<[u8; N], EvidenceError> {
    bytes.try_into().map_err(|_| EvidenceError::FieldLength {
        field,
        actual: bytes.len(),
        expected: N,
    })
}

impl From<&JsonTcb> for TcbVersion {
    fn from(tcb: &JsonTcb) -> Self {
        TcbVersion {
            fmc: tcb.fmc,
            bootloader: tcb.bootloader,
            tee: tcb.tee,
            snp: tcb.snp,
            microcode: tcb.microcode,
        }
    }
}

impl From<&JsonVersion> for FirmwareVersion {
    fn from(version: &JsonVersion) -> Self {
        FirmwareVersion {
            major: version.major,
            minor: version.minor,
            build: version.build,
        }
    }
}

impl JsonReport {
    fn cpuid(&self) -> Result<Option<Cpuid>, EvidenceError> {
        match (self.cpuid_fam_id, self.cpuid_mod_id, self.cpuid_step) {
            (None, None, None) => Ok(None),
            (Some(family), Some(model), Some(stepping)) => Ok(Some(Cpuid {
                family,
                model,
                stepping,
            })),
            _ => Err(EvidenceError::FieldValue {
                field: "cpuid_fam_id",
                problem:
                    "cpuid_fam_id, cpuid_mod_id and cpuid_step must all be present or all absent"
                        .into(),
            }),
        }
    }

    fn into_report(self) -> Result<AttestationReport, EvidenceError> {
        if self.sig_algo != super::SIGNATURE_ALGO_ECDSA_P384_SHA384 {
            return Err(ReportError::UnsupportedSignatureAlgorithm(self.sig_algo).into());
        }
        let cpuid = self.cpuid()?;
        let layout = match cpuid {
            Some(cpuid) if self.version >= 3 => Product::from_cpuid(cpuid.family, cpuid.model)
                .ok_or(ReportError::UnknownCpu {
                    family: cpuid.family,
                    model: cpuid.model,
                })?
                .tcb_layout(),
            _ => TcbLayout::Legacy,
        };
        let key_info = KeyInfo::decode(self.key_info)?;
        let mut writer = ReportWriter::new(self.version, layout);
        writer
            .guest(
                self.guest_svn,
                self.policy,
                &fixed("family_id", &self.family_id)?,
                &fixed("image_id", &self.image_id)?,
                self.vmpl,
            )
            .platform(self.plat_info, key_info)
            .contents(
                &fixed("report_data", &self.report_data)?,
                &fixed("measurement", &self.measurement)?,
                &fixed("host_data", &self.host_data)?,
            )
            .identities(
                &fixed("id_key_digest", &self.id_key_digest)?,
                &fixed("author_key_digest", &self.author_key_digest)?,
                &fixed("report_id", &self.report_id)?,
                &fixed("report_id_ma", &self.report_id_ma)?,
            )
            .chip_id(&fixed("chip_id", &self.chip_id)?)
            .firmware_versions((&self.current).into(), (&self.committed).into());
        writer.tcbs(
            &(&self.current_tcb).into(),
            &(&self.reported_tcb).into(),
            &(&self.committed_tcb).into(),
            &(&self.launch_tcb).into(),
        )?;
        if let Some(cpuid) = cpuid {
            writer.cpuid(cpuid);
        }
        if self.launch_mit_vector.is_some() || self.current_mit_vector.is_some() {
            writer.mitigation_vectors(
                self.launch_mit_vector.unwrap_or(0),
                self.current_mit_vector.unwrap_or(0),
            );
        }
        let r: [u8; SIGNATURE_COMPONENT_LEN] = fixed("signature.r", &self.signature.r)?;
        let s: [u8; SIGNATURE_COMPONENT_LEN] = fixed("signature.s", &self.signature.s)?;
        Ok(writer.finish_raw(&r, &s)?)
    }
}

impl JsonCertificate {
    fn into_certificate(self) -> Result<Option<EvidenceCertificate>, EvidenceError> {
        let kind = match &self.cert_type {
            serde_json::Value::String(kind) => kind.as_str(),
            // `{"OTHER": "<uuid>"}`: a vendor-specific entry, not ours to use.
            serde_json::Value::Object(map) if map.contains_key("OTHER") => return Ok(None),
            other => return Err(EvidenceError::UnknownCertType(other.to_string())),
        };
        Ok(Some(match kind {
            "ARK" => EvidenceCertificate::Ark(self.data),
            "ASK" => EvidenceCertificate::Ask(self.data),
            "VCEK" => EvidenceCertificate::Vcek(self.data),
            "VLEK" => EvidenceCertificate::Vlek(self.data),
            "CRL" => EvidenceCertificate::Crl(self.data),
            "Empty" => return Ok(None),
            other => return Err(EvidenceError::UnknownCertType(other.to_owned())),
        }))
    }
}

impl SnpEvidence {
    /// Parses the Trustee JSON evidence form.
    pub fn from_json(json: &[u8]) -> Result<Self, EvidenceError> {
        let evidence: JsonEvidence = serde_json::from_slice(json)?;
        let report = evidence.attestation_report.into_report()?;
        let mut certificates = Vec::new();
        for entry in evidence.cert_chain.unwrap_or_default() {
            if let Some(certificate) = entry.into_certificate()? {
                certificates.push(certificate);
            }
        }
        Ok(SnpEvidence {
            report,
            certificates,
        })
    }
}

fn tcb_json(tcb: &TcbVersion) -> serde_json::Value {
    serde_json::json!({
        "fmc": tcb.fmc,
        "bootloader": tcb.bootloader,
        "tee": tcb.tee,
        "snp": tcb.snp,
        "microcode": tcb.microcode,
    })
}

fn version_json(version: &FirmwareVersion) -> serde_json::Value {
    serde_json::json!({ "major": version.major, "minor": version.minor, "build": version.build })
}

/// The little-endian 72-byte form of a big-endian P-384 scalar.
fn signature_field(scalar: &[u8; 48]) -> Vec<u8> {
    let mut field: Vec<u8> = scalar.iter().rev().copied().collect();
    field.resize(SIGNATURE_COMPONENT_LEN, 0);
    field
}

impl SnpEvidence {
    /// The Trustee JSON evidence form, the inverse of [`Self::from_json`].
    pub fn to_json(&self) -> serde_json::Value {
        let report = &self.report;
        let cpuid = report.cpuid;
        let attestation_report = serde_json::json!({
            "version": report.version,
            "guest_svn": report.guest_svn,
            "policy": report.policy.raw(),
            "family_id": report.family_id,
            "image_id": report.image_id,
            "vmpl": report.vmpl,
            "sig_algo": super::SIGNATURE_ALGO_ECDSA_P384_SHA384,
            "current_tcb": tcb_json(&report.current_tcb),
            "plat_info": report.platform_info.0,
            "key_info": report.key_info.encode(),
            "report_data": report.report_data.to_vec(),
            "measurement": report.measurement.to_vec(),
            "host_data": report.host_data,
            "id_key_digest": report.id_key_digest.to_vec(),
            "author_key_digest": report.author_key_digest.to_vec(),
            "report_id": report.report_id,
            "report_id_ma": report.report_id_ma,
            "reported_tcb": tcb_json(&report.reported_tcb),
            "cpuid_fam_id": cpuid.map(|cpuid| cpuid.family),
            "cpuid_mod_id": cpuid.map(|cpuid| cpuid.model),
            "cpuid_step": cpuid.map(|cpuid| cpuid.stepping),
            "chip_id": report.chip_id.to_vec(),
            "committed_tcb": tcb_json(&report.committed_tcb),
            "current": version_json(&report.current_version),
            "committed": version_json(&report.committed_version),
            "launch_tcb": tcb_json(&report.launch_tcb),
            "signature": {
                "r": signature_field(&report.signature.r),
                "s": signature_field(&report.signature.s),
            },
        });
        let mut attestation_report = attestation_report;
        // v5 fields, absent from earlier versions' serde form.
        if let (Some(launch), Some(current), Some(map)) = (
            report.launch_mit_vector,
            report.current_mit_vector,
            attestation_report.as_object_mut(),
        ) {
            map.insert("launch_mit_vector".into(), launch.into());
            map.insert("current_mit_vector".into(), current.into());
        }
        let cert_chain: Vec<serde_json::Value> = self
            .certificates
            .iter()
            .map(|certificate| {
                let (kind, data) = match certificate {
                    EvidenceCertificate::Ark(data) => ("ARK", data),
                    EvidenceCertificate::Ask(data) => ("ASK", data),
                    EvidenceCertificate::Vcek(data) => ("VCEK", data),
                    EvidenceCertificate::Vlek(data) => ("VLEK", data),
                    EvidenceCertificate::Crl(data) => ("CRL", data),
                };
                serde_json::json!({ "cert_type": kind, "data": data })
            })
            .collect();
        serde_json::json!({ "attestation_report": attestation_report, "cert_chain": cert_chain })
    }
}
