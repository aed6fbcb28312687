//! High availability of a confidential VM with real QEMU guests (TCG) on
//! two test hosts, each its own network namespace and simulated Secure
//! Processor, disks on storage both hosts share. The VM is HA and its
//! encrypted disk's key is single-instance at its tenant's broker. Its
//! host's link is cut: that host fences it, the coordinator restarts it on
//! the other host, and the new launch gets the key only as the one live
//! instance, after a fresh attestation on the new host's chip; its disk
//! still holds the first boot's data. The cut host comes back and keeps no
//! copy of the VM.

use std::time::{Duration, Instant};

use hsev_e2e::daemon::{qemu_processes_of, ALICE};
use hsev_e2e::ha::{cut_and_restart, EncryptedHaRestart, KEY_LEASE_SECONDS};

#[test]
fn an_ha_vm_with_a_single_instance_disk_key_restarts_on_another_host_with_its_data() {
    // Bound whole: its shared folder must outlive the pool.
    let run: EncryptedHaRestart = cut_and_restart();
    let (pool, kbs, vm, console) = (&run.pool, &run.kbs, &run.vm, &run.console);
    let id = vm["id"].as_str().expect("an id").to_owned();
    let resource = format!("alice/disk-key/{id}");
    assert!(
        pool.host("h2").log().contains("HA VM fenced"),
        "{}",
        pool.host("h2").log()
    );
    // On h1 the new launch attested, got the key as the one live instance
    // and opened the disk the first boot wrote.
    assert!(
        console.contains("boot log: boot=1 "),
        "the first boot's line survived the restart: {console}"
    );
    assert!(
        console.contains(&format!("keeping its {KEY_LEASE_SECONDS} s lease")),
        "{console}"
    );
    let releases = kbs.audited("release", "resource", &resource);
    assert_eq!(releases.len(), 2, "{releases:#?}");
    let lease = releases[1]["lease"].as_str().unwrap_or_default();
    let first_holder = releases[0]["report_id"].as_str().expect("the first holder");
    assert!(
        lease.contains("taking over from report_id") && lease.contains(first_holder),
        "{lease}"
    );
    let chips: std::collections::BTreeSet<String> = kbs
        .audited("attestation", "result", "accepted")
        .iter()
        .filter(|entry| entry["measurement"] == vm["expected_measurement"])
        .filter_map(|entry| entry["chip_id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        chips.len(),
        2,
        "an attestation on each host's chip: {chips:?}"
    );
    println!(
        "h2 cut: vault running on h1 after {:.1} s, its disk open there after {:.1} s",
        run.running_after.as_secs_f64(),
        run.unlocked_after.as_secs_f64()
    );

    // h2 comes back: no copy of the VM stays there, one QEMU in all.
    pool.net().heal(pool.host("h2").net_host());
    pool.wait_hosts(|hosts| {
        hosts
            .iter()
            .any(|host| host["name"] == "h2" && host["status"] == "up")
    });
    let old_folder = pool.host("h2").state_dir().join("vms").join(&id);
    let deadline = Instant::now() + Duration::from_secs(20);
    while old_folder.exists() {
        assert!(Instant::now() < deadline, "h2 kept the VM's old folder");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(qemu_processes_of(&id).len(), 1, "one instance of {id}");
    let shown = pool.coordinator().json(ALICE, ["vm", "show", "vault"]);
    assert_eq!(
        (shown["host"].as_str(), shown["state"].as_str()),
        (Some("h1"), Some("running")),
        "{shown}"
    );
    kbs.verify_audit();
}
