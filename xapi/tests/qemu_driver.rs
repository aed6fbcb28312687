//! The QEMU driver against real QEMU processes (TCG here: this host's KVM
//! cannot run Linux guests, and the probe says so).
//!
//! What each test boots:
//! - the guest image `make image` builds (images/out: Debian cloud kernel +
//!   busybox initramfs printing `HSEV-GUEST-READY`), direct-booted with
//!   QEMU's default BIOS, when images/out has a kernel and initrd; the two
//!   files are copied first, so a rebuild of the image meanwhile does not
//!   pull them from under a running test;
//! - otherwise `/usr/share/ovmf/OVMF.fd` alone, no disk: the firmware
//!   reaches its UEFI shell, printing to the serial console on the way.
//!
//! Nothing skips: without `qemu-system-x86_64` every test fails with "run
//! `make deps`". One QEMU runs at a time (2 cores: parallel TCG guests
//! would slow each other and blur the timings), and every QEMU a test starts
//! is killed when the test ends, pass or fail ([`Cleanup`]).

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hsev_e2e::workspace_root;
use hsev_xapi::hypervisor::qemu::process::{Liveness, ProcessIdentity};
use hsev_xapi::hypervisor::qemu::qmp::{QmpClient, QmpError};
use hsev_xapi::hypervisor::{
    Accelerator, AcceleratorSetting, Boot, ConfidentialLaunch, Disk, DriverError, ExitReason,
    HypervisorDriver, LaunchSpec, QemuConfig, QemuDriver, RuntimeState, StopMode, StopOutcome,
};
use hsev_xapi::model::{PortForward, VmId, VmRuntime};

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
const MARKER: &str = "HSEV-GUEST-READY";

/// One QEMU at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Kills every recorded QEMU (if still the same process) when dropped.
#[derive(Default)]
struct Cleanup(Vec<ProcessIdentity>);

impl Cleanup {
    fn watch(&mut self, runtime: &VmRuntime) {
        self.0.push(ProcessIdentity {
            pid: runtime.pid,
            start_ticks: runtime.start_ticks,
        });
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for identity in &self.0 {
            if identity.kill().unwrap_or(false) {
                let _ = identity.wait_exit(Duration::from_secs(10));
            }
        }
    }
}

fn driver() -> QemuDriver {
    assert!(
        Path::new(QEMU).is_file(),
        "{QEMU} is missing: run `make deps`"
    );
    QemuDriver::new(QemuConfig::default()).expect("default config is valid")
}

/// What a test boots: the image's kernel (copied into `dir`) or OVMF alone.
#[derive(Debug, Clone)]
enum Guest {
    Kernel { kernel: PathBuf, initrd: PathBuf },
    OvmfOnly,
}

impl Guest {
    fn pick(dir: &Path) -> Guest {
        let boot = std::env::var_os("HSEV_IMAGE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("images/out"))
            .join("boot");
        let kernel = dir.join("vmlinuz");
        let initrd = dir.join("initrd.img");
        let copied = std::fs::copy(boot.join("vmlinuz"), &kernel).is_ok()
            && std::fs::copy(boot.join("initrd.img"), &initrd).is_ok();
        if copied {
            Guest::Kernel { kernel, initrd }
        } else {
            assert!(
                Path::new(OVMF).is_file(),
                "{OVMF} is missing: run `make deps`"
            );
            println!("no guest image in {}: booting OVMF alone", boot.display());
            Guest::OvmfOnly
        }
    }

    fn boot(&self, init_options: &str) -> Boot {
        match self {
            Guest::Kernel { kernel, initrd } => Boot::Direct {
                firmware: None,
                kernel: kernel.clone(),
                initrd: Some(initrd.clone()),
                cmdline: format!("console=ttyS0 panic=-1 {init_options}"),
            },
            Guest::OvmfOnly => Boot::Firmware {
                ovmf: PathBuf::from(OVMF),
                disk: None,
            },
        }
    }

    /// A line the console shows once per boot.
    fn boot_line(&self) -> &'static str {
        match self {
            Guest::Kernel { .. } => "Linux version",
            // Without a disk OVMF tries the NIC first (PXE, then HTTP).
            Guest::OvmfOnly => ">>Start PXE over IPv4",
        }
    }
}

