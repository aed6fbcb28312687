//! The libvirt driver: VMs as domains of a libvirt daemon, for hosts whose
//! operators already run libvirt (OpenStack Nova, oVirt, virt-manager).
//!
//! - [`xml`]: the domain XML, a pure function of the launch spec and the
//!   probe (always built, so it is unit-tested everywhere);
//! - [`capabilities`]: `domcapabilities` and libvirt's versions, parsed;
//! - the driver itself (`LibvirtDriver`, behind the `libvirt` cargo
//!   feature, as it links the LGPL `virt` crate and the system libvirt)
//!   and its lifecycle-event log.
//!
//! Domains are **transient** (`virDomainCreateXML`): libvirt holds a
//! domain while it runs, and forgets it when it ends. hsevd's store is the
//! one record of what a VM is; the XML is rebuilt from it at each start,
//! so there is no second, persistent definition to drift from it (an
//! image, a policy or a probe that changed since), nothing to undefine
//! when a VM is deleted, and nothing for libvirt to autostart behind the
//! pool's back. Adoption after an hsevd restart finds a running domain by
//! its UUID (the VM id) and checks that its metadata names the VM's run
//! dir; a domain that ended while hsevd was down has left no record, and
//! is reported as ended.
//!
//! The domain's name is `<domain_prefix><vm id>` (unique on the host
//! whatever the VM's name), its title the VM's name.

pub mod capabilities;
pub mod xml;

#[cfg(feature = "libvirt")]
mod driver;
#[cfg(feature = "libvirt")]
#[allow(unsafe_code)]
mod events;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{AcceleratorSetting, DriverError};

#[cfg(feature = "libvirt")]
pub use driver::LibvirtDriver;

/// How the libvirt daemon is reached and used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LibvirtConfig {
    /// The connection URI (`qemu:///system`, or with `?socket=PATH` for a
    /// daemon listening elsewhere). The host must be this machine: the
    /// driver probes KVM, and writes disks and console logs, locally.
    pub uri: String,
    /// Domain names are this prefix and the VM id.
    pub domain_prefix: String,
    /// Which accelerator domains get (`kvm` or `qemu` domain type).
    pub accelerator: AcceleratorSetting,
    /// The KVM device the accelerator probe opens.
    pub kvm_device: PathBuf,
    /// `qemu-img`, for data disks.
    pub qemu_img: PathBuf,
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        LibvirtConfig {
            uri: "qemu:///system".to_owned(),
            domain_prefix: "hsev-".to_owned(),
            accelerator: AcceleratorSetting::Auto,
            kvm_device: PathBuf::from("/dev/kvm"),
            qemu_img: PathBuf::from("/usr/bin/qemu-img"),
        }
    }
}

impl LibvirtConfig {
    /// Checks the values; names the bad field.
    pub fn validate(&self) -> Result<(), DriverError> {
        let invalid = |field, reason: &str| DriverError::InvalidSpec {
            field,
            reason: reason.to_owned(),
        };
        if !self.uri.starts_with("qemu:///") {
            return Err(invalid(
                "libvirt.uri",
                "must be a local QEMU URI (qemu:///system or qemu:///session, optionally with \
                 ?socket=PATH)",
            ));
        }
        if self.domain_prefix.is_empty()
            || !self
                .domain_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "libvirt.domain_prefix",
                "must be letters, digits, '-' or '_'",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_config_defaults_and_validation() {
        let config: LibvirtConfig =
            serde_json::from_str(r#"{"uri": "qemu:///system?socket=/run/x/libvirt-sock"}"#)
                .expect("parses");
        assert_eq!(config.domain_prefix, "hsev-");
        config.validate().expect("valid");
        assert!(serde_json::from_str::<LibvirtConfig>(r#"{"url": "qemu:///system"}"#).is_err());
        let remote = LibvirtConfig {
            uri: "qemu+ssh://host/system".into(),
            ..LibvirtConfig::default()
        };
        let error = remote.validate().expect_err("remote");
        assert!(error.to_string().contains("libvirt.uri"), "{error}");
    }
}
