//! The verifier: is a report genuine, and is it acceptable under a policy?
//!
//! Every check runs, whatever fails before it, so an [`Appraisal`] names
//! every reason a report is refused. A [`VerifiedReport`] exists only for a
//! report that passed them all.
//!
//! The costly steps can be done once and reused: a [`ChainCache`] keeps
//! verified endorsement chains by certificate, and a [`SignedEvidence`]
//! carries a report whose signature was checked once, to be appraised
//! against any number of policies ([`appraise_signed`]) without another
//! P-384 verification, as a key broker does for each resource it releases.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Serialize;
use time::OffsetDateTime;

use crate::certs::{
    ChainError, EndorsementKey, EndorsementKind, RevocationList, RootOrigin, TrustStore, TrustedKey,
};
use crate::hex_bytes::HexBytes;
use crate::policy::{AbiVersion, AppraisalPolicy};
use crate::product::Product;
use crate::report::{AttestationReport, SigningKey};

/// The outcome of one named check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable name of the check (`signature`, `debug`, `minimum_tcb.snp`, ...).
    pub name: &'static str,
    /// Whether the report passed.
    pub passed: bool,
    /// What was found, and on failure why it is refused.
    pub detail: String,
}

/// Every check run on a report, and the report.
#[derive(Debug, Clone, Serialize)]
pub struct Appraisal {
    accepted: bool,
    product: Option<Product>,
    origin: Option<RootOrigin>,
    checks: Vec<Check>,
    report: AttestationReport,
}

/// A report that is genuine and acceptable under the policy it was
/// appraised with. Only [`Appraisal::into_verified`] builds one.
#[derive(Debug, Clone)]
pub struct VerifiedReport {
    report: AttestationReport,
    product: Product,
    origin: RootOrigin,
}

impl VerifiedReport {
    /// The report.
    pub fn report(&self) -> &AttestationReport {
        &self.report
    }

    /// The product its chain belongs to.
    pub fn product(&self) -> Product {
        self.product
    }

    /// Whether the chain ends in AMD's roots or a simulated platform's.
    pub fn origin(&self) -> RootOrigin {
        self.origin
    }
}

impl Appraisal {
    /// Whether every check passed.
    pub fn accepted(&self) -> bool {
        self.accepted
    }

    /// The product of the verified chain, if it verified.
    pub fn product(&self) -> Option<Product> {
        self.product
    }

    /// Whose roots the chain ends in, if it verified.
    pub fn origin(&self) -> Option<RootOrigin> {
        self.origin
    }

    /// Every check, in the order run.
    pub fn checks(&self) -> &[Check] {
        &self.checks
    }

    /// The checks that failed.
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|check| !check.passed)
    }

    /// The check named `name`, if it ran.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|check| check.name == name)
    }

    /// The report appraised.
    pub fn report(&self) -> &AttestationReport {
        &self.report
    }

    /// The verified report if accepted, else the appraisal back.
    pub fn into_verified(self) -> Result<VerifiedReport, Box<Appraisal>> {
        match (self.accepted, self.product, self.origin) {
            (true, Some(product), Some(origin)) => Ok(VerifiedReport {
                report: self.report,
                product,
                origin,
            }),
            _ => Err(Box::new(self)),
        }
    }
}

/// Checks accumulate here; the appraisal is accepted only if all pass.
struct Checks(Vec<Check>);

impl Checks {
    fn record(&mut self, name: &'static str, passed: bool, detail: impl Into<String>) {
        self.0.push(Check {
            name,
            passed,
            detail: detail.into(),
        });
    }
}

/// Verifies the endorsement key's chain, then appraises the report with it.
pub fn appraise(
    store: &TrustStore,
    report: &AttestationReport,
    leaf: &EndorsementKey,
    product: Option<Product>,
    crl: Option<&RevocationList>,
    policy: &AppraisalPolicy,
    at: OffsetDateTime,
) -> Appraisal {
    let product = product.or_else(|| report.product());
    let key = store.verify(leaf, product, crl);
    appraise_with_key(report, key.as_ref(), policy, at)
}

/// Appraises a report with an endorsement key whose chain was verified
/// before (or failed to verify: then every other check still runs).
pub fn appraise_with_key(
    report: &AttestationReport,
    key: Result<&TrustedKey, &ChainError>,
    policy: &AppraisalPolicy,
    at: OffsetDateTime,
) -> Appraisal {
    appraise_signed(&SignedEvidence::check(report.clone(), key), policy, at)
}

