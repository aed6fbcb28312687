//! Firmware images: the OVMF footer table and the SEV metadata it points to
//! (a port of sev-snp-measure's `ovmf.py`).
//!
//! An SEV-capable OVMF build ends with a table of GUID-tagged entries that
//! QEMU reads to find, among others, the SEV-ES AP reset address, the SEV
//! hashes table and the SEV metadata: the list of guest memory ranges the
//! launch must pre-validate (`SNP_SEC_MEM`), the secrets and CPUID pages,
//! and the page receiving the kernel/initrd/cmdline hashes.
//!
//! Layout, read backwards from the end of the image:
//!
//! ```text
//! ... | entry data | u16 entry size | entry GUID | ... | u16 table size | footer GUID | 32 bytes
//! ```
//!
//! The parsing mirrors the reference byte for byte, including its Python
//! slice semantics (negative indices count from the end and clamp), so that
//! every image the reference accepts is read the same way. Where the
//! reference would raise, this module returns a [`MeasurementError`].

use super::MeasurementError;

/// Four GiB: the address at which the firmware image ends in guest memory.
pub const FOUR_GB: u64 = 0x1_0000_0000;

/// Size of an OVMF footer table entry header: a `u16` size and a GUID.
const ENTRY_HEADER_SIZE: usize = 18;
/// The table ends this many bytes before the end of the image.
const FOOTER_GAP: usize = 32;
/// Size of the SEV metadata header (`ASEV`, size, version, item count).
const METADATA_HEADER_SIZE: usize = 16;
/// Size of one SEV metadata section descriptor (gpa, size, type).
const METADATA_ITEM_SIZE: usize = 12;

/// A GUID in the little-endian byte order used on disk by UEFI.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guid([u8; 16]);

impl Guid {
    /// Builds a GUID from its textual fields, e.g.
    /// `96b582de-1fb2-45f7-baea-a366c55a082d` is
    /// `from_fields(0x96b5_82de, 0x1fb2, 0x45f7, [0xba, 0xea, 0xa3, 0x66, 0xc5, 0x5a, 0x08, 0x2d])`.
    pub const fn from_fields(data1: u32, data2: u16, data3: u16, data4: [u8; 8]) -> Self {
        let a = data1.to_le_bytes();
        let b = data2.to_le_bytes();
        let c = data3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], data4[0], data4[1], data4[2], data4[3],
            data4[4], data4[5], data4[6], data4[7],
        ])
    }

    /// The GUID as stored on disk (`uuid.UUID.bytes_le` in Python).
    pub const fn to_bytes_le(self) -> [u8; 16] {
        self.0
    }

    /// The GUID from its on-disk bytes.
    pub const fn from_bytes_le(bytes: [u8; 16]) -> Self {
        Guid(bytes)
    }
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
            b[14], b[15]
        )
    }
}

impl std::fmt::Debug for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Guid({self})")
    }
}

/// GUID closing the OVMF footer table: `96b582de-1fb2-45f7-baea-a366c55a082d`.
pub const OVMF_TABLE_FOOTER_GUID: Guid = Guid::from_fields(
    0x96b5_82de,
    0x1fb2,
    0x45f7,
    [0xba, 0xea, 0xa3, 0x66, 0xc5, 0x5a, 0x08, 0x2d],
);
/// Entry giving the GPA of the SEV hashes table: `7255371f-3a3b-4b04-927b-1da6efa8d454`.
pub const SEV_HASH_TABLE_RV_GUID: Guid = Guid::from_fields(
    0x7255_371f,
    0x3a3b,
    0x4b04,
    [0x92, 0x7b, 0x1d, 0xa6, 0xef, 0xa8, 0xd4, 0x54],
);
/// Entry giving the SEV-ES AP reset address: `00f771de-1a7e-4fcb-890e-68c77e2fb44e`.
pub const SEV_ES_RESET_BLOCK_GUID: Guid = Guid::from_fields(
    0x00f7_71de,
    0x1a7e,
    0x4fcb,
    [0x89, 0x0e, 0x68, 0xc7, 0x7e, 0x2f, 0xb4, 0x4e],
);
/// Entry giving the offset of the SEV metadata: `dc886566-984a-4798-a75e-5585a7bf67cc`.
pub const OVMF_SEV_META_DATA_GUID: Guid = Guid::from_fields(
    0xdc88_6566,
    0x984a,
    0x4798,
    [0xa7, 0x5e, 0x55, 0x85, 0xa7, 0xbf, 0x67, 0xcc],
);
/// Entry of a Coconut-SVSM image giving its entry point: `a789a612-0597-4c4b-a49f-cbb1fe9d1ddd`.
pub const SVSM_INFO_GUID: Guid = Guid::from_fields(
    0xa789_a612,
    0x0597,
    0x4c4b,
    [0xa4, 0x9f, 0xcb, 0xb1, 0xfe, 0x9d, 0x1d, 0xdd],
);

