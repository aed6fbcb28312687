//! The key broker server (`hsev-kbs serve`), behind the `kbs-server`
//! feature.
//!
//! - [`config`]: the TOML configuration;
//! - [`evidence`]: verifying evidence once at `/attest`, appraising it per
//!   resource;
//! - [`broker`]: the transport-free commands;
//! - [`sessions`]: sessions and token grants, in memory;
//! - [`error`]: its refusals, as Trustee's error types;
//! - [`http`]: the axum routes;
//! - [`tls`]: its certificate and key, and the HTTPS listener's setup;
//! - [`store`]: SQLite, resource data sealed under the KEK;
//! - [`leases`]: which launch holds a single-instance resource;
//! - [`audit`]: the hash-chained, group-committed audit log;
//! - [`token`]: the ES256 attestation token (passport mode's bearer).
//!
//! The state folder holds `kbs.db` (+ WAL), `audit.jsonl`,
//! `token-signing-key.pem`, `kbs.lock` and, by default, `kek.bin` and
//! `tls/`. One process at a time owns it ([`StateLock`]): a serving broker,
//! or the broker owner's offline [`export_resource`].
//!
//! It serves HTTPS; plain HTTP only with `insecure_http_dev` (development
//! mode), said loudly at start.
//!
//! The server must never release a resource to evidence it has not
//! verified against that resource's policy, never accept simulated evidence
//! in production mode, and never write a secret to a log.

pub mod audit;
pub mod broker;
pub mod config;
pub mod error;
pub mod evidence;
pub mod http;
pub mod leases;
pub mod sessions;
pub mod store;
pub mod tls;
pub mod token;

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use self::audit::{AuditError, AuditLog};
use self::broker::Broker;
use self::config::{ConfigError, KbsConfig, Mode};
use self::evidence::{load_simulated_root, EvidenceError, EvidenceVerifier};
use self::leases::Leases;
use self::store::{Kek, Store, StoreError};
use self::tls::TlsError;
use self::token::{TokenError, TokenSigner};

/// Why the broker cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store or the KEK.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit log.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The token-signing key.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A simulated platform's roots.
    #[error(transparent)]
    Roots(#[from] EvidenceError),
    /// The TLS certificate or key.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Another process owns the state folder.
    #[error(
        "{0}: another hsev-kbs owns this state folder (a broker serving it, or an export): stop \
         it first"
    )]
    Busy(String),
    /// The resource to export does not exist or holds no secret yet.
    #[error("{0}")]
    NoSecret(String),
    /// A file, folder or socket operation.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// The lock file in the state folder.
pub const LOCK_FILE: &str = "kbs.lock";

/// The state folder's exclusive lock (released when dropped, or when the
/// process dies): the audit log has one writer, the store one owner.
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
}

impl StateLock {
    /// Takes the lock of `state_dir`, or says who holds it.
    pub fn acquire(state_dir: &Path) -> Result<Self, ServeError> {
        if !state_dir.is_dir() {
            return Err(ServeError::Io {
                what: format!("state_dir {}", state_dir.display()),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not a folder (hsev-kbs init --state-dir creates it)",
                ),
            });
        }
        let path = state_dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(io(format!("opening {}", path.display())))?;
        match file.try_lock() {
            Ok(()) => Ok(StateLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => {
                Err(ServeError::Busy(state_dir.display().to_string()))
            }
            Err(std::fs::TryLockError::Error(source)) => Err(ServeError::Io {
                what: format!("locking {}", path.display()),
                source,
            }),
        }
    }
}

/// Opens everything the broker needs, refusing to start on any doubt
/// (KEK missing or too open, altered store, broken audit tail). The lock
/// must be held for as long as the broker runs.
pub fn open_broker(config: &KbsConfig, _lock: &StateLock) -> Result<Broker, ServeError> {
    config.validate()?;
    let kek = Kek::load(&config.kek_path())?;
    let signer = TokenSigner::load(&config.state_dir)?;
    let anchors = config
        .simulated_roots
        .iter()
        .map(|path| load_simulated_root(path))
        .collect::<Result<Vec<_>, _>>()?;
    match config.mode {
        Mode::Development => tracing::warn!(
            simulated_roots = anchors.len(),
            "DEVELOPMENT mode: resources whose policy allows it may be released to simulated evidence, which gives NO confidentiality"
        ),
        Mode::Production => tracing::info!("production mode: only AMD's roots are trusted"),
    }
    let verifier = EvidenceVerifier::new(config.mode, anchors);
    let store = Store::open(&config.state_dir, kek)?;
    let leases = Leases::open(&config.state_dir)?;
    let audit = AuditLog::open(&config.state_dir)?;
    if config.admin_tokens.is_empty() {
        tracing::warn!("no admin_tokens configured: the admin API refuses every call");
    }
    Ok(Broker::new(config, verifier, store, leases, audit, signer))
}

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves until SIGTERM or SIGINT: HTTPS, or plain HTTP with
/// `insecure_http_dev`. Prints `hsev-kbs listening on https://ADDR` (or
/// `http://ADDR`) on stdout once it accepts connections (the real port
/// when the configuration says port 0).
pub fn serve(config: &KbsConfig) -> Result<(), ServeError> {
    let lock = StateLock::acquire(&config.state_dir)?;
    let broker = Arc::new(open_broker(config, &lock)?);
    let tls = if config.insecure_http_dev {
        tracing::warn!(
            "PLAIN HTTP (insecure_http_dev, development only): admin tokens travel in clear, and \
             anyone on the network path can stand in for this broker; guests cannot pin it"
        );
        None
    } else {
        let identity = tls::load(config)?;
        tracing::info!(pin = %identity.pin, "HTTPS: clients pin this public key");
        Some(tokio_rustls::TlsAcceptor::from(tls::server_config(
            &identity,
        )?))
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hsev-kbs")
        .build()
        .map_err(io("starting the runtime"))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(io(format!("listen {}", config.listen)))?;
        let address = listener
            .local_addr()
            .map_err(io("reading the listening address"))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "hsev-kbs listening on {scheme}://{address}")
            .and_then(|()| stdout.flush())
            .map_err(io("stdout"))?;
        drop(stdout);
        tracing::info!(%address, scheme, "serving");
        match tls {
            Some(acceptor) => {
                serve_tls(listener, acceptor, http::router(broker)).await;
                Ok(())
            }
            None => axum::serve(listener, http::router(broker))
                .with_graceful_shutdown(shutdown_signal())
                .await
                .map_err(io("serving")),
        }
    })
}

