//! Placement at scale: how long the coordinator takes to place one VM with
//! 10, 100 and 1000 hosts and 100 000 VMs in its store, and how much
//! memory it holds then.
//!
//! Each host is a real host agent on the in-process fake driver (the
//! coordinator cannot tell it from a remote one: same trait, same
//! capabilities), sharing one simulated Secure Processor. The store is
//! filled on tmpfs (each insert is its own durable transaction, and what is
//! timed is placement, not the disk). Each size times `RUNS` placements of
//! one SNP VM (the whole decision: the hosts' view under the allocation
//! lock, every filter, the weigher) and prints
//! `placement_<hosts>_p50_ms`, `placement_<hosts>_p99_ms`, and the
//! process's resident memory with the 1000-host pool,
//! `coordinator_rss_mb`.

#![allow(clippy::unwrap_used)] // a benchmark: any failure is fatal anyway

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsev_attestation::firmware::simulated::{SimInit, SimulatedFirmware};
use hsev_xapi::coordinator::{Coordinator, CoordinatorParts, StorageKind};
use hsev_xapi::daemon::metrics::Metrics;
use hsev_xapi::host_agent::{Firmware, HostAgent, HostAgentParts};
use hsev_xapi::hypervisor::fake::{FakeDriver, FakeHost};
use hsev_xapi::hypervisor::HypervisorDriver;
use hsev_xapi::model::{
    Attestation, ConfidentialMode, HostRecord, ImageRecord, VmId, VmRecord, VmSpec, VmState,
};
use hsev_xapi::placement::PoolPolicy;
use hsev_xapi::pool::HostClient;
use hsev_xapi::store::Store;
use time::OffsetDateTime;

const VMS: usize = 100_000;
const RUNS: usize = 400;
const IMAGE: &str = "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";

