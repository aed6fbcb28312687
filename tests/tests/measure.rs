//! `hsev measure` against the reference it ports, sev-snp-measure 0.0.13:
//! both real tools run side by side on the same inputs and must print the
//! same measurement, or both fail.
//!
//! Inputs: Debian's `/usr/share/ovmf/OVMF.fd` (`make deps` installs it),
//! which carries SEV metadata but neither an `SNP_KERNEL_HASHES` section nor
//! a usable SEV hashes table; and firmware images built here, carrying the
//! OVMF footer table with SEV metadata (`SNP_SEC_MEM`, `SNP_SECRETS`,
//! `CPUID`, `SNP_KERNEL_HASHES`, `SVSM_CAA`) and an SEV hashes table entry,
//! so that direct kernel boot and Coconut-SVSM launches are measured too.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use hsev_e2e::firmware_blob::{kernel_and_initrd, SyntheticFirmware};
use hsev_e2e::{binary, sev_snp_measure, workspace_root};

const DEBIAN_OVMF: &str = "/usr/share/ovmf/OVMF.fd";
/// Debian's 4 MiB OVMF build: an OVMF footer table without SEV metadata.
const DEBIAN_OVMF_CODE_4M: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";

const VCPU_COUNTS: [&str; 5] = ["1", "2", "4", "16", "64"];
const VCPU_TYPES: [&str; 4] = ["EPYC", "EPYC-v4", "EPYC-Milan", "EPYC-Genoa"];
/// Every vCPU type sev-snp-measure 0.0.13 knows.
const ALL_VCPU_TYPES: [&str; 16] = [
    "EPYC",
    "EPYC-v1",
    "EPYC-v2",
    "EPYC-IBPB",
    "EPYC-v3",
    "EPYC-v4",
    "EPYC-Rome",
    "EPYC-Rome-v1",
    "EPYC-Rome-v2",
    "EPYC-Rome-v3",
    "EPYC-Milan",
    "EPYC-Milan-v1",
    "EPYC-Milan-v2",
    "EPYC-Genoa",
    "EPYC-Genoa-v1",
    "EPYC-Turin",
];

// ---------------------------------------------------------------------------
// Running both tools

/// The `hsev` binary, rebuilt first so that the test never measures a stale
/// build (`cargo build --bin hsev` in the test's own profile).
fn hsev_binary() -> &'static Path {
    static HSEV: OnceLock<PathBuf> = OnceLock::new();
    HSEV.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .current_dir(workspace_root())
            .args(["build", "--quiet", "--bin", "hsev"]);
        let test_exe = std::env::current_exe().expect("the test executable has a path");
        if test_exe.components().any(|c| c.as_os_str() == "release") {
            build.arg("--release");
        }
        let output = build.output().expect("cannot run cargo to build hsev");
        assert!(
            output.status.success(),
            "`cargo build --bin hsev` failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        binary("hsev")
    })
}

fn run_in(program: &Path, args: &[String], dir: Option<&Path>) -> Output {
    let mut command = Command::new(program);
    command.args(args);
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", program.display()))
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|arg| (*arg).to_string()).collect()
}

