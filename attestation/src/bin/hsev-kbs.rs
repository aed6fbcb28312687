//! `hsev-kbs`: HyperSEV's key broker (Trustee KBS protocol 0.4.0).
//!
//! ```text
//! hsev-kbs init --state-dir DIR        state folder, KEK, token key, TLS pair, sample config
//! hsev-kbs serve --config FILE         serve HTTPS until SIGTERM
//! hsev-kbs fingerprint --config FILE   the pin of its TLS key: sha256:<hex>
//! hsev-kbs resource export --config FILE --resource PATH --out FILE
//!                                      a secret, offline, by the broker's owner
//! hsev-kbs hash-token [--token-file F] SHA-256 of an admin token (stdin by default)
//! hsev-kbs audit verify --state-dir DIR
//! ```

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hsev_attestation::kbs::protocol::ResourcePath;
use hsev_attestation::kbs::server::audit::{self, AuditError, AUDIT_FILE};
use hsev_attestation::kbs::server::config::KbsConfig;
use hsev_attestation::kbs::server::{export_resource, init, serve, tls};
use zeroize::Zeroizing;

/// HyperSEV's key broker: verifies SEV-SNP evidence and releases each
/// resource only to guests its release policy accepts.
#[derive(Debug, Parser)]
#[command(name = "hsev-kbs", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the KBS protocol and the admin API over HTTPS until SIGTERM or
    /// SIGINT.
    Serve {
        /// The configuration file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Serve plain HTTP instead (development mode only: tokens travel in
        /// clear and guests cannot pin the broker).
        #[arg(long)]
        insecure_http_dev: bool,
    },
    /// Create a state folder: key-encryption key (0600), token-signing key
    /// (0600), a self-signed TLS certificate and key (0600) and a sample
    /// kbs.toml. Never overwrites anything.
    Init {
        /// The state folder to create.
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        /// Another name or address the TLS certificate names (besides
        /// localhost, 127.0.0.1 and ::1). Repeatable.
        #[arg(long, value_name = "NAME")]
        tls_name: Vec<String>,
    },
    /// Print the pin of the broker's TLS public key, `sha256:<hex>` of its
    /// certificate's SubjectPublicKeyInfo: what guests (`hsev vm create
    /// --key-broker-pin`) and clients pin.
    Fingerprint {
        /// The configuration file (its [tls] pair, or the state folder's).
        #[arg(long, value_name = "FILE", conflicts_with = "cert")]
        config: Option<PathBuf>,
        /// A certificate file (PEM) instead.
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
    },
    /// Print the SHA-256 (hex) of an admin token, for `admin_tokens` in the
    /// configuration. The token is read from standard input (first line) or
    /// a file, never from the command line.
    HashToken {
        /// Read the token from this file instead of standard input.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Audit log commands.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Resource commands, offline, for the broker's owner.
    #[command(subcommand)]
    Resource(ResourceCommand),
}

#[derive(Debug, Subcommand)]
enum ResourceCommand {
    /// Write a resource's secret to a new file (mode 0600), recorded in the
    /// audit log: a backup, or a check of what a host holds. Only while no
    /// broker serves the state folder.
    Export {
        /// The broker's configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The resource, REPOSITORY/TYPE/TAG.
        #[arg(long, value_name = "PATH")]
        resource: ResourcePath,
        /// The file to create (never over an existing one).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the whole hash chain of audit.jsonl: print the number of
    /// entries and the head hash, or exit 1 naming the first bad line.
    Verify {
        /// The broker's state folder.
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HSEV_KBS_LOG")
        .unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("hsev-kbs: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve {
            config,
            insecure_http_dev,
        } => {
            let mut config = KbsConfig::load(&config)?;
            if insecure_http_dev {
                config.insecure_http_dev = true;
                config.validate()?;
            }
            serve(&config)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Fingerprint { config, cert } => {
            let cert_file = match (config, cert) {
                (Some(config), None) => KbsConfig::load(&config)?.tls_files().cert_file,
                (None, Some(cert)) => cert,
                _ => anyhow::bail!("give --config FILE or --cert FILE"),
            };
            println!("{}", tls::fingerprint(&cert_file)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Init {
            state_dir,
            tls_name,
        } => {
            let done = init(&state_dir, &tls_name)?;
            for path in &done.created {
                println!("created {}", path.display());
            }
            for path in &done.kept {
                println!("kept    {}", path.display());
            }
            println!(
                "next: add an admin token to {} and run hsev-kbs serve --config {}",
                state_dir.join("kbs.toml").display(),
                state_dir.join("kbs.toml").display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::HashToken { token_file } => {
            let mut text = Zeroizing::new(String::new());
            match &token_file {
                Some(path) => {
                    *text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                }
                None => {
                    std::io::stdin()
                        .read_to_string(&mut text)
                        .context("reading the token from standard input")?;
                }
            }
            let token = text.lines().next().unwrap_or_default().trim();
            anyhow::ensure!(!token.is_empty(), "the token is empty");
            println!("{}", hex::encode(openssl::sha::sha256(token.as_bytes())));
            Ok(ExitCode::SUCCESS)
        }
        Command::Resource(ResourceCommand::Export {
            config,
            resource,
            out,
        }) => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let config = KbsConfig::load(&config)?;
            let secret = export_resource(&config, &resource)?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            file.write_all(&secret)
                .and_then(|()| file.sync_all())
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!(
                "wrote the {} bytes of {resource} to {}",
                secret.len(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(AuditCommand::Verify { state_dir }) => {
            match audit::verify(&state_dir.join(AUDIT_FILE)) {
                Ok(summary) => {
                    println!("entries {}", summary.entries);
                    println!("head {}", summary.head);
                    Ok(ExitCode::SUCCESS)
                }
                Err(error @ AuditError::Broken { .. }) => {
                    eprintln!("hsev-kbs: {error}");
                    Ok(ExitCode::FAILURE)
                }
                Err(error) => Err(error.into()),
            }
        }
    }
}
