//! Three hsevd coordinators on one real 3-member etcd cluster, each on a
//! test host of its own (a network namespace), the etcd members on the
//! test network's root-namespace address: one leads and serves the API,
//! the others stand by and forward it to the leader over TLS (the
//! coordinators share one `[tls]` certificate). `kill -9` of the leader in
//! the middle of a stream of creates sent to all three addresses, and
//! another leads within the lease TTL plus a few seconds, with every
//! acknowledged VM present exactly once (creates carry a request id; a
//! retry is applied once). And one coordinator, on a test host of its
//! own, through the loss of two etcd members: writes refused, reads
//! answered from the remaining member's copy with a warning that they may
//! be stale, the VMs left running, and the same process writing again once
//! the members are back.
//! And a member host through a coordinator failover: it looks for the new
//! leader among the coordinators the old one told it of, and the new
//! leader hears it and runs VMs on it; a coordinator without the pool's CA
//! is refused at its start.
//! The fake hypervisor driver and no SEV (the VMs are `--mode none`): no
//! guest is needed to count records.

#![allow(clippy::unwrap_used)] // tests

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use hsev_e2e::daemon::{stand_in_image, Daemon, Driver, ADMIN, ALICE};
use hsev_e2e::etcd::EtcdCluster;
use hsev_e2e::netns::{NetHost, TestNet};
use hsev_e2e::pool::{join_token, POOL_PORT};

/// The coordinators' lease TTL.
const TTL_S: u64 = 3;

/// The port of each coordinator's public API over TLS.
const API_PORT: u16 = 7443;

/// The configuration of coordinator `index` on the etcd cluster at
/// `endpoints`.
fn coordinator_config(index: usize, endpoints: &[String]) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    format!(
        "host_name = \"c{index}\"\n\
         [store]\nkind = \"etcd\"\nendpoints = [{}]\nprefix = \"/failover/\"\n\
         lease_ttl_s = {TTL_S}\ntimeout_ms = 1500\n\
         [placement]\nallow_simulated = true\n\
         [pool]\nheartbeat_ms = 300\ndown_after_ms = 2500\n",
        endpoints.join(", ")
    )
}

/// One API certificate for every coordinator (self-signed, naming each
/// one's address): a standby trusts the leader by it. Answers the
/// certificate and its key.
fn shared_api_certificate(dir: &Path, addresses: &[String]) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("api.pem"), dir.join("api.key"));
    let names: Vec<String> = addresses
        .iter()
        .map(|address| format!("IP:{address}"))
        .collect();
    let output = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=hsev-coordinators"])
        .arg("-addext")
        .arg(format!("subjectAltName={}", names.join(",")))
        // An end entity: a certificate marked as a CA is refused as a
        // server's own.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs");
    assert!(
        output.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (cert, key)
}

/// `hsev` with `token`, reaching the coordinators at `endpoints` (a
/// comma-separated list of https:// addresses, tried in turn) and
/// trusting `ca`.
fn hsev_at(daemon: &Daemon, endpoints: &str, ca: &Path, token: &str, args: &[&str]) -> Output {
    daemon
        .hsev_command(token, args)
        .env("HSEV_ENDPOINT", endpoints)
        .env("HSEV_CA", ca)
        .output()
        .expect("hsev runs")
}

