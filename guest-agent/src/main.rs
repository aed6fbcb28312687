//! `hsev-agent`: the HyperSEV agent inside a confidential guest.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hsev_agent::{evidence, open_reporter, Device};
use hsev_attestation::firmware::guest::tsm::DEFAULT_TSM_ROOT;

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
        /// The way to the Secure Processor: `auto` takes /dev/sev-guest
        /// when it exists, else configfs-tsm.
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// The configfs-tsm report folder.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_TSM_ROOT)]
        tsm: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Evidence {
            report_data,
            vmpl,
            out,
            device,
            tsm,
        } => {
            let report_data: [u8; 64] = hex::decode(&report_data)
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .context("--report-data must be 128 hex digits (64 bytes)")?;
            let mut reporter = open_reporter(device, &tsm)?;
            let evidence = evidence(reporter.as_mut(), &report_data, vmpl)?;
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
