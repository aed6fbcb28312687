//! An image folder's `manifest.json`: the firmware and either a kernel and
//! initrd booted directly (what `make image` writes) or a disk the firmware
//! boots (`"disk": {"path", "sha256", "format": "qcow2" | "raw"}`), each
//! artifact with its sha256, and the command line.
//!
//! hsevd reads it to import an image; the tenant's CLI reads its own copy to
//! compute what a launch of that image must measure. Either way every
//! artifact is checked against its sha256 before its bytes are used. The
//! image id is SHA-256 of the manifest's bytes, so a tenant can tell that
//! the image a host names is the one it holds.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ArtifactPaths;
use crate::hypervisor::DiskFormat;

/// A manifest that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The manifest or an artifact cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not a manifest.
    #[error("{path}: {source}")]
    Parse {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        source: serde_json::Error,
    },
    /// A manifest of an impossible shape.
    #[error("{0}")]
    Shape(String),
    /// An artifact whose bytes are not the ones the manifest names.
    #[error("{path}: sha256 {actual} differs from the manifest's {expected}")]
    Sha256 {
        /// The artifact.
        path: PathBuf,
        /// Its sha256.
        actual: String,
        /// The manifest's.
        expected: String,
    },
}

/// An artifact entry.
#[derive(Debug, Deserialize)]
pub struct Artifact {
    /// Relative to the manifest's folder.
    pub path: PathBuf,
    /// Hex SHA-256 of its bytes.
    pub sha256: String,
    /// The firmware measures a direct boot's kernel, initrd and command line.
    #[serde(default)]
    pub kernel_hashes: bool,
    /// A disk's format.
    #[serde(default)]
    pub format: Option<String>,
}

/// The parts of `manifest.json` HyperSEV uses (the rest describes how the
/// image was built).
#[derive(Debug, Deserialize)]
pub struct Manifest {
    /// The OVMF firmware.
    pub firmware: Artifact,
    /// The kernel of a direct boot.
    pub kernel: Option<Artifact>,
    /// Its initrd.
    pub initrd: Option<Artifact>,
    /// The disk the firmware boots.
    pub disk: Option<Artifact>,
    /// The image's kernel command line.
    #[serde(default)]
    pub cmdline: String,
}

/// An artifact whose bytes were checked.
#[derive(Debug, Clone)]
pub struct VerifiedArtifact {
    /// `firmware`, `kernel`, `initrd` or `disk`.
    pub role: &'static str,
    /// Where it is.
    pub path: PathBuf,
    /// Its sha256, hex.
    pub sha256: String,
    /// Its size.
    pub size: u64,
}

/// A manifest read from a folder, with its bytes.
#[derive(Debug)]
pub struct ImageFolder {
    /// The folder.
    pub dir: PathBuf,
    /// The parsed manifest.
    pub manifest: Manifest,
    /// The manifest's bytes.
    pub bytes: Vec<u8>,
}

impl ImageFolder {
    /// Reads `dir/manifest.json` (or the manifest file itself).
    pub fn read(path: &Path) -> Result<Self, ManifestError> {
        let (dir, manifest_path) = if path.is_dir() {
            (path.to_path_buf(), path.join("manifest.json"))
        } else {
            (
                path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                path.to_path_buf(),
            )
        };
        let bytes = std::fs::read(&manifest_path).map_err(|source| ManifestError::Read {
            path: manifest_path.clone(),
            source,
        })?;
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|source| ManifestError::Parse {
                path: manifest_path,
                source,
            })?;
        manifest.check_shape()?;
        Ok(ImageFolder {
            dir,
            manifest,
            bytes,
        })
    }

    /// The image id: SHA-256 of the manifest's bytes, hex.
    pub fn image_id(&self) -> String {
        hex::encode(openssl::sha::sha256(&self.bytes))
    }

    /// Every artifact with its role, its bytes checked against the manifest.
    pub fn verify(&self) -> Result<Vec<VerifiedArtifact>, ManifestError> {
        self.manifest
            .roles()
            .into_iter()
            .map(|(role, artifact)| {
                let path = self.dir.join(&artifact.path);
                let bytes = std::fs::read(&path).map_err(|source| ManifestError::Read {
                    path: path.clone(),
                    source,
                })?;
                let sha256 = hex::encode(openssl::sha::sha256(&bytes));
                if !sha256.eq_ignore_ascii_case(&artifact.sha256) {
                    return Err(ManifestError::Sha256 {
                        path,
                        actual: sha256,
                        expected: artifact.sha256.clone(),
                    });
                }
                Ok(VerifiedArtifact {
                    role,
                    path,
                    sha256,
                    size: bytes.len() as u64,
                })
            })
            .collect()
    }

    /// Where the (verified) artifacts a launch measures are.
    pub fn artifact_paths(&self, verified: &[VerifiedArtifact]) -> ArtifactPaths {
        let find = |role: &str| {
            verified
                .iter()
                .find(|artifact| artifact.role == role)
                .map(|artifact| artifact.path.clone())
        };
        ArtifactPaths {
            firmware: find("firmware")
                .unwrap_or_else(|| self.dir.join(&self.manifest.firmware.path)),
            kernel: find("kernel"),
            initrd: find("initrd"),
        }
    }
}

impl Manifest {
    /// A kernel or a disk, not both or neither; a known disk format.
    fn check_shape(&self) -> Result<(), ManifestError> {
        match (&self.kernel, &self.disk) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => {
                return Err(ManifestError::Shape(
                    "the manifest must name either a kernel or a disk, not both or neither"
                        .to_owned(),
                ))
            }
        }
        if self.initrd.is_some() && self.kernel.is_none() {
            return Err(ManifestError::Shape(
                "the manifest names an initrd without a kernel".to_owned(),
            ));
        }
        self.disk_format().map(|_| ())
    }

    /// The artifacts by role, in the order they are checked.
    fn roles(&self) -> Vec<(&'static str, &Artifact)> {
        let mut roles = vec![("firmware", &self.firmware)];
        roles.extend(self.kernel.iter().map(|kernel| ("kernel", kernel)));
        roles.extend(self.initrd.iter().map(|initrd| ("initrd", initrd)));
        roles.extend(self.disk.iter().map(|disk| ("disk", disk)));
        roles
    }

    /// The boot disk's format, when the image boots a disk.
    pub fn disk_format(&self) -> Result<Option<DiskFormat>, ManifestError> {
        match self
            .disk
            .as_ref()
            .map(|disk| disk.format.as_deref().unwrap_or("qcow2"))
        {
            None => Ok(None),
            Some("qcow2") => Ok(Some(DiskFormat::Qcow2)),
            Some("raw") => Ok(Some(DiskFormat::Raw)),
            Some(other) => Err(ManifestError::Shape(format!(
                "disk format {other:?}: qcow2 or raw"
            ))),
        }
    }

    /// Whether the firmware measures the direct boot's kernel, initrd and
    /// command line.
    pub fn measured_direct_boot(&self) -> bool {
        self.firmware.kernel_hashes && self.kernel.is_some()
    }
}
