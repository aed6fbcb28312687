//! Importing guest images: a folder with a `manifest.json`
//! ([`crate::launch::manifest`]). Every artifact's sha256 is checked against
//! the manifest before anything is stored; the copy goes to
//! `<state_dir>/images/<id>/` and is what VMs boot and what their
//! measurements are computed from.

use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use super::error::OpError;
use crate::hypervisor::DiskFormat;
use crate::launch::manifest::ImageFolder;
use crate::launch::ArtifactPaths;
use crate::model::ImageRecord;
use crate::store::Store;

/// What an image boots.
#[derive(Debug, Clone)]
pub enum ImageBoot {
    /// The VMM loads a kernel and initrd.
    Direct {
        /// The kernel.
        kernel: PathBuf,
        /// The initrd.
        initrd: Option<PathBuf>,
    },
    /// The firmware boots a disk (attached read-only: data goes to data disks).
    Disk {
        /// The disk.
        path: PathBuf,
        /// `qcow2` or `raw`.
        format: DiskFormat,
    },
}

/// The artifacts of an imported image.
#[derive(Debug, Clone)]
pub struct ImageFiles {
    /// The OVMF firmware.
    pub firmware: PathBuf,
    /// What it boots.
    pub boot: ImageBoot,
}

impl ImageFiles {
    /// The artifacts a launch measures.
    pub fn artifact_paths(&self) -> ArtifactPaths {
        let (kernel, initrd) = match &self.boot {
            ImageBoot::Direct { kernel, initrd } => (Some(kernel.clone()), initrd.clone()),
            ImageBoot::Disk { .. } => (None, None),
        };
        ArtifactPaths {
            firmware: self.firmware.clone(),
            kernel,
            initrd,
        }
    }
}

fn has_role(sha256: &[(String, String)], role: &str) -> bool {
    sha256.iter().any(|(name, _)| name == role)
}

/// Where an imported image's artifacts are.
pub fn files(image: &ImageRecord) -> ImageFiles {
    files_in(&image.dir, &image.sha256)
}

/// Where the artifacts of an image stored in `dir` are, from its roles.
pub fn files_in(dir: &Path, sha256: &[(String, String)]) -> ImageFiles {
    let boot = if has_role(sha256, "disk") {
        let format = if has_role(sha256, "disk-raw") {
            DiskFormat::Raw
        } else {
            DiskFormat::Qcow2
        };
        ImageBoot::Disk {
            path: dir.join("disk.img"),
            format,
        }
    } else {
        ImageBoot::Direct {
            kernel: dir.join("vmlinuz"),
            initrd: has_role(sha256, "initrd").then(|| dir.join("initrd.img")),
        }
    };
    ImageFiles {
        firmware: dir.join("firmware.fd"),
        boot,
    }
}

/// The file name an artifact of `role` gets in the store.
fn stored_name(role: &str) -> &'static str {
    match role {
        "firmware" => "firmware.fd",
        "kernel" => "vmlinuz",
        "initrd" => "initrd.img",
        _ => "disk.img",
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// Imports the image in `source` as `name`, reporting each step.
pub fn import(
    store: &Store,
    images_dir: &Path,
    name: &str,
    source: &Path,
    progress: &dyn Fn(&str, &str, u32),
) -> Result<ImageRecord, OpError> {
    if !valid_name(name) {
        return Err(OpError::invalid(format!(
            "image name {name:?}: 1-63 letters, digits, '-', '_' or '.'"
        )));
    }
    let folder = ImageFolder::read(source).map_err(|error| OpError::invalid(error.to_string()))?;
    let manifest = &folder.manifest;
    let id = folder.image_id();
    let disk_format = manifest
        .disk_format()
        .map_err(|error| OpError::invalid(error.to_string()))?;
    progress("verify", "checking every artifact's sha256", 10);
    let verified = folder
        .verify()
        .map_err(|error| OpError::invalid(error.to_string()))?;
    let size_bytes = verified.iter().map(|artifact| artifact.size).sum();
    let mut sha256: Vec<(String, String)> = verified
        .iter()
        .map(|artifact| (artifact.role.to_owned(), artifact.sha256.clone()))
        .collect();
    if disk_format == Some(DiskFormat::Raw) {
        // Recorded as a role so the format survives in the store.
        sha256.push(("disk-raw".to_owned(), String::new()));
    }

    let dir = images_dir.join(&id);
    let staging = images_dir.join(format!(".{id}.partial"));
    let io =
        |what: &str, error: std::io::Error| OpError::internal(format!("cannot {what}: {error}"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|error| io("create the image folder", error))?;
    progress("copy", "copying the artifacts into the store", 75);
    for artifact in &verified {
        std::fs::copy(&artifact.path, staging.join(stored_name(artifact.role)))
            .map_err(|error| io("copy an artifact", error))?;
    }
    std::fs::write(staging.join("manifest.json"), &folder.bytes)
        .map_err(|error| io("keep the manifest", error))?;
    let created = !dir.exists();
    if created {
        std::fs::rename(&staging, &dir).map_err(|error| io("store the image", error))?;
    } else {
        let _ = std::fs::remove_dir_all(&staging);
    }

    let record = ImageRecord {
        id,
        name: name.to_owned(),
        dir,
        sha256,
        cmdline: manifest.cmdline.clone(),
        measured_direct_boot: manifest.measured_direct_boot(),
        size_bytes,
        imported_at: OffsetDateTime::now_utc(),
    };
    progress("record", "recording the image", 95);
    if let Err(error) = store.insert_image(&record) {
        // Nothing is left behind when the name is taken.
        if created {
            let _ = std::fs::remove_dir_all(&record.dir);
        }
        return Err(error.into());
    }
    Ok(record)
}
