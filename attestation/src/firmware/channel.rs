//! The host<->guest channel of the simulated Secure Processor.
//!
//! On SEV hardware a guest talks to its Secure Processor through encrypted
//! guest messages that the hypervisor merely relays. With the simulated
//! firmware the guest reaches the host's firmware over a virtio-serial port
//! (named [`PORT_NAME`]) and the host relays each request to the firmware
//! of that VM only ([`serve`]), never another's.
//!
//! Frames are small and length-checked:
//!
//! ```text
//! "HSEV" | version u8 = 1 | kind u8 | reserved u16 = 0 | length u32 LE | payload
//! ```
//!
//! | kind | payload |
//! |---|---|
//! | 0x01 report request, 0x02 extended report request | vmpl u32, report_data [64] |
//! | 0x03 derived key request | root_key u32 (0 VCEK, 1 VMRK), guest_field_select u64, vmpl u32, guest_svn u32, tcb_version u64 |
//! | 0x81 report | the raw report |
//! | 0x82 extended report | report length u32, report, certificate table |
//! | 0x83 derived key | 32 bytes |
//! | 0xff error | UTF-8 message |
//!
//! A frame that is oversized, truncated or malformed gets an error frame
//! (when the stream still allows one) and ends the connection: once
//! framing is lost nothing after it can be trusted.

use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use super::guest::GuestReporter;
use super::{
    DerivedKeyRequest, FirmwareError, GuestRequest, GuestResponse, LaunchedGuest, RootKey,
};

/// The virtio-serial port name the guest looks for.
pub const PORT_NAME: &str = "org.hypersev.sim-sp.0";
/// Largest payload accepted (a report with a certificate table fits).
pub const MAX_PAYLOAD: usize = 64 * 1024;

const MAGIC: &[u8; 4] = b"HSEV";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 12;

const REPORT_REQUEST: u8 = 0x01;
const EXTENDED_REPORT_REQUEST: u8 = 0x02;
const DERIVED_KEY_REQUEST: u8 = 0x03;
const REPORT: u8 = 0x81;
const EXTENDED_REPORT: u8 = 0x82;
const DERIVED_KEY: u8 = 0x83;
const ERROR: u8 = 0xff;

/// Why a frame or exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The peer closed the channel between frames.
    #[error("the channel was closed")]
    Closed,
    /// The stream failed.
    #[error("channel I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A frame whose header or payload breaks the protocol.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A frame announcing more than [`MAX_PAYLOAD`] bytes.
    #[error("frame of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    Oversized(usize),
    /// The firmware refused the request; the message says why.
    #[error("the Secure Processor refused: {0}")]
    Refused(String),
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The frame kind.
    pub kind: u8,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Writes one frame.
pub fn write_frame<W: Write>(writer: &mut W, kind: u8, payload: &[u8]) -> Result<(), ChannelError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(ChannelError::Oversized(payload.len()));
    }
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(MAGIC);
    header[4] = VERSION;
    header[5] = kind;
    // The length fits in u32: it is at most MAX_PAYLOAD.
    header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    writer.write_all(&header)?;
    writer.write_all(payload)?;
    writer.flush()?;
    Ok(())
}

