//! The offline certificate cache: only what verifies gets in, lookups find
//! a report's key and CRL, and nothing is stored when one file is bad.

mod support;

use std::path::PathBuf;

use hsev_attestation::cache::CertCache;
use hsev_attestation::certs::RootOrigin;
use hsev_attestation::report::{
    AttestationReport, Cpuid, KeyInfo, ReportWriter, SigningKey, TcbVersion,
};
use hsev_attestation::{Product, TcbLayout};
use support::pki::TestRoots;

const TCB: TcbVersion = TcbVersion {
    fmc: None,
    bootloader: 1,
    tee: 2,
    snp: 3,
    microcode: 4,
};

fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write");
    path
}

fn report_for(chip_id: &[u8; 64], roots: &TestRoots) -> AttestationReport {
    let vcek = roots.vcek(chip_id, &TCB);
    let mut writer = ReportWriter::new(3, TcbLayout::Legacy);
    writer
        .guest(0, 0x30000, &[0; 16], &[0; 16], 0)
        .platform(
            0,
            KeyInfo {
                author_key_en: false,
                mask_chip_key: false,
                signing_key: SigningKey::Vcek,
            },
        )
        .chip_id(chip_id)
        .cpuid(Cpuid {
            family: 0x19,
            model: 0x01,
            stepping: 1,
        });
    writer.tcbs(&TCB, &TCB, &TCB, &TCB).expect("tcb");
    vcek.sign(writer)
}

#[test]
fn imports_finds_and_exports_keys_and_crls() {
    let roots = TestRoots::new(Product::Milan);
    let store = roots.store(RootOrigin::Simulated);
    let dir = tempfile::tempdir().expect("tempdir");
    let chip_id = [9u8; 64];
    let vcek = roots.vcek(&chip_id, &TCB);
    let files = vec![
        write(dir.path(), "vcek.der", &vcek.der()),
        write(
            dir.path(),
            "crl.der",
            &roots.crl(&[]).to_der().expect("der"),
        ),
        write(
            dir.path(),
            "vlek.pem",
            &roots.vlek(&TCB).certificate.to_pem().expect("pem"),
        ),
    ];
    let cache = CertCache::new(dir.path().join("cache"));
    let imported = cache.import(&store, &files).expect("imports");
    assert_eq!(imported.len(), 3);

    let report = report_for(&chip_id, &roots);
    let found = cache.find(&report, Some(Product::Milan)).expect("lookup");
    assert_eq!(found.keys.len(), 1);
    assert_eq!(found.keys[0].key.hw_id.as_deref(), Some(&chip_id[..]));
    assert!(found.crl.is_some(), "the product's CRL comes with the key");

    let other_chip = report_for(&[8u8; 64], &roots);
    assert!(cache
        .find(&other_chip, Some(Product::Milan))
        .expect("lookup")
        .keys
        .is_empty());

    let exported = dir.path().join("exported");
    let paths = cache
        .export(&exported, Some((&report, Some(Product::Milan))))
        .expect("exports");
    assert_eq!(paths.len(), 2, "the VCEK and its CRL: {paths:?}");
    let everything = cache
        .export(&dir.path().join("all"), None)
        .expect("exports");
    assert_eq!(
        everything.len(),
        4,
        "VCEK, VLEK and the CRL of both services: {everything:?}"
    );
}

#[test]
fn refuses_untrusted_files_and_stores_nothing() {
    let roots = TestRoots::new(Product::Genoa);
    let store = roots.store(RootOrigin::Simulated);
    let strangers = TestRoots::new(Product::Genoa);
    let dir = tempfile::tempdir().expect("tempdir");
    let good = write(dir.path(), "good.der", &roots.vcek(&[1; 64], &TCB).der());
    let cases = [
        ("stranger-vcek.der", strangers.vcek(&[1; 64], &TCB).der()),
        ("forged-crl.der", roots.forged_crl().to_der().expect("der")),
        ("stranger-ark.pem", strangers.ark.to_pem().expect("pem")),
        ("garbage.bin", b"not a certificate".to_vec()),
    ];
    for (name, bytes) in cases {
        let bad = write(dir.path(), name, &bytes);
        let cache = CertCache::new(dir.path().join(format!("cache-{name}")));
        let error = cache
            .import(&store, &[good.clone(), bad])
            .expect_err("must be refused");
        assert!(error.to_string().contains(name), "{name}: {error}");
        assert!(!cache.root().exists(), "{name}: nothing may be stored");
    }
}
