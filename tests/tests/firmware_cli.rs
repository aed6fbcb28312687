//! `hsev firmware` as an operator runs it: a simulated platform is created,
//! launches a guest over real artifacts, and its reports pass
//! `hsev attest verify` only where simulated evidence is allowed.

use std::path::Path;
use std::sync::OnceLock;

use hsev_e2e::firmware_blob::{kernel_and_initrd, SyntheticFirmware};
use hsev_e2e::{hsev, run, sev_snp_measure};

const REPORT_DATA: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";
const DEBIAN_OVMF: &str = "/usr/share/ovmf/OVMF.fd";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn path(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// One platform initialised through the CLI, as an operator would (RSA-4096
/// roots), shared by the tests that only read it.
fn platform() -> &'static Path {
    static PLATFORM: OnceLock<tempfile::TempDir> = OnceLock::new();
    PLATFORM
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let output = hsev([
                "firmware",
                "sim",
                "init",
                "--dir",
                path(&dir.path().join("sp")),
                "--product",
                "genoa",
                "--asids",
                "8",
            ]);
            assert!(output.status.success(), "{}", text(&output.stderr));
            dir
        })
        .path()
}

#[test]
fn status_shows_a_simulated_platform() {
    let output = hsev([
        "firmware",
        "status",
        "--sim-dir",
        path(&platform().join("sp")),
        "--output",
        "json",
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(status["simulated"], true);
    assert_eq!(status["product"], "genoa");
    assert_eq!(status["asids"]["sev_es_snp_pool"], 8);
    assert_eq!(status["chip_id"].as_str().map(str::len), Some(128));
    let text_output = hsev([
        "firmware",
        "status",
        "--sim-dir",
        path(&platform().join("sp")),
    ]);
    assert!(
        text(&text_output.stdout).starts_with("SIMULATED AMD Secure Processor: no confidentiality")
    );
}

#[test]
fn without_dev_sev_status_says_so() {
    if Path::new("/dev/sev").exists() {
        println!("skipped: this host has /dev/sev");
        return;
    }
    let output = hsev(["firmware", "status"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("/dev/sev") && text(&output.stderr).contains("--sim-dir"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn a_simulated_report_verifies_only_when_simulated_evidence_is_allowed() {
    let work = tempfile::tempdir().expect("tempdir");
    let blob = work.path().join("ovmf.fd");
    std::fs::write(&blob, SyntheticFirmware::ovmf().build()).expect("write");
    let (kernel, initrd) = kernel_and_initrd();
    let (kernel_path, initrd_path) = (work.path().join("vmlinuz"), work.path().join("initrd"));
    std::fs::write(&kernel_path, kernel).expect("write");
    std::fs::write(&initrd_path, initrd).expect("write");
    let report = work.path().join("report.bin");
    let certs = work.path().join("certs");
    let output = hsev([
        "firmware",
        "sim",
        "report",
        "--dir",
        path(&platform().join("sp")),
        "--report-data",
        REPORT_DATA,
        "--ovmf",
        path(&blob),
        "--kernel",
        path(&kernel_path),
        "--initrd",
        path(&initrd_path),
        "--append",
        "console=ttyS0",
        "--vcpus",
        "2",
        "--vcpu-type",
        "EPYC-Genoa",
        "--host-data",
        &"42".repeat(32),
        "--out",
        path(&report),
        "--certs-out",
        path(&certs),
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));

    let reference = run(
        &sev_snp_measure(),
        [
            "--mode",
            "snp",
            "--vcpus",
            "2",
            "--vcpu-type",
            "EPYC-Genoa",
            "--ovmf",
            path(&blob),
            "--kernel",
            path(&kernel_path),
            "--initrd",
            path(&initrd_path),
            "--append",
            "console=ttyS0",
        ],
    );
    let shown = hsev([
        "attest",
        "show",
        "--report",
        path(&report),
        "--output",
        "json",
    ]);
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("JSON");
    assert_eq!(
        shown["measurement"].as_str(),
        Some(text(&reference.stdout).trim()),
        "the report carries sev-snp-measure's digest"
    );
    assert_eq!(shown["report_data"], REPORT_DATA);
    assert_eq!(shown["host_data"], "42".repeat(32));

    let verify = |extra: &[&str]| {
        let mut args = vec!["attest", "verify", "--report", path(&report), "--vcek"];
        let vcek = certs.join("vcek.der");
        let roots = certs.join("sim_roots.pem");
        args.push(path(&vcek));
        args.extend(["--sim-root", path(&roots)]);
        args.extend(extra);
        let owned: Vec<String> = args.into_iter().map(str::to_owned).collect();
        hsev(owned)
    };
    let refused = verify(&[]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused.stdout));
    assert!(
        text(&refused.stdout).contains("REFUSED: simulated_evidence"),
        "{}",
        text(&refused.stdout)
    );
    let policy = work.path().join("dev.toml");
    std::fs::write(&policy, "allow_simulated = true\n").expect("write");
    let accepted = verify(&["--policy", path(&policy)]);
    assert_eq!(
        accepted.status.code(),
        Some(0),
        "{}",
        text(&accepted.stdout)
    );

    // The folder --certs-out wrote is a certificate folder --cert-dir takes.
    let from_folder = |extra: &[&str]| {
        let mut args = vec![
            "attest",
            "verify",
            "--report",
            path(&report),
            "--cert-dir",
            path(&certs),
            "--policy",
            path(&policy),
        ];
        args.extend(extra);
        hsev(args)
    };
    let sim_roots = certs.join("sim_roots.pem");
    let round_trip = from_folder(&["--sim-root", path(&sim_roots)]);
    assert_eq!(
        round_trip.status.code(),
        Some(0),
        "{}{}",
        text(&round_trip.stdout),
        text(&round_trip.stderr)
    );
    // The folder's roots are not trusted for being there: that is said.
    let untrusted = from_folder(&[]);
    assert_eq!(
        untrusted.status.code(),
        Some(1),
        "{}",
        text(&untrusted.stderr)
    );
    assert!(text(&untrusted.stdout).contains("FAIL certificate_chain"));
    assert!(
        text(&untrusted.stderr).contains(&format!("--sim-root {}", sim_roots.display())),
        "{}",
        text(&untrusted.stderr)
    );

    // Without its roots, the chain is unknown whatever the policy.
    let unknown = hsev([
        "attest",
        "verify",
        "--report",
        path(&report),
        "--vcek",
        path(&certs.join("vcek.der")),
        "--policy",
        path(&policy),
    ]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        text(&unknown.stdout).contains("FAIL certificate_chain"),
        "{}",
        text(&unknown.stdout)
    );
}

#[test]
fn the_debian_ovmf_launch_digest_matches_sev_snp_measure() {
    let work = tempfile::tempdir().expect("tempdir");
    let report = work.path().join("report.bin");
    let output = hsev([
        "firmware",
        "sim",
        "report",
        "--dir",
        path(&platform().join("sp")),
        "--report-data",
        REPORT_DATA,
        "--ovmf",
        DEBIAN_OVMF,
        "--vcpus",
        "4",
        "--vcpu-type",
        "EPYC-v4",
        "--out",
        path(&report),
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let reference = run(
        &sev_snp_measure(),
        [
            "--mode",
            "snp",
            "--vcpus",
            "4",
            "--vcpu-type",
            "EPYC-v4",
            "--ovmf",
            DEBIAN_OVMF,
        ],
    );
    let reference = text(&reference.stdout);
    assert!(
        text(&output.stdout).contains(&format!("launch digest: {}", reference.trim())),
        "{}",
        text(&output.stdout)
    );
}

#[test]
fn a_tcb_change_rotates_the_vcek() {
    let work = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(work.path().join("sp")).expect("mkdir");
    for entry in std::fs::read_dir(platform().join("sp"))
        .expect("platform")
        .flatten()
    {
        if entry.path().is_file() {
            std::fs::copy(entry.path(), work.path().join("sp").join(entry.file_name()))
                .expect("copy");
        }
    }
    let sp = work.path().join("sp");
    let report_with = |name: &str| {
        let report = work.path().join(format!("{name}.bin"));
        let certs = work.path().join(name);
        let output = hsev([
            "firmware",
            "sim",
            "report",
            "--dir",
            path(&sp),
            "--report-data",
            REPORT_DATA,
            "--measurement",
            &"ab".repeat(48),
            "--out",
            path(&report),
            "--certs-out",
            path(&certs),
        ]);
        assert!(output.status.success(), "{}", text(&output.stderr));
        (report, certs)
    };
    let (old_report, old_certs) = report_with("old");
    let upgrade = hsev([
        "firmware",
        "sim",
        "init",
        "--dir",
        path(&sp),
        "--tcb",
        "bl=10,tee=0,snp=24,ucode=25",
    ]);
    assert!(upgrade.status.success(), "{}", text(&upgrade.stderr));
    let (new_report, new_certs) = report_with("new");
    assert_ne!(
        std::fs::read(old_certs.join("vcek.der")).expect("old"),
        std::fs::read(new_certs.join("vcek.der")).expect("new")
    );

    let policy = work.path().join("floor.toml");
    std::fs::write(&policy, "allow_simulated = true\n[minimum_tcb]\nsnp = 24\n").expect("write");
    let verify = |report: &Path, certs: &Path| {
        hsev([
            "attest",
            "verify",
            "--report",
            path(report),
            "--vcek",
            path(&certs.join("vcek.der")),
            "--sim-root",
            path(&certs.join("sim_roots.pem")),
            "--policy",
            path(&policy),
        ])
    };
    assert_eq!(verify(&new_report, &new_certs).status.code(), Some(0));
    let old = verify(&old_report, &old_certs);
    assert_eq!(old.status.code(), Some(1));
    assert!(
        text(&old.stdout).contains("REFUSED: minimum_tcb.snp"),
        "{}",
        text(&old.stdout)
    );
}

#[test]
fn bad_arguments_exit_two_naming_the_problem() {
    let sp = platform().join("sp");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "firmware",
                "sim",
                "init",
                "--dir",
                path(&sp),
                "--tcb",
                "bl=1,tee=2",
            ],
            "snp",
        ),
        (
            vec![
                "firmware",
                "sim",
                "init",
                "--dir",
                path(&sp),
                "--tcb",
                "bl=1,tee=2,snp=3,ucode=999",
            ],
            "ucode",
        ),
        (
            vec![
                "firmware",
                "sim",
                "init",
                "--dir",
                path(&sp),
                "--product",
                "turin",
            ],
            "cannot become turin",
        ),
        (
            vec![
                "firmware",
                "sim",
                "report",
                "--dir",
                path(&sp),
                "--report-data",
                "00",
                "--measurement",
                &"00",
            ],
            "128 hex digits",
        ),
        (
            vec!["firmware", "status", "--sim-dir", "/nonexistent"],
            "sim init",
        ),
    ];
    for (args, expected) in cases {
        let output = hsev(args.clone());
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(
            text(&output.stderr).contains(expected),
            "{args:?}: expected {expected:?} in {}",
            text(&output.stderr)
        );
    }
}
