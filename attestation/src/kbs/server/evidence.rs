//! The broker's verifier: SNP evidence in, an [`AttestedEvidence`] out, and
//! later the appraisal of that same evidence against each resource's
//! release policy.
//!
//! At `/attest` the chain (cached by certificate) and the report signature
//! are checked once, together with everything that makes the evidence
//! genuine and fresh: certificate validity, signing key, TCB and chip
//! binding, simulated origin, and `report_data` equal to the binding of the
//! runtime data, and init-data (when the guest presents one) whose digest
//! is the report's HOST_DATA. What the guest runs (measurement, debug
//! policy, host data, TCB floors, init-data entries...) is judged per
//! resource, by [`EvidenceVerifier::appraise_release`], with no second
//! P-384 verification.
//!
//! This module must never accept simulated evidence in production mode,
//! whatever a policy says, and never release anything itself.

use std::path::Path;

use time::OffsetDateTime;

use super::config::Mode;
use crate::certs::{RevocationList, RootOrigin, TrustAnchor, TrustStore};
use crate::firmware::simulated::SIMULATED_ORGANIZATION;
use crate::kbs::init_data::InitDataDocument;
use crate::kbs::release_policy::ReleasePolicy;
use crate::policy::AppraisalPolicy;
use crate::product::Product;
use crate::report::{EvidenceCertificate, SnpEvidence};
use crate::verifier::{appraise_signed, CachedChainError, ChainCache, Check, SignedEvidence};
use crate::HexBytes;

/// Why evidence is not accepted.
#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    /// Not SNP evidence, or without an endorsement certificate.
    #[error("tee-evidence: {0}")]
    Malformed(String),
    /// Evidence that fails checks; every failed one is listed.
    #[error("{}", describe_failures(.0))]
    Refused(Vec<Check>),
    /// A simulated platform's roots that cannot be used.
    #[error("simulated root {path}: {problem}")]
    SimulatedRoot {
        /// The file or folder from the configuration.
        path: String,
        /// What is wrong.
        problem: String,
    },
}

/// `name: detail; name: detail` of every failed check.
pub fn describe_failures(failures: &[Check]) -> String {
    failures
        .iter()
        .map(|check| format!("{}: {}", check.name, check.detail))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Evidence that passed every check of `/attest`: genuine, fresh, bound
/// to the session's runtime data and to the init-data presented. Only
/// [`EvidenceVerifier::verify`] makes one.
#[derive(Debug, Clone)]
pub struct AttestedEvidence {
    signed: SignedEvidence,
    binding: [u8; 64],
    product: Product,
    origin: RootOrigin,
    init_data: Option<InitDataDocument>,
}

impl AttestedEvidence {
    /// The init-data the guest presented, its digest checked against the
    /// report's HOST_DATA.
    pub fn init_data(&self) -> Option<&InitDataDocument> {
        self.init_data.as_ref()
    }

    /// The verified report and its key.
    pub fn signed(&self) -> &SignedEvidence {
        &self.signed
    }

    /// The product of the chain.
    pub fn product(&self) -> Product {
        self.product
    }

    /// AMD's roots or a simulated platform's.
    pub fn origin(&self) -> RootOrigin {
        self.origin
    }
}

/// Reads a simulated platform's roots: a PEM bundle (ARK + ASK [+ ASVK])
/// or a simulated platform's folder (its `ark.pem`, `ask.pem`, `asvk.pem`).
pub fn load_simulated_root(path: &Path) -> Result<TrustAnchor, EvidenceError> {
    let problem = |problem: String| EvidenceError::SimulatedRoot {
        path: path.display().to_string(),
        problem,
    };
    let pem = if path.is_dir() {
        let mut pem = Vec::new();
        for name in ["ark.pem", "ask.pem", "asvk.pem"] {
            let file = path.join(name);
            match std::fs::read(&file) {
                Ok(bytes) => pem.extend_from_slice(&bytes),
                Err(error)
                    if name == "asvk.pem" && error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(problem(format!("{}: {error}", file.display()))),
            }
        }
        pem
    } else {
        std::fs::read(path).map_err(|error| problem(error.to_string()))?
    };
    TrustAnchor::from_pem_bundle_of_any_product(RootOrigin::Simulated, &pem)
        .map_err(|error| problem(error.to_string()))
}

/// Whether a certificate says it comes from HyperSEV's simulated Secure
/// Processor. Used only to explain a refusal, never to accept anything.
fn names_simulated_platform(certificate_der: &[u8]) -> bool {
    openssl::x509::X509::from_der(certificate_der).is_ok_and(|certificate| {
        certificate
            .issuer_name()
            .entries_by_nid(openssl::nid::Nid::ORGANIZATIONNAME)
            .any(|entry| {
                entry
                    .data()
                    .to_string()
                    .is_ok_and(|name| name == SIMULATED_ORGANIZATION)
            })
    })
}

fn failed(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        passed: false,
        detail: detail.into(),
    }
}