/// Types of the sections declared by the OVMF SEV metadata
/// (edk2 `OvmfPkg/ResetVector/X64/OvmfSevMetadata.asm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SectionType {
    /// Memory the launch pre-validates (zero pages).
    SnpSecMem,
    /// The SNP secrets page.
    SnpSecrets,
    /// The SNP CPUID page.
    Cpuid,
    /// The SVSM calling area.
    SvsmCaa,
    /// The page receiving the kernel, initrd and cmdline hashes.
    SnpKernelHashes,
}

impl SectionType {
    /// The section type for its metadata code, `None` if unknown.
    pub const fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(Self::SnpSecMem),
            2 => Some(Self::SnpSecrets),
            3 => Some(Self::Cpuid),
            4 => Some(Self::SvsmCaa),
            0x10 => Some(Self::SnpKernelHashes),
            _ => None,
        }
    }

    /// The metadata code of this section type.
    pub const fn code(self) -> u32 {
        match self {
            Self::SnpSecMem => 1,
            Self::SnpSecrets => 2,
            Self::Cpuid => 3,
            Self::SvsmCaa => 4,
            Self::SnpKernelHashes => 0x10,
        }
    }
}

/// One section descriptor of the SEV metadata, as stored (the type is kept
/// raw: like the reference, an unknown type is an error only when an SNP
/// launch walks the sections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataSection {
    /// Guest physical address of the section.
    pub gpa: u32,
    /// Size of the section in bytes.
    pub size: u32,
    /// Raw section type code.
    pub type_code: u32,
}

impl MetadataSection {
    /// The section type, or [`MeasurementError::UnknownSectionType`].
    pub fn section_type(&self) -> Result<SectionType, MeasurementError> {
        SectionType::from_code(self.type_code).ok_or(MeasurementError::UnknownSectionType {
            type_code: self.type_code,
        })
    }
}

/// A parsed OVMF (or SVSM) firmware image, borrowing its bytes.
#[derive(Debug, Clone)]
pub struct OvmfImage<'a> {
    data: &'a [u8],
    has_footer_table: bool,
    /// Footer table entries in file order from the end; a GUID seen twice
    /// keeps the entry nearest the start of the image (as the reference's
    /// dict assignment does).
    table: FooterTable<'a>,
    has_metadata: bool,
    metadata: Vec<MetadataSection>,
    /// Guest physical address of the first byte; may be negative for
    /// images larger than their end address (an error only when used).
    gpa: i128,
}

impl<'a> OvmfImage<'a> {
    /// Parses an OVMF image that ends at 4 GiB in guest memory.
    pub fn parse(data: &'a [u8]) -> Result<Self, MeasurementError> {
        Self::parse_ending_at(data, i128::from(FOUR_GB))
    }

    /// Parses an image that ends at `end_gpa` in guest memory.
    pub(crate) fn parse_ending_at(data: &'a [u8], end_gpa: i128) -> Result<Self, MeasurementError> {
        let (has_footer_table, table) = parse_footer_table(data)?;
        let mut image = OvmfImage {
            data,
            has_footer_table,
            table,
            has_metadata: false,
            metadata: Vec::new(),
            gpa: end_gpa - len_i128(data),
        };
        image.parse_sev_metadata()?;
        Ok(image)
    }

    /// The image bytes.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// Size of the image in bytes.
    pub fn size(&self) -> usize {
        self.data.len()
    }

    /// Guest physical address of the first byte of the image.
    pub fn gpa(&self) -> Result<u64, MeasurementError> {
        u64::try_from(self.gpa).map_err(|_| MeasurementError::GpaOutOfRange {
            what: "firmware image",
        })
    }

