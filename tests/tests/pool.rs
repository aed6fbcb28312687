//! Pools of real hsevd hosts, one network namespace each: joining and its
//! refusals, the API through any host, placement across hosts, concurrent
//! creates on a nearly full pool, and a host that dies. Hosts run the fake
//! driver here (placement needs no guest); tests/tests/pool_guests.rs
//! boots real guests across hosts.

use std::process::Output;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hsev_e2e::daemon::{Daemon, Driver, ADMIN, ALICE};
use hsev_e2e::pool::{HostSpec, Pool, POOL_PORT};

fn fake(name: &str) -> HostSpec {
    HostSpec::new(name, Driver::Fake)
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Asserts `output` failed and said `reason`.
fn refused(output: &Output, reason: &str) -> String {
    let said = text(output);
    assert!(!output.status.success(), "not refused: {said}");
    assert!(said.contains(reason), "no {reason:?} in: {said}");
    said
}

/// `hsev vm create NAME` with `args`, through `via`: a small VM (1 vCPU,
/// 256 MiB, no memory protection) unless `args` says otherwise.
fn create(via: &Daemon, name: &str, args: &[&str]) -> Output {
    let mut all = vec!["vm", "create", name, "--image", "debian"];
    for (flag, default) in [("--vcpus", "1"), ("--memory", "256"), ("--mode", "none")] {
        if !args.contains(&flag) {
            all.extend([flag, default]);
        }
    }
    all.extend_from_slice(args);
    via.hsev(ALICE, &all)
}

/// Creates a VM and answers its JSON.
fn created(via: &Daemon, name: &str, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let output = create(via, name, &all);
    assert!(
        output.status.success(),
        "vm create {name}: {}",
        text(&output)
    );
    serde_json::from_slice(&output.stdout).expect("vm create prints JSON")
}

/// The host a VM is on.
fn host_of(pool: &Pool, vm: &str) -> String {
    pool.coordinator().json(ADMIN, ["vm", "show", vm])["host"]
        .as_str()
        .expect("a host")
        .to_owned()
}

/// A token with its JSON body changed by `edit`.
fn edit_token(token: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let body = token.strip_prefix("hsev-join-").expect("a join token");
    let mut json: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).expect("base64url")).expect("JSON");
    edit(&mut json);
    format!(
        "hsev-join-{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&json).expect("JSON"))
    )
}

