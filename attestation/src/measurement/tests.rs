//! Whole-launch tests on synthetic firmware. The expected digests come from
//! sev-snp-measure 0.0.13 run on the same images (`hsev-e2e`'s `measure`
//! test repeats this against the live tool).

use super::*;

/// Size of a footer table entry header.
const ENTRY_HEADER_SIZE: usize = 18;

/// An image of `size` bytes whose bytes are `(i * 7) % 251`, with an OVMF
/// footer table holding `entries` (the first lowest in memory) ending 32
/// bytes before the end.
pub(super) fn image_with_table(size: usize, entries: &[(Guid, Vec<u8>)]) -> Vec<u8> {
    let mut table = Vec::new();
    for (guid, data) in entries {
        table.extend_from_slice(data);
        let entry_size = u16::try_from(data.len() + ENTRY_HEADER_SIZE).unwrap();
        table.extend_from_slice(&entry_size.to_le_bytes());
        table.extend_from_slice(&guid.to_bytes_le());
    }
    let footer_size = u16::try_from(table.len() + ENTRY_HEADER_SIZE).unwrap();
    table.extend_from_slice(&footer_size.to_le_bytes());
    table.extend_from_slice(&OVMF_TABLE_FOOTER_GUID.to_bytes_le());
    let mut image: Vec<u8> = (0..size)
        .map(|i| u8::try_from(i * 7 % 251).unwrap())
        .collect();
    let end = size - 32;
    image[end - table.len()..end].copy_from_slice(&table);
    image
}

