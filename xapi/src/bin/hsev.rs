//! `hsev`: the HyperSEV command line.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use hsev_xapi::cli::{attest, completions, firmware, host, image, measure, output, slapos, vm};

/// HyperSEV: confidential virtual machines on AMD SEV-SNP.
#[derive(Debug, Parser)]
#[command(name = "hsev", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Verify and inspect SEV-SNP attestation evidence, offline.
    #[command(subcommand)]
    Attest(attest::AttestCommand),
    /// The SEV firmware of this host, real or simulated.
    #[command(subcommand)]
    Firmware(firmware::FirmwareCommand),
    /// Calculate the launch measurement of an SEV, SEV-ES or SEV-SNP guest
    /// (the flags, defaults and output of sev-snp-measure).
    Measure(measure::MeasureArgs),
    /// Confidential VMs on hsevd: create, start, stop, inspect, console.
    Vm(vm::VmArgs),
    /// The pool's hypervisor hosts and what they can run (admins).
    Host(host::HostArgs),
    /// Guest images: import (admins), list, show.
    Image(image::ImageArgs),
    /// HyperSEV as a compute node of a SlapOS master.
    #[command(subcommand)]
    Slapos(slapos::SlaposCommand),
    /// Print a shell completion script (bash, zsh, fish, ...).
    Completions(completions::CompletionsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Attest(command) => {
            attest::run(&command).unwrap_or_else(|error| output::input_error_exit(&error))
        }
        Command::Firmware(command) => {
            firmware::run(&command).unwrap_or_else(|error| output::input_error_exit(&error))
        }
        Command::Measure(args) => measure::run(&args),
        Command::Vm(args) => vm::run(&args),
        Command::Host(args) => host::run(&args),
        Command::Image(args) => image::run(&args),
        Command::Slapos(command) => slapos::run(&command),
        Command::Completions(args) => completions::run(&args, &mut Cli::command()),
    }
}
