//! `hsev`: the HyperSEV command line.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use hsev_xapi::cli::{
    attest, completions, firmware, host, idkey, image, kbs, measure, output, pool, slapos, vm,
};

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
    /// The owner's SNP ID and author keys, on the owner's machine.
    #[command(subcommand)]
    Idkey(idkey::IdKeyCommand),
    /// Sign SNP ID blocks that pin a launch, on the owner's machine.
    #[command(subcommand)]
    Idblock(idkey::IdBlockCommand),
    /// Confidential VMs on hsevd: create, start, stop, inspect, console.
    Vm(vm::VmArgs),
    /// The pool's hypervisor hosts and what they can run (admins).
    Host(host::HostArgs),
    /// The pool itself: join tokens for new hosts (admins).
    Pool(pool::PoolArgs),
    /// Guest images: import (admins), list, show.
    Image(image::ImageArgs),
    /// Your key broker: pin your VMs' release policies (tenants), announce
    /// a VM (the operator).
    Kbs(kbs::KbsArgs),
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
        Command::Idkey(command) => {
            idkey::run_idkey(&command).unwrap_or_else(|error| output::input_error_exit(&error))
        }
        Command::Idblock(command) => {
            idkey::run_idblock(&command).unwrap_or_else(|error| output::input_error_exit(&error))
        }
        Command::Vm(args) => vm::run(&args),
        Command::Host(args) => host::run(&args),
        Command::Pool(args) => pool::run(&args),
        Command::Image(args) => image::run(&args),
        Command::Kbs(args) => kbs::run(&args),
        Command::Slapos(command) => slapos::run(&command),
        Command::Completions(args) => completions::run(&args, &mut Cli::command()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand's arguments are well formed (unique names, no
    /// clashing flags): clap checks them only when a command is built.
    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