/// `hsev measure ARGS` and `sev-snp-measure ARGS`, optionally run in `dirs`.
fn run_both_in(args: &[String], dirs: Option<(&Path, &Path)>) -> (Output, Output) {
    let mut hsev_args = vec!["measure".to_string()];
    hsev_args.extend_from_slice(args);
    let ours = run_in(hsev_binary(), &hsev_args, dirs.map(|d| d.0));
    let theirs = run_in(&sev_snp_measure(), args, dirs.map(|d| d.1));
    (ours, theirs)
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Both tools succeed and print the same thing; returns that output.
fn assert_same(args: &[String]) -> String {
    assert_same_in(args, None)
}

fn assert_same_in(args: &[String], dirs: Option<(&Path, &Path)>) -> String {
    let (ours, theirs) = run_both_in(args, dirs);
    assert!(
        theirs.status.success(),
        "sev-snp-measure {args:?} failed: {}",
        describe(&theirs)
    );
    assert!(
        ours.status.success(),
        "hsev measure {args:?} failed where sev-snp-measure succeeded: {}",
        describe(&ours)
    );
    let ours = String::from_utf8_lossy(&ours.stdout).into_owned();
    let theirs = String::from_utf8_lossy(&theirs.stdout).into_owned();
    assert_eq!(
        ours, theirs,
        "hsev measure {args:?} differs from sev-snp-measure"
    );
    assert!(!ours.trim().is_empty());
    ours
}

/// Both tools fail, with the same exit code (2 for usage errors, 1 for
/// failed calculations); returns hsev's stderr.
fn assert_both_fail(args: &[String]) -> String {
    let (ours, theirs) = run_both_in(args, None);
    assert!(
        !theirs.status.success(),
        "sev-snp-measure {args:?} unexpectedly succeeded: {}",
        describe(&theirs)
    );
    assert!(
        !ours.status.success(),
        "hsev measure {args:?} succeeded where sev-snp-measure failed: {}",
        describe(&ours)
    );
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "exit codes differ for {args:?}:\nhsev: {}\nsev-snp-measure: {}",
        describe(&ours),
        describe(&theirs)
    );
    assert!(
        ours.stdout.is_empty(),
        "hsev printed a measurement on failure"
    );
    String::from_utf8_lossy(&ours.stderr).into_owned()
}

fn debian_ovmf() -> String {
    assert!(
        Path::new(DEBIAN_OVMF).is_file(),
        "{DEBIAN_OVMF} is missing: install Debian's ovmf package (`make deps`)"
    );
    DEBIAN_OVMF.to_string()
}

fn with_ovmf(ovmf: &str, args: &[&str]) -> Vec<String> {
    let mut all = owned(args);
    all.extend(["--ovmf".to_string(), ovmf.to_string()]);
    all
}

// ---------------------------------------------------------------------------
// Synthetic firmware

/// Generated inputs in a temporary folder.
struct Inputs {
    dir: tempfile::TempDir,
}

impl Inputs {
    fn new() -> Self {
        Inputs {
            dir: tempfile::tempdir().expect("a temporary folder"),
        }
    }

    fn file(&self, name: &str, contents: &[u8]) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).expect("writable temporary folder");
        path.to_str().expect("UTF-8 temporary path").to_string()
    }

    fn firmware(&self, name: &str, firmware: &SyntheticFirmware) -> String {
        self.file(name, &firmware.build())
    }

    /// A small "kernel" and "initrd".
    fn kernel_and_initrd(&self) -> (String, String) {
        let (kernel, initrd) = kernel_and_initrd();
        (
            self.file("vmlinuz", &kernel),
            self.file("initrd.img", &initrd),
        )
    }
}

// ---------------------------------------------------------------------------
// Debian's OVMF.fd

#[test]
fn snp_vcpu_counts_and_types() {
    let ovmf = debian_ovmf();
    for vcpus in VCPU_COUNTS {
        for vcpu_type in VCPU_TYPES {
            assert_same(&with_ovmf(
                &ovmf,
                &["--mode", "snp", "--vcpus", vcpus, "--vcpu-type", vcpu_type],
            ));
        }
    }
    // Python's range() of zero or a negative count: no VMSA at all.
    for vcpus in ["0", "-3"] {
        assert_same(&with_ovmf(
            &ovmf,
            &["--mode", "snp", "--vcpus", vcpus, "--vcpu-type", "EPYC"],
        ));
    }
}

#[test]
fn snp_every_known_vcpu_type() {
    let ovmf = debian_ovmf();
    let mut seen = std::collections::HashSet::new();
    for vcpu_type in ALL_VCPU_TYPES {
        let out = assert_same(&with_ovmf(
            &ovmf,
            &["--mode", "snp", "--vcpus", "2", "--vcpu-type", vcpu_type],
        ));
        seen.insert(out);
    }
    // EPYC*, Rome, Milan, Genoa, Turin: five signatures.
    assert_eq!(seen.len(), 5);
}

