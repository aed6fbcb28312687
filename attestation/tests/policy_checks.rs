//! One test per appraisal check: each makes exactly that check fail, and
//! the verdict names it. Reports are signed by a private test PKI in AMD's
//! format (registered as a simulated root, allowed by these policies) where
//! the real vectors cannot show the case.

mod support;

use hsev_attestation::certs::{RevocationList, RootOrigin, TrustStore};
use hsev_attestation::policy::{AbiVersion, AppraisalPolicy, MinimumTcb};
use hsev_attestation::report::{
    AttestationReport, Cpuid, KeyInfo, ReportWriter, SigningKey, TcbVersion,
};
use hsev_attestation::verifier::{appraise, Appraisal};
use hsev_attestation::{HexBytes, Product, TcbLayout};
use support::pki::{TestEndorsement, TestRoots};
use support::PINNED;

const CHIP_ID: [u8; 64] = [0x42; 64];
const MEASUREMENT: [u8; 48] = [0x6d; 48];
const HOST_DATA: [u8; 32] = [0x4d; 32];
const REPORT_DATA: [u8; 64] = [0x52; 64];
const TCB: TcbVersion = TcbVersion {
    fmc: None,
    bootloader: 4,
    tee: 1,
    snp: 22,
    microcode: 213,
};

/// Knobs of a test report.
struct Shape {
    policy: u64,
    vmpl: u32,
    platform_info: u64,
    signing_key: SigningKey,
    guest_svn: u32,
    /// The ID block's keys (zero: launched without one).
    id_key_digest: [u8; 48],
    author_key_digest: [u8; 48],
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            policy: 0x30000 | 0x0137,
            vmpl: 0,
            platform_info: 0,
            signing_key: SigningKey::Vcek,
            guest_svn: 3,
            id_key_digest: [0; 48],
            author_key_digest: [0; 48],
        }
    }
}

fn writer(
    shape: &Shape,
    tcb: &TcbVersion,
    layout: TcbLayout,
    cpuid: Cpuid,
    version: u32,
) -> ReportWriter {
    let mut writer = ReportWriter::new(version, layout);
    writer
        .guest(
            shape.guest_svn,
            shape.policy,
            &[0; 16],
            &[0; 16],
            shape.vmpl,
        )
        .platform(
            shape.platform_info,
            KeyInfo {
                author_key_en: shape.author_key_digest != [0; 48],
                mask_chip_key: false,
                signing_key: shape.signing_key,
            },
        )
        .contents(&REPORT_DATA, &MEASUREMENT, &HOST_DATA)
        .identities(
            &shape.id_key_digest,
            &shape.author_key_digest,
            &[0; 32],
            &[0xff; 32],
        )
        .chip_id(&CHIP_ID)
        .cpuid(cpuid);
    writer
        .tcbs(tcb, tcb, tcb, tcb)
        .expect("TCBs fit the layout");
    writer
}

struct Fixture {
    roots: TestRoots,
    vcek: TestEndorsement,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| {
        let roots = TestRoots::new(Product::Genoa);
        let vcek = roots.vcek(&CHIP_ID, &TCB);
        Fixture { roots, vcek }
    })
}

fn genoa_report(shape: &Shape) -> AttestationReport {
    let cpuid = Cpuid {
        family: 0x19,
        model: 0x11,
        stepping: 1,
    };
    fixture()
        .vcek
        .sign(writer(shape, &TCB, TcbLayout::Legacy, cpuid, 3))
}

fn lenient() -> AppraisalPolicy {
    AppraisalPolicy {
        allow_simulated: true,
        ..AppraisalPolicy::default()
    }
}

fn judge(report: &AttestationReport, policy: &AppraisalPolicy) -> Appraisal {
    let fixture = fixture();
    let key = hsev_attestation::certs::EndorsementKey::parse(&fixture.vcek.der()).expect("parses");
    appraise(
        &fixture.roots.store(RootOrigin::Simulated),
        report,
        &key,
        None,
        None,
        policy,
        PINNED,
    )
}

