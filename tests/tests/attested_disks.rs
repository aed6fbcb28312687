//! Attested disk-key release end to end: the real `hsev-kbs`, the real
//! `hsevd`, real QEMU guests (TCG) under the simulated Secure Processor
//! running the real `hsev-agent` from the image `make image` built.
//!
//! Each test plays one story: the key is released to the expected launch
//! and to nothing else; a host that tampers with what the guest boots gets a
//! refusal; a key broker that dies mid-way loses nothing. The unlock and the
//! tamper refusal are part of the driver conformance suite: they run on the
//! QEMU and the libvirt driver (the `qemu` and `libvirt` modules at the end).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hsev_e2e::daemon::{Daemon, Driver, ADMIN, ALICE};
use hsev_e2e::kbs::{Kbs, KbsMode};

/// How long a guest may take from start to its agent's verdict (OVMF and
/// the kernel under TCG, then the agent).
const VERDICT_TIMEOUT: Duration = Duration::from_secs(180);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A key broker in `mode` and an hsevd that registers keys there, with the
/// image imported.
fn pool(mode: KbsMode, extra: &str) -> (Kbs, Daemon) {
    pool_on(Driver::Qemu, mode, extra)
}

/// [`pool`] with its hsevd on `driver`.
fn pool_on(driver: Driver, mode: KbsMode, extra: &str) -> (Kbs, Daemon) {
    let kbs = Kbs::start(mode);
    let daemon = Daemon::on_platform_trusted_by_on(driver, extra, &kbs);
    daemon.import_image();
    (kbs, daemon)
}

fn create_encrypted(daemon: &Daemon, name: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "vm",
        "create",
        name,
        "--image",
        "debian",
        "--vcpus",
        "1",
        "--memory",
        "512",
        "--mode",
        "sev-snp",
        "--encrypted-disk",
        "32",
    ];
    args.extend_from_slice(extra);
    daemon.json(ALICE, args)
}

fn console(daemon: &Daemon, vm: &str) -> String {
    text(&daemon.hsev(ALICE, ["vm", "console", vm]).stdout)
}