fn main() {
    let scratch = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let firmware = Arc::new(
        SimulatedFirmware::init(&scratch.path().join("sim"), &SimInit::default()).unwrap(),
    );
    let mut p50s = Vec::new();
    for hosts in [10, 100, 1000] {
        let dir = scratch.path().join(format!("pool-{hosts}"));
        let (coordinator, _agents) = pool(&dir, hosts, &firmware);
        let timing = Instant::now();
        let mut times = time_placements(&coordinator);
        eprintln!("{hosts} hosts: {RUNS} placements in {:?}", timing.elapsed());
        times.sort();
        let p50 = times[RUNS / 2];
        let p99 = times[RUNS * 99 / 100];
        println!("placement_{hosts}_p50_ms {:.3}", ms(p50));
        println!("placement_{hosts}_p99_ms {:.3}", ms(p99));
        p50s.push(p50);
        if hosts == 1000 {
            println!("coordinator_rss_mb {:.0}", resident_mib());
        }
    }
    println!(
        "placement_cost_ratio_1000_to_10 {:.1}",
        p50s[2].as_secs_f64() / p50s[0].as_secs_f64()
    );
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// A coordinator over `hosts` fake host agents and `VMS` VMs spread over
/// them.
fn pool(
    dir: &Path,
    hosts: usize,
    firmware: &Arc<SimulatedFirmware>,
) -> (Coordinator, Vec<Arc<HostAgent>>) {
    std::fs::create_dir_all(dir).unwrap();
    let store = Arc::new(Store::open(dir.join("pool.db")).unwrap());
    store.init_pool("bench").unwrap();
    let now = OffsetDateTime::now_utc();
    store
        .insert_image(&ImageRecord {
            id: IMAGE.to_owned(),
            name: "debian".to_owned(),
            dir: dir.join("images"),
            sha256: ["firmware", "kernel", "initrd"]
                .iter()
                .map(|role| ((*role).to_owned(), "ab".repeat(32)))
                .collect(),
            cmdline: "console=ttyS0".to_owned(),
            measured_direct_boot: true,
            size_bytes: 1 << 30,
            imported_at: now,
        })
        .unwrap();
    // The hosts' rows first (VMs name their host); attaching fills in
    // their capabilities.
    for index in 0..hosts {
        store
            .upsert_host(&HostRecord {
                name: format!("host-{index:04}"),
                status: "up".to_owned(),
                capabilities_json: "{}".to_owned(),
                probed_at: now,
                address: String::new(),
                cert_fingerprint: String::new(),
            })
            .unwrap();
    }
    let fill = Instant::now();
    for n in 0..VMS {
        store
            .insert_vm(&vm(n, &format!("host-{:04}", n % hosts), hosts, now), &[])
            .unwrap();
    }
    eprintln!("{hosts} hosts: {VMS} VMs stored in {:?}", fill.elapsed());
    let opened = Instant::now();
    let coordinator = Coordinator::new(CoordinatorParts {
        store,
        policy: PoolPolicy {
            allow_simulated: true,
            cpu_overcommit: 16.0,
            ..PoolPolicy::default()
        },
        storage: StorageKind::Local,
        default_vcpu_type: "EPYC-v4".to_owned(),
        metrics: Metrics::new(),
    })
    .unwrap();
    eprintln!(
        "{hosts} hosts: coordinator opened in {:?}",
        opened.elapsed()
    );
    let attach = Instant::now();
    let agents: Vec<Arc<HostAgent>> = (0..hosts)
        .map(|index| {
            // Large enough for 10 000 small VMs each at the smallest size.
            let driver = Arc::new(FakeDriver::new(FakeHost {
                cpus: 1024,
                memory_mib: 8 << 20,
            }));
            let driver_capabilities = driver.probe().unwrap();
            let agent = Arc::new(HostAgent::new(HostAgentParts {
                name: format!("host-{index:04}"),
                driver,
                firmware: Firmware::Simulated(Arc::clone(firmware)),
                vms_dir: dir.join("vms"),
                shared_dir: None,
                images_dir: dir.join("images"),
                allow_debug_policy: false,
                driver_capabilities,
                labels: vec![format!("zone={}", index % 3)],
            }));
            coordinator
                .attach_host(Arc::clone(&agent) as Arc<dyn HostClient>)
                .unwrap();
            agent
        })
        .collect();
    eprintln!("{hosts} hosts attached in {:?}", attach.elapsed());
    (coordinator, agents)
}

/// The `n`th stored VM, on `host`: stopped (its host still holds its
/// vCPUs, memory and ASID), the first 8 of each host SNP.
fn vm(n: usize, host: &str, hosts: usize, now: OffsetDateTime) -> VmRecord {
    let mode = if n < 8 * hosts {
        ConfidentialMode::SevSnp
    } else {
        ConfidentialMode::None
    };
    VmRecord {
        id: VmId(format!("00000000-0000-4000-8000-{n:012}")),
        owner: format!("tenant{}", n % 50),
        spec: VmSpec {
            name: format!("vm-{n:06}"),
            image: IMAGE.to_owned(),
            vcpus: 1,
            memory_mib: 512,
            mode,
            guest_policy: 0x3_0000,
            disks: Vec::new(),
            port_forwards: Vec::new(),
            vcpu_type: "EPYC-v4".to_owned(),
            encrypted_disk_mib: 0,
            key_broker: None,
            id_block: None,
            labels: Default::default(),
            placement: Default::default(),
            ha: Default::default(),
            ha_priority: 0,
        },
        state: VmState::Stopped,
        state_reason: "bench".to_owned(),
        host: host.to_owned(),
        expected_measurement: vec![0xab; 48],
        launch_digest: Vec::new(),
        attestation: Attestation::initial(mode),
        runtime: None,
        created_at: now,
        updated_at: now,
    }
}

/// `RUNS` placements of one SNP VM with a label and an anti-affinity group.
fn time_placements(coordinator: &Coordinator) -> Vec<Duration> {
    let mut spec = vm(0, "", 1, OffsetDateTime::now_utc()).spec;
    spec.name = "candidate".to_owned();
    spec.mode = ConfidentialMode::SevSnp;
    spec.placement.labels = vec!["zone=1".to_owned()];
    spec.placement.anti_affinity = Some("web".to_owned());
    (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            let decision = coordinator.plan(spec.clone()).unwrap();
            let elapsed = start.elapsed();
            assert!(decision.chosen.is_some(), "{}", decision.explain());
            elapsed
        })
        .collect()
}

/// This process's resident memory, MiB.
fn resident_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}
