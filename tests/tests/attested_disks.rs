//! Encrypted disks whose key only the tenant's broker and the attested
//! guest hold, end to end: the tenant's real `hsev-kbs` over HTTPS, the
//! real `hsevd`, real QEMU guests (TCG) under the simulated Secure
//! Processor running the real `hsev-agent` from the image `make image`
//! built.
//!
//! The flow under test: the tenant creates its VM with its broker's URL,
//! pin and repository (measured on the kernel command line); it pins the
//! release policy from its own machine (`hsev kbs policy set`, the
//! measurement computed from its own copy of the image); hsevd makes the
//! disk empty; at the first boot the broker generates the key and releases
//! it to the attested guest, which formats the disk itself; later boots only
//! open it. A host that tampers with what the guest boots gets a refusal; a
//! broker that dies mid-way loses nothing. The unlock and the tamper refusal
//! are part of the driver conformance suite: they run on the QEMU and the
//! libvirt driver (the `qemu` and `libvirt` modules at the end).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use hsev_e2e::daemon::{image_dir, qemu_processes_of, Daemon, Driver, ADMIN, ALICE};
use hsev_e2e::kbs::{Kbs, KbsMode};

/// How long a guest may take from start to its agent's verdict (OVMF and
/// the kernel under TCG, then the agent).
const VERDICT_TIMEOUT: Duration = Duration::from_secs(180);

/// What the agent says when it formats the empty disk (first boot only).
const FORMATS: &str = "formatting it as LUKS2 with the released key";

/// The agent's verdicts on the console.
const VERDICTS: [&str; 3] = [
    "HSEV-DISK-UNLOCKED",
    "HSEV-KBS-REFUSED",
    "HSEV-KBS-WRONG-BROKER",
];

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn path(path: &Path) -> &str {
    path.to_str().expect("utf-8")
}

/// The tenant's key broker (HTTPS) in `mode` and an hsevd on `driver`
/// whose simulated Secure Processor the broker trusts, image imported.
fn pool_on(driver: Driver, mode: KbsMode, extra: &str) -> (Kbs, Daemon) {
    let kbs = Kbs::start(mode);
    let daemon = Daemon::on_platform_trusted_by_on(driver, extra, &kbs);
    daemon.import_image();
    (kbs, daemon)
}

/// Alice's sev-snp VM `name` with a 32 MiB encrypted disk whose key lives
/// at her broker `kbs` (repository `alice`): [`Kbs::encrypted_vm_args`]
/// with the broker's URL as guests reach it, then `extra`.
fn create_encrypted(daemon: &Daemon, kbs: &Kbs, name: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = kbs.encrypted_vm_args(name, &kbs.guest_url());
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    daemon.json(ALICE, args)
}

/// Who runs `hsev kbs policy set`, against which broker.
struct PolicyCall<'a> {
    /// hsevd's token of the caller.
    caller: &'a str,
    broker_url: String,
    broker_pin: String,
    token_file: PathBuf,
    repository: &'a str,
}

impl<'a> PolicyCall<'a> {
    /// Alice, at her broker `kbs`, for her repository.
    fn alice(kbs: &Kbs) -> PolicyCall<'a> {
        PolicyCall {
            caller: ALICE,
            broker_url: kbs.url(),
            broker_pin: kbs.pin(),
            token_file: kbs.tenant_token_file("alice"),
            repository: "alice",
        }
    }

    /// `hsev kbs policy set` for `vm`, from the caller's machine.
    fn run(&self, daemon: &Daemon, vm: &str) -> Output {
        self.run_with(daemon, vm, &[])
    }

    /// [`Self::run`] with the further flags `extra`.
    fn run_with(&self, daemon: &Daemon, vm: &str, extra: &[&str]) -> Output {
        let manifest = image_dir().join("manifest.json");
        let mut args = vec![
            "kbs",
            "policy",
            "set",
            "--broker",
            &self.broker_url,
            "--broker-pin",
            &self.broker_pin,
            "--broker-token-file",
            path(&self.token_file),
            "--repository",
            self.repository,
            "--vm",
            vm,
            "--image-manifest",
            path(&manifest),
            "--allow-simulated",
        ];
        args.extend_from_slice(extra);
        daemon.hsev(self.caller, args)
    }
}