/// Reads one frame; [`ChannelError::Closed`] if the stream ends before it.
pub fn read_frame<R: Read>(reader: &mut R) -> Result<Frame, ChannelError> {
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match reader.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Err(ChannelError::Closed),
            Ok(0) => {
                return Err(ChannelError::Malformed(format!(
                    "truncated header ({filled} of {HEADER_LEN} bytes)"
                )))
            }
            Ok(read) => filled += read,
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => return Err(error.into()),
        }
    }
    if &header[..4] != MAGIC {
        return Err(ChannelError::Malformed("bad magic".into()));
    }
    if header[4] != VERSION {
        return Err(ChannelError::Malformed(format!(
            "protocol version {} (expected {VERSION})",
            header[4]
        )));
    }
    if header[6..8] != [0, 0] {
        return Err(ChannelError::Malformed(
            "reserved header bytes are set".into(),
        ));
    }
    let length = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if length > MAX_PAYLOAD {
        return Err(ChannelError::Oversized(length));
    }
    let mut payload = vec![0u8; length];
    reader
        .read_exact(&mut payload)
        .map_err(|error| match error.kind() {
            ErrorKind::UnexpectedEof => {
                ChannelError::Malformed(format!("truncated payload (announced {length} bytes)"))
            }
            _ => ChannelError::Io(error),
        })?;
    Ok(Frame {
        kind: header[5],
        payload,
    })
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn expect_length(payload: &[u8], length: usize, what: &str) -> Result<(), ChannelError> {
    if payload.len() == length {
        Ok(())
    } else {
        Err(ChannelError::Malformed(format!(
            "{what} payload is {} bytes, expected {length}",
            payload.len()
        )))
    }
}

/// Decodes a request frame.
pub fn decode_request(frame: &Frame) -> Result<GuestRequest, ChannelError> {
    let payload = &frame.payload;
    match frame.kind {
        REPORT_REQUEST | EXTENDED_REPORT_REQUEST => {
            expect_length(payload, 68, "report request")?;
            let vmpl = u32_at(payload, 0);
            let mut report_data = [0u8; 64];
            report_data.copy_from_slice(&payload[4..68]);
            Ok(if frame.kind == REPORT_REQUEST {
                GuestRequest::Report { report_data, vmpl }
            } else {
                GuestRequest::ExtendedReport { report_data, vmpl }
            })
        }
        DERIVED_KEY_REQUEST => {
            expect_length(payload, 28, "derived key request")?;
            let root_key = match u32_at(payload, 0) {
                0 => RootKey::Vcek,
                1 => RootKey::Vmrk,
                other => {
                    return Err(ChannelError::Malformed(format!(
                        "root key {other} is undefined"
                    )))
                }
            };
            Ok(GuestRequest::DerivedKey(DerivedKeyRequest {
                root_key,
                guest_field_select: u64_at(payload, 4),
                vmpl: u32_at(payload, 12),
                guest_svn: u32_at(payload, 16),
                tcb_version: u64_at(payload, 20),
            }))
        }
        other => Err(ChannelError::Malformed(format!(
            "frame kind {other:#04x} is not a request"
        ))),
    }
}

/// Encodes a request as (kind, payload).
pub fn encode_request(request: &GuestRequest) -> (u8, Vec<u8>) {
    match request {
        GuestRequest::Report { report_data, vmpl }
        | GuestRequest::ExtendedReport { report_data, vmpl } => {
            let kind = if matches!(request, GuestRequest::Report { .. }) {
                REPORT_REQUEST
            } else {
                EXTENDED_REPORT_REQUEST
            };
            (kind, [&vmpl.to_le_bytes()[..], report_data].concat())
        }
        GuestRequest::DerivedKey(key) => {
            let root: u32 = match key.root_key {
                RootKey::Vcek => 0,
                RootKey::Vmrk => 1,
            };
            let payload = [
                &root.to_le_bytes()[..],
                &key.guest_field_select.to_le_bytes(),
                &key.vmpl.to_le_bytes(),
                &key.guest_svn.to_le_bytes(),
                &key.tcb_version.to_le_bytes(),
            ]
            .concat();
            (DERIVED_KEY_REQUEST, payload)
        }
    }
}

fn encode_response(response: &GuestResponse) -> (u8, Vec<u8>) {
    match response {
        GuestResponse::Report(report) => (REPORT, report.clone()),
        GuestResponse::ExtendedReport {
            report,
            certificates,
        } => {
            let length = u32::try_from(report.len()).unwrap_or(u32::MAX);
            (
                EXTENDED_REPORT,
                [&length.to_le_bytes()[..], report, certificates].concat(),
            )
        }
        GuestResponse::DerivedKey(key) => (DERIVED_KEY, key.to_vec()),
    }
}