/// Accepts TLS connections until SIGTERM or SIGINT, each served (HTTP/1.1,
/// keep-alive) in a task of its own; then lets open requests finish.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    router: axum::Router,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, most likely: wait a little.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let acceptor = acceptor.clone();
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // Requests and answers are small: no Nagle delay on them.
            let _ = stream.set_nodelay(true);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::info!(%peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%peer, %error, "connection ended");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(std::time::Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("open connections did not finish within 10 s");
    }
}

/// The secret of `resource`, read offline by the broker's owner (a backup,
/// an audit of what a host holds), recorded in the audit log first. Only
/// while no broker serves the state folder: the audit log has one writer.
pub fn export_resource(
    config: &KbsConfig,
    resource: &crate::kbs::protocol::ResourcePath,
) -> Result<zeroize::Zeroizing<Vec<u8>>, ServeError> {
    config.validate()?;
    let _lock = StateLock::acquire(&config.state_dir)?;
    let kek = Kek::load(&config.kek_path())?;
    let store = Store::open(&config.state_dir, kek)?;
    let stored = store
        .resource(resource)
        .ok_or_else(|| ServeError::NoSecret(format!("no resource {resource}")))?;
    if !stored.has_data() {
        return Err(ServeError::NoSecret(format!(
            "{resource} holds no secret yet: the broker generates it at its first release"
        )));
    }
    let audit = AuditLog::open(&config.state_dir)?;
    audit
        .record(
            audit::AuditEvent::new("export")
                .field("resource", resource.to_string())
                .field("by", "hsev-kbs resource export (offline)"),
        )
        .wait()?;
    Ok(store.unseal(&stored)?)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; stopping on SIGINT only");
            let _interrupted = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("stopping");
}

/// What `hsev-kbs init` made (and what it found already there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initialized {
    /// Files and folders created.
    pub created: Vec<PathBuf>,
    /// Files that existed and were left untouched.
    pub kept: Vec<PathBuf>,
}

/// Creates a state folder (0700) with a KEK (0600), a token-signing key
/// (0600), a self-signed TLS pair for `localhost`, `127.0.0.1`, `::1` and
/// `tls_names` (its key 0600) and a sample `kbs.toml`; never overwrites
/// anything.
pub fn init(state_dir: &Path, tls_names: &[String]) -> Result<Initialized, ServeError> {
    let mut done = Initialized {
        created: Vec::new(),
        kept: Vec::new(),
    };
    if state_dir.is_dir() {
        done.kept.push(state_dir.to_path_buf());
    } else {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(io(format!("creating {}", state_dir.display())))?;
        done.created.push(state_dir.to_path_buf());
    }
    let state_dir = std::fs::canonicalize(state_dir)
        .map_err(io(format!("resolving {}", state_dir.display())))?;
    let kek = state_dir.join("kek.bin");
    if kek.exists() {
        done.kept.push(kek);
    } else {
        Kek::create(&kek)?;
        done.created.push(kek);
    }
    let key = state_dir.join(token::SIGNING_KEY_FILE);
    if key.exists() {
        done.kept.push(key);
    } else {
        TokenSigner::create(&state_dir)?;
        done.created.push(key);
    }
    let tls_cert = state_dir.join(tls::TLS_DIR).join("cert.pem");
    if tls_cert.exists() {
        done.kept.push(tls_cert);
    } else {
        let (written, _pin) = tls::create_self_signed(&state_dir, tls_names)?;
        done.created.extend(written);
    }
    let sample = state_dir.join("kbs.toml");
    if sample.exists() {
        done.kept.push(sample);
    } else {
        std::fs::write(&sample, KbsConfig::sample(&state_dir))
            .map_err(io(format!("writing {}", sample.display())))?;
        done.created.push(sample);
    }
    Ok(done)
}
