//! The OpenSVC launcher (`hsev-opensvc`) under the contract of the v2
//! agent's `app` resource of type `forking`, run exactly as the agent runs
//! its script (`hsev_e2e::opensvc`: the same arguments, environment, stdin
//! from /dev/null, its own session, a timeout) against the real hsevd.
//!
//! The environment is the `environment` keyword of the example service
//! config (`integrations/opensvc/examples/vault-app.conf`), with the test's
//! daemon and files in place of a node's. Real QEMU guests (TCG) with the
//! real key broker where the guest's attestation is the point (a start that
//! returns only once the disk key is released, or fails with the broker's
//! reason; a stop that returns only once the guest is off); the fake driver
//! elsewhere.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hsev_e2e::daemon::{Daemon, Driver, ALICE};
use hsev_e2e::kbs::{Kbs, KbsMode};
use hsev_e2e::opensvc::{
    environment_keyword, integration_dir, read_service_config, AppResource, Run,
};

/// The agent's timeouts in the example config are minutes; the tests' are
/// what a guest under TCG needs, with room.
const START_TIMEOUT: Duration = Duration::from_secs(300);
const STOP_TIMEOUT: Duration = Duration::from_secs(120);
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// A test's files: token files, specs, the agent's tmp folder.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        for folder in ["tmp", "home"] {
            std::fs::create_dir(dir.path().join(folder)).expect("folder");
        }
        Scratch { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).expect("written");
        path
    }

    /// A file only its owner reads, as a token file must be.
    fn write_secret(&self, name: &str, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.write(name, text);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        path
    }
}

fn example(name: &str) -> PathBuf {
    integration_dir().join("examples").join(name)
}

/// The example's app resource on OpenSVC node `node`, speaking to `daemon`
/// with `token`.
fn app_resource(daemon: &Daemon, scratch: &Scratch, node: &str, token: &str) -> AppResource {
    let config = read_service_config(&example("vault-app.conf"));
    let app = &config["app#vm"];
    let mut resource = AppResource {
        service: "vault".into(),
        namespace: None,
        rid: "app#vm".into(),
        environment: environment_keyword(&app["environment"], node),
        tmp: scratch.path("tmp"),
        home: scratch.path("home"),
    };
    let token_file = scratch.write_secret(&format!("{node}.token"), &format!("{token}\n"));
    resource.set("HSEV_SPEC", example("vault.toml").to_str().expect("utf-8"));
    resource.set(
        "HSEV_ENDPOINT",
        &format!("unix://{}", daemon.socket().display()),
    );
    resource.set("HSEV_TOKEN_FILE", token_file.to_str().expect("utf-8"));
    // A Unix socket needs no CA.
    resource.unset("HSEV_CA");
    resource
}

/// The example spec without its encrypted disk and key broker (the fake
/// driver runs no guest to attest).
fn plain_spec(scratch: &Scratch) -> PathBuf {
    let text = std::fs::read_to_string(example("vault.toml")).expect("the example spec");
    let before_broker = text.split("[key_broker]").next().unwrap_or_default();
    let plain: String = before_broker
        .lines()
        .filter(|line| !line.starts_with("encrypted_disk"))
        .map(|line| format!("{line}\n"))
        .collect();
    scratch.write("vault.toml", &plain)
}

/// The tenant whose VM OpenSVC runs, and its repository at its broker.
const TENANT_REPOSITORY: &str = "alice";

/// The example spec, its key broker `kbs` (as the guest reaches it).
fn encrypted_spec(scratch: &Scratch, kbs: &Kbs) -> PathBuf {
    let text = std::fs::read_to_string(example("vault.toml")).expect("the example spec");
    let before_broker = text.split("[key_broker]").next().unwrap_or_default();
    scratch.write(
        "vault.toml",
        &format!(
            "{before_broker}[key_broker]\nurl = {:?}\npin = {:?}\nrepository = {TENANT_REPOSITORY:?}\n",
            kbs.guest_url(),
            kbs.pin()
        ),
    )
}

