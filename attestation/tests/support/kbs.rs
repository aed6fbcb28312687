//! Helpers of the key broker tests: a real `hsev-kbs` process on loopback
//! with its own state folder, and a guest of a real simulated AMD Secure
//! Processor whose extended reports become Trustee JSON evidence.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use hsev_attestation::certs::parse_certificate_table;
use hsev_attestation::firmware::simulated::{SimInit, SimulatedFirmware};
use hsev_attestation::firmware::{GuestRequest, GuestResponse, LaunchFinish, LaunchedGuest};
use hsev_attestation::kbs::client::{AdminClient, KbsClient, SpkiPin};
use hsev_attestation::report::{AttestationReport, SnpEvidence};

pub use hsev_e2e::kbs::{reader_token, tenant_token, Kbs, KbsMode, KBS_OPERATOR};
/// Launch policy of a normal guest: SMT allowed, ABI 0.0, no debug.
pub const GUEST_POLICY: u64 = 0x30000;
/// The same with the DEBUG bit (19) set.
pub const DEBUG_GUEST_POLICY: u64 = 0xb0000;

/// A simulated platform in its own folder.
pub struct SimPlatform {
    pub dir: tempfile::TempDir,
    pub firmware: Arc<SimulatedFirmware>,
}

impl SimPlatform {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = SimInit {
            // Small roots keep the tests fast; the format is AMD's.
            rsa_bits: Some(2048),
            ..SimInit::default()
        };
        let firmware = Arc::new(SimulatedFirmware::init(dir.path(), &options).expect("platform"));
        SimPlatform { dir, firmware }
    }

    /// A guest launched with `measurement`, `policy` and `host_data`.
    pub fn launch(&self, measurement: [u8; 48], policy: u64, host_data: [u8; 32]) -> LaunchedGuest {
        SimulatedFirmware::launch_with_digest(
            &self.firmware,
            policy,
            measurement,
            &LaunchFinish {
                id_block: None,
                host_data,
            },
        )
        .expect("launch")
    }
}

/// Trustee JSON evidence of `guest` for `report_data`.
pub fn evidence(
    guest: &LaunchedGuest,
    report_data: &[u8; 64],
) -> Result<serde_json::Value, String> {
    let response = guest
        .request(&GuestRequest::ExtendedReport {
            report_data: *report_data,
            vmpl: 0,
        })
        .map_err(|error| error.to_string())?;
    let GuestResponse::ExtendedReport {
        report,
        certificates,
    } = response
    else {
        return Err("not an extended report".into());
    };
    let report = AttestationReport::from_bytes(&report).map_err(|error| error.to_string())?;
    let certificates = parse_certificate_table(&certificates).map_err(|error| error.to_string())?;
    Ok(SnpEvidence {
        report,
        certificates,
    }
    .to_json())
}

/// The pin of `kbs`'s TLS key (none for a plain-HTTP broker).
pub fn pin(kbs: &Kbs) -> Option<SpkiPin> {
    kbs.url().starts_with("https://").then(|| {
        kbs.pin()
            .parse()
            .expect("hsev-kbs fingerprint prints a pin")
    })
}

/// A client of `kbs`'s guest protocol, pinning its key.
pub fn guest_client(kbs: &Kbs) -> KbsClient {
    KbsClient::new(&kbs.url(), pin(kbs), Duration::from_secs(30)).expect("client")
}

/// A client of `kbs`'s admin API with the token of the tenant whose
/// repository is `repository`.
pub fn admin_client(kbs: &Kbs, repository: &str) -> AdminClient {
    AdminClient::new(
        &kbs.url(),
        pin(kbs),
        &tenant_token(repository),
        Duration::from_secs(30),
    )
    .expect("admin client")
}

/// A client of `kbs`'s admin API with the reader token of `repository`.
pub fn reader_client(kbs: &Kbs, repository: &str) -> AdminClient {
    AdminClient::new(
        &kbs.url(),
        pin(kbs),
        &reader_token(repository),
        Duration::from_secs(30),
    )
    .expect("reader client")
}

/// A client of `kbs`'s admin API with the operator's token.
pub fn operator_client(kbs: &Kbs) -> AdminClient {
    AdminClient::new(&kbs.url(), pin(kbs), KBS_OPERATOR, Duration::from_secs(30))
        .expect("admin client")
}

/// A raw ureq agent of `config` that reaches `kbs` (pinning its key).
pub fn raw_agent(kbs: &Kbs, config: ureq::config::Config) -> ureq::Agent {
    match pin(kbs) {
        Some(pin) => hsev_attestation::kbs::tls::pinned_agent(config, pin).expect("agent"),
        None => config.into(),
    }
}
