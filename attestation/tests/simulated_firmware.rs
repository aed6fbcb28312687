//! The simulated AMD Secure Processor: launch digests over exact bytes,
//! ASIDs, TCB and VCEK rotation, reports the verifier accepts only where
//! simulated evidence is allowed, ID blocks, derived keys, persistence.

mod support;

use std::path::Path;
use std::sync::Arc;

use hsev_attestation::certs::{parse_certificate_table, EndorsementKey, TrustStore};
use hsev_attestation::firmware::launcher::{launch_snp_guest, GuestArtifacts};
use hsev_attestation::firmware::simulated::{SimInit, SimulatedFirmware};
use hsev_attestation::firmware::{
    DerivedKeyRequest, FirmwareError, GuestRequest, GuestResponse, LaunchFinish, LaunchedGuest,
    PageUpdate, RootKey, SevFirmware, SnpLaunch,
};
use hsev_attestation::id_block::{public_key_digest, IdBlock, SignedIdBlock};
use hsev_attestation::measurement::{self, vcpu_sig_for_type, DirectBoot, OvmfImage, VmmType};
use hsev_attestation::policy::{AppraisalPolicy, MinimumTcb};
use hsev_attestation::report::{AttestationReport, EvidenceCertificate, TcbVersion};
use hsev_attestation::verifier::{appraise, Appraisal};
use hsev_attestation::Product;
use hsev_e2e::firmware_blob::{kernel_and_initrd, SyntheticFirmware};

const POLICY: u64 = 0x30000;
const DEBIAN_OVMF: &str = "/usr/share/ovmf/OVMF.fd";

fn debian_ovmf() -> Vec<u8> {
    std::fs::read(DEBIAN_OVMF)
        .unwrap_or_else(|error| panic!("{DEBIAN_OVMF} ({error}): run `make deps`"))
}

fn epyc_v4() -> u64 {
    u64::from(vcpu_sig_for_type("EPYC-v4").expect("known vCPU type"))
}

/// A fresh platform in its own folder (RSA-2048 roots to keep tests quick;
/// `hsev firmware sim init` makes RSA-4096 ones).
fn platform(product: Product, asids: u32) -> (tempfile::TempDir, Arc<SimulatedFirmware>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = SimInit {
        product: Some(product),
        tcb: None,
        asids: Some(asids),
        rsa_bits: Some(2048),
    };
    let firmware = SimulatedFirmware::init(dir.path(), &options).expect("platform initialises");
    (dir, Arc::new(firmware))
}

fn launch(
    firmware: &Arc<SimulatedFirmware>,
    artifacts: &GuestArtifacts<'_>,
) -> Result<LaunchedGuest, FirmwareError> {
    let finish = LaunchFinish {
        id_block: None,
        host_data: [0x11; 32],
    };
    launch_snp_guest(
        Arc::clone(firmware) as Arc<dyn SevFirmware>,
        artifacts,
        POLICY,
        &finish,
    )
}

fn sev_snp_measure(args: &[&str]) -> String {
    let output = hsev_e2e::run(&hsev_e2e::sev_snp_measure(), args);
    assert!(
        output.status.success(),
        "sev-snp-measure {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn extended_report(guest: &LaunchedGuest, report_data: [u8; 64]) -> (AttestationReport, Vec<u8>) {
    match guest
        .request(&GuestRequest::ExtendedReport {
            report_data,
            vmpl: 0,
        })
        .expect("report")
    {
        GuestResponse::ExtendedReport {
            report,
            certificates,
        } => {
            let vcek = parse_certificate_table(&certificates)
                .expect("table parses")
                .into_iter()
                .find_map(|certificate| match certificate {
                    EvidenceCertificate::Vcek(der) => Some(der),
                    _ => None,
                })
                .expect("the table carries the VCEK");
            (
                AttestationReport::from_bytes(&report).expect("report parses"),
                vcek,
            )
        }
        other => panic!("unexpected response {other:?}"),
    }
}

fn judge(
    firmware: &SimulatedFirmware,
    report: &AttestationReport,
    vcek: &[u8],
    policy: &AppraisalPolicy,
) -> Appraisal {
    let store = TrustStore::amd().with_anchor(firmware.roots().anchor().expect("anchor"));
    let key = EndorsementKey::parse(vcek).expect("VCEK parses");
    appraise(
        &store,
        report,
        &key,
        None,
        None,
        policy,
        time::OffsetDateTime::now_utc(),
    )
}

fn failures(appraisal: &Appraisal) -> Vec<&'static str> {
    appraisal.failures().map(|check| check.name).collect()
}

