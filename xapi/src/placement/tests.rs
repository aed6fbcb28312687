use super::*;

fn host(name: &str) -> HostView {
    HostView {
        name: name.to_owned(),
        state: HostState::Up,
        labels: BTreeSet::new(),
        driver: "qemu".to_owned(),
        cpus: 8,
        memory_mib: 16384,
        sev: true,
        sev_es: true,
        snp: true,
        simulated: false,
        sev_asids: 4,
        es_snp_asids: 4,
        tcb: Some(TcbVersion {
            fmc: None,
            bootloader: 10,
            tee: 0,
            snp: 23,
            microcode: 25,
        }),
        debug_policy_allowed: false,
        shared_dir: None,
    }
}

fn snp(vcpus: u32, memory_mib: u64) -> Request {
    Request {
        mode: Some(ConfidentialMode::SevSnp),
        vcpus,
        memory_mib,
        ..Request::default()
    }
}

fn decide(request: &Request, hosts: &[(HostView, HostLoad)], policy: &PoolPolicy) -> Decision {
    let candidates: Vec<Candidate<'_>> = hosts
        .iter()
        .map(|(host, load)| Candidate {
            host,
            load,
            down: false,
        })
        .collect();
    place(request, &candidates, policy)
}

fn idle(hosts: &[&str]) -> Vec<(HostView, HostLoad)> {
    hosts
        .iter()
        .map(|name| (host(name), HostLoad::default()))
        .collect()
}

fn rejection<'a>(decision: &'a Decision, host: &str) -> &'a Rejection {
    decision
        .rejected
        .iter()
        .find(|rejection| rejection.host == host)
        .unwrap_or_else(|| panic!("{host} not rejected: {decision:?}"))
}

#[test]
fn spread_takes_the_least_loaded_host_and_pack_the_most_loaded() {
    let mut hosts = idle(&["a", "b", "c"]);
    hosts[0].1.vcpus = 8;
    hosts[1].1.vcpus = 2;
    hosts[2].1.vcpus = 16;
    let spread = decide(&snp(1, 512), &hosts, &PoolPolicy::default());
    assert_eq!(spread.chosen.as_deref(), Some("b"));
    assert_eq!(spread.fitting, 3);
    let pack = PoolPolicy {
        weigher: Weigher::Pack,
        ..PoolPolicy::default()
    };
    assert_eq!(
        decide(&snp(1, 512), &hosts, &pack).chosen.as_deref(),
        Some("c")
    );
    // Ties go to the first host, both ways.
    let even = idle(&["x", "y"]);
    assert_eq!(
        decide(&snp(1, 512), &even, &PoolPolicy::default())
            .chosen
            .as_deref(),
        Some("x")
    );
    assert_eq!(
        decide(&snp(1, 512), &even, &pack).chosen.as_deref(),
        Some("x")
    );
}

#[test]
fn a_pinned_vm_goes_to_its_host_only_if_that_host_fits() {
    let mut hosts = idle(&["a", "b"]);
    let request = Request {
        pinned: Some("b".into()),
        ..snp(1, 512)
    };
    let decision = decide(&request, &hosts, &PoolPolicy::default());
    assert_eq!(decision.chosen.as_deref(), Some("b"));
    assert_eq!(rejection(&decision, "a").filter, "pinned");
    hosts[1].0.snp = false;
    let decision = decide(&request, &hosts, &PoolPolicy::default());
    assert_eq!(decision.chosen, None, "the pin is still checked");
    assert_eq!(rejection(&decision, "b").filter, "mode");
}

#[test]
fn snp_needs_a_host_with_snp_and_simulated_hosts_need_the_pools_consent() {
    let mut hosts = idle(&["plain", "snp", "sim"]);
    hosts[0].0.snp = false;
    hosts[2].0.simulated = true;
    let decision = decide(&snp(1, 512), &hosts, &PoolPolicy::default());
    assert_eq!(decision.chosen.as_deref(), Some("snp"));
    let plain = rejection(&decision, "plain");
    assert_eq!(plain.filter, "mode");
    assert!(
        plain.detail.contains("cannot run sev-snp"),
        "{}",
        plain.detail
    );
    assert_eq!(rejection(&decision, "sim").filter, "simulated");
    let development = PoolPolicy {
        allow_simulated: true,
        ..PoolPolicy::default()
    };
    hosts[1].0.state = HostState::Maintenance;
    let decision = decide(&snp(1, 512), &hosts, &development);
    assert_eq!(decision.chosen.as_deref(), Some("sim"));
    assert!(rejection(&decision, "snp").detail.contains("maintenance"));
    // A simulated Secure Processor runs SNP only.
    let sev = Request {
        mode: Some(ConfidentialMode::Sev),
        ..snp(1, 512)
    };
    let decision = decide(&sev, &hosts[2..], &development);
    assert_eq!(decision.chosen, None);
    assert_eq!(rejection(&decision, "sim").filter, "mode");
    // Ordinary VMs go anywhere that is up.
    let ordinary = Request {
        mode: Some(ConfidentialMode::None),
        ..snp(1, 512)
    };
    assert_eq!(
        decide(&ordinary, &hosts, &PoolPolicy::default())
            .chosen
            .as_deref(),
        Some("plain")
    );
}

