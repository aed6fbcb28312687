//! The tenant verifies its own VM (`hsev vm attest`) and pins its launch
//! with its own ID block, against the real hsevd, the real agent in real
//! QEMU guests (TCG) and the simulated Secure Processor. The test also plays
//! the operator of the host, with root on it: it edits what the guest
//! boots, substitutes the guest's attestation port, and swaps the ID block,
//! and each time the tenant's own check, or the firmware, says no.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Output;

use hsev_e2e::daemon::{image_dir, Daemon, ADMIN, ALICE, BOB};

/// What the guest's agent prints once it answers attestation requests.
const RESPONDER_READY: &str = "answering attestation requests";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn path(path: &Path) -> &str {
    path.to_str().expect("utf-8")
}

/// A daemon with the simulated Secure Processor and the image imported.
fn host() -> Daemon {
    let daemon = Daemon::start("");
    daemon.import_image();
    daemon
}

/// Creates and starts alice's sev-snp VM `name` (with `extra` flags), and
/// waits for its agent to answer attestation requests.
fn boot(daemon: &Daemon, name: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "vm", "create", name, "--image", "debian", "--vcpus", "1", "--memory", "512", "--mode",
        "sev-snp", "--start",
    ];
    args.extend_from_slice(extra);
    let vm = daemon.json(ALICE, args);
    daemon.wait_console(ALICE, name, RESPONDER_READY, 1);
    vm
}

/// `hsev vm attest VM` as alice, with `extra` flags.
fn attest(daemon: &Daemon, vm: &str, extra: &[&str]) -> Output {
    let mut args = vec!["vm", "attest", vm];
    args.extend_from_slice(extra);
    daemon.hsev(ALICE, args)
}

fn manifest() -> String {
    image_dir().join("manifest.json").display().to_string()
}

