//! The host<->guest channel of the simulated Secure Processor over a real
//! Unix socket pair (what QEMU's virtio-serial chardev gives the host): the
//! host relays each guest's requests to that guest's launch only, and
//! broken frames end the connection without harming the host.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;

use hsev_attestation::firmware::channel::{
    serve, write_frame, ChannelError, SimulatedChannel, MAX_PAYLOAD,
};
use hsev_attestation::firmware::guest::GuestReporter;
use hsev_attestation::firmware::simulated::{SimInit, SimulatedFirmware};
use hsev_attestation::firmware::{
    FirmwareError, GuestRequest, GuestResponse, LaunchFinish, LaunchedGuest,
};
use hsev_attestation::report::AttestationReport;
use hsev_attestation::Product;

fn platform() -> (tempfile::TempDir, Arc<SimulatedFirmware>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = SimInit {
        product: Some(Product::Genoa),
        tcb: None,
        asids: Some(4),
        rsa_bits: Some(2048),
    };
    let firmware = Arc::new(SimulatedFirmware::init(dir.path(), &options).expect("init"));
    (dir, firmware)
}

fn guest(firmware: &Arc<SimulatedFirmware>, digest: u8) -> LaunchedGuest {
    SimulatedFirmware::launch_with_digest(firmware, 0x30000, [digest; 48], &LaunchFinish::default())
        .expect("launch")
}

/// Relays `host` for `guest` on a thread; returns the relay's outcome.
fn relay(
    mut host: UnixStream,
    guest: LaunchedGuest,
) -> thread::JoinHandle<Result<(), ChannelError>> {
    thread::spawn(move || serve(&mut host, &guest))
}

#[test]
fn each_guest_reaches_its_own_launch_only() {
    let (_dir, firmware) = platform();
    let mut relays = Vec::new();
    let mut channels = Vec::new();
    for digest in [0xaa, 0xbb] {
        let (host, guest_end) = UnixStream::pair().expect("socket pair");
        relays.push(relay(host, guest(&firmware, digest)));
        channels.push((digest, SimulatedChannel::new(guest_end)));
    }
    for (digest, channel) in &mut channels {
        for _ in 0..3 {
            let response = channel
                .request(&GuestRequest::ExtendedReport {
                    report_data: [*digest; 64],
                    vmpl: 0,
                })
                .expect("report");
            let GuestResponse::ExtendedReport {
                report,
                certificates,
            } = response
            else {
                panic!("wrong response kind")
            };
            let report = AttestationReport::from_bytes(&report).expect("parses");
            assert_eq!(report.measurement, [*digest; 48]);
            assert_eq!(report.report_data, [*digest; 64]);
            assert!(!certificates.is_empty());
        }
        let refused = channel.request(&GuestRequest::Report {
            report_data: [0; 64],
            vmpl: 7,
        });
        assert!(
            matches!(refused, Err(FirmwareError::BadRequest(ref reason)) if reason.contains("VMPL 7")),
            "{refused:?}"
        );
        let still_open = channel.request(&GuestRequest::Report {
            report_data: [0; 64],
            vmpl: 0,
        });
        assert!(
            still_open.is_ok(),
            "a refused request leaves the channel open"
        );
    }
    drop(channels);
    for relay in relays {
        relay
            .join()
            .expect("no panic")
            .expect("a clean close ends the relay");
    }
}

fn send_raw(bytes: &[u8], close_after: bool) -> (Result<(), ChannelError>, Vec<u8>) {
    let (_dir, firmware) = platform();
    let (host, mut guest_end) = UnixStream::pair().expect("socket pair");
    let handle = relay(host, guest(&firmware, 1));
    guest_end.write_all(bytes).expect("write");
    if close_after {
        guest_end
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
    }
    let outcome = handle.join().expect("the relay never panics");
    // Whole frames are sent, so the relay leaves nothing unread and closes
    // cleanly after its answer.
    let mut answer = Vec::new();
    guest_end.read_to_end(&mut answer).expect("read the answer");
    (outcome, answer)
}

#[test]
fn garbage_oversized_and_truncated_frames_end_the_connection() {
    let (outcome, answer) = send_raw(b"GET / HTTP/1", false);
    assert!(
        matches!(outcome, Err(ChannelError::Malformed(ref what)) if what.contains("magic")),
        "{outcome:?}"
    );
    assert!(
        answer.starts_with(b"HSEV") && answer[5] == 0xff,
        "an error frame answers garbage"
    );

    let mut oversized = b"HSEV\x01\x01\x00\x00".to_vec();
    oversized.extend_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
    let (outcome, _) = send_raw(&oversized, false);
    assert!(
        matches!(outcome, Err(ChannelError::Oversized(_))),
        "{outcome:?}"
    );

    let mut truncated = Vec::new();
    write_frame(&mut truncated, 0x01, &[0; 68]).expect("frame");
    truncated.truncate(40);
    let (outcome, _) = send_raw(&truncated, true);
    assert!(
        matches!(outcome, Err(ChannelError::Malformed(ref what)) if what.contains("truncated")),
        "{outcome:?}"
    );

    let mut wrong_length = Vec::new();
    write_frame(&mut wrong_length, 0x01, &[0; 10]).expect("frame");
    let (outcome, _) = send_raw(&wrong_length, true);
    assert!(
        matches!(outcome, Err(ChannelError::Malformed(_))),
        "{outcome:?}"
    );
}
