//! `hsev vm apply`: makes one VM what its spec says, idempotently, over
//! the public `hsev.v1` API only.
//!
//! It creates the VM when it is absent, changes its labels in place,
//! leaves it alone when it already matches, and re-creates it (deleting
//! its disks) only when told to; `start` and `wait` then bring it to
//! running and, for a VM whose disk key is released after attestation,
//! to `released`. Orchestrator plugins build on [`apply`]; the command is
//! a thin edge over it. It never deletes a VM unless `recreate` is set,
//! and never prints a token.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use hsev_proto::v1::attestation_status::State as AttestationState;
use hsev_proto::v1::{
    CreateVmRequest, DeleteVmRequest, ImageRef, SetVmLabelsRequest, Vm, VmRef, VmState,
    WaitVmRequest,
};
use serde_json::{json, Value};
use tonic::Code;

use super::client::{follow_progress_to, print_json, print_stdout, Connection, RemoteError};
use super::output::OutputFormat;
use super::vm::state_name;
use super::vm_spec::{changes_text, Change, ChangeKind, DesiredVm, SpecError, SpecFile};
use super::vm_status::status_of;

/// How long `--wait` waits when not told.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);

/// How often a wait asks hsevd again.
const POLL: Duration = Duration::from_millis(250);

/// `hsev vm apply`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The VM's spec: TOML, or JSON when the name ends in .json.
    #[arg(long, short = 'f', value_name = "SPEC")]
    pub file: PathBuf,
    /// Start the VM once it matches its spec, if it is not running.
    #[arg(long)]
    pub start: bool,
    /// With --start: wait until it runs and, for an encrypted disk, until
    /// the key broker released its key (exit 1 with the broker's reason if
    /// it refused).
    #[arg(long, requires = "start")]
    pub wait: bool,
    /// Re-create the VM when the spec changes a field only a new VM can
    /// have (its disks are deleted, its disk key revoked).
    #[arg(long)]
    pub recreate: bool,
    /// Seconds --wait waits [default: 300].
    #[arg(long, value_name = "SECONDS", requires = "wait",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub timeout: Option<u32>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// What [`apply`] does besides matching the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Start the VM if it does not run.
    pub start: bool,
    /// Wait until it runs and its disk key is released.
    pub wait: bool,
    /// Re-create it when the spec asks what only a new VM has.
    pub recreate: bool,
    /// How long `wait` waits.
    pub timeout: Duration,
}

/// What [`apply`] did to the VM's definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It was absent and has been created.
    Created,
    /// Its labels were changed.
    Updated,
    /// It already matched.
    Unchanged,
    /// It was deleted and created again.
    Recreated,
}

impl Outcome {
    /// The word the command prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Updated => "updated",
            Outcome::Unchanged => "unchanged",
            Outcome::Recreated => "recreated",
        }
    }
}

/// The result of [`apply`].
#[derive(Debug, Clone)]
pub struct Applied {
    /// What happened to the definition.
    pub outcome: Outcome,
    /// The differences it found (and applied).
    pub changes: Vec<Change>,
    /// The VM as it now is.
    pub vm: Vm,
}

/// Why [`apply`] did not bring the VM where asked.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// hsevd refused or failed a call, or could not be reached.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The spec changes fields only a new VM has, and `recreate` was not
    /// set. Nothing was changed.
    #[error(
        "VM {name} differs from its spec in what only a new VM can have ({}): \
         apply with --recreate to delete it, with its disks, and create it again",
        changes_text(.changes)
    )]
    NeedsRecreate {
        /// The VM.
        name: String,
        /// Every difference, the in-place ones too.
        changes: Vec<Change>,
    },
    /// The key broker refused the guest's disk key.
    #[error("VM {name}: the key broker refused its disk key: {reason}")]
    Refused {
        /// The VM.
        name: String,
        /// The broker's reason.
        reason: String,
    },
    /// The VM stopped or failed while being waited for.
    #[error("VM {name} is {state} ({reason}), not running")]
    NotRunning {
        /// The VM.
        name: String,
        /// Its state.
        state: String,
        /// Why, as hsevd says.
        reason: String,
    },
    /// It was not ready in time.
    #[error("VM {name} is not ready after {} s: {status}", .waited.as_secs())]
    TimedOut {
        /// The VM.
        name: String,
        /// How long was waited.
        waited: Duration,
        /// Its status line when the wait ended.
        status: String,
    },
}

impl ApplyError {
    /// 2 when nothing was done as asked (bad input, a re-create not
    /// allowed, hsevd unreachable), 1 when it was tried and failed.
    pub fn exit_code(&self) -> u8 {
        match self {
            ApplyError::Remote(error) => error.exit_code(),
            ApplyError::NeedsRecreate { .. } => 2,
            ApplyError::Refused { .. }
            | ApplyError::NotRunning { .. }
            | ApplyError::TimedOut { .. } => 1,
        }
    }
}

/// Reads and checks the spec, before any connection.
pub fn load(args: &ApplyArgs) -> Result<DesiredVm, SpecError> {
    SpecFile::load(&args.file)?.desired()
}

