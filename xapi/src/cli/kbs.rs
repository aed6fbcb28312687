//! `hsev kbs`: the tenant's side of its key broker, run on the tenant's
//! machine with the tenant's own broker token, and the operator's one call
//! there.
//!
//! - `policy set` computes the launch measurement of the tenant's VM from
//!   the tenant's own copy of the image ([`crate::cli::tenant`], the code
//!   hsevd runs too) and pins it as the release policy of the VM's disk key
//!   (`<repository>/disk-key/<vm id>`), with the VM's host_data binding and
//!   optionally its ID and author keys. The host's expected measurement,
//!   and the operator's announcement if there is one, are shown beside it
//!   as information, never used. A VM whose guest would fetch its key from
//!   another broker (another pin or repository in its measured command
//!   line) is refused: its measurement would pin the host's choice.
//! - `policy list` and `policy delete`: the tenant's policies, and the
//!   revocation of a disk key.
//! - `lease show` and `lease end`: which launch holds a single-instance
//!   disk key (`policy set --single-instance`), and the tenant's own end of
//!   that lease (the holder is refused from then on; the next launch may
//!   take the key).
//! - `announce` (the operator's token): says which image a VM boots and
//!   the measurement hsevd expects, for the tenant to compare.
//!
//! The broker is reached over HTTPS pinned by its public key
//! (`--broker-pin`, `hsev-kbs fingerprint`). This module never prints or
//! logs a token, and never handles a disk key: the broker generates it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use hsev_attestation::kbs::client::{AdminClient, ClientError, ResourcePath, SpkiPin};
use hsev_attestation::kbs::release_policy::{ReleasePolicy, SingleInstance};
use hsev_attestation::policy::AppraisalPolicy;
use hsev_attestation::HexBytes;
use hsev_proto::v1::{Vm, VmRef};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::client::{self, print_json, print_stdout, render_table, ConnectionArgs, RemoteError};
use super::output::OutputFormat;
use super::tenant::measure_vm;
use crate::model::DISK_KEY_TYPE;

/// How long one call to the broker may take.
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);

/// `hsev kbs ...` and its hsevd connection flags.
#[derive(Debug, Args)]
pub struct KbsArgs {
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(subcommand)]
    command: KbsCommand,
}

/// Key broker commands.
#[derive(Debug, Subcommand)]
pub enum KbsCommand {
    /// Release policies of your VMs' disk keys, at your own key broker.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Announce a VM at its tenant's key broker: the image it boots and the
    /// measurement hsevd expects (the operator's token; changes no release).
    Announce(AnnounceArgs),
    /// The lease of a single-instance disk key, at your own key broker.
    #[command(subcommand)]
    Lease(LeaseCommand),
}

/// `hsev kbs lease ...`.
#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Which launch (REPORT_ID, chip) holds the key, and until when.
    Show(LeaseArgs),
    /// End the lease: its holder is refused from now on (its guest powers
    /// off at its next renewal) and the next launch that passes the policy
    /// takes the key.
    End(LeaseArgs),
}

/// `hsev kbs lease show|end`.
#[derive(Debug, Args)]
pub struct LeaseArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// The disk key, REPOSITORY/disk-key/<vm id>.
    #[arg(long, value_name = "PATH")]
    resource: ResourcePath,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// `hsev kbs policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Pin the release policy of a VM's disk key: the launch measurement
    /// computed here from your copy of its image, its host_data, and
    /// optionally your ID key. The broker generates the key itself at the
    /// first release; a policy set again keeps it.
    Set(Box<PolicySetArgs>),
    /// The resources and policies of your repository.
    List(BrokerListArgs),
    /// Delete a disk key and its policy: the VM's disk can never be opened
    /// again.
    Delete(PolicyDeleteArgs),
}

/// Where the broker is and who calls it.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Your key broker's URL from this machine (https://HOST:PORT).
    #[arg(long, value_name = "URL", env = "HSEV_KBS_URL")]
    broker: String,
    /// The pin of its TLS public key, sha256:<hex> (`hsev-kbs
    /// fingerprint`); no certificate authority is trusted.
    #[arg(long, value_name = "PIN", env = "HSEV_KBS_PIN")]
    broker_pin: Option<SpkiPin>,
    /// The file holding your broker admin token (its first line).
    #[arg(long, value_name = "FILE", env = "HSEV_KBS_TOKEN_FILE")]
    broker_token_file: PathBuf,
}