/// Decodes a response frame to what `request` expects.
pub fn decode_response(
    frame: &Frame,
    request: &GuestRequest,
) -> Result<GuestResponse, ChannelError> {
    let payload = &frame.payload;
    match (frame.kind, request) {
        (ERROR, _) => Err(ChannelError::Refused(
            String::from_utf8_lossy(payload).into_owned(),
        )),
        (REPORT, GuestRequest::Report { .. }) => Ok(GuestResponse::Report(payload.clone())),
        (EXTENDED_REPORT, GuestRequest::ExtendedReport { .. }) => {
            if payload.len() < 4 {
                return Err(ChannelError::Malformed(
                    "extended report payload too short".into(),
                ));
            }
            let length = u32_at(payload, 0) as usize;
            let report = payload
                .get(4..4usize.saturating_add(length))
                .ok_or_else(|| {
                    ChannelError::Malformed("report length exceeds the payload".into())
                })?;
            Ok(GuestResponse::ExtendedReport {
                report: report.to_vec(),
                certificates: payload[4 + length..].to_vec(),
            })
        }
        (DERIVED_KEY, GuestRequest::DerivedKey(_)) => {
            let key: [u8; 32] = payload.as_slice().try_into().map_err(|_| {
                ChannelError::Malformed(format!(
                    "derived key is {} bytes, expected 32",
                    payload.len()
                ))
            })?;
            Ok(GuestResponse::DerivedKey(key))
        }
        (kind, _) => Err(ChannelError::Malformed(format!(
            "response kind {kind:#04x} does not answer the request"
        ))),
    }
}

/// Relays requests arriving on `stream` to `guest`'s firmware until the
/// guest closes the channel. A refused request gets an error frame and the
/// channel stays open; a broken frame gets an error frame and ends it.
pub fn serve<S: Read + Write>(stream: &mut S, guest: &LaunchedGuest) -> Result<(), ChannelError> {
    loop {
        let frame = match read_frame(stream) {
            Ok(frame) => frame,
            Err(ChannelError::Closed) => return Ok(()),
            Err(error) => {
                // Best effort: the stream may already be gone.
                let _ = write_frame(stream, ERROR, error.to_string().as_bytes());
                return Err(error);
            }
        };
        let request = match decode_request(&frame) {
            Ok(request) => request,
            Err(error) => {
                let _ = write_frame(stream, ERROR, error.to_string().as_bytes());
                return Err(error);
            }
        };
        match guest.request(&request) {
            Ok(response) => {
                let (kind, payload) = encode_response(&response);
                write_frame(stream, kind, &payload)?;
            }
            Err(error) => write_frame(stream, ERROR, error.to_string().as_bytes())?,
        }
    }
}

/// The guest side: a [`GuestReporter`] that reaches the simulated Secure
/// Processor over a stream (the virtio-serial port, in a guest).
#[derive(Debug)]
pub struct SimulatedChannel<S> {
    stream: S,
}

impl<S: Read + Write + Send + std::fmt::Debug> SimulatedChannel<S> {
    /// A channel over an open stream.
    pub fn new(stream: S) -> Self {
        SimulatedChannel { stream }
    }
}

impl SimulatedChannel<std::fs::File> {
    /// Opens the virtio-serial port named [`PORT_NAME`], found through
    /// `/sys/class/virtio-ports/*/name`.
    pub fn open_port() -> Result<Self, FirmwareError> {
        let device = find_port(Path::new("/sys/class/virtio-ports"), PORT_NAME)?;
        let stream = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&device)
            .map_err(|error| {
                FirmwareError::Unavailable(format!("{}: {error}", device.display()))
            })?;
        Ok(SimulatedChannel { stream })
    }
}

