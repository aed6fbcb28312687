//! `hsev-agent`: the HyperSEV agent inside a confidential guest.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hsev_agent::tsm::{TsmReporter, DEFAULT_ROOT};

/// HyperSEV guest agent.
#[derive(Debug, Parser)]
#[command(name = "hsev-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Get an SEV-SNP report bound to REPORT_DATA and print it as Trustee
    /// KBS JSON evidence (what `hsev attest verify --report` accepts).
    Evidence {
        /// 64 bytes (128 hex digits) to bind into the report.
        #[arg(long, value_name = "HEX")]
        report_data: String,
        /// The VMPL to request the report at.
        #[arg(long, default_value_t = 0)]
        vmpl: u32,
        /// Write the evidence here instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// The configfs-tsm report folder.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_ROOT)]
        tsm: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Evidence {
            report_data,
            vmpl,
            out,
            tsm,
        } => {
            let report_data: [u8; 64] = hex::decode(&report_data)
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .context("--report-data must be 128 hex digits (64 bytes)")?;
            let evidence = TsmReporter::new(tsm)?.evidence(&report_data, vmpl)?;
            let json = serde_json::to_string(&evidence.to_json())?;
            match out {
                Some(path) => std::fs::write(&path, json)
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => println!("{json}"),
            }
        }
    }
    Ok(())
}
