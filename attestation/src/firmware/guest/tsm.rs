//! SEV-SNP reports through the kernel's configfs-tsm interface
//! (`/sys/kernel/config/tsm/report`, Linux 6.7 and later): create a report
//! folder, write the privilege level and the 64-byte input, read the report
//! (`outblob`) and the certificate table (`auxblob`), remove the folder.
//!
//! Plain file operations, so no ioctl and no unsafe code. The kernel bumps
//! `generation` on every write: reading it around the read detects another
//! writer racing on the same folder, in which case the report is refused.
//! configfs-tsm has no derived keys: those need `/dev/sev-guest`
//! ([`super::sev_guest::SevGuestDevice`]).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::sev_guest::validate_request;
use super::GuestReporter;
use crate::certs::encode_certificate_table;
use crate::firmware::{FirmwareError, GuestRequest, GuestResponse};

/// Where the kernel mounts configfs-tsm report folders.
pub const DEFAULT_TSM_ROOT: &str = "/sys/kernel/config/tsm/report";

/// The provider name of the SEV guest driver.
const SEV_PROVIDER: &str = "sev_guest";

/// Distinguishes the request folders of one process.
static NEXT_REQUEST: AtomicU64 = AtomicU64::new(0);

/// The configfs-tsm report interface.
#[derive(Debug, Clone)]
pub struct ConfigFsTsm {
    root: PathBuf,
}

/// Removes the request folder whatever happens.
struct RequestDir(PathBuf);

impl Drop for RequestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> FirmwareError + '_ {
    move |error| FirmwareError::Device(format!("{}: {error}", path.display()))
}

impl ConfigFsTsm {
    /// The interface at [`DEFAULT_TSM_ROOT`].
    pub fn open() -> Result<Self, FirmwareError> {
        Self::new(DEFAULT_TSM_ROOT)
    }

    /// The interface at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, FirmwareError> {
        let root = root.into();
        if !root.is_dir() {
            return Err(FirmwareError::Unavailable(format!(
                "no configfs-tsm report interface at {} (not an SEV-SNP guest, an older kernel, \
                 or configfs not mounted)",
                root.display()
            )));
        }
        Ok(ConfigFsTsm { root })
    }

    /// Where the interface is.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// One report request in a fresh folder, removed afterwards.
    fn report(
        &self,
        report_data: &[u8; 64],
        vmpl: u32,
        with_certificates: bool,
    ) -> Result<(Vec<u8>, Vec<u8>), FirmwareError> {
        let name = format!(
            "hsev-{}-{}",
            std::process::id(),
            NEXT_REQUEST.fetch_add(1, Ordering::Relaxed)
        );
        let dir = self.root.join(name);
        fs::create_dir(&dir).map_err(io_error(&dir))?;
        let request = RequestDir(dir);
        read_request(&request.0, report_data, vmpl, with_certificates)
    }
}

/// Fills and reads one request folder the kernel created.
fn read_request(
    dir: &Path,
    report_data: &[u8; 64],
    vmpl: u32,
    with_certificates: bool,
) -> Result<(Vec<u8>, Vec<u8>), FirmwareError> {
    let file = |name: &str| dir.join(name);

    let provider_path = file("provider");
    let provider = fs::read_to_string(&provider_path).map_err(io_error(&provider_path))?;
    if provider.trim() != SEV_PROVIDER {
        return Err(FirmwareError::Unavailable(format!(
            "the TSM provider is {:?}, not {SEV_PROVIDER}",
            provider.trim()
        )));
    }
    let privlevel = file("privlevel");
    fs::write(&privlevel, vmpl.to_string()).map_err(io_error(&privlevel))?;
    let inblob = file("inblob");
    fs::write(&inblob, report_data).map_err(io_error(&inblob))?;

    let generation_path = file("generation");
    let before = fs::read_to_string(&generation_path).map_err(io_error(&generation_path))?;
    let outblob = file("outblob");
    let report = fs::read(&outblob).map_err(io_error(&outblob))?;
    let table = if with_certificates {
        let auxblob = file("auxblob");
        // The host may supply no certificates: an empty or absent auxblob.
        match fs::read(&auxblob) {
            Ok(table) => table,
            Err(error) if error.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(error) => return Err(io_error(&auxblob)(error)),
        }
    } else {
        Vec::new()
    };
    let after = fs::read_to_string(&generation_path).map_err(io_error(&generation_path))?;
    if before != after {
        return Err(FirmwareError::Device(format!(
            "the report request was changed concurrently (generation {} -> {})",
            before.trim(),
            after.trim()
        )));
    }
    Ok((report, table))
}