fn failed_checks(output: &Output) -> Vec<String> {
    text(&output.stdout)
        .lines()
        .filter_map(|line| line.trim().strip_prefix("FAIL "))
        .map(|rest| {
            rest.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// Appends a file to the stored image's initrd, as an operator could.
fn tamper_initrd(daemon: &Daemon) {
    let initrd = walk(&daemon.state_dir().join("images"))
        .into_iter()
        .find(|file| file.file_name().is_some_and(|name| name == "initrd.img"))
        .expect("the stored initrd");
    let work = tempfile::tempdir().expect("tempdir");
    std::fs::write(work.path().join("rootkit"), "the operator was here").expect("write");
    let status = std::process::Command::new("sh")
        .current_dir(work.path())
        .arg("-c")
        .arg(format!(
            "echo rootkit | cpio --quiet -o -H newc >> '{}'",
            initrd.display()
        ))
        .status()
        .expect("cpio");
    assert!(status.success());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("readable").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn the_tenant_verifies_its_vm_and_a_third_party_checks_the_saved_evidence() {
    let daemon = host();
    let roots = daemon.sim_roots();
    let vm = boot(&daemon, "ledger", &[]);
    let evidence = tempfile::tempdir().expect("tempdir");

    // The measurement computed from the tenant's own copy of the image
    // equals the host's figure.
    let measured = daemon.hsev(
        ALICE,
        ["vm", "measure", "ledger", "--image-manifest", &manifest()],
    );
    assert!(
        measured.status.success(),
        "{}{}",
        text(&measured.stdout),
        text(&measured.stderr)
    );
    assert!(text(&measured.stdout).contains("EQUAL"));

    let accepted = attest(
        &daemon,
        "ledger",
        &[
            "--image-manifest",
            &manifest(),
            "--sim-root",
            path(&roots),
            "--evidence-out",
            path(evidence.path()),
        ],
    );
    let said = text(&accepted.stdout);
    assert_eq!(
        accepted.status.code(),
        Some(0),
        "{said}{}",
        text(&accepted.stderr)
    );
    for check in [
        "measurement",
        "report_data",
        "host_data",
        "certificate_chain",
        "signature",
    ] {
        assert!(said.contains(&format!("ok   {check}")), "{check}: {said}");
    }
    assert!(said.contains("ACCEPTED"), "{said}");

    // A third party checks the same evidence later, with the saved policy.
    let again = hsev_e2e::hsev([
        "attest",
        "verify",
        "--report",
        path(&evidence.path().join("report.bin")),
        "--cert-dir",
        path(evidence.path()),
        "--policy",
        path(&evidence.path().join("policy.toml")),
        "--sim-root",
        path(&roots),
    ]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stdout));
    let nonce = std::fs::read_to_string(evidence.path().join("nonce.hex")).expect("nonce");
    assert_eq!(nonce.trim().len(), 128);

    // Without the simulated platform's roots the evidence is not trusted.
    let untrusted = attest(&daemon, "ledger", &["--image-manifest", &manifest()]);
    assert_eq!(untrusted.status.code(), Some(1));
    assert!(failed_checks(&untrusted).contains(&"certificate_chain".to_owned()));

    // Another tenant cannot even ask.
    let other = daemon.hsev(BOB, ["vm", "attest", vm["id"].as_str().expect("id")]);
    assert_eq!(other.status.code(), Some(2), "{}", text(&other.stderr));
    assert!(
        text(&other.stderr).contains("not found"),
        "{}",
        text(&other.stderr)
    );
}

#[test]
fn a_changed_initrd_is_named_by_the_tenants_check() {
    let daemon = host();
    let roots = daemon.sim_roots();
    tamper_initrd(&daemon);
    boot(&daemon, "tampered", &[]);
    let refused = attest(
        &daemon,
        "tampered",
        &["--image-manifest", &manifest(), "--sim-root", path(&roots)],
    );
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused.stdout));
    assert_eq!(failed_checks(&refused), vec!["measurement"]);
    // The host computes from what it holds, the tenant from its own copy.
    let measured = daemon.hsev(
        ALICE,
        ["vm", "measure", "tampered", "--image-manifest", &manifest()],
    );
    assert_eq!(
        measured.status.code(),
        Some(1),
        "{}",
        text(&measured.stderr)
    );
    assert!(
        text(&measured.stdout).contains("DIFFERENT"),
        "{}",
        text(&measured.stdout)
    );
}

/// Stands in for the guest on its attestation port: moves QEMU's socket
/// away and answers every request with `answer`, as an operator with root
/// on the host can. Restores the socket when dropped.
struct FakeGuest {
    socket: PathBuf,
    moved: PathBuf,
}

impl FakeGuest {
    fn answering(socket: PathBuf, answer: String) -> FakeGuest {
        let moved = socket.with_extension("real");
        std::fs::rename(&socket, &moved).expect("the socket moves");
        let listener = UnixListener::bind(&socket).expect("the fake binds");
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(&stream);
                let mut request = String::new();
                if reader.read_line(&mut request).is_ok() {
                    let _ = (&stream).write_all(format!("{answer}\n").as_bytes());
                }
            }
        });
        FakeGuest { socket, moved }
    }
}

impl Drop for FakeGuest {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::rename(&self.moved, &self.socket);
    }
}

#[test]
fn a_replayed_report_is_refused_for_its_nonce() {
    let daemon = host();
    let roots = daemon.sim_roots();
    let vm = boot(&daemon, "replayed", &[]);
    let saved = tempfile::tempdir().expect("tempdir");
    let first = attest(
        &daemon,
        "replayed",
        &[
            "--image-manifest",
            &manifest(),
            "--sim-root",
            path(&roots),
            "--evidence-out",
            path(saved.path()),
        ],
    );
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stdout));
    let old = std::fs::read_to_string(saved.path().join("evidence.json")).expect("saved");

    let run_dir = daemon
        .state_dir()
        .join("vms")
        .join(vm["id"].as_str().expect("id"));
    {
        let _fake = FakeGuest::answering(
            run_dir.join("attest.sock"),
            format!("{{\"evidence\":{old}}}"),
        );
        let replayed = attest(
            &daemon,
            "replayed",
            &["--image-manifest", &manifest(), "--sim-root", path(&roots)],
        );
        assert_eq!(
            replayed.status.code(),
            Some(1),
            "{}",
            text(&replayed.stdout)
        );
        assert_eq!(failed_checks(&replayed), vec!["report_data"]);
    }
    // The real guest answers again once the socket is back.
    let fresh = attest(
        &daemon,
        "replayed",
        &["--image-manifest", &manifest(), "--sim-root", path(&roots)],
    );
    assert_eq!(fresh.status.code(), Some(0), "{}", text(&fresh.stdout));
}

