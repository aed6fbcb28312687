//! Placement: which host of the pool a VM goes to, and why every other host
//! was not chosen.
//!
//! A pure function of the request, the hosts and what is already allocated
//! on them ([`place`]): filters reject hosts, each rejection naming the
//! filter and the numbers that failed it; a weigher orders the hosts left.
//! It owns the rules and their explanations, and must never read the store,
//! reserve anything or talk to a host: the coordinator calls it under its
//! allocation lock and records the decision with the reservation.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use hsev_attestation::policy::MinimumTcb;
use hsev_attestation::report::TcbVersion;
use serde::{Deserialize, Serialize};

use crate::model::ConfidentialMode;

#[cfg(test)]
mod tests;

/// Where a host stands in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    /// Takes new VMs.
    Up,
    /// Runs what it has, takes nothing new (`hsev host disable`).
    Disabled,
    /// Being emptied or empty for maintenance.
    Maintenance,
    /// Not heard from: its VMs' state is unknown.
    Down,
}

impl fmt::Display for HostState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostState::Up => "up",
            HostState::Disabled => "disabled",
            HostState::Maintenance => "in maintenance",
            HostState::Down => "down",
        })
    }
}

/// What a host can run, as placement needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: HostState,
    /// Its labels (`zone=a`, `gpu`, ...).
    pub labels: BTreeSet<String>,
    /// Its hypervisor driver (`qemu`, `libvirt`, `fake`).
    pub driver: String,
    /// CPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Runs SEV guests.
    pub sev: bool,
    /// Runs SEV-ES guests.
    pub sev_es: bool,
    /// Runs SEV-SNP guests.
    pub snp: bool,
    /// Its Secure Processor is simulated (no confidentiality).
    pub simulated: bool,
    /// ASIDs of the SEV pool (plain SEV guests).
    pub sev_asids: u32,
    /// ASIDs of the SEV-ES / SNP pool.
    pub es_snp_asids: u32,
    /// The platform's reported TCB, when it has SEV.
    pub tcb: Option<TcbVersion>,
    /// The host accepts guest policies that allow debugging.
    pub debug_policy_allowed: bool,
    /// The shared folder it keeps disks in, if any.
    pub shared_dir: Option<String>,
}

/// What is already placed on a host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostLoad {
    /// vCPUs of its VMs.
    pub vcpus: u64,
    /// Memory of its VMs, MiB.
    pub memory_mib: u64,
    /// SEV ASIDs its VMs hold.
    pub sev_asids: u32,
    /// SEV-ES / SNP ASIDs its VMs hold.
    pub es_snp_asids: u32,
    /// The (anti-)affinity groups of its VMs, with how many of each.
    pub groups: BTreeMap<String, u32>,
    /// How many VMs.
    pub vms: u32,
}

/// What a VM needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// Memory protection.
    pub mode: Option<ConfidentialMode>,
    /// The guest policy allows debugging (the host could read the guest).
    pub debug_policy: bool,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// The VM's own TCB floor, per component.
    pub minimum_tcb: MinimumTcb,
    /// Labels the host must carry.
    pub labels: BTreeSet<String>,
    /// The host's driver, when the VM requires one.
    pub driver: Option<String>,
    /// Never on a host holding a VM of this group.
    pub anti_affinity: Option<String>,
    /// On a host holding a VM of this group, when any host holds one.
    pub affinity: Option<String>,
    /// Only this host (still checked by every filter).
    pub pinned: Option<String>,
    /// Hosts to leave out (the host a VM leaves when it migrates).
    pub excluded: BTreeSet<String>,
}

/// How the chosen host is picked among those that fit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weigher {
    /// The least loaded host: VMs spread over the pool.
    #[default]
    Spread,
    /// The most loaded host that fits: hosts kept empty for large VMs.
    Pack,
}