/// What the tenant does once, before OpenSVC first starts its encrypted
/// VM: makes it (`hsev vm apply`, not started) and pins its disk key's
/// release policy from its own copy of the image (`allow_simulated` for
/// a development pool).
fn tenant_makes_and_pins(daemon: &Daemon, kbs: &Kbs, spec: &Path, allow_simulated: bool) {
    let made = daemon.hsev(
        ALICE,
        ["vm", "apply", "--file", spec.to_str().expect("utf-8")],
    );
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let manifest = hsev_e2e::daemon::image_dir().join("manifest.json");
    let token = kbs.tenant_token_file(TENANT_REPOSITORY);
    let mut args = vec![
        "kbs".to_owned(),
        "policy".into(),
        "set".into(),
        "--broker".into(),
        kbs.url(),
        "--broker-pin".into(),
        kbs.pin(),
        "--broker-token-file".into(),
        token.display().to_string(),
        "--repository".into(),
        TENANT_REPOSITORY.into(),
        "--key-broker".into(),
        kbs.guest_url(),
        "--vm".into(),
        "vault".into(),
        "--image-manifest".into(),
        manifest.display().to_string(),
    ];
    if allow_simulated {
        args.push("--allow-simulated".into());
    }
    let pinned = daemon.hsev(ALICE, &args);
    assert!(
        pinned.status.success(),
        "{}{}",
        String::from_utf8_lossy(&pinned.stdout),
        String::from_utf8_lossy(&pinned.stderr)
    );
}

fn fake_daemon() -> Daemon {
    let daemon = Daemon::start_on(Driver::Fake, "");
    daemon.import_image();
    daemon
}

/// Asserts the exit code; answers the run.
fn expect(run: Run, code: i32, what: &str) -> Run {
    assert_eq!(run.code, Some(code), "{what}: {}", run.output());
    run
}

/// Asserts that nothing printed the token.
fn no_token(runs: &[&Run], token: &str) {
    for run in runs {
        assert!(
            !run.output().contains(token),
            "a token was printed: {}",
            run.output()
        );
    }
}

fn shown(daemon: &Daemon, vm: &str) -> serde_json::Value {
    daemon.json(ALICE, ["vm", "show", vm])
}

fn console(daemon: &Daemon, vm: &str) -> String {
    String::from_utf8_lossy(&daemon.hsev(ALICE, ["vm", "console", vm]).stdout).into_owned()
}

/// `info`'s lines as a map; every line must be `key: value`.
fn info_map(run: &Run) -> std::collections::BTreeMap<String, String> {
    run.stdout
        .lines()
        .map(|line| {
            let (key, value) = line
                .split_once(": ")
                .unwrap_or_else(|| panic!("not a `key: value` line: {line:?}"));
            assert!(
                !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "key {key:?}"
            );
            (key.to_owned(), value.to_owned())
        })
        .collect()
}