/// `hsev kbs policy set`.
#[derive(Debug, Args)]
pub struct PolicySetArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Your repository at the broker (the disk key is
    /// REPOSITORY/disk-key/<vm id>).
    #[arg(long, value_name = "NAME")]
    repository: String,
    /// Id or name of the VM (as hsevd knows it).
    #[arg(long, value_name = "VM")]
    vm: String,
    /// Your copy of the VM's image (its manifest.json or folder).
    #[arg(long, value_name = "FILE")]
    image_manifest: PathBuf,
    /// The broker's URL as you gave it to the guest (`hsev vm create
    /// --key-broker`), measured on its command line; without it, the URL
    /// the host reports is measured (the pin and repository are checked
    /// against yours either way).
    #[arg(long, value_name = "URL", env = "HSEV_KEY_BROKER")]
    key_broker: Option<String>,
    /// The host_data the report must carry, 64 hex digits (default:
    /// SHA-256 of the VM id, what hsevd binds).
    #[arg(long, value_name = "HEX")]
    host_data: Option<HexBytes<32>>,
    /// Also require an ID block signed by this ID key (`hsev idkey
    /// digest`). Repeatable: any of them.
    #[arg(long, value_name = "HEX")]
    id_key_digest: Vec<HexBytes<48>>,
    /// Also require this author key (`hsev idkey digest`). Repeatable.
    #[arg(long, value_name = "HEX")]
    author_key_digest: Vec<HexBytes<48>>,
    /// A base appraisal policy (TOML: minimum TCB, products, ...); its
    /// measurements and host_data are replaced by the ones computed here.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Accept evidence from a simulated Secure Processor (a development
    /// pool: NO confidentiality; the broker must be in development mode).
    #[arg(long)]
    allow_simulated: bool,
    /// One live launch at a time: the launch the key is released to holds
    /// it for this many seconds, renewed by its agent; another launch (an
    /// HA restart elsewhere) gets it only once that lease lapses, and the
    /// guest powers itself off before then if it cannot renew.
    #[arg(long, value_name = "SECONDS")]
    single_instance: Option<u32>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// `hsev kbs policy list`.
#[derive(Debug, Args)]
pub struct BrokerListArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// `hsev kbs policy delete`.
#[derive(Debug, Args)]
pub struct PolicyDeleteArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Your repository at the broker (with --vm).
    #[arg(long, value_name = "NAME", requires = "vm")]
    repository: Option<String>,
    /// Id or name of the VM whose disk key goes (with --repository).
    #[arg(long, value_name = "VM", conflicts_with = "resource")]
    vm: Option<String>,
    /// The resource to delete, REPOSITORY/TYPE/TAG, instead.
    #[arg(long, value_name = "PATH")]
    resource: Option<ResourcePath>,
}

/// `hsev kbs announce`.
#[derive(Debug, Args)]
pub struct AnnounceArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Id or name of the VM.
    #[arg(long, value_name = "VM")]
    vm: String,
    /// The tenant's repository (default: the one its guest's command line
    /// names).
    #[arg(long, value_name = "NAME")]
    repository: Option<String>,
}

/// Runs a key broker command.
pub fn run(args: &KbsArgs) -> ExitCode {
    match &args.command {
        // The tenant's own repository: no hsevd involved.
        KbsCommand::Policy(PolicyCommand::List(list)) => broker_only(policy_list(list)),
        KbsCommand::Lease(LeaseCommand::Show(lease)) => broker_only(lease_show(lease, false)),
        KbsCommand::Lease(LeaseCommand::End(lease)) => broker_only(lease_show(lease, true)),
        command => client::run(&args.connection, async |connection| {
            with_hsevd(connection, command).await
        }),
    }
}

