//! A real `hsevd` for end-to-end tests: its own state folder, a simulated
//! Secure Processor, three callers (the admin `ops`, tenants `alice` and
//! `bob`), the guest image `make image` built, and the hypervisor driver
//! a test asks for ([`Driver`]: QEMU, libvirt with a libvirtd of its own,
//! or the fake). Dropping it kills the daemon and every VMM it started.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::kbs::Kbs;
use crate::libvirt::Libvirtd;
use crate::netns::NetHost;
use crate::{binary, workspace_root};

/// The hypervisor driver a daemon runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// QEMU over QMP (hsevd's default).
    Qemu,
    /// libvirt, on a libvirtd the daemon's test starts for it.
    Libvirt,
    /// In-memory VMs, no guest.
    Fake,
}

impl Driver {
    /// The name hsevd uses.
    pub fn name(self) -> &'static str {
        match self {
            Driver::Qemu => "qemu",
            Driver::Libvirt => "libvirt",
            Driver::Fake => "fake",
        }
    }

    /// Whether real guests boot (a console with a kernel on it).
    pub fn runs_guests(self) -> bool {
        self != Driver::Fake
    }
}

/// How long a guest may take to reach a console line (OVMF and the kernel
/// under TCG, on a loaded 2-core machine).
pub const GUEST_PATIENCE: Duration = Duration::from_secs(180);

/// The callers and their tokens.
pub const ADMIN: &str = "ops-token";
/// Tenant alice's token.
pub const ALICE: &str = "alice-token";
/// Tenant bob's token.
pub const BOB: &str = "bob-token";

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
    config: PathBuf,
    driver: Driver,
    /// The simulated Secure Processor's folder, when it has one.
    sim_dir: Option<PathBuf>,
    /// The test host (network namespace) it runs in; the root one if none.
    host: Option<NetHost>,
    /// Declared last: dropped after the daemon and its VMs are gone.
    libvirtd: Option<Libvirtd>,
}

/// SHA-256 of `text`, hex, through the `sha256sum` tool.
pub(crate) fn sha256_hex(text: &str) -> String {
    let output = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())?;
            child.wait_with_output()
        })
        .expect("sha256sum runs");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_owned()
}

/// The guest image folder `make image` writes.
pub fn image_dir() -> PathBuf {
    let dir = workspace_root().join("images/out");
    assert!(
        dir.join("manifest.json").is_file(),
        "the guest image is missing at {}: run `make image`",
        dir.display()
    );
    dir
}

impl Daemon {
    /// Starts a daemon with `extra` TOML lines added to its configuration
    /// and the simulated Secure Processor.
    pub fn start(extra: &str) -> Daemon {
        Self::start_on(Driver::Qemu, extra)
    }

    /// [`Daemon::start`] on `driver`.
    pub fn start_on(driver: Driver, extra: &str) -> Daemon {
        Self::start_with_on(driver, extra, true)
    }

    /// Starts a daemon; `simulated` gives it the simulated Secure Processor
    /// (without it, this host has no SEV at all).
    pub fn start_with(extra: &str, simulated: bool) -> Daemon {
        Self::start_with_on(Driver::Qemu, extra, simulated)
    }