/// What `hsev ... --output json` printed, parsed; panics on a failure.
fn json_at(
    daemon: &Daemon,
    endpoints: &str,
    ca: &Path,
    token: &str,
    args: &[&str],
) -> serde_json::Value {
    let mut args = args.to_vec();
    args.extend(["--output", "json"]);
    let output = hsev_at(daemon, endpoints, ca, token, &args);
    assert!(
        output.status.success(),
        "hsev {args:?} at {endpoints}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn create_args<'a>(name: &'a str, request_id: &'a str) -> Vec<&'a str> {
    vec![
        "vm",
        "create",
        name,
        "--image",
        "debian",
        "--vcpus",
        "1",
        "--memory",
        "256",
        "--mode",
        "none",
        "--request-id",
        request_id,
    ]
}

/// Creates `name` through the coordinators at `endpoints`, for up to
/// 30 s, every attempt with the same request id (a retry after a lost
/// answer is applied once). Answers the host the VM was placed on: the
/// leader's own, as the pool has no other hosts.
fn create_somewhere(daemon: &Daemon, endpoints: &str, ca: &Path, name: &str) -> String {
    let request_id = format!("stream-{name}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut args = create_args(name, &request_id);
        args.extend(["--output", "json"]);
        let output = hsev_at(daemon, endpoints, ca, ALICE, &args);
        if output.status.success() {
            let created: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            return created["host"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no coordinator created {name}; the last answer: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_killed_leader_is_succeeded_within_the_ttl_and_no_acknowledged_vm_is_lost_or_doubled() {
    let mut net = TestNet::new();
    let hosts: Vec<_> = (0..3).map(|_| net.add_host()).collect();
    let cluster = EtcdCluster::start_on(3, &net.gateway());
    let work = tempfile::tempdir().unwrap();
    let addresses: Vec<String> = hosts.iter().map(|host| host.address.clone()).collect();
    let (cert, key) = shared_api_certificate(work.path(), &addresses);
    let mut coordinators: Vec<Daemon> = hosts
        .iter()
        .enumerate()
        .map(|(index, host)| {
            let config = coordinator_config(index, &cluster.endpoints()).replacen(
                "[store]",
                &format!(
                    "listen = \"{}:{API_PORT}\"\n[tls]\ncert = {:?}\nkey = {:?}\n[store]",
                    host.address, cert, key
                ),
                1,
            );
            Daemon::on_host(Driver::Fake, host, &config, false)
        })
        .collect();
    coordinators[0].run();
    coordinators[1].run_standing_by();
    coordinators[2].run_standing_by();
    let at = |index: usize| format!("https://{}:{API_PORT}", addresses[index]);
    let all = (0..3).map(at).collect::<Vec<_>>().join(",");
    let client = &coordinators[0];
    let image = stand_in_image(work.path());
    json_at(
        client,
        &at(0),
        &cert,
        ADMIN,
        &[
            "image",
            "import",
            "debian",
            "--from",
            image.to_str().unwrap(),
        ],
    );

    let mut acknowledged = Vec::new();
    for n in 0..5 {
        let name = format!("vm-{n:02}");
        assert_eq!(create_somewhere(client, &all, &cert, &name), "c0");
        acknowledged.push(name);
    }
    // The standbys forward the API to the leader over TLS, from their
    // namespaces to its: what c0 made, c1 and c2 list, and a create
    // through c2 is made by c0.
    for standby in [1, 2] {
        let deadline = Instant::now() + Duration::from_secs(30);
        let listed = loop {
            let output = hsev_at(
                client,
                &at(standby),
                &cert,
                ALICE,
                &["vm", "list", "--output", "json"],
            );
            if output.status.success() {
                break serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "c{standby} does not answer: {}\n{}",
                String::from_utf8_lossy(&output.stderr),
                coordinators[standby].log()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(listed.as_array().map(Vec::len), Some(5), "{listed}");
    }
    let through_standby = json_at(
        client,
        &at(2),
        &cert,
        ALICE,
        &create_args("vm-05", "via-c2"),
    );
    assert_eq!(through_standby["host"], "c0", "{through_standby}");
    acknowledged.push("vm-05".to_owned());

    let killed = Instant::now();
    coordinators[0].kill_9();
    let client = &coordinators[1];
    let mut failover = None;
    for n in 6..15 {
        let name = format!("vm-{n:02}");
        let placed_on = create_somewhere(client, &all, &cert, &name);
        assert_ne!(placed_on, "c0", "{name} placed on the killed leader's host");
        failover.get_or_insert_with(|| (killed.elapsed(), placed_on));
        acknowledged.push(name);
    }
    let (failover, leader) = failover.unwrap();
    println!(
        "failover: {leader} served the first create {failover:?} after kill -9 of c0 \
         (lease TTL {TTL_S} s)"
    );
    assert!(
        failover < Duration::from_secs(TTL_S + 5),
        "failover took {failover:?}\n{}",
        coordinators[1].log()
    );

    let listed = json_at(client, &all, &cert, ADMIN, &["vm", "list"]);
    let mut names: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| vm["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    assert_eq!(names, acknowledged, "every acknowledged VM once");

    // A create sent again with the same request id answers the same VM.
    let again = json_at(
        client,
        &all,
        &cert,
        ALICE,
        &create_args("vm-00", "stream-vm-00"),
    );
    assert_eq!(again["name"], "vm-00");
    let count = json_at(client, &all, &cert, ADMIN, &["vm", "list"])
        .as_array()
        .unwrap()
        .len();
    assert_eq!(count, acknowledged.len());
}

#[test]
fn without_an_etcd_quorum_writes_are_refused_and_the_same_hsevd_resumes_when_it_is_back() {
    let mut net = TestNet::new();
    let host = net.add_host();
    let mut cluster = EtcdCluster::start_on(3, &net.gateway());
    let mut daemon = Daemon::on_host(
        Driver::Fake,
        &host,
        &coordinator_config(0, &cluster.endpoints()),
        false,
    );
    daemon.run();
    let pid = daemon.pid();
    daemon.import_stand_in_image();
    let create = |daemon: &Daemon, name: &str| {
        daemon.hsev(
            ALICE,
            [
                "vm", "create", name, "--image", "debian", "--vcpus", "1", "--memory", "256",
                "--mode", "none", "--start",
            ],
        )
    };
    assert!(create(&daemon, "before").status.success());

    // One member down: the pool goes on.
    cluster.kill(2);
    let killed = Instant::now();
    loop {
        let output = create(&daemon, "one-down");
        if output.status.success() {
            break;
        }
        // etcd elects a new raft leader if it lost its own, and this
        // coordinator may have to renew its lease first: seconds, more on a
        // loaded machine.
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no create with one member down: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("one member down: created {:?} after", killed.elapsed());

    // Two down: refused as unavailable, with the reason (or, for a write
    // caught in flight as the quorum went, said to be unconfirmed); hsevd
    // keeps running.
    cluster.kill(1);
    let started = Instant::now();
    let refused = create(&daemon, "no-quorum");
    let said = String::from_utf8_lossy(&refused.stderr).into_owned();
    println!("without quorum ({:?}): {said}", started.elapsed());
    assert!(!refused.status.success());
    let unconfirmed = said.contains("may still take effect");
    assert!(
        unconfirmed
            || said.contains("etcd cluster is unavailable")
            || said.contains("does not lead the pool now"),
        "{said}"
    );
    std::thread::sleep(Duration::from_secs(TTL_S + 1));
    assert!(daemon.is_running(), "hsevd exited: {}", daemon.log());

    // Reads are still answered, from the one member's copy, and say that
    // it may be stale; the VMs are untouched.
    let read = daemon.hsev(ADMIN, ["vm", "list", "--output", "json"]);
    let warned = String::from_utf8_lossy(&read.stderr).into_owned();
    assert!(read.status.success(), "a read without quorum: {warned}");
    assert!(
        warned.contains("warning: the pool's etcd cluster has no quorum")
            && warned.contains("may be stale"),
        "{warned}"
    );
    let stale = states(&serde_json::from_slice(&read.stdout).unwrap());
    assert!(
        stale.contains(&("before".to_owned(), "running".to_owned()))
            && stale.contains(&("one-down".to_owned(), "running".to_owned())),
        "{stale:?}"
    );

    // Back: the same process resumes.
    cluster.restart(1);
    cluster.restart(2);
    let back = Instant::now();
    while !create(&daemon, "after").status.success() {
        assert!(
            back.elapsed() < Duration::from_secs(40),
            "no create after the members came back: {}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "writes again {:?} after the members came back",
        back.elapsed()
    );
    assert_eq!(daemon.pid(), pid);
    let read = daemon.hsev(ADMIN, ["vm", "list", "--output", "json"]);
    assert!(read.status.success());
    assert!(
        !String::from_utf8_lossy(&read.stderr).contains("may be stale"),
        "the quorum answers again"
    );
    let mut listed = states(&serde_json::from_slice(&read.stdout).unwrap());
    if unconfirmed {
        listed.retain(|(name, _)| name != "no-quorum");
    }
    let running = |name: &str| (name.to_owned(), "running".to_owned());
    assert_eq!(
        listed,
        [running("after"), running("before"), running("one-down")]
    );
}

/// Each VM's name and state, by name.
fn states(listed: &serde_json::Value) -> Vec<(String, String)> {
    let mut states: Vec<(String, String)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| {
            (
                vm["name"].as_str().unwrap().to_owned(),
                vm["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    states.sort();
    states
}

/// Coordinator `index` on `host`, with its pool listener, on the etcd
/// cluster at `endpoints`; configured, not running.
fn pool_coordinator(index: usize, host: &NetHost, endpoints: &[String]) -> Daemon {
    let config = coordinator_config(index, endpoints).replacen(
        "[pool]\n",
        &format!("[pool]\nlisten = \"{}:{POOL_PORT}\"\n", host.address),
        1,
    );
    Daemon::on_host(Driver::Fake, host, &config, false)
}

/// Waits up to 30 s for `done`, naming `what` and showing `log()` if it
/// does not come.
fn wait_until(what: &str, done: impl Fn() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what} in 30 s:\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_member_host_follows_the_new_leader_and_a_coordinator_without_the_pools_ca_is_refused() {
    let mut net = TestNet::new();
    let hosts: Vec<NetHost> = (0..4).map(|_| net.add_host()).collect();
    let cluster = EtcdCluster::start_on(3, &net.gateway());
    let endpoints = cluster.endpoints();
    let mut c0 = pool_coordinator(0, &hosts[0], &endpoints);
    c0.run();
    let ca = c0.state_dir().join("pool");
    wait_until(
        "c0 made no pool CA",
        || ca.join("ca.key").is_file(),
        || c0.log(),
    );
    // The operator gives c1 the pool's CA; c2 is started without it.
    let mut c1 = pool_coordinator(1, &hosts[1], &endpoints);
    let c1_pool = c1.state_dir().join("pool");
    std::fs::create_dir_all(&c1_pool).unwrap();
    for file in ["ca.pem", "ca.key"] {
        std::fs::copy(ca.join(file), c1_pool.join(file)).unwrap();
    }
    c1.run_standing_by();
    let mut c2 = pool_coordinator(2, &hosts[2], &endpoints);
    c2.run_standing_by();
    let deadline = Instant::now() + Duration::from_secs(30);
    while c2.is_running() {
        assert!(Instant::now() < deadline, "c2 still runs: {}", c2.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let refused = c2.log();
    assert!(
        refused.contains("is not the pool's") && refused.contains("copy ca.pem and ca.key"),
        "{refused}"
    );

    c0.import_stand_in_image();
    let mut h1 = Daemon::on_host(
        Driver::Fake,
        &hosts[3],
        &format!(
            "host_name = \"h1\"\n[pool]\nlisten = \"{}:{POOL_PORT}\"\n\
             heartbeat_ms = 300\ndown_after_ms = 2500\n",
            hosts[3].address
        ),
        false,
    );
    let joined = h1.hsevd(["join", &join_token(&c0)]);
    assert!(
        joined.status.success(),
        "h1 could not join: {}",
        String::from_utf8_lossy(&joined.stderr)
    );
    h1.run();
    let on_h1 = |coordinator: &Daemon, name: &str| {
        coordinator.json(
            ALICE,
            [
                "vm", "create", name, "--image", "debian", "--vcpus", "1", "--memory", "256",
                "--mode", "none", "--host", "h1", "--start",
            ],
        )
    };
    wait_until(
        "h1 is not up",
        || {
            c0.json(ADMIN, ["host", "list"])
                .as_array()
                .unwrap()
                .iter()
                .any(|host| host["name"] == "h1" && host["status"] == "up")
        },
        || h1.log(),
    );
    assert_eq!(on_h1(&c0, "before")["host"], "h1");
    // The leader told h1 of every coordinator's pool listener.
    let member = h1.state_dir().join("pool/member.json");
    let c1_address = format!("{}:{POOL_PORT}", hosts[1].address);
    wait_until(
        "h1 does not know c1",
        || std::fs::read_to_string(&member).is_ok_and(|text| text.contains(&c1_address)),
        || h1.log(),
    );

    c0.kill_9();
    // c1 leads, h1 finds it, and c1 hears h1 and runs a VM there.
    wait_until(
        "c1 did not hear h1",
        || {
            c1.log()
                .lines()
                .any(|line| line.contains("host heard from") && line.contains("h1"))
        },
        || format!("c1:\n{}\nh1:\n{}", c1.log(), h1.log()),
    );
    assert!(
        h1.log().contains("looking for the leading coordinator"),
        "{}",
        h1.log()
    );
    assert_eq!(on_h1(&c1, "after")["host"], "h1");
    let listed = states(&c1.json(ALICE, ["vm", "list"]));
    let running = |name: &str| (name.to_owned(), "running".to_owned());
    assert_eq!(listed, [running("after"), running("before")]);
}
