//! The highly available pool's figures, side by side in one run: store
//! writes per second on SQLite (one file, full fsync) beside a 3-member
//! etcd cluster on loopback, and the coordinator failover time (a leading
//! candidate dies without resigning; the time until another leads) beside
//! the lease TTL, and the HA restart time (a host's link cut, in a pool of
//! hsevd hosts in network namespaces on the fake driver, until its HA VM
//! runs on another host) beside the host lease and the fence margin; then
//! the same with a real QEMU guest whose encrypted disk's key is
//! single-instance (tests/src/ha.rs), until it runs elsewhere and until
//! its guest there opened the disk, beside the key's lease.
//!
//! Prints `store_writes_sqlite_per_s`, `store_writes_etcd_per_s`,
//! `store_etcd_to_sqlite_ratio`, `failover_median_s`, `lease_ttl_s`,
//! `ha_restart_s`, `host_lease_s`, `fence_margin_s`,
//! `ha_guest_running_s`, `ha_guest_unlocked_s`, `key_lease_s`.

#![allow(clippy::unwrap_used)] // a benchmark: any failure is fatal anyway

use std::sync::Arc;
use std::time::{Duration, Instant};

use hsev_e2e::daemon::{Driver, ADMIN, ALICE};
use hsev_e2e::etcd::EtcdCluster;
use hsev_e2e::pool::{HostSpec, Pool};
use hsev_xapi::coordinator::election::Candidacy;
use hsev_xapi::model::HostRecord;
use hsev_xapi::store::{Store, StoreConfig};

const LEASE_TTL: Duration = Duration::from_secs(3);

/// The test pool's host lease (`down_after_ms` in tests/src/pool.rs).
const HOST_LEASE: Duration = Duration::from_millis(2500);
/// The fence margin the benchmark's pool is configured with.
const FENCE_MARGIN: Duration = Duration::from_millis(1000);

/// Cuts the link of the host running an HA VM; answers the time until the
/// VM runs on the other host.
fn ha_restart() -> Duration {
    let keys = format!("fence_margin_ms = {}", FENCE_MARGIN.as_millis());
    let pool = Pool::start(
        &[
            HostSpec::new("h1", Driver::Fake).pool_keys(&keys),
            HostSpec::new("h2", Driver::Fake).pool_keys(&keys),
            HostSpec::new("h3", Driver::Fake).pool_keys(&keys),
        ],
        "",
    );
    let via = pool.coordinator();
    via.import_stand_in_image();
    // Created on h2, the others disabled meanwhile.
    via.hsev_ok(ADMIN, ["host", "disable", "h1"]);
    via.hsev_ok(ADMIN, ["host", "disable", "h3"]);
    via.hsev_ok(
        ALICE,
        [
            "vm",
            "create",
            "protected",
            "--image",
            "debian",
            "--vcpus",
            "1",
            "--memory",
            "256",
            "--mode",
            "none",
            "--ha",
            "restart",
            "--start",
        ],
    );
    via.hsev_ok(ADMIN, ["host", "enable", "h1"]);
    via.hsev_ok(ADMIN, ["host", "enable", "h3"]);
    let placed = via.json(ALICE, ["vm", "show", "protected"]);
    assert_eq!(placed["host"], "h2", "{placed}");
    let cut = Instant::now();
    pool.net().cut(pool.host("h2").net_host());
    loop {
        let shown = via.json(ALICE, ["vm", "show", "protected"]);
        if shown["state"] == "running" && shown["host"] != "h2" {
            return cut.elapsed();
        }
        assert!(
            cut.elapsed() < Duration::from_secs(30),
            "no HA restart: {shown}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn host(name: String) -> HostRecord {
    HostRecord {
        name,
        status: "up".to_owned(),
        capabilities_json: "{}".to_owned(),
        probed_at: time::OffsetDateTime::now_utc(),
        address: String::new(),
        cert_fingerprint: String::new(),
    }
}

/// Writes host records for `span`; answers writes per second.
fn writes_per_second(store: &Store, span: Duration) -> f64 {
    store.init_pool("bench").unwrap();
    let start = Instant::now();
    let mut count = 0_u32;
    while start.elapsed() < span {
        store.upsert_host(&host(format!("h{count}"))).unwrap();
        count += 1;
    }
    f64::from(count) / start.elapsed().as_secs_f64()
}

fn failover(endpoints: &[String], round: usize) -> Duration {
    let config = StoreConfig::etcd(endpoints.to_vec(), &format!("/bench-failover-{round}/"));
    let first =
        Arc::new(Store::open_configured(&config, std::path::Path::new("/nonexistent")).unwrap());
    let second =
        Arc::new(Store::open_configured(&config, std::path::Path::new("/nonexistent")).unwrap());
    let leader = Candidacy::start(&first, "a", LEASE_TTL);
    while !leader.is_leader() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let standby = Candidacy::start(&second, "b", LEASE_TTL);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!standby.is_leader());
    // Dies: its task stops and nothing renews or resigns its lease.
    let died = Instant::now();
    drop(leader);
    while !standby.is_leader() {
        assert!(died.elapsed() < LEASE_TTL * 4, "no successor");
        std::thread::sleep(Duration::from_millis(10));
    }
    died.elapsed()
}

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(3);
    let span = Duration::from_secs(seconds);
    let cluster = EtcdCluster::start(3);

    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::open(dir.path().join("bench.db")).unwrap();
    let sqlite_rate = writes_per_second(&sqlite, span);
    let etcd = Store::open_configured(
        &StoreConfig::etcd(cluster.endpoints(), "/bench-writes/"),
        std::path::Path::new("/nonexistent"),
    )
    .unwrap();
    let etcd_rate = writes_per_second(&etcd, span);
    println!("store_writes_sqlite_per_s {sqlite_rate:.0}");
    println!("store_writes_etcd_per_s {etcd_rate:.0}");
    println!("store_etcd_to_sqlite_ratio {:.3}", etcd_rate / sqlite_rate);

    let mut times: Vec<Duration> = (0..3)
        .map(|round| failover(&cluster.endpoints(), round))
        .collect();
    times.sort();
    println!("failover_median_s {:.2}", times[1].as_secs_f64());
    println!("lease_ttl_s {}", LEASE_TTL.as_secs());

    let restart = ha_restart();
    println!("ha_restart_s {:.2}", restart.as_secs_f64());
    println!("host_lease_s {:.1}", HOST_LEASE.as_secs_f64());
    println!("fence_margin_s {:.1}", FENCE_MARGIN.as_secs_f64());

    let guest = hsev_e2e::ha::cut_and_restart();
    println!(
        "ha_guest_running_s {:.2}",
        guest.running_after.as_secs_f64()
    );
    println!(
        "ha_guest_unlocked_s {:.2}",
        guest.unlocked_after.as_secs_f64()
    );
    println!("key_lease_s {}", hsev_e2e::ha::KEY_LEASE_SECONDS);
}