#[test]
fn status_reports_the_identity_and_free_asids() {
    let (_dir, firmware) = platform(Product::Turin, 3);
    let status = firmware.status().expect("status");
    assert!(status.simulated && status.snp_enabled);
    assert_eq!(status.product, Some(Product::Turin));
    assert_eq!(status.asids.sev_es_snp_pool, 3);
    assert_eq!(status.asids.free, 3);
    assert_eq!(
        status.chip_id.as_ref().map(Vec::len),
        Some(8),
        "Turin chip ids have 8 significant bytes"
    );
    assert!(status.reported_tcb.fmc.is_some());
}

#[test]
fn the_launch_digest_of_debian_ovmf_equals_the_calculators() {
    let (_dir, firmware) = platform(Product::Genoa, 4);
    let ovmf = debian_ovmf();
    for vcpus in [1usize, 4] {
        let artifacts = GuestArtifacts {
            ovmf: &ovmf,
            direct_boot: None,
            vcpus,
            vcpu_sig: epyc_v4(),
            guest_features: 1,
        };
        let guest = launch(&firmware, &artifacts).expect("launch");
        let reference = sev_snp_measure(&[
            "--mode",
            "snp",
            "--vcpus",
            &vcpus.to_string(),
            "--vcpu-type",
            "EPYC-v4",
            "--ovmf",
            DEBIAN_OVMF,
        ]);
        assert_eq!(
            hex::encode(guest.launch_digest()),
            reference,
            "{vcpus} vCPUs"
        );
        let image = OvmfImage::parse(&ovmf).expect("parses");
        let calculated = measurement::snp_launch_digest(&measurement::SnpLaunch {
            ovmf: &image,
            vcpus,
            vcpu_sig: epyc_v4(),
            guest_features: 1,
            vmm: VmmType::Qemu,
            direct_boot: None,
            ovmf_hash: None,
        })
        .expect("calculates");
        assert_eq!(guest.launch_digest(), calculated.launch_digest);
    }
}

#[test]
fn the_launch_digest_with_kernel_hashes_equals_sev_snp_measure() {
    let (_dir, firmware) = platform(Product::Milan, 4);
    let blob = SyntheticFirmware::ovmf().build();
    let (kernel, initrd) = kernel_and_initrd();
    let files = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, bytes: &[u8]| {
        let path = files.path().join(name);
        std::fs::write(&path, bytes).expect("write");
        path.display().to_string()
    };
    let (ovmf_path, kernel_path, initrd_path) = (
        write("ovmf.fd", &blob),
        write("vmlinuz", &kernel),
        write("initrd", &initrd),
    );
    let append = "console=ttyS0 hsev.vm=42";
    let artifacts = GuestArtifacts {
        ovmf: &blob,
        direct_boot: Some(DirectBoot {
            kernel: &kernel,
            initrd: Some(&initrd),
            append: Some(append),
        }),
        vcpus: 2,
        vcpu_sig: epyc_v4(),
        guest_features: 1,
    };
    let guest = launch(&firmware, &artifacts).expect("launch");
    let reference = sev_snp_measure(&[
        "--mode",
        "snp",
        "--vcpus",
        "2",
        "--vcpu-type",
        "EPYC-v4",
        "--ovmf",
        &ovmf_path,
        "--kernel",
        &kernel_path,
        "--initrd",
        &initrd_path,
        "--append",
        append,
    ]);
    assert_eq!(hex::encode(guest.launch_digest()), reference);
}

