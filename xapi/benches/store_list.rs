//! How long the pool store takes to list 1000 VMs, the query behind
//! `hsev vm list` (which must answer in under 50 ms end to end).
//!
//! Fills a store on disk with 1000 VMs (4 owners, 2 hosts, one disk each,
//! half of them running with a runtime record), then times 20 admin-wide
//! `list_vms` calls and prints the median as `store_list_1000_ms <N>`.

#![allow(clippy::unwrap_used)] // a benchmark: any failure is fatal anyway

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hsev_xapi::model::{
    Attestation, ConfidentialMode, DiskRecord, DiskSpec, HostRecord, ImageRecord, PortForward,
    VmId, VmRecord, VmRuntime, VmSpec, VmState,
};
use hsev_xapi::store::{Store, VmFilter};
use time::OffsetDateTime;

const VMS: usize = 1000;
const RUNS: usize = 20;

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("pool.db")).unwrap();
    let now = OffsetDateTime::now_utc();
    store.init_pool("bench").unwrap();
    for host in ["h1", "h2"] {
        store
            .upsert_host(&HostRecord {
                name: host.to_owned(),
                status: "up".to_owned(),
                capabilities_json: r#"{"snp":true,"vcpus":256,"memory_mib":1048576}"#.to_owned(),
                probed_at: now,
                address: String::new(),
                cert_fingerprint: String::new(),
            })
            .unwrap();
    }
    store
        .insert_image(&ImageRecord {
            id: "f".repeat(64),
            name: "debian-12".to_owned(),
            dir: PathBuf::from("/var/lib/hsev/images/debian-12"),
            sha256: ["firmware", "kernel", "initrd"]
                .iter()
                .map(|role| ((*role).to_owned(), "ab".repeat(32)))
                .collect(),
            cmdline: "console=ttyS0 root=/dev/vda".to_owned(),
            measured_direct_boot: true,
            size_bytes: 1 << 30,
            imported_at: now,
        })
        .unwrap();

    let fill = Instant::now();
    for n in 0..VMS {
        let (record, disk) = vm(n, now);
        store.insert_vm(&record, &[disk]).unwrap();
    }
    eprintln!(
        "filled {VMS} VMs in {:?} (one durable transaction each)",
        fill.elapsed()
    );

    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            let vms = store.list_vms(VmFilter::all()).unwrap();
            let elapsed = start.elapsed();
            assert_eq!(vms.len(), VMS);
            elapsed
        })
        .collect();
    times.sort();
    let median = times[RUNS / 2];
    eprintln!(
        "list_vms: min {:?}, median {median:?}, max {:?} over {RUNS} runs",
        times[0],
        times[RUNS - 1]
    );
    println!("store_list_1000_ms {:.3}", median.as_secs_f64() * 1000.0);
}

/// The `n`th VM: one of 4 tenants, on one of 2 hosts, with a data disk;
/// every other one running with a runtime record.
fn vm(n: usize, now: OffsetDateTime) -> (VmRecord, DiskRecord) {
    let id = VmId(format!("00000000-0000-4000-8000-{n:012}"));
    let running = n.is_multiple_of(2);
    let record = VmRecord {
        id: id.clone(),
        owner: format!("tenant{}", n % 4),
        spec: VmSpec {
            name: format!("vm-{n:05}"),
            image: "f".repeat(64),
            vcpus: 2,
            memory_mib: 2048,
            mode: ConfidentialMode::SevSnp,
            guest_policy: 0x3_0000,
            disks: vec![DiskSpec {
                name: "data".to_owned(),
                size_mib: 1024,
            }],
            port_forwards: vec![PortForward {
                host_port: 0,
                guest_port: 22,
            }],
            vcpu_type: "EPYC-v4".to_owned(),
            encrypted_disk_mib: 0,
            key_broker: None,
            id_block: None,
            placement: Default::default(),
            ha: Default::default(),
            ha_priority: 0,
            labels: std::collections::BTreeMap::new(),
        },
        state: if running {
            VmState::Running
        } else {
            VmState::Stopped
        },
        state_reason: "bench".to_owned(),
        host: if running { "h1" } else { "h2" }.to_owned(),
        expected_measurement: vec![0xab; 48],
        launch_digest: if running { vec![0xab; 48] } else { Vec::new() },
        attestation: if running {
            Attestation::Released
        } else {
            Attestation::Pending
        },
        runtime: running.then(|| VmRuntime {
            driver: "qemu".into(),
            domain: None,
            pid: 10_000 + u32::try_from(n).unwrap(),
            start_ticks: 123_456,
            qmp_socket: PathBuf::from(format!("/run/hsev/{id}/qmp.sock")),
            console_log: PathBuf::from(format!("/var/log/hsev/{id}.console")),
            sim_channel: Some(PathBuf::from(format!("/run/hsev/{id}/sp.sock"))),
            sim_launch_id: Some(n as u64),
            port_forwards: vec![PortForward {
                host_port: 40_000,
                guest_port: 22,
            }],
            agent_channel: None,
            attest_channel: None,
        }),
        created_at: now,
        updated_at: now,
    };
    let disk = DiskRecord {
        vm: id.clone(),
        name: "data".to_owned(),
        path: PathBuf::from(format!("/var/lib/hsev/vms/{id}/data.qcow2")),
        size_mib: 1024,
    };
    (record, disk)
}
