//! The guest's own AMD Secure Processor through `/dev/sev-guest`, the
//! kernel's `sev-guest` driver, by the `sev` crate: reports, extended
//! reports with the host's certificates, and derived keys.
//!
//! Requests are checked here before the driver sees them, so that a bad
//! VMPL or field mask is a [`FirmwareError::BadRequest`] naming the field
//! rather than an `EINVAL` from the kernel.

use std::path::Path;

use sev::error::{FirmwareError as SevFirmwareError, SevError, UserApiError, VmmError};
use sev::firmware::guest::{DerivedKey, Firmware, GuestFieldSelect};
use sev::firmware::host::{CertTableEntry, CertType};

use super::GuestReporter;
use crate::certs::encode_certificate_table;
use crate::firmware::{DerivedKeyRequest, FirmwareError, GuestRequest, GuestResponse, RootKey};
use crate::report::EvidenceCertificate;

/// Where the `sev-guest` driver's device lives.
pub const DEFAULT_SEV_GUEST_PATH: &str = "/dev/sev-guest";

/// The highest VMPL.
const MAX_VMPL: u32 = 3;
/// `MSG_KEY_REQ.GUEST_FIELD_SELECT` bits this crate knows: policy, image
/// id, family id, measurement, guest SVN, TCB version.
const GUEST_FIELD_SELECT_MASK: u64 = 0x3f;
/// `MSG_KEY_REQ` version 1: version 2 wants a launch mitigation vector,
/// which [`DerivedKeyRequest`] does not carry.
const KEY_REQUEST_VERSION: u32 = 1;

/// `/dev/sev-guest`, opened.
#[derive(Debug)]
pub struct SevGuestDevice {
    firmware: Firmware,
}

impl SevGuestDevice {
    /// Opens [`DEFAULT_SEV_GUEST_PATH`] (the `sev` crate opens that path
    /// only).
    pub fn open() -> Result<Self, FirmwareError> {
        let firmware = Firmware::open().map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                FirmwareError::Unavailable(format!("no {DEFAULT_SEV_GUEST_PATH}: {error}"))
            } else {
                FirmwareError::Unavailable(format!("cannot open {DEFAULT_SEV_GUEST_PATH}: {error}"))
            }
        })?;
        Ok(SevGuestDevice { firmware })
    }

    /// Whether this guest has the device at all.
    pub fn is_present() -> bool {
        Path::new(DEFAULT_SEV_GUEST_PATH).exists()
    }
}

impl GuestReporter for SevGuestDevice {
    fn request(&mut self, request: &GuestRequest) -> Result<GuestResponse, FirmwareError> {
        validate_request(request)?;
        match request {
            GuestRequest::Report { report_data, vmpl } => self
                .firmware
                .get_report(None, Some(*report_data), Some(*vmpl))
                .map(GuestResponse::Report)
                .map_err(|error| guest_error("SNP_GET_REPORT", error)),
            GuestRequest::ExtendedReport { report_data, vmpl } => {
                let (report, entries) = self
                    .firmware
                    .get_ext_report(None, Some(*report_data), Some(*vmpl))
                    .map_err(|error| guest_error("SNP_GET_EXT_REPORT", error))?;
                Ok(GuestResponse::ExtendedReport {
                    report,
                    certificates: certificate_table(entries.as_deref().unwrap_or_default()),
                })
            }
            GuestRequest::DerivedKey(key_request) => self
                .firmware
                .get_derived_key(Some(KEY_REQUEST_VERSION), derived_key(key_request))
                .map(GuestResponse::DerivedKey)
                .map_err(|error| guest_error("SNP_GET_DERIVED_KEY", error)),
        }
    }
}

/// Checks a request's fields against what the firmware accepts.
pub(crate) fn validate_request(request: &GuestRequest) -> Result<(), FirmwareError> {
    let vmpl = match request {
        GuestRequest::Report { vmpl, .. } | GuestRequest::ExtendedReport { vmpl, .. } => *vmpl,
        GuestRequest::DerivedKey(key_request) => {
            let unknown = key_request.guest_field_select & !GUEST_FIELD_SELECT_MASK;
            if unknown != 0 {
                return Err(FirmwareError::BadRequest(format!(
                    "guest_field_select {:#x} sets bits {unknown:#x}; only bits 0-5 are defined",
                    key_request.guest_field_select
                )));
            }
            key_request.vmpl
        }
    };
    if vmpl > MAX_VMPL {
        return Err(FirmwareError::BadRequest(format!(
            "VMPL {vmpl} is out of range (0-{MAX_VMPL})"
        )));
    }
    Ok(())
}

