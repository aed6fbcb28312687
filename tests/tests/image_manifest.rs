//! `make image` writes a manifest whose expected measurements are exactly
//! what sev-snp-measure computes for the same firmware.

use std::process::Command;

use hsev_e2e::{binary, run, sev_snp_measure, workspace_root};

#[test]
fn the_manifest_matches_the_reference_measurements() {
    let out = tempfile::tempdir().expect("tempdir");
    let status = Command::new("bash")
        .arg(workspace_root().join("images/build.sh"))
        .env("IMAGE_OUT", out.path())
        .env("HSEV", binary("hsev"))
        .env("VCPU_COUNTS", "1 3")
        .status()
        .expect("images/build.sh runs");
    assert!(status.success(), "images/build.sh failed");

    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.path().join("manifest.json")).expect("manifest written"),
    )
    .expect("manifest is JSON");
    let firmware = out.path().join(
        manifest["firmware"]["path"]
            .as_str()
            .expect("firmware path"),
    );
    let bytes = std::fs::read(&firmware).expect("firmware copied");
    let sha256 = run(std::path::Path::new("sha256sum"), [&firmware]);
    let sha256 = String::from_utf8_lossy(&sha256.stdout);
    assert_eq!(
        manifest["firmware"]["sha256"].as_str(),
        sha256.split_whitespace().next(),
        "{} bytes",
        bytes.len()
    );

    for vcpus in ["1", "3"] {
        let reference = run(
            &sev_snp_measure(),
            [
                "--mode",
                "snp",
                "--vcpus",
                vcpus,
                "--vcpu-type",
                "EPYC-v4",
                "--ovmf",
                firmware.to_str().expect("utf-8"),
            ],
        );
        assert!(reference.status.success());
        let expected = String::from_utf8_lossy(&reference.stdout).trim().to_owned();
        assert_eq!(
            manifest["expected_measurements"]["snp"]["by_vcpus"][vcpus].as_str(),
            Some(expected.as_str()),
            "{vcpus} vCPUs"
        );
    }
}
