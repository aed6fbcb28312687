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
pub mod tls;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hsev_attestation::firmware::sev_device::SevDevice;
use hsev_attestation::firmware::simulated::{SimInit, SimulatedFirmware};
use hsev_proto::v1::host_service_server::HostServiceServer;
use hsev_proto::v1::image_service_server::ImageServiceServer;
use hsev_proto::v1::vm_service_server::VmServiceServer;
use tokio_stream::wrappers::UnixListenerStream;

use self::config::{AcceleratorChoice, Config};
use crate::coordinator::{Coordinator, CoordinatorParts};
use crate::host_agent::{Firmware, HostAgent, HostAgentParts};
use crate::hypervisor::libvirt::LibvirtConfig;
use crate::hypervisor::qemu::QemuConfig;
use crate::hypervisor::select::{self, DriverChoice};
use crate::hypervisor::AcceleratorSetting;
use crate::placement::PoolPolicy;
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

/// Builds this host's agent (driver probe, firmware) and the coordinator
/// (store), attaches the one to the other and reconciles what runs.
pub fn roles(config: &Config) -> anyhow::Result<Roles> {
    let state_dir = &config.state_dir;
    for dir in [
        state_dir.clone(),
        state_dir.join("vms"),
        state_dir.join("images"),
    ] {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let store = Arc::new(Store::open(state_dir.join("hsevd.db")).context("opening the store")?);
    store
        .init_pool("default")
        .context("initialising the pool")?;
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
    let firmware = firmware(config)?;
    let host_agent = Arc::new(HostAgent::new(HostAgentParts {
        name: host_name(config),
        driver,
        firmware,
        vms_dir: state_dir.join("vms"),
        images_dir: state_dir.join("images"),
        allow_debug_policy: config.allow_debug_policy,
        driver_capabilities,
        labels: config.labels.clone(),
    }));
    let simulated = host_agent.simulated_firmware();
    let coordinator = Arc::new(
        Coordinator::new(CoordinatorParts {
            store,
            policy: PoolPolicy {
                // A single host with a simulated Secure Processor is a
                // development pool by its own configuration.
                allow_simulated: config.placement.allow_simulated || simulated,
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

/// Runs the daemon until SIGINT or SIGTERM. VMs keep running after it.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let roles = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || roles(&config)).await??
    };
    if config.tokens.is_empty() {
        tracing::warn!("no [[tokens]] in the configuration: every API request will be refused as unauthenticated");
    }
    let metrics = Arc::clone(roles.coordinator.metrics());
    let api = grpc::Api {
        coordinator: Arc::clone(&roles.coordinator),
        tokens: Arc::new(auth::Tokens::new(&config.tokens)),
        images_dir: config.state_dir.join("images"),
        metrics: Arc::clone(&metrics),
    };

    let monitor = Arc::clone(&roles.host_agent);
    let gauges = Arc::clone(&roles.coordinator);
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(500));
        loop {
            interval.tick().await;
            let host_agent = Arc::clone(&monitor);
            let coordinator = Arc::clone(&gauges);
            let _ = tokio::task::spawn_blocking(move || {
                host_agent.monitor_tick();
                coordinator.update_gauges();
            })
            .await;
        }
    });

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<VmServiceServer<grpc::Api>>()
        .await;
    health_reporter
        .set_serving::<ImageServiceServer<grpc::Api>>()
        .await;
    health_reporter
        .set_serving::<HostServiceServer<grpc::Api>>()
        .await;
    // Reflection in both versions: v1, and v1alpha, which grpcurl before
    // 1.8.8 and many other clients still ask for.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(hsev_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .context("building the reflection service (v1)")?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .context("building the reflection service (v1alpha)")?;
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(VmServiceServer::new(api.clone()))
        .add_service(ImageServiceServer::new(api.clone()))
        .add_service(HostServiceServer::new(api));
    let router = tonic::transport::Server::builder().add_routes(routes.clone());

    let socket = config.socket_path();
    if socket.exists() {
        std::fs::remove_file(&socket)
            .with_context(|| format!("removing the stale socket {}", socket.display()))?;
    }
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let unix = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "serving the API on the Unix socket");

    let shutdown = async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { if let Some(signal) = terminate.as_mut() { signal.recv().await; } else { std::future::pending::<()>().await } } => {}
        }
        tracing::info!("shutting down; VMs keep running");
    };

    if let Some(address) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("binding {address}"))?;
        tracing::info!(%address, "serving metrics at /metrics");
        tokio::spawn(metrics::serve(listener, metrics));
    }

    match config.listen {
        Some(address) => {
            let identity = tls::identity(&config).context("the TLS identity")?;
            let tls = tonic::transport::ServerTlsConfig::new().identity(
                tonic::transport::Identity::from_pem(&identity.cert_pem, &identity.key_pem),
            );
            let tcp = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("binding {address}"))?;
            tracing::info!(%address, "serving the API over TLS");
            let tcp_router = tonic::transport::Server::builder()
                .tls_config(tls)
                .context("TLS configuration")?
                .add_routes(routes);
            let tcp_incoming = tokio_stream::wrappers::TcpListenerStream::new(tcp);
            tokio::select! {
                result = router.serve_with_incoming_shutdown(UnixListenerStream::new(unix), shutdown) => result?,
                result = tcp_router.serve_with_incoming(tcp_incoming) => result?,
            }
        }
        None => {
            router
                .serve_with_incoming_shutdown(UnixListenerStream::new(unix), shutdown)
                .await?
        }
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
