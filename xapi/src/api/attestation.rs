//! Appraisals as `hsev.v1.AttestationVerdict` messages.

use hsev_attestation::certs::RootOrigin;
use hsev_attestation::verifier::Appraisal;
use hsev_proto::v1::{self, AttestationCheck, AttestationVerdict};

/// The API message of an appraisal: the verdict and every check.
pub fn verdict(appraisal: &Appraisal) -> AttestationVerdict {
    let report = appraisal.report();
    AttestationVerdict {
        accepted: appraisal.accepted(),
        product: appraisal
            .product()
            .map(|product| product.to_string())
            .unwrap_or_default(),
        origin: match appraisal.origin() {
            None => v1::RootOrigin::Unspecified,
            Some(RootOrigin::Amd) => v1::RootOrigin::Amd,
            Some(RootOrigin::Simulated) => v1::RootOrigin::Simulated,
        }
        .into(),
        checks: appraisal
            .checks()
            .iter()
            .map(|check| AttestationCheck {
                name: check.name.to_owned(),
                passed: check.passed,
                detail: check.detail.clone(),
            })
            .collect(),
        measurement: report.measurement.to_vec(),
        report_data: report.report_data.to_vec(),
        host_data: report.host_data.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hsev_attestation::certs::{EndorsementKey, TrustStore};
    use hsev_attestation::policy::AppraisalPolicy;
    use hsev_attestation::report::AttestationReport;
    use prost::Message;

    #[test]
    fn a_refusal_travels_with_every_check() {
        let report =
            AttestationReport::from_bytes(&hsev_e2e::snp_report_file("milan-v2-c.report.bin"))
                .expect("parses");
        let key = EndorsementKey::parse(&hsev_e2e::snp_report_file("milan-v2-c.vcek.der"))
            .expect("parses");
        let at = time::macros::datetime!(2025-06-01 00:00 UTC);
        let appraisal = hsev_attestation::verifier::appraise(
            &TrustStore::amd(),
            &report,
            &key,
            None,
            None,
            &AppraisalPolicy::default(),
            at,
        );
        let verdict = verdict(&appraisal);
        assert!(!verdict.accepted);
        assert_eq!(verdict.product, "milan");
        assert_eq!(verdict.origin(), v1::RootOrigin::Amd);
        assert_eq!(verdict.measurement, report.measurement.to_vec());
        let failed: Vec<&str> = verdict
            .checks
            .iter()
            .filter(|check| !check.passed)
            .map(|check| check.name.as_str())
            .collect();
        assert_eq!(failed, vec!["debug"]);

        let decoded =
            AttestationVerdict::decode(verdict.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(decoded, verdict);
    }
}
