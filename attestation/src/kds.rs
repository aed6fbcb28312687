//! AMD Key Distribution Service addresses for a report's certificates.
//!
//! This module only computes URLs: nothing here touches the network. Fetch
//! them where a network is, then `hsev attest cache import` the files.

use serde::Serialize;

use crate::product::Product;
use crate::report::{AttestationReport, SigningKey};

/// The base of AMD's key distribution service.
pub const KDS_BASE: &str = "https://kdsintf.amd.com";

/// Where each certificate a report needs can be fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KdsUrls {
    /// The VCEK for the report's chip and reported TCB (VCEK-signed reports;
    /// VLEKs are provisioned by the cloud provider, not published).
    pub vcek: Option<String>,
    /// The ASK (or ASVK) and ARK, PEM.
    pub cert_chain: String,
    /// The revocation list for the product.
    pub crl: String,
}

/// The KDS URLs for `report`, from a chip of `product`.
pub fn urls(report: &AttestationReport, product: Product) -> KdsUrls {
    let name = product.amd_name();
    let service = match report.key_info.signing_key {
        SigningKey::Vlek => "vlek",
        SigningKey::Vcek | SigningKey::None => "vcek",
    };
    let vcek = (report.key_info.signing_key == SigningKey::Vcek).then(|| {
        let hw_id = hex::encode(&report.chip_id[..product.hw_id_len()]);
        let tcb = report.reported_tcb;
        let fmc = tcb.fmc.map(|fmc| format!("fmcSPL={fmc:02}&")).unwrap_or_default();
        format!(
            "{KDS_BASE}/vcek/v1/{name}/{hw_id}?{fmc}blSPL={:02}&teeSPL={:02}&snpSPL={:02}&ucodeSPL={:02}",
            tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode
        )
    });
    KdsUrls {
        vcek,
        cert_chain: format!("{KDS_BASE}/{service}/v1/{name}/cert_chain"),
        crl: format!("{KDS_BASE}/{service}/v1/{name}/crl"),
    }
}
