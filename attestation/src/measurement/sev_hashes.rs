//! The SEV hashes table QEMU writes into guest memory for a direct kernel
//! boot (a port of sev-snp-measure's `sev_hashes.py`).
//!
//! The table must be byte-identical to QEMU's (`target/i386/sev.c`):
//!
//! ```text
//! GUID 9438d606-4f22-4cc9-b479-a793d411fd21, u16 length = 168
//!   GUID 97d02dd8-... (cmdline), u16 50, SHA-256(cmdline + NUL)
//!   GUID 44baf731-... (initrd),  u16 50, SHA-256(initrd or empty)
//!   GUID 4de79437-... (kernel),  u16 50, SHA-256(kernel)
//! zero padding to 176 bytes (a multiple of 16)
//! ```

use openssl::sha::sha256;

use super::ovmf::Guid;
use super::MeasurementError;

const SEV_HASH_TABLE_HEADER_GUID: Guid = Guid::from_fields(
    0x9438_d606,
    0x4f22,
    0x4cc9,
    [0xb4, 0x79, 0xa7, 0x93, 0xd4, 0x11, 0xfd, 0x21],
);
const SEV_KERNEL_ENTRY_GUID: Guid = Guid::from_fields(
    0x4de7_9437,
    0xabd2,
    0x427f,
    [0xb8, 0x35, 0xd5, 0xb1, 0x72, 0xd2, 0x04, 0x5b],
);
const SEV_INITRD_ENTRY_GUID: Guid = Guid::from_fields(
    0x44ba_f731,
    0x3a2f,
    0x4bd7,
    [0x9a, 0xf1, 0x41, 0xe2, 0x91, 0x69, 0x78, 0x1d],
);
const SEV_CMDLINE_ENTRY_GUID: Guid = Guid::from_fields(
    0x97d0_2dd8,
    0xbd20,
    0x4c94,
    [0xaa, 0x78, 0xe7, 0x71, 0x4d, 0x36, 0xab, 0x2a],
);

/// Size of one table entry: GUID, `u16` length, SHA-256.
const ENTRY_SIZE: usize = 16 + 2 + 32;
/// Size of the table without padding.
const TABLE_SIZE: usize = 16 + 2 + 3 * ENTRY_SIZE;
/// Size of the table padded to a multiple of 16 bytes.
pub const PADDED_TABLE_SIZE: usize = (TABLE_SIZE + 15) & !15;

const PAGE_SIZE: usize = 4096;

/// A kernel booted directly by the VMM (`-kernel`, `-initrd`, `-append`).
#[derive(Debug, Clone, Copy)]
pub struct DirectBoot<'a> {
    /// The kernel image.
    pub kernel: &'a [u8],
    /// The initrd, if any (absent hashes as empty).
    pub initrd: Option<&'a [u8]>,
    /// The kernel command line, if any (absent or empty hashes as a lone NUL).
    pub append: Option<&'a str>,
}

/// The three SHA-256 hashes of a direct boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SevHashes {
    /// SHA-256 of the kernel.
    pub kernel_hash: [u8; 32],
    /// SHA-256 of the initrd (of nothing without one).
    pub initrd_hash: [u8; 32],
    /// SHA-256 of the command line and its terminating NUL.
    pub cmdline_hash: [u8; 32],
}

impl SevHashes {
    /// Hashes a direct boot's kernel, initrd and command line.
    pub fn new(boot: &DirectBoot<'_>) -> Self {
        let cmdline = match boot.append {
            Some(append) if !append.is_empty() => {
                let mut bytes = append.as_bytes().to_vec();
                bytes.push(0);
                bytes
            }
            _ => vec![0],
        };
        SevHashes {
            kernel_hash: sha256(boot.kernel),
            initrd_hash: sha256(boot.initrd.unwrap_or_default()),
            cmdline_hash: sha256(&cmdline),
        }
    }

