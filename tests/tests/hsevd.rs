//! hsevd end to end: the real daemon, the real `hsev` CLI, real QEMU guests
//! (TCG) under the simulated Secure Processor, the image `make image` built.

use std::time::{Duration, Instant};

use hsev_e2e::daemon::{processes_mentioning, Daemon, ADMIN, ALICE, BOB};
use hsev_e2e::free_port;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn create(daemon: &Daemon, token: &str, name: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "vm", "create", name, "--image", "debian", "--vcpus", "1", "--memory", "512",
    ];
    args.extend_from_slice(extra);
    daemon.json(token, args)
}

/// Waits until the VM's console shows `marker`.
fn wait_for_console(daemon: &Daemon, token: &str, vm: &str, marker: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let output = daemon.hsev(token, ["vm", "console", vm]);
        if text(&output.stdout).contains(marker) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {marker:?} on the console of {vm} in {timeout:?}: {}",
            text(&output.stdout)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn qemu_pid(daemon: &Daemon, vm_id: &str) -> u32 {
    let pids = processes_mentioning(&daemon.state_dir().join("vms").join(vm_id));
    *pids
        .first()
        .unwrap_or_else(|| panic!("no QEMU process for {vm_id}"))
}

#[test]
fn a_sev_snp_vm_boots_with_equal_measurements_and_goes_through_its_lifecycle() {
    let daemon = Daemon::start("");
    daemon.import_image();
    let vm = create(&daemon, ALICE, "web", &["--mode", "sev-snp", "--start"]);
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["simulated_firmware"], true);
    assert_eq!(vm["measurements_equal"], true, "{vm}");
    let expected = vm["expected_measurement"].as_str().expect("measurement");
    assert_eq!(expected.len(), 96);
    assert_eq!(vm["launch_digest"], expected);
    wait_for_console(
        &daemon,
        ALICE,
        "web",
        "HSEV-GUEST-READY",
        Duration::from_secs(120),
    );

    let stopped = daemon.json(ALICE, ["vm", "stop", "web", "--force"]);
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    let started = daemon.json(ALICE, ["vm", "start", "web"]);
    assert_eq!(started["state"], "running");
    let rebooted = daemon.json(ALICE, ["vm", "reboot", "web"]);
    assert_eq!(rebooted["state"], "running");
    assert_eq!(
        rebooted["launch_digest"], expected,
        "a new launch of the same artifacts measures the same"
    );

    let deleted = daemon.hsev(ALICE, ["vm", "delete", "web", "--yes", "--wipe"]);
    assert!(deleted.status.success(), "{}", text(&deleted.stderr));
    assert_eq!(daemon.json(ALICE, ["vm", "list"]), serde_json::json!([]));
    assert!(
        processes_mentioning(&daemon.state_dir().join("vms")).is_empty(),
        "QEMU is gone"
    );
    assert!(
        std::fs::read_dir(daemon.state_dir().join("vms"))
            .expect("vms")
            .next()
            .is_none(),
        "files are gone"
    );
}

#[test]
fn running_vms_survive_kill_9_of_hsevd_and_are_adopted() {
    let mut daemon = Daemon::start("");
    daemon.import_image();
    let vm = create(
        &daemon,
        ALICE,
        "survivor",
        &["--mode", "sev-snp", "--start"],
    );
    let id = vm["id"].as_str().expect("id").to_owned();
    let pid = qemu_pid(&daemon, &id);
    daemon.kill_9();
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU outlives hsevd"
    );
    daemon.restart();
    let adopted = daemon.json(ALICE, ["vm", "show", "survivor"]);
    assert_eq!(adopted["state"], "running", "{adopted}");
    assert_eq!(qemu_pid(&daemon, &id), pid, "the same process");
    assert!(
        daemon.log().contains("adopted a running VM"),
        "{}",
        daemon.log()
    );

    // A VM whose QEMU died while hsevd was down is marked so, with why.
    daemon.kill_9();
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    std::thread::sleep(Duration::from_millis(300));
    daemon.restart();
    let dead = daemon.json(ALICE, ["vm", "show", "survivor"]);
    assert_eq!(dead["state"], "failed", "{dead}");
    assert!(
        dead["state_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("while hsevd was down"),
        "{dead}"
    );
}

