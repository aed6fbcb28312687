//! The key broker's verifier on real AMD evidence: the Genoa report goes
//! through exactly the code `/attest` and `/resource` run, its own
//! report_data standing for the runtime-data binding.

mod support;

use hsev_attestation::certs::RootOrigin;
use hsev_attestation::kbs::init_data::InitDataDocument;
use hsev_attestation::kbs::protocol::composite_evidence;
use hsev_attestation::kbs::release_policy::{InitDataRequirement, ReleasePolicy};
use hsev_attestation::kbs::server::config::Mode;
use hsev_attestation::kbs::server::evidence::{EvidenceError, EvidenceVerifier};
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
    // As the guest sends it: the composite tee-evidence, whose primary
    // evidence the broker hands the verifier as JSON text.
    let tee_evidence = composite_evidence(value);
    let verifier = EvidenceVerifier::new(Mode::Production, Vec::new());
    let attested = verifier
        .verify(
            &tee_evidence.primary_evidence.to_string(),
            &report.report_data,
            None,
            PINNED,
        )
        .expect("real Genoa evidence is genuine");
    assert_eq!(attested.origin(), RootOrigin::Amd);
    assert_eq!(attested.product(), Product::Genoa);

    let policy = ReleasePolicy::default();
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
    match verifier.verify(&bare(&value), &other, None, PINNED) {
        Err(EvidenceError::Refused(failures)) => {
            let names: Vec<&str> = failures.iter().map(|check| check.name).collect();
            assert_eq!(names, ["report_data"]);
        }
        other => panic!("expected a report_data refusal, got {other:?}"),
    }
    // Certificates expire: judged at the moment given, never cached.
    let later = time::macros::datetime!(2040-01-01 00:00 UTC);
    match verifier.verify(&bare(&value), &evidence.report.report_data, None, later) {
        Err(EvidenceError::Refused(failures)) => {
            assert!(failures
                .iter()
                .any(|check| check.name == "certificate_validity"));
        }
        other => panic!("expected an expiry refusal, got {other:?}"),
    }
}

#[test]
fn init_data_must_be_the_reports_host_data_and_satisfy_the_policy() {
    let (value, evidence) = genoa();
    let verifier = EvidenceVerifier::new(Mode::Production, Vec::new());
    let text =
        "algorithm = \"sha384\"\nversion = \"0.1.0\"\n[data]\n\"vm.toml\" = \"name = 'vault'\"\n";
    let document = InitDataDocument::from_toml(text).expect("init-data");
    // This real report was launched with other host data.
    match verifier.verify(
        &bare(&value),
        &evidence.report.report_data,
        Some(document),
        PINNED,
    ) {
        Err(EvidenceError::Refused(failures)) => {
            let names: Vec<&str> = failures.iter().map(|check| check.name).collect();
            assert_eq!(names, ["init_data"]);
            assert!(
                failures[0]
                    .detail
                    .contains(&hex::encode(evidence.report.host_data)),
                "{}",
                failures[0].detail
            );
        }
        other => panic!("expected an init_data refusal, got {other:?}"),
    }
    // Without init-data the evidence attests, but a resource that
    // requires init-data is refused by name.
    let attested = verifier
        .verify(&bare(&value), &evidence.report.report_data, None, PINNED)
        .expect("attests");
    let policy = ReleasePolicy {
        init_data: Some(InitDataRequirement::default()),
        ..ReleasePolicy::default()
    };
    let failures = verifier
        .appraise_release(&attested, &policy, &[evidence.report.measurement], PINNED)
        .expect_err("init-data required");
    assert_eq!(
        failures.iter().map(|check| check.name).collect::<Vec<_>>(),
        ["init_data"]
    );
}