#[test]
fn changing_one_byte_of_any_artifact_changes_the_digest() {
    let (_dir, firmware) = platform(Product::Genoa, 2);
    let blob = SyntheticFirmware::ovmf().build();
    let (kernel, initrd) = kernel_and_initrd();
    let append = "console=ttyS0";
    let digest = |ovmf: &[u8], kernel: &[u8], initrd: &[u8], append: &str| {
        let artifacts = GuestArtifacts {
            ovmf,
            direct_boot: Some(DirectBoot {
                kernel,
                initrd: Some(initrd),
                append: Some(append),
            }),
            vcpus: 1,
            vcpu_sig: epyc_v4(),
            guest_features: 1,
        };
        launch(&firmware, &artifacts)
            .expect("launch")
            .launch_digest()
    };
    let original = digest(&blob, &kernel, &initrd, append);
    assert_eq!(
        original,
        digest(&blob, &kernel, &initrd, append),
        "the digest is deterministic"
    );
    let flip = |bytes: &[u8], at: usize| {
        let mut changed = bytes.to_vec();
        changed[at] ^= 0x01;
        changed
    };
    for at in [0, 4096 * 7 + 3, blob.len() / 2] {
        assert_ne!(
            digest(&flip(&blob, at), &kernel, &initrd, append),
            original,
            "firmware byte {at}"
        );
    }
    for at in [0, kernel.len() - 1] {
        assert_ne!(
            digest(&blob, &flip(&kernel, at), &initrd, append),
            original,
            "kernel byte {at}"
        );
    }
    for at in [0, initrd.len() / 2] {
        assert_ne!(
            digest(&blob, &kernel, &flip(&initrd, at), append),
            original,
            "initrd byte {at}"
        );
    }
    assert_ne!(
        digest(&blob, &kernel, &initrd, "console=ttyS1"),
        original,
        "command line"
    );
}

#[test]
fn reports_verify_only_where_simulated_evidence_is_allowed() {
    let (_dir, firmware) = platform(Product::Genoa, 2);
    let ovmf = debian_ovmf();
    let artifacts = GuestArtifacts {
        ovmf: &ovmf,
        direct_boot: None,
        vcpus: 1,
        vcpu_sig: epyc_v4(),
        guest_features: 1,
    };
    let guest = launch(&firmware, &artifacts).expect("launch");
    let (report, vcek) = extended_report(&guest, [0x5a; 64]);
    assert_eq!(report.version, 3);
    assert_eq!(report.measurement, guest.launch_digest());
    assert_eq!(report.report_data, [0x5a; 64]);
    assert_eq!(report.host_data, [0x11; 32]);

    let refused = judge(&firmware, &report, &vcek, &AppraisalPolicy::default());
    assert_eq!(failures(&refused), vec!["simulated_evidence"]);
    let allowed = AppraisalPolicy {
        allow_simulated: true,
        ..AppraisalPolicy::default()
    };
    assert!(judge(&firmware, &report, &vcek, &allowed).accepted());

    // AMD's roots alone never vouch for a simulated chain.
    let key = EndorsementKey::parse(&vcek).expect("parses");
    let amd_only = appraise(
        &TrustStore::amd(),
        &report,
        &key,
        None,
        None,
        &allowed,
        time::OffsetDateTime::now_utc(),
    );
    assert!(failures(&amd_only).contains(&"certificate_chain"));
}

#[test]
fn turin_reports_use_version_5() {
    let (_dir, firmware) = platform(Product::Turin, 1);
    let guest =
        SimulatedFirmware::launch_with_digest(&firmware, POLICY, [7; 48], &LaunchFinish::default())
            .expect("launch");
    let (report, vcek) = extended_report(&guest, [1; 64]);
    assert_eq!(report.version, 5);
    assert_eq!(report.measurement, [7; 48]);
    let allowed = AppraisalPolicy {
        allow_simulated: true,
        ..AppraisalPolicy::default()
    };
    assert!(judge(&firmware, &report, &vcek, &allowed).accepted());
}

