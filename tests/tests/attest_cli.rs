//! `hsev attest` as users and scripts run it: the real binary, the real AMD
//! evidence, exit codes 0 (accepted), 1 (refused) and 2 (bad input).

use std::path::PathBuf;

use hsev_e2e::{hsev, snp_testdata};

const PINNED: &str = "2025-06-01T00:00:00Z";

fn report(name: &str) -> String {
    path(&format!("{name}.report.bin"))
}

fn path(name: &str) -> String {
    snp_testdata()
        .join("reports")
        .join(name)
        .display()
        .to_string()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn valid_vectors_exit_zero() {
    let cases = [
        vec![
            "--report".to_owned(),
            report("milan-v2-a"),
            "--vcek".into(),
            path("milan-v2-a.vcek.der"),
        ],
        vec![
            "--report".to_owned(),
            report("milan-v2-b"),
            "--vcek".into(),
            path("milan-v2-b.vcek.der"),
        ],
        vec![
            "--report".to_owned(),
            report("milan-v3-vlek"),
            "--vlek".into(),
            path("milan-v3-vlek.vlek.der"),
        ],
        vec!["--report".to_owned(), path("genoa-v3-json.evidence.json")],
    ];
    for case in cases {
        let output = hsev(
            ["attest", "verify", "--at", PINNED]
                .into_iter()
                .map(str::to_owned)
                .chain(case.clone()),
        );
        assert_eq!(
            output.status.code(),
            Some(0),
            "{case:?}\n{}{}",
            stdout(&output),
            stderr(&output)
        );
        assert!(stdout(&output).contains("ACCEPTED"), "{}", stdout(&output));
    }
}

#[test]
fn the_debug_vector_is_refused_naming_debug() {
    let output = hsev([
        "attest",
        "verify",
        "--at",
        PINNED,
        "--report",
        &report("milan-v2-c"),
        "--vcek",
        &path("milan-v2-c.vcek.der"),
        "--output",
        "json",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let verdict: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON verdict");
    assert_eq!(verdict["accepted"], false);
    let failed: Vec<&str> = verdict["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|check| check["passed"] == false)
        .map(|check| check["name"].as_str().expect("name"))
        .collect();
    assert_eq!(failed, vec!["debug"]);
    assert_eq!(
        verdict["report"]["policy"]["flags"],
        serde_json::json!(["smt", "debug"])
    );
}

#[test]
fn the_vlek_vector_is_accepted_only_inside_its_validity() {
    let verify_at = |at: &str| {
        hsev([
            "attest",
            "verify",
            "--at",
            at,
            "--report",
            &report("milan-v3-vlek"),
            "--vlek",
            &path("milan-v3-vlek.vlek.der"),
        ])
    };
    assert_eq!(verify_at("2025-06-01T00:00:00Z").status.code(), Some(0));
    let expired = verify_at("2026-11-22T00:00:00Z");
    assert_eq!(expired.status.code(), Some(1));
    assert!(
        stdout(&expired).contains("REFUSED: certificate_validity"),
        "{}",
        stdout(&expired)
    );
}

#[test]
fn a_policy_file_is_applied_and_its_errors_name_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lenient = dir.path().join("lenient.toml");
    std::fs::write(&lenient, "allow_debug = true\n").expect("write");
    let output = hsev([
        "attest",
        "verify",
        "--at",
        PINNED,
        "--report",
        &report("milan-v2-c"),
        "--vcek",
        &path("milan-v2-c.vcek.der"),
        "--policy",
        lenient.to_str().expect("utf-8"),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));

    let strict = dir.path().join("strict.toml");
    std::fs::write(&strict, "allowed_vmpls = [0]\n[minimum_tcb]\nsnp = 9\n").expect("write");
    let output = hsev([
        "attest",
        "verify",
        "--at",
        PINNED,
        "--report",
        &report("milan-v3-vlek"),
        "--vlek",
        &path("milan-v3-vlek.vlek.der"),
        "--policy",
        strict.to_str().expect("utf-8"),
    ]);
    assert_eq!(
        output.status.code(),
        Some(1),
        "snp 24 meets the floor of 9 but VMPL 1 must fail: {}",
        stdout(&output)
    );
    assert!(
        stdout(&output).contains("REFUSED: vmpl\n"),
        "{}",
        stdout(&output)
    );
}

#[test]
fn bad_input_exits_two_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let truncated = dir.path().join("truncated.bin");
    let bytes = std::fs::read(report("milan-v2-a")).expect("read");
    std::fs::write(&truncated, &bytes[..100]).expect("write");
    let bad_policy = dir.path().join("bad.toml");
    std::fs::write(&bad_policy, "allow_debugging = true\n").expect("write");
    let missing = dir.path().join("missing.bin");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--report".into(),
                truncated.display().to_string(),
                "--vcek".into(),
                path("milan-v2-a.vcek.der"),
            ],
            "a report is 1184 bytes, got 100",
        ),
        (
            vec!["--report".into(), missing.display().to_string()],
            "missing.bin",
        ),
        (
            vec![
                "--report".into(),
                report("milan-v2-a"),
                "--vcek".into(),
                report("milan-v2-b"),
            ],
            "not an X.509 certificate",
        ),
        (
            vec![
                "--report".into(),
                report("milan-v2-a"),
                "--vcek".into(),
                path("milan-v2-a.vcek.der"),
                "--policy".into(),
                bad_policy.display().to_string(),
            ],
            "allow_debugging",
        ),
        (
            vec![
                "--report".into(),
                report("milan-v2-a"),
                "--vcek".into(),
                path("milan-v2-a.vcek.der"),
                "--at".into(),
                "yesterday".into(),
            ],
            "RFC 3339",
        ),
        (
            vec![
                "--report".into(),
                report("milan-v3-vlek"),
                "--product".into(),
                "genoa".into(),
                "--vlek".into(),
                path("milan-v3-vlek.vlek.der"),
            ],
            "contradicts",
        ),
        (
            vec![
                "--report".into(),
                report("milan-v2-a"),
                "--cert-dir".into(),
                dir.path().display().to_string(),
            ],
            "no certificate for this report",
        ),
    ];
    for (args, expected) in cases {
        let output = hsev(
            ["attest".to_owned(), "verify".to_owned()]
                .into_iter()
                .chain(args.clone()),
        );
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(expected),
            "{args:?}: expected {expected:?} in {}",
            stderr(&output)
        );
    }
    let usage = hsev([
        "attest",
        "verify",
        "--report",
        &report("milan-v2-a"),
        "--vcek",
        "a",
        "--vlek",
        "b",
    ]);
    assert_eq!(usage.status.code(), Some(2));
}

