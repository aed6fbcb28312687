//! `hsev vm`: confidential VMs on hsevd (`hsev.v1.VmService`).
//!
//! Long operations (create, start, stop, reboot, delete) print each
//! progress step on stderr as it arrives and the resulting VM on stdout,
//! as `show` prints it or, with `--output json`, as one JSON document.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use hsev_attestation::id_block::IdBlock;
use hsev_attestation::policy::AppraisalPolicy;
use hsev_attestation::report::{EvidenceCertificate, SnpEvidence};
use hsev_attestation::{tenant_attest, HexBytes};
use hsev_proto::v1::attestation_status::State as AttestationState;
use hsev_proto::v1::{
    AttestVmRequest, AttestationStatus, AttestationVerdict, ConfidentialMode, ConsoleRequest,
    CreateVmRequest, DeleteVmRequest, DiskSpec, HaPolicy, KeyBroker, ListVmsRequest,
    MigrateVmRequest, MinimumTcb, Placement, PortForward, RootOrigin, SetVmHaRequest,
    SetVmIdBlockRequest, StopVmRequest, Vm, VmRef, VmSpec, VmState, WaitVmRequest,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::attest::{appraise_with, evidence_endorsement, print_appraisal};
use super::client::{
    self, enum_name, follow_progress, hex_or_none, print_json, print_stdout, render_table,
    Connection, ConnectionArgs, Fields, RemoteError,
};
use super::idkey::{self, IdBlockFields};
use super::output::{InputError, OutputFormat};
use super::tenant::measure_vm;

/// `hsev vm ...` and its connection flags.
#[derive(Debug, Args)]
pub struct VmArgs {
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(subcommand)]
    command: VmCommand,
}

/// VM commands.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM: place it, prepare its disks, compute its expected
    /// launch measurement; `--start` starts it too.
    Create(Box<CreateArgs>),
    /// Start a stopped or failed VM (a new launch: the guest attests again).
    Start(VmName),
    /// Stop a VM: ACPI shutdown, killed after the timeout.
    Stop(StopArgs),
    /// Reboot a running VM (a new launch: the guest attests again).
    Reboot(VmName),
    /// Stop and delete a VM and its disks.
    Delete(DeleteArgs),
    /// List VMs: yours, or every VM for admins.
    List(ListArgs),
    /// Every field of a VM: spec, state, measurements, attestation.
    Show(VmName),
    /// Print a VM's serial console, raw, until it ends or Ctrl-C.
    Console(ConsoleArgs),
    /// Wait until a VM reaches a state; exit 1 on timeout.
    Wait(WaitArgs),
    /// Compute a VM's launch measurement here, from your own copy of its
    /// image, beside the host's figure; exit 1 if they differ.
    Measure(MeasureVmArgs),
    /// Move a VM to another host (admins): cold, as SEV and SNP guests
    /// cannot live-migrate; a running VM stops, its disks move, and it
    /// starts there as a new, attested launch.
    Migrate(MigrateArgs),
    /// Verify your running sev-snp VM yourself: send a fresh nonce, get the
    /// guest's evidence through the host, judge it here with your policy
    /// (every check named); exit 0 accepted, 1 refused.
    Attest(AttestArgs),
    /// Set the owner's SNP ID block of a stopped sev-snp VM (signed here
    /// with your ID key over the measurement computed here), or remove it.
    IdBlock(IdBlockArgs),
    /// Make a VM what its spec file says (TOML or JSON): create it, change
    /// its labels, leave it as it is, or re-create it with --recreate; says
    /// which.
    Apply(super::vm_apply::ApplyArgs),
    /// One line and an exit code: 0 running (its disk key released, if it
    /// has an encrypted disk), 1 stopped or absent, 2 anything else.
    Status(super::vm_status::StatusArgs),
    /// Set what the pool does with a VM that is not running when its host
    /// fails: restart it elsewhere (`--ha restart`) or not (`--ha none`).
    Set(SetArgs),
}

/// What the pool does with a VM whose host fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum HaArg {
    /// Nothing: the VM is marked lost.
    #[default]
    None,
    /// Its host fences it and the pool starts it on another host (a fresh
    /// launch, a fresh attestation).
    Restart,
}

impl From<HaArg> for HaPolicy {
    fn from(ha: HaArg) -> Self {
        match ha {
            HaArg::None => HaPolicy::None,
            HaArg::Restart => HaPolicy::Restart,
        }
    }
}

/// `hsev vm set`.
#[derive(Debug, Args)]
pub struct SetArgs {
    /// Id or name of a VM that is not running.
    vm: String,
    /// What the pool does when its host fails.
    #[arg(long, value_enum)]
    ha: HaArg,
    /// Among HA VMs restarted after a host failure, higher first.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    ha_priority: i32,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// How a VM's memory is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// An ordinary VM: the host can read its memory.
    None,
    /// AMD SEV: memory encrypted.
    Sev,
    /// AMD SEV-ES: memory and register state encrypted.
    SevEs,
    /// AMD SEV-SNP: encryption, integrity and attestation.
    SevSnp,
}

impl From<Mode> for ConfidentialMode {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::None => ConfidentialMode::None,
            Mode::Sev => ConfidentialMode::Sev,
            Mode::SevEs => ConfidentialMode::SevEs,
            Mode::SevSnp => ConfidentialMode::SevSnp,
        }
    }
}

/// A VM state, as flags name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateArg {
    /// Disks are being prepared.
    Creating,
    /// Defined, not running.
    Stopped,
    /// Being started.
    Starting,
    /// Running.
    Running,
    /// Shutting down.
    Stopping,
    /// Died or could not start.
    Failed,
    /// Being deleted.
    Deleting,
    /// Its host failed and it was not restarted elsewhere.
    Lost,
}

impl From<StateArg> for VmState {
    fn from(state: StateArg) -> Self {
        match state {
            StateArg::Creating => VmState::Creating,
            StateArg::Stopped => VmState::Stopped,
            StateArg::Starting => VmState::Starting,
            StateArg::Running => VmState::Running,
            StateArg::Stopping => VmState::Stopping,
            StateArg::Failed => VmState::Failed,
            StateArg::Deleting => VmState::Deleting,
            StateArg::Lost => VmState::Lost,
        }
    }
}