    pub(crate) fn gpa_i128(&self) -> i128 {
        self.gpa
    }

    /// Whether the image ends with the OVMF footer table GUID.
    pub fn has_footer_table(&self) -> bool {
        self.has_footer_table
    }

    /// The data of the footer table entry tagged `guid`, if any.
    pub fn table_item(&self, guid: Guid) -> Option<&'a [u8]> {
        self.table
            .iter()
            .find(|(entry_guid, _)| *entry_guid == guid)
            .map(|(_, data)| *data)
    }

    /// Whether the footer table points to SEV metadata (possibly empty).
    pub fn has_sev_metadata(&self) -> bool {
        self.has_metadata
    }

    /// The SEV metadata sections, in image order.
    pub fn metadata_items(&self) -> &[MetadataSection] {
        &self.metadata
    }

    /// Whether a metadata section of `section_type` exists; an unknown
    /// section type met before one matches is an error, as in the reference.
    pub fn has_metadata_section(
        &self,
        section_type: SectionType,
    ) -> Result<bool, MeasurementError> {
        for section in &self.metadata {
            if section.section_type()? == section_type {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Refuses an image that cannot drive an SEV-SNP launch: no footer
    /// table, or no SEV metadata. (The reference measures such images
    /// anyway and prints a digest no SNP launch can produce.)
    pub fn require_sev_metadata(&self) -> Result<(), MeasurementError> {
        if !self.has_footer_table {
            return Err(MeasurementError::NoFooterTable);
        }
        if !self.has_metadata {
            return Err(MeasurementError::NoSevMetadata);
        }
        Ok(())
    }

    /// Whether QEMU can place the kernel/initrd/cmdline hashes table in
    /// this firmware (an SEV hash table entry with a non-zero GPA).
    pub fn is_sev_hashes_table_supported(&self) -> bool {
        matches!(self.sev_hashes_table_gpa(), Ok(gpa) if gpa != 0)
    }

    /// GPA of the SEV hashes table.
    pub fn sev_hashes_table_gpa(&self) -> Result<u32, MeasurementError> {
        self.table_item(SEV_HASH_TABLE_RV_GUID)
            .map(le_u32_prefix)
            .ok_or(MeasurementError::MissingSevHashTable)
    }

    /// The SEV-ES AP reset address (EIP).
    pub fn sev_es_reset_eip(&self) -> Result<u32, MeasurementError> {
        self.table_item(SEV_ES_RESET_BLOCK_GUID)
            .map(le_u32_prefix)
            .ok_or(MeasurementError::MissingResetBlock)
    }

    fn parse_sev_metadata(&mut self) -> Result<(), MeasurementError> {
        let Some(entry) = self.table_item(OVMF_SEV_META_DATA_GUID) else {
            return Ok(());
        };
        let offset_from_end = le_u32_prefix(entry);
        let out_of_bounds = || MeasurementError::MetadataOutOfBounds {
            offset_from_end,
            image_size: self.data.len(),
        };
        let start = usize::try_from(offset_from_end)
            .ok()
            .and_then(|offset| self.data.len().checked_sub(offset))
            .ok_or_else(out_of_bounds)?;
        let header = start
            .checked_add(METADATA_HEADER_SIZE)
            .and_then(|end| self.data.get(start..end))
            .ok_or_else(out_of_bounds)?;
        let signature = fixed::<4>(header, 0);
        if &signature != b"ASEV" {
            return Err(MeasurementError::BadMetadataSignature { signature });
        }
        let declared_size = u32::from_le_bytes(fixed(header, 4));
        let version = u32::from_le_bytes(fixed(header, 8));
        if version != 1 {
            return Err(MeasurementError::BadMetadataVersion { version });
        }
        let num_items = u32::from_le_bytes(fixed(header, 12));
        let start = len_i128_usize(start);
        let items = py_slice(
            self.data,
            Some(start + len_i128_usize(METADATA_HEADER_SIZE)),
            Some(start + i128::from(declared_size)),
        );
        let mut metadata = Vec::new();
        for index in 0..num_items {
            let offset = usize::try_from(index)
                .ok()
                .and_then(|index| index.checked_mul(METADATA_ITEM_SIZE));
            let item = offset
                .and_then(|offset| Some((offset, offset.checked_add(METADATA_ITEM_SIZE)?)))
                .and_then(|(offset, end)| items.get(offset..end))
                .ok_or(MeasurementError::MetadataItemsTruncated {
                    declared: num_items,
                    available: items.len() / METADATA_ITEM_SIZE,
                })?;
            metadata.push(MetadataSection {
                gpa: u32::from_le_bytes(fixed(item, 0)),
                size: u32::from_le_bytes(fixed(item, 4)),
                type_code: u32::from_le_bytes(fixed(item, 8)),
            });
        }
        self.has_metadata = true;
        self.metadata = metadata;
        Ok(())
    }
}

/// A Coconut-SVSM image: the same footer table as OVMF, placed right below
/// the OVMF image and its variable store.
#[derive(Debug, Clone)]
pub struct SvsmImage<'a> {
    image: OvmfImage<'a>,
}

impl<'a> SvsmImage<'a> {
    /// Parses an SVSM image loaded below `ovmf` and an OVMF variable store
    /// of `vars_size` bytes.
    pub fn parse(
        data: &'a [u8],
        ovmf: &OvmfImage<'_>,
        vars_size: u64,
    ) -> Result<Self, MeasurementError> {
        let end_gpa = ovmf.gpa_i128() - i128::from(vars_size);
        Ok(SvsmImage {
            image: OvmfImage::parse_ending_at(data, end_gpa)?,
        })
    }

    /// The image as a footer-table-carrying firmware image.
    pub fn image(&self) -> &OvmfImage<'a> {
        &self.image
    }

    /// The SVSM entry point: the `SVSM_INFO` offset plus the image GPA.
    pub fn sev_es_reset_eip(&self) -> Result<u64, MeasurementError> {
        let offset = self
            .image
            .table_item(SVSM_INFO_GUID)
            .map(le_u32_prefix)
            .ok_or(MeasurementError::MissingSvsmInfo)?;
        let eip = i128::from(offset) + self.image.gpa_i128();
        // The reference stores it in a u64 VMSA field, which wraps.
        Ok(wrap_u64(eip))
    }
}

