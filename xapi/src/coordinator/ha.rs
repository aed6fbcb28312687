//! High availability of the pool's VMs: when a host is declared failed,
//! its HA VMs are restarted elsewhere and its other running VMs are marked
//! lost; what a VM's HA setting is; whether the pool could restart every
//! HA VM if some hosts failed (`hsev pool ha plan`).
//!
//! What it owns: the moment a silent host is declared failed, and what is
//! done with its VMs then. What it must never do: start a second instance
//! of a VM while the first may still run. It never touches a host: a
//! failed host cannot be told anything, which is why the host fences
//! itself ([`crate::pool::member::heartbeats`]).
//!
//! A host's liveness lease is its heartbeat to the coordinator, not a key
//! of its own on etcd: hosts hold a pool certificate, never etcd
//! credentials, and the one thing that may act on a host's silence, the
//! leading coordinator, is the one that hears the heartbeats. It works the
//! same on both stores; a coordinator that has just started (or just won
//! the election) counts every host as last heard from at its own start,
//! which is later than any heartbeat a previous leader heard.
//!
//! The timing argument, with `T` = `[pool] down_after_ms` (the lease TTL),
//! `F` = `fence_after_ms`, `M` = `fence_margin_ms`, `W` =
//! [`FenceTiming::WATCHDOG_PERIOD`] and `K` = [`FenceTiming::HARD_STOP`]:
//!
//! * A host's watchdog remembers `s`, when it sent the last heartbeat the
//!   coordinator answered. When `now - s > F` it hard-stops every VM it
//!   launched as HA (SIGKILL of the VMM), checking every `W`; so its HA
//!   VMs are gone by `s + F + W + K`.
//! * The coordinator remembers `r`, when it received the last heartbeat of
//!   that host (`r >= s`: the answered heartbeat was received before it
//!   was answered, and a later unanswered one only makes `r` later). It
//!   restarts that host's HA VMs no earlier than `r + T + M`.
//! * [`FenceTiming::from_config`] refuses any setting but `F <= T` and
//!   `M >= W + K + T / 10` (the last term covers the two clocks' rates and
//!   the heartbeat in flight). Then `s + F + W + K < r + T + M`: the old
//!   instance is stopped before the new one starts, whichever side of the
//!   partition is right about the other. Both sides measure durations on
//!   their own monotonic clocks; no wall clock is compared.
//! * A host that stops its HA VMs is not told to: it needs nothing from the
//!   coordinator to do it, as a hardware watchdog would.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use itertools::Itertools;

use super::migration::StorageKind;
use super::{add_load, load_of, lock, remove_load, Coordinator, HostLoad};
use crate::daemon::auth::Caller;
use crate::daemon::config::PoolConfig;
use crate::daemon::error::OpError;
use crate::model::{HaPolicy, VmRecord, VmSpec, VmState};
use crate::placement::HostState;
use crate::store::VmFilter;

/// The host status a failed host is recorded with.
pub const FAILED: &str = "failed";

/// The fencing settings, checked against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceTiming {
    /// `T`: a host not heard from this long is down.
    pub lease: Duration,
    /// `F`: a host whose heartbeats go unanswered this long fences.
    pub fence_after: Duration,
    /// `M`: how much longer than `T` the coordinator waits to restart.
    pub margin: Duration,
}

impl FenceTiming {
    /// `W`: how often a host's watchdog looks at its last answer.
    pub const WATCHDOG_PERIOD: Duration = Duration::from_millis(100);
    /// `K`: what a hard stop of a VMM (SIGKILL, then its end) is allowed.
    pub const HARD_STOP: Duration = Duration::from_millis(500);

    /// The timing of `[pool]`, refused (the key to change, and why) unless
    /// it keeps the argument above.
    pub fn from_config(pool: &PoolConfig) -> Result<Self, (&'static str, String)> {
        let fence_after_ms = pool.effective_fence_after_ms();
        let timing = FenceTiming {
            lease: Duration::from_millis(pool.down_after_ms),
            fence_after: Duration::from_millis(fence_after_ms),
            margin: Duration::from_millis(pool.fence_margin_ms),
        };
        if fence_after_ms <= pool.heartbeat_ms || timing.fence_after > timing.lease {
            return Err((
                "pool.fence_after_ms",
                format!(
                    "{fence_after_ms} must be above pool.heartbeat_ms ({}) \
                 and at most pool.down_after_ms ({}): a host must fence before the coordinator \
                 may think it down, and never while it is heard",
                    pool.heartbeat_ms, pool.down_after_ms
                ),
            ));
        }
        let least = Self::WATCHDOG_PERIOD + Self::HARD_STOP + timing.lease / 10;
        if timing.margin < least {
            return Err((
                "pool.fence_margin_ms",
                format!(
                    "{} ms is too short: a host's hard stop of its HA VMs needs {} ms beyond \
                 pool.down_after_ms ({} ms) before they may restart elsewhere",
                    pool.fence_margin_ms,
                    least.as_millis(),
                    pool.down_after_ms
                ),
            ));
        }
        Ok(timing)
    }

