//! High availability across real hsevd hosts, one network namespace each
//! (fake driver: what is tested is who runs what, and when). A member's
//! link is cut: it fences its HA VMs itself before the coordinator may
//! restart them; the coordinator restarts them elsewhere by priority
//! within capacity and marks the others lost; `hsev pool ha plan` saw it
//! coming; the cut host comes back and is reconciled: no VM twice, no
//! orphan VMM or files, no allocation left behind.

use std::time::{Duration, Instant};

use hsev_e2e::daemon::{Driver, ADMIN, ALICE};
use hsev_e2e::pool::{HostSpec, Pool};

/// The test pool's timing (tests/src/pool.rs): heartbeats every 300 ms,
/// a host down after 2.5 s; fencing at 2.5 s, restarts after 2.5 + 1 s.
const LEASE: Duration = Duration::from_millis(2500);
const MARGIN: Duration = Duration::from_millis(1000);
const MARGIN_KEY: &str = "fence_margin_ms = 1000";

fn create(pool: &Pool, name: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec![
        "vm", "create", name, "--image", "debian", "--vcpus", "1", "--memory", "256", "--start",
        "--output", "json",
    ];
    all.extend_from_slice(args);
    let output = pool.coordinator().hsev(ALICE, &all);
    assert!(
        output.status.success(),
        "vm create {name}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("vm create prints JSON")
}

fn show(pool: &Pool, vm: &str) -> serde_json::Value {
    pool.coordinator().json(ALICE, ["vm", "show", vm])
}

fn plan(pool: &Pool, failures: &str) -> (bool, serde_json::Value) {
    let output = pool.coordinator().hsev(
        ADMIN,
        [
            "pool",
            "ha",
            "plan",
            "--host-failures",
            failures,
            "--output",
            "json",
        ],
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!(
            "pool ha plan prints JSON: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert_eq!(
        output.status.success(),
        json["restartable"] == true,
        "{json}"
    );
    (output.status.success(), json)
}

#[test]
fn a_cut_host_fences_its_ha_vms_which_restart_elsewhere_by_priority_and_it_is_reconciled() {
    // h1 coordinates and has no SEV; h2 and h3 have simulated Secure
    // Processors, h3 with room for one SEV guest only.
    let pool = Pool::start(
        &[
            HostSpec::new("h1", Driver::Fake)
                .without_sev()
                .pool_keys(MARGIN_KEY),
            HostSpec::new("h2", Driver::Fake).pool_keys(MARGIN_KEY),
            HostSpec::new("h3", Driver::Fake)
                .sim(&["--asids", "1"])
                .pool_keys(MARGIN_KEY),
        ],
        "",
    );
    pool.coordinator().import_stand_in_image();
    // Everything starts on h2.
    pool.coordinator().hsev_ok(ADMIN, ["host", "disable", "h3"]);
    let high = create(
        &pool,
        "high",
        &["--mode", "sev-snp", "--ha", "restart", "--ha-priority", "9"],
    );
    assert_eq!(
        (high["host"].as_str(), high["state"].as_str()),
        (Some("h2"), Some("running")),
        "{high}"
    );
    assert_eq!(high["spec"]["ha"], "restart", "{high}");
    assert_eq!(high["spec"]["ha_priority"], 9, "{high}");
    let plain = create(&pool, "plain", &["--mode", "none", "--host", "h2"]);
    assert_eq!(plain["state"], "running", "{plain}");
    pool.coordinator().hsev_ok(ADMIN, ["host", "enable", "h3"]);

    // With local storage, an HA VM may not have disks: they would stay on
    // a failed host. Refused, nothing made.
    let with_disk = pool.coordinator().hsev(
        ALICE,
        [
            "vm", "create", "kept", "--image", "debian", "--vcpus", "1", "--memory", "256",
            "--mode", "none", "--disk", "data:16", "--ha", "restart",
        ],
    );
    let said = String::from_utf8_lossy(&with_disk.stderr);
    assert!(!with_disk.status.success(), "{said}");
    assert!(
        said.contains("storage = \"shared\"") && said.contains("data"),
        "{said}"
    );
    let listed = pool.coordinator().json(ALICE, ["vm", "list"]);
    assert!(!listed.to_string().contains("\"kept\""), "{listed}");

    // One HA VM on h2, room for it on h3: any one host may fail.
    let (restartable, json) = plan(&pool, "1");
    assert!(restartable, "{json}");
    assert_eq!(json["scenarios"], 3, "{json}");

    // A second one, created HA-less and made HA while stopped (`vm set`,
    // refused while it runs).
    pool.coordinator().hsev_ok(ADMIN, ["host", "disable", "h3"]);
    let low = create(&pool, "low", &["--mode", "sev-snp"]);
    assert_eq!(low["host"], "h2", "{low}");
    let running = pool.coordinator().hsev(
        ALICE,
        ["vm", "set", "low", "--ha", "restart", "--ha-priority", "1"],
    );
    assert!(!running.status.success());
    assert!(
        String::from_utf8_lossy(&running.stderr).contains("not running"),
        "{}",
        String::from_utf8_lossy(&running.stderr)
    );
    for args in [
        &["vm", "stop", "low"][..],
        &["vm", "set", "low", "--ha", "restart", "--ha-priority", "1"],
        &["vm", "start", "low"],
    ] {
        pool.coordinator().hsev_ok(ALICE, args);
    }
    pool.coordinator().hsev_ok(ADMIN, ["host", "enable", "h3"]);
    let (restartable, json) = plan(&pool, "1");
    assert!(!restartable, "{json}");
    let shortfalls = json["shortfalls"].to_string();
    assert!(
        shortfalls.contains("if h2 failed") && shortfalls.contains("alice/low"),
        "{json}"
    );
    assert!(!shortfalls.contains("alice/high"), "{json}");

    // The cut.
    let cut_at = Instant::now();
    pool.net().cut(pool.host("h2").net_host());
    let mut fenced_at = None;
    let restarted = loop {
        if fenced_at.is_none() && pool.host("h2").log().contains("HA VM fenced") {
            fenced_at = Some(cut_at.elapsed());
        }
        let shown = show(&pool, "high");
        if shown["host"] == "h3" && shown["state"] == "running" {
            break (cut_at.elapsed(), shown);
        }
        assert!(
            cut_at.elapsed() < Duration::from_secs(20),
            "high was not restarted: {shown:#}\n{}",
            pool.coordinator().log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let (restart_after, high) = restarted;
    let fenced_at = fenced_at.unwrap_or_else(|| {
        panic!(
            "h2 did not fence its HA VMs before high ran on h3 ({restart_after:?})\n{}",
            pool.host("h2").log()
        )
    });
    eprintln!(
        "h2 cut: fenced its HA VMs after {fenced_at:?}, high running on h3 after \
         {restart_after:?} (lease {LEASE:?}, fence margin {MARGIN:?})"
    );
    // Fenced within the lease (and a watchdog period and a poll), never
    // sooner than the last answered heartbeat allows; restarted only after
    // the lease and the margin, counted from the last heartbeat heard
    // (at most one heartbeat, 300 ms, before the cut).
    assert!(
        fenced_at >= LEASE - Duration::from_millis(400)
            && fenced_at < LEASE + Duration::from_secs(1),
        "fenced after {fenced_at:?}"
    );
    assert!(
        restart_after >= LEASE + MARGIN - Duration::from_millis(400),
        "restarted after {restart_after:?}"
    );
    assert!(fenced_at < restart_after);
    assert_ne!(high["id"], serde_json::Value::Null);

    // No room for the low one; the plain one is not HA.
    let low = pool
        .coordinator()
        .wait_vm(ALICE, "low", Duration::from_secs(5), |vm| {
            vm["state"] == "lost"
        });
    let reason = low["state_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("h2 failed") && reason.contains("no host can take"),
        "{low}"
    );
    let plain = pool
        .coordinator()
        .wait_vm(ALICE, "plain", Duration::from_secs(5), |vm| {
            vm["state"] == "lost"
        });
    assert!(
        plain["state_reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("not HA, not restarted")),
        "{plain}"
    );
    let hosts = pool.hosts_json();
    let h2 = hosts.iter().find(|host| host["name"] == "h2").expect("h2");
    assert_eq!(h2["status"], "failed", "{h2}");

    // Back: high stays on h3 only (h2's old copy removed), plain (never
    // fenced) is adopted where it ran, low is recorded as fenced.
    let h2_vms = pool.host("h2").state_dir().join("vms");
    assert!(h2_vms.join(high["id"].as_str().expect("id")).is_dir());
    pool.net().heal(pool.host("h2").net_host());
    pool.wait_hosts(|hosts| {
        hosts
            .iter()
            .any(|host| host["name"] == "h2" && host["status"] == "up")
    });
    let plain = pool
        .coordinator()
        .wait_vm(ALICE, "plain", Duration::from_secs(10), |vm| {
            vm["state"] == "running"
        });
    assert_eq!(plain["host"], "h2", "{plain}");
    let low = pool
        .coordinator()
        .wait_vm(ALICE, "low", Duration::from_secs(10), |vm| {
            vm["state"] == "failed"
        });
    assert!(
        low["state_reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("fenced by its host")),
        "{low}"
    );
    let high = show(&pool, "high");
    assert_eq!(
        (high["host"].as_str(), high["state"].as_str()),
        (Some("h3"), Some("running")),
        "{high}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while h2_vms.join(high["id"].as_str().expect("id")).exists() {
        assert!(Instant::now() < deadline, "h2 kept high's old folder");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Allocations as the store has them: h3 holds high, h2 plain and low.
    let hosts = pool.hosts_json();
    let placed = |name: &str| {
        hosts
            .iter()
            .find(|host| host["name"] == name)
            .map(|host| host["vms"].clone())
            .unwrap_or_default()
    };
    assert_eq!(
        (placed("h2"), placed("h3")),
        (2.into(), 1.into()),
        "{hosts:#?}"
    );
    // And as placement counts them: h2's ASIDs free but low's, h3's none.
    let free = |name: &str| {
        let host = hosts
            .iter()
            .find(|host| host["name"] == name)
            .expect("host");
        let sev = &host["capabilities"]["sev"];
        (sev["asids_total"].as_u64(), sev["asids_free"].as_u64())
    };
    let (h2_total, h2_free) = free("h2");
    assert_eq!(h2_free, h2_total.map(|total| total - 1), "{hosts:#?}");
    assert_eq!(free("h3"), (Some(1), Some(0)), "{hosts:#?}");
    // Once each.
    let all = pool.coordinator().json(ALICE, ["vm", "list"]);
    let names: Vec<&str> = all
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|vm| vm["name"].as_str())
        .collect();
    assert_eq!(names.len(), 3, "{all:#}");
}

#[test]
fn a_pool_that_must_survive_a_host_failure_refuses_the_ha_vm_that_would_break_its_plan() {
    // h2 and h3 have simulated Secure Processors, h3 room for one SEV
    // guest only; the plan must survive any one host's failure.
    let pool = Pool::start(
        &[
            HostSpec::new("h1", Driver::Fake).without_sev(),
            HostSpec::new("h2", Driver::Fake),
            HostSpec::new("h3", Driver::Fake).sim(&["--asids", "1"]),
        ],
        "[placement]\nha_host_failures_to_tolerate = 1",
    );
    pool.coordinator().import_stand_in_image();
    let snp = ["--mode", "sev-snp"];
    let ha = [&snp[..], &["--ha", "restart"]].concat();

    // One HA SNP VM: whichever of h2 and h3 fails, the other takes it.
    create(&pool, "first", &ha);

    // A second would leave one of them without room (h3 has one ASID):
    // refused, with the shortfall, and nothing recorded.
    let mut args = vec![
        "vm", "create", "second", "--image", "debian", "--vcpus", "1", "--memory", "256",
    ];
    args.extend_from_slice(&ha);
    let refused = pool.coordinator().hsev(ALICE, &args);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{said}");
    assert!(
        said.contains("would break the pool's HA plan")
            && said.contains("ha_host_failures_to_tolerate")
            && said.contains("could not restart"),
        "{said}"
    );
    let listed = pool.coordinator().json(ALICE, ["vm", "list"]);
    assert!(!listed.to_string().contains("\"second\""), "{listed}");

    // Without HA it is placed; made HA later, refused the same way.
    create(&pool, "second", &snp);
    let stopped = pool.coordinator().hsev(ALICE, ["vm", "stop", "second"]);
    assert!(stopped.status.success());
    let made_ha = pool
        .coordinator()
        .hsev(ALICE, ["vm", "set", "second", "--ha", "restart"]);
    let said = String::from_utf8_lossy(&made_ha.stderr);
    assert!(!made_ha.status.success(), "{said}");
    assert!(said.contains("would break the pool's HA plan"), "{said}");
    assert_eq!(show(&pool, "second")["spec"]["ha"], "none");
}
