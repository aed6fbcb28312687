//! `hsevd`: the host agent ([`crate::host_agent`]) and, on one host, the
//! pool coordinator ([`crate::coordinator`]), with what binds them to the
//! outside: the configuration, the `hsev.v1` API over a Unix socket and TCP
//! with TLS, authentication, metrics.
//!
//! VMs are separate processes: stopping or killing `hsevd` leaves them
//! running, and the next `hsevd` adopts them
//! ([`crate::pool::HostClient::recover`]).

pub mod auth;
pub mod config;
pub mod error;
mod grpc;
pub mod host;
pub mod images;
pub mod metrics;
mod roles;
mod serve;
pub mod tls;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use hsev_attestation::firmware::sev_device::SevDevice;
use hsev_attestation::firmware::simulated::{SimInit, SimulatedFirmware};

use self::config::{AcceleratorChoice, Config};
use crate::coordinator::{Coordinator, CoordinatorParts};
use crate::host_agent::{Firmware, HostAgent, HostAgentParts};
use crate::hypervisor::libvirt::LibvirtConfig;
use crate::hypervisor::qemu::QemuConfig;
use crate::hypervisor::select::{self, DriverChoice};
use crate::hypervisor::AcceleratorSetting;
use crate::placement::PoolPolicy;
use crate::pool::member::MemberState;
use crate::pool::PoolSink;
use crate::store::Store;

fn host_name(config: &Config) -> String {
    config.host_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .ok()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "localhost".to_owned())
    })
}

fn firmware(config: &Config) -> anyhow::Result<Firmware> {
    if let Some(dir) = &config.firmware.simulated_dir {
        let firmware = SimulatedFirmware::init(dir, &SimInit::default())
            .with_context(|| format!("simulated Secure Processor in {}", dir.display()))?;
        tracing::warn!(dir = %dir.display(), "SIMULATED AMD Secure Processor: SEV-SNP guests get NO confidentiality");
        return Ok(Firmware::Simulated(Arc::new(firmware)));
    }
    if Path::new("/dev/sev").exists() {
        let device = SevDevice::open().context("opening /dev/sev")?;
        return Ok(Firmware::Real(Arc::new(device)));
    }
    tracing::info!("no /dev/sev and no simulated firmware: ordinary VMs only");
    Ok(Firmware::None)
}

/// This host's roles, built: its host agent and the pool's coordinator.
#[derive(Debug)]
pub struct Roles {
    /// This host's agent.
    pub host_agent: Arc<HostAgent>,
    /// The coordinator.
    pub coordinator: Arc<Coordinator>,
}

