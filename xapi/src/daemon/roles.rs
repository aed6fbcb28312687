//! How hsevd runs each of its roles: the coordinator (with its own host's
//! agent in-process, and, with `[pool] listen`, the pool listener other
//! hosts join and talk to), or a member host (its agent commanded over the
//! pool listener, its public API forwarded to the coordinator).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use hsev_proto::internal::coordinator_server::CoordinatorServer;
use hsev_proto::internal::host_agent_server::HostAgentServer;

use super::config::Config;
use super::{auth, grpc, host_agent, metrics, roles, serve};
use crate::coordinator::election::{Candidacy, Standing};
use crate::coordinator::ha::FenceTiming;
use crate::coordinator::PoolAuthority;
use crate::pool::coordinator_service::CoordinatorService;
use crate::pool::host_service::{HostService, Membership};
use crate::pool::member::{
    coordinator_channel, heartbeats, pool_dir, CoordinatorImages, MemberState, RemoteSink,
};
use crate::pool::pki::{Identity, PoolCa};
use crate::pool::tls::server_config;
use crate::pool::{ImageSource, PoolSink};
use crate::store::StoreKind;

/// Serves the metrics, when configured.
async fn serve_metrics(config: &Config, metrics: Arc<metrics::Metrics>) -> anyhow::Result<()> {
    if let Some(address) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("binding {address}"))?;
        tracing::info!(%address, "serving metrics at /metrics");
        tokio::spawn(metrics::serve(listener, metrics));
    }
    Ok(())
}

/// Serves `routes` on the pool listener at `address` with mTLS (client
/// certificates of the pool's CA, optional only for the coordinator's
/// `Join`).
async fn serve_pool(
    address: std::net::SocketAddr,
    identity: &Identity,
    ca_pem: &str,
    optional_client_cert: bool,
    routes: tonic::service::Routes,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the pool listener {address}"))?;
    let server = tonic::transport::Server::builder()
        .tls_config(server_config(identity, ca_pem, optional_client_cert))
        .context("the pool's TLS configuration")?
        .add_routes(routes);
    tracing::info!(%address, "serving the pool protocol (mTLS)");
    tokio::spawn(async move {
        if let Err(error) = server
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
        {
            tracing::error!(%error, "the pool listener failed");
        }
    });
    Ok(())
}

/// The coordinator's identity on the pool listener at `address`, issued
/// by the pool's CA and kept; issued again when the kept one does not name
/// this host (a pool made before the coordinator's certificate named it).
fn coordinator_identity(
    dir: &std::path::Path,
    ca: &PoolCa,
    host: &str,
    address: std::net::SocketAddr,
) -> anyhow::Result<Identity> {
    if dir.join("coordinator.pem").is_file() {
        let kept =
            Identity::load(dir, "coordinator").map_err(|error| anyhow::anyhow!("{error}"))?;
        if crate::pool::pki::names_host(&kept.cert_pem, host) {
            return Ok(kept);
        }
    }
    let identity = ca
        .issue_coordinator(host, Some(address.ip()))
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    identity
        .save(dir, "coordinator")
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    Ok(identity)
}

/// Refuses a coordinator whose pool CA (`mine`, its fingerprint; `None`:
/// it has none yet) is not the pool's (`recorded`): the coordinators of
/// a pool on etcd share one CA, which the first of them made (its
/// fingerprint is in etcd, its key in each one's state folder, copied
/// there by the operator), or the hosts would refuse them.
fn ensure_pool_ca(recorded: &str, mine: Option<&str>, dir: &std::path::Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        mine == Some(recorded),
        "this coordinator's pool CA ({}: {}) is not the pool's (fingerprint {recorded}): copy \
         ca.pem and ca.key from the pool folder of the coordinator that made the pool into {}",
        dir.join("ca.pem").display(),
        mine.map_or_else(|| "none".to_owned(), |mine| format!("fingerprint {mine}")),
        dir.display()
    );
    Ok(())
}

