use super::*;
use hsev_e2e::snp_report_file as report_file;

fn milan_a() -> Vec<u8> {
    report_file("milan-v2-a.report.bin")
}

#[test]
fn parses_a_real_v2_report() {
    let report = AttestationReport::from_bytes(&milan_a()).expect("real report parses");
    assert_eq!(report.version, 2);
    assert_eq!(report.policy.raw(), 0x3001f);
    assert_eq!(report.vmpl, 0);
    assert_eq!(report.cpuid, None);
    assert_eq!(report.product(), None);
    assert_eq!(report.key_info.signing_key, SigningKey::Vcek);
    let tcb = report.reported_tcb;
    assert_eq!(
        (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode),
        (3, 0, 8, 115)
    );
    assert_eq!(
        report.current_version,
        FirmwareVersion {
            major: 1,
            minor: 52,
            build: 4
        }
    );
    assert_eq!(report.as_bytes().as_slice(), milan_a().as_slice());
}

#[test]
fn parses_a_real_v3_vlek_report() {
    let report =
        AttestationReport::from_bytes(&report_file("milan-v3-vlek.report.bin")).expect("parses");
    assert_eq!(report.version, 3);
    assert_eq!(report.product(), Some(Product::Milan));
    assert_eq!(report.key_info.signing_key, SigningKey::Vlek);
    assert_eq!(report.vmpl, 1);
}

#[test]
fn wrong_sizes_are_refused() {
    let bytes = milan_a();
    for size in [0, 1, REPORT_SIZE - 1, REPORT_SIZE + 1, 2 * REPORT_SIZE] {
        let mut resized = bytes.clone();
        resized.resize(size, 0);
        assert_eq!(
            AttestationReport::from_bytes(&resized),
            Err(ReportError::WrongSize(size))
        );
    }
}

#[test]
fn unknown_versions_are_refused() {
    for version in [0u32, 1, 4, 6, 0xffff_ffff] {
        let mut bytes = milan_a();
        bytes[..4].copy_from_slice(&version.to_le_bytes());
        assert_eq!(
            AttestationReport::from_bytes(&bytes),
            Err(ReportError::UnsupportedVersion(version))
        );
    }
}

#[test]
fn every_reserved_byte_is_checked() {
    let reserved: Vec<usize> = (0x4c..0x50)
        .chain(0x188..0x1a0)
        .chain([0x1eb, 0x1ef])
        .chain(0x1f8..0x2a0)
        .chain(0x330..0x4a0)
        .collect();
    for offset in reserved {
        let mut bytes = milan_a();
        bytes[offset] = 0x5a;
        assert!(
            AttestationReport::from_bytes(&bytes).is_err(),
            "nonzero byte at {offset:#x} was accepted"
        );
    }
}

#[test]
fn malformed_fields_are_refused() {
    let cases: [(usize, &[u8], &str); 7] = [
        (0x34, &[2, 0, 0, 0], "signature algorithm"),
        (0x30, &[4, 0, 0, 0], "VMPL"),
        (0x48, &[0x08, 0, 0, 0], "signing key 2"),
        (0x48, &[0x20, 0, 0, 0], "key_info reserved bit"),
        (0x0a, &[0x00], "policy bit 17 clear"),
        (0x0f, &[0x80], "undefined policy bit"),
        (0x2e8 + 50, &[1], "signature s past the scalar"),
    ];
    for (offset, value, what) in cases {
        let mut bytes = milan_a();
        bytes[offset..offset + value.len()].copy_from_slice(value);
        assert!(
            AttestationReport::from_bytes(&bytes).is_err(),
            "{what} was accepted"
        );
    }
}

#[test]
fn v3_reports_need_a_known_cpu() {
    let mut bytes = report_file("milan-v3-vlek.report.bin");
    bytes[0x188] = 0x17;
    assert_eq!(
        AttestationReport::from_bytes(&bytes),
        Err(ReportError::UnknownCpu {
            family: 0x17,
            model: 0x01
        })
    );
}

