//! HyperSEV as a SlapOS compute node, end to end: the real SlapOS master
//! software (slapproxy, slapos.core 1.26.1), requests made with the real
//! `slapos request` CLI, the connector (`hsev slapos node`) and a real
//! hsevd. The guest's behaviour is the point of one test (an SEV-SNP guest
//! attests and unlocks its encrypted disk, under QEMU); the others run on
//! the fake driver, which boots no guest.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hsev_e2e::daemon::{Daemon, Driver, ADMIN, ALICE};
use hsev_e2e::kbs::{Kbs, KbsMode};
use hsev_e2e::slapos::{
    instance_guid, Connector, ConnectorConfig, ConnectorKeyBroker, Slapproxy, TlsFront,
};
use serde_json::{json, Value};

/// How long a fake-driver VM may take to converge (passes are 1 s apart).
const CONVERGE: Duration = Duration::from_secs(30);

/// The fake host's VM slots: its simulated Secure Processor's 16 ASIDs.
const FAKE_SLOTS: usize = 16;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A slapproxy, an hsevd on the fake driver with the image, and a
/// connector between them with the admin token.
fn fake_node() -> (Slapproxy, Daemon, Connector) {
    let master = Slapproxy::start();
    let daemon = Daemon::start_on(Driver::Fake, "");
    daemon.import_image();
    let connector = Connector::start(&ConnectorConfig::new(&master, &daemon));
    (master, daemon, connector)
}

fn running(connection: &Value) -> bool {
    connection["state"] == "running"
}