/// A report with the outcome of its chain and signature verification,
/// done once by [`SignedEvidence::check`]. It proves nothing by itself:
/// only an [`Appraisal`] of it says whether it is acceptable.
#[derive(Debug, Clone)]
pub struct SignedEvidence {
    report: AttestationReport,
    key: Result<TrustedKey, ChainError>,
    signature_verified: bool,
}

impl SignedEvidence {
    /// Verifies the report's signature with `key` (if its chain verified).
    pub fn check(report: AttestationReport, key: Result<&TrustedKey, &ChainError>) -> Self {
        let signature_verified = key.is_ok_and(|key| key.signs(&report));
        SignedEvidence {
            report,
            key: key.cloned().map_err(Clone::clone),
            signature_verified,
        }
    }

    /// The report.
    pub fn report(&self) -> &AttestationReport {
        &self.report
    }

    /// The endorsement key, or why its chain did not verify.
    pub fn key(&self) -> Result<&TrustedKey, &ChainError> {
        self.key.as_ref()
    }

    /// Whether the chain verified and the key signed the report.
    pub fn signature_verified(&self) -> bool {
        self.signature_verified
    }
}

/// Appraises evidence whose signature was checked before: exactly the
/// checks and outcome of [`appraise_with_key`], without the P-384 verify.
pub fn appraise_signed(
    evidence: &SignedEvidence,
    policy: &AppraisalPolicy,
    at: OffsetDateTime,
) -> Appraisal {
    let report = &evidence.report;
    let mut checks = Checks(Vec::with_capacity(24));
    let (product, origin) = match evidence.key.as_ref() {
        Ok(key) => {
            checks.record(
                "certificate_chain",
                true,
                format!(
                    "{} chain of {} ({} roots)",
                    key.kind,
                    key.product.amd_name(),
                    match key.origin {
                        RootOrigin::Amd => "AMD",
                        RootOrigin::Simulated => "simulated",
                    }
                ),
            );
            check_endorsement(
                &mut checks,
                report,
                key,
                evidence.signature_verified,
                policy,
                at,
            );
            (Some(key.product), Some(key.origin))
        }
        Err(error) => {
            checks.record("certificate_chain", false, error.to_string());
            checks.record(
                "signature",
                false,
                "not checked: no trusted endorsement key",
            );
            (None, None)
        }
    };
    check_platform(&mut checks, report, product, policy);
    check_guest(&mut checks, report, policy);
    let accepted = checks.0.iter().all(|check| check.passed);
    Appraisal {
        accepted,
        product,
        origin,
        checks: checks.0,
        report: report.clone(),
    }
}

/// Most chains a [`ChainCache`] keeps; past it, it starts afresh.
const CHAIN_CACHE_CAPACITY: usize = 4096;

/// Verified endorsement chains, by SHA-256 of the certificate's DER (and
/// of the CRL's, if any): a verifier that sees the same chip again and
/// again checks its chain (RSA-4096 signatures) and parses its certificate
/// once. Only chains that verified are kept; the validity windows are
/// judged at each appraisal, never cached.
#[derive(Debug)]
pub struct ChainCache {
    stores: Vec<TrustStore>,
    verified: Mutex<HashMap<[u8; 32], TrustedKey>>,
}