#[test]
fn seves_and_sev() {
    let ovmf = debian_ovmf();
    for vcpus in VCPU_COUNTS {
        for vcpu_type in VCPU_TYPES {
            assert_same(&with_ovmf(
                &ovmf,
                &[
                    "--mode",
                    "seves",
                    "--vcpus",
                    vcpus,
                    "--vcpu-type",
                    vcpu_type,
                ],
            ));
        }
    }
    assert_same(&with_ovmf(&ovmf, &["--mode", "sev"]));
    // vCPU flags are ignored in SEV mode.
    assert_same(&with_ovmf(
        &ovmf,
        &["--mode", "sev", "--vcpus", "4", "--vcpu-family", "23"],
    ));
    assert_same(&with_ovmf(
        &ovmf,
        &["--mode", "sev", "-v", "--output-format", "base64"],
    ));
}

#[test]
fn vmm_types() {
    let ovmf = debian_ovmf();
    for mode in ["snp", "seves"] {
        for vmm in ["QEMU", "ec2", "gce"] {
            for vcpus in ["1", "4"] {
                assert_same(&with_ovmf(
                    &ovmf,
                    &[
                        "--mode",
                        mode,
                        "--vcpus",
                        vcpus,
                        "--vcpu-type",
                        "EPYC-Milan",
                        "--vmm-type",
                        vmm,
                    ],
                ));
            }
        }
        // EC2 and GCE need no vCPU signature.
        for vmm in ["ec2", "gce"] {
            assert_same(&with_ovmf(
                &ovmf,
                &["--mode", mode, "--vcpus", "2", "--vmm-type", vmm],
            ));
        }
    }
}

#[test]
fn guest_features_and_output() {
    let ovmf = debian_ovmf();
    for features in [
        "0x1",
        "0x0",
        "0x21",
        "1",
        "0b100001",
        "0x3f",
        "0xFFFFFFFFFFFFFFFF",
        "-1",
    ] {
        assert_same(&with_ovmf(
            &ovmf,
            &[
                "--mode",
                "snp",
                "--vcpus",
                "2",
                "--vcpu-type",
                "EPYC-v4",
                "--guest-features",
                features,
            ],
        ));
    }
    for extra in [
        &["--output-format", "base64"][..],
        &["-v"],
        &["--verbose", "--output-format", "base64"],
        &["--output-format", "hex", "-v"],
    ] {
        let mut args = vec!["--mode", "snp", "--vcpus", "4", "--vcpu-type", "EPYC-v4"];
        args.extend_from_slice(extra);
        assert_same(&with_ovmf(&ovmf, &args));
        args[1] = "seves";
        assert_same(&with_ovmf(&ovmf, &args));
    }
    let out = assert_same(&with_ovmf(
        &ovmf,
        &[
            "-v",
            "--mode",
            "seves",
            "--vcpus",
            "1",
            "--vcpu-type",
            "EPYC",
        ],
    ));
    assert!(
        out.starts_with("Calculated SEV_ES guest measurement: "),
        "{out}"
    );
}

#[test]
fn argparse_conventions() {
    let ovmf = debian_ovmf();
    // Unambiguous prefixes of long flags, `--flag=value`, repeated flags
    // (the last wins).
    assert_same(&owned(&[
        "--mod",
        "snp",
        "--vcpus=4",
        "--vcpu-t",
        "EPYC-Milan",
        "--ovm",
        &ovmf,
    ]));
    assert_same(&owned(&[
        "--mode",
        "sev",
        "--mode",
        "snp",
        "--vcpus",
        "1",
        "--vcpus",
        "2",
        "--vcpu-type",
        "EPYC",
        "--ovmf",
        &ovmf,
    ]));
    // An ambiguous prefix is a usage error.
    assert_both_fail(&with_ovmf(
        &ovmf,
        &["--mode", "snp", "--vcpu", "2", "--vcpu-type", "EPYC"],
    ));
}

