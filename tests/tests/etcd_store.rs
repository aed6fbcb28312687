//! The pool store on a real 3-member etcd cluster: it goes on when one
//! member dies, refuses writes with a clear "unavailable" when two do
//! (a write caught in flight is reported unconfirmed, never as done or
//! refused), and resumes on the same handle when they come back, with every
//! record acknowledged before still there, once, and nothing refused.

#![allow(clippy::unwrap_used)] // tests

use std::time::{Duration, Instant};

use hsev_e2e::etcd::EtcdCluster;
use hsev_xapi::model::HostRecord;
use hsev_xapi::store::{Store, StoreConfig, StoreError};

fn host(name: &str) -> HostRecord {
    HostRecord {
        name: name.to_owned(),
        status: "up".to_owned(),
        capabilities_json: "{}".to_owned(),
        probed_at: time::OffsetDateTime::now_utc(),
        address: String::new(),
        cert_fingerprint: String::new(),
    }
}

/// Retries `write` until it succeeds or `within` passes (etcd elects a new
/// raft leader after a member dies); returns how long it took.
fn eventually(within: Duration, mut write: impl FnMut() -> Result<(), StoreError>) -> Duration {
    let start = Instant::now();
    loop {
        match write() {
            Ok(()) => return start.elapsed(),
            Err(error) if start.elapsed() < within => {
                eprintln!("  retrying: {error}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(error) => panic!("still failing after {within:?}: {error}"),
        }
    }
}

#[test]
fn the_store_survives_one_member_refuses_without_quorum_and_resumes() {
    let mut cluster = EtcdCluster::start(3);
    let mut config = StoreConfig::etcd(cluster.endpoints(), "/quorum-test/");
    config.timeout_ms = 2000;
    let store = Store::open_configured(&config, std::path::Path::new("/nonexistent")).unwrap();
    store.init_pool("ha").unwrap();
    let mut acknowledged = Vec::new();
    for n in 0..5 {
        store.upsert_host(&host(&format!("h{n}"))).unwrap();
        acknowledged.push(format!("h{n}"));
    }

    // One member down: the two others are a quorum.
    cluster.kill(0);
    let took = eventually(Duration::from_secs(15), || store.upsert_host(&host("h5")));
    acknowledged.push("h5".to_owned());
    println!("first write with one member down: {took:?}");
    for n in 6..16 {
        store.upsert_host(&host(&format!("h{n}"))).unwrap();
        acknowledged.push(format!("h{n}"));
    }

    // Two down: no quorum. A write the leader took just before it noticed
    // may be committed once the members are back (raft keeps it in the
    // leader's log): it must say so. Once the remaining member knows it has
    // no leader, writes are refused outright, in bounded time, saying why.
    cluster.kill(1);
    let start = Instant::now();
    let mut unconfirmed = Vec::new();
    let refused = loop {
        let name = format!("pending{}", unconfirmed.len());
        match store.upsert_host(&host(&name)) {
            Err(error @ StoreError::Unavailable { .. }) => {
                let message = error.to_string();
                println!("without quorum: {message} (after {:?})", start.elapsed());
                assert!(
                    message.contains("the etcd cluster is unavailable"),
                    "{message}"
                );
                break name;
            }
            Err(error @ StoreError::Unconfirmed { .. }) => {
                let message = error.to_string();
                println!("in flight: {message} (after {:?})", start.elapsed());
                assert!(message.contains("may still take effect"), "{message}");
                unconfirmed.push(name);
            }
            other => panic!("expected Unavailable or Unconfirmed without quorum, got {other:?}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "still not refused after {:?}",
            start.elapsed()
        );
    };
    // Reads answer from the member left, and say they may be stale.
    let stale = store.list_hosts().expect("a read without quorum answers");
    assert!(stale.iter().any(|host| host.name == "h5"), "{stale:?}");
    assert!(store.staleness().is_some());

    // Back: the same store handle resumes.
    cluster.restart(0);
    cluster.restart(1);
    let took = eventually(Duration::from_secs(30), || store.upsert_host(&host("h16")));
    acknowledged.push("h16".to_owned());
    println!("first write after the members came back: {took:?}");
    let names: Vec<String> = store
        .list_hosts()
        .unwrap()
        .into_iter()
        .map(|host| host.name)
        .collect();
    assert!(store.staleness().is_none(), "the quorum answers again");
    let (landed, mut names): (Vec<String>, Vec<String>) = names
        .into_iter()
        .partition(|name| unconfirmed.contains(name));
    println!("unconfirmed writes that took effect: {landed:?} of {unconfirmed:?}");
    // Every acknowledged host once, the refused one nowhere, and nothing
    // else but what was reported unconfirmed.
    acknowledged.sort();
    names.sort();
    assert!(
        !names.contains(&refused),
        "{refused} was refused yet landed"
    );
    assert_eq!(names, acknowledged);
}
