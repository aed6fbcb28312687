//! From a checked [`Request`] to the VM spec hsevd creates, and back: which
//! parameters an existing VM no longer matches.
//!
//! A VM's spec is fixed at creation in hsevd, so every parameter that lives
//! in it (image, cpu-count, ram-size, disk-size, nat-rules,
//! confidential-mode, guest-policy, encrypted-disk-size) is applied by
//! re-creating the VM; the others (name, minimum-tcb,
//! expected-measurement) are checked or published without touching it.
//! A VM with an encrypted disk names the requesters' key broker
//! (`[key_broker]`) in its spec, hence on its measured command line: its
//! guest fetches the key from there, and formats the disk itself.

use hsev_proto::v1::{DiskSpec, KeyBroker, PortForward, Vm, VmSpec};

use super::config::KeyBrokerConfig;
use super::parameters::Request;

/// The name of the plain data disk `disk-size` asks for.
pub const DATA_DISK: &str = "data";

/// MiB in a GB as KVM's release counts disk sizes (qemu-img's `G`).
const MIB_PER_GB: u64 = 1024;

/// The spec of the VM named `name` serving `request`, whose image has the
/// id `image_id`; an encrypted disk's key comes from `key_broker`.
pub fn vm_spec(
    name: &str,
    request: &Request,
    image_id: &str,
    key_broker: Option<&KeyBrokerConfig>,
) -> VmSpec {
    VmSpec {
        name: name.to_owned(),
        image: image_id.to_owned(),
        vcpus: request.cpu_count,
        memory_mib: request.ram_size,
        mode: request.mode.into(),
        guest_policy: request.guest_policy,
        disks: request
            .disk_size
            .map(|size| DiskSpec {
                name: DATA_DISK.to_owned(),
                size_mib: size * MIB_PER_GB,
            })
            .into_iter()
            .collect(),
        port_forwards: request
            .nat_rules
            .iter()
            .map(|&port| PortForward {
                host_port: 0,
                guest_port: port.into(),
            })
            .collect(),
        vcpu_type: String::new(),
        encrypted_disk_mib: request.encrypted_disk_size.unwrap_or(0) * MIB_PER_GB,
        key_resource: String::new(),
        key_broker: key_broker
            .filter(|_| request.encrypted_disk_size.is_some())
            .map(|key_broker| KeyBroker {
                url: key_broker.guest_url.clone(),
                pin: key_broker.pin.clone(),
                repository: key_broker.repository.clone(),
            }),
        id_block: Vec::new(),
        id_auth: Vec::new(),
        labels: Default::default(),
        placement: None,
        ha: hsev_proto::v1::HaPolicy::None.into(),
        ha_priority: 0,
    }
}

/// The parameters whose value `vm` (as hsevd shows it) no longer has.
pub fn differences(vm: &Vm, request: &Request, image_id: &str) -> Vec<&'static str> {
    let wanted = vm_spec("", request, image_id, None);
    let Some(actual) = vm.spec.as_ref() else {
        return vec!["image"];
    };
    let mut changed = Vec::new();
    if actual.image != wanted.image {
        changed.push("image");
    }
    if actual.vcpus != wanted.vcpus {
        changed.push("cpu-count");
    }
    if actual.memory_mib != wanted.memory_mib {
        changed.push("ram-size");
    }
    if actual.disks != wanted.disks {
        changed.push("disk-size");
    }
    let guest_ports = |spec: &VmSpec| -> Vec<u32> {
        spec.port_forwards
            .iter()
            .map(|forward| forward.guest_port)
            .collect()
    };
    if guest_ports(actual) != guest_ports(&wanted) {
        changed.push("nat-rules");
    }
    if actual.mode != wanted.mode {
        changed.push("confidential-mode");
    }
    // hsevd fills in its default policy for confidential VMs, as the
    // request does; an ordinary VM's policy means nothing.
    if wanted.guest_policy != 0 && actual.guest_policy != wanted.guest_policy {
        changed.push("guest-policy");
    }
    if actual.encrypted_disk_mib != wanted.encrypted_disk_mib {
        changed.push("encrypted-disk-size");
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slapos::parameters::{parse, SoftwareType};
    use hsev_proto::v1::ConfidentialMode;
    use serde_json::json;

    fn request(value: serde_json::Value) -> Request {
        let serde_json::Value::Object(map) = value else {
            panic!("an object")
        };
        parse(SoftwareType::SevSnp, &map, "debian").expect("valid")
    }

    fn key_broker() -> KeyBrokerConfig {
        KeyBrokerConfig {
            guest_url: "https://10.0.2.2:8443".into(),
            url: Some("https://127.0.0.1:8443".into()),
            pin: format!("sha256:{}", "ab".repeat(32)),
            repository: "tenants".into(),
            token_file: "kbs.token".into(),
        }
    }

    #[test]
    fn the_spec_carries_every_vm_parameter_in_hsevd_units() {
        let spec = vm_spec(
            "comp-1-slappart0-00000000",
            &request(json!({"ram-size": 2048, "cpu-count": 1, "disk-size": 2,
                            "nat-rules": [22], "encrypted-disk-size": 1})),
            "image-id",
            Some(&key_broker()),
        );
        assert_eq!(spec.memory_mib, 2048);
        assert_eq!(spec.vcpus, 1);
        assert_eq!(spec.mode, i32::from(ConfidentialMode::SevSnp));
        assert_eq!(spec.guest_policy, 0x30000);
        assert_eq!(
            spec.disks,
            vec![DiskSpec {
                name: "data".into(),
                size_mib: 2048
            }]
        );
        assert_eq!(spec.encrypted_disk_mib, 1024);
        assert_eq!(spec.port_forwards[0].guest_port, 22);
        assert_eq!(spec.port_forwards[0].host_port, 0);
        assert_eq!(
            spec.key_broker,
            Some(KeyBroker {
                url: "https://10.0.2.2:8443".into(),
                pin: format!("sha256:{}", "ab".repeat(32)),
                repository: "tenants".into(),
            }),
            "the guest's broker, as the guest reaches it"
        );
        let plain = vm_spec(
            "n",
            &request(json!({"ram-size": 2048})),
            "image-id",
            Some(&key_broker()),
        );
        assert_eq!(plain.key_broker, None, "no encrypted disk, no key to fetch");
    }

    #[test]
    fn only_the_changed_parameters_are_named() {
        let before = request(json!({"ram-size": 2048, "nat-rules": [22]}));
        let mut vm = Vm {
            spec: Some(vm_spec("n", &before, "image-id", Some(&key_broker()))),
            ..Vm::default()
        };
        // hsevd resolves host ports and the vCPU type; neither is a change.
        if let Some(spec) = vm.spec.as_mut() {
            spec.vcpu_type = "EPYC-v4".into();
            spec.key_resource = String::new();
        }
        assert!(differences(&vm, &before, "image-id").is_empty());
        let after = request(json!({"ram-size": 4096, "nat-rules": [22, 80]}));
        assert_eq!(
            differences(&vm, &after, "image-id"),
            vec!["ram-size", "nat-rules"]
        );
        assert_eq!(differences(&vm, &before, "other-image"), vec!["image"]);
    }
}
