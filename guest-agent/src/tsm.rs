//! SEV-SNP reports through the kernel's configfs-tsm interface
//! (`/sys/kernel/config/tsm/report`, Linux 6.7 and later): create a report
//! folder, write the privilege level and the 64-byte input, read the report
//! (`outblob`) and the certificate table (`auxblob`), remove the folder.
//!
//! Plain file operations, so no ioctl and no unsafe code. The kernel bumps
//! `generation` on every write: reading it around the read detects another
//! writer racing on the same folder, in which case the report is refused.

use std::fs;
use std::path::{Path, PathBuf};

use hsev_attestation::certs::parse_certificate_table;
use hsev_attestation::report::{AttestationReport, SnpEvidence};

/// Where the kernel mounts configfs-tsm report folders.
pub const DEFAULT_ROOT: &str = "/sys/kernel/config/tsm/report";

/// Why a report could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum TsmError {
    /// No configfs-tsm here: not an SEV-SNP guest, or an older kernel.
    #[error(
        "no configfs-tsm report interface at {0} (not an SEV-SNP guest, or configfs not mounted)"
    )]
    Unavailable(PathBuf),
    /// The provider is not the SEV guest driver.
    #[error("the TSM provider is {0:?}, not sev_guest")]
    WrongProvider(String),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// Another writer changed the request while it was read.
    #[error("the report request was changed concurrently (generation {before} -> {after})")]
    Raced {
        /// Generation after writing the request.
        before: String,
        /// Generation after reading the report.
        after: String,
    },
    /// The VMPL is out of range.
    #[error("VMPL {0} is out of range (0-3)")]
    Vmpl(u32),
    /// The kernel returned something that is not a report.
    #[error("the report from the kernel does not parse: {0}")]
    Report(#[from] hsev_attestation::report::ReportError),
    /// The certificate table does not parse.
    #[error("the certificate table from the kernel does not parse: {0}")]
    CertTable(#[from] hsev_attestation::certs::CertTableError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TsmError + '_ {
    move |source| TsmError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The configfs-tsm report interface.
#[derive(Debug, Clone)]
pub struct TsmReporter {
    root: PathBuf,
}

/// Removes the request folder whatever happens.
struct RequestDir(PathBuf);

impl Drop for RequestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

impl TsmReporter {
    /// The interface at `root` (normally [`DEFAULT_ROOT`]).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, TsmError> {
        let root = root.into();
        if !root.is_dir() {
            return Err(TsmError::Unavailable(root));
        }
        Ok(TsmReporter { root })
    }

    /// An extended report: the report for `report_data` at `vmpl`, and the
    /// certificates the host supplied with it (possibly none).
    pub fn evidence(&self, report_data: &[u8; 64], vmpl: u32) -> Result<SnpEvidence, TsmError> {
        if vmpl > 3 {
            return Err(TsmError::Vmpl(vmpl));
        }
        let dir = self.root.join(format!("hsev-{}", std::process::id()));
        fs::create_dir(&dir).map_err(io(&dir))?;
        let request = RequestDir(dir);
        let file = |name: &str| request.0.join(name);

        let provider_path = file("provider");
        let provider = fs::read_to_string(&provider_path).map_err(io(&provider_path))?;
        if provider.trim() != "sev_guest" {
            return Err(TsmError::WrongProvider(provider.trim().to_owned()));
        }
        let privlevel = file("privlevel");
        fs::write(&privlevel, vmpl.to_string()).map_err(io(&privlevel))?;
        let inblob = file("inblob");
        fs::write(&inblob, report_data).map_err(io(&inblob))?;

        let generation_path = file("generation");
        let before = fs::read_to_string(&generation_path).map_err(io(&generation_path))?;
        let outblob = file("outblob");
        let report = fs::read(&outblob).map_err(io(&outblob))?;
        let auxblob = file("auxblob");
        // The host may supply no certificates: an empty or absent auxblob.
        let table = match fs::read(&auxblob) {
            Ok(table) => table,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(error) => return Err(io(&auxblob)(error)),
        };
        let after = fs::read_to_string(&generation_path).map_err(io(&generation_path))?;
        if before != after {
            return Err(TsmError::Raced {
                before: before.trim().to_owned(),
                after: after.trim().to_owned(),
            });
        }

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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_interface_is_named() {
        let error = TsmReporter::new("/nonexistent/tsm/report").expect_err("absent");
        assert!(
            error.to_string().contains("/nonexistent/tsm/report"),
            "{error}"
        );
    }

    /// Runs only inside an SEV-SNP guest; elsewhere it says why it did not.
    #[test]
    fn a_real_report_binds_the_report_data() {
        let reporter = match TsmReporter::new(DEFAULT_ROOT) {
            Ok(reporter) => reporter,
            Err(error) => {
                println!("skipped: {error}");
                return;
            }
        };
        let report_data = [0x5a; 64];
        let evidence = reporter
            .evidence(&report_data, 0)
            .expect("the guest produces a report");
        assert_eq!(evidence.report.report_data, report_data);
    }
}
