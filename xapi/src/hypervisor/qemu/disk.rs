//! Disk files: qcow2 creation with `qemu-img`, and wiping before removal.
//!
//! Wiping overwrites every byte of the file (qcow2 header, tables and data
//! clusters alike) with zeros and syncs it. It defeats reading the file
//! back, not forensic recovery from copy-on-write filesystems or SSD
//! remapping: the data disks that matter are LUKS-encrypted with a key only
//! the key broker holds, and destroying that key is what makes them
//! unreadable.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use super::super::DriverError;

const CHUNK: usize = 1 << 20;

/// Creates a qcow2 file of `size_mib` MiB; refuses an existing path.
pub fn create_qcow2(qemu_img: &Path, path: &Path, size_mib: u64) -> Result<(), DriverError> {
    if size_mib == 0 {
        return Err(DriverError::InvalidSpec {
            field: "size_mib",
            reason: "a disk needs at least 1 MiB".to_owned(),
        });
    }
    if path.exists() {
        return Err(DriverError::io(
            format!("creating {}", path.display()),
            std::io::Error::new(std::io::ErrorKind::AlreadyExists, "the file exists"),
        ));
    }
    if !qemu_img.is_file() {
        return Err(DriverError::VmmMissing {
            binary: qemu_img.to_path_buf(),
        });
    }
    let output = Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(format!("{size_mib}M"))
        .output()
        .map_err(|error| DriverError::io(format!("running {}", qemu_img.display()), error))?;
    if !output.status.success() {
        return Err(DriverError::Tool {
            tool: "qemu-img create".to_owned(),
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// Overwrites the whole file with zeros and syncs it; returns the bytes
/// overwritten.
pub fn wipe(path: &Path) -> Result<u64, DriverError> {
    let what = || format!("wiping {}", path.display());
    let mut file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|error| DriverError::io(what(), error))?;
    let length = file
        .metadata()
        .map_err(|error| DriverError::io(what(), error))?
        .len();
    file.seek(SeekFrom::Start(0))
        .map_err(|error| DriverError::io(what(), error))?;
    let zeros = vec![0u8; CHUNK];
    let mut left = length;
    while left > 0 {
        let count = usize::try_from(left).map_or(CHUNK, |left| left.min(CHUNK));
        file.write_all(&zeros[..count])
            .map_err(|error| DriverError::io(what(), error))?;
        left -= count as u64;
    }
    file.sync_all()
        .map_err(|error| DriverError::io(what(), error))?;
    Ok(length)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypervisor_wipe_overwrites_every_byte() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.qcow2");
        let content: Vec<u8> = (0..(3 * CHUNK + 17)).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&path, &content).expect("write");
        assert_eq!(wipe(&path).expect("wipe"), content.len() as u64);
        let after = std::fs::read(&path).expect("read");
        assert_eq!(after.len(), content.len());
        assert!(after.iter().all(|byte| *byte == 0));
        let error = wipe(&dir.path().join("absent")).expect_err("absent");
        assert!(error.to_string().contains("wiping"), "{error}");
    }

    #[test]
    fn hypervisor_create_refuses_existing_and_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("exists.qcow2");
        std::fs::write(&path, b"keep me").expect("write");
        let error = create_qcow2(Path::new("/usr/bin/qemu-img"), &path, 16).expect_err("exists");
        assert!(error.to_string().contains("exists"), "{error}");
        assert_eq!(std::fs::read(&path).expect("read"), b"keep me");
        let error = create_qcow2(Path::new("/usr/bin/qemu-img"), &dir.path().join("new"), 0)
            .expect_err("0 MiB");
        assert!(matches!(error, DriverError::InvalidSpec { .. }));
    }
}