/// `hsev vm create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Name, unique among your VMs: 1-63 of [a-z0-9-], starting with a letter.
    name: String,
    /// An id of yours for this create (default: a new one): run the same
    /// command again with the same id after a lost answer, and the VM is
    /// created once.
    #[arg(long, value_name = "ID")]
    request_id: Option<String>,
    /// Id or name of an imported image (`hsev image list`).
    #[arg(long, value_name = "IMAGE")]
    image: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    vcpus: u32,
    /// Memory in MiB.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..))]
    memory: u64,
    /// Memory protection.
    #[arg(long, value_enum)]
    mode: Mode,
    /// SEV-SNP guest policy in hex (e.g. 0x30000, the default: SMT allowed,
    /// no debug, no migration agent).
    #[arg(long, value_name = "HEX", value_parser = parse_policy)]
    policy: Option<u64>,
    /// An extra empty data disk, NAME:SIZE_MIB. Repeatable.
    #[arg(long = "disk", value_name = "NAME:SIZE_MIB", value_parser = parse_disk)]
    disks: Vec<DiskSpec>,
    /// Add a data disk of this size (MiB) that the guest encrypts (LUKS2)
    /// with a key only your key broker holds and releases to the attested
    /// guest; the host creates it empty and never sees the key (sev-snp
    /// only; needs --key-broker).
    #[arg(long, value_name = "SIZE_MIB", value_parser = clap::value_parser!(u64).range(1..))]
    encrypted_disk: Option<u64>,
    #[command(flatten)]
    key_broker: KeyBrokerArgs,
    #[command(flatten)]
    id_block: IdBlockSource,
    #[command(flatten)]
    placement: PlacementArgs,
    /// What the pool does when its host fails: `restart` it on another host
    /// (a fresh launch), or `none` (it is marked lost).
    #[arg(long, value_enum, default_value_t)]
    ha: HaArg,
    /// Among HA VMs restarted after a host failure, higher first.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    ha_priority: i32,
    /// Print why the VM went to its host and why every other host was not
    /// chosen.
    #[arg(long)]
    explain: bool,
    /// Forward a host loopback port to a guest port, HOSTPORT:GUESTPORT
    /// (host port 0 picks a free one). Repeatable.
    #[arg(long = "forward", value_name = "HOSTPORT:GUESTPORT", value_parser = parse_forward)]
    forwards: Vec<PortForward>,
    /// vCPU model the measurement uses (e.g. EPYC-v4); default: the host's.
    #[arg(long, value_name = "TYPE")]
    vcpu_type: Option<String>,
    /// A label, KEY=VALUE (the one thing that changes after creation, with
    /// `hsev vm apply`). Repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Start the VM once created.
    #[arg(long)]
    start: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// Where a VM may be placed.
#[derive(Debug, Clone, Args)]
pub struct PlacementArgs {
    /// Place it on this host only (still checked by every filter).
    #[arg(long = "host", value_name = "NAME")]
    host: Option<String>,
    /// A label the host must carry (hsevd.toml `labels`). Repeatable.
    #[arg(long = "host-label", value_name = "LABEL")]
    host_labels: Vec<String>,
    /// Never on a host holding a VM of this group.
    #[arg(long, value_name = "GROUP")]
    anti_affinity: Option<String>,
    /// On the host of this group's VMs, when there are some.
    #[arg(long, value_name = "GROUP")]
    affinity: Option<String>,
    /// A host running this hypervisor driver (qemu, libvirt).
    #[arg(long = "driver", value_name = "DRIVER")]
    driver: Option<String>,
    /// The lowest TCB the host may report, e.g. `snp=22,bl=10` (any of
    /// fmc, bl, tee, snp, ucode).
    #[arg(long, value_name = "TCB", value_parser = parse_minimum_tcb)]
    min_tcb: Option<MinimumTcb>,
}

impl PlacementArgs {
    fn to_proto(&self) -> Placement {
        Placement {
            host: self.host.clone().unwrap_or_default(),
            labels: self.host_labels.clone(),
            anti_affinity: self.anti_affinity.clone().unwrap_or_default(),
            affinity: self.affinity.clone().unwrap_or_default(),
            driver: self.driver.clone().unwrap_or_default(),
            minimum_tcb: self.min_tcb,
        }
    }
}

/// `fmc=..,bl=..,tee=..,snp=..,ucode=..`, any subset.
pub(crate) fn parse_minimum_tcb(text: &str) -> Result<MinimumTcb, String> {
    let mut tcb = MinimumTcb::default();
    for part in text.split(',') {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not NAME=VALUE"))?;
        let value: u32 = value
            .trim()
            .parse()
            .ok()
            .filter(|value| *value <= 255)
            .ok_or_else(|| format!("{name}: {value:?} is not a number 0-255"))?;
        let slot = match name.trim() {
            "fmc" => &mut tcb.fmc,
            "bl" | "bootloader" => &mut tcb.bootloader,
            "tee" => &mut tcb.tee,
            "snp" => &mut tcb.snp,
            "ucode" | "microcode" => &mut tcb.microcode,
            other => {
                return Err(format!(
                    "unknown TCB component {other:?} (fmc, bl, tee, snp, ucode)"
                ))
            }
        };
        *slot = Some(value);
    }
    Ok(tcb)
}

/// The tenant's key broker, as the guest reaches it.
#[derive(Debug, Clone, Args)]
pub struct KeyBrokerArgs {
    /// Your key broker's URL as the guest reaches it (https://...; http://
    /// only for a development broker).
    #[arg(long = "key-broker", value_name = "URL", env = "HSEV_KEY_BROKER")]
    url: Option<String>,
    /// SHA-256 of its TLS public key, sha256:<64 hex> (`hsev-kbs
    /// fingerprint`): the guest refuses any other broker.
    #[arg(
        long = "key-broker-pin",
        value_name = "PIN",
        env = "HSEV_KEY_BROKER_PIN"
    )]
    pin: Option<String>,
    /// Your repository at the broker (the disk key is
    /// REPOSITORY/disk-key/<vm id>).
    #[arg(
        long = "key-broker-repository",
        value_name = "NAME",
        env = "HSEV_KEY_BROKER_REPOSITORY"
    )]
    repository: Option<String>,
}

impl KeyBrokerArgs {
    /// The binding as the launch code measures it.
    fn binding(&self) -> Result<Option<crate::model::KeyBrokerBinding>, RemoteError> {
        Ok(self
            .to_proto()?
            .map(|broker| crate::model::KeyBrokerBinding {
                guest_url: broker.url,
                pin: broker.pin,
                repository: broker.repository,
            }))
    }

    fn to_proto(&self) -> Result<Option<KeyBroker>, RemoteError> {
        match (&self.url, &self.repository) {
            (None, None) if self.pin.is_none() => Ok(None),
            (Some(url), Some(repository)) => Ok(Some(KeyBroker {
                url: url.clone(),
                pin: self.pin.clone().unwrap_or_default(),
                repository: repository.clone(),
            })),
            _ => Err(RemoteError::Input(
                "--key-broker and --key-broker-repository go together (with --key-broker-pin \
                 for an https broker)"
                    .into(),
            )),
        }
    }
}

