//! Boots the guest image `make image` built (images/out, or
//! `$HSEV_IMAGE_DIR`) in QEMU with TCG, exactly as its manifest says:
//! edk2's AmdSev firmware, the kernel, the initrd, the command line, and the
//! SNP kernel-hashes page handed to QEMU at its guest-physical address (what
//! QEMU itself writes in a real SEV-SNP launch with `kernel-hashes=on`).
//!
//! The firmware checks the kernel, initrd and command line it gets over
//! fw_cfg against that page before it starts the kernel, so these tests also
//! show that what the launch measures is what boots: a command line that is
//! not the measured one, or no hashes page at all, and the kernel never
//! starts.
//!
//! Nothing skips: no image or no QEMU fails with what to run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hsev_e2e::{run, workspace_root};

/// One QEMU at a time: with 2 cores, parallel TCG guests would slow each
/// other and blur the boot time printed.
static QEMU: Mutex<()> = Mutex::new(());

/// How long a good boot may take before the test fails.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// How long a refused boot is watched for the guest coming up anyway (a good
/// boot prints /init's first line 8 s in here, 15 s with the machine busy;
/// the kernel itself is quiet on the image's command line).
const REFUSAL_WINDOW: Duration = Duration::from_secs(45);

/// /init's first line: the kernel ran and started the initramfs.
const INIT_STARTED: &str = "hsev-init:";

struct Image {
    dir: PathBuf,
    manifest: serde_json::Value,
}

impl Image {
    /// The built image, its artifacts checked against the manifest.
    fn load() -> Self {
        let dir = std::env::var_os("HSEV_IMAGE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("images/out"));
        let manifest_path = dir.join("manifest.json");
        let bytes = std::fs::read(&manifest_path).unwrap_or_else(|error| {
            panic!(
                "no guest image at {} ({error}): run `make image`",
                manifest_path.display()
            )
        });
        let manifest: serde_json::Value =
            serde_json::from_slice(&bytes).expect("manifest.json is JSON");
        let image = Self { dir, manifest };
        for artifact in ["firmware", "kernel", "initrd", "sev_hashes"] {
            let entry = &image.manifest[artifact];
            let path =
                image.dir.join(entry["path"].as_str().unwrap_or_else(|| {
                    panic!("manifest has no {artifact}.path: run `make image`")
                }));
            assert!(
                path.is_file(),
                "{} is missing: run `make image`",
                path.display()
            );
            let output = run(Path::new("sha256sum"), [&path]);
            let digest = String::from_utf8_lossy(&output.stdout);
            assert_eq!(
                digest.split_whitespace().next(),
                entry["sha256"].as_str(),
                "{} does not match its manifest: run `make image`",
                path.display()
            );
        }
        image
    }

    fn marker(&self) -> String {
        self.manifest["marker"]
            .as_str()
            .expect("manifest has a marker")
            .to_owned()
    }

    /// The manifest's QEMU arguments, paths made absolute; `edit` may
    /// change them (to tamper with the launch).
    fn qemu_args(&self, edit: impl Fn(&mut Vec<String>)) -> Vec<String> {
        let mut args: Vec<String> = self.manifest["qemu_args"]
            .as_array()
            .expect("manifest has qemu_args: run `make image`")
            .iter()
            .map(|arg| arg.as_str().expect("qemu_args are strings").to_owned())
            .collect();
        for arg in &mut args {
            for relative in ["firmware/", "boot/"] {
                if arg.starts_with(relative) {
                    *arg = self.dir.join(&*arg).display().to_string();
                } else if let Some(at) = arg.find(&format!("file={relative}")) {
                    let start = at + "file=".len();
                    let end = arg[start..].find(',').map_or(arg.len(), |end| start + end);
                    let absolute = self.dir.join(&arg[start..end]).display().to_string();
                    arg.replace_range(start..end, &absolute);
                }
            }
        }
        edit(&mut args);
        args
    }
}

fn qemu() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("qemu-system-x86_64"))
            .find(|path| path.is_file())
    });
    found.expect("qemu-system-x86_64 is not installed: run `make deps`, then `make image`")
}

/// Kills and reaps QEMU whatever happens to the test.
struct Guest(Child);

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Boot {
    /// Every serial line, in order.
    lines: Vec<String>,
    /// When the line `until` came, from QEMU's start.
    reached: Option<Duration>,
    /// Whether QEMU ended by itself within the time allowed.
    exited: bool,
}

