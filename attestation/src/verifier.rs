//! The verifier: is a report genuine, and is it acceptable under a policy?
//!
//! Every check runs, whatever fails before it, so an [`Appraisal`] names
//! every reason a report is refused. A [`VerifiedReport`] exists only for a
//! report that passed them all.

use serde::Serialize;
use time::OffsetDateTime;

use crate::certs::{
    ChainError, EndorsementKey, EndorsementKind, RevocationList, RootOrigin, TrustStore, TrustedKey,
};
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
    let mut checks = Checks(Vec::with_capacity(24));
    let (product, origin) = match key {
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
            check_endorsement(&mut checks, report, key, policy, at);
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

/// The checks that bind the report to its endorsement key.
fn check_endorsement(
    checks: &mut Checks,
    report: &AttestationReport,
    key: &TrustedKey,
    policy: &AppraisalPolicy,
    at: OffsetDateTime,
) {
    if key.signs(report) {
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
