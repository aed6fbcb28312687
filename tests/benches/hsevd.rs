//! hsevd's figures, each beside a reference measured in the same run:
//!
//! - start latency, from the start API call to the VM running (guest boot
//!   excluded), p50 and p99 over 50 starts, as hsevd measures it, through
//!   the QEMU driver and through the libvirt driver (on a libvirtd of the
//!   bench's own), beside a bare QEMU of the same VM spawned until QMP
//!   answers;
//! - `hsev vm list` with 1000 VMs in the store, beside `hsev vm list`
//!   with one (the fixed cost of the CLI and the connection);
//! - hsevd's resident memory with 100 VMs in the store, beside with none.

use std::process::Command;
use std::time::{Duration, Instant};

use hsev_e2e::daemon::{Daemon, Driver, ADMIN};

fn percentile(samples: &mut [f64], fraction: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let index = ((samples.len() as f64 - 1.0) * fraction).round() as usize;
    samples[index]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn create(daemon: &Daemon, name: &str, start: bool) {
    let mut args = vec![
        "vm", "create", name, "--image", "debian", "--vcpus", "1", "--memory", "256", "--mode",
        "none",
    ];
    if start {
        args.push("--start");
    }
    let output = daemon.hsev(ADMIN, &args);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Start latencies hsevd logged (`elapsed_ms=N` of its `started` lines).
fn logged_start_ms(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|line| line.contains(" started") && line.contains("elapsed_ms"))
        .filter_map(|line| {
            let at = line.find("elapsed_ms")?;
            line[at..]
                .trim_start_matches(|c: char| !c.is_ascii_digit())
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// A bare QEMU with the same machine, until its QMP socket answers `running`.
fn bare_qemu_ms(dir: &std::path::Path) -> f64 {
    let image = hsev_e2e::daemon::image_dir();
    let qmp = dir.join("bare-qmp.sock");
    let _ = std::fs::remove_file(&qmp);
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-no-user-config",
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            "256M",
        ])
        .arg("-kernel")
        .arg(image.join("boot/vmlinuz"))
        .arg("-initrd")
        .arg(image.join("boot/initrd.img"))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .spawn()
        .expect("qemu starts");
    let elapsed = loop {
        if let Ok(stream) = std::os::unix::net::UnixStream::connect(&qmp) {
            use std::io::{BufRead, BufReader, Write};
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut writer = stream;
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = writer
                .write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-status\"}\n");
            let mut answered = false;
            for _ in 0..4 {
                line.clear();
                if reader.read_line(&mut line).is_err() {
                    break;
                }
                if line.contains("\"running\"") {
                    answered = true;
                    break;
                }
            }
            if answered {
                break started.elapsed();
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let _ = child.kill();
    let _ = child.wait();
    elapsed.as_secs_f64() * 1000.0
}

/// hsevd's logged start latencies of `starts` starts and force stops of
/// one VM on `driver`; with `bare`, a bare QEMU's after each.
fn start_latencies(driver: Driver, starts: usize, mut bare: Option<&mut Vec<f64>>) -> Vec<f64> {
    let daemon = Daemon::start_on(driver, "");
    daemon.import_image();
    create(&daemon, "bench", false);
    let work = tempfile::tempdir().expect("tempdir");
    for _ in 0..starts {
        let output = daemon.hsev(ADMIN, ["vm", "start", "bench"]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let output = daemon.hsev(ADMIN, ["vm", "stop", "bench", "--force"]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        if let Some(bare) = bare.as_deref_mut() {
            bare.push(bare_qemu_ms(work.path()));
        }
    }
    let ours = logged_start_ms(&daemon.log());
    assert_eq!(ours.len(), starts, "one logged start per start");
    ours
}

fn main() {
    let starts: usize = std::env::var("BENCH_STARTS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(50);

    // Start latency, through each driver, beside a bare QEMU.
    let mut bare = Vec::new();
    let mut qemu = start_latencies(Driver::Qemu, starts, Some(&mut bare));
    let mut libvirt = start_latencies(Driver::Libvirt, starts, None);
    let (p50, p99) = (percentile(&mut qemu, 0.5), percentile(&mut qemu, 0.99));
    let (libvirt_p50, libvirt_p99) = (
        percentile(&mut libvirt, 0.5),
        percentile(&mut libvirt, 0.99),
    );
    let bare_p50 = percentile(&mut bare, 0.5);
    println!(
        "vm start, qemu driver (API call to QEMU running, {starts} starts): p50 {p50:.0} ms, p99 {p99:.0} ms (target p50 < 150 ms); \
         bare QEMU spawn to QMP running p50 {bare_p50:.0} ms: hsevd adds {:.0} ms ({:.2}x)",
        p50 - bare_p50,
        p50 / bare_p50
    );
    println!(
        "vm start, libvirt driver (API call to the domain running, {starts} starts): p50 {libvirt_p50:.0} ms, p99 {libvirt_p99:.0} ms; \
         {:.2}x the qemu driver's p50, {:.2}x a bare QEMU's",
        libvirt_p50 / p50,
        libvirt_p50 / bare_p50
    );

    // Placement counts stopped VMs against a host's capacity: a thousand
    // of them fit this 2-CPU host only with wide overcommits (what is
    // measured is the store and the API, not placement).
    let daemon = Daemon::start("[placement]\ncpu_overcommit = 1000.0\nmemory_overcommit = 50.0\n");
    daemon.import_image();
    // Memory with 100 VMs, and listing 1000.
    let idle_rss = rss_kib(daemon.pid());
    let list_ms = |daemon: &Daemon| -> f64 {
        let mut samples: Vec<f64> = (0..20)
            .map(|_| {
                let started = Instant::now();
                let output = daemon.hsev(ADMIN, ["vm", "list", "--output", "json"]);
                assert!(output.status.success());
                started.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        percentile(&mut samples, 0.5)
    };
    let one_ms = list_ms(&daemon);
    let create_batch = |from: usize, to: usize| {
        std::thread::scope(|scope| {
            for worker in 0..4 {
                let daemon = &daemon;
                scope.spawn(move || {
                    for index in (from + worker..to).step_by(4) {
                        create(daemon, &format!("vm-{index}"), false);
                    }
                });
            }
        });
    };
    create_batch(0, 99);
    let rss_100 = rss_kib(daemon.pid());
    println!(
        "hsevd resident memory: {} MiB with 100 VMs in the store, {} MiB with 1 ({:+.1} MiB)",
        rss_100 / 1024,
        idle_rss / 1024,
        (rss_100 as f64 - idle_rss as f64) / 1024.0
    );
    create_batch(99, 999);
    let thousand_ms = list_ms(&daemon);
    println!(
        "vm list with 1000 VMs: {thousand_ms:.1} ms end to end (target < 50 ms), with 1 VM {one_ms:.1} ms: {:.2}x",
        thousand_ms / one_ms
    );
}
