//! What a tenant computes on its own machine about its VM, from its own copy
//! of the image and trusting no number the host gives: the launch
//! measurement the VM must show. The host computes the same with the same
//! code ([`crate::launch`]); the tenant's figure is the one its release
//! policy pins and its ID block signs.
//!
//! The guest's key broker binding (URL, pin, repository) is measured with
//! the command line: given by the tenant, it is the tenant's; otherwise it
//! is the host's word, and a host that pointed the guest elsewhere would be
//! measured as it chose.

use std::path::Path;

use hsev_proto::v1;

use super::output::InputError;
use crate::api::vm::spec_from_proto;
use crate::launch::manifest::ImageFolder;
use crate::launch::{self, ImageBytes};
use crate::model::{KeyBrokerBinding, VmId, VmSpec};

/// A VM's expected launch measurement as its tenant computes it.
#[derive(Debug)]
pub struct TenantMeasurement {
    /// The measurement.
    pub measurement: Vec<u8>,
    /// The VM's id.
    pub vm: VmId,
    /// The VM's spec, as the host reports it.
    pub spec: VmSpec,
}

/// Computes `vm`'s launch measurement from the image whose manifest is at
/// `manifest` (a file or its folder): every artifact's sha256 is checked
/// first, and the VM must boot that very image. With `key_broker`, the
/// guest's command line names that broker (the tenant's), whatever the
/// host says.
pub fn measure_vm(
    vm: &v1::Vm,
    manifest: &Path,
    key_broker: Option<KeyBrokerBinding>,
) -> Result<TenantMeasurement, InputError> {
    let spec = vm
        .spec
        .clone()
        .ok_or_else(|| InputError("hsevd sent a VM without its spec".into()))?;
    let mut spec = spec_from_proto(spec).map_err(|error| InputError(error.message))?;
    if key_broker.is_some() {
        spec.key_broker = key_broker;
    }
    let folder = ImageFolder::read(manifest)?;
    if folder.image_id() != spec.image {
        return Err(InputError(format!(
            "VM {} boots image {}, and {} is image {}: measure it with the manifest of the \
             image it boots",
            spec.name,
            spec.image,
            manifest.display(),
            folder.image_id()
        )));
    }
    let verified = folder.verify()?;
    let id = VmId(vm.id.clone());
    let cmdline = launch::guest_cmdline(&folder.manifest.cmdline, &id, &spec);
    let bytes = ImageBytes::read(
        &folder.artifact_paths(&verified),
        &cmdline,
        folder.manifest.measured_direct_boot(),
    )?;
    let measurement = launch::expected_measurement(&spec, &bytes)?;
    Ok(TenantMeasurement {
        measurement,
        vm: id,
        spec,
    })
}