impl Boot {
    fn saw(&self, text: &str) -> bool {
        self.lines.iter().any(|line| line.contains(text))
    }

    fn tail(&self) -> String {
        let start = self.lines.len().saturating_sub(40);
        self.lines[start..].join("\n")
    }
}

/// Starts QEMU (TCG, serial console on a pipe) and reads its console until
/// the line `until`, QEMU's exit, or `limit`; QEMU is then killed.
fn boot(args: &[String], until: &str, limit: Duration) -> Boot {
    let _one_at_a_time = QEMU.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let started = Instant::now();
    let mut child = Command::new(qemu())
        .args(["-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "1"])
        .args(["-nodefaults", "-display", "none", "-serial", "stdio"])
        .args(["-monitor", "none", "-no-reboot"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start qemu-system-x86_64: {error}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let guest = Guest(child);

    let (sender, receiver) = mpsc::channel();
    let errors = sender.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_owned();
            if sender.send((started.elapsed(), line)).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if errors
                .send((started.elapsed(), format!("[qemu stderr] {line}")))
                .is_err()
            {
                break;
            }
        }
    });

    let mut result = Boot {
        lines: Vec::new(),
        reached: None,
        exited: false,
    };
    loop {
        let left = limit.saturating_sub(started.elapsed());
        match receiver.recv_timeout(left) {
            Ok((at, line)) => {
                let done = line.trim() == until;
                result.lines.push(line);
                if done {
                    result.reached = Some(at);
                    break;
                }
            }
            // Both pipes closed: QEMU is gone.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                result.exited = true;
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => break,
        }
    }
    drop(guest);
    result
}

#[test]
fn the_image_boots_to_the_marker_under_tcg() {
    let image = Image::load();
    let marker = image.marker();
    let outcome = boot(&image.qemu_args(|_| {}), &marker, BOOT_TIMEOUT);
    let Some(at) = outcome.reached else {
        panic!(
            "no {marker} line within {} s ({}); the console's last lines:\n{}",
            BOOT_TIMEOUT.as_secs(),
            if outcome.exited {
                "QEMU exited"
            } else {
                "timed out"
            },
            outcome.tail()
        );
    };
    assert!(
        outcome.saw("hsev-init: modules:"),
        "the marker came without /init's module report:\n{}",
        outcome.tail()
    );
    println!(
        "booted firmware -> kernel -> initramfs to {marker} in {:.1} s (QEMU TCG, 1 vCPU)",
        at.as_secs_f64()
    );
}

#[test]
fn the_firmware_refuses_a_command_line_that_is_not_the_measured_one() {
    let image = Image::load();
    let marker = image.marker();
    let args = image.qemu_args(|args| {
        let append = args
            .iter()
            .position(|arg| arg == "-append")
            .expect("qemu_args has -append")
            + 1;
        args[append].push_str(" init=/bin/sh");
    });
    let outcome = boot(&args, &marker, REFUSAL_WINDOW);
    assert!(
        outcome.reached.is_none() && !outcome.saw(INIT_STARTED),
        "the kernel started with a command line the launch did not measure:\n{}",
        outcome.tail()
    );
    // A hash mismatch halts the firmware (CpuDeadLoop): QEMU runs on.
    assert!(
        !outcome.exited,
        "QEMU exited: the firmware did not stop at the hash check:\n{}",
        outcome.tail()
    );
}

#[test]
fn without_the_hashes_page_the_firmware_does_not_start_the_kernel() {
    let image = Image::load();
    let marker = image.marker();
    let args = image.qemu_args(|args| {
        let device = args
            .iter()
            .position(|arg| arg.starts_with("loader,file="))
            .expect("qemu_args loads the hashes page");
        args.drain(device - 1..=device);
    });
    let outcome = boot(&args, &marker, REFUSAL_WINDOW);
    assert!(
        outcome.reached.is_none() && !outcome.saw(INIT_STARTED),
        "the kernel started with no kernel-hashes table:\n{}",
        outcome.tail()
    );
    // No table: the kernel loader is refused, boot falls to the embedded
    // GRUB, which finds no encrypted volume and reboots; -no-reboot ends QEMU.
    assert!(
        outcome.exited,
        "QEMU did not exit through the firmware's GRUB fallback:\n{}",
        outcome.tail()
    );
}
