//! `hsev vm apply` and `hsev vm status` end to end: the real `hsev` against
//! the real hsevd on the fake driver (the spec and the API are the point,
//! not a guest): create, unchanged, updated, a re-create refused then done,
//! TOML and JSON, unknown keys refused by name with nothing changed, and
//! the status exit codes.

use std::path::PathBuf;

use hsev_e2e::daemon::{Daemon, Driver, ALICE, BOB};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const SPEC: &str = r#"name = "web"
image = "debian"
vcpus = 1
memory = 256
mode = "sev-snp"
disks = ["data:16"]
forwards = ["0:22"]
labels = { team = "web" }
"#;

struct Specs {
    dir: tempfile::TempDir,
}

impl Specs {
    fn new() -> Self {
        Specs {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("written");
        path
    }
}

fn daemon() -> Daemon {
    let daemon = Daemon::start_on(Driver::Fake, "");
    daemon.import_image();
    daemon
}

/// `hsev vm apply --file SPEC ARGS`: (exit code, stdout, stderr).
fn apply(daemon: &Daemon, spec: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["vm", "apply", "--file", spec.to_str().expect("utf-8")];
    all.extend_from_slice(args);
    let output = daemon.hsev(ALICE, &all);
    (
        output.status.code().expect("an exit code"),
        text(&output.stdout),
        text(&output.stderr),
    )
}

fn status(daemon: &Daemon, vm: &str) -> (i32, String, String) {
    let output = daemon.hsev(ALICE, ["vm", "status", vm]);
    (
        output.status.code().expect("an exit code"),
        text(&output.stdout),
        text(&output.stderr),
    )
}

#[test]
fn apply_creates_leaves_unchanged_updates_labels_and_recreates_only_when_told() {
    let daemon = daemon();
    let specs = Specs::new();
    let spec = specs.write("web.toml", SPEC);

    let (code, out, err) = apply(&daemon, &spec, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("created web ("), "{out}");
    let created = daemon.json(ALICE, ["vm", "show", "web"]);
    assert_eq!(created["state"], "stopped", "not started without --start");
    assert_eq!(created["spec"]["labels"]["team"], "web");

    let (code, out, _) = apply(&daemon, &spec, &[]);
    assert_eq!((code, out.as_str()), (0, "unchanged web\n"));

    // Labels change in place, the VM stays the same one.
    let relabelled = specs.write(
        "web.toml",
        &SPEC.replace("team = \"web\"", "team = \"api\", tier = \"1\""),
    );
    let (code, out, err) = apply(&daemon, &relabelled, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "updated web: labels.team web -> api, labels.tier none -> 1\n"
    );
    let updated = daemon.json(ALICE, ["vm", "show", "web"]);
    assert_eq!(updated["id"], created["id"]);
    assert_eq!(updated["spec"]["labels"]["tier"], "1");

    // What only a new VM can have: refused and named, nothing changed.
    let bigger = specs.write(
        "web.toml",
        &SPEC
            .replace("vcpus = 1", "vcpus = 2")
            .replace("data:16", "data:32"),
    );
    let (code, out, err) = apply(&daemon, &bigger, &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("vcpus 1 -> 2, disks data:16 -> data:32")
            && err.contains("labels.team api -> web")
            && err.contains("--recreate"),
        "{err}"
    );
    let kept = daemon.json(ALICE, ["vm", "show", "web"]);
    assert_eq!(
        (kept["id"].clone(), kept["spec"]["vcpus"].clone()),
        (created["id"].clone(), 1.into())
    );

    let (code, out, err) = apply(&daemon, &bigger, &["--recreate", "--start", "--wait"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("recreated web ("), "{out}");
    assert!(lines[0].contains("vcpus 1 -> 2"), "{out}");
    assert!(lines[1].starts_with("web running on "), "{out}");
    let recreated = daemon.json(ALICE, ["vm", "show", "web"]);
    assert_ne!(recreated["id"], created["id"], "a new VM");
    assert_eq!(recreated["spec"]["vcpus"], 2);
    assert_eq!(recreated["state"], "running");

    // --start on a running VM that matches: nothing to do.
    let (code, out, _) = apply(&daemon, &bigger, &["--start", "--output", "json"]);
    assert_eq!(code, 0);
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(report["outcome"], "unchanged");
    assert_eq!(report["id"], recreated["id"]);
    assert_eq!(report["state"], "running");
    let listed = daemon.json(ALICE, ["vm", "list"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
}

#[test]
fn apply_reads_json_and_refuses_unknown_keys_and_bad_values_changing_nothing() {
    let daemon = daemon();
    let specs = Specs::new();
    let json = specs.write(
        "db.json",
        r#"{"name": "db", "image": "debian", "vcpus": 1, "memory": 256, "mode": "none",
            "forwards": ["0:5432"], "labels": {"team": "db"}}"#,
    );
    let (code, out, err) = apply(&daemon, &json, &["--output", "json"]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(report["outcome"], "created");
    assert_eq!(report["vm"]["spec"]["mode"], "none");
    let (code, out, _) = apply(&daemon, &json, &[]);
    assert_eq!((code, out.as_str()), (0, "unchanged db\n"));

    for (name, spec, expected) in [
        (
            "colour.toml",
            format!("{SPEC}colour = \"blue\"\n"),
            "line 9: unknown field `colour`",
        ),
        (
            "cpus.json",
            r#"{"name": "x", "image": "debian", "cpus": 1}"#.to_owned(),
            "unknown field `cpus`",
        ),
        (
            "table.toml",
            format!("{SPEC}[key_broker]\nurl = \"http://k\"\nrepository = \"r\"\nport = 1\n"),
            "unknown field `port`",
        ),
        (
            "disk.toml",
            SPEC.replace("data:16", "data"),
            "disks[0]: expected NAME:SIZE_MIB",
        ),
        (
            "name.toml",
            SPEC.replace("\"web\"", "\"Web\""),
            "name: \"Web\"",
        ),
        (
            "no-broker.toml",
            SPEC.replace("disks = ", "encrypted_disk = 16\ndisks = "),
            "encrypted_disk: needs [key_broker]",
        ),
        (
            "unpinned.toml",
            format!(
                "{SPEC}[key_broker]\nurl = \"https://kbs.example:8443\"\nrepository = \"alice\"\n"
            ),
            "key_broker.pin: an https:// broker needs the pin",
        ),
    ] {
        let path = specs.write(name, &spec);
        let (code, out, err) = apply(&daemon, &path, &[]);
        assert_eq!(code, 2, "{name}: {out}{err}");
        assert_eq!(err.lines().count(), 1, "{name}: one line: {err}");
        assert!(err.contains(expected), "{name}: {expected:?} not in {err}");
    }
    // An image that is not there: refused before anything is made.
    let (code, _, err) = apply(
        &daemon,
        &specs.write("img.toml", &SPEC.replace("debian", "nope")),
        &[],
    );
    assert_eq!(code, 2, "{err}");
    let listed = daemon.json(ALICE, ["vm", "list"]);
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(1),
        "only db: {listed}"
    );
}

#[test]
fn status_is_0_running_1_stopped_or_absent_2_otherwise_in_one_line() {
    let daemon = daemon();
    let specs = Specs::new();
    let spec = specs.write("web.toml", SPEC);
    assert_eq!(
        status(&daemon, "web"),
        (1, "web absent\n".into(), String::new())
    );
    let (code, _, err) = apply(&daemon, &spec, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        status(&daemon, "web"),
        (1, "web stopped: created\n".into(), String::new())
    );
    let (code, _, err) = apply(&daemon, &spec, &["--start", "--wait"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = status(&daemon, "web");
    assert_eq!(code, 0);
    assert!(
        out.starts_with("web running on ") && out.lines().count() == 1,
        "{out}"
    );

    // Another tenant's VM is absent to bob.
    let output = daemon.hsev(BOB, ["vm", "status", "web"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));

    // Anything else is 2: a VM failed behind the API's back, hsevd gone.
    daemon.edit_store(
        "UPDATE vm SET state = 'failed', state_reason = 'qemu exited' WHERE name = 'web'",
    );
    assert_eq!(
        status(&daemon, "web"),
        (2, "web failed: qemu exited\n".into(), String::new())
    );
    let output = hsev_e2e::hsev([
        "vm",
        "status",
        "web",
        "--endpoint",
        "unix:///nonexistent/hsevd.sock",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(output.stdout, b"");
    let error = text(&output.stderr);
    assert_eq!(error.lines().count(), 1, "{error}");
    assert!(
        error.contains("cannot reach hsevd at unix:///nonexistent/hsevd.sock"),
        "{error}"
    );
}

#[test]
fn an_encrypted_disk_names_the_tenants_key_broker_on_the_guests_command_line() {
    let daemon = daemon();
    let specs = Specs::new();
    let pin = format!("sha256:{}", "ab".repeat(32));
    let spec = specs.write(
        "vault.toml",
        &format!(
            "{}[key_broker]\nurl = \"https://10.0.2.2:8443\"\npin = \"{pin}\"\nrepository = \"alice\"\n",
            SPEC.replace("name = \"web\"", "name = \"vault\"")
                .replace("disks = ", "encrypted_disk = 16\ndisks = ")
        ),
    );
    let (code, out, err) = apply(&daemon, &spec, &["--output", "json"]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(report["outcome"], "created", "{report}");
    let vm = daemon.json(ALICE, ["vm", "show", "vault"]);
    let id = vm["id"].as_str().expect("id");
    let shown = vm.to_string();
    for part in [
        "https://10.0.2.2:8443".to_owned(),
        pin.clone(),
        format!("alice/disk-key/{id}"),
    ] {
        assert!(shown.contains(&part), "{part} not in {vm}");
    }
    // Applied again: nothing to do; another broker: only a new VM has it.
    let (code, out, err) = apply(&daemon, &spec, &[]);
    assert_eq!((code, out.as_str()), (0, "unchanged vault\n"), "{err}");
    let elsewhere = specs.write(
        "elsewhere.toml",
        &std::fs::read_to_string(&spec)
            .expect("the spec")
            .replace("10.0.2.2:8443", "10.0.2.2:9443"),
    );
    let (code, _, err) = apply(&daemon, &elsewhere, &[]);
    assert_ne!(code, 0, "a re-create is refused without --recreate");
    assert!(err.contains("key_broker"), "{err}");
}
