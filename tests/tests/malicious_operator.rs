//! The operator of the hosts, root on them, against a tenant's encrypted
//! disk: the real hsevd, the tenant's real hsev-kbs over HTTPS, real QEMU
//! guests (TCG) under the simulated Secure Processor running the real
//! agent. The test plays the operator:
//!
//! - it stands in for the tenant's broker on the guest's network, with a
//!   broker (and certificate) of its own holding a key it knows: the agent
//!   refuses it, naming both keys, and formats nothing;
//! - it uses its own broker credential to read the key or change the
//!   policy: refused;
//! - it reads the disk image, its own state folder and logs once the guest
//!   wrote to the disk: ciphertext only, and the key (read back from the
//!   tenant's broker by its owner) appears nowhere;
//! - it points the guest at another broker address through the command
//!   line: the measurement changes, the tenant's broker refuses, and the
//!   tenant's own `hsev vm attest` names the measurement.
//!
//! Kernel, initrd and command-line tampering, ID blocks and replayed
//! reports are in attested_disks.rs and tenant_attest.rs.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use hsev_e2e::daemon::{image_dir, Daemon, ADMIN, ALICE};
use hsev_e2e::kbs::{Kbs, KbsMode, KBS_OPERATOR};

/// How long a guest may take from start to its agent's verdict.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(180);

/// The agent's verdicts on the console.
const VERDICTS: [&str; 3] = [
    "HSEV-DISK-UNLOCKED",
    "HSEV-KBS-REFUSED",
    "HSEV-KBS-WRONG-BROKER",
];

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn path(path: &Path) -> &str {
    path.to_str().expect("utf-8")
}

fn manifest() -> PathBuf {
    image_dir().join("manifest.json")
}

/// The tenant's broker and a host whose simulated Secure Processor it
/// trusts, with alice's VM `vault` (encrypted disk, her broker) created and
/// its policy pinned from her side; answers the VM's id.
fn tenant_vm(kbs: &Kbs, daemon: &Daemon) -> String {
    daemon.import_image();
    let guest_url = kbs.guest_url();
    let vm = daemon.json(ALICE, kbs.encrypted_vm_args("vault", &guest_url));
    kbs.pin_alice_policy(daemon, "vault", &guest_url);
    vm["id"].as_str().expect("id").to_owned()
}

fn start(daemon: &Daemon) {
    let started = daemon.json(ALICE, ["vm", "start", "vault"]);
    assert_eq!(started["state"], "running", "{started}");
}

