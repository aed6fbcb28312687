//! Importing guest images: a folder with the `manifest.json` that
//! `make image` writes. Every artifact's sha256 is checked against the
//! manifest before anything is stored; the copy goes to
//! `<state_dir>/images/<id>/` and is what VMs boot and what their
//! measurements are computed from.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use time::OffsetDateTime;

use super::error::OpError;
use crate::model::ImageRecord;
use crate::store::Store;

/// An artifact entry of the manifest.
#[derive(Debug, Deserialize)]
struct Artifact {
    path: PathBuf,
    sha256: String,
    #[serde(default)]
    kernel_hashes: bool,
}

/// The parts of `manifest.json` an import uses (the rest describes how
/// the image was built).
#[derive(Debug, Deserialize)]
struct Manifest {
    firmware: Artifact,
    kernel: Artifact,
    initrd: Artifact,
    cmdline: String,
}

/// The artifacts of an imported image.
#[derive(Debug, Clone)]
pub struct ImageFiles {
    /// The OVMF firmware.
    pub firmware: PathBuf,
    /// The kernel.
    pub kernel: PathBuf,
    /// The initrd.
    pub initrd: PathBuf,
}

/// Where an imported image's artifacts are.
pub fn files(image: &ImageRecord) -> ImageFiles {
    ImageFiles {
        firmware: image.dir.join("firmware.fd"),
        kernel: image.dir.join("vmlinuz"),
        initrd: image.dir.join("initrd.img"),
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

    let mut sha256 = Vec::new();
    let mut size_bytes = 0;
    let roles = [
        ("firmware", &manifest.firmware),
        ("kernel", &manifest.kernel),
        ("initrd", &manifest.initrd),
    ];
    for (index, (role, artifact)) in roles.iter().enumerate() {
        progress(
            "verify",
            &format!("checking the {role}'s sha256"),
            10 + 20 * index as u32,
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

    let dir = images_dir.join(&id);
    let staging = images_dir.join(format!(".{id}.partial"));
    let io =
        |what: &str, error: std::io::Error| OpError::internal(format!("cannot {what}: {error}"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|error| io("create the image folder", error))?;
    progress("copy", "copying the artifacts into the store", 70);
    let target = files(&ImageRecord {
        id: id.clone(),
        name: name.to_owned(),
        dir: staging.clone(),
        sha256: Vec::new(),
        cmdline: String::new(),
        measured_direct_boot: false,
        size_bytes: 0,
        imported_at: OffsetDateTime::now_utc(),
    });
    for (artifact, destination) in [
        (&manifest.firmware, &target.firmware),
        (&manifest.kernel, &target.kernel),
        (&manifest.initrd, &target.initrd),
    ] {
        std::fs::copy(source.join(&artifact.path), destination)
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
        measured_direct_boot: manifest.firmware.kernel_hashes,
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