/// The pool's placement settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolPolicy {
    /// vCPUs placed per host CPU.
    pub cpu_overcommit: f64,
    /// Memory placed per MiB of host memory (confidential guests' memory is
    /// pinned: 1.0 is the safe figure).
    pub memory_overcommit: f64,
    /// Place confidential VMs on hosts whose Secure Processor is simulated
    /// (development pools only).
    pub allow_simulated: bool,
    /// The pool's TCB floor, per component.
    pub minimum_tcb: MinimumTcb,
    /// Spread or pack.
    pub weigher: Weigher,
    /// How many host failures the pool's HA plan must survive: an HA VM
    /// that would leave some other HA VM (or itself) without a host to
    /// restart on, were this many hosts to fail, is refused (XAPI's
    /// host-failures-to-tolerate). 0: no such check.
    pub ha_host_failures_to_tolerate: u32,
    /// The folder a shared pool keeps disks in, which a host must mount
    /// (`[pool] shared_dir`, not a `[placement]` key).
    #[serde(skip)]
    pub shared_dir: Option<String>,
}

impl Default for PoolPolicy {
    fn default() -> Self {
        PoolPolicy {
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            allow_simulated: false,
            minimum_tcb: MinimumTcb::default(),
            weigher: Weigher::Spread,
            ha_host_failures_to_tolerate: 0,
            shared_dir: None,
        }
    }
}

/// Why a host was not chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    /// The host.
    pub host: String,
    /// The filter that rejected it.
    pub filter: &'static str,
    /// The numbers.
    pub detail: String,
}

/// What the weigher compared: the chosen host's load with the VM, and the
/// runner-up's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Weighed {
    /// The chosen host's load with the VM.
    pub load: f64,
    /// The next best host and its load with the VM.
    pub runner_up: Option<(String, f64)>,
}

/// A placement decision and its explanation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// The chosen host, if any fits.
    pub chosen: Option<String>,
    /// How the chosen host was picked among those that fit.
    pub weigher: Weigher,
    /// How many hosts fit.
    pub fitting: usize,
    /// The chosen host's load with the VM (the larger of its CPU and
    /// memory shares, 0-1), and the next host the weigher would have
    /// picked, with its own.
    pub weighed: Option<Weighed>,
    /// Every other host and the filter that rejected it.
    pub rejected: Vec<Rejection>,
}

impl Decision {
    /// One line per host: the chosen one, then each rejection.
    pub fn explain(&self) -> String {
        let mut lines = Vec::new();
        match &self.chosen {
            Some(host) => {
                let mut line = format!(
                    "placed on {host} ({} of {} hosts fit, weigher {}",
                    self.fitting,
                    self.fitting + self.rejected.len(),
                    match self.weigher {
                        Weigher::Spread => "spread",
                        Weigher::Pack => "pack",
                    }
                );
                if let Some(weighed) = &self.weighed {
                    line.push_str(&format!(
                        ": {host} {} loaded with it",
                        percent(weighed.load)
                    ));
                    if let Some((next, load)) = &weighed.runner_up {
                        line.push_str(&format!(", next {next} {}", percent(*load)));
                    }
                }
                line.push(')');
                lines.push(line);
            }
            None => lines.push(format!(
                "no host fits ({} hosts, every one rejected)",
                self.rejected.len()
            )),
        }
        for rejection in &self.rejected {
            lines.push(format!(
                "  {:<12} {:<14} {}",
                rejection.host, rejection.filter, rejection.detail
            ));
        }
        lines.join("\n")
    }
}

/// A host with what is placed on it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// The host.
    pub host: &'a HostView,
    /// Its load.
    pub load: &'a HostLoad,
    /// Not heard from: it takes nothing, whatever its recorded state.
    pub down: bool,
}