/// The `sev` crate's `MSG_KEY_REQ` for a request.
fn derived_key(request: &DerivedKeyRequest) -> DerivedKey {
    let bit = |index: u32| request.guest_field_select & (1 << index) != 0;
    let mut fields = GuestFieldSelect::default();
    fields.set_guest_policy(bit(0));
    fields.set_image_id(bit(1));
    fields.set_family_id(bit(2));
    fields.set_measurement(bit(3));
    fields.set_svn(bit(4));
    fields.set_tcb_version(bit(5));
    DerivedKey::new(
        request.root_key == RootKey::Vmrk,
        fields,
        request.vmpl,
        request.guest_svn,
        request.tcb_version,
        None,
    )
}

/// The raw GHCB certificate table of the `sev` crate's entries. Entries of
/// GUIDs this crate has no name for are left out.
fn certificate_table(entries: &[CertTableEntry]) -> Vec<u8> {
    let certificates: Vec<EvidenceCertificate> = entries
        .iter()
        .filter_map(|entry| {
            let data = entry.data.clone();
            Some(match entry.cert_type {
                CertType::ARK => EvidenceCertificate::Ark(data),
                CertType::ASK => EvidenceCertificate::Ask(data),
                CertType::VCEK => EvidenceCertificate::Vcek(data),
                CertType::VLEK => EvidenceCertificate::Vlek(data),
                CertType::CRL => EvidenceCertificate::Crl(data),
                CertType::Empty | CertType::OTHER(_) => return None,
            })
        })
        .collect();
    encode_certificate_table(&certificates)
}