#[test]
fn an_encrypted_vm_starts_only_once_its_key_is_released_and_stops_only_once_off() {
    let kbs = Kbs::start(KbsMode::Development);
    let daemon = Daemon::on_platform_trusted_by("", &kbs);
    daemon.import_image();
    let scratch = Scratch::new();
    let mut n1 = app_resource(&daemon, &scratch, "n1", ALICE);
    let spec = encrypted_spec(&scratch, &kbs);
    n1.set("HSEV_SPEC", spec.to_str().expect("utf-8"));

    let absent = expect(n1.run("status", QUERY_TIMEOUT), 1, "status of an absent VM");
    assert_eq!(absent.stdout, "vault absent\n");
    let info_absent = expect(n1.run("info", QUERY_TIMEOUT), 0, "info of an absent VM");
    assert_eq!(info_absent.stdout, "vm: vault\nstate: absent\n");
    // The tenant makes the VM and pins its policy; OpenSVC then runs it.
    tenant_makes_and_pins(&daemon, &kbs, &spec, true);
    let made = expect(n1.run("status", QUERY_TIMEOUT), 1, "status of the VM made");
    assert!(made.stdout.starts_with("vault stopped"), "{}", made.stdout);

    // The start blocks through the boot and the attestation; meanwhile the
    // status says it is starting (2), never up.
    let starter = n1.clone();
    let start = std::thread::spawn(move || starter.run("start", START_TIMEOUT));
    let mut while_starting = Vec::new();
    while !start.is_finished() {
        let status = n1.run("status", QUERY_TIMEOUT);
        while_starting.push((status.code, status.stdout.clone()));
        std::thread::sleep(Duration::from_millis(300));
    }
    let started = expect(start.join().expect("the start thread"), 0, "start");
    let vm = shown(&daemon, "vault");
    assert_eq!(
        vm["attestation"]["state"],
        "released",
        "start returned before the key was released: {vm}\n{}",
        started.output()
    );
    assert!(console(&daemon, "vault").contains("HSEV-DISK-UNLOCKED /mnt/data boot=1"));
    assert!(
        started
            .stdout
            .contains("updated vault: labels.opensvc.node none -> n1"),
        "the tenant made it, OpenSVC labels and runs it: {}",
        started.stdout
    );
    assert!(
        started
            .stdout
            .ends_with("(sev-snp, SIMULATED firmware, disk key released)\n"),
        "{}",
        started.stdout
    );
    assert!(
        while_starting
            .iter()
            .any(|(code, line)| *code == Some(2) && line.contains("vault starting on")),
        "no `starting` status while the guest booted: {while_starting:?}"
    );
    assert!(
        while_starting
            .iter()
            .all(|(code, _)| matches!(code, Some(1 | 2)) || *code == Some(0)),
        "{while_starting:?}"
    );

    let up = expect(
        n1.run("status", QUERY_TIMEOUT),
        0,
        "status of the running VM",
    );
    assert!(
        up.stdout.starts_with("vault running on ") && up.stdout.ends_with("disk key released)\n"),
        "{}",
        up.stdout
    );

    // Twice: nothing happens, at once.
    let again = expect(n1.run("start", START_TIMEOUT), 0, "second start");
    assert!(again.stdout.contains("unchanged vault"), "{}", again.stdout);
    assert!(
        again.elapsed < Duration::from_secs(10),
        "{:?}",
        again.elapsed
    );
    assert_eq!(shown(&daemon, "vault")["id"], vm["id"]);
    assert_eq!(
        console(&daemon, "vault")
            .matches("HSEV-DISK-UNLOCKED")
            .count(),
        1,
        "the second start did not boot the guest again"
    );

    let info = expect(n1.run("info", QUERY_TIMEOUT), 0, "info");
    let fields = info_map(&info);
    assert_eq!(fields["vm"], "vault");
    assert_eq!(fields["id"], vm["id"].as_str().expect("id"));
    assert_eq!(fields["state"], "running");
    assert_eq!(fields["host"], vm["host"].as_str().expect("host"));
    assert_eq!(fields["mode"], "sev-snp");
    assert_eq!(fields["expected_measurement"].len(), 96);
    assert_eq!(fields["expected_measurement"], fields["launch_digest"]);
    assert_eq!(fields["measurements"], "equal");
    assert_eq!(fields["attestation"], "released");
    assert_eq!(fields["simulated_firmware"], "yes (no confidentiality)");
    assert_eq!(fields["opensvc_node"], "n1");
    assert_eq!(fields["opensvc_service"], "root/svc/vault");

    // The stop returns once the guest is off and its QEMU gone.
    let id = vm["id"].as_str().expect("id").to_owned();
    assert!(!daemon.vmm_pids(&id).is_empty(), "a QEMU runs the VM");
    let stopped = expect(n1.run("stop", STOP_TIMEOUT), 0, "stop");
    assert!(
        daemon.vmm_pids(&id).is_empty(),
        "QEMU still runs after the stop"
    );
    assert_eq!(shown(&daemon, "vault")["state"], "stopped");
    assert!(
        stopped.stdout.ends_with("vault stopped\n"),
        "{}",
        stopped.stdout
    );
    let down = expect(n1.run("status", QUERY_TIMEOUT), 1, "status once stopped");
    assert!(down.stdout.starts_with("vault stopped"), "{}", down.stdout);
    let stopped_again = expect(n1.run("stop", STOP_TIMEOUT), 0, "second stop");
    no_token(
        &[
            &absent,
            &info_absent,
            &started,
            &up,
            &again,
            &info,
            &stopped,
            &down,
            &stopped_again,
        ],
        ALICE,
    );
    kbs.verify_audit();
}

