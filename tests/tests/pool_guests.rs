//! Real QEMU guests (TCG) across a pool of three test hosts, each its own
//! network namespace, hsevd and simulated Secure Processor: SNP VMs spread
//! over the hosts and boot there, the tenant verifies a VM that runs on a
//! member host, live migration is refused, a cold migration is a new
//! launch attested on the new host's chip, a host in maintenance is
//! evacuated, and a killed host (its hsevd and its QEMUs) shows down with
//! its VMs unknown; a VM with an encrypted disk, evacuated, opens its disk
//! on the new host after a fresh attestation at its tenant's broker.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

use hsev_e2e::daemon::{image_dir, Daemon, Driver, ADMIN, ALICE};
use hsev_e2e::kbs::Kbs;
use hsev_e2e::pool::{HostSpec, Pool};

/// What the guest agent prints once it answers attestation requests.
const RESPONDER_READY: &str = "answering attestation requests";

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn path(path: &Path) -> &str {
    path.to_str().expect("utf-8")
}

/// Creates and starts alice's SNP VM `name` through the coordinator.
fn boot(pool: &Pool, name: &str) -> serde_json::Value {
    pool.coordinator().json(
        ALICE,
        [
            "vm", "create", name, "--image", "debian", "--vcpus", "1", "--memory", "512", "--mode",
            "sev-snp", "--start",
        ],
    )
}

/// `hsev vm attest VM` as alice, trusting `host`'s simulated platform.
fn attest(pool: &Pool, vm: &str, host: &Daemon) -> Output {
    let manifest = image_dir().join("manifest.json");
    let roots = host.sim_roots();
    pool.coordinator().hsev(
        ALICE,
        [
            "vm",
            "attest",
            vm,
            "--image-manifest",
            path(&manifest),
            "--sim-root",
            path(&roots),
        ],
    )
}

fn accepted(output: &Output) {
    assert_eq!(output.status.code(), Some(0), "{}", text(output));
    assert!(text(output).contains("ACCEPTED"), "{}", text(output));
}

fn show(pool: &Pool, vm: &str) -> serde_json::Value {
    pool.coordinator().json(ALICE, ["vm", "show", vm])
}

/// Waits until `vm` runs and its guest answers attestation requests on
/// its current host (`count` times on that host's console so far).
fn wait_ready(pool: &Pool, vm: &str, count: usize) {
    pool.coordinator()
        .wait_console(ALICE, vm, RESPONDER_READY, count);
}

#[test]
fn confidential_guests_spread_migrate_and_evacuate_across_three_hosts() {
    let qemu = |name| HostSpec::new(name, Driver::Qemu);
    let mut pool = Pool::start(&[qemu("h1"), qemu("h2"), qemu("h3")], "");
    pool.coordinator().import_image();

    // Spread: one VM per host.
    let mut on: BTreeMap<String, String> = BTreeMap::new();
    for name in ["a", "b", "c"] {
        let vm = boot(&pool, name);
        on.insert(
            vm["host"].as_str().expect("a host").to_owned(),
            name.to_owned(),
        );
    }
    assert_eq!(on.keys().collect::<Vec<_>>(), ["h1", "h2", "h3"]);
    for name in on.values() {
        wait_ready(&pool, name, 1);
    }

    // The tenant verifies the VM on h2 itself, the coordinator relaying.
    let on_h2 = on["h2"].clone();
    accepted(&attest(&pool, &on_h2, pool.host("h2")));

    // Live migration of an SNP guest is refused with the reason.
    let live = pool
        .coordinator()
        .hsev(ADMIN, ["vm", "migrate", &on_h2, "--live"]);
    assert!(!live.status.success());
    assert!(
        text(&live).contains("cannot live-migrate"),
        "{}",
        text(&live)
    );

    // Cold migration to h3: a new launch, on h3's chip, with the same
    // expected measurement.
    let expected = show(&pool, &on_h2)["expected_measurement"].clone();
    let moved = pool
        .coordinator()
        .hsev(ADMIN, ["vm", "migrate", &on_h2, "--to", "h3"]);
    assert!(moved.status.success(), "{}", text(&moved));
    assert!(text(&moved).contains("a new launch"), "{}", text(&moved));
    let shown = show(&pool, &on_h2);
    assert_eq!(shown["host"], "h3");
    assert_eq!(shown["state"], "running");
    assert_eq!(shown["expected_measurement"], expected);
    wait_ready(&pool, &on_h2, 1);
    accepted(&attest(&pool, &on_h2, pool.host("h3")));
    let old_chip = attest(&pool, &on_h2, pool.host("h2"));
    assert_eq!(old_chip.status.code(), Some(1), "{}", text(&old_chip));

    // Maintenance on h3 evacuates both its VMs to the other hosts.
    let entered = pool
        .coordinator()
        .hsev(ADMIN, ["host", "maintenance", "enter", "h3"]);
    let said = text(&entered);
    assert!(entered.status.success(), "{said}");
    for name in [&on["h3"], &on_h2] {
        assert!(said.contains(&format!("alice/{name} moved to")), "{said}");
        let shown = show(&pool, name);
        assert_ne!(shown["host"], "h3", "{shown}");
        assert_eq!(shown["state"], "running", "{shown}");
    }
    let hosts = pool.hosts_json();
    let h3 = hosts.iter().find(|host| host["name"] == "h3").expect("h3");
    assert_eq!(h3["status"], "maintenance");
    assert_eq!(h3["vms"], 0);
    for name in [&on["h3"], &on_h2] {
        let host = show(&pool, name)["host"].as_str().expect("host").to_owned();
        wait_ready(&pool, name, 1);
        accepted(&attest(&pool, name, pool.host(&host)));
    }
    let exited = pool
        .coordinator()
        .hsev(ADMIN, ["host", "maintenance", "exit", "h3"]);
    assert!(exited.status.success(), "{}", text(&exited));

    // h2 dies, its hsevd and its QEMUs: it shows down, its VMs unknown.
    let on_h2_now: Vec<String> = ["a", "b", "c"]
        .iter()
        .filter(|name| show(&pool, name)["host"] == "h2")
        .map(|name| (*name).to_owned())
        .collect();
    assert!(!on_h2_now.is_empty());
    pool.host_mut("h2").crash();
    pool.wait_hosts(|hosts| {
        hosts
            .iter()
            .any(|host| host["name"] == "h2" && host["status"] == "down")
    });
    for name in &on_h2_now {
        let shown = show(&pool, name);
        assert_eq!(shown["state"], "unknown", "{shown}");
        assert!(
            shown["state_reason"]
                .as_str()
                .is_some_and(|reason| reason.contains("host h2 is down")),
            "{shown}"
        );
    }
}