#[test]
fn a_tcb_change_rotates_the_vcek_and_a_floor_refuses_old_reports() {
    let (dir, firmware) = platform(Product::Genoa, 2);
    let old_guest =
        SimulatedFirmware::launch_with_digest(&firmware, POLICY, [3; 48], &LaunchFinish::default())
            .expect("launch");
    let (old_report, old_vcek) = extended_report(&old_guest, [2; 64]);
    drop(old_guest);

    let old_tcb = firmware.config().tcb;
    let new_tcb = TcbVersion {
        snp: old_tcb.snp + 1,
        ..old_tcb
    };
    let upgraded = Arc::new(
        SimulatedFirmware::init(
            dir.path(),
            &SimInit {
                tcb: Some(new_tcb),
                ..SimInit::default()
            },
        )
        .expect("TCB update"),
    );
    assert_ne!(
        upgraded.vcek_der(),
        firmware.vcek_der(),
        "a new TCB means a new VCEK"
    );
    let new_guest =
        SimulatedFirmware::launch_with_digest(&upgraded, POLICY, [3; 48], &LaunchFinish::default())
            .expect("launch");
    let (new_report, new_vcek) = extended_report(&new_guest, [2; 64]);
    assert_eq!(new_report.reported_tcb, new_tcb);

    let floor = AppraisalPolicy {
        allow_simulated: true,
        minimum_tcb: MinimumTcb {
            snp: Some(new_tcb.snp),
            ..MinimumTcb::default()
        },
        ..AppraisalPolicy::default()
    };
    assert!(judge(&upgraded, &new_report, &new_vcek, &floor).accepted());
    assert_eq!(
        failures(&judge(&upgraded, &old_report, &old_vcek, &floor)),
        vec!["minimum_tcb.snp"]
    );
    // The old report with the new VCEK: neither signature nor TCB binding hold.
    let mixed = failures(&judge(&upgraded, &old_report, &new_vcek, &floor));
    assert!(
        mixed.contains(&"signature") && mixed.contains(&"tcb_binding"),
        "{mixed:?}"
    );
}

#[test]
fn asid_exhaustion_fails_the_next_launch_and_teardown_frees_one() {
    let (_dir, firmware) = platform(Product::Milan, 2);
    let first =
        SimulatedFirmware::launch_with_digest(&firmware, POLICY, [1; 48], &LaunchFinish::default())
            .expect("first");
    let _second =
        SimulatedFirmware::launch_with_digest(&firmware, POLICY, [2; 48], &LaunchFinish::default())
            .expect("second");
    assert_eq!(firmware.status().expect("status").asids.free, 0);
    let error =
        SimulatedFirmware::launch_with_digest(&firmware, POLICY, [3; 48], &LaunchFinish::default())
            .expect_err("exhausted");
    assert!(matches!(error, FirmwareError::NoFreeAsid(2)), "{error}");
    assert!(error.to_string().contains("no free ASID"), "{error}");
    drop(first);
    assert_eq!(firmware.status().expect("status").asids.free, 1);
    let _third =
        SimulatedFirmware::launch_with_digest(&firmware, POLICY, [3; 48], &LaunchFinish::default())
            .expect("an ASID was freed");

    let shared: Arc<dyn SevFirmware> = Arc::clone(&firmware) as Arc<dyn SevFirmware>;
    assert!(
        SnpLaunch::start(Arc::clone(&shared), POLICY).is_err(),
        "both ASIDs are taken again"
    );
}

#[test]
fn launches_survive_a_restart_and_are_adopted() {
    let (dir, firmware) = platform(Product::Genoa, 2);
    let guest = SimulatedFirmware::launch_with_digest(
        &firmware,
        POLICY,
        [9; 48],
        &LaunchFinish {
            id_block: None,
            host_data: [4; 32],
        },
    )
    .expect("launch");
    let id = guest.id();
    // The process "dies": the guest object is forgotten, not decommissioned.
    std::mem::forget(guest);
    drop(firmware);

    let restarted = Arc::new(SimulatedFirmware::open(dir.path()).expect("reopens"));
    assert_eq!(
        restarted.status().expect("status").asids.free,
        1,
        "the running VM keeps its ASID"
    );
    let adopted = SimulatedFirmware::adopt(&restarted, id).expect("adopts");
    assert_eq!(adopted.launch_digest(), [9; 48]);
    let (report, _) = extended_report(&adopted, [0; 64]);
    assert_eq!(report.host_data, [4; 32]);
    drop(adopted);
    assert_eq!(restarted.status().expect("status").asids.free, 2);
    assert!(
        SimulatedFirmware::adopt(&restarted, id).is_err(),
        "a decommissioned launch is gone"
    );
}