fn failed(report: &AttestationReport, policy: &AppraisalPolicy) -> Vec<&'static str> {
    judge(report, policy)
        .failures()
        .map(|check| check.name)
        .collect()
}

#[test]
fn the_baseline_passes_every_check() {
    let appraisal = judge(&genoa_report(&Shape::default()), &lenient());
    assert!(appraisal.accepted(), "{:?}", appraisal.checks());
}

#[test]
fn simulated_evidence_is_refused_by_default() {
    let appraisal = judge(
        &genoa_report(&Shape::default()),
        &AppraisalPolicy::default(),
    );
    assert_eq!(
        appraisal
            .failures()
            .map(|check| check.name)
            .collect::<Vec<_>>(),
        vec!["simulated_evidence"]
    );
    let detail = &appraisal.check("simulated_evidence").expect("ran").detail;
    assert!(detail.contains("allow_simulated"), "{detail}");
}

#[test]
fn debug() {
    let report = genoa_report(&Shape {
        policy: 0x30000 | 1 << 19,
        ..Shape::default()
    });
    assert_eq!(failed(&report, &lenient()), vec!["debug"]);
    assert!(failed(
        &report,
        &AppraisalPolicy {
            allow_debug: true,
            ..lenient()
        }
    )
    .is_empty());
}

#[test]
fn migration_agent() {
    let report = genoa_report(&Shape {
        policy: 0x30000 | 1 << 18,
        ..Shape::default()
    });
    assert_eq!(failed(&report, &lenient()), vec!["migration_agent"]);
    assert!(failed(
        &report,
        &AppraisalPolicy {
            allow_migration_agent: true,
            ..lenient()
        }
    )
    .is_empty());
}

#[test]
fn single_socket() {
    let policy = AppraisalPolicy {
        require_single_socket: true,
        ..lenient()
    };
    assert_eq!(
        failed(&genoa_report(&Shape::default()), &policy),
        vec!["single_socket"]
    );
    let report = genoa_report(&Shape {
        policy: 0x30000 | 1 << 20,
        ..Shape::default()
    });
    assert!(failed(&report, &policy).is_empty());
}

#[test]
fn smt() {
    let policy = AppraisalPolicy {
        require_smt_disabled: true,
        ..lenient()
    };
    assert_eq!(
        failed(
            &genoa_report(&Shape {
                platform_info: 1,
                ..Shape::default()
            }),
            &policy
        ),
        vec!["smt"]
    );
    assert!(failed(&genoa_report(&Shape::default()), &policy).is_empty());
}

#[test]
fn minimum_abi() {
    // The baseline guest policy requires ABI 1.55.
    let report = genoa_report(&Shape {
        policy: 0x30000 | 0x0137,
        ..Shape::default()
    });
    let demanding = AppraisalPolicy {
        minimum_abi: Some(AbiVersion {
            major: 1,
            minor: 56,
        }),
        ..lenient()
    };
    assert_eq!(failed(&report, &demanding), vec!["minimum_abi"]);
    let met = AppraisalPolicy {
        minimum_abi: Some(AbiVersion {
            major: 1,
            minor: 55,
        }),
        ..lenient()
    };
    assert!(failed(&report, &met).is_empty());
}

#[test]
fn vmpl() {
    let report = genoa_report(&Shape {
        vmpl: 2,
        ..Shape::default()
    });
    assert_eq!(
        failed(
            &report,
            &AppraisalPolicy {
                allowed_vmpls: vec![0],
                ..lenient()
            }
        ),
        vec!["vmpl"]
    );
    assert!(failed(
        &report,
        &AppraisalPolicy {
            allowed_vmpls: vec![0, 2],
            ..lenient()
        }
    )
    .is_empty());
}

#[test]
fn measurement() {
    let report = genoa_report(&Shape::default());
    let other = AppraisalPolicy {
        allowed_measurements: vec![HexBytes([0; 48])],
        ..lenient()
    };
    let failures = judge(&report, &other);
    assert_eq!(
        failures
            .failures()
            .map(|check| check.name)
            .collect::<Vec<_>>(),
        vec!["measurement"]
    );
    let allowed = AppraisalPolicy {
        allowed_measurements: vec![HexBytes([0; 48]), HexBytes(MEASUREMENT)],
        ..lenient()
    };
    assert!(failed(&report, &allowed).is_empty());
}