fn spec(dir: &Path, name: &str, boot: Boot) -> LaunchSpec {
    LaunchSpec {
        vm_id: VmId(format!(
            "00000000-0000-4000-8000-{:012x}",
            std::process::id()
        )),
        name: name.to_owned(),
        run_dir: dir.join(name),
        vcpus: 1,
        memory_mib: 256,
        cpu_model: None,
        boot,
        disks: Vec::new(),
        port_forwards: Vec::new(),
        confidential: ConfidentialLaunch::None,
        agent_channel: None,
        attest_channel: None,
    }
}

fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn console(runtime: &VmRuntime) -> String {
    String::from_utf8_lossy(&std::fs::read(&runtime.console_log).unwrap_or_default()).into_owned()
}

fn start(driver: &QemuDriver, cleanup: &mut Cleanup, spec: &LaunchSpec) -> VmRuntime {
    let runtime = driver
        .start(spec)
        .unwrap_or_else(|error| panic!("start of {}: {error}", spec.name));
    cleanup.watch(&runtime);
    runtime
}

/// The process ended and was reaped (by the driver that started it).
fn assert_gone(runtime: &VmRuntime) {
    let identity = ProcessIdentity {
        pid: runtime.pid,
        start_ticks: runtime.start_ticks,
    };
    let liveness = identity.liveness().expect("liveness");
    assert!(
        matches!(liveness, Liveness::Gone | Liveness::Recycled),
        "pid {} is {liveness:?}",
        runtime.pid
    );
}

