//! The driver conformance suite: one set of tests, run against every
//! hypervisor driver (`qemu::*`, `libvirt::*`, `fake::*`), then each
//! engine's own checks (`qemu_only`, `libvirt_only`).
//!
//! Each conformance test takes a [`Subject`]: the engine, a way to make a
//! fresh driver object on it (a restarted daemon), and a way to do behind
//! the driver's back what a crash does. Real engines run real guests (TCG
//! here: this host's KVM cannot run Linux guests, and the probe says so):
//! - the guest image `make image` builds (images/out: Debian cloud kernel +
//!   busybox initramfs printing `HSEV-GUEST-READY`), direct-booted with
//!   QEMU's default BIOS, when images/out has a kernel and initrd; the two
//!   files are copied first, so a rebuild of the image meanwhile does not
//!   pull them from under a running test;
//! - otherwise `/usr/share/ovmf/OVMF.fd` alone, no disk: the firmware
//!   reaches its UEFI shell, printing to the serial console on the way.
//!
//! The libvirt tests start their own `virtlogd` and `libvirtd`
//! ([`hsev_e2e::libvirt::Libvirtd`]) and stop them at the end. The fake
//! driver runs no guest: where a test needs one (a forwarded port that
//! answers, a power button a guest ignores) it checks what the fake does
//! instead, and where the fake cannot do something (SEV launches, adoption
//! after its daemon died) the test checks that it says so with
//! `Unsupported`.
//!
//! Nothing skips: without QEMU or libvirt every test of that engine fails
//! with "run `make deps`". One guest runs at a time (2 cores: parallel TCG
//! guests would slow each other and blur the timings), and every VM a test
//! starts is ended when the test ends, pass or fail.

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hsev_e2e::daemon::processes_mentioning;
use hsev_e2e::libvirt::Libvirtd;
use hsev_e2e::workspace_root;
use hsev_xapi::hypervisor::libvirt::{LibvirtConfig, LibvirtDriver};
use hsev_xapi::hypervisor::qemu::process::{Liveness, ProcessIdentity};
use hsev_xapi::hypervisor::{
    Boot, ConfidentialLaunch, Disk, DriverError, ExitReason, FakeDriver, HypervisorDriver,
    LaunchSpec, QemuConfig, QemuDriver, RuntimeState, StopMode, StopOutcome,
};
use hsev_xapi::model::{PortForward, VmId, VmRuntime};

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
const MARKER: &str = "HSEV-GUEST-READY";

/// One guest at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The engine under test.
enum Engine {
    Qemu,
    Libvirt(Libvirtd),
    Fake(Arc<FakeDriver>),
}

/// A driver under test, and what the suite does behind its back.
struct Subject {
    engine: Engine,
    driver: Arc<dyn HypervisorDriver>,
    /// VMs to end when the test ends.
    started: Mutex<Vec<VmRuntime>>,
}

impl Subject {
    fn qemu() -> Subject {
        assert!(
            Path::new(QEMU).is_file(),
            "{QEMU} is missing: run `make deps`"
        );
        Subject::with(Engine::Qemu)
    }

    fn libvirt() -> Subject {
        Subject::with(Engine::Libvirt(Libvirtd::start()))
    }

    fn fake() -> Subject {
        Subject::with(Engine::Fake(Arc::new(FakeDriver::default())))
    }

    fn with(engine: Engine) -> Subject {
        let driver = new_driver(&engine);
        Subject {
            engine,
            driver,
            started: Mutex::new(Vec::new()),
        }
    }

    /// A new driver object on the same engine, as a restarted daemon has.
    fn fresh_driver(&self) -> Arc<dyn HypervisorDriver> {
        match &self.engine {
            Engine::Fake(_) => Arc::new(FakeDriver::default()),
            engine => new_driver(engine),
        }
    }

    /// Whether real guests run (a console that shows a kernel, a port
    /// that answers, a guest that ignores the power button).
    fn runs_guests(&self) -> bool {
        !matches!(self.engine, Engine::Fake(_))
    }

    fn start(&self, spec: &LaunchSpec) -> VmRuntime {
        let runtime = self
            .driver
            .start(spec)
            .unwrap_or_else(|error| panic!("start of {}: {error}", spec.name));
        self.watch(&runtime);
        runtime
    }

    fn watch(&self, runtime: &VmRuntime) {
        self.started
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(runtime.clone());
    }