#[test]
fn id_and_author_keys() {
    let (id_key, author_key) = ([0x1d; 48], [0xa0; 48]);
    let signed = genoa_report(&Shape {
        id_key_digest: id_key,
        author_key_digest: author_key,
        ..Shape::default()
    });
    let unsigned = genoa_report(&Shape::default());
    // "Whatever my ID key signed", with no measurement listed.
    let mine = AppraisalPolicy {
        allowed_id_key_digests: vec![HexBytes(id_key)],
        ..lenient()
    };
    assert!(failed(&signed, &mine).is_empty());
    assert_eq!(failed(&unsigned, &mine), vec!["id_key"]);
    let detail = judge(&unsigned, &mine)
        .failures()
        .map(|check| check.detail.clone())
        .collect::<Vec<_>>();
    assert_eq!(detail, vec!["the launch was signed by no ID key"]);
    let someone_elses = AppraisalPolicy {
        allowed_id_key_digests: vec![HexBytes([0x2e; 48])],
        ..lenient()
    };
    assert_eq!(failed(&signed, &someone_elses), vec!["id_key"]);
    let authored = AppraisalPolicy {
        allowed_author_key_digests: vec![HexBytes(author_key)],
        ..mine.clone()
    };
    assert!(failed(&signed, &authored).is_empty());
    let other_author = AppraisalPolicy {
        allowed_author_key_digests: vec![HexBytes([0x2e; 48])],
        ..mine
    };
    assert_eq!(failed(&signed, &other_author), vec!["author_key"]);
    // Without lists, ID blocks neither help nor hurt.
    assert!(failed(&signed, &lenient()).is_empty());
}

#[test]
fn minimum_tcb_per_component() {
    let report = genoa_report(&Shape::default());
    let floors = [
        (
            "minimum_tcb.bootloader",
            MinimumTcb {
                bootloader: Some(5),
                ..MinimumTcb::default()
            },
        ),
        (
            "minimum_tcb.tee",
            MinimumTcb {
                tee: Some(2),
                ..MinimumTcb::default()
            },
        ),
        (
            "minimum_tcb.snp",
            MinimumTcb {
                snp: Some(23),
                ..MinimumTcb::default()
            },
        ),
        (
            "minimum_tcb.microcode",
            MinimumTcb {
                microcode: Some(214),
                ..MinimumTcb::default()
            },
        ),
    ];
    for (name, minimum_tcb) in floors {
        assert_eq!(
            failed(
                &report,
                &AppraisalPolicy {
                    minimum_tcb,
                    ..lenient()
                }
            ),
            vec![name]
        );
    }
    let met = MinimumTcb {
        bootloader: Some(4),
        tee: Some(1),
        snp: Some(22),
        microcode: Some(213),
        fmc: Some(9),
    };
    assert!(
        failed(
            &report,
            &AppraisalPolicy {
                minimum_tcb: met,
                ..lenient()
            }
        )
        .is_empty(),
        "fmc floors bind Turin only"
    );
}

#[test]
fn every_failed_check_is_listed_not_only_the_first() {
    let report = genoa_report(&Shape {
        policy: 0x30000 | 1 << 19 | 1 << 18,
        vmpl: 3,
        ..Shape::default()
    });
    let policy = AppraisalPolicy {
        allowed_vmpls: vec![0],
        minimum_tcb: MinimumTcb {
            snp: Some(30),
            ..MinimumTcb::default()
        },
        host_data: Some(HexBytes([0; 32])),
        ..AppraisalPolicy::default()
    };
    let failures = failed(&report, &policy);
    for name in [
        "simulated_evidence",
        "minimum_tcb.snp",
        "debug",
        "migration_agent",
        "vmpl",
        "host_data",
    ] {
        assert!(failures.contains(&name), "{name} missing from {failures:?}");
    }
}