impl GuestReporter for ConfigFsTsm {
    fn request(&mut self, request: &GuestRequest) -> Result<GuestResponse, FirmwareError> {
        validate_request(request)?;
        match request {
            GuestRequest::Report { report_data, vmpl } => self
                .report(report_data, *vmpl, false)
                .map(|(report, _)| GuestResponse::Report(report)),
            GuestRequest::ExtendedReport { report_data, vmpl } => {
                let (report, table) = self.report(report_data, *vmpl, true)?;
                Ok(GuestResponse::ExtendedReport {
                    report,
                    // No certificates: a table of just its terminator.
                    certificates: if table.is_empty() {
                        encode_certificate_table(&[])
                    } else {
                        table
                    },
                })
            }
            GuestRequest::DerivedKey(_) => Err(FirmwareError::Unsupported(
                "configfs-tsm has no derived keys: use /dev/sev-guest".to_owned(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::parse_certificate_table;
    use crate::firmware::{DerivedKeyRequest, RootKey};
    use crate::report::EvidenceCertificate;

    /// A request folder as the kernel would create it.
    fn fake_request(provider: &str, auxblob: Option<&[u8]>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let put = |name: &str, contents: &[u8]| {
            fs::write(dir.path().join(name), contents).expect("write");
        };
        put("provider", format!("{provider}\n").as_bytes());
        put("generation", b"3\n");
        put("outblob", &[0xab; 0x4a0]);
        if let Some(auxblob) = auxblob {
            put("auxblob", auxblob);
        }
        dir
    }

    #[test]
    fn a_missing_interface_is_named() {
        let error = ConfigFsTsm::new("/nonexistent/tsm/report").expect_err("absent");
        assert!(
            matches!(&error, FirmwareError::Unavailable(reason) if reason.contains("/nonexistent/tsm/report")),
            "{error}"
        );
    }

    #[test]
    fn a_request_writes_its_inputs_and_reads_both_blobs() {
        let table = encode_certificate_table(&[EvidenceCertificate::Vcek(vec![1, 2, 3])]);
        let dir = fake_request("sev_guest", Some(&table));
        let (report, read_table) = read_request(dir.path(), &[0x5a; 64], 2, true).expect("reads");
        assert_eq!(report, vec![0xab; 0x4a0]);
        assert_eq!(read_table, table);
        assert_eq!(
            fs::read_to_string(dir.path().join("privlevel")).expect("privlevel"),
            "2"
        );
        assert_eq!(
            fs::read(dir.path().join("inblob")).expect("inblob"),
            vec![0x5a; 64]
        );
        let (_, no_table) = read_request(dir.path(), &[0; 64], 0, false).expect("reads");
        assert!(no_table.is_empty());
    }

    #[test]
    fn a_missing_auxblob_is_no_certificates() {
        let dir = fake_request("sev_guest", None);
        let (_, table) = read_request(dir.path(), &[0; 64], 0, true).expect("reads");
        assert!(table.is_empty());
    }

    #[test]
    fn another_provider_is_refused() {
        let dir = fake_request("tdx_guest", None);
        let error = read_request(dir.path(), &[0; 64], 0, true).expect_err("TDX");
        assert!(
            matches!(&error, FirmwareError::Unavailable(reason) if reason.contains("tdx_guest")),
            "{error}"
        );
        assert!(!dir.path().join("inblob").exists(), "nothing written");
    }

    #[test]
    fn the_request_folder_is_removed_on_failure() {
        // A plain folder has no `provider` file: the request fails after
        // creating its folder, which must be gone afterwards.
        let root = tempfile::tempdir().expect("tempdir");
        let mut tsm = ConfigFsTsm::new(root.path()).expect("a folder");
        let error = tsm
            .request(&GuestRequest::ExtendedReport {
                report_data: [0; 64],
                vmpl: 0,
            })
            .expect_err("no provider");
        assert!(
            matches!(&error, FirmwareError::Device(reason) if reason.contains("provider")),
            "{error}"
        );
        assert_eq!(fs::read_dir(root.path()).expect("list").count(), 0);
    }

    #[test]
    fn bad_requests_and_derived_keys_are_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut tsm = ConfigFsTsm::new(root.path()).expect("a folder");
        let error = tsm
            .request(&GuestRequest::Report {
                report_data: [0; 64],
                vmpl: 4,
            })
            .expect_err("VMPL 4");
        assert!(matches!(error, FirmwareError::BadRequest(_)), "{error}");
        let error = tsm
            .request(&GuestRequest::DerivedKey(DerivedKeyRequest {
                root_key: RootKey::Vcek,
                guest_field_select: 0,
                vmpl: 0,
                guest_svn: 0,
                tcb_version: 0,
            }))
            .expect_err("no keys");
        assert!(
            matches!(&error, FirmwareError::Unsupported(reason) if reason.contains("/dev/sev-guest")),
            "{error}"
        );
        assert_eq!(fs::read_dir(root.path()).expect("list").count(), 0);
    }

    /// Runs only inside an SEV-SNP guest; elsewhere it says why it did not.
    #[test]
    fn a_real_report_binds_the_report_data() {
        let mut tsm = match ConfigFsTsm::open() {
            Ok(tsm) => tsm,
            Err(FirmwareError::Unavailable(reason)) => {
                println!("skipped: no configfs-tsm: {reason}");
                return;
            }
            Err(error) => panic!("{error}"),
        };
        let report_data = [0x5a; 64];
        let response = tsm
            .request(&GuestRequest::ExtendedReport {
                report_data,
                vmpl: 0,
            })
            .expect("the guest produces a report");
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
    }
}
