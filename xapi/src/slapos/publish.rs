//! The connection parameters an instance publishes
//! (`integrations/slapos/instance-output-schema.json`), every value a
//! string as SlapOS carries them, serialised as the release declares
//! (`json-in-xml`: the JSON document under one `_` key).

use std::collections::BTreeMap;

use hsev_proto::v1::attestation_status::State as AttestationState;
use hsev_proto::v1::{Vm, VmState};
use serde_json::{Map, Value};

use super::parameters::Request;

/// Where hsevd binds forwarded ports: the host's loopback.
const FORWARD_ADDRESS: &str = "127.0.0.1";

/// The connection parameter that says what the requester must do before
/// its VM runs (pin its disk key's release policy).
pub const AWAITING: &str = "awaiting";

/// Connection parameters, by name.
pub type ConnectionParameters = BTreeMap<String, String>;

/// What an instance served by `vm` publishes.
pub fn connection_parameters(vm: &Vm, request: Option<&Request>) -> ConnectionParameters {
    let mut parameters = ConnectionParameters::new();
    let mut put = |key: &str, value: String| {
        parameters.insert(key.to_owned(), value);
    };
    put("vm-id", vm.id.clone());
    put("host", vm.host.clone());
    put("state", state_name(vm.state).to_owned());
    if let Some(name) = request.and_then(|request| request.name.clone()) {
        put("name", name);
    }
    if !vm.expected_measurement.is_empty() {
        put(
            "expected-measurement",
            hex::encode(&vm.expected_measurement),
        );
    }
    if !vm.launch_digest.is_empty() {
        put("launch-digest", hex::encode(&vm.launch_digest));
    }
    let attestation = vm.attestation.as_ref();
    put(
        "attestation-state",
        attestation_state_name(attestation.map_or(0, |attestation| attestation.state)).to_owned(),
    );
    if let Some(reason) = attestation
        .map(|attestation| attestation.reason.as_str())
        .filter(|reason| !reason.is_empty())
    {
        put("attestation-reason", reason.to_owned());
    }
    put("simulated-firmware", vm.simulated_firmware.to_string());
    if let Some(resource) = vm
        .spec
        .as_ref()
        .map(|spec| spec.key_resource.as_str())
        .filter(|resource| !resource.is_empty())
    {
        put("encrypted-disk-key", resource.to_owned());
    }
    for forward in &vm.port_forwards {
        put(
            &format!("nat-rule-url-tcp-{}", forward.guest_port),
            format!("{FORWARD_ADDRESS}:{}", forward.host_port),
        );
    }
    parameters
}

/// What an instance whose request is refused publishes: the reason, so
/// that the requester reads it back with `slapos request` on a master that
/// keeps no errors (slapproxy).
pub fn refusal(message: &str) -> ConnectionParameters {
    ConnectionParameters::from([
        ("state".to_owned(), "refused".to_owned()),
        ("error".to_owned(), message.to_owned()),
    ])
}

/// `parameters` in the release's `json-in-xml` serialisation.
pub fn json_in_xml(parameters: &ConnectionParameters) -> Map<String, Value> {
    let document: Map<String, Value> = parameters
        .iter()
        .map(|(key, value)| (key.clone(), Value::String(value.clone())))
        .collect();
    Map::from_iter([(
        "_".to_owned(),
        Value::String(Value::Object(document).to_string()),
    )])
}

/// The short name of a VM state, as `hsev vm show` prints it.
pub fn state_name(state: i32) -> &'static str {
    match VmState::try_from(state) {
        Ok(VmState::Creating) => "creating",
        Ok(VmState::Stopped) => "stopped",
        Ok(VmState::Starting) => "starting",
        Ok(VmState::Running) => "running",
        Ok(VmState::Stopping) => "stopping",
        Ok(VmState::Failed) => "failed",
        Ok(VmState::Deleting) => "deleting",
        Ok(VmState::Lost) => "lost",
        Ok(VmState::Unknown) => "unknown",
        Ok(VmState::Unspecified) | Err(_) => "unknown",
    }
}

/// The short name of an attestation state.
pub fn attestation_state_name(state: i32) -> &'static str {
    match AttestationState::try_from(state) {
        Ok(AttestationState::NotApplicable) => "not-applicable",
        Ok(AttestationState::Pending) => "pending",
        Ok(AttestationState::Released) => "released",
        Ok(AttestationState::Refused) => "refused",
        Ok(AttestationState::Unspecified) | Err(_) => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hsev_proto::v1::{AttestationStatus, PortForward, VmSpec};

    #[test]
    fn a_running_vm_publishes_its_identity_measurements_and_forwards() {
        let vm = Vm {
            id: "6f1c".into(),
            host: "node-1".into(),
            state: VmState::Running.into(),
            expected_measurement: vec![0xab; 48],
            launch_digest: vec![0xab; 48],
            simulated_firmware: true,
            attestation: Some(AttestationStatus {
                state: AttestationState::Released.into(),
                ..AttestationStatus::default()
            }),
            spec: Some(VmSpec {
                key_resource: "hsev/disk-key/6f1c".into(),
                ..VmSpec::default()
            }),
            port_forwards: vec![PortForward {
                host_port: 40123,
                guest_port: 22,
            }],
            ..Vm::default()
        };
        let published = connection_parameters(&vm, None);
        assert_eq!(published["vm-id"], "6f1c");
        assert_eq!(published["state"], "running");
        assert_eq!(published["attestation-state"], "released");
        assert_eq!(published["launch-digest"], "ab".repeat(48));
        assert_eq!(published["simulated-firmware"], "true");
        assert_eq!(published["encrypted-disk-key"], "hsev/disk-key/6f1c");
        assert_eq!(published["nat-rule-url-tcp-22"], "127.0.0.1:40123");
        assert!(!published.contains_key("attestation-reason"));

        let wrapped = json_in_xml(&published);
        let document: Value =
            serde_json::from_str(wrapped["_"].as_str().expect("a string")).expect("JSON");
        assert_eq!(document["vm-id"], "6f1c");
        assert_eq!(
            refusal("ram-size: too small")["error"],
            "ram-size: too small"
        );
    }
}
