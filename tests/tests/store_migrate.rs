//! `hsevd migrate-store`: a coordinator's pool moves from its SQLite file
//! to a real 3-member etcd cluster, and the same hsevd started on etcd
//! shows every VM, image, host and event it had; a second run is refused
//! (the prefix holds a pool) and changes nothing.

#![allow(clippy::unwrap_used)] // tests

use hsev_e2e::daemon::{Daemon, Driver, ADMIN, ALICE};
use hsev_e2e::etcd::EtcdCluster;

fn names(listed: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_sqlite_pool_moves_to_etcd_and_hsevd_goes_on_there() {
    let cluster = EtcdCluster::start(3);
    let mut daemon = Daemon::configured(Driver::Fake, "host_name = \"h1\"\n", true);
    daemon.run();
    daemon.import_stand_in_image();
    for name in ["web", "db", "cache"] {
        let created = daemon.hsev(
            ALICE,
            [
                "vm", "create", name, "--image", "debian", "--vcpus", "1", "--memory", "256",
                "--mode", "none",
            ],
        );
        assert!(
            created.status.success(),
            "{}",
            String::from_utf8_lossy(&created.stderr)
        );
    }
    let vms_before = daemon.json(ADMIN, ["vm", "list"]);
    let events_before = daemon.json(ALICE, ["vm", "show", "web"]);
    daemon.kill_9();

    let endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| format!("{e:?}"))
        .collect();
    daemon.append_config(&format!(
        "[store]\nkind = \"etcd\"\nendpoints = [{}]\nprefix = \"/moved/\"\nlease_ttl_s = 3\ntimeout_ms = 1500\n",
        endpoints.join(", ")
    ));
    let moved = daemon.hsevd(["migrate-store"]);
    let said = String::from_utf8_lossy(&moved.stdout).into_owned();
    println!("{said}");
    assert!(
        moved.status.success(),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    assert!(said.contains("1 host(s), 1 image(s), 3 VM(s)"), "{said}");

    let again = daemon.hsevd(["migrate-store"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    daemon.restart();
    let vms_after = daemon.json(ADMIN, ["vm", "list"]);
    assert_eq!(names(&vms_after), names(&vms_before));
    assert_eq!(names(&vms_after), ["cache", "db", "web"]);
    assert_eq!(names(&daemon.json(ADMIN, ["image", "list"])), ["debian"]);
    let events_after = daemon.json(ALICE, ["vm", "show", "web"]);
    assert_eq!(events_after["id"], events_before["id"]);
    // The pool goes on there.
    let created = daemon.hsev(
        ALICE,
        [
            "vm", "create", "after", "--image", "debian", "--vcpus", "1", "--memory", "256",
            "--mode", "none",
        ],
    );
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
}
