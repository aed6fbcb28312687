//! VMs, images and hosts as `hsev.v1` messages, and specs from them.

use hsev_proto::v1;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::daemon::error::OpError;
use crate::daemon::host::HostCapabilities;
use crate::model::{
    Attestation, ConfidentialMode, DiskSpec, HaPolicy, HostRecord, ImageRecord, KeyBrokerBinding,
    OwnerIdBlock, PlacementRules, PortForward, VmRecord, VmSpec, VmState,
};
use hsev_attestation::id_block::SignedIdBlock;
use hsev_attestation::policy::MinimumTcb;

fn rfc3339(time: OffsetDateTime) -> String {
    time.format(&Rfc3339).unwrap_or_default()
}

/// The domain mode of an API mode.
pub fn mode_from_proto(mode: i32) -> Result<ConfidentialMode, OpError> {
    match v1::ConfidentialMode::try_from(mode) {
        Ok(v1::ConfidentialMode::None) => Ok(ConfidentialMode::None),
        Ok(v1::ConfidentialMode::Sev) => Ok(ConfidentialMode::Sev),
        Ok(v1::ConfidentialMode::SevEs) => Ok(ConfidentialMode::SevEs),
        Ok(v1::ConfidentialMode::SevSnp) => Ok(ConfidentialMode::SevSnp),
        _ => Err(OpError::invalid(
            "mode must be one of none, sev, sev-es, sev-snp",
        )),
    }
}

fn mode_to_proto(mode: ConfidentialMode) -> v1::ConfidentialMode {
    match mode {
        ConfidentialMode::None => v1::ConfidentialMode::None,
        ConfidentialMode::Sev => v1::ConfidentialMode::Sev,
        ConfidentialMode::SevEs => v1::ConfidentialMode::SevEs,
        ConfidentialMode::SevSnp => v1::ConfidentialMode::SevSnp,
    }
}

/// The domain state of an API state (`None` for UNSPECIFIED).
pub fn state_from_proto(state: i32) -> Result<Option<VmState>, OpError> {
    Ok(match v1::VmState::try_from(state) {
        Ok(v1::VmState::Unspecified) => None,
        Ok(v1::VmState::Creating) => Some(VmState::Creating),
        Ok(v1::VmState::Stopped) => Some(VmState::Stopped),
        Ok(v1::VmState::Starting) => Some(VmState::Starting),
        Ok(v1::VmState::Running) => Some(VmState::Running),
        Ok(v1::VmState::Stopping) => Some(VmState::Stopping),
        Ok(v1::VmState::Failed) => Some(VmState::Failed),
        Ok(v1::VmState::Deleting) => Some(VmState::Deleting),
        Ok(v1::VmState::Lost) => Some(VmState::Lost),
        Ok(v1::VmState::Unknown) => {
            return Err(OpError::invalid(
                "unknown is reported for VMs whose host is down, never stored: filter on \
                 another state",
            ))
        }
        Err(_) => return Err(OpError::invalid(format!("unknown VM state {state}"))),
    })
}

fn state_to_proto(state: VmState) -> v1::VmState {
    match state {
        VmState::Creating => v1::VmState::Creating,
        VmState::Stopped => v1::VmState::Stopped,
        VmState::Starting => v1::VmState::Starting,
        VmState::Running => v1::VmState::Running,
        VmState::Stopping => v1::VmState::Stopping,
        VmState::Failed => v1::VmState::Failed,
        VmState::Deleting => v1::VmState::Deleting,
        VmState::Lost => v1::VmState::Lost,
    }
}

fn port(value: u32, field: &str) -> Result<u16, OpError> {
    u16::try_from(value).map_err(|_| OpError::invalid(format!("{field} {value} is not a TCP port")))
}

/// A domain spec from an API spec (ranges are checked by the lifecycle).
pub fn spec_from_proto(spec: v1::VmSpec) -> Result<VmSpec, OpError> {
    let mode = mode_from_proto(spec.mode)?;
    let port_forwards = spec
        .port_forwards
        .iter()
        .map(|forward| {
            Ok(PortForward {
                host_port: port(forward.host_port, "host_port")?,
                guest_port: port(forward.guest_port, "guest_port")?,
            })
        })
        .collect::<Result<_, OpError>>()?;
    Ok(VmSpec {
        name: spec.name,
        image: spec.image,
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        mode,
        guest_policy: spec.guest_policy,
        disks: spec
            .disks
            .into_iter()
            .map(|disk| DiskSpec {
                name: disk.name,
                size_mib: disk.size_mib,
            })
            .collect(),
        port_forwards,
        vcpu_type: spec.vcpu_type,
        encrypted_disk_mib: spec.encrypted_disk_mib,
        key_broker: spec.key_broker.map(|broker| KeyBrokerBinding {
            guest_url: broker.url,
            pin: broker.pin,
            repository: broker.repository,
        }),
        id_block: id_block_from_proto(&spec.id_block, &spec.id_auth)?,
        placement: placement_from_proto(spec.placement.unwrap_or_default())?,
        ha: ha_from_proto(spec.ha)?,
        ha_priority: spec.ha_priority,
        labels: spec.labels.into_iter().collect(),
    })
}

