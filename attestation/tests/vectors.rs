//! Every real AMD vector gets the verdict its README gives, and any single
//! changed byte of a report, its signature or its certificate is refused.

mod support;

use hsev_attestation::certs::{EndorsementKey, EndorsementKind, RootOrigin, TrustStore};
use hsev_attestation::policy::AppraisalPolicy;
use hsev_attestation::report::AttestationReport;
use hsev_attestation::Product;
use support::{appraise_bytes, read, vectors, PINNED};

fn failures(name: &str, policy: &AppraisalPolicy, at: time::OffsetDateTime) -> Vec<&'static str> {
    let vector = vectors()
        .into_iter()
        .find(|vector| vector.name == name)
        .expect("known vector");
    let appraisal = appraise_bytes(
        &TrustStore::amd(),
        &vector.report,
        &vector.certificate,
        policy,
        at,
    )
    .expect("vector parses");
    appraisal.failures().map(|check| check.name).collect()
}

#[test]
fn valid_vectors_are_accepted_under_the_default_policy() {
    for name in ["milan-v2-a", "milan-v2-b", "milan-v3-vlek", "genoa-v3-json"] {
        assert_eq!(
            failures(name, &AppraisalPolicy::default(), PINNED),
            Vec::<&str>::new(),
            "{name}"
        );
    }
}

#[test]
fn milan_v2_a_has_the_documented_tcb_and_product() {
    let report = AttestationReport::from_bytes(&read("milan-v2-a.report.bin")).expect("parses");
    let key = EndorsementKey::parse(&read("milan-v2-a.vcek.der")).expect("parses");
    let trusted = TrustStore::amd()
        .verify(&key, None, None)
        .expect("chains to AMD");
    assert_eq!(trusted.product, Product::Milan);
    assert_eq!(trusted.origin, RootOrigin::Amd);
    assert_eq!(trusted.kind, EndorsementKind::Vcek);
    let tcb = report.reported_tcb;
    assert_eq!(
        (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode),
        (3, 0, 8, 115)
    );
}

#[test]
fn milan_v2_c_is_refused_for_debug_alone() {
    assert_eq!(
        failures("milan-v2-c", &AppraisalPolicy::default(), PINNED),
        vec!["debug"]
    );
    let lenient = AppraisalPolicy {
        allow_debug: true,
        ..AppraisalPolicy::default()
    };
    assert_eq!(failures("milan-v2-c", &lenient, PINNED), Vec::<&str>::new());
}

#[test]
fn the_vlek_report_is_valid_only_inside_the_vlek_validity() {
    let policy = AppraisalPolicy::default();
    assert!(failures(
        "milan-v3-vlek",
        &policy,
        time::macros::datetime!(2025-06-01 00:00 UTC)
    )
    .is_empty());
    assert_eq!(
        failures(
            "milan-v3-vlek",
            &policy,
            time::macros::datetime!(2026-11-22 00:00 UTC)
        ),
        vec!["certificate_validity"]
    );
    assert_eq!(
        failures(
            "milan-v3-vlek",
            &policy,
            time::macros::datetime!(2024-12-01 00:00 UTC)
        ),
        vec!["certificate_validity"]
    );
}

#[test]
fn a_v2_report_with_the_wrong_product_is_refused() {
    let report = AttestationReport::from_bytes(&read("milan-v2-a.report.bin")).expect("parses");
    let key = EndorsementKey::parse(&read("milan-v2-a.vcek.der")).expect("parses");
    let appraisal = hsev_attestation::verifier::appraise(
        &TrustStore::amd(),
        &report,
        &key,
        Some(Product::Genoa),
        None,
        &AppraisalPolicy::default(),
        PINNED,
    );
    assert!(!appraisal.accepted());
    let chain = appraisal.check("certificate_chain").expect("chain checked");
    assert!(chain.detail.contains("genoa"), "{}", chain.detail);
}

#[test]
fn a_vcek_of_another_chip_is_refused() {
    let report = read("milan-v2-a.report.bin");
    let other_chip = read("milan-v2-b.vcek.der");
    let appraisal = appraise_bytes(
        &TrustStore::amd(),
        &report,
        &other_chip,
        &AppraisalPolicy::default(),
        PINNED,
    )
    .expect("parses");
    let failed: Vec<_> = appraisal.failures().map(|check| check.name).collect();
    assert!(failed.contains(&"signature"), "{failed:?}");
    assert!(failed.contains(&"chip_id_binding"), "{failed:?}");
}

#[test]
fn the_turin_vcek_chains_to_amds_turin_roots() {
    let key = EndorsementKey::parse(&read("turin.vcek.der")).expect("parses");
    assert!(key.tcb.fmc.is_some(), "Turin VCEKs carry an fmc TCB field");
    assert_eq!(
        key.hw_id.as_ref().map(Vec::len),
        Some(8),
        "Turin hwIDs are 8 bytes"
    );
    let trusted = TrustStore::amd()
        .verify(&key, Some(Product::Turin), None)
        .expect("chains");
    assert_eq!(trusted.product, Product::Turin);
    assert!(trusted
        .validity
        .iter()
        .all(|window| window.contains(PINNED)));
}

#[test]
fn every_single_byte_change_is_refused() {
    let store = TrustStore::amd();
    let policy = AppraisalPolicy {
        allow_debug: true,
        ..AppraisalPolicy::default()
    };
    for vector in vectors() {
        let accepted = |report: &[u8], certificate: &[u8]| {
            appraise_bytes(&store, report, certificate, &policy, PINNED)
                .is_some_and(|appraisal| appraisal.accepted())
        };
        assert!(
            accepted(&vector.report, &vector.certificate),
            "{} must be accepted unchanged",
            vector.name
        );
        // The signed area and the signature (r, s and the reserved rest).
        for offset in 0..vector.report.len() {
            let mut changed = vector.report.clone();
            changed[offset] ^= 0x01;
            assert!(
                !accepted(&changed, &vector.certificate),
                "{}: report byte {offset:#x} changed, still accepted",
                vector.name
            );
        }
        for offset in 0..vector.certificate.len() {
            let mut changed = vector.certificate.clone();
            changed[offset] ^= 0x01;
            assert!(
                !accepted(&vector.report, &changed),
                "{}: certificate byte {offset} changed, still accepted",
                vector.name
            );
        }
    }
}