/// The connector's VMs in hsevd (owned by its token, `ops`).
fn vms(daemon: &Daemon) -> Vec<Value> {
    daemon
        .json(ADMIN, ["vm", "list", "--owner", "ops"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn show(daemon: &Daemon, vm: &Value) -> Value {
    daemon.json(ADMIN, ["vm", "show", vm.as_str().expect("a VM id")])
}

/// Events of `kind` in hsevd's store (its audit trail).
fn events(daemon: &Daemon, kind: &str) -> usize {
    let connection =
        rusqlite::Connection::open(daemon.state_dir().join("hsevd.db")).expect("opens");
    connection
        .busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    connection
        .query_row(
            "SELECT count(*) FROM event WHERE kind = ?1",
            [kind],
            |row| row.get::<_, i64>(0),
        )
        .map(|count| usize::try_from(count).unwrap_or(0))
        .expect("counted")
}

/// Waits until `done` holds.
fn eventually(what: &str, timeout: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "not {what} in {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A hard link to a VM's disk file, which outlives its deletion: what
/// the file held when hsevd unlinked it stays readable there.
fn keep_disk(daemon: &Daemon, vm_id: &str, file: &str, into: &Path) -> PathBuf {
    let disk = daemon.state_dir().join("vms").join(vm_id).join(file);
    let kept = into.join(file);
    std::fs::hard_link(&disk, &kept).unwrap_or_else(|error| panic!("{}: {error}", disk.display()));
    kept
}

fn bytes_at(path: &Path, offset: u64, length: usize) -> Vec<u8> {
    let file = std::fs::File::open(path).expect("opens");
    let mut buffer = vec![0u8; length];
    file.read_exact_at(&mut buffer, offset).expect("reads");
    buffer
}

#[test]
fn a_request_becomes_a_vm_whose_connection_parameters_slapos_request_reads_back() {
    let (master, daemon, connector) = fake_node();
    // One partition per VM slot of the pool.
    eventually("registered", CONVERGE, || {
        master.partitions().len() == FAKE_SLOTS
    });
    master.supply(&hsev_e2e::slapos::software_release());
    connector.wait_for_log("software release reported", CONVERGE);

    let parameters =
        json!({"ram-size": 2048, "cpu-count": 1, "nat-rules": [22, 80], "name": "web"});
    let requested = master.request("web", "default", &parameters, None);
    assert_eq!(requested.state, "started", "{}", requested.output);
    let published = master.wait_for(&instance_guid("web"), CONVERGE, "running", running);
    let vm = show(&daemon, &published["vm-id"]);
    let name = vm["name"].as_str().expect("name");
    assert!(name.starts_with("comp-hsev-slappart0-"), "{name}");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["spec"]["vcpus"], 1);
    assert_eq!(vm["spec"]["memory_mib"], 2048);
    assert_eq!(vm["spec"]["mode"], "none");
    assert_eq!(published["host"], vm["host"]);
    assert_eq!(published["name"], "web");
    assert_eq!(published["attestation-state"], "not-applicable");
    for forward in vm["port_forwards"].as_array().expect("forwards") {
        assert_eq!(
            published[format!("nat-rule-url-tcp-{}", forward["guest_port"])],
            format!("127.0.0.1:{}", forward["host_port"]),
            "{published}"
        );
    }
    // The same `slapos request` reads them back.
    let again = master.request("web", "default", &parameters, None);
    assert_eq!(again.connection, published, "{}", again.output);

    // A confidential VM, ordered by software type alone.
    let snp = json!({"ram-size": 1024, "cpu-count": 1});
    master.request("vault", "sev-snp", &snp, None);
    let published = master.wait_for(&instance_guid("vault"), CONVERGE, "running", running);
    let vm = show(&daemon, &published["vm-id"]);
    assert!(vm["name"]
        .as_str()
        .expect("name")
        .starts_with("comp-hsev-slappart1-"));
    assert_eq!(vm["spec"]["mode"], "sev-snp");
    let measurement = published["expected-measurement"]
        .as_str()
        .expect("measurement");
    assert_eq!(measurement.len(), 96);
    assert_eq!(published["launch-digest"], measurement);
    assert_eq!(published["simulated-firmware"], "true");
    assert_eq!(
        published["attestation-state"], "pending",
        "no guest attests on the fake driver"
    );
    let read_back = master.request("vault", "sev-snp", &snp, None);
    assert_eq!(read_back.connection, published);

    // Each state and each set of parameters is said once, not once per pass.
    let (reported, publishes) = (
        master.calls("slapos.put.v0.software_instance_reported_state"),
        master.calls("slapos.put.v0.software_instance_connection_parameter"),
    );
    assert_eq!(reported, 2, "{}", master.log());
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        master.calls("slapos.put.v0.software_instance_reported_state"),
        reported
    );
    assert_eq!(
        master.calls("slapos.put.v0.software_instance_connection_parameter"),
        publishes
    );
    assert_eq!(
        master.calls("slapos.put.v0.software_installation_reported_state"),
        1
    );
    assert_eq!(vms(&daemon).len(), 2);
}

#[test]
fn stop_start_and_destroy_converge_and_destroying_wipes_the_disk_and_frees_the_slot() {
    let (master, daemon, _connector) = fake_node();
    let kept = tempfile::tempdir_in(daemon.state_dir()).expect("tempdir");
    let guid = instance_guid("vm1");
    let parameters = json!({"ram-size": 1024, "cpu-count": 1, "disk-size": 1});
    master.request("vm1", "default", &parameters, None);
    let published = master.wait_for(&guid, CONVERGE, "running", running);
    let id = published["vm-id"].as_str().expect("id").to_owned();

    // What the guest would have written on its data disk.
    let disk = keep_disk(&daemon, &id, "disk-data.qcow2", kept.path());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .expect("opens");
    for offset in [0, 512 << 20] {
        file.write_all_at(b"the requester's data", offset)
            .expect("written");
    }
    drop(file);

    let stopped = master.request("vm1", "default", &parameters, Some("stopped"));
    assert_eq!(stopped.state, "stopped");
    master.wait_for(&guid, CONVERGE, "stopped", |connection| {
        connection["state"] == "stopped"
    });
    assert_eq!(show(&daemon, &json!(id))["state"], "stopped");

    master.request("vm1", "default", &parameters, Some("started"));
    let restarted = master.wait_for(&guid, CONVERGE, "running again", running);
    assert_eq!(restarted["vm-id"], id, "the same VM, started again");

    master.request("vm1", "default", &parameters, Some("destroyed"));
    eventually("destroyed", CONVERGE, || vms(&daemon).is_empty());
    eventually("slot freed", CONVERGE, || {
        master.partitions().iter().all(|(_, state)| state == "free")
    });
    for offset in [0, 512 << 20] {
        assert!(
            bytes_at(&disk, offset, 20).iter().all(|byte| *byte == 0),
            "the disk was wiped before it was removed"
        );
    }
    assert!(!daemon.state_dir().join("vms").join(&id).exists());

    // The freed partition serves the next request, with a VM of its own.
    master.request("vm2", "default", &parameters, None);
    let next = master.wait_for(&instance_guid("vm2"), CONVERGE, "running", running);
    assert_ne!(next["vm-id"], json!(id));
    let vm = show(&daemon, &next["vm-id"]);
    assert!(vm["name"]
        .as_str()
        .expect("name")
        .starts_with("comp-hsev-slappart0-"));
}

#[test]
fn sigusr1_asks_for_a_pass_at_once() {
    let master = Slapproxy::start();
    let daemon = Daemon::start_on(Driver::Fake, "");
    daemon.import_image();
    let config = ConnectorConfig {
        pass_interval_seconds: 600,
        ..ConnectorConfig::new(&master, &daemon)
    };
    let connector = Connector::start(&config);
    eventually("the first pass", CONVERGE, || {
        master.partitions().len() == FAKE_SLOTS
    });
    master.request("vm1", "default", &json!({"ram-size": 1024}), None);
    std::thread::sleep(Duration::from_secs(2));
    assert!(vms(&daemon).is_empty(), "the next pass is 10 minutes away");
    let signalled = std::process::Command::new("kill")
        .args(["-USR1", &connector.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(signalled.success());
    master.wait_for(
        &instance_guid("vm1"),
        Duration::from_secs(10),
        "running",
        running,
    );
    assert_eq!(connector.logged("pass asked for (SIGUSR1)"), 1);
}

#[test]
fn a_parameter_change_is_applied_or_re_creates_the_vm() {
    let (master, daemon, connector) = fake_node();
    let guid = instance_guid("vm1");
    master.request(
        "vm1",
        "sev-snp",
        &json!({"ram-size": 1024, "cpu-count": 1, "name": "first"}),
        None,
    );
    let first = master.wait_for(&guid, CONVERGE, "running", running);

    // The name is published, the VM kept.
    master.request(
        "vm1",
        "sev-snp",
        &json!({"ram-size": 1024, "cpu-count": 1, "name": "second"}),
        None,
    );
    let renamed = master.wait_for(&guid, CONVERGE, "renamed", |connection| {
        connection["name"] == "second"
    });
    assert_eq!(renamed["vm-id"], first["vm-id"]);

    // The VM's size is in its spec: the VM is made again.
    master.request(
        "vm1",
        "sev-snp",
        &json!({"ram-size": 2048, "cpu-count": 1, "name": "second"}),
        None,
    );
    let resized = master.wait_for(&guid, CONVERGE, "re-created", |connection| {
        running(connection) && connection["vm-id"] != first["vm-id"]
    });
    assert_eq!(show(&daemon, &resized["vm-id"])["spec"]["memory_mib"], 2048);
    assert_eq!(vms(&daemon).len(), 1, "the first VM is gone");
    assert!(connector.logged("re-creating") == 1 && connector.log().contains("ram-size"));
}

#[test]
fn bad_parameters_are_errors_the_requester_reads_and_make_no_vm() {
    let (master, daemon, _connector) = fake_node();
    let requested = master.request("small", "sev-snp", &json!({"ram-size": 1000}), None);
    // `slapos request` itself checks the release's schema, and only warns.
    assert!(
        requested
            .output
            .contains("Request parameters do not validate against schema definition"),
        "{}",
        requested.output
    );
    let guid = instance_guid("small");
    master.wait_for(&guid, CONVERGE, "refused", |connection| {
        connection["state"] == "refused"
    });
    let read_back = master.request("small", "sev-snp", &json!({"ram-size": 1000}), None);
    assert_eq!(
        read_back.connection,
        json!({"state": "refused", "error": "ram-size: 1000 is below the minimum of 1024"}),
        "{}",
        read_back.output
    );
    for (title, software_type, parameters, error) in [
        ("unknown", "default", json!({"use-tap": true}), "use-tap: not a parameter"),
        (
            "keys",
            "default",
            json!({"authorized-keys": "ssh-ed25519 AAAA me"}),
            "authorized-keys: not supported",
        ),
        (
            "plain-disk",
            "default",
            json!({"encrypted-disk-size": 1}),
            "encrypted-disk-size: needs confidential-mode sev-snp",
        ),
        (
            "no-broker",
            "sev-snp",
            json!({"encrypted-disk-size": 1}),
            "encrypted-disk-size: this node has no key broker",
        ),
        ("no-image", "default", json!({"image": "centos"}), "image: \"centos\""),
        (
            "old-tcb",
            "sev-snp",
            json!({"minimum-tcb": {"snp": 99}}),
            "minimum-tcb: the host reports TCB [bootloader=10 tee=0 snp=23 microcode=25]: snp 23 < 99",
        ),
    ] {
        master.request(title, software_type, &parameters, None);
        let refused = master.wait_for(&instance_guid(title), CONVERGE, "refused", |connection| {
            connection["state"] == "refused"
        });
        let message = refused["error"].as_str().expect("an error");
        assert!(message.starts_with(error), "{title}: {message}");
    }
    // Nothing made but the VM the TCB check refused, which is gone.
    assert!(vms(&daemon).is_empty(), "{:?}", vms(&daemon));
    assert_eq!(events(&daemon, "started"), 0);

    // Another software release is not served here (slapproxy places it
    // anyway: it checks neither supply nor capability).
    let other = tempfile::tempdir().expect("tempdir");
    let other_release = other.path().join("software.cfg");
    std::fs::write(&other_release, "[buildout]\nparts =\n").expect("written");
    std::fs::write(
        other.path().join("software.cfg.json"),
        json!({"name": "other", "description": "another release", "serialisation": "json-in-xml",
               "software-type": {"default": {"title": "Default", "description": "d",
               "request": "in.json", "response": "out.json", "index": 0}}})
        .to_string(),
    )
    .expect("written");
    let other_release = other_release.display().to_string();
    master.request_release(&other_release, "other", "default", &json!({}), None);
    let refused = master.wait_for(&instance_guid("other"), CONVERGE, "refused", |connection| {
        connection["state"] == "refused"
    });
    assert!(
        refused["error"]
            .as_str()
            .expect("error")
            .ends_with(&format!("only, not {other_release}")),
        "{refused}"
    );

    // An error is reported once, not once per pass.
    let errors = master.calls("slapos.put.v0.software_instance_error");
    assert_eq!(errors, 8, "{}", master.log());
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        master.calls("slapos.put.v0.software_instance_error"),
        errors
    );
    assert_eq!(
        events(&daemon, "created"),
        1,
        "the refused ones are not tried again"
    );

    // A bad change leaves the running VM as it was, and says why.
    let guid = instance_guid("good");
    master.request("good", "default", &json!({"ram-size": 1024}), None);
    let before = master.wait_for(&guid, CONVERGE, "running", running);
    master.request("good", "default", &json!({"ram-size": 1000}), None);
    let after = master.wait_for(&guid, CONVERGE, "refused", |connection| {
        connection.get("error").is_some()
    });
    assert_eq!(after["vm-id"], before["vm-id"]);
    assert_eq!(after["state"], "running");
    assert_eq!(show(&daemon, &before["vm-id"])["state"], "running");
}

#[test]
fn a_measurement_pin_decides_whether_the_vm_ever_runs() {
    let (master, daemon, _connector) = fake_node();
    let wrong = "00".repeat(48);
    master.request(
        "pinned",
        "sev-snp",
        &json!({"cpu-count": 1, "expected-measurement": wrong}),
        None,
    );
    let refused = master.wait_for(
        &instance_guid("pinned"),
        CONVERGE,
        "refused",
        |connection| connection["state"] == "refused",
    );
    let error = refused["error"].as_str().expect("error");
    assert!(
        error.starts_with("expected-measurement: the VM would launch with measurement ")
            && error.ends_with(&format!("not the pinned {wrong}")),
        "{error}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(vms(&daemon).is_empty());
    assert_eq!(
        (events(&daemon, "created"), events(&daemon, "started")),
        (1, 0),
        "made once, checked, deleted, never started"
    );

    // The measurement the image's manifest gives for one vCPU is the one
    // this VM launches with.
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(hsev_e2e::daemon::image_dir().join("manifest.json")).expect("manifest"),
    )
    .expect("JSON");
    let right = manifest["expected_measurements"]["snp"]["by_vcpus"]["1"]
        .as_str()
        .expect("a measurement");
    master.request(
        "pinned",
        "sev-snp",
        &json!({"cpu-count": 1, "expected-measurement": right}),
        None,
    );
    let published = master.wait_for(&instance_guid("pinned"), CONVERGE, "running", running);
    assert_eq!(published["launch-digest"], right);
    assert_eq!(published.get("error"), None);
}

#[test]
fn a_connector_killed_with_9_and_restarted_makes_no_second_vm_and_converges() {
    let (master, daemon, mut connector) = fake_node();
    let parameters = json!({"ram-size": 1024, "cpu-count": 1});
    let mut titles = Vec::new();
    for (round, delay_ms) in [0u64, 150, 400, 900].into_iter().enumerate() {
        let title = format!("vm{round}");
        master.request(&title, "sev-snp", &parameters, None);
        titles.push(title);
        std::thread::sleep(Duration::from_millis(delay_ms));
        connector.kill_9();
        connector.restart();
    }
    let mut names = std::collections::HashSet::new();
    for title in &titles {
        let published = master.wait_for(&instance_guid(title), CONVERGE, "running", running);
        let vm = show(&daemon, &published["vm-id"]);
        names.insert(vm["name"].as_str().expect("name").to_owned());
    }
    assert_eq!(
        names.len(),
        titles.len(),
        "one VM per instance, each its own: {names:?}"
    );
    assert_eq!(vms(&daemon).len(), titles.len(), "no second VM");
    assert_eq!(events(&daemon, "created"), titles.len());

    // While the connector is away, the master frees vm1's partition (as an
    // operator may) and places a new instance there: the VM left behind
    // is not handed to the new requester.
    connector.kill_9();
    let old = master.connection(&instance_guid("vm1"))["vm-id"].clone();
    let (status, _) = master.rpc(
        "slapos.put.v0.software_instance_reported_state",
        &json!({"instance_guid": instance_guid("vm1"), "reported_state": "destroyed"}),
    );
    assert_eq!(status, 200);
    master.request("newcomer", "sev-snp", &parameters, None);
    connector.restart();
    let published = master.wait_for(&instance_guid("newcomer"), CONVERGE, "running", running);
    assert_ne!(published["vm-id"], old);
    let vm = show(&daemon, &published["vm-id"]);
    assert!(vm["name"]
        .as_str()
        .expect("name")
        .starts_with("comp-hsev-slappart1-"));
    eventually("the old VM deleted", CONVERGE, || {
        vms(&daemon).iter().all(|vm| vm["id"] != old)
    });
    assert_eq!(vms(&daemon).len(), titles.len());
}

#[test]
fn a_connector_told_the_wrong_owner_says_so_and_makes_no_second_vm() {
    let master = Slapproxy::start();
    let daemon = Daemon::start_on(Driver::Fake, "");
    daemon.import_image();
    // The admin token is `ops` in hsevd.toml, not `slapos`.
    let config = ConnectorConfig {
        token: (ADMIN.to_owned(), "slapos".to_owned()),
        ..ConnectorConfig::new(&master, &daemon)
    };
    let connector = Connector::start(&config);
    master.request("vm1", "default", &json!({"ram-size": 1024}), None);
    connector.wait_for_log("hsev.owner is \"slapos\", but hsevd made the VM", CONVERGE);
    connector.wait_for_log("that the VMs of \"slapos\" do not include", CONVERGE);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(vms(&daemon).len(), 1, "one VM, never a second");
    assert_eq!(events(&daemon, "started"), 0, "and not started for anyone");
    assert_eq!(
        connector.logged("do not include"),
        1,
        "said once: {}",
        connector.log()
    );
}

#[test]
fn a_master_or_hsevd_that_is_down_is_retried_with_backoff_and_reported_once() {
    let (mut master, mut daemon, connector) = fake_node();
    let guid = instance_guid("vm1");
    master.request(
        "vm1",
        "sev-snp",
        &json!({"ram-size": 1024, "cpu-count": 1}),
        None,
    );
    let first = master.wait_for(&guid, CONVERGE, "running", running);

    master.kill_9();
    std::thread::sleep(Duration::from_secs(8));
    master.restart();
    connector.wait_for_log("the SlapOS master answers again", CONVERGE);
    assert_eq!(
        connector.logged("the SlapOS master is unreachable"),
        1,
        "{}",
        connector.log()
    );

    // hsevd goes away; the fake driver's VMs go with it, so the next hsevd
    // finds the VM failed, which the connector bangs once and starts again.
    daemon.kill_9();
    std::thread::sleep(Duration::from_secs(6));
    daemon.restart();
    connector.wait_for_log("hsevd answers again", CONVERGE);
    assert_eq!(
        connector.logged("hsevd is unreachable"),
        1,
        "{}",
        connector.log()
    );
    let again = master.wait_for(&guid, CONVERGE, "running again", |connection| {
        running(connection) && connection["vm-id"] == first["vm-id"]
    });
    assert_eq!(again["vm-id"], first["vm-id"], "the same VM, started again");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        master.calls("slapos.put.v0.compute_node_bang"),
        1,
        "{}",
        master.log()
    );
    assert_eq!(
        master.calls("slapos.put.v0.software_instance_bang"),
        1,
        "{}",
        master.log()
    );
}

#[test]
fn a_pool_that_cannot_vouch_for_confidentiality_refuses_confidential_requests() {
    let master = Slapproxy::start();
    let daemon = Daemon::start_on(Driver::Fake, "");
    daemon.import_image();
    let config = ConnectorConfig {
        allow_simulated_firmware: false,
        ..ConnectorConfig::new(&master, &daemon)
    };
    let _connector = Connector::start(&config);
    master.request("secret", "sev-snp", &json!({"cpu-count": 1}), None);
    let refused = master.wait_for(
        &instance_guid("secret"),
        CONVERGE,
        "refused",
        |connection| connection["state"] == "refused",
    );
    let error = refused["error"].as_str().expect("error");
    assert!(
        error.starts_with("confidential-mode: host ")
            && error.contains("simulated Secure Processor"),
        "{error}"
    );
    // An ordinary VM needs no confidentiality.
    master.request("plain", "default", &json!({"ram-size": 1024}), None);
    master.wait_for(&instance_guid("plain"), CONVERGE, "running", running);
    assert_eq!(vms(&daemon).len(), 1, "the refused VM is gone");
    assert_eq!(
        events(&daemon, "started"),
        1,
        "only the ordinary VM ever ran"
    );
}

#[test]
fn a_tenant_token_serves_a_fixed_partition_count_and_cannot_vouch_for_a_tcb() {
    let master = Slapproxy::start();
    let daemon = Daemon::start_on(Driver::Fake, "");
    daemon.import_image();
    // A tenant sees no hosts: a fixed partition count, and no host TCB.
    let config = ConnectorConfig {
        token: (ALICE.to_owned(), "alice".to_owned()),
        partitions: Some(4),
        ..ConnectorConfig::new(&master, &daemon)
    };
    let _connector = Connector::start(&config);
    eventually("registered", CONVERGE, || master.partitions().len() == 4);
    master.request(
        "floor",
        "sev-snp",
        &json!({"minimum-tcb": {"snp": 1}}),
        None,
    );
    let refused = master.wait_for(&instance_guid("floor"), CONVERGE, "refused", |connection| {
        connection["state"] == "refused"
    });
    assert!(
        refused["error"]
            .as_str()
            .expect("error")
            .starts_with("minimum-tcb: cannot be checked"),
        "{refused}"
    );
    master.request("plain", "sev-snp", &json!({"ram-size": 1024}), None);
    let published = master.wait_for(&instance_guid("plain"), CONVERGE, "running", running);
    let vm = daemon.json(
        ALICE,
        ["vm", "show", published["vm-id"].as_str().expect("id")],
    );
    assert_eq!(vm["owner"], "alice");
    assert_eq!(
        daemon.json(ALICE, ["vm", "list"]).as_array().map(Vec::len),
        Some(1)
    );
}

/// `openssl` with `args`, in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let output = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        text(&output.stderr)
    );
}

