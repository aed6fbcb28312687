//! `hsev-agent serve`: answers its tenant's attestation requests (`hsev vm
//! attest`) on the virtio-serial port
//! [`hsev_attestation::tenant_attest::PORT_NAME`]. Each request line carries
//! a nonce; each answer line carries evidence whose `report_data` is
//! [`report_data_for`] that nonce, never the caller's bytes as they are, so
//! the host that relays the lines cannot have the guest sign a value of its
//! own choosing (such as a key broker's binding of a key pair it holds).
//!
//! The host only relays; the tenant judges the evidence on its own machine.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::time::Duration;

use hsev_attestation::firmware::guest::GuestReporter;
use hsev_attestation::tenant_attest::{report_data_for, AttestAnswer, AttestRequest};

use crate::AgentError;

/// The longest request line read (a request is about 150 bytes).
const MAX_REQUEST: u64 = 4096;

/// How long to wait before reading again while no host end is connected
/// (a virtio-serial port reads end-of-file then).
const IDLE: Duration = Duration::from_millis(200);

/// The answer to one request line, from the Secure Processor `reporter`
/// opens.
pub fn answer(
    line: &[u8],
    reporter: impl FnOnce() -> Result<Box<dyn GuestReporter>, AgentError>,
) -> AttestAnswer {
    let request: AttestRequest = match serde_json::from_slice(line) {
        Ok(request) => request,
        Err(error) => return AttestAnswer::Error(format!("an unreadable request: {error}")),
    };
    let nonce = match request.nonce() {
        Ok(nonce) => nonce,
        Err(problem) => return AttestAnswer::Error(problem),
    };
    let report_data = report_data_for(&nonce);
    let evidence =
        reporter().and_then(|mut reporter| crate::evidence(reporter.as_mut(), &report_data, 0));
    match evidence {
        Ok(evidence) => AttestAnswer::Evidence(evidence.to_json()),
        Err(error) => AttestAnswer::Error(error.to_string()),
    }
}

/// Serves requests on `port` (read and written), one answer per request
/// line, for as long as the guest runs.
pub fn serve(
    port: &Path,
    reporter: &dyn Fn() -> Result<Box<dyn GuestReporter>, AgentError>,
) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(port)?;
    let mut writer = file.try_clone()?;
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_REQUEST)
            .read_until(b'\n', &mut line)?;
        if read == 0 {
            std::thread::sleep(IDLE);
            continue;
        }
        if line.last() != Some(&b'\n') {
            // Too long, or cut off when the host went away: not a request.
            let mut rest = Vec::new();
            let _ = reader.read_until(b'\n', &mut rest);
            continue;
        }
        let answer = answer(&line, reporter);
        let mut bytes = serde_json::to_vec(&answer).unwrap_or_default();
        bytes.push(b'\n');
        writer.write_all(&bytes)?;
        writer.flush()?;
        crate::say(match answer {
            AttestAnswer::Evidence(_) => "attestation: evidence sent to the tenant's verifier",
            AttestAnswer::Error(_) => "attestation: a request could not be answered",
        });
    }
}

#[cfg(test)]
mod tests {
    use hsev_attestation::firmware::{FirmwareError, GuestRequest, GuestResponse};
    use hsev_attestation::tenant_attest::NONCE_LEN;

    use super::*;

    /// A Secure Processor that signs nothing and records what it is asked.
    #[derive(Debug)]
    struct Recording(std::sync::Arc<std::sync::Mutex<Vec<[u8; 64]>>>);

    impl GuestReporter for Recording {
        fn request(&mut self, request: &GuestRequest) -> Result<GuestResponse, FirmwareError> {
            let GuestRequest::ExtendedReport { report_data, .. } = request else {
                return Err(FirmwareError::Device("not an extended report".into()));
            };
            self.0.lock().expect("lock").push(*report_data);
            Ok(GuestResponse::ExtendedReport {
                report: crate::unsigned_report(report_data, &[1; 48]),
                certificates: Vec::new(),
            })
        }
    }

    #[test]
    fn the_report_binds_the_labelled_nonce_never_the_callers_bytes() {
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let nonce = [0x42; NONCE_LEN];
        let line = serde_json::to_vec(&AttestRequest::new(&nonce)).expect("serializes");
        let recording = std::sync::Arc::clone(&asked);
        let answer = answer(&line, move || {
            Ok(Box::new(Recording(recording)) as Box<dyn GuestReporter>)
        });
        let AttestAnswer::Evidence(evidence) = answer else {
            panic!("{answer:?}")
        };
        assert_eq!(*asked.lock().expect("lock"), vec![report_data_for(&nonce)]);
        assert_ne!(report_data_for(&nonce), nonce);
        assert!(evidence.get("attestation_report").is_some(), "{evidence}");
    }

    #[test]
    fn bad_requests_and_failures_are_answered_with_a_reason() {
        let never = || -> Result<Box<dyn GuestReporter>, AgentError> {
            panic!("no report for a bad request")
        };
        for (line, expected) in [
            (&b"not json\n"[..], "an unreadable request"),
            (&b"{\"nonce\":\"00\"}\n"[..], "128 hex digits"),
            (
                &b"{\"nonce\":\"00\",\"report_data\":\"00\"}\n"[..],
                "unknown field",
            ),
        ] {
            match answer(line, never) {
                AttestAnswer::Error(reason) => assert!(reason.contains(expected), "{reason}"),
                other => panic!("{other:?}"),
            }
        }
        let line = serde_json::to_vec(&AttestRequest::new(&[1; NONCE_LEN])).expect("json");
        let answer = answer(&line, || {
            Err(AgentError::Firmware(FirmwareError::Unavailable(
                "no port".into(),
            )))
        });
        assert!(matches!(answer, AttestAnswer::Error(reason) if reason.contains("no port")));
    }
}