    /// How long a host must be silent before its HA VMs restart elsewhere.
    pub fn restart_after(&self) -> Duration {
        self.lease + self.margin
    }
}

/// What `hsev pool ha plan` answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HaPlan {
    /// How many sets of failed hosts were tried.
    pub scenarios: u32,
    /// One line per set that strands an HA VM.
    pub shortfalls: Vec<String>,
}

/// Whether a VM in this state has (or may have) a VMM on its host.
fn live(state: VmState) -> bool {
    matches!(
        state,
        VmState::Running | VmState::Starting | VmState::Stopping
    )
}

/// Higher priority first, then the oldest.
fn by_priority(vms: &mut [VmRecord]) {
    vms.sort_by_key(|vm| (Reverse(vm.spec.ha_priority), vm.created_at));
}

impl Coordinator {
    /// Sets what the pool does with a VM when its host fails; refused while
    /// it runs: its host fences only what it launched as HA.
    pub fn set_ha(
        &self,
        caller: &Caller,
        vm: &str,
        ha: HaPolicy,
        priority: i32,
    ) -> Result<VmRecord, OpError> {
        self.locked(caller, vm, |record| {
            if live(record.state) {
                return Err(OpError::precondition(format!(
                    "VM {} is {}: its HA setting changes while it is not running (its host \
                     fences what it launched as HA)",
                    record.spec.name, record.state
                )));
            }
            let mut spec = record.spec.clone();
            spec.ha = ha;
            spec.ha_priority = priority;
            self.check_ha_storage(&spec)?;
            {
                // Its host holds its load already, stopped as it is.
                let allocations = lock(&self.allocations);
                let candidate = VmRecord {
                    spec: spec.clone(),
                    ..record.clone()
                };
                self.check_ha_plan(&candidate, &allocations, true)?;
                self.store.set_vm_spec(&record.id, &spec)?;
            }
            self.event(
                &record.id,
                "ha",
                &format!("ha {} priority {priority}", ha.as_str()),
            );
            self.get(caller, &record.id.0)
        })
    }

    /// An HA VM's disks must outlive its host: with local storage they stay
    /// on a failed host, and a restart elsewhere would begin on empty ones
    /// (an encrypted disk would be formatted anew), so such a VM is refused.
    pub(super) fn check_ha_storage(&self, spec: &VmSpec) -> Result<(), OpError> {
        let mut disks: Vec<String> = spec.disks.iter().map(|disk| disk.name.clone()).collect();
        if spec.encrypted_disk_mib > 0 {
            disks.push("its encrypted disk".to_owned());
        }
        if spec.ha != HaPolicy::Restart || self.storage != StorageKind::Local || disks.is_empty() {
            return Ok(());
        }
        Err(OpError::precondition(format!(
            "VM {}: --ha restart needs its disks on storage every host reaches ([pool] storage = \
             \"shared\"): with local storage its disks ({}) would stay on a failed host and a \
             restart elsewhere would begin on empty ones",
            spec.name,
            disks.join(", ")
        )))
    }

    /// The fencing timing, when this coordinator has a pool listener.
    fn fence_timing(&self) -> Option<FenceTiming> {
        self.authority.get().map(|authority| authority.fence)
    }

    /// Declares failed every remote host silent for longer than its lease
    /// and the fence margin, and deals with its VMs. Run periodically.
    pub fn check_hosts(&self) {
        let Some(timing) = self.fence_timing() else {
            return;
        };
        let silent: Vec<(String, Duration)> = {
            let known = self
                .known
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let liveness = lock(&self.liveness);
            known
                .values()
                .filter(|host| host.remote && !host.failed)
                .filter_map(|host| {
                    let last = liveness
                        .get(&host.view.name)
                        .copied()
                        .unwrap_or(self.started);
                    let silent = last.elapsed();
                    (silent > timing.restart_after()).then(|| (host.view.name.clone(), silent))
                })
                .collect()
        };
        for (host, silent) in silent {
            if let Err(error) = self.fail_host(&host, silent, timing) {
                tracing::error!(host, %error, "cannot declare the host failed");
            }
        }
    }