/// Warns when a change of leader would outlast the hosts' fence timeout:
/// a host hears from no coordinator from the old leader's death until the
/// new one serves (its lease TTL, then an election), and would stop its HA
/// VMs meanwhile.
fn warn_if_failover_fences(config: &Config) {
    let failover_ms = config.store.lease_ttl_s * 1000 + 2000;
    let fence_ms = config.pool.effective_fence_after_ms();
    if config.pool.listen.is_some() && fence_ms < failover_ms {
        tracing::warn!(
            fence_after_ms = fence_ms,
            lease_ttl_s = config.store.lease_ttl_s,
            "[pool] fence_after_ms (or down_after_ms) is shorter than a change of leader takes \
             (about lease_ttl_s plus 2 s): the hosts will fence their HA VMs whenever the \
             leading coordinator dies"
        );
    }
}

/// hsevd's exit status when it stops leading the pool.
pub const EXIT_NOT_LEADER: i32 = 75;

/// Follows this coordinator's leadership once it led: while it does not
/// lead (etcd without a quorum, renewals late), it keeps serving and its
/// writes are refused; when it leads again and nobody else wrote in
/// between, it goes on as it was; when another coordinator leads or wrote,
/// it exits (its supervisor starts it again as a candidate): what it keeps
/// in memory is no longer the pool's.
fn watch_leadership(candidacy: Candidacy, address: String, store: Arc<crate::store::Store>) {
    let lost = std::sync::atomic::AtomicBool::new(false);
    serve::every(Duration::from_millis(200), move || {
        use std::sync::atomic::Ordering;
        match candidacy.standing() {
            Standing::Leader(_) if lost.load(Ordering::SeqCst) => {
                let others = store
                    .as_etcd()
                    .map_or(Ok(true), crate::store::EtcdStore::written_by_others);
                if others.as_ref().is_ok_and(|others| *others) {
                    tracing::error!(
                        "leading again, but another coordinator wrote the pool meanwhile: \
                         exiting to start afresh"
                    );
                    std::process::exit(EXIT_NOT_LEADER);
                }
                if others.is_ok() {
                    tracing::info!("leading the pool again; nobody else wrote meanwhile");
                    lost.store(false, Ordering::SeqCst);
                }
            }
            Standing::Leader(_) => {}
            Standing::Follower(Some(leader)) if leader != address => {
                tracing::error!(%leader, "another coordinator leads the pool: exiting");
                std::process::exit(EXIT_NOT_LEADER);
            }
            Standing::Follower(_) => {
                if !lost.swap(true, Ordering::SeqCst) {
                    tracing::warn!(
                        "not leading the pool now (its lease could not be renewed): writes \
                         are refused until it leads again"
                    );
                }
            }
        }
    });
}

/// Stands for the pool's leadership on `store`; answers the candidacy and
/// the address it stands as (what standby coordinators forward to): its
/// public API's TLS listener, else its Unix socket (coordinators on one
/// machine). Never the pool listener: that one serves the pool's internal
/// service, to certificates of the pool's CA only.
fn stand(config: &Config, store: &Arc<crate::store::Store>) -> (Candidacy, String) {
    let address = config
        .listen
        .map(|address| address.to_string())
        .unwrap_or_else(|| config.socket_path().display().to_string());
    let ttl = Duration::from_secs(config.store.lease_ttl_s);
    let candidacy = Candidacy::start(store, &address, ttl);
    tracing::info!(%address, ttl_s = config.store.lease_ttl_s, "standing for the pool's leadership");
    (candidacy, address)
}

