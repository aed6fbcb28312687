//! hsevd end to end: the real daemon, the real `hsev` CLI, real QEMU guests
//! (TCG) under the simulated Secure Processor, the image `make image` built.
//!
//! The lifecycle tests are one conformance suite run on every driver (the
//! `qemu`, `libvirt` and `fake` modules at the end): create, start, stop,
//! reboot, delete, adoption after `kill -9` of hsevd, a VMM crash noticed,
//! a firmware + disk image; the fake driver, which runs no guest, where a
//! test needs none, and its refusal to adopt where it cannot.

use std::time::{Duration, Instant};

use hsev_e2e::daemon::{processes_mentioning, Daemon, Driver, ADMIN, ALICE, BOB};
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

fn vmm_pid(daemon: &Daemon, vm_id: &str) -> u32 {
    *daemon
        .vmm_pids(vm_id)
        .first()
        .unwrap_or_else(|| panic!("no VMM process for {vm_id}"))
}

/// What the console shows once the VM booted.
fn booted_marker(daemon: &Daemon) -> &'static str {
    if daemon.driver().runs_guests() {
        "HSEV-GUEST-READY"
    } else {
        "boot 1"
    }
}

fn a_sev_snp_vm_boots_with_equal_measurements_and_goes_through_its_lifecycle(driver: Driver) {
    let daemon = Daemon::start_on(driver, "");
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
        booted_marker(&daemon),
        Duration::from_secs(120),
    );
    let id = vm["id"].as_str().expect("id").to_owned();

    let stopped = daemon.json(ALICE, ["vm", "stop", "web", "--force"]);
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(daemon.vmm_pids(&id).is_empty(), "the VMM is gone");
    let started = daemon.json(ALICE, ["vm", "start", "web"]);
    assert_eq!(started["state"], "running");
    let rebooted = daemon.json(ALICE, ["vm", "reboot", "web"]);
    assert_eq!(rebooted["state"], "running");
    assert_eq!(
        rebooted["launch_digest"], expected,
        "a new launch of the same artifacts measures the same"
    );
    // A plain VM's reboot resets it in place.
    create(&daemon, ALICE, "plain", &["--mode", "none", "--start"]);
    let reset = daemon.json(ALICE, ["vm", "reboot", "plain"]);
    assert_eq!(reset["state"], "running", "{reset}");

    for name in ["web", "plain"] {
        let deleted = daemon.hsev(ALICE, ["vm", "delete", name, "--yes", "--wipe"]);
        assert!(deleted.status.success(), "{}", text(&deleted.stderr));
    }
    assert_eq!(daemon.json(ALICE, ["vm", "list"]), serde_json::json!([]));
    assert!(daemon.vmm_pids(&id).is_empty(), "the VMM is gone");
    assert!(
        processes_mentioning(&daemon.state_dir().join("vms")).is_empty(),
        "no process uses the VMs' files"
    );
    if let Some(libvirtd) = daemon.libvirtd() {
        assert!(libvirtd.running_domains().is_empty(), "no domain left");
    }
    assert!(
        std::fs::read_dir(daemon.state_dir().join("vms"))
            .expect("vms")
            .next()
            .is_none(),
        "files are gone"
    );
}

fn running_vms_survive_kill_9_of_hsevd_and_are_adopted(driver: Driver) {
    let mut daemon = Daemon::start_on(driver, "");
    daemon.import_image();
    let vm = create(
        &daemon,
        ALICE,
        "survivor",
        &["--mode", "sev-snp", "--start"],
    );
    let id = vm["id"].as_str().expect("id").to_owned();
    if !driver.runs_guests() {
        // Fake VMs live in hsevd's process: the next hsevd says it cannot
        // adopt them, and why.
        daemon.kill_9();
        daemon.restart();
        let lost = daemon.json(ALICE, ["vm", "show", "survivor"]);
        assert_eq!(lost["state"], "failed", "{lost}");
        let reason = lost["state_reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("cannot adopt") && reason.contains("unsupported"),
            "{lost}"
        );
        return;
    }
    let pid = vmm_pid(&daemon, &id);
    daemon.kill_9();
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the VMM outlives hsevd"
    );
    daemon.restart();
    let adopted = daemon.json(ALICE, ["vm", "show", "survivor"]);
    assert_eq!(adopted["state"], "running", "{adopted}");
    assert_eq!(vmm_pid(&daemon, &id), pid, "the same process");
    assert!(
        daemon.log().contains("adopted a running VM"),
        "{}",
        daemon.log()
    );
    // Adopted, it is managed as before: it stops.
    let stopped = daemon.json(ALICE, ["vm", "stop", "survivor", "--force"]);
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    let started = daemon.json(ALICE, ["vm", "start", "survivor"]);
    assert_eq!(started["state"], "running", "{started}");
    let pid = vmm_pid(&daemon, &id);

    // A VM whose VMM died while hsevd was down is marked so, with why.
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

