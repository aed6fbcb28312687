//! `hsev-agent`, the HyperSEV agent inside a confidential guest.
//!
//! It owns the guest side of attestation and of the attested disk-key
//! release: asking the platform for an SEV-SNP report bound to data of the
//! guest's choosing, packaging it as evidence a verifier or key broker
//! accepts, and (`hsev-agent unlock`, [`unlock`]) trading that evidence for
//! the data disk's key, unlocking the LUKS2 disk and mounting it. It never
//! holds a host secret, never writes key material to any file, and never
//! logs one.
//!
//! The ways to the Secure Processor live in
//! [`hsev_attestation::firmware::guest`]: `/dev/sev-guest` and
//! configfs-tsm. This crate picks one and turns its answer into
//! [`SnpEvidence`].
//!
//! Modules: [`settings`] (kernel command line), [`disk`] (finding the data
//! disk), [`luks`] (formatting the empty disk at first boot, opening it),
//! [`backoff`] (retries), [`boot_log`] (the log on the unlocked disk),
//! [`status`] (progress lines to the host), [`unlock`] (the flow that ties
//! them), [`keeper`] (the lease of a single-instance key, and the fence
//! when it cannot be kept) and [`responder`] (evidence for the tenant's own
//! verification, `hsev vm attest`).

use std::io::Write;
use std::path::Path;

use hsev_attestation::certs::{parse_certificate_table, CertTableError};
use hsev_attestation::firmware::channel::{find_port, SimulatedChannel, PORT_NAME};
use hsev_attestation::firmware::guest::sev_guest::{SevGuestDevice, DEFAULT_SEV_GUEST_PATH};
use hsev_attestation::firmware::guest::tsm::ConfigFsTsm;
use hsev_attestation::firmware::guest::GuestReporter;

use hsev_attestation::firmware::{FirmwareError, GuestRequest, GuestResponse};
use hsev_attestation::report::{AttestationReport, ReportError, SnpEvidence};

pub mod backoff;
pub mod boot_log;
pub mod disk;
pub mod keeper;
pub mod luks;
pub mod responder;
pub mod settings;
pub mod status;
pub mod unlock;

use status::VIRTIO_PORTS;

/// Prints one line on the agent's output (the console, in a guest),
/// prefixed `hsev-agent: `, at once.
pub fn say(line: &str) {
    let mut stdout = std::io::stdout().lock();
    // The console is all there is to tell: nothing to do if it fails.
    let _ = writeln!(stdout, "hsev-agent: {line}");
    let _ = stdout.flush();
}

/// Which way to the Secure Processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// `/dev/sev-guest` when it exists, else the simulated port, else
    /// configfs-tsm.
    Auto,
    /// `/dev/sev-guest` (reports, extended reports, derived keys).
    SevGuest,
    /// configfs-tsm (reports and extended reports).
    Tsm,
    /// The host's simulated Secure Processor over the virtio-serial port
    /// `org.hypersev.sim-sp.0` (development pools only: no confidentiality).
    Sim,
}

