//! The compute node: one pass registers the partitions, reports the
//! software release, reads every instance placed here and converges each
//! ([`super::converge`]); [`Node::run`] repeats passes every interval, at
//! once on SIGUSR1, with backoff while a peer is away.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsev_proto::v1::{Vm, VmState};
use tonic::Code;

use super::availability::{Availability, Change};
use super::config::Config;
use super::encrypted_disk::TenantKeyBroker;
use super::hosts;
use super::ledger::Ledger;
use super::master::{Master, MasterError};
use super::naming::{partition_id, partition_index, VmNames};
use super::pool::{Pool, PoolError};

/// Why a pass stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The master failed a call the pass cannot do without.
    #[error(transparent)]
    Master(#[from] MasterError),
    /// hsevd failed a call the pass cannot do without.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The connector's settings do not fit what its peers say.
    #[error("{0}")]
    Setup(String),
}

/// What the connector remembers of one instance between passes.
#[derive(Debug, Default)]
pub(super) struct Work {
    /// A request refused after work (a VM made and checked): the
    /// fingerprint of its parameters and the message, so that the same
    /// parameters are not tried again at every pass.
    pub(super) refused: Option<(String, String)>,
    /// Do not retry a failed VM operation before this.
    pub(super) retry_at: Option<Instant>,
    /// Failures in a row.
    pub(super) failures: u32,
}

/// The longest wait before retrying a VM that failed.
const MAX_RETRY: Duration = Duration::from_secs(300);

/// The compute node and what it remembers.
#[derive(Debug)]
pub struct Node {
    pub(super) config: Config,
    pub(super) names: VmNames,
    pub(super) master: Arc<Master>,
    pub(super) pool: Pool,
    pub(super) key_broker: Option<Arc<TenantKeyBroker>>,
    pub(super) ledger: Ledger,
    pub(super) work: HashMap<String, Work>,
    master_status: Availability,
    pool_status: Availability,
    last_setup_error: Option<String>,
}

/// Whether a VM is between two states (an operation on it is under way).
pub(super) fn transitional(vm: &Vm) -> bool {
    matches!(
        VmState::try_from(vm.state),
        Ok(VmState::Creating | VmState::Starting | VmState::Stopping | VmState::Deleting)
    )
}

/// A VM's name.
pub(super) fn vm_name(vm: &Vm) -> &str {
    vm.spec.as_ref().map_or("", |spec| spec.name.as_str())
}

impl Node {
    /// A node from `config` (nothing is dialled yet).
    pub fn new(config: Config) -> Result<Self, String> {
        let names = VmNames::new(&config.vm_name_prefix())
            .map_err(|problem| format!("node.vm_name_prefix {problem}"))?;
        let master =
            Master::new(&config.master_url(), &config.master).map_err(|error| error.to_string())?;
        let pool = Pool::new(&config.hsev).map_err(|error| error.to_string())?;
        let key_broker = config
            .key_broker
            .as_ref()
            .map(TenantKeyBroker::new)
            .transpose()?
            .map(Arc::new);
        Ok(Node {
            config,
            names,
            master: Arc::new(master),
            pool,
            key_broker,
            ledger: Ledger::default(),
            work: HashMap::new(),
            master_status: Availability::default(),
            pool_status: Availability::default(),
            last_setup_error: None,
        })
    }

    /// Runs `call` on the master, off the async threads.
    pub(super) async fn on_master<T, F>(&self, call: F) -> Result<T, MasterError>
    where
        T: Send + 'static,
        F: FnOnce(&Master) -> Result<T, MasterError> + Send + 'static,
    {
        let master = Arc::clone(&self.master);
        tokio::task::spawn_blocking(move || call(&master))
            .await
            .unwrap_or_else(|error| {
                Err(MasterError::Setup(format!("a master call failed: {error}")))
            })
    }