/// `value` modulo 2^64, as ctypes stores a Python int in a `c_uint64`.
pub(crate) fn wrap_u64(value: i128) -> u64 {
    // Truncation to the low 64 bits is the intent here.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let low = value as u64;
    low
}

/// Footer table entries, GUID and data, nearest the footer first.
type FooterTable<'a> = Vec<(Guid, &'a [u8])>;

/// Whether the image has a footer table, and its entries.
fn parse_footer_table(data: &[u8]) -> Result<(bool, FooterTable<'_>), MeasurementError> {
    let size = len_i128(data);
    let start_of_footer_table =
        size - len_i128_usize(FOOTER_GAP) - len_i128_usize(ENTRY_HEADER_SIZE);
    let footer = py_slice(data, Some(start_of_footer_table), None)
        .get(..ENTRY_HEADER_SIZE)
        .ok_or(MeasurementError::FirmwareTooSmall { size: data.len() })?;
    let (footer_size, footer_guid) = entry_header(footer);
    if footer_guid != OVMF_TABLE_FOOTER_GUID {
        return Ok((false, Vec::new()));
    }
    let table_size = i128::from(footer_size) - len_i128_usize(ENTRY_HEADER_SIZE);
    if table_size < 0 {
        return Ok((true, Vec::new()));
    }
    let mut table_bytes = py_slice(
        data,
        Some(start_of_footer_table - table_size),
        Some(start_of_footer_table),
    );
    let mut table: FooterTable<'_> = Vec::new();
    while let Some(header_start) = table_bytes.len().checked_sub(ENTRY_HEADER_SIZE) {
        let header = table_bytes.get(header_start..).unwrap_or_default();
        let (entry_size, guid) = entry_header(header);
        if usize::from(entry_size) < ENTRY_HEADER_SIZE {
            return Err(MeasurementError::InvalidFooterEntrySize { size: entry_size });
        }
        let entry_size = i128::from(entry_size);
        let entry_data = py_slice(
            table_bytes,
            Some(-entry_size),
            Some(-len_i128_usize(ENTRY_HEADER_SIZE)),
        );
        match table.iter_mut().find(|(known, _)| *known == guid) {
            Some(slot) => slot.1 = entry_data,
            None => table.push((guid, entry_data)),
        }
        table_bytes = py_slice(table_bytes, None, Some(-entry_size));
    }
    Ok((true, table))
}