#[test]
fn a_qemu_crash_is_noticed_and_reported() {
    let daemon = Daemon::start("");
    daemon.import_image();
    let vm = create(&daemon, BOB, "fragile", &["--mode", "none", "--start"]);
    let pid = qemu_pid(&daemon, vm["id"].as_str().expect("id"));
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let shown = daemon.json(BOB, ["vm", "show", "fragile"]);
        if shown["state"] == "failed" {
            let reason = shown["state_reason"].as_str().unwrap_or_default();
            assert!(reason.contains("VMM process ended"), "{reason}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the crash was not noticed: {shown}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn tenants_see_and_touch_only_their_own_vms() {
    let daemon = Daemon::start("");
    daemon.import_image();
    create(&daemon, ALICE, "private", &["--mode", "none"]);
    for args in [
        vec!["vm", "show", "private"],
        vec!["vm", "start", "private"],
        vec!["vm", "delete", "private", "--yes"],
    ] {
        let output = daemon.hsev(BOB, &args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(
            text(&output.stderr).contains("not found"),
            "{args:?}: {}",
            text(&output.stderr)
        );
    }
    assert_eq!(daemon.json(BOB, ["vm", "list"]), serde_json::json!([]));
    let all = daemon.json(ADMIN, ["vm", "list"]);
    assert_eq!(all.as_array().map(Vec::len), Some(1));
    assert_eq!(all[0]["owner"], "alice");
    // The same name is free for another tenant.
    create(&daemon, BOB, "private", &["--mode", "none"]);
    let unauthenticated = daemon.hsev("not-a-token", ["vm", "list"]);
    assert_eq!(unauthenticated.status.code(), Some(2));
    let images_for_tenant = daemon.hsev(ALICE, ["host", "list"]);
    assert_eq!(
        images_for_tenant.status.code(),
        Some(2),
        "hosts are for admins"
    );
}

#[test]
fn invalid_specs_are_refused_and_leave_nothing_behind() {
    let daemon = Daemon::start("");
    daemon.import_image();
    let cases: [(&[&str], &str); 9] = [
        (
            &[
                "vm", "create", "a", "--image", "debian", "--vcpus", "0", "--memory", "512",
                "--mode", "none",
            ],
            "vcpus",
        ),
        (
            &[
                "vm", "create", "b", "--image", "debian", "--vcpus", "1", "--memory", "99999999",
                "--mode", "none",
            ],
            "memory",
        ),
        (
            &[
                "vm", "create", "c", "--image", "nope", "--vcpus", "1", "--memory", "512",
                "--mode", "none",
            ],
            "unknown image",
        ),
        (
            &[
                "vm",
                "create",
                "d",
                "--image",
                "debian",
                "--vcpus",
                "1",
                "--memory",
                "512",
                "--mode",
                "sev-snp",
                "--policy",
                "0x10000030000",
            ],
            "undefined",
        ),
        (
            &[
                "vm", "create", "e", "--image", "debian", "--vcpus", "1", "--memory", "512",
                "--mode", "sev-snp", "--policy", "0xb0000",
            ],
            "debugging",
        ),
        (
            &[
                "vm", "create", "f", "--image", "debian", "--vcpus", "1", "--memory", "512",
                "--mode", "sev",
            ],
            "cannot run sev",
        ),
        (
            &[
                "vm",
                "create",
                "g",
                "--image",
                "debian",
                "--vcpus",
                "1",
                "--memory",
                "512",
                "--mode",
                "none",
                "--encrypted-disk",
                "16",
            ],
            "needs mode sev-snp",
        ),
        (
            &[
                "vm",
                "create",
                "h",
                "--image",
                "debian",
                "--vcpus",
                "1",
                "--memory",
                "512",
                "--mode",
                "sev-snp",
                "--encrypted-disk",
                "16",
            ],
            "no key broker configured",
        ),
        (
            &[
                "vm",
                "create",
                "i",
                "--image",
                "debian",
                "--vcpus",
                "1",
                "--memory",
                "512",
                "--mode",
                "none",
                "--disk",
                "hsev-data:16",
            ],
            "reserved",
        ),
    ];
    for (args, expected) in cases {
        let output = daemon.hsev(ALICE, args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&output.stderr)
        );
        assert!(
            text(&output.stderr).contains(expected),
            "{args:?}: expected {expected:?} in {}",
            text(&output.stderr)
        );
    }
    assert_eq!(daemon.json(ADMIN, ["vm", "list"]), serde_json::json!([]));
    assert!(std::fs::read_dir(daemon.state_dir().join("vms"))
        .expect("vms")
        .next()
        .is_none());
}

#[test]
fn twenty_concurrent_creates_all_land() {
    let daemon = Daemon::start("");
    daemon.import_image();
    std::thread::scope(|scope| {
        for index in 0..20 {
            let daemon = &daemon;
            scope.spawn(move || {
                let name = format!("batch-{index}");
                let output = daemon.hsev(
                    ALICE,
                    [
                        "vm", "create", &name, "--image", "debian", "--vcpus", "1", "--memory",
                        "256", "--mode", "sev-snp", "--disk", "data:16",
                    ],
                );
                assert!(output.status.success(), "{name}: {}", text(&output.stderr));
            });
        }
    });
    let vms = daemon.json(ALICE, ["vm", "list"]);
    let vms = vms.as_array().expect("list");
    assert_eq!(vms.len(), 20);
    assert!(vms.iter().all(|vm| vm["state"] == "stopped"), "{vms:?}");
    let ids: std::collections::HashSet<_> = vms.iter().map(|vm| vm["id"].clone()).collect();
    assert_eq!(ids.len(), 20);
}

#[test]
fn tls_metrics_and_hosts_without_snp() {
    let (api, metrics) = (free_port(), free_port());
    let daemon = Daemon::start_with(
        &format!("listen = \"127.0.0.1:{api}\"\nmetrics_listen = \"127.0.0.1:{metrics}\""),
        false,
    );
    daemon.import_image();

    // The TCP listener speaks TLS with the daemon's own certificate.
    let ca = daemon.state_dir().join("tls/cert.pem");
    let endpoint = format!("https://127.0.0.1:{api}");
    let trusted = daemon.hsev(
        ADMIN,
        [
            "vm",
            "list",
            "--endpoint",
            &endpoint,
            "--ca",
            ca.to_str().expect("utf-8"),
        ],
    );
    assert!(trusted.status.success(), "{}", text(&trusted.stderr));
    let untrusted = daemon.hsev(ADMIN, ["vm", "list", "--endpoint", &endpoint]);
    assert_eq!(
        untrusted.status.code(),
        Some(2),
        "an unknown certificate is refused"
    );

    // Without SEV and without the simulated firmware, SNP is refused.
    let refused = daemon.hsev(
        ALICE,
        [
            "vm", "create", "snp", "--image", "debian", "--vcpus", "1", "--memory", "256",
            "--mode", "sev-snp",
        ],
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        text(&refused.stderr).contains("cannot run sev-snp"),
        "{}",
        text(&refused.stderr)
    );
    let host = daemon.json(ADMIN, ["host", "list"]);
    assert_eq!(host[0]["capabilities"]["sev"]["snp"], false, "{host}");

    // Metrics, in the Prometheus text format.
    create(&daemon, ALICE, "plain", &["--mode", "none"]);
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", metrics)).expect("metrics listener");
    use std::io::{Read, Write};
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    assert!(response.contains("hsevd_api_requests_total"), "{response}");
    assert!(response.contains("hsevd_vms"), "{response}");
}

fn sha256_file(path: &std::path::Path) -> String {
    let output = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    text(&output.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_owned()
}

#[test]
fn an_ovmf_and_disk_image_boots_and_measures_its_firmware() {
    let daemon = Daemon::start("");
    let source = tempfile::tempdir().expect("tempdir");
    let firmware = source.path().join("OVMF.fd");
    std::fs::copy("/usr/share/ovmf/OVMF.fd", &firmware).expect("Debian's OVMF (make deps)");
    let disk = source.path().join("disk.qcow2");
    let created = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("16M")
        .status();
    assert!(created.expect("qemu-img").success());
    let manifest = serde_json::json!({
        "firmware": { "path": "OVMF.fd", "sha256": sha256_file(&firmware) },
        "disk": { "path": "disk.qcow2", "sha256": sha256_file(&disk), "format": "qcow2" },
    });
    std::fs::write(source.path().join("manifest.json"), manifest.to_string()).expect("manifest");
    let imported = daemon.hsev(
        ADMIN,
        [
            "image",
            "import",
            "disky",
            "--from",
            source.path().to_str().expect("utf-8"),
        ],
    );
    assert!(imported.status.success(), "{}", text(&imported.stderr));

    let vm = daemon.json(
        ALICE,
        [
            "vm", "create", "fromdisk", "--image", "disky", "--vcpus", "1", "--memory", "256",
            "--mode", "sev-snp", "--start",
        ],
    );
    assert_eq!(vm["state"], "running", "{vm}");
    let reference = hsev_e2e::run(
        &hsev_e2e::sev_snp_measure(),
        [
            "--mode",
            "snp",
            "--vcpus",
            "1",
            "--vcpu-type",
            "EPYC-v4",
            "--ovmf",
            firmware.to_str().expect("utf-8"),
        ],
    );
    let reference = text(&reference.stdout);
    assert_eq!(
        vm["expected_measurement"].as_str(),
        Some(reference.trim()),
        "{vm}"
    );
    assert_eq!(vm["launch_digest"], vm["expected_measurement"]);

    // Tampered: a firmware that does not match its manifest is refused.
    let mut bytes = std::fs::read(&firmware).expect("read");
    bytes[0] ^= 1;
    std::fs::write(&firmware, bytes).expect("write");
    let refused = daemon.hsev(
        ADMIN,
        [
            "image",
            "import",
            "tampered",
            "--from",
            source.path().to_str().expect("utf-8"),
        ],
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        text(&refused.stderr).contains("differs from the manifest"),
        "{}",
        text(&refused.stderr)
    );
}