#[test]
fn show_decodes_every_field() {
    let output = hsev([
        "attest",
        "show",
        "--report",
        &report("milan-v3-vlek"),
        "--output",
        "json",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let shown: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(shown["version"], 3);
    assert_eq!(shown["product"], "milan");
    assert_eq!(shown["vmpl"], 1);
    assert_eq!(shown["key_info"]["signing_key"], "vlek");
    assert_eq!(
        shown["reported_tcb"],
        serde_json::json!({"bootloader": 4, "tee": 0, "snp": 24, "microcode": 217})
    );
    assert_eq!(
        shown["cpuid"],
        serde_json::json!({"family": 25, "model": 1, "stepping": 1})
    );
    assert_eq!(
        shown["platform_info"]["flags"],
        serde_json::json!([
            "smt_enabled",
            "tsme_enabled",
            "ecc_enabled",
            "alias_check_complete"
        ])
    );
    let text = hsev([
        "attest",
        "show",
        "--report",
        &path("genoa-v3-json.evidence.json"),
    ]);
    assert!(
        stdout(&text).contains("product: genoa"),
        "{}",
        stdout(&text)
    );
}

#[test]
fn kds_urls_follow_amds_scheme() {
    let output = hsev([
        "attest",
        "kds-url",
        "--report",
        &report("milan-v2-a"),
        "--product",
        "milan",
        "--output",
        "json",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let urls: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let vcek = urls["vcek"].as_str().expect("vcek url");
    assert!(
        vcek.starts_with("https://kdsintf.amd.com/vcek/v1/Milan/c38427a30d4c7af9"),
        "{vcek}"
    );
    assert!(
        vcek.ends_with("?blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115"),
        "{vcek}"
    );
    assert_eq!(urls["crl"], "https://kdsintf.amd.com/vcek/v1/Milan/crl");
    let vlek = hsev([
        "attest",
        "kds-url",
        "--report",
        &report("milan-v3-vlek"),
        "--output",
        "json",
    ]);
    let urls: serde_json::Value = serde_json::from_slice(&vlek.stdout).expect("JSON");
    assert_eq!(urls["vcek"], serde_json::Value::Null);
    assert_eq!(
        urls["cert_chain"],
        "https://kdsintf.amd.com/vlek/v1/Milan/cert_chain"
    );
    let without_product = hsev(["attest", "kds-url", "--report", &report("milan-v2-a")]);
    assert_eq!(without_product.status.code(), Some(2));
    assert!(stderr(&without_product).contains("--product"));
}

#[test]
fn the_cache_imports_exports_and_serves_verification_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    let cache_arg = cache.display().to_string();
    let roots = snp_testdata()
        .join("roots/milan/ask_ark_asvk.pem")
        .display()
        .to_string();
    let import = hsev([
        "attest",
        "cache",
        "import",
        "--cache",
        &cache_arg,
        &path("milan-v2-a.vcek.der"),
        &path("milan-v3-vlek.vlek.der"),
        &path("turin.vcek.der"),
        &roots,
    ]);
    assert_eq!(
        import.status.code(),
        Some(0),
        "{}{}",
        stdout(&import),
        stderr(&import)
    );
    assert!(
        stdout(&import).contains("embedded already"),
        "{}",
        stdout(&import)
    );

    let list = hsev([
        "attest", "cache", "list", "--cache", &cache_arg, "--output", "json",
    ]);
    let entries: serde_json::Value = serde_json::from_slice(&list.stdout).expect("JSON");
    let kinds: Vec<(&str, &str)> = entries
        .as_array()
        .expect("list")
        .iter()
        .map(|entry| {
            (
                entry["product"].as_str().expect("product"),
                entry["kind"].as_str().expect("kind"),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![("milan", "vcek"), ("milan", "vlek"), ("turin", "vcek")]
    );

    for (name, expected) in [("milan-v2-a", 0), ("milan-v3-vlek", 0), ("milan-v2-b", 2)] {
        let output = hsev([
            "attest",
            "verify",
            "--at",
            PINNED,
            "--report",
            &report(name),
            "--cert-dir",
            &cache_arg,
        ]);
        assert_eq!(
            output.status.code(),
            Some(expected),
            "{name}: {}{}",
            stdout(&output),
            stderr(&output)
        );
    }

    let exported = dir.path().join("exported");
    let export = hsev([
        "attest",
        "cache",
        "export",
        "--cache",
        &cache_arg,
        "--out",
        exported.to_str().expect("utf-8"),
        "--report",
        &report("milan-v2-a"),
        "--product",
        "milan",
    ]);
    assert_eq!(export.status.code(), Some(0), "{}", stderr(&export));
    let output = hsev([
        "attest",
        "verify",
        "--at",
        PINNED,
        "--report",
        &report("milan-v2-a"),
        "--cert-dir",
        exported.to_str().expect("utf-8"),
    ]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let exported_files = walk(&exported);
    assert_eq!(
        exported_files.len(),
        1,
        "only the VCEK the report needs: {exported_files:?}"
    );
}

#[test]
fn the_cache_refuses_what_does_not_verify_and_stores_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    let forged = dir.path().join("forged.der");
    let mut bytes = std::fs::read(path("milan-v2-a.vcek.der")).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&forged, bytes).expect("write");
    let output = hsev([
        "attest",
        "cache",
        "import",
        "--cache",
        cache.to_str().expect("utf-8"),
        &path("milan-v2-b.vcek.der"),
        forged.to_str().expect("utf-8"),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("forged.der"),
        "{}",
        stderr(&output)
    );
    assert!(
        !cache.exists() || walk(&cache).is_empty(),
        "nothing may be stored when one file is bad"
    );
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