/// Reads an entry header (`u16` size, GUID) from an 18-byte slice.
fn entry_header(bytes: &[u8]) -> (u16, Guid) {
    (u16::from_le_bytes(fixed(bytes, 0)), Guid(fixed(bytes, 2)))
}

/// `N` bytes of `bytes` from `offset`, zero-filled past the end (callers
/// pass slices they already checked to be long enough).
fn fixed<const N: usize>(bytes: &[u8], offset: usize) -> [u8; N] {
    let mut out = [0u8; N];
    for (index, byte) in out.iter_mut().enumerate() {
        if let Some(value) = offset.checked_add(index).and_then(|at| bytes.get(at)) {
            *byte = *value;
        }
    }
    out
}

/// `int.from_bytes(entry[:4], 'little')`: up to four little-endian bytes.
pub(crate) fn le_u32_prefix(bytes: &[u8]) -> u32 {
    let mut value = [0u8; 4];
    for (out, byte) in value.iter_mut().zip(bytes) {
        *out = *byte;
    }
    u32::from_le_bytes(value)
}

fn len_i128(data: &[u8]) -> i128 {
    len_i128_usize(data.len())
}

fn len_i128_usize(len: usize) -> i128 {
    // usize is at most 64 bits on every supported target.
    i128::try_from(len).unwrap_or(i128::MAX)
}