#[test]
fn vcpu_signature_flags() {
    let ovmf = debian_ovmf();
    for (family, model, stepping) in [
        ("23", "1", "2"),
        ("25", "17", "0"),
        ("26", "0", "0"),
        ("25", "1", "1"),
        ("6", "94", "3"),
    ] {
        assert_same(&with_ovmf(
            &ovmf,
            &[
                "--mode",
                "snp",
                "--vcpus",
                "4",
                "--vcpu-family",
                family,
                "--vcpu-model",
                model,
                "--vcpu-stepping",
                stepping,
            ],
        ));
    }
    for sig in ["0x800f12", "8392466", "0xa10f10", "0b1000", "0o17"] {
        assert_same(&with_ovmf(
            &ovmf,
            &["--mode", "snp", "--vcpus", "2", "--vcpu-sig", sig],
        ));
    }
    // The family wins over the signature, the signature over the type;
    // zero counts as unset and falls through.
    assert_same(&with_ovmf(
        &ovmf,
        &[
            "--mode",
            "snp",
            "--vcpus",
            "2",
            "--vcpu-type",
            "EPYC",
            "--vcpu-sig",
            "0xa00f11",
            "--vcpu-family",
            "25",
            "--vcpu-model",
            "17",
            "--vcpu-stepping",
            "0",
        ],
    ));
    assert_same(&with_ovmf(
        &ovmf,
        &[
            "--mode",
            "snp",
            "--vcpus",
            "2",
            "--vcpu-type",
            "EPYC",
            "--vcpu-sig",
            "0",
            "--vcpu-family",
            "0",
        ],
    ));
    assert_same(&with_ovmf(
        &ovmf,
        &["--mode", "seves", "--vcpus", "3", "--vcpu-sig", "0xa00f11"],
    ));
}

#[test]
fn ovmf_hash_and_seeding() {
    let ovmf = debian_ovmf();
    let hash = assert_same(&with_ovmf(&ovmf, &["--mode", "snp:ovmf-hash"]));
    let hash = hash.trim();
    assert_eq!(hash.len(), 96);
    // snp:ovmf-hash ignores the output format and the other flags.
    assert_same(&with_ovmf(
        &ovmf,
        &["--mode", "snp:ovmf-hash", "--output-format", "base64", "-v"],
    ));
    let full = assert_same(&with_ovmf(
        &ovmf,
        &["--mode", "snp", "--vcpus", "4", "--vcpu-type", "EPYC-v4"],
    ));
    let seeded = assert_same(&with_ovmf(
        &ovmf,
        &[
            "--mode",
            "snp",
            "--vcpus",
            "4",
            "--vcpu-type",
            "EPYC-v4",
            "--snp-ovmf-hash",
            hash,
        ],
    ));
    assert_eq!(full, seeded);
    // Any 48-byte seed works, whatever the firmware bytes.
    assert_same(&with_ovmf(
        &ovmf,
        &[
            "--mode",
            "snp",
            "--vcpus",
            "2",
            "--vcpu-type",
            "EPYC-Genoa",
            "--snp-ovmf-hash",
            &"5a".repeat(48),
        ],
    ));
}

#[test]
fn dump_vmsa_files_match() {
    let ovmf = debian_ovmf();
    for args in [
        &[
            "--mode",
            "snp",
            "--vcpus",
            "3",
            "--vcpu-type",
            "EPYC-Milan",
            "--dump-vmsa",
        ][..],
        &[
            "--mode",
            "seves",
            "--vcpus",
            "2",
            "--vcpu-type",
            "EPYC",
            "--vmm-type",
            "ec2",
            "--dump-vmsa",
        ],
    ] {
        let ours = tempfile::tempdir().expect("a temporary folder");
        let theirs = tempfile::tempdir().expect("a temporary folder");
        assert_same_in(&with_ovmf(&ovmf, args), Some((ours.path(), theirs.path())));
        let vcpus: usize = args[3].parse().expect("--vcpus N");
        for index in 0..vcpus {
            let name = format!("vmsa{index}.bin");
            let ours = std::fs::read(ours.path().join(&name)).expect("hsev wrote the VMSA");
            let theirs =
                std::fs::read(theirs.path().join(&name)).expect("sev-snp-measure wrote the VMSA");
            assert_eq!(ours.len(), 4096);
            assert!(ours == theirs, "{name} differs");
        }
        assert!(!ours.path().join(format!("vmsa{vcpus}.bin")).exists());
    }
}