/// The `/dev` node of the virtio-serial port called `name`.
pub fn find_port(class_dir: &Path, name: &str) -> Result<PathBuf, FirmwareError> {
    let unavailable = || {
        FirmwareError::Unavailable(format!(
            "no virtio-serial port named {name} under {} (not a guest of a simulated-SNP host)",
            class_dir.display()
        ))
    };
    let entries = std::fs::read_dir(class_dir).map_err(|_| unavailable())?;
    for entry in entries.flatten() {
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(unavailable())
}

impl<S: Read + Write + Send + std::fmt::Debug> GuestReporter for SimulatedChannel<S> {
    fn request(&mut self, request: &GuestRequest) -> Result<GuestResponse, FirmwareError> {
        let exchange = |stream: &mut S| -> Result<GuestResponse, ChannelError> {
            let (kind, payload) = encode_request(request);
            write_frame(stream, kind, &payload)?;
            let frame = read_frame(stream)?;
            decode_response(&frame, request)
        };
        exchange(&mut self.stream).map_err(|error| match error {
            ChannelError::Refused(reason) => FirmwareError::BadRequest(reason),
            other => {
                FirmwareError::Unavailable(format!("simulated Secure Processor channel: {other}"))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let requests = [
            GuestRequest::Report {
                report_data: [1; 64],
                vmpl: 2,
            },
            GuestRequest::ExtendedReport {
                report_data: [3; 64],
                vmpl: 0,
            },
            GuestRequest::DerivedKey(DerivedKeyRequest {
                root_key: RootKey::Vmrk,
                guest_field_select: 0x3f,
                vmpl: 1,
                guest_svn: 7,
                tcb_version: 0x0102_0304,
            }),
        ];
        for request in requests {
            let (kind, payload) = encode_request(&request);
            let mut wire = Vec::new();
            write_frame(&mut wire, kind, &payload).expect("writes");
            let frame = read_frame(&mut wire.as_slice()).expect("reads");
            assert_eq!(decode_request(&frame).expect("decodes"), request);
        }
    }

    #[test]
    fn broken_frames_are_refused() {
        let mut good = Vec::new();
        write_frame(&mut good, REPORT_REQUEST, &[0; 68]).expect("writes");
        let mut cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..5].to_vec(), "truncated header"),
            (good[..20].to_vec(), "truncated payload"),
            ([b"XSEV", &good[4..]].concat(), "bad magic"),
        ];
        let mut oversized = good.clone();
        oversized[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        cases.push((oversized, "exceeds"));
        let mut version = good.clone();
        version[4] = 9;
        cases.push((version, "version"));
        for (bytes, expected) in cases {
            let error = read_frame(&mut bytes.as_slice()).expect_err("refused");
            assert!(error.to_string().contains(expected), "{expected}: {error}");
        }
        assert!(matches!(
            read_frame(&mut [].as_slice()),
            Err(ChannelError::Closed)
        ));
        let short = Frame {
            kind: REPORT_REQUEST,
            payload: vec![0; 67],
        };
        assert!(decode_request(&short).is_err());
        let unknown = Frame {
            kind: 0x42,
            payload: Vec::new(),
        };
        assert!(decode_request(&unknown).is_err());
    }

    #[test]
    fn ports_are_found_by_name() {
        let class = tempfile::tempdir().expect("tempdir");
        for (port, name) in [
            ("vport0p1", "org.qemu.guest_agent.0"),
            ("vport1p1", PORT_NAME),
        ] {
            std::fs::create_dir(class.path().join(port)).expect("mkdir");
            std::fs::write(class.path().join(port).join("name"), format!("{name}\n"))
                .expect("write");
        }
        assert_eq!(
            find_port(class.path(), PORT_NAME).expect("found"),
            Path::new("/dev/vport1p1")
        );
        assert!(find_port(class.path(), "absent").is_err());
    }
}
