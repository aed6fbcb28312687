//! The coordinator's checks of a VM spec that depend on no host: names,
//! sizes, the guest policy, the tenant's key broker, the owner's ID block.
//! What a host can run is placement's to judge ([`crate::placement`]).

use std::collections::HashSet;

use hsev_attestation::report::GuestPolicy;

use crate::daemon::error::OpError;
use crate::model::{ConfidentialMode, OwnerIdBlock, VmSpec, ENCRYPTED_DISK_NAME};

/// The guest policy a confidential VM gets when its spec names none: SMT
/// allowed, no debugging, no migration agent.
const DEFAULT_POLICY: u64 = 0x30000;

fn valid_vm_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|first| first.is_ascii_lowercase())
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn valid_disk_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Checks a spec; fills in the defaults (vCPU type, guest policy).
pub fn validate(mut spec: VmSpec, default_vcpu_type: &str) -> Result<VmSpec, OpError> {
    if !valid_vm_name(&spec.name) {
        return Err(OpError::invalid(format!(
            "name {:?}: 1-63 of a-z, 0-9 and '-', starting with a letter",
            spec.name
        )));
    }
    if spec.vcpus == 0 {
        return Err(OpError::invalid("vcpus must be at least 1"));
    }
    if spec.memory_mib < 64 {
        return Err(OpError::invalid("memory_mib must be at least 64"));
    }
    crate::model::check_labels(&spec.labels).map_err(OpError::invalid)?;
    let mut disk_names = HashSet::new();
    for disk in &spec.disks {
        if disk.name == ENCRYPTED_DISK_NAME {
            return Err(OpError::invalid(format!(
                "disk name {ENCRYPTED_DISK_NAME:?} is reserved for the encrypted disk \
                 (encrypted_disk_mib)"
            )));
        }
        if !valid_disk_name(&disk.name) || !disk_names.insert(disk.name.clone()) {
            return Err(OpError::invalid(format!(
                "disk name {:?} is invalid or repeated",
                disk.name
            )));
        }
        if disk.size_mib == 0 {
            return Err(OpError::invalid(format!(
                "disk {} must be at least 1 MiB",
                disk.name
            )));
        }
    }
    if spec
        .port_forwards
        .iter()
        .any(|forward| forward.guest_port == 0)
    {
        return Err(OpError::invalid("port_forwards: guest_port must not be 0"));
    }
    if spec.vcpu_type.is_empty() {
        spec.vcpu_type = default_vcpu_type.to_owned();
    }
    if hsev_attestation::measurement::vcpu_sig_for_type(&spec.vcpu_type).is_none() {
        return Err(OpError::invalid(format!(
            "unknown vcpu_type {:?}",
            spec.vcpu_type
        )));
    }
    if spec.mode != ConfidentialMode::None {
        if spec.guest_policy == 0 {
            spec.guest_policy = DEFAULT_POLICY;
        }
        GuestPolicy::new(spec.guest_policy)
            .map_err(|error| OpError::invalid(format!("guest_policy: {error}")))?;
    }
    if spec.encrypted_disk_mib > 0 {
        if spec.mode != ConfidentialMode::SevSnp {
            return Err(OpError::invalid(format!(
                "encrypted_disk_mib needs mode sev-snp (the key is released to an attested \
                 SNP guest), not {}",
                spec.mode
            )));
        }
        if spec.key_broker.is_none() {
            return Err(OpError::invalid(
                "encrypted_disk_mib needs key_broker: the tenant's key broker (url, pin, \
                 repository) that will hold the disk's key",
            ));
        }
    }
    if let Some(binding) = &spec.key_broker {
        validate_key_broker(binding)?;
        if spec.mode != ConfidentialMode::SevSnp {
            return Err(OpError::invalid(format!(
                "key_broker needs mode sev-snp (the guest attests to it), not {}",
                spec.mode
            )));
        }
    }
    if let Some(id_block) = &spec.id_block {
        check_id_block_signatures_and_policy(&spec, id_block)?;
    }
    Ok(spec)
}

/// Whether the spec's guest policy lets the host debug the guest.
pub fn allows_debugging(spec: &VmSpec) -> bool {
    spec.mode != ConfidentialMode::None
        && GuestPolicy::new(spec.guest_policy).is_ok_and(|policy| policy.debug_allowed())
}

/// A tenant's key broker: an https URL with its key's pin (or, for a
/// development broker, plain http without one) and a repository name.
fn validate_key_broker(binding: &crate::model::KeyBrokerBinding) -> Result<(), OpError> {
    let url = &binding.guest_url;
    let https = url.starts_with("https://");
    if !https && !url.starts_with("http://") {
        return Err(OpError::invalid(format!(
            "key_broker.url {url:?}: an http(s):// URL as the guest reaches the broker"
        )));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(OpError::invalid(format!(
            "key_broker.url {url:?}: no spaces (it goes on the kernel command line)"
        )));
    }
    match (https, binding.pin.as_str()) {
        (true, "") => {
            return Err(OpError::invalid(
                "key_broker.pin: an https broker needs the pin of its public key \
                 (`hsev-kbs fingerprint`): the guest refuses any other",
            ))
        }
        (false, pin) if !pin.is_empty() => {
            return Err(OpError::invalid(
                "key_broker.pin: a plain-http (development) broker has no key to pin",
            ))
        }
        (true, pin) => {
            let hex = pin.strip_prefix("sha256:").unwrap_or_default();
            if hex.len() != 64 || !hex.bytes().all(|byte| byte.is_ascii_hexdigit()) {
                return Err(OpError::invalid(format!(
                    "key_broker.pin {pin:?}: sha256:<64 hex digits>"
                )));
            }
        }
        _ => {}
    }
    hsev_attestation::kbs::protocol::check_name(&binding.repository)
        .map_err(|error| OpError::invalid(format!("key_broker.repository: {error}")))
}

/// An ID block must be signed as it says and be for the VM's guest policy.
pub fn check_id_block_signatures_and_policy(
    spec: &VmSpec,
    id_block: &OwnerIdBlock,
) -> Result<(), OpError> {
    if spec.mode != ConfidentialMode::SevSnp {
        return Err(OpError::invalid(format!(
            "an ID block is for sev-snp VMs, not {}",
            spec.mode
        )));
    }
    // The owner's signatures, checked now for a clear answer (the firmware
    // checks them again at launch, whatever the host does).
    let block = &id_block.signed.block;
    id_block
        .signed
        .check(&block.launch_digest, block.policy)
        .map_err(|refusal| OpError::invalid(format!("the ID block: {refusal}")))?;
    let policy = block.policy;
    if policy != spec.guest_policy {
        return Err(OpError::invalid(format!(
            "the ID block is for guest policy {policy:#x}, the VM's is {:#x} (the firmware \
             would refuse the launch: POLICY_FAILURE)",
            spec.guest_policy
        )));
    }
    Ok(())
}

/// An ID block must authorise the measurement this VM's launch will have.
pub fn check_id_block_digest(
    spec: &VmSpec,
    id_block: &OwnerIdBlock,
    expected_measurement: &[u8],
) -> Result<(), OpError> {
    let authorised = id_block.signed.block.launch_digest;
    if authorised.as_slice() != expected_measurement {
        return Err(OpError::precondition(format!(
            "the ID block authorises measurement {}, and VM {} measures {} (the firmware \
             would refuse the launch: BAD_MEASUREMENT)",
            hex::encode(authorised),
            spec.name,
            hex::encode(expected_measurement)
        )));
    }
    Ok(())
}
