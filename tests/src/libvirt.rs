//! A real libvirt daemon for tests and benches: `virtlogd -d` and
//! `libvirtd -d` (no systemd here), each with its own pid file, in a
//! mount namespace of their own where `/run/libvirt`, `/var/lib/libvirt`,
//! `/var/log/libvirt` and `/etc/libvirt/qemu` are empty tmpfs folders and
//! `/etc/libvirt/qemu.conf` is this test's: several daemons (one per test)
//! run side by side without sharing a domain, a lock or a network
//! definition, and nothing of the machine's own libvirt setup is read or
//! changed. QEMU runs as root without relabelling, so it reads the test's
//! temporary folders. The listening socket is in the daemon's folder and
//! the URI says so (`qemu:///system?socket=...`).
//!
//! Dropping a [`Libvirtd`] destroys every domain it runs, then stops both
//! daemons. QEMU's capability cache (/var/cache/libvirt) stays shared, so
//! only the machine's first daemon spends seconds probing QEMU.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A running pair of daemons.
#[derive(Debug)]
pub struct Libvirtd {
    dir: tempfile::TempDir,
}

const LIBVIRTD: &str = "/usr/sbin/libvirtd";
const VIRTLOGD: &str = "/usr/sbin/virtlogd";
const VIRSH: &str = "/usr/bin/virsh";

/// The tools `make deps` installs for the libvirt driver, checked so that a
/// missing one fails with how to get it.
pub fn require_libvirt_tools() {
    for tool in [
        LIBVIRTD,
        VIRTLOGD,
        VIRSH,
        "/usr/bin/virt-xml-validate",
        "/usr/bin/xmllint",
    ] {
        assert!(
            Path::new(tool).is_file(),
            "{tool} is missing: run `make deps` (libvirt from bookworm-backports)"
        );
    }
}

impl Libvirtd {
    /// Starts the daemons and waits until libvirtd answers.
    pub fn start() -> Libvirtd {
        require_libvirt_tools();
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("sock")).expect("sock dir");
        std::fs::write(
            root.join("libvirtd.conf"),
            format!(
                "unix_sock_dir = \"{}\"\nunix_sock_rw_perms = \"0700\"\n\
                 auth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n\
                 log_outputs = \"3:file:{}\"\n",
                root.join("sock").display(),
                root.join("libvirtd.log").display()
            ),
        )
        .expect("libvirtd.conf");
        std::fs::write(
            root.join("qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nremember_owner = 0\n\
             security_driver = \"none\"\n",
        )
        .expect("qemu.conf");
        std::fs::create_dir_all(root.join("etc-qemu")).expect("etc-qemu");
        let script = format!(
            "set -e\n\
             for dir in /run/libvirt /var/lib/libvirt /var/log/libvirt /etc/libvirt/qemu; do\n\
               mkdir -p $dir; mount -t tmpfs -o mode=0755 tmpfs $dir\n\
             done\n\
             mount --bind {qemu_conf} /etc/libvirt/qemu.conf\n\
             {VIRTLOGD} -d -p {root}/virtlogd.pid\n\
             {LIBVIRTD} -d -p {root}/libvirtd.pid -f {root}/libvirtd.conf\n",
            qemu_conf = root.join("qemu.conf").display(),
            root = root.display(),
        );
        let output = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .output()
            .expect("unshare runs");
        assert!(
            output.status.success(),
            "starting virtlogd and libvirtd in a mount namespace failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let daemon = Libvirtd { dir };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let answer = daemon.virsh(["version"]);
            if answer.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "libvirtd did not answer in 90 s: {}\n{}",
                String::from_utf8_lossy(&answer.stderr),
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    /// The connection URI.
    pub fn uri(&self) -> String {
        format!(
            "qemu:///system?socket={}",
            self.dir.path().join("sock/libvirt-sock").display()
        )
    }

    /// hsevd.toml lines choosing the libvirt driver on this daemon.
    pub fn hsevd_config(&self) -> String {
        format!(
            "driver = \"libvirt\"\n[libvirt]\nuri = \"{}\"\n",
            self.uri()
        )
    }

    /// Runs `virsh` against it.
    pub fn virsh<I, S>(&self, args: I) -> std::process::Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Command::new(VIRSH)
            .arg("-c")
            .arg(self.uri())
            .args(args)
            .output()
            .expect("virsh runs")
    }

    /// The UUIDs of the running domains.
    pub fn running_domains(&self) -> Vec<String> {
        let output = self.virsh(["list", "--uuid"]);
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// What libvirtd logged (errors and warnings).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("libvirtd.log")).unwrap_or_default()
    }

    /// The pid of a daemon from its pid file.
    fn pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.pid")))
            .ok()
            .and_then(|text| text.trim().parse().ok())
    }

    /// Its folder.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        for uuid in self.running_domains() {
            let _ = self.virsh(["destroy", &uuid]);
        }
        for name in ["libvirtd", "virtlogd"] {
            let Some(pid) = self.pid(name) else { continue };
            let _ = Command::new("kill").arg(pid.to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}