#[test]
fn report_data_host_data_chip_id_guest_svn_and_product() {
    let report = genoa_report(&Shape::default());
    let cases: [(&str, AppraisalPolicy, AppraisalPolicy); 5] = [
        (
            "report_data",
            AppraisalPolicy {
                report_data: Some(HexBytes([0; 64])),
                ..lenient()
            },
            AppraisalPolicy {
                report_data: Some(HexBytes(REPORT_DATA)),
                ..lenient()
            },
        ),
        (
            "host_data",
            AppraisalPolicy {
                host_data: Some(HexBytes([0; 32])),
                ..lenient()
            },
            AppraisalPolicy {
                host_data: Some(HexBytes(HOST_DATA)),
                ..lenient()
            },
        ),
        (
            "chip_id",
            AppraisalPolicy {
                allowed_chip_ids: vec![HexBytes([0; 64])],
                ..lenient()
            },
            AppraisalPolicy {
                allowed_chip_ids: vec![HexBytes(CHIP_ID)],
                ..lenient()
            },
        ),
        (
            "guest_svn",
            AppraisalPolicy {
                minimum_guest_svn: Some(4),
                ..lenient()
            },
            AppraisalPolicy {
                minimum_guest_svn: Some(3),
                ..lenient()
            },
        ),
        (
            "product",
            AppraisalPolicy {
                allowed_products: vec![Product::Milan],
                ..lenient()
            },
            AppraisalPolicy {
                allowed_products: vec![Product::Genoa],
                ..lenient()
            },
        ),
    ];
    for (name, refusing, accepting) in cases {
        assert_eq!(failed(&report, &refusing), vec![name]);
        assert!(failed(&report, &accepting).is_empty(), "{name}");
    }
}

#[test]
fn signing_keys() {
    let fixture = fixture();
    let vlek = fixture.roots.vlek(&TCB);
    let cpuid = Cpuid {
        family: 0x19,
        model: 0x11,
        stepping: 1,
    };
    let report = vlek.sign(writer(
        &Shape {
            signing_key: SigningKey::Vlek,
            ..Shape::default()
        },
        &TCB,
        TcbLayout::Legacy,
        cpuid,
        3,
    ));
    let key = hsev_attestation::certs::EndorsementKey::parse(&vlek.der()).expect("parses");
    let store = fixture.roots.store(RootOrigin::Simulated);
    let judge_vlek = |policy: &AppraisalPolicy| -> Vec<&'static str> {
        appraise(&store, &report, &key, None, None, policy, PINNED)
            .failures()
            .map(|check| check.name)
            .collect()
    };
    assert!(judge_vlek(&lenient()).is_empty());
    let vcek_only = AppraisalPolicy {
        allowed_signing_keys: vec![hsev_attestation::certs::EndorsementKind::Vcek],
        ..lenient()
    };
    assert_eq!(judge_vlek(&vcek_only), vec!["allowed_signing_key"]);

    // A report whose key_info names the VLEK, checked with the VCEK.
    let mislabelled = fixture.vcek.sign(writer(
        &Shape {
            signing_key: SigningKey::Vlek,
            ..Shape::default()
        },
        &TCB,
        TcbLayout::Legacy,
        cpuid,
        3,
    ));
    assert_eq!(failed(&mislabelled, &lenient()), vec!["signing_key"]);
}

#[test]
fn tcb_binding_and_chip_binding() {
    let fixture = fixture();
    let cpuid = Cpuid {
        family: 0x19,
        model: 0x11,
        stepping: 1,
    };
    let newer = TcbVersion { snp: 23, ..TCB };
    let report = fixture.vcek.sign(writer(
        &Shape::default(),
        &newer,
        TcbLayout::Legacy,
        cpuid,
        3,
    ));
    assert_eq!(failed(&report, &lenient()), vec!["tcb_binding"]);

    let other_chip = fixture.roots.vcek(&[7; 64], &TCB);
    let report = other_chip.sign(writer(&Shape::default(), &TCB, TcbLayout::Legacy, cpuid, 3));
    let key = hsev_attestation::certs::EndorsementKey::parse(&other_chip.der()).expect("parses");
    let appraisal = appraise(
        &fixture.roots.store(RootOrigin::Simulated),
        &report,
        &key,
        None,
        None,
        &lenient(),
        PINNED,
    );
    assert_eq!(
        appraisal
            .failures()
            .map(|check| check.name)
            .collect::<Vec<_>>(),
        vec!["chip_id_binding"]
    );
}

