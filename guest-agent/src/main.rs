//! `hsev-agent`: the HyperSEV agent inside a confidential guest.
//!
//! `evidence` prints an SNP report as Trustee JSON evidence; `unlock` (what
//! the image's /init runs when the kernel command line has `hsev.kbs=`)
//! attests to the key broker, unlocks and mounts the data disk, and, for a
//! single-instance key, starts `keep-lease` in the background, which renews
//! the key's lease or powers the guest off.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use hsev_agent::keeper::{self, Fence, GuestFence};
use hsev_agent::settings::{parse_timeout, UnlockOptions, UnlockSettings};
use hsev_agent::status::{StatusPort, VIRTIO_PORTS};
use hsev_agent::unlock::KbsBroker;
use hsev_agent::{evidence, open_reporter, responder, say, unlock, Device};
use hsev_attestation::firmware::channel::find_port;
use hsev_attestation::firmware::guest::tsm::DEFAULT_TSM_ROOT;
use hsev_attestation::kbs::client::Lease;
use hsev_attestation::tenant_attest::PORT_NAME as ATTEST_PORT_NAME;

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
        /// when it exists, else the simulated port, else configfs-tsm.
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// The configfs-tsm report folder.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_TSM_ROOT)]
        tsm: PathBuf,
    },
    /// Attest to the key broker, get the data disk's key, unlock the LUKS2
    /// disk whose serial is `hsev-data`, mount it and log the boot on it.
    /// Settings come from the kernel command line (hsev.kbs=, hsev.kbs.pin=,
    /// hsev.kbs.resource=, hsev.kbs.timeout=, hsev.data.mount=); a flag
    /// overrides its option. Exits 3 when the key broker refuses, 1 on any
    /// other failure.
    Unlock {
        /// The key broker's URL (hsev.kbs=).
        #[arg(long, value_name = "URL")]
        kbs: Option<String>,
        /// The pin of its TLS public key, sha256:<hex> (hsev.kbs.pin=).
        #[arg(long, value_name = "PIN")]
        kbs_pin: Option<String>,
        /// The disk key's resource, repository/type/tag (hsev.kbs.resource=).
        #[arg(long, value_name = "PATH")]
        resource: Option<String>,
        /// Seconds to retry an unreachable key broker (hsev.kbs.timeout=,
        /// default 300).
        #[arg(long, value_name = "SECONDS", value_parser = parse_timeout_flag)]
        timeout: Option<std::time::Duration>,
        /// Where to mount the unlocked disk (hsev.data.mount=, default
        /// /mnt/data).
        #[arg(long, value_name = "DIR")]
        mount: Option<PathBuf>,
        /// The kernel command line to read the settings from.
        #[arg(long, value_name = "FILE", default_value = "/proc/cmdline")]
        cmdline: PathBuf,
        /// The way to the Secure Processor.
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// The configfs-tsm report folder.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_TSM_ROOT)]
        tsm: PathBuf,
    },
    /// Keep the lease of a single-instance disk key that `unlock` got: renew
    /// it with fresh evidence every third of the lease; unmount the disk
    /// and power the guest off if it cannot be renewed in time or the
    /// broker refuses it. `unlock` starts it; settings as for `unlock`.
    KeepLease {
        /// The lease's length.
        #[arg(long, value_name = "SECONDS")]
        lease_seconds: u32,
        /// Fence in this many milliseconds unless the lease is renewed.
        #[arg(long, value_name = "MS")]
        fence_in_ms: u64,
        /// The key broker's URL (hsev.kbs=).
        #[arg(long, value_name = "URL")]
        kbs: Option<String>,
        /// The pin of its TLS public key (hsev.kbs.pin=).
        #[arg(long, value_name = "PIN")]
        kbs_pin: Option<String>,
        /// The disk key's resource (hsev.kbs.resource=).
        #[arg(long, value_name = "PATH")]
        resource: Option<String>,
        /// Where the unlocked disk is mounted (hsev.data.mount=).
        #[arg(long, value_name = "DIR")]
        mount: Option<PathBuf>,
        /// The kernel command line to read the settings from.
        #[arg(long, value_name = "FILE", default_value = "/proc/cmdline")]
        cmdline: PathBuf,
        /// The way to the Secure Processor.
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// The configfs-tsm report folder.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_TSM_ROOT)]
        tsm: PathBuf,
    },
    /// Answer the tenant's attestation requests (`hsev vm attest`) on the
    /// virtio-serial port org.hypersev.attest.0 until the guest stops;
    /// exits 0 at once when the guest has no such port.
    Serve {
        /// The way to the Secure Processor.
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// The configfs-tsm report folder.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_TSM_ROOT)]
        tsm: PathBuf,
    },
}