/// Where a VM's ID block comes from: signed here, or handed over signed.
#[derive(Debug, Clone, Args)]
pub struct IdBlockSource {
    /// Sign an ID block with this ID key (`hsev idkey generate`) over the
    /// launch measurement computed here from --image-manifest.
    #[arg(
        long,
        value_name = "FILE",
        requires = "image_manifest",
        conflicts_with = "id_block"
    )]
    id_key: Option<PathBuf>,
    /// An author key that signs the ID key.
    #[arg(long, value_name = "FILE", requires = "id_key")]
    author_key: Option<PathBuf>,
    /// Your copy of the VM's image (its manifest.json or folder).
    #[arg(long, value_name = "FILE")]
    image_manifest: Option<PathBuf>,
    #[command(flatten)]
    fields: IdBlockFields,
    /// A pre-signed ID_BLOCK (96 bytes, `hsev idblock sign`).
    #[arg(long, value_name = "FILE", requires = "id_auth")]
    id_block: Option<PathBuf>,
    /// Its ID_AUTH_INFO (4096 bytes).
    #[arg(long, value_name = "FILE", requires = "id_block")]
    id_auth: Option<PathBuf>,
}

impl IdBlockSource {
    fn given(&self) -> bool {
        self.id_key.is_some() || self.id_block.is_some()
    }
}

/// `hsev vm measure`.
#[derive(Debug, Args)]
pub struct MeasureVmArgs {
    /// Id or name of the VM.
    vm: String,
    /// Your copy of the VM's image (its manifest.json or folder).
    #[arg(long, value_name = "FILE")]
    image_manifest: PathBuf,
    /// The key broker you gave the VM (measured on its command line);
    /// without it, the host's word is measured.
    #[command(flatten)]
    key_broker: KeyBrokerArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// `hsev vm migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Id or name of the VM.
    vm: String,
    /// The target host [default: where placement sends it].
    #[arg(long, value_name = "HOST")]
    to: Option<String>,
    /// Ask for a live migration (refused for SEV and SNP guests, with why).
    #[arg(long)]
    live: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// `hsev vm attest`.
#[derive(Debug, Args)]
pub struct AttestArgs {
    /// Id or name of the VM.
    vm: String,
    /// Your copy of the VM's image: the measurement computed here from it
    /// is the one the evidence must carry.
    #[arg(long, value_name = "FILE")]
    image_manifest: Option<PathBuf>,
    /// The key broker you gave the VM (measured on its command line, so a
    /// host that points the guest elsewhere fails the measurement); without
    /// it, the host's word is measured.
    #[command(flatten)]
    key_broker: KeyBrokerArgs,
    /// Your appraisal policy (TOML); its report_data and host_data are set
    /// here to the nonce's binding and the VM's id.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Trust this simulated platform's roots (development pools only: a
    /// simulated Secure Processor gives no confidentiality). Repeatable.
    #[arg(long, value_name = "FILE")]
    sim_root: Vec<PathBuf>,
    /// Save the evidence, the nonce and the effective policy here, so that a
    /// third party can check them with `hsev attest verify`.
    #[arg(long, value_name = "DIR")]
    evidence_out: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// `hsev vm id-block`.
#[derive(Debug, Args)]
pub struct IdBlockArgs {
    /// Id or name of the VM.
    vm: String,
    #[command(flatten)]
    source: IdBlockSource,
    /// Remove the VM's ID block.
    #[arg(long, conflicts_with_all = ["id_key", "id_block"])]
    remove: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// A command on one VM.
#[derive(Debug, Args)]
pub struct VmName {
    /// Id or name of the VM.
    vm: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// `hsev vm stop`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// Id or name of the VM.
    vm: String,
    /// Kill at once, without ACPI shutdown.
    #[arg(long, conflicts_with = "timeout")]
    force: bool,
    /// Seconds to wait for ACPI shutdown before killing [default: 30].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u32).range(1..))]
    timeout: Option<u32>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// `hsev vm delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Id or name of the VM.
    vm: String,
    /// Overwrite the disks' contents before removing them.
    #[arg(long)]
    wipe: bool,
    /// Do not ask for confirmation (asked only when stdin is a terminal).
    #[arg(long, short = 'y')]
    yes: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// `hsev vm list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only VMs in this state.
    #[arg(long, value_enum)]
    state: Option<StateArg>,
    /// Only this owner's VMs (admins).
    #[arg(long, value_name = "OWNER")]
    owner: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// `hsev vm console`.
#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// Id or name of the VM.
    vm: String,
    /// Keep printing new output until the VM stops or Ctrl-C.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Start this many bytes from the end [default: from the start].
    #[arg(long, value_name = "BYTES")]
    tail: Option<u64>,
}

/// `hsev vm wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Id or name of the VM.
    vm: String,
    /// The state to wait for.
    #[arg(long, value_enum)]
    state: StateArg,
    /// Give up after this many seconds [default: 60].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u32).range(1..))]
    timeout: Option<u32>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// A guest policy in hex, with or without `0x`.
pub(crate) fn parse_policy(text: &str) -> Result<u64, String> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    u64::from_str_radix(digits, 16)
        .map_err(|_| "expected a hexadecimal guest policy, e.g. 0x30000".to_owned())
}

/// `NAME:SIZE_MIB`.
pub(crate) fn parse_disk(text: &str) -> Result<DiskSpec, String> {
    let (name, size) = text
        .rsplit_once(':')
        .ok_or_else(|| "expected NAME:SIZE_MIB, e.g. data:1024".to_owned())?;
    let size_mib: u64 = size
        .parse()
        .map_err(|_| format!("{size:?} is not a size in MiB"))?;
    if name.is_empty() || size_mib == 0 {
        return Err("expected NAME:SIZE_MIB with a name and a size of at least 1 MiB".into());
    }
    Ok(DiskSpec {
        name: name.to_owned(),
        size_mib,
    })
}

/// `HOSTPORT:GUESTPORT`.
pub(crate) fn parse_forward(text: &str) -> Result<PortForward, String> {
    let (host, guest) = text
        .split_once(':')
        .ok_or_else(|| "expected HOSTPORT:GUESTPORT, e.g. 2222:22".to_owned())?;
    let host_port: u16 = host
        .parse()
        .map_err(|_| format!("{host:?} is not a port (0-65535)"))?;
    let guest_port: u16 = guest
        .parse()
        .map_err(|_| format!("{guest:?} is not a port (1-65535)"))?;
    if guest_port == 0 {
        return Err("the guest port must be 1-65535".into());
    }
    Ok(PortForward {
        host_port: host_port.into(),
        guest_port: guest_port.into(),
    })
}

/// `KEY=VALUE`.
fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| "expected KEY=VALUE, e.g. team=db".to_owned())?;
    let labels = std::iter::once((key.to_owned(), value.to_owned())).collect();
    crate::model::check_labels(&labels)?;
    Ok((key.to_owned(), value.to_owned()))
}