#[test]
fn turin_v5_reports_bind_fmc_and_an_eight_byte_chip_id() {
    let roots = TestRoots::new(Product::Turin);
    let tcb = TcbVersion {
        fmc: Some(2),
        ..TCB
    };
    let vcek = roots.vcek(&CHIP_ID, &tcb);
    let cpuid = Cpuid {
        family: 0x1a,
        model: 0x02,
        stepping: 0,
    };
    let mut report_writer = writer(&Shape::default(), &tcb, TcbLayout::Turin, cpuid, 5);
    report_writer.mitigation_vectors(1, 1);
    let report = vcek.sign(report_writer);
    let key = hsev_attestation::certs::EndorsementKey::parse(&vcek.der()).expect("parses");
    let store = roots.store(RootOrigin::Simulated);
    let judge_turin = |policy: &AppraisalPolicy| -> Vec<&'static str> {
        appraise(&store, &report, &key, None, None, policy, PINNED)
            .failures()
            .map(|check| check.name)
            .collect()
    };
    assert!(judge_turin(&lenient()).is_empty());
    let fmc_floor = AppraisalPolicy {
        minimum_tcb: MinimumTcb {
            fmc: Some(3),
            ..MinimumTcb::default()
        },
        ..lenient()
    };
    assert_eq!(judge_turin(&fmc_floor), vec!["minimum_tcb.fmc"]);

    // Only the first 8 bytes of the chip id are bound on Turin.
    let mut other_tail = CHIP_ID;
    other_tail[8..].fill(0);
    let mut tail_writer = writer(&Shape::default(), &tcb, TcbLayout::Turin, cpuid, 5);
    tail_writer.chip_id(&other_tail);
    let tail_report = vcek.sign(tail_writer);
    assert!(appraise(&store, &tail_report, &key, None, None, &lenient(), PINNED).accepted());
}

#[test]
fn crls_revoke_and_must_be_signed_by_the_ark() {
    let fixture = fixture();
    let report = genoa_report(&Shape::default());
    let key = hsev_attestation::certs::EndorsementKey::parse(&fixture.vcek.der()).expect("parses");
    let store: TrustStore = fixture.roots.store(RootOrigin::Simulated);
    let with_crl = |crl: &openssl::x509::X509Crl| {
        let crl = RevocationList::parse(&crl.to_der().expect("der")).expect("parses");
        appraise(&store, &report, &key, None, Some(&crl), &lenient(), PINNED)
    };
    assert!(with_crl(&fixture.roots.crl(&[])).accepted());

    let revoked = with_crl(&fixture.roots.crl(&[&fixture.roots.ask]));
    let chain = revoked.check("certificate_chain").expect("ran");
    assert!(
        !chain.passed && chain.detail.contains("ASK is revoked"),
        "{}",
        chain.detail
    );

    let forged = with_crl(&fixture.roots.forged_crl());
    let chain = forged.check("certificate_chain").expect("ran");
    assert!(
        !chain.passed && chain.detail.contains("CRL is not signed"),
        "{}",
        chain.detail
    );
}

#[test]
fn a_chain_to_unknown_roots_is_refused() {
    let report = genoa_report(&Shape::default());
    let key =
        hsev_attestation::certs::EndorsementKey::parse(&fixture().vcek.der()).expect("parses");
    let strangers = TestRoots::new(Product::Genoa).store(RootOrigin::Simulated);
    for store in [TrustStore::amd(), strangers] {
        let appraisal = appraise(&store, &report, &key, None, None, &lenient(), PINNED);
        assert_eq!(
            appraisal
                .failures()
                .map(|check| check.name)
                .collect::<Vec<_>>(),
            vec!["certificate_chain", "signature"]
        );
    }
}