/// Runs `hsev vm apply` on a connection, `desired` read by [`load`].
pub async fn execute(
    connection: &Connection,
    args: &ApplyArgs,
    desired: &DesiredVm,
) -> Result<ExitCode, RemoteError> {
    let options = ApplyOptions {
        start: args.start,
        wait: args.wait,
        recreate: args.recreate,
        timeout: args
            .timeout
            .map_or(DEFAULT_WAIT, |seconds| Duration::from_secs(seconds.into())),
    };
    match apply(connection, desired, &options, &mut std::io::stderr()).await {
        Ok(applied) => {
            match args.output {
                OutputFormat::Json => print_json(&applied_json(&applied, desired))?,
                OutputFormat::Text => print_stdout(&applied_text(&applied, desired, &options))?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(ApplyError::Remote(error)) => Err(error),
        Err(error) => {
            if let (OutputFormat::Json, ApplyError::NeedsRecreate { name, changes }) =
                (args.output, &error)
            {
                print_json(&json!({
                    "name": name,
                    "outcome": "needs-recreate",
                    "changes": changes_json(changes),
                }))?;
            }
            eprintln!("hsev: error: {error}");
            Ok(ExitCode::from(error.exit_code()))
        }
    }
}

fn changes_json(changes: &[Change]) -> Value {
    changes
        .iter()
        .map(|change| {
            json!({
                "field": change.field,
                "from": change.from,
                "to": change.to,
                "in_place": change.kind == ChangeKind::InPlace,
            })
        })
        .collect()
}

fn applied_json(applied: &Applied, desired: &DesiredVm) -> Value {
    let status = status_of(desired.name(), Some(&applied.vm));
    json!({
        "name": desired.name(),
        "id": applied.vm.id,
        "outcome": applied.outcome.as_str(),
        "changes": changes_json(&applied.changes),
        "state": state_name(applied.vm.state),
        "status": status.line,
        "vm": super::vm::vm_json(&applied.vm),
    })
}

fn applied_text(applied: &Applied, desired: &DesiredVm, options: &ApplyOptions) -> String {
    let mut text = outcome_line(applied, desired.name());
    text.push('\n');
    if options.start {
        text.push_str(&status_of(desired.name(), Some(&applied.vm)).line);
        text.push('\n');
    }
    text
}

/// What happened, in one line: `created NAME (ID)`, `unchanged NAME`,
/// `updated NAME: CHANGES`, `recreated NAME (ID): CHANGES`.
pub fn outcome_line(applied: &Applied, name: &str) -> String {
    match applied.outcome {
        Outcome::Created => format!("created {name} ({})", applied.vm.id),
        Outcome::Unchanged => format!("unchanged {name}"),
        Outcome::Updated => format!("updated {name}: {}", changes_text(&applied.changes)),
        Outcome::Recreated => format!(
            "recreated {name} ({}): {}",
            applied.vm.id,
            changes_text(&applied.changes)
        ),
    }
}

/// The VM named `name`, or `None` when there is none.
pub async fn find_vm(connection: &Connection, name: &str) -> Result<Option<Vm>, RemoteError> {
    match connection.vms().get_vm(vm_ref(name)).await {
        Ok(response) => Ok(Some(response.into_inner())),
        Err(status) if status.code() == Code::NotFound => Ok(None),
        Err(status) => Err(status.into()),
    }
}

fn vm_ref(vm: &str) -> VmRef {
    VmRef { vm: vm.to_owned() }
}

/// Makes the VM what `desired` says, then starts it and waits as
/// `options` say; progress lines go to `progress`.
pub async fn apply<W: Write>(
    connection: &Connection,
    desired: &DesiredVm,
    options: &ApplyOptions,
    progress: &mut W,
) -> Result<Applied, ApplyError> {
    let name = desired.name();
    let existing = find_vm(connection, name).await?;
    let (outcome, changes, vm) = match existing {
        None => {
            let vm = create(connection, desired, options.start, progress).await?;
            (Outcome::Created, Vec::new(), vm)
        }
        Some(vm) => {
            if matches!(
                VmState::try_from(vm.state),
                Ok(VmState::Creating | VmState::Deleting)
            ) {
                return Err(RemoteError::Input(format!(
                    "VM {name} is {}: apply again once it is not",
                    state_name(vm.state)
                ))
                .into());
            }
            let image_id = connection
                .images()
                .get_image(ImageRef {
                    image: desired.spec.image.clone(),
                })
                .await
                .map_err(|status| match status.code() {
                    Code::NotFound => RemoteError::Input(format!(
                        "image: no image {:?} is imported (hsev image list)",
                        desired.spec.image
                    )),
                    _ => status.into(),
                })?
                .into_inner()
                .id;
            let changes = super::vm_spec::plan(desired, &image_id, &vm);
            if changes
                .iter()
                .any(|change| change.kind == ChangeKind::Recreate)
            {
                if !options.recreate {
                    return Err(ApplyError::NeedsRecreate {
                        name: name.to_owned(),
                        changes,
                    });
                }
                let was_running = matches!(
                    VmState::try_from(vm.state),
                    Ok(VmState::Running | VmState::Starting)
                );
                let _ = writeln!(
                    progress,
                    "re-creating VM {name}: {}",
                    changes_text(&changes)
                );
                let deleted = connection
                    .vms()
                    .delete_vm(DeleteVmRequest {
                        vm: vm.id.clone(),
                        wipe_disks: false,
                    })
                    .await
                    .map_err(RemoteError::from)?;
                follow_progress_to(deleted, &mut *progress).await?;
                let vm =
                    create(connection, desired, options.start || was_running, progress).await?;
                (Outcome::Recreated, changes, vm)
            } else if changes.is_empty() {
                (Outcome::Unchanged, changes, vm)
            } else {
                let vm = connection
                    .vms()
                    .set_vm_labels(SetVmLabelsRequest {
                        vm: vm.id.clone(),
                        labels: desired.spec.labels.clone(),
                    })
                    .await
                    .map_err(RemoteError::from)?
                    .into_inner();
                (Outcome::Updated, changes, vm)
            }
        }
    };
    let vm = if options.start {
        ensure_running(connection, vm, options.timeout, progress).await?
    } else {
        vm
    };
    let vm = if options.wait {
        wait_ready(connection, desired, &vm.id, options.timeout).await?
    } else {
        vm
    };
    Ok(Applied {
        outcome,
        changes,
        vm,
    })
}

async fn create<W: Write>(
    connection: &Connection,
    desired: &DesiredVm,
    start: bool,
    progress: &mut W,
) -> Result<Vm, RemoteError> {
    let request = CreateVmRequest {
        spec: Some(desired.spec.clone()),
        // With an ID block, started once it is set.
        start: start && desired.id_key.is_none(),
        // A new id: applying again compares with what exists first.
        request_id: uuid::Uuid::new_v4().to_string(),
    };
    let response = connection.vms().create_vm(request).await?;
    let vm = follow_progress_to(response, &mut *progress)
        .await?
        .ok_or_else(|| {
            RemoteError::Failed("hsevd ended the creation without sending the VM".into())
        })?;
    let Some(id_key) = &desired.id_key else {
        return Ok(vm);
    };
    let vm =
        super::vm::sign_id_block(connection, &vm, id_key, desired.spec.key_broker.as_ref()).await?;
    if !start {
        return Ok(vm);
    }
    let response = connection.vms().start_vm(vm_ref(&vm.id)).await?;
    follow_progress_to(response, &mut *progress)
        .await?
        .ok_or_else(|| RemoteError::Failed("hsevd ended the start without sending the VM".into()))
}

/// Starts `vm` unless it runs or is starting; answers it running.
async fn ensure_running<W: Write>(
    connection: &Connection,
    vm: Vm,
    timeout: Duration,
    progress: &mut W,
) -> Result<Vm, RemoteError> {
    let wait_for = |state: VmState| WaitVmRequest {
        vm: vm.id.clone(),
        state: state.into(),
        timeout_seconds: u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX),
    };
    match VmState::try_from(vm.state) {
        Ok(VmState::Running) => return Ok(vm),
        Ok(VmState::Starting) => {
            return Ok(connection
                .vms()
                .wait_vm(wait_for(VmState::Running))
                .await?
                .into_inner())
        }
        Ok(VmState::Stopping) => {
            connection.vms().wait_vm(wait_for(VmState::Stopped)).await?;
        }
        _ => {}
    }
    let response = connection.vms().start_vm(vm_ref(&vm.id)).await?;
    follow_progress_to(response, &mut *progress)
        .await?
        .ok_or_else(|| RemoteError::Failed("hsevd ended the start without sending the VM".into()))
}

/// Waits until the VM runs and, when its guest attests for a disk key,
/// until the key broker released it.
async fn wait_ready(
    connection: &Connection,
    desired: &DesiredVm,
    id: &str,
    timeout: Duration,
) -> Result<Vm, ApplyError> {
    let name = desired.name().to_owned();
    let deadline = Instant::now() + timeout;
    loop {
        let vm = connection
            .vms()
            .get_vm(vm_ref(id))
            .await
            .map_err(RemoteError::from)?
            .into_inner();
        let attestation = vm.attestation.clone().unwrap_or_default();
        match VmState::try_from(vm.state) {
            Ok(VmState::Running) => {
                let needs_key = vm
                    .spec
                    .as_ref()
                    .is_some_and(|spec| spec.encrypted_disk_mib > 0);
                match AttestationState::try_from(attestation.state) {
                    _ if !needs_key => return Ok(vm),
                    Ok(AttestationState::Released) => return Ok(vm),
                    Ok(AttestationState::Refused) => {
                        return Err(ApplyError::Refused {
                            name,
                            reason: attestation.reason,
                        })
                    }
                    _ => {}
                }
            }
            Ok(VmState::Starting) => {}
            _ => {
                return Err(ApplyError::NotRunning {
                    name,
                    state: state_name(vm.state),
                    reason: vm.state_reason,
                })
            }
        }
        if Instant::now() >= deadline {
            return Err(ApplyError::TimedOut {
                status: status_of(&name, Some(&vm)).line,
                name,
                waited: timeout,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}
