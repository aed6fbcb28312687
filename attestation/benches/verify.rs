//! Full report verifications per second on one core, with the certificate
//! chain verified once and cached, as a long-running verifier (the KBS)
//! does: parse the report bytes, check the signature and every policy check.
//!
//! Prints one line, `verify_per_second <N>`, for `make bench` to compare
//! with OpenSSL's raw P-384 verify rate measured in the same run.

use std::time::{Duration, Instant};

use hsev_attestation::certs::{EndorsementKey, TrustStore};
use hsev_attestation::policy::AppraisalPolicy;
use hsev_attestation::report::AttestationReport;
use hsev_attestation::verifier::appraise_with_key;

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(3);
    let read = hsev_e2e::snp_report_file;
    let report_bytes = read("milan-v2-a.report.bin");
    let key = EndorsementKey::parse(&read("milan-v2-a.vcek.der")).expect("VCEK parses");
    let trusted = TrustStore::amd()
        .verify(&key, None, None)
        .expect("VCEK chains to AMD");
    let policy = AppraisalPolicy::default();
    let at = time::OffsetDateTime::now_utc()
        .replace_year(2025)
        .expect("valid date");

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut verified: u64 = 0;
    while Instant::now() < deadline {
        for _ in 0..32 {
            let report =
                AttestationReport::from_bytes(std::hint::black_box(&report_bytes)).expect("parses");
            let appraisal = appraise_with_key(&report, Ok(&trusted), &policy, at);
            assert!(appraisal.accepted(), "the vector must verify");
            verified += 1;
        }
    }
    let rate = verified as f64 / started.elapsed().as_secs_f64();
    println!("verify_per_second {rate:.1}");
}