#[test]
fn a_refused_key_fails_the_start_with_the_brokers_reason_and_leaves_the_vm_stopped() {
    // A production broker never trusts the simulated Secure Processor.
    let kbs = Kbs::start(KbsMode::Production);
    let daemon = Daemon::on_platform_trusted_by("", &kbs);
    daemon.import_image();
    let scratch = Scratch::new();
    let mut n1 = app_resource(&daemon, &scratch, "n1", ALICE);
    let spec = encrypted_spec(&scratch, &kbs);
    n1.set("HSEV_SPEC", spec.to_str().expect("utf-8"));
    tenant_makes_and_pins(&daemon, &kbs, &spec, false);
    let refused = expect(n1.run("start", START_TIMEOUT), 1, "start refused");
    let error = refused.stderr.trim();
    assert_eq!(error.lines().count(), 1, "one line: {error}");
    assert!(
        error.starts_with("hsev-opensvc: error: VM vault: the key broker refused its disk key:")
            && error.contains("simulated"),
        "{error}"
    );
    let vm = shown(&daemon, "vault");
    assert_eq!(vm["state"], "stopped", "left running without its key: {vm}");
    assert!(daemon.vmm_pids(vm["id"].as_str().expect("id")).is_empty());
    expect(
        n1.run("status", QUERY_TIMEOUT),
        1,
        "status after the refusal",
    );
    no_token(&[&refused], ALICE);
}

#[test]
fn the_launcher_is_idempotent_and_only_the_node_that_started_the_vm_reports_it_up() {
    let daemon = fake_daemon();
    let scratch = Scratch::new();
    let spec = plain_spec(&scratch);
    let mut n1 = app_resource(&daemon, &scratch, "n1", ALICE);
    let mut n2 = app_resource(&daemon, &scratch, "n2", ALICE);
    for node in [&mut n1, &mut n2] {
        node.set("HSEV_SPEC", spec.to_str().expect("utf-8"));
    }

    expect(n1.run("stop", STOP_TIMEOUT), 0, "stop of an absent VM");
    let created = expect(n1.run("start", START_TIMEOUT), 0, "start");
    assert!(
        created.stdout.contains("created vault ("),
        "{}",
        created.stdout
    );
    let unchanged = expect(n1.run("start", START_TIMEOUT), 0, "second start");
    assert!(
        unchanged.stdout.contains("unchanged vault"),
        "{}",
        unchanged.stdout
    );
    expect(n1.run("status", QUERY_TIMEOUT), 0, "status on n1");
    let elsewhere = expect(n2.run("status", QUERY_TIMEOUT), 1, "status on n2");
    assert_eq!(elsewhere.stdout, "vault runs for OpenSVC node n1\n");

    // n2 does not stop what n1 holds.
    let left = expect(n2.run("stop", STOP_TIMEOUT), 0, "stop on n2");
    assert!(left.stdout.contains("left running"), "{}", left.stdout);
    assert_eq!(shown(&daemon, "vault")["state"], "running");

    // A failover: n2 restarts it for itself, and only n2 reports it up.
    let id = shown(&daemon, "vault")["id"].clone();
    let failover = expect(n2.run("start", START_TIMEOUT), 0, "start on n2");
    assert!(
        failover
            .stdout
            .contains("runs for OpenSVC node n1: restarting it for n2")
            && failover
                .stdout
                .contains("updated vault: labels.opensvc.node n1 -> n2"),
        "{}",
        failover.stdout
    );
    let vm = shown(&daemon, "vault");
    assert_eq!(vm["id"], id, "the same VM");
    assert_eq!(vm["spec"]["labels"]["opensvc.node"], "n2");
    assert_eq!(
        vm["spec"]["labels"]["team"], "storage",
        "the spec's own labels"
    );
    expect(n2.run("status", QUERY_TIMEOUT), 0, "status on n2");
    expect(n1.run("status", QUERY_TIMEOUT), 1, "status on n1");
    let left = expect(n1.run("stop", STOP_TIMEOUT), 0, "n1 back, stopping");
    assert!(left.stdout.contains("left running"), "{}", left.stdout);
    assert_eq!(shown(&daemon, "vault")["state"], "running");

    let stopped = expect(n2.run("stop", STOP_TIMEOUT), 0, "stop on n2");
    assert!(
        stopped.stdout.ends_with("vault stopped\n"),
        "{}",
        stopped.stdout
    );
    assert_eq!(shown(&daemon, "vault")["state"], "stopped");
    expect(n2.run("stop", STOP_TIMEOUT), 0, "second stop");
    expect(n2.run("status", QUERY_TIMEOUT), 1, "status once stopped");
    expect(
        n1.run("status", QUERY_TIMEOUT),
        1,
        "status once stopped, on n1",
    );
    no_token(
        &[&created, &unchanged, &elsewhere, &left, &failover, &stopped],
        ALICE,
    );
}