    /// Passes until SIGINT or SIGTERM: one every interval, one at once on
    /// SIGUSR1, and after a failure the peer's backoff.
    pub async fn run(mut self) -> Result<(), String> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut on_demand = signal(SignalKind::user_defined1())
            .map_err(|error| format!("cannot watch SIGUSR1: {error}"))?;
        let mut terminate = signal(SignalKind::terminate())
            .map_err(|error| format!("cannot watch SIGTERM: {error}"))?;
        tracing::info!(
            master = %self.master.url(),
            computer = %self.config.master.computer_guid,
            hsevd = %self.pool.endpoint(),
            interval_s = self.config.node.pass_interval_seconds,
            "SlapOS compute node connector started"
        );
        loop {
            let wait = self.pass_and_wait().await;
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = on_demand.recv() => tracing::info!("pass asked for (SIGUSR1)"),
                _ = terminate.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        tracing::info!("connector stopped; the VMs keep running");
        Ok(())
    }

    /// One pass, its outcome said as it should be; how long to wait next.
    pub async fn pass_and_wait(&mut self) -> Duration {
        let interval = self.config.pass_interval();
        let started = Instant::now();
        match self.pass().await {
            Ok(()) => {
                self.last_setup_error = None;
                tracing::debug!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "pass done"
                );
                interval
            }
            Err(PassError::Master(error)) if error.is_outage() => {
                if self.master_status.failed() == Some(Change::WentAway) {
                    tracing::warn!(%error, "the SlapOS master is unreachable: retrying with backoff");
                }
                self.master_status.backoff(interval)
            }
            Err(PassError::Pool(error)) if error.is_outage() => {
                if self.pool_status.failed() == Some(Change::WentAway) {
                    tracing::warn!(%error, "hsevd is unreachable: retrying with backoff");
                    let computer = self.config.master.computer_guid.clone();
                    let message = format!("HyperSEV is unreachable: {error}");
                    if let Err(report) = self
                        .on_master(move |master| master.bang_node(&computer, &message))
                        .await
                    {
                        tracing::warn!(error = %report, "cannot tell the master");
                    }
                }
                self.pool_status.backoff(interval)
            }
            Err(error) => {
                let message = error.to_string();
                if self.last_setup_error.as_deref() != Some(message.as_str()) {
                    tracing::error!(error = %message, "the pass failed");
                    self.last_setup_error = Some(message);
                }
                interval
            }
        }
    }

    fn master_answered(&mut self) {
        if let Some(Change::CameBack(after)) = self.master_status.succeeded() {
            tracing::info!(after_s = after.as_secs(), "the SlapOS master answers again");
        }
    }

    fn pool_answered(&mut self) {
        if let Some(Change::CameBack(after)) = self.pool_status.succeeded() {
            tracing::info!(after_s = after.as_secs(), "hsevd answers again");
        }
    }

    /// One pass.
    pub async fn pass(&mut self) -> Result<(), PassError> {
        let computer = self.config.master.computer_guid.clone();
        // What the master placed here; a node it does not know yet has
        // nothing (it is registered just below).
        let placed = {
            let computer = computer.clone();
            match self
                .on_master(move |master| master.instances(&computer))
                .await
            {
                Ok(list) => Some(list),
                Err(MasterError::Refused { status: 403, .. }) => None,
                Err(error) => return Err(error.into()),
            }
        };
        self.master_answered();

        // Partitions: one per VM slot, and never fewer than those in use
        // (the master would drop a partition that holds an instance).
        let in_use = placed
            .iter()
            .flatten()
            .filter_map(|instance| partition_index(&instance.partition))
            .max()
            .map_or(0, |index| index + 1);
        let slots = self.slots().await?;
        let partitions: Vec<String> = (0..slots.max(in_use)).map(partition_id).collect();
        {
            let computer = computer.clone();
            let partitions = partitions.clone();
            self.on_master(move |master| master.format(&computer, &partitions))
                .await?;
        }
        self.supply().await?;
        let placed = match placed {
            Some(list) => list,
            None => {
                let computer = computer.clone();
                self.on_master(move |master| master.instances(&computer))
                    .await?
            }
        };

        let vms = self.pool.vms(&self.config.hsev.owner).await?;
        self.pool_answered();
        let mut by_partition: HashMap<String, Vec<Vm>> = HashMap::new();
        for vm in vms {
            if let Some(slot) = self.names.slot(vm_name(&vm)) {
                by_partition.entry(slot.partition).or_default().push(vm);
            }
        }

        let mut placed = placed;
        placed.sort_by_key(|instance| partition_index(&instance.partition));
        let mut served = HashSet::new();
        for instance in &placed {
            served.insert(instance.partition.clone());
            let vms = by_partition.remove(&instance.partition).unwrap_or_default();
            self.converge(instance, &vms).await?;
        }
        // VMs of partitions the master freed while nobody was looking.
        for vm in by_partition.into_values().flatten() {
            self.remove(&vm, "its partition holds no instance any more")
                .await?;
        }
        let listed: HashSet<String> = placed
            .iter()
            .map(|instance| instance.instance_guid.clone())
            .collect();
        self.ledger.keep_only(&listed);
        self.work.retain(|instance, _| listed.contains(instance));
        Ok(())
    }

    /// The partitions to register: the configured count, or the pool's
    /// VM slots.
    async fn slots(&mut self) -> Result<u32, PassError> {
        if let Some(partitions) = self.config.node.partitions {
            return Ok(partitions);
        }
        match self.pool.hosts().await {
            Ok(list) => {
                self.pool_answered();
                Ok(hosts::slots(&list))
            }
            Err(PoolError::Refused {
                code: Code::PermissionDenied,
                ..
            }) => Err(PassError::Setup(
                "the pool's capacity is read from its hosts, which only admins see: set \
                 node.partitions, or give the connector an admin token"
                    .to_owned(),
            )),
            Err(error) => Err(error.into()),
        }
    }

    /// Reports HyperSEV's software release available (once), and refuses
    /// any other the master wants installed here.
    async fn supply(&mut self) -> Result<(), PassError> {
        let computer = self.config.master.computer_guid.clone();
        let installations = {
            let computer = computer.clone();
            self.on_master(move |master| master.software_installations(&computer))
                .await?
        };
        let ours = self.config.master.software_release.clone();
        for installation in installations {
            let url = installation.software_release.clone();
            // What the connector can report: its own release is always
            // there; another is never built here.
            let state = match (url == ours, installation.state.as_str()) {
                (_, "destroyed") => "destroyed",
                (true, _) => "available",
                (false, _) => {
                    if self.ledger.software_is_new(&url, "refused") {
                        tracing::warn!(software_release = %url, provided = %ours, "the master wants a software release this node does not provide");
                        self.ledger.software_reported(&url, "refused");
                    }
                    continue;
                }
            };
            if !self.ledger.software_is_new(&url, state) {
                continue;
            }
            let (computer, reported_url) = (computer.clone(), url.clone());
            self.on_master(move |master| {
                master.report_software_installation(&computer, &reported_url, state)
            })
            .await?;
            tracing::info!(software_release = %url, state, "software release reported");
            self.ledger.software_reported(&url, state);
        }
        Ok(())
    }

    /// Deletes one of the connector's VMs that no instance wants, wiping
    /// its disks; one under way is left for the next pass.
    pub(super) async fn remove(&mut self, vm: &Vm, why: &str) -> Result<(), PassError> {
        if transitional(vm) {
            return Ok(());
        }
        match self.pool.delete_wiped(&vm.id).await {
            Ok(()) => {
                tracing::info!(vm = %vm_name(vm), id = %vm.id, why, "VM deleted, disks wiped");
                Ok(())
            }
            Err(error) if error.is_outage() => Err(error.into()),
            Err(error) => {
                tracing::warn!(vm = %vm_name(vm), %error, why, "cannot delete the VM");
                Ok(())
            }
        }
    }

    /// Whether a failed operation of `instance` waits for its retry time.
    pub(super) fn backing_off(&self, instance: &str) -> bool {
        self.work
            .get(instance)
            .and_then(|work| work.retry_at)
            .is_some_and(|at| Instant::now() < at)
    }

    /// Another failure of `instance` in a row: the next try waits longer.
    pub(super) fn back_off(&mut self, instance: &str) {
        let interval = self.config.pass_interval();
        let work = self.work.entry(instance.to_owned()).or_default();
        work.failures = work.failures.saturating_add(1);
        let wait = interval
            .saturating_mul(1u32 << work.failures.min(16))
            .min(MAX_RETRY);
        work.retry_at = Some(Instant::now() + wait);
    }

    /// `instance`'s operations work again.
    pub(super) fn recovered(&mut self, instance: &str) {
        if let Some(work) = self.work.get_mut(instance) {
            work.failures = 0;
            work.retry_at = None;
        }
    }
}