    /// Records `host` as failed; restarts its HA VMs elsewhere by priority,
    /// marks its other running VMs lost.
    fn fail_host(&self, host: &str, silent: Duration, timing: FenceTiming) -> Result<(), OpError> {
        self.store.set_host_status(host, FAILED)?;
        self.refresh_host(host);
        // Its next heartbeat is a return: it is reconciled then.
        lock(&self.liveness).remove(host);
        self.event_pool(&format!(
            "host {host} failed: not heard from for {:.1} s (lease {} ms + fence margin {} ms); \
             it has stopped its HA VMs by now",
            silent.as_secs_f64(),
            timing.lease.as_millis(),
            timing.margin.as_millis()
        ));
        tracing::warn!(host, silent_ms = silent.as_millis() as u64, "host failed");
        let (mut restart, lost): (Vec<VmRecord>, Vec<VmRecord>) = self
            .store
            .list_vms(VmFilter {
                owner: None,
                state: None,
                host: Some(host),
            })?
            .into_iter()
            .filter(|vm| live(vm.state))
            .partition(|vm| vm.spec.ha == HaPolicy::Restart);
        for vm in lost {
            self.mark_lost(
                &vm,
                &format!(
                    "host {host} failed (not heard from for {:.1} s): not HA, not restarted",
                    silent.as_secs_f64()
                ),
            );
        }
        by_priority(&mut restart);
        for vm in restart {
            self.restart_elsewhere(&vm, host);
        }
        self.update_gauges();
        Ok(())
    }

    fn mark_lost(&self, vm: &VmRecord, reason: &str) {
        let result = self
            .store
            .set_vm_runtime(&vm.id, None)
            .and_then(|()| self.store.update_vm_state(&vm.id, VmState::Lost, reason));
        if let Err(error) = result {
            tracing::error!(vm = %vm.id, %error, "cannot record a lost VM");
        }
        self.event(&vm.id, "lost", reason);
        tracing::warn!(vm = %vm.id, reason, "VM lost");
    }

    /// Starts an HA VM of the failed host `failed` on another host: placed
    /// as usual, a fresh launch; lost when no host can take it.
    fn restart_elsewhere(&self, vm: &VmRecord, failed: &str) {
        let guard = self.lock_vm(&vm.id);
        let _held = lock(&guard);
        let target = {
            let mut allocations = lock(&self.allocations);
            let decision =
                self.decide(&vm.spec, &allocations, &BTreeSet::from([failed.to_owned()]));
            let Some(target) = decision.chosen.clone() else {
                drop(allocations);
                self.mark_lost(
                    vm,
                    &format!(
                        "host {failed} failed; no host can take this HA VM: {}",
                        decision.explain()
                    ),
                );
                return;
            };
            let load = load_of(&vm.spec);
            add_load(allocations.entry(target.clone()).or_default(), &load);
            if let Some(held) = allocations.get_mut(failed) {
                remove_load(held, &load);
            }
            self.event(&vm.id, super::PLACED_EVENT, &decision.explain());
            target
        };
        let progress = |_: &str, _: &str, _: u32| {};
        let restarted = (|| -> Result<(), OpError> {
            self.store.set_vm_runtime(&vm.id, None)?;
            self.store.set_vm_host(&vm.id, &target)?;
            self.store.update_vm_state(
                &vm.id,
                VmState::Stopped,
                &format!("host {failed} failed: restarting on {target}"),
            )?;
            self.event(
                &vm.id,
                "ha-restart",
                &format!("host {failed} failed: a fresh launch on {target}"),
            );
            if self.storage == StorageKind::Local {
                // Its disks stayed on the failed host.
                let disks = self.store.disks(&vm.id)?;
                self.host(&target)?.prepare(&vm.id, &disks, &progress)?;
                if !disks.is_empty() {
                    self.event(
                        &vm.id,
                        "ha-restart",
                        &format!(
                            "local storage: its disks stayed on {failed}; {target} starts it on \
                             new empty ones"
                        ),
                    );
                }
            }
            let moved = self.store.get_vm(&vm.id.0, None)?;
            self.start_locked(&moved, &progress)
        })();
        match restarted {
            Ok(()) => tracing::info!(vm = %vm.id, from = failed, to = %target, "HA restart"),
            Err(error) => {
                tracing::error!(vm = %vm.id, to = %target, %error, "HA restart failed");
                self.event(&vm.id, "ha-restart-failed", &error.message);
                let _ = self.store.update_vm_state(
                    &vm.id,
                    VmState::Failed,
                    &format!(
                        "host {failed} failed; restart on {target}: {}",
                        error.message
                    ),
                );
            }
        }
    }