#[test]
fn the_firmware_enforces_launch_rules() {
    let (_dir, firmware) = platform(Product::Genoa, 4);
    let shared: Arc<dyn SevFirmware> = Arc::clone(&firmware) as Arc<dyn SevFirmware>;
    for (policy, expected) in [
        (0x10000u64, "bit 17"),
        (0x30000 | 1 << 40, "undefined"),
        (0x30000 | 0x0201, "ABI 2.1"),
    ] {
        let error = SnpLaunch::start(Arc::clone(&shared), policy).expect_err("refused");
        assert!(error.to_string().contains(expected), "{policy:#x}: {error}");
    }
    let page = [0u8; 4096];
    let mut launch = SnpLaunch::start(Arc::clone(&shared), POLICY).expect("starts");
    launch
        .update(PageUpdate::Normal {
            gpa: 0x1000,
            data: &page,
        })
        .expect("first add");
    let twice = launch
        .update(PageUpdate::Normal {
            gpa: 0x1000,
            data: &page,
        })
        .expect_err("twice");
    assert!(twice.to_string().contains("already added"), "{twice}");
    assert!(
        launch
            .update(PageUpdate::Zero {
                gpa: 0x2001,
                length: 4096
            })
            .is_err(),
        "unaligned"
    );
    assert!(
        launch
            .update(PageUpdate::Normal {
                gpa: 0x3000,
                data: &page[..100]
            })
            .is_err(),
        "partial page"
    );
    assert!(
        launch
            .update(PageUpdate::Zero {
                gpa: u64::MAX - 4095,
                length: 8192
            })
            .is_err(),
        "overflow"
    );
}

fn p384_key() -> openssl::ec::EcKey<openssl::pkey::Private> {
    let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::SECP384R1).expect("P-384");
    openssl::ec::EcKey::generate(&group).expect("key")
}

fn id_block(launch_digest: [u8; 48], policy: u64) -> IdBlock {
    IdBlock {
        launch_digest,
        family_id: [0xfa; 16],
        image_id: [0x1d; 16],
        guest_svn: 5,
        policy,
    }
}

#[test]
fn id_blocks_pin_the_launch() {
    let (_dir, firmware) = platform(Product::Genoa, 4);
    let ovmf = debian_ovmf();
    let artifacts = GuestArtifacts {
        ovmf: &ovmf,
        direct_boot: None,
        vcpus: 1,
        vcpu_sig: epyc_v4(),
        guest_features: 1,
    };
    let expected = launch(&firmware, &artifacts)
        .expect("launch")
        .launch_digest();
    let shared = || Arc::clone(&firmware) as Arc<dyn SevFirmware>;
    let finish_with = |signed: SignedIdBlock| LaunchFinish {
        id_block: Some(signed),
        host_data: [0; 32],
    };
    let (id_key, author_key) = (p384_key(), p384_key());

    // Signed by the ID key, the ID key signed by the author key.
    let signed =
        SignedIdBlock::sign(id_block(expected, POLICY), &id_key, Some(&author_key)).expect("signs");
    let guest = launch_snp_guest(shared(), &artifacts, POLICY, &finish_with(signed))
        .expect("the ID block matches");
    let (report, _) = extended_report(&guest, [0; 64]);
    assert_eq!(
        (report.family_id, report.image_id, report.guest_svn),
        ([0xfa; 16], [0x1d; 16], 5)
    );
    assert_eq!(
        report.id_key_digest,
        public_key_digest(&id_key).expect("digest")
    );
    assert_eq!(
        report.author_key_digest,
        public_key_digest(&author_key).expect("digest")
    );
    assert!(report.key_info.author_key_en, "AUTHOR_KEY_EN is reported");
    drop(guest);

    // The ID key alone: no author key digest, AUTHOR_KEY_EN clear.
    let alone = SignedIdBlock::sign(id_block(expected, POLICY), &id_key, None).expect("signs");
    let guest =
        launch_snp_guest(shared(), &artifacts, POLICY, &finish_with(alone)).expect("matches");
    let (report, _) = extended_report(&guest, [0; 64]);
    assert_eq!(report.author_key_digest, [0; 48]);
    assert!(!report.key_info.author_key_en);
    drop(guest);

    let refusal = |signed: SignedIdBlock| {
        launch_snp_guest(shared(), &artifacts, POLICY, &finish_with(signed))
            .expect_err("refused")
            .to_string()
    };
    let wrong_digest =
        SignedIdBlock::sign(id_block([0; 48], POLICY), &id_key, None).expect("signs");
    assert!(refusal(wrong_digest).contains("BAD_MEASUREMENT"));
    let wrong_policy =
        SignedIdBlock::sign(id_block(expected, POLICY | 1 << 20), &id_key, None).expect("signs");
    assert!(refusal(wrong_policy).contains("POLICY_FAILURE"));
    let signed = SignedIdBlock::sign(id_block(expected, POLICY), &id_key, None).expect("signs");
    let mut forged = signed.block;
    forged.image_id = [0; 16];
    let forged =
        SignedIdBlock::from_bytes(&forged.to_bytes(), signed.auth_bytes()).expect("parses");
    assert!(refusal(forged).contains("BAD_SIGNATURE"));
    assert_eq!(
        firmware.status().expect("status").asids.free,
        4,
        "refused launches hold no ASID (and the finished ones were torn down)"
    );
}