#[test]
fn asids_of_the_right_kind_run_out_per_host() {
    let mut hosts = idle(&["full", "free"]);
    hosts[0].1.es_snp_asids = 4;
    let decision = decide(&snp(1, 512), &hosts, &PoolPolicy::default());
    assert_eq!(decision.chosen.as_deref(), Some("free"));
    let full = rejection(&decision, "full");
    assert_eq!(full.filter, "asids");
    assert_eq!(full.detail, "all 4 SEV-ES/SNP ASIDs are held (4 in use)");
    // The SEV pool is another pool.
    let sev = Request {
        mode: Some(ConfidentialMode::Sev),
        ..snp(1, 512)
    };
    assert_eq!(
        decide(&sev, &hosts, &PoolPolicy::default())
            .chosen
            .as_deref(),
        Some("full")
    );
}

#[test]
fn tcb_floors_of_the_vm_and_of_the_pool_are_both_checked() {
    let mut hosts = idle(&["old", "new"]);
    hosts[0].0.tcb = Some(TcbVersion {
        fmc: None,
        bootloader: 9,
        tee: 0,
        snp: 21,
        microcode: 25,
    });
    let request = Request {
        minimum_tcb: MinimumTcb {
            snp: Some(22),
            ..MinimumTcb::default()
        },
        ..snp(1, 512)
    };
    let decision = decide(&request, &hosts, &PoolPolicy::default());
    assert_eq!(decision.chosen.as_deref(), Some("new"));
    assert_eq!(
        rejection(&decision, "old").detail,
        "snp 21 is below the VM's floor 22"
    );
    let pool = PoolPolicy {
        minimum_tcb: MinimumTcb {
            bootloader: Some(10),
            ..MinimumTcb::default()
        },
        ..PoolPolicy::default()
    };
    let decision = decide(&snp(1, 512), &hosts, &pool);
    assert_eq!(
        rejection(&decision, "old").detail,
        "bootloader 9 is below the pool's floor 10"
    );
    // An FMC floor binds only hosts that have one (Turin).
    let fmc = Request {
        minimum_tcb: MinimumTcb {
            fmc: Some(1),
            ..MinimumTcb::default()
        },
        ..snp(1, 512)
    };
    assert_eq!(
        decide(&fmc, &hosts[1..], &PoolPolicy::default())
            .chosen
            .as_deref(),
        Some("new")
    );
    hosts[1].0.tcb = None;
    let decision = decide(&snp(1, 512), &hosts[1..], &pool);
    assert_eq!(
        rejection(&decision, "new").detail,
        "the host reports no TCB"
    );
}

#[test]
fn capacity_counts_overcommit_and_names_the_numbers() {
    let mut hosts = idle(&["a"]);
    hosts[0].1.vcpus = 30;
    hosts[0].1.memory_mib = 16000;
    let decision = decide(&snp(4, 256), &hosts, &PoolPolicy::default());
    assert_eq!(
        rejection(&decision, "a").detail,
        "30 + 4 vCPUs > 8 CPUs x 4 overcommit = 32"
    );
    let decision = decide(&snp(2, 512), &hosts, &PoolPolicy::default());
    assert_eq!(
        rejection(&decision, "a").detail,
        "16000 + 512 MiB > 16384 MiB x 1 overcommit = 16384 MiB"
    );
    let generous = PoolPolicy {
        memory_overcommit: 1.5,
        ..PoolPolicy::default()
    };
    assert_eq!(
        decide(&snp(2, 512), &hosts, &generous).chosen.as_deref(),
        Some("a")
    );
}

