//! Shared helpers for the attestation integration tests: the real AMD
//! evidence, and a private test PKI in AMD's certificate format for the
//! report shapes no public vector shows (Turin v5, migration agents, CRLs).

#![allow(dead_code)]

pub mod pki;

use hsev_attestation::certs::{EndorsementKey, TrustStore};
use hsev_attestation::report::{AttestationReport, EvidenceCertificate, SnpEvidence};
use time::OffsetDateTime;

/// The moment the vectors are judged at: inside every validity window.
pub const PINNED: OffsetDateTime = time::macros::datetime!(2025-06-01 00:00 UTC);

/// The bytes of a file under the evidence's `reports/` folder.
pub fn read(name: &str) -> Vec<u8> {
    hsev_e2e::snp_report_file(name)
}

/// A real vector: its raw report bytes and its endorsement certificate.
pub struct Vector {
    pub name: &'static str,
    pub report: Vec<u8>,
    pub certificate: Vec<u8>,
}

/// Every real report with its certificate (the JSON one converted to raw).
pub fn vectors() -> Vec<Vector> {
    let mut vectors: Vec<Vector> = [
        ("milan-v2-a", "vcek"),
        ("milan-v2-b", "vcek"),
        ("milan-v2-c", "vcek"),
        ("milan-v3-vlek", "vlek"),
    ]
    .into_iter()
    .map(|(name, key)| Vector {
        name,
        report: read(&format!("{name}.report.bin")),
        certificate: read(&format!("{name}.{key}.der")),
    })
    .collect();
    let evidence = SnpEvidence::from_json(&read("genoa-v3-json.evidence.json"))
        .expect("genoa evidence parses");
    let certificate = evidence
        .certificates
        .iter()
        .find_map(|certificate| match certificate {
            EvidenceCertificate::Vcek(der) => Some(der.clone()),
            _ => None,
        })
        .expect("genoa evidence carries its VCEK");
    vectors.push(Vector {
        name: "genoa-v3-json",
        report: evidence.report.as_bytes().to_vec(),
        certificate,
    });
    vectors
}

/// Parses and appraises report bytes with a certificate; `None` when either
/// fails to parse (which is also a refusal).
pub fn appraise_bytes(
    store: &TrustStore,
    report: &[u8],
    certificate: &[u8],
    policy: &hsev_attestation::policy::AppraisalPolicy,
    at: OffsetDateTime,
) -> Option<hsev_attestation::verifier::Appraisal> {
    let report = AttestationReport::from_bytes(report).ok()?;
    let key = EndorsementKey::parse(certificate).ok()?;
    Some(hsev_attestation::verifier::appraise(
        store, &report, &key, None, None, policy, at,
    ))
}