    /// Ends the VMM as a crash would, behind the driver's back.
    fn kill_vmm(&self, runtime: &VmRuntime) {
        match &self.engine {
            Engine::Qemu => {
                let identity = identity(runtime);
                assert!(identity.kill().expect("kill"));
                assert!(identity.wait_exit(Duration::from_secs(10)).expect("wait"));
            }
            Engine::Libvirt(_) => {
                let uuid = runtime.domain.clone().expect("a domain");
                // QEMU's command line names the domain's UUID (-uuid).
                let pids: Vec<u32> = processes_mentioning(Path::new(&uuid))
                    .into_iter()
                    .filter(|pid| {
                        std::fs::read_to_string(format!("/proc/{pid}/comm"))
                            .is_ok_and(|comm| comm.starts_with("qemu"))
                    })
                    .collect();
                assert!(!pids.is_empty(), "no QEMU process for domain {uuid}");
                for pid in &pids {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
                wait_until(Duration::from_secs(10), "QEMU gone", || {
                    pids.iter()
                        .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())
                });
            }
            Engine::Fake(fake) => fake.crash(runtime).expect("crash"),
        }
    }

    /// The disk files the running VM has attached, as the engine reports.
    fn attached_disks(&self, runtime: &VmRuntime) -> Option<Vec<PathBuf>> {
        match &self.engine {
            Engine::Qemu => {
                let mut client = hsev_xapi::hypervisor::qemu::qmp::QmpClient::connect(
                    &runtime.qmp_socket,
                    Duration::from_secs(5),
                )
                .expect("QMP");
                let blocks = client.execute("query-block", None).expect("query-block");
                Some(
                    blocks
                        .as_array()
                        .expect("array")
                        .iter()
                        .filter_map(|block| block["inserted"]["file"].as_str())
                        .map(PathBuf::from)
                        .collect(),
                )
            }
            Engine::Libvirt(daemon) => {
                let uuid = runtime.domain.clone().expect("a domain");
                let output = daemon.virsh(["domblklist", &uuid]);
                assert!(output.status.success(), "{output:?}");
                Some(
                    String::from_utf8_lossy(&output.stdout)
                        .lines()
                        .skip(2)
                        .filter_map(|line| line.split_whitespace().nth(1))
                        .map(PathBuf::from)
                        .collect(),
                )
            }
            Engine::Fake(_) => None,
        }
    }
}

fn new_driver(engine: &Engine) -> Arc<dyn HypervisorDriver> {
    match engine {
        Engine::Qemu => Arc::new(QemuDriver::new(QemuConfig::default()).expect("valid config")),
        Engine::Libvirt(daemon) => Arc::new(
            LibvirtDriver::new(LibvirtConfig {
                uri: daemon.uri(),
                ..LibvirtConfig::default()
            })
            .expect("valid config"),
        ),
        Engine::Fake(fake) => Arc::clone(fake) as Arc<dyn HypervisorDriver>,
    }
}

impl Drop for Subject {
    fn drop(&mut self) {
        let started =
            std::mem::take(&mut *self.started.lock().unwrap_or_else(PoisonError::into_inner));
        for runtime in started {
            match &self.engine {
                Engine::Qemu => {
                    let identity = identity(&runtime);
                    if identity.kill().unwrap_or(false) {
                        let _ = identity.wait_exit(Duration::from_secs(10));
                    }
                }
                // The daemon's drop destroys its domains; fakes are memory.
                Engine::Libvirt(_) | Engine::Fake(_) => {}
            }
        }
    }
}

fn identity(runtime: &VmRuntime) -> ProcessIdentity {
    ProcessIdentity {
        pid: runtime.pid,
        start_ticks: runtime.start_ticks,
    }
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
}

/// A line the console shows once per boot.
fn boot_line(subject: &Subject, guest: &Guest) -> &'static str {
    match (subject.runs_guests(), guest) {
        (false, _) => " boot ",
        (true, Guest::Kernel { .. }) => "Linux version",
        // Without a disk OVMF tries the NIC first (PXE, then HTTP).
        (true, Guest::OvmfOnly) => ">>Start PXE over IPv4",
    }
}