/// Places `request` on one of `candidates` under `policy`: every filter,
/// then the weigher. Hosts are considered in the order given; ties go to
/// the first.
pub fn place(request: &Request, candidates: &[Candidate<'_>], policy: &PoolPolicy) -> Decision {
    let affinity_holders = request.affinity.as_ref().map(|group| {
        candidates
            .iter()
            .filter(|candidate| candidate.load.groups.contains_key(group))
            .count()
    });
    let mut rejected = Vec::new();
    let mut fitting: Vec<(Candidate<'_>, f64)> = Vec::new();
    for candidate in candidates {
        match filter(request, *candidate, policy, affinity_holders.unwrap_or(0)) {
            Ok(load) => fitting.push((*candidate, load)),
            Err((filter, detail)) => rejected.push(Rejection {
                host: candidate.host.name.clone(),
                filter,
                detail,
            }),
        }
    }
    let best = best_of(&fitting, policy.weigher, None);
    let weighed = best.map(|(index, load)| Weighed {
        load,
        runner_up: best_of(&fitting, policy.weigher, Some(index))
            .map(|(next, load)| (fitting[next].0.host.name.clone(), load)),
    });
    Decision {
        chosen: best.map(|(index, _)| fitting[index].0.host.name.clone()),
        weigher: policy.weigher,
        fitting: fitting.len(),
        weighed,
        rejected,
    }
}

/// The index and load of the host `weigher` picks among `fitting`, leaving
/// out `skip`; ties go to the first.
fn best_of(
    fitting: &[(Candidate<'_>, f64)],
    weigher: Weigher,
    skip: Option<usize>,
) -> Option<(usize, f64)> {
    let mut best: Option<(usize, f64)> = None;
    for (index, (_, load)) in fitting.iter().enumerate() {
        if Some(index) == skip {
            continue;
        }
        let better = match (best, weigher) {
            (None, _) => true,
            (Some((_, current)), Weigher::Spread) => *load < current,
            (Some((_, current)), Weigher::Pack) => *load > current,
        };
        if better {
            best = Some((index, *load));
        }
    }
    best
}

fn percent(load: f64) -> String {
    format!("{:.0}%", load * 100.0)
}

type Verdict = Result<f64, (&'static str, String)>;

/// Runs every filter on one host; on success, its load after the VM (the
/// larger of its CPU and memory shares, 0-1).
fn filter(
    request: &Request,
    candidate: Candidate<'_>,
    policy: &PoolPolicy,
    affinity_holders: usize,
) -> Verdict {
    let host = candidate.host;
    let load = candidate.load;
    if let Some(pinned) = &request.pinned {
        if &host.name != pinned {
            return Err(("pinned", format!("the VM is pinned to {pinned}")));
        }
    }
    if request.excluded.contains(&host.name) {
        return Err(("excluded", "the host the VM leaves".to_owned()));
    }
    let state = if candidate.down {
        HostState::Down
    } else {
        host.state
    };
    if state != HostState::Up {
        return Err(("host_state", format!("the host is {state}")));
    }
    if let Some(driver) = &request.driver {
        if &host.driver != driver {
            return Err((
                "driver",
                format!(
                    "the VM needs driver {driver}, the host runs {}",
                    host.driver
                ),
            ));
        }
    }
    let missing: Vec<&str> = request
        .labels
        .iter()
        .filter(|label| !host.labels.contains(*label))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(("labels", format!("the host lacks {}", missing.join(", "))));
    }
    if let Some(shared) = &policy.shared_dir {
        if host.shared_dir.as_ref() != Some(shared) {
            return Err((
                "storage",
                format!(
                    "the pool's disks are in the shared folder {shared}, which the host does not \
                     use ({})",
                    host.shared_dir
                        .as_deref()
                        .map_or("it has no [pool] shared_dir".to_owned(), |dir| format!(
                            "its shared_dir is {dir}"
                        ))
                ),
            ));
        }
    }
    check_mode(request, host, load, policy)?;
    if request.debug_policy && !host.debug_policy_allowed {
        return Err((
            "debug_policy",
            "the VM's guest policy allows debugging (the host could read the guest), which \
             this host forbids"
                .to_owned(),
        ));
    }
    check_tcb(request, host, policy)?;
    if let Some(group) = &request.anti_affinity {
        if load.groups.contains_key(group) {
            return Err((
                "anti_affinity",
                format!("the host already holds a VM of group {group}"),
            ));
        }
    }
    if let Some(group) = &request.affinity {
        if affinity_holders > 0 && !load.groups.contains_key(group) {
            return Err((
                "affinity",
                format!("VMs of group {group} are on other hosts"),
            ));
        }
    }
    let cpu_capacity = f64::from(host.cpus) * policy.cpu_overcommit;
    let cpus_after = (load.vcpus + u64::from(request.vcpus)) as f64;
    if cpus_after > cpu_capacity {
        return Err((
            "vcpus",
            format!(
                "{} + {} vCPUs > {} CPUs x {} overcommit = {:.0}",
                load.vcpus, request.vcpus, host.cpus, policy.cpu_overcommit, cpu_capacity
            ),
        ));
    }
    let memory_capacity = host.memory_mib as f64 * policy.memory_overcommit;
    let memory_after = (load.memory_mib + request.memory_mib) as f64;
    if memory_after > memory_capacity {
        return Err((
            "memory",
            format!(
                "{} + {} MiB > {} MiB x {} overcommit = {:.0} MiB",
                load.memory_mib,
                request.memory_mib,
                host.memory_mib,
                policy.memory_overcommit,
                memory_capacity
            ),
        ));
    }
    Ok((cpus_after / cpu_capacity).max(memory_after / memory_capacity))
}

/// The confidential mode and a free ASID of the right kind.
fn check_mode(
    request: &Request,
    host: &HostView,
    load: &HostLoad,
    policy: &PoolPolicy,
) -> Result<(), (&'static str, String)> {
    let Some(mode) = request.mode.filter(|mode| *mode != ConfidentialMode::None) else {
        return Ok(());
    };
    let supported = match mode {
        ConfidentialMode::SevSnp => host.snp,
        ConfidentialMode::SevEs => host.sev_es && !host.simulated,
        ConfidentialMode::Sev => host.sev && !host.simulated,
        ConfidentialMode::None => true,
    };
    if !supported {
        return Err((
            "mode",
            format!(
                "the host cannot run {mode} guests (SEV {}, SEV-ES {}, SNP {}{})",
                yes_no(host.sev),
                yes_no(host.sev_es),
                yes_no(host.snp),
                if host.simulated { ", simulated" } else { "" }
            ),
        ));
    }
    if host.simulated && !policy.allow_simulated {
        return Err((
            "simulated",
            "the host's Secure Processor is simulated and the pool does not allow it".to_owned(),
        ));
    }
    let (kind, total, used) = match mode {
        ConfidentialMode::Sev => ("SEV", host.sev_asids, load.sev_asids),
        _ => ("SEV-ES/SNP", host.es_snp_asids, load.es_snp_asids),
    };
    if used >= total {
        return Err((
            "asids",
            format!("all {total} {kind} ASIDs are held ({used} in use)"),
        ));
    }
    Ok(())
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

/// The VM's and the pool's TCB floors against the host's reported TCB.
fn check_tcb(
    request: &Request,
    host: &HostView,
    policy: &PoolPolicy,
) -> Result<(), (&'static str, String)> {
    let confidential = request
        .mode
        .is_some_and(|mode| mode != ConfidentialMode::None);
    if !confidential {
        return Ok(());
    }
    for (whose, floor) in [
        ("the VM's", &request.minimum_tcb),
        ("the pool's", &policy.minimum_tcb),
    ] {
        let components = [
            ("fmc", floor.fmc, host.tcb.and_then(|tcb| tcb.fmc)),
            (
                "bootloader",
                floor.bootloader,
                host.tcb.map(|tcb| tcb.bootloader),
            ),
            ("tee", floor.tee, host.tcb.map(|tcb| tcb.tee)),
            ("snp", floor.snp, host.tcb.map(|tcb| tcb.snp)),
            (
                "microcode",
                floor.microcode,
                host.tcb.map(|tcb| tcb.microcode),
            ),
        ];
        for (name, minimum, actual) in components {
            let Some(minimum) = minimum else { continue };
            // Turin's FMC: hosts of other products have none to compare.
            if name == "fmc" && actual.is_none() && host.tcb.is_some() {
                continue;
            }
            match actual {
                Some(actual) if actual >= minimum => {}
                Some(actual) => {
                    return Err((
                        "tcb",
                        format!("{name} {actual} is below {whose} floor {minimum}"),
                    ))
                }
                None => return Err(("tcb", "the host reports no TCB".to_owned())),
            }
        }
    }
    Ok(())
}
