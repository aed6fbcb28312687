//! `hsevd`: the HyperSEV host agent and pool coordinator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hsev_xapi::daemon::{self, config::Config};

/// HyperSEV daemon: runs confidential VMs on this host and serves the
/// hsev.v1 API.
#[derive(Debug, Parser)]
#[command(name = "hsevd", version, about)]
struct Cli {
    /// The configuration file (TOML).
    #[arg(long, value_name = "FILE", env = "HSEVD_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides `state_dir`.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Overrides `socket`.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Overrides `listen` (gRPC over TLS).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Overrides `metrics_listen`.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Overrides `firmware.simulated_dir`: use the simulated Secure
    /// Processor kept there (NO confidentiality).
    #[arg(long, value_name = "DIR")]
    simulated_firmware: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the sha256 a `[[tokens]]` entry needs, for a token read from stdin.
    HashToken,
    /// Join a pool with a token from `hsev pool join-token create`: makes
    /// this host's key (it never leaves the host), has the pool's CA sign
    /// its certificate, and keeps both in `<state_dir>/pool/`. Then run
    /// hsevd as usual. Needs `host_name` and `[pool] listen` in the config.
    Join {
        /// The join token.
        token: String,
    },
    /// Move this coordinator's pool from its SQLite store
    /// (`<state_dir>/hsevd.db`) to the etcd cluster `[store]` names
    /// (`kind = "etcd"`), every record read back and compared before it
    /// says done. Stop hsevd first; the SQLite file is left as it was.
    MigrateStore,
}

fn load(cli: &Cli) -> Result<Config, String> {
    let mut config = match &cli.config {
        Some(path) => Config::load(path).map_err(|error| error.to_string())?,
        None => {
            let state_dir = cli
                .state_dir
                .clone()
                .ok_or("pass --config FILE or --state-dir DIR")?;
            toml::from_str::<Config>(&format!(
                "state_dir = {:?}",
                state_dir.display().to_string()
            ))
            .map_err(|error| error.to_string())?
        }
    };
    if let Some(state_dir) = &cli.state_dir {
        config.state_dir = state_dir.clone();
    }
    if cli.socket.is_some() {
        config.socket = cli.socket.clone();
    }
    if cli.listen.is_some() {
        config.listen = cli.listen;
    }
    if cli.metrics_listen.is_some() {
        config.metrics_listen = cli.metrics_listen;
    }
    if cli.simulated_firmware.is_some() {
        config.firmware.simulated_dir = cli.simulated_firmware.clone();
    }
    config.validate().map_err(|error| error.to_string())?;
    Ok(config)
}

fn init_logging(format: daemon::config::LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("HSEVD_LOG").unwrap_or_else(|_| "info".into());
    // Colours only for a person at a terminal: files and journals get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        daemon::config::LogFormat::Json => builder.json().init(),
        daemon::config::LogFormat::Text => builder.init(),
    }
}

/// `hsevd join TOKEN`.
fn join(config: &Config, token: &str) -> ExitCode {
    let (Some(name), Some(listen)) = (&config.host_name, config.pool.listen) else {
        eprintln!(
            "hsevd: error: joining a pool needs host_name (this host's name in the pool) and \
             [pool] listen (where the coordinator reaches this host's agent) in the configuration"
        );
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("hsevd: error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(hsev_xapi::pool::member::join(
        &config.state_dir,
        token,
        name,
        &listen.to_string(),
    )) {
        Ok(member) => {
            println!(
                "joined pool {} as {}; the coordinator is at {}; start hsevd",
                member.pool, member.name, member.coordinator
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("hsevd: error: {error}");
            ExitCode::from(if error.kind == hsev_xapi::daemon::error::Kind::Internal {
                1
            } else {
                2
            })
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::HashToken) = cli.command {
        let mut token = String::new();
        if std::io::stdin().read_line(&mut token).is_err() || token.trim().is_empty() {
            eprintln!("hsevd: error: no token on stdin");
            return ExitCode::from(2);
        }
        println!(
            "{}",
            hex::encode(openssl::sha::sha256(token.trim().as_bytes()))
        );
        return ExitCode::SUCCESS;
    }
    let config = match load(&cli) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("hsevd: error: {error}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_format);
    if let Some(Command::Join { token }) = &cli.command {
        return join(&config, token);
    }
    if let Some(Command::MigrateStore) = &cli.command {
        return match daemon::migrate_store(&config) {
            Ok(report) => {
                println!("moved to {}: {report}", config.store.endpoints.join(","));
                println!("join tokens are not carried over: create new ones");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("hsevd: error: {error:#}");
                ExitCode::from(2)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("hsevd: error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("hsevd: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