#[test]
fn a_master_that_asks_for_a_client_certificate_gets_the_nodes() {
    let master = Slapproxy::start();
    let daemon = Daemon::start_on(Driver::Fake, "");
    let pki = tempfile::tempdir().expect("tempdir");
    let dir = pki.path();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=test master CA",
        ],
    );
    for (name, extension) in [
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("node", "extendedKeyUsage=clientAuth"),
    ] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        std::fs::write(dir.join(format!("{name}.ext")), format!("{extension}\n")).expect("ext");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }
    // A TLS front that demands a certificate of the CA, as the real master
    // does, before slapproxy.
    let front = TlsFront::start(dir, master.port());
    let port = front.port();
    let url = format!("https://127.0.0.1:{port}");
    let with_certificate = ConnectorConfig {
        master_url: url.clone(),
        master_extra: format!(
            "cert_file = {:?}\nkey_file = {:?}\nca_file = {:?}\n",
            dir.join("node.pem").display().to_string(),
            dir.join("node.key").display().to_string(),
            dir.join("ca.pem").display().to_string()
        ),
        ..ConnectorConfig::new(&master, &daemon)
    };
    let without = ConnectorConfig {
        master_url: url,
        master_extra: format!("ca_file = {:?}\n", dir.join("ca.pem").display().to_string()),
        ..ConnectorConfig::new(&master, &daemon)
    };
    let refused = Connector::prepare(&without);
    let refused_pass = refused.once();
    assert!(!refused_pass.status.success());
    assert!(
        text(&refused_pass.stderr).contains("unreachable"),
        "{}",
        text(&refused_pass.stderr)
    );
    assert!(
        master.partitions().is_empty(),
        "nothing registered without the certificate"
    );
    drop(refused);

    let accepted = Connector::prepare(&with_certificate);
    let pass = accepted.once();
    assert!(
        pass.status.success(),
        "{}{}",
        text(&pass.stderr),
        front.log()
    );
    assert_eq!(master.partitions().len(), FAKE_SLOTS, "{}", front.log());
}

