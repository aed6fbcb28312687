//! Which OpenSVC node and service hold a VM, kept in the VM's labels.
//!
//! A pool's VM is one object every OpenSVC node can see. For a failover
//! service, only the node whose instance started it may report it up
//! (two "up" instances make OpenSVC report the service in warning) or stop
//! it (a node that comes back after a failover must not stop the VM its
//! peer took over). The launcher labels the VM at each start with this
//! node and this service, and judges by those labels; another service's
//! VM is never touched. This module only reads labels and says what they
//! should be.

use std::collections::HashMap;

use hsev_proto::v1::Vm;

/// The label naming the node that last started the VM.
pub const NODE_LABEL: &str = "opensvc.node";
/// The label naming the service the VM belongs to.
pub const SERVICE_LABEL: &str = "opensvc.service";

/// Who a VM's labels say holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The node that last started it.
    pub node: Option<String>,
    /// Its service.
    pub service: Option<String>,
}

impl Holder {
    /// The holder `vm`'s labels name.
    pub fn of(vm: &Vm) -> Self {
        let labels = vm.spec.as_ref().map(|spec| &spec.labels);
        let label = |key: &str| labels.and_then(|labels| labels.get(key)).cloned();
        Holder {
            node: label(NODE_LABEL),
            service: label(SERVICE_LABEL),
        }
    }
}

/// Refuses a VM that belongs to another service.
pub fn check_service(vm: &Vm, service: Option<&str>) -> Result<(), String> {
    let holder = Holder::of(vm);
    match (holder.service.as_deref(), service) {
        (Some(theirs), Some(ours)) if theirs != ours => Err(format!(
            "VM {} belongs to the OpenSVC service {theirs}, not to {ours}: it is left alone",
            vm.spec
                .as_ref()
                .map(|spec| spec.name.as_str())
                .unwrap_or(&vm.id)
        )),
        _ => Ok(()),
    }
}

/// The labels a VM started by `node` for `service` carries: the spec's,
/// and the two of the launcher. The spec may not set those two itself.
pub fn labels_for(
    spec_labels: &HashMap<String, String>,
    node: &str,
    service: Option<&str>,
) -> Result<HashMap<String, String>, String> {
    for key in [NODE_LABEL, SERVICE_LABEL] {
        if spec_labels.contains_key(key) {
            return Err(format!(
                "labels: {key} is set by the launcher, not by the spec"
            ));
        }
    }
    let mut labels = spec_labels.clone();
    labels.insert(NODE_LABEL.to_owned(), node.to_owned());
    if let Some(service) = service {
        labels.insert(SERVICE_LABEL.to_owned(), service.to_owned());
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hsev_proto::v1::VmSpec;

    fn vm(labels: &[(&str, &str)]) -> Vm {
        Vm {
            id: "id-1".into(),
            spec: Some(VmSpec {
                name: "vault".into(),
                labels: labels
                    .iter()
                    .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                    .collect(),
                ..VmSpec::default()
            }),
            ..Vm::default()
        }
    }

    #[test]
    fn the_labels_name_the_node_and_the_service() {
        let labelled = vm(&[(NODE_LABEL, "n1"), (SERVICE_LABEL, "root/svc/vault")]);
        assert_eq!(
            Holder::of(&labelled),
            Holder {
                node: Some("n1".into()),
                service: Some("root/svc/vault".into())
            }
        );
        assert!(check_service(&labelled, Some("root/svc/vault")).is_ok());
        let error = check_service(&labelled, Some("prod/svc/other")).expect_err("not ours");
        assert!(error.contains("root/svc/vault"), "{error}");
        assert!(check_service(&vm(&[]), Some("prod/svc/other")).is_ok());
    }

    #[test]
    fn the_spec_keeps_its_labels_but_not_the_launchers() {
        let spec: HashMap<String, String> = [("team".to_owned(), "db".to_owned())].into();
        let labels = labels_for(&spec, "n2", Some("root/svc/vault")).expect("labels");
        assert_eq!(labels.len(), 3);
        assert_eq!(labels[NODE_LABEL], "n2");
        let spoofed: HashMap<String, String> = [(NODE_LABEL.to_owned(), "n9".to_owned())].into();
        assert!(labels_for(&spoofed, "n2", None).is_err());
    }
}