/// Maps a failed guest request.
fn guest_error(what: &str, error: UserApiError) -> FirmwareError {
    match error {
        UserApiError::VmplError => FirmwareError::BadRequest(format!("{what}: VMPL out of range")),
        UserApiError::FirmwareError(SevFirmwareError::KnownSevError(SevError::InvalidParam)) => {
            FirmwareError::BadRequest(format!(
                "{what}: the firmware refused a parameter (INVALID_PARAM)"
            ))
        }
        UserApiError::VmmError(VmmError::RateLimitRetryRequest) => FirmwareError::Device(format!(
            "{what}: the host rate-limited guest requests; retry later"
        )),
        error => FirmwareError::Device(format!("{what}: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::parse_certificate_table;

    fn key_request(guest_field_select: u64, vmpl: u32) -> DerivedKeyRequest {
        DerivedKeyRequest {
            root_key: RootKey::Vcek,
            guest_field_select,
            vmpl,
            guest_svn: 0,
            tcb_version: 0,
        }
    }

    #[test]
    fn requests_are_validated() {
        for vmpl in 0..=3 {
            let report = GuestRequest::Report {
                report_data: [0; 64],
                vmpl,
            };
            assert!(validate_request(&report).is_ok());
        }
        let error = validate_request(&GuestRequest::ExtendedReport {
            report_data: [0; 64],
            vmpl: 4,
        })
        .expect_err("VMPL 4");
        assert!(
            matches!(&error, FirmwareError::BadRequest(reason) if reason.contains("VMPL 4")),
            "{error}"
        );
        assert!(validate_request(&GuestRequest::DerivedKey(key_request(0x3f, 3))).is_ok());
        assert!(validate_request(&GuestRequest::DerivedKey(key_request(0, 0))).is_ok());
        let error =
            validate_request(&GuestRequest::DerivedKey(key_request(0x40, 0))).expect_err("bit 6");
        assert!(
            matches!(&error, FirmwareError::BadRequest(reason) if reason.contains("0x40")),
            "{error}"
        );
        assert!(validate_request(&GuestRequest::DerivedKey(key_request(1 << 63, 0))).is_err());
        assert!(validate_request(&GuestRequest::DerivedKey(key_request(1, 7))).is_err());
    }

    #[test]
    fn derived_key_requests_map_field_by_field() {
        let request = DerivedKeyRequest {
            root_key: RootKey::Vmrk,
            guest_field_select: 0b10_1001,
            vmpl: 2,
            guest_svn: 7,
            tcb_version: 0x1234,
        };
        let key = derived_key(&request);
        assert_eq!(key.get_root_key_select(), 1);
        assert_eq!(key.vmpl, 2);
        assert_eq!(key.guest_svn, 7);
        assert_eq!(key.tcb_version, 0x1234);
        assert_eq!(key.launch_mit_vector, None);
        let fields = key.guest_field_select;
        assert_eq!(
            [
                fields.get_guest_policy(),
                fields.get_image_id(),
                fields.get_family_id(),
                fields.get_measurement(),
                fields.get_svn(),
                fields.get_tcb_version(),
                fields.get_launch_mit_vector(),
            ],
            [true, false, false, true, false, true, false]
        );
        let vcek = derived_key(&key_request(0x3f, 0));
        assert_eq!(vcek.get_root_key_select(), 0);
        assert!(vcek.guest_field_select.get_tcb_version());
    }

    #[test]
    fn certificate_tables_keep_the_known_entries() {
        let entries = vec![
            CertTableEntry::new(CertType::VCEK, vec![1, 2, 3]),
            CertTableEntry::new(CertType::ASK, vec![4; 40]),
            CertTableEntry::new(CertType::Empty, vec![9]),
            CertTableEntry::new(CertType::ARK, vec![5; 7]),
            CertTableEntry::new(CertType::VLEK, vec![6]),
            CertTableEntry::new(CertType::CRL, Vec::new()),
        ];
        let table = certificate_table(&entries);
        assert_eq!(
            parse_certificate_table(&table).expect("parses"),
            vec![
                EvidenceCertificate::Vcek(vec![1, 2, 3]),
                EvidenceCertificate::Ask(vec![4; 40]),
                EvidenceCertificate::Ark(vec![5; 7]),
                EvidenceCertificate::Vlek(vec![6]),
                EvidenceCertificate::Crl(Vec::new()),
            ]
        );
        let empty = certificate_table(&[]);
        assert_eq!(parse_certificate_table(&empty).expect("parses"), Vec::new());
    }

    #[test]
    fn driver_errors_map_to_precise_variants() {
        assert!(matches!(
            guest_error("SNP_GET_REPORT", UserApiError::VmplError),
            FirmwareError::BadRequest(_)
        ));
        assert!(matches!(
            guest_error(
                "SNP_GET_DERIVED_KEY",
                UserApiError::FirmwareError(SevFirmwareError::KnownSevError(
                    SevError::InvalidParam
                ))
            ),
            FirmwareError::BadRequest(_)
        ));
        let error = guest_error(
            "SNP_GET_EXT_REPORT",
            UserApiError::VmmError(VmmError::RateLimitRetryRequest),
        );
        assert!(
            matches!(&error, FirmwareError::Device(reason) if reason.contains("rate-limited")),
            "{error}"
        );
        let error = guest_error(
            "SNP_GET_REPORT",
            UserApiError::IOError(std::io::Error::from(std::io::ErrorKind::PermissionDenied)),
        );
        assert!(
            matches!(&error, FirmwareError::Device(reason) if reason.starts_with("SNP_GET_REPORT")),
            "{error}"
        );
    }

    #[test]
    fn a_missing_device_is_unavailable() {
        if SevGuestDevice::is_present() {
            return;
        }
        let error = SevGuestDevice::open().expect_err("absent");
        assert!(
            matches!(&error, FirmwareError::Unavailable(reason) if reason.starts_with("no /dev/sev-guest")),
            "{error}"
        );
    }

    /// Runs only inside an SEV-SNP guest; elsewhere it says why it did not.
    #[test]
    fn a_real_report_binds_the_report_data() {
        let mut device = match SevGuestDevice::open() {
            Ok(device) => device,
            Err(FirmwareError::Unavailable(reason)) => {
                println!("skipped: {reason}");
                return;
            }
            Err(error) => panic!("{error}"),
        };
        let report_data = [0x5a; 64];
        let response = device
            .request(&GuestRequest::ExtendedReport {
                report_data,
                vmpl: 0,
            })
            .expect("the guest gets a report");
        let GuestResponse::ExtendedReport {
            report,
            certificates,
        } = response
        else {
            panic!("not an extended report");
        };
        let report = crate::report::AttestationReport::from_bytes(&report).expect("parses");
        assert_eq!(report.report_data, report_data);
        parse_certificate_table(&certificates).expect("the table parses");
        let key = device
            .request(&GuestRequest::DerivedKey(key_request(0, 0)))
            .expect("a derived key");
        assert!(matches!(key, GuestResponse::DerivedKey(_)));
    }
}
