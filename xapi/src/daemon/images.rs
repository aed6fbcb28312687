//! Importing guest images: a folder with a `manifest.json` naming the
//! firmware and either a kernel and initrd booted directly (what
//! `make image` writes) or a disk the firmware boots (`"disk": {"path",
//! "sha256", "format": "qcow2" | "raw"}`). Every artifact's sha256 is checked against the
//! manifest before anything is stored; the copy goes to
//! `<state_dir>/images/<id>/` and is what VMs boot and what their
//! measurements are computed from.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use time::OffsetDateTime;

use super::error::OpError;
use crate::hypervisor::DiskFormat;
use crate::model::ImageRecord;
use crate::store::Store;

/// An artifact entry of the manifest.
#[derive(Debug, Deserialize)]
struct Artifact {
    path: PathBuf,
    sha256: String,
    #[serde(default)]
    kernel_hashes: bool,
    #[serde(default)]
    format: Option<String>,
}

/// The parts of `manifest.json` an import uses (the rest describes how
/// the image was built).
#[derive(Debug, Deserialize)]
struct Manifest {
    firmware: Artifact,
    kernel: Option<Artifact>,
    initrd: Option<Artifact>,
    disk: Option<Artifact>,
    #[serde(default)]
    cmdline: String,
}

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

fn has_role(image: &ImageRecord, role: &str) -> bool {
    image.sha256.iter().any(|(name, _)| name == role)
}

/// Where an imported image's artifacts are.
pub fn files(image: &ImageRecord) -> ImageFiles {
    let boot = if has_role(image, "disk") {
        let format = if has_role(image, "disk-raw") {
            DiskFormat::Raw
        } else {
            DiskFormat::Qcow2
        };
        ImageBoot::Disk {
            path: image.dir.join("disk.img"),
            format,
        }
    } else {
        ImageBoot::Direct {
            kernel: image.dir.join("vmlinuz"),
            initrd: has_role(image, "initrd").then(|| image.dir.join("initrd.img")),
        }
    };
    ImageFiles {
        firmware: image.dir.join("firmware.fd"),
        boot,
    }
}

fn sha256_file(path: &Path) -> Result<(String, u64), OpError> {
    let bytes = std::fs::read(path)
        .map_err(|error| OpError::invalid(format!("cannot read {}: {error}", path.display())))?;
    Ok((
        hex::encode(openssl::sha::sha256(&bytes)),
        bytes.len() as u64,
    ))
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
    let manifest_path = source.join("manifest.json");
    let manifest_bytes = std::fs::read(&manifest_path).map_err(|error| {
        OpError::invalid(format!("cannot read {}: {error}", manifest_path.display()))
    })?;
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|error| OpError::invalid(format!("{}: {error}", manifest_path.display())))?;
    let id = hex::encode(openssl::sha::sha256(&manifest_bytes));

    let disk_format = match manifest
        .disk
        .as_ref()
        .map(|disk| disk.format.as_deref().unwrap_or("qcow2"))
    {
        None => None,
        Some("qcow2") => Some(DiskFormat::Qcow2),
        Some("raw") => Some(DiskFormat::Raw),
        Some(other) => {
            return Err(OpError::invalid(format!(
                "disk format {other:?}: qcow2 or raw"
            )))
        }
    };
    // (role, artifact, file name in the store)
    let mut artifacts: Vec<(&str, &Artifact, &str)> =
        vec![("firmware", &manifest.firmware, "firmware.fd")];
    match (&manifest.kernel, &manifest.disk) {
        (Some(kernel), None) => {
            artifacts.push(("kernel", kernel, "vmlinuz"));
            if let Some(initrd) = &manifest.initrd {
                artifacts.push(("initrd", initrd, "initrd.img"));
            }
        }
        (None, Some(disk)) => artifacts.push(("disk", disk, "disk.img")),
        _ => {
            return Err(OpError::invalid(
                "the manifest must name either a kernel or a disk, not both or neither",
            ))
        }
    }

    let mut sha256 = Vec::new();
    let mut size_bytes = 0;
    let steps = artifacts.len() as u32;
    for (index, (role, artifact, _)) in artifacts.iter().enumerate() {
        progress(
            "verify",
            &format!("checking the {role}'s sha256"),
            10 + 60 * index as u32 / steps,
        );
        let path = source.join(&artifact.path);
        let (digest, size) = sha256_file(&path)?;
        if !digest.eq_ignore_ascii_case(&artifact.sha256) {
            return Err(OpError::invalid(format!(
                "{}: sha256 {digest} differs from the manifest's {}",
                path.display(),
                artifact.sha256
            )));
        }
        sha256.push(((*role).to_owned(), digest));
        size_bytes += size;
    }
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
    for (_, artifact, name) in &artifacts {
        std::fs::copy(source.join(&artifact.path), staging.join(name))
            .map_err(|error| io("copy an artifact", error))?;
    }
    std::fs::write(staging.join("manifest.json"), &manifest_bytes)
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
        cmdline: manifest.cmdline,
        measured_direct_boot: manifest.firmware.kernel_hashes && manifest.kernel.is_some(),
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
