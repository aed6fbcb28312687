//! `hsev vm status`: one line and an exit code a script or an orchestrator
//! can act on: 0 running (and, for a VM whose disk key is released after
//! attestation, released), 1 stopped or absent, 2 anything else (starting,
//! waiting for its key, refused, failed, unknown, hsevd unreachable).
//!
//! [`status_of`] is the one place that judges a VM this way; it reads a VM
//! and never calls hsevd.

use std::process::ExitCode;

use clap::Args;
use hsev_proto::v1::attestation_status::State as AttestationState;
use hsev_proto::v1::{Vm, VmState};

use super::client::{print_stdout, Connection, RemoteError};
use super::vm::{mode_name, state_name};
use super::vm_apply::find_vm;

/// `hsev vm status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Id or name of the VM.
    pub vm: String,
}

/// How a VM stands, as an orchestrator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Running, and ready.
    Up,
    /// Stopped, or absent.
    Down,
    /// Anything else.
    Other,
}

impl Health {
    /// 0, 1 or 2.
    pub fn exit_code(self) -> u8 {
        match self {
            Health::Up => 0,
            Health::Down => 1,
            Health::Other => 2,
        }
    }
}

/// A VM's health and the line that says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStatus {
    /// Up, down or other.
    pub health: Health,
    /// One line, without a newline.
    pub line: String,
}

/// Judges `vm` (`None`: there is no VM named `name`).
pub fn status_of(name: &str, vm: Option<&Vm>) -> VmStatus {
    let Some(vm) = vm else {
        return VmStatus {
            health: Health::Down,
            line: format!("{name} absent"),
        };
    };
    let spec = vm.spec.clone().unwrap_or_default();
    let reason = if vm.state_reason.is_empty() {
        String::new()
    } else {
        format!(": {}", vm.state_reason)
    };
    let (health, line) = match VmState::try_from(vm.state) {
        Ok(VmState::Running) => {
            let mut what = mode_name(spec.mode);
            if vm.simulated_firmware {
                what.push_str(", SIMULATED firmware");
            }
            let attestation = vm.attestation.clone().unwrap_or_default();
            if spec.encrypted_disk_mib == 0 {
                (
                    Health::Up,
                    format!("{name} running on {} ({what})", vm.host),
                )
            } else {
                match AttestationState::try_from(attestation.state) {
                    Ok(AttestationState::Released) => (
                        Health::Up,
                        format!(
                            "{name} running on {} ({what}, disk key released)",
                            vm.host
                        ),
                    ),
                    Ok(AttestationState::Refused) => (
                        Health::Other,
                        format!(
                            "{name} running on {} ({what}), but the key broker refused its disk key: {}",
                            vm.host, attestation.reason
                        ),
                    ),
                    _ => (
                        Health::Other,
                        format!(
                            "{name} starting on {} ({what}): running, its guest not yet attested",
                            vm.host
                        ),
                    ),
                }
            }
        }
        Ok(VmState::Stopped) => (Health::Down, format!("{name} stopped{reason}")),
        Ok(VmState::Failed) => (Health::Other, format!("{name} failed{reason}")),
        _ => (
            Health::Other,
            format!("{name} {}{reason}", state_name(vm.state)),
        ),
    };
    VmStatus { health, line }
}

/// Runs `hsev vm status`.
pub async fn execute(connection: &Connection, args: &StatusArgs) -> Result<ExitCode, RemoteError> {
    let vm = find_vm(connection, &args.vm).await?;
    let status = status_of(&args.vm, vm.as_ref());
    print_stdout(&format!("{}\n", status.line))?;
    Ok(ExitCode::from(status.health.exit_code()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hsev_proto::v1::{AttestationStatus, ConfidentialMode, VmSpec};

    fn vm(state: VmState, encrypted: bool, attestation: AttestationState) -> Vm {
        Vm {
            spec: Some(VmSpec {
                name: "vault".into(),
                mode: ConfidentialMode::SevSnp.into(),
                encrypted_disk_mib: if encrypted { 32 } else { 0 },
                ..VmSpec::default()
            }),
            state: state.into(),
            host: "host-a".into(),
            attestation: Some(AttestationStatus {
                state: attestation.into(),
                reason: if attestation == AttestationState::Refused {
                    "measurement not allowed".into()
                } else {
                    String::new()
                },
                verdict: None,
            }),
            ..Vm::default()
        }
    }

    #[test]
    fn every_state_maps_to_0_1_or_2_with_one_line() {
        use AttestationState::{Pending, Refused, Released};
        for (vm, health, line) in [
            (None, Health::Down, "vault absent"),
            (
                Some(vm(VmState::Running, true, Released)),
                Health::Up,
                "vault running on host-a (sev-snp, disk key released)",
            ),
            (
                Some(vm(VmState::Running, false, Pending)),
                Health::Up,
                "vault running on host-a (sev-snp)",
            ),
            (
                Some(vm(VmState::Running, true, Pending)),
                Health::Other,
                "vault starting on host-a (sev-snp): running, its guest not yet attested",
            ),
            (
                Some(vm(VmState::Running, true, Refused)),
                Health::Other,
                "vault running on host-a (sev-snp), but the key broker refused its disk key: measurement not allowed",
            ),
            (Some(vm(VmState::Stopped, true, Pending)), Health::Down, "vault stopped"),
            (Some(vm(VmState::Starting, true, Pending)), Health::Other, "vault starting"),
            (Some(vm(VmState::Failed, true, Pending)), Health::Other, "vault failed"),
        ] {
            let status = status_of("vault", vm.as_ref());
            assert_eq!((status.health, status.line.as_str()), (health, line));
            assert!(!status.line.contains('\n'));
        }
        let mut died = vm(VmState::Failed, false, Pending);
        died.state_reason = "qemu exited with status 1".into();
        assert_eq!(
            status_of("vault", Some(&died)).line,
            "vault failed: qemu exited with status 1"
        );
        assert_eq!(Health::Other.exit_code(), 2);
    }
}