/// The domain HA policy of an API one.
pub fn ha_from_proto(ha: i32) -> Result<HaPolicy, OpError> {
    match v1::HaPolicy::try_from(ha) {
        Ok(v1::HaPolicy::None) => Ok(HaPolicy::None),
        Ok(v1::HaPolicy::Restart) => Ok(HaPolicy::Restart),
        Err(_) => Err(OpError::invalid(format!(
            "ha {ha}: HA_POLICY_NONE or HA_POLICY_RESTART"
        ))),
    }
}

fn ha_to_proto(ha: HaPolicy) -> v1::HaPolicy {
    match ha {
        HaPolicy::None => v1::HaPolicy::None,
        HaPolicy::Restart => v1::HaPolicy::Restart,
    }
}

fn non_empty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

fn component(value: Option<u32>, field: &str) -> Result<Option<u8>, OpError> {
    value
        .map(|value| {
            u8::try_from(value).map_err(|_| {
                OpError::invalid(format!(
                    "placement.minimum_tcb.{field}: {value} is above 255"
                ))
            })
        })
        .transpose()
}

fn placement_from_proto(placement: v1::Placement) -> Result<PlacementRules, OpError> {
    let tcb = placement.minimum_tcb.unwrap_or_default();
    Ok(PlacementRules {
        host: non_empty(placement.host),
        labels: placement.labels,
        anti_affinity: non_empty(placement.anti_affinity),
        affinity: non_empty(placement.affinity),
        driver: non_empty(placement.driver),
        minimum_tcb: MinimumTcb {
            fmc: component(tcb.fmc, "fmc")?,
            bootloader: component(tcb.bootloader, "bootloader")?,
            tee: component(tcb.tee, "tee")?,
            snp: component(tcb.snp, "snp")?,
            microcode: component(tcb.microcode, "microcode")?,
        },
    })
}

fn placement_to_proto(placement: &PlacementRules) -> v1::Placement {
    let tcb = &placement.minimum_tcb;
    v1::Placement {
        host: placement.host.clone().unwrap_or_default(),
        labels: placement.labels.clone(),
        anti_affinity: placement.anti_affinity.clone().unwrap_or_default(),
        affinity: placement.affinity.clone().unwrap_or_default(),
        driver: placement.driver.clone().unwrap_or_default(),
        minimum_tcb: Some(v1::MinimumTcb {
            fmc: tcb.fmc.map(u32::from),
            bootloader: tcb.bootloader.map(u32::from),
            tee: tcb.tee.map(u32::from),
            snp: tcb.snp.map(u32::from),
            microcode: tcb.microcode.map(u32::from),
        }),
    }
}

/// An owner's ID block from its two structures; none when both are empty.
pub fn id_block_from_proto(block: &[u8], auth: &[u8]) -> Result<Option<OwnerIdBlock>, OpError> {
    if block.is_empty() && auth.is_empty() {
        return Ok(None);
    }
    SignedIdBlock::from_bytes(block, auth)
        .map(|signed| Some(OwnerIdBlock { signed }))
        .map_err(|error| OpError::invalid(format!("id_block: {error}")))
}

fn forwards(forwards: &[PortForward]) -> Vec<v1::PortForward> {
    forwards
        .iter()
        .map(|forward| v1::PortForward {
            host_port: u32::from(forward.host_port),
            guest_port: u32::from(forward.guest_port),
        })
        .collect()
}

/// The API view of an attestation state.
pub fn attestation_to_proto(attestation: &Attestation) -> v1::AttestationStatus {
    use v1::attestation_status::State;
    let (state, reason) = match attestation {
        Attestation::NotApplicable => (State::NotApplicable, String::new()),
        Attestation::Pending => (State::Pending, "waiting for the guest to attest".to_owned()),
        Attestation::Released => (State::Released, String::new()),
        Attestation::Refused(reason) => (State::Refused, reason.clone()),
    };
    v1::AttestationStatus {
        state: state.into(),
        reason,
        verdict: None,
    }
}