#[test]
fn an_encrypted_disk_evacuated_with_its_vm_opens_on_the_new_host_after_a_fresh_attestation() {
    let qemu = |name| HostSpec::new(name, Driver::Qemu);
    let pool = Pool::start(&[qemu("h1"), qemu("h2")], "");
    pool.coordinator().import_image();
    // The tenant's broker, where both hosts' guests reach it, trusting both
    // hosts' simulated platforms.
    let gateway = pool.gateway();
    let kbs = Kbs::start_at(
        &[pool.host("h1").sim_dir(), pool.host("h2").sim_dir()],
        &format!("{gateway}:0"),
    );
    let port = kbs.address().rsplit(':').next().expect("a port").to_owned();
    let guest_url = format!("https://{gateway}:{port}");
    let vm = pool
        .coordinator()
        .json(ALICE, kbs.encrypted_vm_args("vault", &guest_url));
    let id = vm["id"].as_str().expect("an id").to_owned();
    let expected = vm["expected_measurement"].clone();
    let home = vm["host"].as_str().expect("a host").to_owned();
    let other = if home == "h1" { "h2" } else { "h1" };
    kbs.pin_alice_policy(pool.coordinator(), "vault", &guest_url);

    // First boot: the guest gets its key and formats its disk.
    let started = pool.coordinator().hsev(ALICE, ["vm", "start", "vault"]);
    assert!(started.status.success(), "{}", text(&started));
    let console = pool
        .coordinator()
        .wait_console(ALICE, "vault", "HSEV-DISK-UNLOCKED", 1);
    assert!(console.contains("boot=1"), "{console}");
    let resource = format!("alice/disk-key/{id}");
    assert_eq!(kbs.audited("release", "resource", &resource).len(), 1);

    // Its host into maintenance: the VM moves to the other one, a new
    // launch there.
    let entered = pool
        .coordinator()
        .hsev(ADMIN, ["host", "maintenance", "enter", &home]);
    assert!(entered.status.success(), "{}", text(&entered));
    let shown = show(&pool, "vault");
    assert_eq!(shown["host"], other, "{shown}");
    assert_eq!(
        shown["expected_measurement"], expected,
        "the same launch measured"
    );

    // There the guest only opens its disk, and reads back what it wrote
    // before: the second boot's listing of the boot log starts with the
    // first boot's line.
    let console = pool
        .coordinator()
        .wait_console(ALICE, "vault", "boot log: boot=2 ", 1);
    let second = console.rfind("boot log: boot=2 ").expect("boot 2");
    let listing = &console[console[..second].rfind("mounted ").expect("mounted")..second];
    assert!(
        listing.contains("boot log: boot=1 "),
        "the first boot's line survived the move: {console}"
    );
    assert!(
        console.matches("formatting it as LUKS2").count() <= 1,
        "formatted once, before the move: {console}"
    );

    // The broker saw a fresh attestation from the new host's chip, then
    // released the key a second time.
    let chips: BTreeMap<String, usize> = kbs
        .audited("attestation", "result", "accepted")
        .iter()
        .filter(|entry| entry["measurement"] == expected)
        .fold(BTreeMap::new(), |mut chips, entry| {
            *chips
                .entry(entry["chip_id"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
            chips
        });
    assert_eq!(chips.len(), 2, "one attestation per host's chip: {chips:?}");
    assert_eq!(kbs.audited("release", "resource", &resource).len(), 2);
    kbs.verify_audit();
}
