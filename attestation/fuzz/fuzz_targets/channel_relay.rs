//! The host side of the simulated Secure Processor's channel, fed
//! arbitrary bytes as if from a hostile guest: whatever arrives, the relay
//! answers or hangs up, and never panics.

#![no_main]

use std::io::{Cursor, Read, Write};
use std::sync::{Arc, OnceLock};

use hsev_attestation::firmware::channel::serve;
use hsev_attestation::firmware::simulated::{SimInit, SimulatedFirmware};
use hsev_attestation::firmware::{LaunchFinish, LaunchedGuest};
use libfuzzer_sys::fuzz_target;

/// The guest's bytes in, the relay's answers out.
struct Wire<'a> {
    from_guest: Cursor<&'a [u8]>,
    to_guest: Vec<u8>,
}

impl Read for Wire<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        self.from_guest.read(buffer)
    }
}

impl Write for Wire<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.to_guest.write(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One simulated platform and launched guest for the whole run.
fn guest() -> &'static LaunchedGuest {
    static GUEST: OnceLock<(tempfile::TempDir, LaunchedGuest)> = OnceLock::new();
    &GUEST
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let options = SimInit {
                rsa_bits: Some(2048),
                ..SimInit::default()
            };
            let firmware =
                Arc::new(SimulatedFirmware::init(dir.path(), &options).expect("platform"));
            let guest = SimulatedFirmware::launch_with_digest(
                &firmware,
                0x30000,
                [0x42; 48],
                &LaunchFinish::default(),
            )
            .expect("launch");
            (dir, guest)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    let mut wire = Wire {
        from_guest: Cursor::new(data),
        to_guest: Vec::new(),
    };
    let _ = serve(&mut wire, guest());
});
