//! The public API's listeners: the Unix socket and, when configured, TCP
//! with TLS, serving the `hsev.v1` services (on the coordinator) or
//! forwarding every call to the coordinator (on any other host, and on a
//! coordinator that stands by for the pool's leadership), with the
//! health service and server reflection (v1 and v1alpha) either way.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use anyhow::Context;
use hsev_proto::v1::host_service_server::HostServiceServer;
use hsev_proto::v1::image_service_server::ImageServiceServer;
use hsev_proto::v1::vm_service_server::VmServiceServer;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::Routes;
use tonic::transport::Channel;

use super::config::Config;
use super::{grpc, tls};
use crate::api::STALE_HEADER;
use crate::coordinator::election::StandingView;
use crate::pool::leader_channel::LeaderChannel;

/// Health and reflection, which every host answers itself.
async fn common_routes() -> anyhow::Result<Routes> {
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
    Ok(Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha))
}

/// The coordinator's public API; every answer given while the store reads
/// from one member's copy carries [`STALE_HEADER`].
pub async fn api_routes(api: grpc::Api) -> anyhow::Result<Routes> {
    let coordinator = Arc::clone(&api.coordinator);
    let router = common_routes()
        .await?
        .add_service(VmServiceServer::new(api.clone()))
        .add_service(ImageServiceServer::new(api.clone()))
        .add_service(HostServiceServer::new(api))
        .into_axum_router()
        .layer(axum::middleware::map_response(
            move |response: axum::response::Response| {
                let staleness = coordinator.store().staleness();
                async move { mark_stale(response, staleness) }
            },
        ));
    Ok(Routes::from(router))
}

/// `response`, with [`STALE_HEADER`] when the store's reads may be stale.
fn mark_stale(
    mut response: axum::response::Response,
    staleness: Option<String>,
) -> axum::response::Response {
    if let Some(reason) = staleness {
        let reason: String = reason
            .chars()
            .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
            .collect();
        let text = format!(
            "the pool's etcd cluster has no quorum ({reason}): this answer comes from one \
             member's copy of the pool and may be stale"
        );
        if let Ok(value) = axum::http::HeaderValue::from_str(&text) {
            response.headers_mut().insert(STALE_HEADER, value);
        }
    }
    response
}

/// A member's public API: every call but health and reflection goes to the
/// coordinator as it came (the caller's token with it), over the pool's
/// mTLS channel.
pub async fn forwarding_routes(coordinator: LeaderChannel) -> anyhow::Result<Routes> {
    let router = common_routes()
        .await?
        .into_axum_router()
        .fallback(move |request: axum::extract::Request| forward(coordinator.clone(), request));
    Ok(Routes::from(router))
}

/// Sends `request` on `channel` as it came; a channel that cannot carry it
/// answers `Unavailable`.
async fn forward<S>(mut channel: S, request: axum::extract::Request) -> axum::response::Response
where
    S: tower::Service<
        tonic::codegen::http::Request<tonic::body::Body>,
        Response = tonic::codegen::http::Response<tonic::body::Body>,
        Error = tonic::transport::Error,
    >,
{
    use tower::ServiceExt;
    let request = request.map(tonic::body::Body::new);
    // `ready` first: the channel's buffer takes a request only once it has
    // a slot for it.
    let forwarded = match channel.ready().await {
        Ok(ready) => ready.call(request).await,
        Err(error) => Err(error),
    };
    match forwarded {
        Ok(response) => response.map(axum::body::Body::new),
        Err(error) => tonic::Status::unavailable(format!(
            "this host forwards the API to the pool's coordinator, which does not answer: \
             {error}"
        ))
        .into_http::<axum::body::Body>(),
    }
}

/// A coordinator's public API on etcd: while it stands by, every call but
/// health and reflection goes to the leader, as a member's goes to its
/// coordinator; once `local` is set (it leads, its API is ready), every
/// call is served here.
///
/// The leader is reached at the address it stands as: its Unix socket
/// (coordinators on one machine) or its TLS listener, trusted by this
/// coordinator's own API certificate (coordinators of one pool serve the
/// same one, `[tls]`).
pub async fn standby_routes(
    config: &Config,
    leader: StandingView,
    own: String,
    local: Arc<OnceLock<axum::Router>>,
) -> anyhow::Result<Routes> {
    let trust = tls::identity(config).context("the TLS identity")?.cert_pem;
    let channels: Arc<Mutex<Option<(String, Channel)>>> = Arc::default();
    let router = common_routes().await?.into_axum_router().fallback(
        move |request: axum::extract::Request| {
            let (leader, own, local, trust, channels) = (
                leader.clone(),
                own.clone(),
                Arc::clone(&local),
                trust.clone(),
                Arc::clone(&channels),
            );
            async move {
                use tower::ServiceExt;
                // A call during an election waits for its outcome, a while.
                let deadline = tokio::time::Instant::now() + ELECTION_WAIT;
                let address = loop {
                    if let Some(router) = local.get() {
                        return match router.clone().oneshot(request).await {
                            Ok(response) => response,
                            Err(never) => match never {},
                        };
                    }
                    if let Some(address) = leader.leader().filter(|address| *address != own) {
                        break address;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return tonic::Status::unavailable(format!(
                            "no coordinator has led the pool for the last {} s (an election \
                             is under way): try again in a few seconds",
                            ELECTION_WAIT.as_secs()
                        ))
                        .into_http::<axum::body::Body>();
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                };
                let channel = {
                    let mut cached = channels.lock().unwrap_or_else(PoisonError::into_inner);
                    match cached.as_ref() {
                        Some((to, channel)) if *to == address => Ok(channel.clone()),
                        _ => leader_channel(&address, &trust).inspect(|channel| {
                            *cached = Some((address.clone(), channel.clone()));
                        }),
                    }
                };
                match channel {
                    Ok(channel) => forward(channel, request).await,
                    Err(error) => tonic::Status::unavailable(format!(
                        "this coordinator stands by and cannot reach the leader at {address}: \
                         {error}"
                    ))
                    .into_http::<axum::body::Body>(),
                }
            }
        },
    );
    Ok(Routes::from(router))
}

/// How long a call to a standby coordinator waits for a leader.
const ELECTION_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A lazy channel to the leader at `address`: a Unix socket path, or
/// `host:port` over TLS trusting `trust`.
fn leader_channel(address: &str, trust: &[u8]) -> Result<Channel, tonic::transport::Error> {
    if address.starts_with('/') {
        let path = std::path::PathBuf::from(address);
        // The URI only fills in the HTTP/2 `:authority`; the connector
        // dials the socket.
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        return Ok(tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector_lazy(connector));
    }
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(trust));
    Ok(
        tonic::transport::Endpoint::from_shared(format!("https://{address}"))?
            .connect_timeout(std::time::Duration::from_secs(5))
            .tls_config(tls)?
            .connect_lazy(),
    )
}

/// Serves `routes` on the Unix socket and, when configured, over TLS,
/// until SIGINT or SIGTERM.
pub async fn serve_public(config: &Config, routes: Routes) -> anyhow::Result<()> {
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

    match config.listen {
        Some(address) => {
            let identity = tls::identity(config).context("the TLS identity")?;
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

/// Runs `tick` every `period` off the runtime, for as long as the daemon.
pub fn every(period: std::time::Duration, tick: impl Fn() + Send + Sync + 'static) {
    let tick = Arc::new(tick);
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(period);
        loop {
            interval.tick().await;
            let tick = Arc::clone(&tick);
            let _ = tokio::task::spawn_blocking(move || tick()).await;
        }
    });
}
