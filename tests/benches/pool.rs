//! A cold migration's cost beside a plain copy of the same bytes, measured
//! in one run between the same two test hosts (network namespaces):
//!
//! - `hsev vm migrate` of a stopped VM whose 1 GiB data disk is filled from
//!   /dev/urandom (incompressible), from the call to its answer: the disk
//!   streamed over the pool's mTLS channel, its BLAKE3 checksum checked,
//!   the copy flushed to the device, the VM moved in the store;
//! - the same file fetched over plain HTTP (`busybox httpd` in the source
//!   host's namespace, `curl` in the target's), no TLS, no checksum, and
//!   the copy flushed to the device (`fsync`) as the migration's is.
//!
//! Both start from the same cache state: before each, the source file is
//! flushed and dropped from the page cache, so each reads it from the
//! device (otherwise whichever goes second reads what the first just
//! cached).
//!
//! The moves alternate directions (h1 to h2, then back), and each is
//! followed by the plain copy in the same direction, so that the load of
//! the machine weighs on both alike. Printed: the medians and their ratio,
//! and for each round the target's own account of the copy (how long the
//! stream and the final flush took).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hsev_e2e::daemon::{Daemon, Driver, ADMIN, ALICE};
use hsev_e2e::pool::{HostSpec, Pool};

const DISK_MIB: u64 = 1024;
const ROUNDS: usize = 3;
const HTTP_PORT: u16 = 7480;

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn succeed(what: &str, output: std::process::Output) {
    assert!(
        output.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The VM's data disk on `host`.
fn disk_on(host: &Daemon, id: &str) -> PathBuf {
    host.state_dir()
        .join("vms")
        .join(id)
        .join("disk-data.qcow2")
}

/// Fills `disk` with `DISK_MIB` MiB from /dev/urandom after its first MiB
/// (the qcow2 header stays).
fn fill(disk: &Path) {
    let output = Command::new("dd")
        .arg("if=/dev/urandom")
        .arg(format!("of={}", disk.display()))
        .args(["bs=1M", "seek=1", "conv=notrunc"])
        .arg(format!("count={DISK_MIB}"))
        .stderr(Stdio::piped())
        .output()
        .expect("dd runs");
    succeed("dd", output);
}

/// Flushes `file` and drops it from the page cache (`dd iflag=nocache`
/// with `count=0` advises the kernel to drop the whole file's pages).
fn evict(file: &Path) {
    std::fs::File::open(file)
        .and_then(|opened| opened.sync_all())
        .expect("the disk flushes");
    let output = Command::new("dd")
        .arg(format!("if={}", file.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .stderr(Stdio::piped())
        .output()
        .expect("dd runs");
    succeed("dd iflag=nocache", output);
}

/// `busybox httpd` serving `dir` in `from`'s namespace.
fn serve(from: &Daemon, dir: &Path) -> Child {
    let host = from.net_host();
    let child = host
        .command(Path::new("/bin/busybox"))
        .args(["httpd", "-f", "-p"])
        .arg(format!("{}:{HTTP_PORT}", host.address))
        .arg("-h")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("busybox httpd starts (busybox-static, make deps)");
    std::thread::sleep(Duration::from_millis(300));
    child
}

/// Seconds `curl` in `to`'s namespace takes to fetch `file` from `from`
/// and the copy takes to reach the device.
fn plain_copy_seconds(from: &Daemon, to: &Daemon, file: &Path, out: &Path) -> f64 {
    let dir = file.parent().expect("a folder");
    let name = file
        .file_name()
        .and_then(|name| name.to_str())
        .expect("a name");
    let mut server = serve(from, dir);
    evict(file);
    let started = Instant::now();
    let output = to
        .net_host()
        .command(Path::new("/usr/bin/curl"))
        .args(["--fail", "--silent", "--show-error", "--output"])
        .arg(out)
        .arg(format!(
            "http://{}:{HTTP_PORT}/{name}",
            from.net_host().address
        ))
        .output()
        .expect("curl runs");
    if output.status.success() {
        std::fs::File::open(out)
            .and_then(|copy| copy.sync_all())
            .expect("the plain copy flushes");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = server.kill();
    let _ = server.wait();
    succeed("curl", output);
    let copied = std::fs::metadata(out).map_or(0, |metadata| metadata.len());
    let original = std::fs::metadata(file).map_or(0, |metadata| metadata.len());
    assert_eq!(copied, original, "the plain copy is whole");
    let _ = std::fs::remove_file(out);
    elapsed
}

fn main() {
    let pool = Pool::start(
        &[
            HostSpec::new("h1", Driver::Fake).without_sev(),
            HostSpec::new("h2", Driver::Fake).without_sev(),
        ],
        "",
    );
    pool.coordinator().import_image();
    let size = format!("data:{DISK_MIB}");
    let created = pool.coordinator().json(
        ALICE,
        [
            "vm", "create", "mover", "--image", "debian", "--vcpus", "1", "--memory", "256",
            "--mode", "none", "--host", "h1", "--disk", &size,
        ],
    );
    let id = created["id"].as_str().expect("an id").to_owned();
    fill(&disk_on(pool.host("h1"), &id));
    let scratch = tempfile::tempdir().expect("tempdir");

    let mut migrations = Vec::new();
    let mut plain = Vec::new();
    let mut here = "h1";
    for round in 0..ROUNDS * 2 {
        let there = if here == "h1" { "h2" } else { "h1" };
        let disk = disk_on(pool.host(here), &id);
        plain.push(plain_copy_seconds(
            pool.host(here),
            pool.host(there),
            &disk,
            &scratch.path().join("plain"),
        ));
        evict(&disk);
        let started = Instant::now();
        let output = pool
            .coordinator()
            .hsev(ADMIN, ["vm", "migrate", "mover", "--to", there]);
        migrations.push(started.elapsed().as_secs_f64());
        assert!(
            output.status.success(),
            "hsev vm migrate: {}\n{here}'s log:\n{}\n{there}'s log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            pool.host(here).log(),
            pool.host(there).log()
        );
        let log = pool.host(there).log();
        let copied = log
            .lines()
            .rfind(|line| line.contains("disk copied"))
            .unwrap_or_default();
        eprintln!(
            "round {}: {here} -> {there}: migrate {:.2} s, plain copy {:.2} s; {copied}",
            round + 1,
            migrations[round],
            plain[round]
        );
        here = there;
    }
    let ours = median(&mut migrations);
    let reference = median(&mut plain);
    println!("migrate_1gib_median_s {ours:.2}");
    println!("plain_copy_1gib_median_s {reference:.2}");
    println!("migrate_to_plain_ratio {:.2}", ours / reference);
}
