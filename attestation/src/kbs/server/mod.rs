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
//! - [`store`]: SQLite, resource data sealed under the KEK;
//! - [`audit`]: the hash-chained, group-committed audit log;
//! - [`token`]: the ES256 attestation token (passport mode's bearer).
//!
//! The state folder holds `kbs.db` (+ WAL), `audit.jsonl`,
//! `token-signing-key.pem` and, by default, `kek.bin`.
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
pub mod sessions;
pub mod store;
pub mod token;

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use self::audit::{AuditError, AuditLog};
use self::broker::Broker;
use self::config::{ConfigError, KbsConfig, Mode};
use self::evidence::{load_simulated_root, EvidenceError, EvidenceVerifier};
use self::store::{Kek, Store, StoreError};
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

/// Opens everything the broker needs, refusing to start on any doubt
/// (KEK missing or too open, altered store, broken audit tail).
pub fn open_broker(config: &KbsConfig) -> Result<Broker, ServeError> {
    config.validate()?;
    if !config.state_dir.is_dir() {
        return Err(ServeError::Io {
            what: format!("state_dir {}", config.state_dir.display()),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not a folder (hsev-kbs init --state-dir creates it)",
            ),
        });
    }
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
    let audit = AuditLog::open(&config.state_dir)?;
    if config.admin_tokens.is_empty() {
        tracing::warn!("no admin_tokens configured: the admin API refuses every call");
    }
    Ok(Broker::new(config, verifier, store, audit, signer))
}

/// Serves until SIGTERM or SIGINT. Prints `hsev-kbs listening on
/// http://ADDR` on stdout once it accepts connections (the real port when
/// the configuration says port 0).
pub fn serve(config: &KbsConfig) -> Result<(), ServeError> {
    let broker = Arc::new(open_broker(config)?);
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
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "hsev-kbs listening on http://{address}")
            .and_then(|()| stdout.flush())
            .map_err(io("stdout"))?;
        drop(stdout);
        tracing::info!(%address, "serving");
        axum::serve(listener, http::router(broker))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(io("serving"))
    })
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
/// (0600) and a sample `kbs.toml`; never overwrites anything.
pub fn init(state_dir: &Path) -> Result<Initialized, ServeError> {
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