#[test]
fn bad_input_an_unreachable_hsevd_and_another_services_vm_fail_with_one_clear_line() {
    let daemon = fake_daemon();
    let scratch = Scratch::new();
    let spec = plain_spec(&scratch);
    let mut n1 = app_resource(&daemon, &scratch, "n1", ALICE);
    let one_line = |run: &Run, contains: &[&str]| {
        let error = run.stderr.trim();
        assert_eq!(error.lines().count(), 1, "one line: {}", run.output());
        for text in contains {
            assert!(error.contains(text), "{text:?} not in {error}");
        }
    };

    // A spec with an unknown key: refused by name, nothing created.
    let bad_spec = scratch.write(
        "bad.toml",
        &format!(
            "{}colour = \"blue\"\n",
            std::fs::read_to_string(&spec).expect("spec")
        ),
    );
    n1.set("HSEV_SPEC", bad_spec.to_str().expect("utf-8"));
    let refused = expect(
        n1.run("start", START_TIMEOUT),
        2,
        "start with an unknown key",
    );
    one_line(&refused, &["bad.toml", "unknown field `colour`"]);
    let status = expect(
        n1.run("status", QUERY_TIMEOUT),
        2,
        "status with an unknown key",
    );
    one_line(&status, &["unknown field `colour`"]);
    assert_eq!(daemon.json(ALICE, ["vm", "list"]), serde_json::json!([]));

    // The spec's file and its fields at once; fields with one missing.
    n1.set("HSEV_IMAGE", "debian");
    let both = expect(n1.run("start", START_TIMEOUT), 2, "HSEV_SPEC and fields");
    one_line(&both, &["HSEV_SPEC=", "HSEV_IMAGE", "both set"]);
    n1.unset("HSEV_SPEC");
    n1.set("HSEV_VCPUS", "1");
    n1.set("HSEV_MODE", "sev-snp");
    let missing = expect(n1.run("start", START_TIMEOUT), 2, "a missing field");
    one_line(&missing, &["HSEV_MEMORY not set"]);
    n1.unset("HSEV_IMAGE");
    n1.unset("HSEV_VCPUS");
    n1.unset("HSEV_MODE");
    n1.set("HSEV_SPEC", spec.to_str().expect("utf-8"));

    // hsevd unreachable: unknown (2) for status, failed for the rest.
    let endpoint = n1
        .environment
        .iter()
        .find(|(name, _)| name == "HSEV_ENDPOINT")
        .map(|(_, value)| value.clone())
        .expect("an endpoint");
    n1.set("HSEV_ENDPOINT", "unix:///nonexistent/hsevd.sock");
    let unreachable = expect(
        n1.run("status", QUERY_TIMEOUT),
        2,
        "status, hsevd unreachable",
    );
    one_line(
        &unreachable,
        &["cannot reach hsevd at unix:///nonexistent/hsevd.sock"],
    );
    assert_eq!(unreachable.stdout, "");
    expect(
        n1.run("start", START_TIMEOUT),
        2,
        "start, hsevd unreachable",
    );
    expect(n1.run("stop", STOP_TIMEOUT), 2, "stop, hsevd unreachable");
    let info = n1.run("info", QUERY_TIMEOUT);
    assert_ne!(info.code, Some(0), "{}", info.output());
    n1.set("HSEV_ENDPOINT", &endpoint);

    // A token hsevd does not know: named as the problem, never printed.
    let wrong = scratch.write_secret("wrong.token", "wrong-token-value\n");
    let good = n1
        .environment
        .iter()
        .find(|(name, _)| name == "HSEV_TOKEN_FILE")
        .map(|(_, value)| value.clone())
        .expect("a token file");
    n1.set("HSEV_TOKEN_FILE", wrong.to_str().expect("utf-8"));
    let unauthenticated = expect(n1.run("status", QUERY_TIMEOUT), 2, "status, wrong token");
    one_line(&unauthenticated, &["token"]);
    no_token(&[&unauthenticated], "wrong-token-value");
    n1.set("HSEV_TOKEN_FILE", &good);

    // A VM that another service holds is left alone.
    expect(n1.run("start", START_TIMEOUT), 0, "start");
    let mut other = n1.clone();
    other.service = "other".into();
    let not_ours = expect(
        other.run("stop", STOP_TIMEOUT),
        2,
        "stop by another service",
    );
    one_line(
        &not_ours,
        &["belongs to the OpenSVC service root/svc/vault"],
    );
    expect(
        other.run("start", START_TIMEOUT),
        2,
        "start by another service",
    );
    assert_eq!(shown(&daemon, "vault")["state"], "running");

    // A spec that only a new VM can have: refused, the VM as it was.
    let bigger = scratch.write(
        "bigger.toml",
        &std::fs::read_to_string(&spec)
            .expect("spec")
            .replace("vcpus = 1", "vcpus = 2"),
    );
    n1.set("HSEV_SPEC", bigger.to_str().expect("utf-8"));
    let recreate = expect(
        n1.run("start", START_TIMEOUT),
        2,
        "a spec needing a re-create",
    );
    one_line(&recreate, &["vcpus 1 -> 2", "--recreate"]);
    assert_eq!(shown(&daemon, "vault")["spec"]["vcpus"], 1);
    no_token(
        &[
            &refused,
            &status,
            &both,
            &missing,
            &unreachable,
            &not_ours,
            &recreate,
        ],
        ALICE,
    );
}