#[test]
fn writer_round_trips_a_real_report() {
    let original =
        AttestationReport::from_bytes(&report_file("milan-v3-vlek.report.bin")).expect("parses");
    let mut writer = ReportWriter::new(original.version, TcbLayout::Legacy);
    writer
        .guest(
            original.guest_svn,
            original.policy.raw(),
            &original.family_id,
            &original.image_id,
            original.vmpl,
        )
        .platform(original.platform_info.0, original.key_info)
        .contents(
            &original.report_data,
            &original.measurement,
            &original.host_data,
        )
        .identities(
            &original.id_key_digest,
            &original.author_key_digest,
            &original.report_id,
            &original.report_id_ma,
        )
        .chip_id(&original.chip_id)
        .firmware_versions(original.current_version, original.committed_version);
    writer
        .tcbs(
            &original.current_tcb,
            &original.reported_tcb,
            &original.committed_tcb,
            &original.launch_tcb,
        )
        .expect("legacy TCBs");
    if let Some(cpuid) = original.cpuid {
        writer.cpuid(cpuid);
    }
    let rebuilt = writer
        .finish(&original.signature.r, &original.signature.s)
        .expect("rebuilt report parses");
    assert_eq!(rebuilt, original);
}

#[test]
fn turin_v5_layout_parses() {
    let mut writer = ReportWriter::new(5, TcbLayout::Turin);
    let tcb = TcbVersion {
        fmc: Some(1),
        bootloader: 2,
        tee: 3,
        snp: 4,
        microcode: 5,
    };
    writer
        .guest(0, 0x30000, &[0; 16], &[0; 16], 0)
        .cpuid(Cpuid {
            family: 0x1a,
            model: 0x02,
            stepping: 1,
        });
    writer.tcbs(&tcb, &tcb, &tcb, &tcb).expect("turin TCBs");
    writer.mitigation_vectors(3, 7);
    let report = writer.finish(&[1], &[2]).expect("parses");
    assert_eq!(report.product(), Some(Product::Turin));
    assert_eq!(report.reported_tcb, tcb);
    assert_eq!(
        (report.launch_mit_vector, report.current_mit_vector),
        (Some(3), Some(7))
    );
}

#[test]
fn json_evidence_parses_to_the_same_layout() {
    let evidence = SnpEvidence::from_json(&report_file("genoa-v3-json.evidence.json"))
        .expect("evidence parses");
    assert_eq!(evidence.report.version, 3);
    assert_eq!(evidence.report.product(), Some(Product::Genoa));
    assert!(matches!(
        evidence.certificates.as_slice(),
        [EvidenceCertificate::Vcek(_)]
    ));
    let reparsed =
        AttestationReport::from_bytes(evidence.report.as_bytes()).expect("raw form parses");
    assert_eq!(reparsed, evidence.report);
}

#[test]
fn json_evidence_with_bad_fields_is_refused() {
    let text = String::from_utf8(report_file("genoa-v3-json.evidence.json")).expect("utf-8");
    let cases = [
        ("\"version\":3", "\"version\":4"),
        ("\"vmpl\":0", "\"vmpl\":9"),
        ("\"guest_svn\":0", "\"guest_svn\":0,\"extra\":1"),
        ("\"cpuid_step\":2", "\"cpuid_step\":null"),
        ("\"family_id\":[0,", "\"family_id\":["),
        ("\"cert_type\":\"VCEK\"", "\"cert_type\":\"VCEQ\""),
    ];
    for (from, to) in cases {
        assert!(text.contains(from), "fixture lacks {from}");
        let changed = text.replacen(from, to, 1);
        assert!(
            SnpEvidence::from_json(changed.as_bytes()).is_err(),
            "{to} was accepted"
        );
    }
    assert!(SnpEvidence::from_json(b"{}").is_err());
    assert!(SnpEvidence::from_json(b"not json").is_err());
}

#[test]
fn json_evidence_round_trips_every_real_report() {
    let genoa_text = report_file("genoa-v3-json.evidence.json");
    let genoa = SnpEvidence::from_json(&genoa_text).expect("parses");
    let original: serde_json::Value = serde_json::from_slice(&genoa_text).expect("json");
    assert!(
        genoa.to_json() == original,
        "the Trustee form must be reproduced field for field"
    );

    for name in ["milan-v2-a", "milan-v2-c", "milan-v3-vlek"] {
        let report = AttestationReport::from_bytes(&report_file(&format!("{name}.report.bin")))
            .expect("parses");
        let evidence = SnpEvidence {
            report,
            certificates: vec![EvidenceCertificate::Vcek(vec![1, 2, 3])],
        };
        let json = serde_json::to_vec(&evidence.to_json()).expect("serialises");
        let back = SnpEvidence::from_json(&json).expect("parses back");
        assert_eq!(back.report, evidence.report, "{name}");
        assert_eq!(back.certificates, evidence.certificates, "{name}");
    }
}