fn a_vmm_crash_is_noticed_and_reported(driver: Driver) {
    let daemon = Daemon::start_on(driver, "");
    daemon.import_image();
    let vm = create(&daemon, BOB, "fragile", &["--mode", "none", "--start"]);
    let pid = vmm_pid(&daemon, vm["id"].as_str().expect("id"));
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

/// `hsev host show` and `host list` name the driver, and the host's
/// capabilities carry it (for placement to filter on).
fn the_host_names_its_driver(driver: Driver) {
    let daemon = Daemon::start_on(driver, "");
    let hosts = daemon.json(ADMIN, ["host", "list"]);
    let capabilities = &hosts[0]["capabilities"];
    assert_eq!(capabilities["driver"], driver.name(), "{hosts}");
    let version = capabilities["driver_version"].as_str().unwrap_or_default();
    let expected = match driver {
        Driver::Qemu => "QEMU emulator version",
        Driver::Libvirt => "libvirt ",
        Driver::Fake => "fake driver",
    };
    assert!(version.contains(expected), "{version}");
    let name = hosts[0]["name"].as_str().expect("name");
    let shown = daemon.hsev(ADMIN, ["host", "show", name]);
    assert!(shown.status.success(), "{}", text(&shown.stderr));
    let shown = text(&shown.stdout);
    assert!(
        shown.contains(&format!("driver:         {} (", driver.name())),
        "{shown}"
    );
}

fn tenants_see_and_touch_only_their_own_vms(driver: Driver) {
    let daemon = Daemon::start_on(driver, "");
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

fn invalid_specs_are_refused_and_leave_nothing_behind(driver: Driver) {
    let daemon = Daemon::start_on(driver, "");
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
            "needs key_broker",
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
    // Placement counts each VM's vCPUs against the host's CPUs times the
    // overcommit: 20 VMs fit a 2-CPU host at 16.
    let daemon = Daemon::start("[placement]\ncpu_overcommit = 16.0");
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
                        "256", "--mode", "none", "--disk", "data:16",
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

fn an_ovmf_and_disk_image_boots_and_measures_its_firmware(driver: Driver) {
    let daemon = Daemon::start_on(driver, "");
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

/// Every driver-dependent test, once per driver that can play it.
macro_rules! on_driver {
    ($module:ident, $driver:expr, [$($test:ident),* $(,)?]) => {
        mod $module {
            $( #[test] fn $test() { super::$test($driver) } )*
        }
    };
}

on_driver!(
    qemu,
    hsev_e2e::daemon::Driver::Qemu,
    [
        a_sev_snp_vm_boots_with_equal_measurements_and_goes_through_its_lifecycle,
        running_vms_survive_kill_9_of_hsevd_and_are_adopted,
        a_vmm_crash_is_noticed_and_reported,
        the_host_names_its_driver,
        tenants_see_and_touch_only_their_own_vms,
        invalid_specs_are_refused_and_leave_nothing_behind,
        an_ovmf_and_disk_image_boots_and_measures_its_firmware,
    ]
);
on_driver!(
    libvirt,
    hsev_e2e::daemon::Driver::Libvirt,
    [
        a_sev_snp_vm_boots_with_equal_measurements_and_goes_through_its_lifecycle,
        running_vms_survive_kill_9_of_hsevd_and_are_adopted,
        a_vmm_crash_is_noticed_and_reported,
        the_host_names_its_driver,
        an_ovmf_and_disk_image_boots_and_measures_its_firmware,
    ]
);
// No guest, no VMM to crash: the driver-level suite crashes fake VMs.
on_driver!(
    fake,
    hsev_e2e::daemon::Driver::Fake,
    [
        a_sev_snp_vm_boots_with_equal_measurements_and_goes_through_its_lifecycle,
        running_vms_survive_kill_9_of_hsevd_and_are_adopted,
        the_host_names_its_driver,
        tenants_see_and_touch_only_their_own_vms,
        invalid_specs_are_refused_and_leave_nothing_behind,
        an_ovmf_and_disk_image_boots_and_measures_its_firmware,
    ]
);