/// Waits for the agent's verdict on the console; answers the console.
fn verdict(daemon: &Daemon) -> String {
    let deadline = Instant::now() + VERDICT_TIMEOUT;
    loop {
        let console = daemon.console(ALICE, "vault");
        if VERDICTS.iter().any(|marker| console.contains(marker)) {
            return console;
        }
        assert!(
            Instant::now() < deadline,
            "no verdict in {VERDICT_TIMEOUT:?}:\n{console}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits until hsevd shows the attestation state `state`; answers its
/// reason.
fn attestation(daemon: &Daemon, state: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let shown = daemon.json(ALICE, ["vm", "show", "vault"]);
        if shown["attestation"]["state"] == state {
            return shown["attestation"]["reason"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "attestation not {state}: {shown}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn disk(daemon: &Daemon, id: &str) -> Vec<u8> {
    std::fs::read(
        daemon
            .state_dir()
            .join("vms")
            .join(id)
            .join("disk-hsev-data.raw"),
    )
    .expect("the encrypted disk")
}

#[test]
fn a_broker_standing_in_on_the_guests_path_is_refused_naming_both_keys() {
    let mut kbs = Kbs::start(KbsMode::Development);
    let daemon = Daemon::on_platform_trusted_by("", &kbs);
    let id = tenant_vm(&kbs, &daemon);
    let tenant_pin = kbs.pin();

    // The operator takes the broker's place on the guest's network: the
    // tenant's broker is cut off, and a broker of the operator's own, with
    // its own certificate, answers at the address the guest was given. It
    // trusts the host's platform and holds, for this VM's resource, a key
    // the operator chose.
    let address = kbs.address().to_owned();
    kbs.kill_9();
    let sim = kbs.sim_dir();
    let rogue = Kbs::start_at(&[sim.as_path()], &address);
    let rogue_pin = rogue.pin();
    assert_ne!(rogue_pin, tenant_pin);
    let expected = daemon.json(ADMIN, ["vm", "show", &id])["expected_measurement"]
        .as_str()
        .expect("hex")
        .to_owned();
    let body = format!(
        r#"{{"data":"b3BlcmF0b3Iga25vd3MgdGhpcyBrZXkgMDEyMzQ1Njc=","policy":"allow_simulated = true\nallowed_measurements = [\"{expected}\"]"}}"#
    );
    let (status, answer) = rogue.curl(
        &hsev_e2e::kbs::tenant_token("alice"),
        "PUT",
        &format!("/admin/v0/resources/alice/disk-key/{id}"),
        Some(&body),
    );
    assert_eq!(status, 204, "{answer}");

    start(&daemon);
    let console = verdict(&daemon);
    let line = console
        .lines()
        .find(|line| line.contains("HSEV-KBS-WRONG-BROKER"))
        .unwrap_or_else(|| panic!("the agent did not refuse the impostor:\n{console}"));
    assert!(
        line.contains(&format!("expected={tenant_pin}"))
            && line.contains(&format!("presented={rogue_pin}")),
        "{line}"
    );
    assert!(!console.contains("HSEV-DISK-UNLOCKED"), "{console}");
    let reason = attestation(&daemon, "refused");
    assert!(
        reason.contains(&tenant_pin) && reason.contains(&rogue_pin),
        "both keys in the status: {reason}"
    );
    // The impostor got no request, and the disk holds nothing it keyed.
    let audit = std::fs::read_to_string(rogue.state_dir().join("audit.jsonl")).unwrap_or_default();
    assert!(!audit.contains("\"event\":\"auth\""), "{audit}");
    assert!(
        disk(&daemon, &id).iter().all(|&byte| byte == 0),
        "nothing formatted with the operator's key"
    );
}

/// Every file under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else if path.is_file() {
            files.push(path);
        }
    }
    files
}

/// The forms a key could take in a file or a log: its bytes, hex (either
/// case), base64 (standard and URL-safe).
fn key_forms(key: &[u8]) -> Vec<Vec<u8>> {
    let base64 = |url_safe: bool| {
        let output = std::process::Command::new("sh")
            .arg("-c")
            .arg(if url_safe {
                "base64 -w0 | tr '+/' '-_' | tr -d '='"
            } else {
                "base64 -w0"
            })
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().expect("stdin").write_all(key)?;
                child.wait_with_output()
            })
            .expect("base64 runs");
        output.stdout
    };
    vec![
        key.to_vec(),
        hex::encode(key).into_bytes(),
        hex::encode_upper(key).into_bytes(),
        base64(false),
        base64(true),
    ]
}

/// The files among `files` holding one of `forms`.
fn holding(files: &[PathBuf], forms: &[Vec<u8>]) -> Vec<String> {
    files
        .iter()
        .filter(|file| {
            let mut bytes = Vec::new();
            std::fs::File::open(file)
                .and_then(|mut opened| opened.read_to_end(&mut bytes))
                .is_ok()
                && forms.iter().any(|form| {
                    bytes
                        .windows(form.len())
                        .any(|window| window == form.as_slice())
                })
        })
        .map(|file| file.display().to_string())
        .collect()
}

#[test]
fn the_host_holds_ciphertext_only_and_never_the_key_nor_the_operator_credential_reads_it() {
    let mut kbs = Kbs::start(KbsMode::Development);
    let daemon = Daemon::on_platform_trusted_by("", &kbs);
    let id = tenant_vm(&kbs, &daemon);
    start(&daemon);
    let console = verdict(&daemon);
    assert!(
        console.contains("HSEV-DISK-UNLOCKED /mnt/data boot=1"),
        "{console}"
    );
    attestation(&daemon, "released");
    let resource = format!("alice/disk-key/{id}");

    // The operator's credential at the tenant's broker: no key, no policy.
    let route = format!("/admin/v0/resources/{resource}");
    let permissive = r#"{"policy":"allow_simulated = true\nallow_debug = true"}"#;
    for (method, target, body, status) in [
        ("GET", format!("/kbs/v0/resource/{resource}"), None, 401),
        ("GET", "/admin/v0/resources".to_owned(), None, 403),
        ("PUT", route.clone(), Some(permissive), 403),
        ("DELETE", route.clone(), None, 403),
    ] {
        let (got, answer) = kbs.curl(KBS_OPERATOR, method, &target, body);
        assert_eq!(got, status, "{method} {target}: {answer}");
    }
    let policy = kbs.resources("alice");
    assert!(
        policy.contains(&resource) && !policy.contains("allow_debug = true"),
        "{policy}"
    );

    // What the guest wrote (its boot log, this launch's measurement) is not
    // readable in the disk image the host holds.
    let stopped = daemon.json(ALICE, ["vm", "stop", "vault", "--force"]);
    assert_eq!(stopped["state"], "stopped");
    let image = disk(&daemon, &id);
    assert!(image.starts_with(b"LUKS\xba\xbe"), "a LUKS2 header");
    let measurement = daemon.json(ALICE, ["vm", "show", "vault"])["launch_digest"]
        .as_str()
        .expect("hex")
        .to_owned();
    for written in [
        format!("measurement={measurement}").into_bytes(),
        b"hsev-boot-log".to_vec(),
        b"boot=1 time=".to_vec(),
    ] {
        assert!(
            !image
                .windows(written.len())
                .any(|window| window == written.as_slice()),
            "{:?} readable in the disk image",
            text(&written)
        );
    }

    // The key, read back from the tenant's broker by its owner, is nowhere
    // in the host's state folder (store, run folders, disks, console and
    // QEMU logs), its log, or what its API shows.
    kbs.kill_9();
    let key = kbs.export(&resource).expect("the owner exports the key");
    assert_eq!(key.len(), 32);
    let forms = key_forms(&key);
    let shown = daemon.hsev(ALICE, ["vm", "show", "vault", "--output", "json"]);
    let scratch = tempfile::tempdir().expect("tempdir");
    std::fs::write(scratch.path().join("hsevd.log"), daemon.log()).expect("log copy");
    std::fs::write(scratch.path().join("vm-show.json"), &shown.stdout).expect("show copy");
    let mut files = files_under(&daemon.state_dir());
    assert!(files.len() > 5, "{files:?}");
    files.extend(files_under(scratch.path()));
    assert_eq!(
        holding(&files, &forms),
        Vec::<String>::new(),
        "the host saw the key"
    );
    // The scan finds a key where there is one.
    let planted = scratch.path().join("planted");
    std::fs::write(&planted, [b"x".as_slice(), &forms[1], b"y"].concat()).expect("planted");
    assert_eq!(
        holding(std::slice::from_ref(&planted), &forms),
        vec![planted.display().to_string()]
    );
}

