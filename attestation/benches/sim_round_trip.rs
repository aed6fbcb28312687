//! Simulated attestation round trips per second on one core: a guest asks
//! the simulated Secure Processor for an extended report (signed with the
//! VCEK), and the verifier appraises it (chain verified once and cached, as
//! a key broker keeps it). Prints `sim_round_trips_per_second <N>`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hsev_attestation::certs::{EndorsementKey, TrustStore};
use hsev_attestation::firmware::simulated::{SimInit, SimulatedFirmware};
use hsev_attestation::firmware::{GuestRequest, GuestResponse, LaunchFinish};
use hsev_attestation::policy::AppraisalPolicy;
use hsev_attestation::report::AttestationReport;
use hsev_attestation::verifier::appraise_with_key;

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let firmware =
        Arc::new(SimulatedFirmware::init(dir.path(), &SimInit::default()).expect("platform"));
    let guest = SimulatedFirmware::launch_with_digest(
        &firmware,
        0x30000,
        [0x42; 48],
        &LaunchFinish::default(),
    )
    .expect("launch");
    let store = TrustStore::amd().with_anchor(firmware.roots().anchor().expect("anchor"));
    let vcek = EndorsementKey::parse(firmware.vcek_der()).expect("VCEK");
    let trusted = store.verify(&vcek, None, None).expect("chain");
    let policy = AppraisalPolicy {
        allow_simulated: true,
        ..AppraisalPolicy::default()
    };
    let now = time::OffsetDateTime::now_utc();

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut round_trips: u64 = 0;
    let mut nonce = [0u8; 64];
    while Instant::now() < deadline {
        nonce[..8].copy_from_slice(&round_trips.to_le_bytes());
        let response = guest
            .request(&GuestRequest::ExtendedReport {
                report_data: nonce,
                vmpl: 0,
            })
            .expect("report");
        let GuestResponse::ExtendedReport { report, .. } = response else {
            panic!("wrong response")
        };
        let report = AttestationReport::from_bytes(&report).expect("parses");
        assert!(
            appraise_with_key(&report, Ok(&trusted), &policy, now).accepted(),
            "the report must verify"
        );
        round_trips += 1;
    }
    let rate = round_trips as f64 / started.elapsed().as_secs_f64();
    println!("sim_round_trips_per_second {rate:.1}");
}