/// The requester's `hsev kbs policy set` of its VM `vm_id`, from its own
/// copy of the image, with its own broker token (and `extra` flags); what
/// it printed.
fn requester_pins_its_policy(daemon: &Daemon, kbs: &Kbs, vm_id: &str, extra: &[&str]) -> String {
    let manifest = hsev_e2e::daemon::image_dir().join("manifest.json");
    let token = kbs.tenant_token_file(REQUESTERS);
    let mut args: Vec<String> = [
        "kbs",
        "policy",
        "set",
        "--broker",
        &kbs.url(),
        "--broker-pin",
        &kbs.pin(),
        "--broker-token-file",
        &token.display().to_string(),
        "--repository",
        REQUESTERS,
        "--key-broker",
        &kbs.guest_url(),
        "--vm",
        vm_id,
        "--image-manifest",
        &manifest.display().to_string(),
        "--allow-simulated",
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect();
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    let pinned = daemon.hsev(ADMIN, args);
    assert!(
        pinned.status.success(),
        "{}{}",
        text(&pinned.stdout),
        text(&pinned.stderr)
    );
    text(&pinned.stdout)
}

/// The repository of the requesters' disk keys at their broker.
const REQUESTERS: &str = "alice";

#[test]
fn a_policy_the_requester_pins_wrong_is_refused_and_its_vm_never_runs() {
    let kbs = Kbs::start(KbsMode::Development);
    let daemon = Daemon::on_platform_trusted_by_on(Driver::Fake, "", &kbs);
    daemon.import_image();
    let master = Slapproxy::start();
    let config = ConnectorConfig {
        key_broker: Some(ConnectorKeyBroker::of(&kbs, REQUESTERS)),
        ..ConnectorConfig::new(&master, &daemon)
    };
    let _connector = Connector::start(&config);
    let parameters = json!({"cpu-count": 1, "encrypted-disk-size": 1});
    let debuggable = tempfile::NamedTempFile::new().expect("a policy file");
    std::fs::write(debuggable.path(), "allow_debug = true\n").expect("written");
    let debuggable = debuggable.path().display().to_string();
    let someone_else = "ab".repeat(32);
    for (title, extra, problem) in [
        (
            "debuggable",
            vec!["--policy", debuggable.as_str()],
            "debuggable guests",
        ),
        (
            "misbound",
            vec!["--host-data", someone_else.as_str()],
            "another VM's host_data",
        ),
    ] {
        master.request(title, "sev-snp", &parameters, None);
        let guid = instance_guid(title);
        let waiting = master.wait_for(&guid, CONVERGE, "awaiting its policy", |connection| {
            connection["awaiting"].is_string()
        });
        let id = waiting["vm-id"].as_str().expect("id").to_owned();
        requester_pins_its_policy(&daemon, &kbs, &id, &extra);
        let refused = master.wait_for(&guid, CONVERGE, "refused", |connection| {
            connection["state"] == "refused"
        });
        let error = refused["error"].as_str().expect("error");
        assert!(
            error.starts_with("encrypted-disk-size: ") && error.contains(problem),
            "{title}: {error}"
        );
    }
    eventually("the refused VMs deleted", CONVERGE, || {
        vms(&daemon).is_empty()
    });
    assert_eq!(events(&daemon, "started"), 0, "no VM ever ran");
}

#[test]
fn an_sev_snp_request_waits_for_its_requesters_policy_then_its_guest_formats_and_unlocks_its_disk()
{
    let mut kbs = Kbs::start(KbsMode::Development);
    let daemon = Daemon::on_platform_trusted_by_on(Driver::Qemu, "", &kbs);
    daemon.import_image();
    let master = Slapproxy::start();
    let config = ConnectorConfig {
        key_broker: Some(ConnectorKeyBroker::of(&kbs, REQUESTERS)),
        ..ConnectorConfig::new(&master, &daemon)
    };
    let connector = Connector::start(&config);
    let kept = tempfile::tempdir_in(daemon.state_dir()).expect("tempdir");
    let parameters =
        json!({"ram-size": 1024, "cpu-count": 1, "encrypted-disk-size": 1, "nat-rules": [22]});
    master.request("vault", "sev-snp", &parameters, None);
    let guid = instance_guid("vault");

    // No policy pinned yet: the VM is made, but waits, and its connection
    // parameters tell the requester what to run, with the VM's id.
    let waiting = master.wait_for(&guid, CONVERGE, "awaiting its policy", |connection| {
        connection["awaiting"].is_string()
    });
    let id = waiting["vm-id"].as_str().expect("id").to_owned();
    let awaiting = waiting["awaiting"].as_str().expect("a string");
    let resource = format!("{REQUESTERS}/disk-key/{id}");
    for part in [
        format!("hsev kbs policy set --vm {id}"),
        format!("--repository {REQUESTERS}"),
        format!("--key-broker {}", kbs.guest_url()),
        format!("--broker-pin {}", kbs.pin()),
        resource.clone(),
    ] {
        assert!(awaiting.contains(&part), "{part:?} not in {awaiting}");
    }
    assert_eq!(waiting["state"], "stopped", "{waiting}");
    assert!(
        waiting.get("error").is_none(),
        "waiting is no error: {waiting}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(daemon.vmm_pids(&id).is_empty(), "no guest runs unpinned");
    assert_eq!(vms(&daemon).len(), 1, "one VM, kept while it waits");

    // The requester pins the policy from its own machine; the guest then
    // attests, receives the key the broker generates, formats its disk.
    let pinned = requester_pins_its_policy(&daemon, &kbs, &id, &[]);
    assert!(pinned.contains(&resource), "{pinned}");
    let published = master.wait_for(&guid, Duration::from_secs(300), "released", |connection| {
        connection["attestation-state"] == "released"
    });
    assert!(published.get("awaiting").is_none(), "{published}");
    let console = text(&daemon.hsev(ADMIN, ["vm", "console", &id]).stdout);
    assert!(
        console.contains("HSEV-DISK-UNLOCKED /mnt/data boot=1"),
        "{console}"
    );

    let read_back = master.request("vault", "sev-snp", &parameters, None);
    let connection = &read_back.connection;
    assert_eq!(read_back.state, "started");
    assert_eq!(
        connection["attestation-state"], "released",
        "{}",
        read_back.output
    );
    assert_eq!(connection["state"], "running");
    assert_eq!(connection["vm-id"], json!(id));
    assert_eq!(
        connection["launch-digest"],
        connection["expected-measurement"]
    );
    assert_eq!(connection["encrypted-disk-key"], json!(resource));
    assert!(connection["nat-rule-url-tcp-22"]
        .as_str()
        .is_some_and(|url| url.starts_with("127.0.0.1:")));
    let listed = kbs.resources(REQUESTERS);
    assert!(listed.contains(&resource), "{listed}");

    let disk = keep_disk(&daemon, &id, "disk-hsev-data.raw", kept.path());
    assert!(bytes_at(&disk, 0, 6).starts_with(b"LUKS\xba\xbe"));
    master.request("vault", "sev-snp", &parameters, Some("destroyed"));
    eventually("destroyed", Duration::from_secs(60), || {
        vms(&daemon).is_empty() && master.partitions().iter().all(|(_, state)| state == "free")
    });
    assert!(daemon.vmm_pids(&id).is_empty(), "its QEMU is gone");
    assert!(
        bytes_at(&disk, 0, 4096).iter().all(|byte| *byte == 0),
        "its LUKS header wiped"
    );
    // The key is the requester's: neither hsevd nor the connector ever saw
    // it (the requester reads it back from its stopped broker), nor can
    // they revoke it: its owner does.
    assert!(kbs.resources(REQUESTERS).contains(&resource));
    kbs.kill_9();
    let key = kbs.export(&resource).expect("the requester reads its key");
    kbs.restart();
    assert_eq!(key.len(), 32, "a generated 256-bit key");
    let hex_key = hex::encode(&key);
    for (what, log) in [("hsevd", daemon.log()), ("the connector", connector.log())] {
        assert!(!log.contains(&hex_key), "{what} logged the key");
    }
    drop(kept);
    for file in files_under(&daemon.state_dir()) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !contains(&bytes, &key) && !contains(&bytes, hex_key.as_bytes()),
            "the key is in {}",
            file.display()
        );
    }
    let revoked = daemon.hsev(
        ADMIN,
        [
            "kbs",
            "policy",
            "delete",
            "--broker",
            &kbs.url(),
            "--broker-pin",
            &kbs.pin(),
            "--broker-token-file",
            &kbs.tenant_token_file(REQUESTERS).display().to_string(),
            "--resource",
            &resource,
        ],
    );
    assert!(revoked.status.success(), "{}", text(&revoked.stderr));
    assert!(!kbs.resources(REQUESTERS).contains(&resource));
    kbs.verify_audit();
}

/// Every file under `folder`.
fn files_under(folder: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut folders = vec![folder.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                folders.push(path);
            } else if path.is_file() {
                files.push(path);
            }
        }
    }
    files
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}
