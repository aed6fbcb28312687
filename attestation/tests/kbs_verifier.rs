//! The key broker's verifier on real AMD evidence: the Genoa report goes
//! through exactly the code `/attest` and `/resource` run, its own
//! report_data standing for the runtime-data binding.

mod support;

use hsev_attestation::certs::RootOrigin;
use hsev_attestation::kbs::protocol::{Attestation, RuntimeData, TeePubKey};
use hsev_attestation::kbs::server::config::Mode;
use hsev_attestation::kbs::server::evidence::{primary_evidence, EvidenceError, EvidenceVerifier};
use hsev_attestation::policy::AppraisalPolicy;
use hsev_attestation::report::SnpEvidence;
use hsev_attestation::Product;
use support::{read, PINNED};

fn genoa() -> (serde_json::Value, SnpEvidence) {
    let bytes = read("genoa-v3-json.evidence.json");
    let value = serde_json::from_slice(&bytes).expect("JSON");
    (value, SnpEvidence::from_json(&bytes).expect("evidence"))
}

/// The bare form (the evidence object itself) as `tee-evidence`.
fn bare(value: &serde_json::Value) -> String {
    value.to_string()
}

#[test]
fn genoa_evidence_is_released_only_with_its_measurement() {
    let (value, evidence) = genoa();
    let report = &evidence.report;
    // As the guest sends it: the composite tee-evidence of kbs-types 0.4.0.
    let attestation = Attestation::new(
        RuntimeData {
            nonce: "unused".into(),
            tee_pubkey: TeePubKey::EC {
                crv: "P-256".into(),
                alg: "ECDH-ES+A256KW".into(),
                x: String::new(),
                y: String::new(),
            },
        },
        value,
    );
    let tee_evidence = attestation.tee_evidence.to_string();
    let verifier = EvidenceVerifier::new(Mode::Production, Vec::new());
    let attested = verifier
        .verify(
            primary_evidence(&tee_evidence).expect("composite"),
            &report.report_data,
            PINNED,
        )
        .expect("real Genoa evidence is genuine");
    assert_eq!(attested.origin(), RootOrigin::Amd);
    assert_eq!(attested.product(), Product::Genoa);

    let policy = AppraisalPolicy::default();
    verifier
        .appraise_release(&attested, &policy, &[report.measurement], PINNED)
        .expect("released with its measurement as reference value");
    let failures = verifier
        .appraise_release(&attested, &policy, &[[0xaa; 48]], PINNED)
        .expect_err("refused with another measurement");
    assert_eq!(
        failures.iter().map(|check| check.name).collect::<Vec<_>>(),
        ["measurement"]
    );
    assert!(failures[0]
        .detail
        .contains(&hex::encode(report.measurement)));
    let failures = verifier
        .appraise_release(&attested, &policy, &[], PINNED)
        .expect_err("refused with no reference value at all");
    assert!(failures.iter().any(|check| check.name == "measurement"));
}

#[test]
fn genoa_evidence_bound_to_other_runtime_data_is_refused() {
    let (value, evidence) = genoa();
    let verifier = EvidenceVerifier::new(Mode::Production, Vec::new());
    let mut other = evidence.report.report_data;
    other[0] ^= 1;
    match verifier.verify(&bare(&value), &other, PINNED) {
        Err(EvidenceError::Refused(failures)) => {
            let names: Vec<&str> = failures.iter().map(|check| check.name).collect();
            assert_eq!(names, ["report_data"]);
        }
        other => panic!("expected a report_data refusal, got {other:?}"),
    }
    // Certificates expire: judged at the moment given, never cached.
    let later = time::macros::datetime!(2040-01-01 00:00 UTC);
    match verifier.verify(&bare(&value), &evidence.report.report_data, later) {
        Err(EvidenceError::Refused(failures)) => {
            assert!(failures
                .iter()
                .any(|check| check.name == "certificate_validity"));
        }
        other => panic!("expected an expiry refusal, got {other:?}"),
    }
}