#[test]
fn errors_on_debian_ovmf() {
    let ovmf = debian_ovmf();
    let inputs = Inputs::new();
    let (kernel, initrd) = inputs.kernel_and_initrd();
    let snp = ["--mode", "snp", "--vcpus", "2", "--vcpu-type", "EPYC-v4"];

    // No SNP_KERNEL_HASHES section: a computation error (exit 1).
    let mut args = with_ovmf(&ovmf, &snp);
    args.extend(owned(&["--kernel", &kernel]));
    let stderr = assert_both_fail(&args);
    assert!(stderr.contains("SNP_KERNEL_HASHES"), "{stderr}");
    // No SEV hashes table GPA: SEV and SEV-ES cannot measure a kernel.
    for mode in [
        &["--mode", "seves", "--vcpus", "2", "--vcpu-type", "EPYC"][..],
        &["--mode", "sev"],
    ] {
        let mut args = with_ovmf(&ovmf, mode);
        args.extend(owned(&["--kernel", &kernel]));
        let stderr = assert_both_fail(&args);
        assert!(stderr.contains("kernel/initrd/cmdline"), "{stderr}");
    }

    // Usage errors (exit 2).
    let mut args = with_ovmf(&ovmf, &snp);
    args.extend(owned(&["--initrd", &initrd]));
    assert!(assert_both_fail(&args).contains("--kernel required when using --initrd"));
    let mut args = with_ovmf(&ovmf, &snp);
    args.extend(owned(&["--append", "console=ttyS0"]));
    assert!(assert_both_fail(&args).contains("--kernel required when using --append"));
    assert!(
        assert_both_fail(&with_ovmf(&ovmf, &["--mode", "snp", "--vcpu-type", "EPYC"]))
            .contains("missing --vcpus N in guest mode 'snp'")
    );
    assert!(
        assert_both_fail(&with_ovmf(&ovmf, &["--mode", "seves", "--vcpus", "2"]))
            .contains("missing --vcpu-type or --vcpu-sig or --vcpu-family in guest mode 'seves'")
    );
    assert!(assert_both_fail(&with_ovmf(
        &ovmf,
        &["--mode", "snp", "--vcpus", "2", "--vmm-type", "qemu"]
    ))
    .contains("unknown VMM type 'qemu'"));
    assert!(assert_both_fail(&with_ovmf(
        &ovmf,
        &["--mode", "snp:svsm", "--vcpus", "2", "--vcpu-type", "EPYC"]
    ))
    .contains("snp:svsm mode requires --vars-size or --vars-file"));
    assert_both_fail(&with_ovmf(&ovmf, &["--mode", "sev", "--dump-vmsa"]));
    assert_both_fail(&with_ovmf(
        &ovmf,
        &["--mode", "snp", "--vcpus", "2", "--vcpu-type", "EPYC-v9"],
    ));
    assert_both_fail(&with_ovmf(&ovmf, &["--mode", "tdx", "--vcpus", "2"]));
    assert_both_fail(&with_ovmf(
        &ovmf,
        &["--mode", "snp", "--vcpus", "two", "--vcpu-type", "EPYC"],
    ));
    assert_both_fail(&with_ovmf(
        &ovmf,
        &["--mode", "snp", "--vcpus", "2", "--vcpu-sig", "010"],
    ));
    assert_both_fail(&with_ovmf(
        &ovmf,
        &[
            "--mode",
            "snp:svsm",
            "--vcpus",
            "2",
            "--vcpu-type",
            "EPYC",
            "--vars-size",
            "1",
            "--vars-file",
            "x",
        ],
    ));
    assert_both_fail(&owned(&[
        "--mode",
        "snp",
        "--vcpus",
        "2",
        "--vcpu-type",
        "EPYC",
    ]));

    // Failed calculations (exit 1).
    let hash = "00".repeat(48);
    assert!(assert_both_fail(&with_ovmf(
        &ovmf,
        &[
            "--mode",
            "seves",
            "--vcpus",
            "2",
            "--vcpu-type",
            "EPYC",
            "--snp-ovmf-hash",
            &hash
        ],
    ))
    .contains("SNP OVMF hash only works with SNP"));
    assert!(assert_both_fail(&with_ovmf(
        &ovmf,
        &[
            "--mode",
            "snp:svsm",
            "--vcpus",
            "2",
            "--vmm-type",
            "ec2",
            "--vars-size",
            "4096",
            "--svsm",
            &ovmf
        ],
    ))
    .contains("only implemented for QEMU"));
    assert_both_fail(&with_ovmf(
        &ovmf,
        &[
            "--mode",
            "snp",
            "--vcpus",
            "2",
            "--vcpu-type",
            "EPYC",
            "--snp-ovmf-hash",
            "abcd",
        ],
    ));
    assert_both_fail(&with_ovmf(
        &ovmf,
        &[
            "--mode",
            "snp",
            "--vcpus",
            "2",
            "--vcpu-type",
            "EPYC",
            "--snp-ovmf-hash",
            "xyz",
        ],
    ));
    assert_both_fail(&with_ovmf(
        &ovmf,
        &["--mode", "snp", "--vcpus", "2", "--vcpu-family", "23"],
    ));
    let missing = inputs.dir.path().join("missing.fd");
    let missing = missing.to_str().expect("UTF-8 temporary path");
    let stderr = assert_both_fail(&with_ovmf(missing, &["--mode", "sev"]));
    assert!(stderr.contains(missing), "{stderr}");
    let mut args = with_ovmf(&ovmf, &["--mode", "sev"]);
    args.extend(owned(&["--kernel", missing]));
    assert_both_fail(&args);
}