    /// The padded hashes table, exactly as QEMU writes it.
    pub fn construct_table(&self) -> [u8; PADDED_TABLE_SIZE] {
        let mut table = [0u8; PADDED_TABLE_SIZE];
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            table[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        // TABLE_SIZE and ENTRY_SIZE are small constants that fit a u16.
        put(&SEV_HASH_TABLE_HEADER_GUID.to_bytes_le());
        put(&(TABLE_SIZE as u16).to_le_bytes());
        for (guid, hash) in [
            (SEV_CMDLINE_ENTRY_GUID, &self.cmdline_hash),
            (SEV_INITRD_ENTRY_GUID, &self.initrd_hash),
            (SEV_KERNEL_ENTRY_GUID, &self.kernel_hash),
        ] {
            put(&guid.to_bytes_le());
            put(&(ENTRY_SIZE as u16).to_le_bytes());
            put(hash);
        }
        table
    }

    /// A page holding the table at `offset` within it.
    pub fn construct_page(&self, offset: usize) -> Result<Box<[u8; PAGE_SIZE]>, MeasurementError> {
        let end = offset
            .checked_add(PADDED_TABLE_SIZE)
            .filter(|end| *end <= PAGE_SIZE)
            .ok_or(MeasurementError::HashesTableDoesNotFit { offset })?;
        let mut page = Box::new([0u8; PAGE_SIZE]);
        page[offset..end].copy_from_slice(&self.construct_table());
        Ok(page)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failing unwrap is a failing test.
mod tests {
    use super::*;

    fn sample() -> SevHashes {
        SevHashes::new(&DirectBoot {
            kernel: b"kernel",
            initrd: Some(b"initrd"),
            append: Some("console=ttyS0"),
        })
    }

    #[test]
    fn table_layout() {
        assert_eq!(TABLE_SIZE, 168);
        assert_eq!(PADDED_TABLE_SIZE, 176);
        let hashes = sample();
        let table = hashes.construct_table();
        assert_eq!(
            &table[..4],
            &[0x06, 0xd6, 0x38, 0x94],
            "header GUID little-endian"
        );
        assert_eq!(&table[16..18], &[168, 0]);
        assert_eq!(&table[18..34], &SEV_CMDLINE_ENTRY_GUID.to_bytes_le());
        assert_eq!(&table[34..36], &[50, 0]);
        assert_eq!(&table[36..68], &sha256(b"console=ttyS0\0"));
        assert_eq!(&table[86..118], &sha256(b"initrd"));
        assert_eq!(&table[118..134], &SEV_KERNEL_ENTRY_GUID.to_bytes_le());
        assert_eq!(&table[136..168], &sha256(b"kernel"));
        assert_eq!(&table[168..], &[0; 8]);
    }

    #[test]
    fn known_vector() {
        // python3 -c 'from sevsnpmeasure.sev_hashes import SevHashes ...' with
        // the kernel "kernel", initrd "initrd", append "console=ttyS0".
        assert_eq!(hex::encode(sample().construct_table()), KNOWN_TABLE);
    }

    const KNOWN_TABLE: &str = "06d63894224fc94cb479a793d411fd21a800d82dd09720bd944caa78e7714d36ab2a3200f18aae9b3c09e55bc3047ad361e2442d7c53372470b2958fb83293209a784f7131f7ba442f3ad74b9af141e29169781d320009e6c018d2c8c4903308613dd1b72484d57eadf12ec50ddc8f52e5accce470f23794e74dd2ab7f42b835d5b172d2045b32006923dd1bc0460082c5d55a831908c24a282860b7f1cd6c2b79cf1bc8857c639c0000000000000000";

    #[test]
    fn defaults_for_missing_parts() {
        let hashes = SevHashes::new(&DirectBoot {
            kernel: b"k",
            initrd: None,
            append: Some(""),
        });
        assert_eq!(hashes.initrd_hash, sha256(b""));
        assert_eq!(hashes.cmdline_hash, sha256(b"\0"));
    }

    #[test]
    fn page_placement() {
        let hashes = sample();
        let page = hashes.construct_page(0xc00).unwrap();
        assert_eq!(
            &page[0xc00..0xc00 + PADDED_TABLE_SIZE],
            &hashes.construct_table()
        );
        assert!(page[..0xc00].iter().all(|b| *b == 0));
        assert!(hashes.construct_page(PAGE_SIZE - PADDED_TABLE_SIZE).is_ok());
        assert!(matches!(
            hashes.construct_page(PAGE_SIZE - PADDED_TABLE_SIZE + 1),
            Err(MeasurementError::HashesTableDoesNotFit { .. })
        ));
        assert!(hashes.construct_page(usize::MAX).is_err());
    }
}