/// SEV metadata (`ASEV` header and sections) for `(gpa, size, type)` items.
pub(super) fn metadata(items: &[(u32, u32, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"ASEV");
    out.extend_from_slice(&u32::try_from(16 + 12 * items.len()).unwrap().to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&u32::try_from(items.len()).unwrap().to_le_bytes());
    for (gpa, size, kind) in items {
        out.extend_from_slice(&gpa.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
    }
    out
}

/// A 64 KiB firmware with every SNP section, the SEV hashes table at
/// 0x80_7c00 and `extra` footer entries; the metadata sits 0x1000 bytes
/// from the end.
pub(super) fn synthetic_firmware(
    sections: &[(u32, u32, u32)],
    extra: &[(Guid, Vec<u8>)],
) -> Vec<u8> {
    let size = 0x1_0000;
    let mut entries = vec![
        (
            SEV_HASH_TABLE_RV_GUID,
            [0x0080_7c00u32.to_le_bytes(), 0x400u32.to_le_bytes()].concat(),
        ),
        (
            SEV_ES_RESET_BLOCK_GUID,
            0x0080_b004u32.to_le_bytes().to_vec(),
        ),
        (OVMF_SEV_META_DATA_GUID, 0x1000u32.to_le_bytes().to_vec()),
    ];
    entries.extend_from_slice(extra);
    let mut image = image_with_table(size, &entries);
    let meta = metadata(sections);
    image[size - 0x1000..size - 0x1000 + meta.len()].copy_from_slice(&meta);
    image
}

const SNP_SECTIONS: [(u32, u32, u32); 5] = [
    (0x80_0000, 0x7000, 1),
    (0x80_7000, 0x1000, 0x10),
    (0x80_9000, 0x1000, 2),
    (0x80_a000, 0x1000, 3),
    (0x80_b000, 0x2000, 1),
];

const BOOT: DirectBoot<'static> = DirectBoot {
    kernel: b"kernel",
    initrd: Some(b"initrd"),
    append: Some("console=ttyS0"),
};

fn snp(
    ovmf: &OvmfImage<'_>,
    vmm: VmmType,
    direct_boot: Option<DirectBoot<'static>>,
) -> Result<String, MeasurementError> {
    let launch = SnpLaunch {
        ovmf,
        vcpus: 4,
        vcpu_sig: 0x0080_0f12,
        guest_features: 0x1,
        vmm,
        direct_boot,
        ovmf_hash: None,
    };
    Ok(hex::encode(snp_launch_digest(&launch)?.launch_digest))
}

#[test]
fn synthetic_firmware_matches_reference() {
    let image = synthetic_firmware(&SNP_SECTIONS, &[]);
    let ovmf = OvmfImage::parse(&image).unwrap();
    let expected = reference_vectors();
    assert_eq!(
        snp(&ovmf, VmmType::Qemu, Some(BOOT)).unwrap(),
        expected.snp_qemu_kernel
    );
    assert_eq!(snp(&ovmf, VmmType::Qemu, None).unwrap(), expected.snp_qemu);
    assert_eq!(
        snp(&ovmf, VmmType::Ec2, Some(BOOT)).unwrap(),
        expected.snp_ec2_kernel
    );
    assert_eq!(
        snp(&ovmf, VmmType::Gce, Some(BOOT)).unwrap(),
        expected.snp_gce_kernel
    );
    assert_eq!(
        hex::encode(snp_ovmf_hash(&ovmf).unwrap()),
        expected.ovmf_hash
    );
    let seves = seves_launch_digest(&SevEsLaunch {
        ovmf: &ovmf,
        vcpus: 4,
        vcpu_sig: 0x0080_0f12,
        vmm: VmmType::Qemu,
        direct_boot: Some(BOOT),
    })
    .unwrap();
    assert_eq!(hex::encode(seves.launch_digest), expected.seves_kernel);
    assert_eq!(
        hex::encode(sev_launch_digest(&ovmf, Some(&BOOT)).unwrap()),
        expected.sev_kernel
    );
}

#[test]
fn ovmf_hash_seed_continues_the_chain() {
    let image = synthetic_firmware(&SNP_SECTIONS, &[]);
    let ovmf = OvmfImage::parse(&image).unwrap();
    let seed = snp_ovmf_hash(&ovmf).unwrap();
    let full = snp(&ovmf, VmmType::Qemu, Some(BOOT)).unwrap();
    // A seed makes the firmware bytes irrelevant, but its table still counts.
    let mut other = image.clone();
    other[..0x100].fill(0xee);
    let other = OvmfImage::parse(&other).unwrap();
    let seeded = snp_launch_digest(&SnpLaunch {
        ovmf: &other,
        vcpus: 4,
        vcpu_sig: 0x0080_0f12,
        guest_features: 0x1,
        vmm: VmmType::Qemu,
        direct_boot: Some(BOOT),
        ovmf_hash: Some(seed),
    })
    .unwrap();
    assert_eq!(hex::encode(seeded.launch_digest), full);
    assert_eq!(seeded.vmsas.len(), 4);
}

#[test]
fn svsm_matches_reference() {
    let ovmf_image = synthetic_firmware(&SNP_SECTIONS, &[]);
    let ovmf = OvmfImage::parse(&ovmf_image).unwrap();
    let svsm_image = synthetic_firmware(
        &[
            (0x80_0000, 0x2000, 1),
            (0x80_2000, 0x1000, 2),
            (0x80_3000, 0x1000, 3),
            (0x80_4000, 0x1000, 4),
            (0x80_5000, 0x1000, 0x10),
        ],
        &[(SVSM_INFO_GUID, 0x10u32.to_le_bytes().to_vec())],
    );
    let svsm = SvsmImage::parse(&svsm_image, &ovmf, 0x2_0000).unwrap();
    assert_eq!(
        svsm.image().gpa().unwrap(),
        FOUR_GB - 0x1_0000 - 0x2_0000 - 0x1_0000
    );
    let measured = svsm_launch_digest(&SvsmLaunch {
        ovmf: &ovmf,
        svsm: &svsm,
        vcpus: 2,
        vcpu_sig: 0x00a0_0f11,
    })
    .unwrap();
    assert_eq!(
        hex::encode(measured.launch_digest),
        reference_vectors().svsm
    );
}

#[test]
fn kernel_hash_errors() {
    // No SNP_KERNEL_HASHES section: refused after the other sections.
    let image = synthetic_firmware(&SNP_SECTIONS[2..], &[]);
    let ovmf = OvmfImage::parse(&image).unwrap();
    assert!(snp(&ovmf, VmmType::Qemu, None).is_ok());
    assert_eq!(
        snp(&ovmf, VmmType::Qemu, Some(BOOT)),
        Err(MeasurementError::NoKernelHashesSection)
    );
    // A kernel hashes section of two pages.
    let image = synthetic_firmware(&[(0x80_7000, 0x2000, 0x10)], &[]);
    let ovmf = OvmfImage::parse(&image).unwrap();
    assert!(snp(&ovmf, VmmType::Qemu, None).is_ok());
    assert_eq!(
        snp(&ovmf, VmmType::Qemu, Some(BOOT)),
        Err(MeasurementError::KernelHashesSectionSize { size: 0x2000 })
    );
    // A hashes table crossing its page.
    let mut image = synthetic_firmware(&SNP_SECTIONS, &[]);
    let at = image
        .windows(4)
        .position(|w| w == 0x0080_7c00u32.to_le_bytes())
        .unwrap();
    image[at..at + 4].copy_from_slice(&0x0080_7fc0u32.to_le_bytes());
    let ovmf = OvmfImage::parse(&image).unwrap();
    assert_eq!(
        snp(&ovmf, VmmType::Qemu, Some(BOOT)),
        Err(MeasurementError::HashesTableDoesNotFit { offset: 0xfc0 })
    );
    // SEV and SEV-ES need a non-zero hashes table GPA.
    image[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
    let ovmf = OvmfImage::parse(&image).unwrap();
    assert_eq!(
        sev_launch_digest(&ovmf, Some(&BOOT)),
        Err(MeasurementError::KernelHashesUnsupported)
    );
    assert!(sev_launch_digest(&ovmf, None).is_ok());
}

#[test]
fn firmware_without_metadata_is_refused_for_snp_only() {
    let image = image_with_table(
        0x4000,
        &[(
            SEV_ES_RESET_BLOCK_GUID,
            0x0080_b004u32.to_le_bytes().to_vec(),
        )],
    );
    let ovmf = OvmfImage::parse(&image).unwrap();
    assert_eq!(
        snp(&ovmf, VmmType::Qemu, None),
        Err(MeasurementError::NoSevMetadata)
    );
    assert_eq!(snp_ovmf_hash(&ovmf), Err(MeasurementError::NoSevMetadata));
    let seves = SevEsLaunch {
        ovmf: &ovmf,
        vcpus: 2,
        vcpu_sig: 0,
        vmm: VmmType::Qemu,
        direct_boot: None,
    };
    assert!(seves_launch_digest(&seves).is_ok());

    let bare = vec![0u8; 0x4000];
    let ovmf = OvmfImage::parse(&bare).unwrap();
    assert_eq!(
        snp(&ovmf, VmmType::Qemu, None),
        Err(MeasurementError::NoFooterTable)
    );
    let seves = SevEsLaunch {
        ovmf: &ovmf,
        vcpus: 1,
        vcpu_sig: 0,
        vmm: VmmType::Qemu,
        direct_boot: None,
    };
    assert_eq!(
        seves_launch_digest(&seves),
        Err(MeasurementError::MissingResetBlock)
    );
    assert!(sev_launch_digest(&ovmf, None).is_ok());
}

#[test]
fn unaligned_and_misplaced_firmware() {
    let mut image = synthetic_firmware(&SNP_SECTIONS, &[]);
    image.insert(0, 0);
    let ovmf = OvmfImage::parse(&image).unwrap();
    assert!(matches!(
        snp(&ovmf, VmmType::Qemu, None),
        Err(MeasurementError::UnalignedSize { .. })
    ));
    let svsm_image = synthetic_firmware(&SNP_SECTIONS, &[(SVSM_INFO_GUID, vec![0, 0, 0, 0])]);
    let ovmf_image = synthetic_firmware(&SNP_SECTIONS, &[]);
    let ovmf = OvmfImage::parse(&ovmf_image).unwrap();
    // A variable store so large the SVSM would sit below address 0.
    let svsm = SvsmImage::parse(&svsm_image, &ovmf, FOUR_GB).unwrap();
    let launch = SvsmLaunch {
        ovmf: &ovmf,
        svsm: &svsm,
        vcpus: 1,
        vcpu_sig: 0,
    };
    assert_eq!(
        svsm_launch_digest(&launch),
        Err(MeasurementError::GpaOutOfRange {
            what: "firmware image"
        })
    );
    let no_info = SvsmImage::parse(&ovmf_image, &ovmf, 0).unwrap();
    let launch = SvsmLaunch {
        ovmf: &ovmf,
        svsm: &no_info,
        vcpus: 1,
        vcpu_sig: 0,
    };
    assert_eq!(
        svsm_launch_digest(&launch),
        Err(MeasurementError::MissingSvsmInfo)
    );
}

#[test]
fn unknown_section_type_fails_snp_but_not_sev() {
    let image = synthetic_firmware(&[(0x80_0000, 0x1000, 9)], &[]);
    let ovmf = OvmfImage::parse(&image).unwrap();
    assert_eq!(
        snp(&ovmf, VmmType::Qemu, None),
        Err(MeasurementError::UnknownSectionType { type_code: 9 })
    );
    assert!(sev_launch_digest(&ovmf, None).is_ok());
}

#[test]
fn vmm_names() {
    assert_eq!(VmmType::from_name("QEMU"), Some(VmmType::Qemu));
    assert_eq!(VmmType::from_name("ec2"), Some(VmmType::Ec2));
    assert_eq!(VmmType::from_name("gce"), Some(VmmType::Gce));
    assert_eq!(VmmType::from_name("qemu"), None);
}

#[test]
fn corrupted_firmware_never_panics() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let base = synthetic_firmware(&SNP_SECTIONS, &[(SVSM_INFO_GUID, vec![0x10, 0, 0, 0])]);
    let meta_start = base.len() - 0x1000;
    for round in 0..300 {
        let mut image = base.clone();
        for _ in 0..6 {
            // Hit the metadata and the footer table, where the parser looks.
            let region = if next() % 2 == 0 {
                meta_start
            } else {
                base.len() - 0x100
            };
            let at = region + usize::try_from(next() % 0x60).unwrap();
            image[at] = u8::try_from(next() & 0xff).unwrap();
        }
        let cut = if round % 5 == 0 {
            usize::try_from(next() % 0x1_0000).unwrap()
        } else {
            0
        };
        let image = &image[cut..];
        let Ok(ovmf) = OvmfImage::parse(image) else {
            continue;
        };
        // Huge sections are valid, merely slow (a million zero pages).
        if ovmf
            .metadata_items()
            .iter()
            .any(|section| section.size > 0x10_0000)
        {
            continue;
        }
        for vmm in [VmmType::Qemu, VmmType::Ec2, VmmType::Gce] {
            let _ = snp(&ovmf, vmm, Some(BOOT));
            let _ = snp(&ovmf, vmm, None);
        }
        let _ = snp_ovmf_hash(&ovmf);
        let _ = sev_launch_digest(&ovmf, Some(&BOOT));
        let _ = seves_launch_digest(&SevEsLaunch {
            ovmf: &ovmf,
            vcpus: 3,
            vcpu_sig: 1,
            vmm: VmmType::Ec2,
            direct_boot: Some(BOOT),
        });
        if let Ok(svsm) = SvsmImage::parse(image, &ovmf, 0x1000) {
            let _ = svsm_launch_digest(&SvsmLaunch {
                ovmf: &ovmf,
                svsm: &svsm,
                vcpus: 2,
                vcpu_sig: 1,
            });
        }
    }
}

struct ReferenceVectors {
    snp_qemu_kernel: &'static str,
    snp_qemu: &'static str,
    snp_ec2_kernel: &'static str,
    snp_gce_kernel: &'static str,
    ovmf_hash: &'static str,
    seves_kernel: &'static str,
    sev_kernel: &'static str,
    svsm: &'static str,
}

fn reference_vectors() -> ReferenceVectors {
    ReferenceVectors {
        snp_qemu_kernel: "d1485715a3e797dfb53342fc9e8453d75124649b8e70745cab84d6520f161ebbb92cabb5d72d030a31c49e327ff48579",
        snp_qemu: "4b811eb75dea92588f2804cc81a8b660dbbf0c512cc090df625568d44f94ffce3503c685aaa843f3708f85e3672c0949",
        snp_ec2_kernel: "88736ad1dd0642e948252ec159201cec0a519bea02e8fafd193918095660e33bde7977036a96d687f52d8f0624ef519a",
        snp_gce_kernel: "9595670703fde21cd5214cea39cd1bbdcd2058eb7eea162409caea9863a02237f7d04ac7ab6a1401922c971ee962dc53",
        ovmf_hash: "7f857cd2bc6ba225dae4be5c3e21589d89846a19bacfcbd082a74dbb1985a797a1a42336d0c819ac9c8a37159d8df136",
        seves_kernel: "85804e8fd2040fdd855340b0aa42c636ebf643a517fcfd6150e128123aa2693b",
        sev_kernel: "9884193e38bebc8d5402faf9c33015517ba61c5d3e7706596575aac843c5e74a",
        svsm: "a46ef327910748b96d06e0fa671ea0820efc57c6771a1f308c12349627b9960046bf75ecdae62c7d3b396ede2ad1fad6",
    }
}