/// The state folder's subfolders, made when missing.
fn state_folders(config: &Config) -> anyhow::Result<()> {
    let state_dir = &config.state_dir;
    for dir in [
        state_dir.clone(),
        state_dir.join("vms"),
        state_dir.join("images"),
    ] {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// This host's agent: the hypervisor driver (probed) and the SEV firmware.
pub fn host_agent(config: &Config) -> anyhow::Result<Arc<HostAgent>> {
    state_folders(config)?;
    let accelerator = match config.accelerator {
        AcceleratorChoice::Auto => AcceleratorSetting::Auto,
        AcceleratorChoice::Kvm => AcceleratorSetting::Kvm,
        AcceleratorChoice::Tcg => AcceleratorSetting::Tcg,
    };
    let choice = DriverChoice {
        kind: config.driver,
        qemu: QemuConfig {
            accelerator,
            ..QemuConfig::default()
        },
        libvirt: LibvirtConfig {
            accelerator,
            ..config.libvirt.clone()
        },
    };
    let (driver, driver_capabilities) = select::driver(&choice)
        .with_context(|| format!("the {} hypervisor driver", config.driver.as_str()))?;
    tracing::info!(
        driver = driver.name(),
        accelerator = %driver_capabilities.accelerator,
        reason = %driver_capabilities.accelerator_reason,
        version = %driver_capabilities.version,
        "hypervisor probed"
    );
    Ok(Arc::new(HostAgent::new(HostAgentParts {
        name: host_name(config),
        driver,
        firmware: firmware(config)?,
        vms_dir: config.state_dir.join("vms"),
        shared_dir: config.pool.shared_dir.clone(),
        images_dir: config.state_dir.join("images"),
        allow_debug_policy: config.allow_debug_policy,
        driver_capabilities,
        labels: config.labels.clone(),
    })))
}

/// Builds this host's agent and the coordinator (store), attaches the one
/// to the other and reconciles what runs.
pub fn roles(config: &Config) -> anyhow::Result<Roles> {
    roles_on(config, open_store(config)?, host_agent(config)?)
}

/// Opens the store `[store]` names.
pub fn open_store(config: &Config) -> anyhow::Result<Arc<Store>> {
    let store = Arc::new(
        Store::open_configured(&config.store, &config.state_dir.join("hsevd.db"))
            .context("opening the store")?,
    );
    tracing::info!(store = %store.describe(), "pool store open");
    Ok(store)
}

/// [`roles`] on an open store (one this coordinator leads, on etcd) and a
/// host agent made before (while it stood by).
pub fn roles_on(
    config: &Config,
    store: Arc<Store>,
    host_agent: Arc<HostAgent>,
) -> anyhow::Result<Roles> {
    store
        .init_pool("default")
        .context("initialising the pool")?;
    let simulated = host_agent.simulated_firmware();
    let coordinator = Arc::new(
        Coordinator::new(CoordinatorParts {
            store,
            policy: PoolPolicy {
                // A coordinator with a simulated Secure Processor runs a
                // development pool by its own configuration.
                allow_simulated: config.placement.allow_simulated || simulated,
                shared_dir: config
                    .pool
                    .shared_dir
                    .as_ref()
                    .filter(|_| config.pool.storage == crate::coordinator::StorageKind::Shared)
                    .map(|dir| dir.display().to_string()),
                ..config.placement.clone()
            },
            storage: config.pool.storage,
            default_vcpu_type: config.default_vcpu_type.clone(),
            metrics: metrics::Metrics::new(),
        })
        .map_err(|error| anyhow::anyhow!("{error}"))?,
    );
    host_agent.report_to(Arc::clone(&coordinator) as Arc<dyn PoolSink>);
    coordinator
        .attach_host(Arc::clone(&host_agent) as Arc<dyn crate::pool::HostClient>)
        .map_err(|error| anyhow::anyhow!("attaching this host: {error}"))?;
    Ok(Roles {
        host_agent,
        coordinator,
    })
}

/// `hsevd migrate-store`: copies the SQLite pool of this state directory
/// into the etcd cluster of `[store]`.
pub fn migrate_store(config: &Config) -> anyhow::Result<crate::store::CopyReport> {
    if config.store.kind != crate::store::StoreKind::Etcd {
        anyhow::bail!(
            "migrate-store moves the pool to etcd: set [store] kind = \"etcd\" and its \
             endpoints in the configuration first"
        );
    }
    let path = config.state_dir.join("hsevd.db");
    if !path.exists() {
        anyhow::bail!("there is no SQLite store at {}", path.display());
    }
    let source = Store::open(&path).context("opening the SQLite store")?;
    let target = Store::open_configured(&config.store, &path).context("connecting to etcd")?;
    crate::store::copy_pool(&source, &target)
        .with_context(|| format!("copying {} to {}", source.describe(), target.describe()))
}

/// Runs the daemon until SIGINT or SIGTERM: the coordinator with this
/// host's agent, or, on a host that joined a pool, its agent alone. VMs
/// keep running after it.
pub async fn run(config: Config) -> anyhow::Result<()> {
    match MemberState::load(&config.state_dir).map_err(|error| anyhow::anyhow!("{error}"))? {
        Some(member) => roles::run_member(config, member).await,
        None => roles::run_coordinator(config).await,
    }
}