/// Alice's `hsev kbs policy set`, which must succeed; answers what it
/// printed.
fn pin_policy(daemon: &Daemon, kbs: &Kbs, vm: &str) -> String {
    pin_policy_with(daemon, kbs, vm, &[])
}

/// [`pin_policy`] with the further flags `extra`.
fn pin_policy_with(daemon: &Daemon, kbs: &Kbs, vm: &str, extra: &[&str]) -> String {
    let output = PolicyCall::alice(kbs).run_with(daemon, vm, extra);
    assert!(
        output.status.success(),
        "hsev kbs policy set: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
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

/// The imported image's file `name` in hsevd's image store.
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

/// The encrypted disk's file in the VM's run folder.
fn encrypted_disk(daemon: &Daemon, vm_id: &str) -> PathBuf {
    let disk = daemon
        .state_dir()
        .join("vms")
        .join(vm_id)
        .join("disk-hsev-data.raw");
    assert!(disk.is_file(), "{} is missing", disk.display());
    disk
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

fn the_guest_formats_its_empty_disk_at_first_boot_and_its_data_survives_a_reboot(driver: Driver) {
    let (kbs, daemon) = pool_on(driver, KbsMode::Development, "");
    let vm = create_encrypted(&daemon, &kbs, "vault", &[]);
    let id = vm["id"].as_str().expect("id");
    let resource = vm["spec"]["key_resource"].as_str().expect("resource");
    assert_eq!(resource, format!("alice/disk-key/{id}"));
    assert_eq!(vm["attestation"]["state"], "pending", "{vm}");
    // hsevd made the disk empty: nothing to read, no key anywhere yet.
    let disk = encrypted_disk(&daemon, id);
    assert!(
        std::fs::read(&disk)
            .expect("disk")
            .iter()
            .all(|&byte| byte == 0),
        "the host creates the disk empty"
    );

    // The tenant pins its policy; the measurement computed from its own copy
    // of the image is the host's figure too.
    let pinned = pin_policy(&daemon, &kbs, "vault");
    assert!(pinned.contains("EQUAL"), "{pinned}");
    assert!(
        pinned.contains("generated by the broker at the first release"),
        "{pinned}"
    );
    let listed = kbs.resources("alice");
    assert!(listed.contains(resource), "{listed}");
    assert!(listed.contains("\"has_data\":false"), "{listed}");

    let started = daemon.json(ALICE, ["vm", "start", "vault"]);
    assert_eq!(started["state"], "running", "{started}");
    let first = wait_for(&daemon, "vault", &VERDICTS, 1);
    assert!(
        first.contains("HSEV-DISK-UNLOCKED /mnt/data boot=1"),
        "{first}"
    );
    assert_eq!(first.matches(FORMATS).count(), 1, "formatted once: {first}");
    let shown = wait_for_attestation(&daemon, "vault", "released");
    assert_eq!(shown["measurements_equal"], true, "{shown}");
    assert!(
        kbs.resources("alice").contains("\"has_data\":true"),
        "the broker generated the key at the first release"
    );

    let rebooted = daemon.json(ALICE, ["vm", "reboot", "vault"]);
    assert_eq!(rebooted["state"], "running", "{rebooted}");
    let second = wait_for(&daemon, "vault", &VERDICTS, 2);
    assert!(
        second.contains("HSEV-DISK-UNLOCKED /mnt/data boot=2"),
        "the second boot finds the first boot's log: {second}"
    );
    assert_eq!(
        second.matches(FORMATS).count(),
        1,
        "the second boot only opens the disk: {second}"
    );
    wait_for_attestation(&daemon, "vault", "released");

    // The host holds the disk, never its key: what the guest wrote is not
    // in the file, and no key the host could guess opens it.
    let stopped = daemon.json(ALICE, ["vm", "stop", "vault", "--force"]);
    assert_eq!(stopped["state"], "stopped");
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

    // Deleting the VM is the host's business; revoking the key is the
    // tenant's, at its own broker.
    let deleted = daemon.hsev(ALICE, ["vm", "delete", "vault", "--yes"]);
    assert!(deleted.status.success(), "{}", text(&deleted.stderr));
    let url = kbs.url();
    let pin = kbs.pin();
    let token = kbs.tenant_token_file("alice");
    let revoked = daemon.hsev(
        ALICE,
        [
            "kbs",
            "policy",
            "delete",
            "--broker",
            &url,
            "--broker-pin",
            &pin,
            "--broker-token-file",
            path(&token),
            "--resource",
            resource,
        ],
    );
    assert!(revoked.status.success(), "{}", text(&revoked.stderr));
    let listed = kbs.resources("alice");
    assert!(!listed.contains(resource), "revoked: {listed}");
    kbs.verify_audit();
}

fn a_host_that_changes_the_kernel_initrd_or_command_line_gets_no_key(driver: Driver) {
    let (kbs, daemon) = pool_on(driver, KbsMode::Development, "");
    let vm = create_encrypted(&daemon, &kbs, "vault", &[]);
    let id = vm["id"].as_str().expect("id");
    pin_policy(&daemon, &kbs, "vault");
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
        let console = wait_for(&daemon, "vault", &VERDICTS, boots);
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

    // No key was ever released: the disk is as hsevd made it, empty.
    let disk = std::fs::read(encrypted_disk(&daemon, id)).expect("disk");
    assert!(disk.iter().all(|&byte| byte == 0), "never formatted");
    assert!(kbs.resources("alice").contains("\"has_data\":false"));
    kbs.verify_audit();
}

#[test]
fn a_debug_policy_or_a_production_key_broker_refuses_the_key() {
    let (kbs, daemon) = pool_on(
        Driver::Qemu,
        KbsMode::Development,
        "allow_debug_policy = true",
    );
    // Debug allowed by the guest policy: the host could read the guest.
    create_encrypted(&daemon, &kbs, "debuggable", &["--policy", "0xb0000"]);
    pin_policy(&daemon, &kbs, "debuggable");
    let started = daemon.json(ALICE, ["vm", "start", "debuggable"]);
    assert_eq!(started["state"], "running", "{started}");
    wait_for(&daemon, "debuggable", &["HSEV-KBS-REFUSED"], 1);
    let shown = wait_for_attestation(&daemon, "debuggable", "refused");
    let reason = shown["attestation"]["reason"].as_str().expect("reason");
    assert!(reason.contains("debug"), "{reason}");

    // A key broker in production mode never trusts the simulated Secure
    // Processor, whatever the resource's policy says.
    let (kbs, daemon) = pool_on(Driver::Qemu, KbsMode::Production, "");
    create_encrypted(&daemon, &kbs, "simulated", &[]);
    pin_policy(&daemon, &kbs, "simulated");
    let started = daemon.json(ALICE, ["vm", "start", "simulated"]);
    assert_eq!(started["state"], "running", "{started}");
    wait_for(&daemon, "simulated", &["HSEV-KBS-REFUSED"], 1);
    let shown = wait_for_attestation(&daemon, "simulated", "refused");
    let reason = shown["attestation"]["reason"].as_str().expect("reason");
    assert!(reason.contains("simulated"), "{reason}");
}

#[test]
fn a_key_broker_killed_mid_way_loses_nothing_and_the_guest_recovers() {
    let (mut kbs, daemon) = pool_on(Driver::Qemu, KbsMode::Development, "");
    create_encrypted(&daemon, &kbs, "vault", &[]);
    pin_policy(&daemon, &kbs, "vault");
    // The policy is pinned; the broker dies before the guest asks.
    kbs.kill_9();
    let started = daemon.json(ADMIN, ["vm", "start", "vault"]);
    assert_eq!(started["state"], "running");
    let console = wait_for(&daemon, "vault", &["unreachable"], 1);
    assert!(!console.contains("HSEV-DISK-UNLOCKED"), "{console}");
    kbs.restart();
    let console = wait_for(&daemon, "vault", &VERDICTS, 1);
    assert!(
        console.contains("HSEV-DISK-UNLOCKED /mnt/data boot=1"),
        "{console}"
    );
    wait_for_attestation(&daemon, "vault", "released");
    kbs.verify_audit();
}

#[test]
fn the_tenant_pins_only_a_vm_whose_guest_names_its_own_broker() {
    let (kbs, daemon) = pool_on(Driver::Fake, KbsMode::Development, "");
    create_encrypted(&daemon, &kbs, "vault", &[]);
    // Another tenant's repository, or a broker with another key: the
    // measurement would pin what the host chose, so nothing is pinned.
    let refused = PolicyCall {
        repository: "bob",
        ..PolicyCall::alice(&kbs)
    }
    .run(&daemon, "vault");
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stdout));
    assert!(
        text(&refused.stderr).contains("repository \"alice\""),
        "{}",
        text(&refused.stderr)
    );
    let impostor = Kbs::start(KbsMode::Development);
    let refused = PolicyCall {
        broker_url: impostor.url(),
        broker_pin: impostor.pin(),
        ..PolicyCall::alice(&kbs)
    }
    .run(&daemon, "vault");
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stdout));
    let said = text(&refused.stderr);
    assert!(
        said.contains(&kbs.pin()) && said.contains(&impostor.pin()),
        "both pins named: {said}"
    );
    assert!(!kbs.resources("alice").contains("disk-key"));

    // The operator's token can announce the VM, never pin its policy.
    let operator = PolicyCall {
        caller: ADMIN,
        token_file: kbs.operator_token_file(),
        ..PolicyCall::alice(&kbs)
    }
    .run(&daemon, "vault");
    assert_eq!(operator.status.code(), Some(2));
    assert!(
        text(&operator.stderr).contains("403") && text(&operator.stderr).contains("operator role"),
        "{}",
        text(&operator.stderr)
    );
    let announced = daemon.hsev(
        ADMIN,
        [
            "kbs",
            "announce",
            "--broker",
            &kbs.url(),
            "--broker-pin",
            &kbs.pin(),
            "--broker-token-file",
            path(&kbs.operator_token_file()),
            "--vm",
            "vault",
        ],
    );
    assert!(announced.status.success(), "{}", text(&announced.stderr));
    // The tenant's own pin shows the operator's figure beside its own.
    let pinned = pin_policy(&daemon, &kbs, "vault");
    assert!(pinned.contains("operator announced"), "{pinned}");
    assert_eq!(pinned.matches("EQUAL").count(), 2, "{pinned}");
}