/// Forwards every connection to `127.0.0.1:port` to `target`, byte for
/// byte, in threads; answers its port.
fn relay_to(target: String) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binds");
    let port = listener.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(&target) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone(), server.try_clone()),
                (server.try_clone(), client.try_clone()),
            ]
            .into_iter()
            .filter_map(|(from, to)| Some((from.ok()?, to.ok()?)))
            {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    port
}

/// Alice's `hsev vm attest`, measuring the key broker she gave the VM.
fn attest(daemon: &Daemon, kbs: &Kbs, roots: &Path) -> Output {
    let guest_url = kbs.guest_url();
    let pin = kbs.pin();
    daemon.hsev(
        ALICE,
        [
            "vm",
            "attest",
            "vault",
            "--image-manifest",
            path(&manifest()),
            "--key-broker",
            &guest_url,
            "--key-broker-pin",
            &pin,
            "--key-broker-repository",
            "alice",
            "--sim-root",
            path(roots),
        ],
    )
}

#[test]
fn a_guest_pointed_at_another_broker_measures_otherwise_and_gets_no_key() {
    let kbs = Kbs::start(KbsMode::Development);
    let daemon = Daemon::on_platform_trusted_by("", &kbs);
    let id = tenant_vm(&kbs, &daemon);
    let roots = daemon.sim_roots();

    // The operator changes the command line's broker address, behind
    // hsevd's back, to one of its own: a relay to the tenant's broker, which
    // it could swap for anything later. The pin is left alone (another one
    // would be refused by the agent, as above).
    let relay = relay_to(kbs.address().to_owned());
    daemon.edit_store(&format!(
        "UPDATE vm SET spec = json_set(spec, '$.key_broker.guest_url', 'https://10.0.2.2:{relay}') \
         WHERE id = '{id}'"
    ));
    start(&daemon);
    let console = verdict(&daemon);
    assert!(
        console.contains(&format!("key broker https://10.0.2.2:{relay}")),
        "the guest went through the operator's address:\n{console}"
    );
    assert!(console.contains("HSEV-KBS-REFUSED 401"), "{console}");
    let reason = attestation(&daemon, "refused");
    assert!(reason.contains("measurement"), "{reason}");
    // The tenant's broker said no, and wrote down why.
    let audit = std::fs::read_to_string(kbs.state_dir().join("audit.jsonl")).expect("audit");
    assert!(
        audit.contains("PolicyDeny") && !audit.contains("\"event\":\"release\""),
        "{audit}"
    );
    assert!(kbs.resources("alice").contains("\"has_data\":false"));

    // The tenant's own check names the mismatch.
    daemon.wait_console(ALICE, "vault", "answering attestation requests", 1);
    let checked = attest(&daemon, &kbs, &roots);
    let said = text(&checked.stdout);
    assert_eq!(checked.status.code(), Some(1), "{said}");
    let failed: Vec<&str> = said
        .lines()
        .filter_map(|line| line.trim().strip_prefix("FAIL "))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    assert_eq!(failed, vec!["measurement"], "{said}");
}
