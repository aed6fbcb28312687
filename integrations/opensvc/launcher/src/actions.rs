//! The launcher's actions, each a few calls over the public `hsev.v1` API
//! built on `hsev vm apply` and `hsev vm status`:
//!
//! - `start` applies the spec with this node's labels and blocks until the
//!   VM runs and, for an encrypted disk, until the key broker released the
//!   disk key; a refusal or a timeout leaves the VM stopped, never running
//!   without its key. A VM another node started is restarted for this one
//!   (a new launch, attested again).
//! - `stop` returns 0 only once the VM is stopped (or absent, or held by
//!   another node, which it leaves alone).
//! - `status` is 0 up, 1 down (also: held by another node or host), 2
//!   anything else; `info` prints `key: value` lines.
//! - `provision`, `unprovision`, `provisioned` create, delete and look for
//!   the VM, for the `container.hsev` driver.
//!
//! Nothing here prompts or prints a token; another service's VM is never
//! changed.

use std::io::Write;
use std::time::Duration;

use hsev_proto::v1::attestation_status::State as AttestationState;
use hsev_proto::v1::{DeleteVmRequest, StopVmRequest, Vm, VmState};
use hsev_xapi::cli::client::{follow_progress_to, hex_or_none, Connection, RemoteError};
use hsev_xapi::cli::vm::{attestation_state_name, mode_name, state_name};
use hsev_xapi::cli::vm_apply::{apply, find_vm, outcome_line, ApplyError, ApplyOptions, Outcome};
use hsev_xapi::cli::vm_spec::DesiredVm;
use hsev_xapi::cli::vm_status::{status_of, Health};

use crate::environment::{EnvironmentError, Launch};
use crate::ownership::{check_service, labels_for, Holder};

/// Why an action did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// The environment or the spec is wrong. Exit 2.
    #[error(transparent)]
    Environment(#[from] EnvironmentError),
    /// hsevd refused, failed, or could not be reached.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// `hsev vm apply` did not bring the VM where asked.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The VM is another service's. Exit 2.
    #[error("{0}")]
    NotOurs(String),
    /// Tried and failed. Exit 1.
    #[error("{0}")]
    Failed(String),
}

impl ActionError {
    /// 2 for what could not be done as given, 1 for what was tried and
    /// failed.
    pub fn exit_code(&self) -> u8 {
        match self {
            ActionError::Environment(_) | ActionError::NotOurs(_) => 2,
            ActionError::Remote(error) => error.exit_code(),
            ActionError::Apply(error) => error.exit_code(),
            ActionError::Failed(_) => 1,
        }
    }
}

/// Whether a VM's VMM exists or is being made (it can be "up" somewhere).
fn is_live(vm: &Vm) -> bool {
    matches!(
        VmState::try_from(vm.state),
        Ok(VmState::Running | VmState::Starting | VmState::Stopping)
    )
}

fn name_of(vm: &Vm) -> &str {
    vm.spec
        .as_ref()
        .map_or(vm.id.as_str(), |spec| spec.name.as_str())
}

/// Whose instance a live VM is, from this node's side.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Where {
    /// This node started it, on the host it is pinned to.
    Here,
    /// Another node started it (and holds it).
    OtherNode(String),
    /// It runs on another host than `HSEV_HOST` pins.
    OtherHost(String),
    /// Nobody in OpenSVC started it (no node label).
    Unclaimed(String),
}

impl Where {
    fn of(vm: &Vm, launch: &Launch) -> Self {
        if let Some(pin) = &launch.host {
            if vm.host != pin.0 {
                return Where::OtherHost(format!(
                    "{} runs on host {}, not on {} (HSEV_HOST)",
                    name_of(vm),
                    vm.host,
                    pin.0
                ));
            }
        }
        match Holder::of(vm).node {
            Some(node) if node == launch.node => Where::Here,
            Some(node) => Where::OtherNode(format!("{} runs for OpenSVC node {node}", name_of(vm))),
            None => Where::Unclaimed(format!(
                "{} runs, started outside OpenSVC (no {} label)",
                name_of(vm),
                crate::ownership::NODE_LABEL
            )),
        }
    }