/// Runs, the console grows, the console path is reported, force stop.
#[test]
fn runs_and_the_console_grows() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = driver();
    let guest = Guest::pick(dir.path());
    let mut cleanup = Cleanup::default();
    let launch = spec(dir.path(), "console", guest.boot("hsev.exit=idle"));
    let runtime = start(&driver, &mut cleanup, &launch);
    assert_eq!(
        driver.state(&runtime).expect("state"),
        RuntimeState::Running
    );
    // A second start in the same run dir would steal its QMP socket.
    let error = driver.start(&launch).expect_err("run dir in use");
    assert!(
        matches!(
            error,
            DriverError::InvalidSpec {
                field: "run_dir",
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(
        driver.console_log(&runtime).expect("console"),
        dir.path().join("console/console.log")
    );
    // The VMM runs in its own session, detached from the test.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", runtime.pid)).expect("stat");
    let session: u32 = stat[stat.rfind(')').expect("comm") + 2..]
        .split_whitespace()
        .nth(3)
        .and_then(|field| field.parse().ok())
        .expect("session field");
    assert_eq!(session, runtime.pid, "QEMU leads its own session");

    wait_until(Duration::from_secs(120), "first console output", || {
        !console(&runtime).is_empty()
    });
    let first = console(&runtime).len();
    wait_until(Duration::from_secs(120), "the console growing", || {
        let now = console(&runtime);
        now.len() > first && now.contains(guest.boot_line())
    });
    println!(
        "console: {} bytes, then {} bytes",
        first,
        console(&runtime).len()
    );
    let outcome = driver.stop(&runtime, StopMode::Force).expect("stop");
    assert!(matches!(outcome, StopOutcome::Forced { .. }), "{outcome:?}");
    assert_gone(&runtime);
    assert!(
        matches!(
            driver.state(&runtime).expect("state"),
            RuntimeState::Exited(ExitReason::ProcessExited { .. })
        ),
        "stopped VM is exited"
    );
    assert!(!runtime.qmp_socket.exists(), "the QMP socket is removed");
}

/// The image's kernel boots to its marker; a forwarded port (host port 0)
/// is reported and QEMU listens on it; the guest's own power-off is
/// reported as `GuestShutdown`, and stopping it then is graceful. With OVMF
/// alone: the port forward only.
#[test]
fn boots_forwards_a_port_and_reports_guest_poweroff() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = driver();
    let guest = Guest::pick(dir.path());
    let mut launch = spec(
        dir.path(),
        "poweroff",
        guest.boot("hsev.net=user hsev.exit=poweroff"),
    );
    launch.port_forwards = vec![PortForward {
        host_port: 0,
        guest_port: 22,
    }];
    let mut cleanup = Cleanup::default();
    let started = Instant::now();
    let runtime = start(&driver, &mut cleanup, &launch);
    let forward = runtime.port_forwards[0];
    assert_ne!(forward.host_port, 0, "host port 0 is resolved");
    assert_eq!(forward.guest_port, 22);
    TcpStream::connect(("127.0.0.1", forward.host_port))
        .unwrap_or_else(|error| panic!("QEMU listens on {}: {error}", forward.host_port));
    let argv = std::fs::read(format!("/proc/{}/cmdline", runtime.pid)).expect("cmdline");
    let expected = format!("hostfwd=tcp:127.0.0.1:{}-:22", forward.host_port);
    assert!(String::from_utf8_lossy(&argv).contains(&expected));

    match guest {
        Guest::Kernel { .. } => {
            wait_until(Duration::from_secs(180), MARKER, || {
                console(&runtime).contains(MARKER)
            });
            println!("guest marker after {:?}", started.elapsed());
            // hsev.exit=poweroff: the guest powers off; QEMU stays, paused.
            wait_until(Duration::from_secs(60), "guest power-off", || {
                driver.state(&runtime).expect("state")
                    == RuntimeState::Exited(ExitReason::GuestShutdown)
            });
            let outcome = driver
                .stop(
                    &runtime,
                    StopMode::Graceful {
                        timeout: Duration::from_secs(5),
                    },
                )
                .expect("stop");
            assert_eq!(outcome, StopOutcome::Graceful);
        }
        Guest::OvmfOnly => {
            driver.stop(&runtime, StopMode::Force).expect("stop");
        }
    }
    assert_gone(&runtime);
}

/// The power button on a guest that ignores it (busybox init has no ACPI
/// handler, nor has OVMF's shell): after the timeout the stop is forced.
#[test]
fn graceful_stop_falls_back_to_force() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = driver();
    let guest = Guest::pick(dir.path());
    let mut cleanup = Cleanup::default();
    let runtime = start(
        &driver,
        &mut cleanup,
        &spec(dir.path(), "graceful", guest.boot("hsev.exit=idle")),
    );
    let asked = Instant::now();
    let outcome = driver
        .stop(
            &runtime,
            StopMode::Graceful {
                timeout: Duration::from_secs(2),
            },
        )
        .expect("stop");
    let took = asked.elapsed();
    match outcome {
        StopOutcome::Forced { reason } => {
            assert!(reason.contains("did not power off within"), "{reason}");
        }
        other => panic!("expected a forced stop, got {other:?}"),
    }
    assert!(
        took >= Duration::from_secs(2),
        "waited the timeout: {took:?}"
    );
    assert_gone(&runtime);
    // Stopping again: nothing to stop.
    assert!(matches!(
        driver.stop(&runtime, StopMode::Force).expect("stop"),
        StopOutcome::AlreadyExited(_)
    ));
}

/// `reboot` resets the guest: its boot line appears a second time.
#[test]
fn reboot_resets_the_guest() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = driver();
    let guest = Guest::pick(dir.path());
    let mut cleanup = Cleanup::default();
    let runtime = start(
        &driver,
        &mut cleanup,
        &spec(dir.path(), "reboot", guest.boot("hsev.exit=idle")),
    );
    let line = guest.boot_line();
    wait_until(Duration::from_secs(120), "first boot", || {
        console(&runtime).matches(line).count() == 1
    });
    driver.reboot(&runtime).expect("reboot");
    assert_eq!(
        driver.state(&runtime).expect("state"),
        RuntimeState::Running
    );
    wait_until(Duration::from_secs(120), "second boot", || {
        console(&runtime).matches(line).count() >= 2
    });
    driver.stop(&runtime, StopMode::Force).expect("stop");
}