#[test]
fn provision_unprovision_and_a_vm_made_of_environment_fields() {
    let daemon = fake_daemon();
    let scratch = Scratch::new();
    let mut web = app_resource(&daemon, &scratch, "n1", ALICE);
    web.service = "web".into();
    web.namespace = Some("prod".into());
    web.unset("HSEV_SPEC");
    for (name, value) in [
        ("HSEV_IMAGE", "debian"),
        ("HSEV_VCPUS", "1"),
        ("HSEV_MEMORY", "256"),
        ("HSEV_MODE", "sev-snp"),
        ("HSEV_DISKS", "data:16 logs:8"),
        ("HSEV_LABELS", "team=web"),
    ] {
        web.set(name, value);
    }
    expect(
        web.run("provisioned", QUERY_TIMEOUT),
        1,
        "provisioned before",
    );
    let provisioned = expect(web.run("provision", START_TIMEOUT), 0, "provision");
    assert!(
        provisioned.stdout.contains("created prod-web ("),
        "{}",
        provisioned.stdout
    );
    expect(
        web.run("provisioned", QUERY_TIMEOUT),
        0,
        "provisioned after",
    );
    let vm = shown(&daemon, "prod-web");
    assert_eq!(vm["state"], "stopped");
    assert_eq!(vm["spec"]["disks"].as_array().map(Vec::len), Some(2));
    assert_eq!(vm["spec"]["labels"]["team"], "web");
    assert_eq!(vm["spec"]["labels"]["opensvc.service"], "prod/svc/web");
    expect(web.run("provision", START_TIMEOUT), 0, "provision again");
    expect(web.run("start", START_TIMEOUT), 0, "start");

    web.set("HSEV_DISKS", "data");
    let bad = expect(web.run("start", START_TIMEOUT), 2, "a bad field");
    assert!(
        bad.stderr
            .contains("HSEV_DISKS: disks[0]: expected NAME:SIZE_MIB"),
        "{}",
        bad.stderr
    );
    web.set("HSEV_DISKS", "data:16 logs:8");

    let gone = expect(web.run("unprovision", STOP_TIMEOUT), 0, "unprovision");
    assert!(
        gone.stdout.ends_with("prod-web unprovisioned\n"),
        "{}",
        gone.stdout
    );
    expect(
        web.run("provisioned", QUERY_TIMEOUT),
        1,
        "provisioned once gone",
    );
    expect(web.run("unprovision", STOP_TIMEOUT), 0, "unprovision again");
}