#[test]
fn firmware_without_sev_metadata() {
    // The deliberate divergence: sev-snp-measure prints a digest for SNP
    // launches of firmware without SEV metadata; hsev refuses.
    assert!(
        Path::new(DEBIAN_OVMF_CODE_4M).is_file(),
        "{DEBIAN_OVMF_CODE_4M} is missing: install Debian's ovmf package (`make deps`)"
    );
    for mode in [
        &["--mode", "snp", "--vcpus", "2", "--vcpu-type", "EPYC"][..],
        &["--mode", "snp:ovmf-hash"],
    ] {
        let (ours, theirs) = run_both_in(&with_ovmf(DEBIAN_OVMF_CODE_4M, mode), None);
        assert!(theirs.status.success(), "{}", describe(&theirs));
        assert_eq!(ours.status.code(), Some(1), "{}", describe(&ours));
        assert!(
            String::from_utf8_lossy(&ours.stderr).contains("no SEV metadata"),
            "{}",
            describe(&ours)
        );
    }
    // SEV and SEV-ES need no metadata: both tools agree.
    assert_same(&with_ovmf(DEBIAN_OVMF_CODE_4M, &["--mode", "sev"]));
    assert_same(&with_ovmf(
        DEBIAN_OVMF_CODE_4M,
        &["--mode", "seves", "--vcpus", "4", "--vcpu-type", "EPYC"],
    ));

    // Firmware with no footer table at all.
    let inputs = Inputs::new();
    let bare = inputs.file("bare.fd", &vec![0x5au8; 0x1_0000]);
    let (ours, theirs) = run_both_in(
        &with_ovmf(
            &bare,
            &["--mode", "snp", "--vcpus", "1", "--vcpu-type", "EPYC"],
        ),
        None,
    );
    // sev-snp-measure fails here too: no SEV-ES reset block for the VMSA.
    assert!(!theirs.status.success());
    assert_eq!(ours.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&ours.stderr).contains("no OVMF footer table"));
    assert_same(&with_ovmf(&bare, &["--mode", "sev"]));
}

// ---------------------------------------------------------------------------
// Synthetic firmware with kernel hashes, and SVSM