/// A new driver object adopts a VM the old one started; identity checks
/// refuse a runtime that is not this process.
#[test]
fn adopts_after_losing_the_driver() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let guest = Guest::pick(dir.path());
    let mut cleanup = Cleanup::default();
    let runtime = {
        let first = driver();
        start(
            &first,
            &mut cleanup,
            &spec(dir.path(), "adopt", guest.boot("hsev.exit=idle")),
        )
        // `first` is dropped here: the VM must not care.
    };
    let second = driver();
    assert_eq!(
        second.adopt(&runtime).expect("adopt"),
        RuntimeState::Running
    );
    assert_eq!(
        second.state(&runtime).expect("state"),
        RuntimeState::Running
    );

    // The same pid with another start time: a recycled pid, not our VM.
    let recycled = VmRuntime {
        start_ticks: runtime.start_ticks + 1,
        ..runtime.clone()
    };
    assert_eq!(
        second.adopt(&recycled).expect("adopt"),
        RuntimeState::Exited(ExitReason::PidReused { pid: runtime.pid })
    );
    // The right process but another VM's socket.
    let foreign = VmRuntime {
        qmp_socket: dir.path().join("someone-else/qmp.sock"),
        ..runtime.clone()
    };
    let error = second.adopt(&foreign).expect_err("not ours");
    assert!(matches!(error, DriverError::NotOurs { .. }), "{error}");

    second.stop(&runtime, StopMode::Force).expect("stop");
    // The test process is still QEMU's parent, and the driver that could
    // reap it is gone: a zombie is as ended as it gets here.
    assert_ended(&runtime);
}

/// The process ended; it may wait for a parent other than the driver to
/// reap it.
fn assert_ended(runtime: &VmRuntime) {
    let identity = ProcessIdentity {
        pid: runtime.pid,
        start_ticks: runtime.start_ticks,
    };
    assert_ne!(identity.liveness().expect("liveness"), Liveness::Alive);
}

/// The env var that turns [`daemon_helper_process`] into a "daemon".
const HELPER_ENV: &str = "HSEV_QEMU_DRIVER_HELPER_DIR";

/// Not a test on its own: when [`HELPER_ENV`] names a folder, this process
/// plays the daemon (starts a VM, writes its runtime, then waits to be
/// killed); otherwise it returns at once.
#[test]
fn daemon_helper_process() {
    let Some(dir) = std::env::var_os(HELPER_ENV).map(PathBuf::from) else {
        return;
    };
    let driver = driver();
    let guest = Guest::pick(&dir);
    let runtime = driver
        .start(&spec(&dir, "helper", guest.boot("hsev.exit=idle")))
        .expect("helper start");
    let record = serde_json::to_vec(&runtime).expect("runtime JSON");
    std::fs::write(dir.join("runtime.json.tmp"), record).expect("write");
    std::fs::rename(dir.join("runtime.json.tmp"), dir.join("runtime.json")).expect("rename");
    std::thread::sleep(Duration::from_secs(600));
}

/// The "daemon" that started a VM is killed with SIGKILL; the VM survives
/// and a new driver adopts it.
#[test]
fn survives_the_daemon_being_killed() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = driver();
    // /proc/self/exe: still this binary if a rebuild replaced the file.
    let mut helper = Command::new("/proc/self/exe")
        .args(["--exact", "daemon_helper_process", "--nocapture"])
        .env(HELPER_ENV, dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("helper");
    let record = dir.path().join("runtime.json");
    let mut cleanup = Cleanup::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !record.exists() {
        if let Some(status) = helper.try_wait().expect("try_wait") {
            panic!("the helper ended ({status}) before starting its VM");
        }
        assert!(Instant::now() < deadline, "the helper never started its VM");
        std::thread::sleep(Duration::from_millis(20));
    }
    let runtime: VmRuntime =
        serde_json::from_slice(&std::fs::read(&record).expect("read")).expect("runtime");
    cleanup.watch(&runtime);

    helper.kill().expect("SIGKILL the helper");
    helper.wait().expect("reap the helper");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        driver.adopt(&runtime).expect("adopt"),
        RuntimeState::Running,
        "QEMU outlived its daemon"
    );
    driver.stop(&runtime, StopMode::Force).expect("stop");
    // Orphaned by the helper, QEMU is reaped by init, when init gets to it.
    assert_ended(&runtime);
}