    /// [`Daemon::start_with`] on `driver`.
    pub fn start_with_on(driver: Driver, extra: &str, simulated: bool) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let sim_dir = simulated.then(|| dir.path().join("sim"));
        Self::start_in(driver, dir, extra, sim_dir.as_deref())
    }

    /// Starts a daemon that launches through the simulated Secure Processor
    /// whose roots the tenant's broker `kbs` trusts (a development pool's
    /// operator hands its roots to its tenants). hsevd itself never talks
    /// to the broker: its guests do, and the tenant does.
    pub fn on_platform_trusted_by(extra: &str, kbs: &Kbs) -> Daemon {
        Self::on_platform_trusted_by_on(Driver::Qemu, extra, kbs)
    }

    /// [`Daemon::on_platform_trusted_by`] on `driver`.
    pub fn on_platform_trusted_by_on(driver: Driver, extra: &str, kbs: &Kbs) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(driver, dir, extra, Some(&kbs.sim_dir()))
    }

    fn start_in(
        driver: Driver,
        dir: tempfile::TempDir,
        extra: &str,
        sim_dir: Option<&Path>,
    ) -> Daemon {
        let mut daemon = Self::configure(driver, dir, extra, sim_dir, None);
        daemon.spawn();
        daemon
    }

    /// A daemon configured on test host `host` (its own simulated Secure
    /// Processor when `simulated`), not started yet: [`Daemon::run`] starts
    /// it, after whatever the test does first (`hsevd join`, a simulated
    /// platform of its own).
    pub fn on_host(driver: Driver, host: &NetHost, extra: &str, simulated: bool) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let sim_dir = simulated.then(|| dir.path().join("sim"));
        Self::configure(driver, dir, extra, sim_dir.as_deref(), Some(host.clone()))
    }

    fn configure(
        driver: Driver,
        dir: tempfile::TempDir,
        extra: &str,
        sim_dir: Option<&Path>,
        host: Option<NetHost>,
    ) -> Daemon {
        let state = dir.path().join("state");
        let config = dir.path().join("hsevd.toml");
        let libvirtd = (driver == Driver::Libvirt).then(Libvirtd::start);
        let driver_config = match &libvirtd {
            Some(libvirtd) => libvirtd.hsevd_config(),
            None => format!("driver = \"{}\"\n", driver.name()),
        };
        let tokens: String = [
            ("ops", "admin", ADMIN),
            ("alice", "tenant", ALICE),
            ("bob", "tenant", BOB),
        ]
        .iter()
        .map(|(name, role, token)| {
            format!(
                "[[tokens]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
                sha256_hex(token)
            )
        })
        .collect();
        let firmware = match sim_dir {
            Some(sim_dir) => format!("[firmware]\nsimulated_dir = \"{}\"\n", sim_dir.display()),
            None => String::new(),
        };
        // Top-level keys first: `extra` may open tables of its own.
        let (driver_keys, driver_tables) = match driver_config.split_once("\n[") {
            Some((keys, tables)) => (keys.to_owned(), format!("[{tables}")),
            None => (driver_config, String::new()),
        };
        let text = format!(
            "state_dir = \"{state}\"\n{driver_keys}\n{extra}\n{driver_tables}\n{firmware}{tokens}",
            state = state.display()
        );
        std::fs::write(&config, text).expect("config written");
        Daemon {
            dir,
            child: None,
            config,
            driver,
            sim_dir: sim_dir.map(Path::to_path_buf),
            host,
            libvirtd,
        }
    }

    /// Runs `hsevd` with `args` (a subcommand such as `join`) on its
    /// configuration and host, to completion.
    pub fn hsevd<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.hsevd_command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("hsevd runs")
    }

    /// `hsevd --config <its config>`, in its network namespace.
    fn hsevd_command(&self) -> Command {
        let mut command = match &self.host {
            Some(host) => host.command(&binary("hsevd")),
            None => Command::new(binary("hsevd")),
        };
        command.arg("--config").arg(&self.config);
        command
    }

    /// Starts it (a daemon made by [`Daemon::on_host`]).
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "the daemon already runs");
        self.spawn();
    }

    /// A daemon on this machine's own network with `extra` in its
    /// configuration, not started yet.
    pub fn configured(driver: Driver, extra: &str, simulated: bool) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let sim_dir = simulated.then(|| dir.path().join("sim"));
        Self::configure(driver, dir, extra, sim_dir.as_deref(), None)
    }

    /// Starts it without waiting for its socket (a coordinator standing
    /// by for the pool's leadership opens it once its store and agent are
    /// ready, and forwards the API to the leader).
    pub fn run_standing_by(&mut self) {
        assert!(self.child.is_none(), "the daemon already runs");
        self.spawn_process();
    }

    /// Whether its process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// The simulated Secure Processor's folder.
    pub fn sim_dir(&self) -> &Path {
        self.sim_dir
            .as_deref()
            .expect("a daemon with the simulated Secure Processor")
    }

    /// The test host it runs on.
    pub fn net_host(&self) -> &NetHost {
        self.host.as_ref().expect("a daemon on a test host")
    }

    /// The simulated platform's roots (its ASK and ARK, PEM), as the
    /// operator of a development pool hands them to its tenants.
    pub fn sim_roots(&self) -> PathBuf {
        let sim = self.sim_dir();
        let bundle = self.dir.path().join("sim-roots.pem");
        let pem: Vec<u8> = ["ask.pem", "ark.pem"]
            .iter()
            .flat_map(|name| std::fs::read(sim.join(name)).expect("the simulated roots"))
            .collect();
        std::fs::write(&bundle, pem).expect("bundle written");
        bundle
    }

    /// What `vm`'s console showed so far, as `token` sees it.
    pub fn console(&self, token: &str, vm: &str) -> String {
        String::from_utf8_lossy(&self.hsev(token, ["vm", "console", vm]).stdout).into_owned()
    }

    /// Waits until `vm`'s console shows `marker` `count` times; answers the
    /// console.
    pub fn wait_console(&self, token: &str, vm: &str, marker: &str, count: usize) -> String {
        let deadline = Instant::now() + GUEST_PATIENCE;
        loop {
            let console = self.console(token, vm);
            if console.matches(marker).count() >= count {
                return console;
            }
            assert!(
                Instant::now() < deadline,
                "{vm}: no {marker:?} (x{count}) on the console in {GUEST_PATIENCE:?}:\n{console}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The driver it runs.
    pub fn driver(&self) -> Driver {
        self.driver
    }

    /// The libvirt daemon under it, for the libvirt driver.
    pub fn libvirtd(&self) -> Option<&Libvirtd> {
        self.libvirtd.as_ref()
    }

    /// The VMM processes (QEMU) of the VM `vm_id`: every driver's QEMU
    /// names the VM id on its command line (its run dir, or libvirt's
    /// `-uuid`).
    pub fn vmm_pids(&self, vm_id: &str) -> Vec<u32> {
        processes_mentioning(Path::new(vm_id))
            .into_iter()
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.starts_with("qemu"))
            })
            .collect()
    }

    fn spawn(&mut self) {
        self.spawn_process();
        self.wait_socket();
    }

    fn spawn_process(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("hsevd.log"))
            .expect("log file");
        let child = self
            .hsevd_command()
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("hsevd starts");
        self.child = Some(child);
    }

    fn wait_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.socket().exists() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("hsevd exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "hsevd did not open its socket in 60 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its state folder.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Its socket.
    pub fn socket(&self) -> PathBuf {
        self.state_dir().join("hsevd.sock")
    }

    /// What it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hsevd.log")).unwrap_or_default()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    /// Kills it with SIGKILL, as a crash would; its VMs keep running.
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same state.
    pub fn restart(&mut self) {
        self.kill_9();
        let _ = std::fs::remove_file(self.socket());
        self.spawn();
    }

    /// Runs `hsev` against it with `token`.
    pub fn hsev<I, S>(&self, token: &str, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.hsev_command(token, args).output().expect("hsev runs")
    }

    /// The `hsev` command [`Daemon::hsev`] runs, to spawn and wait on.
    pub fn hsev_command<I, S>(&self, token: &str, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = Command::new(binary("hsev"));
        command
            .args(args)
            .env(
                "HSEV_ENDPOINT",
                format!("unix://{}", self.socket().display()),
            )
            .env("HSEV_TOKEN", token)
            .env_remove("HSEV_CONFIG")
            .env("XDG_CONFIG_HOME", self.dir.path())
            .env_remove("HSEV_CA")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    /// Runs `hsev` with `args` as `token`; panics with what it printed on
    /// stderr unless it succeeds.
    pub fn hsev_ok<I, S>(&self, token: &str, args: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<std::ffi::OsString> = args
            .into_iter()
            .map(|arg| arg.as_ref().to_owned())
            .collect();
        let output = self.hsev(token, &args);
        assert!(
            output.status.success(),
            "hsev {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Polls `hsev vm show` of `vm`, as `token`, every 50 ms until `done`
    /// holds of what it shows, and answers that; panics, with the last
    /// answer and its log, unless it happens `within`.
    pub fn wait_vm(
        &self,
        token: &str,
        vm: &str,
        within: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let shown = self.json(token, ["vm", "show", vm]);
            if done(&shown) {
                return shown;
            }
            assert!(
                Instant::now() < deadline,
                "{vm} did not settle in {within:?}: {shown:#}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `hsev ... --output json` and parses what it prints.
    pub fn json<I, S>(&self, token: &str, args: I) -> serde_json::Value
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut args: Vec<std::ffi::OsString> = args
            .into_iter()
            .map(|arg| arg.as_ref().to_owned())
            .collect();
        args.extend(["--output".into(), "json".into()]);
        let output = self.hsev(token, &args);
        assert!(
            output.status.success(),
            "hsev {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|error| panic!("hsev {args:?}: not JSON ({error})"))
    }

    /// Appends `toml` to its configuration (new tables, such as `[store]`),
    /// for its next start.
    pub fn append_config(&self, toml: &str) {
        let mut text = std::fs::read_to_string(&self.config).expect("its configuration");
        text.push('\n');
        text.push_str(toml);
        std::fs::write(&self.config, text).expect("configuration written");
    }

    /// Runs one SQL statement on its store, behind its back (as a rogue
    /// operator could).
    pub fn edit_store(&self, sql: &str) {
        let connection =
            rusqlite::Connection::open(self.state_dir().join("hsevd.db")).expect("the store opens");
        connection
            .busy_timeout(Duration::from_secs(5))
            .expect("busy timeout");
        let changed = connection.execute(sql, []).expect("the statement runs");
        assert!(changed > 0, "{sql}: no row changed");
    }

    /// Imports the test image as `debian`.
    pub fn import_image(&self) {
        self.import_debian(&image_dir());
    }

    /// Imports a [`stand_in_image`] (for the fake driver, which boots
    /// nothing) as `debian`: no `make image` needed. The stand-in is made
    /// in its own folder, kept as long as it is.
    pub fn import_stand_in_image(&self) {
        self.import_debian(&stand_in_image(&self.dir.path().join("stand-in")));
    }

    /// Imports the image folder `from` as `debian`, as the admin; panics
    /// unless it succeeds.
    fn import_debian(&self, from: &Path) {
        let output = self.hsev(
            ADMIN,
            [
                "image",
                "import",
                "debian",
                "--from",
                from.to_str().expect("utf-8"),
            ],
        );
        assert!(
            output.status.success(),
            "image import: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Every process whose command line mentions `needle`.
pub fn processes_mentioning(needle: &Path) -> Vec<u32> {
    let needle = needle.to_string_lossy().into_owned();
    processes_whose_command_line(|cmdline| cmdline.contains(&needle))
}

/// The QEMU processes whose command line names `vm_id`, of any test host
/// (their network namespaces share /proc).
pub fn qemu_processes_of(vm_id: &str) -> Vec<u32> {
    processes_whose_command_line(|cmdline| {
        cmdline.starts_with("/usr/bin/qemu-system") && cmdline.contains(vm_id)
    })
}

/// Every process whose command line (NULs and all) `matches`.
fn processes_whose_command_line(matches: impl Fn(&str) -> bool) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .map(|cmdline| matches(&String::from_utf8_lossy(&cmdline)))
                        .unwrap_or(false)
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.crash();
    }
}

impl Daemon {
    /// Kills it and every VMM it started with SIGKILL, as a host that
    /// dies.
    pub fn crash(&mut self) {
        self.kill_9();
        let mut pids = processes_mentioning(&self.state_dir());
        for entry in std::fs::read_dir(self.state_dir().join("vms"))
            .into_iter()
            .flatten()
            .flatten()
        {
            pids.extend(self.vmm_pids(&entry.file_name().to_string_lossy()));
        }
        for pid in pids {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
    }
}

fn sha256(path: &Path) -> String {
    let output = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("hashing an artifact");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum prints a digest")
        .to_owned()
}

/// A guest image folder for the fake driver (which boots nothing): Debian's
/// OVMF and a stand-in kernel, with their manifest, in `dir`.
pub fn stand_in_image(dir: &Path) -> PathBuf {
    let image = dir.join("image");
    std::fs::create_dir_all(&image).expect("the image folder");
    std::fs::copy("/usr/share/ovmf/OVMF.fd", image.join("OVMF.fd"))
        .expect("/usr/share/ovmf/OVMF.fd (Debian package ovmf, `make deps`)");
    std::fs::write(image.join("vmlinuz"), vec![0x5a; 4096]).expect("the kernel written");
    let manifest = serde_json::json!({
        "firmware": {"path": "OVMF.fd", "sha256": sha256(&image.join("OVMF.fd"))},
        "kernel": {"path": "vmlinuz", "sha256": sha256(&image.join("vmlinuz"))},
        "cmdline": "console=ttyS0",
    });
    std::fs::write(image.join("manifest.json"), manifest.to_string())
        .expect("the manifest written");
    image
}
