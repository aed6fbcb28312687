//! Key releases per second through the real `hsev-kbs` binary on loopback,
//! over HTTPS pinned by its key (each client keeps its connection, as the
//! agent's does): each release is the whole RCAR flow (auth, ephemeral P-256
//! key, evidence from the simulated Secure Processor signed for that nonce,
//! attest, resource, decrypt), N client threads at once for BENCH_SECONDS.
//! Then a sequential run gives the latency of one release.
//!
//! As a tenant's broker runs: admin tokens scoped per tenant (each
//! tenant's policy put with its own token, one resource per repository),
//! and a release policy that requires an ID block signed by the tenant's
//! ID key (P-384) besides the measurement and the host_data binding; the
//! guest is launched with that ID block.
//!
//! Prints `kbs_releases_per_second N`, `kbs_release_p50_ms X`,
//! `kbs_release_p99_ms Y`, `kbs_cpu_ms_per_release Z`: the CPU time
//! (broker + clients, simulated Secure Processor included) one release
//! costs in the concurrent run, and `kbs_broker_cpu_ms_per_release B`, the
//! broker's share: figures other load on the machine does not skew.

#[path = "../tests/support/kbs.rs"]
mod kbs_support;

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsev_attestation::firmware::simulated::SimulatedFirmware;
use hsev_attestation::firmware::LaunchFinish;
use hsev_attestation::id_block::{public_key_digest, IdBlock, SignedIdBlock};
use hsev_attestation::kbs::client::{KbsClient, KeyAlgorithm, ResourcePath};
use hsev_attestation::policy::AppraisalPolicy;
use hsev_attestation::HexBytes;
use kbs_support::{admin_client, evidence, guest_client, Kbs, KbsMode, SimPlatform, GUEST_POLICY};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds (user + system) process `pid` has used so far.
fn cpu_seconds(pid: &str, ticks_per_second: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are
    // the 14th and 15th fields of the whole line.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / ticks_per_second
}

fn main() {
    let seconds = env_number("BENCH_SECONDS", 5);
    let threads = env_number("BENCH_THREADS", 16);
    let platform = SimPlatform::new();
    let measurement = [0x42; 48];
    let host_data = [0x07; 32];
    let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::SECP384R1).expect("P-384");
    let id_key = openssl::ec::EcKey::generate(&group).expect("ID key");
    let id_block = SignedIdBlock::sign(
        IdBlock {
            launch_digest: measurement,
            family_id: [0; 16],
            image_id: [0; 16],
            guest_svn: 1,
            policy: GUEST_POLICY,
        },
        &id_key,
        None,
    )
    .expect("signed ID block");
    let guest = Arc::new(
        SimulatedFirmware::launch_with_digest(
            &platform.firmware,
            GUEST_POLICY,
            measurement,
            &LaunchFinish {
                id_block: Some(id_block),
                host_data,
            },
        )
        .expect("launch with the ID block"),
    );
    let server = Kbs::start_with(KbsMode::Development, &[platform.dir.path()], "");

    let admin = admin_client(&server, "bench");
    admin
        .put_reference_values("bench", "bench", &[measurement])
        .expect("reference values");
    let path: ResourcePath = "bench/disk-key/vm-1".parse().expect("path");
    let policy = AppraisalPolicy {
        allow_simulated: true,
        host_data: Some(HexBytes(host_data)),
        allowed_id_key_digests: vec![HexBytes(public_key_digest(&id_key).expect("digest"))],
        ..AppraisalPolicy::default()
    };
    let secret = [0x5a; 32];
    admin
        .put_resource(
            &path,
            Some(&secret),
            &policy.clone().into(),
            &["bench".to_owned()],
        )
        .expect("resource");
    // The other tenants' resources, each put with its own scoped token.
    let mut tenants = 1;
    for repository in hsev_e2e::kbs::TENANTS
        .iter()
        .filter(|name| **name != "bench")
    {
        admin_client(&server, repository)
            .put_resource(
                &format!("{repository}/disk-key/vm-1").parse().expect("path"),
                None,
                &policy.clone().into(),
                &[],
            )
            .expect("another tenant's resource");
        tenants += 1;
    }
    println!(
        "kbs_setup https=pinned tenants={tenants} scoped_tokens=yes id_key_policy=p384 \
         host_data_binding=yes"
    );

    let release = |client: &KbsClient| {
        let released = client
            .fetch_resource(&path, KeyAlgorithm::EcdhEsA256kwP256, &mut |binding| {
                evidence(&guest, binding)
            })
            .expect("released");
        assert_eq!(released.as_slice(), secret);
    };

    // Warm up (chain cache, connections).
    let warm = guest_client(&server);
    for _ in 0..20 {
        release(&warm);
    }

    let ticks_per_second: f64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0);
    let server_pid = server.pid().to_string();
    // Every client pins the broker's key, read once.
    let url = server.url();
    let pin = kbs_support::pin(&server);
    let broker_before = cpu_seconds(&server_pid, ticks_per_second);
    let cpu_before = cpu_seconds("self", ticks_per_second) + broker_before;
    let releases = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let client = KbsClient::new(&url, pin, Duration::from_secs(30)).expect("client");
                while Instant::now() < deadline {
                    release(&client);
                    releases.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let released = releases.load(Ordering::Relaxed) as f64;
    let rate = released / started.elapsed().as_secs_f64();
    let broker_cpu = cpu_seconds(&server_pid, ticks_per_second) - broker_before;
    let cpu = cpu_seconds("self", ticks_per_second) + broker_cpu + broker_before - cpu_before;
    println!("kbs_releases_per_second {rate:.1}");
    println!(
        "kbs_cpu_ms_per_release {:.2}",
        1000.0 * cpu / released.max(1.0)
    );
    println!(
        "kbs_broker_cpu_ms_per_release {:.2}",
        1000.0 * broker_cpu / released.max(1.0)
    );

    let mut latencies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(seconds.div_ceil(2).max(1));
    while Instant::now() < deadline || latencies.len() < 100 {
        let began = Instant::now();
        release(&warm);
        latencies.push(began.elapsed());
    }
    latencies.sort();
    let percentile = |fraction: f64| {
        let index =
            ((latencies.len() as f64 * fraction).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[index].as_secs_f64() * 1000.0
    };
    println!("kbs_release_p50_ms {:.2}", percentile(0.50));
    println!("kbs_release_p99_ms {:.2}", percentile(0.99));
}