/// The broker's evidence verifier; shared by every request.
#[derive(Debug)]
pub struct EvidenceVerifier {
    mode: Mode,
    chains: ChainCache,
}

impl EvidenceVerifier {
    /// A verifier trusting AMD's roots and, in development mode only, the
    /// `simulated` platforms' roots.
    pub fn new(mode: Mode, simulated: Vec<TrustAnchor>) -> Self {
        let mut stores = vec![TrustStore::amd()];
        if mode == Mode::Development {
            stores.extend(
                simulated
                    .into_iter()
                    .map(|anchor| TrustStore::empty().with_anchor(anchor)),
            );
        }
        EvidenceVerifier {
            mode,
            chains: ChainCache::new(stores),
        }
    }

    /// Verifies the JSON text of SNP evidence in Trustee's form (the
    /// composite evidence's `primary_evidence`) whose `report_data` must
    /// equal `expected_binding` and, with `init_data`, whose HOST_DATA must
    /// be that document's digest, judging certificate validity at `at`.
    /// This is the whole of what `/attest` decides about the evidence; the
    /// text is parsed once, straight into the report.
    pub fn verify(
        &self,
        snp_evidence: &str,
        expected_binding: &[u8; 64],
        init_data: Option<InitDataDocument>,
        at: OffsetDateTime,
    ) -> Result<AttestedEvidence, EvidenceError> {
        let evidence = SnpEvidence::from_json(snp_evidence.as_bytes())
            .map_err(|error| EvidenceError::Malformed(error.to_string()))?;
        let mut leaf = None;
        let mut crl = None;
        for certificate in &evidence.certificates {
            match certificate {
                EvidenceCertificate::Vcek(der) | EvidenceCertificate::Vlek(der) => {
                    leaf.get_or_insert(der.as_slice());
                }
                EvidenceCertificate::Crl(der) => {
                    crl.get_or_insert(der.as_slice());
                }
                EvidenceCertificate::Ark(_) | EvidenceCertificate::Ask(_) => {}
            }
        }
        let leaf = leaf.ok_or_else(|| {
            EvidenceError::Malformed(
                "cert_chain carries no VCEK or VLEK: the broker cannot verify the report".into(),
            )
        })?;
        let crl = crl
            .map(|der| {
                RevocationList::parse(der)
                    .map(|list| (der, list))
                    .map_err(|error| EvidenceError::Malformed(format!("cert_chain CRL: {error}")))
            })
            .transpose()?;
        let report = evidence.report;
        let key = match self.chains.verify(
            leaf,
            report.product(),
            crl.as_ref().map(|(der, list)| (*der, list)),
        ) {
            Ok(key) => Ok(key),
            Err(CachedChainError::Chain(error)) => Err(error),
            Err(error @ CachedChainError::Certificate(_)) => {
                return Err(EvidenceError::Malformed(format!("cert_chain: {error}")))
            }
        };
        let signed = SignedEvidence::check(report, key.as_ref());

        // Genuine and fresh; what the guest runs is each resource's call.
        let session_policy = AppraisalPolicy {
            allow_debug: true,
            allow_migration_agent: true,
            allow_simulated: self.mode == Mode::Development,
            report_data: Some(HexBytes(*expected_binding)),
            ..AppraisalPolicy::default()
        };
        let appraisal = appraise_signed(&signed, &session_policy, at);
        let mut failures: Vec<Check> = appraisal.failures().cloned().collect();
        if self.mode == Mode::Production && signed.key().is_err() && names_simulated_platform(leaf)
        {
            failures.push(failed(
                "simulated_evidence",
                format!(
                    "the endorsement certificate is issued by a simulated AMD Secure Processor ({SIMULATED_ORGANIZATION}): refused in production mode, whatever a resource policy says"
                ),
            ));
        }
        if let Some(document) = &init_data {
            let expected = document.host_data();
            let host_data = signed.report().host_data;
            if expected != host_data {
                failures.push(failed(
                    "init_data",
                    format!(
                        "the init-data digest ({}, cut to 32 bytes) is {}, but the report's HOST_DATA is {}: the guest was not launched with this init-data",
                        document.algorithm.as_ref(),
                        hex::encode(expected),
                        hex::encode(host_data)
                    ),
                ));
            }
        }
        match (failures.is_empty(), appraisal.product(), appraisal.origin()) {
            (true, Some(product), Some(origin)) => Ok(AttestedEvidence {
                signed,
                binding: *expected_binding,
                product,
                origin,
                init_data,
            }),
            _ => Err(EvidenceError::Refused(failures)),
        }
    }