fn parse_timeout_flag(value: &str) -> Result<std::time::Duration, String> {
    parse_timeout(value).map_err(|error| error.to_string())
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
        Command::Unlock {
            kbs,
            kbs_pin,
            resource,
            timeout,
            mount,
            cmdline,
            device,
            tsm,
        } => {
            let flags = UnlockOptions {
                kbs_url: kbs,
                pin: kbs_pin,
                resource,
                timeout,
                mount,
            };
            let code = run_unlock(&cmdline, flags, device, &tsm);
            std::process::exit(code);
        }
        Command::KeepLease {
            lease_seconds,
            fence_in_ms,
            kbs,
            kbs_pin,
            resource,
            mount,
            cmdline,
            device,
            tsm,
        } => {
            let fence_at = Instant::now() + Duration::from_millis(fence_in_ms);
            let flags = UnlockOptions {
                kbs_url: kbs,
                pin: kbs_pin,
                resource,
                timeout: None,
                mount,
            };
            let settings = resolve(&cmdline, flags).map_err(anyhow::Error::msg)?;
            let mut broker = KbsBroker::new(&settings.kbs_url, settings.pin, &settings.resource)?;
            // The Secure Processor is opened for each renewal, not held:
            // `hsev-agent serve` uses it too.
            let mut make_evidence = |report_data: &[u8; 64]| {
                let mut reporter =
                    open_reporter(device, &tsm).map_err(|error| error.to_string())?;
                evidence(reporter.as_mut(), report_data, 0)
                    .map(|evidence| evidence.to_json())
                    .map_err(|error| error.to_string())
            };
            let reason = keeper::keep(
                fence_at,
                Duration::from_secs(lease_seconds.into()),
                &mut broker,
                &mut make_evidence,
                Box::new(GuestFence {
                    mount: settings.mount,
                }),
            );
            anyhow::bail!("fenced ({reason}), yet the guest did not power off");
        }
        Command::Serve { device, tsm } => {
            let Ok(port) = find_port(Path::new(VIRTIO_PORTS), ATTEST_PORT_NAME) else {
                say("no attestation port: not answering attestation requests");
                return Ok(());
            };
            say(&format!(
                "answering attestation requests on {}",
                port.display()
            ));
            responder::serve(&port, &|| open_reporter(device, &tsm))
                .with_context(|| format!("the attestation port {} failed", port.display()))?;
        }
    }
    Ok(())
}

/// The settings of the kernel command line in `cmdline`, `flags` taking
/// precedence.
fn resolve(cmdline: &Path, flags: UnlockOptions) -> Result<UnlockSettings, String> {
    std::fs::read_to_string(cmdline)
        .map_err(|error| format!("cannot read {}: {error}", cmdline.display()))
        .and_then(|text| UnlockOptions::from_cmdline(&text).map_err(|error| error.to_string()))
        .and_then(|options| {
            options
                .overridden_by(flags)
                .settings()
                .map_err(|error| error.to_string())
        })
}

/// Starts `hsev-agent keep-lease` in the background for the lease the
/// unlock got (it outlives this process, on the console).
fn start_keeper(
    lease: &Lease,
    settings: &UnlockSettings,
    device: Device,
    tsm: &Path,
) -> std::io::Result<()> {
    let fence_in = keeper::fence_time(lease).saturating_duration_since(Instant::now());
    let device = device
        .to_possible_value()
        .map(|value| value.get_name().to_owned())
        .unwrap_or_else(|| "auto".to_owned());
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command
        .arg("keep-lease")
        .arg(format!("--lease-seconds={}", lease.grant.lease_seconds))
        .arg(format!("--fence-in-ms={}", fence_in.as_millis()))
        .arg(format!("--kbs={}", settings.kbs_url))
        .arg(format!("--resource={}", settings.resource))
        .arg("--mount")
        .arg(&settings.mount)
        .arg(format!("--device={device}"))
        .arg("--tsm")
        .arg(tsm)
        .stdin(std::process::Stdio::null());
    if let Some(pin) = settings.pin {
        command.arg(format!("--kbs-pin={pin}"));
    }
    command.spawn().map(drop)
}

/// `hsev-agent unlock`: every outcome on the console and the status port;
/// answers the exit status.
fn run_unlock(cmdline: &Path, flags: UnlockOptions, device: Device, tsm: &Path) -> i32 {
    let mut status = StatusPort::open(Path::new(VIRTIO_PORTS));
    let settings = resolve(cmdline, flags);
    let settings = match settings {
        Ok(settings) => settings,
        Err(error) => {
            say(&format!("no disk unlocked: {error}"));
            status.report(hsev_attestation::agent_status::AgentPhase::Failed, &error);
            return unlock::EXIT_FAILED;
        }
    };
    match unlock::run(&settings, device, tsm, &mut status) {
        Ok(unlocked) => {
            let Some(lease) = unlocked.lease else {
                return 0;
            };
            match start_keeper(&lease, &settings, device, tsm) {
                Ok(()) => {
                    say(&format!(
                        "{} is single-instance: keeping its {} s lease in the background; the \
                         guest powers off if it cannot renew it",
                        settings.resource, lease.grant.lease_seconds
                    ));
                    0
                }
                Err(error) => {
                    // Without a keeper the lease would lapse under a
                    // running guest: stop now rather than later.
                    let reason = format!("cannot start the lease keeper: {error}");
                    GuestFence {
                        mount: settings.mount,
                    }
                    .fence(&reason);
                    unlock::EXIT_FAILED
                }
            }
        }
        Err(error) => error.exit_code(),
    }
}
