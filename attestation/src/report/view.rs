//! The report as a serde document: every field decoded, byte strings in hex.
//! `hsev attest show` prints it; APIs embed it.

use serde::ser::{Serialize, SerializeStruct, Serializer};

use super::AttestationReport;

impl Serialize for AttestationReport {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut state = serializer.serialize_struct("AttestationReport", 28)?;
        state.serialize_field("version", &self.version)?;
        state.serialize_field("product", &self.product())?;
        state.serialize_field("guest_svn", &self.guest_svn)?;
        state.serialize_field("policy", &self.policy)?;
        state.serialize_field("family_id", &hex::encode(self.family_id))?;
        state.serialize_field("image_id", &hex::encode(self.image_id))?;
        state.serialize_field("vmpl", &self.vmpl)?;
        state.serialize_field("signature_algo", "ecdsa-p384-sha384")?;
        state.serialize_field("current_tcb", &self.current_tcb)?;
        state.serialize_field("platform_info", &self.platform_info)?;
        state.serialize_field("key_info", &self.key_info)?;
        state.serialize_field("report_data", &hex::encode(self.report_data))?;
        state.serialize_field("measurement", &hex::encode(self.measurement))?;
        state.serialize_field("host_data", &hex::encode(self.host_data))?;
        state.serialize_field("id_key_digest", &hex::encode(self.id_key_digest))?;
        state.serialize_field("author_key_digest", &hex::encode(self.author_key_digest))?;
        state.serialize_field("report_id", &hex::encode(self.report_id))?;
        state.serialize_field("report_id_ma", &hex::encode(self.report_id_ma))?;
        state.serialize_field("reported_tcb", &self.reported_tcb)?;
        state.serialize_field("cpuid", &self.cpuid)?;
        state.serialize_field("chip_id", &hex::encode(self.chip_id))?;
        state.serialize_field("committed_tcb", &self.committed_tcb)?;
        state.serialize_field("current_version", &self.current_version)?;
        state.serialize_field("committed_version", &self.committed_version)?;
        state.serialize_field("launch_tcb", &self.launch_tcb)?;
        state.serialize_field(
            "launch_mit_vector",
            &self.launch_mit_vector.map(|vector| format!("{vector:#x}")),
        )?;
        state.serialize_field(
            "current_mit_vector",
            &self.current_mit_vector.map(|vector| format!("{vector:#x}")),
        )?;
        state.serialize_field(
            "signature",
            &serde_json::json!({ "r": hex::encode(self.signature.r), "s": hex::encode(self.signature.s) }),
        )?;
        state.end()
    }
}