/// A QEMU killed with SIGKILL is `Exited`, saying so.
#[test]
fn sigkilled_qemu_is_reported_exited() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = driver();
    let guest = Guest::pick(dir.path());
    let mut cleanup = Cleanup::default();
    let runtime = start(
        &driver,
        &mut cleanup,
        &spec(dir.path(), "killed", guest.boot("hsev.exit=idle")),
    );
    let identity = ProcessIdentity {
        pid: runtime.pid,
        start_ticks: runtime.start_ticks,
    };
    assert!(identity.kill().expect("kill"));
    assert!(identity.wait_exit(Duration::from_secs(10)).expect("wait"));
    match driver.state(&runtime).expect("state") {
        RuntimeState::Exited(ExitReason::ProcessExited { detail }) => {
            println!("SIGKILL: {detail}");
            assert!(
                detail.contains("SIGKILL") || detail.contains("signal: 9"),
                "{detail}"
            );
        }
        other => panic!("expected Exited, got {other:?}"),
    }
    // Another driver (not its parent) sees it gone too.
    assert!(matches!(
        self::driver().state(&runtime).expect("state"),
        RuntimeState::Exited(ExitReason::ProcessExited { .. })
    ));
    let error = driver.reboot(&runtime).expect_err("nothing to reboot");
    assert!(matches!(error, DriverError::NotRunning(_)), "{error}");
}

/// QEMU quitting by itself (QMP `quit` from elsewhere) is `Exited`.
#[test]
fn qmp_quit_is_reported_exited() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = driver();
    let guest = Guest::pick(dir.path());
    let mut cleanup = Cleanup::default();
    let runtime = start(
        &driver,
        &mut cleanup,
        &spec(dir.path(), "quit", guest.boot("hsev.exit=idle")),
    );
    let mut client = QmpClient::connect(&runtime.qmp_socket, Duration::from_secs(5)).expect("QMP");
    match client.execute("quit", None) {
        Ok(_) | Err(QmpError::Closed) => {}
        Err(error) => panic!("quit: {error}"),
    }
    drop(client);
    wait_until(Duration::from_secs(10), "QEMU exiting", || {
        matches!(
            driver.state(&runtime),
            Ok(RuntimeState::Exited(ExitReason::ProcessExited { .. }))
        )
    });
    assert_gone(&runtime);
}

/// Disks: created (qcow2, refused over an existing file), attached, wiped.
#[test]
fn disks_are_created_attached_and_wiped() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = driver();
    let disk = dir.path().join("data.qcow2");
    driver.create_disk(&disk, 64).expect("create");
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&disk)
        .output()
        .expect("qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("info JSON");
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 64 << 20);
    assert!(driver.create_disk(&disk, 64).is_err(), "no overwrite");

    let guest = Guest::pick(dir.path());
    let mut launch = spec(dir.path(), "disks", guest.boot("hsev.exit=idle"));
    launch.disks = vec![Disk::qcow2(&disk)];
    let mut cleanup = Cleanup::default();
    let runtime = start(&driver, &mut cleanup, &launch);
    let mut client = QmpClient::connect(&runtime.qmp_socket, Duration::from_secs(5)).expect("QMP");
    let blocks = client.execute("query-block", None).expect("query-block");
    let attached = blocks
        .as_array()
        .expect("array")
        .iter()
        .find(|block| block["device"] == "disk0")
        .unwrap_or_else(|| panic!("disk0 in {blocks}"));
    assert_eq!(attached["inserted"]["file"], disk.display().to_string());
    drop(client);
    driver.stop(&runtime, StopMode::Force).expect("stop");

    let length = std::fs::metadata(&disk).expect("metadata").len();
    driver.wipe_disk(&disk).expect("wipe");
    let mut bytes = Vec::new();
    std::fs::File::open(&disk)
        .expect("open")
        .read_to_end(&mut bytes)
        .expect("read");
    assert_eq!(bytes.len() as u64, length);
    assert!(bytes.iter().all(|byte| *byte == 0), "every byte is zero");
    std::fs::remove_file(&disk).expect("the caller removes it");
}