#[test]
fn an_id_block_pins_the_launch_before_the_guest_runs() {
    let daemon = host();
    let roots = daemon.sim_roots();
    let keys = tempfile::tempdir().expect("tempdir");
    let tenant_key = keys.path().join("tenant.pem");
    let operator_key = keys.path().join("operator.pem");
    for key in [&tenant_key, &operator_key] {
        let made = hsev_e2e::hsev(["idkey", "generate", "--out", path(key)]);
        assert!(made.status.success(), "{}", text(&made.stderr));
    }
    let digest = |key: &Path| {
        let output = hsev_e2e::hsev(["idkey", "digest", path(key)]);
        text(&output.stdout).trim().to_owned()
    };
    let policy = keys.path().join("mine.toml");
    std::fs::write(
        &policy,
        format!("allowed_id_key_digests = [\"{}\"]\n", digest(&tenant_key)),
    )
    .expect("policy");

    // Signed on the tenant's side over the measurement computed there: the
    // tenant's policy trusts whatever its key signed, no measurement listed.
    let vm = boot(
        &daemon,
        "pinned",
        &[
            "--id-key",
            path(&tenant_key),
            "--image-manifest",
            &manifest(),
        ],
    );
    let signed = attest(
        &daemon,
        "pinned",
        &["--policy", path(&policy), "--sim-root", path(&roots)],
    );
    assert_eq!(signed.status.code(), Some(0), "{}", text(&signed.stdout));
    assert!(text(&signed.stdout).contains("ok   id_key"));
    let stopped = daemon.hsev(ALICE, ["vm", "stop", "pinned", "--force"]);
    assert!(stopped.status.success());

    // The operator changes the initrd: the firmware refuses the launch,
    // the guest never runs.
    tamper_initrd(&daemon);
    let refused = daemon.hsev(ALICE, ["vm", "start", "pinned"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(
        text(&refused.stderr).contains("BAD_MEASUREMENT"),
        "{}",
        text(&refused.stderr)
    );
    let shown = daemon.json(ALICE, ["vm", "show", "pinned"]);
    assert_eq!(shown["state"], "failed", "{shown}");
    let id = vm["id"].as_str().expect("id");
    assert!(daemon.vmm_pids(id).is_empty(), "no VMM runs");

    // A forged ID block (the tenant's block, the operator's key in place of
    // the tenant's, its signature left as it was), put in the store behind
    // hsevd's back: the firmware refuses it too.
    let forged = forge_id_block(&daemon, id, &operator_key);
    daemon.edit_store(&format!(
        "UPDATE vm SET spec = json_set(spec, '$.id_block.auth', '{forged}') WHERE id = '{id}'"
    ));
    let refused = daemon.hsev(ALICE, ["vm", "start", "pinned"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(
        text(&refused.stderr).contains("BAD_SIGNATURE"),
        "{}",
        text(&refused.stderr)
    );

    // The operator signs an ID block of its own over what it now boots: the
    // firmware takes it, and the tenant's check names the key.
    let tampered_measurement = tampered_measurement(&daemon);
    let block = keys.path().join("operator.block");
    let auth = keys.path().join("operator.auth");
    let signed_by_operator = hsev_e2e::hsev([
        "idblock",
        "sign",
        "--id-key",
        path(&operator_key),
        "--measurement",
        &tampered_measurement,
        "--policy",
        "0x30000",
        "--out-block",
        path(&block),
        "--out-auth",
        path(&auth),
    ]);
    assert!(
        signed_by_operator.status.success(),
        "{}",
        text(&signed_by_operator.stderr)
    );
    daemon.edit_store(&format!(
        "UPDATE vm SET spec = json_set(spec, '$.id_block.block', '{}', '$.id_block.auth', '{}') \
         WHERE id = '{id}'",
        base64(&std::fs::read(&block).expect("block")),
        base64(&std::fs::read(&auth).expect("auth"))
    ));
    let started = daemon.hsev(ADMIN, ["vm", "start", id]);
    assert!(started.status.success(), "{}", text(&started.stderr));
    daemon.wait_console(ALICE, "pinned", RESPONDER_READY, 2);
    let caught = attest(
        &daemon,
        "pinned",
        &["--policy", path(&policy), "--sim-root", path(&roots)],
    );
    assert_eq!(caught.status.code(), Some(1), "{}", text(&caught.stdout));
    assert_eq!(failed_checks(&caught), vec!["id_key"]);
}

fn base64(bytes: &[u8]) -> String {
    let output = std::process::Command::new("base64")
        .arg("-w0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().expect("stdin").write_all(bytes)?;
            child.wait_with_output()
        })
        .expect("base64 runs");
    text(&output.stdout)
}

/// The VM's stored ID_AUTH_INFO with its ID key replaced by `key`'s public
/// key in AMD's layout, base64: the signatures no longer verify.
fn forge_id_block(daemon: &Daemon, id: &str, key: &Path) -> String {
    let scratch = tempfile::tempdir().expect("tempdir");
    let block = scratch.path().join("block");
    let auth = scratch.path().join("auth");
    // Any signature over any block gives the operator's key in the layout.
    let signed = hsev_e2e::hsev([
        "idblock",
        "sign",
        "--id-key",
        path(key),
        "--measurement",
        &"00".repeat(48),
        "--policy",
        "0x30000",
        "--out-block",
        path(&block),
        "--out-auth",
        path(&auth),
    ]);
    assert!(signed.status.success(), "{}", text(&signed.stderr));
    let operator_auth = std::fs::read(&auth).expect("auth");
    let connection =
        rusqlite::Connection::open(daemon.state_dir().join("hsevd.db")).expect("the store opens");
    let stored: String = connection
        .query_row(
            "SELECT json_extract(spec, '$.id_block.auth') FROM vm WHERE id = ?1",
            [id],
            |row| row.get(0),
        )
        .expect("an ID block is stored");
    let mut tenant_auth = decode_base64(&stored);
    // ID_KEY lives at 0x240..0x644 of ID_AUTH_INFO.
    tenant_auth[0x240..0x644].copy_from_slice(&operator_auth[0x240..0x644]);
    base64(&tenant_auth)
}

fn decode_base64(text: &str) -> Vec<u8> {
    let output = std::process::Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())?;
            child.wait_with_output()
        })
        .expect("base64 runs");
    output.stdout
}

/// What the VM measures now that the initrd was changed, as the operator
/// computes it (`hsev measure` over the stored artifacts).
fn tampered_measurement(daemon: &Daemon) -> String {
    let images = daemon.state_dir().join("images");
    let dir = walk(&images)
        .into_iter()
        .find(|file| file.file_name().is_some_and(|name| name == "initrd.img"))
        .and_then(|initrd| initrd.parent().map(Path::to_path_buf))
        .expect("the stored image");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest"))
            .expect("json");
    let output = hsev_e2e::hsev([
        "measure",
        "--mode",
        "snp",
        "--vcpus",
        "1",
        "--vcpu-type",
        "EPYC-v4",
        "--ovmf",
        path(&dir.join("firmware.fd")),
        "--kernel",
        path(&dir.join("vmlinuz")),
        "--initrd",
        path(&dir.join("initrd.img")),
        "--append",
        manifest["cmdline"].as_str().expect("cmdline"),
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    text(&output.stdout).trim().to_owned()
}