#[test]
fn labels_drivers_and_affinity_groups() {
    let mut hosts = idle(&["a", "b", "c"]);
    hosts[0].0.labels.insert("zone=1".into());
    hosts[1].0.labels.insert("zone=2".into());
    hosts[1].0.driver = "libvirt".into();
    hosts[2].1.groups.insert("db".into(), 1);
    let zoned = Request {
        labels: BTreeSet::from(["zone=2".to_owned()]),
        ..snp(1, 512)
    };
    let decision = decide(&zoned, &hosts, &PoolPolicy::default());
    assert_eq!(decision.chosen.as_deref(), Some("b"));
    assert_eq!(rejection(&decision, "a").detail, "the host lacks zone=2");
    let libvirt = Request {
        driver: Some("libvirt".into()),
        ..snp(1, 512)
    };
    assert_eq!(
        decide(&libvirt, &hosts, &PoolPolicy::default())
            .chosen
            .as_deref(),
        Some("b")
    );
    let apart = Request {
        anti_affinity: Some("db".into()),
        ..snp(1, 512)
    };
    let decision = decide(&apart, &hosts, &PoolPolicy::default());
    assert_eq!(rejection(&decision, "c").filter, "anti_affinity");
    let together = Request {
        affinity: Some("db".into()),
        ..snp(1, 512)
    };
    let decision = decide(&together, &hosts, &PoolPolicy::default());
    assert_eq!(decision.chosen.as_deref(), Some("c"));
    // The first VM of a group goes anywhere.
    let first = Request {
        affinity: Some("web".into()),
        ..snp(1, 512)
    };
    assert_eq!(decide(&first, &hosts, &PoolPolicy::default()).fitting, 3);
}

#[test]
fn a_debug_policy_needs_a_host_that_allows_it() {
    let mut hosts = idle(&["strict", "lab"]);
    hosts[1].0.debug_policy_allowed = true;
    let request = Request {
        debug_policy: true,
        ..snp(1, 512)
    };
    let decision = decide(&request, &hosts, &PoolPolicy::default());
    assert_eq!(decision.chosen.as_deref(), Some("lab"));
    assert!(rejection(&decision, "strict")
        .detail
        .contains("allows debugging"));
}

#[test]
fn a_shared_pool_places_only_on_hosts_that_mount_its_folder() {
    let mut hosts = idle(&["a", "b", "c"]);
    hosts[1].0.shared_dir = Some("/srv/hsev".to_owned());
    hosts[2].0.shared_dir = Some("/mnt/other".to_owned());
    let policy = PoolPolicy {
        shared_dir: Some("/srv/hsev".to_owned()),
        ..PoolPolicy::default()
    };
    let decision = decide(&snp(1, 512), &hosts, &policy);
    assert_eq!(decision.chosen.as_deref(), Some("b"));
    assert!(rejection(&decision, "a")
        .detail
        .contains("no [pool] shared_dir"));
    assert!(rejection(&decision, "c")
        .detail
        .contains("its shared_dir is /mnt/other"));
    // A local pool minds no folder.
    let decision = decide(&snp(1, 512), &hosts, &PoolPolicy::default());
    assert_eq!(decision.chosen.as_deref(), Some("a"));
}

#[test]
fn a_refusal_lists_every_host_and_why() {
    let mut hosts = idle(&["a", "b", "c"]);
    hosts[0].0.state = HostState::Down;
    hosts[1].0.snp = false;
    hosts[2].1.es_snp_asids = 4;
    let decision = decide(&snp(1, 512), &hosts, &PoolPolicy::default());
    assert_eq!(decision.chosen, None);
    let text = decision.explain();
    assert!(
        text.starts_with("no host fits (3 hosts, every one rejected)"),
        "{text}"
    );
    for (host, filter) in [("a", "host_state"), ("b", "mode"), ("c", "asids")] {
        assert!(
            text.lines()
                .any(|line| line.contains(host) && line.contains(filter)),
            "{host} {filter}: {text}"
        );
    }
    let placed = decide(&snp(1, 512), &idle(&["x", "y"]), &PoolPolicy::default());
    assert_eq!(
        placed.explain(),
        "placed on x (2 of 2 hosts fit, weigher spread: x 3% loaded with it, next y 3%)"
    );
}

#[test]
fn placement_cost_grows_with_the_hosts_only() {
    let hosts: Vec<(HostView, HostLoad)> = (0..1000)
        .map(|index| {
            let load = HostLoad {
                vcpus: index % 20,
                groups: BTreeMap::from([(format!("group-{}", index % 50), 1)]),
                ..HostLoad::default()
            };
            (host(&format!("host-{index:04}")), load)
        })
        .collect();
    let request = Request {
        anti_affinity: Some("group-7".into()),
        ..snp(2, 1024)
    };
    let started = std::time::Instant::now();
    let rounds = 100;
    for _ in 0..rounds {
        let decision = decide(&request, &hosts, &PoolPolicy::default());
        assert_eq!(decision.fitting, 980);
    }
    let each = started.elapsed() / rounds;
    // Generous for a debug build on a busy machine; `make bench` measures.
    assert!(
        each < std::time::Duration::from_millis(50),
        "{each:?} per placement"
    );
}