/// Waits until the console shows one of `markers` at least `count` times
/// in all; answers the console.
fn wait_for(daemon: &Daemon, vm: &str, markers: &[&str], count: usize) -> String {
    let deadline = Instant::now() + VERDICT_TIMEOUT;
    loop {
        let console = console(daemon, vm);
        let seen: usize = markers
            .iter()
            .map(|marker| console.matches(marker).count())
            .sum();
        if seen >= count {
            return console;
        }
        assert!(
            Instant::now() < deadline,
            "{vm}: no {markers:?} (x{count}) on the console in {VERDICT_TIMEOUT:?}:\n{console}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits until hsevd shows the attestation state `state`; answers the VM.
fn wait_for_attestation(daemon: &Daemon, vm: &str, state: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let shown = daemon.json(ALICE, ["vm", "show", vm]);
        if shown["attestation"]["state"] == state {
            return shown;
        }
        assert!(
            Instant::now() < deadline,
            "{vm}: attestation not {state}: {shown}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The imported image's file of `role` in hsevd's image store.
fn image_file(daemon: &Daemon, name: &str) -> PathBuf {
    let images = daemon.state_dir().join("images");
    let found: Vec<PathBuf> = walk(&images)
        .into_iter()
        .filter(|path| path.file_name().is_some_and(|file| file == name))
        .collect();
    assert_eq!(found.len(), 1, "one {name} under {}", images.display());
    found.into_iter().next().expect("one")
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Appends `bytes` to `path`, as a host that changes what a guest boots.
fn append(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("opens");
    file.write_all(bytes).expect("appends");
}

/// A newc cpio archive holding one file: the kernel unpacks archives
/// concatenated to an initrd, so the guest still boots, with one file more.
fn cpio_with_one_file() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("tampered"), b"the host was here\n").expect("written");
    let output = Command::new("sh")
        .arg("-c")
        .arg("echo tampered | cpio --quiet -o -H newc")
        .current_dir(dir.path())
        .output()
        .expect("cpio runs");
    assert!(output.status.success(), "{}", text(&output.stderr));
    output.stdout
}

fn the_attested_guest_unlocks_its_disk_and_its_data_survives_a_reboot(driver: Driver) {
    let (kbs, daemon) = pool_on(driver, KbsMode::Development, "");
    let vm = create_encrypted(&daemon, "vault", &["--start"]);
    assert_eq!(vm["attestation"]["state"], "pending", "{vm}");
    let resource = vm["spec"]["key_resource"].as_str().expect("resource");
    assert_eq!(
        resource,
        format!("hsev/disk-key/{}", vm["id"].as_str().expect("id"))
    );

    let first = wait_for(
        &daemon,
        "vault",
        &["HSEV-DISK-UNLOCKED", "HSEV-KBS-REFUSED"],
        1,
    );
    assert!(
        first.contains("HSEV-DISK-UNLOCKED /mnt/data boot=1"),
        "{first}"
    );
    let shown = wait_for_attestation(&daemon, "vault", "released");
    assert_eq!(shown["measurements_equal"], true, "{shown}");

    let rebooted = daemon.json(ALICE, ["vm", "reboot", "vault"]);
    assert_eq!(rebooted["state"], "running", "{rebooted}");
    let second = wait_for(
        &daemon,
        "vault",
        &["HSEV-DISK-UNLOCKED", "HSEV-KBS-REFUSED"],
        2,
    );
    assert!(
        second.contains("HSEV-DISK-UNLOCKED /mnt/data boot=2"),
        "the second boot finds the first boot's log: {second}"
    );
    wait_for_attestation(&daemon, "vault", "released");

    // The host holds the disk, never its key: what the guest wrote is not
    // in the file, and no key the host could guess opens it.
    let stopped = daemon.json(ALICE, ["vm", "stop", "vault", "--force"]);
    assert_eq!(stopped["state"], "stopped");
    let disk = walk(&daemon.state_dir().join("vms"))
        .into_iter()
        .find(|path| {
            path.extension()
                .is_some_and(|extension| extension == "luks")
        })
        .expect("the encrypted disk");
    let bytes = std::fs::read(&disk).expect("disk");
    assert!(bytes.starts_with(b"LUKS\xba\xbe"), "a LUKS header");
    let measurement = shown["expected_measurement"].as_str().expect("hex");
    for plaintext in [
        measurement.as_bytes(),
        b"hsev-boot-log".as_slice(),
        b"lost+found",
    ] {
        assert!(
            !bytes
                .windows(plaintext.len())
                .any(|window| window == plaintext),
            "{:?} readable in the disk file",
            String::from_utf8_lossy(plaintext)
        );
    }
    let wrong_key = Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file", "-"])
        .arg(&disk)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("cryptsetup runs");
    assert!(!wrong_key.status.success(), "an empty key opens nothing");

    // Deleting the VM revokes the key at the key broker.
    let deleted = daemon.hsev(ALICE, ["vm", "delete", "vault", "--yes"]);
    assert!(deleted.status.success(), "{}", text(&deleted.stderr));
    let listed = kbs.resources("alice");
    assert!(!listed.contains(resource), "revoked: {listed}");
    kbs.verify_audit();
}

fn a_host_that_changes_the_kernel_initrd_or_command_line_gets_no_key(driver: Driver) {
    let (kbs, daemon) = pool_on(driver, KbsMode::Development, "");
    create_encrypted(&daemon, "vault", &[]);
    let kernel = image_file(&daemon, "vmlinuz");
    let initrd = image_file(&daemon, "initrd.img");
    let pristine_kernel = std::fs::read(&kernel).expect("kernel");
    let pristine_initrd = std::fs::read(&initrd).expect("initrd");

    let mut boots = 0;
    let mut refuse = |what: &str| {
        let started = daemon.json(ALICE, ["vm", "start", "vault"]);
        assert_eq!(started["state"], "running", "{what}: {started}");
        assert_eq!(
            started["measurements_equal"], false,
            "{what}: the launch measured something else"
        );
        boots += 1;
        let console = wait_for(
            &daemon,
            "vault",
            &["HSEV-DISK-UNLOCKED", "HSEV-KBS-REFUSED"],
            boots,
        );
        assert!(
            !console.contains("HSEV-DISK-UNLOCKED"),
            "{what}: the disk was unlocked:\n{console}"
        );
        let shown = wait_for_attestation(&daemon, "vault", "refused");
        let reason = shown["attestation"]["reason"].as_str().expect("reason");
        assert!(reason.contains("measurement"), "{what}: {reason}");
        let stopped = daemon.json(ALICE, ["vm", "stop", "vault", "--force"]);
        assert_eq!(stopped["state"], "stopped");
    };

    // The kernel: bytes appended to the bzImage still boot, and are measured.
    append(&kernel, &[0x5a; 4096]);
    refuse("kernel");
    std::fs::write(&kernel, &pristine_kernel).expect("restored");

    append(&initrd, &cpio_with_one_file());
    refuse("initrd");
    std::fs::write(&initrd, &pristine_initrd).expect("restored");

    // The command line: the host's record of the image, edited behind
    // hsevd's back, as a rogue operator could.
    daemon.edit_store("UPDATE image SET cmdline = cmdline || ' hsev.exit=shell'");
    refuse("command line");
    kbs.verify_audit();
}

#[test]
fn a_debug_policy_or_a_production_key_broker_refuses_the_key() {
    let (_kbs, daemon) = pool(KbsMode::Development, "allow_debug_policy = true");
    // Debug allowed by the guest policy: the host could read the guest.
    create_encrypted(&daemon, "debuggable", &["--policy", "0xb0000", "--start"]);
    wait_for(&daemon, "debuggable", &["HSEV-KBS-REFUSED"], 1);
    let shown = wait_for_attestation(&daemon, "debuggable", "refused");
    let reason = shown["attestation"]["reason"].as_str().expect("reason");
    assert!(reason.contains("debug"), "{reason}");

    // A key broker in production mode never trusts the simulated Secure
    // Processor, whatever the resource's policy says.
    let (_kbs, daemon) = pool(KbsMode::Production, "");
    create_encrypted(&daemon, "simulated", &["--start"]);
    wait_for(&daemon, "simulated", &["HSEV-KBS-REFUSED"], 1);
    let shown = wait_for_attestation(&daemon, "simulated", "refused");
    let reason = shown["attestation"]["reason"].as_str().expect("reason");
    assert!(reason.contains("simulated"), "{reason}");
}

#[test]
fn a_key_broker_killed_mid_way_loses_nothing_and_the_guest_recovers() {
    let (mut kbs, daemon) = pool(KbsMode::Development, "");
    create_encrypted(&daemon, "vault", &[]);
    // The key is registered; the broker dies before the guest asks.
    kbs.kill_9();
    let started = daemon.json(ADMIN, ["vm", "start", "vault"]);
    assert_eq!(started["state"], "running");
    let console = wait_for(&daemon, "vault", &["unreachable"], 1);
    assert!(!console.contains("HSEV-DISK-UNLOCKED"), "{console}");
    kbs.restart();
    let console = wait_for(
        &daemon,
        "vault",
        &["HSEV-DISK-UNLOCKED", "HSEV-KBS-REFUSED"],
        1,
    );
    assert!(
        console.contains("HSEV-DISK-UNLOCKED /mnt/data boot=1"),
        "{console}"
    );
    wait_for_attestation(&daemon, "vault", "released");
    kbs.verify_audit();
}

#[test]
fn without_its_key_broker_hsevd_neither_creates_nor_deletes_encrypted_disks() {
    let (mut kbs, daemon) = pool(KbsMode::Development, "");
    create_encrypted(&daemon, "kept", &[]);
    kbs.kill_9();

    // No key broker, no encrypted disk: nothing is left behind.
    let mut args = vec![
        "vm", "create", "orphan", "--image", "debian", "--vcpus", "1",
    ];
    args.extend([
        "--memory",
        "512",
        "--mode",
        "sev-snp",
        "--encrypted-disk",
        "16",
    ]);
    let refused = daemon.hsev(ALICE, &args);
    assert!(!refused.status.success());
    let error = text(&refused.stderr);
    assert!(
        error.contains("key broker") && error.contains("unreachable"),
        "{error}"
    );
    let listed = daemon.json(ALICE, ["vm", "list"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(
        std::fs::read_dir(daemon.state_dir().join("vms"))
            .expect("vms")
            .count(),
        1,
        "only the first VM's folder"
    );

    // A key that cannot be revoked keeps its VM.
    let kept = daemon.hsev(ALICE, ["vm", "delete", "kept", "--yes"]);
    assert!(!kept.status.success());
    assert!(
        text(&kept.stderr).contains("revoke"),
        "{}",
        text(&kept.stderr)
    );
    assert_eq!(daemon.json(ALICE, ["vm", "show", "kept"])["name"], "kept");

    kbs.restart();
    let deleted = daemon.hsev(ALICE, ["vm", "delete", "kept", "--yes"]);
    assert!(deleted.status.success(), "{}", text(&deleted.stderr));
    assert!(
        !kbs.resources("alice").contains("disk-key"),
        "{}",
        kbs.resources("alice")
    );
}

/// The conformance part, once per driver that runs guests.
macro_rules! on_driver {
    ($module:ident, $driver:expr) => {
        mod $module {
            #[test]
            fn the_attested_guest_unlocks_its_disk_and_its_data_survives_a_reboot() {
                super::the_attested_guest_unlocks_its_disk_and_its_data_survives_a_reboot($driver)
            }
            #[test]
            fn a_host_that_changes_the_kernel_initrd_or_command_line_gets_no_key() {
                super::a_host_that_changes_the_kernel_initrd_or_command_line_gets_no_key($driver)
            }
        }
    };
}

on_driver!(qemu, hsev_e2e::daemon::Driver::Qemu);
on_driver!(libvirt, hsev_e2e::daemon::Driver::Libvirt);