/// The conformance part, once per driver that runs guests.
macro_rules! on_driver {
    ($module:ident, $driver:expr) => {
        mod $module {
            #[test]
            fn the_guest_formats_its_empty_disk_at_first_boot_and_its_data_survives_a_reboot() {
                super::the_guest_formats_its_empty_disk_at_first_boot_and_its_data_survives_a_reboot(
                    $driver,
                )
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

/// `hsev kbs lease show` of `resource`, as alice.
fn lease_of(daemon: &Daemon, kbs: &Kbs, resource: &str) -> serde_json::Value {
    let token = kbs.tenant_token_file("alice");
    daemon.json(
        ALICE,
        [
            "kbs",
            "lease",
            "show",
            "--broker",
            &kbs.url(),
            "--broker-pin",
            &kbs.pin(),
            "--broker-token-file",
            path(&token),
            "--resource",
            resource,
        ],
    )
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal} {pid}");
}

/// A single-instance disk key: the guest keeps its lease while it can
/// reach the broker; cut off from it, the guest powers itself off before
/// the broker's lease lapses; the next launch then takes the key over, and
/// the disk's data with it.
#[test]
fn a_single_instance_guest_cut_off_from_its_broker_powers_off_before_its_lease_lapses() {
    const LEASE_SECONDS: u64 = 8;
    let (kbs, daemon) = pool_on(Driver::Qemu, KbsMode::Development, "");
    let vm = create_encrypted(&daemon, &kbs, "solo", &[]);
    let id = vm["id"].as_str().expect("id").to_owned();
    let resource = vm["spec"]["key_resource"]
        .as_str()
        .expect("resource")
        .to_owned();
    let lease = LEASE_SECONDS.to_string();
    pin_policy_with(&daemon, &kbs, "solo", &["--single-instance", &lease]);
    daemon.json(ALICE, ["vm", "start", "solo"]);
    let booted = wait_for(&daemon, "solo", &VERDICTS, 1);
    assert!(
        booted.contains("HSEV-DISK-UNLOCKED /mnt/data boot=1"),
        "{booted}"
    );
    // The agent then keeps the lease in the background.
    let keeping = format!("keeping its {LEASE_SECONDS} s lease");
    wait_for(&daemon, "solo", &[keeping.as_str()], 1);
    let first = lease_of(&daemon, &kbs, &resource);
    assert_eq!(first["live"], true, "{first}");

    // It renews: two lease lengths later, it still runs and holds the key.
    std::thread::sleep(Duration::from_secs(2 * LEASE_SECONDS));
    let held = lease_of(&daemon, &kbs, &resource);
    assert_eq!(held["live"], true, "{held}");
    assert_eq!(held["report_id"], first["report_id"], "{held}");
    assert_ne!(held["expires_at"], first["expires_at"], "renewed: {held}");
    let running = qemu_processes_of(&id);
    assert_eq!(running.len(), 1, "one QEMU for {id}");
    assert!(!console_of_fence(&daemon));

    // Cut off: the broker answers nothing (stopped, not refusing).
    signal(kbs.pid(), "-STOP");
    let cut = Instant::now();
    while !qemu_processes_of(&id).is_empty() {
        assert!(
            cut.elapsed() < Duration::from_secs(3 * LEASE_SECONDS),
            "the cut-off guest still runs after {:?}:\n{}",
            cut.elapsed(),
            console(&daemon, "solo")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let gone_at = time::OffsetDateTime::now_utc();
    let gone_after = cut.elapsed();
    signal(kbs.pid(), "-CONT");
    let lapsed = lease_of(&daemon, &kbs, &resource);
    let lapses_at = time::OffsetDateTime::parse(
        lapsed["expires_at"].as_str().expect("expires_at"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("RFC 3339");
    println!(
        "guest off {:.2} s after the cut, {:.2} s before the broker's lease lapsed",
        gone_after.as_secs_f64(),
        (lapses_at - gone_at).as_seconds_f64()
    );
    assert!(
        gone_at < lapses_at,
        "the guest ran until {gone_at}, past the lease's end {lapses_at}"
    );
    assert!(console_of_fence(&daemon), "{}", console(&daemon, "solo"));

    // The next launch takes the key over once the lease lapsed, and finds
    // the first boot's data.
    while time::OffsetDateTime::now_utc() < lapses_at {
        std::thread::sleep(Duration::from_millis(200));
    }
    daemon.wait_vm(ALICE, "solo", Duration::from_secs(30), |vm| {
        vm["state"] == "stopped"
    });
    daemon.json(ALICE, ["vm", "start", "solo"]);
    let again = wait_for(
        &daemon,
        "solo",
        &["HSEV-DISK-UNLOCKED /mnt/data boot=2", "HSEV-KBS-REFUSED"],
        1,
    );
    assert!(
        again.contains("HSEV-DISK-UNLOCKED /mnt/data boot=2"),
        "{again}"
    );
    let successor = lease_of(&daemon, &kbs, &resource);
    assert_ne!(successor["report_id"], first["report_id"], "{successor}");
    let log = std::fs::read_to_string(kbs.state_dir().join("audit.jsonl")).expect("audit");
    assert!(log.contains("taking over from report_id"), "{log}");
    kbs.verify_audit();
}

/// Whether the guest's console shows that it fenced itself.
fn console_of_fence(daemon: &Daemon) -> bool {
    console(daemon, "solo").contains("HSEV-FENCED")
}
