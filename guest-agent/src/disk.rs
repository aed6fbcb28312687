//! The guest's encrypted data disk: finding it by its virtio-blk serial
//! number, and telling whether its unlocked contents hold a filesystem yet.
//!
//! This module reads sysfs and a device's first blocks; it never writes a
//! device, never formats one and never mounts one (the unlock flow runs
//! mke2fs and mount).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The serial number hsevd gives the encrypted data disk
/// (`-device virtio-blk-pci,serial=hsev-data`).
pub const DATA_DISK_SERIAL: &str = "hsev-data";

/// The device-mapper name the unlocked disk gets (`/dev/mapper/hsev-data`).
pub const MAPPED_NAME: &str = "hsev-data";

/// Where the kernel lists block devices.
pub const SYS_BLOCK: &str = "/sys/block";

/// Offset of the ext2/3/4 superblock's magic number.
const EXT_MAGIC_OFFSET: u64 = 1024 + 0x38;

/// The ext2/3/4 magic number, little-endian.
const EXT_MAGIC: [u8; 2] = [0x53, 0xef];

/// Why the data disk is not usable.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// No virtio disk carries the serial number.
    #[error(
        "no data disk: no virtio disk has the serial number {serial:?} under {sys_block} \
         (virtio disks here: {seen}); the host did not attach the encrypted disk"
    )]
    NotFound {
        /// The serial looked for.
        serial: String,
        /// The sysfs folder searched.
        sys_block: String,
        /// What was seen, `vda (serial "x")`, for the message.
        seen: String,
    },
    /// Two disks carry the serial number: which one holds the data is not
    /// for the guest to guess.
    #[error("two disks have the serial number {serial:?}: {first} and {second}")]
    Ambiguous {
        /// The serial looked for.
        serial: String,
        /// One disk.
        first: String,
        /// Another.
        second: String,
    },
    /// The device cannot be read.
    #[error("cannot read {device}: {source}")]
    Read {
        /// The device.
        device: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The `/dev` node of the virtio disk (`vd*`) whose serial number is
/// `serial`, found in `sys_block` (`/sys/block` in a guest).
pub fn find_disk_by_serial(sys_block: &Path, serial: &str) -> Result<PathBuf, DiskError> {
    let mut names: Vec<String> = std::fs::read_dir(sys_block)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("vd"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let mut found: Option<String> = None;
    let mut seen = Vec::new();
    for name in names {
        // virtio-blk pads nothing today, but older kernels NUL-padded the
        // 20-byte field: trim both.
        let disk_serial = std::fs::read_to_string(sys_block.join(&name).join("serial"))
            .map(|text| {
                text.trim_matches(|c: char| c.is_whitespace() || c == '\0')
                    .to_owned()
            })
            .unwrap_or_default();
        seen.push(format!("{name} (serial {disk_serial:?})"));
        if disk_serial != serial {
            continue;
        }
        if let Some(first) = found.take() {
            return Err(DiskError::Ambiguous {
                serial: serial.to_owned(),
                first,
                second: name,
            });
        }
        found = Some(name);
    }
    match found {
        Some(name) => Ok(Path::new("/dev").join(name)),
        None => Err(DiskError::NotFound {
            serial: serial.to_owned(),
            sys_block: sys_block.display().to_string(),
            seen: if seen.is_empty() {
                "none".to_owned()
            } else {
                seen.join(", ")
            },
        }),
    }
}

/// Whether `device` starts with an ext2/3/4 superblock. A device shorter
/// than a superblock has none.
pub fn has_ext_filesystem(device: &Path) -> Result<bool, DiskError> {
    let read_error = |source| DiskError::Read {
        device: device.display().to_string(),
        source,
    };
    let mut file = File::open(device).map_err(read_error)?;
    file.seek(SeekFrom::Start(EXT_MAGIC_OFFSET))
        .map_err(read_error)?;
    let mut magic = [0u8; 2];
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(magic == EXT_MAGIC),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(error) => Err(read_error(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sys_block(disks: &[(&str, Option<&str>)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, serial) in disks {
            let disk = dir.path().join(name);
            std::fs::create_dir_all(&disk).expect("disk dir");
            if let Some(serial) = serial {
                std::fs::write(disk.join("serial"), serial).expect("serial");
            }
        }
        dir
    }

    #[test]
    fn finds_the_disk_by_its_serial_among_others() {
        let sys = fake_sys_block(&[
            ("loop0", Some("hsev-data\n")),
            ("vda", Some("root\n")),
            ("vdb", None),
            ("vdc", Some("hsev-data\n")),
            ("sda", Some("hsev-data\n")),
        ]);
        assert_eq!(
            find_disk_by_serial(sys.path(), DATA_DISK_SERIAL).expect("found"),
            PathBuf::from("/dev/vdc")
        );
        let padded = fake_sys_block(&[("vda", Some("hsev-data\0\0\0\0"))]);
        assert_eq!(
            find_disk_by_serial(padded.path(), DATA_DISK_SERIAL).expect("found"),
            PathBuf::from("/dev/vda")
        );
    }

    #[test]
    fn a_missing_disk_says_what_was_there() {
        let sys = fake_sys_block(&[("vda", Some("boot")), ("vdb", None)]);
        let message = find_disk_by_serial(sys.path(), DATA_DISK_SERIAL)
            .expect_err("none")
            .to_string();
        assert!(
            message.contains("\"hsev-data\"")
                && message.contains(r#"vda (serial "boot"), vdb (serial "")"#),
            "{message}"
        );
        let empty = tempfile::tempdir().expect("tempdir");
        let message = find_disk_by_serial(empty.path(), DATA_DISK_SERIAL)
            .expect_err("none")
            .to_string();
        assert!(message.contains("virtio disks here: none"), "{message}");
        let message = find_disk_by_serial(Path::new("/nonexistent"), DATA_DISK_SERIAL)
            .expect_err("none")
            .to_string();
        assert!(message.contains("none"), "{message}");
    }

    #[test]
    fn two_disks_with_the_serial_are_refused() {
        let sys = fake_sys_block(&[("vdb", Some("hsev-data")), ("vdc", Some("hsev-data"))]);
        assert!(matches!(
            find_disk_by_serial(sys.path(), DATA_DISK_SERIAL),
            Err(DiskError::Ambiguous { .. })
        ));
    }

    #[test]
    fn tells_an_ext_superblock_from_anything_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let device = dir.path().join("disk");
        let mut bytes = vec![0x77u8; 4096];
        std::fs::write(&device, &bytes).expect("written");
        assert!(!has_ext_filesystem(&device).expect("reads"));
        bytes[1080] = 0x53;
        bytes[1081] = 0xef;
        std::fs::write(&device, &bytes).expect("written");
        assert!(has_ext_filesystem(&device).expect("reads"));
        std::fs::write(&device, [0u8; 100]).expect("written");
        assert!(!has_ext_filesystem(&device).expect("short"));
        assert!(has_ext_filesystem(&dir.path().join("missing")).is_err());
    }
}