/// Runs a VM command.
pub fn run(args: &VmArgs) -> ExitCode {
    match &args.command {
        VmCommand::Apply(apply) => {
            // The spec is checked before any connection: a bad one is
            // refused even when hsevd is unreachable.
            let desired = match super::vm_apply::load(apply) {
                Ok(desired) => desired,
                Err(error) => {
                    eprintln!("hsev: error: {error}");
                    return ExitCode::from(2);
                }
            };
            return client::run(&args.connection, async |connection| {
                super::vm_apply::execute(connection, apply, &desired).await
            });
        }
        VmCommand::Status(_) => {
            // Whatever goes wrong, the VM's status is unknown: 2.
            return client::run_with_exit_codes(
                &args.connection,
                async |connection| execute(connection, &args.command).await,
                |_| 2,
            );
        }
        _ => {}
    }
    if let VmCommand::Create(create) = &args.command {
        if create.policy.is_some() && create.mode == Mode::None {
            eprintln!("hsev: error: --policy applies to SEV modes only, not to --mode none");
            return ExitCode::from(2);
        }
    }
    if let VmCommand::Delete(delete) = &args.command {
        if !delete.yes && std::io::stdin().is_terminal() && !confirm_delete(delete) {
            eprintln!("hsev: VM {} not deleted", delete.vm);
            return ExitCode::from(1);
        }
    }
    client::run(&args.connection, async |connection| {
        execute(connection, &args.command).await
    })
}

/// Asks on the terminal; true for `y` or `yes`.
fn confirm_delete(args: &DeleteArgs) -> bool {
    let wipe = if args.wipe { ", wiping its disks" } else { "" };
    eprint!("delete VM {} and its disks{wipe}? [y/N] ", args.vm);
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    if std::io::stdin().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim().to_lowercase().as_str(), "y" | "yes")
}