/// A simulated-SNP guest gets the channel socket, and QEMU listens on it.
#[test]
fn simulated_snp_gets_its_channel() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = driver();
    let guest = Guest::pick(dir.path());
    let mut launch = spec(dir.path(), "simsnp", guest.boot("hsev.exit=idle"));
    let channel = dir.path().join("simsnp/sim-sp.sock");
    launch.confidential = ConfidentialLaunch::SimulatedSnp {
        channel_socket: channel.clone(),
        kernel_hashes_page: None,
    };
    println!(
        "simulated-SNP argv: {}",
        driver.command_line(&launch).expect("argv").join(" ")
    );
    let mut cleanup = Cleanup::default();
    let runtime = start(&driver, &mut cleanup, &launch);
    assert_eq!(runtime.sim_channel.as_deref(), Some(channel.as_path()));
    UnixStream::connect(&channel).expect("QEMU listens on the channel");
    let mut client = QmpClient::connect(&runtime.qmp_socket, Duration::from_secs(5)).expect("QMP");
    let ports = client
        .execute(
            "qom-list",
            Some(serde_json::json!({"path": "/machine/peripheral-anon"})),
        )
        .expect("qom-list");
    assert!(!ports.as_array().expect("array").is_empty());
    let chardevs = client
        .execute("query-chardev", None)
        .expect("query-chardev");
    assert!(
        chardevs
            .as_array()
            .expect("array")
            .iter()
            .any(|chardev| chardev["label"] == "simsp"),
        "{chardevs}"
    );
    drop(client);
    driver.stop(&runtime, StopMode::Force).expect("stop");
}

/// Where the probe finds no SEV-SNP, an SNP launch is refused before any
/// process starts, with the probe's reason.
#[test]
fn probe_and_clean_refusal_of_sev_snp() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = driver();
    let started = Instant::now();
    let capabilities = driver.probe().expect("probe");
    println!(
        "probe in {:?}: {} {} on {} ({}); SEV: {}; {} CPUs, {} MiB",
        started.elapsed(),
        capabilities.driver,
        capabilities.version,
        capabilities.accelerator,
        capabilities.accelerator_reason,
        capabilities.sev.reason,
        capabilities.host_cpus,
        capabilities.host_memory_mib
    );
    assert!(capabilities.version.starts_with("QEMU emulator version"));
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("cpuinfo");
    if !cpuinfo
        .split_whitespace()
        .any(|flag| flag == "svm" || flag == "vmx")
    {
        assert_eq!(capabilities.accelerator, Accelerator::Tcg);
        assert!(capabilities.accelerator_reason.contains("no svm/vmx flag"));
    }
    if capabilities.sev.sev_snp {
        return;
    }
    let mut launch = spec(
        dir.path(),
        "snp",
        Boot::Direct {
            firmware: Some(PathBuf::from(OVMF)),
            kernel: PathBuf::from("/nonexistent/vmlinuz"),
            initrd: None,
            cmdline: String::new(),
        },
    );
    launch.confidential = ConfidentialLaunch::SevSnp {
        policy: 0x30000,
        host_data: [7; 32],
        kernel_hashes: true,
        id_block: None,
    };
    let error = driver.start(&launch).expect_err("no SNP here");
    println!("SNP refused: {error}");
    assert!(matches!(error, DriverError::Unsupported(_)), "{error}");
    assert!(!launch.run_dir.exists(), "nothing was started");
}