    /// Why it is not this node's, if it is not.
    fn elsewhere(&self) -> Option<&str> {
        match self {
            Where::Here => None,
            Where::OtherNode(why) | Where::OtherHost(why) | Where::Unclaimed(why) => Some(why),
        }
    }

    /// Whether another node or host holds it (and it must be left alone).
    fn held_by_another(&self) -> bool {
        matches!(self, Where::OtherNode(_) | Where::OtherHost(_))
    }
}

fn line<W: Write>(out: &mut W, text: &str) {
    // A closed stdout must not stop an action half-way.
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// The spec with this node's and this service's labels.
fn desired_here(launch: &Launch) -> Result<DesiredVm, ActionError> {
    let mut desired = launch.desired()?;
    desired.spec.labels = labels_for(
        &desired.spec.labels,
        &launch.node,
        launch.service.as_deref(),
    )
    .map_err(ActionError::Failed)?;
    Ok(desired)
}

async fn stop_vm<W: Write>(
    connection: &Connection,
    vm: &Vm,
    force: bool,
    launch: &Launch,
    out: &mut W,
) -> Result<Vm, ActionError> {
    let request = StopVmRequest {
        vm: vm.id.clone(),
        force,
        timeout_seconds: if force { 0 } else { launch.stop_timeout },
    };
    let response = connection
        .vms()
        .stop_vm(request)
        .await
        .map_err(RemoteError::from)?;
    follow_progress_to(response, &mut *out).await?;
    // What hsevd says now, not what the stream said: stopped means stopped.
    let now = find_vm(connection, &vm.id).await?;
    match now {
        Some(now) if VmState::try_from(now.state) == Ok(VmState::Stopped) => Ok(now),
        None => Ok(vm.clone()),
        Some(now) => Err(ActionError::Failed(format!(
            "VM {} is still {} after the stop",
            name_of(&now),
            state_name(now.state)
        ))),
    }
}

/// Deletes a VM just created that landed on the wrong host.
async fn refuse_wrong_host<W: Write>(
    connection: &Connection,
    vm: &Vm,
    launch: &Launch,
    created: bool,
    out: &mut W,
) -> Result<(), ActionError> {
    let Some(pin) = &launch.host else {
        return Ok(());
    };
    if vm.host == pin.0 {
        return Ok(());
    }
    if created {
        let response = connection
            .vms()
            .delete_vm(DeleteVmRequest {
                vm: vm.id.clone(),
                wipe_disks: false,
            })
            .await
            .map_err(RemoteError::from)?;
        follow_progress_to(response, &mut *out).await?;
    }
    Err(ActionError::Failed(format!(
        "VM {} is on host {}, and HSEV_HOST pins it to {}: point HSEV_ENDPOINT at the hsevd of {}{}",
        name_of(vm),
        vm.host,
        pin.0,
        pin.0,
        if created { " (the VM just created there is deleted)" } else { "" }
    )))
}

/// `start`.
pub async fn start<W: Write>(
    connection: &Connection,
    launch: &Launch,
    out: &mut W,
) -> Result<u8, ActionError> {
    let desired = desired_here(launch)?;
    if let Some(vm) = find_vm(connection, &launch.vm).await? {
        check_service(&vm, launch.service.as_deref()).map_err(ActionError::NotOurs)?;
        refuse_wrong_host(connection, &vm, launch, false, out).await?;
        if let (true, Where::OtherNode(why)) = (is_live(&vm), Where::of(&vm, launch)) {
            line(
                out,
                &format!(
                    "{why}: restarting it for {} (a new launch, attested again)",
                    launch.node
                ),
            );
            stop_vm(connection, &vm, false, launch, out).await?;
        }
    }
    let options = ApplyOptions {
        start: true,
        wait: true,
        recreate: false,
        timeout: launch.start_timeout,
    };
    let applied = match apply(connection, &desired, &options, out).await {
        Ok(applied) => applied,
        Err(
            error @ (ApplyError::Refused { .. }
            | ApplyError::NotRunning { .. }
            | ApplyError::TimedOut { .. }),
        ) => {
            // Never left running without its key, nor half-started.
            if let Ok(Some(vm)) = find_vm(connection, &launch.vm).await {
                if is_live(&vm) {
                    line(out, &format!("stopping VM {}: {error}", launch.vm));
                    let _ = stop_vm(connection, &vm, true, launch, out).await;
                }
            }
            return Err(error.into());
        }
        Err(error) => return Err(error.into()),
    };
    refuse_wrong_host(
        connection,
        &applied.vm,
        launch,
        applied.outcome == Outcome::Created,
        out,
    )
    .await?;
    line(out, &outcome_line(&applied, &launch.vm));
    line(out, &status_of(&launch.vm, Some(&applied.vm)).line);
    Ok(0)
}

/// `stop` (`--force`: no ACPI shutdown).
pub async fn stop<W: Write>(
    connection: &Connection,
    launch: &Launch,
    force: bool,
    out: &mut W,
) -> Result<u8, ActionError> {
    let Some(vm) = find_vm(connection, &launch.vm).await? else {
        line(out, &format!("{} absent: nothing to stop", launch.vm));
        return Ok(0);
    };
    check_service(&vm, launch.service.as_deref()).map_err(ActionError::NotOurs)?;
    let place = Where::of(&vm, launch);
    if is_live(&vm) && place.held_by_another() {
        line(
            out,
            &format!("{}: left running", place.elsewhere().unwrap_or_default()),
        );
        return Ok(0);
    }
    match VmState::try_from(vm.state) {
        Ok(VmState::Stopped) => {
            line(out, &format!("{} stopped", launch.vm));
            return Ok(0);
        }
        Ok(VmState::Creating | VmState::Deleting) => {
            return Err(ActionError::Failed(format!(
                "VM {} is {}: stop it once it is not",
                launch.vm,
                state_name(vm.state)
            )))
        }
        _ => {}
    }
    stop_vm(connection, &vm, force, launch, out).await?;
    line(out, &format!("{} stopped", launch.vm));
    Ok(0)
}

/// `status`: (exit code, line).
pub async fn status(connection: &Connection, launch: &Launch) -> Result<(u8, String), ActionError> {
    let Some(vm) = find_vm(connection, &launch.vm).await? else {
        return Ok((1, format!("{} absent", launch.vm)));
    };
    check_service(&vm, launch.service.as_deref()).map_err(ActionError::NotOurs)?;
    if is_live(&vm) {
        if let Some(elsewhere) = Where::of(&vm, launch).elsewhere() {
            return Ok((1, elsewhere.to_owned()));
        }
    }
    let status = status_of(&launch.vm, Some(&vm));
    let code = match status.health {
        Health::Up => 0,
        Health::Down => 1,
        Health::Other => 2,
    };
    Ok((code, status.line))
}

/// `info`: `key: value` lines.
pub async fn info(connection: &Connection, launch: &Launch) -> Result<String, ActionError> {
    let vm = find_vm(connection, &launch.vm).await?;
    Ok(info_lines(launch, vm.as_ref()))
}

/// The `info` lines of `vm`.
pub fn info_lines(launch: &Launch, vm: Option<&Vm>) -> String {
    let mut lines = vec![("vm".to_owned(), launch.vm.clone())];
    let Some(vm) = vm else {
        lines.push(("state".into(), "absent".into()));
        return render(&lines);
    };
    let spec = vm.spec.clone().unwrap_or_default();
    let attestation = vm.attestation.clone().unwrap_or_default();
    let holder = Holder::of(vm);
    let or_none = |text: Option<String>| text.unwrap_or_else(|| "-".to_owned());
    lines.extend([
        ("id".to_owned(), vm.id.clone()),
        ("state".to_owned(), state_name(vm.state)),
        ("status".to_owned(), status_of(&launch.vm, Some(vm)).line),
        (
            "host".to_owned(),
            or_none(Some(vm.host.clone()).filter(|host| !host.is_empty())),
        ),
        ("mode".to_owned(), mode_name(spec.mode)),
        (
            "simulated_firmware".to_owned(),
            if vm.simulated_firmware {
                "yes (no confidentiality)"
            } else {
                "no"
            }
            .to_owned(),
        ),
        ("vcpus".to_owned(), spec.vcpus.to_string()),
        ("memory_mib".to_owned(), spec.memory_mib.to_string()),
        (
            "encrypted_disk_mib".to_owned(),
            spec.encrypted_disk_mib.to_string(),
        ),
        (
            "expected_measurement".to_owned(),
            or_none(hex_or_none(&vm.expected_measurement)),
        ),
        (
            "launch_digest".to_owned(),
            or_none(hex_or_none(&vm.launch_digest)),
        ),
        (
            "measurements".to_owned(),
            match (
                vm.expected_measurement.is_empty(),
                vm.launch_digest.is_empty(),
            ) {
                (false, false) if vm.expected_measurement == vm.launch_digest => "equal",
                (false, false) => "different",
                _ => "not compared",
            }
            .to_owned(),
        ),
        (
            "attestation".to_owned(),
            attestation_state_name(Some(&attestation)),
        ),
    ]);
    if AttestationState::try_from(attestation.state) == Ok(AttestationState::Refused) {
        lines.push(("attestation_reason".into(), attestation.reason));
    }
    lines.push(("opensvc_node".into(), or_none(holder.node)));
    lines.push(("opensvc_service".into(), or_none(holder.service)));
    render(&lines)
}

fn render(lines: &[(String, String)]) -> String {
    lines
        .iter()
        .map(|(key, value)| format!("{key}: {}\n", value.replace('\n', " ")))
        .collect()
}

/// `provision`: the VM made to match its spec, not started.
pub async fn provision<W: Write>(
    connection: &Connection,
    launch: &Launch,
    out: &mut W,
) -> Result<u8, ActionError> {
    let desired = desired_here(launch)?;
    if let Some(vm) = find_vm(connection, &launch.vm).await? {
        check_service(&vm, launch.service.as_deref()).map_err(ActionError::NotOurs)?;
    }
    let options = ApplyOptions {
        start: false,
        wait: false,
        recreate: false,
        timeout: launch.start_timeout,
    };
    let applied = apply(connection, &desired, &options, out).await?;
    refuse_wrong_host(
        connection,
        &applied.vm,
        launch,
        applied.outcome == Outcome::Created,
        out,
    )
    .await?;
    line(out, &outcome_line(&applied, &launch.vm));
    Ok(0)
}

/// `unprovision`: the VM and its disks deleted (its disk key revoked).
pub async fn unprovision<W: Write>(
    connection: &Connection,
    launch: &Launch,
    out: &mut W,
) -> Result<u8, ActionError> {
    let Some(vm) = find_vm(connection, &launch.vm).await? else {
        line(
            out,
            &format!("{} absent: nothing to unprovision", launch.vm),
        );
        return Ok(0);
    };
    check_service(&vm, launch.service.as_deref()).map_err(ActionError::NotOurs)?;
    let place = Where::of(&vm, launch);
    if is_live(&vm) && place.held_by_another() {
        return Err(ActionError::Failed(format!(
            "{}: stop it there before unprovisioning",
            place.elsewhere().unwrap_or_default()
        )));
    }
    let response = connection
        .vms()
        .delete_vm(DeleteVmRequest {
            vm: vm.id.clone(),
            wipe_disks: launch.wipe,
        })
        .await
        .map_err(RemoteError::from)?;
    follow_progress_to(response, &mut *out).await?;
    if find_vm(connection, &vm.id).await?.is_some() {
        return Err(ActionError::Failed(format!(
            "VM {} is still there after its deletion",
            launch.vm
        )));
    }
    line(out, &format!("{} unprovisioned", launch.vm));
    Ok(0)
}

/// `provisioned`: 0 the VM exists, 1 it does not.
pub async fn provisioned(
    connection: &Connection,
    launch: &Launch,
) -> Result<(u8, String), ActionError> {
    Ok(match find_vm(connection, &launch.vm).await? {
        Some(vm) => (
            0,
            format!("{} provisioned ({})", launch.vm, state_name(vm.state)),
        ),
        None => (1, format!("{} absent", launch.vm)),
    })
}

/// The error of a quick action hsevd did not answer in time.
pub fn call_timed_out(launch: &Launch, after: Duration) -> ActionError {
    ActionError::Failed(format!(
        "hsevd did not answer about VM {} in {} s (HSEV_CALL_TIMEOUT)",
        launch.vm,
        after.as_secs()
    ))
}