/// Why no evidence could be produced.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Neither device is here.
    #[error(
        "no way to the SEV-SNP Secure Processor: no {DEFAULT_SEV_GUEST_PATH}, no \
         configfs-tsm report interface at {tsm_root}, and no simulated Secure Processor port \
         {PORT_NAME} (not an SEV-SNP guest, or the sev-guest and tsm_report modules are not \
         loaded)"
    )]
    NoDevice {
        /// The configfs-tsm folder looked at.
        tsm_root: String,
    },
    /// The chosen device refused or failed.
    #[error(transparent)]
    Firmware(#[from] FirmwareError),
    /// The device answered something other than an extended report.
    #[error("the device answered an extended report request with {0}")]
    UnexpectedResponse(&'static str),
    /// The report does not parse.
    #[error("the report from the device does not parse: {0}")]
    Report(#[from] ReportError),
    /// The certificate table does not parse.
    #[error("the certificate table from the device does not parse: {0}")]
    CertTable(#[from] CertTableError),
}

/// Which ways to a Secure Processor this guest has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Present {
    /// `/dev/sev-guest` exists.
    pub sev_guest: bool,
    /// The configfs-tsm report folder exists.
    pub tsm: bool,
    /// The simulated Secure Processor's virtio-serial port exists.
    pub sim: bool,
}

/// Resolves [`Device::Auto`] from which devices are present: real hardware
/// first (`/dev/sev-guest`), then the simulated port, then configfs-tsm.
///
/// configfs-tsm comes last because its `report` folder exists as soon as
/// the `tsm` module is loaded, whether or not a TEE driver provides reports
/// (in a guest without SEV-SNP, making a report there fails with ENXIO);
/// the simulated port exists only when the host relays a simulated Secure
/// Processor, whose evidence every production key broker refuses anyway.
pub fn choose_device(
    device: Device,
    present: Present,
    tsm_root: &Path,
) -> Result<Device, AgentError> {
    match device {
        Device::Auto if present.sev_guest => Ok(Device::SevGuest),
        Device::Auto if present.sim => Ok(Device::Sim),
        Device::Auto if present.tsm => Ok(Device::Tsm),
        Device::Auto => Err(AgentError::NoDevice {
            tsm_root: tsm_root.display().to_string(),
        }),
        chosen => Ok(chosen),
    }
}

/// Opens the chosen way to the Secure Processor.
pub fn open_reporter(
    device: Device,
    tsm_root: &Path,
) -> Result<Box<dyn GuestReporter>, AgentError> {
    open_chosen_reporter(device, tsm_root).map(|(_, reporter)| reporter)
}

/// Opens the chosen way to the Secure Processor, and says which it is
/// ([`Device::Auto`] resolved).
pub fn open_chosen_reporter(
    device: Device,
    tsm_root: &Path,
) -> Result<(Device, Box<dyn GuestReporter>), AgentError> {
    let present = Present {
        sev_guest: SevGuestDevice::is_present(),
        tsm: tsm_root.is_dir(),
        sim: find_port(Path::new(VIRTIO_PORTS), PORT_NAME).is_ok(),
    };
    let chosen = choose_device(device, present, tsm_root)?;
    let reporter: Box<dyn GuestReporter> = match chosen {
        Device::SevGuest => Box::new(SevGuestDevice::open()?),
        Device::Tsm | Device::Auto => Box::new(ConfigFsTsm::new(tsm_root)?),
        Device::Sim => Box::new(SimulatedChannel::open_port()?),
    };
    Ok((chosen, reporter))
}

impl Device {
    /// How the console names it.
    pub fn describe(self) -> &'static str {
        match self {
            Device::Auto => "the first Secure Processor found",
            Device::SevGuest => DEFAULT_SEV_GUEST_PATH,
            Device::Tsm => "configfs-tsm",
            Device::Sim => {
                "the host's simulated Secure Processor (development only: no confidentiality)"
            }
        }
    }
}

/// An extended report for `report_data` at `vmpl`, as evidence: the
/// parsed report and the certificates the host supplied (possibly none).
pub fn evidence(
    reporter: &mut dyn GuestReporter,
    report_data: &[u8; 64],
    vmpl: u32,
) -> Result<SnpEvidence, AgentError> {
    let response = reporter.request(&GuestRequest::ExtendedReport {
        report_data: *report_data,
        vmpl,
    })?;
    let (report, table) = match response {
        GuestResponse::ExtendedReport {
            report,
            certificates,
        } => (report, certificates),
        GuestResponse::Report(_) => return Err(AgentError::UnexpectedResponse("a plain report")),
        GuestResponse::DerivedKey(_) => {
            return Err(AgentError::UnexpectedResponse("a derived key"))
        }
    };
    let certificates = if table.is_empty() {
        Vec::new()
    } else {
        parse_certificate_table(&table)?
    };
    Ok(SnpEvidence {
        report: AttestationReport::from_bytes(&report)?,
        certificates,
    })
}

/// A well-formed, unsigned report binding `report_data` and `measurement`,
/// for tests of what the agent does with reports.
#[cfg(test)]
pub(crate) fn unsigned_report(report_data: &[u8; 64], measurement: &[u8; 48]) -> Vec<u8> {
    use hsev_attestation::report::{KeyInfo, ReportWriter, SigningKey, TcbVersion};
    use hsev_attestation::TcbLayout;

    let tcb = TcbVersion {
        fmc: None,
        bootloader: 3,
        tee: 0,
        snp: 8,
        microcode: 115,
    };
    let mut writer = ReportWriter::new(2, TcbLayout::Legacy);
    writer
        .guest(0, 0x30000, &[0; 16], &[0; 16], 0)
        .platform(
            0,
            KeyInfo {
                author_key_en: false,
                mask_chip_key: false,
                signing_key: SigningKey::Vcek,
            },
        )
        .contents(report_data, measurement, &[2; 32]);
    writer.tcbs(&tcb, &tcb, &tcb, &tcb).expect("tcbs");
    writer
        .finish(&[1; 48], &[2; 48])
        .expect("a report")
        .as_bytes()
        .to_vec()
}

#[cfg(test)]
mod tests {
    use hsev_attestation::certs::encode_certificate_table;
    use hsev_attestation::report::EvidenceCertificate;

    use super::*;

    /// A reporter that answers with a fixed response and records requests.
    #[derive(Debug)]
    struct Canned {
        response: Option<GuestResponse>,
        requests: Vec<GuestRequest>,
    }

    impl GuestReporter for Canned {
        fn request(&mut self, request: &GuestRequest) -> Result<GuestResponse, FirmwareError> {
            self.requests.push(request.clone());
            self.response
                .clone()
                .ok_or_else(|| FirmwareError::Device("canned failure".to_owned()))
        }
    }

    fn canned(response: Option<GuestResponse>) -> Canned {
        Canned {
            response,
            requests: Vec::new(),
        }
    }

    #[test]
    fn auto_prefers_sev_guest_then_the_simulated_port_then_tsm() {
        let root = Path::new("/sys/kernel/config/tsm/report");
        let pick = |device, sev_guest, tsm| {
            choose_device(
                device,
                Present {
                    sev_guest,
                    tsm,
                    sim: false,
                },
                root,
            )
        };
        assert_eq!(
            pick(Device::Auto, true, true).expect("sev-guest"),
            Device::SevGuest
        );
        assert_eq!(pick(Device::Auto, false, true).expect("tsm"), Device::Tsm);
        assert_eq!(pick(Device::Tsm, true, true).expect("asked"), Device::Tsm);
        assert_eq!(
            pick(Device::SevGuest, false, false).expect("asked"),
            Device::SevGuest
        );
        let simulated = Present {
            sim: true,
            ..Present::default()
        };
        assert_eq!(
            choose_device(Device::Auto, simulated, root).expect("sim"),
            Device::Sim
        );
        let simulated_with_tsm = Present {
            sim: true,
            tsm: true,
            ..Present::default()
        };
        assert_eq!(
            choose_device(Device::Auto, simulated_with_tsm, root).expect("sim"),
            Device::Sim
        );
        let real_first = Present {
            sev_guest: true,
            sim: true,
            tsm: true,
        };
        assert_eq!(
            choose_device(Device::Auto, real_first, root).expect("real"),
            Device::SevGuest
        );
        let message = pick(Device::Auto, false, false)
            .expect_err("neither")
            .to_string();
        assert!(message.contains("/dev/sev-guest"), "{message}");
        assert!(message.contains(PORT_NAME), "{message}");
        assert!(
            message.contains("/sys/kernel/config/tsm/report"),
            "{message}"
        );
    }

    #[test]
    fn auto_without_any_device_names_both() {
        if SevGuestDevice::is_present() {
            println!("skipped: this is an SEV-SNP guest");
            return;
        }
        let error = open_reporter(Device::Auto, Path::new("/nonexistent/tsm")).expect_err("none");
        let message = error.to_string();
        assert!(
            message.contains("/dev/sev-guest") && message.contains("/nonexistent/tsm"),
            "{message}"
        );
        let error = open_reporter(Device::Tsm, Path::new("/nonexistent/tsm")).expect_err("none");
        assert!(error.to_string().contains("/nonexistent/tsm"), "{error}");
    }

    #[test]
    fn evidence_parses_the_report_and_its_certificates() {
        let report_data = [0x5a; 64];
        let certificates = vec![
            EvidenceCertificate::Vcek(vec![1, 2, 3]),
            EvidenceCertificate::Ask(vec![4; 10]),
        ];
        let mut reporter = canned(Some(GuestResponse::ExtendedReport {
            report: unsigned_report(&report_data, &[1; 48]),
            certificates: encode_certificate_table(&certificates),
        }));
        let evidence = evidence(&mut reporter, &report_data, 1).expect("evidence");
        assert_eq!(evidence.report.report_data, report_data);
        assert_eq!(evidence.certificates, certificates);
        assert_eq!(
            reporter.requests,
            vec![GuestRequest::ExtendedReport {
                report_data,
                vmpl: 1
            }]
        );
    }

    #[test]
    fn evidence_without_certificates_is_fine() {
        for table in [Vec::new(), encode_certificate_table(&[])] {
            let mut reporter = canned(Some(GuestResponse::ExtendedReport {
                report: unsigned_report(&[0; 64], &[1; 48]),
                certificates: table,
            }));
            let evidence = evidence(&mut reporter, &[0; 64], 0).expect("evidence");
            assert!(evidence.certificates.is_empty());
        }
    }

    #[test]
    fn bad_answers_are_errors() {
        let mut plain = canned(Some(GuestResponse::Report(unsigned_report(
            &[0; 64], &[1; 48],
        ))));
        assert!(matches!(
            evidence(&mut plain, &[0; 64], 0),
            Err(AgentError::UnexpectedResponse(_))
        ));
        let mut short = canned(Some(GuestResponse::ExtendedReport {
            report: vec![0; 10],
            certificates: Vec::new(),
        }));
        assert!(matches!(
            evidence(&mut short, &[0; 64], 0),
            Err(AgentError::Report(_))
        ));
        let mut bad_table = canned(Some(GuestResponse::ExtendedReport {
            report: unsigned_report(&[0; 64], &[1; 48]),
            certificates: vec![1; 24],
        }));
        assert!(matches!(
            evidence(&mut bad_table, &[0; 64], 0),
            Err(AgentError::CertTable(_))
        ));
        let mut failing = canned(None);
        assert!(matches!(
            evidence(&mut failing, &[0; 64], 0),
            Err(AgentError::Firmware(FirmwareError::Device(_)))
        ));
    }
}