#[test]
fn direct_boot_on_synthetic_firmware() {
    let inputs = Inputs::new();
    let ovmf = inputs.firmware("ovmf-snp.fd", &SyntheticFirmware::ovmf());
    let (kernel, initrd) = inputs.kernel_and_initrd();
    let empty = inputs.file("empty", b"");
    let boots: [Vec<&str>; 5] = [
        vec![],
        vec!["--kernel", &kernel],
        vec!["--kernel", &kernel, "--initrd", &initrd],
        vec![
            "--kernel",
            &kernel,
            "--append",
            "console=ttyS0 root=/dev/vda1 quiet",
        ],
        vec![
            "--kernel",
            &kernel,
            "--initrd",
            &empty,
            "--append",
            "init=/bin/sh",
        ],
    ];
    let mut digests = std::collections::HashSet::new();
    for boot in &boots {
        for vcpus in ["1", "4"] {
            for vmm in ["QEMU", "ec2", "gce"] {
                let mut args = vec![
                    "--mode",
                    "snp",
                    "--vcpus",
                    vcpus,
                    "--vcpu-type",
                    "EPYC-Genoa",
                    "--vmm-type",
                    vmm,
                ];
                args.extend_from_slice(boot);
                digests.insert(assert_same(&with_ovmf(&ovmf, &args)));
            }
            let mut args = vec![
                "--mode",
                "seves",
                "--vcpus",
                vcpus,
                "--vcpu-type",
                "EPYC-Milan",
            ];
            args.extend_from_slice(boot);
            digests.insert(assert_same(&with_ovmf(&ovmf, &args)));
        }
        let mut args = vec!["--mode", "sev"];
        args.extend_from_slice(boot);
        digests.insert(assert_same(&with_ovmf(&ovmf, &args)));
    }
    // Every combination measures differently.
    assert_eq!(digests.len(), boots.len() * (2 * 4 + 1));

    // Seeding with the OVMF hash, and base64 output, with a kernel.
    let hash = assert_same(&with_ovmf(&ovmf, &["--mode", "snp:ovmf-hash"]));
    let args = [
        "--mode",
        "snp",
        "--vcpus",
        "4",
        "--vcpu-type",
        "EPYC-v4",
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--append",
        "quiet",
        "--output-format",
        "base64",
    ];
    let full = assert_same(&with_ovmf(&ovmf, &args));
    let mut seeded = args.to_vec();
    seeded.extend_from_slice(&["--snp-ovmf-hash", hash.trim()]);
    assert_eq!(assert_same(&with_ovmf(&ovmf, &seeded)), full);
}

#[test]
fn hashes_table_placement() {
    let inputs = Inputs::new();
    let (kernel, _) = inputs.kernel_and_initrd();
    for gpa in [0x80_f000, 0x80_f010, 0x80_ff50] {
        let ovmf = inputs.firmware(
            &format!("ovmf-{gpa:x}.fd"),
            &SyntheticFirmware {
                hashes_table_gpa: Some(gpa),
                ..SyntheticFirmware::ovmf()
            },
        );
        assert_same(&with_ovmf(
            &ovmf,
            &[
                "--mode",
                "snp",
                "--vcpus",
                "2",
                "--vcpu-type",
                "EPYC",
                "--kernel",
                &kernel,
            ],
        ));
    }
    // The table would cross its page: both refuse.
    let ovmf = inputs.firmware(
        "ovmf-cross.fd",
        &SyntheticFirmware {
            hashes_table_gpa: Some(0x80_ffa0),
            ..SyntheticFirmware::ovmf()
        },
    );
    assert_both_fail(&with_ovmf(
        &ovmf,
        &[
            "--mode",
            "snp",
            "--vcpus",
            "2",
            "--vcpu-type",
            "EPYC",
            "--kernel",
            &kernel,
        ],
    ));
    // No SEV hashes table entry at all.
    let ovmf = inputs.firmware(
        "ovmf-no-table.fd",
        &SyntheticFirmware {
            hashes_table_gpa: None,
            ..SyntheticFirmware::ovmf()
        },
    );
    for mode in [
        &["--mode", "snp", "--vcpus", "2", "--vcpu-type", "EPYC"][..],
        &["--mode", "sev"],
    ] {
        let mut args = with_ovmf(&ovmf, mode);
        args.extend(owned(&["--kernel", &kernel]));
        assert_both_fail(&args);
    }
    // Without a kernel the kernel hashes page is a zero page.
    assert_same(&with_ovmf(
        &ovmf,
        &["--mode", "snp", "--vcpus", "2", "--vcpu-type", "EPYC"],
    ));
}

