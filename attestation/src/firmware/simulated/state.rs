//! The simulated platform's state folder: its configuration, its chip
//! secret, its roots, and one record per launch holding an ASID. Records
//! outlive the process that made them (VMs outlive `hsevd`), and a lock
//! file serialises ASID accounting between processes sharing the folder.
//!
//! ```text
//! <dir>/platform.toml          product, chip id, TCB, ASIDs, firmware version
//! <dir>/secret.bin             32-byte chip secret (mode 0600)
//! <dir>/{ark,ask,asvk}.pem     roots; *.key.pem private keys (mode 0600)
//! <dir>/launches/<id>.json     one launch: its ASID, digest, host data
//! <dir>/state.lock             taken while ASIDs are counted or changed
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::firmware::FirmwareError;
use crate::hex_bytes::HexBytes;
use crate::product::Product;
use crate::report::TcbVersion;

fn state_error(path: &Path, problem: impl std::fmt::Display) -> FirmwareError {
    FirmwareError::State {
        path: path.display().to_string(),
        problem: problem.to_string(),
    }
}

/// Writes `bytes` to `path` atomically (write, fsync, rename) with `mode`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FirmwareError> {
    let partial = path.with_extension("partial");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&partial)
        .map_err(|error| state_error(&partial, error))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|error| state_error(&partial, error))?;
    fs::rename(&partial, path).map_err(|error| state_error(path, error))
}

/// Writes a secret: readable by the owner only.
pub(super) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), FirmwareError> {
    write_atomic(path, bytes, 0o600)
}

/// Writes a public file.
pub(super) fn write_public(path: &Path, bytes: &[u8]) -> Result<(), FirmwareError> {
    write_atomic(path, bytes, 0o644)
}

/// Reads a state file.
pub(super) fn read_private(path: &Path) -> Result<Vec<u8>, FirmwareError> {
    fs::read(path).map_err(|error| state_error(path, error))
}

/// The platform's configuration, as `hsev firmware sim init` writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformConfig {
    /// The product the platform simulates.
    pub product: Product,
    /// Its chip id (Turin: 8 significant bytes, the rest zero).
    pub chip_id: HexBytes<64>,
    /// Current, reported and committed TCB.
    pub tcb: TcbVersion,
    /// SEV-ES/SNP ASIDs.
    pub asids: u32,
    /// Plain SEV ASIDs.
    pub sev_asids: u32,
    /// Whether the platform runs with SMT enabled.
    pub smt_enabled: bool,
    /// Firmware API major version.
    pub api_major: u8,
    /// Firmware API minor version.
    pub api_minor: u8,
    /// Firmware build.
    pub build: u8,
}

impl PlatformConfig {
    /// Checks the values serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.tcb.encode(self.product.tcb_layout()).is_err() {
            return Err(format!(
                "tcb: {} TCBs {} an fmc field",
                self.product,
                if self.product == Product::Turin {
                    "need"
                } else {
                    "have no"
                }
            ));
        }
        if self.asids == 0 {
            return Err("asids: a platform needs at least one SEV-ES/SNP ASID".into());
        }
        if self.product.hw_id_len() < 64
            && self.chip_id.0[self.product.hw_id_len()..]
                .iter()
                .any(|&byte| byte != 0)
        {
            return Err(format!(
                "chip_id: {} chip ids have {} significant bytes",
                self.product,
                self.product.hw_id_len()
            ));
        }
        Ok(())
    }
}

/// The state folder.
#[derive(Debug, Clone)]
pub(super) struct StateDir {
    pub(super) root: PathBuf,
}

/// A launch as recorded on disk: enough to count its ASID and to answer
/// its guest's requests after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LaunchRecord {
    pub id: u64,
    pub asid: u32,
    /// The process that started the launch; an unfinished launch whose
    /// process is gone is reclaimed.
    pub pid: u32,
    pub policy: u64,
    /// Set once the launch is finished.
    pub finished: Option<FinishedLaunch>,
}