/// The exit of a command that talks to the broker only.
fn broker_only(result: Result<ExitCode, RemoteError>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("hsev: error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

/// `hsev kbs lease show` (or, with `end`, `lease end`).
fn lease_show(args: &LeaseArgs, end: bool) -> Result<ExitCode, RemoteError> {
    let broker = admin(&args.broker)?;
    let holder = if end {
        broker.end_lease(&args.resource)
    } else {
        broker.lease(&args.resource)
    }
    .map_err(|error| broker_error(&args.broker, &error))?;
    match args.output {
        OutputFormat::Json => print_json(&json!({
            "resource": holder.resource,
            "report_id": holder.report_id,
            "chip_id": holder.chip_id,
            "measurement": holder.measurement,
            "since": holder.since,
            "expires_at": holder.expires_at,
            "live": holder.live && !end,
            "ended": end,
        }))?,
        OutputFormat::Text => {
            let state = match (end, holder.live) {
                (true, _) => "ENDED: this launch is refused from now on",
                (false, true) => "live",
                (false, false) => "lapsed: the next launch that passes the policy takes it",
            };
            print_stdout(&format!(
                "{}\nheld by report_id {} on chip {}\nmeasurement {}\nsince {}, lease until {} ({state})\n",
                holder.resource,
                holder.report_id,
                holder.chip_id,
                holder.measurement,
                holder.since,
                holder.expires_at
            ))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The commands that read the VM from hsevd first.
async fn with_hsevd(
    connection: &client::Connection,
    command: &KbsCommand,
) -> Result<ExitCode, RemoteError> {
    let vm_of = async |vm: &str| -> Result<Vm, RemoteError> {
        Ok(connection
            .vms()
            .get_vm(VmRef { vm: vm.to_owned() })
            .await?
            .into_inner())
    };
    match command {
        KbsCommand::Policy(PolicyCommand::Set(set)) => {
            let vm = vm_of(&set.vm).await?;
            policy_set(set, &vm)
        }
        KbsCommand::Policy(PolicyCommand::List(list)) => policy_list(list),
        KbsCommand::Lease(LeaseCommand::Show(lease)) => lease_show(lease, false),
        KbsCommand::Lease(LeaseCommand::End(lease)) => lease_show(lease, true),
        KbsCommand::Policy(PolicyCommand::Delete(delete)) => {
            let resource = match (&delete.resource, &delete.vm, &delete.repository) {
                (Some(resource), _, _) => resource.clone(),
                (None, Some(vm), Some(repository)) => {
                    disk_key_resource(repository, &vm_of(vm).await?.id)?
                }
                _ => {
                    return Err(RemoteError::Input(
                        "give --repository and --vm, or --resource".into(),
                    ))
                }
            };
            admin(&delete.broker)?
                .delete_resource(&resource)
                .map_err(|error| broker_error(&delete.broker, &error))?;
            print_stdout(&format!(
                "deleted {resource}: that disk can no longer be opened\n"
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        KbsCommand::Announce(announce) => {
            let vm = vm_of(&announce.vm).await?;
            announce_vm(announce, &vm)
        }
    }
}

/// The broker client of `args`, its token read from its file.
fn admin(args: &BrokerArgs) -> Result<AdminClient, RemoteError> {
    let text = Zeroizing::new(std::fs::read_to_string(&args.broker_token_file).map_err(
        |error| {
            RemoteError::Input(format!(
                "cannot read the broker token file {}: {error}",
                args.broker_token_file.display()
            ))
        },
    )?);
    let token = text.lines().next().unwrap_or_default().trim();
    AdminClient::new(&args.broker, args.broker_pin, token, BROKER_TIMEOUT)
        .map_err(|error| RemoteError::Input(format!("--broker {}: {error}", args.broker)))
}

/// A broker call's failure: its refusal (403 for a token out of scope)
/// or why it was not reached.
fn broker_error(args: &BrokerArgs, error: &ClientError) -> RemoteError {
    match error {
        ClientError::Unreachable(_) => RemoteError::Failed(format!("{}: {error}", args.broker)),
        _ => RemoteError::Input(format!("{}: {error}", args.broker)),
    }
}

fn disk_key_resource(repository: &str, vm_id: &str) -> Result<ResourcePath, RemoteError> {
    ResourcePath::new(repository, DISK_KEY_TYPE, vm_id)
        .map_err(|error| RemoteError::Input(format!("--repository {repository:?}: {error}")))
}

/// The guest's binding must name this broker (by its pin) and this
/// repository, or the measurement computed from it pins the host's choice.
fn check_binding(vm: &Vm, broker: &BrokerArgs, repository: &str) -> Result<(), RemoteError> {
    let binding = vm
        .spec
        .as_ref()
        .and_then(|spec| spec.key_broker.as_ref())
        .ok_or_else(|| {
            RemoteError::Input(format!(
                "VM {} has no key broker: its guest fetches no key (create it with \
                 --key-broker, --key-broker-pin and --key-broker-repository)",
                vm.id
            ))
        })?;
    if binding.repository != repository {
        return Err(RemoteError::Input(format!(
            "VM {}'s guest fetches its key from repository {:?}, not {repository:?}: not pinned",
            vm.id, binding.repository
        )));
    }
    let guest_pin = (!binding.pin.is_empty())
        .then(|| binding.pin.parse::<SpkiPin>())
        .transpose()
        .map_err(|error| RemoteError::Input(format!("VM {}'s key broker pin: {error}", vm.id)))?;
    if guest_pin != broker.broker_pin {
        let shown = |pin: Option<SpkiPin>| {
            pin.map_or_else(|| "none (plain http)".to_owned(), |pin| pin.to_string())
        };
        return Err(RemoteError::Input(format!(
            "VM {}'s guest pins key broker {} ({}), and yours is {}: the guest would fetch its \
             key from another broker, so its measurement pins the host's choice; not pinned",
            vm.id,
            shown(guest_pin),
            binding.url,
            shown(broker.broker_pin)
        )));
    }
    Ok(())
}

/// `hsev kbs policy set`.
fn policy_set(args: &PolicySetArgs, vm: &Vm) -> Result<ExitCode, RemoteError> {
    check_binding(vm, &args.broker, &args.repository)?;
    let binding = args
        .key_broker
        .as_ref()
        .map(|guest_url| crate::model::KeyBrokerBinding {
            guest_url: guest_url.clone(),
            pin: args
                .broker
                .broker_pin
                .map(|pin| pin.to_string())
                .unwrap_or_default(),
            repository: args.repository.clone(),
        });
    let ours = measure_vm(vm, &args.image_manifest, binding)
        .map_err(|error| RemoteError::Input(error.0))?;
    let measurement: [u8; 48] = ours.measurement.as_slice().try_into().map_err(|_| {
        RemoteError::Input(format!(
            "VM {} is not an sev-snp VM: only SEV-SNP guests attest",
            ours.spec.name
        ))
    })?;
    let mut policy = match &args.policy {
        Some(path) => {
            AppraisalPolicy::load(path).map_err(|error| RemoteError::Input(error.to_string()))?
        }
        None => AppraisalPolicy::default(),
    };
    let host_data = args
        .host_data
        .unwrap_or_else(|| HexBytes(crate::launch::host_data(&ours.vm)));
    policy.allowed_measurements = vec![HexBytes(measurement)];
    policy.host_data = Some(host_data);
    policy
        .allowed_id_key_digests
        .extend(args.id_key_digest.iter().copied());
    policy
        .allowed_author_key_digests
        .extend(args.author_key_digest.iter().copied());
    if args.allow_simulated {
        eprintln!(
            "hsev: --allow-simulated: the key is released to a simulated Secure Processor's \
             guest (a development pool: NO confidentiality)"
        );
        policy.allow_simulated = true;
    }
    policy
        .validate()
        .map_err(|error| RemoteError::Input(error.to_string()))?;
    let resource = disk_key_resource(&args.repository, &ours.vm.0)?;
    let broker = admin(&args.broker)?;
    // The operator's word, for comparison only (a tenant token reads its
    // repository's announcements).
    let announced = broker
        .announcements()
        .map_err(|error| broker_error(&args.broker, &error))?
        .into_iter()
        .find(|announcement| announcement.vm == ours.vm.0);
    let mut release_policy = ReleasePolicy::from(policy.clone());
    release_policy.single_instance = args
        .single_instance
        .map(|lease_seconds| SingleInstance { lease_seconds });
    broker
        .put_resource(&resource, None, &release_policy, &[])
        .map_err(|error| broker_error(&args.broker, &error))?;
    let has_data = broker
        .list_resources()
        .map_err(|error| broker_error(&args.broker, &error))?
        .into_iter()
        .find(|summary| summary.path == resource)
        .is_some_and(|summary| summary.has_data);

    let computed = hex::encode(measurement);
    let host_expected = hex::encode(&vm.expected_measurement);
    let host_equal = vm.expected_measurement == measurement;
    let announced_measurement = announced
        .as_ref()
        .and_then(|announcement| announcement.expected_measurement.clone());
    match args.output {
        OutputFormat::Json => print_json(&json!({
            "vm": ours.vm.0,
            "resource": resource.to_string(),
            "measurement": computed,
            "host_expected_measurement": host_expected,
            "host_equal": host_equal,
            "announced": announced.as_ref().map(|announcement| json!({
                "image": announcement.image,
                "expected_measurement": announcement.expected_measurement,
                "by": announcement.announced_by,
            })),
            "host_data": hex::encode(host_data.0),
            "id_key_digests": policy.allowed_id_key_digests.iter().map(|digest| hex::encode(digest.0)).collect::<Vec<_>>(),
            "author_key_digests": policy.allowed_author_key_digests.iter().map(|digest| hex::encode(digest.0)).collect::<Vec<_>>(),
            "allow_simulated": policy.allow_simulated,
            "single_instance_lease_seconds": args.single_instance,
            "key": if has_data { "kept" } else { "generated by the broker at the first release" },
        }))?,
        OutputFormat::Text => {
            let mut text = format!(
                "VM {} ({}), image {}\n\
                 measurement computed here: {computed}\n\
                 host expects:              {}  {}\n",
                ours.spec.name,
                ours.vm.0,
                ours.spec.image,
                if host_expected.is_empty() {
                    "-"
                } else {
                    &host_expected
                },
                if host_equal {
                    "EQUAL"
                } else {
                    "DIFFERENT (the figure computed here is pinned)"
                },
            );
            if let Some(announcement) = &announced {
                text.push_str(&format!(
                    "operator announced:        {}  {} (image {}, by {})\n",
                    announced_measurement.as_deref().unwrap_or("-"),
                    if announced_measurement.as_deref() == Some(computed.as_str()) {
                        "EQUAL"
                    } else {
                        "DIFFERENT"
                    },
                    announcement.image,
                    announcement.announced_by
                ));
            }
            text.push_str(&format!(
                "host_data:                 {}\n",
                hex::encode(host_data.0)
            ));
            for digest in &policy.allowed_id_key_digests {
                text.push_str(&format!(
                    "ID key:                    {}\n",
                    hex::encode(digest.0)
                ));
            }
            text.push_str(&format!(
                "pinned at {}: {resource} (key {})\n",
                args.broker.broker,
                if has_data {
                    "kept"
                } else {
                    "generated by the broker at the first release"
                }
            ));
            print_stdout(&text)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `hsev kbs policy list`.
fn policy_list(args: &BrokerListArgs) -> Result<ExitCode, RemoteError> {
    let listed = admin(&args.broker)?
        .list_resources()
        .map_err(|error| broker_error(&args.broker, &error))?;
    match args.output {
        OutputFormat::Json => print_json(&Value::Array(
            listed
                .iter()
                .map(|summary| {
                    json!({
                        "path": summary.path.to_string(),
                        "has_data": summary.has_data,
                        "policy": summary.policy,
                        "reference_values": summary.reference_values,
                    })
                })
                .collect(),
        ))?,
        OutputFormat::Text if listed.is_empty() => eprintln!("no resources"),
        OutputFormat::Text => {
            let rows: Vec<Vec<String>> = listed
                .iter()
                .map(|summary| {
                    vec![
                        summary.path.to_string(),
                        if summary.has_data {
                            "yes"
                        } else {
                            "at first release"
                        }
                        .to_owned(),
                        pinned_measurements(&summary.policy),
                    ]
                })
                .collect();
            print_stdout(&render_table(&["RESOURCE", "KEY", "MEASUREMENTS"], &rows))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The measurements a policy's TOML pins, shortened, for a table.
fn pinned_measurements(policy: &str) -> String {
    match ReleasePolicy::from_toml(policy) {
        Ok(policy) if policy.appraisal.allowed_measurements.is_empty() => "-".to_owned(),
        Ok(policy) => policy
            .appraisal
            .allowed_measurements
            .iter()
            .map(|measurement| format!("{}..", &hex::encode(measurement.0)[..16]))
            .collect::<Vec<_>>()
            .join(", "),
        Err(_) => "?".to_owned(),
    }
}

/// `hsev kbs announce`.
fn announce_vm(args: &AnnounceArgs, vm: &Vm) -> Result<ExitCode, RemoteError> {
    let spec = vm
        .spec
        .as_ref()
        .ok_or_else(|| RemoteError::Failed("hsevd sent a VM without its spec".into()))?;
    let repository = match (&args.repository, &spec.key_broker) {
        (Some(repository), _) => repository.clone(),
        (None, Some(binding)) => binding.repository.clone(),
        (None, None) => {
            return Err(RemoteError::Input(format!(
                "VM {} has no key broker: give --repository",
                vm.id
            )))
        }
    };
    let expected =
        (!vm.expected_measurement.is_empty()).then_some(vm.expected_measurement.as_slice());
    admin(&args.broker)?
        .announce(&repository, &vm.id, &spec.image, expected)
        .map_err(|error| broker_error(&args.broker, &error))?;
    print_stdout(&format!(
        "announced VM {} ({}) to repository {repository}: image {}, expected measurement {}\n",
        spec.name,
        vm.id,
        spec.image,
        expected.map_or_else(|| "-".to_owned(), hex::encode)
    ))?;
    Ok(ExitCode::SUCCESS)
}