fn spec(dir: &Path, name: &str, boot: Boot) -> LaunchSpec {
    static COUNT: AtomicU32 = AtomicU32::new(0);
    LaunchSpec {
        vm_id: VmId(format!(
            "00000000-0000-4000-8000-{:06x}{:06x}",
            std::process::id() & 0xff_ffff,
            COUNT.fetch_add(1, Ordering::Relaxed)
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

fn is_process_exit(state: &RuntimeState) -> bool {
    matches!(
        state,
        RuntimeState::Exited(ExitReason::ProcessExited { .. })
    )
}

// --- the conformance tests --------------------------------------------------

/// Runs, the console grows, the console path is reported, a second start
/// in the same run dir is refused, force stop ends it.
fn runs_and_the_console_grows(subject: &Subject) {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = &subject.driver;
    let guest = Guest::pick(dir.path());
    let launch = spec(dir.path(), "console", guest.boot("hsev.exit=idle"));
    let runtime = subject.start(&launch);
    assert_eq!(runtime.driver, driver.name());
    assert_eq!(
        driver.state(&runtime).expect("state"),
        RuntimeState::Running
    );
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
    wait_until(Duration::from_secs(120), "first console output", || {
        !console(&runtime).is_empty()
    });
    let line = boot_line(subject, &guest);
    if subject.runs_guests() {
        let first = console(&runtime).len();
        wait_until(Duration::from_secs(120), "the console growing", || {
            let now = console(&runtime);
            now.len() > first && now.contains(line)
        });
    } else {
        assert!(console(&runtime).contains(line), "{}", console(&runtime));
    }
    let outcome = driver.stop(&runtime, StopMode::Force).expect("stop");
    assert!(matches!(outcome, StopOutcome::Forced { .. }), "{outcome:?}");
    let state = driver.state(&runtime).expect("state");
    assert!(is_process_exit(&state), "a stopped VM is over: {state:?}");
}

/// A forwarded port (host port 0) is resolved and, with a guest, QEMU
/// listens on it; the guest's own power-off is `GuestShutdown`, and
/// stopping it then is graceful.
fn forwards_a_port_and_reports_guest_poweroff(subject: &Subject) {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = &subject.driver;
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
    let started = Instant::now();
    let runtime = subject.start(&launch);
    let forward = runtime.port_forwards[0];
    assert_ne!(forward.host_port, 0, "host port 0 is resolved");
    assert_eq!(forward.guest_port, 22);
    if subject.runs_guests() {
        TcpStream::connect(("127.0.0.1", forward.host_port))
            .unwrap_or_else(|error| panic!("QEMU listens on {}: {error}", forward.host_port));
    }
    match (&subject.engine, &guest) {
        (Engine::Fake(fake), _) => fake.power_off_from_guest(&runtime).expect("power off"),
        (_, Guest::Kernel { .. }) => {
            wait_until(Duration::from_secs(180), MARKER, || {
                console(&runtime).contains(MARKER)
            });
            println!("guest marker after {:?}", started.elapsed());
        }
        (_, Guest::OvmfOnly) => {
            driver.stop(&runtime, StopMode::Force).expect("stop");
            return;
        }
    }
    wait_until(Duration::from_secs(60), "guest power-off", || {
        driver.state(&runtime).expect("state") == RuntimeState::Exited(ExitReason::GuestShutdown)
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

/// The power button on a guest that ignores it (busybox init has no ACPI
/// handler, nor has OVMF's shell): after the timeout the stop is forced.
/// The fake guest honours it at once.
fn graceful_stop_falls_back_to_force(subject: &Subject) {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = &subject.driver;
    let guest = Guest::pick(dir.path());
    let runtime = subject.start(&spec(dir.path(), "graceful", guest.boot("hsev.exit=idle")));
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
    if subject.runs_guests() {
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
    } else {
        assert_eq!(outcome, StopOutcome::Graceful);
    }
    // Stopping again: nothing to stop.
    assert!(matches!(
        driver.stop(&runtime, StopMode::Force).expect("stop"),
        StopOutcome::AlreadyExited(_)
    ));
}

/// `reboot` resets the guest: its boot line appears a second time.
fn reboot_resets_the_guest(subject: &Subject) {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = &subject.driver;
    let guest = Guest::pick(dir.path());
    let runtime = subject.start(&spec(dir.path(), "reboot", guest.boot("hsev.exit=idle")));
    let line = boot_line(subject, &guest);
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

/// A new driver object adopts a VM the old one started (the fake says it
/// cannot); a runtime of another driver or another VM is not ours.
fn adopts_after_losing_the_driver(subject: &Subject) {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let guest = Guest::pick(dir.path());
    let runtime = subject.start(&spec(dir.path(), "adopt", guest.boot("hsev.exit=idle")));
    let second = subject.fresh_driver();
    if !subject.runs_guests() {
        let error = second
            .adopt(&runtime)
            .expect_err("fakes end with their daemon");
        assert!(matches!(error, DriverError::Unsupported(_)), "{error}");
        subject
            .driver
            .stop(&runtime, StopMode::Force)
            .expect("stop");
        return;
    }
    assert_eq!(
        second.adopt(&runtime).expect("adopt"),
        RuntimeState::Running
    );
    assert_eq!(
        second.state(&runtime).expect("state"),
        RuntimeState::Running
    );

    let other_driver = VmRuntime {
        driver: "xen".into(),
        ..runtime.clone()
    };
    let error = second.adopt(&other_driver).expect_err("another driver's");
    assert!(matches!(error, DriverError::NotOurs { .. }), "{error}");
    // The same engine's VM, but recorded for another VM's folder.
    let foreign = VmRuntime {
        qmp_socket: if runtime.qmp_socket.as_os_str().is_empty() {
            PathBuf::new()
        } else {
            dir.path().join("someone-else/qmp.sock")
        },
        console_log: dir.path().join("someone-else/console.log"),
        ..runtime.clone()
    };
    let error = second.adopt(&foreign).expect_err("not ours");
    assert!(matches!(error, DriverError::NotOurs { .. }), "{error}");

    second.stop(&runtime, StopMode::Force).expect("stop");
    assert!(is_process_exit(
        &subject.driver.state(&runtime).expect("state")
    ));
}

/// The env vars that turn [`daemon_helper_process`] into a "daemon".
const HELPER_ENV: &str = "HSEV_DRIVER_HELPER_DIR";
const HELPER_ENGINE_ENV: &str = "HSEV_DRIVER_HELPER_ENGINE";

/// Not a test on its own: when [`HELPER_ENV`] names a folder, this process
/// plays the daemon (starts a VM on the engine [`HELPER_ENGINE_ENV`]
/// names, writes its runtime, then waits to be killed); otherwise it
/// returns at once.
#[test]
fn daemon_helper_process() {
    let Some(dir) = std::env::var_os(HELPER_ENV).map(PathBuf::from) else {
        return;
    };
    let engine = std::env::var(HELPER_ENGINE_ENV).unwrap_or_default();
    let driver: Arc<dyn HypervisorDriver> = match engine.split_once('=') {
        Some(("libvirt", uri)) => Arc::new(
            LibvirtDriver::new(LibvirtConfig {
                uri: uri.to_owned(),
                ..LibvirtConfig::default()
            })
            .expect("driver"),
        ),
        _ if engine == "fake" => Arc::new(FakeDriver::default()),
        _ => Arc::new(QemuDriver::new(QemuConfig::default()).expect("driver")),
    };
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
/// and a new driver adopts it (the fake's VM ended with its daemon, and
/// adoption says it cannot).
fn survives_the_daemon_being_killed(subject: &Subject) {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = match &subject.engine {
        Engine::Qemu => "qemu".to_owned(),
        Engine::Libvirt(daemon) => format!("libvirt={}", daemon.uri()),
        Engine::Fake(_) => "fake".to_owned(),
    };
    // /proc/self/exe: still this binary if a rebuild replaced the file.
    let mut helper = Command::new("/proc/self/exe")
        .args(["--exact", "daemon_helper_process", "--nocapture"])
        .env(HELPER_ENV, dir.path())
        .env(HELPER_ENGINE_ENV, engine)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("helper");
    let record = dir.path().join("runtime.json");
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
    subject.watch(&runtime);
    helper.kill().expect("SIGKILL the helper");
    helper.wait().expect("reap the helper");
    std::thread::sleep(Duration::from_millis(200));
    let driver = &subject.driver;
    if !subject.runs_guests() {
        let error = driver
            .adopt(&runtime)
            .expect_err("the fake VM ended with its daemon");
        assert!(matches!(error, DriverError::Unsupported(_)), "{error}");
        return;
    }
    assert_eq!(
        driver.adopt(&runtime).expect("adopt"),
        RuntimeState::Running,
        "the VM outlived its daemon"
    );
    driver.stop(&runtime, StopMode::Force).expect("stop");
    if let Engine::Qemu = subject.engine {
        // Orphaned by the helper, QEMU is reaped by init, when it gets to it.
        assert_ne!(
            identity(&runtime).liveness().expect("liveness"),
            Liveness::Alive
        );
    }
}

/// A VMM that dies behind the driver's back is `Exited`, saying so; a
/// reboot then has nothing to act on.
fn a_vmm_crash_is_reported_exited(subject: &Subject) {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = &subject.driver;
    let guest = Guest::pick(dir.path());
    let runtime = subject.start(&spec(dir.path(), "killed", guest.boot("hsev.exit=idle")));
    subject.kill_vmm(&runtime);
    // The first answer after the crash is the one with the exit status.
    let mut noticed = None;
    wait_until(Duration::from_secs(10), "the crash noticed", || {
        let state = driver.state(&runtime).expect("state");
        let over = is_process_exit(&state);
        noticed = Some(state);
        over
    });
    match noticed.expect("a state") {
        RuntimeState::Exited(ExitReason::ProcessExited { detail }) => {
            println!("{}: VMM killed: {detail}", driver.name());
            let expected = match subject.engine {
                Engine::Qemu => "SIGKILL",
                Engine::Libvirt(_) => "unexpectedly",
                Engine::Fake(_) => "crashed",
            };
            assert!(
                detail.contains(expected) || detail.contains("signal: 9"),
                "{detail}"
            );
        }
        other => panic!("expected Exited, got {other:?}"),
    }
    let error = driver.reboot(&runtime).expect_err("nothing to reboot");
    assert!(matches!(error, DriverError::NotRunning(_)), "{error}");
    let outcome = driver.stop(&runtime, StopMode::Force).expect("stop");
    assert!(
        matches!(outcome, StopOutcome::AlreadyExited(_)),
        "{outcome:?}"
    );
}

/// Disks: created (refused over an existing file), attached, wiped.
fn disks_are_created_attached_and_wiped(subject: &Subject) {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = &subject.driver;
    let disk = dir.path().join("data.qcow2");
    driver.create_disk(&disk, 64).expect("create");
    if subject.runs_guests() {
        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&disk)
            .output()
            .expect("qemu-img info");
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("info JSON");
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], 64 << 20);
    }
    assert!(driver.create_disk(&disk, 64).is_err(), "no overwrite");

    let guest = Guest::pick(dir.path());
    let mut launch = spec(dir.path(), "disks", guest.boot("hsev.exit=idle"));
    launch.disks = vec![Disk::qcow2(&disk)];
    let runtime = subject.start(&launch);
    if let Some(attached) = subject.attached_disks(&runtime) {
        assert!(
            attached.contains(&disk),
            "{} in {attached:?}",
            disk.display()
        );
    }
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
}

/// A simulated-SNP guest gets the Secure Processor's channel, and the VMM
/// listens on its socket (the fake has no VMM to listen).
fn simulated_snp_gets_its_channel(subject: &Subject) {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let guest = Guest::pick(dir.path());
    let mut launch = spec(dir.path(), "simsnp", guest.boot("hsev.exit=idle"));
    let channel = dir.path().join("simsnp/sim-sp.sock");
    let agent = dir.path().join("simsnp/agent.sock");
    launch.confidential = ConfidentialLaunch::SimulatedSnp {
        channel_socket: channel.clone(),
        kernel_hashes_page: None,
    };
    launch.agent_channel = Some(agent.clone());
    let runtime = subject.start(&launch);
    if subject.runs_guests() {
        assert_eq!(runtime.sim_channel.as_deref(), Some(channel.as_path()));
        assert_eq!(runtime.agent_channel.as_deref(), Some(agent.as_path()));
        UnixStream::connect(&channel).expect("the VMM listens on the channel");
        UnixStream::connect(&agent).expect("the VMM listens on the agent's port");
    }
    subject
        .driver
        .stop(&runtime, StopMode::Force)
        .expect("stop");
}

/// Where the probe finds no SEV-SNP, an SNP launch is refused before any
/// process starts, typed `Unsupported`, with the reason.
fn probe_and_clean_refusal_of_sev_snp(subject: &Subject) {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = &subject.driver;
    let started = Instant::now();
    let capabilities = driver.probe().expect("probe");
    println!(
        "{} probe in {:?}: {} on {} ({}); SEV: {}; {} CPUs, {} MiB",
        driver.name(),
        started.elapsed(),
        capabilities.version,
        capabilities.accelerator,
        capabilities.accelerator_reason,
        capabilities.sev.reason,
        capabilities.host_cpus,
        capabilities.host_memory_mib
    );
    assert_eq!(capabilities.driver, driver.name());
    assert!(capabilities.host_cpus > 0 && capabilities.host_memory_mib > 0);
    match subject.engine {
        Engine::Qemu => assert!(capabilities.version.starts_with("QEMU emulator version")),
        Engine::Libvirt(_) => {
            assert!(
                capabilities.version.starts_with("libvirt "),
                "{}",
                capabilities.version
            );
            assert!(
                capabilities.version.contains(", QEMU "),
                "{}",
                capabilities.version
            );
        }
        Engine::Fake(_) => assert!(capabilities.version.contains("fake")),
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
    println!("{}: SNP refused: {error}", driver.name());
    assert!(matches!(error, DriverError::Unsupported(_)), "{error}");
    assert!(!launch.run_dir.exists(), "nothing was started");
}

/// Start latency (start call to the VMM running; guest boot not included)
/// over 10 starts.
fn start_latency(subject: &Subject) {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = &subject.driver;
    let guest = Guest::pick(dir.path());
    driver
        .probe()
        .expect("probe once, as the daemon does at start");
    let mut samples = Vec::new();
    for round in 0..10 {
        let launch = spec(
            dir.path(),
            &format!("latency{round}"),
            guest.boot("hsev.exit=idle"),
        );
        let begun = Instant::now();
        let runtime = subject.start(&launch);
        samples.push(begun.elapsed());
        driver.stop(&runtime, StopMode::Force).expect("stop");
    }
    samples.sort();
    let p50 = samples[samples.len() / 2];
    println!(
        "{} start latency over {} starts: p50 {p50:?}, max {:?}",
        driver.name(),
        samples.len(),
        samples[samples.len() - 1]
    );
    assert!(p50 < Duration::from_secs(3), "p50 start latency {p50:?}");
}

/// Every conformance test, once per engine.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod qemu {
            $( #[test] fn $test() { super::$test(&super::Subject::qemu()) } )*
        }
        mod libvirt {
            $( #[test] fn $test() { super::$test(&super::Subject::libvirt()) } )*
        }
        mod fake {
            $( #[test] fn $test() { super::$test(&super::Subject::fake()) } )*
        }
    };
}

conformance!(
    runs_and_the_console_grows,
    forwards_a_port_and_reports_guest_poweroff,
    graceful_stop_falls_back_to_force,
    reboot_resets_the_guest,
    adopts_after_losing_the_driver,
    survives_the_daemon_being_killed,
    a_vmm_crash_is_reported_exited,
    disks_are_created_attached_and_wiped,
    simulated_snp_gets_its_channel,
    probe_and_clean_refusal_of_sev_snp,
    start_latency,
);

// --- each engine's own checks -----------------------------------------------

mod qemu_only {
    use super::*;
    use hsev_xapi::hypervisor::qemu::qmp::{QmpClient, QmpError};
    use hsev_xapi::hypervisor::{Accelerator, AcceleratorSetting};

    /// QEMU runs in its own session, its QMP socket is removed with it,
    /// and its command line carries the forwards.
    #[test]
    fn qemu_is_detached_and_cleans_up() {
        let subject = Subject::qemu();
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().expect("tempdir");
        let guest = Guest::pick(dir.path());
        let mut launch = spec(dir.path(), "detached", guest.boot("hsev.exit=idle"));
        launch.port_forwards = vec![PortForward {
            host_port: 0,
            guest_port: 22,
        }];
        let runtime = subject.start(&launch);
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", runtime.pid)).expect("stat");
        let session: u32 = stat[stat.rfind(')').expect("comm") + 2..]
            .split_whitespace()
            .nth(3)
            .and_then(|field| field.parse().ok())
            .expect("session field");
        assert_eq!(session, runtime.pid, "QEMU leads its own session");
        let argv = std::fs::read(format!("/proc/{}/cmdline", runtime.pid)).expect("cmdline");
        let expected = format!(
            "hostfwd=tcp:127.0.0.1:{}-:22",
            runtime.port_forwards[0].host_port
        );
        assert!(String::from_utf8_lossy(&argv).contains(&expected));
        // The same pid with another start time: a recycled pid.
        let recycled = VmRuntime {
            start_ticks: runtime.start_ticks + 1,
            ..runtime.clone()
        };
        assert_eq!(
            subject.fresh_driver().adopt(&recycled).expect("adopt"),
            RuntimeState::Exited(ExitReason::PidReused { pid: runtime.pid })
        );
        subject
            .driver
            .stop(&runtime, StopMode::Force)
            .expect("stop");
        assert!(
            matches!(
                identity(&runtime).liveness().expect("liveness"),
                Liveness::Gone | Liveness::Recycled
            ),
            "reaped by the driver that started it"
        );
        assert!(!runtime.qmp_socket.exists(), "the QMP socket is removed");
    }

    /// QEMU quitting by itself (QMP `quit` from elsewhere) is `Exited`.
    #[test]
    fn qmp_quit_is_reported_exited() {
        let subject = Subject::qemu();
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().expect("tempdir");
        let guest = Guest::pick(dir.path());
        let runtime = subject.start(&spec(dir.path(), "quit", guest.boot("hsev.exit=idle")));
        let mut client =
            QmpClient::connect(&runtime.qmp_socket, Duration::from_secs(5)).expect("QMP");
        match client.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => {}
            Err(error) => panic!("quit: {error}"),
        }
        drop(client);
        // While QEMU exits its socket may still take a connection.
        wait_until(Duration::from_secs(10), "QEMU exiting", || {
            subject
                .driver
                .state(&runtime)
                .is_ok_and(|state| is_process_exit(&state))
        });
    }

    /// Forcing KVM where it cannot run guests: QEMU stops the guest on an
    /// emulation failure, reported as an internal error (at start or after).
    #[test]
    fn forced_kvm_that_cannot_run_guests_is_an_internal_error() {
        let _serial = one_at_a_time();
        let probe = Subject::qemu().driver.probe().expect("probe");
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("cpuinfo");
        if !cpuinfo
            .split_whitespace()
            .any(|flag| flag == "svm" || flag == "vmx")
        {
            assert_eq!(probe.accelerator, Accelerator::Tcg);
            assert!(probe.accelerator_reason.contains("no svm/vmx flag"));
        }
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
        match driver.start(&launch) {
            Err(error) => {
                println!("forced KVM start: {error}");
                assert!(error.to_string().contains("internal-error"), "{error}");
            }
            Ok(runtime) => {
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
}

mod libvirt_only {
    use super::*;
    use hsev_xapi::hypervisor::libvirt::capabilities::{DomainCapabilities, LibvirtVersion};
    use hsev_xapi::hypervisor::libvirt::xml::{self, DomainHost, DomainIdentity};
    use hsev_xapi::hypervisor::{Accelerator, DiskFormat, KernelHashesPage, SevSupport};

    fn validate(xml: &str, what: &str) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("domain.xml");
        std::fs::write(&path, xml).expect("write");
        let output = Command::new("virt-xml-validate")
            .arg(&path)
            .arg("domain")
            .output()
            .expect("virt-xml-validate runs (make deps)");
        assert!(
            output.status.success(),
            "{what}: libvirt's schema refuses the XML: {}{}\n{xml}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Every shape of domain the driver writes passes libvirt's own
    /// schema: plain, firmware + disks + forwards, simulated SNP with its
    /// channels and kernel-hashes page, SEV, SEV-ES and SNP on an SNP host.
    #[test]
    fn every_generated_domain_xml_passes_virt_xml_validate() {
        hsev_e2e::libvirt::require_libvirt_tools();
        let dir = Path::new("/run/hsev/vm/6f1d");
        let tcg = DomainHost {
            accelerator: Accelerator::Tcg,
            libvirt: LibvirtVersion::new(11, 3, 0),
            capabilities: DomainCapabilities::default(),
        };
        let snp_host = DomainHost {
            accelerator: Accelerator::Kvm,
            libvirt: LibvirtVersion::new(11, 3, 0),
            capabilities: DomainCapabilities {
                sev: SevSupport {
                    sev: true,
                    sev_es: true,
                    sev_snp: true,
                    cbitpos: Some(51),
                    reduced_phys_bits: Some(1),
                    ..SevSupport::default()
                },
                ..DomainCapabilities::default()
            },
        };
        let direct = |firmware: Option<&str>| Boot::Direct {
            firmware: firmware.map(PathBuf::from),
            kernel: PathBuf::from("/img/vmlinuz"),
            initrd: Some(PathBuf::from("/img/initrd.img")),
            cmdline: "console=ttyS0 hsev.net=user".into(),
        };
        let mut plain = spec(dir, "plain", direct(None));
        plain.run_dir = dir.to_path_buf();
        let mut full = plain.clone();
        full.boot = Boot::Firmware {
            ovmf: PathBuf::from(OVMF),
            disk: Some(Disk {
                path: PathBuf::from("/img/root.qcow2"),
                format: DiskFormat::Qcow2,
                read_only: true,
                serial: None,
            }),
        };
        full.disks = vec![
            Disk::qcow2(dir.join("disk-data.qcow2")),
            Disk {
                path: dir.join("disk-hsev-data.luks"),
                format: DiskFormat::Raw,
                read_only: false,
                serial: Some("hsev-data".into()),
            },
        ];
        full.port_forwards = vec![PortForward {
            host_port: 2222,
            guest_port: 22,
        }];
        full.cpu_model = Some("EPYC-v4".into());
        let mut simulated = plain.clone();
        simulated.boot = direct(Some(OVMF));
        simulated.confidential = ConfidentialLaunch::SimulatedSnp {
            channel_socket: dir.join("sim-sp.sock"),
            kernel_hashes_page: Some(KernelHashesPage {
                path: dir.join("hashes.bin"),
                gpa: 0x80_a000,
            }),
        };
        simulated.agent_channel = Some(dir.join("agent.sock"));
        let mut snp = simulated.clone();
        snp.cpu_model = Some("EPYC-v4".into());
        snp.disks = full.disks.clone();
        snp.confidential = ConfidentialLaunch::SevSnp {
            policy: 0x30000,
            host_data: [1; 32],
            kernel_hashes: true,
            id_block: None,
        };
        let mut sev = snp.clone();
        sev.confidential = ConfidentialLaunch::Sev {
            policy: 0x1,
            kernel_hashes: true,
        };
        let mut sev_es = sev.clone();
        sev_es.confidential = ConfidentialLaunch::Sev {
            policy: 0x5,
            kernel_hashes: false,
        };
        for (what, launch, host) in [
            ("plain", &plain, &tcg),
            ("firmware, disks, forwards", &full, &tcg),
            ("simulated SNP", &simulated, &tcg),
            ("SEV-SNP", &snp, &snp_host),
            ("SEV", &sev, &snp_host),
            ("SEV-ES", &sev_es, &snp_host),
        ] {
            let xml = xml::build(launch, &DomainIdentity::of(launch, "hsev-"), host)
                .unwrap_or_else(|error| panic!("{what}: {error}"));
            validate(&xml, what);
        }
    }

    /// The XML the driver starts a real domain with passes the schema too,
    /// and libvirt's probe reads domcapabilities and both versions.
    #[test]
    fn the_started_domain_is_valid_and_transient() {
        let subject = Subject::libvirt();
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().expect("tempdir");
        let guest = Guest::pick(dir.path());
        let launch = spec(dir.path(), "valid", guest.boot("hsev.exit=idle"));
        let runtime = subject.start(&launch);
        let written = std::fs::read_to_string(launch.run_dir.join("domain.xml")).expect("xml");
        validate(&written, "the started domain");
        let Engine::Libvirt(daemon) = &subject.engine else {
            unreachable!("a libvirt subject")
        };
        let uuid = runtime.domain.clone().expect("domain");
        assert_eq!(daemon.running_domains(), std::slice::from_ref(&uuid));
        let info = daemon.virsh(["dominfo", &uuid]);
        let info = String::from_utf8_lossy(&info.stdout).into_owned();
        assert!(
            info.lines()
                .any(|line| line.starts_with("Persistent:") && line.ends_with("no")),
            "transient: {info}"
        );
        subject
            .driver
            .stop(&runtime, StopMode::Force)
            .expect("stop");
        assert!(
            daemon.running_domains().is_empty(),
            "nothing left in libvirt"
        );
        let listed = daemon.virsh(["list", "--all", "--uuid"]);
        assert!(
            String::from_utf8_lossy(&listed.stdout).trim().is_empty(),
            "no definition left behind"
        );
    }

    /// An unreachable daemon is named, with how to get one.
    #[test]
    fn an_unreachable_libvirtd_is_named() {
        let driver = LibvirtDriver::new(LibvirtConfig {
            uri: "qemu:///system?socket=/nonexistent/libvirt-sock".into(),
            ..LibvirtConfig::default()
        })
        .expect("driver");
        let error = driver.probe().expect_err("no daemon there");
        let message = error.to_string();
        assert!(message.contains("/nonexistent/libvirt-sock"), "{message}");
        assert!(message.contains("libvirtd running"), "{message}");
    }
}