async fn execute(connection: &Connection, command: &VmCommand) -> Result<ExitCode, RemoteError> {
    let mut vms = connection.vms();
    match command {
        VmCommand::Create(args) => {
            let key_broker = args.key_broker.to_proto()?;
            let request = CreateVmRequest {
                spec: Some(VmSpec {
                    name: args.name.clone(),
                    image: args.image.clone(),
                    vcpus: args.vcpus,
                    memory_mib: args.memory,
                    mode: ConfidentialMode::from(args.mode).into(),
                    guest_policy: args.policy.unwrap_or(0),
                    disks: args.disks.clone(),
                    port_forwards: args.forwards.clone(),
                    vcpu_type: args.vcpu_type.clone().unwrap_or_default(),
                    encrypted_disk_mib: args.encrypted_disk.unwrap_or(0),
                    key_resource: String::new(),
                    key_broker,
                    id_block: Vec::new(),
                    id_auth: Vec::new(),
                    placement: Some(args.placement.to_proto()),
                    ha: HaPolicy::from(args.ha).into(),
                    ha_priority: args.ha_priority,
                    labels: args.labels.iter().cloned().collect(),
                }),
                // With an ID block, started once it is set.
                start: args.start && !args.id_block.given(),
                request_id: args
                    .request_id
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            };
            let vm = follow_progress(vms.create_vm(request).await?).await?;
            if args.explain {
                if let Some(vm) = &vm {
                    eprintln!("{}", vm.placement);
                }
            }
            if !args.id_block.given() {
                return finish(vm, args.output);
            }
            let vm = vm.ok_or_else(|| RemoteError::Failed("hsevd sent no VM".into()))?;
            let mut vm =
                set_id_block(connection, &vm, &args.id_block, args.key_broker.binding()?).await?;
            if args.start {
                vm = follow_progress(vms.start_vm(vm_ref(&vm.id)).await?)
                    .await?
                    .unwrap_or(vm);
            }
            finish(Some(vm), args.output)
        }
        VmCommand::Measure(args) => {
            let vm = vms.get_vm(vm_ref(&args.vm)).await?.into_inner();
            let ours = measure_vm(
                &vm,
                &args.image_manifest,
                tenants_binding(&vm, &args.key_broker)?,
            )
            .map_err(|error| RemoteError::Input(error.0))?;
            let equal = ours.measurement == vm.expected_measurement;
            match args.output {
                OutputFormat::Json => print_json(&json!({
                    "vm": vm.id,
                    "computed_here": hex::encode(&ours.measurement),
                    "host_expected": hex::encode(&vm.expected_measurement),
                    "equal": equal,
                }))?,
                OutputFormat::Text => print_stdout(&format!(
                    "computed here:  {}\nhost expects:   {}\n{}\n",
                    hex::encode(&ours.measurement),
                    hex_or_none(&vm.expected_measurement).unwrap_or_else(|| "-".to_owned()),
                    if equal {
                        "EQUAL: the host computes what this image measures"
                    } else {
                        "DIFFERENT: pin the figure computed here, never the host's"
                    }
                ))?,
            }
            Ok(if equal {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        VmCommand::Attest(args) => attest(connection, args).await,
        VmCommand::Migrate(args) => {
            let request = MigrateVmRequest {
                vm: args.vm.clone(),
                to_host: args.to.clone().unwrap_or_default(),
                live: args.live,
            };
            let vm = follow_progress(connection.hosts().migrate_vm(request).await?).await?;
            finish(vm, args.output)
        }
        VmCommand::IdBlock(args) => {
            let vm = vms.get_vm(vm_ref(&args.vm)).await?.into_inner();
            let vm = if args.remove {
                let request = SetVmIdBlockRequest {
                    vm: vm.id.clone(),
                    id_block: Vec::new(),
                    id_auth: Vec::new(),
                };
                vms.set_vm_id_block(request).await?.into_inner()
            } else if args.source.given() {
                set_id_block(connection, &vm, &args.source, None).await?
            } else {
                return Err(RemoteError::Input(
                    "give --id-key (with --image-manifest), --id-block and --id-auth, or --remove"
                        .into(),
                ));
            };
            print_vm(&vm, args.output)?;
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Set(args) => {
            let request = SetVmHaRequest {
                vm: args.vm.clone(),
                ha: HaPolicy::from(args.ha).into(),
                ha_priority: args.ha_priority,
            };
            let vm = vms.set_vm_ha(request).await?.into_inner();
            print_vm(&vm, args.output)?;
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Start(args) => {
            let vm = follow_progress(vms.start_vm(vm_ref(&args.vm)).await?).await?;
            finish(vm, args.output)
        }
        VmCommand::Reboot(args) => {
            let vm = follow_progress(vms.reboot_vm(vm_ref(&args.vm)).await?).await?;
            finish(vm, args.output)
        }
        VmCommand::Stop(args) => {
            let request = StopVmRequest {
                vm: args.vm.clone(),
                force: args.force,
                timeout_seconds: args.timeout.unwrap_or(0),
            };
            let vm = follow_progress(vms.stop_vm(request).await?).await?;
            finish(vm, args.output)
        }
        VmCommand::Delete(args) => {
            let request = DeleteVmRequest {
                vm: args.vm.clone(),
                wipe_disks: args.wipe,
            };
            let vm = follow_progress(vms.delete_vm(request).await?).await?;
            // The VM is gone: its last state, if hsevd sent one, else a
            // note that it was deleted.
            match (vm, args.output) {
                (Some(vm), output) => print_vm(&vm, output)?,
                (None, OutputFormat::Json) => {
                    print_json(&json!({ "vm": args.vm, "deleted": true }))?;
                }
                (None, OutputFormat::Text) => print_stdout(&format!("deleted VM {}\n", args.vm))?,
            }
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::List(args) => {
            let request = ListVmsRequest {
                state: args
                    .state
                    .map_or(VmState::Unspecified, VmState::from)
                    .into(),
                owner: args.owner.clone().unwrap_or_default(),
            };
            let list = vms.list_vms(request).await?.into_inner();
            match args.output {
                OutputFormat::Json => {
                    print_json(&Value::Array(list.vms.iter().map(vm_json).collect()))?;
                }
                OutputFormat::Text if list.vms.is_empty() => eprintln!("no VMs"),
                OutputFormat::Text => print_stdout(&vm_table(&list.vms))?,
            }
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Show(args) => {
            let vm = vms.get_vm(vm_ref(&args.vm)).await?.into_inner();
            print_vm(&vm, args.output)?;
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Console(args) => console(connection, args).await,
        VmCommand::Apply(args) => {
            let desired = super::vm_apply::load(args)
                .map_err(|error| RemoteError::Input(error.to_string()))?;
            super::vm_apply::execute(connection, args, &desired).await
        }
        VmCommand::Status(args) => super::vm_status::execute(connection, args).await,
        VmCommand::Wait(args) => {
            let request = WaitVmRequest {
                vm: args.vm.clone(),
                state: VmState::from(args.state).into(),
                timeout_seconds: args.timeout.unwrap_or(0),
            };
            let vm = vms.wait_vm(request).await?.into_inner();
            print_vm(&vm, args.output)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `hsev vm attest`: a fresh nonce to the guest, its evidence judged here.
async fn attest(connection: &Connection, args: &AttestArgs) -> Result<ExitCode, RemoteError> {
    let input = |error: InputError| RemoteError::Input(error.0);
    let mut vms = connection.vms();
    let vm = vms.get_vm(vm_ref(&args.vm)).await?.into_inner();
    let mut policy = match &args.policy {
        Some(path) => {
            AppraisalPolicy::load(path).map_err(|error| RemoteError::Input(error.to_string()))?
        }
        None => AppraisalPolicy::default(),
    };
    if let Some(manifest) = &args.image_manifest {
        let ours =
            measure_vm(&vm, manifest, tenants_binding(&vm, &args.key_broker)?).map_err(input)?;
        let measurement: [u8; 48] = ours.measurement.as_slice().try_into().map_err(|_| {
            RemoteError::Input(format!("VM {} is not an sev-snp VM", ours.spec.name))
        })?;
        policy.allowed_measurements = vec![HexBytes(measurement)];
    }
    if !args.sim_root.is_empty() && !policy.allow_simulated {
        eprintln!(
            "hsev: --sim-root given: accepting simulated evidence (a development pool: NO \
             confidentiality)"
        );
        policy.allow_simulated = true;
    }
    let mut nonce = [0u8; tenant_attest::NONCE_LEN];
    openssl::rand::rand_bytes(&mut nonce)
        .map_err(|error| RemoteError::Failed(format!("no random nonce: {error}")))?;
    policy.report_data = Some(HexBytes(tenant_attest::report_data_for(&nonce)));
    policy.host_data = Some(HexBytes(openssl::sha::sha256(vm.id.as_bytes())));
    if policy.allowed_measurements.is_empty() && policy.allowed_id_key_digests.is_empty() {
        eprintln!(
            "hsev: warning: neither --image-manifest nor a policy pins a measurement or an ID \
             key: this checks that the guest is genuine, not what it runs"
        );
    }
    let request = AttestVmRequest {
        vm: vm.id.clone(),
        nonce: nonce.to_vec(),
    };
    let answer = vms.attest_vm(request).await?.into_inner();
    let evidence = SnpEvidence::from_json(answer.evidence_json.as_bytes()).map_err(|error| {
        RemoteError::Failed(format!("the guest's evidence does not parse: {error}"))
    })?;
    let (keys, crl) = evidence_endorsement(&evidence).map_err(input)?;
    let appraisal = appraise_with(
        &evidence,
        &keys,
        evidence.report.product(),
        crl.as_ref(),
        &args.sim_root,
        &policy,
        time::OffsetDateTime::now_utc(),
    )
    .map_err(input)?;
    if let Some(dir) = &args.evidence_out {
        save_evidence(dir, &answer.evidence_json, &evidence, &nonce, &policy).map_err(input)?;
    }
    print_appraisal(
        std::path::Path::new(&format!("VM {}", args.vm)),
        &appraisal,
        args.output,
    )
    .map_err(input)?;
    Ok(if appraisal.accepted() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Writes what a third party needs to check an attestation again: the
/// evidence as received, its report and signing certificate (the flat
/// folder `hsev attest verify --cert-dir` takes), the nonce and the policy.
fn save_evidence(
    dir: &std::path::Path,
    json: &str,
    evidence: &SnpEvidence,
    nonce: &[u8],
    policy: &AppraisalPolicy,
) -> Result<(), InputError> {
    std::fs::create_dir_all(dir)
        .map_err(|error| InputError(format!("cannot create {}: {error}", dir.display())))?;
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        ("evidence.json", json.as_bytes().to_vec()),
        ("report.bin", evidence.report.as_bytes().to_vec()),
        (
            "nonce.hex",
            format!("{}\n", hex::encode(nonce)).into_bytes(),
        ),
        ("policy.toml", policy.to_toml().into_bytes()),
    ];
    for certificate in &evidence.certificates {
        match certificate {
            EvidenceCertificate::Vcek(der) => files.push(("vcek.der", der.clone())),
            EvidenceCertificate::Vlek(der) => files.push(("vlek.der", der.clone())),
            _ => {}
        }
    }
    for (name, bytes) in files {
        let path = dir.join(name);
        std::fs::write(&path, bytes)
            .map_err(|error| InputError(format!("cannot write {}: {error}", path.display())))?;
    }
    Ok(())
}

/// The key broker binding to measure `vm` with: the tenant's flags, or, with
/// a warning, the host's word.
fn tenants_binding(
    vm: &Vm,
    flags: &KeyBrokerArgs,
) -> Result<Option<crate::model::KeyBrokerBinding>, RemoteError> {
    let binding = flags.binding()?;
    let host_names_one = vm
        .spec
        .as_ref()
        .is_some_and(|spec| spec.key_broker.is_some());
    if binding.is_none() && host_names_one {
        eprintln!(
            "hsev: warning: measuring the key broker the host says the guest uses; give \
             --key-broker, --key-broker-pin and --key-broker-repository (yours) to check it"
        );
    }
    Ok(binding)
}

/// Signs `vm`'s ID block with `source`'s ID key, over the measurement
/// computed here from its image manifest, and sets it (`hsev vm apply`);
/// with `key_broker` (the tenant's), the measurement names that broker.
pub(crate) async fn sign_id_block(
    connection: &Connection,
    vm: &Vm,
    source: &super::vm_spec::IdKeySource,
    key_broker: Option<&KeyBroker>,
) -> Result<Vm, RemoteError> {
    let source = IdBlockSource {
        id_key: Some(source.id_key.clone()),
        author_key: source.author_key.clone(),
        image_manifest: Some(source.image_manifest.clone()),
        fields: IdBlockFields {
            family_id: None,
            image_id: None,
            guest_svn: 0,
        },
        id_block: None,
        id_auth: None,
    };
    let binding = key_broker.map(|broker| crate::model::KeyBrokerBinding {
        guest_url: broker.url.clone(),
        pin: broker.pin.clone(),
        repository: broker.repository.clone(),
    });
    set_id_block(connection, vm, &source, binding).await
}

/// Signs (or reads) `vm`'s ID block and sets it; with `key_broker`, the
/// measurement it signs names that broker.
async fn set_id_block(
    connection: &Connection,
    vm: &Vm,
    source: &IdBlockSource,
    key_broker: Option<crate::model::KeyBrokerBinding>,
) -> Result<Vm, RemoteError> {
    let input = |error: InputError| RemoteError::Input(error.0);
    let (block, auth) = match (&source.id_key, &source.id_block, &source.id_auth) {
        (Some(id_key), _, _) => {
            let manifest = source
                .image_manifest
                .as_deref()
                .ok_or_else(|| RemoteError::Input("--id-key needs --image-manifest".into()))?;
            let ours = measure_vm(vm, manifest, key_broker).map_err(input)?;
            let launch_digest: [u8; 48] = ours.measurement.as_slice().try_into().map_err(|_| {
                RemoteError::Input(format!("VM {} is not an sev-snp VM", ours.spec.name))
            })?;
            eprintln!(
                "hsev: signing an ID block for measurement {} (computed here from {})",
                hex::encode(launch_digest),
                manifest.display()
            );
            let block = IdBlock {
                launch_digest,
                family_id: source.fields.family_id.unwrap_or_default(),
                image_id: source.fields.image_id.unwrap_or_default(),
                guest_svn: source.fields.guest_svn,
                policy: ours.spec.guest_policy,
            };
            let signed = idkey::sign(block, id_key, source.author_key.as_deref()).map_err(input)?;
            (
                signed.block.to_bytes().to_vec(),
                signed.auth_bytes().to_vec(),
            )
        }
        (None, Some(block), Some(auth)) => {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|error| {
                    RemoteError::Input(format!("cannot read {}: {error}", path.display()))
                })
            };
            (read(block)?, read(auth)?)
        }
        _ => {
            return Err(RemoteError::Input(
                "give --id-key (with --image-manifest), or --id-block and --id-auth".into(),
            ))
        }
    };
    let request = SetVmIdBlockRequest {
        vm: vm.id.clone(),
        id_block: block,
        id_auth: auth,
    };
    Ok(connection
        .vms()
        .set_vm_id_block(request)
        .await?
        .into_inner())
}

fn vm_ref(vm: &str) -> VmRef {
    VmRef { vm: vm.to_owned() }
}

/// Prints the VM a stream ended with; a stream without one is hsevd's
/// fault.
fn finish(vm: Option<Vm>, output: OutputFormat) -> Result<ExitCode, RemoteError> {
    let vm = vm.ok_or_else(|| {
        RemoteError::Failed("hsevd ended the operation without sending the VM".into())
    })?;
    print_vm(&vm, output)?;
    Ok(ExitCode::SUCCESS)
}

fn print_vm(vm: &Vm, output: OutputFormat) -> Result<(), RemoteError> {
    match output {
        OutputFormat::Json => print_json(&vm_json(vm)),
        OutputFormat::Text => print_stdout(&render_vm(vm)),
    }
}

/// Streams the console raw to stdout until it ends or Ctrl-C.
async fn console(connection: &Connection, args: &ConsoleArgs) -> Result<ExitCode, RemoteError> {
    let request = ConsoleRequest {
        vm: args.vm.clone(),
        follow: args.follow,
        tail_bytes: args.tail.unwrap_or(0),
    };
    let mut stream = connection.vms().stream_console(request).await?.into_inner();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut stdout = std::io::stdout().lock();
    loop {
        tokio::select! {
            chunk = stream.message() => {
                let Some(chunk) = chunk? else { break };
                match stdout.write_all(&chunk.data).and_then(|()| stdout.flush()) {
                    Ok(()) => {}
                    Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => break,
                    Err(error) => {
                        return Err(RemoteError::Failed(format!("cannot write to stdout: {error}")));
                    }
                }
            }
            _ = &mut interrupted => break,
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The name of a VM state number.
pub fn state_name(state: i32) -> String {
    match VmState::try_from(state) {
        Ok(VmState::Unspecified) => "-".to_owned(),
        Ok(state) => enum_name(state.as_str_name(), "VM_STATE_"),
        Err(_) => format!("unknown({state})"),
    }
}

/// The name of a confidential mode number.
pub fn mode_name(mode: i32) -> String {
    match ConfidentialMode::try_from(mode) {
        Ok(ConfidentialMode::Unspecified) => "-".to_owned(),
        Ok(mode) => enum_name(mode.as_str_name(), "CONFIDENTIAL_MODE_"),
        Err(_) => format!("unknown({mode})"),
    }
}

/// The name of an attestation state (`-` when there is none).
pub fn attestation_state_name(attestation: Option<&AttestationStatus>) -> String {
    let Some(attestation) = attestation else {
        return "-".to_owned();
    };
    match AttestationState::try_from(attestation.state) {
        Ok(AttestationState::Unspecified) => "-".to_owned(),
        Ok(state) => enum_name(state.as_str_name(), "STATE_"),
        Err(_) => format!("unknown({})", attestation.state),
    }
}

fn origin_name(origin: i32) -> String {
    match RootOrigin::try_from(origin) {
        Ok(RootOrigin::Amd) => "AMD roots".to_owned(),
        Ok(RootOrigin::Simulated) => "SIMULATED roots".to_owned(),
        Ok(RootOrigin::Unspecified) => "no verified chain".to_owned(),
        Err(_) => format!("unknown origin ({origin})"),
    }
}

/// Whether the launch digest equals the expected measurement, when both
/// are known.
fn measurements_equal(vm: &Vm) -> Option<bool> {
    (!vm.expected_measurement.is_empty() && !vm.launch_digest.is_empty())
        .then(|| vm.expected_measurement == vm.launch_digest)
}

/// Labels in key order (the API's map has none).
fn sorted_labels(
    labels: &std::collections::HashMap<String, String>,
) -> std::collections::BTreeMap<&String, &String> {
    labels.iter().collect()
}

fn forwards_text(forwards: &[PortForward]) -> String {
    if forwards.is_empty() {
        return "-".to_owned();
    }
    forwards
        .iter()
        .map(|forward| format!("{} -> {}", forward.host_port, forward.guest_port))
        .collect::<Vec<_>>()
        .join(", ")
}

fn forwards_json(forwards: &[PortForward]) -> Value {
    forwards
        .iter()
        .map(|forward| json!({ "host_port": forward.host_port, "guest_port": forward.guest_port }))
        .collect()
}

fn verdict_json(verdict: &AttestationVerdict) -> Value {
    json!({
        "accepted": verdict.accepted,
        "product": verdict.product,
        "origin": enum_name(
            RootOrigin::try_from(verdict.origin).unwrap_or_default().as_str_name(),
            "ROOT_ORIGIN_",
        ),
        "checks": verdict.checks.iter().map(|check| json!({
            "name": check.name,
            "passed": check.passed,
            "detail": check.detail,
        })).collect::<Vec<_>>(),
        "measurement": hex_or_none(&verdict.measurement),
        "report_data": hex_or_none(&verdict.report_data),
        "host_data": hex_or_none(&verdict.host_data),
    })
}

/// A VM as one JSON document, the enums by name and the bytes in hex.
pub fn vm_json(vm: &Vm) -> Value {
    let spec = vm.spec.clone().unwrap_or_default();
    let attestation = vm.attestation.as_ref();
    json!({
        "id": vm.id,
        "name": spec.name,
        "owner": vm.owner,
        "state": state_name(vm.state),
        "state_reason": vm.state_reason,
        "host": vm.host,
        "spec": {
            "name": spec.name,
            "image": spec.image,
            "vcpus": spec.vcpus,
            "memory_mib": spec.memory_mib,
            "mode": mode_name(spec.mode),
            "guest_policy": format!("{:#x}", spec.guest_policy),
            "vcpu_type": spec.vcpu_type,
            "disks": spec.disks.iter().map(|disk| json!({
                "name": disk.name,
                "size_mib": disk.size_mib,
            })).collect::<Vec<_>>(),
            "port_forwards": forwards_json(&spec.port_forwards),
            "encrypted_disk_mib": spec.encrypted_disk_mib,
            "key_resource": spec.key_resource,
            "ha": ha_name(spec.ha),
            "ha_priority": spec.ha_priority,
            "key_broker": spec.key_broker.as_ref().map(|broker| json!({
                "url": broker.url,
                "pin": broker.pin,
                "repository": broker.repository,
            })),
            "id_block": !spec.id_block.is_empty(),
            "labels": sorted_labels(&spec.labels)
                .into_iter()
                .map(|(key, value)| (key.clone(), Value::String(value.clone())))
                .collect::<serde_json::Map<String, Value>>(),
        },
        "expected_measurement": hex_or_none(&vm.expected_measurement),
        "launch_digest": hex_or_none(&vm.launch_digest),
        "measurements_equal": measurements_equal(vm),
        "simulated_firmware": vm.simulated_firmware,
        "attestation": attestation.map(|attestation| json!({
            "state": attestation_state_name(Some(attestation)),
            "reason": attestation.reason,
            "verdict": attestation.verdict.as_ref().map(verdict_json),
        })),
        "port_forwards": forwards_json(&vm.port_forwards),
        "placement": vm.placement,
        "created_at": vm.created_at,
        "updated_at": vm.updated_at,
    })
}

/// An HA policy as flags name it.
fn ha_name(ha: i32) -> &'static str {
    match HaPolicy::try_from(ha) {
        Ok(HaPolicy::Restart) => "restart",
        _ => "none",
    }
}

/// Every field of a VM, for people.
pub fn render_vm(vm: &Vm) -> String {
    let spec = vm.spec.clone().unwrap_or_default();
    let mut out = String::new();
    if vm.simulated_firmware {
        out.push_str("SIMULATED firmware: no confidentiality\n");
    }
    let mut fields = Fields::default();
    fields.add("name", &spec.name);
    fields.add("id", &vm.id);
    fields.add_nonempty("owner", &vm.owner);
    fields.add("state", state_name(vm.state));
    fields.add_nonempty("state reason", &vm.state_reason);
    fields.add("host", if vm.host.is_empty() { "-" } else { &vm.host });
    if spec.ha == HaPolicy::Restart as i32 {
        fields.add("ha", format!("restart (priority {})", spec.ha_priority));
    }
    fields.add("image", &spec.image);
    let vcpu_type = if spec.vcpu_type.is_empty() {
        "the host's vCPU type".to_owned()
    } else {
        spec.vcpu_type.clone()
    };
    fields.add("vcpus", format!("{} ({vcpu_type})", spec.vcpus));
    fields.add("memory", format!("{} MiB", spec.memory_mib));
    fields.add("mode", mode_name(spec.mode));
    if spec.mode != i32::from(ConfidentialMode::None) {
        let policy = if spec.guest_policy == 0 {
            "0x30000 (default)".to_owned()
        } else {
            format!("{:#x}", spec.guest_policy)
        };
        fields.add("guest policy", policy);
    }
    let disks = if spec.disks.is_empty() {
        "-".to_owned()
    } else {
        spec.disks
            .iter()
            .map(|disk| format!("{} {} MiB", disk.name, disk.size_mib))
            .collect::<Vec<_>>()
            .join(", ")
    };
    fields.add("disks", disks);
    if spec.encrypted_disk_mib > 0 {
        fields.add(
            "encrypted disk",
            format!(
                "{} MiB, LUKS2, key at the key broker as {}",
                spec.encrypted_disk_mib,
                if spec.key_resource.is_empty() {
                    "-"
                } else {
                    &spec.key_resource
                }
            ),
        );
    }
    if !spec.labels.is_empty() {
        fields.add(
            "labels",
            sorted_labels(&spec.labels)
                .into_iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    fields.add("forwards asked", forwards_text(&spec.port_forwards));
    fields.add("forwarded now", forwards_text(&vm.port_forwards));
    fields.add(
        "expected measurement",
        hex_or_none(&vm.expected_measurement).unwrap_or_else(|| "-".into()),
    );
    fields.add(
        "launch digest",
        hex_or_none(&vm.launch_digest).unwrap_or_else(|| "- (not launched yet)".into()),
    );
    fields.add(
        "measurements",
        match measurements_equal(vm) {
            Some(true) => "equal",
            Some(false) => "DIFFERENT: the launch did not measure what was expected",
            None => "not compared",
        },
    );
    let attestation = vm.attestation.as_ref();
    let mut state = attestation_state_name(attestation);
    if let Some(reason) = attestation
        .map(|a| a.reason.as_str())
        .filter(|r| !r.is_empty())
    {
        state = format!("{state}: {reason}");
    }
    fields.add("attestation", state);
    let verdict = attestation.and_then(|attestation| attestation.verdict.as_ref());
    let failed: Vec<_> = verdict
        .map(|verdict| {
            verdict
                .checks
                .iter()
                .filter(|check| !check.passed)
                .collect()
        })
        .unwrap_or_default();
    if let Some(verdict) = verdict {
        let product = if verdict.product.is_empty() {
            String::new()
        } else {
            format!("{}, ", verdict.product)
        };
        fields.add(
            "verdict",
            format!(
                "{} ({product}{}), {} of {} checks failed",
                if verdict.accepted {
                    "accepted"
                } else {
                    "REFUSED"
                },
                origin_name(verdict.origin),
                failed.len(),
                verdict.checks.len()
            ),
        );
    }
    if !vm.placement.is_empty() {
        fields.add(
            "placement",
            vm.placement.replace('\n', "\n                      "),
        );
    }
    fields.add("created", &vm.created_at);
    fields.add("updated", &vm.updated_at);
    out.push_str(&fields.render());
    let width = failed
        .iter()
        .map(|check| check.name.len())
        .max()
        .unwrap_or(0);
    for check in failed {
        out.push_str(&format!("  FAIL {:width$}  {}\n", check.name, check.detail));
    }
    out
}

/// The `list` table.
pub fn vm_table(vms: &[Vm]) -> String {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|vm| {
            let spec = vm.spec.clone().unwrap_or_default();
            let mut mode = mode_name(spec.mode);
            if vm.simulated_firmware {
                mode.push_str(" (sim)");
            }
            vec![
                vm.id.chars().take(8).collect(),
                spec.name,
                state_name(vm.state),
                mode,
                spec.vcpus.to_string(),
                format!("{} MiB", spec.memory_mib),
                if vm.host.is_empty() {
                    "-".to_owned()
                } else {
                    vm.host.clone()
                },
                attestation_state_name(vm.attestation.as_ref()),
            ]
        })
        .collect();
    render_table(
        &[
            "ID",
            "NAME",
            "STATE",
            "MODE",
            "VCPUS",
            "MEMORY",
            "HOST",
            "ATTESTATION",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use hsev_proto::v1::AttestationCheck;

    fn sample() -> Vm {
        Vm {
            id: "6f1c2a3b-0000-4000-8000-000000000001".into(),
            owner: "alice".into(),
            spec: Some(VmSpec {
                name: "web".into(),
                image: "debian".into(),
                vcpus: 2,
                memory_mib: 2048,
                mode: ConfidentialMode::SevSnp.into(),
                guest_policy: 0,
                disks: vec![DiskSpec {
                    name: "data".into(),
                    size_mib: 1024,
                }],
                port_forwards: vec![PortForward {
                    host_port: 0,
                    guest_port: 22,
                }],
                vcpu_type: "EPYC-v4".into(),
                encrypted_disk_mib: 0,
                key_resource: String::new(),
                key_broker: None,
                id_block: Vec::new(),
                id_auth: Vec::new(),
                placement: None,
                ha: HaPolicy::None.into(),
                ha_priority: 0,
                labels: [("team".to_owned(), "db".to_owned())].into_iter().collect(),
            }),
            state: VmState::Running.into(),
            state_reason: String::new(),
            host: "host-a".into(),
            expected_measurement: vec![0xab; 48],
            launch_digest: vec![0xcd; 48],
            simulated_firmware: true,
            attestation: Some(AttestationStatus {
                state: AttestationState::Refused.into(),
                reason: "measurement not allowed".into(),
                verdict: Some(AttestationVerdict {
                    accepted: false,
                    product: "genoa".into(),
                    origin: RootOrigin::Simulated.into(),
                    checks: vec![
                        AttestationCheck {
                            name: "signature".into(),
                            passed: true,
                            detail: "ok".into(),
                        },
                        AttestationCheck {
                            name: "measurement".into(),
                            passed: false,
                            detail: "cdcd... is not allowed".into(),
                        },
                    ],
                    ..AttestationVerdict::default()
                }),
            }),
            created_at: "2025-06-01T00:00:00Z".into(),
            updated_at: "2025-06-01T00:01:00Z".into(),
            port_forwards: vec![PortForward {
                host_port: 40123,
                guest_port: 22,
            }],
            placement: String::new(),
        }
    }

    #[test]
    fn show_names_every_field_and_the_simulated_firmware() {
        let text = render_vm(&sample());
        assert!(
            text.starts_with("SIMULATED firmware: no confidentiality\n"),
            "{text}"
        );
        for expected in [
            "name:                 web",
            "state:                running",
            "guest policy:         0x30000 (default)",
            "vcpus:                2 (EPYC-v4)",
            "disks:                data 1024 MiB",
            "labels:               team=db",
            "forwards asked:       0 -> 22",
            "forwarded now:        40123 -> 22",
            &format!("expected measurement: {}", "ab".repeat(48)),
            &format!("launch digest:        {}", "cd".repeat(48)),
            "measurements:         DIFFERENT",
            "attestation:          refused: measurement not allowed",
            "verdict:              REFUSED (genoa, SIMULATED roots), 1 of 2 checks failed",
            "  FAIL measurement  cdcd... is not allowed",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from\n{text}");
        }
    }

    #[test]
    fn json_names_enums_and_encodes_bytes_in_hex() {
        let value = vm_json(&sample());
        assert_eq!(value["state"], "running");
        assert_eq!(value["spec"]["mode"], "sev-snp");
        assert_eq!(value["spec"]["guest_policy"], "0x0");
        assert_eq!(value["launch_digest"], "cd".repeat(48));
        assert_eq!(value["measurements_equal"], false);
        assert_eq!(value["attestation"]["state"], "refused");
        assert_eq!(value["attestation"]["verdict"]["origin"], "simulated");
        assert_eq!(value["port_forwards"][0]["host_port"], 40123);
        assert_eq!(value["spec"]["labels"]["team"], "db");
    }

    #[test]
    fn the_list_table_has_one_row_per_vm() {
        let mut stopped = sample();
        stopped.id = "0123456789".into();
        stopped.state = VmState::Stopped.into();
        stopped.simulated_firmware = false;
        stopped.attestation = None;
        stopped.host = String::new();
        let table = vm_table(&[sample(), stopped]);
        assert_eq!(
            table,
            "ID        NAME  STATE    MODE           VCPUS  MEMORY    HOST    ATTESTATION\n\
             6f1c2a3b  web   running  sev-snp (sim)  2      2048 MiB  host-a  refused\n\
             01234567  web   stopped  sev-snp        2      2048 MiB  -       -\n"
        );
    }

    #[test]
    fn flags_parse() {
        assert_eq!(parse_policy("0x30000"), Ok(0x30000));
        assert_eq!(parse_policy("30000"), Ok(0x30000));
        assert!(parse_policy("zz").is_err());
        assert_eq!(
            parse_disk("data:1024"),
            Ok(DiskSpec {
                name: "data".into(),
                size_mib: 1024
            })
        );
        assert!(parse_disk("data").is_err() && parse_disk("data:0").is_err());
        assert_eq!(
            parse_forward("0:22"),
            Ok(PortForward {
                host_port: 0,
                guest_port: 22
            })
        );
        assert!(parse_forward("2222:0").is_err() && parse_forward("70000:22").is_err());
    }
}