/// The API view of a VM.
pub fn vm_to_proto(vm: &VmRecord, simulated_firmware: bool) -> v1::Vm {
    let spec = &vm.spec;
    v1::Vm {
        id: vm.id.0.clone(),
        owner: vm.owner.clone(),
        spec: Some(v1::VmSpec {
            name: spec.name.clone(),
            image: spec.image.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            mode: mode_to_proto(spec.mode).into(),
            guest_policy: spec.guest_policy,
            disks: spec
                .disks
                .iter()
                .map(|disk| v1::DiskSpec {
                    name: disk.name.clone(),
                    size_mib: disk.size_mib,
                })
                .collect(),
            port_forwards: forwards(&spec.port_forwards),
            vcpu_type: spec.vcpu_type.clone(),
            encrypted_disk_mib: spec.encrypted_disk_mib,
            key_resource: spec
                .key_broker
                .as_ref()
                .map(|binding| binding.resource(&vm.id))
                .unwrap_or_default(),
            key_broker: spec.key_broker.as_ref().map(|binding| v1::KeyBroker {
                url: binding.guest_url.clone(),
                pin: binding.pin.clone(),
                repository: binding.repository.clone(),
            }),
            id_block: spec
                .id_block
                .as_ref()
                .map(|id_block| id_block.signed.block.to_bytes().to_vec())
                .unwrap_or_default(),
            id_auth: spec
                .id_block
                .as_ref()
                .map(|id_block| id_block.signed.auth_bytes().to_vec())
                .unwrap_or_default(),
            placement: Some(placement_to_proto(&spec.placement)),
            ha: ha_to_proto(spec.ha).into(),
            ha_priority: spec.ha_priority,
            labels: spec
                .labels
                .iter()
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect(),
        }),
        state: state_to_proto(vm.state).into(),
        state_reason: vm.state_reason.clone(),
        host: vm.host.clone(),
        expected_measurement: vm.expected_measurement.clone(),
        launch_digest: vm.launch_digest.clone(),
        simulated_firmware: simulated_firmware && spec.mode != ConfidentialMode::None,
        attestation: Some(attestation_to_proto(&vm.attestation)),
        created_at: rfc3339(vm.created_at),
        updated_at: rfc3339(vm.updated_at),
        port_forwards: vm
            .runtime
            .as_ref()
            .map(|runtime| forwards(&runtime.port_forwards))
            .unwrap_or_default(),
        placement: String::new(),
    }
}

/// The API view of an image.
pub fn image_to_proto(image: &ImageRecord) -> v1::Image {
    v1::Image {
        id: image.id.clone(),
        name: image.name.clone(),
        sha256: image.sha256.iter().cloned().collect(),
        cmdline: image.cmdline.clone(),
        measured_direct_boot: image.measured_direct_boot,
        size_bytes: image.size_bytes,
        imported_at: rfc3339(image.imported_at),
    }
}

/// The API view of a host and its allocations; `down` says why it is not
/// heard from, when it is not.
pub fn host_to_proto(
    host: &HostRecord,
    vcpus: u32,
    memory_mib: u64,
    vms: u32,
    down: Option<String>,
) -> v1::Host {
    let capabilities: Option<HostCapabilities> = serde_json::from_str(&host.capabilities_json).ok();
    v1::Host {
        name: host.name.clone(),
        // A failed host is down as well, and says more.
        status: if down.is_some() && host.status != crate::coordinator::ha::FAILED {
            "down".to_owned()
        } else {
            host.status.clone()
        },
        status_reason: down.unwrap_or_default(),
        address: host.address.clone(),
        coordinator: false,
        labels: capabilities
            .as_ref()
            .map(|capabilities| capabilities.labels.clone())
            .unwrap_or_default(),
        capabilities: capabilities.map(|capabilities| v1::HostCapabilities {
            cpus: capabilities.cpus,
            memory_mib: capabilities.memory_mib,
            accelerator: capabilities.accelerator,
            accelerator_reason: capabilities.accelerator_reason,
            driver: capabilities.driver,
            driver_version: capabilities.driver_version,
            sev: Some(v1::SevCapabilities {
                simulated: capabilities.sev.simulated,
                sev: capabilities.sev.sev,
                sev_es: capabilities.sev.sev_es,
                snp: capabilities.sev.snp,
                product: capabilities.sev.product,
                firmware_version: capabilities.sev.firmware_version,
                reported_tcb: capabilities.sev.reported_tcb,
                asids_total: capabilities.sev.asids_total,
                asids_free: capabilities.sev.asids_free,
                chip_id: capabilities.sev.chip_id,
            }),
            debug_policy_allowed: capabilities.debug_policy_allowed,
        }),
        vcpus_allocated: vcpus,
        memory_mib_allocated: memory_mib,
        vms,
        probed_at: rfc3339(host.probed_at),
    }
}
