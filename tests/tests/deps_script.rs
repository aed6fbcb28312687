//! `scripts/deps.sh`, the first thing a new machine runs: every probe treats
//! an absent tool as an answer. The check runs against an empty root (where
//! every probe finds nothing, and a probe written so that absence aborts the
//! script under `set -e` would stop it early) and against roots holding one
//! QEMU or another.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use hsev_e2e::workspace_root;

fn deps(args: &[&str], root: Option<&Path>) -> Output {
    let mut command = Command::new("bash");
    command
        .arg(workspace_root().join("scripts/deps.sh"))
        .args(args)
        .env_remove("DEPS_ROOT");
    if let Some(root) = root {
        command.env("DEPS_ROOT", root);
    }
    command.output().expect("bash runs deps.sh")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every package and tool the script provides.
fn provided() -> BTreeSet<String> {
    let listed = deps(&["--list"], None);
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let packages: BTreeSet<String> = text(&listed.stdout).lines().map(str::to_owned).collect();
    for expected in [
        "qemu-system-x86",
        "ovmf",
        "cryptsetup-bin",
        "busybox-static",
        "protobuf-compiler",
        "nasm",
        "acpica-tools",
        "sev-snp-measure",
        "grpcurl",
        "cargo-fuzz",
        "slapos",
    ] {
        assert!(
            packages.contains(expected),
            "{expected} not in {packages:?}"
        );
    }
    packages
}

/// The packages a check reports missing, and its summary line.
fn reported_missing(output: &Output) -> (BTreeSet<String>, String) {
    let stdout = text(&output.stdout);
    let missing = stdout
        .lines()
        .filter_map(|line| line.strip_prefix("deps: missing: "))
        .map(|rest| rest.split(' ').next().unwrap_or(rest).to_owned())
        .collect();
    let summary = stdout.lines().last().unwrap_or_default().to_owned();
    (missing, summary)
}

#[test]
fn the_check_on_an_empty_root_reports_every_package_and_reaches_its_end() {
    let packages = provided();
    let empty = tempfile::tempdir().expect("tempdir");
    let output = deps(&["--check"], Some(empty.path()));
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    let (missing, summary) = reported_missing(&output);
    assert_eq!(missing, packages, "every package is reported missing");
    assert_eq!(
        summary,
        format!(
            "deps: check done: {n} of {n} missing (probed under {})",
            empty.path().display(),
            n = packages.len()
        ),
        "the script reaches its end"
    );
    assert_eq!(
        std::fs::read_dir(empty.path()).expect("readable").count(),
        0,
        "the check writes nothing"
    );
}

/// A root holding only a `qemu-system-x86_64` that prints `banner`.
fn root_with_qemu(banner: &str) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let bin = root.path().join("usr/bin");
    std::fs::create_dir_all(&bin).expect("usr/bin");
    let qemu = bin.join("qemu-system-x86_64");
    std::fs::write(&qemu, format!("#!/bin/sh\necho '{banner}'\n")).expect("fake qemu");
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    root
}

#[test]
fn qemu_counts_only_from_version_10_and_a_broken_one_is_missing() {
    let packages = provided();
    for (banner, present) in [
        (
            "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)",
            true,
        ),
        (
            "QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u13)",
            false,
        ),
        ("not a QEMU at all", false),
    ] {
        let root = root_with_qemu(banner);
        let output = deps(&["--check"], Some(root.path()));
        assert_eq!(output.status.code(), Some(1));
        let (missing, summary) = reported_missing(&output);
        assert_eq!(
            missing.contains("qemu-system-x86"),
            !present,
            "{banner}: {}",
            text(&output.stdout)
        );
        let expected_missing = packages.len() - usize::from(present);
        assert!(
            summary.starts_with(&format!(
                "deps: check done: {expected_missing} of {} missing",
                packages.len()
            )),
            "{banner}: {summary}"
        );
    }
}

#[test]
fn after_make_deps_nothing_is_missing_and_a_probed_root_never_installs() {
    let packages = provided();
    let output = deps(&["--check"], None);
    assert_eq!(
        output.status.code(),
        Some(0),
        "`make deps` ran before the tests, so the check finds everything: {}",
        text(&output.stdout)
    );
    let (missing, summary) = reported_missing(&output);
    assert!(missing.is_empty(), "{missing:?}");
    assert_eq!(
        summary,
        format!("deps: check done: 0 of {} missing", packages.len())
    );

    let root = tempfile::tempdir().expect("tempdir");
    let refused = deps(&[], Some(root.path()));
    assert_eq!(refused.status.code(), Some(2));
    assert!(text(&refused.stderr).contains("DEPS_ROOT only applies to --check"));
    let unknown = deps(&["--install-everything"], None);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(text(&unknown.stderr).contains("usage: deps.sh"));
}