    /// Appraises attested evidence against a resource's release `policy`,
    /// the resource accepting `policy.appraisal.allowed_measurements` and
    /// the `reference_measurements` of its sets. A resource that accepts no
    /// measurement at all is never released. Every failed check is
    /// returned.
    pub fn appraise_release(
        &self,
        attested: &AttestedEvidence,
        policy: &ReleasePolicy,
        reference_measurements: &[[u8; 48]],
        at: OffsetDateTime,
    ) -> Result<(), Vec<Check>> {
        let mut effective = policy.appraisal.clone();
        effective
            .allowed_measurements
            .extend(reference_measurements.iter().copied().map(HexBytes));
        effective.report_data = Some(HexBytes(attested.binding));
        if self.mode == Mode::Production {
            effective.allow_simulated = false;
        }
        let appraisal = appraise_signed(&attested.signed, &effective, at);
        let mut failures: Vec<Check> = appraisal.failures().cloned().collect();
        if effective.allowed_measurements.is_empty() {
            failures.push(failed(
                "measurement",
                format!(
                    "measurement {}: the resource accepts no measurement (no reference value registered): it is never released",
                    hex::encode(attested.signed.report().measurement)
                ),
            ));
        }
        if self.mode == Mode::Production && attested.origin == RootOrigin::Simulated {
            failures.push(failed(
                "simulated_evidence",
                "simulated evidence is refused in production mode, whatever the resource policy says",
            ));
        }
        if let Some(requirement) = &policy.init_data {
            match &attested.init_data {
                None => failures.push(failed(
                    "init_data",
                    "the release policy requires init-data bound to HOST_DATA; the guest presented none",
                )),
                Some(document) => {
                    for (key, expected) in &requirement.data {
                        match document.data.get(key) {
                            None => failures.push(failed(
                                "init_data",
                                format!("init-data has no data entry {key:?}, which the release policy requires"),
                            )),
                            Some(value) if value != expected => failures.push(failed(
                                "init_data",
                                format!("init-data entry {key:?} differs from the release policy's"),
                            )),
                            Some(_) => {}
                        }
                    }
                }
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(failures)
        }
    }
}
