//! `make image` (images/build.sh) writes a manifest whose every artifact
//! has its sha256, and whose expected SNP launch measurements are exactly
//! what sev-snp-measure computes for the same firmware, kernel, initrd and
//! command line; the kernel-hashes page it writes is the one sev-snp-measure
//! measures.
//!
//! Each test builds into a temporary folder; the pinned inputs and the
//! firmware come from the cache under .tools/images (a cold cache builds the
//! firmware first: about 3 minutes).

use std::path::{Path, PathBuf};
use std::process::Command;

use hsev_e2e::{binary, run, sev_snp_measure, workspace_root};

/// Runs images/build.sh into a fresh folder, with `env` on top.
fn build_image(env: &[(&str, &str)]) -> (tempfile::TempDir, serde_json::Value) {
    let out = tempfile::tempdir().expect("tempdir");
    let status = Command::new("bash")
        .arg(workspace_root().join("images/build.sh"))
        .env("IMAGE_OUT", out.path())
        .env("HSEV", binary("hsev"))
        .envs(env.iter().copied())
        .status()
        .expect("images/build.sh runs");
    assert!(status.success(), "images/build.sh failed");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.path().join("manifest.json")).expect("manifest written"),
    )
    .expect("manifest is JSON");
    (out, manifest)
}

fn sha256(path: &Path) -> String {
    let output = run(Path::new("sha256sum"), [path]);
    assert!(output.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_owned()
}

fn artifact(out: &Path, manifest: &serde_json::Value, name: &str) -> PathBuf {
    let path = out.join(
        manifest[name]["path"]
            .as_str()
            .unwrap_or_else(|| panic!("manifest has {name}.path")),
    );
    assert_eq!(
        manifest[name]["sha256"].as_str(),
        Some(sha256(&path).as_str()),
        "{name}: {}",
        path.display()
    );
    path
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn the_manifest_matches_the_reference_measurements() {
    let (out, manifest) = build_image(&[("VCPU_COUNTS", "1 3")]);
    let firmware = artifact(out.path(), &manifest, "firmware");
    let kernel = artifact(out.path(), &manifest, "kernel");
    let initrd = artifact(out.path(), &manifest, "initrd");
    let page = artifact(out.path(), &manifest, "sev_hashes");
    let cmdline = manifest["cmdline"].as_str().expect("manifest has cmdline");
    assert_eq!(manifest["firmware"]["kernel_hashes"], true);

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
                utf8(&firmware),
                "--kernel",
                utf8(&kernel),
                "--initrd",
                utf8(&initrd),
                "--append",
                cmdline,
            ],
        );
        assert!(
            reference.status.success(),
            "sev-snp-measure: {}",
            String::from_utf8_lossy(&reference.stderr)
        );
        let expected = String::from_utf8_lossy(&reference.stdout).trim().to_owned();
        assert_eq!(
            manifest["expected_measurements"]["snp"]["by_vcpus"][vcpus].as_str(),
            Some(expected.as_str()),
            "{vcpus} vCPUs"
        );
    }

    // The page handed to QEMU is the one sev-snp-measure puts in the launch
    // digest (its SevHashes.construct_page), at the table's offset.
    let python = sev_snp_measure()
        .parent()
        .expect("venv bin folder")
        .join("python");
    let table_gpa = manifest["sev_hashes"]["table_gpa"]
        .as_str()
        .expect("table_gpa");
    let page_gpa = manifest["sev_hashes"]["gpa"].as_str().expect("gpa");
    let parse = |hex: &str| u64::from_str_radix(hex.trim_start_matches("0x"), 16).expect("hex");
    let offset = parse(table_gpa) - parse(page_gpa);
    let script = format!(
        "import sys\nfrom sevsnpmeasure.sev_hashes import SevHashes\n\
         page = SevHashes(sys.argv[1], sys.argv[2], sys.argv[3]).construct_page({offset})\n\
         sys.exit(0 if page == open(sys.argv[4], 'rb').read() else 1)\n"
    );
    let same = run(
        &python,
        [
            "-c",
            script.as_str(),
            utf8(&kernel),
            utf8(&initrd),
            cmdline,
            utf8(&page),
        ],
    );
    assert!(
        same.status.success(),
        "boot/sev-hashes.page is not sev-snp-measure's page: {}",
        String::from_utf8_lossy(&same.stderr)
    );
}

#[test]
fn extra_binaries_bring_their_shared_libraries() {
    // /usr/bin/env is dynamically linked: it must come with libc and the
    // loader, at the paths ldd names.
    let (out, manifest) = build_image(&[
        ("VCPU_COUNTS", "1"),
        ("EXTRA_BINARIES", "/usr/bin/env:/hsev/run"),
    ]);
    let initrd = artifact(out.path(), &manifest, "initrd");
    let listing = Command::new("bash")
        .arg("-c")
        .arg("gzip -dc \"$1\" | cpio --quiet -t")
        .arg("bash")
        .arg(&initrd)
        .output()
        .expect("cpio lists the initrd");
    assert!(listing.status.success());
    let listing = String::from_utf8_lossy(&listing.stdout);
    // Entry names, whichever way cpio prints them ("x" or "./x").
    let names: Vec<&str> = listing
        .lines()
        .map(|line| line.trim_start_matches("./"))
        .collect();
    let has = |path: &str| names.contains(&path);
    for path in [
        "init",
        "bin/busybox",
        "hsev/run",
        "lib/modules/hsev-load-order",
        "lib64/ld-linux-x86-64.so.2",
    ] {
        assert!(has(path), "{path} is not in the initrd:\n{listing}");
    }
    assert!(
        names.iter().any(|name| name.ends_with("/libc.so.6")),
        "libc is not in the initrd:\n{listing}"
    );
    assert!(
        names.iter().any(|name| name.ends_with("/sev-guest.ko")),
        "the sev-guest module is not in the initrd"
    );
    assert_eq!(
        manifest["initrd"]["extra_binaries"][0].as_str(),
        Some("/usr/bin/env:/hsev/run")
    );
}
