//! Synthetic firmware images shaped like OVMF and Coconut-SVSM builds:
//! pseudo-random pages with the OVMF footer table, SEV metadata (every SNP
//! section, SNP_KERNEL_HASHES included) and an SEV hash-table entry, which
//! Debian's OVMF lacks. Tests measure and launch them to cover the
//! kernel-hashes paths.

/// A GUID's on-disk (little-endian) bytes from its text.
pub fn guid_le(text: &str) -> [u8; 16] {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let bytes = hex::decode(hex).expect("a GUID is 32 hex digits");
    let mut out = [0u8; 16];
    out.copy_from_slice(&bytes);
    out[..4].reverse();
    out[4..6].reverse();
    out[6..8].reverse();
    out
}

pub const FOOTER_GUID: &str = "96b582de-1fb2-45f7-baea-a366c55a082d";
pub const SEV_HASH_TABLE_RV_GUID: &str = "7255371f-3a3b-4b04-927b-1da6efa8d454";
pub const SEV_ES_RESET_BLOCK_GUID: &str = "00f771de-1a7e-4fcb-890e-68c77e2fb44e";
pub const SEV_META_DATA_GUID: &str = "dc886566-984a-4798-a75e-5585a7bf67cc";
pub const SVSM_INFO_GUID: &str = "a789a612-0597-4c4b-a49f-cbb1fe9d1ddd";

pub const SNP_SEC_MEM: u32 = 1;
pub const SNP_SECRETS: u32 = 2;
pub const CPUID: u32 = 3;
pub const SVSM_CAA: u32 = 4;
pub const SNP_KERNEL_HASHES: u32 = 0x10;

/// What a synthetic firmware image carries.
#[derive(Debug, Clone)]
pub struct SyntheticFirmware {
    /// Image size in bytes.
    pub size: usize,
    /// `(gpa, size, type)` SEV metadata sections.
    pub sections: Vec<(u32, u32, u32)>,
    /// GPA of the SEV hashes table (the footer entry), if any.
    pub hashes_table_gpa: Option<u32>,
    /// The SEV-ES AP reset address.
    pub ap_reset_eip: u32,
    /// The SVSM entry offset (`SVSM_INFO`), for an SVSM image.
    pub svsm_info: Option<u32>,
}

impl SyntheticFirmware {
    /// A 256 KiB OVMF-like image with every SNP section.
    pub fn ovmf() -> Self {
        SyntheticFirmware {
            size: 0x4_0000,
            sections: vec![
                (0x80_0000, 0x9000, SNP_SEC_MEM),
                (0x80_a000, 0x3000, SNP_SEC_MEM),
                (0x80_d000, 0x1000, SNP_SECRETS),
                (0x80_e000, 0x1000, CPUID),
                (0x80_f000, 0x1000, SNP_KERNEL_HASHES),
                (0x81_0000, 0x10000, SNP_SEC_MEM),
            ],
            hashes_table_gpa: Some(0x80_fc00),
            ap_reset_eip: 0x0080_b004,
            svsm_info: None,
        }
    }

    /// A 128 KiB Coconut-SVSM-like image.
    pub fn svsm() -> Self {
        SyntheticFirmware {
            size: 0x2_0000,
            sections: vec![
                (0x80_0000, 0x4000, SNP_SEC_MEM),
                (0x80_4000, 0x1000, SNP_SECRETS),
                (0x80_5000, 0x1000, CPUID),
                (0x80_6000, 0x1000, SVSM_CAA),
                (0x80_7000, 0x1000, SNP_KERNEL_HASHES),
            ],
            hashes_table_gpa: None,
            ap_reset_eip: 0,
            svsm_info: Some(0x1000),
        }
    }

    /// The image: pseudo-random bytes (so every page hashes differently),
    /// the SEV metadata 8 KiB from the end, then the footer table.
    pub fn build(&self) -> Vec<u8> {
        let mut state = 0x243f_6a88_85a3_08d3u64;
        let mut image: Vec<u8> = (0..self.size)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
                state.to_le_bytes()[7]
            })
            .collect();

        let metadata_offset_from_end = 0x2000usize;
        let mut metadata = b"ASEV".to_vec();
        let metadata_size = 16 + 12 * self.sections.len();
        metadata.extend_from_slice(
            &u32::try_from(metadata_size)
                .expect("small metadata")
                .to_le_bytes(),
        );
        metadata.extend_from_slice(&1u32.to_le_bytes());
        metadata.extend_from_slice(
            &u32::try_from(self.sections.len())
                .expect("few sections")
                .to_le_bytes(),
        );
        for (gpa, size, kind) in &self.sections {
            for value in [gpa, size, kind] {
                metadata.extend_from_slice(&value.to_le_bytes());
            }
        }
        let at = self.size - metadata_offset_from_end;
        image[at..at + metadata.len()].copy_from_slice(&metadata);

        let mut entries: Vec<(&str, Vec<u8>)> = Vec::new();
        if let Some(gpa) = self.hashes_table_gpa {
            entries.push((
                SEV_HASH_TABLE_RV_GUID,
                [gpa.to_le_bytes(), 0x400u32.to_le_bytes()].concat(),
            ));
        }
        if let Some(offset) = self.svsm_info {
            entries.push((SVSM_INFO_GUID, offset.to_le_bytes().to_vec()));
        }
        entries.push((
            SEV_ES_RESET_BLOCK_GUID,
            self.ap_reset_eip.to_le_bytes().to_vec(),
        ));
        entries.push((
            SEV_META_DATA_GUID,
            u32::try_from(metadata_offset_from_end)
                .expect("small offset")
                .to_le_bytes()
                .to_vec(),
        ));
        let mut table = Vec::new();
        for (guid, data) in &entries {
            table.extend_from_slice(data);
            table.extend_from_slice(
                &u16::try_from(data.len() + 18)
                    .expect("small entry")
                    .to_le_bytes(),
            );
            table.extend_from_slice(&guid_le(guid));
        }
        table.extend_from_slice(
            &u16::try_from(table.len() + 18)
                .expect("small table")
                .to_le_bytes(),
        );
        table.extend_from_slice(&guid_le(FOOTER_GUID));
        let end = self.size - 32;
        image[end - table.len()..end].copy_from_slice(&table);
        image
    }
}

/// A small pseudo-random "kernel" and "initrd" for direct-boot measurements.
pub fn kernel_and_initrd() -> (Vec<u8>, Vec<u8>) {
    let kernel: Vec<u8> = (0..70_001u32).map(|i| (i * 31 % 256) as u8).collect();
    let initrd: Vec<u8> = (0..33_333u32).map(|i| (i * 17 % 253) as u8).collect();
    (kernel, initrd)
}