/// Python's `data[start:stop]`: negative indices count from the end, and
/// both ends clamp to the slice.
pub(crate) fn py_slice(data: &[u8], start: Option<i128>, stop: Option<i128>) -> &[u8] {
    let len = len_i128(data);
    let normalize = |index: i128| -> usize {
        let index = if index < 0 {
            (index + len).max(0)
        } else {
            index.min(len)
        };
        usize::try_from(index).unwrap_or(0)
    };
    let start = start.map_or(0, normalize);
    let stop = stop.map_or(data.len(), normalize);
    data.get(start..stop).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failing unwrap is a failing test.
mod tests {
    use super::*;

    use crate::measurement::tests::{image_with_table, metadata};

    #[test]
    fn guid_text_round_trips() {
        assert_eq!(
            OVMF_TABLE_FOOTER_GUID.to_string(),
            "96b582de-1fb2-45f7-baea-a366c55a082d"
        );
        assert_eq!(
            SEV_HASH_TABLE_RV_GUID.to_string(),
            "7255371f-3a3b-4b04-927b-1da6efa8d454"
        );
        assert_eq!(
            SEV_ES_RESET_BLOCK_GUID.to_string(),
            "00f771de-1a7e-4fcb-890e-68c77e2fb44e"
        );
        assert_eq!(
            OVMF_SEV_META_DATA_GUID.to_string(),
            "dc886566-984a-4798-a75e-5585a7bf67cc"
        );
        assert_eq!(
            SVSM_INFO_GUID.to_string(),
            "a789a612-0597-4c4b-a49f-cbb1fe9d1ddd"
        );
        assert_eq!(
            OVMF_TABLE_FOOTER_GUID.to_bytes_le()[..4],
            [0xde, 0x82, 0xb5, 0x96]
        );
    }

    #[test]
    fn python_slices() {
        let data = [0u8, 1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(py_slice(&data, Some(-3), None), &[7, 8, 9]);
        assert_eq!(py_slice(&data, Some(-30), Some(2)), &[0, 1]);
        assert_eq!(py_slice(&data, Some(8), Some(100)), &[8, 9]);
        assert_eq!(py_slice(&data, Some(5), Some(2)), &[] as &[u8]);
        assert_eq!(py_slice(&data, None, Some(-8)), &[0, 1]);
        assert_eq!(py_slice(&data, Some(-4), Some(-2)), &[6, 7]);
        assert_eq!(py_slice(&[], Some(-4), Some(-2)), &[] as &[u8]);
    }

    #[test]
    fn parses_table_and_metadata() {
        let size = 0x4000;
        let meta = metadata(&[
            (0x80_0000, 0x1000, 1),
            (0x80_1000, 0x1000, 2),
            (0x80_2000, 0x1000, 0x10),
        ]);
        let meta_offset_from_end = u32::try_from(0x2000).unwrap();
        let mut image = image_with_table(
            size,
            &[
                (
                    SEV_HASH_TABLE_RV_GUID,
                    [0x00, 0x2c, 0x80, 0x00, 0x00, 0x04, 0x00, 0x00].to_vec(),
                ),
                (
                    SEV_ES_RESET_BLOCK_GUID,
                    0x0080_b004u32.to_le_bytes().to_vec(),
                ),
                (
                    OVMF_SEV_META_DATA_GUID,
                    meta_offset_from_end.to_le_bytes().to_vec(),
                ),
            ],
        );
        image[size - 0x2000..size - 0x2000 + meta.len()].copy_from_slice(&meta);
        let ovmf = OvmfImage::parse(&image).unwrap();
        assert!(ovmf.has_footer_table());
        assert!(ovmf.has_sev_metadata());
        assert_eq!(ovmf.gpa().unwrap(), FOUR_GB - 0x4000);
        assert_eq!(ovmf.sev_es_reset_eip().unwrap(), 0x0080_b004);
        assert_eq!(ovmf.sev_hashes_table_gpa().unwrap(), 0x0080_2c00);
        assert!(ovmf.is_sev_hashes_table_supported());
        assert_eq!(ovmf.metadata_items().len(), 3);
        assert_eq!(
            ovmf.metadata_items()[2],
            MetadataSection {
                gpa: 0x80_2000,
                size: 0x1000,
                type_code: 0x10
            }
        );
        assert!(ovmf
            .has_metadata_section(SectionType::SnpKernelHashes)
            .unwrap());
        assert!(!ovmf.has_metadata_section(SectionType::Cpuid).unwrap());
        assert!(ovmf.require_sev_metadata().is_ok());
    }

    #[test]
    fn image_without_footer_parses_but_is_refused_for_snp() {
        let image = vec![0u8; 0x2000];
        let ovmf = OvmfImage::parse(&image).unwrap();
        assert!(!ovmf.has_footer_table());
        assert!(matches!(
            ovmf.require_sev_metadata(),
            Err(MeasurementError::NoFooterTable)
        ));
        assert!(matches!(
            ovmf.sev_es_reset_eip(),
            Err(MeasurementError::MissingResetBlock)
        ));
        assert!(!ovmf.is_sev_hashes_table_supported());

        let image = image_with_table(0x2000, &[(SEV_ES_RESET_BLOCK_GUID, vec![4, 0, 0, 0])]);
        let ovmf = OvmfImage::parse(&image).unwrap();
        assert!(matches!(
            ovmf.require_sev_metadata(),
            Err(MeasurementError::NoSevMetadata)
        ));
    }

    #[test]
    fn short_entries_read_as_python_does() {
        // An entry of two data bytes: `int.from_bytes(entry[:4])` reads two.
        let image = image_with_table(0x1000, &[(SEV_ES_RESET_BLOCK_GUID, vec![0x34, 0x12])]);
        assert_eq!(
            OvmfImage::parse(&image)
                .unwrap()
                .sev_es_reset_eip()
                .unwrap(),
            0x1234
        );
    }

    #[test]
    fn duplicate_guid_keeps_the_lowest_entry() {
        let image = image_with_table(
            0x1000,
            &[
                (SEV_ES_RESET_BLOCK_GUID, vec![1, 0, 0, 0]),
                (SEV_ES_RESET_BLOCK_GUID, vec![2, 0, 0, 0]),
            ],
        );
        assert_eq!(
            OvmfImage::parse(&image)
                .unwrap()
                .sev_es_reset_eip()
                .unwrap(),
            1
        );
    }

    #[test]
    fn bad_entry_size_is_an_error() {
        let mut image = image_with_table(0x1000, &[(SEV_ES_RESET_BLOCK_GUID, vec![1, 0, 0, 0])]);
        // The entry header sits right before the footer entry header.
        let at = 0x1000 - FOOTER_GAP - 2 * ENTRY_HEADER_SIZE;
        image[at..at + 2].copy_from_slice(&3u16.to_le_bytes());
        assert!(matches!(
            OvmfImage::parse(&image),
            Err(MeasurementError::InvalidFooterEntrySize { size: 3 })
        ));
    }

    #[test]
    fn metadata_errors() {
        let with_meta = |offset: u32, meta: &[u8]| {
            let mut image = image_with_table(
                0x2000,
                &[(OVMF_SEV_META_DATA_GUID, offset.to_le_bytes().to_vec())],
            );
            if let Some(at) = 0x2000usize.checked_sub(offset as usize) {
                if let Some(slot) = image.get_mut(at..at + meta.len()) {
                    slot.copy_from_slice(meta);
                }
            }
            image
        };
        let good = metadata(&[(0x1000, 0x1000, 1)]);
        assert!(OvmfImage::parse(&with_meta(0x1000, &good)).is_ok());
        assert!(matches!(
            OvmfImage::parse(&with_meta(0x3000, &good)),
            Err(MeasurementError::MetadataOutOfBounds { .. })
        ));
        assert!(matches!(
            OvmfImage::parse(&with_meta(8, &good)),
            Err(MeasurementError::MetadataOutOfBounds { .. })
        ));
        let mut bad_signature = good.clone();
        bad_signature[0] = b'X';
        assert!(matches!(
            OvmfImage::parse(&with_meta(0x1000, &bad_signature)),
            Err(MeasurementError::BadMetadataSignature { .. })
        ));
        let mut bad_version = good.clone();
        bad_version[8] = 2;
        assert!(matches!(
            OvmfImage::parse(&with_meta(0x1000, &bad_version)),
            Err(MeasurementError::BadMetadataVersion { version: 2 })
        ));
        let mut too_many = good.clone();
        too_many[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            OvmfImage::parse(&with_meta(0x1000, &too_many)),
            Err(MeasurementError::MetadataItemsTruncated {
                declared: u32::MAX,
                available: 1
            })
        ));
        let mut unknown_type = good;
        unknown_type[24..28].copy_from_slice(&7u32.to_le_bytes());
        let image = with_meta(0x1000, &unknown_type);
        let ovmf = OvmfImage::parse(&image).unwrap();
        assert!(matches!(
            ovmf.has_metadata_section(SectionType::Cpuid),
            Err(MeasurementError::UnknownSectionType { type_code: 7 })
        ));
    }

    #[test]
    fn tiny_images_follow_python_slicing() {
        // Below 18 bytes the footer header cannot be read at all.
        for size in 0..18 {
            assert!(matches!(
                OvmfImage::parse(&vec![0u8; size]),
                Err(MeasurementError::FirmwareTooSmall { .. })
            ));
        }
        // From 18 to 32 bytes Python's negative slice start wraps around and
        // reads 18 bytes from somewhere in the image.
        for size in 18..=32 {
            assert!(OvmfImage::parse(&vec![0u8; size]).is_ok(), "size {size}");
        }
        // From 33 to 49 bytes fewer than 18 bytes remain in the slice.
        for size in 33..50 {
            assert!(OvmfImage::parse(&vec![0u8; size]).is_err(), "size {size}");
        }
        assert!(OvmfImage::parse(&[0u8; 50]).is_ok());
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic generator; every image, every truncation.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let meta = metadata(&[(0x1000, 0x1000, 1), (0x2000, 0x1000, 3)]);
        let mut base = image_with_table(
            0x1000,
            &[
                (SEV_ES_RESET_BLOCK_GUID, vec![4, 0, 0, 0]),
                (OVMF_SEV_META_DATA_GUID, 0x800u32.to_le_bytes().to_vec()),
            ],
        );
        base[0x800..0x800 + meta.len()].copy_from_slice(&meta);
        for cut in 0..base.len() {
            let _ = OvmfImage::parse(&base[cut..]);
            let _ = OvmfImage::parse(&base[..cut]);
        }
        for _ in 0..2000 {
            let mut image = base.clone();
            for _ in 0..4 {
                let at = usize::try_from(next() % 0x1000).unwrap();
                image[at] = u8::try_from(next() & 0xff).unwrap();
            }
            // Corrupt the table region preferentially.
            let at = 0x1000 - FOOTER_GAP - 1 - usize::try_from(next() % 80).unwrap();
            image[at] = u8::try_from(next() & 0xff).unwrap();
            if let Ok(ovmf) = OvmfImage::parse(&image) {
                let _ = ovmf.sev_es_reset_eip();
                let _ = ovmf.sev_hashes_table_gpa();
                let _ = ovmf.has_metadata_section(SectionType::SnpKernelHashes);
            }
        }
    }
}