/// Waits until `candidacy` leads; meanwhile this coordinator's public API
/// goes to the leader ([`serve::standby_routes`]).
async fn wait_to_lead(candidacy: &Candidacy, address: &str) {
    let mut reported = None;
    while !candidacy.is_leader() {
        if let Standing::Follower(leader) = candidacy.standing() {
            if leader != reported {
                tracing::info!(leader = leader.as_deref().unwrap_or("none"), "standing by");
                reported = leader;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::info!(%address, "leading the pool");
}

/// A standby coordinator's public API, served from the start: what it
/// serves once it leads is set into `local`.
struct StandbyApi {
    local: Arc<OnceLock<axum::Router>>,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// The coordinator, with this host's agent in-process.
pub async fn run_coordinator(config: Config) -> anyhow::Result<()> {
    let (roles, standby) = match config.store.kind {
        StoreKind::Sqlite => {
            let config = config.clone();
            (
                tokio::task::spawn_blocking(move || roles(&config)).await??,
                None,
            )
        }
        StoreKind::Etcd => {
            // A hot standby: everything that needs no leadership is ready
            // before the campaign, so that taking over is quick.
            let (store, agent) = {
                let config = config.clone();
                tokio::task::spawn_blocking(move || {
                    Ok::<_, anyhow::Error>((super::open_store(&config)?, host_agent(&config)?))
                })
                .await??
            };
            warn_if_failover_fences(&config);
            if let (Some(pool_address), Some(etcd)) = (config.pool.listen, store.as_etcd()) {
                // Found out now rather than when it is this one's turn to lead.
                let recorded = etcd
                    .recorded_pool_ca_fingerprint()
                    .map_err(|error| anyhow::anyhow!("{error}"))?;
                if let Some(recorded) = recorded {
                    let dir = pool_dir(&config.state_dir);
                    let mine = std::fs::read_to_string(dir.join("ca.pem"))
                        .ok()
                        .and_then(|pem| crate::pool::pki::fingerprint(&pem).ok());
                    ensure_pool_ca(&recorded, mine.as_deref(), &dir)?;
                }
                etcd.announce_coordinator(&super::host_name(&config), &pool_address.to_string())
                    .map_err(|error| anyhow::anyhow!("{error}"))?;
            }
            let (candidacy, address) = stand(&config, &store);
            let local: Arc<OnceLock<axum::Router>> = Arc::default();
            let routes = serve::standby_routes(
                &config,
                candidacy.view(),
                address.clone(),
                Arc::clone(&local),
            )
            .await?;
            let served = {
                let config = config.clone();
                tokio::spawn(async move { serve::serve_public(&config, routes).await })
            };
            wait_to_lead(&candidacy, &address).await;
            let roles = {
                let (config, store) = (config.clone(), Arc::clone(&store));
                tokio::task::spawn_blocking(move || super::roles_on(&config, store, agent))
                    .await??
            };
            watch_leadership(candidacy, address, store);
            (roles, Some(StandbyApi { local, served }))
        }
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
    let (monitor, gauges) = (
        Arc::clone(&roles.host_agent),
        Arc::clone(&roles.coordinator),
    );
    serve::every(Duration::from_millis(500), move || {
        monitor.monitor_tick();
        gauges.update_gauges();
    });

    if let Some(address) = config.pool.listen {
        let dir = pool_dir(&config.state_dir);
        let pool = roles
            .coordinator
            .store()
            .pool_name()
            .context("the pool's name")?;
        let ca = PoolCa::open_or_create(&dir, &pool).map_err(|error| anyhow::anyhow!("{error}"))?;
        if let Some(etcd) = roles.coordinator.store().as_etcd() {
            let mine = ca
                .fingerprint()
                .map_err(|error| anyhow::anyhow!("{error}"))?;
            let recorded = etcd
                .pool_ca_fingerprint(&mine)
                .map_err(|error| anyhow::anyhow!("{error}"))?;
            ensure_pool_ca(&recorded, Some(&mine), &dir)?;
        }
        let identity = coordinator_identity(&dir, &ca, &super::host_name(&config), address)?;
        let ca_pem = ca.cert_pem().to_owned();
        let membership = Membership {
            identity: identity.clone(),
            ca_pem: ca_pem.clone(),
            revoked: Arc::default(),
        };
        roles
            .host_agent
            .join_pool(membership.clone(), tokio::runtime::Handle::current());
        roles.coordinator.set_authority(PoolAuthority {
            address: address.to_string(),
            ca,
            identity: identity.clone(),
            runtime: tokio::runtime::Handle::current(),
            fence: FenceTiming::from_config(&config.pool)
                .map_err(|(key, reason)| anyhow::anyhow!("{key}: {reason}"))?,
        });
        {
            let coordinator = Arc::clone(&roles.coordinator);
            tokio::task::spawn_blocking(move || coordinator.register_remote_hosts())
                .await?
                .map_err(|error| anyhow::anyhow!("{error}"))?;
        }
        let coordinators = Arc::new(std::sync::RwLock::new(vec![address.to_string()]));
        let (coordinator, revoked, known) = (
            Arc::clone(&roles.coordinator),
            Arc::clone(&membership.revoked),
            Arc::clone(&coordinators),
        );
        {
            let coordinator = Arc::clone(&roles.coordinator);
            serve::every(FenceTiming::WATCHDOG_PERIOD * 2, move || {
                coordinator.check_hosts()
            });
        }
        serve::every(Duration::from_secs(5), move || {
            coordinator.resume_migrations();
            if let Ok(list) = coordinator.store().revoked_certificates() {
                *revoked
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    list.into_iter().collect();
            }
            if let Some(Ok(others)) = coordinator
                .store()
                .as_etcd()
                .map(crate::store::EtcdStore::coordinator_addresses)
            {
                let own = address.to_string();
                let mut list = vec![own.clone()];
                list.extend(others.into_iter().filter(|other| *other != own));
                *known
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = list;
            }
        });
        let routes = serve::api_routes(api.clone())
            .await?
            .add_service(CoordinatorServer::new(CoordinatorService::new(
                Arc::clone(&roles.coordinator),
                coordinators,
            )))
            .add_service(HostAgentServer::new(HostService::new(
                Arc::clone(&roles.host_agent),
                membership,
            )));
        serve_pool(address, &identity, &ca_pem, true, routes).await?;
    }
    serve_metrics(&config, metrics).await?;
    match standby {
        Some(standby) => {
            let _ = standby
                .local
                .set(serve::api_routes(api).await?.into_axum_router());
            standby.served.await?
        }
        None => serve::serve_public(&config, serve::api_routes(api).await?).await,
    }
}

/// A member host: its agent, commanded by the coordinator.
pub async fn run_member(config: Config, member: MemberState) -> anyhow::Result<()> {
    let agent = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || host_agent(&config)).await??
    };
    let membership =
        MemberState::membership(&config.state_dir).map_err(|error| anyhow::anyhow!("{error}"))?;
    let channel =
        coordinator_channel(&member, &membership).map_err(|error| anyhow::anyhow!("{error}"))?;
    let runtime = tokio::runtime::Handle::current();
    agent.join_pool(membership.clone(), runtime.clone());
    agent.report_to(Arc::new(RemoteSink::new(channel.clone(), runtime.clone())) as Arc<dyn PoolSink>);
    agent.fetch_images_from(
        Arc::new(CoordinatorImages::new(channel.clone(), runtime)) as Arc<dyn ImageSource>
    );
    tracing::info!(pool = %member.pool, host = %member.name, coordinator = %member.coordinator, "a member of the pool");
    let monitor = Arc::clone(&agent);
    serve::every(Duration::from_millis(500), move || monitor.monitor_tick());
    tokio::spawn(heartbeats(
        channel.clone(),
        (config.state_dir.clone(), member.clone()),
        Arc::clone(&agent),
        membership.clone(),
        Duration::from_millis(config.pool.heartbeat_ms),
        Duration::from_millis(config.pool.effective_fence_after_ms()),
    ));
    let address: std::net::SocketAddr = member
        .listen
        .parse()
        .with_context(|| format!("the pool listener {:?}", member.listen))?;
    let routes = tonic::service::Routes::new(HostAgentServer::new(HostService::new(
        Arc::clone(&agent),
        membership.clone(),
    )));
    serve_pool(
        address,
        &membership.identity,
        &membership.ca_pem,
        false,
        routes,
    )
    .await?;
    serve::serve_public(&config, serve::forwarding_routes(channel).await?).await
}
