//! Everything that parses untrusted attestation input: raw reports, JSON
//! evidence, endorsement certificates and CRLs. None may panic; a report
//! that parses must re-parse from its own bytes to the same value.

#![no_main]

use hsev_attestation::certs::{EndorsementKey, RevocationList};
use hsev_attestation::report::{AttestationReport, SnpEvidence};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    match selector % 4 {
        0 => {
            if let Ok(report) = AttestationReport::from_bytes(input) {
                let again = AttestationReport::from_bytes(report.as_bytes())
                    .expect("a parsed report re-parses");
                assert_eq!(again, report);
            }
        }
        1 => {
            let _ = SnpEvidence::from_json(input);
        }
        2 => {
            let _ = EndorsementKey::parse(input);
        }
        _ => {
            let _ = RevocationList::parse(input);
        }
    }
});