#[test]
fn derived_keys_are_bound_to_the_selected_fields() {
    let (_dir, firmware) = platform(Product::Genoa, 4);
    let key = |guest: &LaunchedGuest, select: u64| match guest
        .request(&GuestRequest::DerivedKey(DerivedKeyRequest {
            root_key: RootKey::Vcek,
            guest_field_select: select,
            vmpl: 0,
            guest_svn: 0,
            tcb_version: 0,
        }))
        .expect("key")
    {
        GuestResponse::DerivedKey(key) => key,
        other => panic!("unexpected {other:?}"),
    };
    let a =
        SimulatedFirmware::launch_with_digest(&firmware, POLICY, [1; 48], &LaunchFinish::default())
            .expect("a");
    let b =
        SimulatedFirmware::launch_with_digest(&firmware, POLICY, [2; 48], &LaunchFinish::default())
            .expect("b");
    let measurement_bit = 1 << 3;
    assert_eq!(
        key(&a, measurement_bit),
        key(&a, measurement_bit),
        "deterministic"
    );
    assert_ne!(
        key(&a, measurement_bit),
        key(&b, measurement_bit),
        "bound to the measurement"
    );
    assert_eq!(
        key(&a, 0),
        key(&b, 0),
        "no field selected: the same chip key"
    );
    let bad = a.request(&GuestRequest::DerivedKey(DerivedKeyRequest {
        root_key: RootKey::Vmrk,
        guest_field_select: 1 << 6,
        vmpl: 0,
        guest_svn: 0,
        tcb_version: 0,
    }));
    assert!(matches!(bad, Err(FirmwareError::BadRequest(_))));
    let too_high = a.request(&GuestRequest::Report {
        report_data: [0; 64],
        vmpl: 4,
    });
    assert!(matches!(too_high, Err(FirmwareError::BadRequest(_))));
}

#[test]
fn the_state_folder_keeps_secrets_private() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, _firmware) = platform(Product::Milan, 1);
    for secret in ["secret.bin", "ark.key.pem", "ask.key.pem"] {
        let mode = std::fs::metadata(dir.path().join(secret))
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{secret} is readable by others: {mode:o}");
    }
    let config = std::fs::read_to_string(dir.path().join("platform.toml")).expect("config");
    assert!(config.contains("NO confidentiality"), "{config}");
    assert!(SimulatedFirmware::open(Path::new("/nonexistent/sim")).is_err());
    let error = SimulatedFirmware::init(
        dir.path(),
        &SimInit {
            product: Some(Product::Turin),
            ..SimInit::default()
        },
    )
    .expect_err("product is fixed");
    assert!(error.to_string().contains("cannot become turin"), "{error}");
}