/// Why a certificate cannot be used as an endorsement key.
#[derive(Debug, thiserror::Error)]
pub enum CachedChainError {
    /// The certificate does not parse as a VCEK or VLEK.
    #[error("the endorsement certificate: {0}")]
    Certificate(#[from] crate::certs::CertError),
    /// The certificate does not chain to a trusted root.
    #[error(transparent)]
    Chain(#[from] ChainError),
}

impl ChainCache {
    /// A cache over `stores`, tried in order: the first store a chain
    /// verifies in wins; when none does, the first store's reason is given.
    /// (A [`TrustStore`] holds one anchor per product and origin: several
    /// simulated platforms of one product each need their own store.)
    pub fn new(stores: Vec<TrustStore>) -> Self {
        ChainCache {
            stores,
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// The trusted key of the VCEK or VLEK `certificate_der`, verified up
    /// to a root once and then served from the cache. `product` (the
    /// report's, if it names one) must agree with the chain's.
    pub fn verify(
        &self,
        certificate_der: &[u8],
        product: Option<Product>,
        crl: Option<(&[u8], &RevocationList)>,
    ) -> Result<TrustedKey, CachedChainError> {
        let mut hasher = openssl::sha::Sha256::new();
        hasher.update(certificate_der);
        if let Some((crl_der, _)) = crl {
            hasher.update(b"crl");
            hasher.update(crl_der);
        }
        let digest = hasher.finish();
        let cached = self.entries().get(&digest).cloned();
        let key = match cached {
            Some(key) => key,
            None => {
                let leaf = EndorsementKey::parse(certificate_der)?;
                let list = crl.map(|(_, list)| list);
                let mut first_error = None;
                let mut verified = None;
                for store in &self.stores {
                    match store.verify(&leaf, None, list) {
                        Ok(key) => {
                            verified = Some(key);
                            break;
                        }
                        Err(error) => {
                            first_error.get_or_insert(error);
                        }
                    }
                }
                let key = match (verified, first_error) {
                    (Some(key), _) => key,
                    (None, Some(error)) => return Err(error.into()),
                    (None, None) => {
                        return Err(ChainError::UnknownIssuer(leaf.issuer_common_name).into())
                    }
                };
                let mut entries = self.entries();
                if entries.len() >= CHAIN_CACHE_CAPACITY {
                    entries.clear();
                }
                entries.insert(digest, key.clone());
                key
            }
        };
        match product {
            Some(expected) if expected != key.product => Err(ChainError::WrongProduct {
                kind: key.kind,
                expected,
                found: key.product,
            }
            .into()),
            _ => Ok(key),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], TrustedKey>> {
        // Entries are inserted whole: a panic elsewhere cannot leave one
        // half-written, so a poisoned lock is still consistent.
        self.verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The checks that bind the report to its endorsement key.
fn check_endorsement(
    checks: &mut Checks,
    report: &AttestationReport,
    key: &TrustedKey,
    signature_verified: bool,
    policy: &AppraisalPolicy,
    at: OffsetDateTime,
) {
    if signature_verified {
        checks.record("signature", true, format!("signed by the {}", key.kind));
    } else {
        checks.record(
            "signature",
            false,
            format!("the report signature does not verify with the {}", key.kind),
        );
    }

    let expired: Vec<String> = key
        .validity
        .iter()
        .filter(|window| !window.contains(at))
        .map(|window| {
            format!(
                "{} valid {} .. {}",
                window.certificate,
                window.not_before.date(),
                window.not_after.date()
            )
        })
        .collect();
    if expired.is_empty() {
        checks.record(
            "certificate_validity",
            true,
            format!("every certificate is valid at {}", at.date()),
        );
    } else {
        checks.record(
            "certificate_validity",
            false,
            format!("not valid at {}: {}", at.date(), expired.join("; ")),
        );
    }

    let expected_signer = match key.kind {
        EndorsementKind::Vcek => SigningKey::Vcek,
        EndorsementKind::Vlek => SigningKey::Vlek,
    };
    checks.record(
        "signing_key",
        report.key_info.signing_key == expected_signer && !report.key_info.mask_chip_key,
        format!(
            "report key_info names the {}{}, the certificate is a {}",
            report.key_info.signing_key,
            if report.key_info.mask_chip_key {
                " with the chip key masked"
            } else {
                ""
            },
            key.kind
        ),
    );
    checks.record(
        "allowed_signing_key",
        policy.allowed_signing_keys.contains(&key.kind),
        format!(
            "{} allowed: {}",
            key.kind,
            policy
                .allowed_signing_keys
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );

    checks.record(
        "tcb_binding",
        key.tcb == report.reported_tcb,
        format!(
            "certificate TCB [{}], report reported_tcb [{}]",
            key.tcb, report.reported_tcb
        ),
    );

    if let Some(hw_id) = &key.hw_id {
        let length = key.product.hw_id_len();
        let matches =
            hw_id.len() == length && report.chip_id.get(..length) == Some(hw_id.as_slice());
        checks.record(
            "chip_id_binding",
            matches,
            if matches {
                "the VCEK's hwID equals the report's chip_id".to_owned()
            } else {
                format!(
                    "the VCEK's hwID {} differs from the report's chip_id {}",
                    hex::encode(hw_id),
                    hex::encode(&report.chip_id[..length.min(64)])
                )
            },
        );
    }

    match key.origin {
        RootOrigin::Amd => checks.record("simulated_evidence", true, "chain ends in AMD's roots"),
        RootOrigin::Simulated => checks.record(
            "simulated_evidence",
            policy.allow_simulated,
            if policy.allow_simulated {
                "simulated AMD Secure Processor, allowed by the policy: no confidentiality"
            } else {
                "simulated AMD Secure Processor evidence gives no confidentiality; refused unless the policy sets allow_simulated = true"
            },
        ),
    }
}

/// Checks on the platform: product, TCB floor, SMT, chip.
fn check_platform(
    checks: &mut Checks,
    report: &AttestationReport,
    product: Option<Product>,
    policy: &AppraisalPolicy,
) {
    if !policy.allowed_products.is_empty() {
        checks.record(
            "product",
            product.is_some_and(|product| policy.allowed_products.contains(&product)),
            format!(
                "product {:?}, allowed {:?}",
                product, policy.allowed_products
            ),
        );
    }

    let tcb = report.reported_tcb;
    let floor = policy.minimum_tcb;
    let components: [(&'static str, Option<u8>, Option<u8>); 5] = [
        ("minimum_tcb.fmc", floor.fmc, tcb.fmc),
        (
            "minimum_tcb.bootloader",
            floor.bootloader,
            Some(tcb.bootloader),
        ),
        ("minimum_tcb.tee", floor.tee, Some(tcb.tee)),
        ("minimum_tcb.snp", floor.snp, Some(tcb.snp)),
        (
            "minimum_tcb.microcode",
            floor.microcode,
            Some(tcb.microcode),
        ),
    ];
    for (name, minimum, actual) in components {
        // A floor on fmc binds only products whose TCB has an fmc field.
        if let (Some(minimum), Some(actual)) = (minimum, actual) {
            checks.record(
                name,
                actual >= minimum,
                format!("reported {actual}, minimum {minimum}"),
            );
        }
    }

    if policy.require_smt_disabled {
        checks.record(
            "smt",
            !report.platform_info.smt_enabled(),
            format!(
                "platform SMT {}",
                if report.platform_info.smt_enabled() {
                    "enabled, the policy requires it disabled"
                } else {
                    "disabled"
                }
            ),
        );
    }

    if !policy.allowed_chip_ids.is_empty() {
        checks.record(
            "chip_id",
            policy
                .allowed_chip_ids
                .iter()
                .any(|allowed| allowed.0 == report.chip_id),
            format!("chip_id {}", hex::encode(report.chip_id)),
        );
    }
}

/// Checks on the guest: its policy, VMPL, measurement and bound data.
/// The launch's ID key (or author key) digest against the policy's list,
/// when it has one. A launch without an ID block reports zeros, which no
/// key hashes to.
fn check_key_digest(
    checks: &mut Checks,
    name: &'static str,
    what: &str,
    reported: &[u8; 48],
    allowed: &[HexBytes<48>],
) {
    if allowed.is_empty() {
        return;
    }
    let (passed, detail) = if reported == &[0; 48] {
        (false, format!("the launch was signed by no {what}"))
    } else {
        let passed = allowed.iter().any(|digest| &digest.0 == reported);
        (
            passed,
            format!(
                "{what} {} {}",
                hex::encode(reported),
                if passed {
                    "is allowed"
                } else {
                    "is not among the allowed ones"
                }
            ),
        )
    };
    checks.record(name, passed, detail);
}

fn check_guest(checks: &mut Checks, report: &AttestationReport, policy: &AppraisalPolicy) {
    let guest_policy = report.policy;
    checks.record(
        "debug",
        policy.allow_debug || !guest_policy.debug_allowed(),
        if guest_policy.debug_allowed() {
            format!(
                "guest policy {:#x} allows debugging: the host can read and change guest memory",
                guest_policy.raw()
            )
        } else {
            "guest policy forbids debugging".to_owned()
        },
    );
    checks.record(
        "migration_agent",
        policy.allow_migration_agent || !guest_policy.migrate_ma_allowed(),
        format!(
            "guest policy {} a migration agent",
            if guest_policy.migrate_ma_allowed() {
                "allows"
            } else {
                "forbids"
            }
        ),
    );
    if policy.require_single_socket {
        checks.record(
            "single_socket",
            guest_policy.single_socket_required(),
            format!(
                "guest policy {} the guest to one socket",
                if guest_policy.single_socket_required() {
                    "restricts"
                } else {
                    "does not restrict"
                }
            ),
        );
    }
    if let Some(minimum) = policy.minimum_abi {
        let required = AbiVersion {
            major: guest_policy.abi_major(),
            minor: guest_policy.abi_minor(),
        };
        checks.record(
            "minimum_abi",
            required >= minimum,
            format!("guest policy requires ABI {required}, minimum {minimum}"),
        );
    }
    checks.record(
        "vmpl",
        policy.allowed_vmpls.contains(&report.vmpl),
        format!("VMPL {}, allowed {:?}", report.vmpl, policy.allowed_vmpls),
    );
    if !policy.allowed_measurements.is_empty() {
        let allowed = policy
            .allowed_measurements
            .iter()
            .any(|measurement| measurement.0 == report.measurement);
        checks.record(
            "measurement",
            allowed,
            format!(
                "measurement {} {}",
                hex::encode(report.measurement),
                if allowed {
                    "is allowed"
                } else {
                    "is not among the allowed measurements"
                }
            ),
        );
    }
    check_key_digest(
        checks,
        "id_key",
        "ID key",
        &report.id_key_digest,
        &policy.allowed_id_key_digests,
    );
    check_key_digest(
        checks,
        "author_key",
        "author key",
        &report.author_key_digest,
        &policy.allowed_author_key_digests,
    );
    if let Some(minimum) = policy.minimum_guest_svn {
        checks.record(
            "guest_svn",
            report.guest_svn >= minimum,
            format!("guest SVN {}, minimum {minimum}", report.guest_svn),
        );
    }
    if let Some(expected) = policy.report_data {
        checks.record(
            "report_data",
            expected.0 == report.report_data,
            format!("report_data {}", hex::encode(report.report_data)),
        );
    }
    if let Some(expected) = policy.host_data {
        checks.record(
            "host_data",
            expected.0 == report.host_data,
            format!("host_data {}", hex::encode(report.host_data)),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::firmware::simulated::{SimInit, SimulatedFirmware};
    use crate::firmware::{GuestRequest, GuestResponse, LaunchFinish};

    #[test]
    fn signed_evidence_is_appraised_like_appraise_with_key_and_chains_are_cached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = SimInit {
            rsa_bits: Some(2048),
            ..SimInit::default()
        };
        let firmware = Arc::new(SimulatedFirmware::init(dir.path(), &options).expect("platform"));
        let guest = SimulatedFirmware::launch_with_digest(
            &firmware,
            0x30000,
            [0x42; 48],
            &LaunchFinish::default(),
        )
        .expect("launch");
        let Ok(GuestResponse::Report(raw)) = guest.request(&GuestRequest::Report {
            report_data: [7; 64],
            vmpl: 0,
        }) else {
            panic!("report")
        };
        let report = AttestationReport::from_bytes(&raw).expect("parses");
        let anchor = firmware.roots().anchor().expect("anchor");
        let cache = ChainCache::new(vec![
            TrustStore::amd(),
            TrustStore::empty().with_anchor(anchor),
        ]);
        let key = cache
            .verify(firmware.vcek_der(), report.product(), None)
            .expect("chain verifies");
        assert_eq!(key.origin, RootOrigin::Simulated);
        let again = cache
            .verify(firmware.vcek_der(), report.product(), None)
            .expect("cached");
        assert_eq!(again.tcb, key.tcb);
        let other_product = if report.product() == Some(Product::Milan) {
            Product::Genoa
        } else {
            Product::Milan
        };
        assert!(matches!(
            cache.verify(firmware.vcek_der(), Some(other_product), None),
            Err(CachedChainError::Chain(ChainError::WrongProduct { .. }))
        ));

        let at = OffsetDateTime::now_utc();
        let signed = SignedEvidence::check(report.clone(), Ok(&key));
        assert!(signed.signature_verified());
        for policy in [
            AppraisalPolicy::default(),
            AppraisalPolicy {
                allow_simulated: true,
                ..AppraisalPolicy::default()
            },
            AppraisalPolicy {
                allow_simulated: true,
                allowed_measurements: vec![crate::HexBytes([0x43; 48])],
                ..AppraisalPolicy::default()
            },
        ] {
            let once = appraise_signed(&signed, &policy, at);
            let direct = appraise_with_key(&report, Ok(&key), &policy, at);
            assert_eq!(once.accepted(), direct.accepted());
            assert_eq!(once.checks(), direct.checks());
        }

        let mut tampered = raw.clone();
        tampered[0x50] ^= 1; // report_data
        let tampered = AttestationReport::from_bytes(&tampered).expect("parses");
        let signed = SignedEvidence::check(tampered, Ok(&key));
        assert!(!signed.signature_verified());
        let policy = AppraisalPolicy {
            allow_simulated: true,
            ..AppraisalPolicy::default()
        };
        let appraisal = appraise_signed(&signed, &policy, at);
        assert!(!appraisal.accepted());
        assert_eq!(
            appraisal.failures().next().map(|check| check.name),
            Some("signature")
        );
    }
}