    /// Refuses `candidate` (an HA VM about to be made on its host, or a
    /// VM about to be made HA) if, with it, the pool's HA plan would no
    /// longer survive `[placement] ha_host_failures_to_tolerate` host
    /// failures. `counted`: whether `allocations` hold its load already.
    pub(super) fn check_ha_plan(
        &self,
        candidate: &VmRecord,
        allocations: &HashMap<String, HostLoad>,
        counted: bool,
    ) -> Result<(), OpError> {
        let failures = self.policy.ha_host_failures_to_tolerate;
        if candidate.spec.ha != HaPolicy::Restart || failures == 0 {
            return Ok(());
        }
        let mut allocations = allocations.clone();
        if !counted {
            let load = load_of(&candidate.spec);
            add_load(
                allocations.entry(candidate.host.clone()).or_default(),
                &load,
            );
        }
        let plan = self.plan_ha(failures, &allocations, Some(candidate))?;
        if plan.shortfalls.is_empty() {
            return Ok(());
        }
        Err(OpError::precondition(format!(
            "VM {} as an HA VM on {} would break the pool's HA plan, which must survive {failures} \
             host failure(s) ([placement] ha_host_failures_to_tolerate): {}",
            candidate.spec.name,
            candidate.host,
            plan.shortfalls.join("; ")
        )))
    }

    /// Whether every running HA VM could be restarted, by priority within
    /// the others' capacity, whichever `failures` hosts failed.
    pub fn ha_plan(&self, failures: u32) -> Result<HaPlan, OpError> {
        let allocations = lock(&self.allocations).clone();
        self.plan_ha(failures, &allocations, None)
    }

    /// [`Coordinator::ha_plan`] on `allocations`, with `extra` counted as a
    /// running HA VM.
    fn plan_ha(
        &self,
        failures: u32,
        allocations: &HashMap<String, HostLoad>,
        extra: Option<&VmRecord>,
    ) -> Result<HaPlan, OpError> {
        let hosts: Vec<String> = self
            .known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .filter(|host| host.view.state != HostState::Down)
            .map(|host| host.view.name.clone())
            .collect();
        let failures = usize::try_from(failures).unwrap_or(usize::MAX);
        if failures == 0 || failures >= hosts.len() {
            return Err(OpError::invalid(format!(
                "host failures to tolerate: 1 to {} (the pool has {} hosts that are not down)",
                hosts.len().saturating_sub(1),
                hosts.len()
            )));
        }
        let mut protected: Vec<VmRecord> = self
            .store
            .list_vms(VmFilter::all())?
            .into_iter()
            .filter(|vm| vm.spec.ha == HaPolicy::Restart && live(vm.state))
            .filter(|vm| extra.is_none_or(|extra| extra.id != vm.id))
            .chain(extra.cloned())
            .collect();
        by_priority(&mut protected);
        let mut plan = HaPlan::default();
        for failed in hosts.iter().combinations(failures) {
            plan.scenarios += 1;
            let failed: BTreeSet<String> = failed.into_iter().cloned().collect();
            let mut loads = allocations.clone();
            let mut stranded = Vec::new();
            for vm in protected.iter().filter(|vm| failed.contains(&vm.host)) {
                let load = load_of(&vm.spec);
                if let Some(held) = loads.get_mut(&vm.host) {
                    remove_load(held, &load);
                }
                let decision = self.decide(&vm.spec, &loads, &failed);
                match decision.chosen {
                    Some(target) => add_load(loads.entry(target).or_default(), &load),
                    None => stranded.push(format!("{}/{}", vm.owner, vm.spec.name)),
                }
            }
            if !stranded.is_empty() {
                plan.shortfalls.push(format!(
                    "if {} failed: {} could not restart",
                    failed.iter().join(", "),
                    stranded.join(", ")
                ));
            }
        }
        Ok(plan)
    }
}