/// What `SNP_LAUNCH_FINISH` fixed for the guest's lifetime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FinishedLaunch {
    pub launch_digest: HexBytes<48>,
    pub host_data: HexBytes<32>,
    pub family_id: HexBytes<16>,
    pub image_id: HexBytes<16>,
    pub guest_svn: u32,
    pub id_key_digest: HexBytes<48>,
    pub author_key_digest: HexBytes<48>,
    pub report_id: HexBytes<32>,
}

/// Holds `state.lock` until dropped.
pub(super) struct StateLock(File);

impl Drop for StateLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

impl StateDir {
    pub(super) fn config_path(&self) -> PathBuf {
        self.root.join("platform.toml")
    }

    pub(super) fn exists(&self) -> bool {
        self.config_path().is_file()
    }

    pub(super) fn read_config(&self) -> Result<PlatformConfig, FirmwareError> {
        let path = self.config_path();
        let text = fs::read_to_string(&path).map_err(|error| state_error(&path, error))?;
        let config: PlatformConfig =
            toml::from_str(&text).map_err(|error| state_error(&path, error))?;
        config
            .validate()
            .map_err(|problem| state_error(&path, problem))?;
        Ok(config)
    }

    pub(super) fn write_config(&self, config: &PlatformConfig) -> Result<(), FirmwareError> {
        let text =
            toml::to_string(config).map_err(|error| state_error(&self.config_path(), error))?;
        let header = "# Simulated AMD Secure Processor: NO confidentiality. Written by `hsev firmware sim init`.\n";
        write_public(&self.config_path(), format!("{header}{text}").as_bytes())
    }

    pub(super) fn read_secret(&self) -> Result<[u8; 32], FirmwareError> {
        let path = self.root.join("secret.bin");
        read_private(&path)?
            .try_into()
            .map_err(|_| state_error(&path, "the chip secret must be 32 bytes"))
    }

    pub(super) fn write_secret(&self, secret: &[u8; 32]) -> Result<(), FirmwareError> {
        write_private(&self.root.join("secret.bin"), secret)
    }

    fn launches_dir(&self) -> PathBuf {
        self.root.join("launches")
    }

    fn record_path(&self, id: u64) -> PathBuf {
        self.launches_dir().join(format!("{id:016x}.json"))
    }

    pub(super) fn lock(&self) -> Result<StateLock, FirmwareError> {
        let path = self.root.join("state.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|error| state_error(&path, error))?;
        file.lock().map_err(|error| state_error(&path, error))?;
        Ok(StateLock(file))
    }

    /// Every record, dropping unfinished ones whose process is gone.
    pub(super) fn records(&self, _lock: &StateLock) -> Result<Vec<LaunchRecord>, FirmwareError> {
        let dir = self.launches_dir();
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        let mut records = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|error| state_error(&dir, error))? {
            let path = entry.map_err(|error| state_error(&dir, error))?.path();
            if path.extension().is_none_or(|extension| extension != "json") {
                continue;
            }
            let bytes = read_private(&path)?;
            let record: LaunchRecord =
                serde_json::from_slice(&bytes).map_err(|error| state_error(&path, error))?;
            let abandoned =
                record.finished.is_none() && !Path::new(&format!("/proc/{}", record.pid)).exists();
            if abandoned {
                fs::remove_file(&path).map_err(|error| state_error(&path, error))?;
            } else {
                records.push(record);
            }
        }
        records.sort_by_key(|record| record.id);
        Ok(records)
    }

    pub(super) fn record(&self, id: u64) -> Result<Option<LaunchRecord>, FirmwareError> {
        let path = self.record_path(id);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(
                serde_json::from_slice(&bytes).map_err(|error| state_error(&path, error))?,
            )),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(state_error(&path, error)),
        }
    }

    pub(super) fn write_record(&self, record: &LaunchRecord) -> Result<(), FirmwareError> {
        let dir = self.launches_dir();
        fs::create_dir_all(&dir).map_err(|error| state_error(&dir, error))?;
        let json = serde_json::to_vec_pretty(record).map_err(|error| state_error(&dir, error))?;
        write_private(&self.record_path(record.id), &json)
    }

    pub(super) fn remove_record(&self, id: u64) {
        let _ = fs::remove_file(self.record_path(id));
    }
}
