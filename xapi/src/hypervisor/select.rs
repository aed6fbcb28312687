//! The one place that knows every engine: a [`DriverChoice`] from the
//! configuration becomes a probed `Arc<dyn HypervisorDriver>`. Nothing
//! else in the toolstack names an engine.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::fake::FakeDriver;
use super::libvirt::LibvirtConfig;
use super::{DriverCapabilities, DriverError, HypervisorDriver, QemuConfig, QemuDriver};

/// Which engine runs this host's VMs (`driver = ...` in hsevd.toml).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// QEMU processes of hsevd's own, over QMP.
    #[default]
    Qemu,
    /// Domains of a libvirt daemon.
    Libvirt,
    /// In-memory VMs, no guest (tests, scale runs).
    Fake,
}

impl DriverKind {
    /// The name the configuration and the driver use.
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Qemu => "qemu",
            DriverKind::Libvirt => "libvirt",
            DriverKind::Fake => "fake",
        }
    }
}

/// An engine and its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverChoice {
    /// The engine.
    pub kind: DriverKind,
    /// QEMU's settings (the `qemu` driver).
    pub qemu: QemuConfig,
    /// libvirt's settings (the `libvirt` driver).
    pub libvirt: LibvirtConfig,
}

/// Builds the chosen driver and probes the host with it.
pub fn driver(
    choice: &DriverChoice,
) -> Result<(Arc<dyn HypervisorDriver>, DriverCapabilities), DriverError> {
    let driver: Arc<dyn HypervisorDriver> = match choice.kind {
        DriverKind::Qemu => Arc::new(QemuDriver::new(choice.qemu.clone())?),
        DriverKind::Libvirt => libvirt(&choice.libvirt)?,
        DriverKind::Fake => Arc::new(FakeDriver::default()),
    };
    let capabilities = driver.probe()?;
    Ok((driver, capabilities))
}

#[cfg(feature = "libvirt")]
fn libvirt(config: &LibvirtConfig) -> Result<Arc<dyn HypervisorDriver>, DriverError> {
    Ok(Arc::new(super::libvirt::LibvirtDriver::new(
        config.clone(),
    )?))
}

#[cfg(not(feature = "libvirt"))]
fn libvirt(_config: &LibvirtConfig) -> Result<Arc<dyn HypervisorDriver>, DriverError> {
    Err(DriverError::Unsupported(
        "this hsevd was built without the `libvirt` cargo feature (it links the LGPL libvirt \
         bindings): rebuild with `--features libvirt`, or choose driver = \"qemu\""
            .to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypervisor_select_builds_and_probes_the_chosen_driver() {
        let choice = DriverChoice {
            kind: DriverKind::Fake,
            qemu: QemuConfig::default(),
            libvirt: LibvirtConfig::default(),
        };
        let (fake, capabilities) = driver(&choice).expect("the fake driver");
        assert_eq!(fake.name(), "fake");
        assert_eq!(capabilities.driver, "fake");
        for kind in [DriverKind::Qemu, DriverKind::Libvirt, DriverKind::Fake] {
            let parsed: DriverKind =
                serde_json::from_str(&format!("\"{}\"", kind.as_str())).expect("parses");
            assert_eq!(parsed, kind);
        }
        assert_eq!(DriverKind::default(), DriverKind::Qemu);
        // A libvirt that cannot be reached is named, not a panic.
        let unreachable = DriverChoice {
            kind: DriverKind::Libvirt,
            libvirt: LibvirtConfig {
                uri: "qemu:///system?socket=/nonexistent/sock".into(),
                ..LibvirtConfig::default()
            },
            ..choice
        };
        let error = driver(&unreachable).map(|_| ()).expect_err("no daemon");
        assert!(error.to_string().contains("libvirt"), "{error}");
    }
}