#[test]
fn svsm_launch() {
    let inputs = Inputs::new();
    let ovmf = inputs.firmware("ovmf-svsm.fd", &SyntheticFirmware::ovmf());
    let svsm = inputs.firmware("svsm.bin", &SyntheticFirmware::svsm());
    let vars = inputs.file("OVMF_VARS.fd", &vec![0u8; 0x2_0000]);
    let mut digests = std::collections::HashSet::new();
    for vcpus in ["1", "4"] {
        for vcpu_type in ["EPYC-Milan", "EPYC-Genoa"] {
            let base = [
                "--mode",
                "snp:svsm",
                "--vcpus",
                vcpus,
                "--vcpu-type",
                vcpu_type,
                "--svsm",
                &svsm,
            ];
            let mut by_size = base.to_vec();
            by_size.extend_from_slice(&["--vars-size", "131072"]);
            let mut by_file = base.to_vec();
            by_file.extend_from_slice(&["--vars-file", &vars]);
            let sized = assert_same(&with_ovmf(&ovmf, &by_size));
            assert_eq!(sized, assert_same(&with_ovmf(&ovmf, &by_file)));
            digests.insert(sized);
        }
    }
    assert_eq!(digests.len(), 4);
    let out = assert_same(&with_ovmf(
        &ovmf,
        &[
            "-v",
            "--mode",
            "snp:svsm",
            "--vcpus",
            "2",
            "--vcpu-sig",
            "0xa10f10",
            "--svsm",
            &svsm,
            "--vars-size",
            "131072",
        ],
    ));
    assert!(
        out.starts_with("Calculated SEV_SNP_SVSM guest measurement: "),
        "{out}"
    );
    // --vars-size is a decimal int, like argparse's type=int.
    assert_both_fail(&with_ovmf(
        &ovmf,
        &[
            "--mode",
            "snp:svsm",
            "--vcpus",
            "2",
            "--vcpu-type",
            "EPYC",
            "--svsm",
            &svsm,
            "--vars-size",
            "0x20000",
        ],
    ));
    // The VMSA dump of an SVSM launch.
    let ours = tempfile::tempdir().expect("a temporary folder");
    let theirs = tempfile::tempdir().expect("a temporary folder");
    assert_same_in(
        &with_ovmf(
            &ovmf,
            &[
                "--mode",
                "snp:svsm",
                "--vcpus",
                "2",
                "--vcpu-type",
                "EPYC",
                "--svsm",
                &svsm,
                "--vars-size",
                "4096",
                "--dump-vmsa",
            ],
        ),
        Some((ours.path(), theirs.path())),
    );
    for name in ["vmsa0.bin", "vmsa1.bin"] {
        assert!(
            std::fs::read(ours.path().join(name)).expect("hsev wrote the VMSA")
                == std::fs::read(theirs.path().join(name)).expect("sev-snp-measure wrote the VMSA")
        );
    }
    // An SVSM image without SVSM_INFO: both fail.
    let no_info = inputs.firmware(
        "svsm-no-info.bin",
        &SyntheticFirmware {
            svsm_info: None,
            ..SyntheticFirmware::svsm()
        },
    );
    assert_both_fail(&with_ovmf(
        &ovmf,
        &[
            "--mode",
            "snp:svsm",
            "--vcpus",
            "2",
            "--vcpu-type",
            "EPYC",
            "--svsm",
            &no_info,
            "--vars-size",
            "4096",
        ],
    ));
}