/// Forcing KVM where it cannot run guests: QEMU stops the guest on an
/// emulation failure, reported as an internal error (at start or after).
#[test]
fn forced_kvm_that_cannot_run_guests_is_an_internal_error() {
    let _serial = one_at_a_time();
    let probe = driver().probe().expect("probe");
    if probe.kvm.runs_guests() || probe.kvm.open_error.is_some() {
        println!("KVM runs guests here (or is absent): nothing to show");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = QemuDriver::new(QemuConfig {
        accelerator: AcceleratorSetting::Kvm,
        ..QemuConfig::default()
    })
    .expect("driver");
    let mut launch = spec(
        dir.path(),
        "kvm",
        Boot::Firmware {
            ovmf: PathBuf::from(OVMF),
            disk: None,
        },
    );
    // `host` (the KVM default) aborts on MSR 0x10a here.
    launch.cpu_model = Some("qemu64".into());
    let mut cleanup = Cleanup::default();
    match driver.start(&launch) {
        Err(error) => {
            println!("forced KVM start: {error}");
            assert!(error.to_string().contains("internal-error"), "{error}");
        }
        Ok(runtime) => {
            cleanup.watch(&runtime);
            wait_until(Duration::from_secs(30), "the internal error", || {
                driver.state(&runtime).expect("state")
                    == RuntimeState::Exited(ExitReason::InternalError)
            });
            driver.stop(&runtime, StopMode::Force).expect("stop");
        }
    }
}

/// Without QEMU, starting fails and says what to run.
#[test]
fn missing_qemu_says_make_deps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = QemuDriver::new(QemuConfig {
        binary: PathBuf::from("/nonexistent/qemu-system-x86_64"),
        ..QemuConfig::default()
    })
    .expect("driver");
    let launch = spec(dir.path(), "none", Guest::OvmfOnly.boot(""));
    let error = driver.start(&launch).expect_err("no QEMU");
    let message = error.to_string();
    assert!(
        message.contains("/nonexistent/qemu-system-x86_64"),
        "{message}"
    );
    assert!(message.contains("make deps"), "{message}");
}

/// Start latency (start call to QMP answering `running`; guest boot not
/// included) over 10 starts, with where the time goes.
#[test]
fn start_latency() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = driver();
    let guest = Guest::pick(dir.path());
    driver
        .probe()
        .expect("probe once, as the daemon does at start");
    let mut cleanup = Cleanup::default();
    let mut samples = Vec::new();
    for round in 0..10 {
        let launch = spec(
            dir.path(),
            &format!("latency{round}"),
            guest.boot("hsev.exit=idle"),
        );
        let (runtime, timings) = driver.start_timed(&launch).expect("start");
        cleanup.watch(&runtime);
        samples.push(timings);
        driver.stop(&runtime, StopMode::Force).expect("stop");
    }
    let mut running: Vec<Duration> = samples.iter().map(|t| t.running).collect();
    running.sort();
    let p50 = running[running.len() / 2];
    let p99 = running[running.len() - 1];
    let mean = |pick: fn(&hsev_xapi::hypervisor::StartTimings) -> Duration| {
        samples.iter().map(pick).sum::<Duration>() / u32::try_from(samples.len()).unwrap_or(1)
    };
    println!(
        "start latency over {} starts ({guest:?}): p50 {p50:?}, p99 (max) {p99:?}; \
         mean: prepared {:?}, spawned {:?}, QMP ready {:?}, running {:?}",
        samples.len(),
        mean(|t| t.prepared),
        mean(|t| t.spawned),
        mean(|t| t.qmp_ready),
        mean(|t| t.running),
    );
    assert!(
        p50 < Duration::from_secs(2),
        "p50 start latency {p50:?} is far above the 150 ms target"
    );
}
