//! An HA VM whose encrypted disk's key is single-instance, on two QEMU test
//! hosts (network namespaces, simulated Secure Processors) whose disks are
//! on storage both share, its host cut off: the scenario its end-to-end
//! test checks and the HA benchmark times.

use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::daemon::{Driver, ADMIN, ALICE};
use crate::kbs::Kbs;
use crate::pool::{HostSpec, Pool};

/// The key's lease at the tenant's broker.
pub const KEY_LEASE_SECONDS: u32 = 8;

/// What the cut did, and what is left to look at.
#[derive(Debug)]
pub struct EncryptedHaRestart {
    /// The pool (h1 coordinates; the VM ran on h2, which is cut).
    pub pool: Pool,
    /// The tenant's broker, at the pool's gateway.
    pub kbs: Kbs,
    /// The VM as created.
    pub vm: serde_json::Value,
    /// From the cut until the VM runs on h1.
    pub running_after: Duration,
    /// From the cut until its guest on h1 opened the disk.
    pub unlocked_after: Duration,
    /// The guest's console on h1 once it opened the disk and keeps the
    /// key's lease.
    pub console: String,
    /// The shared disk folder (kept until the pool is gone).
    _shared: TempDir,
}

/// Boots alice's HA VM `vault` on h2 with a single-instance encrypted disk
/// (its first boot formats it and logs a line on it), cuts h2's link, and
/// waits until the VM runs on h1 and its guest there opened the disk and
/// listed the first boot's line.
pub fn cut_and_restart() -> EncryptedHaRestart {
    let shared = tempfile::tempdir().expect("the shared folder");
    let folder = format!("shared_dir = \"{}\"\n", shared.path().display());
    let pool = Pool::start(
        &[
            HostSpec::new("h1", Driver::Qemu).pool_keys(&format!("storage = \"shared\"\n{folder}")),
            HostSpec::new("h2", Driver::Qemu).pool_keys(&folder),
        ],
        "",
    );
    pool.coordinator().import_image();
    let gateway = pool.gateway();
    let kbs = Kbs::start_at(
        &[pool.host("h1").sim_dir(), pool.host("h2").sim_dir()],
        &format!("{gateway}:0"),
    );
    let port = kbs.address().rsplit(':').next().expect("a port").to_owned();
    let guest_url = format!("https://{gateway}:{port}");

    pool.coordinator().hsev_ok(ADMIN, ["host", "disable", "h1"]);
    let mut args = kbs.encrypted_vm_args("vault", &guest_url);
    args.extend(["--ha", "restart"].map(str::to_owned));
    let vm = pool.coordinator().json(ALICE, &args);
    assert_eq!(vm["host"], "h2", "{vm}");
    pool.coordinator().hsev_ok(ADMIN, ["host", "enable", "h1"]);
    let lease = KEY_LEASE_SECONDS.to_string();
    kbs.pin_alice_policy_with(
        pool.coordinator(),
        "vault",
        &guest_url,
        &["--single-instance", &lease],
    );
    pool.coordinator().hsev_ok(ALICE, ["vm", "start", "vault"]);
    let keeping = format!("keeping its {KEY_LEASE_SECONDS} s lease");
    let console = pool.coordinator().wait_console(ALICE, "vault", &keeping, 1);
    assert!(
        console.contains("HSEV-DISK-UNLOCKED /mnt/data boot=1"),
        "{console}"
    );

    let cut = Instant::now();
    pool.net().cut(pool.host("h2").net_host());
    let running_after = loop {
        let shown = pool.coordinator().json(ALICE, ["vm", "show", "vault"]);
        if shown["host"] == "h1" && shown["state"] == "running" {
            break cut.elapsed();
        }
        assert!(
            cut.elapsed() < Duration::from_secs(30),
            "not restarted on h1: {shown:#}\n{}",
            pool.coordinator().log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    pool.coordinator()
        .wait_console(ALICE, "vault", "boot log: boot=2 ", 1);
    let unlocked_after = cut.elapsed();
    // The agent then starts keeping the new launch's lease.
    let console = pool.coordinator().wait_console(ALICE, "vault", &keeping, 1);
    EncryptedHaRestart {
        pool,
        kbs,
        vm,
        running_after,
        unlocked_after,
        console,
        _shared: shared,
    }
}
