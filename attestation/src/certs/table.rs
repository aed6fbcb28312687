//! The SEV-SNP certificate table that comes with an extended report (the
//! GHCB "certificate blob", also configfs-tsm's `auxblob`): 24-byte entries
//! `{ GUID, offset u32, length u32 }` ended by an all-zero entry, offsets
//! counted from the start of the table. Written here, safely, because the
//! `sev` crate reads it through raw pointers and unwraps.

use crate::report::EvidenceCertificate;

const ENTRY_LEN: usize = 24;
// GUIDs in RFC 4122 byte order, as the kernel and the `sev` crate use them.
const ARK: [u8; 16] = guid(0xc0b4_06a4, 0xa803, 0x4952, 0x9743_3fb6_014c_d0ae);
const ASK: [u8; 16] = guid(0x4ab7_b379, 0xbbac, 0x4fe4, 0xa02f_05ae_f327_c782);
const VCEK: [u8; 16] = guid(0x63da_758d, 0xe664, 0x4564, 0xadc5_f4b9_3be8_accd);
const VLEK: [u8; 16] = guid(0xa807_4bc2, 0xa25a, 0x483e, 0xaae6_39c0_45a0_b8a1);
const CRL: [u8; 16] = guid(0x92f8_1bc3, 0x5811, 0x4d3d, 0x97ff_d19f_88dc_67ea);

const fn guid(a: u32, b: u16, c: u16, d: u64) -> [u8; 16] {
    let (a, b, c, d) = (
        a.to_be_bytes(),
        b.to_be_bytes(),
        c.to_be_bytes(),
        d.to_be_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

/// A certificate table that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertTableError {
    /// The entry list runs past the end without its terminator.
    #[error("certificate table has no terminating entry")]
    Unterminated,
    /// An entry points outside the table.
    #[error(
        "certificate table entry {index} points outside the table ({offset}+{length} > {size})"
    )]
    OutOfBounds {
        /// Entry number.
        index: usize,
        /// Its offset.
        offset: usize,
        /// Its length.
        length: usize,
        /// Table size.
        size: usize,
    },
}

fn u32_at(bytes: &[u8], at: usize) -> usize {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word) as usize
}

/// Parses a certificate table. Entries of unknown GUIDs are skipped.
pub fn parse_certificate_table(table: &[u8]) -> Result<Vec<EvidenceCertificate>, CertTableError> {
    let mut certificates = Vec::new();
    for (index, entry) in table.chunks(ENTRY_LEN).enumerate() {
        if entry.len() < ENTRY_LEN {
            break;
        }
        if entry.iter().all(|&byte| byte == 0) {
            return Ok(certificates);
        }
        let (offset, length) = (u32_at(entry, 16), u32_at(entry, 20));
        let data = offset
            .checked_add(length)
            .and_then(|end| table.get(offset..end))
            .ok_or(CertTableError::OutOfBounds {
                index,
                offset,
                length,
                size: table.len(),
            })?
            .to_vec();
        let certificate = match &entry[..16] {
            guid if guid == ARK => EvidenceCertificate::Ark(data),
            guid if guid == ASK => EvidenceCertificate::Ask(data),
            guid if guid == VCEK => EvidenceCertificate::Vcek(data),
            guid if guid == VLEK => EvidenceCertificate::Vlek(data),
            guid if guid == CRL => EvidenceCertificate::Crl(data),
            _ => continue,
        };
        certificates.push(certificate);
    }
    Err(CertTableError::Unterminated)
}

/// Builds a certificate table from certificates.
pub fn encode_certificate_table(certificates: &[EvidenceCertificate]) -> Vec<u8> {
    let header_len = (certificates.len() + 1) * ENTRY_LEN;
    let mut table = vec![0u8; header_len];
    for (index, certificate) in certificates.iter().enumerate() {
        let (guid, data) = match certificate {
            EvidenceCertificate::Ark(data) => (ARK, data),
            EvidenceCertificate::Ask(data) => (ASK, data),
            EvidenceCertificate::Vcek(data) => (VCEK, data),
            EvidenceCertificate::Vlek(data) => (VLEK, data),
            EvidenceCertificate::Crl(data) => (CRL, data),
        };
        let entry = index * ENTRY_LEN;
        let offset = u32::try_from(table.len()).unwrap_or(u32::MAX);
        let length = u32::try_from(data.len()).unwrap_or(u32::MAX);
        table[entry..entry + 16].copy_from_slice(&guid);
        table[entry + 16..entry + 20].copy_from_slice(&offset.to_le_bytes());
        table[entry + 20..entry + 24].copy_from_slice(&length.to_le_bytes());
        table.extend_from_slice(data);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let certificates = vec![
            EvidenceCertificate::Vcek(vec![1, 2, 3]),
            EvidenceCertificate::Ask(vec![4; 100]),
            EvidenceCertificate::Ark(vec![5; 7]),
            EvidenceCertificate::Crl(Vec::new()),
        ];
        let table = encode_certificate_table(&certificates);
        assert_eq!(parse_certificate_table(&table), Ok(certificates));
    }

    #[test]
    fn the_vcek_guid_is_in_rfc_byte_order() {
        assert_eq!(&VCEK[..4], &[0x63, 0xda, 0x75, 0x8d]);
        assert_eq!(
            &VCEK[8..],
            &[0xad, 0xc5, 0xf4, 0xb9, 0x3b, 0xe8, 0xac, 0xcd]
        );
    }

    #[test]
    fn malformed_tables_are_refused() {
        let mut table = encode_certificate_table(&[EvidenceCertificate::Vcek(vec![9; 10])]);
        assert!(parse_certificate_table(&table[..24]).is_err());
        assert_eq!(
            parse_certificate_table(&[1; 23]),
            Err(CertTableError::Unterminated)
        );
        table[20] = 0xff;
        assert!(matches!(
            parse_certificate_table(&table),
            Err(CertTableError::OutOfBounds { index: 0, .. })
        ));
        table[16..24].copy_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            parse_certificate_table(&table),
            Err(CertTableError::OutOfBounds { .. })
        ));
        assert_eq!(
            parse_certificate_table(&[]),
            Err(CertTableError::Unterminated)
        );
    }

    #[test]
    fn unknown_entries_are_skipped() {
        let mut table = encode_certificate_table(&[
            EvidenceCertificate::Vcek(vec![1]),
            EvidenceCertificate::Ask(vec![2]),
        ]);
        table[24] ^= 0xff;
        assert_eq!(
            parse_certificate_table(&table),
            Ok(vec![EvidenceCertificate::Vcek(vec![1])])
        );
    }
}