fn host_names(pool: &Pool) -> Vec<String> {
    pool.hosts_json()
        .iter()
        .filter_map(|host| host["name"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn hosts_join_serve_the_api_anywhere_and_are_ejected() {
    let pool = Pool::start(
        &[fake("h1"), fake("h2").labels(&["zone=b"]), fake("h3")],
        "",
    );
    let hosts = pool.hosts_json();
    assert_eq!(host_names(&pool), ["h1", "h2", "h3"]);
    for (host, daemon) in hosts.iter().zip(&pool.hosts) {
        assert_eq!(host["status"], "up", "{host}");
        assert_eq!(host["coordinator"], host["name"] == "h1", "{host}");
        assert_eq!(
            host["address"],
            format!("{}:{POOL_PORT}", daemon.net_host().address)
        );
    }
    assert_eq!(hosts[1]["labels"], serde_json::json!(["zone=b"]));
    pool.coordinator().import_image();

    // Any host serves the API: h2 forwards to the coordinator.
    let via_member = pool.host("h2").json(ADMIN, ["host", "list"]);
    assert_eq!(via_member.as_array().map(Vec::len), Some(3));
    let vm = created(pool.host("h2"), "pinned", &["--host", "h3", "--start"]);
    assert_eq!(vm["host"], "h3");
    assert!(
        vm["placement"]
            .as_str()
            .is_some_and(|why| why.starts_with("placed on h3")),
        "{vm}"
    );

    // A host holding VMs is not ejected; the refusal lists them.
    let output = pool.coordinator().hsev(ADMIN, ["host", "eject", "h3"]);
    refused(&output, "pinned");
    assert_eq!(host_names(&pool).len(), 3);

    let output = pool.coordinator().hsev(ALICE, ["vm", "delete", "pinned"]);
    assert!(output.status.success(), "{}", text(&output));
    let output = pool.coordinator().hsev(ADMIN, ["host", "eject", "h3"]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(host_names(&pool), ["h1", "h2"]);

    // The ejected host's certificate no longer opens the pool.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pool
        .host("h3")
        .log()
        .contains("h3 is not a member of this pool")
    {
        assert!(
            Instant::now() < deadline,
            "h3 was not refused: {}",
            pool.host("h3").log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    refused(&create(pool.coordinator(), "late", &["--host", "h3"]), "h3");
}

#[test]
fn bad_joins_are_refused_and_change_nothing() {
    let mut pool = Pool::start(&[fake("h1"), fake("h2")], "");
    let good = pool.join_token();
    let mut candidate = pool.new_host(&fake("h3"));

    let forged = edit_token(&good, |token| {
        token["secret"] = STANDARD.encode([7u8; 32]).into();
    });
    refused(
        &candidate.hsevd(["join", &forged]),
        "not one this pool issued",
    );
    let wrong_ca = edit_token(&good, |token| {
        token["ca"] = format!("sha256:{}", "ab".repeat(32)).into();
    });
    refused(
        &candidate.hsevd(["join", &wrong_ca]),
        "presents no CA with the join token's fingerprint",
    );
    let short = pool
        .coordinator()
        .json(ADMIN, ["pool", "join-token", "create", "--ttl", "1s"]);
    std::thread::sleep(Duration::from_secs(2));
    refused(
        &candidate.hsevd(["join", short["token"].as_str().expect("a token")]),
        "expired",
    );
    let duplicate = pool.new_host(&fake("h2"));
    refused(&duplicate.hsevd(["join", &good]), "already in the pool");
    refused(&candidate.hsevd(["join", "hsev-join-%%%"]), "damaged");

    // Nothing was recorded: no host, no membership, the token still unused.
    assert_eq!(host_names(&pool), ["h1", "h2"]);
    for refused_host in [&candidate, &duplicate] {
        assert!(!refused_host.state_dir().join("pool/member.json").exists());
    }
    let output = candidate.hsevd(["join", &good]);
    assert!(output.status.success(), "{}", text(&output));
    candidate.run();
    pool.wait_hosts_up(3);
    let late = pool.new_host(&fake("h4"));
    refused(&late.hsevd(["join", &good]), "already used (by host h3)");

    // A host whose certificate another pool's CA signed is not let in,
    // even when it trusts this pool's CA.
    let mut other_pool = pool.new_host(&fake("b1"));
    other_pool.run();
    let mut stranger = pool.new_host(&fake("b2"));
    let token = hsev_e2e::pool::join_token(&other_pool);
    let output = stranger.hsevd(["join", &token]);
    assert!(output.status.success(), "{}", text(&output));
    let pool_dir = stranger.state_dir().join("pool");
    std::fs::copy(
        pool.coordinator().state_dir().join("pool/ca.pem"),
        pool_dir.join("ca.pem"),
    )
    .expect("the CA copied");
    let member = std::fs::read_to_string(pool_dir.join("member.json")).expect("member.json");
    let mut member: serde_json::Value = serde_json::from_str(&member).expect("JSON");
    member["coordinator"] = format!("{}:{POOL_PORT}", pool.coordinator().net_host().address).into();
    std::fs::write(pool_dir.join("member.json"), member.to_string()).expect("written");
    stranger.run();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stranger.log().contains("the coordinator does not answer") {
        assert!(Instant::now() < deadline, "{}", stranger.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(host_names(&pool), ["h1", "h2", "h3"]);
}

#[test]
fn placement_spreads_pins_and_keeps_groups_apart() {
    let pool = Pool::start(&[fake("h1"), fake("h2"), fake("h3").labels(&["gpu"])], "");
    pool.coordinator().import_image();
    let via = pool.coordinator();

    let mut spread: Vec<String> = (1..=3)
        .map(|index| {
            created(via, &format!("web{index}"), &["--anti-affinity", "web"])["host"]
                .as_str()
                .expect("a host")
                .to_owned()
        })
        .collect();
    spread.sort();
    assert_eq!(spread, ["h1", "h2", "h3"], "spread, one per host");
    let said = refused(
        &create(via, "web4", &["--anti-affinity", "web"]),
        "no host fits (3 hosts, every one rejected)",
    );
    assert_eq!(said.matches("anti_affinity").count(), 3, "{said}");

    // Spread: the next VM goes to the least loaded host.
    created(via, "big", &["--host", "h1", "--memory", "65536"]);
    let next = created(via, "next", &[]);
    assert_ne!(next["host"], "h1", "{next}");

    // A label and a pin, both still filtered.
    assert_eq!(created(via, "gpu", &["--host-label", "gpu"])["host"], "h3");
    let said = refused(
        &create(via, "nogpu", &["--host", "h1", "--host-label", "gpu"]),
        "no host fits",
    );
    assert!(said.contains("h1") && said.contains("lacks gpu"), "{said}");

    // Affinity: with its group.
    created(via, "db1", &["--host", "h2", "--affinity", "db"]);
    assert_eq!(created(via, "db2", &["--affinity", "db"])["host"], "h2");

    // The decision is kept with the VM.
    let shown = via.json(ALICE, ["vm", "show", "next"]);
    let why = shown["placement"].as_str().expect("placement");
    assert!(why.contains("weigher spread"), "{why}");
    assert_eq!(host_of(&pool, "gpu"), "h3");
}

#[test]
fn confidential_placement_follows_modes_asids_and_the_tcb_floor() {
    let pool = Pool::start(
        &[
            fake("h1"),
            fake("h2").sim(&["--asids", "1"]),
            fake("h3").without_sev(),
            fake("h4").sim(&["--tcb", "bl=10,tee=0,snp=15,ucode=25"]),
        ],
        "[placement.minimum_tcb]\nsnp = 20\n",
    );
    pool.coordinator().import_image();
    let via = pool.coordinator();
    let snp = ["--mode", "sev-snp"];

    // The host without SEV refuses an SNP VM, with the reason.
    let said = refused(
        &create(via, "snp0", &[&snp[..], &["--host", "h3"]].concat()),
        "no host fits",
    );
    assert!(said.contains("cannot run sev-snp guests"), "{said}");
    // The host below the pool's TCB floor too, with the numbers.
    let said = refused(
        &create(via, "snp0", &[&snp[..], &["--host", "h4"]].concat()),
        "no host fits",
    );
    assert!(
        said.contains("tcb") && said.contains("15") && said.contains("20"),
        "{said}"
    );

    // h1 (16 ASIDs) and h2 (one) take the first two; h2's one held, the
    // third goes back to h1.
    let first = created(via, "snp1", &snp);
    let second = created(via, "snp2", &snp);
    let mut both = [first["host"].clone(), second["host"].clone()];
    both.sort_by_key(|host| host.to_string());
    assert_eq!(both, ["h1", "h2"]);
    let third = created(via, "snp3", &[&snp[..], &["--explain"]].concat());
    assert_eq!(third["host"], "h1");
    let why = third["placement"].as_str().expect("placement");
    for expected in [
        "h2",
        "asids",
        "all 1 SEV-ES/SNP ASIDs are held",
        "h3",
        "mode",
        "h4",
        "tcb",
    ] {
        assert!(why.contains(expected), "no {expected:?} in:\n{why}");
    }
    // A VM that asks nothing confidential still fits everywhere.
    let plain = created(via, "plain", &["--host", "h3"]);
    assert_eq!(plain["host"], "h3");
}

#[test]
fn twenty_concurrent_creates_on_a_nearly_full_pool_never_overbook() {
    // 4 + 4 + 2 ASIDs: ten SNP VMs fit, and 20 ask at once.
    let pool = Pool::start(
        &[
            fake("h1").sim(&["--asids", "4"]),
            fake("h2").sim(&["--asids", "4"]),
            fake("h3").sim(&["--asids", "2"]),
        ],
        "",
    );
    pool.coordinator().import_image();
    let outcomes: Vec<Output> = std::thread::scope(|scope| {
        let creates: Vec<_> = (0..20)
            .map(|index| {
                let via = &pool.hosts[index % 3];
                scope.spawn(move || {
                    create(
                        via,
                        &format!("c{index}"),
                        &["--mode", "sev-snp", "--output", "json"],
                    )
                })
            })
            .collect();
        creates
            .into_iter()
            .map(|create| create.join().expect("the create thread"))
            .collect()
    });
    let placed: Vec<serde_json::Value> = outcomes
        .iter()
        .filter(|output| output.status.success())
        .map(|output| serde_json::from_slice(&output.stdout).expect("JSON"))
        .collect();
    let failures: Vec<String> = outcomes
        .iter()
        .filter(|output| !output.status.success())
        .map(text)
        .collect();
    assert_eq!(
        placed.len(),
        10,
        "exactly the ten ASIDs are booked; refusals: {failures:#?}"
    );
    for output in outcomes.iter().filter(|output| !output.status.success()) {
        refused(output, "ASIDs are held");
    }
    for (host, asids) in [("h1", 4), ("h2", 4), ("h3", 2)] {
        let on_host = placed.iter().filter(|vm| vm["host"] == host).count();
        assert_eq!(on_host, asids, "{host}");
    }
    for host in pool.hosts_json() {
        let cpus = host["capabilities"]["cpus"].as_u64().expect("cpus");
        let allocated = host["vcpus_allocated"].as_u64().expect("vcpus");
        assert!(allocated <= cpus * 4, "{host}");
    }
}

#[test]
fn a_killed_host_is_down_and_its_vms_unknown() {
    let mut pool = Pool::start(&[fake("h1"), fake("h2")], "");
    pool.coordinator().import_image();
    let vm = created(pool.coordinator(), "lost", &["--host", "h2", "--start"]);
    assert_eq!(vm["state"], "running", "{vm}");
    pool.host_mut("h2").kill_9();
    let hosts = pool.wait_hosts(|hosts| hosts.iter().any(|host| host["status"] == "down"));
    let h2 = hosts.iter().find(|host| host["name"] == "h2").expect("h2");
    assert_eq!(h2["status"], "down", "{h2}");
    assert!(
        h2["status_reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("not heard from")),
        "{h2}"
    );
    let shown = pool.coordinator().json(ALICE, ["vm", "show", "lost"]);
    assert_eq!(shown["state"], "unknown", "{shown}");
    let reason = shown["state_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("h2") && reason.contains("down"), "{shown}");
    // Nothing new lands on it.
    let said = refused(
        &create(pool.coordinator(), "after", &["--host", "h2"]),
        "no host fits",
    );
    assert!(said.contains("host_state"), "{said}");
}

/// The files of `vm`'s run folder on `host` (empty when it has none).
fn files_of(host: &Daemon, vm_id: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(host.state_dir().join("vms").join(vm_id))
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// SHA-256 of a file, hex.
fn sha256_file(path: &std::path::Path) -> String {
    let output = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum runs");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("no digest of {}", path.display()))
        .to_owned()
}

/// The data disk of VM `id` on `host` (local storage).
fn data_disk(host: &Daemon, id: &str) -> std::path::PathBuf {
    host.state_dir()
        .join("vms")
        .join(id)
        .join("disk-data.qcow2")
}

/// Writes `marker` at a few places of the disk file at `path`, up to 700 MiB
/// in.
fn mark_disk(path: &std::path::Path, marker: &[u8]) {
    mark_disk_at(path, marker, &[0, 100 << 20, 700 << 20]);
}

/// Writes `marker` at each of `offsets` in the disk file at `path`.
fn mark_disk_at(path: &std::path::Path, marker: &[u8], offsets: &[u64]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    for &at in offsets {
        file.seek(SeekFrom::Start(at)).expect("seek");
        file.write_all(marker).expect("write");
    }
}

#[test]
fn a_migration_cut_by_the_coordinators_and_the_targets_deaths_leaves_the_vm_in_one_place() {
    let mut pool = Pool::start(&[fake("h1"), fake("h2"), fake("h3")], "");
    pool.coordinator().import_image();
    let vm = created(
        pool.coordinator(),
        "mover",
        &["--host", "h2", "--disk", "data:768", "--start"],
    );
    let id = vm["id"].as_str().expect("id").to_owned();
    let disk = data_disk(pool.host("h2"), &id);
    mark_disk(&disk, b"the tenant's data, before the move");
    let before = sha256_file(&disk);

    // The move starts; once the target holds part of the disk, the
    // coordinator and the target die.
    let migrate = pool
        .coordinator()
        .hsev_command(ADMIN, ["vm", "migrate", "mover", "--to", "h3"])
        .spawn()
        .expect("hsev vm migrate starts");
    let partial = pool
        .host("h3")
        .state_dir()
        .join("vms")
        .join(&id)
        .join("disk-data.partial");
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::metadata(&partial).map_or(0, |metadata| metadata.len()) < 32 << 20 {
        assert!(
            Instant::now() < deadline,
            "the copy never started: {}",
            pool.coordinator().log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    pool.host_mut("h1").kill_9();
    pool.host_mut("h3").kill_9();
    let _ = migrate.wait_with_output();

    // Back up, the coordinator resolves the interrupted move: the VM runs
    // again on exactly one host, its disk whole there, nothing left on the
    // other.
    pool.host_mut("h3").restart();
    pool.host_mut("h1").restart();
    pool.wait_hosts_up(3);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (home, other) = loop {
        let shown = pool.coordinator().json(ALICE, ["vm", "show", "mover"]);
        let home = shown["host"].as_str().expect("a host").to_owned();
        let other = if home == "h2" { "h3" } else { "h2" };
        if shown["state"] == "running" && files_of(pool.host(other), &id).is_empty() {
            break (home, other.to_owned());
        }
        assert!(
            Instant::now() < deadline,
            "not resolved: {shown}\non h2: {:?}\non h3: {:?}\n{}",
            files_of(pool.host("h2"), &id),
            files_of(pool.host("h3"), &id),
            pool.coordinator().log()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(home, "h2", "the copy was cut before the commit point");
    let disk = data_disk(pool.host(&home), &id);
    assert_eq!(sha256_file(&disk), before, "the disk on {home} is whole");
    assert!(files_of(pool.host(&other), &id).is_empty());

    // And the move, tried again, goes through whole.
    let output = pool
        .coordinator()
        .hsev(ADMIN, ["vm", "migrate", "mover", "--to", "h3"]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(host_of(&pool, "mover"), "h3");
    let moved = data_disk(pool.host("h3"), &id);
    assert_eq!(sha256_file(&moved), before);
    assert!(files_of(pool.host("h2"), &id).is_empty());

    // A VM on the coordinator's own host moves off it the same way: the
    // target fetches the disk from the host agent beside the coordinator.
    let vm = created(
        pool.coordinator(),
        "homebody",
        &["--host", "h1", "--disk", "data:64"],
    );
    let id = vm["id"].as_str().expect("id").to_owned();
    let disk = data_disk(pool.host("h1"), &id);
    mark_disk_at(&disk, b"written on the coordinator's host", &[0, 32 << 20]);
    let before = sha256_file(&disk);
    let output = pool
        .coordinator()
        .hsev(ADMIN, ["vm", "migrate", "homebody", "--to", "h2"]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(host_of(&pool, "homebody"), "h2");
    let moved = data_disk(pool.host("h2"), &id);
    assert_eq!(sha256_file(&moved), before);
    assert!(files_of(pool.host("h1"), &id).is_empty());
}

#[test]
fn a_shared_pool_moves_no_data_and_places_only_where_its_folder_is() {
    let shared = tempfile::tempdir().expect("the shared folder");
    let keys = format!(
        "storage = \"shared\"\nshared_dir = \"{}\"\n",
        shared.path().display()
    );
    let member_keys = format!("shared_dir = \"{}\"\n", shared.path().display());
    let pool = Pool::start(
        &[
            fake("h1").pool_keys(&keys),
            fake("h2").pool_keys(&member_keys),
            fake("h3"),
        ],
        "",
    );
    pool.coordinator().import_image();
    let vm = created(
        pool.coordinator(),
        "shared",
        &["--host", "h1", "--disk", "data:512", "--start"],
    );
    let id = vm["id"].as_str().expect("id").to_owned();
    let disk = shared.path().join(&id).join("disk-data.qcow2");
    mark_disk(&disk, b"one copy, every host");
    let before = sha256_file(&disk);
    let inode = |path: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).expect("the disk").ino()
    };
    let first_inode = inode(&disk);

    let output = pool
        .coordinator()
        .hsev(ADMIN, ["vm", "migrate", "shared", "--to", "h2"]);
    let said = text(&output);
    assert!(output.status.success(), "{said}");
    assert!(!said.contains("copying"), "nothing is copied: {said}");
    assert_eq!(host_of(&pool, "shared"), "h2");
    assert_eq!(inode(&disk), first_inode, "the same file");
    assert_eq!(sha256_file(&disk), before);
    assert!(
        files_of(pool.host("h1"), &id).is_empty(),
        "h1's run folder goes"
    );

    // h3 does not mount the folder: placement says so.
    let said = refused(
        &create(pool.coordinator(), "elsewhere", &["--host", "h3"]),
        "no host fits",
    );
    assert!(
        said.contains("storage") && said.contains("no [pool] shared_dir"),
        "{said}"
    );

    // Deleting the VM removes its disk from the shared folder.
    let output = pool.coordinator().hsev(ALICE, ["vm", "delete", "shared"]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(!disk.exists());
}