/// The variables the launcher documents (its environment module's table).
fn launcher_variables() -> Vec<String> {
    let source = std::fs::read_to_string(integration_dir().join("launcher/src/environment.rs"))
        .expect("the launcher's source");
    let mut names: Vec<String> = source
        .lines()
        .filter(|line| line.starts_with("//!"))
        .flat_map(|line| {
            line.split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
                .filter(|word| word.starts_with("HSEV_") && word.len() > 5)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The keywords of the container.hsev driver, from its source.
fn driver_keywords() -> Vec<String> {
    let source = std::fs::read_to_string(
        integration_dir().join("driver/site_opensvc/drivers/resource/container/hsev/__init__.py"),
    )
    .expect("the driver's source");
    let mut keywords: Vec<String> = source
        .split("\"keyword\": \"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_owned)
        .collect();
    // The agent's container keywords the driver takes (KW_NAME, ...).
    for (constant, keyword) in [
        ("KW_NAME", "name"),
        ("KW_START_TIMEOUT", "start_timeout"),
        ("KW_STOP_TIMEOUT", "stop_timeout"),
    ] {
        if source.contains(&format!("    {constant},\n")) {
            keywords.push(keyword.to_owned());
        }
    }
    keywords
}

/// Keywords every v2 resource takes.
const RESOURCE_KEYWORDS: &[&str] = &[
    "type",
    "shared",
    "monitor",
    "restart",
    "restart_delay",
    "optional",
    "disable",
    "standby",
    "tags",
    "subset",
    "comment",
];

#[test]
fn the_example_configs_parse_and_name_only_what_the_launcher_and_the_driver_read() {
    let variables = launcher_variables();
    for required in [
        "HSEV_SPEC",
        "HSEV_HOST",
        "HSEV_NODE",
        "HSEV_ENDPOINT",
        "HSEV_TOKEN_FILE",
    ] {
        assert!(
            variables.iter().any(|name| name == required),
            "{required}: {variables:?}"
        );
    }
    let keywords = driver_keywords();
    let mut configs = 0;
    for entry in std::fs::read_dir(integration_dir().join("examples")).expect("examples") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|extension| extension != "conf") {
            continue;
        }
        configs += 1;
        let config = read_service_config(&path);
        let what = path.display().to_string();
        let defaults = &config["DEFAULT"];
        assert_eq!(defaults["orchestrate"], "ha", "{what}");
        assert_eq!(defaults["nodes"].split_whitespace().count(), 2, "{what}");
        let mut resources = 0;
        for (section, keys) in &config {
            if let Some(_rid) = section.strip_prefix("app#") {
                resources += 1;
                assert_eq!(keys["type"], "forking", "{what} [{section}]");
                assert!(
                    keys["script"].ends_with("/hsev-opensvc"),
                    "{what} [{section}]"
                );
                for action in ["start", "stop", "check", "info"] {
                    assert_eq!(keys[action], "true", "{what} [{section}] {action}");
                }
                assert_eq!(keys["retcodes"], "0:up 1:down", "{what}");
                let environment = environment_keyword(&keys["environment"], "n1");
                for (name, value) in &environment {
                    assert!(
                        variables.contains(name),
                        "{what} [{section}]: {name} is not a variable the launcher reads"
                    );
                    assert!(!value.contains('{'), "{what}: {name}={value} unresolved");
                }
                let spec = environment
                    .iter()
                    .find(|(name, _)| name == "HSEV_SPEC")
                    .map(|(_, value)| PathBuf::from(value))
                    .expect("HSEV_SPEC");
                let file = spec.file_name().expect("a file name");
                assert!(
                    example(&file.to_string_lossy()).is_file(),
                    "{what}: {spec:?}"
                );
                assert_spec_is_valid(&example(&file.to_string_lossy()));
            } else if let Some(_rid) = section.strip_prefix("container#") {
                resources += 1;
                assert_eq!(keys["type"], "hsev", "{what} [{section}]");
                for key in keys.keys() {
                    assert!(
                        keywords.contains(key) || RESOURCE_KEYWORDS.contains(&key.as_str()),
                        "{what} [{section}]: {key} is not a keyword of container.hsev"
                    );
                }
            } else {
                assert_eq!(section, "DEFAULT", "{what}: an unexpected section");
            }
        }
        assert_eq!(resources, 1, "{what}: one VM resource");
    }
    assert_eq!(configs, 3, "the README's three services");
}

/// A spec is valid when `hsev vm apply` gets past it to the connection.
fn assert_spec_is_valid(spec: &Path) {
    let output = hsev_e2e::hsev([
        "vm",
        "apply",
        "--endpoint",
        "unix:///nonexistent/hsevd.sock",
        "--file",
        spec.to_str().expect("utf-8"),
    ]);
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("cannot reach hsevd at unix:///nonexistent/hsevd.sock"),
        "{}: {error}",
        spec.display()
    );
}

#[test]
fn the_driver_is_python_3_and_its_folder_carries_the_gpl_2() {
    let driver = integration_dir().join("driver");
    let licence = std::fs::read_to_string(driver.join("LICENSE")).expect("LICENSE");
    assert!(
        licence
            .trim_start()
            .starts_with("GNU GENERAL PUBLIC LICENSE")
            && licence.contains("Version 2, June 1991"),
        "the GPL-2.0 text"
    );
    let readme = std::fs::read_to_string(driver.join("README.md")).expect("README.md");
    assert!(readme.contains("GPL-2.0"));
    let module = driver.join("site_opensvc/drivers/resource/container/hsev/__init__.py");
    let compiled = tempfile::tempdir().expect("tempdir");
    let output = std::process::Command::new("python3")
        .args([
            "-c",
            "import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True)",
        ])
        .arg(&module)
        .arg(compiled.path().join("hsev.pyc"))
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // A namespace package: no __init__.py above the driver's own, so that
    // other site drivers can share site_opensvc.
    for folder in [
        "site_opensvc",
        "site_opensvc/drivers",
        "site_opensvc/drivers/resource",
        "site_opensvc/drivers/resource/container",
    ] {
        assert!(
            !driver.join(folder).join("__init__.py").exists(),
            "{folder}/__init__.py"
        );
    }
}
